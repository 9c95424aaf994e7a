-- container_healthcheck.poller: one channel per APPO, a timer loop owned by one worker through
-- a shared-dict lock, that long-polls the service's feed (or polls /apps on services without
-- it) and writes what it learns through container_healthcheck.state. A supervisor timer
-- starts the channels; every round and every timer body runs under xpcall.
local config = require "container_healthcheck.config"
local discovery = require "container_healthcheck.discovery"
local feed = require "container_healthcheck.feed"
local state = require "container_healthcheck.state"

local ngx = ngx
local now_of, update_time, sleep, tcp = ngx.now, ngx.update_time, ngx.sleep, ngx.socket.tcp
local timer_at, timer_every = ngx.timer.at, ngx.timer.every
local worker_exiting, worker_pid = ngx.worker.exiting, ngx.worker.pid
local WARN, ERR = ngx.WARN, ngx.ERR
local byte, find, sub, format, match = string.byte, string.find, string.sub, string.format, string.match
local floor, min, max = math.floor, math.min, math.max
local xpcall, traceback, tostring, tonumber, type, pairs, ipairs = xpcall, debug.traceback, tostring, tonumber,
    type, pairs, ipairs

local conf = config.conf
local M = {}

local OWN_TTL = 5  -- seconds a channel's lock outlives a silent owner (a crashed worker)

---------------------------------------------------------------------------------------------
-- Talking to one APPO's service: one HTTP/1.0 GET with one total deadline.

-- The socket after the headers, the status, the Content-Length (or nil) and a function
-- giving the milliseconds left; or nil, error.
local function http_get(addr, path, deadline)
    local host, port = discovery.split_addr(addr)
    local sock = tcp()
    local function left_ms()
        update_time()
        return max(1, floor((deadline - now_of()) * 1000))
    end
    sock:settimeout(left_ms())
    local ok, err = sock:connect(host, port)
    if not ok then return nil, "connect: " .. tostring(err) end
    sock:settimeout(left_ms())
    ok, err = sock:send("GET " .. path .. " HTTP/1.0\r\nHost: " .. (conf.host_header or addr) ..
                        "\r\nUser-Agent: container-healthcheck-lua\r\nConnection: close\r\n\r\n")
    if not ok then sock:close(); return nil, "send: " .. tostring(err) end
    sock:settimeout(left_ms())
    local line
    line, err = sock:receive("*l")
    if not line then sock:close(); return nil, "status: " .. tostring(err) end
    local status = tonumber(match(line, "^HTTP/%d%.%d (%d%d%d)"))
    local length
    while true do
        sock:settimeout(left_ms())
        line, err = sock:receive("*l")
        if not line then sock:close(); return nil, "headers: " .. tostring(err) end
        if line == "" then break end
        local value = match(line, "^[Cc]ontent%-[Ll]ength:%s*(%d+)")
        if value then length = tonumber(value) end
    end
    if length and length > conf.max_body then sock:close(); return nil, "answer too large", status end
    return sock, status, length, left_ms
end

-- One /apps poll (services without the feed): the healthy set and reasons, or nil, error.
-- The healthy list comes first: read until it ends, not the whole answer.
local function poll_apps(addr)
    local sock, status, length, left_ms = http_get(addr, conf.path, now_of() + conf.timeout)
    if not sock then return nil, status end
    if status ~= 200 then sock:close(); return nil, "status " .. tostring(status) end
    local body, size = "", 0
    while not length or size < length do
        sock:settimeout(left_ms())
        local want = length and min(16384, length - size) or 16384
        local chunk, rerr, partial = sock:receive(want)
        chunk = chunk or partial
        if chunk and #chunk > 0 then
            body = body .. chunk
            size = size + #chunk
            if feed.apps_head_complete(body) then break end
        end
        if not chunk or rerr then
            if rerr == "closed" and not length then break end
            sock:close()
            return nil, "body: " .. tostring(rerr)
        end
        if size > conf.max_body then sock:close(); return nil, "answer too large" end
    end
    sock:close()
    return feed.healthy_apps(body)
