"""Built-in eviction policies: ``lru`` (default) and ``lfu``."""

from __future__ import annotations

from semantic import hookimpl
from semantic.eviction import EntryStats, PolicySpec


class LRU:
    """Least recently used goes first; among equals the deepest block (a prompt's tail first)."""

    def priority(self, entry: EntryStats) -> tuple[float, int]:
        return (entry.last_used, -entry.depth)


class LFU:
    """Least often reused goes first; among equals, the least recently used.

    Keeps agents that keep coming back (and prefixes many requests share) over one-off requests.
    """

    def priority(self, entry: EntryStats) -> tuple[int, float, int]:
        return (entry.uses, entry.last_used, -entry.depth)


@hookimpl
def register_eviction_policies(register):
    register(PolicySpec("lru", LRU, "Evict the least recently used cache first."))
    register(PolicySpec("lfu", LFU, "Evict the least often reused cache first (ties: least recent)."))
