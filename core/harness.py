"""Run one stage alone on typed inputs: for stage tests here and for plugin authors.

    async with stage_context(model=my_model) as ctx:
        outputs = await run_stage(Tokenize(None, ctx), [incoming("hello")])

``stage_context`` starts the MLX worker thread (decode needs it) and a KV store; ``run_stage``
feeds the items through the stage's real ``run`` loop, closes its inbox and returns what came out.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio

from .config import LimitsConfig
from .eviction import EvictionPolicy
from .items import Incoming
from .block_cache import BlockCache
from .disk_store import DiskStore
from .model import ChatMessage, Model, SamplingParams
from .request import Event, RequestHandle
from .stage import Stage, StageContext
from .worker import MLXWorker


class _OldestFirst:
    def priority(self, entry: Any) -> tuple[float, int]:
        return (entry.last_used, -entry.depth)


@asynccontextmanager
async def stage_context(
    *,
    model: Model | None = None,
    limits: LimitsConfig | None = None,
    cache_bytes: int = 8 << 20,
    block_tokens: int = 16,
    policy: EvictionPolicy | None = None,
    disk: DiskStore | None = None,
    worker: bool | MLXWorker = True,
) -> AsyncIterator[StageContext]:
    """A :class:`StageContext` with an MLX worker thread and, given a model, its block cache.

    ``worker``: True starts (and later stops) a worker of its own; an :class:`MLXWorker` is used
    as it is (the one that loaded ``model``); False gives none.
    """
    ctx = StageContext(limits=limits or LimitsConfig(), model=model)
    if model is not None:
        ctx.cache = BlockCache(
            model, block_tokens=block_tokens, memory_bytes=cache_bytes, policy=policy or _OldestFirst(), metrics=ctx.metrics, disk=disk
        )
    own = MLXWorker() if worker is True else None
    if own is not None:
        own.start()
    ctx.worker = own or (worker if isinstance(worker, MLXWorker) else None)
    try:
        yield ctx
    finally:
        if own is not None:
            with trio.CancelScope(shield=True):
                await own.stop()


def incoming(
    content: str | Sequence[ChatMessage],
    *,
    model: str = "test-model",
    max_tokens: int = 32,
    temperature: float = 0.0,
    stop: Sequence[str] = (),
    agent: str | None = None,
    request_bytes: int = 100,
    max_events: int = 4096,
) -> Incoming:
    """An :class:`Incoming` item for a user message (or a list of messages)."""
    messages = (ChatMessage("user", content),) if isinstance(content, str) else tuple(content)
    return Incoming(
        request=RequestHandle(max_events=max_events),
        protocol="test",
        model=model,
        messages=messages,
        params=SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=tuple(stop)),
        agent_hint=agent,
        request_bytes=request_bytes,
    )


async def run_stage(stage: Stage, items: Iterable[Any], *, timeout: float = 120) -> list[Any]:
    """Send ``items`` through ``stage.run``, close its inbox, and return everything it sent on."""
    in_send, in_recv = trio.open_memory_channel[Any](0)
    out_send, out_recv = trio.open_memory_channel[Any](0)
    outputs: list[Any] = []

    async def feed() -> None:
        async with in_send:
            for item in items:
                await in_send.send(item)

    async def collect() -> None:
        async with out_recv:
            async for item in out_recv:
                outputs.append(item)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(stage.run, in_recv, out_send))
            nursery.start_soon(feed)
            nursery.start_soon(collect)
    return outputs


def drain(request: RequestHandle) -> list[Event]:
    """Every event already delivered to ``request`` (without waiting)."""
    events: list[Event] = []
    while True:
        try:
            events.append(request._recv.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return events
