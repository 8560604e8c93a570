"""OpenAI protocol: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streaming and not).

``GET /v1/models`` is served by the server itself, in a shape both SDKs read.
"""

from __future__ import annotations

from semantic import hookimpl
from semantic.protocol import ProtocolSpec, RouteDoc

from .responses import ChatCompletion, Completion, ErrorOut
from .routes import blueprint
from .schema import ChatCompletionRequest, CompletionRequest

ROUTES = (
    RouteDoc("POST", "/v1/chat/completions", "Create a chat completion (OpenAI)", ChatCompletionRequest, ChatCompletion, ErrorOut, streams=True),
    RouteDoc("POST", "/v1/completions", "Create a text completion (OpenAI)", CompletionRequest, Completion, ErrorOut, streams=True),
)


@hookimpl
def register_protocols(register):
    register(ProtocolSpec("openai", blueprint, "OpenAI Chat Completions and Completions APIs", ROUTES))
