-- Unit tests of the entry balancer's pure parts and shared-dict rules, run inside a real nginx
-- worker by tests/test_lua_units.py (content_by_lua_file). One line per test: "ok <name>" or
-- "not ok <name>: <traceback>". ?feed=<path>: a feed answer rendered by the Python service.
local chc = require "container_healthcheck"
local u = chc._units
local conf, state, feed, poller, records = u.config.conf, u.state, u.feed, u.poller, u.records
local dict = ngx.shared[conf.dict]
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

-- The health record of app on addr, in plain fields (nil: none).
local function health(app, addr)
    return records.decode_health(dict:get(state.health_key(app, addr)))
end

local function ejection(app, addr)
    return records.decode_ejection(dict:get(state.ejection_key(app, addr)))
end

local function healthy_record(app, addr, now)
    dict:set(state.health_key(app, addr), records.encode_health({ healthy = true, streak = 0, since = now }))
end

-- app healthy on each of addrs, fresh for a minute.
local function serving(app, addrs, now)
    for _, addr in ipairs(addrs) do
        healthy_record(app, addr, now)
        dict:set("fresh:" .. addr, now + 60)
    end
end

local function raw(app, addr)
    return dict:get(state.health_key(app, addr))
end

local A, B = "127.0.0.2:8010", "127.0.0.3:8010"

