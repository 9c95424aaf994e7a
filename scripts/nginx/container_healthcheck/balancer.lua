-- container_healthcheck.balancer: the request path. balance() (balancer_by_lua) picks
-- round-robin among the APPOs where the app is usable, retries the next one, and FAILS OPEN to
-- all the app's APPOs when none is usable; a failed attempt ejects that APPO for that app.
-- No socket, no key scan: each worker reuses its reading of the dict until "ver" changes.
local ngx_balancer = require "ngx.balancer"
local config = require "container_healthcheck.config"
local discovery = require "container_healthcheck.discovery"
local state = require "container_healthcheck.state"

local ngx = ngx
local now_of, exit, ERROR = ngx.now, ngx.exit, ngx.ERROR
local WARN, ERR = ngx.WARN, ngx.ERR
local set_more_tries, get_last_failure, set_current_peer = ngx_balancer.set_more_tries,
    ngx_balancer.get_last_failure, ngx_balancer.set_current_peer
local gmatch, random, min, ipairs, tonumber = string.gmatch, math.random, math.min, ipairs, tonumber

local conf = config.conf
local M = {}

local MAX_ENTRIES = 10000  -- per-worker tables keyed by route and app start over past this

local choices, choices_size = {}, 0
local turns, turns_size = {}, 0

-- Which peers app may use now: (candidates, known usable, source).
local function candidates_for(app, kind, now)
    local key = kind .. "|" .. app
    local dict = state.dict()
    local ver = dict:get("ver") or 0
    local cached = choices[key]
    if cached and cached.ver == ver and now < cached.expires then
        return cached.candidates, cached.known, cached.source
    end
    local peers, source = discovery.peers_for(app, kind)
    discovery.learn(app, peers, source)
    local primary, backup, all = {}, {}, {}
    local expires = now + 1
    for _, peer in ipairs(peers) do
        if not peer.backup then all[#all + 1] = peer.addr end
        local yes, fresh = state.usable(dict, app, peer.addr, now)
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
            state.log_limited("nopeer", ERR, "no APPO at all for app ", app, " (", kind, "): check its upstream")
        else
            state.log_limited(source == "own" and ("open:" .. app) or "open:*", WARN, "no APPO known healthy for app ",
                              app, ": failing open to all ", #candidates)
        end
    end
    if not cached then
        if choices_size > MAX_ENTRIES then choices, choices_size = {}, 0 end
        choices_size = choices_size + 1
    end
    choices[key] = { ver = ver, expires = expires, candidates = candidates, known = known, source = source }
    return candidates, known, source
end

-- The peers a request for app may use, in order, and where to start: usable primaries,
-- else usable backups, else (failing open) every primary.
function M.choose(app, kind)
    local candidates, known, source = candidates_for(app, kind, now_of())
    if #candidates == 0 then return nil end
    -- Round-robin turns only for apps known usable somewhere; the rest start at random (no
    -- table that grows with every app name a client invents).
    local start
    if known then
        -- One turn per route and app: /o/<app> and /t/<app> have different peers, and a shared
        -- turn would send every other request of one of them to the same peer.
        local key = kind .. "|" .. app
        if not turns[key] then
            if turns_size > MAX_ENTRIES then turns, turns_size = {}, 0 end
            turns_size = turns_size + 1
        end
        start = (turns[key] or 0) % #candidates
        turns[key] = start + 1
    else
        start = random(#candidates) - 1
    end
    return candidates, start, source
end

-- A failed attempt at addr: eject, if app is one nginx or an APPO told us of (a name a client
-- made up never becomes a key).
local function attempt_failed(ctx, addr, cause)
    local dict = state.dict()
    if ctx.chc_source == "own" or ctx.chc_source == "fixed" or dict:get(state.health_key(ctx.chc_app, addr)) then
        state.eject(dict, ctx.chc_app, addr, cause)
    end
end

-- balancer_by_lua: set the peer for this try. kind: "o" (default) or "t" for /t/ routes.
function M.balance(app, kind)
    local ctx = ngx.ctx
    local candidates = ctx.chc_candidates
    if not candidates then
        local start, source
        candidates, start, source = M.choose(app or "", kind or "o")
        if not candidates then return exit(ERROR) end
        ctx.chc_candidates, ctx.chc_next, ctx.chc_app, ctx.chc_source = candidates, start, app or "", source
        ctx.chc_tried = {}
        if #candidates > 1 then set_more_tries(#candidates - 1) end
    else
        -- A retry: the previous attempt failed the way proxy_next_upstream says.
        local how, code = get_last_failure()
        if how == "failed" or (how == "next" and config.eject_set[code]) then
            attempt_failed(ctx, ctx.chc_tried[#ctx.chc_tried], how == "failed"
                and ("connection failed or timed out" .. (code and (", " .. code) or "")) or ("answered " .. code))
        end
    end
    local addr = candidates[ctx.chc_next % #candidates + 1]
    ctx.chc_next = ctx.chc_next + 1
    ctx.chc_tried[#ctx.chc_tried + 1] = addr
    local host, port = discovery.split_addr(addr)
    local ok, err = set_current_peer(host, port)
    if not ok then state.log(ERR, "set_current_peer ", addr, ": ", err) end
end

-- log_by_lua: the last attempt failed too (a POST that got a 502 is not retried): eject.
function M.log()
    local ctx = ngx.ctx
    local tried = ctx.chc_tried
    if not tried or #tried == 0 then return end
    local statuses = ngx.var.upstream_status
    if not statuses then return end
    local i = 0
    for status in gmatch(statuses, "[^,:%s]+") do
        i = i + 1
        local code = tonumber(status)
        if code and config.eject_set[code] and tried[i] then attempt_failed(ctx, tried[i], "answered " .. code) end
    end
end

return M
