"""The HTTP contract, in-process through wsgiref.validate (no sockets, no docker)."""
import io
import json
import os
import re
import shutil
import tempfile
import wsgiref.util
import wsgiref.validate

import pytest
from prometheus_client.parser import text_string_to_metric_families

from healthcheck.config import parse_args
from healthcheck.errors import DockerUnreachable
from healthcheck.metrics import Metrics
from healthcheck.models import ProbeResult
from healthcheck.parsing import parse_ps_output
from healthcheck.service import Service
from healthcheck.web import Instrumented, make_app
from support import ROOT

_PS_LINE = ('{"ID":"%s","Names":"%s","Image":"img","Command":"\\"sleep 1\\"",'
            '"CreatedAt":"2024-03-08 14:08:39 +0800 CST","Status":"%s","Ports":"%s"}')
PS = "\n".join([
    _PS_LINE % ("a" * 64, "good-1700000000", "Up 5 days", "0.0.0.0:8080->80/tcp"),
    _PS_LINE % ("b" * 64, "paused-1700000000", "Up 5 days (Paused)", ""),
    _PS_LINE % ("c" * 64, "gone-1700000000", "Exited (0) 5 days ago", ""),
    _PS_LINE % ("d" * 64, "probed-1700000000", "Up 5 days", ""),
])


class Harness(object):
    """The service as `serve` wires it (service.Service), with docker and the probe replaced by
    fakes, behind the web app in-process."""

    def __init__(self, fetch=None, probe=None, prefix="/container-healthcheck", allow=None):
        self.fetch_calls = 0

        def default_fetch():
            self.fetch_calls += 1
            return parse_ps_output(PS)
        self.state_dir = tempfile.mkdtemp(prefix="hc-web-")
        self.metrics = Metrics()
        self.service = Service(parse_args(["serve", "--ngx-port", "0", "--state-dir", self.state_dir]), self.metrics,
                               refresh_s=60, max_stale_s=0, probe_ttl_s=60, probe_workers=4, probe_wait_s=2.0,
                               feed_waiters=2, list_containers=fetch or default_fetch, probe=probe).start()
        self.snapshotter, self.prober = self.service.snapshotter, self.service.prober
        self.checker, self.feed = self.service.checker, self.service.feed
        self.app = wsgiref.validate.validator(
            Instrumented(make_app(self.checker, self.metrics, prefix, feed=self.feed), self.metrics, allow))
        self.prefix = prefix

    def call(self, path, method="GET", query="", remote="127.0.0.1", raw_path=False, wsgi_path=None, environ=None):
        if wsgi_path is None:
            path = path if raw_path else self.prefix + path
            # WSGI carries the path as latin-1 decoded bytes, as a real server does.
            wsgi_path = path.encode("utf-8").decode("latin-1")
        extra = environ or {}
        environ = {"REQUEST_METHOD": method, "PATH_INFO": wsgi_path,
                   "QUERY_STRING": query, "REMOTE_ADDR": remote, "SCRIPT_NAME": "", "wsgi.input": io.BytesIO(b"")}
        environ.update(extra)
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
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        return status, json.loads(body.decode("utf-8"))

    def close(self):
        self.service.stop()
        shutil.rmtree(self.state_dir, ignore_errors=True)


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


@pytest.mark.parametrize("query", ["all=maybe", "all=2", "all=truex"])
def test_bad_all_value_is_400(harness, query):
    status, body = harness().json("/apps/health/good", query=query)
    assert status == 400 and body["code"] == 13 and "all" in body["message"]


@pytest.mark.parametrize("query,listed", [
    ("all=true", True), ("all=TRUE", True), ("all=1", True), ("all=yes", True), ("all=Yes", True),
    ("all=false", False), ("all=0", False), ("all=no", False), ("all=", False), ("all", False),
    ("_=1709878117", False), ("x=1", False), ("all=true&debug=1", True), ("all=true&all=false", True),
])
def test_query_like_the_go_tool(harness, query, listed):
    """Unknown parameters (cache-busters) are ignored, an empty `all` is false, a repeated
    flag takes its first value."""
    status, body = harness().json("/apps/health/gone", query=query)
    assert status == 503 and body["code"] == 12
    assert [c["names"] for c in body["containers"]] == (["gone-1700000000"] if listed else [])


