"""How a model family writes tool calls and reasoning in plain text, both ways.

Rendering: chat templates that know tools get them natively (:func:`template_messages`,
:func:`template_tools`). For templates that don't, :meth:`ChatFormat.render` writes the tools,
the model's earlier calls and their results into ordinary messages, in the Hermes format that
Qwen models also use natively (docs/protocols.md shows it).

Parsing: :meth:`ChatFormat.parser` gives an :class:`OutputParser` that splits the streamed reply
into text, thinking and tool calls. Output that does not parse as a call of a declared tool stays
text: a model's malformed call is shown, never an error.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .chat import ChatMessage, ToolCall, ToolSpec


@dataclass(frozen=True, slots=True)
class TextPart:
    text: str


@dataclass(frozen=True, slots=True)
class ThinkingPart:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallPart:
    call: ToolCall


Part = TextPart | ThinkingPart | ToolCallPart


def new_call_id(prefix: str = "call_") -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def template_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    """Tools as Hugging Face chat templates take them (OpenAI function shape)."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}} for t in tools]


def _arguments(call: ToolCall) -> Any:
    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take them (tool calls and tool results included)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments(c)}} for c in m.tool_calls
            ]
        if m.role == "tool":
            d["tool_call_id"] = m.tool_call_id
            if m.name:
                d["name"] = m.name
        out.append(d)
    return out


