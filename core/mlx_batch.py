"""Continuous batching for mlx-lm models: mlx-lm's ``BatchGenerator`` behind :class:`BatchEngine`.

``BatchGenerator`` runs one decode step for the generation batch on every ``next()``. Prompts
arriving on an idle engine (nothing decoding, even while a long prompt is prefilled in chunks; up
to ``idle_whole_tokens`` in all) go into it and are prefilled together in one batched pass, the
way a burst of new agents is best served: agents that finished together start again together. A
prompt arriving while others decode is prefilled by this engine on a cache of its own, one chunk
after each decode step: a short prompt (``whole_prompt``) in one chunk, a long one in chunks
sized to take about ``prefill_share`` × a plain decode step, steered by its own chunks' times (a
pass has a fixed part and attention grows with depth, so chunks shrink as the prompt gets
deeper); with nothing decoding, chunks are ``prefill_chunk`` tokens. Turns alternate between the
prompt with the least left and the oldest, so short prompts overtake a long one; short prompts
waiting at the same time are prefilled together in one pass and join in one step. The chunk that
ends a prompt includes its last token and samples the first token from the logits of that
position only (:func:`last_logits`), and the sequence joins the generation batch ready to decode:
no extra forward pass and no extra decode step for the others.
Running streams keep their pace while a 7K-token prompt is prefilled.

Cache injection: a sequence starts from the prefix cache-lookup joined (``insert(caches=...)``
copies it; the stored blocks are never written). Cache extraction: a finished or removed
sequence hands back a per-layer ``KVCache`` list covering exactly its tokens.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .batching import BatchEngine, BatchOptions, SeqEvent, SequenceSpec, StepStats
from .model import KVState, SamplingParams

if TYPE_CHECKING:
    from .mlx_model import MLXLMModel

#: Weight of the newest measurement in the running averages of step and prefill times.
EMA = 0.5

#: Without a final norm to cut at (see :func:`last_logits`), a prompt's last chunk computes the
#: logits of all its positions in one pass up to this many values (chunk tokens × vocabulary; 8 MB
#: of float32); a bigger one runs its last token apart.
LOGITS_ONE_PASS = 1 << 21


def make_sampler(params: SamplingParams, vocab_size: int) -> Any:
    """The sampler for one sequence; None means greedy (shared, so a greedy batch samples at once).

    Samplers take the raw logits of their rows: the decode step does not normalize them (a
    log-sum-exp over the vocabulary each step costs ~0.7 ms a sequence on a CPU), so a sampler
    normalizes itself where it needs probabilities (top_p). With a ``seed`` the sampler draws from
    its own key, so the same seed and prompt give the same output whatever else is in the batch;
    without one, equal settings share one sampler, and a batch of them samples in one call.
    """
    import mlx.core as mx

    if params.temperature <= 0:
        return None
    top_p = params.top_p if params.top_p is not None and 0 < params.top_p < 1 else 0.0
    top_k = params.top_k if params.top_k is not None and 0 < params.top_k < vocab_size else 0
    if params.seed is None:
        return _shared_sampler(params.temperature, top_p, top_k)
    key = mx.random.key(params.seed % 2**64)  # any integer, as clients send them
    scale = 1.0 / params.temperature

    def sample(logits: Any) -> Any:
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.categorical(_truncated(logits, top_p, top_k) * scale, key=sub)

    return sample


def _truncated(logits: Any, top_p: float, top_k: int) -> Any:
    """Raw logits with top_p (on normalized log-probabilities) and top_k applied; 0 is off."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_top_k, apply_top_p

    if top_p:
        logits = apply_top_p(logits - mx.logsumexp(logits, axis=-1, keepdims=True), top_p)
    if top_k:
        logits = apply_top_k(logits, top_k)
    return logits


@functools.lru_cache(maxsize=64)
def _shared_sampler(temperature: float, top_p: float, top_k: int) -> Any:
    import mlx.core as mx

    scale = 1.0 / temperature

    def sample(logits: Any) -> Any:
        return mx.random.categorical(_truncated(logits, top_p, top_k) * scale)

    return sample


