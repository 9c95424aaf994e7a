"""The entry Lua under faults of its own, in a real nginx with two loopback APPOs: an error in
balance() or log() is contained (the request goes where nginx would send it without the Lua,
never a 500), and with its shared dict full the balancer still balances and no ejection
outlives its hold; a keepalive connection an APPO closes as a request goes out on it takes no
APPO out, an APPO that breaks every connection is out at the second. No docker: the APPOs
are plain loopback HTTP servers."""
import json
import re
import time
import urllib.error
import urllib.request

import pytest

from support import LoopbackServer, LuaNginx, StatusServer, free_port, wait_for

OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# The request path as entry-paas.conf ships it, on an upstream whose only server is `down`.
ROUTES = """
    upstream appo_by_health {
        server 127.0.0.1:1 down;
        balancer_by_lua_block { require("container_healthcheck").balance(ngx.var.chc_app, "o") }
    }
    server {
        listen 127.0.0.1:{port};
        location ~ ^/o/(?<chc_app>[^/]+) {
            proxy_pass http://appo_by_health;
            proxy_next_upstream http_502 http_504 error timeout invalid_header;
            proxy_connect_timeout 1s;
            log_by_lua_block { require("container_healthcheck").log(ngx.var.chc_app) }
        }
        location = /container-healthcheck-status { content_by_lua_block { require("container_healthcheck").status() } }
        %(extra)s
    }
"""

# Fault injection for the test (not shipped): a flag in the dict makes the module's own
# functions raise, the way a bug would, on the request path of every worker.
INJECT = """
    init_worker_by_lua_block {
        require("container_healthcheck").init_worker()
        local dict = ngx.shared.container_healthcheck
        local state = require "container_healthcheck.state"
        local config = require "container_healthcheck.config"
        local discovery = require "container_healthcheck.discovery"
        -- a worker's cached choice is made again within 5 s (REMAKE_S)
        for _, hook in ipairs({ { state, "usable" }, { discovery, "peers_for" } }) do
            local module, name = hook[1], hook[2]
            local real_function = module[name]
            module[name] = function(...)
                if dict:get("fault") then error("injected fault in balance") end
                return real_function(...)
            end
        end
        local real = config.eject_set
        config.eject_set = setmetatable({}, { __index = function(_, code)
            if dict:get("fault") then error("injected fault in log") end
            return real[code]
        end })
    }
"""


def _get(port, path):
    try:
        with OPENER.open("http://127.0.0.1:%d%s" % (port, path), timeout=5) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


@pytest.fixture
def appos():
    servers = [StatusServer(body=b"A"), StatusServer(body=b"B")]
    yield servers
    for server in servers:
        server.close()


def test_an_error_in_balance_or_log_is_contained_the_request_still_served(tmp_path, appos):
    a, b = ("127.0.0.1:%d" % s.port for s in appos)
    nginx = LuaNginx(str(tmp_path), """
    init_by_lua_block { require("container_healthcheck").init({ appos = { "%s", "%s" }, interval = 1 }) }
    %s
    %s""" % (a, b, INJECT, ROUTES % {"extra": """location = /fault {
            content_by_lua_block { ngx.shared.container_healthcheck:set("fault", true) ngx.say("on") } }"""}))
    try:
        before = [_get(nginx.port, "/o/demo/")[0] for _ in range(20)]
        assert set(before) == {200}
        assert _get(nginx.port, "/fault") == (200, "on\n")
        started = time.monotonic()
        statuses, bodies = [], set()
        while time.monotonic() - started < 6:  # past the worker's cached choice (made again every 5 s)
            status, body = _get(nginx.port, "/o/demo/")
            statuses.append(status)
            bodies.add(body)
        seconds = time.monotonic() - started
        assert set(statuses) == {200}, statuses  # never a 500: where nginx would send it
        assert bodies == {"A", "B"}  # the app's APPOs, as without the Lua
        log = open(nginx.error_log).read()
        balance_lines = log.count("Lua error in balance (contained): ")
        log_lines = log.count("Lua error in log (contained): ")
        assert balance_lines >= 1 and log_lines >= 1, log[-2000:]  # the faults did fire
        assert balance_lines <= seconds + 2 and log_lines <= seconds + 2  # at most one per interval
        assert "injected fault in balance" in log and "injected fault in log" in log
    finally:
        nginx.stop()


