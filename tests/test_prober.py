"""The background prober: probes off the request path, bounded, crash-safe (fake clock, plain
probe calls on worker threads), then on its loop engine against a real nginx, then in the
service against a real engine and a stub APPO Nginx that can hang, and a real nginx."""
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client.parser import text_string_to_metric_families

from healthcheck.events import INVALIDATING_ACTIONS
from healthcheck.models import ProbeResult
from healthcheck.probe_loop import ProbeLoop
from healthcheck.prober import Prober
from support import (COUNTING_DOCKER, PREFIX, FakeClock, Service, StatusServer, http, name_for, unique_app, until,
                     wait_for)
import test_probe_loop


make_nginx = test_probe_loop.make_nginx  # the fixture: a real nginx on a loopback port


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
        assert clock.seen_by_workers()  # the workers looked: the fake clock has not moved
        assert calls == ["a"]
        clock.now += 0.1
        assert until(lambda: len(calls) == 2)
        assert clock.seen_by_workers()
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
        assert until(lambda: prober.known() == {})  # dropped when due, not probed
        assert calls == ["a"]
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
        assert until(lambda: prober.known() == {})  # forgotten when due, not probed
        assert len(calls) == 1
    finally:
        prober.stop()


def test_an_app_that_stops_serving_is_forgotten_at_once():
    clock = FakeClock()
    prober, calls = probed_once(clock)
    try:
        prober.forget("a")
        assert prober.known() == {}
        clock.now += 5
        # the time keeper wakes for the probe that was due and drops it: nothing is left to do
        assert until(lambda: not prober._schedule)
        assert calls == ["a"]
    finally:
        prober.stop()


# The prober on its loop engine (what the service runs): a real nginx on a loopback port.

def loop_prober(nginx, clock, **kwargs):
    """A Prober over a ProbeLoop to nginx: (prober, loop, observed), observed being the
    (app, result, changed) of every probe."""
    loop = ProbeLoop("127.0.0.1", nginx.port, timeout_s=kwargs.pop("timeout_s", 2.0),
                     max_connections=kwargs.get("workers", 32))
    observed = []
    prober = Prober(loop, clock=clock, observe=lambda *seen: observed.append(seen), url_of=loop.url_of,
                    **kwargs).start()
    return prober, loop, observed


def probed_again(prober, clock, app, step_s):
    """Move the fake clock a probe interval on and wait until app's probe after it finished
    (its age is 0 again: results are stamped with the fake time)."""
    clock.now += step_s
    return until(lambda: prober.known()[app][1] == 0.0)


def test_the_loop_engine_keeps_the_result_object_and_one_connection(make_nginx):
    clock = FakeClock()
    prober, loop, observed = loop_prober(make_nginx(), clock, ttl_s=0.1)
    try:
        assert prober.result_for("a", "c1") is None
        first = prober.wait_for("a", "c1", 5)
        assert first.ok and first.status == 200 and first.url == loop.url_of("a")
        for _ in range(5):
            assert probed_again(prober, clock, "a", 0.1)
            assert prober.result_for("a", "c1") is first  # equal result: the same object
        assert len(observed) == 6 and [changed for _, _, changed in observed] == [True] + [False] * 5
        assert loop.opened == 1
    finally:
        prober.stop()


