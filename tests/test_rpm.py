"""The RPM, with real rpm tools: contents, requires, scriptlets, a scratch-root install that
serves against the real Docker engine, upgrades that keep an edited sysconfig, erase."""
import os
import shutil
import subprocess
import sys

import pytest

from support import ROOT, free_port, get_json, name_for, unique_app, wait_for

pytestmark = pytest.mark.docker
SPEC_GO_TOOL = os.path.join(ROOT, "tests", "fixtures", "rpm", "go-tool.spec")


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
    newer = build(tmp_path_factory.mktemp("rpm-newer"), "2.0.1")
    go_top = tmp / "go"
    run("rpmbuild", "-bb", "--define", "_topdir %s" % go_top, SPEC_GO_TOOL)
    go_tool = str(go_top / "RPMS" / "noarch" / "container-healthcheck-1.0.1-1.noarch.rpm")
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


def test_requires(rpms):
    requires = run("rpm", "-qpR", rpms["current"])
    assert "python3 >= 3.6" in requires
    assert "docker" not in requires and "moby" not in requires


def test_scriptlets(rpms):
    scripts = run("rpm", "-qp", "--scripts", rpms["current"])
    assert "useradd -r -g container-healthcheck -G docker" in scripts
    assert "groupadd -r docker" in scripts
    assert "systemctl enable container-healthcheck.service" in scripts
    assert "systemctl try-restart container-healthcheck.service" in scripts
    assert "disable container-healthcheck.service" in scripts and "systemctl stop" in scripts
    # each scriptlet is valid sh
    for tag in ("PREIN", "POSTIN", "PREUN", "POSTUN"):
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
    assert "2.0.0" in run(launcher, "--version")
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


def test_upgrade_over_the_go_tool_and_again_keeps_the_edited_sysconfig(rpms, tmp_path):
    root = _install(tmp_path, rpms["go"])
    conf = root / "etc/sysconfig/container-healthcheck"
    edited = 'OPTS="-level warn -prefix /container-healthcheck -port 4247 -ngx-port 0"\n'
    conf.write_text(edited)
    _install(tmp_path, rpms["current"], upgrade=True)
    assert conf.read_text() == edited
    assert "2.0.0" in run("rpm", "--root", str(root), "-q", "container-healthcheck")
    assert "go tool" not in (root / "usr/bin/container-healthcheck").read_text()
    assert (root / "usr/lib/container-healthcheck/healthcheck/cli.py").exists()
    edited_again = edited.replace("4247", "4248")
    conf.write_text(edited_again)
    _install(tmp_path, rpms["newer"], upgrade=True)
    assert conf.read_text() == edited_again
    assert "2.0.1" in run("rpm", "--root", str(root), "-q", "container-healthcheck")
    run("rpm", "--root", str(root), "-e", "--nodeps", "--noscripts", "container-healthcheck")
    assert not (root / "usr/bin/container-healthcheck").exists()
    assert not (root / "usr/lib/container-healthcheck").exists()
    assert "not installed" in run("rpm", "--root", str(root), "-q", "container-healthcheck", check=False)


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
    problems = [l for l in proc.stdout.splitlines() if "container-healthcheck.service" in l]
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