end

-- One feed answer from addr (see feed.parse), or nil, error, status.
local function fetch_feed(addr, index)
    local path = config.feed_path .. (index and ("?index=" .. format("%d", index) .. "&wait=" .. conf.wait) or "")
    local sock, status, length, left_ms = http_get(addr, path, now_of() + conf.wait + conf.grace)
    if not sock then return nil, status end
    if status ~= 200 then sock:close(); return nil, "status " .. tostring(status), status end
    local body, err
    sock:settimeout(left_ms())
    if length then body, err = sock:receive(length) else body, err = sock:receive("*a") end
    sock:close()
    if not body then return nil, "body: " .. tostring(err) end
    return feed.parse(body)
end

---------------------------------------------------------------------------------------------
-- Applying answers. ch: what one channel knows of its APPO (see new_channel_state).

local function new_channel_state(listed)
    return { mode = "feed", mode_at = 0, index = nil, listed = listed or {}, rising = {}, ejected = {},
             full_at = 0, failures = 0 }
end
M.new_channel_state = new_channel_state

local function take_ejections(dict, addr, ch)
    local queue = "ejq:" .. addr
    while true do
        local app = dict:rpop(queue)
        if not app then return end
        ch.ejected[app] = true
    end
end

local function keep_reason(dict, app, addr, why, refresh)
    local key = state.reason_key(app, addr)
    why = sub(why, 1, 60)
    if dict:get(key) ~= why then state.set(dict, key, why, conf.forget_after)
    elseif refresh then dict:expire(key, conf.forget_after) end
end

-- Apply one feed answer: everything when the index moved (or on the slow refresh), else only
-- the apps rising or ejected here.
function M.apply_feed(dict, addr, ch, answer, now)
    take_ejections(dict, addr, ch)
    local refresh = now - ch.full_at > conf.forget_after / 3
    if answer.index ~= ch.index or refresh then
        ch.index, ch.full_at = answer.index, refresh and now or ch.full_at
        local seen, rising = {}, {}
        local fixed = config.fixed_by_addr[addr] or {}
        for app, healthy, age, why in feed.lines(answer) do
            seen[app] = true
            local key = state.health_key(app, addr)
            local value = dict:get(key)
            if value or healthy or fixed[app] or dict:get("r:" .. app) then
                if state.observe(dict, app, addr, healthy, now, value, 1) then rising[app] = true end
                -- a steady state is not rewritten, only kept from expiring on the slow refresh
                if refresh and value then dict:expire(key, conf.forget_after) end
            end
            if not healthy then keep_reason(dict, app, addr, why, refresh) end
            if ch.ejected[app] and state.consider_clear(dict, app, addr, healthy, age, now) then
                ch.ejected[app] = nil
            end
        end
        -- Gone from the APPO's list (offlined, container removed): out there.
        for app in pairs(ch.listed) do
            if not seen[app] then
                local value = dict:get(state.health_key(app, addr))
                if value then
                    state.observe(dict, app, addr, false, now, value, 1)
                    state.set(dict, state.reason_key(app, addr), "not on this APPO", conf.forget_after)
                end
            end
        end
        ch.listed, ch.rising = seen, rising
    else
        for app in pairs(ch.rising) do
            local healthy = feed.line(answer, app)
            if not state.observe(dict, app, addr, healthy == true, now, dict:get(state.health_key(app, addr)), 1) then
                ch.rising[app] = nil
            end
        end
    end
    for app in pairs(ch.ejected) do
        local healthy, age = feed.line(answer, app)
        if state.consider_clear(dict, app, addr, healthy == true, age or 0, now) then ch.ejected[app] = nil end
    end
end

