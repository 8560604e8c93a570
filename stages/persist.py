"""persist: keep the finished request's KV blocks for later turns, in memory and on disk."""

from __future__ import annotations

import logging

import trio
from pydantic import Field

from semantic import hookimpl
from semantic.block_cache import NewBlock
from semantic.items import Generated
from semantic.stage import SAME, NoSettings, Stage

log = logging.getLogger(__name__)


class PersistSettings(NoSettings):
    write_queue: int = Field(256, ge=1, description="Blocks waiting to be written; beyond it, writes are skipped.")


class Persist(Stage):
    """Puts new full blocks in the pool and the partial tail under the agent; a background task
    writes the new blocks to disk (atomic safetensors files) without holding up the pipeline."""

    name = "persist"
    takes = Generated
    gives = SAME
    Settings = PersistSettings
    description = "New KV blocks into the pool, written to disk in the background."

    async def run(self, inbox, outbox, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.setup()
        self._writes, pending = trio.open_memory_channel[NewBlock](self.settings.write_queue)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_blocks, pending)
            async with self._writes, inbox, outbox:
                async for item in inbox:
                    out = await self.guarded(item)
                    if out is not None:
                        await outbox.send(out)

    async def process(self, item: Generated) -> Generated:
        cache, worker = self.context.cache, self.context.worker
        if cache is not None and worker is not None:
            for block in await cache.store(item, worker):
                if cache.disk is None:
                    break
                try:
                    self._writes.send_nowait(block)
                except trio.WouldBlock:
                    self.context.metrics.inc("disk_writes_skipped")
        item.kv_state = None  # the cache holds what it keeps; the rest of the pipeline must not
        return item

    async def _write_blocks(self, pending: trio.MemoryReceiveChannel[NewBlock]) -> None:
        """Write queued blocks; runs until persist's inbox closes and the queue is drained.

        A block evicted before its turn is skipped; a failure writing one is logged and counted,
        never a reason to stop serving.
        """
        cache, worker, metrics = self.context.cache, self.context.worker, self.context.metrics
        async with pending:
            async for new in pending:
                if cache is None or cache.disk is None or worker is None:
                    continue
                block = cache.pool.get(new.block_hash)
                if block is None:
                    metrics.inc("disk_writes_skipped")
                    continue
                disk, payload = cache.disk, block.payload
                cache.writing.add(new.block_hash)
                try:
                    arrays = await worker.call(cache.model.kv_to_arrays, payload)
                    written = await trio.to_thread.run_sync(disk.write, new.block_hash, new.parent, new.depth, new.tokens, arrays)
                    if written:
                        await trio.to_thread.run_sync(disk.enforce_budget)
                except Exception:
                    log.exception("writing KV block %s failed", new.block_hash.hex())
                    metrics.inc("disk_write_failures")
                finally:
                    cache.writing.discard(new.block_hash)
                if new.block_hash in cache.forgotten:  # its agent was deleted while it was written
                    cache.forgotten.discard(new.block_hash)
                    await trio.to_thread.run_sync(disk.remove, new.block_hash)
                metrics.counters["cache_disk_bytes"] = disk.nbytes
                metrics.counters.update(disk.counters)


@hookimpl
def register_stages(register):
    register(Persist)
