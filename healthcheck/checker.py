"""Checker: snapshot -> match -> probe -> verdict, with answers rendered once per change."""
import collections
import json
import threading

from healthcheck import errors, verdict
from healthcheck.models import error_envelope, ok_envelope

Answer = collections.namedtuple("Answer", "status body report")

_MEMO_MAX = 8192


def encode(envelope):
    return json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def error_answer(exc):
    """503 for docker failures, 400 for invalid input."""
    status = 400 if exc.code == errors.CODE_INVALID_INPUT else 503
    return Answer(status, encode(error_envelope(exc.code, str(exc))), None)


class Checker(object):
    """The one place that turns a question about an app into an answer.

    probe: callable(app) -> ProbeResult, or None when probing is off; probe_cache: a
    TTLCache; probe_pool: an executor that bounds how many probes /apps runs at once.
    """

    def __init__(self, snapshotter, pattern, probe=None, probe_cache=None, probe_pool=None, observe=None):
        self._snapshotter = snapshotter
        self._pattern = pattern
        self._probe = probe
        self._probe_cache = probe_cache
        self._probe_pool = probe_pool
        self._observe = observe
        self._memo_lock = threading.Lock()
        # (snapshot generation, {app: (matches, serving), (app, all): (probe, Answer)})
        self._memo = (None, {})

    def answer(self, app, include_all=False):
        """The HTTP answer for one app (app already validated).
        :rtype: Answer"""
        try:
            snapshot, stale_s = self._snapshotter.get()
        except errors.DockerError as exc:
            return error_answer(exc)
        memo = self._memo_for(snapshot.generation)
        matches, serving = self._select(snapshot, app, memo)
        probe = self._probe_for(app, serving)
        key = (app, include_all)
        if stale_s is None:
            cached = memo.get(key)
            if cached is not None and cached[0] is probe:
                return cached[1]
        report = verdict.decide(app, matches, include_all, probe)
        envelope = report.to_envelope()
        if stale_s is not None:
            envelope["stale_s"] = round(stale_s, 1)
        result = Answer(200 if report.healthy else 503, encode(envelope), report)
        if self._observe is not None:
            self._observe(report)
        if stale_s is None and len(memo) < _MEMO_MAX:
            memo[key] = (probe, result)
        return result

    def all_answers(self, include_all=False):
        """(status, envelope, reports) for /apps: every app on this host, each with the same
        verdict as its own health route."""
        try:
            snapshot, stale_s = self._snapshotter.get()
        except errors.DockerError as exc:
            return 503, error_envelope(exc.code, str(exc)), []
        apps = sorted(set(filter(None, (self._pattern.app_of(c.name) for c in snapshot.containers))))
        # The same per-snapshot selections as the per-app route: found once, used by both.
        memo = self._memo_for(snapshot.generation) if stale_s is None else None
        selections = [(app,) + self._select(snapshot, app, memo) for app in apps]
        probes = self._probe_all([(app, serving) for app, _, serving in selections])
        reports = [verdict.decide(app, matches, include_all, probes.get(app))
                   for app, matches, _ in selections]
        if self._observe is not None:
            for report in reports:
                self._observe(report)
        message = collections.OrderedDict()
        message["snapshot_age_s"] = round(max(self._snapshotter.age_s() or 0.0, 0.0), 1)
        if stale_s is not None:
            message["stale_s"] = round(stale_s, 1)
        message["healthy"] = [r.app for r in reports if r.healthy]
        message["apps"] = collections.OrderedDict((r.app, r.to_envelope()) for r in reports)
        return 200, ok_envelope(message), reports

    def _select(self, snapshot, app, memo=None):
        selection = memo.get(app) if memo is not None else None
        if selection is None:
            matches = self._pattern.select(snapshot.containers, app)
            selection = (matches, verdict.pick_serving(matches))
            if memo is not None and len(memo) < _MEMO_MAX:
                memo[app] = selection
        return selection

    def _memo_for(self, generation):
        """The per-snapshot memo: answers are computed once per snapshot, not per request."""
        memo_generation, memo = self._memo
        if memo_generation != generation:
            with self._memo_lock:
                memo_generation, memo = self._memo
                if memo_generation != generation:
                    memo = {}
                    self._memo = (generation, memo)
        return memo

    def _probe_for(self, app, serving):
        if self._probe is None or serving is None:
            return None
        # Keyed by container too: a new container is probed at once, not after the TTL.
        return self._probe_cache.get((app, serving.id), lambda: self._probe(app))

    def _probe_all(self, wanted):
        wanted = [(app, serving) for app, serving in wanted if serving is not None]
        if self._probe is None or not wanted:
            return {}
        if self._probe_pool is None:
            return {app: self._probe_for(app, serving) for app, serving in wanted}
        futures = [(app, self._probe_pool.submit(self._probe_for, app, serving)) for app, serving in wanted]
        return {app: future.result() for app, future in futures}
