-- container_healthcheck.poller: one channel per APPO, a timer loop owned by one worker through
-- a shared-dict lock, that long-polls the service's feed (or polls /apps on services without
-- it) and writes what it learns through container_healthcheck.state. A late heartbeat is
-- checked before the APPO is taken out: when the APPO Nginx itself still answers, its service
-- is hung, slow or restarting while the apps behind that Nginx serve users, so its verdicts
-- stand (shown stale) for keep_stale seconds. A supervisor timer keeps the registries and
-- starts the channels. Every round and every timer body runs under xpcall; nothing scans keys.
local config = require "container_healthcheck.config"
local discovery = require "container_healthcheck.discovery"
local feed = require "container_healthcheck.feed"
local records = require "container_healthcheck.records"
local state = require "container_healthcheck.state"

local ngx = ngx
local now_of, update_time, sleep, tcp = ngx.now, ngx.update_time, ngx.sleep, ngx.socket.tcp
local timer_at, timer_every = ngx.timer.at, ngx.timer.every
local worker_exiting, worker_pid = ngx.worker.exiting, ngx.worker.pid
local WARN, ERR = ngx.WARN, ngx.ERR
local sub, format, match = string.sub, string.format, string.match
local floor, min, max = math.floor, math.min, math.max
local xpcall, traceback, tostring, tonumber, type, pairs, ipairs = xpcall, debug.traceback, tostring, tonumber,
    type, pairs, ipairs
local decode_set, encode_set = records.decode_set, records.encode_set

local conf = config.conf
local M = {}

-- Heartbeat lateness (seconds past `wait`) histogram buckets, for /container-healthcheck-metrics.
M.LATENESS_BUCKETS = { 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1 }
local FLUSH_EVERY = 5  -- seconds between a channel's histogram flushes to the dict

---------------------------------------------------------------------------------------------
-- Talking to one APPO: one HTTP/1.0 GET with one total deadline.

-- The socket after the headers, the status, the Content-Length (or nil) and a function
-- giving the milliseconds left; or nil, error, status (when one came), and whether the APPO
-- Nginx answered at all (a status line) or the connection was refused / never made.
local function http_get(addr, path, deadline)
    local host, port = discovery.split_addr(addr)
    local sock = tcp()
    local function left_ms()
        update_time()
        return max(1, floor((deadline - now_of()) * 1000))
    end
    sock:settimeout(left_ms())
    local ok, err = sock:connect(host, port)
    if not ok then return nil, "connect: " .. tostring(err), nil, false end
    sock:settimeout(left_ms())
    ok, err = sock:send("GET " .. path .. " HTTP/1.0\r\nHost: " .. (conf.host_header or addr) ..
                        "\r\nUser-Agent: container-healthcheck-lua\r\nConnection: close\r\n\r\n")
    if not ok then sock:close(); return nil, "send: " .. tostring(err), nil, nil end
    sock:settimeout(left_ms())
    local line
    line, err = sock:receive("*l")
    if not line then sock:close(); return nil, "status: " .. tostring(err), nil, nil end
    local status = tonumber(match(line, "^HTTP/%d%.%d (%d%d%d)"))
    if not status then sock:close(); return nil, "not an HTTP answer", nil, nil end
    local length
    while true do
        sock:settimeout(left_ms())
        line, err = sock:receive("*l")
        if not line then sock:close(); return nil, "headers: " .. tostring(err), status, true end
        if line == "" then break end
        local value = match(line, "^[Cc]ontent%-[Ll]ength:%s*(%d+)")
        if value then length = tonumber(value) end
    end
    if length and length > conf.max_body then sock:close(); return nil, "answer too large", status, true end
    return sock, status, length, left_ms
end

-- Does the APPO Nginx itself answer (alive_path, answered by that Nginx alone)? Any status
-- line counts: an Nginx that answers is serving its apps' users.
local function nginx_alive(addr)
    -- http_get: the socket when the whole head came; else nil, error, the status if one came
    local sock, _, status = http_get(addr, conf.alive_path, now_of() + config.alive_timeout)
    if sock then sock:close(); return true end
    return status ~= nil
