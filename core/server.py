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

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .config import PipelineConfig
from .pipeline import Pipeline
from .plugin_manager import Registry

log = logging.getLogger(__name__)


def _json(body: dict, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def create_app(pipeline: Pipeline) -> QuartTrio:
    """The Quart app: every protocol the pipeline lists, plus ``/`` and ``/health``."""
    app = QuartTrio("semantic")
    app.config["MAX_CONTENT_LENGTH"] = pipeline.config.limits.max_request_bytes
    app.config["RESPONSE_TIMEOUT"] = None  # generations may stream for a long time
    app.config["BODY_TIMEOUT"] = 120
    for name in pipeline.config.protocols:
        app.register_blueprint(pipeline.registry.protocols[name].blueprint(pipeline))

    @app.get("/")
    async def root() -> Response:
        return _json({"name": "semantic", "pipeline": pipeline.config.name, "model": pipeline.config.model.name})

    @app.get("/health")
    async def health() -> Response:
        body = {"status": pipeline.state.value, "pipeline": pipeline.config.name, "counters": pipeline.context.metrics.counters}
        if pipeline.failure:
            body["error"] = pipeline.failure
        return _json(body, 200 if pipeline.ready else 503)

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        kind = {404: "not_found_error", 413: "request_too_large"}.get(error.code or 500, "invalid_request_error")
        body = {"type": "error", "error": {"type": kind, "message": error.description or error.name}}
        return _json(body, error.code or 500)

    return app


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
