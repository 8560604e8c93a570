"""decode: continuous batching on the MLX worker thread, streaming text to each request.

The stage loop takes new requests whenever the batch has room, then runs one engine step as a job
on the worker: sequences that left (cancelled, stopped by a stop sequence) are removed first, new
ones are added with the KV prefix cache-lookup found (its cached pieces joined in the same job),
then one decode step (and a prefill chunk) runs. Between two steps the worker is free for other
jobs (block splits, disk reads).
Tokens become text per request here, on the event loop; a finished request goes on to persist
with its KV cache. A cancelled request leaves the batch at the next step.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass, field, replace

import trio
from pydantic import Field

from semantic import hookimpl
from semantic.batching import BatchEngine, BatchOptions, SeqEvent, SequenceSpec
from semantic.detokenize import IncrementalDecoder
from semantic.errors import ErrorKind, RequestError
from semantic.items import Generated, Tokenized
from semantic.model import KVState, Model, joined
from semantic.request import Started, TextDelta, Usage
from semantic.stage import NoSettings, Stage
from semantic.stops import StopMatcher

log = logging.getLogger(__name__)


class DecodeSettings(NoSettings):
    emit_every: int = Field(1, ge=1, le=64, description="Tokens per streamed text event (1 = every token).")
    max_batch: int | None = Field(
        None, ge=1, le=256, description="Sequences decoded together (default: limits.max_concurrent_sessions)."
    )
    prefill_chunk: int = Field(512, ge=16, le=8192, description="Most prompt tokens prefilled between two decode steps.")
    whole_prompt: int = Field(
        256, ge=0, le=8192, description="Prompts with up to this many tokens to prefill (cached ones not counted) go in one chunk, never cut."
    )
    idle_whole_tokens: int = Field(
        4096, ge=0, le=65536, description="While nothing decodes, prompts arriving (up to this many tokens in all) are prefilled together."
    )
    idle_gather_ms: float = Field(
        50,
        ge=0,
        le=1000,
        description="While nothing decodes, a new prompt waits for others until none has arrived for this long (at most 5 "
        "times it in all), so a burst of new agents is prefilled together: a prompt needing a long prefill always, a short "
        "one while other requests are still on their way through the pipeline or once two have come together.",
    )
    join_hold_ms: float = Field(
        0,
        ge=0,
        le=1000,
        description="While others decode, a new short prompt waits (at most this long) while other requests are still on "
        "their way, so they join in the same step. Off by default: short prompts waiting at the same time are prefilled "
        "together anyway (mlx-lm engine), so holding mostly delays.",
    )
    prefill_share: float = Field(
        1.0,
        gt=0,
        le=100,
        description="A prefill chunk may take this many times a decode step while others decode (smaller: smoother streams).",
    )


@dataclass(slots=True)
class _Seq:
    """A request in the batch and its text state."""

    item: Tokenized
    decoder: IncrementalDecoder
    stops: StopMatcher
    count: int = 0
    pending: list[str] = field(default_factory=list)
    reason: str | None = None  # set when the request is done generating
    stop_sequence: str | None = None
    kv: KVState | None = None


@dataclass(slots=True)
class _StepResult:
    removed: dict[int, KVState | None]
    add_errors: dict[int, BaseException]
    events: list[SeqEvent]
    error: BaseException | None = None


def _step_job(engine: BatchEngine, model: Model, removals: list[int], adds: list[SequenceSpec]) -> _StepResult:
    """On the worker thread: remove, add (joining cached prefixes), step."""
    removed = engine.remove(removals) if removals else {}
    errors: dict[int, BaseException] = {}
    for spec in adds:
        try:
            engine.add(replace(spec, prefix=joined(model, spec.prefix)))
        except Exception as e:  # this request cannot start (bad cache, bad parameters): it alone fails
            errors[spec.seq_id] = e
    try:
        events = engine.step() if engine.active else []
    except Exception as e:  # the batch is lost
        return _StepResult(removed, errors, [], e)
    return _StepResult(removed, errors, events)


class Decode(Stage):
    """Continuous batching: requests join and leave the batch independently, one step at a time."""

    name = "decode"
    takes = Tokenized
    gives = Generated
    Settings = DecodeSettings
    description = "Continuous batching on the MLX worker thread (chunked prefill between decode steps), streaming text."

    async def setup(self) -> None:
        self._ids = itertools.count()
        self._seqs: dict[int, _Seq] = {}
        self._adds: list[SequenceSpec] = []  # joined, not yet in the engine
        self._held_since: float | None = None  # when _hold_joins began keeping them out
        s, limits = self.settings, self.context.limits
        self.options = BatchOptions(
            max_batch=s.max_batch or limits.max_concurrent_sessions,
            prefill_chunk=s.prefill_chunk,
            prefill_share=s.prefill_share,
            whole_prompt=s.whole_prompt,
            idle_whole_tokens=s.idle_whole_tokens,
        )

    async def _new_engine(self) -> BatchEngine:
        model, worker = self.context.model, self.context.worker
        assert model is not None and worker is not None, "decode needs a model and its worker"
        return await worker.call(model.batch_engine, self.options)

    async def run(self, inbox, outbox, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.setup()
        engine = self.engine = await self._new_engine()
        done_send, done_recv = trio.open_memory_channel[Generated](math.inf)
        task_status.started()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, done_recv, outbox)
                async with inbox, done_send:
                    await self._loop(engine, inbox, done_send)
        finally:
            worker = self.context.worker
            if worker is not None and worker.alive:
                with trio.CancelScope(shield=True):
                    await worker.call(engine.close)

    async def _forward(self, done_recv, outbox) -> None:
        async with done_recv, outbox:
            async for item in done_recv:
                await outbox.send(item)

    async def _take(self, inbox, wait: bool) -> bool:
        """Move arrivals into the batch while it has room; False once the inbox is closed.

        On an idle engine (nothing decoding; long prompts may be prefilling in chunks), a new
        prompt waits for more arrivals (the ``idle_gather_ms`` gap) so that a burst is prefilled in
        one batch, not one by one, and agents that finished together start again together: one
        that needs a long prefill always (one gap), a short one while other requests are on their
        way or once two have come together (clients of a burst do not all reach the server at
        once); a lone short request never waits.
        """
        room = self.options.max_batch - len(self._seqs)
        # idle: nothing decodes, and any sequence in the batch is a long prompt being prefilled
        idle = all(not s.count and self._long_prefill(s.item) for s in self._seqs.values())
        gap = self.settings.idle_gather_ms / 1000
        gather_until = cap = None
        long_seen = False
        tried_again = False
        taken = 0
        while room > 0:
            try:
                if wait:
                    item = await inbox.receive()
                elif gather_until is not None and not tried_again and (long_seen or taken > 1 or self._behind() > 0):
                    item = None
                    with trio.move_on_at(min(gather_until, cap)):
                        item = await inbox.receive()
                    if item is None:
                        return True
                else:
                    item = inbox.receive_nowait()
            except trio.WouldBlock:
                if tried_again:
                    return True
                tried_again = True
                await trio.lowlevel.checkpoint()  # let the sender offer its next item
                continue
            except trio.EndOfChannel:
                return False
            wait = tried_again = False
            if not item.request.at_decode:
                item.request.at_decode = True
                self.context.upstream -= 1
            if not item.request.done:
                self._join(item)
                room -= 1
                taken += 1
                now = trio.current_time()
                long_seen = long_seen or self._long_prefill(item)
                if gather_until is not None:
                    gather_until = now + gap
                elif idle and gap > 0 and (long_seen or taken > 1 or self._behind() > 0):
                    gather_until, cap = now + gap, now + 5 * gap
        return True

    def _behind(self) -> int:
        """Requests on their way to decode: being received by the server, or submitted and not
        over, less those parked behind their agent's request in flight."""
        return self.context.arriving + self.context.upstream - self.context.parked

    def _hold_joins(self) -> bool:
        """Keep this step's new short prompts out of the batch a little longer (``join_hold_ms``):
        others decode, more requests are on their way and there is room for them."""
        hold = self.settings.join_hold_ms / 1000
        if not self._adds or hold <= 0 or len(self._seqs) >= self.options.max_batch:
            return False
        if len(self._seqs) == len(self._adds) or self._behind() <= 0:
            return False  # nothing decodes yet (the idle gathering applies), or no one is coming
        if any(self._long_prefill(self._seqs[a.seq_id].item) for a in self._adds):
            return False  # a long prompt is prefilled in chunks between steps anyway
        now = trio.current_time()
        if self._held_since is None:
            self._held_since = now
        return now - self._held_since < hold

    def _long_prefill(self, item: Tokenized) -> bool:
        cached = item.prefix_len if item.prefix is not None else 0
        return len(item.prompt_tokens) - cached > self.options.whole_prompt

    def _join(self, item: Tokenized) -> None:
        seq_id = next(self._ids)
        tokenizer = self.context.model.tokenizer  # type: ignore[union-attr]
        self._seqs[seq_id] = _Seq(item, tokenizer.stream_decoder(), StopMatcher(item.params.stop))
        self._adds.append(SequenceSpec(seq_id, item.prompt_tokens, item.prefix, item.prefix_len, item.params))
        cached = item.prefix_len if item.prefix is not None else 0
        item.request.push(Started(Usage(prompt_tokens=len(item.prompt_tokens), cached_tokens=cached)))

    async def _loop(self, engine: BatchEngine, inbox, done_send) -> None:
        worker, metrics = self.context.worker, self.context.metrics
        assert worker is not None
        open_ = True
        while open_ or self._seqs:
            if open_:
                open_ = await self._take(inbox, wait=not self._seqs)
            if not self._seqs:
                continue
            leaving = [sid for sid, s in self._seqs.items() if s.reason is not None or s.item.request.done]
            gone = set(leaving)  # cancelled before it was ever added: never add it
            self._adds = [a for a in self._adds if a.seq_id not in gone]
            if self._hold_joins():
                adds = []
            else:
                adds, self._adds, self._held_since = self._adds, [], None
            result = await worker.call(_step_job, engine, self.context.model, leaving, adds)
            for spec in adds:  # joined and in the batch: the cached pieces can go
                seq = self._seqs.get(spec.seq_id)
                if seq is not None and seq.item.prefix is not None:
                    seq.item.prefix = replace(seq.item.prefix, payload=None)
            for sid in leaving:
                self._leave(sid, result.removed.get(sid), done_send)
            for sid, error in result.add_errors.items():
                self._fail(sid, error)
            if result.error is not None:
                log.error("decode step failed (%s); failing the %d requests in the batch", type(result.error).__name__, len(self._seqs))
                metrics.inc("decode_step_failures")
                for sid in list(self._seqs):
                    self._fail(sid, result.error)
                await worker.call(engine.close)
                engine = self.engine = await self._new_engine()
                continue
            stats = engine.stats
            metrics.inc("decode_steps")
            metrics.inc("prefill_tokens", stats.prefill_tokens)
            metrics.counters["decode_batch"] = stats.batch
            for event in result.events:
                self._on_event(event, done_send)

    def _on_event(self, event: SeqEvent, done_send) -> None:
        seq = self._seqs.get(event.seq_id)
        if seq is None:
            return
        if event.error is not None:
            self._fail(event.seq_id, event.error)
            return
        if seq.reason is not None or seq.item.request.done:  # already leaving
            if event.finish is not None:  # the engine let it go too: keep the cache it handed back
                self._leave(event.seq_id, event.kv, done_send)
            return
        if event.finish == "stop":
            seq.reason = "end_turn"
        elif event.token is not None:
            seq.count += 1
            text, stop = seq.stops.push(seq.decoder.add(event.token))
            if text:
                seq.pending.append(text)
            if stop is not None:
                seq.reason, seq.stop_sequence = "stop_sequence", stop
            elif event.finish == "length" or seq.count >= seq.item.params.max_tokens:
                seq.reason = "max_tokens"
            elif seq.pending and seq.count % self.settings.emit_every == 0:
                seq.item.request.push(TextDelta("".join(seq.pending)))
                seq.pending.clear()
        if event.finish is not None:  # it left the batch with its cache
            seq.reason = seq.reason or "max_tokens"
            self._leave(event.seq_id, event.kv, done_send)

    def _leave(self, seq_id: int, kv: KVState | None, done_send) -> None:
        """The sequence is out of the batch: finish its text and send it on to persist."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        req = seq.item.request
        if req.done:  # cancelled or failed: nothing more to say, nothing to keep
            return
        if seq.stop_sequence is None:
            tail, stop = seq.stops.push(seq.decoder.flush())
            seq.pending.append(tail + ("" if stop else seq.stops.flush()))
            if stop is not None:
                seq.reason, seq.stop_sequence = "stop_sequence", stop
        text = "".join(seq.pending)
        if text:
            req.push(TextDelta(text))
        self.context.metrics.inc("generated_tokens", seq.count)
        done_send.send_nowait(
            seq.item.advance(
                Generated,
                stop_reason=seq.reason or "max_tokens",
                output_tokens=seq.count,
                stop_sequence=seq.stop_sequence,
                kv_state=kv,
            )
        )

    def _fail(self, seq_id: int, error: BaseException) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        if not isinstance(error, RequestError):
            log.error("generation failed for %s: %s", seq.item.request.id, type(error).__name__)
            self.context.metrics.inc("generation_errors")
            error = RequestError(ErrorKind.INTERNAL, f"generation failed: {type(error).__name__}")
        seq.item.request.fail(error)


@hookimpl
def register_stages(register):
    register(Decode)

