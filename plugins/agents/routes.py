"""HTTP routes of the direct agent API: create, list, get and delete agents, and talk to one.

The server keeps each agent's conversation: ``POST /v1/agents/{id}/messages`` renders the whole
conversation plus the new messages, and appends them with the reply once the reply is complete
(a failed, cancelled or abandoned turn changes nothing). One request per agent at a time; a
second one meanwhile is a 409. Streams are named SSE events: ``message_start``, ``text_delta``,
``tool_call``, ``ping``, ``message_stop`` (with the whole reply) or ``error``.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import trio
from quart import Blueprint, Response

from semantic.chat_format import OutputParser, TextPart, ThinkingPart, ToolCallPart, new_call_id
from semantic.errors import ErrorKind, RequestError
from semantic.items import Incoming
from semantic.model import ChatMessage, SamplingParams, ToolCall, ToolSpec
from semantic.protocol_http import KEEPALIVE_S, SSE_HEADERS, SSEBody, early_failure, first, first_event, protocol_blueprint, read_json
from semantic.request import Event, Failed, Finished, RequestHandle, Started, TextDelta, Usage

from .schema import (
    AGENT_ID,
    AGENT_ID_RULE,
    AgentCreate,
    AgentDeleted,
    AgentDetail,
    AgentList,
    AgentOut,
    AgentReply,
    CacheOut,
    ConversationMessage,
    ErrorDetail,
    ErrorOut,
    FreedOut,
    ToolCallOut,
    TurnRequest,
    UsageOut,
)
from .store import AgentRecord, AgentStore, Turn

log = logging.getLogger(__name__)

_STATUS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorKind.AUTHENTICATION: (401, "authentication_error"),
    ErrorKind.NOT_FOUND: (404, "not_found_error"),
    ErrorKind.CONFLICT: (409, "conflict_error"),
    ErrorKind.TOO_LARGE: (413, "request_too_large"),
    ErrorKind.RATE_LIMITED: (429, "rate_limit_error"),
    ErrorKind.OVERLOADED: (429, "overloaded_error"),
    ErrorKind.INTERNAL: (500, "api_error"),
    ErrorKind.UNAVAILABLE: (503, "unavailable_error"),
}


def error_body(error: RequestError, request_id: str | None = None) -> dict[str, Any]:
    return ErrorOut(error=ErrorDetail(type=_STATUS[error.kind][1], message=error.message, request_id=request_id)).model_dump(exclude_none=True)


def error_response(error: RequestError, request_id: str | None = None) -> Response:
    headers = {"retry-after": str(max(1, round(error.retry_after)))} if error.retry_after is not None else {}
    return Response(json.dumps(error_body(error, request_id)), status=_STATUS[error.kind][0], mimetype="application/json", headers=headers)


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data}, ensure_ascii=False)}\n\n"


def usage_out(u: Usage) -> UsageOut:
    return UsageOut(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens, output_tokens=u.output_tokens, cache_created_tokens=u.cache_created_tokens)


def cache_id(agent_id: str) -> str:
    """The agent as the pipeline and the cache know it: in this protocol's own namespace, which
    no other protocol's session or agent id can name."""
    return f"agents/{agent_id}"


def check_id(agent_id: str) -> str:
    if not AGENT_ID.fullmatch(agent_id):
        raise RequestError(ErrorKind.INVALID_REQUEST, f"invalid agent id: {AGENT_ID_RULE}")
    return agent_id


def _chat(m: Any) -> ChatMessage:
    return ChatMessage(m.role, m.content, (), m.tool_call_id, m.name)


def _conversation(record: AgentRecord) -> list[ConversationMessage]:
    return [
        ConversationMessage(
            role=m.role,
            content=m.content,
            tool_calls=[ToolCallOut(id=c.id, name=c.name, arguments=c.arguments) for c in m.tool_calls],
            tool_call_id=m.tool_call_id,
            name=m.name,
        )
        for m in record.conversation
    ]


