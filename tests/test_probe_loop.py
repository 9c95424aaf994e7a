"""The probe loop against a real nginx and loopback servers: keep-alive reuse, the retry on a
connection nginx closed, deadlines, refusals, resets, garbage, bounded connections, crashes."""
import os
import shutil
import socket
import struct
import threading

import pytest

from healthcheck.probe_loop import ProbeLoop
from support import LoopbackServer, StatusServer, free_port, start_nginx, stop_nginx

NGINX_CONF = """daemon off;
master_process on;
worker_processes 1;
user root;
pid %(dir)s/nginx.pid;
error_log %(dir)s/error.log warn;
events { worker_connections 256; }
http {
    access_log off;
    keepalive_requests %(keepalive_requests)d;
    keepalive_timeout %(keepalive_timeout)s;
    server {
        listen 127.0.0.1:%(port)d;
        location /o/dead/ { return 502; }
        location /o/big/ { root %(dir)s; try_files /big.txt =404; }
        location /o/chunked/ { root %(dir)s; try_files /big.txt =404; sub_filter x y; }
        location /o/gone/ { proxy_pass http://127.0.0.1:%(gone_port)d/; }
%(proxied)s        location /o/ { return 200 "ok\\n"; }
    }
}
"""


class Nginx(object):
    """A real nginx on a loopback port: /o/<app>/ answers 200, /o/dead/ 502, /o/big/ a 20 KB
    file, /o/chunked/ the same file chunked (a filter changes it, its length is not known
    ahead), /o/gone/ proxies to a port nobody listens on (nginx says 502). proxied: {app:
    port} of apps whose /o/<app>/ goes to a server of the test's (an app's uwsgi)."""

    def __init__(self, workdir, keepalive_requests=1000, keepalive_timeout="75s", proxied=None):
        self.port = free_port()
        self.conf = os.path.join(str(workdir), "nginx.conf")
        with open(os.path.join(str(workdir), "big.txt"), "w") as handle:
            handle.write("x" * 20000)
        locations = "".join("        location /o/%s/ { proxy_pass http://127.0.0.1:%d/; }\n" % pair
                            for pair in sorted((proxied or {}).items()))
        with open(self.conf, "w") as handle:
            handle.write(NGINX_CONF % {"dir": workdir, "port": self.port, "keepalive_requests": keepalive_requests,
                                       "keepalive_timeout": keepalive_timeout, "gone_port": free_port(),
                                       "proxied": locations})
        self.proc = start_nginx(self.conf)

    def stop(self):
        stop_nginx(self.proc)


@pytest.fixture
def make_nginx(tmp_path):
    if not shutil.which("nginx"):
        if os.environ.get("CI"):
            raise AssertionError("nginx missing (scripts/install-deps)")
        pytest.skip("nginx missing")
    started = []

    def make(**kwargs):
        workdir = tmp_path / ("nginx%d" % len(started))
        workdir.mkdir()
        started.append(Nginx(str(workdir), **kwargs))
        return started[-1]
    yield make
    for nginx in started:
        nginx.stop()


@pytest.fixture
def loops():
    made = []

    def make(port, **kwargs):
        made.append(ProbeLoop("127.0.0.1", port, **kwargs))
        return made[-1]
    yield make
    for loop in made:
        loop.close()


def run_until(loop, condition, rounds=400):
    """Drive the loop (this thread is its thread) until condition() holds; each round waits
    at most 0.05 s for the network."""
    for _ in range(rounds):
        if condition():
            return True
        loop.run_once(0.05)
    return condition()


def probe(loop, app):
    """One probe through the loop, driven until its result comes."""
    results = []
    loop.submit(app, results.append)
    assert run_until(loop, lambda: results), "no result"
    assert len(results) == 1
    return results[0]


def test_probes_reuse_one_keep_alive_connection(make_nginx, loops):
    nginx = make_nginx()
    loop = loops(nginx.port)
    for number in range(50):
        result = probe(loop, "app%d" % (number % 5))
        assert result.ok and result.status == 200 and result.url == "http://127.0.0.1:%d/o/app%d/" % (
            nginx.port, number % 5)
    assert loop.opened == 1 and loop.open_connections == 1


@pytest.mark.parametrize("app,status,ok", [("dead", 502, False), ("gone", 502, False), ("big", 200, True),
                                           ("chunked", 200, True)])
