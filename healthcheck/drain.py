"""Planned maintenance: the drain state file (this host, or some apps on it, drained on purpose)."""
import collections
import json
import logging
import os
import tempfile
import threading
import time

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/container-healthcheck"
STATE_FILE_NAME = "drain.json"
ALL_APPS = "*"  # the key of a host-wide drain
_MAX_REASON = 200


class Drain(collections.namedtuple("Drain", "reason since")):
    """One drain: why (operator's words) and since when (Unix seconds)."""

    __slots__ = ()

    def describe(self):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.since))
        return "draining since %s%s" % (stamp, ": " + self.reason if self.reason else "")


class DrainState(object):
    """Which apps are drained: ALL_APPS for the whole host, or app codes (pure)."""

    def __init__(self, drains=None):
        self.drains = dict(drains or {})

    def for_app(self, app):
        """The Drain that applies to app (its own first, then the host's), or None."""
        return self.drains.get(app) or self.drains.get(ALL_APPS)

    def drain(self, apps, reason, now):
        for app in apps or [ALL_APPS]:
            self.drains[app] = Drain(reason[:_MAX_REASON], int(now))

    def undrain(self, apps):
        """Without apps: everything (the host and every app)."""
        if not apps:
            self.drains.clear()
        for app in apps or []:
            self.drains.pop(app, None)

    def to_json(self):
        return json.dumps({"version": 1, "drains": {app: {"reason": d.reason, "since": d.since}
                                                     for app, d in sorted(self.drains.items())}},
                          indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text):
        """:raises ValueError: not a drain state file."""
        doc = json.loads(text)
        if not isinstance(doc, dict) or not isinstance(doc.get("drains"), dict):
            raise ValueError("no `drains` object")
        drains = {}
        for app, entry in doc["drains"].items():
            if not isinstance(app, str) or not isinstance(entry, dict):
                raise ValueError("bad entry for %r" % (app,))
            reason, since = entry.get("reason", ""), entry.get("since", 0)
            if not isinstance(reason, str) or not isinstance(since, (int, float)) or isinstance(since, bool):
                raise ValueError("bad entry for %r" % (app,))
            drains[app] = Drain(reason[:_MAX_REASON], int(since))
        return cls(drains)


def state_path(state_dir):
    return os.path.join(state_dir, STATE_FILE_NAME)


def load(path):
    """(DrainState, problem): a missing file is no drain; a corrupt one is no drain plus the
    problem in words, never an exception."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(1024 * 1024)
    except FileNotFoundError:
        return DrainState(), None
    except UnicodeDecodeError:
        return DrainState(), "%s is not a drain state file (not UTF-8): treated as not drained" % path
    except OSError as exc:
        return DrainState(), "cannot read %s: %s" % (path, exc.strerror or exc)
    try:
        return DrainState.from_json(text), None
    except ValueError as exc:
        return DrainState(), "%s is not a drain state file (%s): treated as not drained" % (path, exc)


def save(path, state):
    """Write atomically: a new file beside it, fsynced, renamed over the old one."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, mode=0o750, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".drain-", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(state.to_json())
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    directory = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class DrainWatcher(object):
    """The state file as the running service sees it: re-read when it changes (checked at most
    every check_s), a corrupt file reported once and treated as not drained."""

    def __init__(self, path, check_s=0.5, clock=time.monotonic):
        self.path = path
        self._check_s = check_s
        self._clock = clock
        self._lock = threading.Lock()
        self._checked_at = None
        self._signature = None
        self._state = DrainState()

    def current(self):
        """The DrainState in force now."""
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self._check_s:
            return self._state
        with self._lock:
            if self._checked_at is not None and now - self._checked_at < self._check_s:
                return self._state
            self._checked_at = now
            try:
                info = os.stat(self.path)
                signature = (info.st_ino, info.st_mtime_ns, info.st_size)
            except OSError:
                signature = None
            if signature != self._signature:
                self._signature = signature
                state, problem = load(self.path)
                if problem:
                    log.warning("%s", problem)
                elif state.drains != self._state.drains:
                    log.warning("drain state now: %s", ", ".join(
                        "%s (%s)" % ("all apps" if app == ALL_APPS else app, d.describe())
                        for app, d in sorted(state.drains.items())) or "nothing drained")
                self._state = state
            return self._state

    def for_app(self, app):
        return self.current().for_app(app)
