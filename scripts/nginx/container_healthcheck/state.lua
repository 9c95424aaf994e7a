-- container_healthcheck.state: the rules that change what the shared dict holds (rise/fall,
-- ejections and their clearing, an APPO's freshness, versions, counters), over the records
-- of records.lua. Every worker and every channel goes through here; nothing here opens a
-- socket, and nothing here scans the dict's keys.
local config = require "container_healthcheck.config"
local records = require "container_healthcheck.records"

local ngx = ngx
local shared, now_of, log_of = ngx.shared, ngx.now, ngx.log
local WARN, ERR = ngx.WARN, ngx.ERR
local gsub, sub, find, tostring, pairs, floor, min, max = string.gsub, string.sub, string.find, tostring, pairs,
    math.floor, math.min, math.max

local health_key, reason_key, ejection_key, version_key = records.health_key, records.reason_key,
    records.ejection_key, records.version_key
local decode_health, encode_health = records.decode_health, records.encode_health
local decode_ejection, encode_ejection = records.decode_ejection, records.encode_ejection

local conf = config.conf
local M = {}

local CLOCK_MARGIN = 0.1  -- seconds: see consider_clear

M.health_key, M.reason_key, M.ejection_key = health_key, reason_key, ejection_key

function M.dict()
    return shared[conf.dict]
end

function M.log(level, ...)
    log_of(level, "[container-healthcheck] ", ...)
end

-- At most one line per key per interval, across workers (the dict remembers who said it).
function M.log_limited(key, level, ...)
    if shared[conf.dict]:add("log:" .. key, true, conf.interval) then M.log(level, ...) end
end

local dict_full_said = false

local function say_full(err)
    if not dict_full_said then
        dict_full_said = true
        M.log(ERR, "lua_shared_dict ", conf.dict, " is full (", tostring(err or "evicting"),
              "): give it about 300 bytes per app per APPO plus 200 per APPO, e.g. 10m for 500 apps x 50 APPOs")
    end
end

-- Every write is checked: a full zone evicts entries (health, locks) silently.
function M.set(dict, key, value, exptime)
    local ok, err, forcible = dict:set(key, value, exptime or 0)
    if not ok or forcible then say_full(err) end
    return ok
end

-- Append to a list; false when the zone is full (lists never evict).
function M.push(dict, list, value)
    local length, err = dict:rpush(list, value)
    if not length then say_full(err); return false end
    return true
end

---------------------------------------------------------------------------------------------
-- Versions: each worker keeps its choice for an app until the app's version moves.

-- Something app's choice depends on changed there: every worker reads it again. A new
-- version key starts from the clock (ms), so a key that expired and came back never repeats
-- a version a worker still holds. The entry's change count moves too: a worker reads it
-- once a ms, and an app's version only after it moved (or when the app's choice is due).
M.bumps = 0  -- versions this worker moved: its own changes count at once

-- app's version moves (seed: where a new key starts)
local function move_version(dict, app, seed)
    local _, err = dict:incr(version_key(app), 1, seed, conf.forget_after)
    if err then say_full(err) end
end

-- the entry's change count moves, after the versions it announces
local function move_changes(dict, seed)
    M.bumps = M.bumps + 1
    local _, err = dict:incr(records.CHANGES_KEY, 1, seed)
    if err then say_full(err) end
end

function M.bump(dict, app)
    local seed = floor(now_of() * 1000)
    move_version(dict, app, seed)
    move_changes(dict, seed)
end

-- Something every app on an APPO depends on changed (its freshness): bump each of them, and
-- the change count once.
function M.bump_apps(dict, apps)
    local seed = floor(now_of() * 1000)
    for app in pairs(apps) do move_version(dict, app, seed) end
    move_changes(dict, seed)
end

---------------------------------------------------------------------------------------------
-- Counters for /container-healthcheck-metrics: "c:<family>|<labels>", never going down; a
-- new one is announced to the supervisor, which keeps the registry (see metrics.lua).

local function label_value(value)
    value = tostring(value)
    if find(value, "^[%w_.:%-%[%]]+$") then return value end
    return "-"
end
M.label_value = label_value

function M.count(dict, family, labels, n)
    local key = "c:" .. family .. "|" .. labels
    local value, err = dict:incr(key, n or 1, 0)
    if not value then say_full(err); return end
    if value == (n or 1) and not M.push(dict, "new:counters", key) then dict:delete(key) end
end

-- An error caught on the request path or in a timer: counted by where, said at most once per
-- interval per place.
function M.lua_error(where, err)
    local dict = shared[conf.dict]
    if dict then
        M.count(dict, "lua_errors_total", 'where="' .. where .. '"')
        M.log_limited("lua-error:" .. where, ERR, "Lua error in ", where, " (contained): ", tostring(err))
    end
end

---------------------------------------------------------------------------------------------
-- Health answers.

