"""The block pool's accounting under any sequence of operations (hypothesis stateful tests)."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule

from semantic.block_pool import BlockPool, FreeBlockQueue, KVBlock, PoolExhausted, hash_blocks, root_hash
from semantic.plugins.eviction import LFU, LRU

ROOT = root_hash("model", "4")


class PoolMachine(RuleBasedStateMachine):
    """Requests reserve blocks, fill them with prompt blocks, release them; lookups pin hits."""

    held = Bundle("held")

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(8, 4, 100, LRU())
        self.referenced: dict[int, int] = {}  # block id → references we hold
        self.filled: dict[bytes, tuple[int, ...]] = {}  # hash → tokens of the chain up to it

    def _ref(self, blocks, delta):
        for b in blocks:
            self.referenced[b.block_id] = self.referenced.get(b.block_id, 0) + delta

    @rule(target=held, n=st.integers(1, 4))
    def allocate(self, n):
        if n > self.pool.num_free:
            with pytest.raises(PoolExhausted):
                self.pool.allocate(n)
            return []
        blocks = self.pool.allocate(n)
        assert all(b.block_hash is None and b.ref_cnt == 1 for b in blocks)
        self._ref(blocks, +1)
        return blocks

    @rule(blocks=held, prompt=st.lists(st.integers(0, 2), min_size=4, max_size=16))
    def fill_and_release(self, blocks, prompt):
        """A finished request: its full prompt blocks fill its reserved blocks, then all go."""
        live = [b for b in blocks if b.ref_cnt > 0 and self.referenced.get(b.block_id, 0) > 0 and b.block_hash is None]
        if len(live) != len(blocks):
            return  # this reservation was already released
        hashes = hash_blocks(ROOT, prompt, 4)
        kept = []
        for depth, (block, h) in enumerate(zip(live, hashes)):
            parent = hashes[depth - 1] if depth else ROOT
            got = self.pool.fill(block, h, ("kv", h), depth, parent=parent, tokens=tuple(prompt[4 * depth : 4 * depth + 4]))
            if got is not block:
                self._ref([block], -1)
                self._ref([got], +1)
            kept.append(got)
            self.filled[h] = tuple(prompt[: 4 * (depth + 1)])
        rest = live[len(kept):]
        self.pool.release(kept + rest)
        self._ref(kept + rest, -1)

    @rule(prompt=st.lists(st.integers(0, 2), max_size=16))
    def lookup(self, prompt):
        hashes = hash_blocks(ROOT, prompt, 4)
        hits = self.pool.longest_prefix(hashes)
        for block, h in zip(hits, hashes):
            assert block.block_hash == h and block.payload == ("kv", h)
        # exactly the inserted prefix: the next block, if any, is not cached
        if len(hits) < len(hashes):
            assert self.pool.get(hashes[len(hits)]) is None
        self.pool.touch(hits, agent="x")
        self.pool.release(hits)
        parent = hashes[len(hits) - 1] if hits else ROOT
        for child in self.pool.children(parent):  # partial matches continue the matched chain
            assert child.parent == parent and self.filled[child.block_hash][: 4 * len(hits)] == tuple(prompt[: 4 * len(hits)])

    @rule(prompt=st.lists(st.integers(0, 2), min_size=4, max_size=16))
    def discard(self, prompt):
        """An agent was deleted: its cached blocks go blank, unless a request holds them."""
        for h in hash_blocks(ROOT, prompt, 4):
            block = self.pool.get(h)
            dropped = self.pool.discard(h)
            assert dropped == (block is not None and block.ref_cnt == 0)
            if block is not None:
                assert (self.pool.get(h) is None) == dropped
                if dropped:
                    assert block.payload is None and not block.agents

    @invariant()
    def accounting(self):
        self.pool.check()
        for block in self.pool.blocks:  # a referenced block is never evicted or reused
            assert block.ref_cnt == self.referenced.get(block.block_id, 0)


TestPool = PoolMachine.TestCase


def test_free_queue_is_a_doubly_linked_list():
    blocks = [KVBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3]
    assert q.popleft() is blocks[0] and len(q) == 2
    q.append(blocks[2])
    assert [b.block_id for b in q] == [1, 3, 2]


def test_lru_evicts_the_least_recent_chain_tail_first():
    pool = BlockPool(4, 2, 10, LRU())
    a = hash_blocks(ROOT, [1, 1, 2, 2], 2)
    reserved = pool.allocate(2)
    pool.release([pool.fill(b, h, "kv", d) for d, (b, h) in enumerate(zip(reserved, a))])
    b_hashes = hash_blocks(ROOT, [3, 3, 4, 4], 2)
    reserved = pool.allocate(2)
    pool.release([pool.fill(b, h, "kv", d) for d, (b, h) in enumerate(zip(reserved, b_hashes))])
    pool.touch(pool.longest_prefix(a))  # chain a is used again
    pool.release(pool.longest_prefix(a))
    (fresh,) = pool.allocate(1)
    assert pool.get(b_hashes[1]) is None and pool.get(b_hashes[0]) is not None  # b's tail went first
    assert len(pool.longest_prefix(a)) == 2 and pool.evictions == 1
    pool.release([fresh])
    pool.check()


def test_lfu_keeps_blocks_that_are_reused():
    pool = BlockPool(3, 2, 10, LFU())
    shared = hash_blocks(ROOT, [9, 9], 2)
    one_off = hash_blocks(ROOT, [5, 5], 2)
    for hashes in (shared, one_off):
        (b,) = pool.allocate(1)
        pool.release([pool.fill(b, hashes[0], "kv", 0)])
    for _ in range(3):  # the shared prefix keeps being hit
        hits = pool.longest_prefix(shared)
        pool.touch(hits)
        pool.release(hits)
    pool.allocate(2)
    assert pool.get(shared[0]) is not None and pool.get(one_off[0]) is None


def test_referenced_blocks_are_never_evicted():
    pool = BlockPool(2, 2, 10, LRU())
    h = hash_blocks(ROOT, [1, 2], 2)
    (b,) = pool.allocate(1)
    pool.fill(b, h[0], "kv", 0)  # still referenced by its request
    pool.allocate(1)
    with pytest.raises(PoolExhausted):
        pool.allocate(1)
    assert pool.get(h[0]) is b


def test_hash_chains_differ_by_parent_model_and_tokens():
    a = hash_blocks(root_hash("m1", "2"), [1, 2, 3, 4], 2)
    assert a == hash_blocks(root_hash("m1", "2"), [1, 2, 3, 4, 5], 2)  # partial tail ignored
    assert a[1] != hash_blocks(root_hash("m1", "2"), [9, 9, 3, 4], 2)[1]  # same tokens, other parent
    assert a[0] != hash_blocks(root_hash("m2", "2"), [1, 2], 2)[0]  # another model
