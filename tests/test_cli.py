"""The service as a real process against a real Docker engine."""
import calendar
import concurrent.futures
import json
import os
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import (child_pids, parse_logfmt, cmdline, COUNTING_DOCKER, FAKE_DOCKER, PREFIX, ROOT, Service,
                     StatusServer, free_port, http, name_for, run_cli, unique_app, wait_for)


@pytest.fixture(scope="module")
def service(docker_engine, tmp_path_factory):
    log = str(tmp_path_factory.mktemp("svc") / "service.log")
    svc = Service("--ngx-port", "0", "--refresh", "2", log_path=log).start()
    yield svc
    svc.stop()


def status_of(svc, app, query=""):
    return svc.get("/apps/health/%s%s" % (app, query))


def test_running_container_is_200_with_the_go_fields(service, docker):
    app = unique_app()
    cid = docker.run(name_for(app, 1709878117))
    status, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(status_of(service, app)), 5) \
        or status_of(service, app)
    assert status == 200 and body["code"] == 0 and body["status"] == "ok"
    message = body["message"]
    assert message["container_id"] == cid[:10]
    assert message["names"] == name_for(app, 1709878117)
    assert message["state"] == "running" and message["status"].startswith("Up")
    assert message["image"] == "hc-busybox:test" and message["command"] == "sleep 3600"
    assert message["port"] == [] and message["health"] == "none"
    created = docker("inspect", "-f", "{{.Created}}", cid)  # RFC 3339 in UTC
    assert message["created"] == calendar.timegm(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S"))


def wait_status(svc, app, want, timeout_s=10, query=""):
    result = wait_for(lambda: (lambda r: r if r[0] == want else None)(status_of(svc, app, query)), timeout_s)
    return result or status_of(svc, app, query)


def test_exited_and_created_are_503_and_all_lists_them(service, docker):
    app = unique_app()
    docker.run(name_for(app), cmd=("true",))
    wait_for(lambda: docker.state(name_for(app)) == "exited", 10)
    status, body = wait_status(service, app, 503)
    assert status == 503 and body["code"] == 12 and "exited" in body["message"]
    assert body["containers"] == []
    status, body = status_of(service, app, "?all=true")
    assert status == 503 and [c["state"] for c in body["containers"]] == ["exited"]
    created_app = unique_app()
    docker.create(name_for(created_app))
    status, body = wait_status(service, created_app, 503)
    assert "created" in body["message"]


def test_paused_is_503(service, docker):
    app = unique_app()
    docker.run(name_for(app))
    assert wait_status(service, app, 200)[0] == 200
    docker("pause", name_for(app))
    status, body = wait_status(service, app, 503, 3)
    assert status == 503 and "paused" in body["message"]
    docker("unpause", name_for(app))
    assert wait_status(service, app, 200, 3)[0] == 200


def test_restarting_is_503(service, docker):
    app = unique_app()
    docker.run(name_for(app), "--restart", "always", cmd=("sh", "-c", "sleep 0.2; exit 1"))
    seen = wait_for(lambda: (lambda r: r if r[0] == 503 and "restarting" in r[1]["message"] else None)(
        status_of(service, app)), 30, 0.1)
    assert seen, "never saw a 503 for a restarting container"


@pytest.mark.parametrize("kind,health_cmd,interval,want_status,words", [
    ("healthy", "true", "1s", 200, None),
    ("unhealthy", "false", "1s", 503, "unhealthy"),
    ("starting", "true", "3600s", 503, "starting"),
])
def test_healthcheck_states(service, docker, kind, health_cmd, interval, want_status, words):
    app = unique_app()
    name = name_for(app)
    docker.run(name, "--health-cmd", health_cmd, "--health-interval", interval, "--health-retries", "1",
               "--health-timeout", "1s")
    if kind != "starting":
        assert wait_for(lambda: docker.health(name) == kind, 20), docker.health(name)
    status, body = wait_status(service, app, want_status, 5)
    assert status == want_status, body
    if words:
        assert words in body["message"]
    else:
        assert body["message"]["health"] == "healthy"


def test_redeploy_overlap(service, docker):
    app = unique_app()
    old, new = name_for(app, 1700000000), name_for(app, 1700000100)
    docker.run(old)
    time.sleep(1.1)  # distinct created seconds
    docker.run(new)
    status, body = wait_for(lambda: (lambda r: r if r[0] == 200 and len(r[1]["containers"]) == 2 else None)(
        status_of(service, app)), 5)
    assert body["message"]["names"] == new
    assert [c["names"] for c in body["containers"]] == [new, old]
    docker("stop", "-t", "0", old)
    status, body = wait_for(lambda: (lambda r: r if len(r[1]["containers"]) == 1 else None)(
        status_of(service, app)), 5)
    assert status == 200 and body["message"]["names"] == new
    status, body = status_of(service, app, "?all=true")
    assert [c["names"] for c in body["containers"]] == [new, old]


def test_java_style_name_without_dash(service, docker):
    app = unique_app()
    docker.run(name_for(app, dash=False))
    assert wait_status(service, app, 200)[0] == 200


def test_name_traps_do_not_match(service, docker):
    app = unique_app()
    for trap in (app + "_v2-1700000000", "x" + app + "-1700000000", app + "2-1700000000", app):
        docker.run(trap)
    status, body = wait_status(service, app + "_v2", 200)
    assert status == 200
    status, body = status_of(service, app)
    assert status == 503 and body["code"] == 12 and "no container of app" in body["message"]


@pytest.mark.parametrize("path", ["/apps/health/bk_(iam", "/apps/health/.*", "/apps/health/_x",
                                  "/apps/health/%s" % ("a" * 65)])
def test_invalid_app_codes_are_400(service, path):
    status, body = service.get(path)
    assert status == 400 and body["code"] == 13


def test_head(service, docker):
    app = unique_app()
    docker.run(name_for(app))
    wait_status(service, app, 200)
    status, _, body = http(service.port, PREFIX + "/apps/health/" + app, method="HEAD")
    assert status == 200 and body == b""
    status, _, body = http(service.port, PREFIX + "/apps/health/" + unique_app(), method="HEAD")
    assert status == 503 and body == b""


def test_dead_container_seen_within_a_second_by_events(docker_engine, docker, tmp_path):
    app = unique_app()
    docker.run(name_for(app))
    # --refresh 60: only the events stream can explain a fast change.
    with Service("--ngx-port", "0", "--refresh", "60", "--level", "debug", log_path=str(tmp_path / "log")) as svc:
        assert wait_status(svc, app, 200)[0] == 200
        docker("kill", name_for(app))
        killed = time.monotonic()
        status, _ = wait_status(svc, app, 503, 5)
        assert status == 503 and time.monotonic() - killed < 1.0
        docker("start", name_for(app))
        started = time.monotonic()
        assert wait_status(svc, app, 200, 5)[0] == 200 and time.monotonic() - started < 1.0


def test_events_stream_restarts_after_its_process_is_killed(docker_engine, docker):
    app = unique_app()
    docker.run(name_for(app))
    with Service("--ngx-port", "0", "--refresh", "60") as svc:
        assert wait_status(svc, app, 200)[0] == 200
        events = [p for p in child_pids(svc.proc.pid) if " events " in cmdline(p)]
        assert len(events) == 1
        os.kill(events[0], signal.SIGKILL)
        restarted = wait_for(lambda: [p for p in child_pids(svc.proc.pid)
                                      if " events " in cmdline(p) and p != events[0]], 10)
        assert restarted

        def stream():
            _, _, text = http(svc.port, PREFIX + "/metrics")
            samples = {s.name: s.value for f in text_string_to_metric_families(text.decode()) for s in f.samples}
            return samples["healthcheck_events_stream_restarts_total"], samples["healthcheck_events_stream_up"]
        # the new stream is up (it replays the second before it started: nothing is missed)
        assert wait_for(lambda: stream()[0] >= 1 and stream()[1] == 1, 10), stream()
        docker("kill", name_for(app))
        killed = time.monotonic()
        assert wait_status(svc, app, 503, 5)[0] == 503 and time.monotonic() - killed < 1.0


def test_concurrent_requests_share_docker_calls(docker_engine, docker, tmp_path):
    app = unique_app()
    docker.run(name_for(app))
    count_log = tmp_path / "calls"
    env = {"COUNT_DOCKER_LOG": str(count_log)}
    with Service("--ngx-port", "0", "--refresh", "0", "--no-events", "--docker-bin", COUNTING_DOCKER,
                 "--threads", "32", env=env) as svc:
        before = len(count_log.read_text().splitlines())
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda _: status_of(svc, app)[0], range(32)))
        calls = len(count_log.read_text().splitlines()) - before
    assert results == [200] * 32
    # refresh 0 asks docker per request, but concurrent requests share the call in flight.
    assert 1 <= calls <= 8, calls


