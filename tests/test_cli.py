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
