"""The KV cache the stages use: block pool in memory, block files on disk, per-agent tails.

``prepare`` (cache-lookup) finds the longest cached prefix of a prompt — memory blocks, then the
chain continuing on disk, then the agent's own partial tail block — hands it on as pieces
(:class:`~semantic.model.PendingJoin`, joined by decode on the MLX worker as the sequence starts),
and reserves pool blocks for the request's new tokens. ``store`` (persist) splits the finished request's new full blocks out of its KV state into
the reserved blocks, keeps its partial tail for the agent's next turn, and returns the new blocks
for the background disk writer. Models whose cache cannot be cut into blocks (sliding-window
layers) get exact-match reuse of each agent's last state instead (:class:`~semantic.kv_store.KVStore`).
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from .block_pool import BlockHash, BlockPool, KVBlock, PoolExhausted, hash_blocks, root_hash
from .disk_store import DiskStore
from .errors import ErrorKind, RequestError
from .eviction import EvictionPolicy
from .items import Generated, Tokenized
from .kv_store import KVStore, common_prefix_len
from .model import KVState, Model, PendingJoin
from .stage import Metrics
from .worker import MLXWorker

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Tail:
    """An agent's last partial block: the tokens after its last full block, and their KV."""

    parent: BlockHash
    depth: int
    tokens: tuple[int, ...]
    payload: Any


@dataclass(slots=True)
class Reservation:
    """Pool blocks held for one request's new tokens; shared by every item copy of the request."""

    blocks: list[KVBlock]

    def take(self) -> list[KVBlock]:
        blocks, self.blocks = self.blocks, []
        return blocks


@dataclass(slots=True)
class NewBlock:
    """A block persist just filled, for the disk writer (which finds its data in the pool)."""

    block_hash: BlockHash
    parent: BlockHash
    depth: int
    tokens: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Footprint:
    """What the cache holds of one agent. ``tokens``: the leading tokens of its latest state that
    a next turn would read from cache now (memory blocks, disk blocks, its partial tail)."""

    tokens: int
    memory_blocks: int
    disk_blocks: int
    memory_bytes: int
    disk_bytes: int


@dataclass(frozen=True, slots=True)
class Freed:
    """What deleting an agent gave back; blocks other agents use are kept."""

    memory_blocks: int
    disk_blocks: int
    memory_bytes: int
    disk_bytes: int
    shared_blocks_kept: int


#: Agents whose latest block chain is remembered (for the direct agent API's bookkeeping).
MAX_CHAINS = 4096


