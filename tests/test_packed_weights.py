"""Packed Linear weights (semantic.packed_weights) against MLX's own Linear layers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def packing(mlx):
    from semantic import packed_weights

    if not mlx.run_sync(packed_weights.available):
        pytest.skip("no skinny GEMM in this process: run the suite as `make test` does (python -m semantic.blas)")
    return packed_weights


def _linear_pair(n: int, k: int, bias: bool, seed: int):
    import mlx.core as mx
    import mlx.nn as nn

    from semantic.packed_weights import _classes

    mx.random.seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    linear.update({"weight": mx.random.normal((n, k)), **({"bias": mx.random.normal((n,))} if bias else {})})
    return linear, _classes()[0](linear.weight, linear.get("bias"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 100), k=st.integers(1, 80), rows=st.integers(1, 70), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_packed_linear_computes_what_linear_does(mlx, packing, n, k, rows, bias, seed):
    """Any width (padded to whole panels), any K, few rows or many (split with the helper thread)."""

    def run():
        import mlx.core as mx

        linear, packed = _linear_pair(n, k, bias, seed)
        x = mx.random.normal((rows, k))
        want, got = linear(x), packed(x)
        return got.shape == want.shape and mx.allclose(got, want, atol=1e-4, rtol=1e-4).item()

    assert mlx.run_sync(run)


def test_rows_are_bitwise_the_same_alone_or_with_others(mlx, packing):
    """A row's result does not depend on the rows beside it, however many (40: beyond the helper
    thread's split); with leading dimensions (batch, length) as a model calls it."""

    def run():
        import mlx.core as mx

        _, packed = _linear_pair(576, 576, False, 3)
        x = mx.random.normal((40, 1, 576))
        together = packed(x)
        return [i for i in range(40) if not mx.array_equal(packed(x[i : i + 1]), together[i : i + 1]).item()]

    assert mlx.run_sync(run) == []


def test_pack_linears_on_a_model_with_tied_embeddings(mlx, packing):
    """Every float32 Linear is replaced and the tied output projection is packed on first use;
    the logits stay within float32 rounding and the saved parameters keep the embedding."""

    def run():
        import mlx.core as mx
        import mlx.nn as nn
        from mlx.utils import tree_flatten
        from mlx_lm.models import llama

        args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=1000,
                               tie_word_embeddings=True)
        mx.random.seed(1)
        model = llama.Model(args)
        tokens = mx.array([[5, 17, 400, 3, 999, 42]])
        want = model(tokens)
        changed = packing.pack_linears(model)
        linears = [m for _, m in model.named_modules() if type(m) is nn.Linear]
        got = model(tokens)
        names = {k for k, _ in tree_flatten(model.parameters())}
        return changed, len(linears), mx.allclose(got, want, atol=1e-4, rtol=1e-4).item(), names

    changed, left, close, names = mlx.run_sync(run)
    assert changed == 2 * 7 + 1 and left == 0 and close
    assert "model.embed_tokens.weight" in names and "model.layers.0.self_attn.q_proj.panels" in names
    assert not any(name.endswith("_packed.panels") for name in names)


def test_linears_in_lists_are_replaced_and_weight_still_reads(mlx, packing):
    """Layers held in a list are swapped in the module's own list; ``.weight`` unpacks a copy."""

    def run():
        import mlx.core as mx
        import mlx.nn as nn

        class Holder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.projs = [nn.Linear(40, 70), nn.Linear(40, 33, bias=False)]

        holder = Holder()
        weights = [p.weight for p in holder.projs]
        changed = packing.pack_linears(holder)
        kinds = [type(p).__name__ for p in holder.projs]
        same = [mx.array_equal(p.weight, w).item() for p, w in zip(holder.projs, weights, strict=True)]
        return changed, kinds, same

    changed, kinds, same = mlx.run_sync(run)
    assert changed == 2 and kinds == ["PackedLinear", "PackedLinear"] and same == [True, True]
