"""The Checker alone, with a fake snapshotter and prober: the same report object while nothing
changed, a new one when something did; check_all never waits on a probe; current_reports has
no side effect; a changed verdict is recorded once; an app without a serving container is
forgotten by the prober."""
from healthcheck.checker import Checker
from healthcheck.matching import NamePattern
from healthcheck.models import Container, Drain, ProbeResult
from healthcheck.snapshot import Snapshot

OK = ProbeResult(True, "http://127.0.0.1:8010/o/a/", 200, None)
DOWN = ProbeResult(False, "http://127.0.0.1:8010/o/a/", 502, None)


def _container(name, state="running", status="Up 1 hour", created=1709878117):
    ident = name.split("-")[0] * 8 + "0" * 40
    return Container(ident, name, (name,), "img", "uwsgi", created, state, status, "none", ())


class Snapshots(object):
    """What the Snapshotter would hand out: set .containers; each set is a new generation."""

    def __init__(self, containers):
        self.generation = 0
        self.set(containers)

    def set(self, containers):
        self.generation += 1
        self.current = Snapshot(tuple(containers), 0.0, 0.0, self.generation)

    def get(self):
        return self.current, None

    def peek(self):
        return self.current

    def age_s(self):
        return 0.0


class Probes(object):
    """A prober whose results a test sets; counts what it is asked."""

    def __init__(self):
        self.results, self.asked, self.forgotten, self.waited = {}, [], [], []

    def result_for(self, app, container_id):
        self.asked.append(app)
        return self.results.get(app)

    def wait_for(self, app, container_id, timeout_s):
        self.waited.append(app)
        return self.results.get(app)

    def forget(self, app):
        self.forgotten.append(app)

    def known(self):
        return {app: (result, 0.5) for app, result in self.results.items()}

    def url_of(self, app):
        return "http://127.0.0.1:8010/o/%s/" % app


class Recorded(object):
    def __init__(self):
        self.calls = []

    def __call__(self, report, exists):
        self.calls.append((report.app, report.healthy, exists))


def _checker(containers, **kwargs):
    snapshots, probes, recorded = Snapshots(containers), Probes(), Recorded()
    probes.results["a"] = OK
    return Checker(snapshots, NamePattern(), prober=probes, observe=recorded, **kwargs), snapshots, probes, recorded


def test_the_same_report_object_while_nothing_changed_and_a_new_one_when_something_did():
    checker, snapshots, probes, _ = _checker([_container("a-1709878117")])
    first, _ = checker.check("a")
    assert first.healthy and checker.check("a")[0] is first
    snapshots.set([_container("a-1709878117")])  # a new list, the same containers
    again = checker.check("a")[0]
    assert again == first
    probes.results["a"] = DOWN  # the probe's answer changed
    down = checker.check("a")[0]
    assert not down.healthy and down.short == "probe 502"


def test_check_all_never_waits_on_a_probe_but_a_check_may():
    checker, _, probes, _ = _checker([_container("a-1709878117"), _container("b-1709878117")], probe_wait_s=1.0)
    view = checker.check_all()
    assert [r.app for r in view.reports] == ["a", "b"] and probes.waited == []
    assert not view.reports[1].healthy and view.reports[1].probe.is_pending  # b's first probe: not healthy
    checker.check("b")
    assert probes.waited == ["b"]


def test_current_reports_asks_nobody_and_records_nothing():
    checker, _, probes, recorded = _checker([_container("a-1709878117"), _container("b-1709878117")])
    reports = checker.current_reports()
    assert [r.app for r in reports] == ["a"]  # b has no probe result yet: its verdict is unknown
    assert probes.asked == [] and recorded.calls == []


def test_a_changed_verdict_is_recorded_once():
    checker, _, probes, recorded = _checker([_container("a-1709878117")])
    for _ in range(3):
        checker.check("a")
    probes.results["a"] = DOWN
    for _ in range(3):
        checker.check("a")
    assert recorded.calls == [("a", True, True), ("a", False, True)]


def test_an_app_without_a_serving_container_is_forgotten_by_the_prober():
    checker, _, probes, _ = _checker([_container("a-1709878117", "exited", "Exited (1) 2 minutes ago")])
    report = checker.check("a")[0]
    assert not report.healthy and probes.forgotten == ["a"] and probes.asked == []


def test_a_drain_makes_the_app_not_healthy_and_a_new_report():
    class Drains(object):
        drain = None

        def for_app(self, app):
            return self.drain
    drains = Drains()
    checker, _, _, _ = _checker([_container("a-1709878117")], drains=drains)
    first = checker.check("a")[0]
    drains.drain = Drain("kernel update", 1709878117)
    drained = checker.check("a")[0]
    assert first.healthy and not drained.healthy and drained.drain == drains.drain
    assert drained.short == "draining: kernel update"


def test_probe_evidence_is_the_prober_s_known_results():
    checker, _, _, _ = _checker([_container("a-1709878117")])
    assert checker.probe_evidence() == {"a": (OK, 0.5)} and checker.probe_ages() == {"a": 0.5}
    assert Checker(Snapshots([]), NamePattern()).probe_evidence() == {}