-- app routed to A and B (the config's own list), as of now; returns now.
local function on_a_and_b(app)
    conf.apps[app] = { A, B }
    return ngx.now()
end

test("the service's own feed answer parses (format 1)", function()
    local handle = assert(io.open(ngx.var.arg_feed, "rb"))
    local body = handle:read("*a")
    handle:close()
    local answer = assert(feed.parse(body))
    eq(answer.index, 42, "index")
    eq(answer.held, true, "held")
    local healthy, age = feed.line(answer, "bk_iam")
    eq(healthy, true, "bk_iam healthy")
    eq(age, 0.5, "bk_iam age, 0.44 rounded up")
    healthy, age = feed.line(answer, "demo")
    eq(healthy, false, "demo healthy")
    eq(age, 0, "no probe: age 0")
    healthy, age = feed.line(answer, "new")
    eq(healthy, true, "new healthy")
    eq(age, math.huge, "an unknown age is older than anything")
    eq(feed.line(answer, "bk"), false, "bk's own line, not bk_iam's")
    eq(feed.line(answer, "bk_i"), nil, "a prefix of an app is not that app")
    eq(feed.line(answer, "nope"), nil, "an absent app")
end)

test("unknown lines are ignored, a cut or foreign answer refused", function()
    local body = "container-healthcheck-feed 2\nindex 7\nheld 0\nzone east\napps 1\na 1 0.5 \nend\n"
    local answer = assert(feed.parse(body))
    eq(answer.index, 7)
    eq(answer.held, false)
    eq(feed.line(answer, "a"), true)
    eq(feed.parse(body:sub(1, -6)), nil, "cut short")
    eq(feed.parse('{"code":0}'), nil, "JSON")
    eq(feed.parse("container-healthcheck-feed 1\nheld 0\napps 0\nend\n"), nil, "no index")
end)

test("rise and fall: first sight believed, the service's verdict out at once, back after rise", function()
    eq(state.observe(dict, "a", A, true, 100, nil, 1), false)
    eq(health("a", A).healthy, true, "first sight")
    state.observe(dict, "a", A, false, 101, raw("a", A), 1)
    eq(health("a", A).healthy, false, "fall 1: out at once")
    eq(state.observe(dict, "a", A, true, 102, raw("a", A), 1), true, "rising")
    eq(health("a", A).healthy, false, "one answer is not rise 2")
    state.observe(dict, "a", A, false, 103, raw("a", A), 1)
    local h = health("a", A)
    eq(h.healthy == false and h.streak == 0 and h.since == 101, true, "a failure mid-rise starts over")
    state.observe(dict, "a", A, true, 104, raw("a", A), 1)
    eq(state.observe(dict, "a", A, true, 105, raw("a", A), 1), false)
    h = health("a", A)
    eq(h.healthy == true and h.streak == 0 and h.since == 105, true, "rise 2: back in")
    state.observe(dict, "a", A, false, 106, raw("a", A), 2)
    eq(health("a", A).healthy, true, "fall 2 (/apps polls): one failure is not enough")
end)

test("an ejection holds until a health answer newer than the failure, and the hold", function()
    state.observe(dict, "a", A, true, 100, nil, 1)
    eq(state.eject(dict, "a", A, "answered 502"), "new")
    local e = ejection("a", A)
    local at, hold_until = e.at, e.hold_until
    eq(e.count, 1)
    eq(e.cleared, false)
    eq(e.cause, "answered 502")
    eq(hold_until - at, conf.eject_hold, "first hold")
    eq(state.usable(dict, "a", A, at), false, "ejected: not usable")
    eq(state.eject(dict, "a", A, "answered 504"), "joined")
    eq(ejection("a", A).count, 1, "ejecting what is out adds a vote, not a count")
    eq(ejection("a", A).votes, 2, "two failed requests behind it")
    local now = hold_until + 0.1
    eq(state.consider_clear(dict, "a", A, false, 0, now), false, "unhealthy answer")
    eq(state.consider_clear(dict, "a", A, true, now - at + 0.5, now), false,
       "healthy, but from a probe before the failure")
    eq(state.consider_clear(dict, "a", A, true, 0.2, at + 0.5), false, "fresh, but within the hold")
    eq(state.consider_clear(dict, "a", A, true, feed.age_of("?"), now), false, "a probe of unknown age")
    eq(state.consider_clear(dict, "a", A, true, 0.05, now), true, "fresh and past the hold")
    eq(ejection("a", A).cleared, true, "cleared")
end)

test("a peer that keeps failing is held longer each time, up to the cap", function()
    local holds = {}
    for i = 1, 7 do
        state.eject(dict, "a", A, "failed")
        local e = ejection("a", A)
        holds[i] = e.hold_until - e.at
        eq(e.count, i, "count")
        state.consider_clear(dict, "a", A, true, 0, e.hold_until + 1)  -- cleared, then fails again
    end
    eq(holds[2], 2 * holds[1])
    eq(holds[3], 4 * holds[1])
    eq(holds[7], conf.eject_hold_max, "capped")
    -- a peer quiet for eject_memory starts over
    local last = ejection("a", A)
    last.at = ngx.now() - conf.eject_memory - 1
    dict:set(state.ejection_key("a", A), records.encode_ejection(last))
    state.eject(dict, "a", A, "failed")
    eq(ejection("a", A).count, 1, "starts over")
end)

test("usable: fresh data, healthy, not ejected", function()
    local now = ngx.now()
    state.observe(dict, "a", A, true, now, nil, 1)
    eq(state.usable(dict, "a", A, now), false, "never answered: not fresh")
    dict:set("fresh:" .. A, now + 1)
    eq(state.usable(dict, "a", A, now), true)
    eq(state.usable(dict, "a", A, now + 2), false, "stale")
    eq(state.usable(dict, "b", A, now), false, "unknown app")
end)

test("a feed answer applied: states written, an app gone from the list is out, a heartbeat clears", function()
    local st = poller.new_channel_state()
    st.full_at = ngx.now()
    dict:set("r:gone", 1)
    local first = assert(feed.parse("container-healthcheck-feed 1\nindex 5\nheld 0\napps 3\n" ..
        "a 1 0.1\nb 0 - exited\ngone 1 0.3\nend\n"))
    local now = ngx.now()
    poller.apply_feed(dict, A, st, first, now)
    eq(health("a", A).healthy, true)
    eq(health("gone", A).healthy, true)
    eq(health("b", A), nil, "unhealthy, unknown and not asked for: no state")
    eq(dict:get(state.reason_key("b", A)), "exited", "its reason is kept for the matrix")
    state.eject(dict, "a", A, "answered 502")
    local e = ejection("a", A)
    local second = assert(feed.parse("container-healthcheck-feed 1\nindex 6\nheld 1\napps 1\na 1 0.1\nend\n"))
    poller.apply_feed(dict, A, st, second, e.hold_until + 0.5)
    eq(health("gone", A).healthy, false, "gone from the APPO's list: out")
    eq(dict:get(state.reason_key("gone", A)), "not on this APPO")
    eq(st.ejected.a, nil, "a fresh healthy line past the hold cleared the ejection")
    eq(ejection("a", A).cleared, true)
    state.eject(dict, "a", A, "answered 502")
    e = ejection("a", A)
    local heartbeat = assert(feed.parse("container-healthcheck-feed 1\nindex 6\nheld 1\napps 1\na 1 9.0\nend\n"))
    poller.apply_feed(dict, A, st, heartbeat, e.hold_until + 0.5)
    eq(st.ejected.a, true, "a heartbeat whose probe predates the failure does not clear it")
    local unknown = assert(feed.parse("container-healthcheck-feed 1\nindex 6\nheld 1\napps 1\na 1 ?\nend\n"))
    poller.apply_feed(dict, A, st, unknown, e.hold_until + 0.5)
    eq(st.ejected.a, true, "nor one whose probe's age is unknown")
    eq(dict:get("apps:" .. A), "a gone", "the APPO's registry of apps with a record")
    eq(dict:get("ejected:" .. A), "a", "and of ejections")
end)

test("a line that did not change is not applied again; a changed one is", function()
    local st = poller.new_channel_state()
    st.full_at = ngx.now()
    local now = ngx.now()
    poller.apply_feed(dict, A, st, assert(feed.parse(
        "container-healthcheck-feed 1\nindex 1\nheld 0\napps 2\na 1 0.1\nb 1 0.1\nend\n")), now)
    dict:set(state.health_key("a", A), "marker")  -- what a rewrite would replace
    poller.apply_feed(dict, A, st, assert(feed.parse(
        "container-healthcheck-feed 1\nindex 2\nheld 1\napps 2\na 1 0.9\nb 0 0.2 probe 502\nend\n")), now + 1)
    eq(dict:get(state.health_key("a", A)), "marker", "a's line did not change (its age did): untouched")
    eq(health("b", A).healthy, false, "b's changed: applied")
end)

test("one request failing everywhere takes back its ejection; votes of others stand", function()
    local now = ngx.now()
    healthy_record("a", A, now)
    eq(state.eject(dict, "a", A, "answered 502"), "new")
    eq(state.unvote(dict, "a", A), true, "nobody else behind it: it ends")
    eq(ejection("a", A), nil, "a first ejection taken back leaves nothing (no longer hold next time)")
    eq(state.eject(dict, "a", A, "answered 502"), "new")
    eq(state.eject(dict, "a", A, "answered 502"), "joined")
    eq(state.unvote(dict, "a", A), false, "another request stands behind it")
    eq(state.ejected(dict, "a", A), true)
end)

test("passive evidence alone never takes out more than half of an app's APPOs", function()
    local C = "127.0.0.4:8010"
    local now = ngx.now()
    local peers = { A, B, C }
    serving("a", peers, now)
    eq(state.eject(dict, "a", A, "answered 502", peers), "new")
    eq(state.eject(dict, "a", B, "answered 502", peers), "capped", "1 of 3 is half, rounded down")
    eq(state.ejected(dict, "a", B), false)
    dict:set(state.health_key("a", B), records.encode_health({ healthy = false, streak = 0, since = now }))
    eq(state.eject(dict, "a", B, "answered 502", peers), "new", "its health answer says unhealthy: not capped")
    eq(state.eject(dict, "b", A, "answered 502", { A }), "new", "one APPO: at least one may go out")
    dict:delete("fresh:" .. A)  -- A's data no longer counts: its ejection does not fill the cap
    eq(state.eject(dict, "a", C, "answered 502", peers), "new", "a stale APPO's ejection is not counted")
end)

test("a silent service whose Nginx lives keeps its verdicts for keep_stale, then is out", function()
    local now = ngx.now()
    local apps = { a = true }
    state.answered(dict, A, now, conf.wait + conf.grace, apps)
    healthy_record("a", A, now)
    eq(state.kept(dict, A, "status: timeout", now + 1.4, apps), true)
    eq(state.usable(dict, "a", A, now + 1.4), true, "verdicts stand")
    eq(dict:get("stale:" .. A), now + 1.4, "shown stale since")
    eq(state.kept(dict, A, "status: timeout", now + conf.keep_stale + 0.1, apps), false, "keep_stale is over")
    eq(state.is_fresh(dict, A, now + conf.keep_stale + 0.1), false, "out")
    eq(dict:get("stale:" .. A), nil)
    eq(state.kept(dict, A, "status: timeout", now + 1, apps), false, "an APPO that is out is not brought back")
end)

test("versions move for the app that changed, not for the others", function()
    local now = ngx.now()
    state.observe(dict, "a", A, true, now, nil, 1)
    state.observe(dict, "b", A, true, now, nil, 1)
    local va, vb = dict:get("v:a"), dict:get("v:b")
    state.observe(dict, "a", A, false, now, dict:get(state.health_key("a", A)), 1)
    eq(dict:get("v:a") ~= va, true, "a moved")
    eq(dict:get("v:b"), vb, "b did not")
    state.failed(dict, A, "gone", { a = true, b = true })  -- not fresh: nothing to change
    eq(dict:get("v:b"), vb)
    state.answered(dict, A, now, 1, { a = true, b = true })
    eq(dict:get("v:b") ~= vb, true, "the APPO came in: every app there moved")
    vb = dict:get("v:b")
    dict:set("fresh:" .. A, now - 0.01)  -- its last answer has just lapsed; workers may still use it
    state.failed(dict, A, "status: timeout", { a = true, b = true })
    eq(dict:get("v:b") ~= vb, true, "the APPO is out: every app there moved, lapsed or not")
end)

test("a worker reads an app's version again once the entry's change count moved: another worker's " ..
     "change from its next ms, its own at once", function()
    local now = on_a_and_b("ver_app")
    serving("ver_app", { A, B }, now)
    eq(#chc.choose("ver_app", "o"), 2, "both usable")
    -- another worker finds B unhealthy: the dict changes, this worker's own count does not
    dict:set(state.health_key("ver_app", B), records.encode_health({ healthy = false, streak = 0, since = now }))
    dict:incr(records.version_key("ver_app"), 1, 0)
    dict:incr(records.CHANGES_KEY, 1, 0)
    eq(#chc.choose("ver_app", "o"), 2, "within the same ms (ngx.now() has not moved), the choice stands")
    ngx.sleep(0.002)
    local candidates = chc.choose("ver_app", "o")
    eq(#candidates == 1 and candidates[1] == A, true, "from the next ms: B is out")
    -- this worker's own change counts at once, whatever the clock
    dict:set(state.health_key("ver_app", A), records.encode_health({ healthy = false, streak = 0, since = now }))
    healthy_record("ver_app", B, now)
    state.bump(dict, "ver_app")
    candidates = chc.choose("ver_app", "o")
    eq(#candidates == 1 and candidates[1] == B, true, "its own change: at once")
    conf.apps.ver_app = nil
end)

test("a choice sees an APPO's freshness lapse by time alone at its deadline, and a deadline moved on", function()
    local now = on_a_and_b("lapse_app")
    serving("lapse_app", { A, B }, now)
    dict:set("fresh:" .. A, now + 0.3)
    dict:set("fresh:" .. B, now + 0.3)
    eq(#chc.choose("lapse_app", "o"), 2, "both usable")
    dict:set("fresh:" .. A, now + 60)  -- A answered again (no version moves for that)
    -- B's channel stopped: its deadline passes and nobody says so
    ngx.sleep(0.4)
    local candidates = chc.choose("lapse_app", "o")
    eq(#candidates == 1 and candidates[1] == A, true, "past the deadline B is out, A still in")
    conf.apps.lapse_app = nil
end)

test("fail-open goes to the APPOs whose health answer says healthy before going to all", function()
    local now = on_a_and_b("open_app")
    for _, addr in ipairs({ A, B }) do dict:set("fresh:" .. addr, now + 60) end
    healthy_record("open_app", A, now)
    dict:set(state.health_key("open_app", B), records.encode_health({ healthy = false, streak = 0, since = now }))
    state.eject(dict, "open_app", A, "answered 502")
    local candidates, _, _, tier = chc.choose("open_app", "o")
    eq(tier, "healthy")
    eq(#candidates == 1 and candidates[1] == A, true, "only the healthy one, ejected as it is")
    dict:set(state.health_key("open_app", A), records.encode_health({ healthy = false, streak = 0, since = now }))
    state.bump(dict, "open_app")
    candidates, _, _, tier = chc.choose("open_app", "o")
    eq(tier, "all")
    eq(#candidates == 1 and candidates[1] == B, true, "none says healthy: all but the one failed requests took out")
    state.eject(dict, "open_app", B, "answered 502")
    candidates, _, _, tier = chc.choose("open_app", "o")
    eq(tier == "all" and #candidates == 2, true, "and when every one was taken out: all")
    conf.apps.open_app = nil
end)

test("/apps answers of services without the feed: healthy list and reasons", function()
    local set, reasons = feed.healthy_apps('{"code":0,"status":"ok","message":{"snapshot_age_s":0.1,' ..
        '"healthy":["a","b.c"],"unhealthy":{"d":"probe 502"},"apps":{}}}')
    eq(set.a and set["b.c"], true)
    eq(reasons.d, "probe 502")
    eq(feed.healthy_apps('{"code":11}'), nil)
end)

test("round-robin turns are per route: /o/ and /t/ requests interleaved each reach both peers", function()
    local now = on_a_and_b("rr_app")
    serving("rr_app", { A, B }, now)
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
    conf.apps.rr_app = nil
end)

test("init refuses unknown options, wrong types and numbers not above 0, in words", function()
    local cases = {
        { { wait = 6 }, "option `wait` is 6 but the service holds a feed request at most 5 s (it refuses more " ..
                        "with 400, which would take every APPO out)" },
        { { eject_hold = 40 }, "option `eject_hold` (40) must be <= `eject_hold_max` (30)" },
        { { forget_after = 30 }, "option `forget_after` (30) must be >= 60 (eject_memory, keep_stale, 3 x interval " ..
                                 "and wait + grace): what it forgets, the others still need" },
        { { eject_statuses = { 502, 404 } }, "option `eject_statuses`: entry 2 must be a 5xx status (a 4xx is the " ..
                                             "client's, not the APPO's)" },
        { { appos = { "10.0.0.2" } }, "option `appos`: entry 1 must be \"IP:port\" (a name cannot be balanced " ..
                                      "to), not 10.0.0.2" },
        { { appos = { "appo1.bk:8010" } }, "option `appos`: entry 1 must be \"IP:port\" (a name cannot be " ..
                                           "balanced to), not appo1.bk:8010" },
        { { rise = 1.5 }, "option `rise` must be a whole number" },
        { { grace = 0.05 }, "option `grace` must be >= 0.1: half of it waits for a late heartbeat, " ..
                            "half asks the APPO Nginx" },
        { { intervall = 2 }, "unknown option `intervall`" },
        { { interval = "2" }, "option `interval` must be a number, not string" },
        { { fall = 0 }, "option `fall` must be > 0" },
        { { appos = "10.0.0.2:8010" }, "option `appos` must be a table, not string" },
        { { dict = "nope" }, "lua_shared_dict nope is not declared" },
    }
    for _, case in ipairs(cases) do
        local ok, err = pcall(chc.init, case[1])
        eq(ok, false, case[2])
        eq(err, "container_healthcheck.init: " .. case[2])
    end
    eq(conf.dict, "container_healthcheck", "a refused call changes nothing")
    eq(conf.interval, 1, "a refused call changes nothing")
end)

test("APPO addresses are kept as nginx spells them in $upstream_addr", function()
    local canonical = u.config.canonical_addr
    eq(canonical("10.0.0.02:08010"), "10.0.0.2:8010")
    eq(canonical("127.0.0.1:80"), "127.0.0.1:80")
    eq(canonical("[::FFFF:A00:2]:8010"), "[::ffff:a00:2]:8010")
    eq(canonical("appo1.bk:8010"), nil)
    eq(canonical("10.0.0.2"), nil)
    -- and as set_current_peer takes the host: an IPv6 address in brackets
    local host, port = u.discovery.split_addr("[::1]:8010")
    eq(u.discovery.peer_host(host) .. " " .. port, "[::1] 8010")
    eq(u.discovery.peer_host("10.0.0.2"), "10.0.0.2")
end)

test("the attempts of a request's last pass through an upstream, from nginx's $upstream_* text", function()
    local last_pass = u.balancer.last_pass
    local function joined(text) return table.concat(last_pass(text), " ") end
    eq(joined("127.0.0.2:80, 127.0.0.3:80"), "127.0.0.2:80 127.0.0.3:80", "two attempts")
    eq(joined("127.0.0.2:80 : "), "127.0.0.2:80", "in the balancer of a retry: the attempt being set up is empty")
    eq(joined("127.0.0.2:80, 127.0.0.3:80 : "), "127.0.0.2:80 127.0.0.3:80")
    eq(joined("127.0.0.9:80 : 127.0.0.2:80, [::1]:80"), "127.0.0.2:80 [::1]:80", "after an internal redirect")
    eq(joined("502, 502 : 200"), "200")
    eq(joined("- , 0.001"), "- 0.001")
    eq(joined(nil), "", "no upstream at all")
end)

test("health and ejection records: plain fields in, the same fields out", function()
    local h = { healthy = false, streak = 1, since = 1700000000.25 }
    local back = records.decode_health(records.encode_health(h))
    eq(back.healthy == h.healthy and back.streak == h.streak and back.since == h.since, true)
    local e = { at = 10.5, hold_until = 12.5, count = 2, cleared = true, votes = 3, cause = "answered 502" }
    local again = records.decode_ejection(records.encode_ejection(e))
    eq(again.at == e.at and again.hold_until == e.hold_until and again.count == 2 and again.cleared, true)
    eq(again.votes, 3)
    eq(again.cause, e.cause)
    eq(records.decode_health("garbage"), nil)
    eq(records.decode_ejection("1|2|x"), nil)
    local set = records.decode_set(records.encode_set({ b = true, a = true }))
    eq(set.a and set.b, true, "a registry")
    eq(records.encode_set({ b = true, a = true }), "a b", "sorted")
end)

ngx.header["Content-Type"] = "text/plain"
ngx.say(table.concat(out, "\n"))
