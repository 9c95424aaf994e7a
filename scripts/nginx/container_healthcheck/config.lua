-- container_healthcheck.config: the options, their defaults and types, checked once by init()
-- in init_by_lua, and what is derived from them. A wrong option is an init_by_lua error: nginx
-- does not start, and a reload keeps the running configuration, with the reason in the error
-- log. (`nginx -t` does not run init_by_lua, so it cannot see it.)
local M = {}

-- Every option, with its default (nil: off) and its type: apply() refuses anything else.
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

M.conf = conf
M.feed_path = conf.path .. "/feed"
M.fixed_by_addr = {}   -- addr -> { app = true }: the fixed `apps` lists turned around once
M.eject_set = { [502] = true, [504] = true }  -- eject_statuses as a set
M.generation = 0       -- this configuration's load time: a reload's workers take the channels over

local function refuse(message)
    error("container_healthcheck.init: " .. message, 0)
end

-- Check options and make them the configuration. Raises a clear error, and changes nothing,
-- for an unknown option, a wrong type, a number not > 0 or a dict that is not declared.
function M.apply(options, shared, now)
    if options ~= nil and type(options) ~= "table" then refuse("options must be a table") end
    for k, v in pairs(options or {}) do
        if not TYPES[k] then refuse("unknown option `" .. tostring(k) .. "`") end
        if type(v) ~= TYPES[k] then
            refuse("option `" .. k .. "` must be a " .. TYPES[k] .. ", not " .. type(v))
        end
        if TYPES[k] == "number" and not (v > 0) then refuse("option `" .. k .. "` must be > 0") end
    end
    local dict = (options and options.dict) or conf.dict
    if not shared[dict] then refuse("lua_shared_dict " .. dict .. " is not declared") end
    for k, v in pairs(options or {}) do conf[k] = v end
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
    conf.stale_after = (options and options.stale_after) or conf.interval * (conf.fall + 1) + conf.timeout
    M.feed_path = conf.path .. "/feed"
    M.generation = now
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
