"""The entry balancers' feed: every app's verdict on this host, pushed by blocking queries.

Like Consul's blocking queries: a client sends the `index` it last saw and is answered at
once when the verdicts changed since, else after `wait` seconds with the same index (a
heartbeat, whose absence tells the client this host is hung). The wire format is
feed_format.py's.
"""
import logging
import threading
import time

from healthcheck import errors
from healthcheck.feed_format import FeedAnswer, ages_of, evidence_of, verdicts_of

log = logging.getLogger(__name__)


class Feed(object):
    """Keeps the verdict index: a builder thread recomputes every app's verdict when poked
    (a new container list, a probe result that changed), when the watched drain state changed
    and at least every full_s, and bumps the index when any verdict or reason changed.
    Clients wait for it; ages are read per answer.

    view_of(): an AppsView (raises DockerError); probe_ages(): {app: seconds}.
    max_waiters: requests allowed to wait at once, so waiting entries never hold every
    worker thread; the rest are answered at once (held 0) and come back later.
    watch(): something cheap whose identity changes when answers may (the drain state), looked
    at every tick_s; everything is rebuilt at least every full_s (a list going stale).
    The builder runs only while someone read the feed within idle_s: no entry, no cost.
    settle_s: for this long after start, verdicts resting on a probe that has not finished yet
    are not published: a restarted service says nothing (its entries keep its last verdicts)
    rather than "unhealthy, first probe pending" for every app.
    """

    def __init__(self, view_of, probe_evidence, max_waiters=8, tick_s=0.5, idle_s=30.0, clock=time.monotonic,
                 watch=None, full_s=5.0, settle_s=0.0):
        self._view_of = view_of
        self._probe_evidence = probe_evidence
        self._watch = watch
        self._watched = None
        self._full_s = full_s
        self._settle_s = settle_s
        self._settle_until = None
        self._built_at = None
        self._tick_s = tick_s
        self._idle_s = idle_s
        self._clock = clock
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(max_waiters)
        # Deciseconds since the epoch: a restarted service never repeats a client's index.
        self._index = int(time.time() * 10)
        self._verdicts = None
        self._evidence = {}
        self._stale_s = None
        self._error = None
        self._poked = False
        self._read_at = None
        self._stopped = False
        self.rounds = 0  # the builder's wake-ups, each deciding whether to build
        self.holding = 0  # requests held now
        self._thread = threading.Thread(target=self._run, name="feed", daemon=True)

    def start(self):
        self._settle_until = self._clock() + self._settle_s
        self._thread.start()
        return self

    def release(self):
        """Answer every held request now, and hold no more (the service is stopping)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def stop(self, timeout_s=2.0):
        self.release()
        self._thread.join(timeout_s)

    def poke(self):
        """Something an answer depends on changed: rebuild now (cheap when nobody reads)."""
        with self._cond:
            self._poked = True
            self._cond.notify_all()

    def answer(self, client_index, wait_s):
        """A FeedAnswer once the index differs from client_index or wait_s passed.
        client_index None: at once. Each verdict's age is its own probe's (see ages_of).
        :raises DockerError: docker does not answer and no recent list exists."""
        now = self._clock()
        with self._cond:
            first_read = self._read_at is None or now - self._read_at > self._idle_s
            self._read_at = now
            if first_read and self._verdicts is None and self._settle_until is not None:
                # apps are probed once asked about: the first read asks, so settling starts now
                self._settle_until = now + self._settle_s
            if first_read or self._verdicts is None and self._error is None:
                self._poked = True
                self._cond.notify_all()
        held = False
        if client_index is not None and wait_s > 0 and self._slots.acquire(blocking=False):
            held = True
            try:
                deadline = now + wait_s
                with self._cond:
                    self.holding += 1
                    while not self._stopped and self._current_index_is(client_index):
                        remaining = deadline - self._clock()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    self.holding -= 1
            finally:
                self._slots.release()
            if self._verdicts is None and self._error is None and not self._stopped:
                self._wait_first_build(self._clock() + 6.0)  # never an empty list for "nothing yet"
        else:
            self._wait_first_build(self._clock() + 6.0)
        with self._cond:
            if self._error is not None and self._verdicts is None:
                raise self._error
            index, verdicts, evidence, stale_s = self._index, self._verdicts or (), self._evidence, self._stale_s
        ages = ages_of(evidence, self._probe_evidence(), self._clock())
        return FeedAnswer(index, verdicts, ages, stale_s, held)

    def _current_index_is(self, client_index):
        return self._index == client_index or (self._verdicts is None and self._error is None)

    def _wait_first_build(self, deadline):
        with self._cond:
            while not self._stopped and self._verdicts is None and self._error is None:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise errors.DockerTimeout("no container list from docker yet")
                self._cond.wait(remaining)

    def _run(self):
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopped or self._poked, self._tick_s)
                if self._stopped:
                    return
                self.rounds += 1
                poked, self._poked = self._poked, False
                now = self._clock()
                # Nobody reads the feed: build nothing (building asks about every app, which
                # would keep every app probed for a reader that is gone).
                if self._read_at is None or now - self._read_at > self._idle_s:
                    continue
            watched = self._watch() if self._watch is not None else None
            if poked or watched is not self._watched or self._built_at is None or now - self._built_at >= self._full_s:
                self._watched = watched
                self._built_at = now
                self._build()

    def _settling(self, view):
        """Nothing published yet, still within settle_s, and some verdict rests on a probe
        that has not finished: wait for it."""
        return (self._verdicts is None and self._settle_until is not None and self._clock() < self._settle_until
                and any(r.probe is not None and r.probe.is_pending for r in view.reports))

    def _build(self):
        verdicts, evidence, stale_s, error = None, {}, None, None
        try:
            view = self._view_of()
            if self._settling(view):
                self._built_at = None  # again at the next tick, or when a probe finishes (poke)
                return
            evidence = evidence_of(view, self._probe_evidence(), self._clock())
            verdicts, stale_s = verdicts_of(view), view.stale_s
        except errors.DockerError as exc:
            error = exc
        except Exception as exc:  # a bug must not stop the feed: clients see an error, not silence
            log.exception("building the feed failed")
            error = errors.HealthcheckError("internal error building the feed: %s" % type(exc).__name__)
        with self._cond:
            if error is not None:
                changed = self._error is None or str(self._error) != str(error) or self._verdicts is not None
                self._error, self._verdicts, self._evidence, self._stale_s = error, None, {}, None
            else:
                changed = verdicts != self._verdicts or self._error is not None
                self._error, self._verdicts, self._evidence, self._stale_s = None, verdicts, evidence, stale_s
            if changed:
                self._index += 1
                self._cond.notify_all()