class ChatFormat:
    """A model family's text conventions for tool calls (and reasoning, for models that think)."""

    def __init__(
        self,
        name: str,
        *,
        tool_open: str = "<tool_call>",
        tool_close: str = "</tool_call>",
        think: tuple[str, str] | None = None,
    ) -> None:
        self.name = name
        self.tool_open = tool_open
        self.tool_close = tool_close
        self.think = think

    def tools_prompt(self, tools: Sequence[ToolSpec]) -> str:
        """The system-prompt section that declares ``tools`` and how to call them."""
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in template_tools(tools))
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{self.tool_open}{self.tool_close} XML tags:\n"
            f'{self.tool_open}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{self.tool_close}'
        )

    def render(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> list[ChatMessage]:
        """``messages`` with tools, calls and results written as plain system/user/assistant text."""
        out: list[ChatMessage] = []
        results: list[str] = []
        section = self.tools_prompt(tools) if tools else ""
        placed = not section

        def flush() -> None:
            if results:
                out.append(ChatMessage("user", "\n".join(results)))
                results.clear()

        for m in messages:
            if m.role == "tool":
                results.append(f"<tool_response>\n{m.content}\n</tool_response>")
                continue
            flush()
            if m.role == "assistant" and m.tool_calls:
                calls = [
                    f"{self.tool_open}\n{json.dumps({'name': c.name, 'arguments': _arguments(c)}, ensure_ascii=False)}\n{self.tool_close}"
                    for c in m.tool_calls
                ]
                out.append(ChatMessage("assistant", "\n".join([m.content, *calls] if m.content else calls)))
            elif m.role == "system" and not placed:
                out.append(ChatMessage("system", f"{m.content}\n\n{section}" if m.content else section))
                placed = True
            else:
                out.append(ChatMessage(m.role, m.content))
        flush()
        if not placed:
            out.insert(0, ChatMessage("system", section))
        return out

    def parser(
        self, tools: Sequence[ToolSpec] = (), *, thinking: bool = True, new_id: Callable[[], str] = new_call_id
    ) -> OutputParser:
        """A parser for one reply: calls of ``tools`` (none: no call parsing) and, if the family
        thinks and ``thinking``, reasoning blocks."""
        return OutputParser(self, frozenset(t.name for t in tools), thinking and self.think is not None, new_id)


#: The default: Hermes-style ``<tool_call>{json}</tool_call>``; no reasoning tags.
HERMES = ChatFormat("hermes")
#: Hermes tool calls plus ``<think>…</think>`` reasoning (Qwen3, DeepSeek-R1 distills).
HERMES_THINK = ChatFormat("hermes-think", think=("<think>", "</think>"))


def detect_format(chat_template: str) -> ChatFormat:
    """The format a chat template implies: reasoning tags if it mentions them, else Hermes."""
    return HERMES_THINK if "<think>" in chat_template else HERMES


def _partial_suffix(buf: str, tags: Sequence[str]) -> int:
    """Length of the longest end of ``buf`` that could be the start of one of ``tags``."""
    best = 0
    for tag in tags:
        for n in range(min(len(tag) - 1, len(buf)), best, -1):
            if buf.endswith(tag[:n]):
                best = n
                break
    return best


class OutputParser:
    """Splits a streamed reply into text, thinking and tool-call parts (feed, then finish).

    Whitespace around calls and reasoning is dropped; text whose trailing whitespace might
    precede a call is held until it is known.
    """

    def __init__(self, fmt: ChatFormat, tool_names: frozenset[str], thinking: bool, new_id: Callable[[], str]) -> None:
        self._fmt = fmt
        self._names = tool_names
        self._opens: dict[str, str] = {}
        if tool_names:
            self._opens[fmt.tool_open] = "tool"
        if thinking and fmt.think:
            self._opens[fmt.think[0]] = "think"
        self._new_id = new_id
        self._buf = ""
        self._mode = "text"
        self._strip = False  # drop leading whitespace of the next text (after a call or reasoning)
        self._strip_think = True  # drop leading whitespace of reasoning
        self.calls = 0

    def feed(self, text: str) -> list[Part]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Part]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[Part]:
        out: list[Part] = []
        while True:
            if self._mode == "text":
                if self._strip:
                    self._buf = self._buf.lstrip()
                    if not self._buf and not final:
                        break
                hits = [(i, tag) for tag in self._opens if (i := self._buf.find(tag)) >= 0]
                if hits:
                    i, tag = min(hits)
                    self._text(out, self._buf[:i].rstrip())
                    self._buf, self._mode = self._buf[i + len(tag) :], self._opens[tag]
                    self._strip_think = True
                    continue
                keep = 0 if final else _partial_suffix(self._buf, list(self._opens))
                ready = self._buf[: len(self._buf) - keep]
                if not final:  # trailing whitespace may precede a call: hold it
                    ready = ready.rstrip()
                elif self.calls:
                    ready = ready.rstrip()
                self._text(out, ready)
                self._buf = self._buf[len(ready) :]
                if final:
                    self._buf = ""
                break
            if self._mode == "think":
                if self._strip_think:
                    self._buf = self._buf.lstrip()
                close = self._fmt.think[1]  # type: ignore[index]
                i = self._buf.find(close)
                done = i >= 0
                keep = 0 if done or final else _partial_suffix(self._buf, [close])
                chunk = self._buf[: i if done else len(self._buf) - keep]
                ready = chunk if final and not done else chunk.rstrip()  # whitespace before the close tag is dropped
                if ready:
                    out.append(ThinkingPart(ready))
                    self._strip_think = False
                if done:
                    self._buf = self._buf[i + len(close) :]
                    self._mode, self._strip = "text", True
                    continue
                self._buf = "" if final else self._buf[len(ready) :]
                break
            close = self._fmt.tool_close
            i = self._buf.find(close)
            if i >= 0 or final:
                raw = self._buf[:i] if i >= 0 else self._buf
                self._buf = self._buf[i + len(close) :] if i >= 0 else ""
                out.append(self._call(raw, closed=i >= 0))
                self._mode = "text"
                continue
            break
        return _merged(out)

    def _text(self, out: list[Part], text: str) -> None:
        if text:
            out.append(TextPart(text))
            self._strip = False

    def _call(self, raw: str, closed: bool) -> Part:
        try:
            obj = json.loads(raw)
            name = obj["name"]
            args = obj.get("arguments", obj.get("parameters", {}))
            if isinstance(args, str):
                args = json.loads(args)
            if isinstance(name, str) and name in self._names and isinstance(args, dict):
                self.calls += 1
                self._strip = True
                return ToolCallPart(ToolCall(self._new_id(), name, json.dumps(args, ensure_ascii=False)))
        except (ValueError, KeyError, TypeError, AttributeError):
            pass
        self._strip = False
        return TextPart(f"{self._fmt.tool_open}{raw}{self._fmt.tool_close if closed else ''}")


def _merged(parts: list[Part]) -> list[Part]:
    out: list[Part] = []
    for p in parts:
        if out and type(p) is type(out[-1]) and not isinstance(p, ToolCallPart):
            out[-1] = type(p)(out[-1].text + p.text)  # type: ignore[union-attr, call-arg]
        else:
            out.append(p)
    return out
