"""schedule: admission control, a short batch window, and priorities in front of decode.

Admission happens before a request enters the pipeline (:meth:`Schedule.admit`): when
``max_concurrent_sessions + max_queue_depth`` requests are already admitted and unfinished, the
next is refused at once with a rate-limit error and ``retry-after`` — nothing has been tokenized,
looked up or reserved for it. Requests that reach this stage wait in a priority queue (higher
``priority`` first, then arrival order) until decode has room. When the queue was empty, the
first arrival waits ``batch_window_ms`` for others so that they start (and prefill) together.
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import math
from typing import Any

import trio
from pydantic import BaseModel, ConfigDict, Field

from semantic import hookimpl
from semantic.errors import ErrorKind, RequestError
from semantic.items import Incoming, Tokenized
from semantic.stage import SAME, NoSettings, Stage


class PriorityRule(BaseModel):
    """Requests matching every field given (shell-style patterns) get ``priority``."""

    model_config = ConfigDict(extra="forbid")

    priority: int = Field(description="Higher runs first; requests matching no rule get 0.")
    model: str | None = Field(None, description="Pattern on the model name the client asked for, e.g. 'claude-haiku-*'.")
    protocol: str | None = Field(None, description="Protocol name, e.g. 'anthropic'.")
    agent: str | None = Field(None, description="Pattern on the agent id.")

    def matches(self, item: Tokenized) -> bool:
        return (
            (self.model is None or fnmatch.fnmatchcase(item.model, self.model))
            and (self.protocol is None or item.protocol == self.protocol)
            and (self.agent is None or fnmatch.fnmatchcase(item.agent_id, self.agent))
        )


class ScheduleSettings(NoSettings):
    batch_window_ms: float = Field(10.0, ge=0, le=1000, description="How long a first arrival waits for others to start with it.")
    retry_after_s: float = Field(1.0, ge=0, description="retry-after given to requests refused for a full queue.")
    priorities: list[PriorityRule] = Field(default_factory=list, description="First matching rule sets a request's priority.")


class Schedule(Stage):
    """Admission control at the door; a priority queue in front of decode."""

    name = "schedule"
    takes = Tokenized
    gives = SAME
    Settings = ScheduleSettings
    description = "Admission control (queue depth), batch window and priorities in front of decode."

    def __init__(self, settings, context) -> None:
        super().__init__(settings, context)
        self.admitted = 0
        self.waiting = 0
        self._order = itertools.count()

    def admit(self, item: Incoming) -> None:
        limits = self.context.limits
        capacity = limits.max_concurrent_sessions + limits.max_queue_depth
        if self.admitted >= capacity:
            self.context.metrics.inc("rejected_queue_full")
            raise RequestError(
                ErrorKind.RATE_LIMITED,
                f"the queue is full ({self.admitted} requests admitted, {limits.max_queue_depth} may wait); retry shortly",
                retry_after=self.settings.retry_after_s,
            )
        self.admitted += 1
        item.request.on_done(self._gone)

    def _gone(self, _request: Any) -> None:
        self.admitted -= 1

    def priority(self, item: Tokenized) -> int:
        return next((rule.priority for rule in self.settings.priorities if rule.matches(item)), 0)

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
                if not item.request.done:
                    self.waiting += 1
                    self.context.metrics.counters["queue_waiting"] = self.waiting
                    queue_send.send_nowait(item)

    async def _dispatch(self, queue_recv, outbox) -> None:
        heap: list[tuple[int, int, Any]] = []
        closed = False

        def push(item: Any) -> None:
            heapq.heappush(heap, (-self.priority(item), next(self._order), item))

        def take_arrived() -> bool:
            """Move what has arrived into the heap; True once the intake is closed."""
            while True:
                try:
                    push(queue_recv.receive_nowait())
                except trio.WouldBlock:
                    return False
                except trio.EndOfChannel:
                    return True

        async with queue_recv, outbox:
            while True:
                if not heap:
                    if closed:
                        return
                    try:
                        push(await queue_recv.receive())
                    except trio.EndOfChannel:
                        return
                    window = self.settings.batch_window_ms / 1000
                    if window > 0:
                        await trio.sleep(window)  # let others arrive and start together
                closed = take_arrived() or closed
                *_, item = heapq.heappop(heap)
                try:
                    if not item.request.done:
                        await outbox.send(item)  # waits while decode's batch is full
                finally:
                    self.waiting -= 1
                    self.context.metrics.counters["queue_waiting"] = self.waiting


@hookimpl
def register_stages(register):
    register(Schedule)
