"""The OpenAPI document of a running server, built from the pydantic models the handlers use."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from pydantic.json_schema import models_json_schema

from .protocol import RouteDoc

_STATUSES = {
    400: "Invalid request",
    401: "Missing or wrong API key",
    404: "Unknown route, model or agent",
    409: "The agent exists already or is busy",
    413: "Body too large",
    429: "Queue full or too many sessions",
    500: "Internal error",
    503: "The pipeline is not ready",
}


def _param_names(path: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", path)


def openapi(title: str, version: str, routes: Iterable[tuple[str, RouteDoc]]) -> dict[str, Any]:
    """``routes``: (tag, route) pairs. Every model becomes a component schema."""
    routes = list(routes)
    models = {m for _, r in routes for m in (r.request, r.response, r.error) if m is not None}
    keyed = [(m, "validation") for m in sorted(models, key=lambda m: m.__name__ + m.__module__)]
    refs, defs = models_json_schema(keyed, ref_template="#/components/schemas/{model}")
    paths: dict[str, dict[str, Any]] = {}
    for tag, r in routes:
        slug = re.sub(r"\W+", "_", r.path).strip("_")
        op: dict[str, Any] = {"summary": r.summary, "tags": [tag], "operationId": f"{tag}_{r.method.lower()}_{slug}"}
        params = _param_names(r.path)
        if params:
            op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
        if r.request is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": refs[(r.request, "validation")]}}}
        ok: dict[str, Any] = {"description": "OK", "content": {}}
        if r.response is not None:
            ok["content"]["application/json"] = {"schema": refs[(r.response, "validation")]}
        if r.streams:
            ok["content"]["text/event-stream"] = {"schema": {"type": "string", "description": "Server-sent events (with stream: true)."}}
        op["responses"] = {str(r.ok): ok}
        if r.error is not None:
            for status in r.statuses:
                op["responses"][str(status)] = {"description": _STATUSES.get(status, "Error"), "content": {"application/json": {"schema": refs[(r.error, "validation")]}}}
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {"schemas": defs.get("$defs", {})},
    }