end
M.nginx_alive = nginx_alive

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

-- One feed answer from addr (see feed.parse); or nil, error, the status, and whether the APPO
-- Nginx answered (see http_get). A heartbeat is waited for until `wait` + half the grace;
-- the other half is for asking the Nginx whether it lives.
local function fetch_feed(addr, index)
    local path = config.feed_path .. (index and ("?index=" .. format("%d", index) .. "&wait=" .. conf.wait) or "")
    local sock, status, length, left_ms = http_get(addr, path, now_of() + conf.wait + config.heartbeat_slack)
    if not sock then
        local err, got_status, answered = status, length, left_ms  -- http_get's failure: err, status, answered
        return nil, err, got_status, answered
    end
    if status ~= 200 then sock:close(); return nil, "status " .. tostring(status), status, true end
    local body, err
    sock:settimeout(left_ms())
    if length then body, err = sock:receive(length) else body, err = sock:receive("*a") end
    sock:close()
    if not body then return nil, "body: " .. tostring(err), status, true end
    local answer, perr = feed.parse(body)
    if not answer then return nil, perr, status, true end
    return answer
end

---------------------------------------------------------------------------------------------
-- Applying answers. ch: what one channel knows of its APPO (see new_channel_state).

-- apps: the apps with a health record on this APPO (its registry "apps:<addr>"); ejected:
-- the apps ejected there (registry "ejected:<addr>"); listed: on the APPO's last list;
-- lines: app -> "<0|1><reason>" as last applied (a line that did not change is not applied
-- again); rising: unhealthy apps with answers saying healthy.
local function new_channel_state(apps, ejected)
    local listed = {}
    for app in pairs(apps or {}) do listed[app] = true end
    return { mode = "feed", mode_at = 0, index = nil, apps = apps or {}, ejected = ejected or {}, listed = listed,
             lines = {}, rising = {}, full_at = 0, failures = 0, dirty = true, saved_at = 0, hist = {},
             flushed_at = 0 }
end
M.new_channel_state = new_channel_state

-- The channel's registries, written when they changed, and now and then so that they do not
-- expire (the status page and metrics read them).
local function save_registries(dict, addr, ch, now)
    if not ch.dirty and now - ch.saved_at < conf.forget_after / 3 then return end
    local ok = state.set(dict, "apps:" .. addr, encode_set(ch.apps), conf.forget_after)
    ok = state.set(dict, "ejected:" .. addr, encode_set(ch.ejected), conf.forget_after) and ok
    ch.dirty, ch.saved_at = not ok, now
end

local function take_ejections(dict, addr, ch)
    local queue = "ejq:" .. addr
    while true do
        local app = dict:rpop(queue)
        if not app then return end
        if not ch.ejected[app] then ch.ejected[app], ch.dirty = true, true end
    end
end

local function keep_reason(dict, app, addr, why, refresh)
    local key = state.reason_key(app, addr)
    why = sub(why, 1, 60)
    if dict:get(key) ~= why then state.set(dict, key, why, conf.forget_after)
    elseif refresh then dict:expire(key, conf.forget_after) end
end

local function observe(dict, app, addr, ch, passed, now, value, fall)
    if not ch.apps[app] then ch.apps[app], ch.dirty = true, true end
    return state.observe(dict, app, addr, passed, now, value, fall)
end