class _Exchange:
    """One turn of one agent: the reply as it is parsed, and what to append when it is complete."""

    def __init__(self, api: _AgentAPI, record: AgentRecord, appended: list[ChatMessage], handle: RequestHandle, parser: OutputParser) -> None:
        self.api, self.record, self.appended, self.handle, self.parser = api, record, appended, handle, parser
        self.id = "amsg_" + uuid.uuid4().hex[:24]
        self.text: list[str] = []
        self.calls: list[ToolCall] = []

    def parts(self, text: str, final: bool = False) -> list[tuple[str, dict[str, Any]]]:
        """New text as (event, data) pairs: text deltas and whole tool calls."""
        out: list[tuple[str, dict[str, Any]]] = []
        for part in self.parser.finish() if final else self.parser.feed(text):
            if isinstance(part, TextPart | ThinkingPart):
                self.text.append(part.text)
                out.append(("text_delta", {"text": part.text}))
            elif isinstance(part, ToolCallPart):
                self.calls.append(part.call)
                out.append(("tool_call", {"id": part.call.id, "name": part.call.name, "arguments": part.call.arguments}))
        return out

    async def complete(self, finished: Finished) -> AgentReply:
        """The reply is whole: append the exchange to the conversation and keep it."""
        reply = ChatMessage("assistant", "".join(self.text), tuple(self.calls))
        old = self.record
        record = self.record = old.with_cache(
            self.api.chain(old.id), conversation=[*old.conversation, *self.appended, reply], turns=old.turns + 1, last_used_at=time.time()
        )
        await self.api.store.save(record)  # a failure leaves the agent as it was
        reason = "tool_use" if self.calls and finished.stop_reason == "end_turn" else finished.stop_reason
        return AgentReply(
            id=self.id,
            agent_id=record.id,
            model=record.model,
            content=reply.content,
            tool_calls=[ToolCallOut(id=c.id, name=c.name, arguments=c.arguments) for c in self.calls],
            stop_reason=reason,
            stop_sequence=finished.stop_sequence,
            turn=record.turns,
            usage=usage_out(finished.usage),
        )


async def _stream(ex: _Exchange, first_ev: Event | None, turn: Turn) -> AsyncIterator[str]:
    try:
        ev = first_ev
        while ev is None:  # queued or prefilling: pings until the prompt's usage is known
            yield sse("ping", {})
            ev = await ex.handle.next_event(KEEPALIVE_S)
            if ev is None and ex.handle.done:
                yield sse("error", error_body(RequestError(ErrorKind.INTERNAL, "the response ended early"), ex.handle.id))
                return
        usage = ev.usage if isinstance(ev, Started) else Usage()
        yield sse("message_start", {"id": ex.id, "agent_id": ex.record.id, "model": ex.record.model, "usage": {"prompt_tokens": usage.prompt_tokens, "cached_tokens": usage.cached_tokens}})
        wrote = trio.current_time()
        ev = None if isinstance(ev, Started) else ev
        while True:
            if ev is None:
                ev = await ex.handle.next_event(KEEPALIVE_S)
                if ev is None:
                    if ex.handle.done:
                        yield sse("error", error_body(RequestError(ErrorKind.INTERNAL, "the response ended early"), ex.handle.id))
                        return
                    yield sse("ping", {})
                    wrote = trio.current_time()
                    continue
            if isinstance(ev, TextDelta):
                lines = [sse(name, data) for name, data in ex.parts(ev.text)]
                if not lines and trio.current_time() - wrote >= KEEPALIVE_S:  # a tool call being written
                    lines = [sse("ping", {})]
                for line in lines:
                    yield line
                    wrote = trio.current_time()
            elif isinstance(ev, Finished):
                for name, data in ex.parts("", final=True):
                    yield sse(name, data)
                reply = await ex.complete(ev)
                turn.end()  # the agent is free before the client hears it is done
                yield sse("message_stop", {"message": reply.model_dump()})
                return
            elif isinstance(ev, Failed):
                yield sse("error", error_body(ev.error, ex.handle.id))
                return
            ev = None
    except RequestError as e:
        yield sse("error", error_body(e, ex.handle.id))
    except Exception:  # a bug here must still end the stream in the protocol's terms
        log.exception("streaming an agent reply failed")
        yield sse("error", error_body(RequestError(ErrorKind.INTERNAL, "internal error while streaming"), ex.handle.id))
    finally:
        ex.handle.cancel()
        turn.end()


