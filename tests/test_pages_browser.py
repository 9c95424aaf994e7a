"""The entry matrix at 500 apps x 50 APPOs (synthetic shared-dict data) in a real browser."""
import os

import pytest

from browser import CHROMIUM, Browser, artifact_path
from support import LUA_DIR, LuaNginx, http, wait_for

# Fills the dict as the channels and the supervisor would after hearing from 50 APPOs for 500
# apps: most healthy, some not (with a reason), 20 apps unhealthy everywhere (failing open), two
# APPOs stale; the registries the page reads (reg:appos, apps:<addr>).
FILL = r"""
local dict = ngx.shared.container_healthcheck
local now = ngx.now()
local appos, apps = {}, {}
for i = 1, 500 do apps[#apps + 1] = string.format("bk_app%03d", i) end
for a = 1, 50 do
    local addr = string.format("127.0.%d.%d:8010", math.floor(a / 200), a % 200 + 10)
    dict:set("p:" .. addr, now, 3600)
    if a > 2 then
        dict:set("ok:" .. addr, now, 3600)
        dict:set("fresh:" .. addr, now + 3600, 3600)  -- its last answer counts for this long
    else
        dict:set("err:" .. addr, "connect: connection refused", 3600)
    end
    for i = 1, 500 do
        local app = string.format("bk_app%03d", i)
        local healthy = i > 20 and (i + a) % 17 ~= 0
        dict:set("s:" .. app .. "|" .. addr, (healthy and "1" or "0") .. "|0|" .. (now - i * 7), 3600)
        if not healthy then dict:set("w:" .. app .. "|" .. addr, i <= 20 and "exited" or "probe 502", 3600) end
    end
    dict:set("apps:" .. addr, table.concat(apps, " "), 3600)
    appos[#appos + 1] = addr
end
dict:set("reg:appos", table.concat(appos, " "))
ngx.say("filled")
"""


@pytest.fixture
def matrix_nginx(tmp_path):
    server = LuaNginx(str(tmp_path), """
    init_by_lua_block { require("container_healthcheck").init({ appos = {}, interval = 3600, forget_after = 10800 }) }
    server {
        listen 127.0.0.1:{port};
        location = /fill { content_by_lua_block { %s } }
        location = /container-healthcheck-status {
            content_by_lua_block { require("container_healthcheck").status() }
        }
    }""" % FILL, dict_size="16m")
    try:
        assert wait_for(lambda: _answers(server.port), 10)
        assert http(server.port, "/fill")[2].strip() == b"filled"
        yield server.port
    finally:
        server.stop()


def _answers(port):
    try:
        return http(port, "/container-healthcheck-status")[0] == 200
    except OSError:
        return False


def test_matrix_of_500_apps_by_50_appos_renders_in_a_browser(matrix_nginx):
    if not CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail("chromium missing (scripts/install-deps)")
        pytest.skip("chromium missing")
    status, headers, body = http(matrix_nginx, "/container-healthcheck-status", headers={"Accept": "text/html"})
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "unsafe-inline" not in headers["Content-Security-Policy"]
    browser = Browser()
    try:
        page = browser.new_page()
        load_ms = page.navigate("http://127.0.0.1:%d/container-healthcheck-status" % matrix_nginx)
        page.settle()
        assert page.problems == [], page.problems
        rows = page.evaluate("document.querySelectorAll('tbody tr').length")
        columns = page.evaluate("document.querySelectorAll('thead th').length")
        assert rows == 500 and columns == 51
        first = page.evaluate("Array.from(document.querySelectorAll('tbody tr')).slice(0, 21).map("
                              "function(r){return r.className + ' ' + r.getAttribute('data-app')})")
        # the 20 apps with no healthy APPO (failing open) come first
        assert [f.split()[0] for f in first[:20]] == ["open"] * 20 and first[20].split()[0] != "open"
        stale = page.evaluate("document.querySelectorAll('td.unknown').length")
        assert stale == 2 * 500  # two APPOs not polled lately: unknown, not healthy
        # the filter box hides rows without a round trip and keeps the filter in the URL
        page.evaluate("var f=document.getElementById('filter');f.value='app49';"
                      "f.dispatchEvent(new Event('input'))")
        assert page.evaluate("document.querySelectorAll('tbody tr:not([hidden])').length") == 10  # bk_app490-499
        assert page.evaluate("location.search") == "?q=app49"
        page.evaluate("document.getElementById('filter').value=''")
        page.evaluate("document.getElementById('filter').dispatchEvent(new Event('input'))")
        page.screenshot(artifact_path("entry-matrix-500x50.png"), 1400, 800)
        print("500 x 50 matrix: %d KB, load event after %.0f ms" % (len(body) // 1024, load_ms))
    finally:
        browser.close()


def test_csp_hashes_in_the_lua_page_match_its_style_and_script():
    from healthcheck import pages
    lua = open(os.path.join(LUA_DIR, "container_healthcheck", "status.lua")).read()
    assert "local PAGE_STYLE = [[" + pages.STYLE + "]]" in lua
    assert "local PAGE_SCRIPT = [[" + pages.SCRIPT + "]]" in lua
    assert 'local PAGE_CSP = "' + pages.CSP + '"' in lua
