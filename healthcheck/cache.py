"""A small TTL cache with single-flight per key: one computation in flight per key."""
import threading
import time


class _Entry(object):
    __slots__ = ("value", "at", "done")

    def __init__(self):
        self.value = None
        self.at = None
        self.done = threading.Event()


class TTLCache(object):
    """get(key, compute) returns a value computed at most ttl_s ago; concurrent callers for
    the same key wait for the one computation in flight. compute must not raise."""

    def __init__(self, ttl_s, max_entries=4096, clock=time.monotonic, wait_s=10.0):
        self.ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._entries = {}

    def get(self, key, compute):
        entry = self._entries.get(key)
        if entry is not None and entry.at is not None and self._clock() - entry.at < self.ttl_s:
            return entry.value
        with self._lock:
            entry = self._entries.get(key)
            fresh = entry is not None and entry.at is not None and self._clock() - entry.at < self.ttl_s
            if fresh:
                return entry.value
            leader = entry is None or entry.done.is_set()
            if leader:
                if len(self._entries) >= self._max_entries:
                    self._evict()
                entry = _Entry()
                self._entries[key] = entry
        if not leader:
            if entry.done.wait(self._wait_s):
                return entry.value
            return compute()
        try:
            entry.value = compute()
            entry.at = self._clock()
        finally:
            entry.done.set()
        return entry.value

    def _evict(self):
        now = self._clock()
        for key, entry in list(self._entries.items()):
            if entry.done.is_set() and (entry.at is None or now - entry.at >= self.ttl_s):
                del self._entries[key]
        if len(self._entries) >= self._max_entries:
            self._entries.clear()
