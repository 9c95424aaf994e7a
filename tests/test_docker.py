"""The docker CLI boundary: timeouts kill the whole process group, output faults are named."""
import os
import subprocess
import threading
import time

import pytest

from healthcheck import errors
from healthcheck.docker import PS_ARGS, DockerCLI
from support import FAKE_DOCKER, child_pids, wait_for


def fake(mode, timeout_s=5.0, **env):
    return DockerCLI(FAKE_DOCKER, timeout_s, env=dict(os.environ, FAKE_DOCKER_MODE=mode, **env))


def _processes_running(argv_text):
    out = subprocess.run(["pgrep", "-f", argv_text], stdout=subprocess.PIPE, universal_newlines=True).stdout
    return [int(pid) for pid in out.split()]


def _zombie_children():
    """Our own children that exited and were never reaped."""
    zombies = set()
    for pid in child_pids(os.getpid()):
        try:
            with open("/proc/%d/stat" % pid) as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    zombies.add(pid)
        except OSError:
            pass
    return zombies


def test_ok_output_parses():
    names = [c.name for c in fake("ok").list_containers()]
    assert names == ["okapp-1700000000", "downapp-1700000000"]


def test_argv_is_fixed_and_uses_a_per_field_template():
    argv = fake("ok").argv(PS_ARGS)
    assert argv[1:4] == ["ps", "-a", "--no-trunc"]
    template = argv[-1]
    assert "{{json .}}" not in template and ".State" not in template and ".Size" not in template


@pytest.mark.parametrize("mode", ["hang", "hang-with-child"])
def test_hang_is_killed_with_its_process_group_and_reaped(mode, tmp_path):
    # A sleep length no other process uses: the check sees only what this test started.
    seconds = "3%03d.%06d" % (os.getpid() % 1000, int(time.time() * 1e6) % 1000000)
    marker = "sleep " + seconds
    zombies_before = _zombie_children()
    cli = fake(mode, timeout_s=0.5, FAKE_DOCKER_SLEEP=seconds)
    seen_hanging = []
    watcher = threading.Timer(0.25, lambda: seen_hanging.extend(_processes_running(marker)))
    watcher.start()
    started = time.monotonic()
    with pytest.raises(errors.DockerTimeout) as info:
        cli.list_containers()
    watcher.join()
    assert seen_hanging, "the hanging child was never seen: the check below would prove nothing"
    assert time.monotonic() - started < 1.5
    assert info.value.code == errors.CODE_DOCKER_FAILED
    # the hung child sleeps far longer than this: one still there after 2 s was left behind
    assert wait_for(lambda: not _processes_running(marker), 2), "orphans left behind: %s" % _processes_running(marker)
    assert _zombie_children() - zombies_before == set()


@pytest.mark.parametrize("mode,error", [
    ("garbage", errors.DockerOutputError),
    ("half", errors.DockerOutputError),
    ("emptyobject", errors.DockerOutputError),
    ("exit1", errors.DockerFailed),
    ("crash", errors.DockerFailed),
    ("unreachable", errors.DockerUnreachable),
])
def test_faults_are_named(mode, error):
    with pytest.raises(error) as info:
        fake(mode).list_containers()
    assert str(info.value)


@pytest.mark.parametrize("mode, returncode", [("exit1", 1), ("crash", -11)])
def test_a_failed_cli_carries_its_exit_code_and_stderr(mode, returncode):
    with pytest.raises(errors.DockerFailed) as info:
        fake(mode).list_containers()
    assert info.value.returncode == returncode and info.value.stderr in str(info.value)


def test_empty_and_noise_are_an_empty_or_normal_list():
    assert fake("empty").list_containers() == []
    assert fake("notobject").list_containers() == []  # not a `{` line: noise
    assert len(fake("noise").list_containers()) == 2


def test_huge_output_parses():
    containers = fake("huge", timeout_s=30).list_containers()
    assert len(containers) == 100000


def test_endless_output_is_cut():
    cli = DockerCLI(FAKE_DOCKER, 5.0, env=dict(os.environ, FAKE_DOCKER_MODE="flood"), max_output_bytes=1 << 20)
    with pytest.raises(errors.DockerOutputError):
        cli.list_containers()


def test_missing_binary(tmp_path):
    with pytest.raises(errors.DockerNotFound) as info:
        DockerCLI(str(tmp_path / "no-docker")).list_containers()
    assert info.value.code == errors.CODE_DOCKER_UNREACHABLE


def test_not_executable(tmp_path):
    path = tmp_path / "docker"
    path.write_text("#!/bin/sh\necho hi\n")
    path.chmod(0o644)
    with pytest.raises(errors.DockerNotFound):
        DockerCLI(str(path)).list_containers()


def test_daemon_unreachable_with_the_real_cli(tmp_path):
    env = dict(os.environ, DOCKER_HOST="unix://%s/nothing.sock" % tmp_path)
    with pytest.raises(errors.DockerUnreachable) as info:
        DockerCLI("docker", 5.0, env=env).list_containers()
    assert info.value.code == errors.CODE_DOCKER_UNREACHABLE


def test_observer_sees_calls_and_failures():
    seen = []
    cli = DockerCLI(FAKE_DOCKER, 5.0, env=dict(os.environ, FAKE_DOCKER_MODE="exit1"),
                    observe=lambda *args: seen.append(args))
    with pytest.raises(errors.DockerFailed):
        cli.list_containers()
    assert seen[0][0] == "ps" and seen[0][2].kind == "failed"