EJECTION = """location = /ejection { content_by_lua_block {
            local dict = ngx.shared.container_healthcheck
            local key = "e:demo|" .. ngx.var.arg_addr
            local value = dict:get(key)
            local queued = dict:llen("ejq:" .. ngx.var.arg_addr) or 0
            ngx.say(string.format('{"value":%s,"ttl":%s,"queued":%d}', value and ('"' .. value .. '"') or "false",
                                  value and tostring(dict:ttl(key)) or "false", queued))
        } }"""

FULL_DICT = """location = /fill { content_by_lua_block {
            local dict = ngx.shared.container_healthcheck
            local n = 0
            while dict:safe_set("junk" .. n, string.rep("x", 100)) do n = n + 1 end
            while dict:rpush("junk-list", "y") do n = n + 1 end
            ngx.say(n)
        } }
        """ + EJECTION


def test_with_its_dict_full_the_balancer_balances_and_no_ejection_outlives_its_hold(tmp_path, appos):
    appos[0].status = 502  # A's app answers 502: a request there fails and ejects A
    a, b = ("127.0.0.1:%d" % s.port for s in appos)
    nginx = LuaNginx(str(tmp_path), """
    init_by_lua_block { require("container_healthcheck").init({ apps = { demo = { "%s", "%s" } }, interval = 1 }) }
    init_worker_by_lua_block { require("container_healthcheck").init_worker() }
    %s""" % (a, b, ROUTES % {"extra": FULL_DICT}), dict_size="32k")
    try:
        assert int(_get(nginx.port, "/fill")[1]) > 0
        statuses = [_get(nginx.port, "/o/demo/") for _ in range(10)]
        assert statuses == [(200, "B")] * 10  # retried on B, then B alone: it still balances
        ejection = json.loads(_get(nginx.port, "/ejection?addr=" + a)[1])
        assert ejection["value"], "A was not ejected"
        hold = float(ejection["value"].split("|")[1]) - float(ejection["value"].split("|")[0])
        # The channel that would clear it never heard of it (its queue is full): the record
        # ends with its hold instead of living on.
        assert ejection["queued"] == 0 and 0 < ejection["ttl"] <= hold, ejection
        assert wait_for(lambda: not json.loads(_get(nginx.port, "/ejection?addr=" + a)[1])["value"], hold + 3)
        assert re.search(r"lua_shared_dict container_healthcheck is full", open(nginx.error_log).read())
    finally:
        nginx.stop()


class Silent(LoopbackServer):
    """Accepts, reads, never answers: a hung Nginx whose kernel still takes connections."""

    def handle(self, conn):
        conn.recv(4096)
        time.sleep(3)
        conn.close()


def test_the_alive_check_tells_a_live_nginx_from_a_hung_or_absent_one(tmp_path):
    """What separates "only the health service is hung" (its verdicts stand) from "the host is
    hung" (out at once): any HTTP answer from the APPO Nginx, within half the grace."""
    live, broken, silent = StatusServer(status=204, body=b""), StatusServer(status=502), Silent()
    closed = free_port()
    nginx = LuaNginx(str(tmp_path), """
    init_by_lua_block { require("container_healthcheck").init({ interval = 1 }) }
    server {
        listen 127.0.0.1:{port};
        location = /alive { content_by_lua_block {
            ngx.say(tostring(require("container_healthcheck.poller").nginx_alive(ngx.var.arg_addr)))
        } }
    }""")
    try:
        def alive(port):
            return _get(nginx.port, "/alive?addr=127.0.0.1:%d" % port)[1].strip()
        assert alive(live.port) == "true"
        assert alive(broken.port) == "true"  # any answer: the Nginx lives
        assert alive(silent.port) == "false"  # accepted, never answered
        assert alive(closed) == "false"  # refused
        assert live.paths == ["/container-healthcheck-alive"]
    finally:
        nginx.stop()
        for server in (live, broken, silent):
            server.close()