class BlockCache:
    def __init__(
        self,
        model: Model,
        *,
        block_tokens: int,
        memory_bytes: int,
        policy: EvictionPolicy,
        metrics: Metrics,
        disk: DiskStore | None = None,
    ) -> None:
        info = model.info
        self.model = model
        self.metrics = metrics
        self.block_tokens = block_tokens
        self.paged = info.pageable
        self.root = root_hash(info.fingerprint, str(block_tokens), info.cache_layout)
        block_bytes = max(1, info.kv_bytes_per_token * block_tokens)
        # An eighth of the budget holds agents' partial tail blocks; the rest is the pool.
        self.tail_budget = memory_bytes // 8
        self.pool = BlockPool((memory_bytes - self.tail_budget) // block_bytes, block_tokens, block_bytes, policy)
        self.disk = disk if self.paged else None
        self.tails: dict[str, Tail] = {}
        self.chains: OrderedDict[str, tuple[BlockHash, ...]] = OrderedDict()  # agent -> its latest state's full blocks
        self.writing: set[BlockHash] = set()  # blocks the disk writer is writing now
        self.forgotten: set[BlockHash] = set()  # of those, ones freed meanwhile: removed once written
        self.exact = None if self.paged else KVStore(memory_bytes, policy)

    # --- lookup -------------------------------------------------------------------------------

    async def prepare(self, item: Tokenized, worker: MLXWorker) -> None:
        """Attach the longest cached prefix to ``item`` and reserve blocks for what it adds."""
        if not self.paged:
            self._prepare_exact(item)
            return
        bt, prompt = self.block_tokens, item.prompt_tokens
        usable = len(prompt) - 1  # at least one prompt token is always prefilled
        hashes = hash_blocks(self.root, prompt, bt)
        pinned = self.pool.longest_prefix(hashes)
        self.pool.touch(pinned, item.agent_id)
        try:
            self._reserve(item)  # before any work: a full pool refuses at once
            pieces: list[tuple[Any, int]] = [(b.payload, bt) for b in pinned]
            from_disk = await self._load_from_disk(hashes[len(pinned) :], item.agent_id, worker, pinned)
            pieces += [(payload, bt) for payload in from_disk]
            full = len(pieces)
            parent = hashes[full - 1] if full else self.root
            rest = prompt[full * bt : usable]
            partial = self._best_partial(item.agent_id, parent, full, rest)
            if partial is not None:
                payload, n, block = partial
                pieces.append((payload, n))
                if block is not None:
                    self.pool.touch([block], item.agent_id)
                    pinned.append(block)
            while pieces and sum(n for _, n in pieces) > usable:  # a prompt that ends on a block edge
                payload, n = pieces.pop()
                over = sum(k for _, k in pieces) + n - usable
                if n > over:
                    pieces.append((payload, n - over))
            length = sum(n for _, n in pieces)
            if length:  # joined by decode on the worker, as the sequence starts
                nbytes = length * self.model.info.kv_bytes_per_token
                item.prefix = KVState(tuple(prompt[:length]), PendingJoin(tuple(pieces)), nbytes, exclusive=True)
                item.prefix_len = length
                self.metrics.inc("cache_hits")
                self.metrics.inc("cache_hit_tokens", length)
                self.metrics.inc("cache_disk_hit_blocks", len(from_disk))
            else:
                self.metrics.inc("cache_misses")
        finally:
            self.pool.release(pinned)

    def _best_partial(self, agent: str, parent: BlockHash, depth: int, rest: tuple[int, ...]) -> tuple[Any, int, KVBlock | None] | None:
        """The longest partial match inside the next block: the agent's own tail, or a cached
        block that follows the same parent (e.g. the same prompt asked again)."""
        best: tuple[Any, int, KVBlock | None] | None = None
        tail = self.tails.get(agent)
        if tail is not None and tail.depth == depth and tail.parent == parent:
            n = common_prefix_len(tail.tokens, rest)
            if n:
                best = (tail.payload, n, None)
        for block in self.pool.children(parent):
            n = common_prefix_len(block.tokens, rest)
            if n > (best[1] if best else 0):
                best = (block.payload, n, block)
        return best

    def _reserve(self, item: Tokenized) -> None:
        need = math.ceil((len(item.prompt_tokens) + item.params.max_tokens) / self.block_tokens)
        if need > self.pool.num_blocks:  # could never fit: run uncached rather than refuse for ever
            self.metrics.inc("cache_unreservable")
            return
        try:
            blocks = self.pool.allocate(need)
        except PoolExhausted:
            self.metrics.inc("rejected_pool_full")
            raise RequestError(
                ErrorKind.RATE_LIMITED,
                f"the KV cache pool is full ({self.pool.num_used} of {self.pool.num_blocks} blocks in use); retry shortly",
                retry_after=2.0,
            ) from None
        self.metrics.counters["cache_pool_pressure"] = round(self.pool.pressure, 4)
        reservation = item.cache_blocks = Reservation(blocks)
        item.request.on_done(lambda _r: self.pool.release(reservation.take()))

    async def _load_from_disk(self, hashes: list[BlockHash], agent: str, worker: MLXWorker, pinned: list[KVBlock]) -> list[Any]:
        """Continue the chain from disk: read, check, convert, and keep the blocks in the pool."""
        if self.disk is None:
            return []
        start_depth = len(pinned)
        start_parent = pinned[-1].block_hash if pinned else self.root
        chain = []
        for h in hashes:
            if not self.disk.has(h):
                break
            chain.append(h)
        payloads = []
        for depth_offset, h in enumerate(chain):
            try:
                got = await trio.to_thread.run_sync(self.disk.read, h)
                if got is not None:
                    block_toks, arrays = got
                    payload = await worker.call(self.model.kv_from_arrays, arrays)
            except Exception:  # a disk or conversion failure is a miss, never a failed request
                log.exception("reading KV block %s failed", h.hex())
                got = None
            if got is None:  # damaged (quarantined by the store) or gone: the rest is prefilled
                self.metrics.inc("cache_disk_corrupt")
                break
            payloads.append(payload)
            try:
                (block,) = self.pool.allocate(1)
            except PoolExhausted:
                continue  # used for this request only
            parent = chain[depth_offset - 1] if depth_offset else start_parent
            block = self.pool.fill(block, h, payload, start_depth + depth_offset, agent, parent=parent, tokens=block_toks)
            pinned.append(block)  # released with the others after the join
        return payloads

    def _prepare_exact(self, item: Tokenized) -> None:
        assert self.exact is not None
        match = self.exact.lookup(item.agent_id, item.prompt_tokens)
        # Sliding-window caches cannot be cut: reuse a kept state only when all of it matches.
        if match is not None and match.length == len(match.state.tokens) < len(item.prompt_tokens):
            item.prefix, item.prefix_len = match.state, match.length
            self.metrics.inc("cache_hits")
            self.metrics.inc("cache_hit_tokens", match.length)
        else:
            self.metrics.inc("cache_misses")

    # --- store --------------------------------------------------------------------------------

    async def store(self, item: Generated, worker: MLXWorker) -> list[NewBlock]:
        """Keep the finished request's KV: new full blocks into the pool, the tail per agent."""
        state = item.kv_state
        if state is None or not state.tokens:
            return []
        if not self.paged:
            assert self.exact is not None
            reused = item.prefix_len if item.prefix is not None else 0
            if item.agent_id not in self.exact.put(item.agent_id, state):
                item.cache_created_tokens = max(0, min(len(state.tokens), len(item.prompt_tokens)) - reused)
            self.metrics.counters["cache_bytes"] = self.exact.nbytes
            return []
        bt, tokens = self.block_tokens, state.tokens
        hashes = hash_blocks(self.root, tokens, bt)
        fresh = [i for i, h in enumerate(hashes) if self.pool.get(h) is None]
        tail_start = len(hashes) * bt
        bounds = [(i * bt, (i + 1) * bt) for i in fresh]
        if tail_start < len(tokens):
            bounds.append((tail_start, len(tokens)))
        payloads = await worker.call(self.model.split_kv, state, bounds) if bounds else []
        reserved = item.cache_blocks.take() if item.cache_blocks is not None else []
        filled: list[KVBlock] = []
        new: list[NewBlock] = []
        for i, payload in zip(fresh, payloads):
            if not reserved:
                try:
                    reserved = self.pool.allocate(1)
                except PoolExhausted:
                    break
            parent = hashes[i - 1] if i else self.root
            block_tokens = tuple(tokens[i * bt : (i + 1) * bt])
            block = self.pool.fill(reserved.pop(0), hashes[i], payload, i, item.agent_id, parent=parent, tokens=block_tokens)
            filled.append(block)
            new.append(NewBlock(hashes[i], parent, i, block_tokens))
            self.forgotten.discard(hashes[i])  # stored again: it stays on disk after all
        self.tails.pop(item.agent_id, None)
        self.chains[item.agent_id] = tuple(hashes)
        self.chains.move_to_end(item.agent_id)
        while len(self.chains) > MAX_CHAINS:
            self.chains.popitem(last=False)
        if tail_start < len(tokens):
            parent = hashes[-1] if hashes else self.root
            self.tails[item.agent_id] = Tail(parent, len(hashes), tuple(tokens[tail_start:]), payloads[-1])
            per_token = self.model.info.kv_bytes_per_token
            while len(self.tails) > 1 and sum(len(t.tokens) for t in self.tails.values()) * per_token > self.tail_budget:
                del self.tails[next(iter(self.tails))]  # the agent that finished longest ago
        self.pool.release(filled + reserved)
        item.cache_created_tokens = self._created(item, [b.depth for b in new], tail_start < len(tokens), tail_start)
        self.metrics.inc("cache_new_blocks", len(new))
        self.metrics.counters["cache_bytes"] = self.pool.cached_bytes
        self.metrics.counters["cache_tail_bytes"] = sum(len(t.tokens) for t in self.tails.values()) * self.model.info.kv_bytes_per_token
        self.metrics.counters["cache_blocks_used"] = self.pool.num_used
        self.metrics.counters["cache_pool_pressure"] = round(self.pool.pressure, 4)
        self.metrics.counters["cache_evictions"] = self.pool.evictions
        return new

    def _created(self, item: Generated, depths: list[int], has_tail: bool, tail_start: int) -> int:
        """Prompt tokens that are in the cache now and were not read from it."""
        lo, hi, bt = item.prefix_len if item.prefix is not None else 0, len(item.prompt_tokens), self.block_tokens
        ranges = [(d * bt, (d + 1) * bt) for d in depths] + ([(tail_start, hi)] if has_tail else [])
        return sum(max(0, min(b, hi) - max(a, lo)) for a, b in ranges)

    # --- agents -------------------------------------------------------------------------------

    def footprint(self, agent: str, chain: Sequence[BlockHash], blocks: Iterable[BlockHash]) -> Footprint:
        """How much of ``agent`` is cached: ``chain`` is its latest state's full blocks, ``blocks``
        every block it stored or read. Bookkeeping only (event loop)."""
        per_token = self.model.info.kv_bytes_per_token
        if not self.paged:
            assert self.exact is not None
            entry = self.exact.get(agent)
            n = len(entry.state.tokens) if entry is not None else 0
            return Footprint(n, 0, 0, entry.state.nbytes if entry is not None else 0, 0)
        tokens = 0
        for h in chain:
            if self.pool.get(h) is None and not (self.disk is not None and self.disk.has(h)):
                break
            tokens += self.block_tokens
        else:
            tail = self.tails.get(agent)
            if tail is not None and tail.depth == len(chain) and tail.parent == (chain[-1] if chain else self.root):
                tokens += len(tail.tokens)
        blocks = set(blocks)
        memory = sum(1 for h in blocks if self.pool.get(h) is not None)
        on_disk = [h for h in blocks if self.disk is not None and self.disk.has(h)]
        tail_bytes = len(self.tails[agent].tokens) * per_token if agent in self.tails else 0
        disk_bytes = sum(self.disk.size_of(h) for h in on_disk) if self.disk is not None else 0
        return Footprint(tokens, memory, len(on_disk), memory * self.pool.block_bytes + tail_bytes, disk_bytes)

    async def forget(self, agent: str, blocks: Iterable[BlockHash], keep: Iterable[BlockHash] = ()) -> Freed:
        """Free what only ``agent`` holds: its tail, and those of ``blocks`` that are not in
        ``keep`` (other agents' blocks), not used by another agent in memory, not in use by a
        running request and not the parent of a block that stays (chains stay whole) — in the
        pool and on disk."""
        self.chains.pop(agent, None)
        tail = self.tails.pop(agent, None)
        per_token = self.model.info.kv_bytes_per_token
        tail_bytes = len(tail.tokens) * per_token if tail is not None else 0
        if not self.paged:
            assert self.exact is not None
            entry = self.exact.get(agent)
            self.exact.drop(agent)
            return Freed(0, 0, entry.state.nbytes if entry is not None else 0, 0, 0)
        keep, mine = set(keep), set(blocks)
        free: set[BlockHash] = set()
        for h in mine:
            block = self.pool.get(h)
            if not (h in keep or (block is not None and (block.ref_cnt > 0 or block.agents - {agent}))):
                free.add(h)
        parents = {b.parent for b in self.pool.blocks if b.block_hash is not None and b.block_hash not in free}
        if self.disk is not None:
            parents |= self.disk.parents(excluding=free)
        while stay := free & parents:  # what other blocks continue from stays, and its ancestors
            free -= stay
            parents |= {self._parent(h) for h in stay}
        kept = len(mine) - len(free)
        memory = 0
        from_disk: list[BlockHash] = []
        for h in free:
            if self.pool.get(h) is not None and self.pool.discard(h):
                memory += 1
            if self.disk is not None and self.disk.has(h):
                from_disk.append(h)
        self.forgotten |= free & self.writing
        for block in self.pool.blocks:
            block.agents.discard(agent)
        disk_bytes = 0
        if self.disk is not None and from_disk:
            disk = self.disk
            disk_bytes = sum(disk.size_of(h) for h in from_disk)
            await trio.to_thread.run_sync(lambda: [disk.remove(h) for h in from_disk])
            self.metrics.counters["cache_disk_bytes"] = disk.nbytes
        self.metrics.counters["cache_bytes"] = self.pool.cached_bytes
        self.metrics.counters["cache_blocks_used"] = self.pool.num_used
        return Freed(memory, len(from_disk), memory * self.pool.block_bytes + tail_bytes, disk_bytes, kept)

    def _parent(self, block_hash: BlockHash) -> BlockHash | None:
        block = self.pool.get(block_hash)
        if block is not None:
            return block.parent
        return self.disk.parent_of(block_hash) if self.disk is not None else None
