"""GGUF onboarding: turn a llama-family GGUF file into an mlx-lm model directory, once.

The converted directory (``config.json``, ``model.safetensors``, Hugging Face tokenizer files built
from the GGUF metadata) is kept under the user's cache folder, keyed by the GGUF's SHA-256 and the
chosen dtype, and written atomically (temporary folder, then rename). Models are untrusted blobs:
every metadata key and tensor shape used is checked before anything is built from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from semantic import hookimpl
from semantic.mlx_model import ContextOptions
from semantic.model import LoadContext, LoaderSpec
from semantic.paths import resolve_source

GGUF_GROUP_SIZE = 32  # every GGUF block quantization MLX reads (Q4_0, Q4_1, Q8_0) uses 32
FORMAT_VERSION = 1  # bump when the conversion changes, so stale conversions are redone

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PRE_TOKENIZERS = ("smollm", "gpt2", "default")
_TOKEN_TYPE_CONTROL = 3


class GGUFError(ValueError):
    """The GGUF file cannot be onboarded (unsupported architecture, tokenizer or tensor)."""


class GGUFOptions(ContextOptions):
    """``model.options`` for the ``gguf`` loader."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "float16", "bfloat16", "quantized"] = Field(
        "float32",
        description="Weights dtype after conversion; float32 is fastest on Linux CPU, "
        "'quantized' keeps the GGUF's 4/8-bit blocks.",
    )
    prefill_step: int = Field(512, ge=16, le=8192, description="Prompt tokens per prefill step.")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _scalar(meta: dict[str, Any], key: str, kind: type = int) -> Any:
    if key not in meta:
        raise GGUFError(f"GGUF metadata lacks {key!r}")
    value = meta[key]
    value = value.item() if hasattr(value, "item") else value
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise GGUFError(f"GGUF metadata {key!r} is not a {kind.__name__}: {value!r}") from e