-- One observation of app on addr with rise and fall (value: its record as read). Returns
-- whether it is now rising (unhealthy, with answers saying healthy).
function M.observe(dict, app, addr, passed, now, value, fall)
    local health = decode_health(value)
    local changed = false
    if health == nil then
        health = { healthy = passed, streak = 0, since = now }  -- first sight: believe it at once
        changed = true
    elseif passed == health.healthy then
        if health.streak == 0 then return false end
        health.streak = 0
    else
        health.streak = health.streak + 1
        if health.streak >= (health.healthy and fall or conf.rise) then
            health.healthy, health.streak, health.since = passed, 0, now
            changed = true
            M.log_limited("change:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is now ",
                          health.healthy and "healthy" or "UNHEALTHY")
        end
    end
    if health.healthy then dict:delete(reason_key(app, addr)) end
    M.set(dict, health_key(app, addr), encode_health(health), conf.forget_after)
    -- the version moves after the record is written: a worker that sees it reads the new record
    if changed then M.bump(dict, app) end
    return not health.healthy and health.streak > 0
end

function M.healthy(dict, app, addr)
    local health = decode_health(dict:get(health_key(app, addr)))
    return health ~= nil and health.healthy
end

---------------------------------------------------------------------------------------------
-- Passive health: ejections.

function M.ejected(dict, app, addr)
    local e = decode_ejection(dict:get(ejection_key(app, addr)))
    return e ~= nil and not e.cleared
end

-- How many of peers other than addr are out for app on passive evidence alone: ejected while
-- their health answer says healthy.
local function ejected_while_healthy(dict, app, addr, peers, now)
    local out = 0
    for i = 1, #peers do
        local peer = peers[i]
        if peer ~= addr and M.is_fresh(dict, peer, now) and M.ejected(dict, app, peer)
                and M.healthy(dict, app, peer) then
            out = out + 1
        end
    end
    return out
end

-- How long a connection that broke without an answer waits for a second one (same app and
-- APPO) before it is forgotten.
M.BROKEN_WINDOW = 30

-- A request's connection to addr broke before any answer came back (see balancer.lua's
-- broke_unanswered). True when that is the second time for app on addr within BROKEN_WINDOW
-- (or the zone could not tell: evidence counts as before); the first is only remembered.
function M.broken_again(dict, app, addr)
    local key = records.broken_key(app, addr)
    local ok, err = dict:add(key, 1, M.BROKEN_WINDOW)
    if ok then return false end
    if err == "exists" then dict:delete(key) end
    return true
end

