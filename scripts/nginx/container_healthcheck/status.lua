-- container_healthcheck.status: what the balancer knows, for operators (content_by_lua): an
-- HTML matrix of apps x APPOs for browsers (Accept: text/html), JSON otherwise.
local balancer = require "container_healthcheck.balancer"
local config = require "container_healthcheck.config"
local discovery = require "container_healthcheck.discovery"
local records = require "container_healthcheck.records"
local state = require "container_healthcheck.state"

local ngx = ngx
local say, unescape_uri, now_of, sleep = ngx.say, ngx.unescape_uri, ngx.now, ngx.sleep
local format, concat, sort = string.format, table.concat, table.sort
local floor, max = math.floor, math.max
local ipairs, pairs, tostring = ipairs, pairs, tostring

local conf = config.conf
local M = {}

local function json_string(s)
    return '"' .. tostring(s):gsub('[%c"\\]', function(c)
        return format("\\u%04x", c:byte())
    end) .. '"'
end

-- The operators' page shares its look with the APPO host page (healthcheck/pages.py): the
-- same style and script, so the same Content-Security-Policy hashes (make test checks).
local PAGE_STYLE = [[body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#1d2330;background:#f5f6f8}header{padding:10px 16px;background:#1d2330;color:#fff;display:flex;gap:16px;align-items:center;flex-wrap:wrap}header h1{font-size:15px;margin:0}header .meta{color:#aab3c5}input#filter{padding:4px 8px;border-radius:4px;border:1px solid #556;min-width:220px}table{border-collapse:separate;border-spacing:0}th,td{padding:3px 8px;border-bottom:1px solid #e1e4ea;white-space:nowrap;text-align:left;vertical-align:top}thead th{position:sticky;top:0;background:#e9ecf1;z-index:2}tbody th{position:sticky;left:0;background:#fff;z-index:1}.ok{background:#d9f2e1;color:#125d2c}.bad{background:#fbdada;color:#8a1111}.unknown{background:#eceff3;color:#5b6478}.backup{background:#e3ecfb;color:#1d4a8f}.drain{background:#fdf0d5;color:#7a4b00}.open th{background:#fff3c4}.small{color:#6b7385;font-size:11px}.error{padding:16px;color:#8a1111}]]
local PAGE_SCRIPT = [[(function(){var f=document.getElementById("filter");if(!f)return;function apply(){var q=f.value.trim().toLowerCase();var rows=document.querySelectorAll("tbody tr");for(var i=0;i<rows.length;i++){rows[i].hidden=q!==""&&rows[i].getAttribute("data-app").indexOf(q)<0;}var u=new URL(location.href);if(q){u.searchParams.set("q",q);}else{u.searchParams.delete("q");}history.replaceState(null,"",u.toString());}f.addEventListener("input",apply);apply();})();]]
local PAGE_CSP = "default-src 'none'; style-src 'sha256-3PuVOTlJwGTUEwlVGHJajBGawt9GBJRi2ShthQBbnTQ='; script-src 'sha256-jqwv73F/LeQ8CdMdX2RH4zgFRFjHdQKVLYy66as0Yw0='; img-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

local function html_escape(s)
    return (tostring(s):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;",
                                             ['"'] = "&quot;", ["'"] = "&#39;" }))
end

local function age_text(seconds)
    if not seconds then return "never" end
    if seconds < 120 then return format("%.0f s", seconds) end
    if seconds < 7200 then return format("%.0f min", seconds / 60) end
    return format("%.1f h", seconds / 3600)
end

