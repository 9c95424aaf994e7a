-- container_healthcheck.state: what the shared dict holds, read into plain fields and written
-- back, and the rules that change it (rise/fall, ejection and its clearing, usability). Every
-- worker and every channel goes through here; nothing here opens a socket.
--
-- Keys: "s:<app>|<addr>" health, "w:<app>|<addr>" why not healthy, "e:<app>|<addr>" ejection,
-- "fresh:<addr>" until when the APPO's last answer counts, "ok:<addr>" when it last answered,
-- "err:<addr>" why not, "ejq:<addr>" ejections its channel has to watch, "ver" bumped on
-- every change a choice depends on.
local config = require "container_healthcheck.config"

local ngx = ngx
local shared, now_of, log_of = ngx.shared, ngx.now, ngx.log
local WARN, ERR = ngx.WARN, ngx.ERR
local format, match, gsub, sub, tostring, tonumber = string.format, string.match, string.gsub, string.sub,
    tostring, tonumber
local min = math.min

local conf = config.conf
local M = {}

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

-- Every write is checked: a full zone evicts entries (health, locks) silently.
function M.set(dict, key, value, exptime)
    local ok, err, forcible = dict:set(key, value, exptime or 0)
    if (not ok or forcible) and not dict_full_said then
        dict_full_said = true
        M.log(ERR, "lua_shared_dict ", conf.dict, " is full (", tostring(err or "evicting"),
              "): give it about 200 bytes per app per APPO plus 100 per APPO, e.g. 10m for 500 apps x 50 APPOs")
    end
    return ok
end

-- Something a choice depends on changed: every worker's cached choices are read again.
function M.changed(dict)
    dict:incr("ver", 1, 0)
end

function M.health_key(app, addr) return "s:" .. app .. "|" .. addr end
function M.reason_key(app, addr) return "w:" .. app .. "|" .. addr end
function M.ejection_key(app, addr) return "e:" .. app .. "|" .. addr end

-- A health record: { healthy = bool, streak = answers against it so far, since = when it
-- last changed }, or nil.
function M.decode_health(value)
    if not value then return nil end
    local h, streak, since = match(value, "^([01])|(%-?%d+)|([%d.]+)$")
    if not h then return nil end
    return { healthy = h == "1", streak = tonumber(streak), since = tonumber(since) }
end

function M.encode_health(health)
    return (health.healthy and "1" or "0") .. "|" .. health.streak .. "|" .. health.since
end

-- An ejection record: { at, hold_until, count (ejections in a row), cleared, cause }, or nil.
function M.decode_ejection(value)
    if not value then return nil end
    local at, hold_until, count, cleared, cause = match(value, "^([%d.]+)|([%d.]+)|(%d+)|([01])|(.*)$")
    if not at then return nil end
    return { at = tonumber(at), hold_until = tonumber(hold_until), count = tonumber(count),
             cleared = cleared == "1", cause = cause }
end

function M.encode_ejection(e)
    return format("%.3f|%.3f|%d|%d|%s", e.at, e.hold_until, e.count, e.cleared and 1 or 0, e.cause)
end

-- One observation of app on addr with rise and fall (value: its record as read). Returns
-- whether it is now rising (unhealthy, with answers saying healthy).
function M.observe(dict, app, addr, passed, now, value, fall)
    local health = M.decode_health(value)
    if health == nil then
        health = { healthy = passed, streak = 0, since = now }  -- first sight: believe it at once
        M.changed(dict)
    elseif passed == health.healthy then
        if health.streak == 0 then return false end
        health.streak = 0
    else
        health.streak = health.streak + 1
        if health.streak >= (health.healthy and fall or conf.rise) then
            health.healthy, health.streak, health.since = passed, 0, now
            M.changed(dict)
            M.log_limited("change:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is now ",
                          health.healthy and "healthy" or "UNHEALTHY")
        end
    end
    if health.healthy then dict:delete(M.reason_key(app, addr)) end
    M.set(dict, M.health_key(app, addr), M.encode_health(health), conf.forget_after)
    return not health.healthy and health.streak > 0
end

function M.ejected(dict, app, addr)
    local e = M.decode_ejection(dict:get(M.ejection_key(app, addr)))
    return e ~= nil and not e.cleared
end

-- Take addr out for app now, for every worker. Idempotent while it is out.
function M.eject(dict, app, addr, cause)
    local key = M.ejection_key(app, addr)
    local now = now_of()
    local count = 1
    local previous = M.decode_ejection(dict:get(key))
    if previous then
        if not previous.cleared then return end
        if now - previous.at < conf.eject_memory then count = previous.count + 1 end
    end
    local hold = min(conf.eject_hold * 2 ^ (count - 1), conf.eject_hold_max)
    cause = sub(gsub(cause, "[|%c]", " "), 1, 80)
    M.set(dict, key, M.encode_ejection({ at = now, hold_until = now + hold, count = count, cleared = false,
                                         cause = cause }), conf.forget_after)
    -- The channel of addr learns which apps to clear from this queue (one reader: its owner).
    dict:lpush("ejq:" .. addr, app)
    dict:expire("ejq:" .. addr, conf.forget_after)
    dict:incr("stat:ejections", 1, 0)
    M.changed(dict)
    M.log_limited("eject:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is OUT after a failed request (",
                  cause, "): for at least ", hold, " s, until a health answer newer than the failure says healthy")
end

-- A health answer clears an ejection when it says healthy, its evidence (the probe it rests
-- on, age seconds old) is newer than the failure, and the hold has passed. Returns true when
-- app is no longer ejected there.
function M.consider_clear(dict, app, addr, healthy, age, now)
    local key = M.ejection_key(app, addr)
    local e = M.decode_ejection(dict:get(key))
    if not e or e.cleared then return true end
    if not healthy or now - age <= e.at or now < e.hold_until then return false end
    e.cleared = true
    M.set(dict, key, M.encode_ejection(e), conf.eject_memory)
    M.changed(dict)
    M.log_limited("back:" .. app .. "|" .. addr, WARN, "app ", app, " on ", addr, " is back in: its health answer ",
                  "after the failure says healthy")
    return true
end

-- The APPO's service answered: its data counts for fresh_for seconds.
function M.answered(dict, addr, now, fresh_for)
    local before = dict:get("fresh:" .. addr)
    M.set(dict, "ok:" .. addr, now, conf.forget_after)
    M.set(dict, "fresh:" .. addr, now + fresh_for, conf.forget_after)
    dict:delete("err:" .. addr)
    if not before or before < now then M.changed(dict) end
end

-- The APPO's service did not answer: out now, not when its last answer ages.
function M.failed(dict, addr, err, now)
    M.set(dict, "err:" .. addr, tostring(err), conf.forget_after)
    local fresh = dict:get("fresh:" .. addr)
    if fresh and fresh > now then
        dict:delete("fresh:" .. addr)
        M.changed(dict)
    end
    M.log_limited("poll:" .. addr, WARN, "APPO ", addr, " is OUT: its health service did not answer (", tostring(err), ")")
end

function M.is_fresh(dict, addr, now)
    local fresh = dict:get("fresh:" .. addr)
    return fresh ~= nil and now <= fresh
end

-- Is app usable on addr: fresh data, healthy, not ejected? Also returns until when (fresh).
function M.usable(dict, app, addr, now)
    local fresh = dict:get("fresh:" .. addr)
    if not fresh or now > fresh then return false end
    local health = M.decode_health(dict:get(M.health_key(app, addr)))
    if not (health and health.healthy) then return false end
    if M.ejected(dict, app, addr) then return false end
    return true, fresh
end

return M