def model_config(meta: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """mlx-lm ``config.json`` for a llama-architecture GGUF."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"GGUF architecture {arch!r} is not supported yet (supported: llama)")
    heads = _scalar(meta, "llama.attention.head_count")
    hidden = _scalar(meta, "llama.embedding_length")
    if heads <= 0 or hidden <= 0 or hidden % heads:
        raise GGUFError(f"GGUF has {heads} attention heads for an embedding of {hidden}")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFError("GGUF metadata lacks tokenizer.ggml.tokens")
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": _scalar(meta, "llama.block_count"),
        "intermediate_size": _scalar(meta, "llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _scalar(meta, "llama.attention.head_count_kv") if "llama.attention.head_count_kv" in meta else heads,
        "head_dim": hidden // heads,
        "rms_norm_eps": _scalar(meta, "llama.attention.layer_norm_rms_epsilon", float),
        "rope_theta": _scalar(meta, "llama.rope.freq_base", float) if "llama.rope.freq_base" in meta else 10000.0,
        # llama.cpp's converter permutes Q/K rows for its rotary layout: that is the traditional one.
        "rope_traditional": True,
        "vocab_size": len(tokens),
        "max_position_embeddings": _scalar(meta, "llama.context_length"),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id") if "tokenizer.ggml.bos_token_id" in meta else None,
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
    }


def mlx_name(gguf_name: str) -> str:
    """mlx-lm parameter name of a GGUF tensor name (``blk.3.attn_q.weight`` → ``model.layers.3...``)."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _TOP_NAMES:
        return f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
    raise GGUFError(f"GGUF tensor {gguf_name!r} has no llama mapping")


def convert_weights(weights: dict[str, Any], dtype: str, progress: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rename GGUF tensors to mlx-lm names; dequantize to ``dtype`` unless it is 'quantized'.

    Returns the new weights and, for 'quantized', the per-layer quantization config.
    """
    import mlx.core as mx

    out: dict[str, Any] = {}
    quant: dict[str, Any] = {}
    bases = sorted({k.rsplit(".", 1)[0] for k in weights})
    for base in bases:
        w = weights.get(f"{base}.weight")
        if w is None:
            raise GGUFError(f"GGUF tensor {base!r} has no weight")
        target = mlx_name(f"{base}.weight").rsplit(".", 1)[0]
        scales, biases = weights.get(f"{base}.scales"), weights.get(f"{base}.biases")
        if scales is not None:
            if biases is None or w.dtype != mx.uint32 or w.ndim != 2 or scales.shape != biases.shape:
                raise GGUFError(f"GGUF tensor {base!r}: unsupported quantized layout")
            if w.shape[-1] % scales.shape[-1]:
                raise GGUFError(f"GGUF tensor {base!r}: scales do not divide the packed weight")
            bits = w.shape[-1] // scales.shape[-1]
            if bits not in (2, 3, 4, 5, 6, 8):
                raise GGUFError(f"GGUF tensor {base!r}: {bits}-bit blocks are not supported")
            if dtype == "quantized":
                out.update({f"{target}.weight": w, f"{target}.scales": scales, f"{target}.biases": biases})
                quant[target] = {"group_size": GGUF_GROUP_SIZE, "bits": bits}
            else:
                dense = mx.dequantize(w, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits)
                out[f"{target}.weight"] = dense.astype(getattr(mx, dtype))
        else:
            keep = mx.float32 if dtype == "quantized" else getattr(mx, dtype)
            out[f"{target}.weight"] = w.astype(keep)
        mx.eval(list(out.values())[-3:])
        if progress is not None:
            progress.update(1)
    return out, quant


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A Hugging Face fast tokenizer (with chat template) from GGUF tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise GGUFError(f"GGUF tokenizer model {meta.get('tokenizer.ggml.model')!r} is not supported (supported: gpt2 BPE)")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(_PRE_TOKENIZERS)})")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    if any(len(m) != 2 for m in merges):
        raise GGUFError("GGUF tokenizer merges are malformed")
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if hasattr(types, "tolist") else (types or [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError("GGUF token_type and tokens differ in length")

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    split = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if pre == "smollm":  # llama.cpp's smollm pre-tokenizer: single digits, then GPT-2's regex
        split.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(split)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _TOKEN_TYPE_CONTROL]
    )

    def token(key: str) -> str | None:
        return tokens[_scalar(meta, key)] if key in meta and _scalar(meta, key) < len(tokens) else None

    template = meta.get("tokenizer.chat_template")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=template if isinstance(template, str) else None,
        clean_up_tokenization_spaces=False,
    )


def convert(gguf: Path, out_dir: Path, dtype: str) -> None:
    """Write the mlx-lm model directory for ``gguf`` at ``out_dir`` (atomically)."""
    import mlx.core as mx
    from tqdm import tqdm

    weights, meta = mx.load(str(gguf), return_metadata=True)
    config = model_config(meta, set(weights))
    hf_tok = build_tokenizer(meta)
    bases = {k.rsplit(".", 1)[0] for k in weights}
    with tqdm(total=len(bases), desc=f"Converting {gguf.name}", unit="tensor", leave=False) as bar:
        new_weights, quant = convert_weights(weights, dtype, bar)
    if quant:
        config["quantization"] = {"group_size": GGUF_GROUP_SIZE, "bits": 4, **quant}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=out_dir.parent))
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), new_weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        hf_tok.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, out_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out_dir / "config.json").exists():
            raise
        # another process finished the same conversion first: use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_gguf(source: str, options: GGUFOptions, context: LoadContext) -> Any:
    """Loader for ``plugin: gguf``: convert on first use, then load the cached conversion."""
    from semantic.mlx_model import load_mlx_lm_dir

    path = resolve_source(source, context.base_dir)
    digest = file_sha256(path)
    out_dir = Path(context.cache_dir) / "models" / f"{path.stem}-{digest[:16]}-{options.dtype}-v{FORMAT_VERSION}"
    if not (out_dir / "config.json").exists():
        convert(path, out_dir, options.dtype)
    return load_mlx_lm_dir(
        out_dir,
        name=context.name,
        fingerprint=f"gguf:{digest}:{options.dtype}",
        dtype=options.dtype,
        prefill_step=options.prefill_step,
        context=options,
    )


@hookimpl
def register_model_loaders(register):
    register(LoaderSpec("gguf", load_gguf, GGUFOptions, "llama-family GGUF files (converted once to mlx-lm)", (".gguf",)))
