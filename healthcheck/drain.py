"""Planned maintenance: the drain state file (this host, or some apps on it, drained on purpose)."""
import json
import logging
import os
import tempfile
import threading
import time

from healthcheck import text
from healthcheck.matching import APP_CODE_RE
from healthcheck.models import Drain

log = logging.getLogger(__name__)

# Where `drain` keeps its state (the RPM creates it, owned by the service user).
DEFAULT_STATE_DIR = "/var/lib/container-healthcheck"
STATE_FILE_NAME = "drain.json"
ALL_APPS = "*"  # the key of a host-wide drain
_MAX_REASON = 200
# A state file is a few hundred bytes; reading more than this is reading something else.
_MAX_FILE_BYTES = 16 * 1024 * 1024


class DrainState(object):
    """Which apps are drained: ALL_APPS for the whole host, or app codes (pure)."""

    def __init__(self, drains=None):
        self.drains = dict(drains or {})

    def for_app(self, app):
        """The Drain that applies to app (its own first, then the host's), or None."""
        return self.drains.get(app) or self.drains.get(ALL_APPS)

    def drain(self, apps, reason, now):
        for app in apps or [ALL_APPS]:
            self.drains[app] = Drain(clean_reason(reason), int(now))

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
    def from_json(cls, text_in):
        """(DrainState, problems): every entry that can be read is honoured (a drained app
        stays drained though its neighbour's entry is garbage); what cannot be read or shown
        is replaced or left out, and said in problems (a list of words, empty when clean).
        :raises ValueError: not a drain state file at all."""
        doc = json.loads(text_in)
        if not isinstance(doc, dict) or not isinstance(doc.get("drains"), dict):
            raise ValueError("no `drains` object")
        drains, problems = {}, []
        for app, entry in doc["drains"].items():
            if app != ALL_APPS and not APP_CODE_RE.fullmatch(app):
                problems.append("entry %s is not an app code: ignored" % ascii(app)[:80])
                continue
            if not isinstance(entry, dict):
                problems.append("entry %s is not an object: drained, without a reason" % app)
                entry = {}
            reason, since = entry.get("reason", ""), entry.get("since", 0)
            if not isinstance(reason, str):
                problems.append("reason of %s is not a string: dropped" % app)
                reason = ""
            shown = clean_reason(reason)
            if shown != reason:
                problems.append("reason of %s had characters that cannot be shown: replaced" % app)
            if not isinstance(since, (int, float)) or isinstance(since, bool) or not 0 <= since < 1e11:
                problems.append("since of %s is not a time: 0 used" % app)
                since = 0
            drains[app] = Drain(shown, int(since))
        return cls(drains), problems


def clean_reason(reason):
    """An operator's words as every answer can carry them: valid UTF-8, one line, bounded."""
    return text.one_line(reason, _MAX_REASON).strip()


def state_path(state_dir):
    return os.path.join(state_dir, STATE_FILE_NAME)


def load(path):
    """(DrainState, problem): a missing file is no drain; a file that is not a drain state
    file is no drain plus the problem in words; a readable file with bad entries keeps what
    can be read, plus the problem. Never an exception."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return DrainState(), None
    except OSError as exc:
        return DrainState(), "cannot read %s: %s" % (path, exc.strerror or exc)
    if len(raw) > _MAX_FILE_BYTES:
        return DrainState(), "%s is not a drain state file (over %d bytes): treated as not drained" % (
            path, _MAX_FILE_BYTES)
    try:
        state, problems = DrainState.from_json(raw.decode("utf-8", "replace"))
    except (ValueError, RecursionError) as exc:
        return DrainState(), "%s is not a drain state file (%s): treated as not drained" % (
            path, text.one_line(str(exc), 200))
    if problems:
        return state, "%s: %s" % (path, "; ".join(problems[:10]) + ("; ..." if len(problems) > 10 else ""))
    return state, None


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
                if state.drains != self._state.drains:
                    log.warning("drain state now: %s", ", ".join(
                        "%s (%s)" % ("all apps" if app == ALL_APPS else app, d.describe())
                        for app, d in sorted(state.drains.items())) or "nothing drained")
                self._state = state
            return self._state

    def for_app(self, app):
        return self.current().for_app(app)
