-- container_healthcheck.config: the options, their defaults and types, checked once and
-- together by init() in init_by_lua, and what is derived from them. A wrong option, or a
-- combination that cannot work, is an init_by_lua error: nginx does not start, and a reload
-- keeps the running configuration, with the reason in the error log. (`nginx -t` does not run
-- init_by_lua, so it cannot see it.)
local M = {}

-- The longest `wait` the service accepts (healthcheck/feed_format.py MAX_WAIT_S): a longer one is
-- refused with 400, which would take every APPO out.
M.SERVICE_MAX_WAIT = 5

-- Every option, with its default (nil: off) and its type: apply() refuses anything else.
local conf = {
    dict = "container_healthcheck",
    appos = {},             -- { "10.0.0.2:8010", ... }: APPOs of every app without an upstream of its own
    apps = {},              -- { app = { "host:port", ... } }: fixed APPOs per app (overrides the rest)
    use_upstream_module = true, -- ngx.upstream: the app's own upstream (`<app>`, `t.<app>`)
    shared_upstream = nil,  -- BlueKing 5.x: the one upstream whose servers are every APPO
    test_prefix = "t.",     -- /t/<app> goes to upstream test_prefix .. app
    path = "/container-healthcheck/apps",  -- the service's /apps (the feed is path .. "/feed")
    alive_path = "/container-healthcheck-alive",  -- answered by the APPO Nginx itself
    host_header = nil,      -- Host sent to APPOs (default: the APPO address)
    wait = 1,               -- seconds the service may hold a feed request: its heartbeat period
    grace = 0.5,            -- a heartbeat this late: the APPO Nginx is asked whether it is alive
    keep_stale = 30,        -- seconds an APPO whose Nginx answers but whose service does not keeps
                            -- its verdicts (0: none)
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
    shared_upstream = "string", test_prefix = "string", path = "string", alive_path = "string",
    host_header = "string", wait = "number", grace = "number", keep_stale = "number", interval = "number",
    timeout = "number", fall = "number", rise = "number", stale_after = "number", forget_after = "number",
    eject_statuses = "table", eject_hold = "number", eject_hold_max = "number", eject_memory = "number",
    max_body = "number",
}
local MAY_BE_ZERO = { keep_stale = true }
local WHOLE = { fall = true, rise = true, max_body = true }

M.conf = conf
M.feed_path = conf.path .. "/feed"
M.fixed_by_addr = {}   -- addr -> { app = true }: the fixed `apps` lists turned around once
M.eject_set = { [502] = true, [504] = true }  -- eject_statuses as a set
M.generation = 0       -- this configuration's load time: a reload's workers take the channels over

-- Derived from the options (see derive): how a feed round's time is shared between waiting
-- for the heartbeat and asking the APPO Nginx whether it lives, and how long a channel's lock
-- outlives a silent owner (a crashed worker): longer than the longest round.
M.heartbeat_slack = 0.25
M.alive_timeout = 0.25
M.own_ttl = 5

local function refuse(message)
    error("container_healthcheck.init: " .. message, 0)
end

-- An APPO address as the balancer can use it (set_current_peer takes an IP, not a name),
-- spelled as nginx spells it in $upstream_addr (no leading zeros, IPv6 in lower case): that
-- is how a retry and the log phase know which APPO an attempt went to. nil: not IP:port.
function M.canonical_addr(addr)
    if type(addr) ~= "string" then return nil end
    local a, b, c, d, port = addr:match("^(%d+)%.(%d+)%.(%d+)%.(%d+):(%d+)$")
    if a then
        return table.concat({ tonumber(a), tonumber(b), tonumber(c), tonumber(d) }, ".") .. ":" .. tonumber(port)
    end
    local v6, port6 = addr:match("^%[([%x:]+)%]:(%d+)$")
    if v6 then return "[" .. v6:lower() .. "]:" .. tonumber(port6) end
    return nil
end

local function check_addr_list(name, list)
    for i, addr in ipairs(list) do
        local canonical = M.canonical_addr(addr)
        if not canonical then
            refuse("option `" .. name .. "`: entry " .. i .. " must be \"IP:port\" (a name cannot be balanced to), not "
                   .. tostring(addr))
        end
        list[i] = canonical
    end
end

