"""Bench: the pipeline against the bare model, and a warm turn against a cold one, same run.

    .venv/bin/python bench/pipeline_overhead.py [--prompt-words 200] [--tokens 48]

Prints one JSON object and writes it to bench/results/pipeline_overhead.json:
``bare`` is the model's own generate loop on the MLX worker thread; ``pipeline`` is the same
prompt through identify → ... → persist; ``warm`` is the next turn of that conversation, which
reuses the cached prefix. Targets: pipeline decode within 5% of bare; warm TTFT far below cold.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import trio

from semantic.config import load_pipeline
from semantic.harness import incoming
from semantic.model import ChatMessage, SamplingParams
from semantic.pipeline import Pipeline
from semantic.pipelines import shipped
from semantic.plugin_manager import Registry
from semantic.request import Finished, TextDelta

RESULTS = Path(__file__).parent / "results"


def bare_job(model, prompt, n):
    """The model's own loop: time to first token and decode tokens/s, on the worker thread."""
    t0 = time.perf_counter()
    first = None
    count = 0
    for _ in model.generate(prompt, None, 0, SamplingParams(max_tokens=n, temperature=0)):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    return {"ttft_s": first - t0, "tokens": count, "decode_tok_s": (count - 1) / (end - first) if count > 1 else 0.0}


async def through_pipeline(pipeline, messages, n, agent):
    item = incoming(messages, model=pipeline.config.model.name, max_tokens=n, agent=agent)
    t0 = time.perf_counter()
    await pipeline.submit(item)
    first, text, finished = None, [], None
    async for ev in item.request.events():
        if isinstance(ev, TextDelta):
            first = first or time.perf_counter()
            text.append(ev.text)
        elif isinstance(ev, Finished):
            finished = ev
    end = time.perf_counter()
    count = finished.usage.output_tokens
    return {
        "ttft_s": first - t0,
        "tokens": count,
        "decode_tok_s": (count - 1) / (end - first) if count > 1 else 0.0,
        "prompt_tokens": finished.usage.prompt_tokens,
        "cached_tokens": finished.usage.cached_tokens,
    }, "".join(text)


async def main(args) -> dict:
    registry = Registry.from_plugins()
    config = load_pipeline(shipped()["default"], registry)
    pipeline = Pipeline(config, registry)
    system = " ".join(f"Rule {i}: answer briefly and precisely." for i in range(args.prompt_words // 6))
    first_turn = [ChatMessage("system", system), ChatMessage("user", "List the planets of the solar system.")]
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run)
        model, worker = pipeline.model, pipeline.context.worker
        prompt = model.tokenizer.encode_chat(first_turn)
        bare = await worker.call(bare_job, model, prompt, args.tokens)
        cold, reply = await through_pipeline(pipeline, first_turn, args.tokens, "bench-agent")
        second = [*first_turn, ChatMessage("assistant", reply), ChatMessage("user", "Which is the largest?")]
        warm, _ = await through_pipeline(pipeline, second, args.tokens, "bench-agent")
        pipeline.close()
    return {
        "bench": "pipeline_overhead",
        "model": config.model.name,
        "machine": {"system": platform.system(), "machine": platform.machine()},
        "bare": bare,
        "pipeline": cold,
        "warm": warm,
        "pipeline_decode_vs_bare": cold["decode_tok_s"] / bare["decode_tok_s"] if bare["decode_tok_s"] else None,
        "warm_ttft_vs_cold": warm["ttft_s"] / cold["ttft_s"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-words", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=48)
    result = trio.run(main, parser.parse_args())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pipeline_overhead.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
