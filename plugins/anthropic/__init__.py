"""Anthropic Messages protocol: ``POST /v1/messages`` (streaming and not), ``GET /v1/models``."""

from __future__ import annotations

from semantic import hookimpl
from semantic.protocol import ProtocolSpec

from .routes import blueprint


@hookimpl
def register_protocols(register):
    register(ProtocolSpec("anthropic", blueprint, "Anthropic Messages API (Claude Code)"))
