"""A running pipeline: the model on its worker thread, the stages wired by bounded channels.

``Pipeline.run`` loads the model, builds every stage, connects stage *i*'s outbox to stage
*i+1*'s inbox and starts each with ``nursery.start`` (so a stage that cannot set up fails the
start). Protocols call :meth:`Pipeline.submit`; the last stage's items reach the sink, which
finishes their requests. Closing the entry channel (:meth:`Pipeline.close`) drains and stops the
stages in order. If a stage crashes, the pipeline fails loudly: the error is logged with its
traceback, every request in flight gets an error, and :attr:`Pipeline.ready` turns false.
"""

from __future__ import annotations

import logging
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import trio

from .config import ConfigError, Issue, PipelineConfig, stage_chain_issues
from .errors import ErrorKind, RequestError
from .items import Generated, Incoming
from .block_cache import BlockCache
from .disk_store import DiskStore
from .model import LoadContext, Model
from .paths import cache_dir
from .plugin_manager import Registry
from .request import Finished, RequestHandle, Usage
from .stage import Stage, StageContext, arrived
from .worker import MLXWorker

log = logging.getLogger(__name__)

#: Items each channel between two stages may hold before the sender waits (backpressure).
CHANNEL_BUFFER = 0


class State(str, Enum):
    STARTING = "starting"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


