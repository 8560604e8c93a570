"""semantic: a local LLM server of typed trio stages, shared by many agents that resume warm."""

from __future__ import annotations

import pluggy

__all__ = ["hookimpl", "PROJECT"]

PROJECT = "semantic"
#: Decorator for plugin hook implementations (marker, project and entry-point group: ``semantic``).
hookimpl = pluggy.HookimplMarker(PROJECT)
