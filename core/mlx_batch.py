"""Continuous batching for mlx-lm models: mlx-lm's ``BatchGenerator`` behind :class:`BatchEngine`.

``BatchGenerator`` runs one decode step for the generation batch and then one prefill chunk for
the prompts waiting to join it, on every ``next()``. This engine sizes that chunk before each
step: with nothing decoding, the whole ``prefill_chunk``; otherwise a chunk that takes about
``prefill_share`` × a decode step — unless every prompt being prefilled is short
(``whole_prompt``), which then goes in one pass. The size is steered by measurement — each chunk's time scales
the next one (a chunk's cost is not proportional to its tokens: a forward pass has a fixed part,
and attention grows with depth, so the chunk shrinks as a long prompt is prefilled). Running
streams keep their pace while a 7K-token prompt is prefilled.

Cache injection: a sequence starts from the prefix cache-lookup joined (``insert(caches=...)``
copies it; the stored blocks are never written). Cache extraction: a finished or removed
sequence hands back a per-layer ``KVCache`` list covering exactly its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .batching import BatchEngine, BatchOptions, SeqEvent, SequenceSpec, StepStats
from .model import KVState, SamplingParams

if TYPE_CHECKING:
    from .mlx_model import MLXLMModel

#: Weight of the newest measurement in the running averages of step and prefill times.
EMA = 0.5


def make_sampler(params: SamplingParams, vocab_size: int) -> Any:
    """The sampler for one sequence; None means greedy (shared, so a greedy batch samples at once).

    With a ``seed`` the sampler draws from its own key, so the same seed and prompt give the same
    output whatever else is in the batch.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    if params.temperature <= 0:
        return None
    top_p = params.top_p if params.top_p is not None and 0 < params.top_p < 1 else 0.0
    top_k = params.top_k if params.top_k is not None and 0 < params.top_k < vocab_size else 0
    if params.seed is None:
        return mlx_lm_sampler(temp=params.temperature, top_p=top_p, top_k=top_k)
    key = mx.random.key(params.seed)
    scale = 1.0 / params.temperature

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, sub = mx.random.split(key)
        if top_p:
            logprobs = apply_top_p(logprobs, top_p)
        if top_k:
            logprobs = apply_top_k(logprobs, top_k)
        return mx.random.categorical(logprobs * scale, key=sub)

    return sample


def _ema(old: float | None, new: float) -> float:
    return new if old is None else EMA * new + (1 - EMA) * old


