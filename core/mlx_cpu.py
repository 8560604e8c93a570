"""Faster stand-ins for two mlx-lm building blocks on MLX's CPU backend.

MLX's Linux CPU build evaluates ``exp`` with a scalar polynomial (about 17 ns an element here),
while ``power(2, x)`` goes to the C library's ``powf`` (about 6 ns; 3 with the skinny-GEMM
library preloaded, which sends base 2 to ``exp2f``, see blas.py). Two places spend most of their
non-matmul time in ``exp``: the softmax of attention (prefill at depth is dominated by it) and
SwiGLU's sigmoid. The stand-ins compute ``exp(x)`` as ``2 ** (x * log2 e)``:

* :func:`swiglu` — ``gate * x / (1 + 2 ** (-gate * log2 e))``;
* :func:`scaled_dot_product_attention` — scores, mask, row max, ``2 ** ((s - max) * log2 e)``,
  sum, and one matmul with the values; the query heads of a grouped-query key head are rows of
  one product, so keys and values are read once per key head. A causal
  prompt chunk at depth is split in two: the keys before the chunk need no mask, so only the
  chunk's own square block is masked.

Both agree with mlx-lm's to float32 rounding (the tests compare them; on the embedded model the
logits of a 700-token prompt differ by < 1e-4 and every argmax agrees). Anything they do not
cover — other dtypes, attention sinks, quantized KV caches, masks of other ranks — goes to mlx-lm's own.

mlx-lm model modules look both names up as module globals at call time, so :func:`use_fast_kernels`
swaps them in the modules a loaded model is built from. That is process-wide for those model
families, which is what a server that owns its process wants; on Metal nothing is swapped.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

LOG2E = 1.4426950408889634

@functools.cache
def _kernels() -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm.models import activations, base

    @functools.partial(mx.compile, shapeless=True)
    def swiglu_pow2(gate: Any, x: Any) -> Any:
        return gate * x / (1 + mx.power(2.0, -LOG2E * gate))

    @functools.partial(mx.compile, shapeless=True)
    def exp_shifted(scores: Any, row_max: Any) -> Any:
        return mx.power(2.0, (scores - row_max) * LOG2E)

    def swiglu(gate: Any, x: Any) -> Any:
        if gate.dtype != mx.float32 or x.dtype != mx.float32:
            return activations.swiglu(gate, x)
        return swiglu_pow2(gate, x)

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):  # noqa: ANN001, ANN202
        fallback = (
            sinks is not None
            or hasattr(cache, "bits")
            or queries.dtype != mx.float32
            or keys.dtype != mx.float32
            or (mask is not None and not isinstance(mask, str) and mask.ndim not in (2, 4))
        )
        if fallback:
            return base.scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
        b, heads, lq, dim = queries.shape
        kv_heads, lk = keys.shape[1], keys.shape[2]
        rep = heads // kv_heads
        # the rep query heads that share a key head are rows of one product, (b, kv, rep * lq, dim):
        # each key and value is read once per key head, not once per query head
        q = (queries * scale).reshape(b, kv_heads, rep * lq, dim)

        def by_head(x):  # noqa: ANN001, ANN202 - (b, kv, rep * lq, n) -> (b, kv, rep, lq, n)
            return x.reshape(b, kv_heads, rep, lq, x.shape[-1])

        def as_rows(x):  # noqa: ANN001, ANN202 - and back
            return x.reshape(b, kv_heads, rep * lq, x.shape[-1])

        if isinstance(mask, str) and lk > lq:  # a prompt chunk at depth: mask only its own block
            past = lk - lq
            seen = q @ keys[..., :past, :].swapaxes(-1, -2)
            own = by_head(q @ keys[..., past:, :].swapaxes(-1, -2))
            own = as_rows(mx.where(mx.arange(lq)[:, None] >= mx.arange(lq)[None], own, mx.finfo(own.dtype).min))
            row_max = mx.maximum(mx.max(seen, axis=-1, keepdims=True), mx.max(own, axis=-1, keepdims=True))
            w_seen, w_own = exp_shifted(seen, row_max), exp_shifted(own, row_max)
            total = mx.sum(w_seen, axis=-1, keepdims=True) + mx.sum(w_own, axis=-1, keepdims=True)
            out = (w_seen @ values[..., :past, :] + w_own @ values[..., past:, :]) / total
            return out.reshape(b, heads, lq, dim)
        scores = q @ keys.swapaxes(-1, -2)
        if isinstance(mask, str):  # "causal": the queries are the last lq positions
            mask = mx.arange(lk - lq, lk)[:, None] >= mx.arange(lk)[None]
        if mask is not None:
            if mask.ndim == 4:
                per_head = mask.shape[1] == heads > 1
                mask = mask.reshape(mask.shape[0], kv_heads, rep, *mask.shape[2:]) if per_head else mask[:, :, None]
            if mask.dtype == mx.bool_:
                scores = as_rows(mx.where(mask, by_head(scores), mx.finfo(scores.dtype).min))
            else:
                scores = as_rows(by_head(scores) + mask)
        weights = exp_shifted(scores, mx.max(scores, axis=-1, keepdims=True))
        out = (weights @ values) / mx.sum(weights, axis=-1, keepdims=True)
        return out.reshape(b, heads, lq, dim)

    return {
        "swiglu": (activations.swiglu, swiglu),
        "scaled_dot_product_attention": (base.scaled_dot_product_attention, scaled_dot_product_attention),
    }


def use_fast_kernels(model: Any, enabled: bool = True) -> list[str]:
    """Swap the CPU stand-ins into (or, ``enabled=False``, out of) the modules ``model`` is built from.

    Returns ``"<module>.<name>"`` for each name now set to a stand-in. Only on the CPU device.
    """
    import mlx.core as mx

    kernels = _kernels()
    on = enabled and mx.default_device() == mx.cpu
    swapped = []
    for name in sorted({type(m).__module__ for m in model.modules()}):
        module = sys.modules.get(name)
        if module is None or not name.startswith("mlx_lm.models."):
            continue
        for attr, (original, fast) in kernels.items():
            if getattr(module, attr, None) in (original, fast):
                setattr(module, attr, fast if on else original)
                if on:
                    swapped.append(f"{name}.{attr}")
    return swapped
