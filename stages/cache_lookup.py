"""cache-lookup: find the longest cached prefix of the prompt so only the rest is prefilled.

Requests of one agent run one at a time: a request whose agent already has one in flight is
parked here until that one is finished (its cache stored by persist), then looked up — so it
starts from the cache the previous turn left. Different agents never wait for each other.
"""

from __future__ import annotations

import math
from collections import deque

import trio
from pydantic import Field

from semantic import hookimpl
from semantic.items import Tokenized
from semantic.stage import SAME, NoSettings, Stage


class CacheLookupSettings(NoSettings):
    serialize_agents: bool = Field(
        True, description="One request per agent at a time; the next starts from the cache the previous one stored."
    )


class CacheLookup(Stage):
    """Finds the longest cached prefix (memory blocks, disk blocks, the agent's tail) as the
    request's starting KV state — pieces that decode joins when the sequence starts — and reserves
    pool blocks for the tokens it will add."""

    name = "cache-lookup"
    takes = Tokenized
    gives = SAME
    Settings = CacheLookupSettings
    description = "Per-agent ordering; longest cached prefix from the block pool (memory, then disk); block reservation."

    async def setup(self) -> None:
        self._agents: dict[str, deque[Tokenized]] = {}  # agent with a request in flight -> parked ones
        self._parked = 0
        self._released = trio.Event()

    async def run(self, inbox, outbox, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.setup()
        self._ready, ready = trio.open_memory_channel[Tokenized](math.inf)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._lookups, ready, outbox)
            async with self._ready:
                async with inbox:
                    async for item in inbox:
                        self._arrive(item)
                # parked requests still go on as the ones ahead of them finish downstream
                if self._parked:
                    await self._released.wait()

    async def _lookups(self, ready, outbox) -> None:
        async with ready, outbox:
            async for item in ready:
                out = await self.guarded(item)
                if out is not None:
                    await outbox.send(out)

    def _arrive(self, item: Tokenized) -> None:
        if item.request.done:
            return
        if not self.settings.serialize_agents:
            self._ready.send_nowait(item)
        elif item.agent_id in self._agents:
            self._agents[item.agent_id].append(item)
            if self._parked == 0:
                self._released = trio.Event()
            self._parked += 1
            self.context.parked = self._parked
            self.context.metrics.inc("agent_waits")
        else:
            self._agents[item.agent_id] = deque()
            self._start(item)

    def _start(self, item: Tokenized) -> None:
        item.request.on_done(lambda _req, agent=item.agent_id: self._next(agent))
        self._ready.send_nowait(item)

    def _next(self, agent: str) -> None:
        """The agent's request in flight is over: start its next parked one, if any."""
        parked = self._agents.get(agent)
        while parked:
            item = parked.popleft()
            self._parked -= 1
            self.context.parked = self._parked
            if not item.request.done:
                self._start(item)
                break
        else:
            self._agents.pop(agent, None)
        if self._parked == 0:
            self._released.set()

    async def process(self, item: Tokenized) -> Tokenized:
        cache, worker = self.context.cache, self.context.worker
        if cache is not None and worker is not None:
            await cache.prepare(item, worker)
        return item


@hookimpl
def register_stages(register):
    register(CacheLookup)