-- Take addr out for app now, for every worker, after a failed request there. peers: every
-- APPO of the app. Passive evidence alone never takes out more than half of them (at least
-- one) while their health answers say healthy (Envoy's max_ejection_percent). Returns "new",
-- "joined" (already out: one more failed request behind it), "capped", or nil (the zone is
-- full: nothing was written).
function M.eject(dict, app, addr, cause, peers)
    local key = ejection_key(app, addr)
    local now = now_of()
    local previous = decode_ejection(dict:get(key))
    if previous and not previous.cleared then
        previous.votes = previous.votes + 1
        local ttl = dict:ttl(key)  -- kept: an ejection that ends with its hold still does
        M.set(dict, key, encode_ejection(previous), (ttl and ttl > 0) and ttl or conf.forget_after)
        return "joined"
    end
    if peers and M.healthy(dict, app, addr) and
            ejected_while_healthy(dict, app, addr, peers, now) >= max(1, floor(#peers / 2)) then
        M.log_limited("capped:" .. app, WARN, "app ", app, ": a request failed on ", addr, " (", cause,
                      ") but half of its APPOs are out already on failed requests alone: ", addr, " stays in")
        return "capped"
    end
    local count = 1
    if previous and now - previous.at < conf.eject_memory then count = previous.count + 1 end
    local hold = min(conf.eject_hold * 2 ^ (count - 1), conf.eject_hold_max)
    cause = sub(gsub(cause, "[|%c]", " "), 1, 80)
    if not M.set(dict, key, encode_ejection({ at = now, hold_until = now + hold, count = count, cleared = false,
                                             votes = 1, cause = cause }), conf.forget_after) then
        return nil
    end
    -- The channel of addr learns which apps to clear from this queue (one reader: its owner).
    -- When the queue cannot take it (the zone is full), nobody would clear it: it ends with
    -- its hold instead.
    if M.push(dict, "ejq:" .. addr, app) then
        dict:expire("ejq:" .. addr, conf.forget_after)
    else
        dict:expire(key, hold)
    end
    M.bump(dict, app)
    M.log_limited("eject:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is OUT after a failed request (",
                  cause, "): for at least ", hold, " s, until a health answer newer than the failure says healthy")
    return "new"
end

-- A request that ejected addr turned out to have failed on every APPO it tried: the failure
-- was the request's, not addr's. Its vote is taken back; an ejection nobody else stands
-- behind ends now, without counting towards the next hold. Returns whether it ended.
function M.unvote(dict, app, addr)
    local key = ejection_key(app, addr)
    local e = decode_ejection(dict:get(key))
    if not e or e.cleared then return false end
    if e.votes > 1 then
        e.votes = e.votes - 1
        local ttl = dict:ttl(key)
        M.set(dict, key, encode_ejection(e), (ttl and ttl > 0) and ttl or conf.forget_after)
        return false
    end
    if e.count <= 1 then
        dict:delete(key)
    else
        e.cleared, e.count = true, e.count - 1
        M.set(dict, key, encode_ejection(e), conf.eject_memory)
    end
    M.bump(dict, app)
    return true
end

-- A health answer clears an ejection when it says healthy, its evidence (the probe it rests
-- on, age seconds old) is newer than the failure, and the hold has passed. Returns true when
-- app is no longer ejected there.
function M.consider_clear(dict, app, addr, healthy, age, now)
    local key = ejection_key(app, addr)
    local e = decode_ejection(dict:get(key))
    if not e or e.cleared then return true end
    -- now is when the answer arrived: its evidence is taken as CLOCK_MARGIN older than that,
    -- for the answer's transit and the age's rounding
    if not healthy or now - age - CLOCK_MARGIN <= e.at or now < e.hold_until then return false end
    e.cleared = true
    M.set(dict, key, encode_ejection(e), conf.eject_memory)
    M.bump(dict, app)
    M.log_limited("back:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is back in: its health answer ",
                  "after the failure says healthy")
    return true
end

---------------------------------------------------------------------------------------------
-- The key of an APPO's freshness: until when its verdicts count.
function M.fresh_key(addr)
    return "fresh:" .. addr
end

-- An APPO's freshness. apps: the apps with a record there (their versions move with it).

function M.is_fresh(dict, addr, now)
    local fresh = dict:get(M.fresh_key(addr))
    return fresh ~= nil and now <= fresh
end

-- The APPO's service answered: its data counts for fresh_for seconds.
function M.answered(dict, addr, now, fresh_for, apps)
    local before = dict:get(M.fresh_key(addr))
    M.set(dict, "ok:" .. addr, now, conf.forget_after)
    M.set(dict, M.fresh_key(addr), now + fresh_for, conf.forget_after)
    dict:delete("err:" .. addr)
    if dict:get("stale:" .. addr) then
        dict:delete("stale:" .. addr)
        M.log_limited("kept:" .. addr, WARN, "APPO ", addr, ": its health service answers again")
    end
    if not before or before < now then M.bump_apps(dict, apps) end
end

-- The APPO's service did not answer, and its Nginx does not either (refused, hung): out now,
-- not when its last answer ages.
function M.failed(dict, addr, err, apps)
    M.set(dict, "err:" .. addr, tostring(err), conf.forget_after)
    dict:delete("stale:" .. addr)
    -- Out now: every worker's choice is made again, also when its freshness had just lapsed
    -- (the workers read the clock only now and then, and would keep using it until then).
    if dict:get(M.fresh_key(addr)) then
        dict:delete(M.fresh_key(addr))
        M.bump_apps(dict, apps)
    end
    M.log_limited("poll:" .. addr, WARN, "APPO ", addr, " is OUT: its health service did not answer (",
                  tostring(err), ")")
end

-- The APPO's service did not answer in time but its Nginx does (the service hung, slow or
-- restarting, while the apps behind that Nginx serve users): its last verdicts stand, shown
-- stale, until keep_stale seconds after its last answer; failed requests still eject. Returns
-- false (and takes it out) when that time is over or it was out already.
function M.kept(dict, addr, err, now, apps, started)
    local ok_at = dict:get("ok:" .. addr)
    -- fresh when the round that found it silent began (its deadline and the Nginx check ran on)
    if conf.keep_stale <= 0 or not ok_at or now - ok_at > conf.keep_stale
            or not M.is_fresh(dict, addr, started or now) then
        M.failed(dict, addr, err, apps)
        return false
    end
    M.set(dict, "err:" .. addr, tostring(err), conf.forget_after)
    -- until the next round has looked again (a round, its back-off), never past keep_stale
    M.set(dict, M.fresh_key(addr), min(ok_at + conf.keep_stale, now + conf.wait + conf.grace + conf.interval),
          conf.forget_after)
    if not dict:get("stale:" .. addr) then
        M.set(dict, "stale:" .. addr, now, conf.forget_after)
        M.log_limited("kept:" .. addr, WARN, "APPO ", addr, ": its health service does not answer (", tostring(err),
                      ") but its Nginx does: its last verdicts stand, shown stale, for at most ", conf.keep_stale,
                      " s; failed requests still take it out")
    end
    return true
end

-- app on addr: (usable now, until when its data counts or nil, its health answer says
-- healthy and counts). Usable: fresh (or kept) data, healthy, not ejected.
function M.usable(dict, app, addr, now)
    local fresh = dict:get(M.fresh_key(addr))
    if not fresh or now > fresh then return false, nil, false end
    local health = decode_health(dict:get(health_key(app, addr)))
    if not (health and health.healthy) then return false, fresh, false end
    if M.ejected(dict, app, addr) then return false, fresh, true end
    return true, fresh, true
end

return M