-- Apply one feed answer: when the index moved, the lines that changed (all of them on the slow
-- refresh); on every answer, the apps rising or ejected here.
function M.apply_feed(dict, addr, ch, answer, now)
    take_ejections(dict, addr, ch)
    local refresh = now - ch.full_at > conf.forget_after / 3
    local done = {}  -- apps observed from this answer already (one answer is one observation)
    if answer.index ~= ch.index or refresh then
        ch.index = answer.index
        if refresh then ch.full_at = now end
        local seen, lines = {}, {}
        local fixed = config.fixed_by_addr[addr] or {}
        for app, healthy, _, why in feed.lines(answer) do
            seen[app] = true
            local line = (healthy and "1" or "0") .. why
            lines[app] = line
            if refresh or ch.lines[app] ~= line then
                local key = state.health_key(app, addr)
                local value = dict:get(key)
                if value or healthy or fixed[app] or dict:get("r:" .. app) then
                    done[app] = true
                    if observe(dict, app, addr, ch, healthy, now, value, 1) then ch.rising[app] = true
                    else ch.rising[app] = nil end
                    -- a steady state is not rewritten, only kept from expiring on the slow refresh
                    if refresh and value then dict:expire(key, conf.forget_after) end
                end
                if not healthy then keep_reason(dict, app, addr, why, refresh) end
            end
        end
        -- Gone from the APPO's list (offlined, container removed): out there.
        for app in pairs(ch.listed) do
            if not seen[app] then
                ch.rising[app] = nil
                local value = dict:get(state.health_key(app, addr))
                if value then
                    observe(dict, app, addr, ch, false, now, value, 1)
                    state.set(dict, state.reason_key(app, addr), "not on this APPO", conf.forget_after)
                end
            end
        end
        if refresh then
            -- records that expired (nobody asked for the app) leave the registry
            for app in pairs(ch.apps) do
                if not dict:get(state.health_key(app, addr)) then ch.apps[app], ch.dirty = nil, true end
            end
        end
        ch.listed, ch.lines = seen, lines
    end
    for app in pairs(ch.rising) do
        if not done[app] then
            local healthy = feed.line(answer, app)
            if not observe(dict, app, addr, ch, healthy == true, now, dict:get(state.health_key(app, addr)), 1) then
                ch.rising[app] = nil
            end
        end
    end
    for app in pairs(ch.ejected) do
        local healthy, age = feed.line(answer, app)
        if state.consider_clear(dict, app, addr, healthy == true, age or 0, now) then
            ch.ejected[app], ch.dirty = nil, true
        end
    end
    save_registries(dict, addr, ch, now)
end

