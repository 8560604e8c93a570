"""Bench: MLX's reference BLAS, a preloaded OpenBLAS, and OpenBLAS with the skinny GEMM in front,
same prompt, same run (Linux CPU).

    .venv/bin/python bench/blas.py [--tokens 512]

Starts ``semantic serve`` three times — SEMANTIC_BLAS=reference and SEMANTIC_SKINNY_GEMM=off; auto
(OpenBLAS if installed) and off; auto and auto (the default) — and reports cold time to first token
and decode tokens/s for the same prompt. Prints JSON and writes bench/results/blas.json. Targets:
OpenBLAS prefill several times faster (about 10× measured on these machines for bare mlx-lm
calls); the skinny GEMM's single-sequence decode faster again. With the skinny GEMM the model's
Linear weights are packed (semantic.packed_weights) and prompt chunks go through it too: prefill
no slower than OpenBLAS alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from resume_ttft import CLIENT_TLS, RESULTS, prompt_of, semantic_server  # noqa: E402


def run(pipeline: Path, system: str, blas: str, skinny: str) -> dict:
    os.environ["SEMANTIC_BLAS"], os.environ["SEMANTIC_SKINNY_GEMM"] = blas, skinny
    server = semantic_server(pipeline)
    try:
        loaded = next((line.split("BLAS: ", 1)[1].strip() for line in server.lines if "BLAS: " in line), "?")
        gemm = next((line.split("skinny GEMM: ", 1)[1].strip() for line in server.lines if "skinny GEMM: " in line), "?")
        body = {"model": "smollm2", "max_tokens": 48, "stream": True, "temperature": 0, "system": system,
                "messages": [{"role": "user", "content": "Summarise."}]}
        t0 = time.perf_counter()
        first = last = None
        deltas = 0
        with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers={"x-agent-id": f"{blas}-{skinny}"}, timeout=3600, verify=CLIENT_TLS) as r:
            for line in r.iter_lines():
                if "content_block_delta" in line and line.startswith("data:"):
                    last = time.perf_counter()
                    first = first or last
                    deltas += 1
        return {"blas": loaded, "skinny_gemm": gemm, "ttft_s": first - t0, "decode_tok_s": (deltas - 1) / (last - first) if deltas > 1 else None}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    from semantic.paths import cache_dir
    from semantic.pipelines import shipped
    from transformers import AutoTokenizer

    work = Path(tempfile.mkdtemp(prefix="semantic-blas-"))
    data = yaml.safe_load(shipped()["default"].read_text())
    data["cache"].update(disk_mb=0)
    pipeline = work / "blas.yaml"
    pipeline.write_text(yaml.safe_dump(data))
    semantic_server(pipeline).stop()  # converts the model once, outside the timings
    tokenizer = AutoTokenizer.from_pretrained(str(next((cache_dir() / "models").glob("SmolLM2-135M-Instruct*-float32-v*"))))
    system = prompt_of(args.tokens, tokenizer)
    reference = run(pipeline, system, "reference", "off")
    openblas = run(pipeline, system, "auto", "off")
    skinny = run(pipeline, system, "auto", "auto")
    result = {
        "bench": "blas",
        "prompt_tokens": args.tokens,
        "reference": reference,
        "auto": openblas,
        "auto_skinny": skinny,
        "prefill_speedup": reference["ttft_s"] / openblas["ttft_s"],
        "decode_speedup": (openblas["decode_tok_s"] or 0) / (reference["decode_tok_s"] or 1),
        "skinny_decode_speedup": (skinny["decode_tok_s"] or 0) / (openblas["decode_tok_s"] or 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "blas.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
