"""Bench: a multi-agent OpenAI workload — 8 sessions × 5 turns, all sessions at once — on semantic
and on ``mlx_lm.server`` (same model, same concurrency, same run).

    .venv/bin/python bench/openai_sessions.py [--sessions 8] [--turns 5] [--max-tokens 48] [--skip-mlx-lm]

Each session has its own system prompt (a shared ~400-token preamble plus its role) and asks one
question per turn, sending the whole conversation each time (``session_id`` names it on semantic).
Reports aggregate tokens/s, TTFT per turn (p50 over sessions) and cached prompt tokens per turn
(``usage.prompt_tokens_details.cached_tokens``; mlx_lm.server reports none). Issue 6 states no
numeric target: the comparison is the result. Writes bench/results/openai_sessions[-TAG].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from resume_ttft import CLIENT_TLS, mlx_lm_server, semantic_server, with_blas  # noqa: E402

RESULTS = Path(__file__).parent / "results"
PREAMBLE = "You are one of several assistants working on a shared research project about the history of science. " * 20
QUESTIONS = ["Name one famous scientist.", "What did they discover?", "When did they live?", "Who influenced them?", "Summarize in one line."]


def turn(url: str, model: str, history: list[dict], max_tokens: int, session: str | None) -> dict:
    body = {"model": model, "messages": history, "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    if session:
        body["session_id"] = session
    t0 = time.perf_counter()
    first, text, usage = None, [], {}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600, verify=CLIENT_TLS) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if choice["delta"].get("content"):
                    first = first or time.perf_counter()
                    text.append(choice["delta"]["content"])
    details = usage.get("prompt_tokens_details") or {}
    return {
        "ttft_s": (first or time.perf_counter()) - t0,
        "reply": "".join(text),
        "prompt_tokens": usage.get("prompt_tokens"),
        "cached_tokens": details.get("cached_tokens"),
        "completion_tokens": usage.get("completion_tokens", len(text)),
    }


def workload(url: str, model: str, sessions: int, turns: int, max_tokens: int, named: bool) -> dict:
    def session(i: int) -> list[dict]:
        history = [{"role": "system", "content": f"{PREAMBLE}You are assistant number {i}."}]
        out = []
        for k in range(turns):
            history.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})
            t = turn(url, model, history, max_tokens, f"bench-session-{i}" if named else None)
            history.append({"role": "assistant", "content": t.pop("reply")})
            out.append(t)
        return out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        runs = list(pool.map(session, range(sessions)))
    wall = time.perf_counter() - t0
    per_turn = []
    for k in range(turns):
        rows = [r[k] for r in runs]
        cached = [r["cached_tokens"] for r in rows if r["cached_tokens"] is not None]
        prompts = [r["prompt_tokens"] for r in rows if r["prompt_tokens"]]
        per_turn.append({
            "ttft_s_p50": statistics.median(r["ttft_s"] for r in rows),
            "ttft_s_max": max(r["ttft_s"] for r in rows),
            "cached_share": sum(cached) / sum(prompts) if cached and prompts else None,
        })  # fmt: skip
    tokens = sum(r["completion_tokens"] or 0 for s in runs for r in s)
    return {"wall_s": wall, "completion_tokens": tokens, "tok_s": tokens / wall, "turns": per_turn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--skip-mlx-lm", action="store_true")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()

    blas = with_blas(__file__)

    from semantic.paths import cache_dir
    from semantic.pipelines import shipped

    work = Path(tempfile.mkdtemp(prefix="semantic-bench-"))
    data = yaml.safe_load(shipped()["default"].read_text())
    data["cache"].update(disk_mb=0, memory_mb=4096)
    (work / "bench.yaml").write_text(yaml.safe_dump(data))
    results: dict = {
        "bench": "openai_sessions", "machine": platform.platform(), "cpus": os.cpu_count(), "blas": blas or "reference",
        "sessions": args.sessions, "turns": args.turns, "max_tokens": args.max_tokens,
    }  # fmt: skip
    server = semantic_server(work / "bench.yaml")
    try:
        turn(server.url, "smollm2", [{"role": "user", "content": "warm up"}], 4, None)
        results["semantic"] = workload(server.url, "smollm2", args.sessions, args.turns, args.max_tokens, named=True)
        print("semantic", json.dumps(results["semantic"]), flush=True)
    finally:
        server.stop()

    if not args.skip_mlx_lm:
        model_dir = next((cache_dir() / "models").glob("SmolLM2-135M-Instruct*-float32-v*"))
        other = mlx_lm_server(model_dir, 8933, "--decode-concurrency", "32", blas=blas)
        url = other.url
        try:
            turn(url, "default_model", [{"role": "user", "content": "warm up"}], 4, None)
            results["mlx_lm_server"] = workload(url, "default_model", args.sessions, args.turns, args.max_tokens, named=False)
            print("mlx_lm.server", json.dumps(results["mlx_lm_server"]), flush=True)
        finally:
            other.stop()
        results["tok_s_vs_mlx_lm_server"] = results["semantic"]["tok_s"] / results["mlx_lm_server"]["tok_s"]

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"openai_sessions{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
