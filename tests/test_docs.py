"""Docs that must keep up with the code."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from semantic import hookspecs

DOCS = Path(__file__).parent.parent / "docs"


def hook_names() -> list[str]:
    return [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "semantic_spec")]


def test_every_hook_has_a_docstring_and_a_heading_on_the_plugin_page():
    names = hook_names()
    assert len(names) >= 4
    headings = set(re.findall(r"^### (\w+)$", (DOCS / "plugins.md").read_text(), re.M))
    missing = [n for n in names if n not in headings]
    assert missing == [], f"hooks missing from docs/plugins.md: {missing}"
    assert all(getattr(hookspecs, n).__doc__.strip() for n in names)


def test_architecture_page_shows_every_builtin_stage():
    text = (DOCS / "architecture.md").read_text()
    for stage in ("identify", "tokenize", "cache-lookup", "schedule", "decode", "persist"):
        assert stage in text
