"""HTTP routes of the Anthropic protocol and its SSE event sequence."""

from __future__ import annotations

import json
import logging
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError
from quart import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from semantic.errors import ErrorKind, RequestError
from semantic.items import Incoming
from semantic.model import SamplingParams
from semantic.request import Event, Failed, Finished, RequestHandle, Started, TextDelta, Usage

from .schema import MessagesRequest, to_chat

log = logging.getLogger(__name__)

_STATUS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorKind.AUTHENTICATION: (401, "authentication_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.TOO_LARGE: (413, "request_too_large"),
    ErrorKind.RATE_LIMITED: (429, "rate_limit_error"),
    ErrorKind.OVERLOADED: (529, "overloaded_error"),
    ErrorKind.INTERNAL: (500, "api_error"),
    ErrorKind.UNAVAILABLE: (503, "api_error"),
}


def error_body(error: RequestError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _STATUS[error.kind][1], "message": error.message}}


def error_response(error: RequestError) -> Response:
    status = _STATUS[error.kind][0]
    headers = {"retry-after": str(max(1, round(error.retry_after)))} if error.retry_after is not None else {}
    return Response(json.dumps(error_body(error)), status=status, mimetype="application/json", headers=headers)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def usage_json(usage: Usage) -> dict[str, int]:
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "cache_creation_input_tokens": usage.cache_created_tokens,
    }


async def _read_request(max_bytes: int) -> tuple[MessagesRequest, int]:
    try:
        raw = await request.get_data(cache=False, as_text=False)
    except RequestEntityTooLarge:
        raise RequestError(ErrorKind.TOO_LARGE, f"request body is larger than {max_bytes} bytes") from None
    if len(raw) > max_bytes:
        raise RequestError(ErrorKind.TOO_LARGE, f"request body is larger than {max_bytes} bytes")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(ErrorKind.INVALID_REQUEST, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(ErrorKind.INVALID_REQUEST, "request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise RequestError(ErrorKind.INVALID_REQUEST, "request body must be a JSON object")
    try:
        return MessagesRequest.model_validate(body), len(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors(include_url=False)[:10]
        )
        raise RequestError(ErrorKind.INVALID_REQUEST, problems) from None


def _agent_hint() -> str | None:
    return request.headers.get("x-agent-id") or request.headers.get("x-claude-code-session-id")


class _Exchange:
    """One /v1/messages call: the parsed request, its handle and the message id."""

    def __init__(self, req: MessagesRequest, handle: RequestHandle) -> None:
        self.req = req
        self.handle = handle
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def message(self, content: list[dict[str, Any]], stop_reason: str | None, stop_sequence: str | None, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.req.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage_json(usage),
        }


def _stop_reason(finished: Finished) -> str:
    return "end_turn" if finished.stop_reason == "cancelled" else finished.stop_reason


#: A stream starts (message_start, then pings) when the first event takes longer than this;
#: errors that come sooner still get their own HTTP status.
STREAM_GRACE_S = 1.0
#: While a request waits in the queue or its prompt is prefilled, a ping at least this often
#: (Claude Code and proxies abort silent streams).
KEEPALIVE_S = 5.0


async def _stream(ex: _Exchange, first: Event | None) -> AsyncIterator[str]:
    started = first.usage if isinstance(first, Started) else Usage()
    try:
        yield sse("message_start", {"type": "message_start", "message": ex.message([], None, None, started)})
        yield sse("ping", {"type": "ping"})
        block_open = False
        ev = first if not isinstance(first, Started) else None
        while True:
            if ev is None:
                ev = await ex.handle.next_event(KEEPALIVE_S)
                if ev is None:
                    if ex.handle.done:
                        return
                    yield sse("ping", {"type": "ping"})
                    continue
            if isinstance(ev, TextDelta | Finished) and not block_open:
                block_open = True
                yield sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
            if isinstance(ev, TextDelta):
                delta = {"type": "text_delta", "text": ev.text}
                yield sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            elif isinstance(ev, Failed):
                yield sse("error", error_body(ev.error))
                return
            elif isinstance(ev, Finished):
                yield sse("content_block_stop", {"type": "content_block_stop", "index": 0})
                delta = {"stop_reason": _stop_reason(ev), "stop_sequence": ev.stop_sequence}
                yield sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage_json(ev.usage)})
                yield sse("message_stop", {"type": "message_stop"})
                return
            ev = None
    finally:
        ex.handle.cancel()  # no-op when finished; stops generation when the client went away


