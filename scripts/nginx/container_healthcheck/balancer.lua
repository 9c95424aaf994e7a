-- container_healthcheck.balancer: the request path. balance() (balancer_by_lua) picks
-- round-robin among the APPOs where the app is usable and retries the next one; when none is
-- usable it FAILS OPEN, first to the APPOs whose health answer says healthy (ejected on failed
-- requests alone), else to all of them (Envoy's panic mode keeps this order). A failed attempt
-- ejects that APPO for that app at once (a connection that broke unanswered: at its second);
-- a request that failed on every APPO it tried takes its ejections back (the failure was the
-- request's). Both phases are contained: a Lua error sends the request where nginx would
-- without the Lua, never a 500.
-- No socket, no key scan: each worker keeps its choice for an app until the app's version
-- moves (the entry's change count read once a ms, an app's version only after it moved).
local ngx_balancer = require "ngx.balancer"
local config = require "container_healthcheck.config"
local discovery = require "container_healthcheck.discovery"
local state = require "container_healthcheck.state"
local records = require "container_healthcheck.records"

local ngx = ngx
local now_of, shared = ngx.now, ngx.shared
local WARN = ngx.WARN
local set_more_tries, get_last_failure, set_current_peer = ngx_balancer.set_more_tries,
    ngx_balancer.get_last_failure, ngx_balancer.set_current_peer
local gmatch, random, min, tonumber, pcall, concat = string.gmatch, math.random, math.min, tonumber, pcall,
    table.concat

local conf = config.conf
local CHANGES_KEY = records.CHANGES_KEY
local M = {}

local MAX_ENTRIES = 10000  -- per-worker choices start over past this many apps (names clients invent)
-- A choice is made again from scratch at least this often: what changes by time alone and moves
-- no version only when the zone misbehaves (full: an ejection then ends with its hold; keys
-- evicted) is seen within it.
local REMAKE_S = 5

-- Per worker: kind ("o", "t") -> app -> choice (see choose).
local choices = { o = {}, t = {} }
local choices_size = 0

-- host and port of each address, split once per worker
local split_cache, split_size = {}, 0
local function peer_of(addr)
    local peer = split_cache[addr]
    if not peer then
        local host, port = discovery.split_addr(addr)
        peer = { addr = addr, host = discovery.peer_host(host), port = port }
        if split_size > MAX_ENTRIES then split_cache, split_size = {}, 0 end
        split_size = split_size + 1
        split_cache[addr] = peer
    end
    return peer
end

-- Per worker: each APPO's freshness deadline (fresh:<addr>) as last read (false: not fresh),
-- read again only once it has passed. While an APPO answers, its deadline only moves on; an
-- APPO that stops counting or counts again moves its apps' versions (state.answered, failed,
-- kept), which a choice sees from its version: what this has to see is a deadline passing by
-- time alone (a channel that stopped), and it does, at the deadline.
local fresh_memo, fresh_memo_size = {}, 0

local function remember_fresh(key, value)
    if fresh_memo[key] == nil then
        if fresh_memo_size > MAX_ENTRIES then fresh_memo, fresh_memo_size = {}, 0 end
        fresh_memo_size = fresh_memo_size + 1
    end
    fresh_memo[key] = value
end

local function fresh_until(dict, key, now)
    local deadline = fresh_memo[key]
    if deadline == nil or (deadline and now > deadline) then
        deadline = dict:get(key) or false
        remember_fresh(key, deadline)
    end
    return deadline
end

-- A choice: { ver, expires, peers (the candidates: {addr, host, port}), n, tier, source,
-- all (every primary address, for the ejection cap), known (set of all the app's addresses),
-- turn }. tier: "usable"; "healthy"
-- (failing open to the APPOs whose health answer says healthy); "all" (failing open to
-- every APPO); "none" (no APPO at all).
local function choose(app, kind, now, dict, ver, quiet)
    local peers, source = discovery.peers_for(app, kind)
    if not quiet then discovery.learn(app, peers, source) end
    local usable, usable_backup, healthy, healthy_backup, primary, every = {}, {}, {}, {}, {}, {}
    local expires, watch = now + 1, {}
    for i = 1, #peers do
        local p = peers[i]
        local addr = p.addr
        every[#every + 1] = addr
        if not p.backup then primary[#primary + 1] = addr end
        local yes, fresh, says_healthy = state.usable(dict, app, addr, now)
        if fresh then expires = min(expires, fresh) end
        local key = state.fresh_key(addr)
        watch[i] = { key = key, fresh = fresh ~= nil }
        remember_fresh(key, fresh or false)
        if yes then
            local list = p.backup and usable_backup or usable
            list[#list + 1] = addr
        elseif says_healthy then
            local list = p.backup and healthy_backup or healthy
            list[#list + 1] = addr
        end
    end
    local tier, chosen = "usable", usable
    if #chosen == 0 then chosen = usable_backup end
    if #chosen == 0 then tier, chosen = "healthy", healthy end
    if #chosen == 0 then chosen = healthy_backup end
    if #chosen == 0 then
        -- none says healthy: every primary, but those failed requests took out only if all were
        tier = "all"
        local base, live = #primary > 0 and primary or every, {}
        for i = 1, #base do
            if not state.ejected(dict, app, base[i]) then live[#live + 1] = base[i] end
        end
        chosen = #live > 0 and live or base
    end
    if #chosen == 0 then tier = "none" end
    if quiet then
        return { tier = tier, n = #chosen }
    elseif tier == "none" then
        state.log_limited("nopeer", WARN, "no APPO at all for app ", app, " (", kind,
                          "): answered 502, as nginx does for an app without an upstream")
    elseif tier ~= "usable" then
        state.log_limited(source == "own" and ("open:" .. app) or "open:*", WARN, "no APPO usable for app ", app,
                          tier == "healthy" and ": failing open to the " or ": failing open to all ", #chosen,
                          tier == "healthy" and " whose health answer says healthy (out on failed requests alone): "
                              or " (none says healthy): ", concat(chosen, ", "))
    end
    local list, known = {}, {}
    for i = 1, #chosen do list[i] = peer_of(chosen[i]) end
    for i = 1, #every do known[every[i]] = true end
    return { ver = ver, expires = expires, peers = list, n = #list, tier = tier, source = source,
             all = #primary > 0 and primary or every, known = known, turn = random(#list > 0 and #list or 1) - 1,
             vkey = records.version_key(app), watch = watch, made = now }
end

-- A cached choice whose time is up still stands when nothing it rests on changed by time
-- alone: each APPO still fresh (or still not) as it was judged. Every other change (health,
-- ejections, an APPO out or back) moves the app's version; the app's peers (its upstream)
-- are looked at again when the choice is made again, at least every REMAKE_S. No dict read
-- unless an APPO's deadline passed: a few table reads, once a second per app per worker.
local function still_stands(choice, dict, now)
    if now - choice.made >= REMAKE_S then return false end
    local expires, watch = now + 1, choice.watch
    for i = 1, #watch do
        local deadline = fresh_until(dict, watch[i].key, now)
        local is_fresh = deadline and now <= deadline or false
        if is_fresh ~= watch[i].fresh then return false end
        if is_fresh then expires = min(expires, deadline) end
    end
    choice.expires = expires
    return true
end

-- Per worker: the entry's change count as last read, when (ngx.now(), ms) and after how many
-- of this worker's own version moves, and an epoch that moves with it. A choice checked
-- against its app's version in the current epoch stands without reading the version again.
local seen_changes, seen_at, seen_bumps, epoch = false, false, -1, 0

-- The choice for app now: the worker's own while the app's version has not moved. The
-- version is read only when the entry's change count moved (read at most once per ms and
-- after each change this worker made: another worker's change counts from this worker's
-- next ms) or the choice is due.
local function choice_for(app, kind)
    local dict = shared[conf.dict]
    local by_kind = choices[kind] or choices.o
    local cached = by_kind[app]
    local now = now_of()
    local bumps = state.bumps
    if now ~= seen_at or bumps ~= seen_bumps then
        seen_at, seen_bumps = now, bumps
        local changes = dict:get(CHANGES_KEY) or false
        if changes ~= seen_changes then seen_changes, epoch = changes, epoch + 1 end
    end
    local ver
    if cached then
        if cached.epoch ~= epoch then
            ver = dict:get(cached.vkey) or false
            if cached.ver == ver then cached.epoch = epoch end
        end
        if cached.epoch == epoch then  -- its version has not moved
            -- expiry is the safety net for a channel that stopped (its APPO's answers age
            -- without anyone saying so)
            if now < cached.expires or still_stands(cached, dict, now) then return cached end
            ver = cached.ver
        end
    else
        ver = dict:get(records.version_key(app)) or false
    end
    local fresh = choose(app, kind, now, dict, ver)
    fresh.epoch = epoch
    if cached then
        fresh.turn = cached.turn
    else
        if choices_size > MAX_ENTRIES then
            choices, choices_size = { o = {}, t = {} }, 0
            by_kind = choices[kind] or choices.o
        end
        choices_size = choices_size + 1
    end
    by_kind[app] = fresh
    return fresh
end

-- How app's requests would be sent now ("usable", "healthy", "all", "none"), for the status
-- page and metrics: no request is made to count, nothing is learned or logged.
function M.tier(app, kind)
    local dict = state.dict()
    return choose(app, kind or "o", now_of(), dict, false, true).tier
end

-- The peers a request for app may use now, where it starts (the turn moves on, as for a
-- request), the source and the tier: what balance() does, without a request (for tests).
function M.choose(app, kind)
    local choice = choice_for(app, kind or "o")
    if choice.n == 0 then return nil end
    local list = {}
    for i = 1, choice.n do list[i] = choice.peers[i].addr end
    local start = choice.turn % choice.n
    choice.turn = start + 1
    return list, start, choice.source, choice.tier
end

local FAILURE_LABEL = { [502] = "http_502", [504] = "http_504" }

-- The labels of an app x APPO counter.
local function peer_labels(app, addr)
    return 'app="' .. state.label_value(app) .. '",appo="' .. state.label_value(addr) .. '"'
end

-- The values of an $upstream_* variable for the request's last pass through an upstream, in
-- order. nginx separates attempts with ", " and passes (an internal redirect; in the balancer
-- of a retry, the attempt being set up, which has no value yet) with " : ".
function M.last_pass(text)
    local pass, current = {}, {}
    for token in gmatch(text or "", "[^%s,]+") do
        if token == ":" then
            if #current > 0 then pass = current end
            current = {}
        else
            current[#current + 1] = token
        end
    end
    return #current > 0 and current or pass
end

-- The APPOs a request tried so far in its last pass, in order ("a : " in the balancer of a
-- retry: a was tried).
local function tried_addrs()
    return M.last_pass(ngx.var.upstream_addr)
end

-- Did the request's last attempt (code: its status) break unanswered after its connection
-- was made or reused: a 502 with a connect time and no header time? That is what an idle
-- keepalive connection the APPO closed as the request went out on it looks like (its Nginx
-- reloaded, or timed the connection out), and nginx itself does not hold such a failure
-- against a server. A refused connection has no connect time; a timeout is a 504.
local function broke_unanswered(code)
    if code ~= 502 then return false end
    local connects, headers = M.last_pass(ngx.var.upstream_connect_time), M.last_pass(ngx.var.upstream_header_time)
    local connect, header = connects[#connects], headers[#headers]
    return connect ~= nil and connect ~= "-" and (header == nil or header == "-")
end

-- Did the request try its last APPO before, in the same pass? nginx gives back a try that
-- broke on a kept connection, so one request can come back to an APPO: its second broken
-- connection there is the same event (one reload closed both), not a second one.
local function tried_before(tried)
    local last = tried[#tried]
    for i = 1, #tried - 1 do
        if tried[i] == last then return true end
    end
    return false
end

-- An attempt at addr failed: eject it for app, if it is one of the app's APPOs and the app is
-- one nginx or an APPO told us of (a name a client made up never becomes a key). A connection
-- that broke unanswered (broken) ejects only the second time within state.BROKEN_WINDOW: an
-- APPO that breaks every connection is still taken out, one reload is not. The request
-- remembers the ejections it made (ngx.ctx, on this rare path only), to take them back if
-- the failure turns out to be its own.
local function attempt_failed(app, choice, addr, cause, label, broken)
    if not choice.known[addr] then return end
    local dict = state.dict()
    if not (choice.source == "own" or choice.source == "fixed" or dict:get(state.health_key(app, addr))) then return end
    if broken and not state.broken_again(dict, app, addr) then
        state.log_limited("broken:" .. addr, WARN, "a connection to APPO ", addr, " broke unanswered (app ", app,
                          "): not taken out unless it happens again within ", state.BROKEN_WINDOW, " s")
        return
    end
    local outcome = state.eject(dict, app, addr, cause, choice.all)
    local labels = peer_labels(app, addr)
    if outcome == "new" or outcome == "joined" then
        if outcome == "new" then state.count(dict, "ejections_total", labels .. ',cause="' .. label .. '"') end
        local ctx = ngx.ctx
        local mine = ctx.chc_ejected
        if not mine then mine = {}; ctx.chc_ejected = mine end
        mine[#mine + 1] = addr
    elseif outcome == "capped" then
        state.count(dict, "ejections_capped_total", labels)
    end
end

-- The first attempt: the next peer in turn. No per-request state is kept (no ngx.ctx): a
-- retry learns what was tried from nginx itself.
local function first_attempt(app, choice)
    local n = choice.n
    local start = choice.turn % n
    choice.turn = start + 1
    -- The upstream's only server is `down`, so nginx counts no try of its own: n tries in
    -- all, one per APPO (an old snippet without `down` gives one more).
    set_more_tries(n)
    if choice.tier ~= "usable" then
        -- an app name nginx has no upstream for (a client may make one up) is not a label
        local known = choice.source == "own" or choice.source == "fixed"
        local dict, labels = state.dict(), 'app="' .. (known and state.label_value(app) or "-") .. '"'
        state.count(dict, "fail_open_total", labels)
        if choice.tier == "all" then state.count(dict, "fail_open_panic_total", labels) end
    end
    return choice.peers[start + 1]
end

-- A retry: the previous attempt failed the way proxy_next_upstream says. nginx reports a
-- refused or reset connection as 502, a timeout as 504, and marks answered 502/504 "failed"
-- too: the status decides, as eject_statuses says. Then the first peer of the app's choice
-- now (an ejection moves it) that this request has not tried, in turn; if it tried them all,
-- the next in turn.
local function retry(app, kind, choice, code)
    local tried = tried_addrs()
    local last = tried[#tried]
    local broken = broke_unanswered(code)
    if last and code and config.eject_set[code] and not (broken and tried_before(tried)) then
        attempt_failed(app, choice, last, "failed with " .. code, FAILURE_LABEL[code] or "http_5xx", broken)
        choice = choice_for(app, kind)
        if choice.n == 0 then return nil end
    end
    local n = choice.n
    local start = choice.turn % n
    choice.turn = start + 1
    for i = 0, n - 1 do
        local peer = choice.peers[(start + i) % n + 1]
        local seen = false
        for j = 1, #tried do
            if tried[j] == peer.addr then seen = true; break end
        end
        if not seen then return peer end
    end
    return choice.peers[start + 1]
end

local function balance(app, kind)
    app, kind = app or "", kind or "o"
    local choice = choice_for(app, kind)
    if choice.n == 0 then
        state.count(state.dict(), "no_peer_total", "")
        return  -- no peer set: the upstream's only server is `down`, nginx answers 502
    end
    local how, code = get_last_failure()
    local peer
    if how then peer = retry(app, kind, choice, code) else peer = first_attempt(app, choice) end
    if not peer then return end
    local ok, err = set_current_peer(peer.host, peer.port)
    if not ok then error("set_current_peer " .. peer.addr .. ": " .. tostring(err)) end
end

-- Where nginx would send the request without the Lua: a random server of the app's own
-- upstream, else of the shared one, else a configured APPO. Nothing found: no peer, 502.
local function fallback(app, kind)
    local peers = discovery.upstream_peers(kind == "t" and (conf.test_prefix .. app) or app)
        or (conf.shared_upstream and discovery.upstream_peers(conf.shared_upstream)) or {}
    local addrs = {}
    for i = 1, #peers do addrs[i] = peers[i].addr end
    if #addrs == 0 then addrs = conf.appos end
    if #addrs == 0 then return end
    local host, port = discovery.split_addr(addrs[random(#addrs)])
    local ok, err = set_current_peer(discovery.peer_host(host), port)
    if not ok then error("set_current_peer: " .. tostring(err)) end
end

-- balancer_by_lua: set the peer for this try. kind: "o" (default) or "t" for /t/ routes.
function M.balance(app, kind)
    local ok, err = pcall(balance, app, kind)
    if not ok then
        state.lua_error("balance", err)
        ok, err = pcall(fallback, tostring(app or ""), kind)
        if not ok then state.lua_error("balance", err) end
    end
end

-- log_by_lua: the last attempt failed too (a POST that got a 502 is not retried): eject. A
-- request that failed on every APPO it tried, two or more, ejects nobody (the failure was
-- the request's: one endpoint broken everywhere), and takes back what it ejected.
local function log(app, kind)
    local eject_set = config.eject_set
    -- The last attempt did not fail (earlier ones were seen at their retry): most requests.
    if not eject_set[ngx.status] then return end
    -- log() without the app (the shipped snippet: no variable read for a request that did not
    -- fail): the snippet's name for it, and the route from the URI (/t/ or /o/)
    if not app then
        app = ngx.var.chc_app
        if not app then return end
        kind = (ngx.var.uri or ""):sub(1, 3) == "/t/" and "t" or "o"
    end
    local statuses = ngx.var.upstream_status
    if not statuses then return end
    local codes, failed = {}, 0
    local pass = M.last_pass(statuses)
    for i = 1, #pass do
        local code = tonumber(pass[i])
        codes[#codes + 1] = code
        if code and eject_set[code] then failed = failed + 1 end
    end
    local last_code = codes[#codes]
    if not (last_code and eject_set[last_code]) then return end
    local tried = tried_addrs()
    local addr = tried[#tried]
    if not addr then return end
    local choice = choice_for(app, kind or "o")
    local distinct, seen = 0, {}
    for i = 1, #tried do
        if not seen[tried[i]] then seen[tried[i]] = true; distinct = distinct + 1 end
    end
    -- The request's own failure only when every APPO it tried answered it (an answer's header
    -- came back): a refused or timed-out connection is evidence against that APPO.
    local answered, header_times = 0, M.last_pass(ngx.var.upstream_header_time)
    for i = 1, #header_times do
        if header_times[i] ~= "-" then answered = answered + 1 end
    end
    if failed == #codes and answered == #codes and distinct >= 2 then
        local dict = state.dict()
        for _, mine in ipairs(ngx.ctx.chc_ejected or {}) do
            if state.unvote(dict, app, mine) then
                state.count(dict, "ejections_reverted_total", peer_labels(app, mine))
            end
        end
        state.log_limited("everywhere:" .. app, WARN, "a request for app ", app, " failed on every APPO it tried (",
                          statuses, "): the request's failure, not theirs; none is taken out")
        return
    end
    local broken = broke_unanswered(last_code)
    if broken and tried_before(tried) then return end
    attempt_failed(app, choice, addr, "failed with " .. last_code, FAILURE_LABEL[last_code] or "http_5xx", broken)
end

-- log(app, kind): the same arguments as balance(); log() reads $chc_app and the route from
-- the URI, and only when the request failed.
function M.log(app, kind)
    local ok, err = pcall(log, app, kind)
    if not ok then state.lua_error("log", err) end
end

return M
