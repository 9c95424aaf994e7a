"""Probes to the APPO Nginx from one thread: non-blocking sockets on a selector, keep-alive
connections reused from probe to probe, a hard deadline per probe.

A probe made this way costs a send, a wake-up and a receive: no thread woken per probe, no
new connection, no HTTP client library.
"""
import collections
import errno
import logging
import os
import selectors
import socket
import time

from healthcheck import probe
from healthcheck.http_answer import AnswerReader, BadAnswer

log = logging.getLogger(__name__)

# An idle connection is closed after this long, before nginx's keepalive_timeout (75 s by
# default) would close it under a request just sent.
DEFAULT_IDLE_S = 15.0
_RECV_BYTES = 65536
_CONNECTING = (errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN)


class _Probe(object):
    """One probe: its app, where its result goes, and its deadline once it has a connection."""

    __slots__ = ("app", "url", "done", "deadline", "retried", "answered")

    def __init__(self, app, url, done):
        self.app, self.url, self.done = app, url, done
        self.deadline = None
        self.retried = False
        self.answered = False


class _Connection(object):
    """One connection to the APPO Nginx, carrying one probe at a time (or none: idle)."""

    __slots__ = ("sock", "connecting", "reused", "probe", "reader", "received", "out", "events", "idle_since")

    def __init__(self, sock, connecting):
        self.sock = sock
        self.connecting = connecting
        self.reused = False  # it carried an answer before: nginx may have closed it meanwhile
        self.probe = None
        self.reader = None
        self.received = False  # a byte of the current answer came back
        self.out = b""
        self.events = 0
        self.idle_since = None


