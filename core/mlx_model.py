"""An mlx-lm model and Hugging Face tokenizer behind the :class:`~semantic.model.Model` interface.

Model plugins that end with an mlx-lm model directory (GGUF onboarding, local mlx-lm dirs) use
:func:`load_mlx_lm_dir`. Everything that touches MLX here runs on the MLX worker thread.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from .chat_format import HERMES, ChatFormat, detect_format, template_messages, template_tools
from .detokenize import IncrementalDecoder
from .model import ChatMessage, Generation, KVState, Model, ModelInfo, SamplingParams, ToolSpec

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class HFChatTokenizer:
    """A Hugging Face tokenizer with the model's chat template.

    Templates that handle tools get tools, calls and results natively; for the others
    ``chat_format`` writes them into plain messages first.
    """

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Sequence[int], chat_format: ChatFormat = HERMES) -> None:
        self._tok = hf_tokenizer
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.chat_format = chat_format
        template = getattr(hf_tokenizer, "chat_template", None) or ""
        self.native_tools = isinstance(template, str) and "tools" in template and "tool_calls" in template

    def encode_chat(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in messages)
        kwargs: dict[str, Any] = {}
        if uses_tools and self.native_tools:
            kwargs["tools"] = template_tools(tools) or None
        elif uses_tools:
            messages = self.chat_format.render(messages, tools)
        if messages and messages[-1].role == "assistant":  # a prefilled reply: continue it, not a new turn
            kwargs["continue_final_message"] = True
        else:
            kwargs["add_generation_prompt"] = True
        rendered = self._tok.apply_chat_template(template_messages(messages), tokenize=False, **kwargs)
        return list(self._tok.encode(rendered, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, tokens: Sequence[int]) -> str:
        return self._tok.decode(list(tokens))

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self.decode)


class _MLXGeneration(Generation):
    def __init__(self, model: MLXLMModel, prompt: list[int], caches: list[Any], params: SamplingParams):
        self._model = model
        self._prompt = prompt
        self._caches = caches
        self._params = params
        self._generated: list[int] = []

    def __iter__(self) -> Iterator[int]:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        p = self._params
        if p.seed is not None:
            mx.random.seed(p.seed % 2**64)
        sampler = make_sampler(temp=p.temperature, top_p=p.top_p or 0.0, top_k=p.top_k or 0)
        start = self._caches[0].offset  # the reused prefix: only the rest is prefilled
        steps = generate_step(
            mx.array(self._prompt[start:]),
            self._model.module,
            max_tokens=p.max_tokens,
            sampler=sampler,
            prompt_cache=self._caches,
            prefill_step_size=self._model.prefill_step,
        )
        for token, _ in steps:
            self._generated.append(int(token))
            yield int(token)

    def kv_state(self) -> KVState | None:
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        offset = self._caches[0].offset
        if offset == 0:
            return None
        for c in self._caches:
            if type(c) is KVCache:  # drop the unused buffer slots (window caches keep theirs)
                c.keys = c.keys[..., :offset, :]
                c.values = c.values[..., :offset, :]
        mx.eval([x for c in self._caches for x in (c.keys, c.values) if x is not None])
        tokens = (self._prompt + self._generated)[:offset]
        return KVState(tuple(tokens), self._caches, offset * self._model.info.kv_bytes_per_token)


def _copy_cache(cache: Any) -> Any:
    """A cache that can be written without touching ``cache``: new array objects, same data.

    (MLX slice assignment rewrites the Python array object it is called on, so two caches must
    never share array objects.)
    """
    new = copy.copy(cache)
    for attr in ("keys", "values"):
        value = getattr(cache, attr, None)
        if value is not None:
            setattr(new, attr, value[...])
    return new


def leading_kv(caches: Sequence[Any], n: int) -> list[Any]:
    """New per-layer ``KVCache`` objects holding the first ``n`` tokens of ``caches``.

    Slicing makes new arrays, so the stored prefix is never written through.
    """
    from mlx_lm.models.cache import KVCache

    if not all(type(c) is KVCache for c in caches):
        raise RuntimeError("partial prefix reuse needs full-attention KV caches")
    out = []
    for old in caches:
        new = KVCache()
        new.keys, new.values, new.offset = old.keys[..., :n, :], old.values[..., :n, :], n
        out.append(new)
    return out


class MLXLMModel(Model):
    """An mlx-lm ``nn.Module`` plus tokenizer; caches are lists of per-layer ``KVCache``."""

    def __init__(
        self,
        module: Any,
        tokenizer: HFChatTokenizer,
        info: ModelInfo,
        prefill_step: int = 512,
        kv_shape: tuple[int, int, int, str] = (0, 0, 0, "float32"),
    ):
        self.module = module
        self.tokenizer = tokenizer
        self.chat_format = tokenizer.chat_format
        self.info = info
        self.prefill_step = prefill_step
        self._layers, self._kv_heads, self._head_dim, self._kv_dtype = kv_shape

    def generate(
        self,
        prompt: Sequence[int],
        prefix: KVState | None,
        prefix_len: int,
        params: SamplingParams,
    ) -> Generation:
        return _MLXGeneration(self, list(prompt), self.writable_cache(prefix, prefix_len), params)

    def writable_cache(self, prefix: KVState | None, prefix_len: int) -> list[Any]:
        """Per-layer caches holding the first ``prefix_len`` tokens of ``prefix`` (or empty ones)
        that a forward pass may write into without touching the stored prefix."""
        from mlx_lm.models.cache import make_prompt_cache

        if prefix is None or prefix_len <= 0:
            return make_prompt_cache(self.module)
        if prefix.exclusive and prefix_len == len(prefix.tokens):
            prefix.exclusive = False  # built for this request: adopt it
            return list(prefix.payload)
        if prefix_len == len(prefix.tokens):
            return [_copy_cache(c) for c in prefix.payload]  # any cache kind, used whole
        return leading_kv(prefix.payload, prefix_len)

    def batch_engine(self, options: Any) -> Any:
        """mlx-lm's ``BatchGenerator``: one forward pass per step for the whole batch."""
        from .mlx_batch import MLXBatchEngine

        return MLXBatchEngine(self, options)

    def split_kv(self, state: KVState, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        import mlx.core as mx

        pieces = [
            [(mx.contiguous(c.keys[..., a:b, :]), mx.contiguous(c.values[..., a:b, :])) for c in state.payload]
            for a, b in bounds
        ]
        mx.eval([x for piece in pieces for kv in piece for x in kv])
        return pieces

    def join_kv(self, pieces: Sequence[tuple[Any, int]], tokens: Sequence[int]) -> KVState:
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        total = sum(n for _, n in pieces)
        caches = make_prompt_cache(self.module)
        for layer, cache in enumerate(caches):
            ks = [piece[layer][0][..., :n, :] for piece, n in pieces]
            vs = [piece[layer][1][..., :n, :] for piece, n in pieces]
            # one concatenation per layer, with room for the next tokens so the first decode
            # steps write in place instead of growing the buffer again
            room = cache.step - total % cache.step
            k0, v0 = ks[0], vs[0]
            ks.append(mx.zeros((*k0.shape[:2], room, k0.shape[3]), k0.dtype))
            vs.append(mx.zeros((*v0.shape[:2], room, v0.shape[3]), v0.dtype))
            cache.keys, cache.values, cache.offset = mx.concatenate(ks, axis=2), mx.concatenate(vs, axis=2), total
        mx.eval([x for c in caches for x in (c.keys, c.values)])
        return KVState(tuple(tokens[:total]), caches, total * self.info.kv_bytes_per_token, exclusive=True)

    def kv_to_arrays(self, payload: Any) -> dict[str, Any]:
        import mlx.core as mx
        import numpy as np

        out = {}
        for layer, (k, v) in enumerate(payload):
            for name, x in ((f"{layer}.k", k), (f"{layer}.v", v)):
                out[name] = np.array(x.view(mx.uint16)) if x.dtype == mx.bfloat16 else np.array(x)
        return out

    def kv_from_arrays(self, arrays: dict[str, Any]) -> Any:
        import mlx.core as mx

        def load(a: Any) -> Any:
            x = mx.array(a)
            return x.view(mx.bfloat16) if self._kv_dtype == "bfloat16" else x

        layers = len(arrays) // 2
        payload = [(load(arrays[f"{i}.k"]), load(arrays[f"{i}.v"])) for i in range(layers)]
        mx.eval([x for kv in payload for x in kv])
        return payload

    def block_shapes(self, block_tokens: int) -> dict[str, tuple[tuple[int, ...], str]]:
        dtype = "uint16" if self._kv_dtype == "bfloat16" else self._kv_dtype
        shape = (1, self._kv_heads, block_tokens, self._head_dim)
        return {f"{i}.{kv}": (shape, dtype) for i in range(self._layers) for kv in ("k", "v")}

    def close(self) -> None:
        import gc

        import mlx.core as mx

        self.module = None
        gc.collect()
        mx.clear_cache()


def kv_shape(config: dict[str, Any]) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) from an mlx-lm/HF ``config.json``."""
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return layers, kv_heads, head_dim


def kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int:
    """Bytes of K and V per token over all layers."""
    layers, kv_heads, head_dim = kv_shape(config)
    return 2 * layers * kv_heads * head_dim * _DTYPE_BYTES.get(dtype, 4)


class ContextOptions(BaseModel):
    """Model options shared by the mlx-lm based loaders: the usable context window."""

    context_length: int | None = Field(
        None, ge=16, description="Usable context in tokens (default: the model's own). Longer than trained needs rope_scaling."
    )
    rope_scaling: dict[str, Any] | None = Field(
        None,
        description='RoPE scaling the model supports, as in a Hugging Face config, e.g. '
        '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192} or {"type": "linear", "factor": 2.0}.',
    )
    cpu_kernels: bool = Field(
        True,
        description="On MLX's CPU backend, use semantic's faster SwiGLU and attention, and float32 Linear weights packed "
        "for the skinny GEMM (same results to float32 rounding; see semantic.mlx_cpu, semantic.packed_weights). "
        "Off: mlx-lm's own.",
    )


def context_overrides(config: dict[str, Any], options: ContextOptions | None) -> dict[str, Any]:
    """Config keys that set the context window; refuses extending it without RoPE scaling."""
    if options is None or (options.context_length is None and options.rope_scaling is None):
        return {}
    trained = int(config.get("max_position_embeddings") or 2048)
    length = options.context_length or trained
    if length > trained and options.rope_scaling is None and config.get("rope_scaling") is None:
        raise ValueError(
            f"context_length {length} is longer than the {trained} tokens the model was trained for: "
            "set rope_scaling to a scaling the model supports"
        )
    out: dict[str, Any] = {"max_position_embeddings": length}
    if options.rope_scaling is not None:
        out["rope_scaling"] = options.rope_scaling
    return out


def load_mlx_lm_dir(
    path: Path,
    *,
    name: str,
    fingerprint: str,
    dtype: str = "float32",
    prefill_step: int = 512,
    context: ContextOptions | None = None,
) -> MLXLMModel:
    """Load a local mlx-lm model directory (config.json, *.safetensors, tokenizer files).

    ``context`` may change the context window (and RoPE scaling); KV caches made with another
    scaling are not interchangeable, so it becomes part of the fingerprint.
    """
    import json

    import mlx.core as mx
    from mlx_lm.utils import load_model
    from transformers import AutoTokenizer

    from . import packed_weights
    from .mlx_cpu import use_fast_kernels

    overrides = context_overrides(json.loads((path / "config.json").read_text()), context)
    module, config = load_model(path, model_config=overrides)
    cpu_kernels = context.cpu_kernels if context is not None else True
    use_fast_kernels(module, cpu_kernels)
    if cpu_kernels and packed_weights.available():
        packed_weights.pack_linears(module)
    if overrides:
        fingerprint += ":" + json.dumps(overrides, sort_keys=True, separators=(",", ":"))
    activation_dtype = dtype if dtype in _DTYPE_BYTES else "float16"
    mx.eval(module.parameters())
    hf_tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    eos = config.get("eos_token_id", hf_tok.eos_token_id)
    eos_ids = eos if isinstance(eos, list) else [eos]
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    layers, kv_heads, head_dim = kv_shape(config)
    kinds = ["full" if type(c) is KVCache else type(c).__name__ for c in make_prompt_cache(module)]
    info = ModelInfo(
        name=name,
        fingerprint=fingerprint,
        context_length=int(config.get("max_position_embeddings") or 2048),
        kv_bytes_per_token=kv_bytes_per_token(config, activation_dtype),
        family=str(config.get("model_type", "unknown")),
        cache_layout=f"{','.join(sorted(set(kinds)))}:{layers}x{kv_heads}x{head_dim}:{activation_dtype}",
        pageable=all(k == "full" for k in kinds) and len(kinds) == layers,
    )
    template = getattr(hf_tok, "chat_template", None)
    fmt = detect_format(template if isinstance(template, str) else "")
    tokenizer = HFChatTokenizer(hf_tok, [e for e in eos_ids if e is not None], fmt)
    return MLXLMModel(module, tokenizer, info, prefill_step, (layers, kv_heads, head_dim, activation_dtype))