-- One option alone: its type and range.
local function check_one(k, v)
    if not TYPES[k] then refuse("unknown option `" .. tostring(k) .. "`") end
    if type(v) ~= TYPES[k] then
        refuse("option `" .. k .. "` must be a " .. TYPES[k] .. ", not " .. type(v))
    end
    if TYPES[k] == "number" then
        if v ~= v or v == math.huge then refuse("option `" .. k .. "` must be a finite number") end
        if MAY_BE_ZERO[k] then
            if v < 0 then refuse("option `" .. k .. "` must be >= 0") end
        elseif v <= 0 then
            refuse("option `" .. k .. "` must be > 0")
        end
        if WHOLE[k] and v ~= math.floor(v) then refuse("option `" .. k .. "` must be a whole number") end
    end
end

-- The options together: combinations that cannot work, each with its reason.
local function check_together(c)
    if c.wait > M.SERVICE_MAX_WAIT then
        refuse("option `wait` is " .. c.wait .. " but the service holds a feed request at most " ..
               M.SERVICE_MAX_WAIT .. " s (it refuses more with 400, which would take every APPO out)")
    end
    if c.grace < 0.1 then
        refuse("option `grace` must be >= 0.1: half of it waits for a late heartbeat, half asks the APPO Nginx")
    end
    if c.eject_hold > c.eject_hold_max then
        refuse("option `eject_hold` (" .. c.eject_hold .. ") must be <= `eject_hold_max` (" .. c.eject_hold_max .. ")")
    end
    local longest = math.max(c.eject_memory, c.keep_stale, 3 * c.interval, c.wait + c.grace)
    if c.forget_after < longest then
        refuse("option `forget_after` (" .. c.forget_after .. ") must be >= " .. longest ..
               " (eject_memory, keep_stale, 3 x interval and wait + grace): what it forgets, the others still need")
    end
    if c.stale_after and c.stale_after < c.interval + c.timeout then
        refuse("option `stale_after` must be >= interval + timeout (" .. (c.interval + c.timeout) ..
               "): an APPO would go stale between two polls")
    end
    if c.max_body < 1024 then refuse("option `max_body` must be >= 1024") end
    if c.path:sub(1, 1) ~= "/" then refuse("option `path` must start with /") end
    if c.alive_path:sub(1, 1) ~= "/" then refuse("option `alive_path` must start with /") end
    check_addr_list("appos", c.appos)
    for app, list in pairs(c.apps) do
        if type(app) ~= "string" or type(list) ~= "table" then
            refuse("option `apps` must map app names to lists of \"host:port\"")
        end
        check_addr_list("apps." .. app, list)
    end
    for i, status in ipairs(c.eject_statuses) do
        if type(status) ~= "number" or status < 500 or status > 599 or status ~= math.floor(status) then
            refuse("option `eject_statuses`: entry " .. i ..
                   " must be a 5xx status (a 4xx is the client's, not the APPO's)")
        end
    end
end

-- What the options imply, for the modules that use them.
local function derive(c)
    M.heartbeat_slack = c.grace / 2
    M.alive_timeout = c.grace / 2
    -- the longest round: a feed round (wait + grace) or an /apps poll (timeout + interval),
    -- plus a failed round's back-off (interval), and slack for a busy worker
    M.own_ttl = math.max(c.wait + c.grace, c.timeout + c.interval) + c.interval + 2
end

-- Check options and make them the configuration. Raises a clear error, and changes nothing,
-- for an unknown option, a wrong type or range, a combination that cannot work, or a dict
-- that is not declared.
function M.apply(options, shared, now)
    if options ~= nil and type(options) ~= "table" then refuse("options must be a table") end
    local merged = {}
    for k, v in pairs(conf) do merged[k] = v end
    for k, v in pairs(options or {}) do
        check_one(k, v)
        merged[k] = v
    end
    if not (options and options.stale_after) then
        merged.stale_after = merged.interval * (merged.fall + 1) + merged.timeout
    end
    check_together(merged)
    if not shared[merged.dict] then refuse("lua_shared_dict " .. merged.dict .. " is not declared") end
    for k, v in pairs(merged) do conf[k] = v end
    local by_addr = {}
    for app, list in pairs(conf.apps) do
        for _, addr in ipairs(list) do
            by_addr[addr] = by_addr[addr] or {}
            by_addr[addr][app] = true
        end
    end
    M.fixed_by_addr = by_addr
    local set = {}
    for _, status in ipairs(conf.eject_statuses) do set[status] = true end
    M.eject_set = set
    M.feed_path = conf.path .. "/feed"
    M.generation = now
    derive(conf)
end

-- The APPOs named in the configuration (appos, then apps), in order, and as a set.
function M.configured_appos()
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

return M
