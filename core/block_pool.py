"""The block pool: fixed-size token blocks with reference counts, a content-addressed index and
an O(1) free queue (the shape of vLLM v1's ``block_pool.py``). Bookkeeping only — no MLX here:
a block's ``payload`` is whatever the model's cache API produced for it.

- A block is *used* while its reference count is above zero (a running request reserved it, or a
  lookup pinned it) and *free* otherwise. ``used + free == total`` always.
- A full block that was filled with KV data carries its chained hash and stays in the index while
  free: it is *evictable*, and a later prompt with the same prefix finds it again (``touch``).
- Allocation takes blank free blocks first; when none is left it evicts the evictable block the
  eviction policy ranks lowest. Referenced blocks are never evicted.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .eviction import EntryStats, EvictionPolicy

BlockHash = bytes


def root_hash(*parts: str) -> BlockHash:
    """The seed of a hash chain: model fingerprint, block size, cache layout."""
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).digest()


def hash_block(parent: BlockHash, tokens: Sequence[int]) -> BlockHash:
    """Chained hash of one full block: its parent's hash and its own token ids."""
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


def hash_blocks(root: BlockHash, tokens: Sequence[int], block_tokens: int) -> list[BlockHash]:
    """Hashes of every full block of ``tokens``, each chained to the one before."""
    out: list[BlockHash] = []
    parent = root
    for start in range(0, len(tokens) - block_tokens + 1, block_tokens):
        parent = hash_block(parent, tokens[start : start + block_tokens])
        out.append(parent)
    return out


class PoolExhausted(RuntimeError):
    """Not enough free blocks, even after evicting every unreferenced cached block."""


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    parent: BlockHash | None = None
    depth: int = 0  # position in its chain (0 = the first block of a prompt)
    tokens: tuple[int, ...] = ()
    payload: Any = None
    created: float = 0.0
    last_used: float = 0.0
    uses: int = 0
    agents: set[str] = field(default_factory=set)
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None

    def stats(self) -> EntryStats:
        return EntryStats(
            key=self.block_hash.hex() if self.block_hash else f"blank-{self.block_id}",
            tokens=0,
            nbytes=0,
            created=self.created,
            last_used=self.last_used,
            uses=self.uses,
            shared=len(self.agents) > 1,
            depth=self.depth,
        )


class FreeBlockQueue:
    """A doubly linked list threaded through the blocks: O(1) append, popleft and remove."""

    def __init__(self, blocks: Iterable[KVBlock] = ()) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-2)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def append(self, block: KVBlock) -> None:
        last = self._tail.prev_free
        assert last is not None and block.prev_free is None and block.next_free is None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self._len += 1

    def popleft(self) -> KVBlock:
        if not self._len:
            raise IndexError("pop from an empty free queue")
        block = self._head.next_free
        assert block is not None
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        assert prev is not None and nxt is not None, "block is not in the free queue"
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self._len -= 1


