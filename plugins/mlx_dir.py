"""Loader for local mlx-lm model directories (config.json, *.safetensors, tokenizer files).

Only local folders: nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from semantic import hookimpl
from semantic.mlx_model import ContextOptions
from semantic.model import LoadContext, LoaderSpec
from semantic.paths import SourceNotFound, resolve_source


class MLXDirOptions(ContextOptions):
    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="KV cache dtype for budgeting.")
    prefill_step: int = Field(512, ge=16, le=8192, description="Prompt tokens per prefill step.")


def dir_fingerprint(path: Path) -> str:
    """Hash of config.json and the weight files' names, sizes and first MiB."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
    return h.hexdigest()


def load_mlx_dir(source: str, options: MLXDirOptions, context: LoadContext) -> Any:
    from semantic.mlx_model import load_mlx_lm_dir

    path = resolve_source(source, context.base_dir)
    if not (path / "config.json").is_file():
        raise SourceNotFound(f"model source {source!r}: {path} has no config.json")
    json.loads((path / "config.json").read_text())  # refuse a malformed config early
    return load_mlx_lm_dir(
        path,
        name=context.name,
        fingerprint=f"mlx:{dir_fingerprint(path)}",
        dtype=options.dtype,
        prefill_step=options.prefill_step,
        context=options,
    )


@hookimpl
def register_model_loaders(register):
    register(LoaderSpec("mlx-lm", load_mlx_dir, MLXDirOptions, "local mlx-lm model directories"))
