"""Command-line flags, including the Go tool's single-dash spellings, into one frozen Settings.

The defaults of a domain live with it (the name pattern in matching, the bad statuses in
probe, the state folder in drain); this module only spells the flags.
"""
import argparse
import collections
import ipaddress
import re

from healthcheck import __version__
from healthcheck.drain import DEFAULT_STATE_DIR
from healthcheck.errors import ConfigError
from healthcheck.matching import DEFAULT_NAME_PATTERN, check_name_template
from healthcheck.probe import DEFAULT_BAD_STATUSES

_PREFIX_RE = re.compile(r"(/[A-Za-z0-9_.~-]+)*")


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0: %r" % text)
    return value


def _non_negative_float(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0: %r" % text)
    return value


def _port(text, allow_zero=False):
    value = int(text)
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise argparse.ArgumentTypeError("not a TCP port: %r" % text)
    return value


def _ngx_port(text):
    return _port(text, allow_zero=True)


def _count(text):
    value = int(text)
    if not 1 <= value <= 4096:
        raise argparse.ArgumentTypeError("must be 1..4096: %r" % text)
    return value


def _prefix(text):
    text = text.rstrip("/")
    if not _PREFIX_RE.fullmatch(text):
        raise argparse.ArgumentTypeError("prefix must look like /container-healthcheck: %r" % text)
    return text


def _statuses(text):
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("comma-separated HTTP statuses expected: %r" % text)
    if not all(100 <= v <= 599 for v in values):
        raise argparse.ArgumentTypeError("HTTP statuses are 100..599: %r" % text)
    return values


def _networks(text):
    try:
        return tuple(str(ipaddress.ip_network(part.strip(), strict=False)) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _name_pattern(text):
    try:
        return check_name_template(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def _add_common(parser):
    """Flags shared by `serve` and `check`. Single-dash forms are the Go tool's spellings."""
    add = parser.add_argument
    add("--ngx-port", "-ngx-port", type=_ngx_port, default=8010,
        help="APPO Nginx port probed at /o/<app>/ (0 = no probe; default 8010)")
    add("--ngx-host", default="127.0.0.1",
        help="address of the APPO Nginx for the probe (default 127.0.0.1)")
    add("--level", "-level", default="info", type=str.lower,
        choices=["trace", "debug", "info", "warn", "warning", "error", "fatal", "panic"],
        help="log level, any of logrus' (default info)")
    add("--logpath", "-logpath", default="", help="directory for container-healthcheck.log (default: stderr)")
    add("--docker-bin", default="docker", help="docker CLI binary (default: docker on PATH)")
    add("--docker-timeout", type=_positive_float, default=5.0, help="seconds per docker CLI call (default 5)")
    add("--name-pattern", type=_name_pattern, default=DEFAULT_NAME_PATTERN,
        help="container name regex, full match, {app} = escaped app code (default %(default)s)")
    add("--probe-timeout", type=_positive_float, default=2.0, help="probe deadline in seconds (default 2)")
    add("--probe-bad-status", type=_statuses, default=DEFAULT_BAD_STATUSES,
        help="probe statuses that mean the app is down (default 502,503,504)")
    _add_state_dir(parser)


def _add_state_dir(parser):
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR,
                        help="folder of the drain state file (default %(default)s)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="container-healthcheck", allow_abbrev=False,
        description="Tells a load balancer whether an app's Docker container on this host is healthy.")
    parser.add_argument("--version", "-version", action="version", version="container-healthcheck " + __version__)
    commands = parser.add_subparsers(dest="command")

    serve = commands.add_parser("serve", allow_abbrev=False, help="run the HTTP service")
    add = serve.add_argument
    add("--bind", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    add("--port", "-port", type=_port, default=4246, help="TCP port (default 4246)")
    add("--prefix", "-prefix", type=_prefix, default="/container-healthcheck",
        help="URL prefix (default /container-healthcheck)")
    add("--allow", type=_networks, default=None,
        help="comma-separated CIDRs allowed to connect (others get 403)")
    add("--refresh", type=_non_negative_float, default=2.0,
        help="max age in seconds of the container list without docker events (0 = ask docker per request)")
    add("--max-stale", type=_non_negative_float, default=10.0,
        help="seconds the last container list may serve while docker does not answer (default 10)")
    add("--no-events", action="store_true", help="do not follow `docker events` (TTL only)")
    add("--safety-refresh", type=_non_negative_float, default=60.0,
        help="max age in seconds of the container list while docker events are followed (default 60)")
    add("--probe-ttl", type=_non_negative_float, default=2.0,
        help="seconds between two probes of one app, start to start (default 2; at least 0.1)")
    add("--probe-concurrency", type=_count, default=32,
        help="probes running at once in the background (default 32)")
    add("--threads", type=_count, default=16, help="HTTP worker threads (default 16)")
    add("--feed-waiters", type=_count, default=8,
        help="entry balancers' feed requests that may wait at once, each holding a thread (default 8; "
             "at most threads - 1; the rest are answered at once)")
    add("--backlog", type=_count, default=1024, help="listen backlog (default 1024)")
    _add_common(serve)

    check = commands.add_parser("check", allow_abbrev=False,
                                help="print one app's verdict as JSON; exit 0 healthy, 1 unhealthy, 2 unknown")
    check.add_argument("app_code")
    check.add_argument("--all", action="store_true", help="list non-running containers too")
    _add_common(check)

    apps = commands.add_parser("apps", allow_abbrev=False,
                               help="this host's apps as a table; exit 0 all healthy, 1 some not, 2 could not tell")
    apps.add_argument("--json", action="store_true", help="print the raw /apps answer")
    apps.add_argument("--direct", action="store_true", help="ask docker (and probe) directly, not the running service")
    apps.add_argument("--url", default="http://127.0.0.1:4246/container-healthcheck",
                      help="the running service (default %(default)s)")
    apps.add_argument("--all", action="store_true", help="count non-running containers too")
    _add_common(apps)

    for name, words in (("drain", "take this host (or --app APPs on it) out of every balancer before maintenance"),
                        ("undrain", "put this host (or --app APPs) back; without --app, undo every drain")):
        maintenance = commands.add_parser(name, allow_abbrev=False, help=words, description=words)
        add = maintenance.add_argument
        add("--app", action="append", default=[], metavar="APP",
            help="an app code (repeat for several); none: the whole host")
        if name == "drain":
            add("--reason", default="", help="why, shown in every answer while drained")
        add("--wait", action="store_true",
            help="return once the entry balancer can have seen it (interval x (fall or rise + 1), plus pickup)")
        add("--entry-interval", type=_positive_float, default=2.0,
            help="the entry balancer's poll interval in seconds (Lua default 2)")
        add("--entry-fall", type=_count, default=2, help="the entry balancer's fall (Lua default 2)")
        add("--entry-rise", type=_count, default=2, help="the entry balancer's rise (Lua default 2)")
        _add_state_dir(maintenance)
    return parser


_SETTINGS_TYPES = {}


def frozen(namespace):
    """The parsed flags as an immutable Settings (a namedtuple of the command's flags): built
    once, read everywhere, changed nowhere."""
    fields = tuple(sorted(vars(namespace)))
    settings_type = _SETTINGS_TYPES.get(fields)
    if settings_type is None:
        settings_type = _SETTINGS_TYPES.setdefault(fields, collections.namedtuple("Settings", fields))
    return settings_type(**vars(namespace))


def parse_args(argv):
    """Settings from argv. With no subcommand, or the Go tool's bare flags, `serve` is meant.
    Bad flags exit 2 with argparse's message, as the Go tool's did."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version", "-version")):
        argv.insert(0, "serve")
    return frozen(build_parser().parse_args(argv))
