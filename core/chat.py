"""Protocol-neutral chat messages and tools: what protocols hand the pipeline."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool the model may call: ``parameters`` is the JSON Schema of its arguments."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the model made: ``arguments`` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One protocol-neutral chat message.

    ``role`` is system, user, assistant or tool. An assistant message may carry ``tool_calls``;
    a tool message is the result of the call ``tool_call_id`` (of tool ``name``).
    """

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None




def _texts(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> Iterable[tuple[str, str]]:
    for i, m in enumerate(messages):
        yield f"message {i}", f"{m.content}{m.tool_call_id or ''}{m.name or ''}"
        for c in m.tool_calls:
            yield f"message {i} tool call", f"{c.id}{c.name}{c.arguments}"
    for i, t in enumerate(tools):
        yield f"tool {i}", json.dumps([t.name, t.description, t.parameters], ensure_ascii=False)


def unencodable(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = (), extra: Iterable[tuple[str, str]] = ()) -> str | None:
    """Where the first text that is not valid Unicode is (e.g. an unpaired surrogate from a
    ``"\\ud800"`` JSON escape), or None. Tokenizers fail on such text."""
    for where, text in [*extra, *_texts(messages, tools)]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return where
    return None
