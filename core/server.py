"""The HTTP server: Quart on trio (quart-trio) under Hypercorn's trio worker.

The pipeline starts first (model loaded, stages running); then Hypercorn serves the protocols the
pipeline lists. ``GET /health`` says whether the pipeline is ready (503 when it is not).
"""

from __future__ import annotations

import json
import logging
import signal
from functools import partial
from pathlib import Path
from typing import Literal

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from pydantic import BaseModel, Field
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .config import PipelineConfig
from .errors import RequestError
from .openapi import openapi
from .pipeline import Pipeline
from .plugin_manager import Registry
from .protocol import RouteDoc
from .stage import arrived, arriving
from .protocol_http import check_api_key

log = logging.getLogger(__name__)


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def create_app(pipeline: Pipeline) -> QuartTrio:
    """The Quart app: every protocol the pipeline lists, plus ``/``, ``/health`` and the model list
    (``/v1/models``, in a shape both the OpenAI and the Anthropic SDK read)."""
    app = QuartTrio("semantic")
    app.config["MAX_CONTENT_LENGTH"] = pipeline.config.limits.max_request_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # generations may stream for a long time
    app.config["BODY_TIMEOUT"] = 120
    for name in pipeline.config.protocols:
        app.register_blueprint(pipeline.registry.protocols[name].blueprint(pipeline))

    @app.before_request
    async def take_the_body() -> None:
        """Read the whole request body before any handler can answer, a quick refusal included:
        Hypercorn (0.18, HTTP/1.1) stalls a kept-alive connection for good when a request's body
        arrives after its response was sent, and SDK clients reuse their connections."""
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            if request.method == "POST":  # may become a generation: decode gathers it with others
                g.arrival = arriving(pipeline.context)
            try:
                await request.get_data()
            except HTTPException:  # too large or too slow: the handler answers that in its own format
                g.unread_body = True

    @app.after_request
    async def close_after_unread_body(response: Response) -> Response:
        """A body left unread means the connection cannot carry another request: say so, so the
        client opens a new one instead of waiting on this one."""
        if g.get("unread_body"):
            response.headers["connection"] = "close"
        arrived(g.get("arrival"))  # answered (a refusal, or submitted already)
        return response

    @app.teardown_request
    async def stop_counting_arrival(_exc: BaseException | None) -> None:
        arrived(g.get("arrival"))

    @app.get("/")
    async def root() -> Response:
        return _json({"name": "semantic", "pipeline": pipeline.config.name, "model": pipeline.config.model.name})

    @app.get("/health")
    async def health() -> Response:
        ctx = pipeline.context
        gauges = {"requests_arriving": ctx.arriving, "requests_upstream": ctx.upstream, "requests_parked": ctx.parked}
        body = Health(status=pipeline.state.value, pipeline=pipeline.config.name, counters={**ctx.metrics.counters, **gauges}, error=pipeline.failure)
        return _json(body.model_dump(exclude_none=True), 200 if pipeline.ready else 503)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        kind = {404: "not_found_error", 413: "request_too_large"}.get(error.code or 500, "invalid_request_error")
        return _json(_error(kind, error.description or error.name), error.code or 500)

    def model_entry(name: str) -> ModelEntry:
        window = pipeline.context.window() if pipeline.model is not None else None
        return ModelEntry(id=name, display_name=name, max_input_tokens=window, max_tokens=pipeline.config.limits.max_output_tokens)

    @app.get("/v1/models")
    async def models() -> Response:
        if (denied := _denied(pipeline)) is not None:
            return denied
        name = pipeline.config.model.name
        return _json(ModelList(data=[model_entry(name)], first_id=name, last_id=name).model_dump())

    @app.get("/v1/models/<path:model_id>")
    async def model(model_id: str) -> Response:
        if (denied := _denied(pipeline)) is not None:
            return denied
        if not pipeline.config.model.accepts(model_id):
            return _json(_error("not_found_error", f"model {model_id!r} is not served here", "model_not_found"), 404)
        return _json(model_entry(model_id).model_dump())

    document = openapi(
        "semantic",
        _version(),
        [*(("service", r) for r in SERVICE_ROUTES), *((name, r) for name in pipeline.config.protocols for r in pipeline.registry.protocols[name].routes)],
    )

    @app.get("/openapi.json")
    async def openapi_json() -> Response:
        return _json(document)

    return app


class ModelEntry(BaseModel):
    """One model, in a shape both the OpenAI and the Anthropic SDK read."""

    id: str
    object: Literal["model"] = "model"
    created: int = 1704067200
    owned_by: str = "semantic"
    type: Literal["model"] = "model"
    display_name: str
    created_at: str = "2024-01-01T00:00:00Z"
    max_input_tokens: int | None = Field(description="The context window clients get.")
    max_tokens: int = Field(description="The cap on generated tokens.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None


class SharedErrorDetail(BaseModel):
    type: str
    message: str
    param: str | None = None
    code: str | None = None


class SharedError(BaseModel):
    """An error body both SDKs read: Anthropic's ``type``/``error.type``, OpenAI's
    ``error.message``/``param``/``code`` (for the routes the protocols share)."""

    type: Literal["error"] = "error"
    error: SharedErrorDetail


class Health(BaseModel):
    status: str = Field(description="starting, ready, failed or stopping")
    pipeline: str
    counters: dict[str, int | float]
    error: str | None = None


SERVICE_ROUTES = (
    RouteDoc("GET", "/health", "Whether the pipeline is ready (503 when not)", response=Health),
    RouteDoc("GET", "/v1/models", "The served model (OpenAI and Anthropic list shape)", response=ModelList, error=SharedError),
    RouteDoc("GET", "/v1/models/{model_id}", "One model name the pipeline answers to", response=ModelEntry, error=SharedError),
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("semantic")
    except PackageNotFoundError:
        return "0"


def _error(kind: str, message: str, code: str | None = None) -> dict:
    return SharedError(error=SharedErrorDetail(type=kind, message=message, code=code)).model_dump()


def _denied(pipeline: Pipeline) -> Response | None:
    try:
        check_api_key(pipeline.config.server.api_keys)
    except RequestError as e:
        return _json(_error("authentication_error", e.message, "invalid_api_key"), 401)
    return None


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s; shutting down", signal.Signals(signum).name)
            return


async def serve(config: PipelineConfig, registry: Registry, *, base_dir: Path | None = None) -> None:
    """Run the pipeline and serve it until SIGINT/SIGTERM."""
    pipeline = Pipeline(config, registry, base_dir=base_dir)
    hconfig = HypercornConfig()
    hconfig.bind = [f"{config.server.host}:{config.server.port}"]
    hconfig.accesslog = None  # semantic logs its own records (ids and counts, never content)
    hconfig.graceful_timeout = 5
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        app = create_app(pipeline)
        async with trio.open_nursery() as http:
            bound = await http.start(partial(hypercorn_serve, app, hconfig, shutdown_trigger=_until_signal))
            log.info("serving pipeline %s (model %s) on %s", config.name, config.model.name, ", ".join(bound))
            print(f"semantic: serving pipeline {config.name!r} on {', '.join(bound)}", flush=True)
        pipeline.close()  # Hypercorn has stopped: drain the stages, then the worker ends