class MLXBatchEngine(BatchEngine):
    def __init__(self, model: MLXLMModel, options: BatchOptions) -> None:
        from mlx_lm.generate import BatchGenerator

        self.model = model
        self.options = options
        self.stats = StepStats()
        self._gen = BatchGenerator(
            model.module,
            stop_tokens=[[t] for t in sorted(model.tokenizer.eos_token_ids)],
            completion_batch_size=options.max_batch,
            prefill_batch_size=max(1, min(8, options.max_batch)),
            prefill_step_size=options.prefill_chunk,
        )
        self._uid: dict[int, int] = {}  # seq_id -> BatchGenerator uid
        self._seq: dict[int, int] = {}  # uid -> seq_id
        self._decoding: set[int] = set()  # uids that have produced a token
        self._length: dict[int, int] = {}  # uid -> prompt tokens (cached ones included)
        self._step_s: float | None = None  # running average of the decode part of a step
        self._base_s: float | None = None  # running average of a step without prefill
        self._token_s: float | None = None  # running average of prefill time per token
        self._size: int | None = None  # prefill chunk size while others decode (steered)
        self._vocab = int(getattr(getattr(model.module, "args", None), "vocab_size", 0) or 1 << 30)

    @property
    def active(self) -> int:
        return len(self._seq)

    def add(self, spec: SequenceSpec) -> None:
        caches, start = self._start_cache(spec)
        (uid,) = self._gen.insert(
            [list(spec.prompt[start:])],
            max_tokens=[spec.params.max_tokens],
            caches=[caches],
            all_tokens=[list(spec.prompt[:start])],
            samplers=[make_sampler(spec.params, self._vocab)],
        )
        self._uid[spec.seq_id] = uid
        self._seq[uid] = spec.seq_id
        self._length[uid] = len(spec.prompt)

    def _start_cache(self, spec: SequenceSpec) -> tuple[list[Any] | None, int]:
        """The KV caches a sequence starts from (None: empty) and how many prompt tokens they hold."""
        from .mlx_model import leading_kv

        prefix, n = spec.prefix, spec.prefix_len
        if prefix is None or n <= 0:
            return None, 0
        if n == len(prefix.tokens):
            return list(prefix.payload), n  # inserted caches are copied, never written
        return leading_kv(prefix.payload, n), n

    def _chunk(self) -> int:
        opts = self.options
        base = self._base_s or self._step_s
        if not self._decoding or base is None:
            return opts.prefill_chunk
        prefilling = [self._length[uid] for uid in self._seq if uid not in self._decoding]
        if prefilling and max(prefilling) <= opts.whole_prompt:
            return opts.prefill_chunk  # short prompts only: one pass each
        if self._size is None:  # first chunk beside decoding: guess from the prefill rate so far
            per = self._token_s if self._token_s is not None else base
            self._size = int(opts.prefill_share * base / max(per, 1e-9))
        return max(opts.min_prefill_chunk, min(opts.prefill_chunk, self._size))

    def step(self) -> list[SeqEvent]:
        chunk = self._gen.prefill_step_size = self._chunk()
        with self._gen.stats() as st:
            _, responses = self._gen.next()
        total = st.decode_time + st.prompt_time
        if st.generation_steps:
            self._step_s = _ema(self._step_s, st.decode_time)
            if not st.prompt_tokens:  # a plain decode step: what running streams pay per token
                self._base_s = _ema(self._base_s, total)
        if st.prompt_tokens and st.prompt_time > 0:
            self._token_s = _ema(self._token_s, st.prompt_time / st.prompt_tokens)
            base = self._base_s or self._step_s
            if self._decoding and base is not None:  # steer the next chunk toward its time budget
                ratio = self.options.prefill_share * base / max(total - base, 1e-4)
                self._size = max(1, int(chunk * min(2.0, max(0.1, ratio))))
        self.stats = StepStats(st.decode_time, st.prompt_time, st.prompt_tokens, len(responses), chunk)
        events = []
        for r in responses:
            seq_id = self._seq.get(r.uid)
            if seq_id is None:
                continue
            if r.finish_reason is None:
                self._decoding.add(r.uid)
                events.append(SeqEvent(seq_id, int(r.token)))
                continue
            self._forget(r.uid)
            reason = "stop" if r.finish_reason == "stop" else "length"
            events.append(SeqEvent(seq_id, int(r.token), reason, self._kv(r.prompt_cache, r.all_tokens)))
        return events

    def remove(self, seq_ids: Sequence[int]) -> dict[int, KVState | None]:
        uids = [self._uid[s] for s in seq_ids if s in self._uid]
        if not uids:
            return {}
        got = self._gen.remove(uids, return_prompt_caches=True)
        out: dict[int, KVState | None] = {}
        for uid in uids:
            seq_id = self._seq[uid]
            self._forget(uid)
            cache, tokens = got.get(uid, (None, None))
            out[seq_id] = self._kv(cache, tokens)
        return out

    def _forget(self, uid: int) -> None:
        seq_id = self._seq.pop(uid, None)
        self._uid.pop(seq_id, None)  # type: ignore[arg-type]
        self._decoding.discard(uid)
        self._length.pop(uid, None)

    def _kv(self, caches: list[Any] | None, tokens: Sequence[int] | None) -> KVState | None:
        """A KVState for an extracted cache, if it covers exactly ``tokens``."""
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        if not caches or not tokens:
            return None
        full = [c for c in caches if type(c) is KVCache]
        if any(c.offset != len(tokens) for c in full):
            return None  # not a consistent cache: keep nothing rather than something wrong
        mx.eval([x for c in caches for x in (getattr(c, "keys", None), getattr(c, "values", None)) if x is not None])
        return KVState(tuple(int(t) for t in tokens), caches, len(tokens) * self.model.info.kv_bytes_per_token)

    def close(self) -> None:
        self._gen.close()
        self._uid.clear()
        self._seq.clear()
        self._decoding.clear()
        self._length.clear()