-- Services without the feed: one /apps poll with fall/rise, the way 2.1 did it.
function M.apply_apps(dict, addr, ch, healthy, reasons, now)
    local apps = {}
    for app in pairs(healthy or {}) do apps[app] = true end
    for app in pairs(config.fixed_by_addr[addr] or {}) do apps[app] = true end
    for app in pairs(ch.listed) do
        local health = state.decode_health(dict:get(state.health_key(app, addr)))
        if health and (apps[app] or dict:get("r:" .. app) or health.healthy) then apps[app] = true end
    end
    for app in pairs(apps) do
        state.observe(dict, app, addr, healthy ~= nil and healthy[app] == true, now,
                      dict:get(state.health_key(app, addr)), conf.fall)
    end
    for app, why in pairs(reasons or {}) do
        if dict:get(state.reason_key(app, addr)) ~= why then
            state.set(dict, state.reason_key(app, addr), why, conf.forget_after)
        end
    end
    ch.listed = apps
    take_ejections(dict, addr, ch)
    for app in pairs(ch.ejected) do
        -- No ages in /apps: its answer counts once the hold has passed and one poll began after it.
        if state.consider_clear(dict, app, addr, healthy ~= nil and healthy[app] == true, conf.timeout, now) then
            ch.ejected[app] = nil
        end
    end
end

---------------------------------------------------------------------------------------------
-- The channel loop.

