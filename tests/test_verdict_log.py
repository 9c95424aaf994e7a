"""Verdict changes in the log: once per change, bounded, invented apps ignored."""
import logging

from healthcheck.models import Container, HealthReport, ProbeResult
from healthcheck.verdict_log import VerdictLog


def _report(healthy, state="running", status="Up 1 second"):
    c = Container("a" * 64, "a-1700000000", ("a-1700000000",), "img", "cmd", 1, state, status, "none", ())
    return HealthReport("a", healthy, "" if healthy else "no healthy container: %s" % status,
                        c if healthy else None, [c], None)


def test_verdict_log_only_on_change(caplog):
    verdicts = VerdictLog()
    with caplog.at_level(logging.INFO, logger="healthcheck"):
        verdicts(_report(False, "paused", "Up 1 second (Paused)"))
        verdicts(_report(False, "paused", "Up 2 seconds (Paused)"))  # only Docker's text aged
        verdicts(_report(True))
        verdicts(_report(True, status="Up 3 seconds"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2
    assert "not healthy" in messages[0] and "healthy again" in messages[1]


def _pending_report(app="a"):
    c = Container("a" * 64, "a-1700000000", ("a-1700000000",), "img", "cmd", 1, "running", "Up", "none", ())
    probe = ProbeResult.pending("http://127.0.0.1:8010/o/a/")
    return HealthReport(app, False, "pending", c, [c], probe)


def test_verdict_log_ignores_invented_apps_and_pending_probes(caplog):
    verdicts = VerdictLog()
    ghost = HealthReport("ghost", False, "no container of app ghost on this host", None, [], None)
    with caplog.at_level(logging.INFO, logger="healthcheck"):
        for _ in range(3):
            verdicts(ghost, exists=False)
        verdicts(_pending_report())
    assert caplog.records == []


def test_verdict_log_says_when_an_app_goes_away_once(caplog):
    verdicts = VerdictLog()
    gone = HealthReport("a", False, "no container of app a on this host", None, [], None)
    with caplog.at_level(logging.INFO, logger="healthcheck"):
        verdicts(_report(True))
        verdicts(gone, exists=False)
        verdicts(gone, exists=False)
    assert [r.levelname for r in caplog.records] == ["WARNING"]


def test_verdict_log_is_bounded(caplog):
    """It remembers at most max_apps verdicts, the oldest forgotten first: a forgotten app's
    unchanged verdict is logged again, a remembered one's is not."""
    verdicts = VerdictLog(max_apps=3)
    reports = [_report(False)._replace(app="app%d" % number) for number in range(10)]
    for report in reports:
        verdicts(report)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="healthcheck"):
        verdicts(reports[9])  # remembered: nothing new
        verdicts(reports[0])  # forgotten: said again
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == ["app app0"]
