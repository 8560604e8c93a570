"""HTTP routes of the OpenAI protocol: chat completions and completions, streamed as ``data:``
chunks ending with ``[DONE]``, and errors as ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response, request

from semantic.chat_format import OutputParser, TextPart, ThinkingPart, ToolCallPart, new_call_id
from semantic.errors import ErrorKind, RequestError
from semantic.items import Incoming
from semantic.model import ChatMessage, SamplingParams
from semantic.protocol_http import KEEPALIVE_S, SSE_HEADERS, SSEBody, early_failure, first, first_event, protocol_blueprint, read_json
from semantic.request import Event, Failed, Finished, RequestHandle, Started, TextDelta, Usage

from .responses import ChatCompletion, Completion, ErrorDetail, ErrorOut, PromptTokensDetails
from .responses import Usage as UsageOut
from .schema import ChatCompletionRequest, CompletionRequest, callable_tools, to_chat, tools_of

log = logging.getLogger(__name__)

_STATUS: dict[ErrorKind, tuple[int, str, str | None]] = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error", None),
    ErrorKind.AUTHENTICATION: (401, "authentication_error", "invalid_api_key"),
    ErrorKind.NOT_FOUND: (404, "not_found_error", "model_not_found"),
    ErrorKind.CONFLICT: (409, "invalid_request_error", "conflict"),
    ErrorKind.TOO_LARGE: (413, "invalid_request_error", "request_too_large"),
    ErrorKind.RATE_LIMITED: (429, "rate_limit_error", "rate_limit_exceeded"),
    ErrorKind.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    ErrorKind.INTERNAL: (500, "server_error", None),
    ErrorKind.UNAVAILABLE: (503, "server_error", "unavailable"),
}


def error_body(error: RequestError) -> dict[str, Any]:
    _status, kind, code = _STATUS[error.kind]
    return ErrorOut(error=ErrorDetail(message=error.message, type=kind, code=code)).model_dump()


def error_response(error: RequestError) -> Response:
    headers = {"retry-after": str(max(1, round(error.retry_after)))} if error.retry_after is not None else {}
    return Response(json.dumps(error_body(error)), status=_STATUS[error.kind][0], mimetype="application/json", headers=headers)


def data(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see bytes


def usage_json(u: Usage) -> dict[str, Any]:
    return UsageOut(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.output_tokens,
        total_tokens=u.prompt_tokens + u.output_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=u.cached_tokens),
    ).model_dump()


def finish_reason(finished: Finished, calls: int) -> str:
    if finished.stop_reason == "max_tokens":
        return "length"
    return "tool_calls" if calls else "stop"


class _Exchange:
    """One completion call: ids, the request's model name, and (for chat) the reply parser."""

    def __init__(self, handle: RequestHandle, model: str, kind: str, parser: OutputParser | None, include_usage: bool) -> None:
        self.handle = handle
        self.model = model
        self.kind = kind  # "chat.completion" or "text_completion"
        self.id = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.parser = parser
        self.include_usage = include_usage
        self.calls = 0

    def envelope(self, choices: list[dict[str, Any]], *, chunk: bool, usage: Usage | None = None) -> dict[str, Any]:
        obj = f"{self.kind}.chunk" if chunk and self.kind == "chat.completion" else self.kind
        out: dict[str, Any] = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage_json(usage)
        return out

    def deltas(self, text: str, final: bool = False) -> list[dict[str, Any]]:
        """What the model's new text adds: content, reasoning or tool-call deltas."""
        if self.parser is None:
            return [{"text": text}] if text else []
        parts = self.parser.finish() if final else self.parser.feed(text)
        out: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, TextPart):
                out.append({"content": part.text})
            elif isinstance(part, ThinkingPart):
                out.append({"reasoning_content": part.text})
            elif isinstance(part, ToolCallPart):
                c = part.call
                call = {"index": self.calls, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                self.calls += 1
                out.append({"tool_calls": [call]})
        return out

    def choice(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        if self.parser is None:
            return {"index": 0, "text": delta.get("text", ""), "logprobs": None, "finish_reason": finish}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


async def _stream(ex: _Exchange, first_ev: Event | None) -> AsyncIterator[str]:
    try:
        if ex.parser is not None:
            yield data(ex.envelope([ex.choice({"role": "assistant", "content": ""})], chunk=True))
        wrote = trio.current_time()
        ev = first_ev if not isinstance(first_ev, Started) else None
        while True:
            if ev is None:
                ev = await ex.handle.next_event(KEEPALIVE_S)
                if ev is None:
                    if ex.handle.done:
                        yield data(error_body(RequestError(ErrorKind.INTERNAL, "the response ended early")))
                        return
                    yield KEEPALIVE
                    wrote = trio.current_time()
                    continue
            if isinstance(ev, TextDelta | Finished):
                final = isinstance(ev, Finished)
                lines = [data(ex.envelope([ex.choice(d)], chunk=True)) for d in ex.deltas(ev.text if isinstance(ev, TextDelta) else "", final)]
                if lines:
                    wrote = trio.current_time()
                elif trio.current_time() - wrote >= KEEPALIVE_S:  # text held back (a tool call being written)
                    lines, wrote = [KEEPALIVE], trio.current_time()
                for line in lines:
                    yield line
                if isinstance(ev, Finished):
                    yield data(ex.envelope([ex.choice({}, finish_reason(ev, ex.calls))], chunk=True))
                    if ex.include_usage:
                        yield data(ex.envelope([], chunk=True, usage=ev.usage))
                    yield data("[DONE]")
                    return
            elif isinstance(ev, Failed):
                yield data(error_body(ev.error))
                return
            ev = None
    except Exception:  # a bug here must still end the stream in the protocol's terms
        log.exception("streaming a response failed")
        yield data(error_body(RequestError(ErrorKind.INTERNAL, "internal error while streaming")))
    finally:
        ex.handle.cancel()


async def _complete(ex: _Exchange) -> Response:
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []

    def take(deltas: list[dict[str, Any]]) -> None:
        for d in deltas:
            text.append(d.get("content") or d.get("text") or "")
            reasoning.append(d.get("reasoning_content") or "")
            calls.extend(d.get("tool_calls") or ())

    try:
        async for ev in ex.handle.events():
            if isinstance(ev, TextDelta):
                take(ex.deltas(ev.text))
            elif isinstance(ev, Failed):
                return error_response(ev.error)
            elif isinstance(ev, Finished):
                take(ex.deltas("", final=True))
                reason = finish_reason(ev, ex.calls)
                if ex.parser is None:
                    choice = {"index": 0, "text": "".join(text), "logprobs": None, "finish_reason": reason}
                else:
                    message: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
                    if calls:
                        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
                    if any(reasoning):
                        message["reasoning_content"] = "".join(reasoning)
                    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
                body = ex.envelope([choice], chunk=False, usage=ev.usage)
                out = (Completion if ex.parser is None else ChatCompletion).model_validate(body)
                return Response(out.model_dump_json(), mimetype="application/json")
    finally:
        ex.handle.cancel()
    return error_response(RequestError(ErrorKind.INTERNAL, "the response ended early"))


def _session(body_session: str | None) -> str | None:
    return body_session or request.headers.get("x-session-id") or request.headers.get("x-agent-id")


def blueprint(pipeline: Any) -> Blueprint:
    """The protocol's routes for ``pipeline``."""
    bp = protocol_blueprint("openai", __name__, pipeline, error_response)
    limits = pipeline.config.limits

    def params(req: Any, max_tokens: int | None) -> SamplingParams:
        defaults = pipeline.config.model.sampling
        return SamplingParams(
            max_tokens=max_tokens or limits.max_output_tokens,
            temperature=first(req.temperature, defaults.temperature, 1.0),
            top_p=first(req.top_p, defaults.top_p),
            top_k=defaults.top_k,
            seed=req.seed,
            stop=req.stops(),
            fit_context=max_tokens is None,
        )

    async def run(req: Any, item: Incoming, parser: OutputParser | None, kind: str) -> Response:
        await pipeline.submit(item)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        ex = _Exchange(item.request, req.model, kind, parser, include_usage)
        if not req.stream:
            return await _complete(ex)
        ev = await first_event(item.request)
        if (error := early_failure(item.request, ev)) is not None:
            return error_response(error)
        return Response(SSEBody(item.request, lambda: _stream(ex, ev)), mimetype="text/event-stream", headers=SSE_HEADERS)

    @bp.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        try:
            req, size = await read_json(limits.max_request_bytes, ChatCompletionRequest)
            tools = tools_of(req)
            item = Incoming(
                request=pipeline.new_request(),
                protocol="openai",
                model=req.model,
                messages=to_chat(req),
                params=params(req, req.max_completion_tokens or req.max_tokens),
                tools=tools,
                agent_hint=_session(req.session_id),
                request_bytes=size,
            )
            parser = pipeline.model.chat_format.parser(callable_tools(req, tools), new_id=lambda: new_call_id("call_"))
            return await run(req, item, parser, "chat.completion")
        except RequestError as e:
            return error_response(e)

    @bp.post("/v1/completions")
    async def completions() -> Response:
        try:
            req, size = await read_json(limits.max_request_bytes, CompletionRequest)
            item = Incoming(
                request=pipeline.new_request(),
                protocol="openai",
                model=req.model,
                messages=(ChatMessage("user", req.text()),),
                raw_prompt=req.text(),
                params=params(req, req.max_tokens),
                agent_hint=_session(req.session_id),
                request_bytes=size,
            )
            return await run(req, item, None, "text_completion")
        except RequestError as e:
            return error_response(e)

    return bp
