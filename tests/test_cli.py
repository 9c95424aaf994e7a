import logging

import pytest


from healthcheck.config import parse_args
from healthcheck.models import Container, HealthReport, ProbeResult
from healthcheck.verdict_log import VerdictLog


def test_go_tool_opts_line_parses_as_serve():
    args = parse_args("-level info -prefix /container-healthcheck -port 4246 -ngx-port 8010 "
                      "-logpath /var/log/container-healthcheck".split())
    assert args.command == "serve"
    assert (args.level, args.prefix, args.port, args.ngx_port, args.logpath) == (
        "info", "/container-healthcheck", 4246, 8010, "/var/log/container-healthcheck")


def test_defaults():
    args = parse_args(["serve"])
    assert (args.bind, args.port, args.prefix, args.ngx_port, args.docker_timeout, args.probe_timeout,
            args.refresh, args.max_stale, args.probe_ttl, args.name_pattern) == (
        "127.0.0.1", 4246, "/container-healthcheck", 8010, 5.0, 2.0, 2.0, 10.0, 2.0, "{app}-?[0-9]{10}")


@pytest.mark.parametrize("argv", [["-port", "0"], ["--port", "70000"], ["--prefix", "no-slash"],
                                  ["--docker-timeout", "0"], ["--name-pattern", "nope"],
                                  ["--probe-bad-status", "abc"], ["--allow", "not-a-net"], ["--bogus"]])
def test_bad_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2


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


@pytest.mark.parametrize("flag", ["-version", "--version"])
def test_version_with_one_or_two_dashes(flag, capsys):
    from healthcheck import __version__
    with pytest.raises(SystemExit) as info:
        parse_args([flag])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == "container-healthcheck " + __version__


@pytest.mark.parametrize("level", ["trace", "debug", "info", "warn", "warning", "error", "fatal", "panic", "INFO"])
def test_every_logrus_level_is_accepted(level):
    from healthcheck.logs import LEVELS
    args = parse_args(["-level", level, "-port", "4246"])
    assert args.level == level.lower() and args.level in LEVELS


def test_log_lines_are_logfmt_one_event_per_line():
    from healthcheck.logs import LogfmtFormatter
    from support import parse_logfmt
    record = logging.LogRecord("healthcheck.snapshot", logging.ERROR, __file__, 1,
                               'docker said "%s"', ("no\nsuch = thing",), None)
    line = LogfmtFormatter().format(record)
    assert "\n" not in line
    fields = parse_logfmt(line)
    assert fields["level"] == "error" and fields["msg"] == 'docker said "no\nsuch = thing"'
    assert fields["logger"] == "healthcheck.snapshot"
    assert fields["time"][10] == "T" and fields["time"][-3] == ":"  # RFC 3339 with the offset


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


def test_verdict_log_is_bounded():
    verdicts = VerdictLog(max_apps=3)
    for number in range(10):
        report = _report(False)._replace(app="app%d" % number)
        verdicts(report)
    assert list(verdicts._last) == ["app7", "app8", "app9"]
