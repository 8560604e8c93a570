"""In-memory store of finished requests' KV states, found again by longest common token prefix.

This is the walking skeleton's cache (one entry per agent); the block pool replaces its insides
with shared, hashed blocks without changing what stages ask of it. Bookkeeping only: no MLX here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from .eviction import EntryStats, EvictionPolicy
from .model import KVState


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix, by binary search on slice equality (C speed)."""
    lo, hi = 0, min(len(a), len(b))
    a, b = tuple(a[:hi]), tuple(b[:hi])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


@dataclass(slots=True)
class Entry:
    agent_id: str
    state: KVState
    created: float
    last_used: float
    uses: int = 0

    def stats(self) -> EntryStats:
        return EntryStats(
            key=self.agent_id,
            tokens=len(self.state.tokens),
            nbytes=self.state.nbytes,
            created=self.created,
            last_used=self.last_used,
            uses=self.uses,
        )


@dataclass(frozen=True, slots=True)
class Match:
    """A cached state whose first ``length`` tokens equal the prompt's."""

    state: KVState
    length: int
    agent_id: str


class KVStore:
    """Agent → its last KV state, within a byte budget enforced by an eviction policy."""

    def __init__(self, budget_bytes: int, policy: EvictionPolicy) -> None:
        self.budget_bytes = budget_bytes
        self.policy = policy
        self._entries: dict[str, Entry] = {}
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.state.nbytes for e in self._entries.values())

    def lookup(self, agent_id: str, tokens: Sequence[int]) -> Match | None:
        """The entry sharing the longest prefix with ``tokens`` (the agent's own wins ties)."""
        best: Match | None = None
        own = self._entries.get(agent_id)
        candidates = ([own] if own else []) + [e for k, e in self._entries.items() if k != agent_id]
        for entry in candidates:
            n = common_prefix_len(entry.state.tokens, tokens)
            if n and (best is None or n > best.length):
                best = Match(entry.state, n, entry.agent_id)
        if best is not None:
            hit = self._entries[best.agent_id]
            hit.last_used, hit.uses = time.monotonic(), hit.uses + 1
        return best

    def put(self, agent_id: str, state: KVState) -> list[str]:
        """Keep ``state`` as the agent's; evict by policy while over budget. Returns evicted ids."""
        now = time.monotonic()
        old = self._entries.get(agent_id)
        self._entries[agent_id] = Entry(agent_id, state, old.created if old else now, now, old.uses if old else 0)
        return self._evict(protect=agent_id)

    def get(self, agent_id: str) -> Entry | None:
        """The agent's kept state, without counting a use."""
        return self._entries.get(agent_id)

    def drop(self, agent_id: str) -> bool:
        return self._entries.pop(agent_id, None) is not None

    def agents(self) -> list[EntryStats]:
        return [e.stats() for e in self._entries.values()]

    def _evict(self, protect: str) -> list[str]:
        evicted: list[str] = []
        if self.nbytes <= self.budget_bytes:
            return evicted
        order = sorted((e for k, e in self._entries.items() if k != protect), key=lambda e: self.policy.priority(e.stats()))
        total = self.nbytes
        for entry in order:
            if total <= self.budget_bytes:
                break
            total -= entry.state.nbytes
            del self._entries[entry.agent_id]
            evicted.append(entry.agent_id)
        if total > self.budget_bytes:  # the newest state alone is over budget: keep nothing
            del self._entries[protect]
            evicted.append(protect)
        self.evictions += len(evicted)
        return evicted
