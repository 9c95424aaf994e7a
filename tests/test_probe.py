"""The probe against real loopback servers: statuses, refusals, hangs, resets, huge bodies."""
import socket
import struct
import time

import pytest

from healthcheck.probe import probe_app
from support import LoopbackServer, StatusServer, free_port


@pytest.mark.parametrize("status,ok", [(200, True), (302, True), (404, True), (500, True),
                                       (502, False), (503, False), (504, False)])
def test_status_decides(status, ok):
    server = StatusServer(status, headers=[("Location", "http://127.0.0.1:1/elsewhere")])
    try:
        result = probe_app("bk_iam", server.port, 2.0)
        assert result.ok is ok and result.status == status
        assert server.paths == ["/o/bk_iam/"]  # no redirect followed
    finally:
        server.close()


def test_bad_statuses_are_configurable():
    server = StatusServer(404)
    try:
        assert not probe_app("a", server.port, 2.0, bad_statuses=(404,)).ok
    finally:
        server.close()


def test_refused():
    result = probe_app("a", free_port(), 2.0)
    assert not result.ok and result.error == "connection refused" and result.failure == "refused"
    assert "refused" in result.describe()


def test_hang_is_bounded_by_the_timeout():
    listener = LoopbackServer(handle=lambda conn: time.sleep(10))
    started = time.monotonic()
    result = probe_app("a", listener.port, 0.5)
    assert time.monotonic() - started < 1.5
    assert not result.ok and "timed out" in result.error and result.failure == "timeout"
    listener.close()


def test_slow_drip_is_bounded_by_the_timeout():
    def drip(conn):
        try:
            for byte in b"HTTP/1.1 200":
                conn.sendall(bytes([byte]))
                time.sleep(0.2)
        except OSError:
            pass  # the probe gave up and closed: what this test wants
    listener = LoopbackServer(handle=drip)
    started = time.monotonic()
    result = probe_app("a", listener.port, 0.5)
    assert time.monotonic() - started < 1.5 and not result.ok
    listener.close()


def test_reset_is_not_ok():
    def reset(conn):
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    listener = LoopbackServer(handle=reset)
    result = probe_app("a", listener.port, 2.0)
    assert not result.ok and result.error and result.failure in ("reset", "bad_answer")
    listener.close()


def test_garbage_answer_is_not_ok():
    listener = LoopbackServer(handle=lambda conn: (conn.recv(100), conn.sendall(b"SSH-2.0-OpenSSH\r\n"), conn.close()))
    result = probe_app("a", listener.port, 2.0)
    assert not result.ok and "not an HTTP answer" in result.error and result.failure == "bad_answer"
    listener.close()


def test_huge_body_is_not_read():
    server = StatusServer(200, body=b"x" * (10 * 1024 * 1024))
    try:
        started = time.monotonic()
        result = probe_app("a", server.port, 2.0)
        assert result.ok and time.monotonic() - started < 1.0
    finally:
        server.close()


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
