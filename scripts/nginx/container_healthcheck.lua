-- container_healthcheck.lua: entry-Nginx balancer for BlueKing /o/<app>/ and /t/<app>/ that
-- routes only to APPOs whose container-healthcheck says the app is healthy.
--
-- * Which hosts serve an app: the servers of its own upstream (`<app>` for /o/, `t.<app>` for
--   /t/, as BlueKing 6.x renders them from consul) through ngx.upstream where OpenResty has it,
--   or one shared upstream (BlueKing 5.x: PAAS_AGENT_PROD), or the `apps`/`appos` lists. A server
--   marked `down` is never used; `backup` servers only when no primary is healthy; a name that
--   resolved to several addresses gives one peer per address.
-- * Only APPOs are polled: the configured ones and the servers of app upstreams that requests
--   asked for (learned on the request path from nginx's own tables, no socket). Never the
--   servers of other upstreams, never a placeholder.
-- * A background checker (init_worker + ngx.timer, one worker per round through a shared-dict
--   lock) polls each APPO's GET /container-healthcheck/apps once per interval with one total
--   deadline, and keeps per-app, per-APPO health with rise/fall in a lua_shared_dict.
-- * balance() (balancer_by_lua) picks round-robin among the healthy peers, retries the next
--   one, and FAILS OPEN to all the app's peers when none is known healthy or the data is
--   stale, so a health-service outage never becomes a site outage.
-- * Nothing on the request path opens a socket; log lines are at most one per app or APPO per
--   interval; shared-dict entries expire when an app or APPO is no longer seen.
-- Needs lua-nginx-module and lua-resty-core (ngx.balancer).
local balancer = require "ngx.balancer"

local M = { _VERSION = "2.1.0" }

local conf = {
    dict = "container_healthcheck",
    appos = {},             -- { "10.0.0.2:8010", ... }: APPOs of every app without an upstream of its own
    apps = {},              -- { app = { "host:port", ... } }: fixed APPOs per app (overrides the rest)
    use_upstream_module = true, -- ngx.upstream: the app's own upstream (`<app>`, `t.<app>`)
    shared_upstream = nil,  -- BlueKing 5.x: the one upstream whose servers are every APPO
    test_prefix = "t.",     -- /t/<app> goes to upstream test_prefix .. app
    path = "/container-healthcheck/apps",
    host_header = nil,      -- Host sent to APPOs (default: the APPO address)
    interval = 2,           -- seconds between polls of each APPO
    timeout = 1,            -- seconds for one whole poll (connect, send, read)
    fall = 2,               -- consecutive failures before an APPO is unhealthy for an app
    rise = 2,               -- consecutive successes before it is healthy again
    stale_after = nil,      -- seconds without a successful poll before an APPO's data is stale
    forget_after = 300,     -- seconds an app or APPO nobody asks about is remembered
    max_body = 8 * 1024 * 1024,
}

local ok_upstream, upstream = pcall(require, "ngx.upstream")
if not ok_upstream then upstream = nil end

local function log(level, ...)
    ngx.log(level, "[container-healthcheck] ", ...)
end

-- At most one line per key per interval, across workers (the dict remembers who said it).
local function log_limited(key, level, ...)
    local dict = ngx.shared[conf.dict]
    if dict:add("log:" .. key, true, conf.interval) then log(level, ...) end
end

local dict_full_said = false

-- Every write is checked: a full zone evicts entries (health, the round lock) silently.
local function dict_set(dict, key, value, exptime)
    local ok, err, forcible = dict:set(key, value, exptime or 0)
    if (not ok or forcible) and not dict_full_said then
        dict_full_said = true
        log(ngx.ERR, "lua_shared_dict ", conf.dict, " is full (", tostring(err or "evicting"),
            "): give it about 200 bytes per app per APPO plus 100 per APPO, e.g. 10m for 500 apps x 50 APPOs")
    end
    return ok
end

-- addr -> { app = true }: the fixed `apps` lists turned around once, not every round.
local fixed_by_addr = {}

function M.init(options)
    for k, v in pairs(options or {}) do conf[k] = v end
    fixed_by_addr = {}
    for app, list in pairs(conf.apps) do
        for _, addr in ipairs(list) do
            fixed_by_addr[addr] = fixed_by_addr[addr] or {}
            fixed_by_addr[addr][app] = true
        end
    end
    conf.stale_after = conf.stale_after or conf.interval * (conf.fall + 1) + conf.timeout
    if not ngx.shared[conf.dict] then
        error("lua_shared_dict " .. conf.dict .. " is not declared")
    end
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
    local now = ngx.now()
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

-- The request path tells the checker what to poll: the APPOs of an app upstream someone uses
-- (p:<addr>), and that the app is in use (r:<app>). Names a client can invent (anything that
-- fell back to the shared upstream or appos) never become keys: only nginx's own upstreams
-- and the configured lists do.
local learned_at = {}
local function learn(app, peers, source)
    if source ~= "own" and source ~= "one" and source ~= "fixed" then return end
    local marker = source == "one" and "\0one" or app
    local now = ngx.now()
    local last = learned_at[marker]
    if last and now - last < conf.interval then return end
    learned_at[marker] = now
    local dict = ngx.shared[conf.dict]
    if source ~= "one" then dict_set(dict, "r:" .. app, now, conf.forget_after) end
    if source ~= "fixed" then
        for _, peer in ipairs(peers) do
            dict_set(dict, "p:" .. peer.addr, now, conf.forget_after)
        end
    end
end

-- The healthy list of an /apps answer (compact JSON; app codes are [A-Za-z0-9_.-]) and the
-- short reasons of the others (no quotes or braces in them), found without decoding the whole
-- answer: the rest holds every app's containers. Returns healthy set, reasons (or nil).
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

local function poll(addr)
    local host, port = split_addr(addr)
    local deadline = ngx.now() + conf.timeout
    local sock = ngx.socket.tcp()
    local function left_ms()
        ngx.update_time()
        return math.max(1, math.floor((deadline - ngx.now()) * 1000))
    end
    local function over() return ngx.now() >= deadline end
    sock:settimeout(left_ms())
    local ok, err = sock:connect(host, port)
    if not ok then return nil, "connect: " .. tostring(err) end
    local request = "GET " .. conf.path .. " HTTP/1.0\r\nHost: " .. (conf.host_header or addr) ..
                    "\r\nUser-Agent: container-healthcheck-lua\r\nConnection: close\r\n\r\n"
    sock:settimeout(left_ms())
    ok, err = sock:send(request)
    if not ok then sock:close(); return nil, "send: " .. tostring(err) end
    sock:settimeout(left_ms())
    local status_line
    status_line, err = sock:receive("*l")
    if not status_line then sock:close(); return nil, "status: " .. tostring(err) end
    local status = tonumber(status_line:match("^HTTP/%d%.%d (%d%d%d)"))
    local length
    while true do
        sock:settimeout(left_ms())
        local line
        line, err = sock:receive("*l")
        if not line then sock:close(); return nil, "headers: " .. tostring(err) end
        if line == "" then break end
        local value = line:match("^[Cc]ontent%-[Ll]ength:%s*(%d+)")
        if value then length = tonumber(value) end
        if over() then sock:close(); return nil, "timeout (whole poll)" end
    end
    if status ~= 200 then sock:close(); return nil, "status " .. tostring(status) end
    if length and length > conf.max_body then sock:close(); return nil, "answer too large" end
    -- The healthy list comes first in the answer: read until it ends, not the whole answer
    -- (every app's containers: 300 KB for 500 apps, 50 times per round).
    local body, size = "", 0
    while not length or size < length do
        sock:settimeout(left_ms())
        local want = length and math.min(16384, length - size) or 16384
        local chunk, rerr, partial = sock:receive(want)
        chunk = chunk or partial
        if chunk and #chunk > 0 then
            body = body .. chunk
            size = size + #chunk
            -- Both lists have arrived (2.1+), or an older service's healthy list and its apps.
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
        if over() then sock:close(); return nil, "timeout (whole poll)" end
    end
    sock:close()
    return healthy_apps(body)
end

-- When this worker last wrote each state (its TTL): a state that stays put is not rewritten
-- every round, only often enough to keep it from expiring. Reset when it grows too big.
local touched, touched_size = {}, 0

-- Record one observation of app on addr, applying rise/fall. State: "healthy|streak|since".
local function observe(dict, app, addr, passed, now, value)
    local key = "s:" .. app .. "|" .. addr
    -- The steady state (same verdict, no streak) costs a read and no write.
    if value and value:byte(1) == (passed and 49 or 48) and value:byte(3) == 48 and value:byte(4) == 124 then
        local at = touched[key]
        if at and now - at < conf.forget_after / 3 then return end
        if not at then
            if touched_size > 200000 then touched, touched_size = {}, 0 end
            touched_size = touched_size + 1
        end
        touched[key] = now
        dict:expire(key, conf.forget_after)
        return
    end
    local healthy, streak, since
    if value then
        local h, s, t = value:match("^(%d)|(%-?%d+)|([%d.]+)$")
        healthy, streak, since = h == "1", tonumber(s), tonumber(t)
    end
    if passed and healthy == false then dict:delete("w:" .. app .. "|" .. addr) end
    if healthy == nil then
        healthy, streak, since = passed, 0, now  -- first sight: believe it at once
    elseif passed == healthy then
        streak = 0
    else
        streak = streak + 1
        if streak >= (healthy and conf.fall or conf.rise) then
            healthy, streak, since = passed, 0, now
            log_limited("change:" .. app .. "|" .. addr, ngx.WARN, "app ", app, " on ", addr, " is now ",
                        healthy and "healthy" or "UNHEALTHY")
        end
    end
    dict_set(dict, key, (healthy and "1" or "0") .. "|" .. streak .. "|" .. since, conf.forget_after)
    touched[key] = now
end

-- What the dict knows, from its one key scan per round.
local function scan(dict)
    local addrs, states, requested = {}, {}, {}
    local byte, find, sub = string.byte, string.find, string.sub
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
            elseif first == 114 then  -- "r:<app>"
                requested[sub(key, 3)] = true
            end
        end
    end
    return addrs, states, requested
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

local function check_round(premature)
    if premature then return end
    local dict = ngx.shared[conf.dict]
    -- One worker per round: the lock expires a little before the next round, and a poll's
    -- total deadline (timeout < interval) ends it before that.
    if not dict:add("lock:round", true, conf.interval * 0.9) then return end
    ngx.update_time()
    local started_wall, started_cpu = ngx.now(), os.clock()
    local learned, states, requested = scan(dict)
    local scan_cpu = os.clock() - started_cpu
    local addrs, seen = configured_appos()
    for addr in pairs(learned) do
        if not seen[addr] then seen[addr] = true; addrs[#addrs + 1] = addr end
    end
    local threads = {}
    for i, addr in ipairs(addrs) do
        threads[i] = ngx.thread.spawn(poll, addr)
    end
    for i, addr in ipairs(addrs) do
        local ok, healthy, err = ngx.thread.wait(threads[i])
        local reasons = type(err) == "table" and err or {}
        if not ok then healthy, err = nil, "poll failed: " .. tostring(healthy) end
        local now = ngx.now()
        if healthy then
            dict_set(dict, "ok:" .. addr, now, conf.forget_after)
            dict:delete("err:" .. addr)
        else
            dict_set(dict, "err:" .. addr, tostring(err), conf.forget_after)
            log_limited("poll:" .. addr, ngx.WARN, "poll of ", addr, " failed: ", tostring(err))
        end
        -- Apps to observe here: the ones it reports healthy; every one known here that is
        -- healthy or still in use (an unhealthy one nobody asks for expires); the fixed ones.
        local apps = {}
        for app in pairs(healthy or {}) do apps[app] = true end
        for app in pairs(fixed_by_addr[addr] or {}) do apps[app] = true end
        local known = states[addr] or {}
        for app in pairs(known) do
            local value = dict:get("s:" .. app .. "|" .. addr)
            if value and (apps[app] or requested[app] or value:sub(1, 1) == "1") then
                observe(dict, app, addr, healthy ~= nil and healthy[app] == true, now, value)
                apps[app] = nil
            end
        end
        for app in pairs(apps) do
            observe(dict, app, addr, healthy ~= nil and healthy[app] == true, now, nil)
        end
        -- Why, in the APPO's own few words, for the operators' matrix: written on change,
        -- otherwise only kept from expiring (few apps are unhealthy at a time).
        for app, why in pairs(reasons) do
            local key = "w:" .. app .. "|" .. addr
            if dict:get(key) ~= why then
                dict_set(dict, key, why, conf.forget_after)
            else
                dict:expire(key, conf.forget_after)
            end
        end
    end
    ngx.update_time()
    -- What the last round cost this worker (CPU includes any request it served meanwhile).
    dict_set(dict, "stat:round", string.format('{"appos":%d,"wall_ms":%.1f,"cpu_ms":%.1f,"scan_ms":%.1f,"at":%.3f}',
        #addrs, (ngx.now() - started_wall) * 1000, (os.clock() - started_cpu) * 1000, scan_cpu * 1000, ngx.now()))
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
local rr_size = 0

local choices, choices_size = {}, 0
local CHOICE_TTL = 0.25  -- seconds a worker reuses its reading of the dict for an app

-- Which peers app may use now: (candidates, known healthy). Read from the dict at most every
-- CHOICE_TTL per worker, so a request costs a table lookup however big the dict is.
local function candidates_for(app, kind, now)
    local key = kind .. "|" .. app
    local cached = choices[key]
    if cached and now - cached.at < CHOICE_TTL then return cached.candidates, cached.known end
    local dict = ngx.shared[conf.dict]
    local peers, source = peers_for(app, kind)
    learn(app, peers, source)
    local primary, backup, all = {}, {}, {}
    for _, peer in ipairs(peers) do
        if not peer.backup then all[#all + 1] = peer.addr end
        if usable(dict, app, peer.addr, now) then
            local list = peer.backup and backup or primary
            list[#list + 1] = peer.addr
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
            log_limited("nopeer", ngx.ERR, "no APPO at all for app ", app, " (", kind, "): check its upstream")
        else
            log_limited(source == "own" and ("open:" .. app) or "open:*", ngx.WARN, "no APPO known healthy for app ",
                        app, ": failing open to all ", #candidates)
        end
    end
    if not cached then
        if choices_size > 10000 then choices, choices_size = {}, 0 end
        choices_size = choices_size + 1
    end
    choices[key] = { at = now, candidates = candidates, known = known }
    return candidates, known
end

-- The peers a request for app may use, in order, and where to start: healthy primaries,
-- else healthy backups, else (failing open) every primary. No socket, no key scan.
function M.choose(app, kind)
    local candidates, known = candidates_for(app, kind, ngx.now())
    if #candidates == 0 then return nil end
    -- Round-robin state only for apps the checker knows healthy somewhere; the rest start
    -- at random (no table that grows with every app name a client invents).
    local start
    if known then
        if not rr[app] then
            if rr_size > 10000 then rr, rr_size = {}, 0 end
            rr_size = rr_size + 1
        end
        start = (rr[app] or 0) % #candidates
        rr[app] = start + 1
    else
        start = math.random(#candidates) - 1
    end
    return candidates, start
end

-- balancer_by_lua: set the peer for this try. kind: "o" (default) or "t" for /t/ routes.
function M.balance(app, kind)
    local ctx = ngx.ctx
    local candidates = ctx.chc_candidates
    if not candidates then
        local start
        candidates, start = M.choose(app or "", kind or "o")
        if not candidates then return ngx.exit(ngx.ERROR) end
        ctx.chc_candidates = candidates
        ctx.chc_next = start
        if #candidates > 1 then balancer.set_more_tries(#candidates - 1) end
    end
    local addr = candidates[ctx.chc_next % #candidates + 1]
    ctx.chc_next = ctx.chc_next + 1
    local host, port = split_addr(addr)
    local ok, err = balancer.set_current_peer(host, port)
    if not ok then log(ngx.ERR, "set_current_peer ", addr, ": ", err) end
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
-- reasons[app][addr], and every APPO address in play.
local function read_state(dict)
    local states, reasons, polled = {}, {}, {}
    for _, key in ipairs(dict:get_keys(0)) do
        local kind, rest = key:sub(1, 2), key:sub(3)
        if kind == "s:" or kind == "w:" then
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
    return states, reasons, polled
end

local function status_json(dict, states, reasons, polled, now)
    local appos, parts = {}, {}
    for addr in pairs(polled) do
        local ok_at = dict:get("ok:" .. addr)
        local err = dict:get("err:" .. addr)
        appos[#appos + 1] = string.format('%s:{"last_ok":%s,"fresh":%s,"error":%s}', json_string(addr),
            ok_at and tostring(ok_at) or "null",
            (ok_at and now - ok_at <= conf.stale_after) and "true" or "false",
            err and json_string(err) or "null")
    end
    for app, per_addr in pairs(states) do
        local entries = {}
        for addr, st in pairs(per_addr) do
            local why = reasons[app] and reasons[app][addr]
            entries[#entries + 1] = string.format('%s:{"healthy":%s,"streak":%d,"last_change":%s%s}',
                json_string(addr), st.healthy and "true" or "false", st.streak, tostring(st.since),
                why and (',"reason":' .. json_string(why)) or "")
        end
        parts[#parts + 1] = json_string(app) .. ":{" .. table.concat(entries, ",") .. "}"
    end
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Cache-Control"] = "no-store"
    ngx.say('{"now":', now, ',"interval":', conf.interval, ',"fall":', conf.fall, ',"rise":', conf.rise,
            ',"last_round":', dict:get("stat:round") or "null",
            ',"appos":{', table.concat(appos, ","), '},"apps":{', table.concat(parts, ","), '}}')
end

-- The matrix: apps (rows) x APPOs (columns); apps failing open first.
local function status_html(dict, states, reasons, polled, now)
    local addrs = {}
    for addr in pairs(polled) do addrs[#addrs + 1] = addr end
    table.sort(addrs)
    local fresh = {}
    local head = { "<tr><th>app</th>" }
    for _, addr in ipairs(addrs) do
        local ok_at = dict:get("ok:" .. addr)
        local err = dict:get("err:" .. addr)
        fresh[addr] = ok_at ~= nil and now - ok_at <= conf.stale_after
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
function M.status()
    local dict = ngx.shared[conf.dict]
    local states, reasons, polled = read_state(dict)
    local now = ngx.now()
    if (ngx.var.http_accept or ""):find("text/html", 1, true) then
        return status_html(dict, states, reasons, polled, now)
    end
    return status_json(dict, states, reasons, polled, now)
end

return M
