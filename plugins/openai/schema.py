"""OpenAI Chat Completions and Completions request shapes, and their mapping to chat messages.

Unknown fields are accepted and ignored; fields this server cannot honour (``n`` > 1, logprobs,
images, audio, structured output) are a 400 rather than silently different output.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from semantic.errors import ErrorKind, RequestError
from semantic.model import ChatMessage, ToolCall, ToolSpec


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class FunctionCall(_Open):
    name: str = Field(min_length=1, max_length=256)
    arguments: str = "{}"


class ToolCallIn(_Open):
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Open):
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Open):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: dict[str, Any]


class StreamOptions(_Open):
    include_usage: bool = False


Stop = Annotated[str, Field(max_length=256)] | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=32)] | None


class _Sampling(_Open):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(None, ge=1, le=1, description="Only one choice per request.")
    session_id: str | None = Field(None, description="Names the agent (semantic); or the X-Session-Id header.")

    @model_validator(mode="after")
    def _unsupported(self) -> _Sampling:
        extra = self.model_extra or {}
        for key in ("logprobs", "top_logprobs", "echo", "suffix"):
            if extra.get(key):
                raise ValueError(f"{key} is not supported by this server")
        if extra.get("best_of") not in (None, 1):
            raise ValueError("best_of is not supported by this server")
        fmt = extra.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") not in (None, "text"):
            raise ValueError("response_format other than text (structured output) is not supported by this server")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    max_tokens: int | None = Field(16, ge=1)

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def _text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for k, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise RequestError(ErrorKind.INVALID_REQUEST, f"{where}.content[{k}]: content of type {part.type!r} is not supported by this server (text-only model)")
        parts.append(part.text)
    return "\n".join(parts)


def tools_of(req: ChatCompletionRequest) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(t.function.name, t.function.description or "", t.function.parameters or {"type": "object", "properties": {}})
        for t in req.tools or ()
    )


def callable_tools(req: ChatCompletionRequest, tools: tuple[ToolSpec, ...]) -> tuple[ToolSpec, ...]:
    """Tools whose calls are parsed from the reply (none for ``tool_choice: none``; the tools stay
    in the prompt so it keeps its cached prefix)."""
    return () if req.tool_choice == "none" else tools


def to_chat(req: ChatCompletionRequest) -> tuple[ChatMessage, ...]:
    """The messages as protocol-neutral chat messages (``developer`` is a system message)."""
    names: dict[str, str] = {}
    out: list[ChatMessage] = []
    for i, m in enumerate(req.messages):
        text = _text(m.content, f"messages[{i}]")
        if m.role == "assistant":
            calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
            names.update((c.id, c.name) for c in calls)
            out.append(ChatMessage("assistant", text, tool_calls=calls))
        elif m.role == "tool":
            if not m.tool_call_id:
                raise RequestError(ErrorKind.INVALID_REQUEST, f"messages[{i}]: a tool message needs 'tool_call_id'")
            out.append(ChatMessage("tool", text, tool_call_id=m.tool_call_id, name=m.name or names.get(m.tool_call_id)))
        else:
            out.append(ChatMessage("system" if m.role == "developer" else m.role, text))
    return tuple(out)
