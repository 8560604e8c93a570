"""HTTP routes of the Anthropic protocol and its SSE event sequence."""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response, request

from semantic.chat import unencodable
from semantic.chat_format import OutputParser, Part, TextPart, ThinkingPart, ToolCallPart, new_call_id
from semantic.errors import ErrorKind, RequestError
from semantic.items import Incoming
from semantic.model import SamplingParams
from semantic.protocol_http import KEEPALIVE_S, SSE_HEADERS, SSEBody, early_failure, first, first_event, protocol_blueprint, read_json
from semantic.request import Event, Failed, Finished, RequestHandle, Started, TextDelta, Usage
from semantic.stages.tokenize import render

from .responses import CountTokensOut, ErrorDetail, ErrorOut, MessageOut
from .responses import Usage as UsageOut
from .schema import CountTokensRequest, MessagesRequest, callable_tools, to_chat, tools_of

log = logging.getLogger(__name__)

_STATUS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorKind.AUTHENTICATION: (401, "authentication_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.CONFLICT: (409, "invalid_request_error"),
    ErrorKind.TOO_LARGE: (413, "request_too_large"),
    ErrorKind.RATE_LIMITED: (429, "rate_limit_error"),
    ErrorKind.OVERLOADED: (529, "overloaded_error"),
    ErrorKind.INTERNAL: (500, "api_error"),
    ErrorKind.UNAVAILABLE: (503, "api_error"),
}


def error_body(error: RequestError, request_id: str | None = None) -> dict[str, Any]:
    body = ErrorOut(error=ErrorDetail(type=_STATUS[error.kind][1], message=error.message), request_id=request_id)
    return body.model_dump(exclude_none=True)


def error_response(error: RequestError) -> Response:
    status = _STATUS[error.kind][0]
    rid = f"req_{uuid.uuid4().hex[:24]}"
    headers = {"request-id": rid}
    if error.retry_after is not None:
        headers["retry-after"] = str(max(1, round(error.retry_after)))
    return Response(json.dumps(error_body(error, rid)), status=status, mimetype="application/json", headers=headers)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage_json(usage: Usage) -> dict[str, int]:
    return UsageOut(
        input_tokens=usage.prompt_tokens - usage.cached_tokens,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cached_tokens,
        cache_creation_input_tokens=usage.cache_created_tokens,
    ).model_dump()


def _agent_hint() -> str | None:
    return request.headers.get("x-agent-id") or request.headers.get("x-claude-code-session-id")


def signature(thinking: str) -> str:
    """An opaque signature for a thinking block (clients echo it back; it is not checked)."""
    return "semantic-" + hashlib.sha256(thinking.encode("utf-8", "surrogatepass")).hexdigest()[:40]


class _Exchange:
    """One /v1/messages call: the parsed request, its handle, the message id and the parser that
    turns the model's text into text, thinking and tool_use blocks."""

    def __init__(self, req: MessagesRequest, handle: RequestHandle, parser: OutputParser) -> None:
        self.req = req
        self.handle = handle
        self.parser = parser
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def message(self, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None, usage: Usage) -> dict[str, Any]:
        out = MessageOut.model_validate(
            {"id": self.id, "model": self.req.model, "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": usage_json(usage)}
        )
        return out.model_dump()

    def stop_reason(self, finished: Finished) -> str:
        if finished.stop_reason in ("end_turn", "cancelled") and self.parser.calls:
            return "tool_use"
        return "end_turn" if finished.stop_reason == "cancelled" else finished.stop_reason


