"""Flags into Settings: the Go tool's spellings and levels, defaults, refusals, and a frozen result."""
import pytest

from healthcheck.config import parse_args


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


@pytest.mark.parametrize("argv, words", [
    (["-port", "0"], "argument --port/-port: not a TCP port: '0'"),
    (["--port", "70000"], "not a TCP port: '70000'"),
    (["--prefix", "no-slash"], "prefix must look like /container-healthcheck: 'no-slash'"),
    (["--docker-timeout", "0"], "argument --docker-timeout: must be > 0: '0'"),
    (["--name-pattern", "nope"], "--name-pattern must contain {app} exactly once: 'nope'"),
    (["--probe-bad-status", "abc"], "comma-separated HTTP statuses expected: 'abc'"),
    (["--allow", "not-a-net"], "'not-a-net' does not appear to be an IPv4 or IPv6 network"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_exit_2_and_say_why(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert words in capsys.readouterr().err


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


def test_settings_are_frozen():
    settings = parse_args(["serve", "--port", "4300"])
    with pytest.raises(AttributeError):
        settings.port = 4246
    assert settings.port == 4300 and settings._replace(port=1).port == 1 and settings.port == 4300


def test_each_command_gets_its_own_flags_and_the_domain_defaults():
    from healthcheck import drain, matching, probe
    check = parse_args(["check", "bk_iam"])
    assert (check.app_code, check.name_pattern, check.probe_bad_status, check.state_dir) == (
        "bk_iam", matching.DEFAULT_NAME_PATTERN, probe.DEFAULT_BAD_STATUSES, drain.DEFAULT_STATE_DIR)
    assert not hasattr(check, "port")
