"""What every HTTP protocol plugin needs: bounded JSON bodies, API keys, and SSE bodies that
cancel their request however the response ends. Protocols differ only in their wire shapes."""

from __future__ import annotations

import hmac
import json
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import logging

from pydantic import BaseModel, ValidationError
from quart import Blueprint, Response, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .errors import ErrorKind, RequestError
from .request import Event, Failed, RequestHandle

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)

#: A stream starts (headers sent) when the first event takes longer than this; errors that come
#: sooner still get their own HTTP status.
STREAM_GRACE_S = 1.0
#: While a request waits in the queue or its prompt is prefilled, a keep-alive at least this
#: often (Claude Code and proxies abort silent streams).
KEEPALIVE_S = 5.0


def validation_message(e: ValidationError) -> str:
    """A pydantic error as one line per problem: ``location: message``."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}" for err in e.errors(include_url=False)[:10])


async def read_json(max_bytes: int, model: type[M]) -> tuple[M, int]:
    """The request body validated as ``model``, and its size; every problem is a RequestError."""
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
        return model.model_validate(body), len(raw)
    except ValidationError as e:
        raise RequestError(ErrorKind.INVALID_REQUEST, validation_message(e)) from None


def check_api_key(keys: list[str]) -> None:
    """Refuse with 401 unless ``keys`` is empty or the request carries one of them
    (``x-api-key`` or ``Authorization: Bearer``)."""
    if not keys:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None:
        raise RequestError(ErrorKind.AUTHENTICATION, "missing API key: send x-api-key or Authorization: Bearer")
    if not any(hmac.compare_digest(given.encode(), k.encode()) for k in keys):
        raise RequestError(ErrorKind.AUTHENTICATION, "invalid API key")


def first(*values: Any) -> Any:
    """The first value that is not None (request, then pipeline default, then the API's)."""
    return next((v for v in values if v is not None), None)


async def first_event(handle: RequestHandle) -> Event | None:
    """Wait up to :data:`STREAM_GRACE_S` for the request's first event (the client leaving
    cancels the request). A failure in that time is returned, so it keeps its HTTP status."""
    try:
        return await handle.next_event(STREAM_GRACE_S)
    except BaseException:
        handle.cancel()
        raise


def early_failure(handle: RequestHandle, first: Event | None) -> RequestError | None:
    """The error to answer with instead of starting a stream, if any."""
    if isinstance(first, Failed):
        handle.cancel()
        return first.error
    if first is None and handle.done:
        return RequestError(ErrorKind.INTERNAL, "the request ended without a response")
    return None


class SSEBody:
    """An SSE response body. However it ends — finished, client gone, never started — the
    request is cancelled (a no-op once it has finished), so nothing generates for nobody."""

    def __init__(self, handle: RequestHandle, stream: Callable[[], AsyncIterator[str]]) -> None:
        self._gen = stream()
        weakref.finalize(self, handle.cancel)

    def __aiter__(self) -> SSEBody:
        return self

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        await self._gen.aclose()


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def protocol_blueprint(name: str, import_name: str, pipeline: Any, error_response: Callable[[RequestError], Response]) -> Blueprint:
    """A protocol's blueprint with what every protocol does the same way: the API key is checked
    first, and an HTTP error or an unexpected exception is answered in the protocol's format."""
    bp = Blueprint(name, import_name)

    @bp.before_request
    async def authenticate() -> Response | None:
        try:
            check_api_key(pipeline.config.server.api_keys)
        except RequestError as e:
            return error_response(e)
        return None

    @bp.errorhandler(Exception)
    async def unexpected(error: Exception) -> Response:
        if isinstance(error, HTTPException):
            kind = {404: ErrorKind.NOT_FOUND, 413: ErrorKind.TOO_LARGE}.get(error.code or 500, ErrorKind.INVALID_REQUEST)
            return error_response(RequestError(kind, error.description or error.name))
        log.exception("unexpected error in the %s protocol", name)
        return error_response(RequestError(ErrorKind.INTERNAL, f"internal error ({type(error).__name__})"))

    return bp
