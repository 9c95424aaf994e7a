"""Background app probes: one fresh result per app, refreshed ahead of need, never on a request."""
import heapq
import logging
import threading
import time

from healthcheck.models import PROBE_CRASHED, ProbeResult

log = logging.getLogger(__name__)

# An app is probed while someone asked about it (its own route or /apps) within this window.
DEFAULT_INTEREST_S = 300.0


def default_url_of(app):
    return "/o/%s/" % app


def crashed_result(url, exc):
    """A probe that raised is an unhealthy result with the reason, never a healthy one."""
    return ProbeResult(False, url, None, "probe crashed: %s: %s" % (type(exc).__name__, exc), PROBE_CRASHED)


class _Target(object):
    """What the prober knows of one app."""

    __slots__ = ("app", "container_id", "asked_at", "result", "result_at", "result_container",
                 "in_flight", "due_at")

    def __init__(self, app, container_id, now):
        self.app = app
        self.container_id = container_id
        self.asked_at = now
        self.result = None
        self.result_at = None
        self.result_container = None
        self.in_flight = False
        self.due_at = now


class Prober(object):
    """Keeps each asked-about app's probe result fresh from worker threads.

    probe(app) -> ProbeResult does the request; each app is probed at most once per ttl_s
    (start to start), and at once when its serving container changes. A hung probe holds
    one worker until its own deadline and delays nobody else's answer: readers only look at
    the latest result. Apps nobody asked about for interest_s are forgotten.
    """

    def __init__(self, probe, ttl_s=2.0, workers=32, interest_s=DEFAULT_INTEREST_S,
                 observe=None, url_of=default_url_of, clock=time.monotonic):
        self._probe = probe
        self.url_of = url_of
        self.ttl_s = max(ttl_s, 0.1)
        self._workers = workers
        self._interest_s = interest_s
        self._observe = observe
        self._clock = clock
        # One lock; workers wait for due probes, readers (wait_for) for results: a finished
        # probe wakes the readers, not all 32 workers.
        self._cond = threading.Condition()
        self._done = threading.Condition(self._cond)
        self._targets = {}
        self._schedule = []  # heap of (due_at, seq, app); stale entries are skipped
        self._seq = 0
        self._stopped = False
        self._threads = []
        self._keeper = None  # the worker sleeping until the next due probe
        self._keeper_at = None

    def start(self):
        for number in range(self._workers):
            thread = threading.Thread(target=self._work, name="prober-%d" % number, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout_s=1.0):
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
            self._done.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)

    def result_for(self, app, container_id):
        """The latest probe result for app, or None while its first probe runs.

        Marks app as asked about. A new serving container is probed at once; until that
        probe finishes the app's previous result stands if it is recent (same app route
        on the same Nginx), since a redeploy must not flap the verdict.
        """
        now = self._clock()
        target = self._targets.get(app)
        if target is not None and target.container_id == container_id:
            target.asked_at = now
            return target.result
        with self._cond:
            target = self._targets.get(app)
            if target is None:
                target = self._targets[app] = _Target(app, container_id, now)
                self._push(target, now)
            elif target.container_id != container_id:
                target.container_id = container_id
                if not target.in_flight:
                    self._push(target, now)
            target.asked_at = now
            if target.result is not None and now - target.result_at <= self.ttl_s * 2:
                return target.result
            return None

    def forget(self, app):
        """app has no serving container any more: stop probing it (a new one starts afresh)."""
        if app in self._targets:
            with self._cond:
                self._targets.pop(app, None)

    def wait_for(self, app, container_id, timeout_s):
        """Wait at most timeout_s for a result of app's current container; None if none came."""
        deadline = self._clock() + timeout_s
        with self._cond:
            while not self._stopped:
                target = self._targets.get(app)
                if target is None:
                    return None
                if target.result is not None and target.result_container == container_id:
                    return target.result
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return None
                self._done.wait(remaining)
        return None

    def known(self):
        """{app: (ProbeResult, age_s)} for every app with a result; no side effects."""
        now = self._clock()
        with self._cond:
            return {t.app: (t.result, now - t.result_at) for t in self._targets.values()
                    if t.result is not None}

    def _wait_for_work(self, me, wait_s):
        """One worker (the time keeper) sleeps until the next probe is due; the others sleep
        until they are woken (a push, the keeper leaving). With all 32 sleeping until the next
        due time, each of 250 probes a second woke them all. Called with the lock held."""
        wake_at = None if wait_s is None else self._clock() + wait_s
        if self._keeper is None or (wake_at is not None and (self._keeper_at is None or wake_at < self._keeper_at)):
            self._keeper, self._keeper_at = me, wake_at  # nobody keeps time, or this is sooner
        if self._keeper is me:
            self._cond.wait(wait_s)
            if self._keeper is me:
                self._keeper, self._keeper_at = None, None
        else:
            self._cond.wait()

    def _push(self, target, due_at):
        target.due_at = due_at
        self._seq += 1
        heapq.heappush(self._schedule, (due_at, self._seq, target.app))
        self._cond.notify()

    def _next_due(self):
        """Pop the next target to probe, or return the seconds to wait (with the lock held)."""
        while self._schedule:
            due_at, _, app = self._schedule[0]
            target = self._targets.get(app)
            if target is None or target.in_flight or target.due_at != due_at:
                heapq.heappop(self._schedule)
                continue
            now = self._clock()
            if due_at > now:
                return None, due_at - now
            heapq.heappop(self._schedule)
            if now - target.asked_at > self._interest_s:
                del self._targets[app]
                continue
            target.in_flight = True
            return target, 0.0
        return None, None

    def _work(self):
        me = threading.current_thread()
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    target, wait_s = self._next_due()
                    if target is not None:
                        break
                    self._wait_for_work(me, wait_s)
                if self._keeper is None:
                    self._cond.notify()  # the time keeper went to probe: another takes over
                app, container_id = target.app, target.container_id
            started = self._clock()
            try:
                result = self._probe(app)
                if not isinstance(result, ProbeResult):
                    raise TypeError("probe returned %r" % (result,))
            except Exception as exc:  # fail unhealthy, never healthy
                log.exception("probe for %s raised", app)
                result = crashed_result(self.url_of(app), exc)
            self._store(target, container_id, started, result)

    def _store(self, target, container_id, started, result):
        with self._cond:
            target.in_flight = False
            # Keep the same object when nothing changed, so answers built on it stay memoised.
            if target.result != result:
                target.result = result
                changed = True
            else:
                changed = False
            target.result_at = self._clock()
            target.result_container = container_id
            if self._targets.get(target.app) is target:
                if target.container_id != container_id:
                    self._push(target, self._clock())
                else:
                    self._push(target, started + self.ttl_s)
            self._done.notify_all()
        if self._observe is not None:
            self._observe(target.app, result, changed)
