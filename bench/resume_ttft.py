"""Bench: time to first token for a returning prompt — cold, memory hit, disk hit after a restart —
on semantic and on ``mlx_lm.server`` (its in-memory prompt cache), same model, same run.

    .venv/bin/python bench/resume_ttft.py [--sizes 1024 4096 7168] [--skip-mlx-lm]

Also measures the pool memory of 8 agents sharing one system prompt, each with its own tail.
Prints JSON and writes bench/results/resume_ttft.json. Targets (issue "block pool"): disk hit after
restart ≥ 100× faster than cold prefill at 4K tokens and ≥ 30× at 1K; memory hit faster than disk
hit; 8 agents sharing a prompt use at most 1.3× one agent's KV plus their tails.

On Linux CPU without an optimized BLAS, cold prefill of 4K+ tokens takes many minutes: run the
small sizes first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
#: Passed as ``verify`` to every client here: built once, because each new httpx client otherwise
#: loads the CA bundle (~50 ms of CPU, even for plain http), which would be timed as the server's
#: (into TTFT, and spreading a burst of concurrent requests over a few hundred ms).
CLIENT_TLS = ssl.create_default_context()
SENTENCE = "The archive keeps a careful record of every ship that entered the harbour that year. "


class Proc:
    """A server child process; ``url`` once it listens."""

    def __init__(self, cmd: list[str], ready: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + 600
        self.lines: list[str] = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server exited:\n" + "".join(self.lines))
            self.lines.append(line)
            if m := re.search(ready, line):
                self.url = m.group(1)
                return
        raise TimeoutError("".join(self.lines))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def prompt_of(tokens: int, tokenizer) -> str:
    text = SENTENCE * (tokens // 12 + 2)
    ids = tokenizer.encode(text)[:tokens]
    return tokenizer.decode(ids)


def ttft_anthropic(url: str, system: str, user: str, agent: str) -> tuple[float, dict]:
    body = {"model": "smollm2", "max_tokens": 2, "stream": True, "temperature": 0, "system": system, "messages": [{"role": "user", "content": user}]}
    t0 = time.perf_counter()
    first = None
    usage = {}
    with httpx.stream("POST", f"{url}/v1/messages", json=body, headers={"x-agent-id": agent}, timeout=3600, verify=CLIENT_TLS) as r:
        for line in r.iter_lines():
            if first is None and "content_block_delta" in line:
                first = time.perf_counter() - t0
            if line.startswith("data:") and '"message_delta"' in line:
                usage = json.loads(line[5:])["usage"]
    return (first if first is not None else time.perf_counter() - t0), usage


def ttft_openai(url: str, system: str, user: str) -> float:
    body = {
        "model": "default_model",
        "max_tokens": 2,
        "stream": True,
        "temperature": 0,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
    }
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600, verify=CLIENT_TLS) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                return time.perf_counter() - t0
    return time.perf_counter() - t0


def with_blas(script: str) -> str | None:
    """The optimized BLAS serve would use; if what serve preloads is not preloaded yet, run
    ``script`` again with it (so in-process parts run as semantic does: OpenBLAS and the skinny
    GEMM). ``mlx_lm.server`` is given the BLAS alone (``mlx_lm_server(blas=...)``)."""
    from semantic.blas import find_openblas, preload_env

    env = preload_env()
    if env is not None:
        os.execve(sys.executable, [sys.executable, script, *sys.argv[1:]], env)
    return find_openblas()


def semantic_server(pipeline: Path) -> Proc:
    cmd = [sys.executable, "-m", "semantic.cli", "serve", "--pipeline", str(pipeline), "--port", "0"]
    return Proc(cmd, r"serving pipeline .* on (http://\S+)")


def mlx_lm_server(model_dir: Path, port: int, *extra: str, blas: str | None = None) -> Proc:
    """``mlx_lm.server`` on ``port`` (with ``blas`` preloaded, like semantic), ready to answer."""
    cmd = [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--port", str(port), *extra]
    proc = Proc(cmd, r"(http://127\.0\.0\.1:\d+)|Starting httpd", env={"HF_HUB_OFFLINE": "1", **({"LD_PRELOAD": blas} if blas else {})})
    proc.url = f"http://127.0.0.1:{port}"
    for _ in range(60):
        try:
            httpx.get(f"{proc.url}/v1/models", timeout=2, verify=CLIENT_TLS)
            break
        except httpx.HTTPError:
            time.sleep(1)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[1024, 4096, 7168])
    parser.add_argument("--share-tokens", type=int, default=4096, help="shared system prompt for the memory test (0: skip)")
    parser.add_argument("--tail-tokens", type=int, default=500, help="each agent's own tail in the memory test")
    parser.add_argument("--skip-mlx-lm", action="store_true")
    args = parser.parse_args()

    from semantic.paths import cache_dir
    from semantic.pipelines import shipped
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="semantic-bench-"))
    data = yaml.safe_load(shipped()["default"].read_text())
    data["cache"].update(disk_dir=str(work / "kv"), memory_mb=4096)
    data["limits"].update(max_queue_depth=16, max_concurrent_sessions=16)
    pipeline = work / "bench.yaml"
    pipeline.write_text(yaml.safe_dump(data))

    server = semantic_server(pipeline)  # converts the model on first use
    model_dir = next((cache_dir() / "models").glob("SmolLM2-135M-Instruct*-float32-v*"))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    results: dict = {"bench": "resume_ttft", "sizes": {}, "model": "smollm2-135m-instruct"}
    try:
        for n in args.sizes:
            system = prompt_of(n, tokenizer)
            row = {}
            row["cold_s"], usage = ttft_anthropic(server.url, system, "Summarise.", f"a{n}")
            row["memory_hit_s"], mem_usage = ttft_anthropic(server.url, system, "Summarise.", f"a{n}")
            row["prompt_tokens"] = usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0)
            row["memory_cached_tokens"] = mem_usage.get("cache_read_input_tokens")
            results["sizes"][str(n)] = row
        server.stop()
        server = semantic_server(pipeline)
        for n in args.sizes:
            system = prompt_of(n, tokenizer)
            row = results["sizes"][str(n)]
            row["disk_hit_after_restart_s"], disk_usage = ttft_anthropic(server.url, system, "Summarise.", f"b{n}")
            row["disk_cached_tokens"] = disk_usage.get("cache_read_input_tokens")
            row["disk_speedup_vs_cold"] = row["cold_s"] / row["disk_hit_after_restart_s"]
            row["memory_speedup_vs_cold"] = row["cold_s"] / row["memory_hit_s"]
        if args.share_tokens:
            system = prompt_of(args.share_tokens, tokenizer)
            before = httpx.get(f"{server.url}/health", verify=CLIENT_TLS).json()["counters"]
            for i in range(8):
                ttft_anthropic(server.url, system, f"Agent {i}. " + prompt_of(args.tail_tokens, tokenizer), f"share{i}")
            counters = httpx.get(f"{server.url}/health", verify=CLIENT_TLS).json()["counters"]
            per_token = 2 * 30 * 3 * 64 * 4
            one_agent_and_tails = per_token * (args.share_tokens + 8 * args.tail_tokens)
            used = counters.get("cache_bytes", 0) - before.get("cache_bytes", 0) + counters.get("cache_tail_bytes", 0) - before.get("cache_tail_bytes", 0)
            results["sharing"] = {
                "pool_and_tail_bytes": used,
                "one_agent_kv_plus_tails_bytes": one_agent_and_tails,
                "ratio": used / one_agent_and_tails,
                "no_sharing_ratio": per_token * 8 * (args.share_tokens + args.tail_tokens) / one_agent_and_tails,
                "shared_tokens": args.share_tokens,
                "tail_tokens": args.tail_tokens,
            }
    finally:
        server.stop()

    if not args.skip_mlx_lm:
        port = 18080
        ref = mlx_lm_server(model_dir, port)
        url = f"http://127.0.0.1:{port}"
        try:
            for n in args.sizes:
                system = prompt_of(n, tokenizer)
                row = results["sizes"][str(n)]
                row["mlx_lm_cold_s"] = ttft_openai(url, system, "Summarise.")
                row["mlx_lm_repeat_s"] = ttft_openai(url, system, "Summarise.")
        finally:
            ref.stop()
        ref = mlx_lm_server(model_dir, port)
        try:
            for n in args.sizes:
                system = prompt_of(n, tokenizer)
                results["sizes"][str(n)]["mlx_lm_after_restart_s"] = ttft_openai(url, system, "Summarise.")
        finally:
            ref.stop()

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "resume_ttft.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
