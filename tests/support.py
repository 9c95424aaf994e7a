"""Test helpers: a real service subprocess, plain HTTP to 127.0.0.1, docker CLI calls."""
import http.client as httpclient
import json
import re
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
FAKE_DOCKER = os.path.join(FIXTURES, "bin", "fake-docker")
COUNTING_DOCKER = os.path.join(FIXTURES, "bin", "counting-docker")
IMAGE = os.environ.get("HC_TEST_IMAGE", "hc-busybox:test")
PREFIX = "/container-healthcheck"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def unique_app(stem="t"):
    return "%s%s" % (stem, uuid.uuid4().hex[:10])


def name_for(app, stamp=None, dash=True):
    stamp = 1700000000 if stamp is None else stamp
    return "%s%s%010d" % (app, "-" if dash else "", stamp)


def http(port, path, method="GET", timeout=10, headers=None, host="127.0.0.1"):
    """(status, headers, body) of one request; a new connection each time."""
    conn = httpclient.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def get_json(port, path, **kwargs):
    status, _, body = http(port, path, **kwargs)
    return status, json.loads(body.decode("utf-8"))


class Service(object):
    """container-healthcheck as a real subprocess, like systemd runs it."""

    def __init__(self, *flags, env=None, port=None, log_path=None, subcommand="serve", host="127.0.0.1"):
        self.host = host
        self.port = port or free_port()
        self.flags = list(flags)
        self.env = dict(os.environ, **(env or {}))
        self.log_path = log_path
        self.subcommand = subcommand
        self.proc = None

    @property
    def argv(self):
        head = [sys.executable, "-m", "healthcheck"]
        if self.subcommand:
            head.append(self.subcommand)
        if "-port" not in self.flags and "--port" not in self.flags:
            head += ["--port", str(self.port)]
        return head + self.flags

    def start(self, wait_s=20):
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=self._log, stderr=self._log, cwd=ROOT)
        deadline = time.time() + wait_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("service exited with %s" % self.proc.returncode)
            try:
                if http(self.port, PREFIX + "/health", timeout=1, host=self.host)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("service did not answer /health")

    def get(self, path, **kwargs):
        return get_json(self.port, PREFIX + path, host=self.host, **kwargs)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def wait_for(predicate, timeout_s=20, interval_s=0.05):
    """Poll predicate until truthy; return its value or the last falsy one. The one way tests
    wait on state."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval_s)
        value = predicate()
    return value


class Docker(object):
    """The real docker CLI; remembers what it created and removes it."""

    def __init__(self, env=None):
        self.env = dict(os.environ, **(env or {}))
        self.created = []

    def __call__(self, *args, check=True, timeout=60):
        proc = subprocess.run(["docker"] + list(args), env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError("docker %s failed: %s" % (" ".join(args), proc.stderr))
        return proc.stdout.strip()

    def run(self, name, *options, cmd=("sleep", "3600"), detach=True):
        args = ["run"] + (["-d"] if detach else []) + ["--name", name, "--label", "hc-test=1"]
        if "--network" not in options:
            args += ["--network", "none"]
        self.created.append(name)
        return self(*(args + list(options) + [IMAGE] + list(cmd)))

    def create(self, name, *options, cmd=("sleep", "3600")):
        self.created.append(name)
        return self("create", "--name", name, "--label", "hc-test=1", "--network", "none",
                    *(list(options) + [IMAGE] + list(cmd)))

    def state(self, name):
        return self("inspect", "-f", "{{.State.Status}}", name)

    def health(self, name):
        return self("inspect", "-f", "{{if .State.Health}}{{.State.Health.Status}}{{end}}", name)

    def cleanup(self):
        if self.created:
            self("rm", "-f", *self.created, check=False)
            self.created = []


def child_pids(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], stdout=subprocess.PIPE, universal_newlines=True).stdout
    return [int(p) for p in out.split()]


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


_LOGFMT_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|[^ "]*)(?: |$)')


def parse_logfmt(line):
    """{key: value} of one logfmt line; raises ValueError if the line is not logfmt."""
    fields, at = {}, 0
    while at < len(line):
        match = _LOGFMT_PAIR.match(line, at)
        if not match:
            raise ValueError("not logfmt at %d: %r" % (at, line))
        key, value = match.group(1), match.group(2)
        fields[key] = json.loads(value) if value.startswith('"') else value
        at = match.end()
    return fields


class FakeClock(object):
    """A clock a test moves by hand, for modules that take clock=. It counts the reads of the
    threads under test, so that a test can wait until they have looked at the time it set,
    instead of sleeping and hoping they did."""

    def __init__(self, now=1000.0):
        self.now = now
        self.worker_reads = 0
        self._test_thread = threading.get_ident()

    def __call__(self):
        if threading.get_ident() != self._test_thread:
            self.worker_reads += 1
        return self.now

    def seen_by_workers(self, reads=3, timeout_s=5.0):
        """Wait until the threads under test have read the clock `reads` more times: they have
        seen the time as it is now, and done what was due then (or nothing)."""
        target = self.worker_reads + reads
        return until(lambda: self.worker_reads >= target, timeout_s)


def until(condition, timeout_s=5.0):
    """wait_for with a short step, for what another thread of this process does."""
    return wait_for(condition, timeout_s, 0.005)


class LoopbackServer(object):
    """A TCP server on a loopback address for stand-ins (an APPO Nginx, the PaaS upstream):
    accepts on a thread, hands each connection to handle(conn) on a thread of its own."""

    def __init__(self, host="127.0.0.1", port=0, backlog=256, handle=None):
        self.connections = 0
        if handle is not None:
            self.handle = handle
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self._sock.listen(backlog)
        self.port = self._sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            conn.settimeout(10)
            self.handle(conn)
        except OSError:
            conn.close()

    def handle(self, conn):
        raise NotImplementedError

    def close(self):
        self._sock.close()


class StatusServer(LoopbackServer):
    """A loopback HTTP server that answers every request with `status` (a test may change it),
    `headers` and `body`, and records the paths asked: an APPO Nginx in front of an app."""

    def __init__(self, status=200, body=b"ok", headers=()):
        self.status, self.body, self.headers, self.paths = status, body, list(headers), []
        LoopbackServer.__init__(self)

    def handle(self, conn):
        path = self.read_path(conn)
        if path is not None:
            self.paths.append(path)
            self.respond(conn)

    @staticmethod
    def read_path(conn):
        """The path of the request on conn, once its head is in; None (closed) if it never came."""
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return None
            request += chunk
        return request.split(b" ")[1].decode("latin-1")

    def respond(self, conn):
        head = ["HTTP/1.1 %d Status" % self.status] + ["%s: %s" % pair for pair in self.headers]
        head += ["Content-Length: %d" % len(self.body), "Connection: close"]
        try:
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body)
        except OSError:
            pass
        conn.close()


# How CentOS 7 runs commands from cron, `env -i` or ssh: the C locale, where Python 3.6
# has ASCII stdio and surrogate-escaped argv. 3.7+ coerce C to UTF-8 unless told not to.
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}


def run_cli(*args, env=None, timeout=60, text=False):
    """`python -m healthcheck ARGS` as an operator runs it: the one way tests run the CLI.
    stdout and stderr as bytes, so a test sees exactly what was written (text=True: decoded
    as UTF-8)."""
    return subprocess.run([sys.executable, "-m", "healthcheck"] + list(args), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=dict(os.environ, **(env or {})), timeout=timeout,
                          **({"encoding": "utf-8"} if text else {}))


NGINX_MODULES = "/usr/lib/nginx/modules"
LUA_DIR = os.path.join(ROOT, "scripts", "nginx")


def start_nginx(conf, env=None, hosts=None):
    """The one way tests start nginx: the master in the foreground with the conf's folder as
    prefix, up once it wrote its pid file (after binding its sockets). env: added to the
    environment; hosts: a file bind-mounted on /etc/hosts in a mount namespace of its own
    (a server name resolving to several loopback addresses). A refusal fails the test with
    what nginx said (stderr, and the error log the conf names)."""
    prefix = os.path.dirname(conf)
    for sub in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp", "logs"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)
    argv = ["nginx", "-p", prefix + "/", "-c", conf]
    if hosts is not None:
        argv = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts] + argv
    text = open(conf).read()
    pid_file = re.search(r"^\s*pid (\S+);", text, re.M).group(1)
    error_log = re.search(r"^\s*error_log (\S+)", text, re.M).group(1)
    stderr_path = os.path.join(prefix, "nginx-stderr.log")
    with open(stderr_path, "ab") as stderr:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=dict(os.environ, **(env or {})))
    assert wait_for(lambda: proc.poll() is not None or os.path.exists(pid_file), 10), "nginx did not start"
    if proc.poll() is not None:
        said = open(stderr_path, errors="replace").read()
        logged = open(error_log, errors="replace").read() if os.path.exists(error_log) else ""
        raise AssertionError("nginx refused %s:\n%s\n%s" % (conf, said[-3000:], logged[-3000:]))
    return proc


def stop_nginx(proc, error_log=None):
    """Stop it; with error_log, no Lua error may have been logged over its whole run."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(10)
    if error_log is not None:
        text = open(error_log).read()
        assert "runtime error" not in text and "lua entry thread aborted" not in text, text[-3000:]


