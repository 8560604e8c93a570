"""Anthropic Messages protocol: ``POST /v1/messages`` (streaming and not), ``GET /v1/models``."""

from __future__ import annotations

from semantic import hookimpl
from semantic.protocol import ProtocolSpec, RouteDoc

from .responses import CountTokensOut, ErrorOut, MessageOut
from .routes import blueprint
from .schema import CountTokensRequest, MessagesRequest

ROUTES = (
    RouteDoc("POST", "/v1/messages", "Create a message (Anthropic Messages API)", MessagesRequest, MessageOut, ErrorOut, streams=True),
    RouteDoc("POST", "/v1/messages/count_tokens", "Count a prompt's tokens with the model's tokenizer", CountTokensRequest, CountTokensOut, ErrorOut),
)


@hookimpl
def register_protocols(register):
    register(ProtocolSpec("anthropic", blueprint, "Anthropic Messages API (Claude Code)", ROUTES))
