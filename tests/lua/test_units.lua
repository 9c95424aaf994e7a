-- Unit tests of the entry balancer's pure parts and shared-dict rules, run inside a real nginx
-- worker by tests/test_lua_units.py (content_by_lua_file). One line per test: "ok <name>" or
-- "not ok <name>: <traceback>". ?feed=<path>: a feed answer rendered by the Python service.
local chc = require "container_healthcheck"
local u = chc._units
local dict = ngx.shared[u.conf.dict]
local out = {}

local function test(name, fn)
    dict:flush_all()
    local ok, err = xpcall(fn, debug.traceback)
    out[#out + 1] = (ok and "ok " or "not ok ") .. name .. (ok and "" or (": " .. tostring(err)))
end

local function eq(got, want, what)
    if got ~= want then
        error((what or "value") .. ": got " .. tostring(got) .. ", want " .. tostring(want), 2)
    end
end

local function state(app, addr)
    return dict:get("s:" .. app .. "|" .. addr)
end

local A = "127.0.0.2:8010"

test("the service's own feed answer parses (format 1)", function()
    local handle = assert(io.open(ngx.var.arg_feed, "rb"))
    local body = handle:read("*a")
    handle:close()
    local answer = assert(u.parse_feed(body))
    eq(answer.index, 42, "index")
    eq(answer.held, true, "held")
    local healthy, age = u.feed_line(answer, "bk_iam")
    eq(healthy, true, "bk_iam healthy")
    eq(age, 0.4, "bk_iam age")
    healthy, age = u.feed_line(answer, "demo")
    eq(healthy, false, "demo healthy")
    eq(age, 0, "no probe: age 0")
    eq(u.feed_line(answer, "bk"), false, "bk's own line, not bk_iam's")
    eq(u.feed_line(answer, "bk_i"), nil, "a prefix of an app is not that app")
    eq(u.feed_line(answer, "nope"), nil, "an absent app")
end)

test("unknown lines are ignored, a cut or foreign answer refused", function()
    local body = "container-healthcheck-feed 2\nindex 7\nheld 0\nzone east\napps 1\na 1 0.5 \nend\n"
    local answer = assert(u.parse_feed(body))
    eq(answer.index, 7)
    eq(answer.held, false)
    eq(u.feed_line(answer, "a"), true)
    eq(u.parse_feed(body:sub(1, -6)), nil, "cut short")
    eq(u.parse_feed('{"code":0}'), nil, "JSON")
    eq(u.parse_feed("container-healthcheck-feed 1\nheld 0\napps 0\nend\n"), nil, "no index")
end)

test("rise and fall: first sight believed, the service's verdict out at once, back after rise", function()
    eq(u.observe(dict, "a", A, true, 100, nil, 1), false)
    eq(state("a", A):sub(1, 1), "1", "first sight")
    u.observe(dict, "a", A, false, 101, state("a", A), 1)
    eq(state("a", A):sub(1, 1), "0", "fall 1: out at once")
    eq(u.observe(dict, "a", A, true, 102, state("a", A), 1), true, "rising")
    eq(state("a", A):sub(1, 1), "0", "one answer is not rise 2")
    u.observe(dict, "a", A, false, 103, state("a", A), 1)
    eq(state("a", A), "0|0|101", "a failure mid-rise starts over")
    u.observe(dict, "a", A, true, 104, state("a", A), 1)
    eq(u.observe(dict, "a", A, true, 105, state("a", A), 1), false)
    eq(state("a", A), "1|0|105", "rise 2: back in")
    u.observe(dict, "a", A, false, 106, state("a", A), 2)
    eq(state("a", A):sub(1, 1), "1", "fall 2 (/apps polls): one failure is not enough")
end)

test("an ejection holds until a health answer newer than the failure, and the hold", function()
    u.observe(dict, "a", A, true, 100, nil, 1)
    u.eject(dict, "a", A, "answered 502")
    local at, hold_until, count, cleared, cause = u.parse_ejection(dict:get("e:a|" .. A))
    eq(count, 1)
    eq(cleared, false)
    eq(cause, "answered 502")
    eq(hold_until - at, u.conf.eject_hold, "first hold")
    eq(u.usable(dict, "a", A, at), false, "ejected: not usable")
    u.eject(dict, "a", A, "answered 504")
    eq(select(3, u.parse_ejection(dict:get("e:a|" .. A))), 1, "ejecting what is out changes nothing")
    local now = hold_until + 0.1
    eq(u.consider_clear(dict, "a", A, false, 0, now), false, "unhealthy answer")
    eq(u.consider_clear(dict, "a", A, true, now - at + 0.5, now), false, "healthy, but from a probe before the failure")
    eq(u.consider_clear(dict, "a", A, true, 0.2, at + 0.5), false, "fresh, but within the hold")
    eq(u.consider_clear(dict, "a", A, true, 0.05, now), true, "fresh and past the hold")
    eq(select(4, u.parse_ejection(dict:get("e:a|" .. A))), true, "cleared")
end)

test("a peer that keeps failing is held longer each time, up to the cap", function()
    local holds = {}
    for i = 1, 7 do
        u.eject(dict, "a", A, "failed")
        local at, hold_until, count = u.parse_ejection(dict:get("e:a|" .. A))
        holds[i] = hold_until - at
        eq(count, i, "count")
        u.consider_clear(dict, "a", A, true, 0, hold_until + 1)  -- cleared, then fails again
    end
    eq(holds[2], 2 * holds[1])
    eq(holds[3], 4 * holds[1])
    eq(holds[7], u.conf.eject_hold_max, "capped")
    -- a peer quiet for eject_memory starts over
    local value = dict:get("e:a|" .. A)
    dict:set("e:a|" .. A, (value:gsub("^[%d.]+", tostring(ngx.now() - u.conf.eject_memory - 1))))
    u.eject(dict, "a", A, "failed")
    eq(select(3, u.parse_ejection(dict:get("e:a|" .. A))), 1, "starts over")
end)

test("usable: fresh data, healthy, not ejected", function()
    local now = ngx.now()
    u.observe(dict, "a", A, true, now, nil, 1)
    eq(u.usable(dict, "a", A, now), false, "never answered: not fresh")
    dict:set("fresh:" .. A, now + 1)
    eq(u.usable(dict, "a", A, now), true)
    eq(u.usable(dict, "a", A, now + 2), false, "stale")
    eq(u.usable(dict, "b", A, now), false, "unknown app")
end)

test("a feed answer applied: states written, an app gone from the list is out, a heartbeat clears", function()
    local st = { index = nil, listed = {}, rising = {}, ejected = {}, full_at = ngx.now() }
    dict:set("r:gone", 1)
    local first = assert(u.parse_feed("container-healthcheck-feed 1\nindex 5\nheld 0\napps 3\n" ..
        "a 1 0.1\nb 0 - exited\ngone 1 0.3\nend\n"))
    local now = ngx.now()
    u.apply_feed(dict, A, st, first, now)
    eq(state("a", A):sub(1, 1), "1")
    eq(state("gone", A):sub(1, 1), "1")
    eq(state("b", A), nil, "unhealthy, unknown and not asked for: no state")
    eq(dict:get("w:b|" .. A), "exited", "its reason is kept for the matrix")
    u.eject(dict, "a", A, "answered 502")
    local at, hold_until = u.parse_ejection(dict:get("e:a|" .. A))
    local second = assert(u.parse_feed("container-healthcheck-feed 1\nindex 6\nheld 1\napps 1\na 1 0.1\nend\n"))
    u.apply_feed(dict, A, st, second, hold_until + 0.5)
    eq(state("gone", A):sub(1, 1), "0", "gone from the APPO's list: out")
    eq(dict:get("w:gone|" .. A), "not on this APPO")
    eq(st.ejected.a, nil, "a fresh healthy line past the hold cleared the ejection")
    eq(select(4, u.parse_ejection(dict:get("e:a|" .. A))), true)
    u.eject(dict, "a", A, "answered 502")
    at, hold_until = u.parse_ejection(dict:get("e:a|" .. A))
    local heartbeat = assert(u.parse_feed("container-healthcheck-feed 1\nindex 6\nheld 1\napps 1\na 1 9.0\nend\n"))
    u.apply_feed(dict, A, st, heartbeat, hold_until + 0.5)
    eq(st.ejected.a, true, "a heartbeat whose probe predates the failure does not clear it")
end)

test("/apps answers of services without the feed: healthy list and reasons", function()
    local set, reasons = u.healthy_apps('{"code":0,"status":"ok","message":{"snapshot_age_s":0.1,' ..
        '"healthy":["a","b.c"],"unhealthy":{"d":"probe 502"},"apps":{}}}')
    eq(set.a and set["b.c"], true)
    eq(reasons.d, "probe 502")
    eq(u.healthy_apps('{"code":11}'), nil)
end)

test("round-robin turns are per route: /o/ and /t/ requests interleaved each reach both peers", function()
    local B = "127.0.0.3:8010"
    u.conf.apps.rr_app = { A, B }
    local now = ngx.now()
    for _, addr in ipairs({ A, B }) do
        dict:set("fresh:" .. addr, now + 60)
        dict:set("s:rr_app|" .. addr, "1|0|" .. now)
    end
    local seen = { o = {}, t = {} }
    for _ = 1, 4 do
        for _, kind in ipairs({ "o", "t" }) do
            local candidates, start = chc.choose("rr_app", kind)
            eq(#candidates, 2, "both peers usable")
            seen[kind][candidates[start + 1]] = true
        end
    end
    eq(seen.o[A] and seen.o[B], true, "/o/ reached both")
    eq(seen.t[A] and seen.t[B], true, "/t/ reached both")
    u.conf.apps.rr_app = nil
end)

ngx.header["Content-Type"] = "text/plain"
ngx.say(table.concat(out, "\n"))