local function feed_round(dict, addr, ch)
    local asked = ch.mode == "feed" and ch.index or nil
    local answer, err, status = fetch_feed(addr, asked)
    update_time()
    local now = now_of()
    if answer then
        if ch.mode ~= "feed" then ch.mode, ch.index = "feed", nil end
        ch.failures = 0
        state.answered(dict, addr, now, conf.wait + conf.grace)
        M.apply_feed(dict, addr, ch, answer, now)
        state.set(dict, "mode:" .. addr, "feed", conf.forget_after)
        -- Asked to wait but not held (the service's waiters are all busy): do not spin.
        if asked and not answer.held and answer.index == asked then sleep(conf.wait / 2) end
        return true
    end
    if status == 404 then
        -- An older service (2.1 and before): poll /apps, and look for the feed again later.
        if ch.mode == "feed" then
            state.log_limited("mode:" .. addr, WARN, "APPO ", addr, " has no ", config.feed_path, ": polling ",
                              conf.path, " every ", conf.interval, " s (upgrade its container-healthcheck for pushed changes)")
        end
        ch.mode, ch.mode_at = "apps", now
        return false
    end
    state.failed(dict, addr, err, now)
    ch.failures = ch.failures + 1
    sleep(min(0.1 * 2 ^ ch.failures, conf.interval))
    return true
end

local function apps_round(dict, addr, ch)
    local started = now_of()
    local healthy, reasons = poll_apps(addr)
    update_time()
    local now = now_of()
    if healthy then
        state.answered(dict, addr, now, conf.stale_after)
    else
        state.set(dict, "err:" .. addr, tostring(reasons), conf.forget_after)
        state.log_limited("poll:" .. addr, WARN, "poll of ", addr, " failed: ", tostring(reasons))
    end
    M.apply_apps(dict, addr, ch, healthy, type(reasons) == "table" and reasons or {}, now)
    state.set(dict, "mode:" .. addr, "apps", conf.forget_after)
    sleep(max(0.001, conf.interval - (now - started)))
end

local function channel_round(dict, addr, ch)
    update_time()
    if (ch.mode == "feed" or now_of() - ch.mode_at > 60) and feed_round(dict, addr, ch) then return end
    apps_round(dict, addr, ch)
end

local function owner_id()
    return format("%.3f/%d", config.generation, worker_pid())
end

local function wanted(dict, addr, configured)
    return configured[addr] or dict:get("p:" .. addr) ~= nil
end

local function channel(premature, addr, listed)
    if premature then return end
    local dict = state.dict()
    local me = owner_id()
    local _, configured = config.configured_appos()
    local ch = new_channel_state(listed)
    -- Ejections of this APPO that a previous owner had not cleared yet.
    local suffix = "|" .. addr
    for _, key in ipairs(dict:get_keys(0)) do
        if sub(key, 1, 2) == "e:" and sub(key, -#suffix) == suffix then
            ch.ejected[sub(key, 3, -#suffix - 1)] = true
        end
    end
    while not worker_exiting() and dict:get("own:" .. addr) == me and wanted(dict, addr, configured) do
        state.set(dict, "own:" .. addr, me, OWN_TTL)
        local ok, err = xpcall(channel_round, traceback, dict, addr, ch)
        if not ok then
            state.log_limited("crash:" .. addr, ERR, "channel to ", addr, " failed, retrying: ", err)
            sleep(conf.interval)
        end
    end
    if dict:get("own:" .. addr) == me then dict:delete("own:" .. addr) end
end

local function guarded_channel(premature, addr, listed)
    local ok, err = xpcall(channel, traceback, premature, addr, listed)
    if not ok then state.log_limited("crash:" .. addr, ERR, "channel to ", addr, " ended: ", err) end
end

---------------------------------------------------------------------------------------------
-- The supervisor.

-- What the dict knows, from one key scan: p:<addr> keys and, per addr, the apps with a state.
local function scan(dict)
    local addrs, states = {}, {}
    for _, key in ipairs(dict:get_keys(0)) do
        local first, second = byte(key, 1, 2)
        if second == 58 then  -- ":"
            if first == 115 then  -- "s:<app>|<addr>"
                local bar = find(key, "|", 3, true)
                if bar then
                    local addr = sub(key, bar + 1)
                    local apps = states[addr]
                    if not apps then apps = {}; states[addr] = apps end
                    apps[sub(key, 3, bar - 1)] = true
                end
            elseif first == 112 then  -- "p:<addr>"
                addrs[sub(key, 3)] = true
            end
        end
    end
    return addrs, states
end

-- Every interval, one worker of this configuration looks for APPOs without a channel (new,
-- or owned by the workers of a configuration that was reloaded away) and starts one.
local function supervise(premature)
    if premature or worker_exiting() then return end
    local dict = state.dict()
    if not dict:add("lock:scan:" .. config.generation, true, conf.interval * 0.9) then return end
    update_time()
    local started_wall, started_cpu = now_of(), os.clock()
    local learned, states = scan(dict)
    local addrs, seen = config.configured_appos()
    for addr in pairs(learned) do
        if not seen[addr] then seen[addr] = true; addrs[#addrs + 1] = addr end
    end
    local me = owner_id()
    for _, addr in ipairs(addrs) do
        local owner = dict:get("own:" .. addr)
        local take = owner == nil and dict:add("own:" .. addr, me, OWN_TTL)
        if owner ~= nil and owner ~= me and (tonumber(match(owner, "^([%d.]+)/")) or 0) < config.generation then
            take = state.set(dict, "own:" .. addr, me, OWN_TTL)  -- a reload: this configuration takes over
        end
        if take then
            local ok, err = timer_at(0, guarded_channel, addr, states[addr])
            if not ok then
                dict:delete("own:" .. addr)
                state.log_limited("timer", ERR, "cannot start the channel to ", addr, ": ", err,
                                  " (raise lua_max_pending_timers / lua_max_running_timers)")
            end
        end
    end
    update_time()
    state.set(dict, "stat:round", format('{"appos":%d,"wall_ms":%.1f,"cpu_ms":%.1f,"at":%.3f}',
        #addrs, (now_of() - started_wall) * 1000, (os.clock() - started_cpu) * 1000, now_of()))
end

local function guarded_supervise(premature)
    local ok, err = xpcall(supervise, traceback, premature)
    if not ok then state.log_limited("supervise", ERR, "looking for APPOs failed: ", err) end
end

-- init_worker_by_lua: the supervisor, now and every interval.
function M.start()
    local ok, err = timer_every(conf.interval, guarded_supervise)
    if not ok then state.log(ERR, "cannot start the channels' supervisor: ", err) end
    ok, err = timer_at(0, guarded_supervise)
    if not ok then state.log(ERR, "cannot start the channels' supervisor: ", err) end
end

return M
