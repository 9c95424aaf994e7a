"""BoundedCache: a map whose keys come from outside (app codes, client addresses), so it
forgets its oldest entries instead of growing without bound."""
import collections
import threading


class BoundedCache(object):
    """At most max_entries entries; writing one more forgets the least recently written.

    Reads take no lock (a dict read is atomic in CPython) so request threads never queue on
    a cache; writes do, so the bound holds under concurrent writers.
    """

    def __init__(self, max_entries):
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1: %r" % max_entries)
        self.max_entries = max_entries
        self._entries = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key, default=None):
        return self._entries.get(key, default)

    def put(self, key, value):
        """Store value under key (now the youngest entry); returns value."""
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def pop(self, key, default=None):
        with self._lock:
            return self._entries.pop(key, default)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, key):
        return key in self._entries
