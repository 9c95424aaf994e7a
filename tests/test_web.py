"""The HTTP contract, in-process through wsgiref.validate (no sockets, no docker)."""
import io
import json
import wsgiref.util
import wsgiref.validate

import pytest
from prometheus_client.parser import text_string_to_metric_families

from healthcheck.cache import TTLCache
from healthcheck.checker import Checker
from healthcheck.errors import DockerUnreachable
from healthcheck.matching import NamePattern
from healthcheck.metrics import Metrics
from healthcheck.models import ProbeResult
from healthcheck.parsing import parse_ps_output
from healthcheck.snapshot import Snapshotter
from healthcheck.web import Instrumented, make_app

PS = "\n".join([
    '{"ID":"%s","Names":"good-1700000000","Image":"img","Command":"\\"sleep 1\\"","CreatedAt":"2024-03-08 14:08:39 +0800 CST","Status":"Up 5 days","Ports":"0.0.0.0:8080->80/tcp"}' % ("a" * 64),
    '{"ID":"%s","Names":"paused-1700000000","Image":"img","Command":"\\"sleep 1\\"","CreatedAt":"2024-03-08 14:08:39 +0800 CST","Status":"Up 5 days (Paused)","Ports":""}' % ("b" * 64),
    '{"ID":"%s","Names":"gone-1700000000","Image":"img","Command":"\\"sleep 1\\"","CreatedAt":"2024-03-08 14:08:39 +0800 CST","Status":"Exited (0) 5 days ago","Ports":""}' % ("c" * 64),
    '{"ID":"%s","Names":"probed-1700000000","Image":"img","Command":"\\"sleep 1\\"","CreatedAt":"2024-03-08 14:08:39 +0800 CST","Status":"Up 5 days","Ports":""}' % ("d" * 64),
])


class Harness(object):
    def __init__(self, fetch=None, probe=None, prefix="/container-healthcheck", allow=None):
        self.fetch_calls = 0

        def default_fetch():
            self.fetch_calls += 1
            return parse_ps_output(PS)
        self.snapshotter = Snapshotter(fetch or default_fetch, refresh_s=60, max_stale_s=0).start()
        self.metrics = Metrics()
        self.checker = Checker(self.snapshotter, NamePattern(), probe=probe, probe_cache=TTLCache(60))
        self.metrics.set_sources(self.snapshotter.age_s, lambda: self.checker.all_answers()[2])
        self.app = wsgiref.validate.validator(
            Instrumented(make_app(self.checker, self.metrics, prefix), self.metrics, allow))
        self.prefix = prefix

    def call(self, path, method="GET", query="", remote="127.0.0.1", raw_path=False, wsgi_path=None):
        if wsgi_path is None:
            path = path if raw_path else self.prefix + path
            # WSGI carries the path as latin-1 decoded bytes, as a real server does.
            wsgi_path = path.encode("utf-8").decode("latin-1")
        environ = {"REQUEST_METHOD": method, "PATH_INFO": wsgi_path,
                   "QUERY_STRING": query, "REMOTE_ADDR": remote, "SCRIPT_NAME": "", "wsgi.input": io.BytesIO(b"")}
        wsgiref.util.setup_testing_defaults(environ)
        seen = {}

        def start_response(status, headers, exc_info=None):
            seen["status"] = int(status.split()[0])
            seen["headers"] = dict(headers)
        chunks = self.app(environ, start_response)
        body = b"".join(chunks)
        chunks.close()
        return seen["status"], seen["headers"], body

    def json(self, path, **kwargs):
        status, headers, body = self.call(path, **kwargs)
        assert headers["Content-Type"].startswith("application/json")
        return status, json.loads(body.decode("utf-8"))

    def close(self):
        self.snapshotter.stop()


@pytest.fixture
def harness():
    made = []

    def build(**kwargs):
        made.append(Harness(**kwargs))
        return made[-1]
    yield build
    for h in made:
        h.close()


def test_health(harness):
    status, body = harness().json("/health")
    assert status == 200 and body == {"code": 0, "status": "ok", "message": "i'm healthy"}


