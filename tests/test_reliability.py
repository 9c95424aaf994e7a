"""Faults, hostile input, signals and security, against real processes."""
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import given, settings, strategies as st

from healthcheck import errors, parsing
from healthcheck.docker import PS_ARGS
from support import (child_pids, cmdline, FAKE_DOCKER, FIXTURES, PREFIX, ROOT, Service, http, name_for, unique_app,
                     wait_for)


def _load(svc, path, stop, results, keepalive=True):
    import http.client as hc
    conn = hc.HTTPConnection(svc.host, svc.port, timeout=10)
    while not stop.is_set():
        started = time.monotonic()
        try:
            conn.request("GET", PREFIX + path)
            response = conn.getresponse()
            body = response.read()
            results.append((started, time.monotonic() - started, response.status, body))
        except Exception as exc:
            results.append((started, time.monotonic() - started, 0, repr(exc).encode()))
            conn.close()
            conn = hc.HTTPConnection(svc.host, svc.port, timeout=10)


def _run_load(svc, path, clients=8):
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=_load, args=(svc, path, stop, results), daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    return stop, results, threads


def test_dockerd_stopped_under_load_then_started(docker_engine, tmp_path):
    """503 code 10 within --max-stale of the daemon stopping, never a hang; recovery after."""
    host = subprocess.run([os.path.join(ROOT, "scripts", "dockerd-up"), "fault"], stdout=subprocess.PIPE,
                          universal_newlines=True, check=True, timeout=120).stdout.strip().splitlines()[-1]
    env = dict(os.environ, DOCKER_HOST=host)
    app = unique_app()
    try:
        subprocess.run(["docker", "rm", "-f", name_for(app)], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        # --stop-timeout 1: `sleep` as PID 1 ignores SIGTERM, and the daemon's stop would wait 10 s
        subprocess.run(["docker", "run", "-d", "--network", "none", "--stop-timeout", "1", "--name", name_for(app),
                        "hc-busybox:test", "sleep", "3600"], env=env, check=True, stdout=subprocess.DEVNULL)
        with Service("--ngx-port", "0", "--refresh", "1", "--max-stale", "3", env={"DOCKER_HOST": host}) as svc:
            assert svc.get("/apps/health/" + app)[0] == 200
            stop, results, threads = _run_load(svc, "/apps/health/" + app)
            assert wait_for(lambda: sum(1 for r in results if r[2] == 200) >= 20, 10)  # the load is on
            subprocess.run([os.path.join(ROOT, "scripts", "dockerd-down"), "fault"], check=True, timeout=60)
            down_at = time.monotonic()  # the daemon is gone
            # past --max-stale (3 s) and the refresh: answers from then on must say docker is down
            assert wait_for(lambda: any(r[0] > down_at + 3 + 1.5 for r in list(results)), 15)
            subprocess.run([os.path.join(ROOT, "scripts", "dockerd-up"), "fault"], check=True, timeout=120,
                           stdout=subprocess.DEVNULL)
            up_at = time.monotonic()
            # the container did not survive (no live-restore here): start it again
            subprocess.run(["docker", "start", name_for(app)], env=env, check=True, stdout=subprocess.DEVNULL)
            assert wait_for(lambda: results and results[-1][2] == 200, 10)
            recovered_at = time.monotonic()
            stop.set()
            for thread in threads:
                thread.join(5)
            # the events stream reconnects (its backoff is capped at 5 s)
            events = wait_for(lambda: [p for p in child_pids(svc.proc.pid) if " events " in cmdline(p)], 8)
        assert all(elapsed < 5 + 1 for _, elapsed, _, _ in results), max(r[1] for r in results)
        assert all(status in (200, 503) for _, _, status, _ in results)
        # --max-stale 3 after the last good list (taken at most --refresh 1 before the stop)
        late = [r for r in results if down_at + 3 + 0.5 < r[0] < up_at - 1]
        assert late and all(r[2] == 503 and b'"code":10' in r[3] for r in late), late[:3]
        assert recovered_at - up_at < 10
        assert len(events) == 1  # the stream reconnected
    finally:
        # the test started this engine: it stops it (and the container it ran there)
        subprocess.run(["docker", "rm", "-f", name_for(app)], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60)
        subprocess.run([os.path.join(ROOT, "scripts", "dockerd-down"), "fault"], timeout=60)


def test_hanging_docker_keeps_one_docker_process_and_bounded_answers(tmp_path):
    env = {"FAKE_DOCKER_MODE": "hang", "FAKE_DOCKER_EVENTS": "hang"}
    # A copy at a path of this test's own: its processes are told apart from other tests'.
    fake_docker = str(tmp_path / "fake-docker-hang")
    shutil.copy(FAKE_DOCKER, fake_docker)
    with Service("--ngx-port", "0", "--docker-bin", fake_docker, "--docker-timeout", "1", "--refresh", "0.5",
                 "--max-stale", "0", env=env) as svc:
        stop, results, threads = _run_load(svc, "/apps/health/okapp", clients=16)
        peak = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            peak = max(peak, len([p for p in child_pids(svc.proc.pid) if " ps " in cmdline(p)]))
            time.sleep(0.05)
        stop.set()
        for thread in threads:
            thread.join(5)
        pid = svc.proc.pid
    assert peak <= 1
    assert results and all(elapsed < 1 + 1 for _, elapsed, _, _ in results)
    assert all(status == 503 for _, _, status, _ in results)

    def leftovers():
        found = subprocess.run(["pgrep", "-f", fake_docker], stdout=subprocess.PIPE, universal_newlines=True).stdout
        return [p for p in found.split() if int(p) != pid]
    # a hung child never ends by itself: one still there after 2 s was left behind
    assert wait_for(lambda: not leftovers(), 2), "the service left its docker children behind: %s" % leftovers()


@pytest.mark.parametrize("mode,code", [("garbage", 11), ("half", 11), ("exit1", 11), ("crash", 11),
                                       ("unreachable", 10), ("huge", 0), ("noise", 0), ("empty", 12)])
def test_docker_faults_give_clear_envelopes_and_service_keeps_serving(mode, code):
    with Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER, "--docker-timeout", "30",
                 env={"FAKE_DOCKER_MODE": mode}) as svc:
        status, body = svc.get("/apps/health/okapp" if mode != "huge" else "/apps/health/bulk7", timeout=60)
        assert body["code"] == code, body
        assert status == (200 if code == 0 else 503)
        assert svc.get("/health")[0] == 200


