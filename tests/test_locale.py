"""CentOS 7's Python in the C locale: every command prints, its exit code means what README
says, operator text is stored as typed, and nothing in a drain file breaks any answer.

Commands run as `python -m healthcheck` under LC_ALL=C PYTHONCOERCECLOCALE=0 PYTHONUTF8=0,
which gives any Python 3.7+ what 3.6 has there: ASCII stdio, surrogate-escaped argv. The RPM
launcher with no LANG, on the real 3.6 when it is installed, is in test_rpm.py."""
import json
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import C_LOCALE, PREFIX, Service, http, name_for, run_cli, unique_app, wait_for

REASON = "内核升级 é"
COMMAND_TEXT = "café 内核"
STAMP = 1712345678  # names only these tests use, so --name-pattern picks out their apps


def _json(out):
    """stdout is one JSON document in UTF-8 (strict: a replaced byte fails here)."""
    return json.loads(out.decode("utf-8"))


@pytest.fixture
def app_with_cjk_command(docker):
    app = unique_app("loc")
    docker.run(name_for(app, STAMP), cmd=("sh", "-c", "sleep 3600 # %s" % COMMAND_TEXT))
    return app


def test_every_command_in_the_c_locale(app_with_cjk_command, tmp_path):
    app = app_with_cjk_command
    state = str(tmp_path / "state")
    only_ours = ["--ngx-port", "0", "--name-pattern", "{app}-%d" % STAMP]

    done = run_cli("check", app, *only_ours, env=C_LOCALE)
    assert done.returncode == 0, done.stderr
    assert COMMAND_TEXT in _json(done.stdout)["message"]["command"]

    done = run_cli("apps", "--json", "--direct", *only_ours, env=C_LOCALE)
    assert done.returncode == 0, done.stderr
    assert COMMAND_TEXT in _json(done.stdout)["message"]["apps"][app]["message"]["command"]

    done = run_cli("drain", "--app", app, "--reason", REASON, "--state-dir", state, env=C_LOCALE)
    assert done.returncode == 0, done.stderr
    with open(os.path.join(state, "drain.json"), encoding="utf-8") as handle:
        assert json.load(handle)["drains"][app]["reason"] == REASON  # as typed, not surrogates
    said = done.stdout.decode("ascii")  # the terminal's ASCII: escaped, never a crash
    assert "\\u5185\\u6838\\u5347\\u7ea7 \\xe9" in said

    with Service("--ngx-port", "0", "--state-dir", state, "--name-pattern", "{app}-%d" % STAMP,
                 env=C_LOCALE) as service:
        assert wait_for(lambda: service.get("/apps/health/" + app)[1]["code"] == 17, 5)
        status, body = service.get("/apps/health/" + app)
        assert status == 503 and REASON in body["message"]
        status, body = service.get("/apps")
        assert status == 200 and body["message"]["unhealthy"][app] == "draining: " + REASON
        for path in ("/", "/metrics"):
            assert http(service.port, PREFIX + path)[0] == 200
        url = "http://127.0.0.1:%d%s" % (service.port, PREFIX)

        done = run_cli("apps", "--url", url, env=C_LOCALE)
        assert done.returncode == 1, done.stderr  # one app drained: not all healthy
        table = done.stdout.decode("ascii")
        assert "draining: \\u5185\\u6838\\u5347\\u7ea7" in table
        header, row = table.splitlines()[:2]
        assert row.index("draining") == header.index("VERDICT")
        assert row.index(name_for(app, STAMP)) == header.index("CONTAINER")  # aligned as printed

        done = run_cli("apps", "--json", "--url", url, env=C_LOCALE)
        assert done.returncode == 1 and _json(done.stdout)["message"]["unhealthy"][app] == "draining: " + REASON

    done = run_cli("undrain", "--state-dir", state, env=C_LOCALE)
    assert done.returncode == 0 and b"undrained" in done.stdout
    assert run_cli("--version", env=C_LOCALE).returncode == 0


@pytest.mark.parametrize("args, env", [
    (["check", "bad app"], {}),
    (["check", "内核"], {}),
    (["check", "someapp", "--ngx-port", "0"], {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}),
    (["apps", "--url", "http://127.0.0.1:1/内核"], {}),
])
def test_could_not_tell_is_exit_2_in_the_c_locale(args, env):
    done = run_cli(*args, env=dict(C_LOCALE, **env))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert b"Traceback" not in done.stderr
    if args[0] == "check":
        assert _json(done.stdout)["code"] in (10, 11, 13)


# ---- Defence in depth: any drain file, read by the running service ----

def _json_values():
    # Text with every code point, lone surrogates included (written as \udcXX escapes).
    any_text = st.text(alphabet=st.characters(blacklist_categories=()), max_size=40)
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | any_text
    return st.recursive(scalars,
                        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
                        max_leaves=8)


