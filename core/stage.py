"""The stage contract: a typed task that reads its inbox and writes its outbox.

A stage class declares ``takes`` (the item type it accepts) and ``gives`` (the type it sends on,
or :data:`SAME` for "whatever it was given"). The default :meth:`Stage.run` loop calls
:meth:`Stage.process` once per item; a :class:`~semantic.errors.RequestError` raised there fails
that request only. Any other exception is a bug in the stage: it ends the stage and fails the
pipeline loudly. Closing the inbox ends the loop and closes the outbox, which is how shutdown flows
downstream.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ClassVar

import trio
from pydantic import BaseModel, ConfigDict

from .errors import ErrorKind, RequestError
from .items import Incoming

if TYPE_CHECKING:
    from .config import LimitsConfig
    from .block_cache import BlockCache
    from .model import Model
    from .worker import MLXWorker

log = logging.getLogger(__name__)


class _Same:
    """Marker for ``gives``: the stage sends on items of the type it received."""

    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()


class NoSettings(BaseModel):
    """Settings of a stage that has none."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Metrics:
    """Plain counters (Prometheus exposition comes with the operations work)."""

    counters: dict[str, float] = field(default_factory=dict)

    def inc(self, name: str, value: float = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + value


@dataclass
class StageContext:
    """What stages share: the loaded model, its worker thread, limits, the KV cache, metrics."""

    limits: LimitsConfig
    model: Model | None = None
    worker: MLXWorker | None = None
    cache: BlockCache | None = None
    accepts_model: Callable[[str], bool] = lambda name: True
    context_window: int | None = None
    metrics: Metrics = field(default_factory=Metrics)
    upstream: int = 0  # requests submitted that have not reached decode and are not over (kept by pipeline and decode)
    parked: int = 0  # of those, requests cache-lookup holds behind their agent's request in flight
    arriving: int = 0  # requests the server is still reading or parsing, not yet submitted (kept by the server)

    def window(self) -> int:
        """The context window clients get: the model's, or the smaller one the pipeline reports."""
        own = self.model.info.context_length if self.model is not None else 1 << 30
        return min(own, self.context_window or own)


_arrival: ContextVar[list[StageContext] | None] = ContextVar("semantic_arrival", default=None)


def arriving(context: StageContext) -> list[StageContext]:
    """The server started reading a request (in this task): count it in ``context.arriving``
    until :func:`arrived`. Returns the token to pass to :func:`arrived` from elsewhere."""
    context.arriving += 1
    token = [context]
    _arrival.set(token)
    return token


def arrived(token: list[StageContext] | None = None) -> None:
    """The request counted by :func:`arriving` (this task's, or ``token``'s) was submitted or
    answered: stop counting it. Counted once, however often this is called."""
    token = token if token is not None else _arrival.get()
    if token:
        token.pop().arriving -= 1


class Stage:
    """Base class of every stage. Subclasses set ``name``, ``takes``, ``gives`` and maybe ``Settings``."""

    name: ClassVar[str]
    takes: ClassVar[type] = Incoming
    gives: ClassVar[Any] = SAME
    Settings: ClassVar[type[BaseModel]] = NoSettings
    description: ClassVar[str] = ""

    def __init__(self, settings: BaseModel | None, context: StageContext) -> None:
        self.settings = settings if settings is not None else self.Settings()
        self.context = context

    async def setup(self) -> None:
        """Prepare before the first item (the pipeline waits for every stage's setup)."""

    def admit(self, item: Incoming) -> None:
        """Admission control, before the request enters the pipeline (nothing is allocated yet).

        :meth:`Pipeline.submit <semantic.pipeline.Pipeline.submit>` calls it on every stage in
        order; raising :class:`~semantic.errors.RequestError` refuses the request at once. A stage
        that counts admitted requests releases them with ``item.request.on_done``.
        """

    async def process(self, item: Any) -> Any | None:
        """Handle one item and return the item to send on.

        Returning None is allowed only after finishing the request (``item.request.push`` of a
        ``Finished``/``Failed``); a request dropped without an answer is failed as a stage bug.
        """
        return item

    async def run(
        self,
        inbox: trio.MemoryReceiveChannel[Any],
        outbox: trio.MemorySendChannel[Any],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The stage loop: ``async for item in inbox`` → ``process`` → ``outbox.send``."""
        await self.setup()
        task_status.started()
        async with inbox, outbox:
            async for item in inbox:
                out = await self.guarded(item)
                if out is not None:
                    await outbox.send(out)

    async def guarded(self, item: Any) -> Any | None:
        """``process(item)`` unless the request is already over; a RequestError fails only it."""
        if item.request.done:
            return None
        try:
            out = await self.process(item)
        except RequestError as error:
            item.request.fail(error)
            return None
        if out is None and not item.request.done:
            log.error("stage %r dropped request %s without answering it", self.name, item.request.id)
            item.request.fail(RequestError(ErrorKind.INTERNAL, f"stage {self.name!r} dropped the request"))
        return out