class ProbeLoop(object):
    """GET /o/<app>/ on host:port for each submitted app, all from the thread that calls
    run_once. At most max_connections are open; more probes wait in order. Each probe ends
    within timeout_s of getting its connection, with exactly one result.

    A reused connection that fails before any byte of the answer came back (nginx closed it
    while idle) is closed and its probe tried once more on a new one; any other failure is
    the probe's result: refused, reset, timeout, bad answer. An exception while handling one
    probe is that probe's `crashed` result; the loop goes on.
    """

    def __init__(self, host, port, timeout_s=2.0, bad_statuses=probe.DEFAULT_BAD_STATUSES, max_connections=32,
                 idle_s=DEFAULT_IDLE_S):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        self._bad_statuses = tuple(bad_statuses)
        self._max_connections = max(1, max_connections)
        self._idle_s = idle_s
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._wake_out.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ, None)
        self._waiting = collections.deque()  # probes without a connection yet, oldest first
        self._idle = []  # connections without a probe, the most recently used last
        self._busy = set()
        self.opened = 0  # connections opened so far

    def url_of(self, app):
        return probe.probe_url(app, self.port, self.host)

    @property
    def open_connections(self):
        return len(self._busy) + len(self._idle)

    def submit(self, app, done):
        """Probe app; done(ProbeResult) is called once, from run_once (or from here when
        the probe fails at once). Loop thread only."""
        self._waiting.append(_Probe(app, self.url_of(app), done))
        self._dispatch()

    def run_once(self, timeout_s=None):
        """Wait at most timeout_s (None: until something happens) for the network or wake(),
        then hand over the answers that came and end the probes past their deadline."""
        deadline = self._next_deadline()
        if deadline is not None:
            until_s = max(0.0, deadline - time.monotonic())
            timeout_s = until_s if timeout_s is None else min(timeout_s, until_s)
        for key, events in self._selector.select(timeout_s):
            conn = key.data
            if conn is None:
                self._drain_wake()
            elif conn.sock is not None:  # not closed by an earlier event of this round
                try:
                    self._handle(conn, events)
                except Exception as exc:  # one probe's trouble, never the loop's
                    log.exception("probe of %s crashed", conn.probe.app if conn.probe else "(idle connection)")
                    self._crash(conn, exc)
        now = time.monotonic()
        self._expire(now)
        self._close_idle(now)
        self._dispatch()

    def wake(self):
        """Make the current or next run_once return at once; from any thread."""
        try:
            self._wake_out.send(b"\0")
        except OSError:
            pass  # a wake-up is pending already, or the loop is closed

    def abort(self, exc):
        """Every probe in flight or waiting ends as crashed with exc; every connection closes.
        For an error of the loop itself, so that no probe is left without a result."""
        for conn in list(self._busy):
            self._crash(conn, exc)
        for conn in list(self._idle):
            self._close(conn)
        while self._waiting:
            pending = self._waiting.popleft()
            self._finish(pending, probe.crashed(pending.url, exc))

    def close(self):
        """Close every connection; probes in flight get no result (the prober is stopping)."""
        for conn in list(self._busy) + list(self._idle):
            self._close(conn)
        self._waiting.clear()
        self._selector.close()
        self._wake_in.close()
        self._wake_out.close()

    def _dispatch(self):
        while self._waiting and (self._idle or self.open_connections < self._max_connections):
            self._start(self._waiting.popleft(), self._idle.pop() if self._idle else None)

    def _start(self, pending, conn):
        """Send pending's request on conn (None: a new connection); its deadline runs from
        its first try."""
        if pending.deadline is None:
            pending.deadline = time.monotonic() + self.timeout_s
        try:
            request = probe.probe_request(pending.app, self.port)
            if conn is None:
                conn = self._open()
            conn.probe, conn.reader, conn.received, conn.out = pending, AnswerReader(), False, request
            self._busy.add(conn)
            if not conn.connecting:
                self._flush(conn)
        except OSError as exc:
            if conn is None:
                self._finish(pending, probe.failed(pending.url, exc))
            else:
                self._fail(conn, exc)
        except Exception as exc:
            log.exception("probe of %s crashed", pending.app)
            if conn is not None:
                self._close(conn)
            self._finish(pending, probe.crashed(pending.url, exc))

    def _open(self):
        family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            code = sock.connect_ex(address)
            if code != 0 and code not in _CONNECTING:
                raise OSError(code, os.strerror(code))  # e.g. ConnectionRefusedError
        except BaseException:
            sock.close()
            raise
        self.opened += 1
        conn = _Connection(sock, connecting=code != 0)
        conn.events = selectors.EVENT_WRITE if conn.connecting else selectors.EVENT_READ
        self._selector.register(sock, conn.events, conn)
        return conn

    def _handle(self, conn, events):
        try:
            if conn.connecting:
                code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                conn.connecting = False
                self._flush(conn)
                return
            if events & selectors.EVENT_WRITE and conn.out:
                self._flush(conn)
            if events & selectors.EVENT_READ:
                self._receive(conn)
        except (OSError, BadAnswer) as exc:
            self._fail(conn, exc)

    def _flush(self, conn):
        """Send what is left of the request; wait for the socket to take the rest, if any."""
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            sent = 0
        conn.out = conn.out[sent:]
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        if wanted != conn.events:
            conn.events = wanted
            self._selector.modify(conn.sock, wanted, conn)

    def _receive(self, conn):
        try:
            data = conn.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return
        if conn.probe is None:  # idle: nginx closed it (or said something unasked)
            self._close(conn)
            return
        if not data:
            conn.reader.eof()  # BadAnswer when no status line came
        else:
            conn.received = True
            conn.reader.feed(data)
        pending = conn.probe
        if conn.reader.status is not None and not pending.answered:
            self._finish(pending, probe.answered(pending.url, conn.reader.status, self._bad_statuses))
        if conn.reader.finished:
            self._release(conn)

    def _release(self, conn):
        """conn's answer is over: kept for the next probe if it can carry one, else closed."""
        keep = conn.reader.keep_alive and not conn.out
        self._busy.discard(conn)
        conn.probe = conn.reader = None
        if not keep:
            self._close(conn)
            return
        if conn.events != selectors.EVENT_READ:
            conn.events = selectors.EVENT_READ
            self._selector.modify(conn.sock, conn.events, conn)
        conn.reused = True
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def _fail(self, conn, exc):
        """conn failed (an OSError, or a BadAnswer such as an early close): it is closed, and
        its probe tried again on a new connection if nginx had only closed an idle
        connection, else ended with the error."""
        pending, reused, received = conn.probe, conn.reused, conn.received
        self._close(conn)
        if pending is None or pending.answered:
            return
        if reused and not received and not pending.retried:
            pending.retried = True
            self._start(pending, None)
        elif isinstance(exc, BadAnswer):
            self._finish(pending, probe.bad_answer(pending.url, str(exc)))
        else:
            self._finish(pending, probe.failed(pending.url, exc))

    def _crash(self, conn, exc):
        pending = conn.probe
        self._close(conn)
        if pending is not None and not pending.answered:
            self._finish(pending, probe.crashed(pending.url, exc))

    def _finish(self, pending, result):
        pending.answered = True
        try:
            pending.done(result)
        except Exception:
            log.exception("handing over the probe result of %s failed", pending.app)

    def _next_deadline(self):
        return min((conn.probe.deadline for conn in self._busy), default=None)

    def _expire(self, now):
        for conn in [c for c in self._busy if c.probe.deadline <= now]:
            pending = conn.probe
            self._close(conn)
            if not pending.answered:
                self._finish(pending, probe.timed_out(pending.url, self.timeout_s))

    def _close_idle(self, now):
        while self._idle and now - self._idle[0].idle_since > self._idle_s:
            self._close(self._idle[0])

    def _close(self, conn):
        if conn.sock is None:
            return
        self._busy.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        conn.sock = None

    def _drain_wake(self):
        try:
            while self._wake_in.recv(4096):
                pass
        except OSError:
            pass  # drained (BlockingIOError)