@pytest.mark.parametrize("path", ["/health", "/apps", "/apps/health/good", "/metrics", "/openapi.json"])
def test_trailing_slash_is_served_like_the_route(harness, path):
    h = harness()
    plain = h.call(path)
    slashed = h.call(path + "/")
    assert slashed[0] == plain[0] == 200
    assert slashed[1]["Content-Type"] == plain[1]["Content-Type"]


def test_path_that_is_not_utf8_is_400_json(harness):
    status, headers, body = harness().call(None, wsgi_path="/container-healthcheck/apps/health/\xff")
    assert status == 400 and headers["Content-Type"] == "application/json; charset=utf-8"
    assert json.loads(body.decode("utf-8"))["code"] == 13


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


def test_reports_are_built_once_per_snapshot(harness):
    h = harness()
    first, _ = h.checker.check("good")
    assert h.checker.check("good")[0] is first
    h.snapshotter.invalidate()
    assert h.checker.check("good")[0] is not first


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


def counting_probe():
    """A probe that answers 200 for every app and records which it was asked: (probe, calls)."""
    calls = []

    def probe(app):
        calls.append(app)
        return ProbeResult(True, "http://127.0.0.1:8010/o/%s/" % app, 200, None)
    return probe, calls


def test_probe_results_are_shared_by_apps_and_the_per_app_route(harness):
    probe, calls = counting_probe()
    h = harness(probe=probe)
    for _ in range(20):
        assert h.json("/apps/health/good")[0] == 200
    first = h.json("/apps")[1]["message"]["apps"]
    # /apps never waits: probed's first probe is still running, so it is not healthy yet
    assert "first probe has not finished" in first["probed"]["message"]
    h.prober.wait_for("probed", "d" * 64, 5)
    for _ in range(5):
        assert h.json("/apps")[1]["message"]["healthy"] == ["good", "probed"]
    # one probe per serving app per TTL, whoever asks: good and probed serve, the rest do not
    assert sorted(calls) == ["good", "probed"]


