"""What a protocol plugin registers: its blueprint, and a description of its routes (from which
the server builds ``/openapi.json``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class RouteDoc:
    """One HTTP route: the pydantic models its handler reads and writes.

    ``request`` validates the JSON body (None: no body); ``response`` is the JSON reply;
    ``error`` the protocol's error body, for the ``statuses`` it may come with; ``streams``:
    with ``stream: true`` the reply is ``text/event-stream``; ``ok``: the success status.
    """

    method: str
    path: str
    summary: str
    request: Any = None
    response: Any = None
    error: Any = None
    streams: bool = False
    statuses: tuple[int, ...] = (400, 401, 404, 413, 429, 500, 503)
    ok: int = 200


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """``blueprint(pipeline)`` builds the protocol's Quart blueprint for a running pipeline;
    ``routes`` describes its endpoints for the OpenAPI document."""

    name: str
    blueprint: Callable[[Any], Any]
    description: str = ""
    routes: tuple[RouteDoc, ...] = ()
