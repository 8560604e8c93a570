"""Linear layers whose weights are stored in panels of 32 output columns, for MLX's CPU backend.

Stored as ``(panels, K, 32)`` — panel ``p`` holds output columns ``32p .. 32p+31``, K rows of 32
contiguous floats — ``x @ panels`` reaches the skinny GEMM (``skinny_gemm.c``) as one row-major
``A.B`` per panel. It streams the panel once per 8 rows of ``x``, broadcasting them against 32
columns held in registers: a decode step (one row per sequence) runs at about memory speed for
1 to 8 sequences, where a general GEMM spends its time packing each weight matrix it reads once.
On the embedded model the products of an 8-sequence decode step take about 23 ms, against about
60 ms through OpenBLAS and 20 ms for one sequence. Prompt chunks (many rows) run near the
core's FMA peak, half the rows on a helper thread, about as fast as OpenBLAS on two cores.

Each output element is one fused multiply-add chain in K order whatever the number of rows, so
a sequence's rows are bitwise the same alone or in a batch.

Used only where it pays: float32 weights, the CPU device, and the skinny GEMM preloaded (see
:func:`available`). A tied embedding (``embed_tokens.as_linear``) gets a packed copy of its
matrix for the output projection (at load when the model's args say the embeddings are tied, else
on first use); the lookup keeps the original. ``PackedLinear.weight`` unpacks a copy for code that
reads it.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

PANEL = 32


def available() -> bool:
    """True on MLX's CPU device with a skinny GEMM that computes panel products in this process."""
    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        return False
    try:
        ctypes.CDLL(None).semantic_skinny_gemm_nn  # noqa: B018 - the lookup is the test
    except AttributeError:
        return False
    return True


@functools.cache
def _classes() -> tuple[type, type]:
    import mlx.core as mx
    import mlx.nn as nn

    class PackedLinear(nn.Module):
        """``x @ weight.T (+ bias)`` with ``weight`` stored as ``(panels, K, 32)``."""

        def __init__(self, weight: Any, bias: Any = None) -> None:
            super().__init__()
            n, k = weight.shape
            pad = -n % PANEL
            if pad:
                weight = mx.concatenate([weight, mx.zeros((pad, k), weight.dtype)])
            self.out_features = n
            self.panels = mx.contiguous(weight.reshape(-1, PANEL, k).transpose(0, 2, 1))
            if bias is not None:
                self.bias = bias

        def __call__(self, x: Any) -> Any:
            lead, k = x.shape[:-1], x.shape[-1]
            x = x.reshape(-1, k)
            width = self.panels.shape[0] * PANEL
            y = (x @ self.panels).transpose(1, 0, 2).reshape(-1, width)
            if width != self.out_features:
                y = y[:, : self.out_features]
            y = y.reshape(*lead, self.out_features)
            return y + self.bias if "bias" in self else y

        @property
        def weight(self) -> Any:
            """The ``(out, in)`` matrix, unpacked (a copy): for code that reads ``.weight``."""
            k = self.panels.shape[1]
            return self.panels.transpose(0, 2, 1).reshape(-1, k)[: self.out_features]

        def _extra_repr(self) -> str:
            return f"panels={self.panels.shape[0]}x{PANEL}, out_features={self.out_features}"

    class PackedEmbedding(nn.Embedding):
        """An embedding whose ``as_linear`` (a tied output projection) uses a packed copy."""

        def as_linear(self, x: Any) -> Any:
            return self.packed()(x)

        def packed(self) -> Any:
            """The packed copy (made on first use); not a parameter: saved weights stay as they are."""
            packed = self.__dict__.get("_packed")
            if packed is None:
                packed = PackedLinear(self.weight)
                mx.eval(packed.panels)
                self.__dict__["_packed"] = packed
            return packed

    return PackedLinear, PackedEmbedding


def pack_linears(model: Any) -> int:
    """Replace ``model``'s float32 ``nn.Linear`` layers by packed ones, and let its float32
    embeddings pack a copy for ``as_linear``; returns how many layers changed. Call only when
    :func:`available`."""
    import mlx.core as mx
    import mlx.nn as nn

    packed_linear, packed_embedding = _classes()
    tied = bool(getattr(getattr(model, "args", None), "tie_word_embeddings", False))
    changed = 0
    for _, module in model.named_modules():
        for name, child in list(module.children().items()):
            items = module[name] if isinstance(child, list) else [child]  # children() copies lists
            for i, item in enumerate(items):
                if type(item) is nn.Linear and item.weight.dtype == mx.float32:
                    new = packed_linear(item.weight, item.get("bias"))
                    mx.eval(new.panels)  # one matrix at a time: the original is freed as we go
                    if isinstance(child, list):
                        items[i] = new
                    else:
                        setattr(module, name, new)
                    changed += 1
                elif type(item) is nn.Embedding and item.weight.dtype == mx.float32:
                    item.__class__ = packed_embedding
                    if tied:  # the output projection: packed now, not in the first request
                        item.packed()
                    changed += 1
    return changed
