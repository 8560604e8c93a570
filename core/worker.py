"""The one long-lived thread that owns MLX. Nothing else calls MLX.

Since mlx 0.31.2 streams are thread-local, so every model load, prefill and decode step runs here.
The event loop submits jobs with :meth:`MLXWorker.call` and awaits them; a running job reaches back
into the event loop that submitted it with :meth:`MLXWorker.to_loop`.
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
THREAD_NAME = "semantic-mlx"


class WorkerStopped(RuntimeError):
    """The worker thread is not running."""


class MLXWorker:
    """A thread that runs submitted jobs one at a time, in order.

    Each job remembers the trio run that submitted it, so one worker may serve several
    ``trio.run`` calls in turn (a test session shares one; a server uses one for its lifetime).
    """

    def __init__(self, name: str = THREAD_NAME) -> None:
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._job_token: trio.lowlevel.TrioToken | None = None

    def start(self) -> None:
        if not self._thread.is_alive():
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
        """From inside a job: run ``fn(*args)`` in the submitting event loop, return its result."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._job_token)

    async def call(self, fn: Callable[..., R], *args: Any) -> R:
        """Run ``fn(*args)`` on the worker thread; return its result or raise its exception.

        If the awaiting task is cancelled the job still runs to its end (MLX work cannot be
        interrupted half-way); a job watches a flag of its own to stop early.
        """
        if not self._thread.is_alive():
            raise WorkerStopped("the MLX worker thread is not running")
        done = trio.Event()
        box: list[Any] = []
        self._jobs.put((fn, args, done, box, trio.lowlevel.current_trio_token()))
        await done.wait()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def run_sync(self, fn: Callable[..., R], *args: Any) -> R:
        """From a plain thread (no trio): run ``fn(*args)`` on the worker and wait for it."""
        done = threading.Event()
        box: list[Any] = []
        self._jobs.put((fn, args, done, box, None))
        done.wait()
        ok, value = box[0]
        if ok:
            return value
        raise value

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return
            fn, args, done, box, token = job
            self._job_token = token
            try:
                box.append((True, fn(*args)))
            except BaseException as e:  # delivered to the caller, which decides
                box.append((False, e))
            finally:
                self._job_token = None
            if token is None:
                done.set()
                continue
            try:
                trio.from_thread.run_sync(done.set, trio_token=token)
            except trio.RunFinishedError:
                log.warning("a job finished after the trio run that submitted it ended")