def test_docker_unreachable_is_503_code_10(docker_engine, tmp_path):
    env = {"DOCKER_HOST": "unix://%s/nothing.sock" % tmp_path}
    with Service("--ngx-port", "0", env=env) as svc:
        status, body = status_of(svc, "bk_iam")
        assert status == 503 and body["code"] == 10
        assert svc.get("/health")[0] == 200
    with Service("--ngx-port", "0", "--docker-bin", str(tmp_path / "no-docker")) as svc:
        status, body = status_of(svc, "bk_iam")
        assert status == 503 and body["code"] == 10


def test_stale_snapshot_then_503_when_docker_hangs(tmp_path):
    mode = tmp_path / "mode"
    mode.write_text("ok")
    env = {"FAKE_DOCKER_MODE_FILE": str(mode)}
    # --no-events: the fake's events stream would stay open; this is the TTL path.
    with Service("--ngx-port", "0", "--refresh", "0.5", "--max-stale", "3", "--docker-timeout", "1",
                 "--docker-bin", FAKE_DOCKER, "--no-events", env=env) as svc:
        assert status_of(svc, "okapp")[0] == 200
        mode.write_text("hang")
        stale_seen, deadline = False, time.monotonic() + 8
        while time.monotonic() < deadline:
            started = time.monotonic()
            status, body = status_of(svc, "okapp")
            assert time.monotonic() - started < 1 + 1.0  # docker timeout + 1 s
            if status == 200:
                assert body.get("stale_s", 0) <= 3
                stale_seen = stale_seen or "stale_s" in body
            else:
                assert status == 503 and body["code"] == 11
                break
            time.sleep(0.1)
        assert stale_seen and status == 503
        mode.write_text("ok")
        assert wait_status(svc, "okapp", 200, 5)[0] == 200


