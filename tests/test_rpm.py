"""The RPM, with real rpm tools: contents, requires, what EL7's rpm 4.11 can open, and every
scriptlet really run (in a busybox scratch root with logging stubs for systemctl and the user
tools): fresh install, upgrade over a replica of the Go tool's package, 2.x -> 2.y, erase;
plus an install whose launcher serves against the real Docker engine."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from support import ROOT, free_port, get_json, name_for, unique_app, wait_for

SPEC_GO_TOOL = os.path.join(ROOT, "tests", "fixtures", "rpm", "go-tool.spec")
NEWER = "2.4.3"
NAME = "container-healthcheck"
# What rpm 4.11 (CentOS 7) provides, from its lib/rpmds.c rpmlibProvides table: a package
# requiring any other rpmlib() feature (LargeFiles, RichDependencies, PayloadIsZstd,
# CaretInVersions...) does not install there.
RPMLIB_4_11 = {
    "VersionedDependencies", "CompressedFileNames", "PayloadIsBzip2", "PayloadIsXz", "PayloadIsLzma",
    "PayloadFilesHavePrefix", "ExplicitPackageProvide", "HeaderLoadSortsTags", "ScriptletInterpreterArgs",
    "PartialHardlinkSets", "ConcurrentAccess", "BuiltinLuaScripts", "FileDigests", "FileCaps",
    "ScriptletExpansion", "TildeInVersions",
}


def run(*argv, check=True, **kwargs):
    proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=600, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError("%s failed (%d):\n%s" % (" ".join(argv), proc.returncode, proc.stdout))
    return proc.stdout


def build(tmp, version=None):
    env = dict(os.environ, DIST_DIR=str(tmp / "dist"), WORK_DIR=str(tmp / "work"), PYTHON=sys.executable)
    if version:
        env["VERSION"] = version
    out = run(os.path.join(ROOT, "scripts", "build-rpm"), cwd=ROOT, env=env)
    return out.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def rpms(tmp_path_factory):
    if not shutil.which("rpmbuild"):
        if os.environ.get("CI"):
            pytest.fail("rpmbuild missing")
        pytest.skip("rpmbuild missing")
    tmp = tmp_path_factory.mktemp("rpm")
    current = build(tmp)
    newer = build(tmp_path_factory.mktemp("rpm-newer"), NEWER)
    go_top = tmp / "go"
    run("rpmbuild", "-bb", "--target", "x86_64", "--define", "_topdir %s" % go_top, SPEC_GO_TOOL)
    go_tool = str(go_top / "RPMS" / "x86_64" / "container-healthcheck-1.0.2-2.el7.x86_64.rpm")
    return {"current": current, "newer": newer, "go": go_tool}


def test_name_version_and_arch(rpms):
    from healthcheck import __version__
    assert os.path.basename(rpms["current"]) == "container-healthcheck-%s-1.noarch.rpm" % __version__
    assert run("rpm", "-qp", "--qf", "%{ARCH} %{VERSION}", rpms["current"]) == "noarch %s" % __version__


def test_files(rpms):
    files = set(run("rpm", "-qpl", rpms["current"]).split())
    for path in ("/usr/bin/container-healthcheck", "/usr/lib/systemd/system/container-healthcheck.service",
                 "/etc/sysconfig/container-healthcheck", "/etc/logrotate.d/container-healthcheck",
                 "/var/log/container-healthcheck", "/usr/lib/container-healthcheck/__main__.py",
                 "/usr/lib/container-healthcheck/healthcheck/cli.py",
                 "/usr/lib/container-healthcheck/healthcheck/openapi.json",
                 "/usr/lib/container-healthcheck/bottle.py", "/usr/lib/container-healthcheck/cheroot/wsgi.py",
                 "/usr/lib/container-healthcheck/prometheus_client/__init__.py"):
        assert path in files, path
    assert not any("site-packages" in f or "dist-packages" in f for f in files)
    assert not any(f.endswith(".pyc") for f in files)
    config = run("rpm", "-qpc", rpms["current"]).split()
    assert "/etc/sysconfig/container-healthcheck" in config
    dump = run("rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEUSERNAME} %{FILEMODES:perms}\n]", rpms["current"])
    assert "/var/log/container-healthcheck container-healthcheck drwxr-x---" in dump
    # the drain state: writable by the service user (and root) only
    assert "/var/lib/container-healthcheck container-healthcheck drwxr-xr-x" in dump


def test_requires(rpms):
    requires = run("rpm", "-qpR", rpms["current"])
    assert "python3 >= 3.6" in requires
    assert "docker" not in requires and "moby" not in requires


def test_scriptlets(rpms):
    scripts = run("rpm", "-qp", "--scripts", rpms["current"])
    assert "useradd -r -g container-healthcheck -G docker" in scripts
    assert "groupadd -r docker" in scripts
    assert "systemctl enable container-healthcheck.service" in scripts
    assert "disable container-healthcheck.service" in scripts and "systemctl stop" in scripts
    # each scriptlet is valid sh
    assert "systemctl restart container-healthcheck.service" in scripts
    for tag in ("PREIN", "POSTIN", "PREUN", "POSTUN", "POSTTRANS"):
        body = run("rpm", "-qp", "--qf", "%%{%s}" % tag, rpms["current"])
        assert body.strip() and body.strip() != "(none)", tag
        subprocess.run(["sh", "-n"], input=body, universal_newlines=True, check=True, timeout=10)


def test_sysconfig_carries_the_go_tools_opts(rpms, tmp_path):
    root = _install(tmp_path, rpms["current"])
    text = (root / "etc/sysconfig/container-healthcheck").read_text()
    assert ('OPTS="-level info -prefix /container-healthcheck -port 4246 -ngx-port 8010 '
            '-logpath /var/log/container-healthcheck"') in text


def _install(tmp_path, rpm, upgrade=False):
    root = tmp_path / "root"
    if not (root / "var" / "lib" / "rpm").exists():
        root.mkdir(exist_ok=True)
        run("rpm", "--root", str(root), "--initdb")
    run("rpm", "-U" if upgrade else "-i", "--root", str(root), "--nodeps", "--noscripts", rpm)
    return root


def test_installed_launcher_serves_against_real_docker(rpms, tmp_path, docker):
    root = _install(tmp_path, rpms["current"])
    app = unique_app()
    docker.run(name_for(app))
    launcher = str(root / "usr/bin/container-healthcheck")
    from healthcheck import __version__
    assert __version__ in run(launcher, "--version")
    port = free_port()
    # The Go tool's OPTS line, as the unit passes it; PYTHONPATH must not matter (-E).
    argv = [launcher, "serve", "-level", "info", "-prefix", "/container-healthcheck", "-port", str(port),
            "-ngx-port", "0", "-logpath", str(tmp_path / "logs")]
    proc = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH="/nonexistent"))
    try:
        assert wait_for(lambda: _status(port, "/container-healthcheck/health") == 200, 20)
        status, body = get_json(port, "/container-healthcheck/apps/health/" + app)
        assert status == 200 and body["message"]["names"] == name_for(app)
        status, body = get_json(port, "/container-healthcheck/apps/health/" + unique_app())
        assert status == 503 and body["code"] == 12
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def _pythons_36_and_current():
    """The interpreters to run the launcher with: CentOS 7's 3.6 when this machine has one
    (pyenv), and the current one."""
    found = [sys.executable]
    for candidate in ("/root/.pyenv/versions/3.6.15/bin/python3.6", shutil.which("python3.6") or ""):
        if candidate and os.path.exists(candidate):
            found.insert(0, os.path.realpath(candidate))
            break
    return found


def test_launcher_in_the_c_locale_with_no_lang(rpms, tmp_path, docker):
    """As cron or `env -i` runs it on CentOS 7: no LANG at all, so 3.6 has ASCII stdio and
    surrogate-escaped argv; CJK and accents in a container's command and a drain reason."""
    root = _install(tmp_path, rpms["current"])
    launcher = str(root / "usr/bin/container-healthcheck")
    app = unique_app("rl")
    # a timestamp no other test uses: --name-pattern then picks out this test's app alone
    # (test_locale's 1712345678 containers come and go on the same engine meanwhile)
    docker.run(name_for(app, 1712345679), cmd=("sh", "-c", "sleep 3600 # café 内核"))
    pattern = ["--ngx-port", "0", "--name-pattern", "{app}-1712345679"]
    for python in _pythons_36_and_current():
        env = {"PATH": "/usr/bin:/bin", "DOCKER_HOST": os.environ.get("DOCKER_HOST", ""), "PYTHON": python}
        state = str(tmp_path / ("state-%d" % len(python)))

        def launch(*args):
            return subprocess.run([launcher] + list(args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=60)
        done = launch("check", app, *pattern)
        assert done.returncode == 0, (python, done.stderr)
        assert "café 内核" in json.loads(done.stdout.decode("utf-8"))["message"]["command"]
        done = launch("apps", "--json", "--direct", *pattern)
        assert done.returncode == 0, (python, done.stderr)
        assert json.loads(done.stdout.decode("utf-8"))["message"]["healthy"] == [app]
        done = launch("drain", "--app", app, "--reason", "内核升级", "--state-dir", state)
        assert done.returncode == 0, (python, done.stderr)
        with open(os.path.join(state, "drain.json"), encoding="utf-8") as handle:
            assert json.load(handle)["drains"][app]["reason"] == "内核升级", python
        assert launch("undrain", "--state-dir", state).returncode == 0
        assert launch("--version").returncode == 0


def _status(port, path):
    try:
        return get_json(port, path, timeout=2)[0]
    except (OSError, ValueError):
        return None


def test_launcher_says_what_is_wrong_without_python(rpms, tmp_path):
    root = _install(tmp_path, rpms["current"])
    conf = root / "etc/sysconfig/container-healthcheck"
    conf.write_text(conf.read_text().replace("PYTHON=\n", "PYTHON=/nonexistent/python3\n"))
    proc = subprocess.run([str(root / "usr/bin/container-healthcheck"), "--version"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=30)
    assert proc.returncode == 1
    assert "needs Python >= 3.6" in proc.stderr and "/nonexistent/python3" in proc.stderr


def test_payload_and_rpmlib_needs_open_on_el7(rpms):
    for rpm in (rpms["current"], rpms["go"]):
        assert run("rpm", "-qp", "--qf", "%{PAYLOADCOMPRESSOR}", rpm) == "gzip", rpm
    needs = [line.split()[0] for line in run("rpm", "-qpR", rpms["current"]).splitlines()
             if line.startswith("rpmlib(")]
    assert needs, "rpmlib() requirements were expected"
    for need in needs:
        assert need[len("rpmlib("):-1] in RPMLIB_4_11, need
    spec = open(os.path.join(ROOT, "rpm", "container-healthcheck.spec")).read()
    assert "%define _binary_payload w9.gzdio" in spec and "%define _source_payload w9.gzdio" in spec


STUBS = {
    # Logging stubs: each appends its argv to /stub-calls. systemctl is-active answers from
    # /stub-state/active, as a running or stopped service would.
    "usr/bin/systemctl": """#!/bin/sh
echo "systemctl $*" >> /stub-calls
case "$*" in *is-active*) [ -f /stub-state/active ] && exit 0; exit 3 ;; esac
exit 0
""",
    "usr/bin/getent": """#!/bin/sh
echo "getent $*" >> /stub-calls
grep "^$2:" "/etc/$1"
""",
    "usr/sbin/groupadd": """#!/bin/sh
echo "groupadd $*" >> /stub-calls
for name; do :; done
echo "$name:x:$((900 + $(wc -l < /etc/group))):" >> /etc/group
""",
    "usr/sbin/useradd": """#!/bin/sh
echo "useradd $*" >> /stub-calls
for name; do :; done
id=$((900 + $(wc -l < /etc/passwd)))
gid=$(grep "^$name:" /etc/group | cut -d: -f3)
echo "$name:x:$id:${gid:-$id}::/var/log/$name:/sbin/nologin" >> /etc/passwd
""",
    "usr/sbin/usermod": """#!/bin/sh
echo "usermod $*" >> /stub-calls
""",
}


class ScratchRoot(object):
    """A busybox root where `rpm --root` really runs scriptlets (chrooted into it)."""

    def __init__(self, path):
        self.path = path
        for folder in ("bin", "usr/bin", "usr/sbin", "etc", "dev", "tmp", "var/tmp", "var/log", "stub-state"):
            (path / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy("/bin/busybox", str(path / "bin" / "busybox"))
        for applet in ("sh", "cat", "chown", "cut", "grep", "ls", "mkdir", "rm", "touch", "wc", "sed", "test", "["):
            os.symlink("busybox", str(path / "bin" / applet))
        os.mknod(str(path / "dev" / "null"), 0o666 | 0o020000, os.makedev(1, 3))
        (path / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (path / "etc" / "group").write_text("root:x:0:\n")
        for name, text in STUBS.items():
            (path / name).write_text(text)
            (path / name).chmod(0o755)
        run("rpm", "--root", str(path), "--initdb")

    def rpm(self, *args):
        self.calls_seen = self.calls()
        extra = ("--ignorearch",) if args[0] in ("-i", "-U") else ()
        return run("rpm", "--root", str(self.path), "--nodeps", *(extra + args))

    def calls(self):
        log = self.path / "stub-calls"
        return log.read_text().splitlines() if log.exists() else []

    def new_calls(self):
        return self.calls()[len(self.calls_seen):]

    def running(self, yes):
        flag = self.path / "stub-state" / "active"
        if yes:
            flag.touch()
        elif flag.exists():
            flag.unlink()

    def owner(self, relative):
        uid = os.stat(str(self.path / relative)).st_uid
        for line in (self.path / "etc" / "passwd").read_text().splitlines():
            if int(line.split(":")[2]) == uid:
                return line.split(":")[0]
        return uid


@pytest.fixture
def scratch(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("rpm --root runs scriptlets chrooted: needs root (CI runs as root)")
    if not os.path.exists("/bin/busybox"):
        pytest.fail("busybox missing (apt-get install busybox-static)")
    return ScratchRoot(tmp_path / "root")


def systemctl(calls):
    return [c for c in calls if c.startswith("systemctl ") and "is-active" not in c]


def test_fresh_install_runs_every_scriptlet(rpms, scratch):
    scratch.rpm("-i", rpms["current"])
    calls = scratch.new_calls()
    assert "groupadd -r docker" in calls and "groupadd -r %s" % NAME in calls
    assert any(c.startswith("useradd -r -g %s -G docker" % NAME) for c in calls), calls
    assert systemctl(calls) == ["systemctl daemon-reload", "systemctl enable %s.service" % NAME,
                                "systemctl daemon-reload"], calls
    assert scratch.owner("var/log/%s" % NAME) == NAME
    assert not (scratch.path / "var/lib/rpm-state" / NAME).exists()


def test_upgrade_over_the_go_tools_package(rpms, scratch):
    scratch.rpm("-i", rpms["go"])
    assert systemctl(scratch.new_calls()) == ["systemctl daemon-reload"]  # the Go tool's only scriptlet
    # The Go tool ran as root and wrote its logs; the operator edited OPTS; the service runs.
    logdir = scratch.path / "var/log" / NAME
    for name in ("container-healthcheck.log", "gin-stdout.log", "console.log"):
        (logdir / name).write_text("old lines\n")
    conf = scratch.path / "etc/sysconfig" / NAME
    edited = conf.read_text().replace("-level info", "-level warn").replace("4246", "4247")
    conf.write_text(edited)
    scratch.running(True)

    scratch.rpm("-U", rpms["current"])
    calls = systemctl(scratch.new_calls())
    # In %posttrans, once the old package is gone: daemon-reload, rsyslog forgets the Go rule,
    # then the restart. Nothing enables the service: the operator's choice stands.
    assert calls == ["systemctl daemon-reload", "systemctl try-restart rsyslog.service",
                     "systemctl restart %s.service" % NAME], calls
    assert conf.read_text() == edited
    assert not (scratch.path / "usr/local/bin" / NAME).exists()
    assert not (scratch.path / "etc/rsyslog.d" / ("%s.conf" % NAME)).exists()
    unit = (scratch.path / "usr/lib/systemd/system" / ("%s.service" % NAME)).read_text()
    assert "ExecStart=/usr/bin/container-healthcheck serve $OPTS" in unit and "/usr/local/bin" not in unit
    for name in ("container-healthcheck.log", "gin-stdout.log", "console.log"):
        assert scratch.owner("var/log/%s/%s" % (NAME, name)) == NAME, name
    assert scratch.owner("var/log/%s" % NAME) == NAME
    assert not (scratch.path / "var/lib/rpm-state" / NAME).exists()
    from healthcheck import __version__
    assert __version__ in run("rpm", "--root", str(scratch.path), "-q", NAME)


def test_upgrade_over_the_go_tool_that_was_stopped_does_not_start_it(rpms, scratch):
    scratch.rpm("-i", rpms["go"])
    scratch.running(False)
    scratch.rpm("-U", rpms["current"])
    calls = systemctl(scratch.new_calls())
    assert calls == ["systemctl daemon-reload", "systemctl try-restart rsyslog.service"], calls


@pytest.mark.parametrize("running", [True, False])
def test_upgrade_2x_to_2y_restarts_a_running_service_only(rpms, scratch, running):
    scratch.rpm("-i", rpms["current"])
    conf = scratch.path / "etc/sysconfig" / NAME
    edited = conf.read_text().replace("-port 4246", "-port 4248")
    conf.write_text(edited)
    scratch.running(running)
    scratch.rpm("-U", rpms["newer"])
    calls = systemctl(scratch.new_calls())
    # The old 2.x's %postun still runs its own daemon-reload and try-restart (its scriptlet,
    # not ours); ours acts in %posttrans, after it.
    ours = ["systemctl daemon-reload"] + (["systemctl restart %s.service" % NAME] if running else [])
    assert calls[-len(ours):] == ours, calls
    assert sum(c == "systemctl restart %s.service" % NAME for c in calls) == (1 if running else 0), calls
    assert conf.read_text() == edited
    assert NEWER in run("rpm", "--root", str(scratch.path), "-q", NAME)


def test_erase_stops_and_disables(rpms, scratch):
    scratch.rpm("-i", rpms["current"])
    scratch.running(True)
    scratch.rpm("-e", NAME)
    calls = systemctl(scratch.new_calls())
    assert calls == ["systemctl --no-reload disable %s.service" % NAME, "systemctl stop %s.service" % NAME,
                     "systemctl daemon-reload"], calls
    assert not (scratch.path / "usr/bin" / NAME).exists()
    assert not (scratch.path / "usr/lib" / NAME).exists()
    assert "not installed" in run("rpm", "--root", str(scratch.path), "-q", NAME, check=False)


def test_unit_passes_systemd_analyze_verify(rpms, tmp_path):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze missing")
    root = _install(tmp_path, rpms["current"])
    unit = (root / "usr/lib/systemd/system/container-healthcheck.service").read_text()
    for line in ("EnvironmentFile=-/etc/sysconfig/container-healthcheck",
                 "ExecStart=/usr/bin/container-healthcheck serve $OPTS", "Restart=always",
                 "NoNewPrivileges=yes", "ProtectSystem=full", "ProtectHome=yes", "PrivateTmp=yes",
                 "SupplementaryGroups=docker", "User=container-healthcheck"):
        assert line in unit.splitlines(), line
    # verify checks that ExecStart exists: point it at the installed launcher.
    check_dir = tmp_path / "verify"
    check_dir.mkdir()
    path = check_dir / "container-healthcheck.service"
    path.write_text(unit.replace("/usr/bin/container-healthcheck", str(root / "usr/bin/container-healthcheck")))
    proc = subprocess.run(["systemd-analyze", "verify", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, universal_newlines=True, timeout=60)
    problems = [line for line in proc.stdout.splitlines() if "container-healthcheck.service" in line]
    assert proc.returncode == 0 and not problems, proc.stdout


# Names vermin flags in the bundle that are guarded there, each checked by reading the code:
# bottle's Python 2 branches; cheroot's hasattr(socket, "SO_REUSEPORT_LB"); more_itertools
# and prometheus_client behind version checks; importlib.metadata and typing.Protocol behind
# try/except ImportError with the bundled importlib_metadata / typing_extensions as fallback.
GUARDED = ("urlparse", "ConfigParser", "ConfigParser.ConfigParser", "socket.SO_REUSEPORT_LB",
           "itertools.pairwise", "typing.Literal", "importlib.metadata", "typing.Protocol")


def test_python36_compatibility_of_code_and_bundle(rpms, tmp_path):
    root = _install(tmp_path, rpms["current"])
    lib = root / "usr/lib/container-healthcheck"
    vermin = os.path.join(os.path.dirname(sys.executable), "vermin")
    excludes = [arg for name in GUARDED for arg in ("--exclude", name)]
    # healthcheck/ with no exclusions at all.
    proc = subprocess.run([vermin, "-t=3.6-", "--violations", "--no-tips", "--eval-annotations",
                           os.path.join(ROOT, "healthcheck"), str(lib / "__main__.py")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    # typing_extensions exists to guard newer typing names, so vermin is not run on it.
    bundle = [str(lib / name) for name in ("bottle.py", "cheroot", "prometheus_client", "jaraco",
                                           "more_itertools", "importlib_metadata", "zipp.py")]
    proc = subprocess.run([vermin, "-t=3.6-", "--violations", "--no-tips", "--eval-annotations",
                           "--exclude-regex", r"/test/"] + excludes + bundle,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    # Syntax: every bundled file parses with the Python 3.6 grammar.
    import ast
    for folder, _, names in os.walk(str(lib)):
        for name in names:
            if name.endswith(".py") and "/test" not in folder:
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    ast.parse(handle.read(), path, feature_version=(3, 6))


def test_bundle_has_the_36_backports(rpms):
    files = set(run("rpm", "-qpl", rpms["current"]).split())
    for path in ("/usr/lib/container-healthcheck/importlib_metadata/__init__.py",
                 "/usr/lib/container-healthcheck/zipp.py", "/usr/lib/container-healthcheck/typing_extensions.py"):
        assert path in files, path
