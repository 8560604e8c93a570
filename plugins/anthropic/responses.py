"""Anthropic Messages API response shapes: what the handlers build and ``/openapi.json`` shows."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    input_tokens: int = Field(description="Prompt tokens not read from cache.")
    output_tokens: int
    cache_read_input_tokens: int = Field(description="Prompt tokens served from the block pool.")
    cache_creation_input_tokens: int = Field(description="Prompt tokens newly stored.")


class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingOut(BaseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentOut = Annotated[TextOut | ThinkingOut | ToolUseOut, Field(discriminator="type")]


class MessageOut(BaseModel):
    """A whole reply (``stream: false``); streams send it in ``message_start`` and deltas."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentOut]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None
    usage: Usage


class CountTokensOut(BaseModel):
    input_tokens: int


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorOut(BaseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail
    request_id: str | None = None
