"""The background prober: probes off the request path, bounded, crash-safe (fake clock)."""
import threading
import time

from healthcheck.models import ProbeResult
from healthcheck.prober import Prober
from support import FakeClock, until


def ok(app):
    return ProbeResult(True, "http://127.0.0.1:8010/o/%s/" % app, 200, None)


def make(probe, clock=None, **kwargs):
    kwargs.setdefault("ttl_s", 0.1)  # the workers re-read the fake clock this often
    return Prober(probe, clock=clock or FakeClock(), **kwargs).start()


def probed_once(clock, **kwargs):
    """A prober whose probe counts its calls, after app "a" was asked about and probed once:
    (prober, calls)."""
    calls = []
    prober = make(lambda app: calls.append(app) or ok(app), clock, **kwargs)
    prober.result_for("a", "c1")
    assert until(lambda: calls == ["a"])
    return prober, calls


def test_first_result_is_none_then_the_probe_result():
    prober = make(ok)
    try:
        assert prober.result_for("a", "c1") is None
        assert prober.wait_for("a", "c1", 5) == ok("a")
        assert prober.result_for("a", "c1") == ok("a")
    finally:
        prober.stop()


def test_at_most_one_probe_per_ttl_whatever_the_request_rate():
    clock = FakeClock()
    prober, calls = probed_once(clock)
    try:
        for _ in range(2000):
            prober.result_for("a", "c1")
        time.sleep(0.2)  # several worker wake-ups: the fake clock has not moved
        assert calls == ["a"]
        clock.now += 0.1
        assert until(lambda: len(calls) == 2)
        time.sleep(0.2)
        assert calls == ["a", "a"]
    finally:
        prober.stop()


def test_a_hung_probe_delays_nobody():
    release = threading.Event()

    def probe(app):
        if app.startswith("hung"):
            release.wait(10)
        return ok(app)
    prober = make(probe, workers=4)
    try:
        for number in range(3):
            prober.result_for("hung%d" % number, "h")
        assert prober.result_for("fast", "f") is None
        assert prober.wait_for("fast", "f", 5) == ok("fast")
        assert prober.result_for("hung0", "h") is None  # still running: no result yet
    finally:
        release.set()
        prober.stop()


def test_a_probe_that_raises_is_an_unhealthy_result():
    def probe(app):
        raise ValueError("bad probe")
    prober = make(probe)
    try:
        prober.result_for("a", "c1")
        result = prober.wait_for("a", "c1", 5)
        assert result.ok is False and "probe crashed: ValueError: bad probe" in result.error
    finally:
        prober.stop()


def test_a_probe_that_returns_garbage_is_unhealthy():
    prober = make(lambda app: None)
    try:
        prober.result_for("a", "c1")
        assert prober.wait_for("a", "c1", 5).ok is False
    finally:
        prober.stop()


def first_ok_then_blocked(later):
    """A probe whose first call answers ok and whose later calls wait for `release`, then
    return later(app): (probe, calls, release)."""
    release = threading.Event()
    calls = []

    def probe(app):
        calls.append(app)
        if len(calls) > 1:
            release.wait(10)
            return later(app)
        return ok(app)
    return probe, calls, release


def test_new_container_is_probed_at_once_and_the_previous_result_stands_meanwhile():
    probe, calls, release = first_ok_then_blocked(lambda app: ProbeResult(False, "u", 502, None))
    clock = FakeClock()
    prober = make(probe, clock, ttl_s=60)
    try:
        prober.result_for("a", "old")
        assert prober.wait_for("a", "old", 5) == ok("a")
        assert prober.result_for("a", "new") == ok("a")  # redeploy: no flap while it is probed
        assert until(lambda: len(calls) == 2)
        release.set()
        assert prober.wait_for("a", "new", 5).status == 502
        assert prober.result_for("a", "new").status == 502
    finally:
        release.set()
        prober.stop()


def test_an_old_result_does_not_stand_for_a_new_container():
    probe, calls, release = first_ok_then_blocked(ok)
    clock = FakeClock()
    prober = make(probe, clock, ttl_s=1)
    try:
        prober.result_for("a", "old")
        prober.wait_for("a", "old", 5)
        clock.now += 30  # the app was gone a while; its old result says nothing now
        assert prober.result_for("a", "new") is None
    finally:
        release.set()
        prober.stop()


def test_apps_nobody_asks_about_are_forgotten():
    clock = FakeClock()
    prober, calls = probed_once(clock, interest_s=10)
    try:
        clock.now += 11
        time.sleep(0.2)
        assert calls == ["a"] and prober.known() == {}
    finally:
        prober.stop()


def test_known_has_no_side_effects():
    """Reading what is known (for /metrics) does not count as asking: an app only read that
    way is forgotten after the interest window like one nobody reads."""
    clock = FakeClock()
    prober, calls = probed_once(clock, interest_s=10)
    try:
        assert set(prober.known()) == {"a"}
        for _ in range(12):
            clock.now += 1
            prober.known()
        assert until(lambda: prober.known() == {})
        probes = len(calls)
        clock.now += 5
        time.sleep(0.2)
        assert len(calls) == probes  # forgotten: no probe any more
    finally:
        prober.stop()


def test_an_app_that_stops_serving_is_forgotten_at_once():
    clock = FakeClock()
    prober, calls = probed_once(clock)
    try:
        prober.forget("a")
        clock.now += 5
        time.sleep(0.2)
        assert calls == ["a"] and prober.known() == {}
    finally:
        prober.stop()
