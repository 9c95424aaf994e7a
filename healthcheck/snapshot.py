"""One shared container list: single-flight refresh, TTL, event invalidation, bounded staleness."""
import collections
import logging
import threading
import time

from healthcheck.errors import DockerError, DockerTimeout

log = logging.getLogger(__name__)

# started_at: clock() when the `docker ps` that produced it began; generation: bumps per fetch.
Snapshot = collections.namedtuple("Snapshot", "containers started_at finished_at generation")

_NEVER = float("-inf")


class Snapshotter(object):
    """Serves the latest `docker ps` result to every request.

    One fetcher thread runs all `docker ps` calls, so at most one is in flight whatever the
    request rate. A snapshot is fresh when it started after both `now - refresh_s` and the
    last invalidation (a docker event); with refresh_s == 0 it must start after the request
    arrived (the Go tool's ask-per-request model, coalesced). The fetcher refreshes ahead of
    the TTL so requests rarely wait. When docker fails, the last snapshot serves for at most
    max_stale_s, then the failure is raised.
    """

    def __init__(self, fetch, refresh_s=2.0, max_stale_s=10.0, wait_s=6.0, retry_s=0.5,
                 settle_s=0.3, safety_refresh_s=60.0, clock=time.monotonic, on_change=None):
        self._fetch = fetch
        # on_change(): called (outside the lock) after each fetch, so pushed answers follow.
        self._on_change = on_change
        self.refresh_s = refresh_s
        # While the events stream is up, events say when to look again; this slow refresh
        # only guards against a stream that is up but silent (and ages Docker's Status text).
        self.safety_refresh_s = max(safety_refresh_s, refresh_s)
        self._events_up = False
        self.max_stale_s = max_stale_s
        self._wait_s = wait_s
        self._retry_s = retry_s
        self._settle_s = settle_s
        self._settle_at = _NEVER
        self._clock = clock
        self._cond = threading.Condition()
        self._current = None
        self._error = None
        self._error_at = _NEVER
        self._wanted_after = _NEVER
        self._invalidated_at = _NEVER
        self._generation = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="docker-ps", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout_s=6.0):
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def invalidate(self):
        """A container changed: the next answer must come from a `docker ps` begun after now."""
        with self._cond:
            self._invalidated_at = self._clock()
            # dockerd emits an event slightly before `docker ps` shows its effect (the
            # container view is updated after the event is logged), so look once more.
            self._settle_at = self._invalidated_at + self._settle_s
            self._cond.notify_all()

    def set_events_up(self, up):
        """The events stream started (True) or ended (False): it decides the refresh period."""
        with self._cond:
            self._events_up = bool(up)
            self._cond.notify_all()

    def _period_s(self):
        return self.safety_refresh_s if self._events_up and self.refresh_s > 0 else self.refresh_s

    def peek(self):
        """The latest snapshot or None, without asking docker (for side-effect-free views)."""
        return self._current

    def age_s(self):
        current = self._current
        return None if current is None else max(self._clock() - current.started_at, 0.0)

    def get(self):
        """Return (snapshot, stale_age_s): stale_age_s is None for a fresh snapshot.

        :raises DockerError: docker failed and no snapshot younger than max_stale_s exists.
        """
        now = self._clock()
        period_s = self._period_s()
        need = now if period_s <= 0 else max(now - period_s, self._invalidated_at)
        current = self._current
        if current is not None and current.started_at >= need:
            return current, None
        with self._cond:
            self._wanted_after = max(self._wanted_after, need)
            self._cond.notify_all()
            # While docker is failing, answer from what we have instead of queueing every
            # request behind the next doomed call; the fetcher keeps retrying.
            if self._error is None:
                deadline = now + self._wait_s
                while not self._stopped:
                    current = self._current
                    if current is not None and current.started_at >= need:
                        return current, None
                    if self._error is not None and self._error_at >= now:
                        break
                    remaining = deadline - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
            return self._stale_or_raise()

    def _stale_or_raise(self):
        current = self._current
        if current is not None:
            age = self._clock() - current.started_at
            if age <= self.max_stale_s:
                return current, age
        if self._error is not None:
            raise self._error
        raise DockerTimeout("no container list from docker yet")

    def _due_in(self, now):
        """Seconds until the next fetch is due (<= 0: now)."""
        current = self._current
        wanted = max(self._wanted_after, self._invalidated_at)
        if current is None or current.started_at < wanted:
            due = now
        elif current.started_at < self._settle_at:
            due = self._settle_at
        elif self.refresh_s > 0:
            # Refresh ahead, so requests find a fresh snapshot instead of waiting for one.
            due = current.started_at + self._period_s() * 0.75
        else:
            return float("inf")
        if self._error is not None:
            due = max(due, self._error_at + self._retry_s)
        return due - now

    def _run(self):
        while True:
            with self._cond:
                while not self._stopped:
                    wait = self._due_in(self._clock())
                    if wait <= 0:
                        break
                    self._cond.wait(min(wait, 60.0))
                if self._stopped:
                    return
            started = self._clock()
            containers, error = None, None
            try:
                containers = self._fetch()
            except DockerError as exc:
                error = exc
            except Exception as exc:  # a bug must not kill the only fetcher
                log.exception("docker ps fetch failed unexpectedly")
                error = DockerError("unexpected error reading docker ps: %s" % exc)
            with self._cond:
                if error is None:
                    if self._error is not None:
                        log.warning("docker answers again")
                    self._generation += 1
                    self._current = Snapshot(containers, started, self._clock(), self._generation)
                    self._error = None
                else:
                    if self._error is None or str(self._error) != str(error):
                        log.warning("docker ps failed: %s", error)
                    self._error = error
                    self._error_at = self._clock()
                self._cond.notify_all()
            if self._on_change is not None:
                self._on_change()
