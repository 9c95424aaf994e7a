"""Probes off the request path, against a real engine and a stub APPO Nginx that can hang."""
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import COUNTING_DOCKER, LoopbackServer, Service, http, name_for, unique_app, wait_for

pytestmark = pytest.mark.docker


class StubNginx(LoopbackServer):
    """A loopback APPO Nginx stand-in: counts GET /o/<app>/ per app; apps in `hang` never
    get an answer (the connection is held open), the rest get 200."""

    def __init__(self):
        self.hang = set()
        self.counts = {}
        self._lock = threading.Lock()
        self._held = []
        LoopbackServer.__init__(self)

    def handle(self, conn):
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            request += chunk
        app = request.split(b" ")[1].decode().split("/")[2]
        with self._lock:
            self.counts[app] = self.counts.get(app, 0) + 1
        if app in self.hang:
            self._held.append(conn)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        conn.close()

    def count(self, app):
        with self._lock:
            return self.counts.get(app, 0)

    def close(self):
        LoopbackServer.close(self)
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
        assert sorted(apps["healthy"]) == sorted(fast)
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


def test_metrics_triggers_no_probe_and_no_docker_call(docker_engine, docker, stub, tmp_path):
    app, other = unique_app(), unique_app()
    docker.run(name_for(app))
    docker.run(name_for(other))
    count_log = tmp_path / "calls"
    with Service("--ngx-port", str(stub.port), "--docker-bin", COUNTING_DOCKER,
                 env={"COUNT_DOCKER_LOG": str(count_log)}) as svc:
        assert svc.get("/apps/health/" + app)[0] == 200
        # Events are followed: with nothing happening, only a request or an event asks docker.
        time.sleep(1.0)
        calls_before = count_log.read_text().count(" ps ")
        for _ in range(10):
            status, _, body = http(svc.port, "/container-healthcheck/metrics")
            assert status == 200
        time.sleep(0.5)
        calls = count_log.read_text().count(" ps ") - calls_before
        families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
    assert calls == 0, calls
    assert stub.count(other) == 0
    ages = {s.labels["app"]: s.value for s in families["healthcheck_app_probe_age_seconds"].samples}
    assert app in ages and other not in ages
