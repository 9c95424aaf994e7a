-- container_healthcheck.feed: the service's answers read without decoding more than needed
-- (pure). The feed's text format is documented in README ("The entry's feed") and rendered by
-- healthcheck/feed_format.py; tests/test_lua_units.py holds both sides to it.
local find, match, sub, tonumber = string.find, string.match, string.sub, tonumber
local huge = math.huge

local M = {}

-- A line's probe age: "-" (no probe applies: the verdict is as new as the answer) is 0; "?"
-- (unknown) or anything else that is not a number is older than anything.
local function age_of(text)
    if text == "-" then return 0 end
    return tonumber(text) or huge
end
M.age_of = age_of

-- A feed answer (format 1): { index=, held=, body=, apps_at= } (the app lines start at
-- apps_at), or nil, error. Lines it does not know are ignored.
function M.parse(body)
    if not find(body, "^container%-healthcheck%-feed %d+\n") then return nil, "not a feed answer" end
    if sub(body, -5) ~= "\nend\n" then return nil, "feed answer cut short" end
    local apps_at = find(body, "\napps %d+\n")
    local index = tonumber(match(body, "\nindex (%d+)\n"))
    if not apps_at or not index then return nil, "feed answer without index or apps" end
    return { index = index, held = find(body, "\nheld 1\n", 1, true) ~= nil, body = body,
             apps_at = find(body, "\n", apps_at + 1, true) + 1 }
end

-- The line of one app in a parsed answer: healthy (bool), age of its probe (seconds, see
-- age_of), or nil when the app is not listed.
function M.line(answer, app)
    local at = find(answer.body, "\n" .. app .. " ", answer.apps_at - 1, true)
    if not at then return nil end
    local h, age = match(answer.body, "^ ([01]) ([^ \n]+)", at + 1 + #app)
    if not h then return nil end
    return h == "1", age_of(age)
end

-- Every app line of a parsed answer, for a for-in loop: app, healthy (bool), age, reason.
function M.lines(answer)
    local next_line = string.gmatch(sub(answer.body, answer.apps_at), "([^ \n]+) ([01]) ([^ \n]+) ?([^\n]*)\n")
    return function()
        local app, h, age, why = next_line()
        if not app then return nil end
        return app, h == "1", age_of(age), why
    end
end

-- The healthy list of an /apps answer (services without the feed, 2.1 and older) and the
-- short reasons of the others. Returns the healthy set and the reasons, or nil, error.
function M.healthy_apps(body)
    if not find(body, '^{"code":0,') then return nil, "unexpected /apps answer" end
    local list = match(body, '"healthy":%[(.-)%]')
    if not list then return nil, "no healthy list in /apps answer" end
    local set = {}
    for app in string.gmatch(list, '"([A-Za-z0-9_.-]+)"') do set[app] = true end
    local reasons = {}
    local others = match(body, '"unhealthy":{([^}]*)}')
    if others then
        for app, why in string.gmatch(others, '"([A-Za-z0-9_.-]+)":"([^"]*)"') do reasons[app] = sub(why, 1, 60) end
    end
    return set, reasons
end

-- Whether the part of an /apps answer read so far holds what healthy_apps needs.
function M.apps_head_complete(body)
    return find(body, '"unhealthy":{[^}]*}') ~= nil
        or (find(body, '"healthy":%[[^%]]*%]') ~= nil and find(body, '"apps":', 1, true) ~= nil)
end

return M
