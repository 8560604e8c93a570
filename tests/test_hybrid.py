"""A Gemma-3-shaped model with sliding-window layers (tiny, random weights, built here) never gets
a wrong cache: it is not paged into blocks, and a kept state is reused only when all of it matches."""

from __future__ import annotations


import pytest
import trio

from semantic.harness import incoming, run_stage, stage_context
from semantic.items import Tokenized
from semantic.model import LoadContext, SamplingParams
from semantic.plugins.mlx_dir import MLXDirOptions, load_mlx_dir
from semantic.stages.cache_lookup import CacheLookup
from semantic.stages.decode import Decode
from semantic.stages.persist import Persist

pytestmark = pytest.mark.integration

WINDOW = 8


def _config():
    return {
        "model_type": "gemma3_text",
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "vocab_size": 49152,
        "sliding_window": WINDOW,
        "sliding_window_pattern": 2,  # layers 0 and 2 slide, 1 and 3 attend to everything
        "max_position_embeddings": 1024,
        "eos_token_id": 2,
    }


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, mlx, random_model_dir):
    folder = random_model_dir(tmp_path_factory.mktemp("tiny-gemma3"), _config(), seed=3)
    return mlx.run_sync(load_mlx_dir, str(folder), MLXDirOptions(), LoadContext("tiny-gemma3", None, None))


def cold(mlx, model, prompt, n=6):
    def job():
        return list(model.generate(prompt, None, 0, SamplingParams(max_tokens=n, temperature=0)))

    return mlx.run_sync(job)


def test_window_layers_make_the_model_unpageable(gemma):
    assert not gemma.info.pageable
    assert "RotatingKVCache" in gemma.info.cache_layout and "full" in gemma.info.cache_layout


def test_exact_match_reuse_only(mlx, gemma):
    first = list(range(100, 130))  # longer than the window: the window caches have wrapped

    async def turn(ctx, tokens, agent="a"):
        item = incoming("x", max_tokens=6, temperature=0).advance(Tokenized, agent_id=agent, prompt_tokens=tuple(tokens))
        (looked,) = await run_stage(CacheLookup(None, ctx), [item])
        reused = looked.prefix_len if looked.prefix is not None else 0
        (done,) = await run_stage(Decode(None, ctx), [looked])
        kept = done.kv_state.tokens
        await run_stage(Persist(None, ctx), [done])
        return reused, kept

    async def main():
        async with stage_context(model=gemma, worker=mlx) as ctx:
            r1, kept = await turn(ctx, first)
            extended = [*kept, 7, 8, 9]
            r2, _ = await turn(ctx, extended)
            diverged = [*first[:-3], 1, 2, 3, 4]
            r3, _ = await turn(ctx, diverged, agent="b")
            return (r1, r2, r3), extended, diverged, ctx

    (r1, r2, r3), extended, diverged, ctx = trio.run(main)
    assert r1 == 0
    assert r2 == len(extended) - 3  # the whole kept state, exactly
    assert r3 == 0  # a partial match is not reused for window layers
    assert ctx.cache.paged is False and ctx.metrics.counters["cache_hits"] == 1


def test_reused_window_state_gives_the_cold_output(mlx, gemma):
    from semantic.model import KVState

    prompt = list(range(200, 240))

    def job():
        gen = gemma.generate(prompt, None, 0, SamplingParams(max_tokens=5, temperature=0))
        list(gen)
        return gen.kv_state()

    state: KVState = mlx.run_sync(job)
    follow = [*state.tokens, 11, 12, 13]

    def warm():
        return list(gemma.generate(follow, state, len(state.tokens), SamplingParams(max_tokens=6, temperature=0)))

    assert mlx.run_sync(warm) == cold(mlx, gemma, follow)
    assert mlx.run_sync(warm) == cold(mlx, gemma, follow)  # the kept state was not written through


def test_a_prompt_chunk_projects_only_its_last_position(mlx, gemma):
    from test_batching_mlx import last_row_check

    assert mlx.run_sync(last_row_check, gemma.module, list(range(100, 140)))  # past the window


def test_prompts_joining_a_running_batch_together_decode_as_alone(mlx, gemma):
    """Window layers in the batched paths: short prompts waiting together while another decodes
    are prefilled in one pass (one longer than the window, one shorter), a prompt joins alone
    beside them, and each decodes as it would on its own."""
    from semantic.batching import BatchOptions, SequenceSpec

    greedy = SamplingParams(max_tokens=6, temperature=0)
    running = SequenceSpec(0, tuple(range(300, 320)), None, 0, SamplingParams(max_tokens=30, temperature=0))
    together = [SequenceSpec(1, tuple(range(400, 430)), None, 0, greedy), SequenceSpec(2, tuple(range(500, 505)), None, 0, greedy)]
    alone = SequenceSpec(3, tuple(range(600, 612)), None, 0, greedy)

    def drive():
        engine = gemma.batch_engine(BatchOptions(max_batch=8, prefill_chunk=64, whole_prompt=128))
        engine.add(running)
        tokens = {s.seq_id: [] for s in [running, *together, alone]}
        chunks = []
        for step in range(100):
            if step == 2:
                for spec in together:
                    engine.add(spec)
            if step == 6:
                engine.add(alone)
            if not engine.active:
                break
            for ev in engine.step():
                if ev.token is not None:
                    tokens[ev.seq_id].append(ev.token)
            chunks.append(engine.stats.chunk)
        engine.close()
        return tokens, [c for c in chunks if c]

    tokens, chunks = mlx.run_sync(drive)
    assert chunks == [35, 12]  # the two waiting together in one pass; the late one alone
    for spec in [running, *together, alone]:
        assert tokens[spec.seq_id] == [t for t in cold(mlx, gemma, list(spec.prompt), spec.params.max_tokens) if t not in (2,)], spec.seq_id