def test_a_probe_that_raises_is_503_for_every_waiter(harness):
    import threading

    def probe(app):
        raise RuntimeError("boom")
    h = harness(probe=probe)
    h.snapshotter.get()
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(h.json("/apps/health/good"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 8
    for status, body in answers:
        assert status == 503 and body["code"] == 12
        assert "probe crashed: RuntimeError: boom" in body["message"] and body["probe"]["ok"] is False
    status, body = h.json("/apps")
    assert body["message"]["apps"]["good"]["code"] == 12 and "good" not in body["message"]["healthy"]


def test_metrics_has_no_side_effects(harness):
    probe, calls = counting_probe()
    h = harness(probe=probe)
    h.snapshotter.get()
    fetches = h.fetch_calls
    for _ in range(5):
        assert h.call("/metrics")[0] == 200
    assert calls == [] and h.fetch_calls == fetches
    h.json("/apps/health/good")
    families = {f.name: f for f in text_string_to_metric_families(h.call("/metrics")[2].decode("utf-8"))}
    ages = {s.labels["app"]: s.value for s in families["healthcheck_app_probe_age_seconds"].samples}
    assert list(ages) == ["good"] and 0 <= ages["good"] < 5
    health = {s.labels["app"]: s.value for s in families["healthcheck_app_healthy"].samples}
    # probed has no probe result yet: its verdict is unknown, so it is left out
    assert health == {"good": 1, "paused": 0, "gone": 0}
    assert calls == ["good"]


def test_a_bug_is_500_code_16_never_a_docker_code(harness):
    h = harness()

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")
    h.checker.check = broken
    status, body = h.json("/apps/health/good")
    assert status == 500 and body == {"code": 16, "status": "error", "message": "internal error"}


EVIL = ('{"ID":"%s","Names":"evil-1700000000","Image":"img","Command":"\\"<script>window.__pwned=1</script>'
        '<img src=x onerror=window.__pwned=2>\\"","CreatedAt":"2024-03-08 14:08:39 +0800 CST",'
        '"Status":"Up 5 days","Ports":""}' % ("e" * 64))


def test_host_page_lists_every_app_escaped_under_a_strict_csp(harness):
    h = harness(fetch=lambda: parse_output_with_evil())
    for path, headers in (("/", {}), ("", {}), ("/apps", {"HTTP_ACCEPT": "text/html,application/xhtml+xml,*/*;q=0.8"})):
        status, head, body = h.call(path, environ=headers)
        assert status == 200 and head["Content-Type"] == "text/html; charset=utf-8", path
        csp = head["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp
        page = body.decode("utf-8")
        for app in ("good", "paused", "gone", "probed", "evil"):
            assert 'data-app="%s"' % app in page
        assert "<script>window.__pwned" not in page and "<img src=x" not in page
        assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page
        assert page.count("<script>") == 1  # only the page's own filter script
    status, head, body = h.call("/apps", environ={"HTTP_ACCEPT": "*/*"})
    assert head["Content-Type"] == "application/json; charset=utf-8" and head.get("Vary") == "Accept"


def test_the_csp_allows_exactly_the_style_and_script_each_page_carries(harness):
    """What a browser checks: the sha256 of each <style> and <script> the served page holds is
    in the Content-Security-Policy served with it; for the host page and the entry's matrix
    (whose Lua carries its own literal CSP)."""
    import base64
    import hashlib

    def digests(page):
        blocks = re.findall(r"<style>(.*?)</style>", page, re.S) + re.findall(r"<script>(.*?)</script>", page, re.S)
        return ["'sha256-%s'" % base64.b64encode(hashlib.sha256(b.encode("utf-8")).digest()).decode() for b in blocks]
    status, head, body = harness().call("/")
    assert status == 200 and len(digests(body.decode("utf-8"))) == 2
    assert all(d in head["Content-Security-Policy"] for d in digests(body.decode("utf-8")))
    lua = open(os.path.join(ROOT, "scripts", "nginx", "container_healthcheck", "status.lua"), encoding="utf-8").read()
    style = re.search(r"local PAGE_STYLE = \[\[(.*?)\]\]", lua, re.S).group(1)
    script = re.search(r"local PAGE_SCRIPT = \[\[(.*?)\]\]", lua, re.S).group(1)
    csp = re.search(r'local PAGE_CSP = "([^"]*)"', lua).group(1)
    assert all(d in csp for d in digests("<style>%s</style><script>%s</script>" % (style, script)))
    # and the entry's page looks like the host page: the same style, script and policy
    from healthcheck import pages
    assert (style, script, csp) == (pages.STYLE, pages.SCRIPT, pages.CSP)


def test_apps_json_says_why_each_other_app_is_not_healthy_up_front(harness):
    status, headers, body = harness().call("/apps")
    message = json.loads(body.decode())["message"]
    assert list(message)[:3] == ["snapshot_age_s", "healthy", "unhealthy"]
    assert message["unhealthy"] == {"gone": "exited", "paused": "paused"}
    # the balancer's simple parser finds both lists before the bulky per-app answers
    assert body.index(b'"unhealthy"') < body.index(b'"apps"')


def parse_output_with_evil():
    return parse_ps_output(PS + "\n" + EVIL)


def test_feed_answers_every_app_in_its_text_format(harness):
    harness = harness()
    status, headers, body = harness.call("/apps/feed")
    assert status == 200 and headers["Content-Type"] == "text/plain; charset=utf-8"
    lines = body.decode("utf-8").splitlines()
    assert lines[0] == "container-healthcheck-feed 1" and lines[-1] == "end" and lines[2] == "held 0"
    count = int(lines[3].split()[1])
    apps = dict((line.split()[0], line.split()[1:]) for line in lines[4:4 + count])
    _, listed = harness.json("/apps")
    assert sorted(apps) == sorted(listed["message"]["apps"])
    assert all(apps[a][0] == ("1" if a in listed["message"]["healthy"] else "0") for a in apps)
    index = int(lines[1].split()[1])
    status, _, body = harness.call("/apps/feed", query="index=%d&wait=0.2" % index)
    assert status == 200 and b"\nheld 1\n" in body and (b"\nindex %d\n" % index) in body  # a heartbeat


@pytest.mark.parametrize("query", ["index=x", "index=-1", "wait=6", "wait=-1", "wait=abc", "index=1.5"])
def test_feed_route_refuses_bad_index_and_wait(harness, query):
    status, body = harness().json("/apps/feed", query=query)
    assert status == 400 and body["code"] == 13


def test_feed_route_without_a_feed_is_404_code_14(harness):
    h = harness()
    h.app = wsgiref.validate.validator(Instrumented(make_app(h.checker, h.metrics, h.prefix), h.metrics))
    status, body = h.json("/apps/feed")
    assert status == 404 and body["code"] == 14
