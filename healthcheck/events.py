"""A long-lived `docker events` child whose container events invalidate the snapshot."""
import json
import logging
import subprocess
import threading
import time

from healthcheck.docker import kill_group
from healthcheck.errors import DockerError

log = logging.getLogger(__name__)

# Events that change what a health check answers.
INVALIDATING_ACTIONS = frozenset([
    "create", "start", "restart", "die", "stop", "kill", "oom", "pause", "unpause",
    "destroy", "health_status", "rename",
])


def is_invalidating(line):
    """True when an events line may change an answer. Unreadable `{` lines count as yes:
    missing a change costs more than one extra `docker ps`."""
    line = line.strip()
    if not line.startswith("{"):
        return False
    try:
        event = json.loads(line)
    except ValueError:
        return True
    if not isinstance(event, dict):
        return True
    action = event.get("Action") or event.get("status") or ""
    if not isinstance(action, str):
        return True
    return action.split(":", 1)[0].strip() in INVALIDATING_ACTIONS


class EventsWatcher(object):
    """Keeps one `docker events` stream running, restarting it with backoff.

    on_change(): called for each invalidating event and whenever a stream (re)starts, since
    events may have been missed while it was down. on_up(bool): the stream started or
    ended, so the snapshot knows whether events or its TTL keep it fresh.
    """

    def __init__(self, cli, on_change, metrics=None, backoff_s=(0.25, 5.0), clock=time.monotonic,
                 on_up=None):
        self._cli = cli
        self._on_change = on_change
        self._on_up = on_up
        self._metrics = metrics
        self._backoff_min, self._backoff_max = backoff_s
        self._clock = clock
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc = None
        self._thread = threading.Thread(target=self._run, name="docker-events", daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self, timeout_s=5.0):
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            kill_group(proc)
        self._thread.join(timeout_s)

    def _run(self):
        backoff = self._backoff_min
        starts = 0
        failing = False  # while docker keeps failing, say so once, not every retry
        while not self._stop.is_set():
            started = self._clock()
            if starts and self._metrics is not None:
                self._metrics.events_restarted()
            starts += 1
            problem = None
            try:
                problem = self._stream_once()
            except DockerError as exc:
                problem = "could not start: %s" % exc
            except Exception:
                log.exception("docker events watcher failed")
            self._set_up(False)
            if self._stop.is_set():
                break
            if self._clock() - started > 30:
                backoff, failing = self._backoff_min, False
            level = logging.DEBUG if failing else logging.WARNING
            log.log(level, "docker events stream ended (%s); restarting in %.2fs, the snapshot TTL keeps "
                    "answers fresh meanwhile", problem or "no reason given", backoff)
            failing = True
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self._backoff_max)

    def _stream_once(self):
        # --since one second back: events that happened while the stream was starting
        # are replayed rather than missed.
        argv = self._cli.events_argv(time.time() - 1)
        proc = self._cli.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        with self._lock:
            self._proc = proc
        try:
            if self._stop.is_set():
                return
            self._on_change()
            self._set_up(True)
            said = None
            for raw in proc.stdout:
                line = raw.decode("utf-8", "replace")
                if is_invalidating(line):
                    self._on_change()
                elif line.strip() and not line.lstrip().startswith("{"):
                    said = line.strip()[:300]  # docker's own words, e.g. the daemon is down
        finally:
            if proc.poll() is None:
                kill_group(proc)
            else:
                proc.wait()
            proc.stdout.close()
            with self._lock:
                self._proc = None
        return "exit %s%s" % (proc.returncode, ": " + said if said else "")

    def _set_up(self, up):
        if self._on_up is not None:
            self._on_up(up)
        if self._metrics is not None:
            self._metrics.events_up(up)
