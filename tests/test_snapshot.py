"""Single-flight, TTL, invalidation and staleness of the shared container list."""
import threading
import time

import pytest

from healthcheck.errors import DockerTimeout, DockerUnreachable
from healthcheck.snapshot import Snapshotter


class Fetch(object):
    """A docker ps stand-in: counts calls, can be slow or fail."""

    def __init__(self, delay_s=0.0):
        self.calls = 0
        self.delay_s = delay_s
        self.error = None
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
            n = self.calls
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return ["list %d" % n]


@pytest.fixture
def make():
    made = []

    def build(fetch, **kwargs):
        snapshotter = Snapshotter(fetch, **kwargs).start()
        made.append(snapshotter)
        return snapshotter
    yield build
    for snapshotter in made:
        snapshotter.stop()


def test_concurrent_requests_share_one_docker_call(make):
    fetch = Fetch(delay_s=0.3)
    snapshotter = make(fetch, refresh_s=30)
    results = []
    threads = [threading.Thread(target=lambda: results.append(snapshotter.get())) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 50
    assert fetch.calls == 1
    assert all(snap.containers == ["list 1"] and stale is None for snap, stale in results)


def test_refresh_zero_asks_docker_again_but_coalesces(make):
    fetch = Fetch(delay_s=0.05)
    snapshotter = make(fetch, refresh_s=0)
    first, _ = snapshotter.get()
    second, _ = snapshotter.get()
    assert second.generation > first.generation
    threads = [threading.Thread(target=snapshotter.get) for _ in range(40)]
    before = fetch.calls
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 40 concurrent requests need at most two calls: the one in flight and the next.
    assert 1 <= fetch.calls - before <= 3


def test_ttl_reuses_then_refreshes(make):
    fetch = Fetch()
    snapshotter = make(fetch, refresh_s=0.4)
    first, _ = snapshotter.get()
    assert snapshotter.get()[0] is first
    time.sleep(0.5)
    assert snapshotter.get()[0].generation > first.generation


def test_invalidate_forces_a_newer_list(make):
    fetch = Fetch()
    snapshotter = make(fetch, refresh_s=60)
    first, _ = snapshotter.get()
    snapshotter.invalidate()
    second, _ = snapshotter.get()
    assert second.generation > first.generation
    assert second.started_at >= first.finished_at


def test_failure_serves_stale_then_raises(make):
    fetch = Fetch()
    snapshotter = make(fetch, refresh_s=0.1, max_stale_s=0.8, retry_s=0.05)
    good, _ = snapshotter.get()
    fetch.error = DockerUnreachable("daemon down")
    time.sleep(0.3)
    snap, stale = snapshotter.get()
    assert snap is good and stale is not None and 0.1 < stale <= 0.8
    time.sleep(0.8)
    with pytest.raises(DockerUnreachable):
        snapshotter.get()
    fetch.error = None
    time.sleep(0.3)
    snap, stale = snapshotter.get()
    assert stale is None and snap.generation > good.generation


def test_hanging_docker_bounds_the_wait(make):
    fetch = Fetch()
    snapshotter = make(fetch, refresh_s=0.1, max_stale_s=0.0, wait_s=0.5)
    snapshotter.get()
    fetch.delay_s = 3
    time.sleep(0.2)
    started = time.monotonic()
    with pytest.raises(DockerTimeout):
        snapshotter.get()
    assert time.monotonic() - started < 1.5