class BlockPool:
    """``num_blocks`` blocks of ``block_tokens`` tokens; ``block_bytes`` each for the loaded model."""

    def __init__(self, num_blocks: int, block_tokens: int, block_bytes: int, policy: EvictionPolicy) -> None:
        self.block_tokens = block_tokens
        self.block_bytes = block_bytes
        self.policy = policy
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._blank = FreeBlockQueue(self.blocks)  # free, holding nothing worth keeping
        self._evictable = FreeBlockQueue()  # free, cached: found again by hash until evicted
        self._index: dict[BlockHash, KVBlock] = {}
        self._children: dict[BlockHash, set[BlockHash]] = {}  # parent → cached blocks that follow it
        self.evictions = 0

    # --- accounting ---------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self._blank) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._index)

    @property
    def pressure(self) -> float:
        """Share of blocks referenced by running requests or pinned (0.0–1.0)."""
        return self.num_used / self.num_blocks if self.blocks else 1.0

    @property
    def cached_bytes(self) -> int:
        return self.num_cached * self.block_bytes

    # --- lookup -------------------------------------------------------------------------------

    def get(self, block_hash: BlockHash) -> KVBlock | None:
        return self._index.get(block_hash)

    def longest_prefix(self, hashes: Sequence[BlockHash]) -> list[KVBlock]:
        """The cached blocks of the longest prefix of ``hashes`` (chains: stop at the first miss)."""
        out: list[KVBlock] = []
        for h in hashes:
            block = self._index.get(h)
            if block is None:
                break
            out.append(block)
        return out

    def children(self, parent: BlockHash) -> list[KVBlock]:
        """Cached blocks whose chain continues ``parent`` (for partial matches inside a block)."""
        return [self._index[h] for h in self._children.get(parent, ())]

    # --- references ---------------------------------------------------------------------------

    def touch(self, blocks: Iterable[KVBlock], agent: str | None = None) -> None:
        """Take a reference on cached blocks (a hit): they cannot be evicted until released."""
        now = time.monotonic()
        for block in blocks:
            if block.ref_cnt == 0:
                self._evictable.remove(block)
            block.ref_cnt += 1
            block.uses += 1
            block.last_used = now
            if agent is not None:
                block.agents.add(agent)

    def allocate(self, n: int) -> list[KVBlock]:
        """``n`` blocks with one reference each; evicts cached free blocks as needed."""
        if n > self.num_free:
            raise PoolExhausted(f"{n} blocks wanted, {self.num_free} of {self.num_blocks} free")
        out = []
        now = time.monotonic()
        for _ in range(n):
            block = self._blank.popleft() if len(self._blank) else self._evict_one()
            block.ref_cnt = 1
            block.created = block.last_used = now
            out.append(block)
        return out

    def release(self, blocks: Sequence[KVBlock]) -> None:
        """Drop one reference from each block (tails first, so chains end before they start)."""
        now = time.monotonic()
        for block in reversed(blocks):
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block {block.block_id} released more often than referenced")
            block.ref_cnt -= 1
            block.last_used = now
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    self._evictable.append(block)
                else:
                    block.payload = None
                    self._blank.append(block)

    # --- content ------------------------------------------------------------------------------

    def fill(
        self,
        block: KVBlock,
        block_hash: BlockHash,
        payload: Any,
        depth: int,
        agent: str | None = None,
        *,
        parent: BlockHash | None = None,
        tokens: tuple[int, ...] = (),
    ) -> KVBlock:
        """Make a referenced block hold the KV data of the chain position ``block_hash``.

        If another block already holds that hash (two requests computed the same block), the
        existing one is kept; the caller's reference moves to it and the given block goes blank.
        """
        assert block.ref_cnt > 0 and block.block_hash is None, "fill a reserved, blank block"
        existing = self._index.get(block_hash)
        if existing is not None:
            self.touch([existing], agent)
            self.release([block])
            return existing
        block.block_hash, block.payload, block.depth = block_hash, payload, depth
        block.parent, block.tokens, block.uses = parent, tokens, 1
        if agent is not None:
            block.agents.add(agent)
        self._index[block_hash] = block
        if parent is not None:
            self._children.setdefault(parent, set()).add(block_hash)
        return block

    def discard(self, block_hash: BlockHash) -> bool:
        """Drop a cached block nobody references (its owner was deleted); False if it is in use."""
        block = self._index.get(block_hash)
        if block is None or block.ref_cnt > 0:
            return False
        self._evictable.remove(block)
        self._forget(block)
        self._blank.append(block)
        return True

    def _evict_one(self) -> KVBlock:
        victim = min(self._evictable, key=lambda b: self.policy.priority(b.stats()))
        self._evictable.remove(victim)
        self._forget(victim)
        self.evictions += 1
        return victim

    def _forget(self, victim: KVBlock) -> None:
        """Unindex a free block and clear what it held."""
        del self._index[victim.block_hash]  # type: ignore[arg-type]
        if victim.parent is not None:
            siblings = self._children.get(victim.parent)
            if siblings is not None:
                siblings.discard(victim.block_hash)  # type: ignore[arg-type]
                if not siblings:
                    del self._children[victim.parent]
        victim.block_hash, victim.payload, victim.uses, victim.depth = None, None, 0, 0
        victim.parent, victim.tokens = None, ()
        victim.agents.clear()

    def check(self) -> None:
        """Assert the pool's invariants (tests call this after every operation)."""
        assert self.num_used + self.num_free == self.num_blocks
        in_free = {b.block_id for b in self._blank} | {b.block_id for b in self._evictable}
        assert len(in_free) == self.num_free
        for block in self.blocks:
            assert (block.block_id in in_free) == (block.ref_cnt == 0), block
            if block.block_hash is not None:
                assert self._index[block.block_hash] is block
        assert all(b.block_hash is not None for b in self._evictable)
        for parent, kids in self._children.items():
            assert kids and all(self._index[h].parent == parent for h in kids)
        assert all(b.block_hash is None for b in self._blank)
