-- container_healthcheck.lua: entry-Nginx balancer for BlueKing /o/<app>/ and /t/<app>/ that
-- routes only to APPOs whose container-healthcheck says the app is healthy, and takes an APPO
-- out for an app on the first user request that failed there.
--
-- * Which hosts serve an app: the servers of its own upstream (`<app>` for /o/, `t.<app>` for
--   /t/, as BlueKing 6.x renders them from consul) through ngx.upstream where OpenResty has it,
--   or one shared upstream (BlueKing 5.x: PAAS_AGENT_PROD), or the `apps`/`appos` lists. A server
--   marked `down` is never used; `backup` servers only when no primary is healthy; a name that
--   resolved to several addresses gives one peer per address.
-- * Only APPOs are asked: the configured ones and the servers of app upstreams that requests
--   asked for (learned on the request path from nginx's own tables, no socket).
-- * Pushed, not polled: one channel per APPO (a timer loop owned by one worker through a
--   shared-dict lock) long-polls the service's feed, GET /container-healthcheck/apps/feed
--   ?index=N&wait=1 (Consul-style blocking queries): a verdict change arrives at once, and a
--   heartbeat at least every `wait` seconds, so an APPO whose heartbeat is `grace` late (hung,
--   unreachable) is out. A service without the feed (2.1 and older) is polled at /apps every
--   `interval` with fall/rise, as before.
-- * Passive health: a user request whose attempt at an APPO failed the way proxy_next_upstream
--   counts failure (refused, reset, timed out, 502, 504), retried or not, POST included, takes
--   that APPO out for that app at once for every worker, until a health answer based on a probe
--   newer than the failure says the app is healthy there (and at least eject_hold seconds,
--   doubling for a peer that keeps failing). nginx's own max_fails does this for plain
--   upstreams; balancer_by_lua replaces that accounting, so it is done here.
-- * balance() (balancer_by_lua) picks round-robin among the usable peers, retries the next
--   one, and FAILS OPEN to all the app's peers when none is usable, so a health-service outage
--   never becomes a site outage.
-- * Nothing on the request path opens a socket; every timer body runs under xpcall; log lines
--   are at most one per app or APPO per interval; shared-dict entries expire when unused.
-- Needs lua-nginx-module and lua-resty-core (ngx.balancer).
local balancer = require "ngx.balancer"

local ngx = ngx
local shared, now_of, update_time, log_of = ngx.shared, ngx.now, ngx.update_time, ngx.log
local WARN, ERR = ngx.WARN, ngx.ERR
local byte, find, sub, format = string.byte, string.find, string.sub, string.format
local floor, min, max = math.floor, math.min, math.max

local M = { _VERSION = "2.2.0" }

-- Every option, with its default (nil: off) and its type: init() refuses anything else.
local conf = {
    dict = "container_healthcheck",
    appos = {},             -- { "10.0.0.2:8010", ... }: APPOs of every app without an upstream of its own
    apps = {},              -- { app = { "host:port", ... } }: fixed APPOs per app (overrides the rest)
    use_upstream_module = true, -- ngx.upstream: the app's own upstream (`<app>`, `t.<app>`)
    shared_upstream = nil,  -- BlueKing 5.x: the one upstream whose servers are every APPO
    test_prefix = "t.",     -- /t/<app> goes to upstream test_prefix .. app
    path = "/container-healthcheck/apps",  -- the service's /apps (the feed is path .. "/feed")
    host_header = nil,      -- Host sent to APPOs (default: the APPO address)
    wait = 1,               -- seconds the service may hold a feed request: its heartbeat period
    grace = 0.5,            -- an APPO whose answer is this much later than `wait` is out
    interval = 2,           -- seconds between looks for new APPOs, and between /apps polls
    timeout = 1,            -- seconds for one whole /apps poll (services without the feed)
    fall = 2,               -- /apps polls: consecutive failures before an app is out there
    rise = 2,               -- consecutive answers saying healthy before an app is back in
    stale_after = nil,      -- /apps polls: seconds without an answer before an APPO is out
    forget_after = 300,     -- seconds an app or APPO nobody asks about is remembered
    eject_statuses = { 502, 504 },  -- user requests' statuses that take the APPO out for the app
    eject_hold = 1,         -- seconds the first ejection of a peer lasts at least
    eject_hold_max = 30,    -- the longest hold, for a peer that keeps failing
    eject_memory = 60,      -- seconds without an ejection after which a peer starts over
    max_body = 8 * 1024 * 1024,
}
local TYPES = {
    dict = "string", appos = "table", apps = "table", use_upstream_module = "boolean",
    shared_upstream = "string", test_prefix = "string", path = "string", host_header = "string",
    wait = "number", grace = "number", interval = "number", timeout = "number", fall = "number",
    rise = "number", stale_after = "number", forget_after = "number", eject_statuses = "table",
    eject_hold = "number", eject_hold_max = "number", eject_memory = "number", max_body = "number",
}

local ok_upstream, upstream = pcall(require, "ngx.upstream")
if not ok_upstream then upstream = nil end

local function log(level, ...)
    log_of(level, "[container-healthcheck] ", ...)
end

-- At most one line per key per interval, across workers (the dict remembers who said it).
local function log_limited(key, level, ...)
    local dict = shared[conf.dict]
    if dict:add("log:" .. key, true, conf.interval) then log(level, ...) end
end

local dict_full_said = false

-- Every write is checked: a full zone evicts entries (health, locks) silently.
local function dict_set(dict, key, value, exptime)
    local ok, err, forcible = dict:set(key, value, exptime or 0)
    if (not ok or forcible) and not dict_full_said then
        dict_full_said = true
        log(ERR, "lua_shared_dict ", conf.dict, " is full (", tostring(err or "evicting"),
            "): give it about 200 bytes per app per APPO plus 100 per APPO, e.g. 10m for 500 apps x 50 APPOs")
    end
    return ok
end

-- Something a choice depends on changed: every worker's cached choices are read again.
local function changed(dict)
    dict:incr("ver", 1, 0)
end

-- addr -> { app = true }: the fixed `apps` lists turned around once, not every round.
local fixed_by_addr = {}
local eject_set = {}
local generation = 0  -- this configuration's load time: a reload's workers take the channels over

function M.init(options)
    for k, v in pairs(options or {}) do
        if not TYPES[k] then
            error("container_healthcheck.init: unknown option `" .. tostring(k) .. "`", 2)
        end
        if type(v) ~= TYPES[k] then
            error("container_healthcheck.init: option `" .. k .. "` must be a " .. TYPES[k] .. ", not "
                  .. type(v), 2)
        end
        if TYPES[k] == "number" and not (v > 0) then
            error("container_healthcheck.init: option `" .. k .. "` must be > 0", 2)
        end
        conf[k] = v
    end
    fixed_by_addr = {}
    for app, list in pairs(conf.apps) do
        for _, addr in ipairs(list) do
            fixed_by_addr[addr] = fixed_by_addr[addr] or {}
            fixed_by_addr[addr][app] = true
        end
    end
    eject_set = {}
    for _, status in ipairs(conf.eject_statuses) do eject_set[status] = true end
    conf.stale_after = conf.stale_after or conf.interval * (conf.fall + 1) + conf.timeout
    conf.feed_path = conf.path .. "/feed"
    if not shared[conf.dict] then
        error("lua_shared_dict " .. conf.dict .. " is not declared", 2)
    end
    update_time()
    generation = now_of()
end

local function split_addr(addr)
    local host, port = addr:match("^%[?([^%]]+)%]?:(%d+)$")
    if not host then return addr, 80 end
    return host, tonumber(port)
end

-- Peers of an upstream as nginx has them: { {addr=, backup=} ... }, `down` servers left out,
-- each address of a multi-address name a peer of its own. nil when there is no such upstream.
local function upstream_peers(name)
    if not (upstream and upstream.get_servers) then return nil end
    local servers = upstream.get_servers(name)
    if not servers then return nil end
    local peers = {}
    for _, s in ipairs(servers) do
        if not s.down then
            local addrs = type(s.addr) == "table" and s.addr or { s.addr }
            for _, addr in ipairs(addrs) do
                if type(addr) == "string" then peers[#peers + 1] = { addr = addr, backup = s.backup and true or false } end
            end
        end
    end
    return peers
end

local function list_peers(list)
    local peers = {}
    for _, addr in ipairs(list) do peers[#peers + 1] = { addr = addr, backup = false } end
    return peers
end

-- Per worker, refreshed every interval: get_servers() walks every upstream, which would make
-- the request cost grow with the number of apps.
local peers_cache = {}
local peers_cache_size = 0

-- The peers for a request and where they came from: "fixed" (apps), "own" (the app's own
-- upstream), "one" (shared_upstream: one upstream for every APPO) or "appos".
local function peers_for(app, kind)
    local key = kind .. "|" .. app
    local now = now_of()
    local cached = peers_cache[key]
    if cached and now - cached.at < conf.interval then return cached.peers, cached.source end
    local peers, source
    if conf.apps[app] then
        peers, source = list_peers(conf.apps[app]), "fixed"
    elseif conf.use_upstream_module then
        peers, source = upstream_peers(kind == "t" and (conf.test_prefix .. app) or app), "own"
        if not peers and conf.shared_upstream then
            peers, source = upstream_peers(conf.shared_upstream), "one"
        end
    end
    if not peers then
        peers, source = list_peers(conf.appos), "appos"
    end
    if peers_cache_size > 10000 then peers_cache, peers_cache_size = {}, 0 end
    if not cached then peers_cache_size = peers_cache_size + 1 end
    peers_cache[key] = { peers = peers, source = source, at = now }
    return peers, source
end

-- The request path tells the channels what to ask: the APPOs of an app upstream someone uses
-- (p:<addr>), and that the app is in use (r:<app>). Names a client can invent (anything that
-- fell back to the shared upstream or appos) never become keys: only nginx's own upstreams
-- and the configured lists do.
local learned_at = {}
local function learn(app, peers, source)
    if source ~= "own" and source ~= "one" and source ~= "fixed" then return end
    local marker = source == "one" and "\0one" or app
    local now = now_of()
    local last = learned_at[marker]
    if last and now - last < conf.interval then return end
    learned_at[marker] = now
    local dict = shared[conf.dict]
    if source ~= "one" then dict_set(dict, "r:" .. app, now, conf.forget_after) end
    if source ~= "fixed" then
        for _, peer in ipairs(peers) do
            dict_set(dict, "p:" .. peer.addr, now, conf.forget_after)
        end
    end
end

---------------------------------------------------------------------------------------------
-- Ejections: "e:<app>|<addr>" = "at|hold_until|count|cleared|cause" (cleared 0 while out).

local function parse_ejection(value)
    local at, hold_until, count, cleared, cause = value:match("^([%d.]+)|([%d.]+)|(%d+)|([01])|(.*)$")
    if not at then return nil end
    return tonumber(at), tonumber(hold_until), tonumber(count), cleared == "1", cause
end

local function ejected(dict, app, addr)
    local value = dict:get("e:" .. app .. "|" .. addr)
    if not value then return false end
    local _, _, _, cleared = parse_ejection(value)
    return cleared == false
end

-- Take addr out for app now, for every worker. Idempotent while it is out.
local function eject(dict, app, addr, cause)
    local key = "e:" .. app .. "|" .. addr
    local now = now_of()
    local count = 1
    local value = dict:get(key)
    if value then
        local at, _, previous, cleared = parse_ejection(value)
        if cleared == false then return end
        if at and now - at < conf.eject_memory then count = previous + 1 end
    end
    local hold = min(conf.eject_hold * 2 ^ (count - 1), conf.eject_hold_max)
    cause = cause:gsub("[|%c]", " "):sub(1, 80)
    dict_set(dict, key, format("%.3f|%.3f|%d|0|%s", now, now + hold, count, cause), conf.forget_after)
    -- The channel of addr learns which apps to clear from this queue (one reader: its owner).
    dict:lpush("ejq:" .. addr, app)
    dict:expire("ejq:" .. addr, conf.forget_after)
    dict:incr("stat:ejections", 1, 0)
    changed(dict)
    log_limited("eject:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is OUT after a failed request (",
                cause, "): for at least ", hold, " s, until a health answer newer than the failure says healthy")
end

---------------------------------------------------------------------------------------------
-- Health states: "s:<app>|<addr>" = "healthy|streak|since"; "fresh:<addr>": until when the
-- APPO's last answer counts; "ok:<addr>": when it last answered; "err:<addr>": why not.

-- One observation of app on addr with rise and fall. Returns whether it is now rising.
local function observe(dict, app, addr, passed, now, value, fall)
    local key = "s:" .. app .. "|" .. addr
    local healthy, streak, since
    if value then
        local h, s, t = value:match("^(%d)|(%-?%d+)|([%d.]+)$")
        healthy, streak, since = h == "1", tonumber(s), tonumber(t)
    end
    if healthy == nil then
        healthy, streak, since = passed, 0, now  -- first sight: believe it at once
        changed(dict)
    elseif passed == healthy then
        if streak == 0 then return false end
        streak = 0
    else
        streak = streak + 1
        if streak >= (healthy and fall or conf.rise) then
            healthy, streak, since = passed, 0, now
            changed(dict)
            log_limited("change:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is now ",
                        healthy and "healthy" or "UNHEALTHY")
        end
    end
    if healthy then dict:delete("w:" .. app .. "|" .. addr) end
    dict_set(dict, key, (healthy and "1" or "0") .. "|" .. streak .. "|" .. since, conf.forget_after)
    return not healthy and streak > 0
end

local function answered(dict, addr, now, fresh_for)
    local before = dict:get("fresh:" .. addr)
    dict_set(dict, "ok:" .. addr, now, conf.forget_after)
    dict_set(dict, "fresh:" .. addr, now + fresh_for, conf.forget_after)
    dict:delete("err:" .. addr)
    if not before or before < now then changed(dict) end
end

local function failed(dict, addr, err, now)
    dict_set(dict, "err:" .. addr, tostring(err), conf.forget_after)
    local fresh = dict:get("fresh:" .. addr)
    if fresh and fresh > now then
        dict:delete("fresh:" .. addr)  -- out now, not when its last answer ages
        changed(dict)
    end
    log_limited("poll:" .. addr, WARN, "APPO ", addr, " is OUT: its health service did not answer (", tostring(err), ")")
end

---------------------------------------------------------------------------------------------
-- Talking to one APPO's service: one HTTP/1.0 GET with one total deadline.

local function http_get(addr, path, deadline)
    local host, port = split_addr(addr)
    local sock = ngx.socket.tcp()
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
    local status = tonumber(line:match("^HTTP/%d%.%d (%d%d%d)"))
    local length
    while true do
        sock:settimeout(left_ms())
        line, err = sock:receive("*l")
        if not line then sock:close(); return nil, "headers: " .. tostring(err) end
        if line == "" then break end
        local value = line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
        if value then length = tonumber(value) end
    end
    if length and length > conf.max_body then sock:close(); return nil, "answer too large", status end
    return sock, status, length, left_ms
end

-- The healthy list of an /apps answer (services without the feed) and the short reasons of the
-- others, found without decoding the whole answer. Returns healthy set, reasons (or nil).
local function healthy_apps(body)
    if not body:find('^{"code":0,') then return nil, "unexpected /apps answer" end
    local list = body:match('"healthy":%[(.-)%]')
    if not list then return nil, "no healthy list in /apps answer" end
    local set = {}
    for app in list:gmatch('"([A-Za-z0-9_.-]+)"') do set[app] = true end
    local reasons = {}
    local others = body:match('"unhealthy":{([^}]*)}')
    if others then
        for app, why in others:gmatch('"([A-Za-z0-9_.-]+)":"([^"]*)"') do reasons[app] = why:sub(1, 60) end
    end
    return set, reasons
end

local function poll_apps(addr)
    local sock, status, length, left_ms = http_get(addr, conf.path, now_of() + conf.timeout)
    if not sock then return nil, status end
    if status ~= 200 then sock:close(); return nil, "status " .. tostring(status) end
    -- The healthy list comes first: read until it ends, not the whole answer.
    local body, size = "", 0
    while not length or size < length do
        sock:settimeout(left_ms())
        local want = length and min(16384, length - size) or 16384
        local chunk, rerr, partial = sock:receive(want)
        chunk = chunk or partial
        if chunk and #chunk > 0 then
            body = body .. chunk
            size = size + #chunk
            if body:find('"unhealthy":{[^}]*}') or (body:find('"healthy":%[[^%]]*%]') and body:find('"apps":', 1, true)) then
                break
            end
        end
        if not chunk or rerr then
            if rerr == "closed" and not length then break end
            sock:close()
            return nil, "body: " .. tostring(rerr)
        end
        if size > conf.max_body then sock:close(); return nil, "answer too large" end
    end
    sock:close()
    return healthy_apps(body)
end

-- A feed answer (format 1, README "The entry's feed"): { index=, held=, body=, apps_at= }
-- (the app lines start at apps_at), or nil, error. Lines it does not know are ignored.
local function parse_feed(body)
    if not body:find("^container%-healthcheck%-feed %d+\n") then return nil, "not a feed answer" end
    if sub(body, -5) ~= "\nend\n" then return nil, "feed answer cut short" end
    local apps_at = body:find("\napps %d+\n")
    local new_index = tonumber(body:match("\nindex (%d+)\n"))
    if not apps_at or not new_index then return nil, "feed answer without index or apps" end
    return { index = new_index, held = body:find("\nheld 1\n", 1, true) ~= nil, body = body,
             apps_at = body:find("\n", apps_at + 1, true) + 1 }
end

-- One feed answer from addr (see parse_feed), or nil, error, status.
local function fetch_feed(addr, index)
    local path = conf.feed_path .. (index and ("?index=" .. format("%d", index) .. "&wait=" .. conf.wait) or "")
    local sock, status, length, left_ms = http_get(addr, path, now_of() + conf.wait + conf.grace)
    if not sock then return nil, status end
    if status ~= 200 then sock:close(); return nil, "status " .. tostring(status), status end
    local body, err, partial
    sock:settimeout(left_ms())
    if length then body, err = sock:receive(length) else body, err, partial = sock:receive("*a") end
    sock:close()
    if not body then return nil, "body: " .. tostring(err) end
    return parse_feed(body)
end

-- The line of one app in a feed answer: healthy (bool), age (seconds, 0 for "-"), or nil.
local function feed_line(answer, app)
    local at = find(answer.body, "\n" .. app .. " ", answer.apps_at - 1, true)
    if not at then return nil end
    local h, age = answer.body:match("^ ([01]) ([^ \n]+)", at + 1 + #app)
    if not h then return nil end
    return h == "1", tonumber(age) or 0
end

-- A healthy line clears an ejection when its evidence (the probe it rests on) is newer than
-- the failure and the hold has passed. Returns true when app is no longer ejected there.
local function consider_clear(dict, app, addr, healthy, age, now)
    local key = "e:" .. app .. "|" .. addr
    local value = dict:get(key)
    if not value then return true end
    local at, hold_until, count, cleared, cause = parse_ejection(value)
    if cleared ~= false then return true end
    if not healthy or now - age <= at or now < hold_until then return false end
    dict_set(dict, key, format("%.3f|%.3f|%d|1|%s", at, hold_until, count, cause), conf.eject_memory)
    changed(dict)
    log_limited("back:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is back in: its health answer ",
                "after the failure says healthy")
    return true
end

---------------------------------------------------------------------------------------------
-- One channel per APPO: a loop in one worker. st: what this loop knows of its APPO.

local OWN_TTL = 5  -- seconds a channel's lock outlives a silent owner (a crashed worker)

local function wanted(dict, addr, configured)
    return configured[addr] or dict:get("p:" .. addr) ~= nil
end

local function take_ejections(dict, addr, st)
    local queue = "ejq:" .. addr
    while true do
        local app = dict:rpop(queue)
        if not app then return end
        st.ejected[app] = true
    end
end

-- Apply one feed answer: everything when the index moved (or on the slow refresh), else only
-- the apps rising or ejected here.
local function apply_feed(dict, addr, st, answer, now)
    take_ejections(dict, addr, st)
    local refresh = now - st.full_at > conf.forget_after / 3
    if answer.index ~= st.index or refresh then
        st.index, st.full_at = answer.index, refresh and now or st.full_at
        local seen, rising = {}, {}
        local fixed = fixed_by_addr[addr] or {}
        for app, h, age, why in sub(answer.body, answer.apps_at):gmatch("([^ \n]+) ([01]) ([^ \n]+) ?([^\n]*)\n") do
            seen[app] = true
            local healthy = h == "1"
            local key = "s:" .. app .. "|" .. addr
            local value = dict:get(key)
            if value or healthy or fixed[app] or dict:get("r:" .. app) then
                if observe(dict, app, addr, healthy, now, value, 1) then rising[app] = true end
                -- a steady state is not rewritten, only kept from expiring on the slow refresh
                if refresh and value then dict:expire(key, conf.forget_after) end
            end
            if not healthy then
                local wkey = "w:" .. app .. "|" .. addr
                why = why:sub(1, 60)
                if dict:get(wkey) ~= why then dict_set(dict, wkey, why, conf.forget_after)
                elseif refresh then dict:expire(wkey, conf.forget_after) end
            end
            if st.ejected[app] and consider_clear(dict, app, addr, healthy, tonumber(age) or 0, now) then
                st.ejected[app] = nil
            end
        end
        -- Gone from the APPO's list (offlined, container removed): out there.
        for app in pairs(st.listed) do
            if not seen[app] then
                local key = "s:" .. app .. "|" .. addr
                local value = dict:get(key)
                if value then
                    observe(dict, app, addr, false, now, value, 1)
                    dict_set(dict, "w:" .. app .. "|" .. addr, "not on this APPO", conf.forget_after)
                end
            end
        end
        st.listed, st.rising = seen, rising
    else
        for app in pairs(st.rising) do
            local healthy = feed_line(answer, app)
            if not observe(dict, app, addr, healthy == true, now, dict:get("s:" .. app .. "|" .. addr), 1) then
                st.rising[app] = nil
            end
        end
    end
    for app in pairs(st.ejected) do
        local healthy, age = feed_line(answer, app)
        if consider_clear(dict, app, addr, healthy == true, age or 0, now) then st.ejected[app] = nil end
    end
end

-- Services without the feed: one /apps poll with fall/rise, the way 2.1 did it.
local function apply_apps(dict, addr, st, healthy, reasons, now)
    local apps = {}
    for app in pairs(healthy or {}) do apps[app] = true end
    for app in pairs(fixed_by_addr[addr] or {}) do apps[app] = true end
    for app in pairs(st.listed) do
        local value = dict:get("s:" .. app .. "|" .. addr)
        if value and (apps[app] or dict:get("r:" .. app) or value:sub(1, 1) == "1") then apps[app] = true end
    end
    for app in pairs(apps) do
        observe(dict, app, addr, healthy ~= nil and healthy[app] == true, now, dict:get("s:" .. app .. "|" .. addr),
                conf.fall)
    end
    for app, why in pairs(reasons or {}) do
        if dict:get("w:" .. app .. "|" .. addr) ~= why then dict_set(dict, "w:" .. app .. "|" .. addr, why, conf.forget_after) end
    end
    st.listed = apps
    take_ejections(dict, addr, st)
    for app in pairs(st.ejected) do
        -- No ages in /apps: its answer counts once the hold has passed and one poll began after it.
        if consider_clear(dict, app, addr, healthy ~= nil and healthy[app] == true, conf.timeout, now) then
            st.ejected[app] = nil
        end
    end
end

local function channel_round(dict, addr, st)
    update_time()
    if st.mode == "feed" or now_of() - st.mode_at > 60 then
        local asked = st.mode == "feed" and st.index or nil
        local answer, err, status = fetch_feed(addr, asked)
        update_time()
        local now = now_of()
        if answer then
            if st.mode ~= "feed" then st.mode, st.index = "feed", nil end
            st.failures = 0
            answered(dict, addr, now, conf.wait + conf.grace)
            apply_feed(dict, addr, st, answer, now)
            dict_set(dict, "mode:" .. addr, "feed", conf.forget_after)
            -- Asked to wait but not held (the service's waiters are all busy): do not spin.
            if asked and not answer.held and answer.index == asked then ngx.sleep(conf.wait / 2) end
            return
        end
        if status == 404 then
            -- An older service (2.1 and before): poll /apps, and look for the feed again later.
            if st.mode == "feed" then
                log_limited("mode:" .. addr, WARN, "APPO ", addr, " has no ", conf.feed_path, ": polling ", conf.path,
                            " every ", conf.interval, " s (upgrade its container-healthcheck for pushed changes)")
            end
            st.mode, st.mode_at = "apps", now
        else
            failed(dict, addr, err, now)
            st.failures = st.failures + 1
            ngx.sleep(min(0.1 * 2 ^ st.failures, conf.interval))
            return
        end
    end
    local started = now_of()
    local healthy, reasons = poll_apps(addr)
    update_time()
    local now = now_of()
    if healthy then
        answered(dict, addr, now, conf.stale_after)
    else
        dict_set(dict, "err:" .. addr, tostring(reasons), conf.forget_after)
        log_limited("poll:" .. addr, WARN, "poll of ", addr, " failed: ", tostring(reasons))
    end
    apply_apps(dict, addr, st, healthy, type(reasons) == "table" and reasons or {}, now)
    dict_set(dict, "mode:" .. addr, "apps", conf.forget_after)
    ngx.sleep(max(0.001, conf.interval - (now - started)))
end

local function owner_id()
    return format("%.3f/%d", generation, ngx.worker.pid())
end

local function configured_appos()
    local seen, out = {}, {}
    local function add(addr)
        if not seen[addr] then seen[addr] = true; out[#out + 1] = addr end
    end
    for _, addr in ipairs(conf.appos) do add(addr) end
    for _, list in pairs(conf.apps) do
        for _, addr in ipairs(list) do add(addr) end
    end
    return out, seen
end

local function channel(premature, addr, listed)
    if premature then return end
    local dict = shared[conf.dict]
    local me = owner_id()
    local _, configured = configured_appos()
    local st = { mode = "feed", mode_at = 0, index = nil, listed = listed or {}, rising = {}, ejected = {},
                 full_at = 0, failures = 0 }
    -- Ejections of this APPO that a previous owner had not cleared yet.
    for _, key in ipairs(dict:get_keys(0)) do
        if byte(key, 1) == 101 and byte(key, 2) == 58 and sub(key, -#addr - 1) == "|" .. addr then  -- "e:"
            st.ejected[sub(key, 3, -#addr - 2)] = true
        end
    end
    while not ngx.worker.exiting() and dict:get("own:" .. addr) == me and wanted(dict, addr, configured) do
        dict_set(dict, "own:" .. addr, me, OWN_TTL)
        local ok, err = xpcall(channel_round, debug.traceback, dict, addr, st)
        if not ok then
            log_limited("crash:" .. addr, ERR, "channel to ", addr, " failed, retrying: ", err)
            ngx.sleep(conf.interval)
        end
    end
    if dict:get("own:" .. addr) == me then dict:delete("own:" .. addr) end
end

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
    if premature or ngx.worker.exiting() then return end
    local dict = shared[conf.dict]
    if not dict:add("lock:scan:" .. generation, true, conf.interval * 0.9) then return end
    update_time()
    local started_wall, started_cpu = now_of(), os.clock()
    local learned, states = scan(dict)
    local addrs, seen = configured_appos()
    for addr in pairs(learned) do
        if not seen[addr] then seen[addr] = true; addrs[#addrs + 1] = addr end
    end
    local me = owner_id()
    for _, addr in ipairs(addrs) do
        local owner = dict:get("own:" .. addr)
        local take = owner == nil and dict:add("own:" .. addr, me, OWN_TTL)
        if owner ~= nil and owner ~= me and (tonumber(owner:match("^([%d.]+)/")) or 0) < generation then
            take = dict_set(dict, "own:" .. addr, me, OWN_TTL)  -- a reload: this configuration takes over
        end
        if take then
            local ok, err = ngx.timer.at(0, channel, addr, states[addr])
            if not ok then
                dict:delete("own:" .. addr)
                log_limited("timer", ERR, "cannot start the channel to ", addr, ": ", err,
                            " (raise lua_max_pending_timers / lua_max_running_timers)")
            end
        end
    end
    update_time()
    dict_set(dict, "stat:round", format('{"appos":%d,"wall_ms":%.1f,"cpu_ms":%.1f,"at":%.3f}',
        #addrs, (now_of() - started_wall) * 1000, (os.clock() - started_cpu) * 1000, now_of()))
end

local function guarded_supervise(premature)
    local ok, err = xpcall(supervise, debug.traceback, premature)
    if not ok then log_limited("supervise", ERR, "looking for APPOs failed: ", err) end
end

function M.init_worker()
    local ok, err = ngx.timer.every(conf.interval, guarded_supervise)
    if not ok then log(ERR, "cannot start the channels' supervisor: ", err) end
    ok, err = ngx.timer.at(0, guarded_supervise)
    if not ok then log(ERR, "cannot start the channels' supervisor: ", err) end
end

---------------------------------------------------------------------------------------------
-- The request path: no socket, no key scan.

-- Is app usable on addr: fresh data, healthy, not ejected? Also returns until when (fresh).
local function usable(dict, app, addr, now)
    local fresh = dict:get("fresh:" .. addr)
    if not fresh or now > fresh then return false end
    local value = dict:get("s:" .. app .. "|" .. addr)
    if value == nil or byte(value, 1) ~= 49 then return false end
    if ejected(dict, app, addr) then return false end
    return true, fresh
end

local rr = {}
local rr_size = 0

local choices, choices_size = {}, 0

-- Which peers app may use now: (candidates, known usable, ejectable). Each worker reuses its
-- reading of the dict until something changed ("ver") or a peer's data would go stale.
local function candidates_for(app, kind, now)
    local key = kind .. "|" .. app
    local dict = shared[conf.dict]
    local ver = dict:get("ver") or 0
    local cached = choices[key]
    if cached and cached.ver == ver and now < cached.expires then
        return cached.candidates, cached.known, cached.source
    end
    local peers, source = peers_for(app, kind)
    learn(app, peers, source)
    local primary, backup, all = {}, {}, {}
    local expires = now + 1
    for _, peer in ipairs(peers) do
        if not peer.backup then all[#all + 1] = peer.addr end
        local yes, fresh = usable(dict, app, peer.addr, now)
        if yes then
            local list = peer.backup and backup or primary
            list[#list + 1] = peer.addr
            expires = min(expires, fresh)
        end
    end
    local candidates = #primary > 0 and primary or backup
    local known = #candidates > 0
    if not known then
        if #all == 0 then
            for _, peer in ipairs(peers) do all[#all + 1] = peer.addr end
        end
        candidates = all
        if #candidates == 0 then
            log_limited("nopeer", ERR, "no APPO at all for app ", app, " (", kind, "): check its upstream")
        else
            log_limited(source == "own" and ("open:" .. app) or "open:*", WARN, "no APPO known healthy for app ",
                        app, ": failing open to all ", #candidates)
        end
    end
    if not cached then
        if choices_size > 10000 then choices, choices_size = {}, 0 end
        choices_size = choices_size + 1
    end
    choices[key] = { ver = ver, expires = expires, candidates = candidates, known = known, source = source }
    return candidates, known, source
end

-- The peers a request for app may use, in order, and where to start: usable primaries,
-- else usable backups, else (failing open) every primary. No socket, no key scan.
function M.choose(app, kind)
    local candidates, known, source = candidates_for(app, kind, now_of())
    if #candidates == 0 then return nil end
    -- Round-robin state only for apps known usable somewhere; the rest start at random (no
    -- table that grows with every app name a client invents).
    local start
    if known then
        -- One turn per route and app: /o/<app> and /t/<app> have different peers, and a shared
        -- turn would send every other request of one of them to the same peer.
        local key = kind .. "|" .. app
        if not rr[key] then
            if rr_size > 10000 then rr, rr_size = {}, 0 end
            rr_size = rr_size + 1
        end
        start = (rr[key] or 0) % #candidates
        rr[key] = start + 1
    else
        start = math.random(#candidates) - 1
    end
    return candidates, start, source
end

-- A failed attempt at addr: eject, if app is one nginx or an APPO told us of (a name a client
-- made up never becomes a key).
local function attempt_failed(ctx, addr, cause)
    local dict = shared[conf.dict]
    if ctx.chc_source == "own" or ctx.chc_source == "fixed" or dict:get("s:" .. ctx.chc_app .. "|" .. addr) then
        eject(dict, ctx.chc_app, addr, cause)
    end
end

-- balancer_by_lua: set the peer for this try. kind: "o" (default) or "t" for /t/ routes.
function M.balance(app, kind)
    local ctx = ngx.ctx
    local candidates = ctx.chc_candidates
    if not candidates then
        local start, source
        candidates, start, source = M.choose(app or "", kind or "o")
        if not candidates then return ngx.exit(ngx.ERROR) end
        ctx.chc_candidates, ctx.chc_next, ctx.chc_app, ctx.chc_source = candidates, start, app or "", source
        ctx.chc_tried = {}
        if #candidates > 1 then balancer.set_more_tries(#candidates - 1) end
    else
        -- A retry: the previous attempt failed the way proxy_next_upstream says.
        local state, code = balancer.get_last_failure()
        if state == "failed" or (state == "next" and eject_set[code]) then
            attempt_failed(ctx, ctx.chc_tried[#ctx.chc_tried], state == "failed"
                and ("connection failed or timed out" .. (code and (", " .. code) or "")) or ("answered " .. code))
        end
    end
    local addr = candidates[ctx.chc_next % #candidates + 1]
    ctx.chc_next = ctx.chc_next + 1
    ctx.chc_tried[#ctx.chc_tried + 1] = addr
    local host, port = split_addr(addr)
    local ok, err = balancer.set_current_peer(host, port)
    if not ok then log(ERR, "set_current_peer ", addr, ": ", err) end
end

-- log_by_lua: the last attempt failed too (a POST that got a 502 is not retried): eject.
function M.log()
    local ctx = ngx.ctx
    local tried = ctx.chc_tried
    if not tried or #tried == 0 then return end
    local statuses = ngx.var.upstream_status
    if not statuses then return end
    local i = 0
    for status in statuses:gmatch("[^,:%s]+") do
        i = i + 1
        local code = tonumber(status)
        if code and eject_set[code] and tried[i] then attempt_failed(ctx, tried[i], "answered " .. code) end
    end
end

local function json_string(s)
    return '"' .. tostring(s):gsub('[%c"\\]', function(c)
        return string.format("\\u%04x", c:byte())
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
    if seconds < 120 then return string.format("%.0f s", seconds) end
    if seconds < 7200 then return string.format("%.0f min", seconds / 60) end
    return string.format("%.1f h", seconds / 3600)
end

-- Everything the dict knows, from one key scan: states[app][addr] = {healthy, streak, since},
-- reasons[app][addr], ejections[app][addr] = {at, hold_until, count, cause} (those still
-- out), and every APPO address in play.
local function read_state(dict)
    local states, reasons, polled, ejections = {}, {}, {}, {}
    for _, key in ipairs(dict:get_keys(0)) do
        local kind, rest = key:sub(1, 2), key:sub(3)
        if kind == "e:" then
            local bar = rest:find("|", 1, true)
            local value = bar and dict:get(key)
            local at, hold_until, count, cleared, cause = parse_ejection(value or "")
            if at and not cleared then
                local app, addr = rest:sub(1, bar - 1), rest:sub(bar + 1)
                ejections[app] = ejections[app] or {}
                ejections[app][addr] = { at = at, hold_until = hold_until, count = count, cause = cause }
            end
        elseif kind == "s:" or kind == "w:" then
            local bar = rest:find("|", 1, true)
            local value = bar and dict:get(key)
            if value then
                local app, addr = rest:sub(1, bar - 1), rest:sub(bar + 1)
                if kind == "s:" then
                    local h, streak, since = value:match("^(%d)|(%-?%d+)|([%d.]+)$")
                    if h then
                        states[app] = states[app] or {}
                        states[app][addr] = { healthy = h == "1", streak = tonumber(streak), since = tonumber(since) }
                        polled[addr] = true
                    end
                else
                    reasons[app] = reasons[app] or {}
                    reasons[app][addr] = value
                end
            end
        elseif kind == "p:" then
            polled[rest] = true
        end
    end
    for _, addr in ipairs(configured_appos()) do polled[addr] = true end
    return states, reasons, polled, ejections
end

local function is_fresh(dict, addr, now)
    local fresh = dict:get("fresh:" .. addr)
    return fresh ~= nil and now <= fresh
end

local function status_json(dict, states, reasons, polled, ejections, now)
    local appos, parts = {}, {}
    for addr in pairs(polled) do
        local ok_at = dict:get("ok:" .. addr)
        local err = dict:get("err:" .. addr)
        appos[#appos + 1] = string.format('%s:{"last_ok":%s,"fresh":%s,"mode":%s,"error":%s}', json_string(addr),
            ok_at and tostring(ok_at) or "null", is_fresh(dict, addr, now) and "true" or "false",
            json_string(dict:get("mode:" .. addr) or "none"), err and json_string(err) or "null")
    end
    local apps = {}
    for app in pairs(states) do apps[app] = true end
    for app in pairs(ejections) do apps[app] = true end
    for app in pairs(apps) do
        local entries = {}
        local addrs = {}
        for addr in pairs(states[app] or {}) do addrs[addr] = true end
        for addr in pairs(ejections[app] or {}) do addrs[addr] = true end
        for addr in pairs(addrs) do
            local st = states[app] and states[app][addr]
            local why = reasons[app] and reasons[app][addr]
            local out = ejections[app] and ejections[app][addr]
            entries[#entries + 1] = string.format('%s:{"healthy":%s,"streak":%d,"last_change":%s%s%s}',
                json_string(addr), (st and st.healthy) and "true" or "false", st and st.streak or 0,
                st and tostring(st.since) or "null", why and (',"reason":' .. json_string(why)) or "",
                out and string.format(',"ejected":{"cause":%s,"at":%.3f,"until":%.3f,"count":%d}',
                                      json_string(out.cause), out.at, out.hold_until, out.count) or "")
        end
        parts[#parts + 1] = json_string(app) .. ":{" .. table.concat(entries, ",") .. "}"
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say('{"now":', now, ',"wait":', conf.wait, ',"grace":', conf.grace, ',"interval":', conf.interval,
            ',"fall":', conf.fall, ',"rise":', conf.rise, ',"ejections_total":', dict:get("stat:ejections") or 0,
            ',"last_round":', dict:get("stat:round") or "null",
            ',"appos":{', table.concat(appos, ","), '},"apps":{', table.concat(parts, ","), '}}')
end

-- The matrix: apps (rows) x APPOs (columns); apps failing open first.
local function status_html(dict, states, reasons, polled, ejections, now)
    local addrs = {}
    for addr in pairs(polled) do addrs[#addrs + 1] = addr end
    table.sort(addrs)
    local fresh = {}
    local head = { "<tr><th>app</th>" }
    for _, addr in ipairs(addrs) do
        local ok_at = dict:get("ok:" .. addr)
        local err = dict:get("err:" .. addr)
        fresh[addr] = is_fresh(dict, addr, now)
        head[#head + 1] = string.format('<th class="%s" title="%s">%s<br><span class="small">%s%s</span></th>',
            fresh[addr] and "ok" or "bad", html_escape(err or ""), html_escape(addr),
            ok_at and ("polled " .. age_text(now - ok_at) .. " ago") or "never polled",
            err and (" &middot; " .. html_escape(err:sub(1, 40))) or "")
    end
    head[#head + 1] = "</tr>"
    local rows, open_count = {}, 0
    for app, per_addr in pairs(states) do
        local backup = {}
        for _, peer in ipairs(upstream_peers(app) or {}) do
            if peer.backup then backup[peer.addr] = true end
        end
        local usable_count = 0
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
            elseif st.healthy then
                css, words = "ok", "healthy"
                usable_count = usable_count + 1
            else
                css, words = "bad", why or "not reported"
            end
            local label = html_escape(words)
            if st and backup[addr] then css, label = css .. " backup", "backup &middot; " .. label end
            cells[#cells + 1] = st and string.format('<td class="%s" title="%s">%s <span class="small">%s</span></td>',
                css, html_escape(why or ""), label, age_text(now - st.since)) or "<td></td>"
        end
        local failing_open = usable_count == 0
        if failing_open then open_count = open_count + 1 end
        rows[#rows + 1] = { open = failing_open, app = app, html = string.format(
            '<tr data-app="%s"%s><th>%s%s</th>%s</tr>', html_escape(app:lower()), failing_open and ' class="open"' or "",
            html_escape(app), failing_open and ' <span class="small">failing open</span>' or "",
            table.concat(cells)) }
    end
    table.sort(rows, function(a, b)
        if a.open ~= b.open then return a.open end
        return a.app < b.app
    end)
    local body = {}
    for i, row in ipairs(rows) do body[i] = row.html end
    local query = ngx.unescape_uri(ngx.var.arg_q or ""):sub(1, 100)
    ngx.header["Content-Type"] = "text/html; charset=utf-8"
    ngx.header["Cache-Control"] = "no-store"
    ngx.header["Content-Security-Policy"] = PAGE_CSP
    ngx.header["X-Content-Type-Options"] = "nosniff"
    ngx.header["Referrer-Policy"] = "no-referrer"
    ngx.say('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="',
            math.max(1, math.floor(conf.interval)), '"><title>container-healthcheck: apps x APPOs</title><style>',
            PAGE_STYLE, '</style></head><body><header><h1>container-healthcheck: apps x APPOs</h1><span class="meta">',
            #rows, " apps, ", #addrs, " APPOs, ", open_count, " failing open &middot; interval ", conf.interval,
            " s, fall ", conf.fall, ", rise ", conf.rise, " &middot; ", os.date("%Y-%m-%d %H:%M:%S", math.floor(now)),
            '</span><form method="get"><input id="filter" name="q" placeholder="filter apps" value="',
            html_escape(query), '" autocomplete="off"></form></header><table><thead>', table.concat(head),
            "</thead><tbody>", table.concat(body), "</tbody></table><script>", PAGE_SCRIPT, "</script></body></html>")
end

-- content_by_lua: what the balancer knows, for operators: an HTML matrix for browsers
-- (Accept: text/html), JSON otherwise.
-- The pure parts and the dict rules, for the unit tests (tests/lua/test_units.lua) only.
M._units = {
    parse_feed = parse_feed, feed_line = feed_line, parse_ejection = parse_ejection, eject = eject,
    consider_clear = consider_clear, observe = observe, usable = usable, healthy_apps = healthy_apps,
    apply_feed = apply_feed, conf = conf,
}

function M.status()
    local dict = ngx.shared[conf.dict]
    local states, reasons, polled, ejections = read_state(dict)
    local now = ngx.now()
    if (ngx.var.http_accept or ""):find("text/html", 1, true) then
        return status_html(dict, states, reasons, polled, ejections, now)
    end
    return status_json(dict, states, reasons, polled, ejections, now)
end

return M