def test_sigterm_under_load_finishes_requests_and_exits_zero(docker_engine, docker):
    app = unique_app()
    docker.run(name_for(app))
    svc = Service("--ngx-port", "0").start()
    stop, results, threads = _run_load(svc, "/apps/health/" + app, clients=8)
    assert wait_for(lambda: len(results) >= 50, 10)  # under load: every client answered, many times
    children = child_pids(svc.proc.pid)
    started = time.monotonic()
    svc.proc.send_signal(signal.SIGTERM)
    code = svc.proc.wait(10)
    took = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join(5)
    assert code == 0 and took < 5
    # Reaped by the service before it exited (killed with their group, waited for): no child
    # is left running, and none as a zombie (whose reaping would fall to whatever init is).
    assert children and wait_for(lambda: not any(os.path.exists("/proc/%d" % pid) for pid in children), 5), [
        open("/proc/%d/status" % pid).read().splitlines()[:3] for pid in children if os.path.exists("/proc/%d" % pid)]
    # every answer that arrived was complete and correct; later ones were refused, not broken
    answered = [r for r in results if r[2]]
    assert answered and all(r[2] == 200 and r[3].endswith(b"}") for r in answered)


def test_sigterm_answers_held_feed_requests_at_once():
    """An entry's held feed request is answered when the service is told to stop, not a
    `wait` later: the entry learns at once (its next request is refused: the APPO is out),
    and the stop does not wait for it."""
    with Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER, env={"FAKE_DOCKER_MODE": "ok"}) as svc:
        status, _, body = http(svc.port, PREFIX + "/apps/feed")
        assert status == 200
        index = int(body.decode().split("\nindex ", 1)[1].split("\n", 1)[0])
        answers = []

        def held():
            answers.append(http(svc.port, PREFIX + "/apps/feed?index=%d&wait=5" % index, timeout=10))
        waiter = threading.Thread(target=held)
        waiter.start()
        assert wait_for(lambda: b"healthcheck_feed_held_requests 1.0" in http(svc.port, PREFIX + "/metrics")[2], 5)
        stopped_at = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        waiter.join(10)
        assert answers and answers[0][0] == 200 and b"\nheld 1\n" in answers[0][2], answers
        assert svc.proc.wait(10) == 0
        assert time.monotonic() - stopped_at < 3  # well before the 5 s wait ran out


