"""Checker: snapshot -> match -> latest probe -> verdict; the same report object while nothing changed."""
import collections
import threading

from healthcheck import verdict
from healthcheck.bounded import BoundedCache
from healthcheck.models import ProbeResult

# Every app on this host at one moment: reports sorted by app, the snapshot's age, and
# stale_s (None while docker answers).
AppsView = collections.namedtuple("AppsView", "reports snapshot_age_s stale_s")

_MEMO_MAX = 8192


class Checker(object):
    """The one place that turns a question about an app into a HealthReport.

    Answering a client (check, check_all) does two things on purpose, each in one named
    method: _ask (an app someone asked about is kept probed) and _record (a changed verdict is
    logged). Deciding a report (_report) and the side-effect-free view (current_reports) do
    neither.

    prober: a Prober (or None when probing is off); probe_wait_s: how long a per-app check
    may wait for its own app's first probe. observe(report, exists): called when an app's
    report changes (verdict logging); exists says whether the app has containers at all.
    drains: a DrainWatcher (for_app(app) -> Drain or None), or None.
    """

    def __init__(self, snapshotter, pattern, prober=None, probe_wait_s=0.0, observe=None, drains=None):
        self._snapshotter = snapshotter
        self._drains = drains
        self._pattern = pattern
        self._prober = prober
        self._probe_wait_s = probe_wait_s
        self._observe = observe
        self._memo_lock = threading.Lock()
        self._recorded = BoundedCache(_MEMO_MAX)  # app -> the last report given to _record
        # (snapshot generation, {"": apps, app: (matches, serving), (app, all): (probe, report)})
        self._memo = (-1, BoundedCache(_MEMO_MAX))

    def check(self, app, include_all=False):
        """(HealthReport, stale_s) for one app (already validated).
        :raises DockerError: docker did not answer and no recent snapshot exists."""
        snapshot, stale_s = self._snapshotter.get()
        memo = self._memo_for(snapshot.generation)
        matches, serving = self._select(snapshot, app, memo)
        probe = self._ask(app, serving, self._probe_wait_s)
        return self._record(self._report(app, include_all, matches, probe, memo), matches), stale_s

    def check_all(self, include_all=False):
        """AppsView of every app on this host, each with the verdict its own route gives;
        never waits for a probe.
        :raises DockerError: as check()."""
        snapshot, stale_s = self._snapshotter.get()
        memo = self._memo_for(snapshot.generation)
        reports = []
        for app in self._apps(snapshot, memo):
            matches, serving = self._select(snapshot, app, memo)
            probe = self._ask(app, serving, 0.0)
            reports.append(self._record(self._report(app, include_all, matches, probe, memo), matches))
        return AppsView(reports, self._snapshotter.age_s() or 0.0, stale_s)

    def current_reports(self):
        """Reports from what is known now, for /metrics: no docker call, no probe, no
        logging. Apps whose probe has no result yet are left out (their verdict is unknown)."""
        snapshot = self._snapshotter.peek()
        if snapshot is None:
            return []
        known = self._prober.known() if self._prober is not None else {}
        memo = self._memo_for(snapshot.generation)  # the selections of the answers, shared
        reports = []
        for app in self._apps(snapshot, memo):
            matches, serving = self._select(snapshot, app, memo)
            probe = None
            if self._prober is not None and serving is not None:
                if app not in known:
                    continue
                probe = known[app][0]
            reports.append(self._report(app, False, matches, probe, memo))
        return reports

    def probe_ages(self):
        """{app: seconds since its last probe finished}."""
        return {app: age for app, (_, age) in self.probe_evidence().items()}

    def probe_evidence(self):
        """{app: (ProbeResult, seconds since the latest probe giving it finished)}."""
        return self._prober.known() if self._prober is not None else {}

    def _apps(self, snapshot, memo):
        apps = memo.get("")
        if apps is None:
            names = (self._pattern.app_of(c.name) for c in snapshot.containers)
            apps = memo.put("", sorted(set(filter(None, names))))
        return apps

    def _select(self, snapshot, app, memo):
        selection = memo.get(app)
        if selection is None:
            matches = self._pattern.select(snapshot.containers, app)
            selection = memo.put(app, (matches, verdict.pick_serving(matches)))
        return selection

    def _drain_for(self, app):
        return self._drains.for_app(app) if self._drains is not None else None

    def _report(self, app, include_all, matches, probe, memo):
        """The memoised report while its inputs are unchanged (pure: no logging, no asking)."""
        key = (app, include_all)
        drain = self._drain_for(app)
        cached = memo.get(key)
        if cached is not None and cached[0] == probe and cached[1].drain == drain:
            return cached[1]
        report = verdict.decide(app, matches, include_all, probe, drain)
        memo.put(key, (probe, report))
        return report

    def _record(self, report, matches):
        """A report given to a client: its verdict is logged when it changed (observe keeps
        the last verdict per app, so the same report twice logs once)."""
        if self._observe is not None and report is not self._recorded.get(report.app):
            self._observe(report, bool(matches))
            self._recorded.put(report.app, report)
        return report

    def _memo_for(self, generation):
        """The memo of this snapshot generation. A request holding an older snapshot gets a
        throw-away memo: it never replaces the memo of a newer one."""
        memo_generation, memo = self._memo
        if memo_generation == generation:
            return memo
        with self._memo_lock:
            memo_generation, memo = self._memo
            if generation > memo_generation:
                memo = BoundedCache(_MEMO_MAX)
                self._memo = (generation, memo)
            elif generation < memo_generation:
                return BoundedCache(_MEMO_MAX)
        return memo

    def _ask(self, app, serving, wait_s):
        """An app someone asked about is kept probed (the prober's interest); its latest
        result, waiting at most wait_s for the first one. No serving container: forgotten."""
        if self._prober is None:
            return None
        if serving is None:
            self._prober.forget(app)
            return None
        result = self._prober.result_for(app, serving.id)
        if result is None and wait_s > 0:
            result = self._prober.wait_for(app, serving.id, wait_s)
        return result if result is not None else ProbeResult.pending(self._prober.url_of(app))