class KeepAliveAppo(LoopbackServer):
    """An APPO Nginx that keeps connections open (HTTP/1.1 keep-alive) and closes one without
    an answer when breaks(n, broken so far) says so, n counting the app requests on that
    connection from 1: the way a reloading Nginx closes an idle connection as the entry sends
    a request on it. No health service behind it (404): the entry fails open to both."""

    def __init__(self, body, breaks):
        self.body, self.breaks, self.broken = body, breaks, 0
        LoopbackServer.__init__(self)

    def handle(self, conn):
        n = 0
        while True:
            path = StatusServer.read_path(conn)
            if path is None:
                return
            status, body = (200, self.body) if path.startswith("/o/") else (404, b"")
            if path.startswith("/o/"):
                n += 1
                if self.breaks(n, self.broken):
                    self.broken += 1
                    conn.close()
                    return
            conn.sendall(b"HTTP/1.1 %d Status\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))


# The shipped request path's keepalive: connections to the APPOs are kept and reused.
# (keepalive after balancer_by_lua, as lua-nginx-module asks)
BALANCER_LINE = '.balance(ngx.var.chc_app, "o") }\n'
KEEPALIVE_ROUTES = ROUTES.replace(BALANCER_LINE, BALANCER_LINE + "        keepalive 16;\n").replace(
    "            proxy_pass http://appo_by_health;\n",
    "            proxy_pass http://appo_by_health;\n            proxy_http_version 1.1;\n"
    "            proxy_set_header Connection \"\";\n")


def _keepalive_entry(tmp_path, a, b):
    assert "keepalive 16;" in KEEPALIVE_ROUTES and "proxy_http_version 1.1;" in KEEPALIVE_ROUTES
    return LuaNginx(str(tmp_path), """
    init_by_lua_block { require("container_healthcheck").init({ apps = { demo = { "%s", "%s" } }, interval = 1 }) }
    init_worker_by_lua_block { require("container_healthcheck").init_worker() }
    %s""" % (a, b, KEEPALIVE_ROUTES % {"extra": EJECTION}))


def test_a_keepalive_connection_closed_as_a_request_goes_out_takes_no_appo_out(tmp_path):
    # A closes its kept connection at the first request sent on it again, once.
    appo_a = KeepAliveAppo(b"A", lambda n, broken: n == 2 and broken == 0)
    appo_b = StatusServer(body=b"B")
    a, b = "127.0.0.1:%d" % appo_a.port, "127.0.0.1:%d" % appo_b.port
    nginx = _keepalive_entry(tmp_path, a, b)
    try:
        answers = [_get(nginx.port, "/o/demo/") for _ in range(12)]
        assert appo_a.broken == 1, answers  # the fault fired
        assert [status for status, _ in answers] == [200] * 12  # retried on B
        assert not json.loads(_get(nginx.port, "/ejection?addr=" + a)[1])["value"], "A was taken out"
        assert ("A" in [body for _, body in answers[-4:]]), answers  # A still has its share
        assert "broke unanswered" in open(nginx.error_log).read()
    finally:
        nginx.stop()
        appo_a.close()
        appo_b.close()


def test_an_appo_that_breaks_every_connection_is_out_at_the_second(tmp_path):
    appo_a = KeepAliveAppo(b"A", lambda n, broken: True)  # accepts, reads, closes: every time
    appo_b = StatusServer(body=b"B")
    a, b = "127.0.0.1:%d" % appo_a.port, "127.0.0.1:%d" % appo_b.port
    nginx = _keepalive_entry(tmp_path, a, b)
    try:
        answers = [_get(nginx.port, "/o/demo/") for _ in range(12)]
        assert answers == [(200, "B")] * 12  # every request retried on B
        assert appo_a.broken == 2  # the first only remembered, the second took A out
        assert json.loads(_get(nginx.port, "/ejection?addr=" + a)[1])["value"], "A was not taken out"
    finally:
        nginx.stop()
        appo_a.close()
        appo_b.close()
