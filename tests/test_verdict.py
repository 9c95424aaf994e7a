from healthcheck.models import Container, ProbeResult
from healthcheck.verdict import decide, newest_first, pick_serving


def c(name, state="running", health="none", created=100, status=None):
    status = status or {"running": "Up 1 minute", "exited": "Exited (1) 1 minute ago",
                        "paused": "Up 1 minute (Paused)", "restarting": "Restarting (1) 1 second ago",
                        "created": "Created"}.get(state, state)
    return Container(name.ljust(64, "0")[:64], name, (name,), "img", "cmd", created, state, status, health, ())


def test_no_container_is_unhealthy_with_reason():
    report = decide("app", [])
    assert not report.healthy and "no container of app app" in report.reason
    assert report.to_envelope()["code"] == 12


def test_running_is_healthy_and_is_the_message():
    report = decide("app", [c("app-1700000000")])
    envelope = report.to_envelope()
    assert report.healthy and envelope["code"] == 0 and envelope["status"] == "ok"
    assert set(envelope["message"]) == {"command", "container_id", "created", "image", "names", "port",
                                        "state", "status", "health"}
    assert envelope["message"]["container_id"] == "app-170000"


def test_paused_restarting_unhealthy_starting_do_not_serve():
    for container in (c("a-1", "paused"), c("a-1", "restarting"), c("a-1", health="unhealthy"),
                      c("a-1", health="starting"), c("a-1", "exited"), c("a-1", "created"),
                      c("a-1", "dead"), c("a-1", "removing")):
        report = decide("a", [container])
        assert not report.healthy, container
        assert "a-1 is" in report.reason


def test_healthy_healthcheck_serves():
    assert decide("a", [c("a-1", health="healthy")]).healthy


def test_overlap_newest_serving_wins_and_all_are_listed():
    old = c("a-1700000000", created=100)
    new = c("a-1700000100", created=200)
    report = decide("a", [old, new])
    assert report.healthy and report.chosen == new
    assert [x.name for x in report.containers] == ["a-1700000100", "a-1700000000"]


def test_old_exited_new_running():
    report = decide("a", [c("a-1700000000", "exited", created=100), c("a-1700000100", created=200)])
    assert report.healthy
    assert [x.name for x in report.containers] == ["a-1700000100"]
    report_all = decide("a", [c("a-1700000000", "exited", created=100), c("a-1700000100", created=200)], True)
    assert [x.name for x in report_all.containers] == ["a-1700000100", "a-1700000000"]


def test_newest_unhealthy_falls_back_to_older_serving():
    report = decide("a", [c("a-1", created=100), c("a-2", health="unhealthy", created=200)])
    assert report.healthy and report.chosen.name == "a-1"


def test_all_never_turns_a_dead_app_healthy():
    report = decide("a", [c("a-1", "exited")], include_all=True)
    assert not report.healthy and len(report.to_envelope()["containers"]) == 1


def test_ties_broken_by_name_timestamp():
    first, second = c("a-1700000000", created=5), c("a-1700000001", created=5)
    assert newest_first([first, second])[0] == second
    assert pick_serving([first, second]) == second


def test_probe_failure_is_unhealthy_and_says_so():
    probe = ProbeResult(False, "http://127.0.0.1:8010/o/a/", 502, None)
    report = decide("a", [c("a-1")], probe=probe)
    assert not report.healthy
    assert "does not answer" in report.reason and "502" in report.reason
    assert report.to_envelope()["probe"]["status"] == 502


def test_probe_ok_is_healthy():
    probe = ProbeResult(True, "http://127.0.0.1:8010/o/a/", 302, None)
    assert decide("a", [c("a-1")], probe=probe).healthy
