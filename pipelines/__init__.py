"""Shipped pipeline definitions (YAML files in this package)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped() -> dict[str, Path]:
    """Name → path of every pipeline YAML shipped with semantic."""
    root = resources.files(__name__)
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}
