"""End to end with real processes: an entry Nginx running the Lua balancer, two APPOs on
127.0.0.2 and 127.0.0.3 (each its own dockerd, app container, container-healthcheck and APPO
Nginx), steady client traffic; and HAProxy's httpchk against the same APPOs."""
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request

import pytest

from support import IMAGE, ROOT, Service, free_port, wait_for

pytestmark = pytest.mark.docker
LUA_DIR = os.path.join(ROOT, "scripts", "nginx")
APP = "demo"
NAME = "demo-1700000000"
INTERVAL, FALL, RISE = 1, 2, 2
WINDOW = INTERVAL * FALL + 1
NGINX_MODULES = "/usr/lib/nginx/modules"


def _need(binary):
    if not shutil.which(binary):
        if os.environ.get("CI"):
            pytest.fail("%s missing (scripts/install-deps)" % binary)
        pytest.skip("%s missing" % binary)


class Appo(object):
    def __init__(self, index, workdir, ngx_port, hc_port):
        self.ip = "127.0.0.%d" % index
        self.label = "appo%d" % index
        self.workdir = workdir
        self.ngx_port, self.hc_port = ngx_port, hc_port
        self.addr = "%s:%d" % (self.ip, ngx_port)
        host = subprocess.run([os.path.join(ROOT, "scripts", "dockerd-up"), self.label], stdout=subprocess.PIPE,
                              universal_newlines=True, check=True, timeout=120).stdout.strip().splitlines()[-1]
        self.env = dict(os.environ, DOCKER_HOST=host)
        self.service = None
        self.nginx = None

    def docker(self, *args, check=True):
        proc = subprocess.run(["docker"] + list(args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        return proc.stdout.strip()

    def start_app(self):
        self.docker("rm", "-f", NAME, check=False)
        script = ("mkdir -p /www/o/{app} && echo {label} > /www/o/{app}/index.html && "
                  "exec httpd -f -p {ip}:9000 -h /www").format(app=APP, label=self.label, ip=self.ip)
        self.docker("run", "-d", "--name", NAME, "--network", "host", "--health-cmd", "test ! -f /tmp/sick",
                    "--health-interval", "1s", "--health-retries", "1", "--health-timeout", "1s",
                    IMAGE, "sh", "-c", script)

    def start_service(self):
        self.service = Service("--bind", self.ip, "--allow", "127.0.0.0/8", "--ngx-host", self.ip,
                               "--ngx-port", str(self.ngx_port), "--probe-ttl", "0.5",
                               env={"DOCKER_HOST": self.env["DOCKER_HOST"]}, port=self.hc_port, host=self.ip,
                               log_path=os.path.join(self.workdir, "hc-%s.log" % self.label)).start()

    def stop_service(self):
        if self.service:
            self.service.stop()
            self.service = None

    def start_nginx(self):
        conf = os.path.join(self.workdir, "%s.conf" % self.label)
        with open(conf, "w") as handle:
            handle.write(_nginx_main(self.workdir, self.label) + """
http {
    access_log off;
    server {
        listen %(ip)s:%(ngx)d;
        location /container-healthcheck { proxy_pass http://%(ip)s:%(hc)d; proxy_connect_timeout 1s; proxy_read_timeout 7s; }
        location /o/ { proxy_pass http://%(ip)s:9000; proxy_connect_timeout 1s; proxy_read_timeout 3s; }
    }
}
""" % {"ip": self.ip, "ngx": self.ngx_port, "hc": self.hc_port})
        self.nginx = _run_nginx(conf)


def _nginx_main(workdir, label):
    return """
daemon off;
master_process on;
worker_processes 2;
user root;
pid %(dir)s/%(label)s.pid;
error_log %(dir)s/%(label)s-error.log warn;
events { worker_connections 1024; }
""" % {"dir": workdir, "label": label}


def _run_nginx(conf):
    prefix = os.path.dirname(conf)
    for sub in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp", "logs"):
        os.makedirs(os.path.join(prefix, sub), exist_ok=True)
    proc = subprocess.Popen(["nginx", "-p", prefix + "/", "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    assert proc.poll() is None, open(conf.replace(".conf", "-error.log")).read()
    return proc


def _stop(proc):
    if proc and proc.poll() is None:
        proc.terminate()
        proc.wait(10)


class Traffic(object):
    """Steady client traffic through the entry Nginx: (time, status, body) per request."""

    def __init__(self, port):
        self.url = "http://127.0.0.1:%d/o/%s/" % (port, APP)
        self.records = []
        self._stop = threading.Event()
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with self._opener.open(self.url, timeout=2) as response:
                    record = (started, response.status, response.read().decode().strip())
            except urllib.error.HTTPError as exc:
                record = (started, exc.code, "")
            except Exception as exc:  # timeouts, resets: failures the test counts
                record = (started, 0, type(exc).__name__)
            self.records.append(record)
            time.sleep(0.02)

    def since(self, moment):
        return [r for r in self.records if r[0] >= moment]

    def stop(self):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def cluster(docker_engine, tmp_path_factory):
    _need("nginx")
    if not os.path.exists(os.path.join(NGINX_MODULES, "ngx_http_lua_module.so")):
        pytest.fail("libnginx-mod-http-lua missing")
    workdir = str(tmp_path_factory.mktemp("e2e"))
    ngx_port, hc_port, entry_port = free_port(), free_port(), free_port()
    appos = [Appo(2, workdir, ngx_port, hc_port), Appo(3, workdir, ngx_port, hc_port)]
    for appo in appos:
        appo.start_app()
        appo.start_service()
        appo.start_nginx()
    conf = os.path.join(workdir, "entry.conf")
    with open(conf, "w") as handle:
        handle.write("load_module %s/ndk_http_module.so;\nload_module %s/ngx_http_lua_module.so;\n"
                     % (NGINX_MODULES, NGINX_MODULES))
        handle.write(_nginx_main(workdir, "entry"))
        handle.write("""
http {
    access_log off;
    lua_package_path "%(lua)s/?.lua;/usr/share/lua/5.1/?.lua;;";
    lua_shared_dict container_healthcheck 1m;
    init_by_lua_block {
        require("container_healthcheck").init({ appos = { "%(a)s", "%(b)s" },
            interval = %(interval)d, timeout = 0.5, fall = %(fall)d, rise = %(rise)d })
    }
    init_worker_by_lua_block { require("container_healthcheck").init_worker() }
    upstream appo_by_health {
        server 127.0.0.1:1;  # placeholder: loopback only, never a routable address
        balancer_by_lua_block { require("container_healthcheck").balance(ngx.var.app_code) }
    }
    server {
        listen 127.0.0.1:%(port)d;
        location ~ ^/o/(?<app_code>[A-Za-z0-9][A-Za-z0-9_.-]*)/ {
            proxy_pass http://appo_by_health;
            proxy_connect_timeout 1s;
            proxy_read_timeout 1s;
            proxy_next_upstream error timeout http_502 http_503 http_504;
        }
        location = /container-healthcheck-status {
            content_by_lua_block { require("container_healthcheck").status() }
        }
    }
}
""" % {"lua": LUA_DIR, "a": appos[0].addr, "b": appos[1].addr, "port": entry_port,
       "interval": INTERVAL, "fall": FALL, "rise": RISE})
    entry = _run_nginx(conf)
    state = {"appos": appos, "entry_port": entry_port, "workdir": workdir}
    traffic = Traffic(entry_port)
    state["traffic"] = traffic
    try:
        time.sleep(INTERVAL * RISE + 1)
        yield state
    finally:
        traffic.stop()
        _stop(entry)
        for appo in appos:
            appo.stop_service()
            _stop(appo.nginx)
            appo.docker("rm", "-f", NAME, check=False)


@pytest.fixture
def healthy(cluster):
    """Each test starts from the same state, so any one can run alone (`-k`) or in any order:
    both app containers running and healthy, both health services up, traffic on both."""
    for appo in cluster["appos"]:
        state = appo.docker("inspect", "-f", "{{.State.Status}}", NAME, check=False)
        if not state:
            appo.start_app()
        elif state == "paused":
            appo.docker("unpause", NAME)
        elif state != "running":
            appo.docker("start", NAME)
        appo.docker("exec", NAME, "rm", "-f", "/tmp/sick", check=False)
        if appo.service is None:
            appo.start_service()
    assert wait_for(lambda: served_by(observe(cluster, 1.5)) == {"appo2", "appo3"}, 40), \
        "the cluster did not come back to both APPOs serving"
    return cluster


def observe(cluster, seconds):
    start = time.monotonic()
    time.sleep(seconds)
    return cluster["traffic"].since(start)


def served_by(records):
    return {body for _, status, body in records if status == 200}


def failures(records):
    return [r for r in records if r[1] != 200]


def test_1_both_appos_share_traffic(healthy):
    cluster = healthy
    records = observe(cluster, 3)
    assert len(records) > 30
    assert not failures(records), failures(records)[:5]
    counts = {label: sum(1 for r in records if r[2] == label) for label in ("appo2", "appo3")}
    assert min(counts.values()) >= len(records) * 0.3, counts


def test_2_dead_container_is_routed_around(healthy):
    cluster = healthy
    appo2 = cluster["appos"][0]
    killed = time.monotonic()
    appo2.docker("kill", NAME)
    time.sleep(WINDOW + 3)
    after = cluster["traffic"].since(killed + WINDOW)
    assert len(after) > 20
    assert not failures(after), failures(after)[:5]
    assert served_by(after) == {"appo3"}


def test_3_restarted_container_gets_traffic_back(healthy):
    cluster = healthy
    appo2 = cluster["appos"][0]
    appo2.docker("kill", NAME)
    killed = time.monotonic()
    assert wait_for(lambda: served_by(cluster["traffic"].since(killed + WINDOW)) == {"appo3"}, WINDOW + 8)
    appo2.docker("start", NAME)
    started = time.monotonic()
    back = wait_for(lambda: any(r[2] == "appo2" for r in cluster["traffic"].since(started)), INTERVAL * RISE + 8)
    assert back
    records = observe(cluster, 3)
    assert served_by(records) == {"appo2", "appo3"} and not failures(records)


def test_4_health_service_down_means_appo_down_and_all_down_fails_open(healthy):
    cluster = healthy
    appo2, appo3 = cluster["appos"]
    appo2.stop_service()
    stopped = time.monotonic()
    time.sleep(WINDOW + 2)
    after = cluster["traffic"].since(stopped + WINDOW)
    assert served_by(after) == {"appo3"} and not failures(after)
    appo3.stop_service()
    both = time.monotonic()
    stale_after = INTERVAL * (FALL + 1) + 0.5
    time.sleep(stale_after + 4)
    open_records = cluster["traffic"].since(both + stale_after + 1)
    assert not failures(open_records), failures(open_records)[:5]
    assert served_by(open_records) == {"appo2", "appo3"}
    status = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(
        "http://127.0.0.1:%d/container-healthcheck-status" % cluster["entry_port"], timeout=5).read().decode()
    assert '"fresh":false' in status


def test_5_paused_and_unhealthy_are_routed_around(healthy):
    cluster = healthy
    appo2, appo3 = cluster["appos"]
    appo3.docker("pause", NAME)
    paused = time.monotonic()
    time.sleep(WINDOW + 3)
    after = cluster["traffic"].since(paused + WINDOW)
    assert served_by(after) == {"appo2"} and not failures(after), failures(after)[:5]
    appo3.docker("unpause", NAME)
    time.sleep(INTERVAL * RISE + 3)
    assert served_by(observe(cluster, 2)) == {"appo2", "appo3"}
    appo3.docker("exec", NAME, "touch", "/tmp/sick")
    sick = time.monotonic()
    assert wait_for(lambda: appo3.docker("inspect", "-f", "{{.State.Health.Status}}", NAME) == "unhealthy", 10)
    time.sleep(WINDOW + 3)
    after = cluster["traffic"].since(sick + WINDOW + 2)
    assert served_by(after) == {"appo2"} and not failures(after)


def _haproxy_stat(sock_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(sock_path)
        sock.sendall(b"show stat\n")
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = {}
    for line in data.decode().splitlines():
        fields = line.split(",")
        if len(fields) > 17 and fields[0] == APP and fields[1] not in ("FRONTEND", "BACKEND"):
            status[fields[1]] = fields[17]
    return status


def test_6_haproxy_httpchk_marks_the_server_down(healthy):
    cluster = healthy
    _need("haproxy")
    appo2, appo3 = cluster["appos"]
    workdir = cluster["workdir"]
    sock_path = os.path.join(workdir, "haproxy.sock")
    conf = os.path.join(workdir, "haproxy.cfg")
    with open(conf, "w") as handle:
        handle.write("""
global
    stats socket %(sock)s mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend entry
    bind 127.0.0.1:%(port)d
    default_backend %(app)s
backend %(app)s
    option httpchk GET /container-healthcheck/apps/health/%(app)s
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
    server appo2 %(a)s check
    server appo3 %(b)s check
""" % {"sock": sock_path, "port": free_port(), "app": APP, "a": appo2.addr, "b": appo3.addr})
    proc = subprocess.Popen(["haproxy", "-db", "-f", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: os.path.exists(sock_path) and _haproxy_stat(sock_path) == {"appo2": "UP", "appo3": "UP"}, 15), \
            _haproxy_stat(sock_path) if os.path.exists(sock_path) else "no socket"
        appo2.docker("kill", NAME)
        assert wait_for(lambda: _haproxy_stat(sock_path).get("appo2") == "DOWN", 10), _haproxy_stat(sock_path)
        assert _haproxy_stat(sock_path)["appo3"] == "UP"
        appo2.docker("start", NAME)
        assert wait_for(lambda: _haproxy_stat(sock_path).get("appo2") == "UP", 15), _haproxy_stat(sock_path)
    finally:
        _stop(proc)