def _documents(app):
    entry = st.fixed_dictionaries({}, optional={"reason": _json_values(), "since": _json_values()}) | _json_values()
    drains = st.dictionaries(st.sampled_from([app, "*", "other-app", "bad key", "\udce5"]) | st.text(max_size=8),
                             entry, max_size=4)
    doc = st.fixed_dictionaries({"drains": drains}, optional={"version": _json_values()}) | _json_values()
    as_json = doc.map(lambda d: json.dumps(d).encode("utf-8"))
    return as_json | st.binary(max_size=200) | as_json.map(lambda b: b[:len(b) // 2])


def _expected_drained(raw, app):
    """The test's own reading of the format: drained when the file is a JSON object whose
    `drains` object has the app or `*`, whatever the entries hold."""
    try:
        doc = json.loads(raw.decode("utf-8", "replace"))
    except ValueError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("drains"), dict) and (
        app in doc["drains"] or "*" in doc["drains"])


@pytest.fixture(scope="module")
def drained_service(docker_engine, tmp_path_factory):
    from support import Docker
    docker = Docker()
    app = unique_app("fz")
    docker.run(name_for(app, STAMP))
    state = str(tmp_path_factory.mktemp("fuzz-state"))
    service = Service("--ngx-port", "0", "--state-dir", state, "--name-pattern", "{app}-%d" % STAMP,
                      env=C_LOCALE).start()
    try:
        yield service, app, os.path.join(state, "drain.json")
    finally:
        service.stop()
        docker.cleanup()


def _write_atomically(path, raw):
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path))
    with os.fdopen(handle, "wb") as out:
        out.write(raw)
    os.rename(temporary, path)


def _answers_right(service, app, drained):
    status, body = service.get("/apps/health/" + app)
    assert status in (200, 503), body
    apps_status, apps_body = service.get("/apps")
    assert apps_status == 200, apps_body
    host = http(service.port, PREFIX + "/")[0]
    metrics = http(service.port, PREFIX + "/metrics")[0]
    assert host == 200 and metrics == 200
    return body["code"] == (17 if drained else 0) and (app in apps_body["message"]["unhealthy"]) == drained


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_drain_file_breaks_an_answer(drained_service, data):
    service, app, path = drained_service
    raw = data.draw(_documents(app))
    _write_atomically(path, raw)
    drained = _expected_drained(raw, app)
    # The service looks at the file at most every 0.5 s: every answer meanwhile must be right
    # for the old file or the new one, and within 3 s right for the new one.
    assert wait_for(lambda: _answers_right(service, app, drained), 3, 0.1)
    assert service.proc.poll() is None


def test_a_huge_and_hostile_drain_file_is_read_where_it_can_be(drained_service):
    service, app, path = drained_service
    hostile = {"version": 1, "drains": {
        app: {"reason": "\udce5\u0000\n<script>" + "内" * (1024 * 1024), "since": "yesterday"},
        "other": [1, 2], "bad key!": {"reason": "x"}}}
    _write_atomically(path, json.dumps(hostile).encode("utf-8"))

    def read_the_new_file():
        # the app may be drained by the file before this one: wait for this file's reason
        return _answers_right(service, app, True) and \
            "\ufffd  <script>内内" in service.get("/apps/health/" + app)[1]["message"]
    ok = wait_for(read_the_new_file, 5, 0.1)
    assert ok, (service.get("/apps/health/" + app), service.get("/apps")[1]["message"]["unhealthy"])
    assert len(service.get("/apps/health/" + app)[1]["message"]) < 400
    _write_atomically(path, b'{"drains": []}')  # a list where an object belongs: not drained
    assert wait_for(lambda: _answers_right(service, app, False), 3, 0.1)
    os.unlink(path)


def test_docker_output_that_is_not_utf8_is_shown_replaced(tmp_path):
    """Container commands are arbitrary bytes: a GBK or cut command reaches every answer as
    U+FFFD, never a 500, also in the C locale. (FAKE docker: a real one prints what the
    container was given, which a test cannot make invalid on every engine.)"""
    from support import FAKE_DOCKER
    ps = tmp_path / "ps.jsonl"
    line = ('{"ID":"%s","Names":"gbk-1700000000","Image":"img:1","Command":"\\"echo ' % ("a" * 64)).encode()
    ps.write_bytes(line + "内核".encode("gbk") + b'\xff\\"","CreatedAt":"2024-03-08 14:08:39 +0800 CST",'
                   b'"Status":"Up 5 days","Ports":""}\n')
    with Service("--ngx-port", "0", "--docker-bin", FAKE_DOCKER,
                 env=dict(C_LOCALE, FAKE_DOCKER_MODE="ok", FAKE_DOCKER_PS=str(ps))) as service:
        status, body = service.get("/apps/health/gbk")
        assert status == 200 and "\ufffd" in body["message"]["command"], body
        for path in ("/apps", "/", "/metrics", "/apps/feed"):
            assert http(service.port, PREFIX + path)[0] == 200, path
    done = run_cli("check", "gbk", "--ngx-port", "0", "--docker-bin", FAKE_DOCKER,
                   env=dict(C_LOCALE, FAKE_DOCKER_MODE="ok", FAKE_DOCKER_PS=str(ps)))
    assert done.returncode == 0 and "\ufffd" in _json(done.stdout)["message"]["command"]
