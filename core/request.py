"""One request's side of the pipeline: the events that flow back to its caller."""

from __future__ import annotations

import itertools
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import trio

from .errors import ErrorKind, RequestError


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting of one request. ``cached_tokens`` of ``prompt_tokens`` came from cache."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cache_created_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Started:
    """Generation is about to start: the prompt is tokenized and its cache looked up."""

    usage: Usage


@dataclass(frozen=True, slots=True)
class TextDelta:
    """New final text of the response."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The response is complete. ``stop_reason``: end_turn, max_tokens, stop_sequence or cancelled."""

    stop_reason: str
    usage: Usage
    stop_sequence: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    """The request failed; ``error`` says why in protocol-neutral terms."""

    error: RequestError


Event = Started | TextDelta | Finished | Failed

_counter = itertools.count()


@dataclass(eq=False)
class RequestHandle:
    """The caller's end of a request: events arrive in order; ``Finished``/``Failed`` end them.

    ``cancelled`` may be read from the MLX worker thread; it is set when the caller goes away.
    """

    max_events: int = 1024
    id: str = field(default_factory=lambda: f"req_{uuid.uuid4().hex[:24]}")
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    done: bool = False
    at_decode: bool = False  # it has reached the decode stage (for its count of requests on their way)
    seq: int = field(default_factory=lambda: next(_counter))

    def __post_init__(self) -> None:
        self._send, self._recv = trio.open_memory_channel[Event](self.max_events if self.max_events else math.inf)
        self._on_done: list[Callable[[RequestHandle], None]] = []

    def on_done(self, callback: Callable[[RequestHandle], None]) -> None:
        """Call ``callback(self)`` once when the request finishes, fails or is cancelled."""
        if self.done:
            callback(self)
        else:
            self._on_done.append(callback)

    def push(self, event: Event) -> None:
        """Deliver an event (event loop only). Events after the end are dropped."""
        if self.done:
            return
        try:
            self._send.send_nowait(event)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.cancelled = True
        if isinstance(event, Finished | Failed):
            self._close()

    def fail(self, error: RequestError) -> None:
        self.push(Failed(error))

    def cancel(self) -> None:
        """The caller went away: stages drop the request and the decoder stops it."""
        self.cancelled = True
        if not self.done:
            self._close()

    def _close(self) -> None:
        self.done = True
        self._send.close()
        callbacks, self._on_done = self._on_done, []
        for cb in callbacks:
            cb(self)

    async def next_event(self, timeout: float = math.inf) -> Event | None:
        """The next event, or None if none arrives within ``timeout`` seconds (or after the end)."""
        with trio.move_on_after(timeout):
            try:
                return await self._recv.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return None
        return None

    async def events(self) -> AsyncIterator[Event]:
        """The request's events, ending after ``Finished`` or ``Failed`` (may be resumed)."""
        async for event in self._recv:
            yield event

    async def result(self) -> tuple[str, Finished]:
        """Wait for the whole response: (text, Finished). A failure raises its RequestError."""
        parts: list[str] = []
        async for ev in self.events():
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
            elif isinstance(ev, Failed):
                raise ev.error
            elif isinstance(ev, Finished):
                return "".join(parts), ev
        raise RequestError(ErrorKind.INTERNAL, "request ended without a result")