def test_running_app(harness):
    status, body = harness().json("/apps/health/good")
    assert status == 200 and body["code"] == 0 and body["status"] == "ok"
    message = body["message"]
    assert message["names"] == "good-1700000000" and message["container_id"] == "a" * 10
    assert message["port"] == [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"}]
    assert message["created"] == 1709878119 and isinstance(message["created"], int)


@pytest.mark.parametrize("app,words", [("paused", "paused"), ("gone", "no healthy container"),
                                       ("nothing", "no container of app nothing")])
def test_unhealthy_apps(harness, app, words):
    status, body = harness().json("/apps/health/" + app)
    assert status == 503 and body["code"] == 12 and body["status"] == "error" and words in body["message"]


def test_all_lists_the_others(harness):
    h = harness()
    assert h.json("/apps/health/gone")[1]["containers"] == []
    status, body = h.json("/apps/health/gone", query="all=true")
    assert status == 503 and [c["names"] for c in body["containers"]] == ["gone-1700000000"]


@pytest.mark.parametrize("app", ["bk_(iam", ".*", "_x", "a" * 65, "%00", "\u4f60"])
def test_invalid_app_code_is_400_without_docker(harness, app):
    h = harness()
    h.snapshotter.get()
    calls = h.fetch_calls
    status, body = h.json("/apps/health/" + app)
    assert status == 400 and body["code"] == 13
    assert h.fetch_calls == calls


@pytest.mark.parametrize("query", ["x=1", "all=maybe", "all=true&all=false", "all=true&debug=1"])
def test_bad_query_is_400(harness, query):
    status, body = harness().json("/apps/health/good", query=query)
    assert status == 400 and body["code"] == 13


@pytest.mark.parametrize("query", ["all=true", "all=false", "all=1", "all=0", "all=TRUE"])
def test_good_query(harness, query):
    assert harness().json("/apps/health/good", query=query)[0] == 200


def test_path_that_is_not_utf8_is_400_json(harness):
    status, headers, body = harness().call(None, wsgi_path="/container-healthcheck/apps/health/\xff")
    assert status in (400, 404) and headers["Content-Type"].startswith("application/json")
    assert json.loads(body.decode("utf-8"))["code"] in (13, 14)


def test_unknown_route_and_method(harness):
    h = harness()
    status, body = h.json("/nope")
    assert status == 404 and body["code"] == 14
    status, body = h.json("/apps/health/good", method="POST")
    assert status == 405 and body["code"] == 14
    status, body = h.json("/", raw_path=True)
    assert status == 404 and body["code"] == 14


def test_head_has_status_without_body(harness):
    h = harness()
    assert h.call("/apps/health/good", method="HEAD")[0] == 200
    assert h.call("/apps/health/gone", method="HEAD")[0] == 503
    assert h.call("/apps/health/good", method="HEAD")[2] == b""
    assert h.call("/health", method="HEAD")[0] == 200


def test_docker_unreachable_is_503_code_10(harness):
    def fetch():
        raise DockerUnreachable("Cannot connect to the Docker daemon")
    status, body = harness(fetch=fetch).json("/apps/health/good")
    assert status == 503 and body["code"] == 10 and "Cannot connect" in body["message"]
    status, body = harness(fetch=fetch).json("/apps")
    assert status == 503 and body["code"] == 10


def test_probe_result_decides(harness):
    def probe(app):
        return ProbeResult(app != "probed", "http://127.0.0.1:8010/o/%s/" % app, 502 if app == "probed" else 200, None)
    h = harness(probe=probe)
    assert h.json("/apps/health/good")[0] == 200
    status, body = h.json("/apps/health/probed")
    assert status == 503 and "does not answer" in body["message"] and body["probe"]["status"] == 502


def test_apps_lists_every_app_with_the_same_verdict(harness):
    h = harness()
    status, body = h.json("/apps")
    assert status == 200 and body["code"] == 0
    apps = body["message"]["apps"]
    assert sorted(apps) == ["gone", "good", "paused", "probed"]
    for app, entry in apps.items():
        single_status, single = h.json("/apps/health/" + app)
        assert entry == single
        assert (entry["code"] == 0) == (single_status == 200)
    assert body["message"]["healthy"] == ["good", "probed"]


def test_apps_is_stable(harness):
    h = harness()
    first = h.json("/apps")[1]
    second = h.json("/apps")[1]
    for body in (first, second):
        body["message"].pop("snapshot_age_s")
    assert first == second


def test_answer_bytes_are_built_once_per_snapshot(harness):
    h = harness()
    first = h.checker.answer("good")
    assert h.checker.answer("good") is first
    h.snapshotter.invalidate()
    assert h.checker.answer("good") is not first


def test_metrics_parse_and_count(harness):
    h = harness()
    h.call("/apps/health/good")
    h.call("/apps/health/gone")
    h.call("/nope")
    status, headers, body = h.call("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode("utf-8"))}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert samples[("healthcheck_app_healthy", (("app", "good"),))] == 1
    assert samples[("healthcheck_app_healthy", (("app", "gone"),))] == 0
    route = "/container-healthcheck/apps/health/<app_code>"
    assert samples[("healthcheck_http_requests_total", (("route", route), ("status", "200")))] == 1
    assert samples[("healthcheck_http_requests_total", (("route", route), ("status", "503")))] == 1
    assert samples[("healthcheck_http_requests_total", (("route", "unmatched"), ("status", "404")))] == 1
    assert ("healthcheck_snapshot_age_seconds", ()) in samples
    assert "healthcheck_events_stream_restarts" in families


def test_custom_prefix(harness):
    h = harness(prefix="/hc")
    assert h.json("/health")[0] == 200
    assert h.call("/container-healthcheck/health", raw_path=True)[0] == 404


def test_allow_list(harness):
    h = harness(allow=["10.0.0.0/8"])
    status, body = h.json("/health", remote="127.0.0.1")
    assert status == 403 and body["status"] == "error"
    assert h.json("/health", remote="10.1.2.3")[0] == 200


def test_probe_results_are_cached_and_shared_by_apps(harness):
    calls = []

    def probe(app):
        calls.append(app)
        return ProbeResult(True, "http://127.0.0.1:8010/o/%s/" % app, 200, None)
    h = harness(probe=probe)
    for _ in range(20):
        assert h.json("/apps/health/good")[0] == 200
    h.json("/apps")
    h.json("/apps")
    # one probe per serving app per TTL, whoever asks: good and probed serve, the rest do not
    assert sorted(calls) == ["good", "probed"]


def test_probe_results_single_flight(harness):
    import threading
    import time as _time
    calls = []

    def slow_probe(app):
        calls.append(app)
        _time.sleep(0.3)
        return ProbeResult(True, "http://127.0.0.1:8010/o/%s/" % app, 200, None)
    h = harness(probe=slow_probe)
    h.snapshotter.get()
    threads = [threading.Thread(target=h.checker.answer, args=("good",)) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["good"]
