"""Continuous batching: the interface decode drives, and the fallback for models without batching.

The decode stage owns one :class:`BatchEngine` per loaded model and calls it only on the MLX
worker thread: :meth:`~BatchEngine.add` puts a sequence in (with the KV prefix cache-lookup
prepared: cache injection), :meth:`~BatchEngine.step` advances every running sequence by one token
(and may prefill a chunk of a waiting prompt), :meth:`~BatchEngine.remove` takes sequences out
early and hands back their KV (cache extraction). A model gets batching by overriding
:meth:`semantic.model.Model.batch_engine`; otherwise :class:`SequentialEngine` interleaves its
:meth:`~semantic.model.Model.generate` streams one token each per step.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .model import KVState, SamplingParams

if TYPE_CHECKING:
    from .model import Generation, Model


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """How decode wants batching done (from its YAML settings).

    ``prefill_share``: a prompt chunk prefilled between two decode steps may take this many times
    as long as a plain decode step, so running streams keep their pace while a long prompt is
    prefilled (their inter-token time becomes about ``1 + prefill_share`` steps).
    ``prefill_chunk``: the most prompt tokens per chunk (also when nothing decodes).
    ``whole_prompt``: a prompt with at most this many tokens to prefill goes in one chunk, never
    cut: on a CPU each forward pass has a large fixed cost, so cutting short prompts costs more
    throughput than it saves latency.
    ``idle_whole_tokens``: while nothing decodes there is no stream to keep smooth, so prompts
    arriving then (up to this many tokens in all) are prefilled together in one batch, the way
    a burst of new agents is best served.
    """

    max_batch: int = 16
    prefill_chunk: int = 512
    prefill_share: float = 1.0
    min_prefill_chunk: int = 1
    whole_prompt: int = 256
    idle_whole_tokens: int = 4096


@dataclass(frozen=True, slots=True)
class SequenceSpec:
    """One request's sequence: its prompt, the cached prefix to start from, how to sample."""

    seq_id: int
    prompt: tuple[int, ...]
    prefix: KVState | None
    prefix_len: int
    params: SamplingParams


@dataclass(slots=True)
class SeqEvent:
    """What one step did to one sequence.

    ``token`` is the newly generated token (None if the sequence failed, or left without a new
    one: an engine may send a first token early and its finish a step later). ``finish`` is
    ``"stop"`` (the token is an end token), ``"length"`` (``max_tokens`` reached) or None; a
    finished sequence has left the batch and ``kv`` is its cache (prompt and generated tokens).
    ``error`` fails this sequence only.
    """

    seq_id: int
    token: int | None
    finish: str | None = None
    kv: KVState | None = None
    error: BaseException | None = None


@dataclass(slots=True)
class StepStats:
    """Work done in the last step, for metrics and benchmarks."""

    decode_s: float = 0.0
    prefill_s: float = 0.0
    prefill_tokens: int = 0
    batch: int = 0
    chunk: int = 0


class BatchEngine(ABC):
    """Sequences that join and leave one batch; every method runs on the MLX worker thread."""

    stats: StepStats

    @abstractmethod
    def add(self, spec: SequenceSpec) -> None:
        """Queue a sequence; it is prefilled (in chunks) by the next steps, then decoded."""

    @abstractmethod
    def step(self) -> list[SeqEvent]:
        """One decode step for the running sequences (plus a prefill chunk for waiting ones).

        Raising means the whole batch is lost: the caller fails its sequences and makes a new
        engine.
        """

    @abstractmethod
    def remove(self, seq_ids: Sequence[int]) -> dict[int, KVState | None]:
        """Take sequences out now; returns the KV each has so far (None if it has none)."""

    @property
    @abstractmethod
    def active(self) -> int:
        """Sequences added and not yet finished or removed."""

    def close(self) -> None:
        """Drop everything (the engine is not used again)."""


@dataclass(slots=True)
class _Running:
    spec: SequenceSpec
    gen: Generation | None = None
    tokens: Iterator[int] | None = None
    count: int = 0
    eos: frozenset[int] = field(default_factory=frozenset)


class SequentialEngine(BatchEngine):
    """Batching for any :class:`~semantic.model.Model`: each step takes one token from each
    running sequence's own generation, so sequences still join and leave independently."""

    def __init__(self, model: Model, options: BatchOptions) -> None:
        self.model = model
        self.options = options
        self.stats = StepStats()
        self._seqs: dict[int, _Running] = {}

    @property
    def active(self) -> int:
        return len(self._seqs)

    def add(self, spec: SequenceSpec) -> None:
        gen = self.model.generate(spec.prompt, spec.prefix, spec.prefix_len, spec.params)
        self._seqs[spec.seq_id] = _Running(spec, gen, iter(gen), eos=self.model.tokenizer.eos_token_ids)

    def step(self) -> list[SeqEvent]:
        start = time.perf_counter()
        events = []
        for seq_id, run in list(self._seqs.items()):
            try:
                token = next(run.tokens)  # type: ignore[arg-type]
            except StopIteration:
                events.append(self._finish(seq_id, None, "length"))
                continue
            except Exception as e:  # this sequence's generation failed; the others go on
                del self._seqs[seq_id]
                events.append(SeqEvent(seq_id, None, error=e))
                continue
            run.count += 1
            if token in run.eos:
                events.append(self._finish(seq_id, token, "stop"))
            elif run.count >= run.spec.params.max_tokens:
                events.append(self._finish(seq_id, token, "length"))
            else:
                events.append(SeqEvent(seq_id, token))
        self.stats = StepStats(decode_s=time.perf_counter() - start, batch=len(events))
        return events

    def _finish(self, seq_id: int, token: int | None, reason: str) -> SeqEvent:
        run = self._seqs.pop(seq_id)
        return SeqEvent(seq_id, token, reason, run.gen.kv_state() if run.gen is not None else None)

    def remove(self, seq_ids: Sequence[int]) -> dict[int, KVState | None]:
        out: dict[int, KVState | None] = {}
        for seq_id in seq_ids:
            run = self._seqs.pop(seq_id, None)
            if run is not None and run.gen is not None:
                out[seq_id] = run.gen.kv_state()
        return out

    def close(self) -> None:
        self._seqs.clear()

