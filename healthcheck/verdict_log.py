"""Verdict changes in the log: one line when an app on this host turns unhealthy or recovers."""
import logging
import threading

from healthcheck.bounded import BoundedCache

log = logging.getLogger("healthcheck.verdict")


class VerdictLog(object):
    """Logs a verdict when it changes: WARNING with the reason when an app turns (or is first
    seen) unhealthy, INFO when it recovers. Balancers poll every few seconds; repeating an
    unchanged verdict would bury the changes.

    Only apps with containers on this host are remembered (a client inventing app codes
    cannot fill the log or the table), at most max_apps of them, least recently changed
    forgotten first. Called from every request thread, hence the lock.
    """

    def __init__(self, max_apps=10000, logger=log):
        self._log = logger
        self._lock = threading.Lock()
        self._last = BoundedCache(max_apps)  # app -> the verdict last logged

    def __call__(self, report, exists=True):
        """exists: the app has containers on this host (in any state)."""
        probe = report.probe
        if probe is not None and probe.is_pending:
            return  # not a verdict yet: the first probe decides
        # Docker's Status text ages every second; what matters is which container serves
        # and what the probe said.
        current = (report.healthy, report.chosen.name if report.chosen is not None else None,
                   None if probe is None else (probe.ok, probe.status, probe.error))
        with self._lock:
            previous = self._last.get(report.app)
            if previous == current:
                return
            if not exists:
                if previous is None:
                    return
                self._last.pop(report.app)
            else:
                self._last.put(report.app, current)
        if not report.healthy:
            self._log.warning("app %s is not healthy: %s", report.app, report.reason)
        elif previous is not None:
            self._log.info("app %s is healthy again: %s", report.app, report.chosen.name)
