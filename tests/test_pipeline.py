"""A whole pipeline running on the scripted model: flow, warm turns, failures, shutdown."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from semantic import hookimpl
from semantic.config import load_pipeline, parse_pipeline
from semantic.errors import ErrorKind, RequestError
from semantic.harness import incoming
from semantic.items import Incoming
from semantic.model import ChatMessage
from semantic.pipeline import Pipeline, State
from semantic.plugin_manager import Registry, plugin_manager
from semantic.request import Failed, Finished, Started, TextDelta
from semantic.stage import SAME, Stage

from pipeline_helpers import SCRIPTED, collect, run_many, scripted_pipeline, text_of



class Crash(Stage):
    """A stage with a bug: it raises on requests that say 'boom'."""

    name = "crash-on-boom"
    takes = Incoming
    gives = SAME

    async def process(self, item):
        if any("boom" in m.content for m in item.messages):
            raise ValueError("a bug in a stage")
        return item


class CrashPlugin:
    @hookimpl
    def register_stages(self, register):
        register(Crash)





def test_third_party_pipeline_runs_with_its_stage_policy_and_model(registry):
    config = load_pipeline(SCRIPTED, registry)

    async def main():
        pipeline = Pipeline(config, registry, base_dir=SCRIPTED.parent)
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            model = pipeline.model
            first = await collect(pipeline, incoming("hello", model="claude-x", max_tokens=100))
            turn2 = [ChatMessage("user", "hello"), ChatMessage("assistant", "You said: hello"), ChatMessage("user", "again")]
            second = await collect(pipeline, incoming(turn2, model="test-model", max_tokens=100))
            policy = type(pipeline.context.cache.pool.policy).__name__
            pipeline.close()
        return model, first, second, policy, pipeline.state

    model, first, second, policy, state = trio.run(main)
    assert type(model).__name__ == "ScriptedModel" and policy == "FIFO" and state is State.STOPPED
    assert text_of(first) == "You said: hello" and isinstance(first[-1], Finished)
    expected = model.tokenizer.encode_chat([ChatMessage("system", "You are a test."), ChatMessage("user", "hello")])
    assert model.calls[0] == (len(expected), 0)  # the system-prompt stage added its message
    # the second turn starts with the first turn's prompt and reply: served from the kept cache
    usage = second[-1].usage
    assert text_of(second) == "You said: again"
    assert usage.cached_tokens > len(expected) and model.calls[1][1] == usage.cached_tokens
    assert usage.cache_created_tokens == usage.prompt_tokens - usage.cached_tokens
    assert isinstance(second[0], Started) and second[0].usage.cached_tokens == usage.cached_tokens



def test_many_concurrent_requests_all_complete(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted)
    pipeline.config.limits.max_queue_depth = 16

    results = run_many(pipeline, [incoming(f"number {i}", agent=f"agent-{i % 3}") for i in range(12)])
    assert sorted(results) == list(range(12))
    for i, events in results.items():
        assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
        assert text_of(events) == f"You said: number {i}"


def test_requests_beyond_the_in_flight_cap_are_refused_at_once(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted, token_delay_s=0.01)  # queue 4 + sessions 4 = 8 in flight

    results = run_many(pipeline, [incoming(f"n{i}", agent=f"a{i % 4}") for i in range(20)])
    refused = [r for r in results.values() if isinstance(r, RequestError)]
    served = [r for r in results.values() if not isinstance(r, RequestError)]
    assert len(refused) + len(served) == 20 and refused and served
    assert all(r.kind is ErrorKind.RATE_LIMITED and r.retry_after for r in refused)
    assert all(isinstance(ev[-1], Finished | Failed) for ev in served)


def test_a_failing_request_does_not_stop_thescripted_pipeline(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted, fail_on="explode")

    async def main():
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            bad = await collect(pipeline, incoming("explode now"))
            good = await collect(pipeline, incoming("fine"))
            pipeline.close()
        return bad, good

    bad, good = trio.run(main)
    assert isinstance(bad[-1], Failed) and bad[-1].error.kind is ErrorKind.INTERNAL
    assert text_of(good) == "You said: fine"
    assert pipeline.state is State.STOPPED


def test_a_stage_crash_fails_the_pipeline_loudly(scripted, caplog):
    registry = Registry.from_plugins(plugin_manager(extra=[CrashPlugin()]))
    text = SCRIPTED.read_text().replace("  - type: schedule\n", "  - type: schedule\n  - type: crash-on-boom\n")
    config = parse_pipeline(text, "crash.yaml", registry)
    model = scripted(reply="slow " * 50, token_delay_s=0.02)
    pipeline = Pipeline(config, registry, model=model)

    async def main():
        with trio.fail_after(30):  # a failed pipeline must never leave a caller hanging
            return await scenario()

    async def scenario():
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            assert pipeline.ready
            slow = incoming("a long one", max_tokens=250)
            await pipeline.submit(slow)
            first = await slow.request.events().__anext__()
            boom = incoming("boom")
            await pipeline.submit(boom)
            slow_events = [first] + [ev async for ev in slow.request.events()]
            boom_events = [ev async for ev in boom.request.events()]
            with pytest.raises(RequestError) as refused:
                await pipeline.submit(incoming("after"))
        return slow_events, boom_events, refused.value

    slow_events, boom_events, refused = trio.run(main)
    assert pipeline.state is State.FAILED and not pipeline.ready
    assert pipeline.failure == "ValueError"  # types only: messages might quote content
    assert len(model.generations[0].fed) < 100  # the failed in-flight generation was stopped
    assert isinstance(boom_events[-1], Failed) and boom_events[-1].error.kind is ErrorKind.INTERNAL
    assert isinstance(slow_events[-1], Failed)  # in flight when the pipeline failed: told, not hung
    assert refused.kind is ErrorKind.UNAVAILABLE
    assert any(r.levelname == "CRITICAL" and r.exc_info for r in caplog.records)


def test_closing_the_entry_drains_requests_then_stops(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted, token_delay_s=0.005)

    async def main():
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            items = [incoming(f"q{i}", agent=f"a{i}") for i in range(3)]
            for item in items:
                n.start_soon(pipeline.submit, item)
            await trio.sleep(0.05)
            pipeline.close()
        return [[ev async for ev in it.request.events()] for it in items]

    for events in trio.run(main):
        assert isinstance(events[-1], Finished)
    assert pipeline.state is State.STOPPED


def test_server_reports_not_ready_after_a_stage_crash(scripted):
    from semantic.server import create_app

    registry = Registry.from_plugins(plugin_manager(extra=[CrashPlugin()]))
    text = SCRIPTED.read_text().replace("  - type: schedule\n", "  - type: schedule\n  - type: crash-on-boom\n")
    pipeline = Pipeline(parse_pipeline(text, "crash.yaml", registry), registry, model=scripted())
    app = create_app(pipeline)
    body = {"model": "test-model", "max_tokens": 20, "messages": [{"role": "user", "content": "boom"}]}

    async def main():
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            client = app.test_client()
            ready = await client.get("/health")
            crashed = await client.post("/v1/messages", json=body)
            health = await client.get("/health")
            after = await client.post("/v1/messages", json={**body, "messages": [{"role": "user", "content": "hi"}]})
            return ready, crashed, health, after

    ready, crashed, health, after = trio.run(main)
    assert ready.status_code == 200
    assert crashed.status_code == 500
    assert (trio.run(crashed.get_json))["error"]["type"] == "api_error"
    assert health.status_code == 503 and trio.run(health.get_json)["status"] == "failed"
    assert after.status_code == 503 and trio.run(after.get_json)["type"] == "error", trio.run(after.get_json)


def test_a_pipeline_built_in_code_gets_the_type_check_too(registry, scripted):
    from semantic.config import ConfigError

    config = load_pipeline(SCRIPTED, registry)
    config.stages = [s for s in config.stages if s.type != "tokenize"]
    with pytest.raises(ConfigError, match="'identify' gives Identified but stage 'cache-lookup' takes Tokenized"):
        Pipeline(config, registry, model=scripted())
