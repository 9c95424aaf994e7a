"""The entry balancer's Lua, unit by unit, inside a real nginx worker (tests/lua/test_units.lua):
feed parsing against the Python service's own rendering, rise/fall, ejection and its backoff,
usability, applying answers. Seconds, no APPO, no docker."""
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from healthcheck.feed import Verdict, render_feed
from support import ROOT, free_port

MODULES = "/usr/lib/nginx/modules"
LUA_DIR = os.path.join(ROOT, "scripts", "nginx")
TESTS_LUA = os.path.join(ROOT, "tests", "lua")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    if not shutil.which("nginx") or not os.path.exists(os.path.join(MODULES, "ngx_http_lua_module.so")):
        if os.environ.get("CI"):
            pytest.fail("nginx with lua-nginx-module missing (scripts/install-deps)")
        pytest.skip("nginx with lua-nginx-module missing")
    workdir = str(tmp_path_factory.mktemp("lua-units"))
    for sub in ("client_body_temp", "proxy_temp", "fastcgi_temp", "uwsgi_temp", "scgi_temp", "logs"):
        os.makedirs(os.path.join(workdir, sub))
    port = free_port()
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as handle:
        handle.write("""
load_module %(mods)s/ndk_http_module.so;
load_module %(mods)s/ngx_http_lua_module.so;
daemon off;
master_process off;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 64; }
http {
    access_log off;
    lua_package_path "%(lua)s/?.lua;/usr/share/lua/5.1/?.lua;;";
    lua_shared_dict container_healthcheck 1m;
    init_by_lua_block { require("container_healthcheck").init({ interval = 1 }) }
    server {
        listen 127.0.0.1:%(port)d;
        location = /units { content_by_lua_file %(tests)s/test_units.lua; }
    }
}
""" % {"mods": MODULES, "dir": workdir, "lua": LUA_DIR, "port": port, "tests": TESTS_LUA})
    proc = subprocess.Popen(["nginx", "-p", workdir + "/", "-c", conf], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d/units" % port
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            opener.open(url + "?feed=/dev/null", timeout=2).read()
            break
        except OSError:
            time.sleep(0.05)
    assert proc.poll() is None, open(os.path.join(workdir, "error.log")).read()
    yield opener, url, workdir
    proc.terminate()
    proc.wait(10)


def test_lua_units(nginx):
    opener, url, workdir = nginx
    feed = os.path.join(workdir, "feed.txt")
    with open(feed, "wb") as handle:  # the service's own rendering: both sides held to one format
        handle.write(render_feed(42, (Verdict("bk", False, "exited"), Verdict("bk_iam", True, ""),
                                      Verdict("demo", False, "draining: 内核升级")), {"bk_iam": 0.44}, True, 1.5))
    lines = opener.open(url + "?feed=" + feed, timeout=10).read().decode("utf-8").splitlines()
    failed = [line for line in lines if not line.startswith("ok ")]
    assert failed == [], "\n".join(failed)
    assert len(lines) == 9, lines
