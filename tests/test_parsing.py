"""Parser tests over every fixture line from Docker 1.13 to 28 (tests/fixtures/docker-ps, copied from the
shared fixtures)."""
import glob
import json
import os

import pytest

from healthcheck import parsing
from healthcheck.errors import DockerOutputError
from healthcheck.models import Port

SHARED = os.path.join(os.path.dirname(__file__), "fixtures", "docker-ps")
SYNTHETIC = sorted(glob.glob(os.path.join(SHARED, "synthetic", "*.expected.jsonl")))
CAPTURED = sorted(glob.glob(os.path.join(SHARED, "captured", "*", "*.jsonl")))
API = os.path.join(SHARED, "captured", "api_v1.41_containers_json.json")


def _expected_rows():
    rows = []
    for path in SYNTHETIC:
        version = os.path.basename(path).split(".expected")[0]
        with open(path.replace(".expected.jsonl", ".jsonl")) as raw:
            lines = raw.read().splitlines()
        with open(path) as handle:
            for row in map(json.loads, handle):
                rows.append(pytest.param(lines[row["line"] - 1], row,
                                         id="%s-%d-%s" % (version, row["line"], row["scenario"])))
    return rows


def test_fixtures_are_present():
    assert len(SYNTHETIC) >= 7 and len(CAPTURED) >= 100


@pytest.mark.parametrize("line,row", _expected_rows())
def test_synthetic_line_matches_expected_values(line, row):
    expect = row["expect"]
    [container] = parsing.parse_ps_output(line)
    assert container.id in (expect["id"], expect["full_id"])
    assert container.name == expect["name"]
    assert list(container.names) == expect["names"]
    assert container.image == expect["image"]
    assert container.command == expect["command"]
    assert container.created == expect["created_unix"]
    assert container.state == expect["state"]
    assert container.status == expect["status"]
    assert container.health == (expect["health"] if expect["state"] == "running" else "none")
    entries = [e for e in expect["ports"] if e]
    assert all(parsing.parse_port_entry(e) for e in entries), entries
    assert len(container.ports) >= len(entries)


def _api_truth():
    with open(API) as handle:
        return {c["Id"]: c for c in json.load(handle)}


@pytest.mark.parametrize("path", CAPTURED, ids=lambda p: "/".join(p.split(os.sep)[-2:]))
def test_captured_output_parses_and_agrees_with_the_daemon(path):
    truth = _api_truth()
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    containers = parsing.parse_ps_output(text)
    raw = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert len(containers) == len(raw)
    for container, fields in zip(containers, raw):
        if "State" in fields:
            assert parsing.state_from_status(fields["Status"]) == fields["State"]
            assert container.state == fields["State"]
        api = next((c for i, c in truth.items() if i.startswith(container.id)), None)
        if api is not None:
            # The API dump was taken at another moment: states of restart loops differ.
            assert container.created == api["Created"]


@pytest.mark.parametrize("status,state,health", [
    ("Up 5 days", "running", "none"),
    ("Up 2 hours (Paused)", "paused", "none"),
    ("Up 3 minutes (unhealthy)", "running", "unhealthy"),
    ("Up 3 minutes (healthy)", "running", "healthy"),
    ("Up 3 seconds (health: starting)", "running", "starting"),
    ("Up 3 seconds ()", "running", "starting"),
    ("Restarting (1) 3 seconds ago", "restarting", "none"),
    ("Exited (137) 3 weeks ago", "exited", "none"),
    ("Created", "created", "none"),
    ("Removal In Progress", "removing", "none"),
    ("Dead", "dead", "none"),
    ("", "exited", "none"),
    ("Something new", "unknown", "none"),
])
def test_state_and_health_from_status(status, state, health):
    assert parsing.state_from_status(status) == state
    assert parsing.health_from_status(status, state) == health