@functools.cache
def lean_generation_batch() -> type:
    """mlx-lm's ``GenerationBatch`` with a leaner decode step, for semantic's samplers.

    The step is mlx-lm's, less two things no semantic request uses: normalizing the logits into
    log-probabilities (samplers get raw logits, see :func:`make_sampler`), and evaluating and
    splitting a vocabulary-sized log-probability vector per sequence per step. With logits
    processors it is mlx-lm's step unchanged. ``joined`` keeps the first tokens of sequences that
    joined, so the engine can send them at once (mlx-lm's step returns each token one step after
    computing it, to overlap the next step's graph building with this one's compute).
    """
    import mlx.core as mx
    from mlx_lm.generate import GenerationBatch

    class LeanGenerationBatch(GenerationBatch):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.joined: list[tuple[list[int], Any]] = []  # (uids, their first tokens) since last taken
            super().__init__(*args, **kwargs)

        @classmethod
        def prefilled(cls, model: Any, uid: int, first: Any, caches: list[Any], tokens: list[int], sampler: Any, fallback: Any, stop: Any, max_tokens: int) -> Any:
            """A batch of one sequence whose whole prompt is in ``caches`` and whose first token
            ``first`` is already sampled: it joins the generation batch without a forward pass of
            its own (mlx-lm's ``generate`` runs one for the prompt's last token)."""
            from mlx_lm.generate import _merge_caches

            batch = cls(model, [], first, _merge_caches([caches]), [list(tokens)], [], fallback, [], [stop], [max_tokens])
            # with no uids __init__ takes no step; now make it the one sequence's batch
            batch.uids = [uid]
            batch.samplers = [sampler]
            batch.logits_processors = [()]
            batch._num_tokens = [0]
            batch._next_logprobs = [None]
            return batch

        def extend(self, batch: Any) -> None:
            super().extend(batch)
            if batch.uids and batch._next_tokens is not None:
                self.joined.append((list(batch.uids), batch._next_tokens))

        def _step(self) -> tuple[list[int], list[Any]]:
            if any(self.logits_processors):
                return super()._step()
            self._current_tokens = self._next_tokens
            self._current_logprobs = self._next_logprobs
            inputs = self._current_tokens
            logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]
            samplers = [self.fallback_sampler if s is None else s for s in (self.samplers or [None] * len(self.uids))]
            if all(s is samplers[0] for s in samplers):
                sampled = samplers[0](logits)
            else:
                sampled = mx.concatenate([s(logits[e : e + 1]) for e, s in enumerate(samplers)], axis=0)
            self._next_tokens = sampled
            self._next_logprobs = [None] * len(self.uids)
            mx.async_eval(self._next_tokens)  # the next step's tokens compute while this one returns
            mx.eval(inputs)
            tokens = inputs.tolist()
            for seen, token in zip(self.tokens, tokens, strict=True):
                seen.append(token)
            return tokens, self._current_logprobs

    return LeanGenerationBatch


#: mlx-lm model types whose inner model calls its final norm once, as its last step (checked in
#: their sources); others (a looped model normalizes after every loop) take the plain path.
FINAL_NORM_ONCE = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gpt_oss"})


class _LastPosition:
    """Stands in for a model's final norm: normalizes only the last position, so the head that
    follows projects one row onto the vocabulary instead of every position of a prompt chunk."""

    def __init__(self, norm: Any) -> None:
        self.norm = norm

    def __call__(self, h: Any, *args: Any, **kwargs: Any) -> Any:
        return self.norm(h[:, -1:, :], *args, **kwargs)


def last_logits(module: Any, tokens: Any, caches: list[Any], vocab: int) -> Any:
    """The logits of the last position of ``tokens`` (shape (1, n)) run through ``module`` on
    ``caches``, shape (1, vocab).

    mlx-lm models end with their inner model's final norm (``module.model.norm``) and a head over
    every position: for the types in ``FINAL_NORM_ONCE`` the norm is swapped for one that keeps
    the last position only (the caches get the same keys and values either way). Other models
    run a long chunk's last token in a pass of its own beyond ``LOGITS_ONE_PASS``.
    """
    inner = getattr(module, "model", None)
    norm = getattr(inner, "norm", None)
    known = getattr(module, "model_type", None) in FINAL_NORM_ONCE
    if known and norm is not None and callable(norm) and "norm" not in vars(inner):
        # an instance attribute shadows the module's child for this pass (its parameters stay)
        object.__setattr__(inner, "norm", _LastPosition(norm))
        try:
            return module(tokens, cache=caches)[:, -1, :]
        finally:
            object.__delattr__(inner, "norm")
    n = tokens.shape[1]
    if n > 1 and n * vocab > LOGITS_ONE_PASS:
        module(tokens[:, :-1], cache=caches)  # its logits are never evaluated
        tokens = tokens[:, -1:]
    return module(tokens, cache=caches)[:, -1, :]


def _ema(old: float | None, new: float) -> float:
    return new if old is None else EMA * new + (1 - EMA) * old


