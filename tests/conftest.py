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


# The order of the files, for `make test`'s workers (each file whole on one worker, handed out
# in this order, one to each worker at the start, more as a worker runs low): the two e2e
# files (the longest by far, each on APPO addresses of its own) start on workers of their own;
# the third worker takes the other slow files meanwhile.
_ORDER = ("test_e2e_balancer.py", "test_e2e_loss.py", "test_reliability.py", "test_cli.py", "test_openapi.py",
          "test_prober.py", "test_rpm.py", "test_locale.py")


def pytest_collection_modifyitems(items):
    """The docker marker on exactly the tests that need an engine: those that use the
    docker_engine fixture, directly or through another fixture (`-m "not docker"` runs
    the rest in seconds). The files in _ORDER first, in that order."""
    for item in items:
        if "docker_engine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.docker)
    rank = {name: number for number, name in enumerate(_ORDER)}
    items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(_ORDER)))


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
