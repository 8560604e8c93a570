"""The one long-lived thread that owns MLX. Nothing else calls MLX.

Since mlx 0.31.2 streams are thread-local, so every model load, prefill and decode step runs here.
The event loop submits jobs with :meth:`MLXWorker.call` and awaits them; a job reaches back into
the event loop with the ``to_loop`` function it is given (``trio.from_thread.run_sync``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import trio

log = logging.getLogger(__name__)
R = TypeVar("R")
_STOP = object()


class WorkerStopped(RuntimeError):
    """The worker thread is not running."""


class MLXWorker:
    """A thread that runs submitted jobs one at a time, in order."""

    def __init__(self, name: str = "semantic-mlx") -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        """Start the thread (from inside ``trio.run``)."""
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()

    async def stop(self) -> None:
        """Let queued jobs finish, then end the thread."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            await trio.to_thread.run_sync(self._thread.join)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def to_loop(self, fn: Callable[..., R], *args: Any) -> R:
        """From a job: run ``fn(*args)`` in the event loop and return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    async def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` on the worker thread; return its result or raise its exception.

        If the awaiting task is cancelled the job still runs to its end (MLX work cannot be
        interrupted half-way); the job should watch a flag of its own to stop early.
        """
        if not self._thread.is_alive():
            raise WorkerStopped("the MLX worker thread is not running")
        done = trio.Event()
        box: list[Any] = []
        self._jobs.put((fn, args, done, box))
        await done.wait()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, done, box = job
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # delivered to the caller, which decides
                box.append((False, e))
            try:
                trio.from_thread.run_sync(done.set, trio_token=self._token)
            except trio.RunFinishedError:
                return
