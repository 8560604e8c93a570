"""Eviction policies: small objects that order cache entries; the lowest priority goes first."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class EntryStats:
    """What a policy may look at. Times are ``time.monotonic()`` seconds."""

    key: str
    tokens: int
    nbytes: int
    created: float
    last_used: float
    uses: int
    shared: bool = False  # used by more than one agent (e.g. a common system prompt)
    depth: int = 0  # a block's position in its prompt (0 = first); deeper blocks depend on earlier


class EvictionPolicy(Protocol):
    def priority(self, entry: EntryStats) -> Any:
        """A sortable value; entries with the lowest value are evicted first."""


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """``factory()`` makes a fresh policy object for one store."""

    name: str
    factory: Callable[[], EvictionPolicy]
    description: str = ""
