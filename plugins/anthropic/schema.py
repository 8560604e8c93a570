"""Anthropic Messages API request shapes, and their mapping to protocol-neutral messages.

Unknown fields are accepted and ignored, as the API's clients (Claude Code) send beta fields.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from semantic.errors import ErrorKind, RequestError
from semantic.model import ChatMessage


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ContentBlock(_Open):
    """Any content block; its ``type`` decides whether this server can use it."""

    type: str


class Message(_Open):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class MessagesRequest(_Open):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    system: str | list[TextBlock] | None = None
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=32)
    metadata: dict[str, Any] | None = None


_IGNORED_BLOCKS = {"thinking", "redacted_thinking"}  # the model's own earlier reasoning: not re-read


def _block_text(block: ContentBlock, where: str) -> str | None:
    if block.type == "text":
        text = (block.model_extra or {}).get("text")
        if not isinstance(text, str):
            raise RequestError(ErrorKind.INVALID_REQUEST, f"{where}: text block needs a string 'text'")
        return text
    if block.type in _IGNORED_BLOCKS:
        return None
    raise RequestError(ErrorKind.INVALID_REQUEST, f"{where}: content blocks of type {block.type!r} are not supported by this server")


def to_chat(req: MessagesRequest) -> tuple[ChatMessage, ...]:
    """The request's system prompt and messages as plain chat messages (blocks joined)."""
    out: list[ChatMessage] = []
    if isinstance(req.system, str) and req.system:
        out.append(ChatMessage("system", req.system))
    elif isinstance(req.system, list) and req.system:
        out.append(ChatMessage("system", "\n".join(b.text for b in req.system)))
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, str):
            text = msg.content
        else:
            parts = [_block_text(b, f"messages[{i}].content[{j}]") for j, b in enumerate(msg.content)]
            text = "\n".join(p for p in parts if p is not None)
        out.append(ChatMessage(msg.role, text))
    return tuple(out)