@pytest.mark.parametrize("created_at,unix", [
    ("2024-03-08 14:08:39 +0800 CST", 1709878119),
    ("2024-03-08 06:08:39 +0000 UTC", 1709878119),
    ("2024-03-08 01:08:39 -0500 EST", 1709878119),
    ("2024-03-08 02:38:39 -0330 NST", 1709878119),
    ("2024-03-08 14:08:39 +0800 +08", 1709878119),
    ("2024-03-08 14:08:39.123 +0800 CST", 1709878119),
    ("yesterday", 0),
    ("", 0),
])
def test_created_uses_the_numeric_offset(created_at, unix):
    assert parsing.parse_created(created_at) == unix


@pytest.mark.parametrize("text,ports", [
    ("", ()),
    ("443/tcp", (Port(None, 443, None, "tcp"),)),
    ("0.0.0.0:8080->80/tcp", (Port("0.0.0.0", 80, 8080, "tcp"),)),
    ("0.0.0.0:8000->8000/tcp, :::8000->8000/tcp",
     (Port("0.0.0.0", 8000, 8000, "tcp"), Port("::", 8000, 8000, "tcp"))),
    ("[::]:8000->8000/tcp", (Port("::", 8000, 8000, "tcp"),)),
    ("[::1]:19229->9230/tcp", (Port("::1", 9230, 19229, "tcp"),)),
    ("9000-9001/udp", (Port(None, 9000, None, "udp"), Port(None, 9001, None, "udp"))),
    ("127.0.0.1:8000-8001->8000-8001/tcp",
     (Port("127.0.0.1", 8000, 8000, "tcp"), Port("127.0.0.1", 8001, 8001, "tcp"))),
    ("garbage, 80/tcp", (Port(None, 80, None, "tcp"),)),
])
def test_ports(text, ports):
    assert parsing.parse_ports(text) == ports


def test_port_object_matches_the_go_tool():
    published, exposed = parsing.parse_ports("0.0.0.0:8080->80/tcp, 443/tcp")
    assert published.to_dict() == {"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": 8080, "Type": "tcp"}
    assert exposed.to_dict() == {"PrivatePort": 443, "Type": "tcp"}


@pytest.mark.parametrize("quoted,command", [
    ('"/bin/sleep 3600"', "/bin/sleep 3600"),
    ('"/bin/sh -c \'echo \\"hi\\" \\u0026\\u0026 true\'"', "/bin/sh -c 'echo \"hi\" && true'"),
    ('"python \u4f60\u597d"', "python \u4f60\u597d"),
    ('"sleep 1\\u2026"', "sleep 1\u2026"),
    ("not quoted", "not quoted"),
    ('"bad \\q escape"', "bad \\q escape"),
])
def test_command_is_go_unquoted(quoted, command):
    assert parsing.unquote_command(quoted) == command


def test_noise_and_blank_lines_are_skipped():
    text = '\nWARNING: x\njson\n{"ID":"ab","Names":"a-1700000000","Status":"Up 1 second"}\n\n'
    [container] = parsing.parse_ps_output(text)
    assert container.name == "a-1700000000" and container.ports == () and container.created == 0


def test_unknown_keys_are_ignored():
    line = '{"ID":"ab","Names":"a","Status":"Up 1 second","Platform":{"os":"linux"},"HealthStatus":"healthy","New":1}'
    [container] = parsing.parse_ps_output(line)
    assert container.health == "healthy"


@pytest.mark.parametrize("text", [
    '{"ID": "ab", "Names": ',
    '{}',
    '{"ID": 1, "Names": "a", "Status": "Up"}',
    '{"Names": "a", "Status": "Up"}',
])
def test_unreadable_json_lines_raise(text):
    with pytest.raises(DockerOutputError):
        parsing.parse_ps_output(text)


def test_link_alias_listed_first_is_not_the_name():
    line = '{"ID":"ab","Names":"src/db_alias,target-1700000000","Status":"Up 1 second"}'
    [container] = parsing.parse_ps_output(line)
    assert container.name == "target-1700000000"
