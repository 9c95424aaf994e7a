"""Pure parsing of `docker ps` JSON lines from every CLI since 1.13 (no I/O here).

See tests/fixtures/docker-ps/FORMATS.md for the shapes: keys differ by client
version, State exists only from 20.10, Command is Go-quoted, CreatedAt carries an offset.
"""
import ast
import calendar
import datetime
import json
import re

from healthcheck.errors import DockerOutputError
from healthcheck.models import Container, Port

_CREATED_RE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\.\d+)? ([+-])(\d{2})(\d{2})(?: \S+)?$")
_PORT_RE = re.compile(r"^(?:(?P<ip>.*):(?P<hp>\d+(?:-\d+)?)->)?(?P<cp>\d+(?:-\d+)?)/(?P<proto>[a-z]+)$")
_HEALTH_RE = re.compile(r"\((healthy|unhealthy|health: starting|)\)$")
_HEALTH_WORDS = {"healthy": "healthy", "unhealthy": "unhealthy", "health: starting": "starting",
                 # 17.12-18.09 print "Up 3 seconds ()" before the first check has run.
                 "": "starting"}
_STATES = ("running", "exited", "paused", "restarting", "created", "dead", "removing")
_MAX_PORT_RANGE = 65536


def parse_ps_output(text):
    """Parse everything `docker ps --format <JSON template>` printed.

    Blank lines and lines not starting with `{` (warnings, the literal word `json` that
    20.10 prints for `--format json`) are skipped.
    :rtype: list of Container
    :raises DockerOutputError: a `{` line that is not a JSON object we can read.
    """
    containers = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            fields = json.loads(line)
        except ValueError as exc:
            raise DockerOutputError("docker ps line %d is not JSON (%s): %.120r" % (number, exc, line))
        containers.append(parse_ps_fields(fields, number))
    return containers


def parse_ps_fields(fields, number=1):
    """One decoded line -> Container. Unknown keys are ignored.

    :raises DockerOutputError: required keys (ID, Names, Status) missing or not text.
    """
    if not isinstance(fields, dict):
        raise DockerOutputError("docker ps line %d is not a JSON object" % number)
    for key in ("ID", "Names", "Status"):
        if not isinstance(fields.get(key), str):
            raise DockerOutputError("docker ps line %d has no text %s field" % (number, key))
    status = fields["Status"]
    state = fields.get("State")
    if not isinstance(state, str) or state not in _STATES:
        state = state_from_status(status)
    names = [n for n in fields["Names"].split(",") if n]
    return Container(
        id=fields["ID"],
        name=primary_name(names),
        names=tuple(names),
        image=_text(fields.get("Image")),
        command=unquote_command(_text(fields.get("Command"))),
        created=parse_created(_text(fields.get("CreatedAt"))),
        state=state,
        status=status,
        health=health_from_status(status, state, fields.get("HealthStatus")),
        ports=parse_ports(_text(fields.get("Ports"))),
    )


def _text(value):
    return value if isinstance(value, str) else ""


def primary_name(names):
    """The container's own name: --no-trunc can list link aliases (`src/alias`) first."""
    for name in names:
        if "/" not in name.lstrip("/"):
            return name.lstrip("/")
    return names[0].lstrip("/") if names else ""


def state_from_status(status):
    """Docker's State word derived from Status, for clients before 20.10 (no State key)."""
    if status.startswith("Up "):
        return "paused" if status.endswith("(Paused)") else "running"
    if status.startswith("Restarting"):
        return "restarting"
    if status.startswith("Exited") or status == "":
        return "exited"
    if status == "Created":
        return "created"
    if status.startswith("Removal In Progress"):
        return "removing"
    if status.startswith("Dead"):
        return "dead"
    return "unknown"


def health_from_status(status, state, health_status=None):
    """healthy, unhealthy, starting or none. Docker shows health only on running containers."""
    if state != "running":
        return "none"
    match = _HEALTH_RE.search(status)
    if match:
        return _HEALTH_WORDS[match.group(1)]
    if health_status in ("healthy", "unhealthy", "starting"):
        return health_status
    return "none"


def unquote_command(command):
    """Docker prints Command through Go's strconv.Quote; undo it."""
    if len(command) >= 2 and command[0] == '"' and command[-1] == '"':
        try:
            value = ast.literal_eval(command)
        except (ValueError, SyntaxError):
            return command[1:-1]
        if isinstance(value, str):
            return value
        return command[1:-1]
    return command


def parse_created(created_at):
    """'2024-03-08 14:08:39 +0800 CST' -> Unix seconds. The numeric offset is used; the zone
    abbreviation is ambiguous (CST) or missing, so it is ignored. 0 when unreadable."""
    match = _CREATED_RE.match(created_at.strip())
    if not match:
        return 0
    stamp, sign, hours, minutes = match.groups()
    try:
        local = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return 0
    offset = int(hours) * 3600 + int(minutes) * 60
    if sign == "-":
        offset = -offset
    return calendar.timegm(local.timetuple()) - offset


def parse_ports(ports_text):
    """Docker's Ports text -> tuple of Port, ranges expanded, in Docker's order."""
    ports = []
    for entry in ports_text.split(","):
        ports.extend(parse_port_entry(entry.strip()))
    return tuple(ports)


def parse_port_entry(entry):
    """'0.0.0.0:8000-8001->8000-8001/tcp', '[::]:80->80/tcp', '443/tcp' -> [Port]; [] if unreadable."""
    match = _PORT_RE.match(entry)
    if not match:
        return []
    private = _port_range(match.group("cp"))
    proto = match.group("proto")
    if match.group("hp") is None:
        return [Port(None, p, None, proto) for p in private]
    public = _port_range(match.group("hp"))
    if len(public) != len(private):
        return []
    ip = match.group("ip")
    if ip.startswith("[") and ip.endswith("]"):
        ip = ip[1:-1]
    return [Port(ip, p, h, proto) for p, h in zip(private, public)]


def _port_range(text):
    first, _, last = text.partition("-")
    low = int(first)
    high = int(last) if last else low
    if high < low or high - low >= _MAX_PORT_RANGE:
        return []
    return list(range(low, high + 1))
