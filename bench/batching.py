"""Bench: continuous batching — many agents at once on the embedded model, same run:

* aggregate decode throughput (output tokens/s summed over streams, end to end with prefill) at
  1, 2, 4, 8, 16 concurrent agents: semantic batched, the same requests one at a time, and
  ``mlx_lm.server`` (same model, same BLAS, same concurrency);
* TTFT and inter-token latency p50/p95/p99 under 8-agent load, and the inter-token latency of
  running streams while a long (7K-token) prompt is prefilled;
* engine overhead: a bare mlx-lm ``BatchGenerator`` loop against the whole pipeline (in process)
  on the same 8 requests.

    .venv/bin/python bench/batching.py [--agents 1 2 4 8 16] [--long-tokens 7168] [--skip-mlx-lm]

Each concurrency is warmed up once (untimed), then runs ``--repeats`` times per server and one
at a time, all three taking turns; the median run of each counts (one run depends on how the
requests happen to arrive, and this machine's speed drifts by 20% within minutes). Prints JSON and writes
bench/results/batching.json. Targets (issue "batching"): ≥ 5× sequential
at 8 agents; ≥ 1.1× mlx_lm.server at every concurrency; p95 inter-token latency during the long
prefill ≤ 3× without it; pipeline step time ≤ 1.05× the bare loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from resume_ttft import CLIENT_TLS, mlx_lm_server, semantic_server, with_blas  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOPICS = [
    "the history of the printing press", "how bees make honey", "why the sky is blue", "the rules of chess",
    "how a bicycle stays upright", "the water cycle", "how volcanoes form", "the life of a star",
    "how bread rises", "the invention of the telephone", "how compasses work", "the migration of birds",
    "how glass is made", "the phases of the moon", "how rainbows appear", "the first airplanes",
]  # fmt: skip


def question(i: int) -> str:
    return f"Write a detailed explanation of {TOPICS[i % len(TOPICS)]} for a curious student. Use several paragraphs."


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def dist(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": pct(xs, 50), "p95": pct(xs, 95), "p99": pct(xs, 99)}


def stream_anthropic(url: str, i: int, max_tokens: int, *, system: str | None = None, agent: str | None = None) -> dict:
    """One streamed request; token arrival times (one text delta per token)."""
    body = {"model": "smollm2", "max_tokens": max_tokens, "stream": True, "temperature": 0, "messages": [{"role": "user", "content": question(i)}]}
    if system:
        body["system"] = system
    t0 = time.perf_counter()
    times, usage = [], {}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers={"x-agent-id": agent or f"bench-{i}"}, timeout=3600, verify=CLIENT_TLS) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and '"text_delta"' in line:
                times.append(time.perf_counter())
            elif line.startswith("data:") and '"message_delta"' in line:
                usage = json.loads(line[5:])["usage"]
    return {"t0": t0, "times": times, "end": time.perf_counter(), "tokens": usage.get("output_tokens", len(times))}


def stream_openai(url: str, i: int, max_tokens: int) -> dict:
    body = {
        "model": "default_model", "max_tokens": max_tokens, "stream": True, "temperature": 0,
        "messages": [{"role": "user", "content": question(i)}],
    }  # fmt: skip
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600, verify=CLIENT_TLS) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line and '"content": ""' not in line:
                times.append(time.perf_counter())
    return {"t0": t0, "times": times, "end": time.perf_counter(), "tokens": len(times)}


def summarize(runs: list[dict], wall: float) -> dict:
    tokens = sum(r["tokens"] for r in runs)
    ttft = [r["times"][0] - r["t0"] for r in runs if r["times"]]
    itl = [b - a for r in runs for a, b in zip(r["times"], r["times"][1:])]
    return {"tok_s": tokens / wall, "tokens": tokens, "wall_s": wall, "ttft_s": dist(ttft), "itl_s": dist(itl)}


def concurrent(fn, url: str, n: int, max_tokens: int) -> dict:
    t = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        runs = list(pool.map(lambda i: fn(url, i, max_tokens), range(n)))
    return summarize(runs, time.perf_counter() - t)


def one_at_a_time(fn, url: str, n: int, max_tokens: int) -> dict:
    t = time.perf_counter()
    runs = [fn(url, i, max_tokens) for i in range(n)]
    return summarize(runs, time.perf_counter() - t)


def long_prefill(url: str, agents: int, long_tokens: int, tokenizer) -> dict:
    """Agents stream continuously; a long prompt arrives; compare their inter-token gaps."""
    stop = threading.Event()
    runs: list[dict] = []

    def agent(i: int) -> None:
        k = 0
        while not stop.is_set():
            runs.append(stream_anthropic(url, i + 100 * k, 96, agent=f"load-{i}"))
            k += 1

    with ThreadPoolExecutor(agents + 1) as pool:
        for i in range(agents):
            pool.submit(agent, i)
        time.sleep(20)  # steady load first
        words = ("The archive keeps a careful record of every ship that entered the harbour that year. " * (long_tokens // 10)).split()
        system = tokenizer.decode(tokenizer.encode(" ".join(words))[: long_tokens - 40])
        started = time.perf_counter()
        long_run = pool.submit(stream_anthropic, url, 999, 1, system=system, agent="long").result()
        first = long_run["times"][0] if long_run["times"] else long_run["end"]
        time.sleep(5)
        stop.set()
    gaps_before, gaps_during = [], []
    for r in runs:
        for a, b in zip(r["times"], r["times"][1:]):
            if b < started and a > started - 60:
                gaps_before.append(b - a)
            elif a >= started and b <= first:
                gaps_during.append(b - a)
    before, during = dist(gaps_before), dist(gaps_during)
    ratio = during["p95"] / before["p95"] if during["p95"] and before["p95"] else None
    return {"long_prompt_tokens": long_tokens, "long_ttft_s": first - started, "itl_before_s": before, "itl_during_s": during, "p95_ratio": ratio}


def overhead(n: int, max_tokens: int) -> dict:
    """The same n greedy requests: bare BatchGenerator loop vs the whole pipeline, in process."""
    import trio

    from semantic.config import load_pipeline
    from semantic.harness import incoming
    from semantic.model import ChatMessage
    from semantic.pipeline import Pipeline
    from semantic.pipelines import shipped
    from semantic.plugin_manager import Registry
    from semantic.request import Finished, TextDelta

    registry = Registry.from_plugins()
    config = load_pipeline(shipped()["default"], registry)
    config.cache.disk_mb = 0
    config.stages[3].settings.batch_window_ms = 0  # type: ignore[union-attr]  # schedule: no wait, like the bare loop
    pipeline = Pipeline(config, registry)
    messages = [[ChatMessage("user", question(i))] for i in range(n)]
    out: dict = {}

    def bare(model) -> dict:
        from mlx_lm.generate import BatchGenerator

        prompts = [model.tokenizer.encode_chat(m) for m in messages]
        gen = BatchGenerator(model.module, stop_tokens=[[t] for t in model.tokenizer.eos_token_ids], completion_batch_size=n, prefill_step_size=512)
        gen.insert(prompts, max_tokens=[max_tokens] * n)
        steps, tokens, t0 = [], 0, time.perf_counter()
        while True:
            t = time.perf_counter()
            _, responses = gen.next()
            if responses:
                steps.append((time.perf_counter() - t, len(responses)))
                tokens += len(responses)
            elif tokens:
                break
        wall = time.perf_counter() - t0
        gen.close()
        full = [s for s, k in steps if k == n]
        return {"wall_s": wall, "tokens": tokens, "step_s_median": statistics.median(full) if full else None}

    async def through_pipeline(trial: int) -> dict:
        times: dict[int, list[float]] = {i: [] for i in range(n)}
        counts = []

        async def one(i: int) -> None:
            item = incoming(messages[i], model="smollm2", max_tokens=max_tokens, agent=f"o{trial}-{i}")  # a new agent: no cached tail (prompts are shorter than a block)
            await pipeline.submit(item)
            async for ev in item.request.events():
                if isinstance(ev, TextDelta):
                    times[i].append(time.perf_counter())
                elif isinstance(ev, Finished):
                    counts.append(ev.usage.output_tokens)

        t0 = time.perf_counter()
        async with trio.open_nursery() as clients:
            for i in range(n):
                clients.start_soon(one, i)
        wall = time.perf_counter() - t0
        # steps where every stream was decoding: the gap between the k-th tokens of all streams
        k_max = min(len(t) for t in times.values())
        steps = [max(times[i][k] for i in times) - max(times[i][k - 1] for i in times) for k in range(1, k_max)]
        return {"wall_s": wall, "tokens": sum(counts), "step_s_median": statistics.median(steps) if steps else None}

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(pipeline.run)
            worker = pipeline.context.worker
            for trial in range(3):  # alternate, so drift on a shared machine hits both sides
                out.setdefault("bare", []).append(await worker.call(bare, pipeline.model))
                out.setdefault("pipeline", []).append(await through_pipeline(trial))
            pipeline.close()

    trio.run(main)
    best = {side: {k: min(r[k] for r in out[side]) for k in ("wall_s", "step_s_median")} for side in ("bare", "pipeline")}
    out["best"] = best
    out["step_ratio"] = best["pipeline"]["step_s_median"] / best["bare"]["step_s_median"]
    out["wall_ratio"] = best["pipeline"]["wall_s"] / best["bare"]["wall_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--long-tokens", type=int, default=7168, help="the long prompt prefilled under 8-agent load (0: skip)")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="runs per concurrency, of each server and one at a time, taking turns; the medians count")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--decode", type=json.loads, default={}, help='decode stage settings as JSON, e.g. \'{"prefill_share": 3}\'')
    parser.add_argument("--tag", default="", help="results go to batching-TAG.json")
    parser.add_argument("--schedule", type=json.loads, default={}, help="schedule stage settings as JSON")
    args = parser.parse_args()

    blas = with_blas(__file__)

    from transformers import AutoTokenizer

    from semantic.blas import skinny_gemm
    from semantic.paths import cache_dir
    from semantic.pipelines import shipped

    results: dict = {
        "bench": "batching", "model": "smollm2-135m-instruct (float32)", "machine": platform.platform(),
        "cpus": os.cpu_count(), "blas": blas or "reference", "max_tokens": args.max_tokens, "throughput": {},
        # semantic serve and the in-process parts have it; mlx_lm.server runs without it
        "skinny_gemm": "{} ({})".format(*skinny_gemm()),
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="semantic-bench-"))
    data = yaml.safe_load(shipped()["default"].read_text())
    data["cache"].update(disk_mb=0, memory_mb=4096)
    data["limits"].update(max_queue_depth=64, max_concurrent_sessions=32)
    for stage in data["stages"]:
        settings = {"decode": args.decode, "schedule": args.schedule}.get(stage["type"])
        if settings:
            stage["settings"] = {**stage.get("settings", {}), **settings}
    results["settings"] = {"decode": args.decode, "schedule": args.schedule}
    pipeline = work / "bench.yaml"
    pipeline.write_text(yaml.safe_dump(data))

    server = semantic_server(pipeline)
    model_dir = next((cache_dir() / "models").glob("SmolLM2-135M-Instruct*-float32-v*"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    other = None if args.skip_mlx_lm else mlx_lm_server(model_dir, 8931, "--decode-concurrency", "32", blas=blas)
    try:
        concurrent(stream_anthropic, server.url, 2, 8)  # warm up
        if other is not None:
            concurrent(stream_openai, other.url, 2, 8)
        for n in args.agents:
            # untimed: the first batch of n (its shapes, buffers, threads) on both servers
            concurrent(stream_anthropic, server.url, n, 8)
            if other is not None:
                concurrent(stream_openai, other.url, n, 8)
            # the servers and the one-at-a-time baseline take turns, run after run: drift on a
            # shared machine hits them alike
            runs: dict[str, list[dict]] = {"semantic": [], "mlx_lm_server": [], "sequential": []}
            for _ in range(args.repeats):
                runs["semantic"].append(concurrent(stream_anthropic, server.url, n, args.max_tokens))
                if other is not None:
                    runs["mlx_lm_server"].append(concurrent(stream_openai, other.url, n, args.max_tokens))
                runs["sequential"].append(one_at_a_time(stream_anthropic, server.url, n, args.max_tokens))
            row = results["throughput"].setdefault(str(n), {})
            for side, got in runs.items():
                if got:  # the median run (by tok/s), and every run's tok/s
                    row[side] = {**sorted(got, key=lambda r: r["tok_s"])[len(got) // 2], "runs_tok_s": [r["tok_s"] for r in got]}
            row["vs_sequential"] = row["semantic"]["tok_s"] / row["sequential"]["tok_s"]
            if other is not None:
                row["vs_mlx_lm_server"] = row["semantic"]["tok_s"] / row["mlx_lm_server"]["tok_s"]
            print(n, "agents:", json.dumps({k: round(v["tok_s"], 2) for k, v in row.items() if isinstance(v, dict)}), flush=True)
        if other is not None:
            other.stop()
            other = None
        if args.long_tokens:
            results["long_prefill"] = long_prefill(server.url, 8, args.long_tokens, tokenizer)
            print("long prefill:", json.dumps(results["long_prefill"]), flush=True)
    finally:
        server.stop()
        if other is not None:
            other.stop()

    if not args.skip_overhead:
        results["overhead"] = overhead(8, args.max_tokens)
        eight = results["throughput"].get("8", {}).get("sequential")
        if eight:  # the ceiling: a bare BatchGenerator loop (no server at all) against semantic one at a time
            results["overhead"]["bare_vs_sequential"] = 8 * args.max_tokens / results["overhead"]["best"]["bare"]["wall_s"] / eight["tok_s"]
        print("overhead:", json.dumps(results["overhead"]), flush=True)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"batching{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
