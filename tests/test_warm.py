"""Warm turns on the embedded model: cache hits from memory and from disk give the same greedy
tokens as a cold run, and a restarted server serves a returning prompt from disk."""

from __future__ import annotations

import anthropic
import pytest
import trio
import yaml

from semantic.config import parse_pipeline
from semantic.harness import incoming
from semantic.model import ChatMessage, SamplingParams
from semantic.pipeline import Pipeline
from semantic.pipelines import shipped
from semantic.request import Finished, TextDelta

pytestmark = pytest.mark.integration

BT = 16  # small blocks: short prompts still span several blocks and end mid-block
PROMPTS = [
    [ChatMessage("user", "Name a fruit.")],
    [ChatMessage("user", "Write one short sentence about the sea and the wind.")],
    [ChatMessage("system", "You are a careful geography teacher who answers in one sentence."), ChatMessage("user", "Which river flows through Paris?")],
]


def _config(registry, disk_dir):
    data = yaml.safe_load(shipped()["default"].read_text())
    data["cache"].update(block_tokens=BT, disk_dir=str(disk_dir), memory_mb=64)
    return parse_pipeline(yaml.safe_dump(data), "warm.yaml", registry)


async def _ask(pipeline, messages, agent):
    item = incoming(messages, model="smollm2", max_tokens=8, agent=agent)
    await pipeline.submit(item)
    text, finished = [], None
    async for ev in item.request.events():
        if isinstance(ev, TextDelta):
            text.append(ev.text)
        elif isinstance(ev, Finished):
            finished = ev
    return "".join(text), finished.usage


def test_memory_and_disk_hits_match_cold_output(registry, mlx, smollm, tmp_path):
    async def life(runs):
        pipeline = Pipeline(_config(registry, tmp_path), registry, model=smollm, worker=mlx)
        out = []
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            for messages, agent in runs:
                out.append(await _ask(pipeline, messages, agent))
            pipeline.close()
        return out

    first = trio.run(life, [(m, f"agent-{i}") for i, m in enumerate(PROMPTS)] + [(m, f"agent-{i}") for i, m in enumerate(PROMPTS)])
    fresh, memory = first[: len(PROMPTS)], first[len(PROMPTS) :]
    disk = trio.run(life, [(m, f"other-{i}") for i, m in enumerate(PROMPTS)])  # new process memory, same disk
    for messages, (fresh_text, fresh_usage), (mem_text, mem_usage), (disk_text, disk_usage) in zip(PROMPTS, fresh, memory, disk):
        prompt = smollm.tokenizer.encode_chat(messages)
        cold = smollm.tokenizer.decode(greedy_tokens(mlx, smollm, prompt))  # no cache at all
        assert fresh_text == cold  # (may already share the chat template's first block with others)
        assert mem_text == cold and mem_usage.cached_tokens == len(prompt) - 1  # blocks + own tail
        assert disk_text == cold and disk_usage.cached_tokens == min(len(prompt) // BT * BT, len(prompt) - 1) > 0
    assert {u.prompt_tokens % BT == 0 for _, u in fresh} == {True, False}  # block edges and mid-block


def greedy_tokens(mlx, model, prompt):
    def job():
        out = []
        for t in model.generate(prompt, None, 0, SamplingParams(max_tokens=8, temperature=0)):
            if t in model.tokenizer.eos_token_ids:
                break
            out.append(t)
        return out

    return mlx.run_sync(job)


def test_restarted_server_serves_a_returning_prompt_from_disk(start_server, pipeline_copy, tmp_path):
    path = pipeline_copy(tmp_path, block_tokens=32, disk_dir=str(tmp_path / "kv"))
    system = "You answer questions about European capitals. Keep every answer short and exact. " * 3
    question = [{"role": "user", "content": "What is the capital of Italy?"}]

    def ask(server):
        client = anthropic.Anthropic(base_url=server.url, api_key="local", max_retries=0, timeout=300)
        return client.messages.create(model="smollm2", max_tokens=12, system=system, messages=question, extra_body={"temperature": 0})

    server = start_server(str(path))
    cold = ask(server)
    assert server.stop() == 0
    assert cold.usage.cache_read_input_tokens == 0
    server = start_server(str(path))
    warm = ask(server)
    prompt = cold.usage.input_tokens
    assert warm.usage.cache_read_input_tokens == min(prompt // 32 * 32, prompt - 1) > 32
    assert warm.usage.input_tokens == prompt - warm.usage.cache_read_input_tokens
    assert warm.content[0].text == cold.content[0].text
    assert any("KV disk index rebuilt" in line and "0 blocks" not in line for line in server.output)
