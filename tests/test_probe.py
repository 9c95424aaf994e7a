"""The probe's definition: the request sent, and the result each outcome is (the sending is
tests/test_probe_loop.py's)."""
import errno
import socket

import pytest

from healthcheck import __version__
from healthcheck.probe import (DEFAULT_BAD_STATUSES, answered, bad_answer, crashed, failed, probe_request, probe_url,
                               timed_out)

URL = "http://127.0.0.1:8010/o/bk_iam/"


def test_the_request_keeps_the_connection_open_and_asks_the_app_route():
    request = probe_request("bk_iam", 8010)
    assert request == ("GET /o/bk_iam/ HTTP/1.1\r\nHost: localhost:8010\r\nUser-Agent: container-healthcheck/%s\r\n"
                       "Accept: */*\r\n\r\n" % __version__).encode("ascii")
    assert b"close" not in request.lower()


def test_url():
    assert probe_url("bk_iam", 8010) == URL
    assert probe_url("a", 80, "127.0.0.2") == "http://127.0.0.2:80/o/a/"


@pytest.mark.parametrize("status,ok", [(200, True), (302, True), (404, True), (500, True),
                                       (502, False), (503, False), (504, False)])
def test_status_decides(status, ok):
    result = answered(URL, status)
    assert (result.ok, result.status, result.error, result.failure) == (ok, status, None, None)
    assert result.describe() == "GET %s answered %d" % (URL, status)


def test_bad_statuses_are_configurable():
    assert DEFAULT_BAD_STATUSES == (502, 503, 504)
    assert not answered(URL, 404, bad_statuses=(404,)).ok
    assert answered(URL, 502, bad_statuses=(404,)).ok


@pytest.mark.parametrize("exc,words,kind", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused", "refused"),
    (OSError(errno.ECONNREFUSED, "Connection refused"), "connection refused", "refused"),
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), "connection reset", "reset"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), "connection reset", "reset"),
    (OSError(errno.EHOSTUNREACH, "No route to host"), "No route to host", "error"),
    (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "Name or service not known", "error"),
])
def test_errors_are_unhealthy_results_of_their_kind(exc, words, kind):
    result = failed(URL, exc)
    assert (result.ok, result.status, result.error, result.failure) == (False, None, words, kind)
    assert result.describe() == "GET %s failed: %s" % (URL, words)


def test_timeout_bad_answer_and_crash_words():
    assert timed_out(URL, 2.0)[2:] == (None, "timed out after 2s", "timeout")
    assert timed_out(URL, 0.5).error == "timed out after 0.5s"
    assert bad_answer(URL, "not an HTTP answer: b'SSH'")[2:] == (None, "not an HTTP answer: b'SSH'", "bad_answer")
    result = crashed(URL, ValueError("bad probe"))
    assert (result.ok, result.error, result.failure) == (False, "probe crashed: ValueError: bad probe", "crashed")


def test_metrics_count_probes_by_their_kind_not_their_words():
    from healthcheck.metrics import Metrics
    from healthcheck.models import ProbeResult
    from prometheus_client.parser import text_string_to_metric_families
    metrics = Metrics()
    for result in (ProbeResult(True, "u", 200, None), ProbeResult(False, "u", 502, None),
                   ProbeResult(False, "u", None, "the peer went away", "reset"),
                   ProbeResult(False, "u", None, "odd words", "timeout")):
        metrics.probe_done(result)
    counts = {s.labels["result"]: s.value for f in text_string_to_metric_families(metrics.render().decode())
              if f.name == "healthcheck_probe_results" for s in f.samples if s.name.endswith("_total")}
    assert counts == {"ok": 1, "bad_status": 1, "reset": 1, "timeout": 1}