def test_the_status_decides_and_the_body_is_skipped(make_nginx, loops, app, status, ok):
    nginx = make_nginx()
    loop = loops(nginx.port)
    for _ in range(3):
        result = probe(loop, app)
        assert (result.ok, result.status, result.error) == (ok, status, None)
    assert loop.opened == 1  # each answer read to its end: the connection carried the next request


def test_bad_statuses_are_configurable(make_nginx, loops):
    nginx = make_nginx()
    assert not probe(loops(nginx.port, bad_statuses=(200,)), "a").ok


def test_nginx_ending_keep_alive_is_followed(make_nginx, loops):
    """keepalive_requests 3: nginx says `Connection: close` on every third answer."""
    nginx = make_nginx(keepalive_requests=3)
    loop = loops(nginx.port)
    results = [probe(loop, "a") for _ in range(7)]
    assert all(r.ok for r in results)
    assert loop.opened == 3


def test_an_idle_connection_closed_by_nginx_is_closed_here_too(make_nginx, loops):
    nginx = make_nginx(keepalive_timeout="1s")
    loop = loops(nginx.port)
    assert probe(loop, "a").ok and loop.open_connections == 1
    assert run_until(loop, lambda: loop.open_connections == 0, rounds=200)
    assert probe(loop, "a").ok and loop.opened == 2


def test_idle_connections_are_closed_after_idle_s(make_nginx, loops):
    nginx = make_nginx()
    loop = loops(nginx.port, idle_s=0.0)
    assert probe(loop, "a").ok
    assert run_until(loop, lambda: loop.open_connections == 0)


class OneAnswerPerConnection(LoopbackServer):
    """Answers the first request of each connection with a keep-alive 200; at the second it
    closes the connection without a byte (or resets it), as nginx does when it closes an idle
    connection just as a request is sent."""

    def __init__(self, reset=False):
        self.reset = reset
        LoopbackServer.__init__(self)

    def handle(self, conn):
        if StatusServer.read_path(conn) is None:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if StatusServer.read_path(conn) is None:
            return
        if self.reset:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()


@pytest.mark.parametrize("reset", [False, True])
def test_a_reused_connection_that_fails_before_any_byte_is_retried_once_on_a_new_one(loops, reset):
    server = OneAnswerPerConnection(reset)
    try:
        loop = loops(server.port)
        results = [probe(loop, "a") for _ in range(4)]
        assert [r.status for r in results] == [200] * 4
        assert loop.opened == 4 and server.connections == 4
    finally:
        server.close()


def test_a_new_connection_that_closes_is_the_result_not_retried(loops):
    server = LoopbackServer(handle=lambda conn: (StatusServer.read_path(conn), conn.close()))
    try:
        result = probe(loops(server.port), "a")
        assert not result.ok and result.failure == "bad_answer"
        assert result.error == "connection closed before an HTTP status line"
        assert server.connections == 1
    finally:
        server.close()


def test_refused(loops):
    loop = loops(free_port())
    result = probe(loop, "a")
    assert not result.ok and result.error == "connection refused" and result.failure == "refused"
    assert "refused" in result.describe() and loop.open_connections == 0


def test_a_hang_is_ended_by_the_deadline(loops):
    held = threading.Event()
    listener = LoopbackServer(handle=lambda conn: held.wait(10))
    try:
        loop = loops(listener.port, timeout_s=0.5)
        result = probe(loop, "a")
        assert not result.ok and result.error == "timed out after 0.5s" and result.failure == "timeout"
        assert loop.open_connections == 0
    finally:
        held.set()
        listener.close()


def test_a_slow_drip_is_ended_by_the_deadline(loops):
    stop = threading.Event()

    def drip(conn):
        StatusServer.read_path(conn)
        try:
            for byte in b"HTTP/1.1 200":
                conn.sendall(bytes([byte]))
                if stop.wait(0.2):
                    return
        except OSError:
            pass  # the probe gave up and closed: what this test wants
    listener = LoopbackServer(handle=drip)
    try:
        result = probe(loops(listener.port, timeout_s=0.5), "a")
        assert not result.ok and result.failure == "timeout"
    finally:
        stop.set()
        listener.close()


def test_reset_is_not_ok(loops):
    def reset(conn):
        conn.recv(100)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    listener = LoopbackServer(handle=reset)
    try:
        result = probe(loops(listener.port), "a")
        assert not result.ok and result.error and result.failure in ("reset", "bad_answer")
    finally:
        listener.close()


