"""The ``mlx-lm`` loader on a tiny random-weight llama built here (no hub, no download)."""

from __future__ import annotations

import pytest

from semantic.model import ChatMessage, LoadContext, SamplingParams
from semantic.paths import SourceNotFound
from semantic.plugins.mlx_dir import MLXDirOptions, dir_fingerprint, load_mlx_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, random_model_dir):
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": 49152,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }
    return random_model_dir(tmp_path_factory.mktemp("tiny-llama"), config, seed=7)


def generate(model, prompt, prefix=None, prefix_len=0):
    gen = model.generate(prompt, prefix, prefix_len, SamplingParams(max_tokens=8, temperature=0))
    return list(gen), gen.kv_state()


def test_loads_a_local_mlx_lm_folder(mlx, tiny_llama):
    model = mlx.run_sync(load_mlx_dir, str(tiny_llama), MLXDirOptions(), LoadContext("tiny", None, None))
    assert model.info.family == "llama" and model.info.context_length == 512
    assert model.info.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert model.info.fingerprint == f"mlx:{dir_fingerprint(tiny_llama)}"
    prompt = model.tokenizer.encode_chat([ChatMessage("user", "hello there")])
    cold, state = mlx.run_sync(generate, model, prompt)
    assert len(cold) == 8 and len(state.tokens) == len(prompt) + 8
    warm, _ = mlx.run_sync(generate, model, prompt, state, len(prompt) - 3)
    assert warm == cold


def test_missing_or_broken_folders_are_refused(tmp_path):
    with pytest.raises(SourceNotFound, match="does not exist"):
        load_mlx_dir(str(tmp_path / "nope"), MLXDirOptions(), LoadContext("x", None, None))
    with pytest.raises(SourceNotFound, match="no config.json"):
        load_mlx_dir(str(tmp_path), MLXDirOptions(), LoadContext("x", None, None))
