"""Single-flight, TTL, invalidation and staleness of the shared container list.

Where time is the subject, a fake clock moves it; the fetcher thread still runs for real."""
import threading
import time

import pytest

from healthcheck.errors import DockerTimeout, DockerUnreachable
from healthcheck.snapshot import Snapshotter
from support import FakeClock, until


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
    start_together = threading.Barrier(40)

    def request():
        start_together.wait()
        snapshotter.get()
    threads = [threading.Thread(target=request) for _ in range(40)]
    before = fetch.calls
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # 40 requests arriving together need at most two calls: the first one begun for them, and
    # one more for those that arrived after it began.
    assert 1 <= fetch.calls - before <= 2


def test_ttl_reuses_then_refreshes(make):
    fetch, clock = Fetch(), FakeClock()
    snapshotter = make(fetch, refresh_s=2, clock=clock)
    first, _ = snapshotter.get()
    clock.now += 1.9
    assert snapshotter.get()[0] is first
    clock.now += 0.2
    assert snapshotter.get()[0].generation > first.generation


def test_events_up_means_a_slow_safety_refresh_instead_of_the_ttl(make):
    fetch, clock = Fetch(), FakeClock()
    snapshotter = make(fetch, refresh_s=2, safety_refresh_s=60, clock=clock)
    snapshotter.set_events_up(True)
    first, _ = snapshotter.get()
    calls = fetch.calls
    clock.now += 30  # within the safety refresh: the answer is the same list, docker not asked
    assert snapshotter.get()[0] is first and fetch.calls == calls
    snapshotter.invalidate()  # an event: the next answer comes from a newer list
    second, _ = snapshotter.get()
    assert second.generation > first.generation
    clock.now += 61
    assert snapshotter.get()[0].generation > second.generation
    snapshotter.set_events_up(False)  # the stream ended: the TTL keeps answers fresh again
    third, _ = snapshotter.get()
    clock.now += 2.1
    assert snapshotter.get()[0].generation > third.generation


def test_failure_serves_stale_then_raises(make):
    fetch, clock = Fetch(), FakeClock()
    snapshotter = make(fetch, refresh_s=0.1, max_stale_s=0.8, retry_s=0.05, clock=clock)
    good, _ = snapshotter.get()
    fetch.error = DockerUnreachable("daemon down")
    clock.now += 0.3
    snap, stale = snapshotter.get()
    assert snap is good and stale == pytest.approx(0.3)
    clock.now += 0.8
    with pytest.raises(DockerUnreachable):
        snapshotter.get()
    fetch.error = None
    clock.now += 0.1

    def fresh_again():
        try:
            return snapshotter.get()[1] is None
        except DockerUnreachable:
            return False
    assert until(fresh_again)
    assert snapshotter.get()[0].generation > good.generation


def test_hanging_docker_bounds_the_wait(make):
    fetch = Fetch()
    snapshotter = make(fetch, refresh_s=0.1, max_stale_s=0.0, wait_s=0.5)
    snapshotter.get()
    fetch.delay_s = 3
    assert until(lambda: snapshotter.age_s() > 0.1)  # the list is due for a refresh: docker is asked, and hangs
    started = time.monotonic()
    with pytest.raises(DockerTimeout):
        snapshotter.get()
    assert time.monotonic() - started < 1.5