class LuaNginx(object):
    """A one-worker nginx with lua-nginx-module and this project's Lua on its package path,
    serving `http_body` (what goes inside http { }, {port} standing for its loopback port)."""

    def __init__(self, workdir, http_body, dict_size="1m", start=True):
        import shutil
        if not shutil.which("nginx") or not os.path.exists(os.path.join(NGINX_MODULES, "ngx_http_lua_module.so")):
            if os.environ.get("CI"):
                raise AssertionError("nginx with lua-nginx-module missing (scripts/install-deps)")
            import pytest
            pytest.skip("nginx with lua-nginx-module missing")
        self.workdir, self.port = workdir, free_port()
        for sub in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp", "logs"):
            os.makedirs(os.path.join(workdir, sub), exist_ok=True)
        self.error_log = os.path.join(workdir, "error.log")
        self.conf = conf = os.path.join(workdir, "nginx.conf")
        with open(conf, "w") as handle:
            handle.write("""load_module %(mods)s/ndk_http_module.so;
load_module %(mods)s/ngx_http_lua_module.so;
daemon off;
master_process on;
worker_processes 1;
user root;
pid %(dir)s/nginx.pid;
error_log %(log)s warn;
events { worker_connections 256; }
http {
    access_log off;
    lua_package_path "%(lua)s/?.lua;%(lua)s/?/init.lua;/usr/share/lua/5.1/?.lua;;";
    lua_shared_dict container_healthcheck %(size)s;
%(body)s
}
""" % {"mods": NGINX_MODULES, "dir": workdir, "log": self.error_log, "lua": LUA_DIR, "size": dict_size,
                "body": http_body.replace("{port}", str(self.port))})
        self.proc = None
        if start:
            self.start()

    def start(self):
        self.proc = start_nginx(self.conf)

    def stop(self):
        """Stop it; and no Lua error may have been logged meanwhile."""
        stop_nginx(self.proc, self.error_log)
