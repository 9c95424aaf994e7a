"""The entry balancer's Lua, unit by unit, inside a real nginx worker (tests/lua/test_units.lua):
feed parsing against the Python service's own rendering, rise/fall, ejection and its backoff,
usability, applying answers. Seconds, no APPO, no docker."""
import os
import urllib.request

import pytest

from healthcheck.feed_format import UNKNOWN_AGE, Verdict, render_feed
from support import ROOT, LuaNginx

TESTS_LUA = os.path.join(ROOT, "tests", "lua")


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lua-units"))
    server = LuaNginx(workdir, """
    init_by_lua_block { require("container_healthcheck").init({ interval = 1 }) }
    server {
        listen 127.0.0.1:{port};
        location = /units { content_by_lua_file %s/test_units.lua; }
    }""" % TESTS_LUA)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    yield opener, "http://127.0.0.1:%d/units" % server.port, workdir
    server.stop()


def test_lua_units(nginx):
    opener, url, workdir = nginx
    feed = os.path.join(workdir, "feed.txt")
    with open(feed, "wb") as handle:  # the service's own rendering: both sides held to one format
        handle.write(render_feed(42, (Verdict("bk", False, "exited"), Verdict("bk_iam", True, ""),
                                      Verdict("demo", False, "draining: 内核升级"), Verdict("new", True, "")),
                                 {"bk_iam": 0.44, "new": UNKNOWN_AGE}, True, 1.5))
    lines = opener.open(url + "?feed=" + feed, timeout=10).read().decode("utf-8").splitlines()
    failed = [line for line in lines if not line.startswith("ok ")]
    assert failed == [], "\n".join(failed)
    assert len(lines) == 21, lines


@pytest.mark.parametrize("options,words", [
    ("{ intervall = 2 }", "unknown option `intervall`"),
    ('{ interval = "2" }', "option `interval` must be a number, not string"),
    ("{ eject_hold = -1 }", "option `eject_hold` must be > 0"),
])
def test_a_wrong_option_keeps_nginx_from_starting_in_words(tmp_path, options, words):
    """What an operator sees after a typo in init({...}): nginx does not start (a reload keeps
    the running configuration), and says why. `nginx -t` does not run init_by_lua."""
    server = LuaNginx(str(tmp_path), """
    init_by_lua_block { require("container_healthcheck").init(%s) }
    server { listen 127.0.0.1:{port}; }""" % options, start=False)
    with pytest.raises(AssertionError) as refused:
        server.start()
    assert "init_by_lua error: container_healthcheck.init: " + words in str(refused.value), refused.value
