import os
import subprocess

import pytest

from support import Docker


def _docker_answers():
    try:
        return subprocess.run(["docker", "info"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def docker_engine():
    """A real Docker engine (make test starts one). Missing in CI is a failure, not a skip."""
    if not _docker_answers():
        if os.environ.get("CI"):
            pytest.fail("no Docker engine at DOCKER_HOST=%s" % os.environ.get("DOCKER_HOST"))
        pytest.skip("no Docker engine (run make test)")
    return os.environ.get("DOCKER_HOST", "")


@pytest.fixture
def docker(docker_engine):
    helper = Docker()
    yield helper
    helper.cleanup()
