-- container_healthcheck.records: what the shared dict holds, key by key, and the records'
-- text format (pure: no dict access). The rules that change them are in state.lua.
--
-- Per app on an APPO (app|addr):
--   s:<app>|<addr>  health    "<1|0>|<streak>|<since>"
--   w:<app>|<addr>  why the app is not healthy there, in the service's words
--   e:<app>|<addr>  ejection  "<at>|<hold_until>|<count>|<cleared 0|1>|<votes>|<cause>"
--   k:<app>|<addr>  a request's connection there broke unanswered (a second within 30 s ejects)
-- Per APPO (addr):
--   fresh:<addr>    until when its verdicts count (ngx.now() seconds)
--   ok:<addr>       when its service last answered;  err:<addr> why it did not
--   stale:<addr>    since when its verdicts are kept while its service is silent and its Nginx lives
--   mode:<addr>     "feed" or "apps";  own:<addr> the worker whose timer runs its channel
--   p:<addr>        an app upstream's server that requests used (the channel is wanted)
--   ejq:<addr>      list: apps ejected there that its channel has to watch
--   apps:<addr>     registry: the apps with a health record there (written by its channel)
--   ejected:<addr>  registry: the apps ejected there (written by its channel)
-- Per app:
--   r:<app>         a request asked for it lately;  v:<app> its version (choices read again)
-- The whole entry:
--   changes                             moves with every version (workers read it once a ms)
--   reg:appos, reg:apps, reg:counters   registries kept by the supervisor (one writer)
--   new:appos, new:apps, new:counters   lists: what the request path added since
--   c:<family>|<labels>                 counters (metrics.lua); h:... heartbeat histogram
--   own:..., lock:..., log:...          locks and log rate limits
local format, match, tonumber, concat, gmatch = string.format, string.match, tonumber, table.concat, string.gmatch

local M = {}

function M.health_key(app, addr) return "s:" .. app .. "|" .. addr end
function M.reason_key(app, addr) return "w:" .. app .. "|" .. addr end
function M.ejection_key(app, addr) return "e:" .. app .. "|" .. addr end
function M.version_key(app) return "v:" .. app end
function M.broken_key(app, addr) return "k:" .. app .. "|" .. addr end
M.CHANGES_KEY = "changes"

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

-- An ejection record: { at, hold_until, count (ejections in a row), cleared, votes (failed
-- requests standing behind it), cause }, or nil.
function M.decode_ejection(value)
    if not value then return nil end
    local at, hold_until, count, cleared, votes, cause = match(value, "^([%d.]+)|([%d.]+)|(%d+)|([01])|(%d+)|(.*)$")
    if not at then return nil end
    return { at = tonumber(at), hold_until = tonumber(hold_until), count = tonumber(count),
             cleared = cleared == "1", votes = tonumber(votes), cause = cause }
end

function M.encode_ejection(e)
    return format("%.3f|%.3f|%d|%d|%d|%s", e.at, e.hold_until, e.count, e.cleared and 1 or 0, e.votes, e.cause)
end

-- A registry: a set of names kept as one value ("a b c"). Names never hold spaces (app codes,
-- host:port, counter keys built from them).
function M.decode_set(value)
    local set = {}
    if value then
        for name in gmatch(value, "[^ ]+") do set[name] = true end
    end
    return set
end

function M.encode_set(set)
    local names = {}
    for name in pairs(set) do names[#names + 1] = name end
    table.sort(names)
    return concat(names, " ")
end

return M
