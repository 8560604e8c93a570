"""The ``mlx-lm`` loader on a tiny random-weight llama built here (no hub, no download)."""

from __future__ import annotations

import json
import shutil

import pytest

from semantic.model import ChatMessage, LoadContext, SamplingParams
from semantic.paths import SourceNotFound, cache_dir
from semantic.plugins.mlx_dir import MLXDirOptions, dir_fingerprint, load_mlx_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, mlx, smollm):
    folder = tmp_path_factory.mktemp("tiny-llama")
    mlx.run_sync(_build_tiny_llama, folder)
    return folder


def _build_tiny_llama(folder):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

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
    mx.random.seed(7)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps(config))
    converted = next((cache_dir() / "models").glob("SmolLM2-135M-Instruct*-float32-v*"))
    for f in converted.iterdir():  # the tokenizer files, chat template included
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, folder / f.name)


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