def test_sighup_reopens_logs_without_dropping_requests(docker_engine, docker, tmp_path):
    app = unique_app()
    docker.run(name_for(app))
    logdir = tmp_path / "logs"
    with Service("--ngx-port", "0", "--logpath", str(logdir)) as svc:
        stop, results, threads = _run_load(svc, "/apps/health/" + app, clients=4)
        assert wait_for(lambda: len(results) >= 20, 10)
        os.rename(str(logdir / "container-healthcheck.log"), str(logdir / "container-healthcheck.log.1"))
        svc.proc.send_signal(signal.SIGHUP)
        fresh_log = logdir / "container-healthcheck.log"
        # the load goes on until the reopened file holds requests answered after the SIGHUP
        assert wait_for(lambda: fresh_log.exists() and 'status=200' in fresh_log.read_text(), 10)
        stop.set()
        for thread in threads:
            thread.join(5)
    assert all(r[2] == 200 for r in results)
    assert (logdir / "container-healthcheck.log").exists()
    logged = (logdir / "container-healthcheck.log").read_text()
    assert 'msg="GET %s/apps/health/%s" status=200' % (PREFIX, app) in logged


def test_unwritable_log_path_does_not_stop_answers(tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("x")
    with Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER, "--logpath", str(blocked / "logs"),
                 env={"FAKE_DOCKER_MODE": "ok"}) as svc:
        assert svc.get("/apps/health/okapp")[0] == 200


def test_full_log_disk_does_not_stop_answers(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    logdir = tmp_path / "logs"
    logdir.mkdir()
    os.symlink("/dev/full", str(logdir / "container-healthcheck.log"))
    with Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER, "--logpath", str(logdir),
                 env={"FAKE_DOCKER_MODE": "ok"}) as svc:
        for _ in range(50):
            assert svc.get("/apps/health/okapp")[0] == 200
        time.sleep(0.5)  # the thing tried: the batched access log's writer meets the full disk
        assert svc.get("/apps/health/downapp")[0] == 503


@pytest.fixture(scope="module")
def logged_service(tmp_path_factory):
    log = tmp_path_factory.mktemp("argv") / "argv.log"
    svc = Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER, "--refresh", "0", "--no-events",
                  env={"FAKE_DOCKER_MODE": "ok", "FAKE_DOCKER_LOG": str(log)}).start()
    yield svc, log
    svc.stop()


@pytest.mark.parametrize("raw", ["bk_(iam", "..%2F..%2Fetc", "%00", "a%20b", "$(id)", "a;rm%20-rf", "%E4%BD%A0",
                                 "a" * 10000, "'", "%22", "a|b", "a`b`", "--filter", "-a", "..", "%2e%2e"])
def test_hostile_app_codes_get_4xx_and_never_reach_docker_argv(logged_service, raw):
    svc, log = logged_service
    before = log.read_text() if log.exists() else ""
    status, _, body = http(svc.port, PREFIX + "/apps/health/" + raw)
    assert status in (400, 404), (raw, status)
    assert body.startswith(b'{"code":1')
    after = log.read_text() if log.exists() else ""
    assert after == before  # no docker call for an invalid name


def test_docker_argv_is_fixed_whatever_the_app_code(logged_service):
    svc, log = logged_service
    for app in ("okapp", "a-b.c_d", "A" * 64):
        http(svc.port, PREFIX + "/apps/health/" + app)
    lines = [line for line in log.read_text().splitlines() if line.startswith("ps ")]
    assert lines and set(lines) == {" ".join(PS_ARGS)}


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"a" * 100000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET " + PREFIX.encode() + b"/health HTTP/1.1\r\n" + b"X-Flood: " + b"y" * 200000 + b"\r\n\r\n",
    b"GET " + PREFIX.encode() + b"/health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(20000)) + b"\r\n",
    b"BREW /coffee HTCPCP/1.0\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 100,
])
def test_floods_and_garbage_get_a_4xx_or_a_close(logged_service, request_bytes):
    svc, _ = logged_service
    # cheroot closes a connection that sends no complete line within its 10 s timeout.
    with socket.create_connection(("127.0.0.1", svc.port), timeout=15) as sock:
        try:
            sock.sendall(request_bytes)
            answer = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    assert answer == b"" or answer.split(b" ", 2)[1][:1] == b"4", answer[:200]
    assert svc.get("/health")[0] == 200


