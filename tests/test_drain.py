"""Drain state: the file format, atomic writes, corrupt files, and the CLI's wording."""
import json
import os

import pytest

from healthcheck import drain
from healthcheck.models import Container
from healthcheck.verdict import decide
from support import FakeClock, run_cli


def test_host_drain_applies_to_every_app_and_an_app_drain_to_that_app():
    state = drain.DrainState()
    state.drain(["bk_iam"], "redeploy by hand", 100)
    assert state.for_app("bk_iam").reason == "redeploy by hand" and state.for_app("bk_job") is None
    state.drain([], "kernel update", 200)
    assert state.for_app("bk_job").reason == "kernel update"
    assert state.for_app("bk_iam").reason == "redeploy by hand"  # its own drain first
    state.undrain(["bk_iam"])
    assert state.for_app("bk_iam").reason == "kernel update"
    state.undrain([])
    assert state.drains == {}


def test_round_trip_and_atomic_write(tmp_path):
    path = str(tmp_path / "state" / "drain.json")
    state = drain.DrainState()
    state.drain(["a"], "why \"quoted\"\n", 1700000000)
    drain.save(path, state)
    loaded, problem = drain.load(path)
    assert problem is None and loaded.drains == state.drains
    assert os.listdir(str(tmp_path / "state")) == ["drain.json"]  # no temporary file left
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("text", ["", "{", "[]", '{"drains": []}', "\x00\xff"])
def test_corrupt_file_is_not_drained_with_the_problem_said(tmp_path, text):
    path = tmp_path / "drain.json"
    path.write_text(text, encoding="latin-1")
    state, problem = drain.load(str(path))
    assert state.drains == {} and "not a drain state file" in problem


def test_missing_file_is_not_drained(tmp_path):
    state, problem = drain.load(str(tmp_path / "nope.json"))
    assert state.drains == {} and problem is None


def test_watcher_rereads_on_change_only_and_logs_corruption_once(tmp_path, caplog):
    path = str(tmp_path / "drain.json")
    clock = FakeClock()
    watcher = drain.DrainWatcher(path, check_s=0.5, clock=clock)
    assert watcher.for_app("a") is None
    state = drain.DrainState()
    state.drain(["a"], "x", 1)
    drain.save(path, state)
    assert watcher.for_app("a") is None  # checked less than 0.5 s ago
    clock.now += 0.6
    assert watcher.for_app("a").reason == "x"
    with open(path, "w") as handle:
        handle.write("garbage")
    for _ in range(5):
        clock.now += 0.6
        assert watcher.for_app("a") is None
    assert sum("not a drain state file" in r.getMessage() for r in caplog.records) == 1


def test_a_drained_app_is_not_healthy_with_code_17_and_the_reason():
    c = Container("a" * 64, "a-1700000000", ("a-1700000000",), "img", "cmd", 1, "running", "Up 1 hour", "none", ())
    report = decide("a", [c], drain=drain.Drain("kernel update", 1700000000))
    envelope = report.to_envelope()
    assert not report.healthy and envelope["code"] == 17 and "kernel update" in envelope["message"]
    assert [x["names"] for x in envelope["containers"]] == ["a-1700000000"]


def test_cli_drain_and_undrain(tmp_path):
    state_dir = str(tmp_path / "state")
    done = run_cli("drain", "--app", "bk_iam", "--app", "bk_job", "--reason", "disk swap", "--state-dir", state_dir,
                   text=True)
    assert done.returncode == 0 and "drained: bk_iam, bk_job" in done.stdout
    doc = json.load(open(os.path.join(state_dir, "drain.json")))
    assert sorted(doc["drains"]) == ["bk_iam", "bk_job"] and doc["drains"]["bk_iam"]["reason"] == "disk swap"
    done = run_cli("undrain", "--app", "bk_job", "--state-dir", state_dir, text=True)
    assert done.returncode == 0 and "now drained: bk_iam" in done.stdout
    done = run_cli("drain", "--state-dir", state_dir, "--wait", "--entry-interval", "0.1", "--entry-fall", "2",
                   text=True)
    assert done.returncode == 0 and "waiting 1.3 s" in done.stdout and "sends no new requests here" in done.stdout
    assert run_cli("undrain", "--state-dir", state_dir, text=True).stdout.splitlines()[-1] == "now drained: nothing"


def test_cli_refuses_bad_app_codes_and_unwritable_state(tmp_path):
    done = run_cli("drain", "--app", "../etc", "--state-dir", str(tmp_path), text=True)
    assert done.returncode == 2 and "invalid app_code" in done.stderr
    blocked = tmp_path / "file"
    blocked.write_text("")
    done = run_cli("drain", "--state-dir", str(blocked / "sub"), text=True)
    assert done.returncode == 2 and "cannot write" in done.stderr


def test_every_readable_entry_is_honoured_and_every_string_made_showable(tmp_path):
    path = str(tmp_path / "drain.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"drains": {
            "*": {"reason": "\udce5\u0001kernel\n" + "x" * 5000, "since": "yesterday"},
            "bk_iam": [1, 2], "bk_job": {"reason": {"nested": 1}, "since": 1e300},
            "not an app": {"reason": "ignored"}}}))
    state, problem = drain.load(path)
    assert sorted(state.drains) == ["*", "bk_iam", "bk_job"]
    host = state.drains["*"]
    assert host.reason.startswith("\ufffd kernel x") and len(host.reason) == 200 and host.since == 0
    assert state.drains["bk_iam"] == drain.Drain("", 0) and state.drains["bk_job"] == drain.Drain("", 0)
    for words in ("cannot be shown", "not a time", "not an object", "not a string", "not an app code"):
        assert words in problem
    host.describe().encode("utf-8")  # what every answer carries encodes


@pytest.mark.parametrize("raw", [b'{"drains": []}', b"[1]", b"\xff\xfe{", b"{" * 100000, b'"x"'])
def test_what_is_not_a_drain_file_is_no_drain(tmp_path, raw):
    path = tmp_path / "drain.json"
    path.write_bytes(raw)
    state, problem = drain.load(str(path))
    assert state.drains == {} and "not a drain state file" in problem