def test_probe_against_a_loopback_server(docker_engine, docker):
    app = unique_app()
    docker.run(name_for(app))
    ngx = StatusServer(headers=[("Location", "/elsewhere")])

    def probed(code):
        """An answer built on a probe that saw `code` (probes run in the background)."""
        return wait_for(lambda: (lambda r: r if r[1].get("probe", {}).get("status") == code else None)(
            status_of(svc, app)), 10) or status_of(svc, app)

    with Service("--ngx-port", str(ngx.port), "--probe-ttl", "0.2") as svc:
        for code, want in ((200, 200), (302, 200), (404, 200), (502, 503), (503, 503), (504, 503)):
            ngx.status = code
            status, body = probed(code)
            assert status == want, (code, body)
            if want == 503:
                assert "does not answer" in body["message"] and str(code) in body["message"]
        ngx.close()
        status, body = wait_for(lambda: (lambda r: r if "refused" in r[1]["message"] else None)(
            status_of(svc, app)), 10) or status_of(svc, app)
        assert status == 503 and "refused" in body["message"]


def test_go_style_flags_and_log_file(docker_engine, docker, tmp_path):
    app, dead = unique_app(), unique_app()
    docker.run(name_for(app))
    docker.run(name_for(dead), cmd=("true",))
    wait_for(lambda: docker.state(name_for(dead)) == "exited", 10)
    port = free_port()
    logdir = tmp_path / "logs"
    svc = Service("-level", "info", "-prefix", "/hc", "-port", str(port), "-ngx-port", "0",
                  "-logpath", str(logdir), port=port, subcommand=None)
    svc.proc = subprocess.Popen(svc.argv, env=svc.env, cwd=ROOT)
    try:
        assert wait_for(lambda: _quiet_status(port, "/hc/health") == 200, 20)
        assert _quiet_status(port, "/hc/apps/health/" + app) == 200
        assert _quiet_status(port, "/hc/apps/health/" + dead) == 503
        # an app code nobody runs is answered, but not logged: clients cannot flood the log
        assert _quiet_status(port, "/hc/apps/health/" + unique_app("ghost")) == 503
    finally:
        svc.stop()
    text = (logdir / "container-healthcheck.log").read_text()
    assert 'msg="GET /hc/apps/health/%s" status=200' % app in text
    assert "level=warning" in text and "app %s is not healthy" % dead in text
    for line in text.splitlines():
        fields = parse_logfmt(line)  # every line is one logfmt event, like logrus' text format
        assert set(fields) >= {"time", "level", "msg"}, line
        assert fields["level"] in ("debug", "info", "warning", "error"), line
    assert "ghost" not in text.replace("GET /hc/apps/health/ghost", "")


