"""Errors that belong to one request: they travel to its caller as a value, never crash a stage."""

from __future__ import annotations

from enum import Enum


class ErrorKind(str, Enum):
    """What went wrong, independent of protocol; each protocol maps it to its status and type."""

    INVALID_REQUEST = "invalid_request"  # 400
    AUTHENTICATION = "authentication"  # 401
    NOT_FOUND = "not_found"  # 404
    CONFLICT = "conflict"  # 409: the resource exists already or is busy
    TOO_LARGE = "too_large"  # 413
    RATE_LIMITED = "rate_limited"  # 429
    OVERLOADED = "overloaded"  # 529 (Anthropic) / 429 (OpenAI)
    INTERNAL = "internal"  # 500
    UNAVAILABLE = "unavailable"  # 503: the pipeline is not running


class RequestError(Exception):
    """A failure of one request, with a message safe to show its caller (never prompt content)."""

    def __init__(self, kind: ErrorKind, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"RequestError({self.kind.value!r}, {self.message!r})"