-- Services without the feed: one /apps poll with fall/rise, the way 2.1 did it.
function M.apply_apps(dict, addr, ch, healthy, reasons, now)
    local apps = {}
    for app in pairs(healthy or {}) do apps[app] = true end
    for app in pairs(config.fixed_by_addr[addr] or {}) do apps[app] = true end
    for app in pairs(ch.listed) do
        local health = records.decode_health(dict:get(state.health_key(app, addr)))
        if health and (apps[app] or dict:get("r:" .. app) or health.healthy) then apps[app] = true end
    end
    for app in pairs(apps) do
        observe(dict, app, addr, ch, healthy ~= nil and healthy[app] == true, now,
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
            ch.ejected[app], ch.dirty = nil, true
        end
    end
    save_registries(dict, addr, ch, now)
end

---------------------------------------------------------------------------------------------
-- Heartbeat lateness: counted in the channel, added to the dict's histogram now and then.

local function observe_lateness(ch, seconds)
    local hist = ch.hist
    local bucket = #M.LATENESS_BUCKETS + 1
    for i, bound in ipairs(M.LATENESS_BUCKETS) do
        if seconds <= bound then bucket = i; break end
    end
    hist[bucket] = (hist[bucket] or 0) + 1
    hist.sum = (hist.sum or 0) + seconds
end

local function flush_lateness(dict, addr, ch, now)
    if now - ch.flushed_at < FLUSH_EVERY then return end
    ch.flushed_at = now
    for key, n in pairs(ch.hist) do
        local name = "h:" .. addr .. "|" .. key
        local _, err = dict:incr(name, n, 0)
        if err then state.log_limited("dict-full", ERR, "lua_shared_dict ", conf.dict, ": ", err) end
        dict:expire(name, conf.forget_after)  -- gone with its APPO, not while it answers
    end
    ch.hist = {}
end

---------------------------------------------------------------------------------------------
-- The channel loop.

-- Still this channel's APPO? A reload's workers take channels over while a round waits on
-- its answer; the old owner then applies nothing (and pops no ejection the new one needs).
local function owns(dict, addr, ch)
    return dict:get("own:" .. addr) == ch.owner
end

local function feed_round(dict, addr, ch)
    local asked = ch.mode == "feed" and ch.index or nil
    update_time()
    local started = now_of()
    local answer, err, status, answered = fetch_feed(addr, asked)
    update_time()
    local now = now_of()
    if answer then
        if not owns(dict, addr, ch) then return true end  -- taken over meanwhile: the new owner applies
        if ch.mode ~= "feed" then ch.mode, ch.index, ch.lines = "feed", nil, {} end
        ch.failures = 0
        if asked and answer.held and answer.index == asked then
            observe_lateness(ch, max(0, now - started - conf.wait))  -- a heartbeat
        end
        state.answered(dict, addr, now, conf.wait + conf.grace, ch.apps)
        M.apply_feed(dict, addr, ch, answer, now)
        state.set(dict, "mode:" .. addr, "feed", conf.forget_after)
        flush_lateness(dict, addr, ch, now)
        -- Asked to wait but not held (the service's waiters are all busy): do not spin.
        if asked and not answer.held and answer.index == asked then sleep(conf.wait / 2) end
        return true
    end
    if status == 404 then
        -- An older service (2.1 and before): poll /apps, and look for the feed again later.
        if ch.mode == "feed" then
            state.log_limited("mode:" .. addr, WARN, "APPO ", addr, " has no ", config.feed_path, ": polling ",
                              conf.path, " every ", conf.interval,
                              " s (upgrade its container-healthcheck for pushed changes)")
        end
        ch.mode, ch.mode_at = "apps", now
        return false
    end
    -- No answer from the service. Refused: the APPO is down. Otherwise ask its Nginx.
    if answered or (answered == nil and nginx_alive(addr)) then
        update_time()
        state.kept(dict, addr, err, now_of(), ch.apps, started)
    else
        state.failed(dict, addr, err, ch.apps)
    end
    ch.index = nil  -- the next answer is taken whole (a restarted service starts a new index)
    ch.failures = ch.failures + 1
    -- back off, but look again when its kept verdicts run out: it is taken out then, not later
    local back_off = min(0.1 * 2 ^ ch.failures, conf.interval)
    local fresh = dict:get("fresh:" .. addr)
    if fresh then
        update_time()
        back_off = min(back_off, max(0.001, fresh - now_of() + 0.001))
    end
    sleep(back_off)
    return true
end

local function apps_round(dict, addr, ch)
    local started = now_of()
    local healthy, reasons = poll_apps(addr)
    update_time()
    local now = now_of()
    if not owns(dict, addr, ch) then return end
    if healthy then
        state.answered(dict, addr, now, conf.stale_after, ch.apps)
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

local function channel(premature, addr)
    if premature then return end
    local dict = state.dict()
    local me = owner_id()
    local _, configured = config.configured_appos()
    -- What a previous owner knew: the apps with a record here, and the ejections to clear.
    local ch = new_channel_state(decode_set(dict:get("apps:" .. addr)), decode_set(dict:get("ejected:" .. addr)))
    ch.owner = me
    while not worker_exiting() and dict:get("own:" .. addr) == me and wanted(dict, addr, configured) do
        state.set(dict, "own:" .. addr, me, config.own_ttl)
        local ok, err = xpcall(channel_round, traceback, dict, addr, ch)
        if not ok then
            state.lua_error("channel", err)
            sleep(conf.interval)
        end
    end
    -- The ejections this channel was watching go back to the queue for the next owner (which
    -- may have read the registry before this channel's last save).
    for app in pairs(ch.ejected) do state.push(dict, "ejq:" .. addr, app) end
    if dict:get("own:" .. addr) == me then dict:delete("own:" .. addr) end
end

local function guarded_channel(premature, addr)
    local ok, err = xpcall(channel, traceback, premature, addr)
    if not ok then state.lua_error("channel", err) end
end

---------------------------------------------------------------------------------------------
-- The supervisor: registries (one writer: whoever holds this round's lock) and channels.

-- Fold the names announced on `list` into the registry `key`, and drop those no longer
-- alive(name) (on_drop(name) is told). Returns the registry as a set.
local function keep_registry(dict, key, list, alive, on_drop)
    local set = decode_set(dict:get(key))
    local before = encode_set(set)
    while true do
        local name = dict:lpop(list)
        if not name then break end
        set[name] = true
    end
    for name in pairs(set) do
        if not alive(name) then
            set[name] = nil
            if on_drop then on_drop(name) end
        end
    end
    local text = encode_set(set)
    if text ~= before then state.set(dict, key, text, 0) end
    return set
end

-- The registries, as sets: APPOs in play (configured or learned), apps in use.
function M.registries(dict)
    local _, configured = config.configured_appos()
    local appos = keep_registry(dict, "reg:appos", "new:appos", function(addr)
        return configured[addr] or dict:get("p:" .. addr) ~= nil
    end, function(addr)
        for i = 1, #M.LATENESS_BUCKETS + 1 do dict:delete("h:" .. addr .. "|" .. i) end
        dict:delete("h:" .. addr .. "|sum")
    end)
    for addr in pairs(configured) do appos[addr] = true end
    local apps = keep_registry(dict, "reg:apps", "new:apps", function(app)
        return dict:get("r:" .. app) ~= nil
    end)
    return appos, apps
end

-- New counters join the registry every round; those of apps and APPOs nobody asks about any
-- more are dropped with them, now and then (prune: it reads every APPO's registry).
local function keep_counters(dict, appos, apps, prune)
    local known
    if prune then
        known = {}
        for app in pairs(apps) do known[app] = true end
        for addr in pairs(appos) do
            for app in pairs(decode_set(dict:get("apps:" .. addr))) do known[app] = true end
        end
    end
    keep_registry(dict, "reg:counters", "new:counters", function(key)
        if not prune then return true end
        local app = match(key, 'app="([^"]*)"')
        local addr = match(key, 'appo="([^"]*)"')
        local alive = (not app or app == "-" or known[app]) and (not addr or addr == "-" or appos[addr])
        if not alive then dict:delete(key) end
        return alive and dict:get(key) ~= nil
    end)
end

-- Every interval, one worker of this configuration keeps the registries and looks for APPOs
-- without a channel (new, or owned by the workers of a configuration that was reloaded away)
-- and starts one.
local function supervise(premature)
    if premature or worker_exiting() then return end
    local dict = state.dict()
    if not dict:add("lock:scan:" .. config.generation, true, conf.interval * 0.9) then return end
    update_time()
    local started_wall, started_cpu = now_of(), os.clock()
    local appos, apps = M.registries(dict)
    keep_counters(dict, appos, apps, dict:add("lock:counters", true, max(conf.interval, conf.forget_after / 10)))
    local me = owner_id()
    local count = 0
    for addr in pairs(appos) do
        count = count + 1
        local owner = dict:get("own:" .. addr)
        local take = owner == nil and dict:add("own:" .. addr, me, config.own_ttl)
        if owner ~= nil and owner ~= me and (tonumber(match(owner, "^([%d.]+)/")) or 0) < config.generation then
            take = state.set(dict, "own:" .. addr, me, config.own_ttl)  -- a reload: this configuration takes over
        end
        if take then
            local ok, err = timer_at(0, guarded_channel, addr)
            if not ok then
                dict:delete("own:" .. addr)
                state.log_limited("timer", ERR, "cannot start the channel to ", addr, ": ", err,
                                  " (raise lua_max_pending_timers / lua_max_running_timers)")
            end
        end
    end
    update_time()
    state.set(dict, "stat:round", format('{"appos":%d,"wall_ms":%.1f,"cpu_ms":%.1f,"at":%.3f}',
        count, (now_of() - started_wall) * 1000, (os.clock() - started_cpu) * 1000, now_of()))
end

local function guarded_supervise(premature)
    local ok, err = xpcall(supervise, traceback, premature)
    if not ok then state.lua_error("supervise", err) end
end

-- init_worker_by_lua: the supervisor, now and every interval.
function M.start()
    local ok, err = timer_every(conf.interval, guarded_supervise)
    if not ok then state.log(ERR, "cannot start the channels' supervisor: ", err) end
    ok, err = timer_at(0, guarded_supervise)
    if not ok then state.log(ERR, "cannot start the channels' supervisor: ", err) end
end

return M