def _quiet_status(port, path):
    try:
        return http(port, path, timeout=2)[0]
    except OSError:
        return None


def _check(*args, env=None):
    done = run_cli("check", *args, env=env, text=True)
    return done.returncode, json.loads(done.stdout)


def test_check_exit_codes(docker_engine, docker, tmp_path):
    app = unique_app()
    docker.run(name_for(app))
    code, body = _check(app, "--ngx-port", "0")
    assert code == 0 and body["message"]["names"] == name_for(app)
    code, body = _check(unique_app(), "-ngx-port", "0")
    assert code == 1 and body["code"] == 12
    code, body = _check("bk_(iam")
    assert code == 2 and body["code"] == 13
    code, body = _check(app, "--ngx-port", "0", env={"DOCKER_HOST": "unix://%s/none.sock" % tmp_path})
    assert code == 2 and body["code"] == 10


def test_metrics_from_the_live_service(service, docker):
    app = unique_app()
    docker.run(name_for(app))
    wait_status(service, app, 200)
    status, headers, text = http(service.port, PREFIX + "/metrics")
    assert status == 200
    samples = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text.decode()) for s in f.samples]
    assert (("healthcheck_app_healthy", {"app": app}, 1.0)) in samples
    assert any(n == "healthcheck_docker_calls_total" and l == {"command": "ps"} and v >= 1 for n, l, v in samples)
    assert any(n == "healthcheck_docker_call_seconds_count" for n, _, _ in samples)


def test_apps_endpoint_live(service, docker):
    app = unique_app()
    docker.run(name_for(app))
    wait_status(service, app, 200)
    status, body = service.get("/apps")
    assert status == 200 and body["message"]["apps"][app]["code"] == 0
    assert app in body["message"]["healthy"]


