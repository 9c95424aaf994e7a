"""Background app probes: one fresh result per app, refreshed ahead of need, never on a request."""
import heapq
import logging
import queue
import threading
import time

from healthcheck.models import ProbeResult
from healthcheck.probe import crashed as crashed_result

log = logging.getLogger(__name__)

# An app is probed while someone asked about it (its own route or /apps) within this window.
DEFAULT_INTEREST_S = 300.0
_PAUSE_AFTER_FAILURE_S = 0.1


def default_url_of(app):
    return "/o/%s/" % app


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
    """Keeps each asked-about app's probe result fresh from one thread, the prober's loop.

    probe: a healthcheck.probe_loop.ProbeLoop (the service: every probe on that thread, over
    keep-alive connections), or any callable probe(app) -> ProbeResult, run on `workers`
    threads (ThreadedProbes). Each app is probed at most once per ttl_s (start to start), and
    at once when its serving container changes; at most `workers` probes run at a time, the
    rest wait in due order. A hung probe holds one of them until its own deadline and delays
    nobody's answer: readers only look at the latest result. Apps nobody asked about for
    interest_s are forgotten. observe(app, result, changed) is called after each probe; a
    result equal to the last one keeps the last one's object (answers built on it stay
    memoised), and changed says whether it differs.

    An engine (ProbeLoop, ThreadedProbes) has submit(app, done) (done(result) once, later),
    run_once(timeout_s) (wait for results, the time given or wake()), wake() from any
    thread, abort(exc) (end what it holds as crashed) and close().
    """

    def __init__(self, probe, ttl_s=2.0, workers=32, interest_s=DEFAULT_INTEREST_S,
                 observe=None, url_of=default_url_of, clock=time.monotonic):
        self.url_of = url_of
        self.ttl_s = max(ttl_s, 0.1)
        self._engine = probe if hasattr(probe, "run_once") else ThreadedProbes(probe, workers, self._url)
        self._workers = max(1, workers)
        self._interest_s = interest_s
        self._observe = observe
        self._clock = clock
        # One lock for the targets and the schedule; readers (wait_for) wait for results on it.
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._targets = {}
        self._schedule = []  # heap of (due_at, seq, app); stale entries are skipped
        self._seq = 0
        self._in_flight = 0
        self._stopped = False
        self._thread = None
        self._loop_ident = None
        # When the loop looks at the schedule next (infinity: when woken). A push due sooner
        # wakes it; the loop's own pushes need not, it looks before it sleeps.
        self._wake_at = float("inf")

    def start(self):
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s=1.0):
        with self._lock:
            self._stopped = True
            self._done.notify_all()
        self._engine.wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
        else:
            self._engine.close()

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
        with self._lock:
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
            with self._lock:
                self._targets.pop(app, None)

    def wait_for(self, app, container_id, timeout_s):
        """Wait at most timeout_s for a result of app's current container; None if none came."""
        deadline = self._clock() + timeout_s
        with self._lock:
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
        with self._lock:
            return {t.app: (t.result, now - t.result_at) for t in self._targets.values()
                    if t.result is not None}

    def _url(self, app):
        return self.url_of(app)

    def _run(self):
        """The loop: start the probes that are due, then let the engine wait for answers, the
        next due time or a wake-up."""
        self._loop_ident = threading.get_ident()
        try:
            while True:
                with self._lock:
                    if self._stopped:
                        return
                    due, wait_s = self._take_due()
                for target, container_id in due:
                    self._start(target, container_id)
                try:
                    self._engine.run_once(wait_s)
                except Exception as exc:  # the loop's own error: its probes end crashed, it goes on
                    log.exception("the prober's loop failed")
                    self._engine.abort(exc)
                    time.sleep(_PAUSE_AFTER_FAILURE_S)  # an error that stays must not spin a core
        finally:
            self._engine.close()

    def _take_due(self):
        """([(target, container_id)] to probe now, marked in flight; seconds until the next is
        due, or None: until woken). Called with the lock held."""
        now = self._clock()
        due = []
        wait_s = None
        while self._schedule:
            due_at, _, app = self._schedule[0]
            target = self._targets.get(app)
            if target is None or target.in_flight or target.due_at != due_at:
                heapq.heappop(self._schedule)
                continue
            if due_at > now:
                wait_s = due_at - now
                break
            if self._in_flight >= self._workers:
                break  # a finished probe wakes the loop
            heapq.heappop(self._schedule)
            if now - target.asked_at > self._interest_s:
                del self._targets[app]
                continue
            target.in_flight = True
            self._in_flight += 1
            due.append((target, target.container_id))
        self._wake_at = float("inf") if wait_s is None else now + wait_s
        return due, wait_s

    def _start(self, target, container_id):
        started = self._clock()

        def done(result):
            self._store(target, container_id, started, result)
        try:
            self._engine.submit(target.app, done)
        except Exception as exc:  # fail unhealthy, never healthy
            log.exception("probe for %s raised", target.app)
            done(crashed_result(self.url_of(target.app), exc))

    def _push(self, target, due_at):
        """Schedule target's next probe (lock held)."""
        target.due_at = due_at
        self._seq += 1
        heapq.heappush(self._schedule, (due_at, self._seq, target.app))
        if due_at < self._wake_at and threading.get_ident() != self._loop_ident:
            self._wake_at = due_at
            self._engine.wake()

    def _store(self, target, container_id, started, result):
        if not isinstance(result, ProbeResult):
            result = crashed_result(self.url_of(target.app), TypeError("probe returned %r" % (result,)))
        with self._lock:
            target.in_flight = False
            self._in_flight -= 1
            # Keep the same object when nothing changed, so answers built on it stay memoised.
            changed = target.result != result
            if changed:
                target.result = result
            now = self._clock()
            target.result_at = now
            target.result_container = container_id
            if self._targets.get(target.app) is target:
                self._push(target, now if target.container_id != container_id else started + self.ttl_s)
            if threading.get_ident() != self._loop_ident:
                self._engine.wake()  # a slot is free: probes may be waiting for it
            self._done.notify_all()
        if self._observe is not None:
            try:
                self._observe(target.app, result, changed)
            except Exception:
                log.exception("observing the probe of %s failed", target.app)


class ThreadedProbes(object):
    """A blocking probe(app) -> ProbeResult as the prober's engine: each probe on one of
    `workers` threads, its result handed over from there. For probes that are plain calls
    (the tests' fakes); the service's engine is a ProbeLoop."""

    def __init__(self, probe, workers, url_of):
        self._probe = probe
        self._workers = max(1, workers)
        self._url_of = url_of
        self._jobs = queue.Queue()  # (app, done), or None: a worker leaves
        self._woken = threading.Event()
        self._threads = []

    def submit(self, app, done):
        if not self._threads:  # the first probe starts the workers
            for number in range(self._workers):
                thread = threading.Thread(target=self._work, name="prober-%d" % number, daemon=True)
                thread.start()
                self._threads.append(thread)
        self._jobs.put((app, done))

    def run_once(self, timeout_s=None):
        """Wait at most timeout_s (None: until woken): results arrive on the workers."""
        self._woken.wait(timeout_s)
        self._woken.clear()

    def wake(self):
        self._woken.set()

    def abort(self, exc):
        """Nothing to end here: each running probe ends on its own worker."""

    def close(self):
        for _ in self._threads:
            self._jobs.put(None)

    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            app, done = job
            try:
                result = self._probe(app)
            except Exception as exc:  # fail unhealthy, never healthy
                log.exception("probe for %s raised", app)
                result = crashed_result(self._url_of(app), exc)
            done(result)
