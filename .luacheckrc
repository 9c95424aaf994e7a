-- luacheck (Debian: lua-check) for the entry Lua and its Lua tests; make test runs it.
std = "ngx_lua"
max_line_length = 120
codes = true
files["scripts/nginx/container_healthcheck/status.lua"] = {
    -- PAGE_STYLE, PAGE_SCRIPT, PAGE_CSP: byte-equal to healthcheck/pages.py (a test holds them so)
    ignore = { "631" },
}
files["tests/lua"] = {
    -- the tests set response headers and fields of ngx that the std does not list
    globals = { "ngx" },
}
