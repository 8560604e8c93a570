"""Anthropic Messages API request shapes, and their mapping to protocol-neutral messages.

Unknown fields are accepted and ignored, as the API's clients (Claude Code) send beta fields
(``context_management``, ``output_config``, ``cache_control`` on any block, ...).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from semantic.errors import ErrorKind, RequestError
from semantic.model import ChatMessage, ToolCall, ToolSpec

#: Claude Code's first system block: a per-session billing line, not an instruction. Dropped so
#: that sessions and turns share their prompt prefix.
BILLING_PREFIX = "x-anthropic-billing-header:"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any] = Field(default_factory=dict)


class ThinkingBlock(_Open):
    type: Literal["thinking"]
    thinking: str = ""
    signature: str | None = None


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"]
    data: str = ""


class OtherBlock(_Open):
    """A block this server cannot use (images, documents, server-tool results, ...)."""

    type: str


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[Annotated[TextBlock | OtherBlock, Field(union_mode="left_to_right")]] | None = None
    is_error: bool = False


_KNOWN = {"text", "tool_use", "tool_result", "thinking", "redacted_thinking"}


def _block_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in _KNOWN else "other"


ContentBlock = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[RedactedThinkingBlock, Tag("redacted_thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_kind),
]


class Message(_Open):
    role: str = Field(min_length=1, max_length=64)
    content: str | list[ContentBlock]

    @field_validator("role")
    @classmethod
    def _known_role(cls, role: str) -> str:
        """user, assistant, system; any other role (newer clients add some) is read as user."""
        return role if role in ("user", "assistant", "system") else "user"


class Tool(_Open):
    """A tool definition. Tools with a ``type`` other than ``custom`` are Anthropic's server or
    client tools (web search, computer use): this server cannot run them and leaves them out."""

    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoice(_Open):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _name_for_tool(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs the tool's 'name'")
        return self


class OutputConfig(_Open):
    """``effort`` and other hints are accepted; structured output (``format``) is not supported."""

    @model_validator(mode="after")
    def _no_format(self) -> OutputConfig:
        if (self.model_extra or {}).get("format") is not None:
            raise ValueError("output_config.format (structured output) is not supported by this server")
        return self


class Thinking(_Open):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class CountTokensRequest(_Open):
    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    stream: bool = False
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop_sequences: list[Annotated[str, Field(max_length=256)]] | None = Field(None, max_length=32)
    metadata: dict[str, Any] | None = None


def _unsupported(where: str, kind: str) -> RequestError:
    return RequestError(ErrorKind.INVALID_REQUEST, f"{where}: content blocks of type {kind!r} are not supported by this server (text-only model)")


def _system_text(system: str | list[TextBlock] | None) -> str:
    if isinstance(system, str):
        lines = system.split("\n", 1)
        return (lines[1] if len(lines) > 1 else "") if lines[0].startswith(BILLING_PREFIX) else system
    return "\n".join(b.text for b in system or () if not b.text.startswith(BILLING_PREFIX))


def _result_text(block: ToolResultBlock, where: str) -> str:
    if block.content is None:
        text = ""
    elif isinstance(block.content, str):
        text = block.content
    else:
        parts = []
        for k, b in enumerate(block.content):
            if isinstance(b, TextBlock):
                parts.append(b.text)
            elif b.type == "tool_reference":  # a tool search result: the tool's name
                parts.append(f"Tool: {(b.model_extra or {}).get('tool_name', '')}")
            else:
                raise _unsupported(f"{where}.content[{k}]", b.type)
        text = "\n".join(parts)
    return f"Error: {text}" if block.is_error else text


def tools_of(req: CountTokensRequest) -> tuple[ToolSpec, ...]:
    """The request's custom tools, rendered into the prompt (server tools are left out)."""
    return tuple(
        ToolSpec(t.name, t.description or "", t.input_schema or {"type": "object", "properties": {}})
        for t in req.tools or ()
        if t.type in (None, "custom")
    )


def callable_tools(req: CountTokensRequest, tools: tuple[ToolSpec, ...]) -> tuple[ToolSpec, ...]:
    """Tools whose calls are parsed from the reply: none if ``tool_choice`` is ``none`` (the
    tools stay in the prompt, so it keeps its cached prefix)."""
    return () if req.tool_choice is not None and req.tool_choice.type == "none" else tools


def to_chat(req: CountTokensRequest) -> tuple[ChatMessage, ...]:
    """The request's system prompt and messages as protocol-neutral chat messages.

    Text blocks are joined with newlines, so a prompt sent as a block list and later as a string
    renders the same; ``tool_result`` blocks become tool messages; earlier thinking is not
    re-read. Anything the model cannot read is a 400 naming where it is.
    """
    out: list[ChatMessage] = []
    system = _system_text(req.system)
    if system:
        out.append(ChatMessage("system", system))
    names: dict[str, str] = {}  # tool_use id -> tool name, for results
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, str):
            out.append(ChatMessage(msg.role, msg.content))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        for j, block in enumerate(msg.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ThinkingBlock | RedactedThinkingBlock):
                continue
            elif isinstance(block, ToolUseBlock):
                if msg.role != "assistant":
                    raise RequestError(ErrorKind.INVALID_REQUEST, f"{where}: tool_use blocks belong in assistant messages")
                names[block.id] = block.name
                calls.append(ToolCall(block.id, block.name, json.dumps(block.input, ensure_ascii=False)))
            elif isinstance(block, ToolResultBlock):
                if msg.role != "user":
                    raise RequestError(ErrorKind.INVALID_REQUEST, f"{where}: tool_result blocks belong in user messages")
                if texts:
                    out.append(ChatMessage("user", "\n".join(texts)))
                    texts = []
                out.append(ChatMessage("tool", _result_text(block, where), tool_call_id=block.tool_use_id, name=names.get(block.tool_use_id)))
            else:
                raise _unsupported(where, block.type)
        if msg.role == "assistant":
            out.append(ChatMessage("assistant", "\n".join(texts), tool_calls=tuple(calls)))
        elif texts or not msg.content:
            out.append(ChatMessage(msg.role, "\n".join(texts)))
    return tuple(out)
