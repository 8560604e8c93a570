"""schedule: first in, first out, with a hard cap on how many requests may wait."""

from __future__ import annotations

import math
from typing import Any

import trio
from pydantic import Field

from semantic import hookimpl
from semantic.errors import ErrorKind, RequestError
from semantic.items import Tokenized
from semantic.stage import SAME, NoSettings, Stage


class ScheduleSettings(NoSettings):
    retry_after_s: float = Field(1.0, ge=0, description="retry-after given to requests refused for a full queue.")


class Schedule(Stage):
    """Queues requests for decode in arrival order; a full queue refuses at once (overloaded)."""

    name = "schedule"
    takes = Tokenized
    gives = SAME
    Settings = ScheduleSettings
    description = "FIFO queue in front of decode with a queue-depth cap."

    async def setup(self) -> None:
        self.waiting = 0

    async def run(self, inbox, outbox, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.setup()
        queue_send, queue_recv = trio.open_memory_channel[Any](math.inf)
        task_status.started()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._intake, inbox, queue_send)
            nursery.start_soon(self._dispatch, queue_recv, outbox)

    async def _intake(self, inbox, queue_send) -> None:
        async with inbox, queue_send:
            async for item in inbox:
                if item.request.done:
                    continue
                if self.waiting >= self.context.limits.max_queue_depth:
                    self.context.metrics.inc("rejected_queue_full")
                    item.request.fail(
                        RequestError(
                            ErrorKind.OVERLOADED,
                            f"the queue is full ({self.waiting} waiting); retry shortly",
                            retry_after=self.settings.retry_after_s,
                        )
                    )
                    continue
                self.waiting += 1
                queue_send.send_nowait(item)

    async def _dispatch(self, queue_recv, outbox) -> None:
        async with queue_recv, outbox:
            async for item in queue_recv:
                try:
                    if not item.request.done:
                        await outbox.send(item)
                finally:
                    self.waiting -= 1


@hookimpl
def register_stages(register):
    register(Schedule)
