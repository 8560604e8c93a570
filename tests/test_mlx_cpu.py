"""The CPU stand-ins for SwiGLU and attention (semantic.mlx_cpu) against mlx-lm's own."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration


def _fast():
    from semantic.mlx_cpu import _kernels

    return {name: pair[1] for name, pair in _kernels().items()}


def _compare_attention(b, heads, kv_heads, lq, lk, mask_kind, seed):
    import mlx.core as mx

    mx.random.seed(seed)
    q = mx.random.normal((b, heads, lq, 16)) * 2
    k = mx.random.normal((b, kv_heads, lk, 16)) * 2
    v = mx.random.normal((b, kv_heads, lk, 16))
    mask = None
    if mask_kind == "causal":
        mask = "causal"
    elif mask_kind == "bool2d":
        mask = mx.arange(lk - lq, lk)[:, None] >= mx.arange(lk)[None]
    elif mask_kind == "padded":  # BatchKVCache: left padding per row, then causal
        pad = mx.array([i % max(1, lk - lq + 1) for i in range(b)])
        rows = mx.arange(lk - lq, lk)[:, None]
        cols = mx.arange(lk)[None]
        mask = (rows >= cols)[None, None] & (pad[:, None, None, None] <= cols)
    elif mask_kind == "additive":
        mask = mx.where(mx.random.uniform(shape=(b, 1, lq, lk)) < 0.3, -1e9, 0.0)
    elif mask_kind in ("per_head", "per_head_shared"):  # shared: one mask for the whole batch
        mask = mx.random.uniform(shape=(b if mask_kind == "per_head" else 1, heads, lq, lk)) < 0.8
        mask = mask | (mx.arange(lk) == 0)  # every row keeps a key
    want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.25, mask=mask)
    got = _fast()["scaled_dot_product_attention"](q, k, v, None, 0.25, mask)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert mx.allclose(got, want, atol=2e-5, rtol=1e-4).item(), mx.max(mx.abs(got - want)).item()


@pytest.mark.parametrize("mask_kind", [None, "causal", "bool2d", "padded", "additive", "per_head", "per_head_shared"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize(("lq", "lk"), [(1, 1), (1, 37), (5, 5), (7, 300)])
def test_attention_matches_mlx(mlx, mask_kind, heads, kv_heads, lq, lk):
    mlx.run_sync(_compare_attention, 3, heads, kv_heads, lq, lk, mask_kind, 0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    b=st.integers(1, 4),
    kv_heads=st.integers(1, 3),
    rep=st.integers(1, 3),
    lq=st.integers(1, 9),
    extra=st.integers(0, 70),
    mask_kind=st.sampled_from([None, "causal", "bool2d", "padded", "additive"]),
    seed=st.integers(0, 2**16),
)
def test_attention_matches_mlx_on_any_shape(mlx, b, kv_heads, rep, lq, extra, mask_kind, seed):
    mlx.run_sync(_compare_attention, b, kv_heads * rep, kv_heads, lq, lq + extra, mask_kind, seed)


def test_fully_masked_rows_stay_finite(mlx):
    """Left-padding rows of a batch may see no key at all; they must not turn into NaN."""

    def run():
        import mlx.core as mx

        q, k = mx.ones((1, 2, 3, 8)), mx.ones((1, 2, 4, 8))
        mask = mx.zeros((1, 1, 3, 4), dtype=mx.bool_)
        out = _fast()["scaled_dot_product_attention"](q, k, k, None, 0.5, mask)
        return mx.all(mx.isfinite(out)).item()

    assert mlx.run_sync(run)


def test_swiglu_matches_mlx(mlx):
    def run():
        import mlx.core as mx
        from mlx_lm.models.activations import swiglu

        gate = mx.concatenate([mx.random.normal((4, 1000)) * 8, mx.array([[-200.0, -88.0, -1e-30, 0.0, 1e-30, 88.0, 200.0] * 4]).reshape(4, 7)], axis=1)
        x = mx.random.normal(gate.shape)
        got, want = _fast()["swiglu"](gate, x), swiglu(gate, x)
        half = _fast()["swiglu"](gate.astype(mx.float16), x.astype(mx.float16))  # other dtypes: mlx-lm's own
        return (
            mx.allclose(got, want, atol=1e-6, rtol=1e-5).item(),
            mx.all(mx.isfinite(got)).item(),
            mx.array_equal(half, swiglu(gate.astype(mx.float16), x.astype(mx.float16))).item(),
        )

    assert mlx.run_sync(run) == (True, True, True)


def test_other_cases_go_to_mlx_lm(mlx):
    def run():
        import mlx.core as mx
        from mlx_lm.models.base import scaled_dot_product_attention

        q, k = mx.random.normal((1, 4, 3, 8)), mx.random.normal((1, 2, 5, 8))
        fast = _fast()["scaled_dot_product_attention"]
        sinks = mx.zeros((4,))
        half = [a.astype(mx.float16) for a in (q, k)]
        return (
            mx.array_equal(fast(q, k, k, None, 0.3, "causal", sinks), scaled_dot_product_attention(q, k, k, None, 0.3, "causal", sinks)).item(),
            mx.array_equal(fast(*half, half[1], None, 0.3, None), scaled_dot_product_attention(*half, half[1], None, 0.3, None)).item(),
        )

    assert mlx.run_sync(run) == (True, True)


def test_the_embedded_model_gives_the_same_tokens_with_and_without(mlx, smollm):
    """Greedy tokens agree and logits stay within float32 reassociation of mlx-lm's kernels."""
    from semantic.mlx_cpu import use_fast_kernels
    from semantic.model import ChatMessage

    prompt = smollm.tokenizer.encode_chat([ChatMessage("user", "Name three rivers in Europe and say one thing about each.")])

    def run(fast: bool):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        import mlx_lm.models.llama as llama
        from mlx_lm.models.base import scaled_dot_product_attention

        swapped = use_fast_kernels(smollm.module, fast)
        assert (llama.scaled_dot_product_attention is scaled_dot_product_attention) is not fast
        try:
            cache = make_prompt_cache(smollm.module)
            logits = smollm.module(mx.array([prompt]), cache=cache)[0]
            tokens = []
            nxt = mx.argmax(logits[-1]).item()
            for _ in range(24):
                tokens.append(nxt)
                nxt = mx.argmax(smollm.module(mx.array([[nxt]]), cache=cache)[0, -1]).item()
            mx.eval(logits)
            return swapped, logits, tokens
        finally:
            use_fast_kernels(smollm.module, True)

    swapped, fast_logits, fast_tokens = mlx.run_sync(run, True)
    assert "mlx_lm.models.llama.swiglu" in swapped and "mlx_lm.models.llama.scaled_dot_product_attention" in swapped
    none, plain_logits, plain_tokens = mlx.run_sync(run, False)
    assert none == []
    assert fast_tokens == plain_tokens

    def close():
        import mlx.core as mx

        return mx.max(mx.abs(fast_logits - plain_logits)).item()

    assert mlx.run_sync(close) < 1e-3
