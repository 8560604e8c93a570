"""Continuous batching on the real embedded model (float32): batched output equals alone,
seeds, cache extraction, chunked prefill between decode steps, cancellation inside a batch."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from semantic.batching import BatchOptions, SequenceSpec
from semantic.harness import drain, incoming, stage_context
from semantic.items import Tokenized
from semantic.model import ChatMessage, SamplingParams
from semantic.request import TextDelta
from semantic.stages.decode import Decode

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is 2+2?",
    "Name three colors of the rainbow and say one thing about each.",
    "Hi",
    "Write a haiku about the sea.",
]
GREEDY = SamplingParams(max_tokens=32, temperature=0)


def prompts(model):
    return [tuple(model.tokenizer.encode_chat([ChatMessage("user", q)])) for q in QUESTIONS]


def run_engine(model, specs, *, join_every=1, options=BatchOptions(max_batch=8, prefill_chunk=64), cancel=None):
    """Drive one engine (on the worker thread): add a sequence every ``join_every`` steps;
    ``cancel=(seq, tokens, step)`` removes ``seq`` once it has ``tokens`` tokens, from ``step`` on.

    Returns tokens per sequence, finished KV per sequence and the steps' stats.
    """
    engine = model.batch_engine(options)
    tokens = {s.seq_id: [] for s in specs}
    kvs, stats, waiting, step = {}, [], list(specs), 0
    while waiting or engine.active:
        if waiting and step % join_every == 0:
            engine.add(waiting.pop(0))
        if cancel is not None and len(tokens[cancel[0]]) >= cancel[1] and step >= cancel[2] and cancel[0] not in kvs:
            kvs[cancel[0]] = engine.remove([cancel[0]])[cancel[0]]
        for ev in engine.step():
            tokens[ev.seq_id].append(ev.token)
            if ev.finish:
                kvs[ev.seq_id] = ev.kv
        stats.append((engine.stats, {sid: len(t) for sid, t in tokens.items()}))
        step += 1
    engine.close()
    return tokens, kvs, stats


def test_greedy_tokens_are_the_same_alone_and_in_a_batch_that_changes(mlx, smollm):
    ps = prompts(smollm)
    specs = [SequenceSpec(i, p, None, 0, SamplingParams(max_tokens=8 + 8 * i, temperature=0)) for i, p in enumerate(ps)]
    alone = [mlx.run_sync(run_engine, smollm, [s])[0][s.seq_id] for s in specs]
    together, kvs, _ = mlx.run_sync(partial(run_engine, join_every=3), smollm, specs)  # join at steps 0, 3, 6, 9
    for i, spec in enumerate(specs):
        assert together[i] == alone[i], QUESTIONS[i]
        kv = kvs[i]  # cache extraction: exactly the prompt and every token generated
        assert kv.tokens == spec.prompt + tuple(together[i]) and kv.payload[0].offset == len(kv.tokens)


def test_the_lean_decode_step_gives_mlx_lm_batch_generator_tokens(mlx, smollm):
    """The engine's step skips the log-probabilities; the tokens are still mlx-lm's own."""
    from mlx_lm.generate import BatchGenerator

    from semantic.mlx_batch import lean_generation_batch

    ps = prompts(smollm)

    def plain():
        gen = BatchGenerator(smollm.module, stop_tokens=[[t] for t in smollm.tokenizer.eos_token_ids], completion_batch_size=8)
        uids = gen.insert([list(p) for p in ps], max_tokens=[24] * len(ps))
        out, done = {u: [] for u in uids}, set()
        for _ in range(200):
            for r in gen.next()[1]:
                out[r.uid].append(int(r.token))
                if r.finish_reason is not None:
                    done.add(r.uid)
            if len(done) == len(uids):
                break
        gen.close()
        assert type(gen._generation_batch) is not lean_generation_batch()
        return [out[u] for u in uids]

    def engine_batch_type():
        engine = smollm.batch_engine(BatchOptions(max_batch=8))
        try:
            return type(engine._gen._generation_batch)
        finally:
            engine.close()

    specs = [SequenceSpec(i, p, None, 0, SamplingParams(max_tokens=24, temperature=0)) for i, p in enumerate(ps)]
    ours = mlx.run_sync(run_engine, smollm, specs)[0]  # joining one a step
    assert [ours[i] for i in range(len(ps))] == mlx.run_sync(plain)
    assert mlx.run_sync(engine_batch_type) is lean_generation_batch()


def test_first_tokens_come_with_the_step_that_prefills_their_prompts(mlx, smollm):
    """mlx-lm returns a token one step after computing it and feeds a prompt's last token a step
    after the rest; the engine sends first tokens from the step that prefills the prompt."""
    ps = prompts(smollm)
    limits = [6, 6, 1]

    def run():
        engine = smollm.batch_engine(BatchOptions(max_batch=8))
        try:
            for i, n in enumerate(limits):
                engine.add(SequenceSpec(i, ps[i], None, 0, SamplingParams(max_tokens=n, temperature=0)))
            first = engine.step()
            rest = []
            while engine.active:
                rest.extend(engine.step())
            return first, rest
        finally:
            engine.close()

    first, rest = mlx.run_sync(run)
    assert sorted(e.seq_id for e in first if e.token is not None) == [0, 1, 2]
    for i, n in enumerate(limits):
        events = [e for e in first + rest if e.seq_id == i]
        tokens = [e.token for e in events if e.token is not None]
        (done,) = [e for e in events if e.finish is not None]
        assert len(tokens) == n or (done.finish == "stop" and len(tokens) < n)
        assert done.kv.tokens[: len(ps[i])] == ps[i] and len(done.kv.tokens) >= len(ps[i]) + len(tokens)


def test_samplers_take_raw_logits(mlx):
    """Logits are not normalized by the step: top_p normalizes for itself; equal unseeded settings share a sampler."""
    from semantic.mlx_batch import make_sampler

    def run():
        import mlx.core as mx

        logits = mx.array([[0.0, 0.0, -30.0, -30.0, -30.0]]) - 120.0  # exp() of these underflows float32
        top_p = make_sampler(SamplingParams(8, temperature=1.0, top_p=0.9, seed=5), 5)
        drawn = {top_p(logits).item() for _ in range(60)}
        flat = make_sampler(SamplingParams(8, temperature=1.0, seed=5), 5)
        spread = {flat(mx.zeros((1, 5)) + 120.0).item() for _ in range(60)}
        same = make_sampler(SamplingParams(8, temperature=0.7, top_k=3), 5) is make_sampler(SamplingParams(8, temperature=0.7, top_k=3), 5)
        differ = make_sampler(SamplingParams(8, temperature=0.7), 5) is not make_sampler(SamplingParams(8, temperature=0.8), 5)
        return drawn, spread, same, differ

    drawn, spread, same, differ = mlx.run_sync(run)
    assert drawn == {0, 1}  # two tokens of p = 0.5: top_p 0.9 keeps both, and only them
    assert spread == {0, 1, 2, 3, 4}  # uniform logits, shifted: every token comes up
    assert same and differ


def test_a_sequence_resumed_from_its_extracted_cache_continues_like_a_fresh_one(mlx, smollm):
    (p, *_) = prompts(smollm)
    _, kvs, _ = mlx.run_sync(run_engine, smollm, [SequenceSpec(0, p, None, 0, GREEDY)])
    kv = kvs[0]
    follow = kv.tokens + tuple(smollm.tokenizer.encode("\nuser\nAnd 3+3?"))
    cold = mlx.run_sync(run_engine, smollm, [SequenceSpec(1, follow, None, 0, GREEDY)])[0][1]
    warm = mlx.run_sync(run_engine, smollm, [SequenceSpec(1, follow, kv, len(kv.tokens), GREEDY)])[0][1]
    assert warm == cold


def test_same_seed_same_output_whatever_else_is_in_the_batch(mlx, smollm):
    ps = prompts(smollm)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    alone = mlx.run_sync(run_engine, smollm, [SequenceSpec(0, ps[1], None, 0, seeded)])[0][0]
    crowd = [SequenceSpec(0, ps[1], None, 0, seeded)] + [SequenceSpec(i, ps[i], None, 0, GREEDY) for i in (2, 3)]
    batched = mlx.run_sync(partial(run_engine, join_every=2), smollm, crowd)[0][0]
    # joining a running batch: its first token is sampled from its own prefill chunk
    joining = [SequenceSpec(i, ps[i], None, 0, GREEDY) for i in (2, 3)] + [SequenceSpec(0, ps[1], None, 0, seeded)]
    joined = mlx.run_sync(partial(run_engine, join_every=2), smollm, joining)[0][0]
    other = mlx.run_sync(run_engine, smollm, [SequenceSpec(0, ps[1], None, 0, SamplingParams(max_tokens=24, temperature=0.9, seed=99))])[0][0]
    assert batched == alone and joined == alone and other != alone
    # clients send any integer (OpenAI's seed is signed): taken modulo 2**64, never a failure
    wrapped = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, top_k=40, seed=1234 - 2**64)
    assert mlx.run_sync(run_engine, smollm, [SequenceSpec(0, ps[1], None, 0, wrapped)])[0][0] == alone


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(mlx, smollm):
    ps = prompts(smollm)
    long_prompt = tuple(smollm.tokenizer.encode_chat([ChatMessage("user", "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 20)]))
    running = SequenceSpec(0, ps[3], None, 0, SamplingParams(max_tokens=200, temperature=0))
    late = SequenceSpec(1, long_prompt, None, 0, SamplingParams(max_tokens=4, temperature=0))
    options = BatchOptions(max_batch=4, prefill_chunk=96, prefill_share=1.0, whole_prompt=64)
    tokens, _, stats = mlx.run_sync(partial(run_engine, join_every=6, options=options), smollm, [running, late])
    # steps where the long prompt was being prefilled while the first sequence kept decoding
    during = [(s, n) for s, n in stats if s.prefill_tokens and n[1] == 0 and n[0] > 0]
    assert len(long_prompt) > 200 and len(during) >= 3  # several chunks, not one
    assert all(s.chunk < len(long_prompt) for s, _ in during)
    produced = [n[0] for _, n in during]
    # the running stream kept producing: a token in (nearly) every step of the prefill
    assert produced == sorted(produced) and produced[-1] - produced[0] >= 0.8 * (len(during) - 1)
    assert len(tokens[1]) == 4
    whole = BatchOptions(max_batch=4, prefill_chunk=96, whole_prompt=10_000)  # one pass inside the batch
    assert tokens[1] == mlx.run_sync(partial(run_engine, options=whole), smollm, [late])[0][1]
    # leaving half-way through its prefill hands back the part already prefilled
    _, kvs, _ = mlx.run_sync(partial(run_engine, join_every=6, options=options, cancel=(1, 0, 9)), smollm, [running, late])
    kv = kvs[1]
    assert kv is not None and 0 < len(kv.tokens) < len(long_prompt) and kv.tokens == long_prompt[: len(kv.tokens)]
    assert kv.payload[0].offset == len(kv.tokens)


def test_prompts_joining_a_running_batch_take_one_chunk_a_step_and_overtake_a_long_one(mlx, smollm):
    """While others decode, a step prefills at most one chunk: a short prompt whole, a long one in
    pieces. Short prompts joining while a long one is prefilled go first (turns alternate), and
    each joins with its first token from the step that prefilled its last chunk."""
    ps = prompts(smollm)
    long_prompt = tuple(smollm.tokenizer.encode_chat([ChatMessage("user", "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 30)]))
    specs = [
        SequenceSpec(0, ps[3], None, 0, SamplingParams(max_tokens=120, temperature=0)),
        SequenceSpec(1, long_prompt, None, 0, SamplingParams(max_tokens=2, temperature=0)),
    ] + [SequenceSpec(i, ps[i % 3], None, 0, SamplingParams(max_tokens=2, temperature=0)) for i in range(2, 6)]
    options = BatchOptions(max_batch=8, prefill_chunk=64, prefill_share=1.0, whole_prompt=64)
    tokens, _, stats = mlx.run_sync(partial(run_engine, join_every=2, options=options), smollm, specs)
    assert all(s.prefill_tokens == s.chunk for s, n in stats[1:])  # one chunk, nothing prefilled inside the batch
    first = {i: next(k for k, (_, n) in enumerate(stats) if n[i]) for i in range(1, 6)}
    assert all(first[i] < first[1] for i in range(2, 6))  # the short ones joined before the long one
    assert all(stats[first[i]][0].chunk == len(ps[i % 3]) for i in range(2, 6))  # whole, first token at once
    joins = {first[i] for i in range(2, 6)}
    long_chunks = [s.chunk for k, (s, _) in enumerate(stats[: first[1] + 1]) if s.chunk and k not in joins]
    assert sum(long_chunks) == len(long_prompt) and len(long_chunks) > 3  # in pieces, between the joins
    assert all(len(tokens[i]) == 2 for i in range(1, 6))
    alone = [mlx.run_sync(run_engine, smollm, [SequenceSpec(i, specs[i].prompt, None, 0, specs[i].params)])[0][i] for i in range(1, 6)]
    assert [tokens[i] for i in range(1, 6)] == alone


def test_a_short_prompt_joining_a_running_batch_is_prefilled_in_one_pass(mlx, smollm):
    ps = prompts(smollm)
    running = SequenceSpec(0, ps[3], None, 0, SamplingParams(max_tokens=40, temperature=0))
    short = SequenceSpec(1, ps[1], None, 0, SamplingParams(max_tokens=4, temperature=0))
    options = BatchOptions(max_batch=4, prefill_chunk=512, prefill_share=0.1, whole_prompt=len(ps[1]))
    _, _, stats = mlx.run_sync(partial(run_engine, join_every=6, options=options), smollm, [running, short])
    late = [s for s, _ in stats[6:] if s.prefill_tokens]  # the short one joins at step 6
    assert [s.prefill_tokens for s in late] == [len(ps[1])]  # the whole prompt, in one chunk
    cut = BatchOptions(max_batch=4, prefill_chunk=512, prefill_share=0.1, whole_prompt=len(ps[1]) - 1)
    _, _, stats = mlx.run_sync(partial(run_engine, join_every=6, options=cut), smollm, [running, short])
    assert len([s for s, _ in stats[6:] if s.prefill_tokens]) > 1  # one token too long: chunked


def test_cancelling_one_sequence_leaves_the_others_untouched(mlx, smollm):
    ps = prompts(smollm)
    specs = [SequenceSpec(i, ps[i], None, 0, SamplingParams(max_tokens=24, temperature=0)) for i in range(3)]
    alone = [mlx.run_sync(run_engine, smollm, [s])[0][s.seq_id] for s in specs]
    tokens, kvs, _ = mlx.run_sync(partial(run_engine, cancel=(1, 3, 0)), smollm, specs)
    assert tokens[0] == alone[0] and tokens[2] == alone[2]
    assert len(tokens[1]) <= 4 and tokens[1] == alone[1][: len(tokens[1])]  # out within a step
    kv = kvs[1]  # what it had is handed back (covers exactly its tokens)
    assert kv is None or kv.payload[0].offset == len(kv.tokens)


def test_decode_stage_batches_requests_and_streams_each(mlx, smollm):
    ps = prompts(smollm)

    async def main():
        async with stage_context(model=smollm, worker=mlx) as ctx:
            items = [
                incoming(q, max_tokens=16, max_events=256).advance(Tokenized, agent_id=f"a{i}", prompt_tokens=p)
                for i, (q, p) in enumerate(zip(QUESTIONS, ps))
            ]
            decode = Decode(None, ctx)
            send, recv = trio.open_memory_channel(0)
            out_send, out_recv = trio.open_memory_channel(0)
            async with trio.open_nursery() as n:
                await n.start(decode.run, recv, out_send)
                async with send:
                    for item in items:
                        await send.send(item)
                out = [x async for x in out_recv]
            return items, out, ctx

    items, out, ctx = trio.run(main)
    alone = [mlx.run_sync(run_engine, smollm, [SequenceSpec(0, p, None, 0, SamplingParams(max_tokens=16, temperature=0))])[0][0] for p in ps]
    assert len(out) == 4 and ctx.metrics.counters["decode_batch"] >= 1
    for item, tokens in zip(items, alone):
        text = "".join(e.text for e in drain(item.request) if isinstance(e, TextDelta))
        eos = smollm.tokenizer.eos_token_ids
        assert text == smollm.tokenizer.decode([t for t in tokens if t not in eos])


def test_prompts_arriving_on_an_idle_engine_are_prefilled_together(mlx, smollm):
    text = "the quick brown fox jumps over the lazy dog. " * 8
    longs = [tuple(smollm.tokenizer.encode_chat([ChatMessage("user", f"Topic {i}: {text}")])) for i in range(3)]

    def prefill_steps(options):
        engine = smollm.batch_engine(options)
        for i, p in enumerate(longs):
            engine.add(SequenceSpec(i, p, None, 0, SamplingParams(max_tokens=2, temperature=0)))
        steps = []
        while engine.active:
            engine.step()
            steps.append(engine.stats.prefill_tokens)
        engine.close()
        return [n for n in steps if n]

    assert all(len(p) > 64 for p in longs)
    together = mlx.run_sync(prefill_steps, BatchOptions(max_batch=4, prefill_chunk=512, whole_prompt=32))
    assert len(together) == 1 and together[0] >= sum(len(p) - 1 for p in longs)  # one batched prefill
    alone = mlx.run_sync(prefill_steps, BatchOptions(max_batch=4, prefill_chunk=512, whole_prompt=32, idle_whole_tokens=0))
    assert len(alone) > 1  # without it: the long prompts one after the other, in chunks


def last_row_check(module, tokens, exact=True):
    """``last_logits`` against the model's own logits of every position (fresh caches each);
    ``exact``: one pass, so the same keys and values bit for bit."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from semantic.mlx_batch import _LastPosition, last_logits

    full_cache, last_cache = make_prompt_cache(module), make_prompt_cache(module)
    full = module(mx.array([tokens]), cache=full_cache)[:, -1, :]
    rows = []  # what the final norm passes on to the head, when it is cut
    cut = _LastPosition.__call__
    _LastPosition.__call__ = lambda self, h, *a, **k: rows.append(h.shape[1]) or cut(self, h, *a, **k)
    try:
        last = last_logits(module, mx.array([tokens]), last_cache, full.shape[-1])
    finally:
        _LastPosition.__call__ = cut
    assert rows == ([len(tokens)] if exact else [])  # one row of every position goes on to the head
    assert last.shape == full.shape and mx.allclose(last, full, atol=1e-4).item()  # a split pass rounds apart
    assert mx.argmax(last).item() == mx.argmax(full).item()
    for a, b in zip(full_cache, last_cache, strict=True):
        assert a.offset == b.offset == len(tokens)  # the same keys and values go in
        for x, y in zip(a.state[:2], b.state[:2], strict=True):
            x, y = x[..., : len(tokens), :], y[..., : len(tokens), :]
            assert (mx.array_equal(x, y) if exact else mx.allclose(x, y, atol=1e-5)).item()
    return "norm" not in vars(getattr(module, "model", module))  # the model is left as it was


