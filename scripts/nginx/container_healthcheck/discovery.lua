-- container_healthcheck.discovery: which APPOs serve an app, from nginx's own tables (the
-- app's upstream through ngx.upstream, one shared upstream, or the configured lists), and
-- what the request path tells the channels to ask. No socket.
local config = require "container_healthcheck.config"
local state = require "container_healthcheck.state"

local ngx = ngx
local now_of = ngx.now
local match, ipairs, type, tonumber = string.match, ipairs, type, tonumber

local conf = config.conf
local M = {}

local ok_upstream, upstream = pcall(require, "ngx.upstream")
if not ok_upstream then upstream = nil end

-- "host:port" or "[v6]:port" -> host, port (80 when there is none).
function M.split_addr(addr)
    local host, port = match(addr, "^%[?([^%]]+)%]?:(%d+)$")
    if not host then return addr, 80 end
    return host, tonumber(port)
end

-- The host as set_current_peer takes it: an IPv6 address in brackets (nginx parses a bare
-- "::1" as a name with a port).
function M.peer_host(host)
    if host:find(":", 1, true) then return "[" .. host .. "]" end
    return host
end

-- Peers of an upstream as nginx has them: { {addr=, backup=} ... }, `down` servers left out,
-- each address of a multi-address name a peer of its own. nil when there is no such upstream.
function M.upstream_peers(name)
    if not (upstream and upstream.get_servers) then return nil end
    local servers = upstream.get_servers(name)
    if not servers then return nil end
    local peers = {}
    for _, s in ipairs(servers) do
        if not s.down then
            local addrs = type(s.addr) == "table" and s.addr or { s.addr }
            for _, addr in ipairs(addrs) do
                if type(addr) == "string" then
                    peers[#peers + 1] = { addr = addr, backup = s.backup and true or false }
                end
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
local peers_cache, peers_cache_size = {}, 0

-- The peers for a request and where they came from: "fixed" (apps), "own" (the app's own
-- upstream), "one" (shared_upstream: one upstream for every APPO) or "appos".
function M.peers_for(app, kind)
    local key = kind .. "|" .. app
    local now = now_of()
    local cached = peers_cache[key]
    if cached and now - cached.at < conf.interval then return cached.peers, cached.source end
    local peers, source
    if conf.apps[app] then
        peers, source = list_peers(conf.apps[app]), "fixed"
    elseif conf.use_upstream_module then
        peers, source = M.upstream_peers(kind == "t" and (conf.test_prefix .. app) or app), "own"
        if not peers and conf.shared_upstream then
            peers, source = M.upstream_peers(conf.shared_upstream), "one"
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
-- (p:<addr>), and that the app is in use (r:<app>). A name seen the first time is also pushed
-- on a list for the supervisor, which keeps the registries (one writer, no key scan). Names a
-- client can invent (anything that fell back to the shared upstream or appos) never become
-- keys: only nginx's own upstreams and the configured lists do.
local learned_at, learned_size = {}, 0

local function mark(dict, key, list, name, now)
    local ok, err = dict:add(key, now, conf.forget_after)
    if ok then
        -- announced, or forgotten again so that the next request announces it
        if not state.push(dict, list, name) then dict:delete(key) end
    elseif err == "exists" then
        state.set(dict, key, now, conf.forget_after)
    end
end

local function due(marker, now)
    local last = learned_at[marker]
    if last and now - last < conf.interval then return false end
    if not last then
        if learned_size > 10000 then learned_at, learned_size = {}, 0 end
        learned_size = learned_size + 1
    end
    learned_at[marker] = now
    return true
end

function M.learn(app, peers, source)
    if source ~= "own" and source ~= "one" and source ~= "fixed" then return end
    local now = now_of()
    local dict = state.dict()
    if source ~= "one" and due(app, now) then mark(dict, "r:" .. app, "new:apps", app, now) end
    if source ~= "fixed" then
        for _, peer in ipairs(peers) do
            if due("\0" .. peer.addr, now) then mark(dict, "p:" .. peer.addr, "new:appos", peer.addr, now) end
        end
    end
end

return M