-- What the registries say, read key by key (no scan: the zone is never held for long):
-- states[app][addr] = {healthy, streak, since}, reasons[app][addr], ejections[app][addr] =
-- {at, hold_until, count, cause} (those still out), and every APPO address in play.
local function read_state(dict)
    local states, reasons, polled, ejections = {}, {}, records.decode_set(dict:get("reg:appos")), {}
    for _, addr in ipairs(config.configured_appos()) do polled[addr] = true end
    local seen = 0
    for addr in pairs(polled) do
        seen = seen + 1
        if seen % 5 == 0 then sleep(0) end  -- the worker's user requests go on meanwhile
        local apps = records.decode_set(dict:get("apps:" .. addr))
        for app in pairs(records.decode_set(dict:get("ejected:" .. addr))) do apps[app] = true end
        for app in pairs(apps) do
            local health = records.decode_health(dict:get(records.health_key(app, addr)))
            if health then
                states[app] = states[app] or {}
                states[app][addr] = health
            end
            local why = dict:get(records.reason_key(app, addr))
            if why then
                reasons[app] = reasons[app] or {}
                reasons[app][addr] = why
            end
            local e = records.decode_ejection(dict:get(records.ejection_key(app, addr)))
            if e and not e.cleared then
                ejections[app] = ejections[app] or {}
                ejections[app][addr] = e
            end
        end
    end
    return states, reasons, polled, ejections
end