class _AgentAPI:
    """The store and the pipeline, and what the handlers share."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        folder = pipeline.state_dir / "agents" / pipeline.config.name if pipeline.state_dir is not None else None
        self.store = AgentStore(folder, pipeline.config.limits.max_agents)
        loaded = self.store.load()
        if loaded:
            log.info("loaded %d agents", loaded)

    def chain(self, agent_id: str) -> tuple[bytes, ...] | None:
        cache = self.pipeline.context.cache
        return cache.chains.get(cache_id(agent_id)) if cache is not None else None

    def out(self, record: AgentRecord, *, detail: bool = False, prefill: Usage | None = None) -> AgentOut:
        cache = self.pipeline.context.cache
        fp = cache.footprint(cache_id(record.id), record.chain, record.blocks) if cache is not None else None
        fields: dict[str, Any] = dict(
            id=record.id,
            model=record.model,
            system=record.system,
            tools=[t.name for t in record.tools],
            metadata=record.metadata,
            created_at=int(record.created_at),
            last_used_at=int(record.last_used_at),
            turns=record.turns,
            messages=len(record.conversation),
            cache=CacheOut(
                tokens=fp.tokens if fp else 0,
                memory_blocks=fp.memory_blocks if fp else 0,
                disk_blocks=fp.disk_blocks if fp else 0,
                memory_bytes=fp.memory_bytes if fp else 0,
                disk_bytes=fp.disk_bytes if fp else 0,
            ),
            prefill=usage_out(prefill) if prefill is not None else None,
        )
        return AgentDetail(**fields, conversation=_conversation(record)) if detail else AgentOut(**fields)

    def params(self, req: TurnRequest) -> SamplingParams:
        defaults, limits = self.pipeline.config.model.sampling, self.pipeline.config.limits
        return SamplingParams(
            max_tokens=req.max_tokens or limits.max_output_tokens,
            temperature=first(req.temperature, defaults.temperature, 1.0),
            top_p=first(req.top_p, defaults.top_p),
            top_k=first(req.top_k, defaults.top_k),
            seed=req.seed,
            stop=req.stops(),
            fit_context=req.max_tokens is None,
        )

    async def prefill(self, record: AgentRecord, size: int) -> tuple[AgentRecord, Usage | None]:
        """Prefill and cache what every turn of the new agent starts with (its system prompt)."""
        item = Incoming(
            request=self.pipeline.new_request(),
            protocol="agents",
            model=record.model,
            messages=tuple(record.messages()),
            params=SamplingParams(max_tokens=1, temperature=0.0),
            tools=record.tools,
            agent_hint=cache_id(record.id),
            request_bytes=size,
            prefill_only=True,
        )
        await self.pipeline.submit(item)
        try:
            _text, finished = await item.request.result()
        except RequestError as e:
            if e.kind is ErrorKind.INVALID_REQUEST and not record.system and not record.tools:
                return record, None  # a template with nothing before the first user message: nothing to cache
            raise
        finally:
            item.request.cancel()
        return record.with_cache(self.chain(record.id)), finished.usage

    async def forget(self, record: AgentRecord) -> FreedOut:
        cache = self.pipeline.context.cache
        if cache is None:
            return FreedOut(memory_blocks=0, disk_blocks=0, memory_bytes=0, disk_bytes=0, shared_blocks_kept=0)
        others = set().union(*(r.blocks for r in self.store.all() if r.id != record.id))
        freed = await cache.forget(cache_id(record.id), record.blocks, keep=others)
        return FreedOut(
            memory_blocks=freed.memory_blocks,
            disk_blocks=freed.disk_blocks,
            memory_bytes=freed.memory_bytes,
            disk_bytes=freed.disk_bytes,
            shared_blocks_kept=freed.shared_blocks_kept,
        )


def _json(model: Any, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status=status, mimetype="application/json")


def blueprint(pipeline: Any) -> Blueprint:
    """The agent API's routes for ``pipeline``."""
    bp = protocol_blueprint("agents", __name__, pipeline, error_response)
    api = _AgentAPI(pipeline)
    store, limits = api.store, pipeline.config.limits

    @bp.post("/v1/agents")
    async def create() -> Response:
        try:
            req, size = await read_json(limits.max_request_bytes, AgentCreate)
            model = req.model or pipeline.config.model.name
            if not pipeline.config.model.accepts(model):
                raise RequestError(ErrorKind.NOT_FOUND, f"model {model!r} is not served here")
            record = AgentRecord(
                id=req.id or "agt_" + uuid.uuid4().hex[:24],
                model=model,
                system=req.system,
                tools=tuple(ToolSpec(t.name, t.description, t.parameters) for t in req.tools),
                metadata=dict(req.metadata),
            )
            turn = store.begin(record.id, new=True)
            try:
                record, usage = await api.prefill(record, size)
                await store.save(record)
            finally:
                turn.end()
            return _json(api.out(record, prefill=usage), 201)
        except RequestError as e:
            return error_response(e)

    @bp.get("/v1/agents")
    async def list_agents() -> Response:
        return _json(AgentList(data=[api.out(r) for r in store.all()]))

    @bp.get("/v1/agents/<path:agent_id>")
    async def get_agent(agent_id: str) -> Response:
        try:
            return _json(api.out(store.get(check_id(agent_id)), detail=True))
        except RequestError as e:
            return error_response(e)

    @bp.delete("/v1/agents/<path:agent_id>")
    async def delete_agent(agent_id: str) -> Response:
        try:
            record = store.get(check_id(agent_id))
            turn = store.begin(agent_id)
            try:
                with trio.CancelScope(shield=True):  # all of it, or (the file stays) nothing
                    await store.remove(agent_id)
                    freed = await api.forget(record)
            finally:
                turn.end()
            return _json(AgentDeleted(id=agent_id, freed=freed))
        except RequestError as e:
            return error_response(e)

    @bp.post("/v1/agents/<path:agent_id>/messages")
    async def message(agent_id: str) -> Response:
        try:
            check_id(agent_id)
            req, size = await read_json(limits.max_request_bytes, TurnRequest)
            record = store.get(agent_id)
            turn = store.begin(agent_id)
        except RequestError as e:
            return error_response(e)
        handed = False
        try:
            appended = [_chat(m) for m in req.appended()]
            item = Incoming(
                request=pipeline.new_request(),
                protocol="agents",
                model=record.model,
                messages=tuple(record.messages() + appended),
                params=api.params(req),
                tools=record.tools,
                agent_hint=cache_id(agent_id),
                request_bytes=size,
            )
            parser = pipeline.model.chat_format.parser(record.tools, thinking=False, new_id=lambda: new_call_id("call_"))
            ex = _Exchange(api, record, appended, item.request, parser)
            await pipeline.submit(item)
            if not req.stream:
                return await _complete(ex)
            ev = await first_event(item.request)
            if (error := early_failure(item.request, ev)) is not None:
                return error_response(error, item.request.id)
            body = SSEBody(item.request, lambda: _stream(ex, ev, turn))
            weakref.finalize(body, turn.end)  # a stream never started still frees the agent
            handed = True
            return Response(body, mimetype="text/event-stream", headers=SSE_HEADERS)
        except RequestError as e:
            return error_response(e)
        finally:
            if not handed:
                turn.end()

    return bp


async def _complete(ex: _Exchange) -> Response:
    try:
        async for ev in ex.handle.events():
            if isinstance(ev, TextDelta):
                ex.parts(ev.text)
            elif isinstance(ev, Failed):
                return error_response(ev.error, ex.handle.id)
            elif isinstance(ev, Finished):
                ex.parts("", final=True)
                return _json(await ex.complete(ev))
    finally:
        ex.handle.cancel()
    return error_response(RequestError(ErrorKind.INTERNAL, "the response ended early"), ex.handle.id)