class AppProcess(object):
    """An app's uwsgi behind nginx: answers 200 until killed, then its port is closed (nginx
    answers 502 for the app)."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass
        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def kill(self):
        if self._thread.is_alive():
            self._server.shutdown()
            self._server.server_close()


def test_an_app_process_that_dies_is_the_next_probes_result(make_nginx):
    uwsgi = AppProcess()
    nginx = make_nginx(proxied={"app": uwsgi.port})
    clock = FakeClock()
    prober, loop, observed = loop_prober(nginx, clock, ttl_s=0.1)
    try:
        prober.result_for("app", "c1")
        assert prober.wait_for("app", "c1", 5).ok
        uwsgi.kill()  # nginx now answers 502 for the app
        assert probed_again(prober, clock, "app", 0.1)
        result = prober.result_for("app", "c1")
        assert not result.ok and result.status == 502
        assert observed[-1] == ("app", result, True)
    finally:
        uwsgi.kill()
        prober.stop()


def test_on_the_loop_a_probe_that_crashes_is_unhealthy_and_the_others_go_on(make_nginx):
    prober, loop, observed = loop_prober(make_nginx(), FakeClock(), ttl_s=60)
    try:
        prober.result_for(u"caf\u00e9", "c1")  # its request cannot be built
        prober.result_for("a", "c1")
        crashed = prober.wait_for(u"caf\u00e9", "c1", 5)
        assert not crashed.ok and crashed.failure == "crashed"
        assert prober.wait_for("a", "c1", 5).ok
    finally:
        prober.stop()


def test_on_the_loop_a_hung_probe_delays_nobody(make_nginx):
    held = threading.Event()
    hung_uwsgi = StatusServer(200)
    hung_uwsgi.handle = lambda conn: held.wait(10)
    nginx = make_nginx(proxied={"hung": hung_uwsgi.port})
    prober, loop, observed = loop_prober(nginx, FakeClock(), ttl_s=60, timeout_s=30, workers=2)
    try:
        prober.result_for("hung", "h")
        for number in range(10):
            prober.result_for("fast%d" % number, "f")
        for number in range(10):
            assert prober.wait_for("fast%d" % number, "f", 5).ok
        assert prober.result_for("hung", "h") is None  # still running: no result yet
    finally:
        held.set()
        hung_uwsgi.close()
        prober.stop()


class BrokenOnce(object):
    """An engine whose first wait fails (a bug in the loop itself): the prober must end the
    probes it holds as crashed and go on. Probes answer 200 from the next wait on."""

    def __init__(self):
        self.pending = []
        self.failed = False
        self._woken = threading.Event()

    def submit(self, app, done):
        self.pending.append((app, done))

    def run_once(self, timeout_s=None):
        if self.pending and not self.failed:
            self.failed = True
            raise RuntimeError("the loop broke")
        for app, done in self.pending:
            done(ProbeResult(True, "/o/%s/" % app, 200, None))
        self.pending = []
        self._woken.wait(timeout_s if timeout_s is not None else 0.05)
        self._woken.clear()

    def wake(self):
        self._woken.set()

    def abort(self, exc):
        from healthcheck.prober import crashed_result
        for app, done in self.pending:
            done(crashed_result("/o/%s/" % app, exc))
        self.pending = []

    def close(self):
        self.pending = []


def test_an_error_of_the_loop_itself_ends_its_probes_as_crashed_and_the_loop_goes_on():
    clock = FakeClock()
    prober = Prober(BrokenOnce(), ttl_s=0.1, clock=clock).start()
    try:
        prober.result_for("a", "c1")
        result = prober.wait_for("a", "c1", 5)
        assert not result.ok and result.failure == "crashed" and "the loop broke" in result.error
        clock.now += 0.1
        assert until(lambda: prober.result_for("a", "c1").ok)
    finally:
        prober.stop()


# The prober in the service: a real engine, a stub APPO Nginx.

class StubNginx(StatusServer):
    """A loopback APPO Nginx stand-in: counts GET /o/<app>/ per app; apps in `hang` never
    get an answer (the connection is held open), the rest get 200."""

    def __init__(self):
        self.hang = set()
        self.counts = {}
        self._lock = threading.Lock()
        self._held = []
        StatusServer.__init__(self)

    def handle(self, conn):
        path = self.read_path(conn)
        if path is None:
            return
        app = path.split("/")[2]
        with self._lock:
            self.counts[app] = self.counts.get(app, 0) + 1
        if app in self.hang:
            self._held.append(conn)
            return
        self.respond(conn)

    def count(self, app):
        with self._lock:
            return self.counts.get(app, 0)

    def close(self):
        StatusServer.close(self)
        for conn in self._held:
            conn.close()


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


@pytest.fixture
def stub():
    server = StubNginx()
    yield server
    server.close()


def test_hung_probes_delay_no_other_answer(docker_engine, docker, stub):
    hung = [unique_app("hung") for _ in range(3)]
    fast = [unique_app("fast") for _ in range(3)]
    stub.hang.update(hung)
    for app in hung + fast:
        docker.run(name_for(app))
    with Service("--ngx-port", str(stub.port), "--probe-timeout", "2", "--probe-ttl", "1",
                 "--probe-concurrency", "8") as svc:
        # Every app is asked about once through /apps: the hung ones now occupy probe slots.
        wait_for(lambda: all(a in svc.get("/apps")[1]["message"]["apps"] for a in hung + fast), 10)
        for _ in range(5):
            (status, body), took = timed(lambda: svc.get("/apps"))
            # The entry balancer polls /apps with a 1 s timeout: it must never wait on a probe.
            assert status == 200 and took < 1.0, took
        for app in fast:
            (status, body), took = timed(lambda: svc.get("/apps/health/" + app))
            assert status == 200 and took < 1.0, (app, took, body)
        # A hung app is 503 with the probe's timeout in the message within timeout + 1 s ...
        first = time.monotonic()
        status, body = wait_for(lambda: (lambda r: r if "timed out" in r[1]["message"] else None)(
            svc.get("/apps/health/" + hung[0])), 3.5) or svc.get("/apps/health/" + hung[0])
        assert status == 503 and body["code"] == 12 and "timed out after 2s" in body["message"], body
        assert time.monotonic() - first < 3.5
        # ... and answers from that known result afterwards, without waiting again.
        (status, body), took = timed(lambda: svc.get("/apps/health/" + hung[0]))
        assert status == 503 and "timed out" in body["message"] and took < 1.0, took
        apps = svc.get("/apps")[1]["message"]
        # (other tests' containers on the same engine are listed too: only this test's count)
        assert sorted(a for a in apps["healthy"] if a in hung + fast) == sorted(fast)
        for app in hung:
            assert apps["apps"][app]["code"] == 12


def test_probes_per_app_are_bounded_whatever_the_request_rate(docker_engine, docker, stub):
    app = unique_app()
    docker.run(name_for(app))
    with Service("--ngx-port", str(stub.port), "--probe-ttl", "1") as svc:
        assert svc.get("/apps/health/" + app)[0] == 200
        before, started = stub.count(app), time.monotonic()
        for _ in range(200):
            assert svc.get("/apps/health/" + app)[0] == 200
            svc.get("/apps")
        elapsed = time.monotonic() - started
        probes = stub.count(app) - before
    # one probe per --probe-ttl (start to start), whatever 400 requests asked
    assert probes <= elapsed / 1.0 + 1, (probes, elapsed)


def test_new_container_waits_for_its_first_probe_then_is_healthy(docker_engine, docker, stub):
    app = unique_app()
    docker.run(name_for(app))
    with Service("--ngx-port", str(stub.port)) as svc:
        # Never asked before: the per-app route waits for this app's own first probe.
        status, body = svc.get("/apps/health/" + app)
        assert status == 200 and body["probe"]["status"] == 200
        assert stub.count(app) == 1


def _container_events_between(since, until):
    """How many container events that make the service ask docker again (events.py's list)
    the engine saw between two moments (unix seconds)."""
    out = subprocess.run(["docker", "events", "--since", "%.3f" % since, "--until", "%.3f" % until,
                          "--filter", "type=container", "--format", "{{.Action}}"],
                         stdout=subprocess.PIPE, universal_newlines=True, timeout=30, check=True).stdout
    return sum(1 for line in out.splitlines() if line.split(":", 1)[0].strip() in INVALIDATING_ACTIONS)


def test_metrics_triggers_no_probe_and_no_docker_call(docker_engine, docker, stub, tmp_path):
    app, other = unique_app(), unique_app()
    docker.run(name_for(app))
    docker.run(name_for(other))
    count_log = tmp_path / "calls"
    with Service("--ngx-port", str(stub.port), "--docker-bin", COUNTING_DOCKER,
                 env={"COUNT_DOCKER_LOG": str(count_log)}) as svc:
        assert svc.get("/apps/health/" + app)[0] == 200
        # Events are followed: with nothing happening, only a request or an event asks docker.
        # Other tests on the same engine start and stop containers meanwhile, and each of
        # their events may ask docker once: a window counts only what its events explain.
        time.sleep(1.0)
        windows = []
        for _ in range(10):
            calls_before, started = count_log.read_text().count(" ps "), time.time()
            for _ in range(10):
                status, _, body = http(svc.port, "/container-healthcheck/metrics")
                assert status == 200
            time.sleep(0.5)
            calls, ended = count_log.read_text().count(" ps ") - calls_before, time.time()
            # an event shortly before the window may be answered inside it
            events = _container_events_between(started - 1.0, ended)
            windows.append((calls, events))
            if events == 0:
                break
        families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
    assert all(calls <= events for calls, events in windows), windows  # (docker ps calls, events)
    assert stub.count(other) == 0
    ages = {s.labels["app"]: s.value for s in families["healthcheck_app_probe_age_seconds"].samples}
    assert app in ages and other not in ages


def test_a_dead_app_process_is_unhealthy_in_the_feed(docker_engine, docker, make_nginx):
    """The service's own prober against a real nginx: the app's process dies in its running
    container (nginx answers 502 for it) and the feed says so."""
    app = unique_app()
    docker.run(name_for(app))
    uwsgi = AppProcess()
    nginx = make_nginx(proxied={app: uwsgi.port})

    def feed_line(svc):
        body = http(svc.port, PREFIX + "/apps/feed")[2].decode("utf-8")
        return next((line for line in body.split("\n") if line.split(" ")[0] == app), "")
    try:
        with Service("--ngx-port", str(nginx.port), "--probe-ttl", "0.5") as svc:
            assert wait_for(lambda: feed_line(svc).startswith(app + " 1 "), 20), feed_line(svc)
            uwsgi.kill()
            line = wait_for(lambda: (lambda text: text if text.startswith(app + " 0 ") else "")(feed_line(svc)), 20)
            assert line and "502" in line, feed_line(svc)
            status, body = svc.get("/apps/health/" + app)
            assert status == 503 and body["probe"]["status"] == 502
    finally:
        uwsgi.kill()
