"""BoundedCache: the bound holds, the oldest written goes first, concurrent writers included."""
import threading

import pytest

from healthcheck.bounded import BoundedCache


def test_writing_past_the_bound_forgets_the_least_recently_written():
    cache = BoundedCache(3)
    for key in "abc":
        cache.put(key, key.upper())
    cache.put("a", "A2")  # rewritten: now the youngest
    cache.put("d", "D")
    assert len(cache) == 3
    assert "b" not in cache and cache.get("b") is None
    assert [cache.get(k) for k in "acd"] == ["A2", "C", "D"]
    assert cache.pop("c") == "C" and cache.pop("c", "gone") == "gone"


def test_the_bound_holds_under_concurrent_writers():
    cache = BoundedCache(100)

    def write(offset):
        for i in range(5000):
            cache.put((offset, i), i)
    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(cache) == 100


def test_a_cache_holds_at_least_one_entry():
    with pytest.raises(ValueError):
        BoundedCache(0)