def test_a_prompt_chunk_projects_only_its_last_position(mlx, smollm):
    """The chunk that ends a prompt wants the logits of its last position only: the final norm is
    cut to that row for the pass (the head then projects one row, not 100), and a model without a
    final norm to cut (here a wrapper) gets the same logits from the plain pass."""

    class Wrapped:
        def __init__(self, module):
            self.module, self.layers = module, module.layers  # make_prompt_cache reads .layers

        def __call__(self, inputs, cache):
            return self.module(inputs, cache=cache)

    tokens = list(smollm.tokenizer.encode("the quick brown fox jumps over the lazy dog " * 10))
    assert len(tokens) * smollm.module.args.vocab_size > 1 << 21  # the wrapper runs the last token apart
    assert mlx.run_sync(last_row_check, smollm.module, tokens)
    assert mlx.run_sync(last_row_check, Wrapped(smollm.module), tokens, False)  # its last token in a pass of its own


def test_prompts_arriving_while_nothing_decodes_beside_a_long_prefill_start_together(mlx, smollm):
    """A long prompt is prefilled in chunks; once nothing decodes, prompts arriving together go
    into one batched prefill (not one chunked join each) and start decoding in the same step, as on
    an idle engine: agents that finished together stay in step. That step takes no chunk of the
    long prompt (they would wait for it). Everyone decodes as alone."""
    ps = prompts(smollm)
    long_prompt = tuple(smollm.tokenizer.encode_chat([ChatMessage("user", "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 30)]))
    options = BatchOptions(max_batch=8, prefill_chunk=64, whole_prompt=16)
    running = SequenceSpec(0, ps[2], None, 0, SamplingParams(max_tokens=3, temperature=0))
    arriving = [SequenceSpec(i, ps[i], None, 0, GREEDY) for i in (1, 3)]
    long = SequenceSpec(9, long_prompt, None, 0, SamplingParams(max_tokens=4, temperature=0))

    def drive():
        engine = smollm.batch_engine(options)
        engine.add(running)
        tokens, first_step, waiting = {s.seq_id: [] for s in [running, long, *arriving]}, {}, list(arriving)
        batch_prefills = []  # chunks taken in steps that prefilled prompts inside the batch
        for step in range(400):
            if step == 1:
                engine.add(long)  # beside a decoding sequence: chunked on its own cache
            if waiting and step > 1 and not engine._decoding and long.seq_id in engine._prefills:
                for spec in waiting:
                    engine.add(spec)
                waiting = []
            if not engine.active and not waiting:
                break
            for ev in engine.step():
                if ev.token is not None:
                    tokens[ev.seq_id].append(ev.token)
                    first_step.setdefault(ev.seq_id, step)
            if engine.stats.prefill_tokens > engine.stats.chunk:
                batch_prefills.append(engine.stats.chunk)
        engine.close()
        return tokens, first_step, waiting, batch_prefills

    tokens, first_step, waiting, batch_prefills = mlx.run_sync(drive)
    assert not waiting  # they arrived while the long prompt was still being prefilled
    assert batch_prefills and not any(batch_prefills)
    assert first_step[1] == first_step[3] < first_step[9]
    for spec in [running, long, *arriving]:
        assert tokens[spec.seq_id] == mlx.run_sync(partial(run_engine, options=options), smollm, [spec])[0][spec.seq_id]


def test_decode_gathers_a_burst_while_nothing_decodes_beside_a_long_prefill(mlx, smollm):
    """Nothing decodes while a long prompt is prefilled in chunks: prompts arriving a little apart
    then are gathered as on an idle engine and start in one step (agents that finished together
    start again together, and stay in step)."""
    from semantic.stages.decode import DecodeSettings
    from test_stages import _arrivals

    long = ("Summarize: " + "the quick brown fox jumps over the lazy dog. " * 120, 0.6)  # past the gathering
    sends = [long, *((f"question {i}", 0.05) for i in range(3))]
    settings = DecodeSettings(prefill_chunk=16, whole_prompt=16, idle_whole_tokens=0, idle_gather_ms=100)
    added, out, _ = _arrivals(smollm, settings, sends, upstream=4, worker=mlx)
    assert len(out) == 4
    assert added[0] == 0 and 0 < added[1] == added[2] == added[3]


def test_prompts_joining_a_running_batch_decode_as_they_would_alone(mlx, smollm):
    """The engine-prefilled join: from a cached prefix, taken whole when long (the last position's
    logits only), and with a single token to generate."""
    ps = prompts(smollm)
    running = SequenceSpec(0, ps[3], None, 0, SamplingParams(max_tokens=60, temperature=0))
    kv = mlx.run_sync(run_engine, smollm, [SequenceSpec(1, ps[0], None, 0, GREEDY)])[1][1]
    follow = kv.tokens + tuple(smollm.tokenizer.encode("\nuser\nAnd 3+3?"))
    cold = mlx.run_sync(run_engine, smollm, [SequenceSpec(1, follow, None, 0, GREEDY)])[0][1]
    warm, _, stats = mlx.run_sync(partial(run_engine, join_every=3), smollm, [running, SequenceSpec(1, follow, kv, len(kv.tokens), GREEDY)])
    assert warm[1] == cold and [s.chunk for s, _ in stats if s.chunk] == [len(follow) - len(kv.tokens)]

    long_prompt = tuple(smollm.tokenizer.encode_chat([ChatMessage("user", "Summarize: " + "the quick brown fox jumps over the lazy dog. " * 20)]))
    whole = BatchOptions(max_batch=4, prefill_chunk=512, whole_prompt=10_000)
    alone = mlx.run_sync(partial(run_engine, options=whole), smollm, [SequenceSpec(2, long_prompt, None, 0, GREEDY)])[0][2]
    joined, _, stats = mlx.run_sync(partial(run_engine, join_every=3, options=whole), smollm, [running, SequenceSpec(2, long_prompt, None, 0, GREEDY)])
    assert joined[2] == alone and [s.chunk for s, _ in stats if s.chunk] == [len(long_prompt)]

    tokens, kvs, _ = mlx.run_sync(partial(run_engine, join_every=3), smollm, [running, SequenceSpec(3, ps[1], None, 0, SamplingParams(max_tokens=1, temperature=0))])
    (first,) = [t for t in tokens[3] if t is not None]
    assert kvs[3].tokens == ps[1] + (first,) and kvs[3].payload[0].offset == len(ps[1]) + 1


def test_short_prompts_waiting_together_join_in_one_pass(mlx, smollm):
    """Short prompts that wait at the same time while others decode (agents arriving a little
    apart) are prefilled in one batched pass, a cached prefix or not, and all join in that step
    with their first tokens; each decodes as it would alone, a seeded one as it does joining
    alone, and the cached prefix they started from is not written."""
    ps = prompts(smollm)
    kv = mlx.run_sync(run_engine, smollm, [SequenceSpec(9, ps[0], None, 0, GREEDY)])[1][9]
    follow = kv.tokens + tuple(smollm.tokenizer.encode("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"))
    running = SequenceSpec(0, ps[3], None, 0, SamplingParams(max_tokens=40, temperature=0))
    waiting = [
        SequenceSpec(1, ps[1], None, 0, GREEDY),
        SequenceSpec(2, follow, kv, len(kv.tokens), GREEDY),
        SequenceSpec(3, ps[2], None, 0, SamplingParams(max_tokens=6, temperature=0)),
        SequenceSpec(4, ps[0], None, 0, SamplingParams(max_tokens=12, temperature=0.9, seed=11)),
    ]
    stored = [(c.keys[..., : c.offset, :].tolist(), c.values[..., : c.offset, :].tolist()) for c in kv.payload[:2]]
    def drive(options):
        engine = smollm.batch_engine(options)
        engine.add(running)
        tokens = {s.seq_id: [] for s in [running, *waiting]}
        stats = []
        for step in range(200):
            if step == 3:
                for spec in waiting:
                    engine.add(spec)
            if not engine.active:
                break
            for ev in engine.step():
                if ev.token is not None:
                    tokens[ev.seq_id].append(ev.token)
            stats.append((engine.stats, {k: len(v) for k, v in tokens.items()}))
        engine.close()
        return tokens, stats

    tokens, stats = mlx.run_sync(drive, BatchOptions(max_batch=8, prefill_chunk=512, whole_prompt=512))
    chunks = [(k, s.chunk) for k, (s, _) in enumerate(stats) if s.chunk]
    cached = len(follow) - len(kv.tokens)
    assert chunks == [(3, len(ps[1]) + cached + len(ps[2]) + len(ps[0]))]  # one pass, in the step they arrived
    assert all(stats[3][1][s.seq_id] == 1 for s in waiting)  # each sent its first token in it
    assert stats[3][1][0] == stats[2][1][0] + 1  # and the running stream got its token too
    for spec in waiting:
        fresh = SequenceSpec(spec.seq_id, spec.prompt, None, 0, spec.params)
        assert tokens[spec.seq_id] == mlx.run_sync(run_engine, smollm, [fresh])[0][spec.seq_id]
    assert tokens[0] == mlx.run_sync(run_engine, smollm, [running])[0][0]
    # the seeded one samples its first token from raw logits, as a prompt joining alone does
    single = mlx.run_sync(partial(run_engine, join_every=3), smollm, [running, waiting[3]])[0][4]
    assert tokens[4] == single
    # a pass counts its rows padded to the deepest cached prefix: with a smaller budget the one
    # that has a prefix goes apart (first: it has the least left), the three others together
    budget = 3 * max(len(p) for p in ps[:3])
    assert budget < 2 * (min(len(p) for p in ps[:3]) + len(kv.tokens))
    _, stats = mlx.run_sync(drive, BatchOptions(max_batch=8, prefill_chunk=512, whole_prompt=budget))
    assert [s.chunk for s, _ in stats if s.chunk] == [cached, len(ps[1]) + len(ps[2]) + len(ps[0])]
    # the stored prefix was copied, not written through
    assert stored == [(c.keys[..., : c.offset, :].tolist(), c.values[..., : c.offset, :].tolist()) for c in kv.payload[:2]]
