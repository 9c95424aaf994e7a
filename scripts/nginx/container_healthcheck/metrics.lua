-- container_healthcheck.metrics: what the entry decides, in the Prometheus text format 0.0.4
-- (content_by_lua at /container-healthcheck-metrics). Counters live in the shared dict
-- ("c:<family>|<labels>", incremented where things happen, so they survive a reload and
-- never go down); gauges are read from the registries when scraped, key by key (no scan).
-- Series of apps and APPOs nobody asks about any more leave with them (the supervisor drops
-- their counters; the registries drop them).
local balancer = require "container_healthcheck.balancer"
local config = require "container_healthcheck.config"
local discovery = require "container_healthcheck.discovery"
local poller = require "container_healthcheck.poller"
local records = require "container_healthcheck.records"
local state = require "container_healthcheck.state"

local ngx = ngx
local now_of, print_, sleep = ngx.now, ngx.print, ngx.sleep
local format, match, concat, sort = string.format, string.match, table.concat, table.sort
local pairs, ipairs, tostring = pairs, ipairs, tostring

local conf = config.conf
local M = {}

-- Every counter family the Lua writes, with its help text (a family with no series yet is
-- still described, so that rules and dashboards find it).
M.COUNTERS = {
    { "ejections_total", "passive ejections: a user request failed on that APPO for that app " ..
                         "(cause: http_502: refused, reset or answered 502; http_504: timed out or answered 504)" },
    { "ejections_reverted_total", "ejections taken back: the request that made them failed on every APPO it tried" },
    { "ejections_capped_total", "ejections refused: half of the app's APPOs were out on failed requests alone" },
    { "fail_open_total", "requests sent while no APPO of the app was usable (to the healthy ones, else to all)" },
    { "fail_open_panic_total", "requests sent to every APPO of the app: none said healthy" },
    { "no_peer_total", "requests for an app with no APPO at all (answered 502, as nginx does without an upstream)" },
    { "lua_errors_total", "Lua errors caught, by where: balance and log (the request went on without the Lua), " ..
                          "channel, supervise, metrics" },
}

local function escape(value)
    return (tostring(value):gsub("[\\\"\n]", { ["\\"] = "\\\\", ['"'] = '\\"', ["\n"] = "\\n" }))
end

local function family(out, name, kind, help)
    out[#out + 1] = format("# HELP container_healthcheck_%s %s\n# TYPE container_healthcheck_%s %s\n",
                           name, help, name, kind)
end