@dataclass(slots=True)
class _Prefill:
    """A prompt being prefilled on its own cache, beside the batch; ``pos`` tokens are in the cache."""

    spec: SequenceSpec
    caches: list[Any]
    pos: int
    whole: bool  # short: prefilled in one chunk
    size: int | None = None  # its chunk while others decode, steered by its own chunks' times


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
            prefill_step_size=max(options.prefill_chunk, options.whole_prompt),
        )
        # Joining sequences extend this batch, so every step after a sequence's first is the lean one.
        self._gen._generation_batch = lean_generation_batch().empty(model.module, self._gen.sampler)
        self._uid: dict[int, int] = {}  # seq_id -> BatchGenerator uid
        self._seq: dict[int, int] = {}  # uid -> seq_id
        self._decoding: set[int] = set()  # uids that have produced a token
        self._early: set[int] = set()  # uids whose first token was sent when they joined
        self._eos = model.tokenizer.eos_token_ids
        self._prefills: dict[int, _Prefill] = {}  # seq_id -> prompt being prefilled beside the batch
        self._step_s: float | None = None  # running average of the decode part of a step
        self._base_s: float | None = None  # running average of a step without prefill
        self._token_s: float | None = None  # running average of prefill time per token of steered chunks
        self._idle_tokens = 0  # prompt tokens sent whole since the engine was last busy
        self._turn = 0  # prefill chunks launched: whose turn it is
        self._chunked = False  # the last step prefilled a chunk
        self._vocab = int(getattr(getattr(model.module, "args", None), "vocab_size", 0) or 1 << 30)

    @property
    def active(self) -> int:
        return len(self._seq) + len(self._prefills)

    def add(self, spec: SequenceSpec) -> None:
        start = spec.prefix_len if spec.prefix is not None else 0
        remaining = len(spec.prompt) - start
        # no running stream to keep smooth (a long prompt may be prefilling in chunks; short ones
        # waiting go first): prompts arriving together are prefilled in one batch and decode in
        # step, as they do at the start
        idle = not self._decoding and all(not j.whole for j in self._prefills.values())
        if idle and self._idle_tokens + remaining <= self.options.idle_whole_tokens:
            self._idle_tokens += remaining  # prompts arriving together on an idle engine: one batched prefill
            self._insert(spec, self._start_cache(spec), start)
        else:
            caches = self.model.writable_cache(spec.prefix, start)
            self._prefills[spec.seq_id] = _Prefill(spec, caches, start, remaining <= self.options.whole_prompt)

    def _insert(self, spec: SequenceSpec, caches: list[Any] | None, start: int) -> None:
        (uid,) = self._gen.insert(
            [list(spec.prompt[start:])],
            max_tokens=[spec.params.max_tokens],
            caches=[caches],
            all_tokens=[list(spec.prompt[:start])],
            samplers=[make_sampler(spec.params, self._vocab)],
        )
        self._uid[spec.seq_id] = uid
        self._seq[uid] = spec.seq_id

    def _start_cache(self, spec: SequenceSpec) -> list[Any] | None:
        """The KV caches a short sequence starts from (None: empty); ``insert`` copies them."""
        from .mlx_model import leading_kv

        prefix, n = spec.prefix, spec.prefix_len
        if prefix is None or n <= 0:
            return None
        if n == len(prefix.tokens):
            return list(prefix.payload)
        return leading_kv(prefix.payload, n)

    def _chunk_size(self, job: _Prefill) -> int:
        """Tokens in ``job``'s next chunk: all of a short prompt; else ``prefill_chunk`` while
        nothing decodes, and while others decode as many as fit its time budget (steered by the
        job's own chunks: a chunk costs more the deeper the prompt)."""
        opts = self.options
        left = len(job.spec.prompt) - job.pos
        if job.whole:
            return left
        base = self._base_s or self._step_s
        if not self._decoding or base is None:
            size = opts.prefill_chunk
        else:
            if job.size is None:  # first chunk beside decoding: guess from the rate so far
                job.size = int(opts.prefill_share * base / self._token_s) if self._token_s else 16
            size = job.size
        return max(1, min(left, opts.prefill_chunk, max(opts.min_prefill_chunk, size)))

    def _prefill_chunk(self) -> tuple[float, int]:
        """Prefill one chunk of a waiting prompt; a prompt it ends joins the generation batch.

        With several prompts waiting, turns alternate between the one with the least left to
        prefill (a short prompt joins in a step, even while a long one is prefilled) and the
        oldest (a long prompt keeps at least every other chunk while new ones keep coming). The
        chunk that ends a prompt includes its last token and samples the first generated token
        from it: the sequence joins ready to decode, with no forward pass of its own.
        """
        import mlx.core as mx

        self._turn += 1
        if self._turn % 2:
            job = min(self._prefills.values(), key=lambda j: len(j.spec.prompt) - j.pos)
        else:
            job = next(iter(self._prefills.values()))
        group = self._whole_group(job)
        if len(group) > 1:
            return self._join_together(group)
        spec, prompt = job.spec, job.spec.prompt
        n = self._chunk_size(job)
        final = job.pos + n == len(prompt)
        first = sampler = None
        with mx.stream(self._gen.stream):
            # the chunk's graph is built while the decode step mlx-lm left computing runs on (a
            # pass's graph takes ~15 ms of Python here); the chunk's time is its compute after it
            tokens = mx.array([prompt[job.pos : job.pos + n]])
            outputs: list[Any] = []
            if final:  # the sequence's sampler (and its seed) lives on in the batch from here
                sampler = make_sampler(spec.params, self._vocab) or self._gen.sampler
                first = sampler(last_logits(self.model.module, tokens, job.caches, self._vocab))
                outputs.append(first)
            else:
                self.model.module(tokens, cache=job.caches)  # no logits wanted: never evaluated
            outputs += [c.state for c in job.caches]
            mx.synchronize(self._gen.stream)
            t0 = time.perf_counter()
            mx.eval(outputs)
            dt = time.perf_counter() - t0
        job.pos += n
        base = self._base_s or self._step_s
        if not job.whole:
            self._token_s = _ema(self._token_s, dt / n)
            if self._decoding and base is not None:  # steer the job's next chunk toward its time budget
                job.size = max(1, int(n * min(2.0, max(0.1, self.options.prefill_share * base / dt))))
        if final:
            del self._prefills[spec.seq_id]
            uid = self._gen._uid_count
            self._gen._uid_count += 1
            with mx.stream(self._gen.stream):
                batch = lean_generation_batch().prefilled(
                    self.model.module, uid, first, job.caches, list(prompt), sampler,
                    self._gen.sampler, self._gen._default_stop_sequences, spec.params.max_tokens,
                )  # fmt: skip
                self._gen._generation_batch.extend(batch)
            self._uid[spec.seq_id] = uid
            self._seq[uid] = spec.seq_id
        return dt, n

    def _whole_group(self, job: _Prefill) -> list[_Prefill]:
        """``job`` and, when it is short, the other short prompts waiting that fit with it in one
        pass of ``whole_prompt`` tokens, counted padded: rows times (the longest prompt left plus
        the spread of their cached prefixes, which the batch pads to the deepest). A prompt with
        one token left goes alone."""
        left = lambda j: len(j.spec.prompt) - j.pos  # noqa: E731
        if not job.whole or left(job) < 2:
            return [job]
        group = [job]
        for other in sorted((j for j in self._prefills.values() if j.whole and j is not job and left(j) > 1), key=left):
            rows = [*group, other]
            spread = max(j.pos for j in rows) - min(j.pos for j in rows)
            if len(rows) * (max(left(j) for j in rows) + spread) > self.options.whole_prompt:
                continue
            group.append(other)
        return group

    def _join_together(self, jobs: list[_Prefill]) -> tuple[float, int]:
        """Prefill several short prompts in one batched pass and join them all in this step.

        Their caches (cached prefixes of any length) are merged into one batch cache, the prompts
        but their last tokens go in one right-padded pass (as mlx-lm's prompt batch does it),
        and a lean generation batch of their last tokens samples their first tokens from raw
        logits, as a prompt joining alone does. Agents arriving a little apart (a burst that
        missed the idle gathering) join in one step instead of one a step.
        """
        import mlx.core as mx
        from mlx_lm.generate import _merge_caches, _right_pad_prompts

        first_uid = self._gen._uid_count
        self._gen._uid_count += len(jobs)
        uids = list(range(first_uid, first_uid + len(jobs)))
        rest = [list(j.spec.prompt[j.pos : -1]) for j in jobs]  # every job has 2+ tokens left
        lengths = [len(r) for r in rest]
        padding = [max(lengths) - n for n in lengths]
        with mx.stream(self._gen.stream):
            mx.synchronize(self._gen.stream)  # the decode step still computing is not the prefill's time
            t0 = time.perf_counter()
            caches = _merge_caches([j.caches for j in jobs])
            if any(padding):
                for c in caches:
                    c.prepare(lengths=lengths, right_padding=padding)
            self.model.module(_right_pad_prompts(rest, max_length=max(lengths)), cache=caches)
            if any(padding):
                for c in caches:
                    c.finalize()
            mx.eval([c.state for c in caches])
            joined = lean_generation_batch()(
                self.model.module, uids, mx.array([j.spec.prompt[-1] for j in jobs]), caches,
                [list(j.spec.prompt[:-1]) for j in jobs],
                [make_sampler(j.spec.params, self._vocab) for j in jobs], self._gen.sampler,
                [() for _ in jobs], [self._gen._default_stop_sequences for _ in jobs],
                [j.spec.params.max_tokens for j in jobs],
            )  # fmt: skip  -- its first step samples the first tokens
            mx.eval(joined._next_tokens)
            dt = time.perf_counter() - t0
            self._gen._generation_batch.extend(joined)
        n = 0
        for job, uid in zip(jobs, uids, strict=True):
            n += len(job.spec.prompt) - job.pos
            job.pos = len(job.spec.prompt)
            del self._prefills[job.spec.seq_id]
            self._uid[job.spec.seq_id] = uid
            self._seq[uid] = job.spec.seq_id
        return dt, n

    def step(self) -> list[SeqEvent]:
        events: list[SeqEvent] = []
        decode_s = prefill_s = 0.0
        prefill_tokens = 0
        if self._seq:
            with self._gen.stats() as st:
                prompts, responses = self._gen.next()
                if any(r.end_of_segment and not r.end_of_prompt and r.progress[0] == r.progress[1] - 1 for r in prompts):
                    # prompts prefilled up to their last token: start them now, not a step later
                    responses = responses + self._gen.next()[1]
            decode_s, prefill_s, prefill_tokens = st.decode_time, st.prompt_time, st.prompt_tokens
            if st.generation_steps:
                per_step = st.decode_time / st.generation_steps
                self._step_s = _ema(self._step_s, per_step)
                if not st.prompt_tokens and not self._prefills and not self._chunked:
                    # a plain step (a step after a chunk finds its forward pass done): what
                    # running streams pay per token
                    self._base_s = _ema(self._base_s, per_step + st.prompt_time)
            events = self._events(responses)
        chunk = 0
        if self._prefills and not prefill_tokens:
            # a step that already prefilled prompts inside the batch takes no chunk too: streams
            # would wait for both at once, and prompts just gathered on an idle engine would wait
            # for a long prompt's chunk before their first tokens
            dt, chunk = self._prefill_chunk()
            prefill_s += dt
            prefill_tokens += chunk
        self._chunked = bool(chunk)
        events = self._first_tokens() + events
        self.stats = StepStats(decode_s, prefill_s, prefill_tokens, len(events), chunk)
        if self._decoding:
            self._idle_tokens = 0
        return events

    def _first_tokens(self) -> list[SeqEvent]:
        """The first tokens of sequences that just joined the generation batch, sent now.

        mlx-lm would return them with the next step. An end token is left to that step, which
        reports it as a stop.
        """
        batch = self._gen._generation_batch
        joined, batch.joined = batch.joined, []
        events = []
        for uids, tokens in joined:
            for uid, token in zip(uids, tokens.tolist(), strict=True):
                seq_id = self._seq.get(uid)
                if seq_id is None or token in self._eos:
                    continue
                self._early.add(uid)
                self._decoding.add(uid)
                events.append(SeqEvent(seq_id, int(token)))
        return events

    def _events(self, responses: list[Any]) -> list[SeqEvent]:
        events = []
        for r in responses:
            seq_id = self._seq.get(r.uid)
            if seq_id is None:
                continue
            sent = r.uid in self._early  # this token went out when the sequence joined
            self._early.discard(r.uid)
            if r.finish_reason is None:
                self._decoding.add(r.uid)
                if not sent:
                    events.append(SeqEvent(seq_id, int(r.token)))
                continue
            self._forget(r.uid)
            reason = "stop" if r.finish_reason == "stop" else "length"
            kv = self._kv(r.prompt_cache, r.all_tokens)
            events.append(SeqEvent(seq_id, None if sent else int(r.token), reason, kv))
        return events

    def remove(self, seq_ids: Sequence[int]) -> dict[int, KVState | None]:
        out: dict[int, KVState | None] = {}
        for seq_id in seq_ids:
            job = self._prefills.pop(seq_id, None)
            if job is not None:
                out[seq_id] = self._kv(job.caches, job.spec.prompt[: job.pos])
        uids = [self._uid[s] for s in seq_ids if s in self._uid]
        if not uids:
            return out
        got = self._gen.remove(uids, return_prompt_caches=True)
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
        self._early.discard(uid)

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
        self._early.clear()
        self._prefills.clear()
