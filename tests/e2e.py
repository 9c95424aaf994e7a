"""The e2e tests' cluster (tests/test_e2e_balancer.py, tests/test_e2e_loss.py): APPOs on
127.0.0.x, each its own dockerd, app container, container-healthcheck and APPO Nginx; steady
client traffic; and a replica of BlueKing's entry with the shipped snippets pasted in. Each
e2e file builds its own cluster on addresses of its own (its module's APPO_INDICES), so the
two files can run at once on two workers."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from support import (IMAGE, LUA_DIR, NGINX_MODULES, ROOT, Service, child_pids, free_port, run_cli, start_nginx,
                     stop_nginx, wait_for)

APP = "demo"
NAME = "demo-1700000000"
INTERVAL, FALL, RISE = 1, 2, 2
# How long an APPO whose service is silent while its Nginx answers keeps its verdicts, in the
# test entries that watch it end (the shipped 30 s is kept by the entries of the loss tests).
KEEP_STALE = 4


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
        host = self.dockerd_up()
        self.env = dict(os.environ, DOCKER_HOST=host)
        self.service = None
        self.nginx = None
        self.state_dir = os.path.join(workdir, "state-%s" % self.label)
        self.access_log = os.path.join(workdir, "%s-access.log" % self.label)

    def dockerd_up(self):
        """This APPO's own dockerd, with live-restore as BlueKing runs it."""
        return subprocess.run([os.path.join(ROOT, "scripts", "dockerd-up"), self.label], stdout=subprocess.PIPE,
                              universal_newlines=True, check=True, timeout=120,
                              env=dict(os.environ, HC_DOCKERD_FLAGS="--live-restore")).stdout.strip().splitlines()[-1]

    def dockerd_down(self):
        subprocess.run([os.path.join(ROOT, "scripts", "dockerd-down"), self.label], check=True, timeout=60)

    def docker(self, *args, check=True):
        proc = subprocess.run(["docker"] + list(args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(proc.stderr)
        return proc.stdout.strip()

    def start_app(self, name=NAME, port=9000):
        """The app's container, like a BlueKing Python SaaS: --net=host, no --restart. Its web
        server runs beside the container's main process, so it can die inside a running
        container (the APPO Nginx then answers 502). GET /o/<app>/ is a page, POST a CGI."""
        self.docker("rm", "-f", name, check=False)
        script = ("mkdir -p /www/o/{app} /www/cgi-bin && echo {label} > /www/o/{app}/index.html && "
                  "printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\n"
                  "head -c \"${{CONTENT_LENGTH:-0}}\" >/dev/null\\necho {label}\\n' > /www/cgi-bin/post && "
                  "chmod +x /www/cgi-bin/post && "
                  # a redeploy's new container starts while the old one still has the port
                  "until httpd -p {ip}:{port} -h /www; do sleep 0.05; done && exec sleep 2147483647"
                  ).format(app=APP, label=self.label, ip=self.ip, port=port)
        self.docker("run", "-d", "--name", name, "--network", "host", "--health-cmd", "test ! -f /tmp/sick",
                    "--health-interval", "1s", "--health-retries", "1", "--health-timeout", "1s",
                    IMAGE, "sh", "-c", script)
        self.app_port = port

    def kill_app_process(self, name=NAME):
        """The app dies, its container does not (uwsgi crashed, OOM-killed worker)."""
        self.docker("exec", name, "killall", "httpd")

    def restart_app_process(self, name=NAME):
        self.docker("exec", name, "httpd", "-p", "%s:%d" % (self.ip, self.app_port), "-h", "/www")

    def start_service(self):
        self.service = Service("--bind", self.ip, "--allow", "127.0.0.0/8", "--ngx-host", self.ip,
                               "--ngx-port", str(self.ngx_port), "--probe-ttl", "0.5", "--state-dir", self.state_dir,
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
    # Who reached this APPO: user traffic (through the entry) and probes tell apart by agent.
    log_format chc '$remote_addr "$request" $status "$http_user_agent"';
    access_log %(log)s chc;
    # The app's container: the running one, or during a redeploy the new one beside it.
    upstream app { server %(ip)s:9000 max_fails=0; server %(ip)s:9001 max_fails=0; }
    server {
        listen %(ip)s:%(ngx)d;
        location /container-healthcheck {
            proxy_pass http://%(ip)s:%(hc)d; proxy_connect_timeout 1s; proxy_read_timeout 7s;
        }
        location /o/%(app)s/post {
            proxy_pass http://app/cgi-bin/post; proxy_connect_timeout 1s; proxy_read_timeout 3s;
        }
        # one endpoint of the app broken on every APPO (its worker died): this Nginx answers 502
        location = /o/%(app)s/broken { return 502; }
        # answered by this Nginx alone (appo-paasagent.conf as shipped)
        location = /container-healthcheck-alive { access_log off; return 204; }
        location /o/ { proxy_pass http://app; proxy_connect_timeout 1s; proxy_read_timeout 3s; }
        # /t/<app>/: the same app, as an APPT (test-mode host) serves it
        location /t/ { proxy_pass http://app/o/; proxy_connect_timeout 1s; proxy_read_timeout 3s; }
    }
}
""" % {"ip": self.ip, "ngx": self.ngx_port, "hc": self.hc_port, "log": self.access_log, "app": APP})
        self.nginx = _run_nginx(conf)

    def user_requests_since(self, offset):
        """Requests for the app that came from clients (not the probe) after byte offset."""
        with open(self.access_log) as handle:
            handle.seek(offset)
            return [line for line in handle if "/o/%s" % APP in line and "Python-urllib" in line]

    def access_log_size(self):
        return os.path.getsize(self.access_log) if os.path.exists(self.access_log) else 0


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
    return start_nginx(conf, env={"NGX_UPSTREAM_DOUBLE_CONF": conf})


class Traffic(object):
    """Steady client traffic through the entry Nginx: (time, status, body) per request."""

    def __init__(self, port, path="/o/%s/" % APP):
        self.url = "http://127.0.0.1:%d%s" % (port, path)
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
            self._stop.wait(0.02)

    def since(self, moment):
        return [r for r in self.records if r[0] >= moment]

    def stop(self):
        self._stop.set()
        self._thread.join(5)


@pytest.fixture(scope="module")
def cluster(docker_engine, tmp_path_factory, request):
    """Two APPOs on the addresses the test module names (APPO_INDICES) and the test entry."""
    _need("nginx")
    if not os.path.exists(os.path.join(NGINX_MODULES, "ngx_http_lua_module.so")):
        pytest.fail("libnginx-mod-http-lua missing")
    workdir = str(tmp_path_factory.mktemp("e2e"))
    ngx_port, hc_port, entry_port = free_port(), free_port(), free_port()
    appos = [Appo(index, workdir, ngx_port, hc_port) for index in request.module.APPO_INDICES]
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
    lua_package_path "%(lua)s/?.lua;%(lua)s/?/init.lua;/usr/share/lua/5.1/?.lua;;";
    lua_shared_dict container_healthcheck 1m;
    init_by_lua_block {
        require("container_healthcheck").init({ appos = { "%(a)s", "%(b)s" },
            interval = %(interval)d, timeout = 0.5, fall = %(fall)d, rise = %(rise)d,
            eject_memory = %(eject_memory)d, keep_stale = %(keep_stale)d })
    }
    init_worker_by_lua_block { require("container_healthcheck").init_worker() }
    upstream appo_by_health {
        server 127.0.0.1:1 down;  # placeholder: never connected to (balancer_by_lua sets every peer)
        balancer_by_lua_block { require("container_healthcheck").balance(ngx.var.app_code) }
    }
    server {
        listen 127.0.0.1:%(port)d;
        location ~ ^/o/(?<app_code>[A-Za-z0-9][A-Za-z0-9_.-]*)/ {
            proxy_pass http://appo_by_health;
            proxy_connect_timeout 1s;
            proxy_read_timeout 1s;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            log_by_lua_block { require("container_healthcheck").log(ngx.var.app_code) }
        }
        location = /container-healthcheck-status {
            content_by_lua_block { require("container_healthcheck").status() }
        }
    }
}
""" % {"lua": LUA_DIR, "a": appos[0].addr, "b": appos[1].addr, "port": entry_port,
            "interval": INTERVAL, "fall": FALL, "rise": RISE, "eject_memory": EJECT_MEMORY, "keep_stale": KEEP_STALE})
    entry = _run_nginx(conf)
    state = {"appos": appos, "entry_port": entry_port, "workdir": workdir}
    traffic = Traffic(entry_port)
    state["traffic"] = traffic
    try:
        yield state
    finally:
        traffic.stop()
        stop_nginx(entry)
        for appo in appos:
            appo.stop_service()
            stop_nginx(appo.nginx)
            appo.docker("rm", "-f", NAME, check=False)
        # the tests started the engines: they stop them, both at once (each takes seconds)
        downs = [threading.Thread(target=appo.dockerd_down) for appo in appos]
        for down in downs:
            down.start()
        for down in downs:
            down.join(90)


def _restore(appo):
    """One APPO back to the usual: its app container running and healthy, no drain, its
    service up and nothing of it stopped (SIGSTOP) by a test."""
    pids = ([appo.nginx.pid] + child_pids(appo.nginx.pid) if appo.nginx else []) + \
        ([appo.service.proc.pid] if appo.service else [])
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except OSError:
            pass
    state = appo.docker("inspect", "-f", "{{.State.Status}}", NAME, check=False)
    if not state:
        appo.start_app()
    elif state == "paused":
        appo.docker("unpause", NAME)
    elif state != "running":
        appo.docker("start", NAME)
    appo.docker("exec", NAME, "rm", "-f", "/tmp/sick", check=False)
    if not wait_for(lambda: appo.docker("inspect", "-f", "{{.State.Health.Status}}", NAME) == "healthy", 5):
        # Docker's health monitor can stay at "unhealthy" after a daemon restart with
        # live-restore (test_21): the container is restarted, as an operator would.
        appo.docker("restart", "-t", "1", NAME)
    if os.path.exists(os.path.join(appo.state_dir, "drain.json")):
        os.unlink(os.path.join(appo.state_dir, "drain.json"))
    if appo.service is None:
        appo.start_service()


@pytest.fixture
def healthy(cluster):
    """Each test starts from the same state, so any one can run alone (`-k`) or in any order:
    both app containers running and healthy, both health services up, traffic on both."""
    for appo in cluster["appos"]:
        _restore(appo)
    port, addrs = cluster["entry_port"], [appo.addr for appo in cluster["appos"]]
    assert wait_for(lambda: all(usable_at(port, APP, addr) for addr in addrs), 40), \
        "the cluster did not come back to both APPOs serving: %s" % entry_status(port)
    return cluster


def entry_status(port):
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    return json.loads(opener.open("http://127.0.0.1:%d/container-healthcheck-status" % port, timeout=5).read().decode())


def usable_at(port, app, addr):
    """The entry balancer would send app's requests to addr: fresh, healthy, not ejected."""
    status = entry_status(port)
    entry = status["apps"].get(app, {}).get(addr) or {}
    return bool((status["appos"].get(addr) or {}).get("fresh")) and entry.get("healthy") is True \
        and "ejected" not in entry


def _maintenance(appo, command, *args):
    """`container-healthcheck drain|undrain` as an operator runs it on that APPO host."""
    done = run_cli(command, "--state-dir", appo.state_dir, *args, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# ---- BlueKing's OpenResty path: ngx.upstream from its test double ----

# No Debian package carries OpenResty's ngx.upstream (lua-upstream-nginx-module): the double
# in tests/lua implements its documented API from the upstream blocks of the very config the
# test renders (named by NGX_UPSTREAM_DOUBLE_CONF), so the 6.x path runs in every test run.
DOUBLE_DIR = os.path.join(ROOT, "tests", "lua")

# A replica of BlueKing 6.x's entry files (structure from its installer's templates): other
# upstreams (PaaS, login) next to one upstream per app rendered from consul, an existing
# lua_package_path, and paas.conf's /t/ and /o/ regex locations before `location /`.
BK_NGINX_CONF = """
http {
    access_log off;
    lua_package_path "/usr/share/lua/5.1/?.lua;;";
    upstream PAAS { server 127.0.0.9:%(paas)d max_fails=1 fail_timeout=30s; }
    upstream LOGIN { server 127.0.0.9:%(paas)d max_fails=1 fail_timeout=30s; }
    include %(dir)s/app_upstream.conf;
    server {
        listen 127.0.0.1:%(port)d;
        include %(dir)s/paas.conf;
    }
}
"""
BK_PAAS_CONF = """
location ~ ^/t/([^/]+) {
    set $test_app t.$1;
    proxy_pass http://$test_app;
    proxy_next_upstream http_502 http_504 error timeout invalid_header;
    proxy_connect_timeout 3;
}
location ~ ^/o/([^/]+) {
    set $app $1;
    proxy_pass http://$app;
    proxy_next_upstream http_502 http_504 error timeout invalid_header;
    proxy_connect_timeout 3;
}
location / {
    proxy_pass http://PAAS;
}
"""


SHIPPED_TIMING = "wait = 1, grace = 0.5, keep_stale = 30, interval = 2, timeout = 1, fall = 2, rise = 2,"
# EJECT_MEMORY: a test's ejections are forgotten before the next test, so that no test's
# hold depends on which tests ran before it (the backoff itself: tests/lua/test_units.lua).
EJECT_MEMORY = 2
TEST_TIMING = ("wait = 1, grace = 0.5, keep_stale = %d, interval = %d, timeout = 0.5, fall = %d, rise = %d, "
               "eject_memory = %d,") % (KEEP_STALE, INTERVAL, FALL, RISE, EJECT_MEMORY)
BK6_APP_LOCATIONS = r"location ~ \^/t/\(\[\^/\]\+\) \{.*?\n\}\nlocation ~ \^/o/\(\[\^/\]\+\) \{.*?\n\}\n"


def apply_readme_steps(workdir, nginx_conf, paas_conf, snippets, extra_init="", replace=BK6_APP_LOCATIONS,
                       timing=TEST_TIMING):
    """What README tells an operator to do to BlueKing's files, done by text: the module's
    folder added to the existing lua_package_path, entry-http.conf included in http { }, and
    BlueKing's /t/ and /o/ locations replaced by entry-paas.conf. The snippets are used as
    shipped but for the test's faster timing and extra_init (e.g. 5.x's shared_upstream)."""
    nginx_conf = nginx_conf.replace('lua_package_path "',
                                    'lua_package_path "%s/?.lua;%s/?/init.lua;' % (LUA_DIR, LUA_DIR), 1)
    http = open(os.path.join(snippets, "entry-http.conf")).read()
    assert SHIPPED_TIMING in http
    http = http.replace(SHIPPED_TIMING, timing + " " + extra_init, 1)
    http_path = os.path.join(workdir, "container-healthcheck-http.conf")
    with open(http_path, "w") as handle:
        handle.write(http)
    nginx_conf = nginx_conf.replace("    include %s/app_upstream.conf;" % workdir,
                                    "    include %s/app_upstream.conf;\n    include %s;" % (workdir, http_path), 1)
    replaced, count = re.subn(replace, "include %s/entry-paas.conf;\n" % snippets, paas_conf, flags=re.S)
    assert count == 1, "BlueKing's app locations were not found to replace"
    return nginx_conf, replaced


def _openresty_modules():
    """The lines that give Debian's nginx what OpenResty has: lua-nginx-module, and
    ngx.upstream from its double (found first on lua_package_path, see with_double)."""
    return ("load_module %s/ndk_http_module.so;\nload_module %s/ngx_http_lua_module.so;\n"
            "env NGX_UPSTREAM_DOUBLE_CONF;\n" % (NGINX_MODULES, NGINX_MODULES))


def with_double(nginx_conf):
    """The test double of ngx.upstream ahead of everything on lua_package_path."""
    return nginx_conf.replace('lua_package_path "', 'lua_package_path "%s/?.lua;' % DOUBLE_DIR, 1)


def _run_nginx_with_hosts(conf, hosts_text, workdir):
    """The entry Nginx in its own mount namespace whose /etc/hosts maps BOTH_NAME to both
    APPOs: a server name that resolves to several addresses, as CentOS 7's localhost does."""
    hosts = os.path.join(workdir, "hosts")
    with open(hosts, "w") as handle:
        handle.write(hosts_text)
    return start_nginx(conf, env={"NGX_UPSTREAM_DOUBLE_CONF": conf}, hosts=hosts)


def start_bk_entry(workdir, label, app_upstream, values, hosts_text, extra_init="", edit=None, timing=TEST_TIMING):
    """A replica of BlueKing 6.x's entry (nginx.conf, paas.conf, consul's app_upstream.conf) with
    README's steps applied, ngx.upstream from its double; edit(nginx_conf, paas_conf) may
    change the result. Returns (process, error log)."""
    with open(os.path.join(workdir, "app_upstream.conf"), "w") as handle:
        handle.write(app_upstream)
    nginx_conf, paas_conf = apply_readme_steps(workdir, BK_NGINX_CONF % values, BK_PAAS_CONF, LUA_DIR,
                                               extra_init=extra_init, timing=timing)
    if edit is not None:
        nginx_conf, paas_conf = edit(nginx_conf, paas_conf)
    with open(os.path.join(workdir, "paas.conf"), "w") as handle:
        handle.write(paas_conf)
    conf = os.path.join(workdir, "%s.conf" % label)
    with open(conf, "w") as handle:
        handle.write(_openresty_modules())
        handle.write(_nginx_main(workdir, label).replace("warn;", "info;"))
        handle.write(with_double(nginx_conf))
    return _run_nginx_with_hosts(conf, hosts_text, workdir), os.path.join(workdir, "%s-error.log" % label)


def _bk_entry_setting(cluster, name):
    """What a BlueKing entry fixture starts from: unshare (for its /etc/hosts), the two APPOs,
    and a folder of its own."""
    _need("unshare")
    appo2, appo3 = cluster["appos"]
    workdir = os.path.join(cluster["workdir"], name)
    os.makedirs(workdir, exist_ok=True)
    return appo2, appo3, workdir


def stop_bk_entry(proc, error_log):
    """Stop it; and no Lua error may have been logged over its whole run, whatever the tests."""
    stop_nginx(proc, error_log)