local function status_json(dict, states, reasons, polled, ejections, now)
    local appos, parts = {}, {}
    for addr in pairs(polled) do
        local ok_at = dict:get("ok:" .. addr)
        local err = dict:get("err:" .. addr)
        local stale_since = dict:get("stale:" .. addr)
        appos[#appos + 1] = format('%s:{"last_ok":%s,"fresh":%s,"up":%s,"stale_since":%s,"mode":%s,"error":%s}',
            json_string(addr), ok_at and tostring(ok_at) or "null", state.is_fresh(dict, addr, now) and "true" or "false",
            (state.is_fresh(dict, addr, now) and not stale_since) and "true" or "false",
            stale_since and tostring(stale_since) or "null",
            json_string(dict:get("mode:" .. addr) or "none"), err and json_string(err) or "null")
    end
    local apps, open = {}, {}
    for app in pairs(states) do apps[app] = true end
    for app in pairs(ejections) do apps[app] = true end
    for app in pairs(apps) do
        local tier = balancer.tier(app, "o")
        if tier ~= "usable" then open[#open + 1] = json_string(app) .. ":" .. json_string(tier) end
        local entries = {}
        local addrs = {}
        for addr in pairs(states[app] or {}) do addrs[addr] = true end
        for addr in pairs(ejections[app] or {}) do addrs[addr] = true end
        for addr in pairs(addrs) do
            local st = states[app] and states[app][addr]
            local why = reasons[app] and reasons[app][addr]
            local out = ejections[app] and ejections[app][addr]
            entries[#entries + 1] = format('%s:{"healthy":%s,"streak":%d,"last_change":%s%s%s}',
                json_string(addr), (st and st.healthy) and "true" or "false", st and st.streak or 0,
                st and tostring(st.since) or "null", why and (',"reason":' .. json_string(why)) or "",
                out and format(',"ejected":{"cause":%s,"at":%.3f,"until":%.3f,"count":%d}',
                                      json_string(out.cause), out.at, out.hold_until, out.count) or "")
        end
        parts[#parts + 1] = json_string(app) .. ":{" .. concat(entries, ",") .. "}"
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    say('{"now":', now, ',"wait":', conf.wait, ',"grace":', conf.grace, ',"interval":', conf.interval,
            ',"fall":', conf.fall, ',"rise":', conf.rise, ',"ejections_total":', dict:get("stat:ejections") or 0,
            ',"keep_stale":', conf.keep_stale, ',"last_round":', dict:get("stat:round") or "null",
            ',"appos":{', concat(appos, ","), '},"open":{', concat(open, ","), '},"apps":{', concat(parts, ","), '}}')
end

-- The matrix: apps (rows) x APPOs (columns); apps failing open first.
local function status_html(dict, states, reasons, polled, ejections, now)
    local addrs = {}
    for addr in pairs(polled) do addrs[#addrs + 1] = addr end
    sort(addrs)
    local fresh, kept = {}, {}
    local head = { "<tr><th>app</th>" }
    for _, addr in ipairs(addrs) do
        local ok_at = dict:get("ok:" .. addr)
        local err = dict:get("err:" .. addr)
        fresh[addr] = state.is_fresh(dict, addr, now)
        kept[addr] = fresh[addr] and dict:get("stale:" .. addr) ~= nil
        head[#head + 1] = format('<th class="%s" title="%s">%s<br><span class="small">%s%s</span></th>',
            kept[addr] and "drain" or fresh[addr] and "ok" or "bad", html_escape(err or ""), html_escape(addr),
            ok_at and ("polled " .. age_text(now - ok_at) .. " ago") or "never polled",
            kept[addr] and " &middot; service silent, Nginx alive: verdicts kept"
                or err and (" &middot; " .. html_escape(err:sub(1, 40))) or "")
    end
    head[#head + 1] = "</tr>"
    local rows, open_count = {}, 0
    for app, per_addr in pairs(states) do
        local backup = {}
        for _, peer in ipairs(discovery.upstream_peers(app) or {}) do
            if peer.backup then backup[peer.addr] = true end
        end
        local usable_count, healthy_ejected = 0, 0
        local cells = {}
        for _, addr in ipairs(addrs) do
            local st = per_addr[addr]
            local why = reasons[app] and reasons[app][addr]
            local css, words
            if not st then
                css, words = "", ""
            elseif not fresh[addr] then
                css, words = "unknown", "stale"
            elseif ejections[app] and ejections[app][addr] then
                css, words = "bad", "ejected: " .. ejections[app][addr].cause
                if st.healthy then healthy_ejected = healthy_ejected + 1 end
            elseif st.healthy then
                css, words = "ok", kept[addr] and "healthy (stale)" or "healthy"
                usable_count = usable_count + 1
            else
                css, words = "bad", why or "not reported"
            end
            local label = html_escape(words)
            if st and backup[addr] then css, label = css .. " backup", "backup &middot; " .. label end
            cells[#cells + 1] = st and format('<td class="%s" title="%s">%s <span class="small">%s</span></td>',
                css, html_escape(why or ""), label, age_text(now - st.since)) or "<td></td>"
        end
        local failing_open = usable_count == 0
        if failing_open then open_count = open_count + 1 end
        rows[#rows + 1] = { open = failing_open, app = app, html = format(
            '<tr data-app="%s"%s><th>%s%s</th>%s</tr>', html_escape(app:lower()), failing_open and ' class="open"' or "",
            html_escape(app), failing_open and (healthy_ejected > 0
                and ' <span class="small">failing open to the healthy</span>'
                or ' <span class="small">failing open to all</span>') or "",
            concat(cells)) }
    end
    sort(rows, function(a, b)
        if a.open ~= b.open then return a.open end
        return a.app < b.app
    end)
    local body = {}
    for i, row in ipairs(rows) do body[i] = row.html end
    local query = unescape_uri(ngx.var.arg_q or ""):sub(1, 100)
    ngx.header["Content-Type"] = "text/html; charset=utf-8"
    ngx.header["Cache-Control"] = "no-store"
    ngx.header["Content-Security-Policy"] = PAGE_CSP
    ngx.header["X-Content-Type-Options"] = "nosniff"
    ngx.header["Referrer-Policy"] = "no-referrer"
    say('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="',
            max(1, floor(conf.interval)), '"><title>container-healthcheck: apps x APPOs</title><style>',
            PAGE_STYLE, '</style></head><body><header><h1>container-healthcheck: apps x APPOs</h1><span class="meta">',
            #rows, " apps, ", #addrs, " APPOs, ", open_count, " failing open &middot; interval ", conf.interval,
            " s, fall ", conf.fall, ", rise ", conf.rise, " &middot; ", os.date("%Y-%m-%d %H:%M:%S", floor(now)),
            '</span><form method="get"><input id="filter" name="q" placeholder="filter apps" value="',
            html_escape(query), '" autocomplete="off"></form></header><table><thead>', concat(head),
            "</thead><tbody>", concat(body), "</tbody></table><script>", PAGE_SCRIPT, "</script></body></html>")
end

-- content_by_lua: the page or the JSON.
function M.handle()
    local dict = state.dict()
    local states, reasons, polled, ejections = read_state(dict)
    local now = now_of()
    if (ngx.var.http_accept or ""):find("text/html", 1, true) then
        return status_html(dict, states, reasons, polled, ejections, now)
    end
    return status_json(dict, states, reasons, polled, ejections, now)
end

return M
