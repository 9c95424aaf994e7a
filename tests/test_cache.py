import threading
import time

from healthcheck.cache import TTLCache


class Clock(object):
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_value_is_reused_within_ttl_and_recomputed_after():
    clock = Clock()
    cache = TTLCache(2.0, clock=clock)
    calls = []
    compute = lambda: calls.append(1) or len(calls)
    assert cache.get("a", compute) == 1
    clock.now = 1.9
    assert cache.get("a", compute) == 1
    clock.now = 2.0
    assert cache.get("a", compute) == 2


def test_single_flight_per_key():
    cache = TTLCache(10.0)
    calls = []
    gate = threading.Event()

    def slow():
        calls.append(1)
        gate.wait(2)
        return "v"
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("k", slow))) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join()
    assert results == ["v"] * 20 and len(calls) == 1


def test_bounded_entries():
    cache = TTLCache(10.0, max_entries=10)
    for i in range(100):
        cache.get(i, lambda: i)
    assert len(cache._entries) <= 10
