-- container_healthcheck.lua: entry-Nginx balancer for BlueKing /o/<app>/ that routes only to
-- APPOs whose container-healthcheck says the app is healthy.
--
-- * A background checker (init_worker + ngx.timer, one worker per round via a shared-dict
--   lock) polls each APPO's GET /container-healthcheck/apps once per interval, with a timeout,
--   and keeps per-app, per-APPO health with rise/fall thresholds in a lua_shared_dict.
-- * balance(app) (balancer_by_lua) picks round-robin among the APPOs healthy for the app,
--   retries the next one on failure, and FAILS OPEN to all the app's APPOs when none is known
--   healthy or the data is stale, so a health-service outage never becomes a site outage.
-- * No cosocket call happens on the request path; it only reads the shared dict.
-- Needs lua-nginx-module and lua-resty-core (ngx.balancer); uses cjson when present.
local balancer = require "ngx.balancer"

local M = { _VERSION = "2.0.0" }

local conf = {
    dict = "container_healthcheck",
    appos = {},             -- { "10.0.0.2:80", ... }: APPO Nginx addresses for every app
    apps = {},              -- optional { app = { "host:port", ... } } overriding appos per app
    use_upstream_module = true, -- ngx.upstream.get_servers(app) where OpenResty has it
    path = "/container-healthcheck/apps",
    host_header = nil,      -- Host sent to APPOs (default: the APPO address)
    interval = 2,           -- seconds between polls of each APPO
    timeout = 1,            -- seconds for one poll (connect, send, read)
    fall = 2,               -- consecutive failures before an APPO is unhealthy for an app
    rise = 2,               -- consecutive successes before it is healthy again
    stale_after = nil,      -- seconds without a successful poll before an APPO's data is stale
    max_body = 4 * 1024 * 1024,
}

local ok_cjson, cjson = pcall(require, "cjson.safe")
if not ok_cjson then cjson = nil end
local ok_upstream, upstream = pcall(require, "ngx.upstream")
if not ok_upstream then upstream = nil end

local function log(level, ...)
    ngx.log(level, "[container-healthcheck] ", ...)
end

function M.init(options)
    for k, v in pairs(options or {}) do conf[k] = v end
    conf.stale_after = conf.stale_after or conf.interval * (conf.fall + 1) + conf.timeout
    if not ngx.shared[conf.dict] then
        error("lua_shared_dict " .. conf.dict .. " is not declared")
    end
end