class _Blocks:
    """Content blocks built from parsed parts, as SSE events (``events``) and as a list (``content``)."""

    def __init__(self) -> None:
        self.content: list[dict[str, Any]] = []
        self._open: str | None = None  # type of the block still open: text or thinking

    def add(self, part: Part) -> list[str]:
        out: list[str] = []
        kind = "text" if isinstance(part, TextPart) else "thinking" if isinstance(part, ThinkingPart) else "tool_use"
        if self._open != kind or kind == "tool_use":
            out += self.close()
            out += self._start(part, kind)
        if isinstance(part, TextPart):
            self.content[-1]["text"] += part.text
            out.append(self._delta({"type": "text_delta", "text": part.text}))
        elif isinstance(part, ThinkingPart):
            self.content[-1]["thinking"] += part.text
            out.append(self._delta({"type": "thinking_delta", "thinking": part.text}))
        return out

    def _start(self, part: Part, kind: str) -> list[str]:
        index = len(self.content)
        if isinstance(part, ToolCallPart):
            c = part.call
            self.content.append({"type": "tool_use", "id": c.id, "name": c.name, "input": json.loads(c.arguments)})
            start = {"type": "tool_use", "id": c.id, "name": c.name, "input": {}}
            return [
                sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}),
                self._delta({"type": "input_json_delta", "partial_json": c.arguments}),
                sse("content_block_stop", {"type": "content_block_stop", "index": index}),
            ]
        block = {"type": "text", "text": ""} if kind == "text" else {"type": "thinking", "thinking": "", "signature": ""}
        self.content.append(dict(block))
        self._open = kind
        return [sse("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse("content_block_delta", {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta})

    def close(self) -> list[str]:
        """Close the open text or thinking block (a thinking block gets its signature first)."""
        if self._open is None:
            return []
        out = []
        block = self.content[-1]
        if self._open == "thinking":
            block["signature"] = signature(block["thinking"])
            out.append(self._delta({"type": "signature_delta", "signature": block["signature"]}))
        self._open = None
        return [*out, sse("content_block_stop", {"type": "content_block_stop", "index": len(self.content) - 1})]

    def finish(self) -> list[str]:
        """Close the last block (an empty reply has no blocks: the API refuses empty text blocks
        when a client sends them back)."""
        return self.close()


async def _stream(ex: _Exchange, first: Event | None) -> AsyncIterator[str]:
    started = first.usage if isinstance(first, Started) else Usage()
    blocks = _Blocks()
    try:
        yield sse("message_start", {"type": "message_start", "message": ex.message([], None, None, started)})
        yield sse("ping", {"type": "ping"})
        wrote = trio.current_time()
        ev = first if not isinstance(first, Started) else None
        while True:
            if ev is None:
                ev = await ex.handle.next_event(KEEPALIVE_S)
                if ev is None:
                    if ex.handle.done:  # ended without Finished or Failed: say so, the client retries
                        yield sse("error", error_body(RequestError(ErrorKind.INTERNAL, "the response ended early")))
                        return
                    yield sse("ping", {"type": "ping"})
                    wrote = trio.current_time()
                    continue
            if isinstance(ev, TextDelta):
                lines = [line for part in ex.parser.feed(ev.text) for line in blocks.add(part)]
                if lines:
                    wrote = trio.current_time()
                elif trio.current_time() - wrote >= KEEPALIVE_S:  # text held back (a tool call being written)
                    lines, wrote = [sse("ping", {"type": "ping"})], trio.current_time()
                for line in lines:
                    yield line
            elif isinstance(ev, Failed):
                yield sse("error", error_body(ev.error))
                return
            elif isinstance(ev, Finished):
                for part in ex.parser.finish():
                    for line in blocks.add(part):
                        yield line
                for line in blocks.finish():
                    yield line
                delta = {"stop_reason": ex.stop_reason(ev), "stop_sequence": ev.stop_sequence}
                yield sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage_json(ev.usage)})
                yield sse("message_stop", {"type": "message_stop"})
                return
            ev = None
    except Exception:  # a bug here must still end the stream in the protocol's terms
        log.exception("streaming a response failed")
        yield sse("error", error_body(RequestError(ErrorKind.INTERNAL, "internal error while streaming")))
    finally:
        ex.handle.cancel()  # no-op when finished; stops generation when the client went away


async def _complete(ex: _Exchange, events: AsyncIterator[Event]) -> Response:
    blocks = _Blocks()
    try:
        async for ev in events:
            if isinstance(ev, TextDelta):
                for part in ex.parser.feed(ev.text):
                    blocks.add(part)
            elif isinstance(ev, Failed):
                return error_response(ev.error)
            elif isinstance(ev, Finished):
                for part in ex.parser.finish():
                    blocks.add(part)
                blocks.finish()
                body = ex.message(blocks.content, ex.stop_reason(ev), ev.stop_sequence, ev.usage)
                return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")
    finally:
        ex.handle.cancel()
    return error_response(RequestError(ErrorKind.INTERNAL, "the response ended early"))


def blueprint(pipeline: Any) -> Blueprint:
    """The protocol's routes for ``pipeline``."""
    bp = protocol_blueprint("anthropic", __name__, pipeline, error_response)
    limits = pipeline.config.limits

    @bp.post("/v1/messages")
    async def messages() -> Response:
        try:
            req, size = await read_json(limits.max_request_bytes, MessagesRequest)
            defaults = pipeline.config.model.sampling
            params = SamplingParams(
                max_tokens=req.max_tokens,
                temperature=first(req.temperature, defaults.temperature, 1.0),
                top_p=first(req.top_p, defaults.top_p),
                top_k=first(req.top_k, defaults.top_k),
                stop=tuple(req.stop_sequences or ()),
            )
            tools = tools_of(req)
            handle = pipeline.new_request()
            item = Incoming(
                request=handle,
                protocol="anthropic",
                model=req.model,
                messages=to_chat(req),
                params=params,
                tools=tools,
                agent_hint=_agent_hint(),
                request_bytes=size,
            )
            await pipeline.submit(item)
        except RequestError as e:
            return error_response(e)
        parser = pipeline.model.chat_format.parser(callable_tools(req, tools), new_id=lambda: new_call_id("toolu_"))
        ex = _Exchange(req, handle, parser)
        if not req.stream:
            return await _complete(ex, handle.events())
        ev = await first_event(handle)
        if (error := early_failure(handle, ev)) is not None:
            return error_response(error)
        return Response(SSEBody(handle, lambda: _stream(ex, ev)), mimetype="text/event-stream", headers=SSE_HEADERS)

    @bp.post("/v1/messages/count_tokens")
    async def count_tokens() -> Response:
        """The prompt's real token count: the model's tokenizer and chat template, tools included."""
        try:
            req, _size = await read_json(limits.max_request_bytes, CountTokensRequest)
            if not pipeline.config.model.accepts(req.model):
                raise RequestError(ErrorKind.NOT_FOUND, f"model {req.model!r} is not served here")
            model = pipeline.model
            if model is None:
                raise RequestError(ErrorKind.UNAVAILABLE, "the model is not loaded yet")
            messages = to_chat(req)
            where = unencodable(messages, tools_of(req))
            if where is not None:
                raise RequestError(ErrorKind.INVALID_REQUEST, f"{where}: text is not valid Unicode (unpaired surrogate)")
            tokens = await render(model, messages, tools_of(req))
        except RequestError as e:
            return error_response(e)
        return Response(CountTokensOut(input_tokens=len(tokens)).model_dump_json(), mimetype="application/json")

    return bp