class Pipeline:
    """One pipeline definition, running."""

    def __init__(
        self,
        config: PipelineConfig,
        registry: Registry,
        *,
        base_dir: Path | None = None,
        model: Model | None = None,
        worker: MLXWorker | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        stages = [{"type": s.type} for s in config.stages]
        issues = stage_chain_issues(stages, registry, lambda loc, msg: Issue(config.name, 0, 0, ".".join(map(str, loc)), msg))
        if issues:  # configs built in code, not loaded from a file, get the same check
            raise ConfigError(issues)
        self.base_dir = base_dir
        self.state = State.STARTING
        self.failure: str | None = None
        self.context = StageContext(
            limits=config.limits, model=model, accepts_model=config.model.accepts, context_window=config.model.context_window
        )
        self.stages: list[Stage] = []
        self._worker = worker  # the thread that loaded ``model``, when one is given
        self._entry: trio.MemorySendChannel[Incoming] | None = None
        self._inflight: set[RequestHandle] = set()
        #: Where this pipeline keeps state across restarts (KV blocks, agents); None: nothing on disk.
        self.state_dir: Path | None = self._disk_root() if config.cache.disk_mb > 0 else None

    @property
    def ready(self) -> bool:
        return self.state is State.READY

    @property
    def model(self) -> Model:
        assert self.context.model is not None, "the pipeline has not loaded its model yet"
        return self.context.model

    def new_request(self) -> RequestHandle:
        """A request handle sized for this pipeline's output cap."""
        return RequestHandle(max_events=self.config.limits.max_output_tokens + 16)

    async def submit(self, item: Incoming) -> None:
        """Hand a request to the first stage; its events then arrive on ``item.request``.

        Every stage's :meth:`~semantic.stage.Stage.admit` sees it first (the schedule stage
        refuses it at once when the queue is full), so a refused request costs nothing.
        """
        if not self.ready or self._entry is None:
            raise RequestError(ErrorKind.UNAVAILABLE, f"the pipeline is not ready ({self.state.value})")
        request = item.request
        try:
            for stage in self.stages:
                stage.admit(item)
        except RequestError:
            request.cancel()  # stages that admitted it count it as gone again
            raise
        self._inflight.add(request)
        self.context.upstream += 1
        arrived()  # the server counted it while reading it
        request.on_done(self._finished)
        try:
            await self._entry.send(item)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            request.cancel()
            raise RequestError(ErrorKind.UNAVAILABLE, "the pipeline is shutting down") from None
        except BaseException:  # the caller went away while waiting to get in
            request.cancel()
            raise

    def _finished(self, request: RequestHandle) -> None:
        self._inflight.discard(request)
        if not request.at_decode:
            self.context.upstream -= 1

    def close(self) -> None:
        """Stop taking requests; stages finish what they hold, then end in order."""
        if self._entry is not None:
            self._entry.close()

    def build_stages(self) -> list[Stage]:
        stages = []
        for spec in self.config.stages:
            cls = self.registry.stages[spec.type]
            settings = spec.settings if not isinstance(spec.settings, dict) else cls.Settings.model_validate(spec.settings)
            stages.append(cls(settings, self.context))
        return stages

    async def _load_model(self, worker: MLXWorker) -> Model:
        spec = self.config.model
        loader = self.registry.loaders[spec.plugin]
        options = spec.options
        if loader.options_model is not None and isinstance(options, dict):
            options = loader.options_model.model_validate(options)
        context = LoadContext(name=spec.name, base_dir=self.base_dir, cache_dir=cache_dir())
        log.info("loading model %s with %s", spec.name, spec.plugin)
        return await worker.call(loader.load, spec.source, options, context)

    def _disk_root(self) -> Path:
        """``cache.disk_dir`` (relative to the pipeline file), or the user cache folder's ``kv``."""
        disk_dir = self.config.cache.disk_dir
        root = Path(disk_dir).expanduser() if disk_dir else cache_dir() / "kv"
        if disk_dir and not root.is_absolute() and self.base_dir is not None:
            root = self.base_dir / root
        return root

    async def _build_cache(self) -> BlockCache:
        """The block pool for the loaded model, and its disk store with the index rebuilt."""
        cfg, model = self.config.cache, self.model
        policies = self.registry.policies[self.config.eviction.policy]
        cache = BlockCache(
            model,
            block_tokens=cfg.block_tokens,
            memory_bytes=int(cfg.memory_mb * 1024 * 1024),
            policy=policies.factory(),
            metrics=self.context.metrics,
        )
        root = self._disk_root()
        if model.info.pageable and cfg.disk_mb > 0:
            disk = DiskStore(
                root / cache.root.hex(),
                fingerprint=model.info.fingerprint,
                layout=model.info.cache_layout,
                block_tokens=cfg.block_tokens,
                shapes=model.block_shapes(cfg.block_tokens),
                budget_bytes=int(cfg.disk_mb * 1024 * 1024),
                policy=policies.factory(),
            )
            report = await trio.to_thread.run_sync(disk.scan)
            log.info(
                "KV disk index rebuilt: %d blocks, %.1f MB in %.2f s (%d skipped, %d quarantined)",
                report["blocks"], report["bytes"] / 1e6, report["seconds"], report["skipped"], disk.counters["disk_quarantined"],
            )
            self.context.metrics.counters.update(
                {"disk_index_seconds": report["seconds"], "cache_disk_bytes": report["bytes"], **disk.counters}
            )
            cache.disk = disk
        log.info("KV block pool: %d blocks of %d tokens (%.1f MB each)", cache.pool.num_blocks, cfg.block_tokens, cache.pool.block_bytes / 1e6)
        return cache

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Load, start every stage, report started, then run until closed (or a stage crashes)."""
        owns_worker = self._worker is None
        worker = self._worker or MLXWorker()
        worker.start()
        self.context.worker = worker
        owns_model = self.context.model is None
        try:
            if owns_model:
                self.context.model = await self._load_model(worker)
            self.context.cache = await self._build_cache()
            self.stages = self.build_stages()
            await self._run_stages(task_status)
        finally:
            if self.state is not State.FAILED:
                self.state = State.STOPPED
            with trio.CancelScope(shield=True):
                if owns_model and self.context.model is not None:
                    await worker.call(self.context.model.close)
                if owns_worker:
                    await worker.stop()

    async def _run_stages(self, task_status: trio.TaskStatus[None]) -> None:
        entry_send, inbox = trio.open_memory_channel[Any](CHANNEL_BUFFER)
        self._entry = entry_send
        started = False
        try:
            async with trio.open_nursery() as nursery:
                for stage in self.stages:
                    send, recv = trio.open_memory_channel[Any](CHANNEL_BUFFER)
                    await nursery.start(partial(stage.run, inbox, send))
                    inbox = recv
                nursery.start_soon(self._sink, inbox)
                self.state = State.READY
                started = True
                task_status.started()
        except Exception as exc:
            if not started:
                raise
            self._fail(exc)

    async def _sink(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        async with inbox:
            async for item in inbox:
                if not isinstance(item, Generated):
                    raise TypeError(f"the pipeline's end got {type(item).__name__}, not Generated")
                usage = Usage(
                    prompt_tokens=len(item.prompt_tokens),
                    cached_tokens=item.prefix_len if item.prefix is not None else 0,
                    output_tokens=item.output_tokens,
                    cache_created_tokens=item.cache_created_tokens,
                )
                item.request.push(Finished(item.stop_reason, usage, item.stop_sequence))

    def _fail(self, exc: BaseException) -> None:
        self.state = State.FAILED
        # Only exception types: messages from plugins might quote request content.
        self.failure = ", ".join(type(e).__name__ for e in _leaves(exc))
        log.critical("pipeline %r failed; not ready until restarted", self.config.name, exc_info=exc)
        error = RequestError(ErrorKind.INTERNAL, "the server's pipeline failed; see the server log")
        for request in list(self._inflight):
            request.fail(error)  # done: the decoder stops generating for it


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]