class _SSEBody:
    """The SSE body. However the response ends — finished, client gone, never started — the
    request is cancelled (a no-op once it has finished), so nothing generates for nobody."""

    def __init__(self, ex: _Exchange, first: Event | None) -> None:
        self._gen = _stream(ex, first)
        weakref.finalize(self, ex.handle.cancel)

    def __aiter__(self) -> _SSEBody:
        return self

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()


async def _complete(ex: _Exchange, events: AsyncIterator[Event]) -> Response:
    text: list[str] = []
    try:
        async for ev in events:
            if isinstance(ev, TextDelta):
                text.append(ev.text)
            elif isinstance(ev, Failed):
                return error_response(ev.error)
            elif isinstance(ev, Finished):
                body = ex.message([{"type": "text", "text": "".join(text)}], _stop_reason(ev), ev.stop_sequence, ev.usage)
                return Response(json.dumps(body, ensure_ascii=False), mimetype="application/json")
    finally:
        ex.handle.cancel()
    return error_response(RequestError(ErrorKind.INTERNAL, "the response ended early"))


def blueprint(pipeline: Any) -> Blueprint:
    """The protocol's routes for ``pipeline``."""
    bp = Blueprint("anthropic", __name__)
    limits = pipeline.config.limits

    @bp.post("/v1/messages")
    async def messages() -> Response:
        try:
            req, size = await _read_request(limits.max_request_bytes)
            params = SamplingParams(
                max_tokens=req.max_tokens,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=req.top_p,
                top_k=req.top_k,
                stop=tuple(req.stop_sequences or ()),
            )
            handle = pipeline.new_request()
            item = Incoming(
                request=handle,
                protocol="anthropic",
                model=req.model,
                messages=to_chat(req),
                params=params,
                agent_hint=_agent_hint(),
                request_bytes=size,
            )
            await pipeline.submit(item)
        except RequestError as e:
            return error_response(e)
        ex = _Exchange(req, handle)
        events = handle.events()
        try:
            if not req.stream:
                return await _complete(ex, events)
            first = await handle.next_event(STREAM_GRACE_S)
        except BaseException:  # the client left while the request waited
            handle.cancel()
            raise
        if isinstance(first, Failed):
            handle.cancel()
            return error_response(first.error)
        if first is None and handle.done:
            return error_response(RequestError(ErrorKind.INTERNAL, "the request ended without a response"))
        headers = {"cache-control": "no-cache", "x-accel-buffering": "no"}
        return Response(_SSEBody(ex, first), mimetype="text/event-stream", headers=headers)

    @bp.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        if isinstance(error, HTTPException):
            kind = {404: ErrorKind.NOT_FOUND, 413: ErrorKind.TOO_LARGE}.get(error.code or 500, ErrorKind.INVALID_REQUEST)
            return error_response(RequestError(kind, error.description or error.name))
        log.exception("unexpected error in the anthropic protocol")
        return error_response(RequestError(ErrorKind.INTERNAL, f"internal error ({type(error).__name__})"))

    @bp.get("/v1/models")
    async def models() -> Response:
        name = pipeline.config.model.name
        data = [{"type": "model", "id": name, "display_name": name, "created_at": "2024-01-01T00:00:00Z"}]
        return Response(json.dumps({"data": data, "has_more": False, "first_id": name, "last_id": name}), mimetype="application/json")

    return bp
