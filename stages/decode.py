"""decode: generate on the MLX worker thread, streaming text back to the request as it comes."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pydantic import Field

from semantic import hookimpl
from semantic.errors import ErrorKind, RequestError
from semantic.items import Generated, Tokenized
from semantic.model import KVState, Model
from semantic.request import Started, TextDelta, Usage
from semantic.stage import NoSettings, Stage
from semantic.stops import StopMatcher

log = logging.getLogger(__name__)


class DecodeSettings(NoSettings):
    emit_every: int = Field(1, ge=1, le=64, description="Tokens per streamed text event (1 = every token).")


@dataclass(slots=True)
class Outcome:
    stop_reason: str
    output_tokens: int
    stop_sequence: str | None
    kv_state: KVState | None


def generate(model: Model, item: Tokenized, emit, emit_every: int = 1) -> Outcome:
    """One request's whole generation; runs on the MLX worker thread.

    ``emit(event)`` delivers an event to the request (it hops to the event loop). Stops at an end
    token, a stop sequence, ``max_tokens`` or when the request is cancelled.
    """
    req, params = item.request, item.params
    eos = model.tokenizer.eos_token_ids
    decoder = model.tokenizer.stream_decoder()
    stops = StopMatcher(params.stop)
    gen = model.generate(item.prompt_tokens, item.prefix, item.prefix_len, params)
    reason, stop_seq, count, pending = "max_tokens", None, 0, []
    for token in gen:
        if req.cancelled or req.done:  # the caller left, or the request already failed
            reason = "cancelled"
            break
        if token in eos:
            reason = "end_turn"
            break
        count += 1
        text, stop_seq = stops.push(decoder.add(token))
        if text:
            pending.append(text)
        if stop_seq is not None:
            reason = "stop_sequence"
            break
        if pending and (count % emit_every == 0):
            emit(TextDelta("".join(pending)))
            pending.clear()
        if count >= params.max_tokens:
            break
    if stop_seq is None:
        tail, stop_seq = stops.push(decoder.flush())
        pending.append(tail + ("" if stop_seq else stops.flush()))
        if stop_seq is not None:
            reason = "stop_sequence"
    if "".join(pending):
        emit(TextDelta("".join(pending)))
    return Outcome(reason, count, stop_seq, gen.kv_state())


class Decode(Stage):
    """Runs generation for one request at a time on the worker thread that owns MLX."""

    name = "decode"
    takes = Tokenized
    gives = Generated
    Settings = DecodeSettings
    description = "mlx-lm generation on the MLX worker thread, streaming text deltas."

    async def process(self, item: Tokenized) -> Generated:
        model, worker = self.context.model, self.context.worker
        assert model is not None and worker is not None, "decode needs a model and its worker"
        req = item.request
        cached = item.prefix_len if item.prefix is not None else 0
        req.push(Started(Usage(prompt_tokens=len(item.prompt_tokens), cached_tokens=cached)))

        def emit(event) -> None:
            worker.to_loop(req.push, event)

        try:
            out = await worker.call(generate, model, item, emit, self.settings.emit_every)
        except Exception as e:  # the model failed on this request: its caller gets a 500
            log.exception("generation failed for %s", req.id)
            self.context.metrics.inc("generation_errors")
            raise RequestError(ErrorKind.INTERNAL, f"generation failed: {type(e).__name__}") from e
        self.context.metrics.inc("generated_tokens", out.output_tokens)
        return item.advance(
            Generated,
            stop_reason=out.stop_reason,
            output_tokens=out.output_tokens,
            stop_sequence=out.stop_sequence,
            kv_state=out.kv_state,
        )


@hookimpl
def register_stages(register):
    register(Decode)