-- The counters in the registry, grouped by family.
local function counters(dict, out)
    local by_family = {}
    for key in pairs(records.decode_set(dict:get("reg:counters"))) do
        local name, labels = match(key, "^c:([%w_]+)|(.*)$")
        local value = name and dict:get(key)
        if value then
            local list = by_family[name]
            if not list then list = {}; by_family[name] = list end
            list[#list + 1] = format("container_healthcheck_%s%s %d\n", name,
                                     labels ~= "" and ("{" .. labels .. "}") or "", value)
        end
    end
    for _, f in ipairs(M.COUNTERS) do
        family(out, f[1], "counter", f[2])
        local list = by_family[f[1]] or {}
        sort(list)
        for _, line in ipairs(list) do out[#out + 1] = line end
    end
end

-- Every app the entry balances, and its APPOs: the apps in use and those with a record on an
-- APPO in play.
local function apps_in_play(dict, appos)
    local apps = records.decode_set(dict:get("reg:apps"))
    for addr in pairs(appos) do
        for app in pairs(records.decode_set(dict:get("apps:" .. addr))) do apps[app] = true end
    end
    return apps
end

-- A scrape must not hold its worker for long: the worker's user requests go on every so often.
local YIELD_EVERY = 50

local function peers_gauges(dict, appos, now, out)
    local apps = {}
    for app in pairs(apps_in_play(dict, appos)) do apps[#apps + 1] = app end
    sort(apps)
    local up, usable_count = {}, {}
    for i, app in ipairs(apps) do
        if i % YIELD_EVERY == 0 then sleep(0) end
        local peers = discovery.peers_for(app, "o")
        local n = 0
        for _, peer in ipairs(peers) do
            local yes = state.usable(dict, app, peer.addr, now)
            if yes then n = n + 1 end
            up[#up + 1] = format('container_healthcheck_peer_up{app="%s",appo="%s"} %d\n', escape(app),
                                 escape(peer.addr), yes and 1 or 0)
        end
        usable_count[#usable_count + 1] = format('container_healthcheck_app_usable_appos{app="%s"} %d\n',
                                                 escape(app), n)
        if n == 0 and #peers > 0 then
            local tier = balancer.tier(app, "o")
            usable_count[#usable_count + 1] = format('container_healthcheck_app_failing_open{app="%s",to="%s"} 1\n',
                                                     escape(app), tier == "healthy" and "healthy" or "all")
        end
    end
    family(out, "peer_up", "gauge",
           "1 when the entry would send the app's requests to that APPO now (fresh, healthy, not ejected)")
    out[#out + 1] = concat(up)
    local failing, counts = {}, {}
    for _, line in ipairs(usable_count) do
        if line:find("app_failing_open", 1, true) then failing[#failing + 1] = line else counts[#counts + 1] = line end
    end
    family(out, "app_usable_appos", "gauge", "APPOs the entry would send the app's requests to now (0: failing open)")
    out[#out + 1] = concat(counts)
    family(out, "app_failing_open", "gauge", "1 for an app failing open now, to the APPOs that say healthy or to all")
    out[#out + 1] = concat(failing)
end

local function appo_gauges(dict, appos, now, out)
    local addrs = {}
    for addr in pairs(appos) do addrs[#addrs + 1] = addr end
    sort(addrs)
    local up, stale = {}, {}
    for _, addr in ipairs(addrs) do
        local fresh = state.is_fresh(dict, addr, now)
        local kept = fresh and dict:get("stale:" .. addr) ~= nil
        up[#up + 1] = format('container_healthcheck_appo_up{appo="%s"} %d\n', escape(addr),
                             (fresh and not kept) and 1 or 0)
        stale[#stale + 1] = format('container_healthcheck_appo_stale{appo="%s"} %d\n', escape(addr), kept and 1 or 0)
    end
    family(out, "appo_up", "gauge", "1 while the APPO's feed channel is live: its heartbeat on time")
    out[#out + 1] = concat(up)
    family(out, "appo_stale", "gauge",
           "1 while the APPO's service is silent but its Nginx answers: its last verdicts kept (keep_stale)")
    out[#out + 1] = concat(stale)
    family(out, "heartbeat_lateness_seconds", "histogram", "how late each feed heartbeat was, past `wait`")
    local buckets = poller.LATENESS_BUCKETS
    for n, addr in ipairs(addrs) do
        if n % YIELD_EVERY == 0 then sleep(0) end
        local cumulative = 0
        local label = escape(addr)
        for i = 1, #buckets + 1 do
            cumulative = cumulative + (dict:get("h:" .. addr .. "|" .. i) or 0)
            out[#out + 1] = format('container_healthcheck_heartbeat_lateness_seconds_bucket{appo="%s",le="%s"} %d\n',
                                   label, i <= #buckets and tostring(buckets[i]) or "+Inf", cumulative)
        end
        out[#out + 1] = format('container_healthcheck_heartbeat_lateness_seconds_sum{appo="%s"} %.6f\n', label,
                               dict:get("h:" .. addr .. "|sum") or 0)
        out[#out + 1] = format('container_healthcheck_heartbeat_lateness_seconds_count{appo="%s"} %d\n',
                               label, cumulative)
    end
end

-- The exposition, as one string.
function M.render()
    local dict = state.dict()
    local now = now_of()
    local appos = records.decode_set(dict:get("reg:appos"))
    for _, addr in ipairs(config.configured_appos()) do appos[addr] = true end
    local out = {}
    family(out, "info", "gauge", "the entry Lua's version and options")
    out[#out + 1] = format('container_healthcheck_info{version="%s",wait="%s",grace="%s",keep_stale="%s"} 1\n',
                           escape(M.version or ""), tostring(conf.wait), tostring(conf.grace),
                           tostring(conf.keep_stale))
    peers_gauges(dict, appos, now, out)
    appo_gauges(dict, appos, now, out)
    counters(dict, out)
    family(out, "dict_free_bytes", "gauge", "free bytes in the lua_shared_dict (0: full, entries are evicted)")
    out[#out + 1] = format("container_healthcheck_dict_free_bytes %d\n", dict.free_space and dict:free_space() or 0)
    family(out, "dict_capacity_bytes", "gauge", "the lua_shared_dict's size")
    out[#out + 1] = format("container_healthcheck_dict_capacity_bytes %d\n", dict.capacity and dict:capacity() or 0)
    return concat(out)
end

-- content_by_lua: the scrape.
function M.handle()
    local ok, body = pcall(M.render)
    if not ok then
        state.lua_error("metrics", body)
        ngx.status = 503  -- the scrape fails (up 0); never a 500 from the entry's own Lua
        ngx.header["Content-Type"] = "text/plain"
        return ngx.say("metrics failed: ", body)
    end
    ngx.header["Content-Type"] = "text/plain; version=0.0.4; charset=utf-8"
    ngx.header["Cache-Control"] = "no-store"
    print_(body)
end

return M