-- The APPOs that serve an app: per-app config, the app's upstream, or the global list.
local function appos_for(app)
    local list = conf.apps[app]
    if list then return list end
    if conf.use_upstream_module and upstream and upstream.get_servers then
        local servers = upstream.get_servers(app)
        if servers and #servers > 0 then
            local out = {}
            for _, s in ipairs(servers) do out[#out + 1] = s.addr end
            return out
        end
    end
    return conf.appos
end

local function all_appos()
    local seen, out = {}, {}
    local function add(addr)
        if not seen[addr] then seen[addr] = true; out[#out + 1] = addr end
    end
    for _, addr in ipairs(conf.appos) do add(addr) end
    for _, list in pairs(conf.apps) do
        for _, addr in ipairs(list) do add(addr) end
    end
    if conf.use_upstream_module and upstream and upstream.get_upstreams then
        for _, name in ipairs(upstream.get_upstreams()) do
            for _, s in ipairs(upstream.get_servers(name) or {}) do add(s.addr) end
        end
    end
    return out
end

local function split_addr(addr)
    local host, port = addr:match("^%[?([^%]]+)%]?:(%d+)$")
    if not host then return addr, 80 end
    return host, tonumber(port)
end

-- The apps the APPO says are healthy, from its /apps answer; nil, err when it could not say.
local function healthy_apps(body)
    if cjson then
        local doc = cjson.decode(body)
        if type(doc) ~= "table" or doc.code ~= 0 or type(doc.message) ~= "table" then
            return nil, "unexpected /apps answer"
        end
        local set = {}
        for _, app in ipairs(doc.message.healthy or {}) do set[app] = true end
        return set
    end
    -- Without cjson: the answer is compact JSON and app codes are [A-Za-z0-9_.-] only.
    if not body:find('^{"code":0,') then return nil, "unexpected /apps answer" end
    local list = body:match('"healthy":%[(.-)%]')
    if not list then return nil, "no healthy list in /apps answer" end
    local set = {}
    for app in list:gmatch('"([A-Za-z0-9_.-]+)"') do set[app] = true end
    return set
end

local function poll(addr)
    local host, port = split_addr(addr)
    local sock = ngx.socket.tcp()
    sock:settimeouts(conf.timeout * 1000, conf.timeout * 1000, conf.timeout * 1000)
    local deadline = ngx.now() + conf.timeout
    local ok, err = sock:connect(host, port)
    if not ok then return nil, "connect: " .. tostring(err) end
    local request = "GET " .. conf.path .. " HTTP/1.0\r\nHost: " .. (conf.host_header or addr) ..
                    "\r\nUser-Agent: container-healthcheck-lua\r\nConnection: close\r\n\r\n"
    ok, err = sock:send(request)
    if not ok then sock:close(); return nil, "send: " .. tostring(err) end
    local status_line
    status_line, err = sock:receive("*l")
    if not status_line then sock:close(); return nil, "status: " .. tostring(err) end
    local status = tonumber(status_line:match("^HTTP/%d%.%d (%d%d%d)"))
    local length
    while true do
        local line
        line, err = sock:receive("*l")
        if not line then sock:close(); return nil, "headers: " .. tostring(err) end
        if line == "" then break end
        local value = line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
        if value then length = tonumber(value) end
        if ngx.now() > deadline then sock:close(); return nil, "timeout" end
    end
    if length and length > conf.max_body then sock:close(); return nil, "answer too large" end
    local body
    if length then
        body, err = sock:receive(length)
    else
        body, err = sock:receive("*a")
    end
    sock:close()
    if not body then return nil, "body: " .. tostring(err) end
    if status ~= 200 then return nil, "status " .. tostring(status) end
    return healthy_apps(body)
end

-- Record one observation of app on addr, applying rise/fall. State: "healthy|streak|since".
local function observe(dict, app, addr, passed, now)
    local key = "s:" .. app .. "|" .. addr
    local value = dict:get(key)
    local healthy, streak, since = true, 0, now
    if value then
        local h, s, t = value:match("^(%d)|(%-?%d+)|([%d.]+)$")
        healthy, streak, since = h == "1", tonumber(s), tonumber(t)
    else
        -- First sight: believe it at once, no threshold to cross yet.
        healthy, streak = passed, 0
    end
    if passed == healthy then
        streak = 0
    else
        streak = streak + 1
        local needed = healthy and conf.fall or conf.rise
        if streak >= needed then
            healthy, streak, since = passed, 0, now
            log(ngx.WARN, "app ", app, " on ", addr, " is now ", healthy and "healthy" or "UNHEALTHY")
        end
    end
    dict:set(key, (healthy and "1" or "0") .. "|" .. streak .. "|" .. since)
end

local function check_round(premature)
    if premature then return end
    local dict = ngx.shared[conf.dict]
    -- One worker per round: the lock expires a little before the next round.
    if not dict:add("lock:round", true, conf.interval * 0.9) then return end
    local addrs = all_appos()
    local threads = {}
    for i, addr in ipairs(addrs) do
        threads[i] = ngx.thread.spawn(poll, addr)
    end
    local now = ngx.now()
    for i, addr in ipairs(addrs) do
        local _, healthy, err = ngx.thread.wait(threads[i])
        dict:set("t:" .. addr, now)
        if healthy then
            dict:set("ok:" .. addr, now)
            dict:delete("err:" .. addr)
        else
            dict:set("err:" .. addr, tostring(err))
            log(ngx.WARN, "poll of ", addr, " failed: ", tostring(err))
        end
        -- Every app this APPO serves: known apps plus the ones it reports.
        local apps = {}
        for app in pairs(healthy or {}) do apps[app] = true end
        for _, key in ipairs(dict:get_keys(0)) do
            local app, a = key:match("^s:(.+)|(.+)$")
            if app and a == addr then apps[app] = true end
        end
        for app in pairs(conf.apps) do apps[app] = true end
        for app in pairs(apps) do
            observe(dict, app, addr, healthy ~= nil and healthy[app] == true, now)
        end
    end
end

function M.init_worker()
    local ok, err = ngx.timer.every(conf.interval, check_round)
    if not ok then log(ngx.ERR, "cannot start the checker: ", err) end
    ngx.timer.at(0, check_round)
end

-- Is app known healthy on addr, with fresh data?
local function usable(dict, app, addr, now)
    local polled = dict:get("ok:" .. addr)
    if not polled or now - polled > conf.stale_after then return false end
    local value = dict:get("s:" .. app .. "|" .. addr)
    return value ~= nil and value:sub(1, 1) == "1"
end

local rr = {}

-- balancer_by_lua: choose the peer for this try.
function M.balance(app)
    local ctx = ngx.ctx
    local candidates = ctx.chc_candidates
    if not candidates then
        local dict = ngx.shared[conf.dict]
        local now = ngx.now()
        local appos = appos_for(app or "")
        candidates = {}
        for _, addr in ipairs(appos) do
            if usable(dict, app, addr, now) then candidates[#candidates + 1] = addr end
        end
        if #candidates == 0 then
            candidates = appos
            log(ngx.WARN, "no APPO known healthy for app ", tostring(app), ": failing open to all ", #appos)
        end
        if #candidates == 0 then
            return ngx.exit(ngx.ERROR)
        end
        local start = (rr[app] or 0) % #candidates
        rr[app] = start + 1
        ctx.chc_candidates = candidates
        ctx.chc_next = start
        ctx.chc_tries = 0
        if #candidates > 1 then balancer.set_more_tries(#candidates - 1) end
    end
    local addr = candidates[ctx.chc_next % #candidates + 1]
    ctx.chc_next = ctx.chc_next + 1
    ctx.chc_tries = ctx.chc_tries + 1
    local host, port = split_addr(addr)
    local ok, err = balancer.set_current_peer(host, port)
    if not ok then log(ngx.ERR, "set_current_peer ", addr, ": ", err) end
end

local function json_string(s)
    return '"' .. tostring(s):gsub('[%c"\\]', function(c)
        return string.format("\\u%04x", c:byte())
    end) .. '"'
end

-- content_by_lua: the shared dict as JSON, for operators.
function M.status()
    local dict = ngx.shared[conf.dict]
    local apps, appos = {}, {}
    for _, key in ipairs(dict:get_keys(0)) do
        local app, addr = key:match("^s:(.+)|(.+)$")
        if app then
            local h, streak, since = dict:get(key):match("^(%d)|(%-?%d+)|([%d.]+)$")
            apps[app] = apps[app] or {}
            apps[app][#apps[app] + 1] = string.format('%s:{"healthy":%s,"streak":%s,"last_change":%s}',
                json_string(addr), h == "1" and "true" or "false", streak, since)
        end
    end
    local now = ngx.now()
    for _, addr in ipairs(all_appos()) do
        local ok_at = dict:get("ok:" .. addr)
        appos[#appos + 1] = string.format('%s:{"last_ok":%s,"fresh":%s,"error":%s}', json_string(addr),
            ok_at and tostring(ok_at) or "null",
            (ok_at and now - ok_at <= conf.stale_after) and "true" or "false",
            dict:get("err:" .. addr) and json_string(dict:get("err:" .. addr)) or "null")
    end
    local parts = {}
    for app, entries in pairs(apps) do
        parts[#parts + 1] = json_string(app) .. ":{" .. table.concat(entries, ",") .. "}"
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say('{"now":', now, ',"interval":', conf.interval, ',"fall":', conf.fall, ',"rise":', conf.rise,
            ',"appos":{', table.concat(appos, ","), '},"apps":{', table.concat(parts, ","), '}}')
end

return M