def test_slowloris_is_closed_and_others_are_served(logged_service):
    """Dribbling clients hold a worker each until cheroot's 5 s timeout closes them; with fewer
    of them than --threads (16) the others are served meanwhile."""
    svc, _ = logged_service
    socks = []
    for _ in range(10):
        sock = socket.create_connection(("127.0.0.1", svc.port), timeout=20)
        sock.sendall(b"GET " + PREFIX.encode() + b"/health HTTP/1.1\r\nHost: x\r\n")
        socks.append(sock)
    try:
        for _ in range(5):
            status, _, _ = http(svc.port, PREFIX + "/apps/health/okapp", timeout=5)
            assert status == 200
        started = time.monotonic()
        data = socks[0].recv(1024)
        assert data == b"" or data.startswith(b"HTTP/1.1 4"), data[:100]
        assert time.monotonic() - started < 10
    finally:
        for sock in socks:
            sock.close()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_property_app_codes_validate_or_are_rejected(app):
    from healthcheck.matching import APP_CODE_RE, validate_app_code
    if APP_CODE_RE.fullmatch(app):
        assert validate_app_code(app) == app
    else:
        with pytest.raises(errors.InvalidInput):
            validate_app_code(app)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=200), st.dictionaries(st.sampled_from(
    ["ID", "Names", "Status", "State", "Ports", "CreatedAt", "Command", "Image", "HealthStatus", "X"]),
    st.one_of(st.text(max_size=40), st.integers(), st.none(), st.lists(st.integers(), max_size=2)), max_size=10)
    .map(lambda d: __import__("json").dumps(d))))
def test_property_docker_lines_parse_or_raise_the_named_error(line):
    try:
        containers = parsing.parse_ps_output(line)
    except errors.DockerOutputError:
        return
    for container in containers:
        assert isinstance(container.name, str) and container.state and container.health
        container.to_dict()


def test_bind_all_warns_without_allow(tmp_path):
    log = tmp_path / "log"
    with Service("--bind", "0.0.0.0", "--ngx-port", "0", "--docker-bin", FAKE_DOCKER, log_path=str(log),
                 env={"FAKE_DOCKER_MODE": "ok"}):
        pass
    assert "without --allow" in log.read_text()
    log2 = tmp_path / "log2"
    with Service("--bind", "0.0.0.0", "--allow", "127.0.0.0/8", "--ngx-port", "0", "--docker-bin", FAKE_DOCKER,
                 log_path=str(log2), env={"FAKE_DOCKER_MODE": "ok"}) as svc:
        assert svc.get("/health")[0] == 200
    assert "without --allow" not in log2.read_text()


def test_answers_reveal_only_documented_fields(docker_engine, docker, tmp_path):
    app = unique_app()
    docker.run(name_for(app), "--label", "secret=hunter2", "--env", "PASSWORD=hunter2")
    with Service("--ngx-port", "0") as svc:
        for path in ("/apps/health/" + app + "?all=true", "/apps"):
            status, _, body = http(svc.port, PREFIX + path)
            assert b"hunter2" not in body
    # Our template asks docker for none of that; a docker that prints it anyway (a wrapper
    # adding fields, `{{json .}}` somewhere) must not leak it either.
    leaky = tmp_path / "ps_leaky.jsonl"
    lines = []
    with open(os.path.join(FIXTURES, "ps_ok.jsonl")) as handle:
        for line in handle:
            if line.strip().startswith("{"):
                fields = json.loads(line)
                fields.update({"Labels": "secret=hunter2", "Mounts": "/hunter2", "Env": ["PASSWORD=hunter2"],
                               "Networks": "hunter2", "Size": "hunter2"})
                lines.append(json.dumps(fields))
    leaky.write_text("\n".join(lines) + "\n")
    with Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER,
                 env={"FAKE_DOCKER_MODE": "ok", "FAKE_DOCKER_PS": str(leaky)}) as svc:
        status, _, body = http(svc.port, PREFIX + "/apps?all=true")
        assert status == 200 and b'"apps":{"' in body and b"hunter2" not in body


def test_log_file_is_appended_not_truncated_on_start(tmp_path):
    logdir = tmp_path / "logs"
    for _ in range(2):
        with Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER, "--logpath", str(logdir),
                     env={"FAKE_DOCKER_MODE": "ok"}) as svc:
            svc.get("/apps/health/okapp")
    text = (logdir / "container-healthcheck.log").read_text()
    assert text.count("serving on") == 2
    assert text.count('msg="GET %s/apps/health/okapp" status=200' % PREFIX) == 2
