"""Helpers for tests that run a whole pipeline on the scripted model."""

from __future__ import annotations

from pathlib import Path

import trio

from semantic.config import parse_pipeline
from semantic.errors import RequestError
from semantic.items import Incoming
from semantic.pipeline import Pipeline
from semantic.request import TextDelta

SCRIPTED = Path(__file__).parent / "pipelines" / "scripted.yaml"


async def collect(pipeline: Pipeline, item: Incoming) -> list:
    await pipeline.submit(item)
    return [ev async for ev in item.request.events()]


def run_many(pipeline: Pipeline, items: list[Incoming]) -> dict[int, list | RequestError]:
    """Start the pipeline, submit every item at once, close it; each item's events or refusal."""

    async def main():
        results: dict[int, list | RequestError] = {}

        async def one(i, item):
            try:
                results[i] = await collect(pipeline, item)
            except RequestError as e:
                results[i] = e

        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            async with trio.open_nursery() as clients:
                for i, item in enumerate(items):
                    clients.start_soon(one, i, item)
            pipeline.close()
        return results

    return trio.run(main)


def text_of(events) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def scripted_pipeline(registry, scripted, **options) -> Pipeline:
    text = SCRIPTED.read_text().replace("  - type: system-prompt\n    settings:\n      text: You are a test.\n", "")
    return Pipeline(parse_pipeline(text, "scripted.yaml", registry), registry, model=scripted(**options))


def pipeline_yaml(
    folder: Path,
    *,
    script: list[dict] | None = None,
    options: dict | None = None,
    model: dict | None = None,
    server: dict | None = None,
    limits: dict | None = None,
    cache: dict | None = None,
) -> str:
    """A copy of the scripted test pipeline in ``folder`` with its script and settings changed."""
    import yaml

    data = yaml.safe_load(SCRIPTED.read_text())
    data["model"]["options"] = {"reply": None, "script": script or [], **(options or {})}
    for key, extra in (("model", model), ("server", server), ("limits", limits), ("cache", cache)):
        data.setdefault(key, {}).update(extra or {})
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def events_of(body: str) -> list[tuple[str, dict]]:
    """An Anthropic SSE body as (event, data) pairs."""
    import json

    out = []
    for chunk in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out