def test_garbage_answer_is_not_ok(loops):
    listener = LoopbackServer(handle=lambda conn: (conn.recv(100), conn.sendall(b"SSH-2.0-OpenSSH\r\n"), conn.close()))
    try:
        result = probe(loops(listener.port), "a")
        assert not result.ok and "not an HTTP answer" in result.error and result.failure == "bad_answer"
    finally:
        listener.close()


def test_a_huge_body_is_not_read_the_connection_is_closed(loops):
    server = StatusServer(200, body=b"x" * (10 * 1024 * 1024))
    try:
        loop = loops(server.port)
        result = probe(loop, "a")
        assert result.ok and result.status == 200
        assert run_until(loop, lambda: loop.open_connections == 0)
    finally:
        server.close()


class HeldAnswers(LoopbackServer):
    """Reads each request and answers 200 once `release` is set, keeping the connection open;
    apps in `hang` are never answered (until the server closes). Records the paths asked, in
    order, and counts the requests waiting now."""

    def __init__(self, hang=()):
        self.release = threading.Event()
        self.hang = set(hang)
        self.paths = []
        self.waiting = 0
        self._closing = threading.Event()
        self._lock = threading.Lock()
        LoopbackServer.__init__(self)

    def handle(self, conn):
        while True:
            path = StatusServer.read_path(conn)
            if path is None:
                return
            with self._lock:
                self.paths.append(path)
                self.waiting += 1
            if path.split("/")[2] in self.hang:
                self._closing.wait(30)
                conn.close()
                return
            self.release.wait(10)
            with self._lock:
                self.waiting -= 1
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self):
        self.release.set()
        self._closing.set()
        LoopbackServer.close(self)


def test_connections_are_bounded_and_probes_wait_in_order(loops):
    server = HeldAnswers()
    try:
        loop = loops(server.port, max_connections=2)
        results = []
        for number in range(6):
            loop.submit("app%d" % number, lambda result: results.append(result))
        assert run_until(loop, lambda: server.waiting == 2)
        assert server.connections == 2 and loop.open_connections == 2 and results == []
        server.release.set()
        assert run_until(loop, lambda: len(results) == 6)
        assert set(server.paths[:2]) == {"/o/app0/", "/o/app1/"}  # the first two submitted went first
        assert sorted(r.url.split("/")[-2] for r in results) == ["app%d" % n for n in range(6)]
        assert all(r.ok for r in results) and server.connections == 2
    finally:
        server.close()


def test_a_hung_probe_holds_nothing_else_up(loops):
    server = HeldAnswers(hang={"hung"})
    server.release.set()  # everything but the hung app answers at once
    try:
        loop = loops(server.port, timeout_s=30, max_connections=4)
        results = {}
        loop.submit("hung", lambda result: results.setdefault("hung", result))
        for number in range(20):
            loop.submit("fast%d" % number, lambda result, n=number: results.setdefault("fast%d" % n, result))
        assert run_until(loop, lambda: len(results) == 20)
        assert "hung" not in results and all(r.ok for r in results.values())
    finally:
        server.close()


def test_a_probe_that_raises_is_crashed_and_the_loop_goes_on(make_nginx, loops):
    nginx = make_nginx()
    loop = loops(nginx.port)
    result = probe(loop, u"caf\u00e9")  # not ASCII: building its request raises
    assert not result.ok and result.failure == "crashed" and "UnicodeEncodeError" in result.error
    assert probe(loop, "a").ok


def test_a_result_taker_that_raises_does_not_stop_the_loop(make_nginx, loops):
    nginx = make_nginx()
    loop = loops(nginx.port)

    def take(result):
        raise RuntimeError("a bug in the taker")
    loop.submit("a", take)
    assert probe(loop, "b").ok


def test_abort_ends_every_probe_as_crashed(loops):
    server = HeldAnswers()
    try:
        loop = loops(server.port, max_connections=1)
        results = []
        loop.submit("a", results.append)
        loop.submit("b", results.append)
        assert run_until(loop, lambda: server.waiting == 1)
        loop.abort(RuntimeError("the loop broke"))
        assert [r.failure for r in results] == ["crashed", "crashed"]
        assert "the loop broke" in results[0].error and loop.open_connections == 0
    finally:
        server.close()


def test_wake_ends_a_wait_from_another_thread(loops):
    loop = loops(free_port())
    woken = threading.Event()
    waker = threading.Thread(target=lambda: (woken.wait(10), loop.wake()))
    waker.start()
    woken.set()
    loop.run_once(None)  # would wait for ever without the wake-up
    waker.join()