def test_what_go_tool_users_relied_on_against_the_running_service(docker_engine, docker, tmp_path):
    """Each wire habit of the Go tool, on a real service: cache-busters, `?all=`, trailing
    slashes, charset, -version, every logrus level, logfmt lines."""
    app, dead = unique_app(), unique_app()
    docker.run(name_for(app))
    docker.run(name_for(dead), cmd=("true",))
    wait_for(lambda: docker.state(name_for(dead)) == "exited", 10)
    version = run_cli("-version", text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("container-healthcheck 2.")
    for level in ("trace", "fatal", "panic"):
        with Service("-level", level, "-ngx-port", "0") as svc:
            assert svc.get("/health")[0] == 200
    with Service("-level", "info", "-ngx-port", "0", "-logpath", str(tmp_path)) as svc:
        status, headers, body = http(svc.port, "/container-healthcheck/apps/health/%s?_=1709878117" % app)
        assert status == 200 and headers["Content-Type"] == "application/json; charset=utf-8"
        for path in ("/apps/health/%s/" % app, "/apps/health/%s/?_=1" % app, "/health/", "/apps/"):
            assert svc.get(path)[0] == 200, path
        status, body = svc.get("/apps/health/%s?all=" % dead)
        assert status == 503 and body["containers"] == []  # empty all is false, as in Go
        status, body = svc.get("/apps/health/%s?all=YES" % dead)
        assert status == 503 and [c["names"] for c in body["containers"]] == [name_for(dead)]
        status, body = svc.get("/apps/health/%s?all=maybe" % dead)
        assert status == 400 and body["code"] == 13
    lines = (tmp_path / "container-healthcheck.log").read_text().splitlines()
    assert lines
    for line in lines:
        fields = parse_logfmt(line)
        assert {"time", "level", "msg"} <= set(fields), line
    assert any(parse_logfmt(line).get("msg") == "GET /container-healthcheck/apps/health/%s?_=1709878117" % app
               and parse_logfmt(line).get("status") == "200" for line in lines), lines[-10:]


def _code_of(svc, app, code, timeout_s=5):
    return wait_for(lambda: (lambda r: r if r[1]["code"] == code else None)(status_of(svc, app)), timeout_s) \
        or status_of(svc, app)


def test_drain_an_app_then_the_host_across_a_restart_and_a_corrupt_file(docker_engine, docker, tmp_path):
    drained, other = unique_app(), unique_app()
    docker.run(name_for(drained))
    docker.run(name_for(other))
    state = str(tmp_path / "state")
    log = str(tmp_path / "service.log")
    with Service("--ngx-port", "0", "--state-dir", state, log_path=log) as svc:
        assert wait_status(svc, drained, 200)[0] == 200
        assert run_cli("drain", "--app", drained, "--reason", "swap disk", "--state-dir", state).returncode == 0
        status, body = _code_of(svc, drained, 17)
        assert status == 503 and body["code"] == 17 and "swap disk" in body["message"]
        assert [c["names"] for c in body["containers"]] == [name_for(drained)]
        assert status_of(svc, other)[0] == 200  # a per-app drain touches that app only
        apps = svc.get("/apps")[1]["message"]
        assert drained not in apps["healthy"] and other in apps["healthy"]
        assert apps["apps"][drained]["code"] == 17
        _, _, metrics = http(svc.port, "/container-healthcheck/metrics")
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(metrics.decode()) for s in f.samples}
        assert samples[("healthcheck_app_draining", (("app", drained),))] == 1
        assert samples[("healthcheck_app_healthy", (("app", drained),))] == 0
    with Service("--ngx-port", "0", "--state-dir", state, log_path=log) as svc:
        assert status_of(svc, drained)[1]["code"] == 17  # the drain survives a restart
        with open(os.path.join(state, "drain.json"), "w") as handle:
            handle.write("{half a file")
        assert _code_of(svc, drained, 0)[0] == 200  # corrupt: reported, treated as not drained
        assert run_cli("drain", "--reason", "reboot", "--state-dir", state).returncode == 0
        assert _code_of(svc, other, 17)[1]["code"] == 17
        assert status_of(svc, drained)[1]["code"] == 17
        assert run_cli("undrain", "--state-dir", state).returncode == 0
        assert _code_of(svc, drained, 0)[0] == 200 and status_of(svc, other)[0] == 200
        assert svc.proc.poll() is None
    text = open(log).read()
    assert "not a drain state file" in text and "drain state now" in text


def test_apps_table_from_the_service_and_directly(docker_engine, docker, tmp_path):
    good, dead = unique_app(), unique_app()
    docker.run(name_for(good))
    docker.run(name_for(dead), cmd=("true",))
    wait_for(lambda: docker.state(name_for(dead)) == "exited", 10)

    def table(*args):
        return run_cli("apps", "--ngx-port", "0", *args, text=True)
    with Service("--ngx-port", "0") as svc:
        url = "http://127.0.0.1:%d/container-healthcheck" % svc.port
        wait_status(svc, good, 200)
        shown = table("--url", url)
        assert shown.returncode == 1, shown.stderr  # some app is not healthy
        lines = shown.stdout.splitlines()
        assert lines[0].split() == ["APP", "VERDICT", "WHY", "CONTAINER", "STATUS", "HEALTH", "PROBE", "CONTAINERS"]
        mine = {line.split()[0]: line.split() for line in lines[1:] if line.split()[0] in (good, dead)}
        assert mine[dead][1:3] == ["UNHEALTHY", "exited"] and mine[good][1] == "healthy"
        raw = table("--url", url, "--json")
        assert json.loads(raw.stdout)["message"]["unhealthy"][dead] == "exited"
    assert table("--direct").stdout.count(dead) == 1
    gone = table("--url", "http://127.0.0.1:%d/container-healthcheck" % free_port())
    assert gone.returncode == 2 and "cannot ask" in gone.stderr
