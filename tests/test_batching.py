"""Continuous batching through the whole pipeline on the scripted model: ordering per agent,
parallel agents, admission, cancellation (with pool accounting), failures."""

from __future__ import annotations

import random

import trio

from semantic.errors import ErrorKind, RequestError
from semantic.harness import incoming, run_stage, stage_context
from semantic.items import Tokenized
from semantic.pipeline import Pipeline
from semantic.request import Failed, Finished, Started, TextDelta, Usage
from semantic.stages.cache_lookup import CacheLookup
from semantic.stages.decode import Decode

from pipeline_helpers import run_many, scripted_pipeline, text_of


def stage(pipeline: Pipeline, name: str):
    return next(s for s in pipeline.stages if s.name == name)


def test_same_agent_requests_run_one_after_another_and_the_second_starts_warm(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted, token_delay_s=0.01)
    first = incoming("tell me a story about a long road", agent="same")
    second = incoming("tell me a story about a long road", agent="same")
    results = run_many(pipeline, [first, second])
    gens = sorted(pipeline.model.generations, key=lambda g: g.started)
    assert len(gens) == 2 and gens[0].ended < gens[1].started  # never at once
    starts = [results[i][0] for i in (0, 1)]
    assert all(isinstance(s, Started) for s in starts)
    cached = sorted(s.usage.cached_tokens for s in starts)
    assert cached[0] == 0 and cached[1] > 0  # the second found the first's stored blocks
    assert stage(pipeline, "cache-lookup").settings.serialize_agents
    assert pipeline.context.metrics.counters["agent_waits"] == 1


def test_different_agents_decode_in_the_same_batch(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted, token_delay_s=0.01)
    results = run_many(pipeline, [incoming(f"request {i}", agent=f"agent-{i}") for i in range(4)])
    assert all(text_of(results[i]) == f"You said: request {i}" for i in range(4))
    gens = pipeline.model.generations
    assert max(g.started for g in gens) < min(g.ended for g in gens)  # all four ran at once
    assert pipeline.context.metrics.counters["decode_batch"] >= 1


def test_cache_lookup_parks_an_agents_second_request_until_the_first_is_done(scripted):
    async def main():
        async with stage_context(model=scripted(), block_tokens=4) as ctx:
            lookup = CacheLookup(None, ctx)
            a1, a2, b1 = (incoming(t, agent=a).advance(Tokenized, agent_id=a, prompt_tokens=(1, 2, 3)) for t, a in (("x", "a"), ("y", "a"), ("z", "b")))
            in_send, in_recv = trio.open_memory_channel(0)
            out_send, out_recv = trio.open_memory_channel(0)
            async with trio.open_nursery() as n:
                await n.start(lookup.run, in_recv, out_send)
                for item in (a1, a2, b1):
                    await in_send.send(item)
                await in_send.aclose()
                passed = [await out_recv.receive(), await out_recv.receive()]
                with trio.move_on_after(0.2):
                    passed.append(await out_recv.receive())  # a2 must not come yet
                held = len(passed)
                a1.request.push(Finished("end_turn", Usage()))  # a1 is done: a2 goes on
                passed += [x async for x in out_recv]
            for item in passed:
                item.request.cancel()
            return passed, held, (a1, a2, b1)

    passed, held, (a1, a2, b1) = trio.run(main)
    assert held == 2 and passed == [a1, b1, a2]


def test_a_full_queue_refuses_the_next_request_at_once_without_allocating(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted, token_delay_s=0.05)  # sessions 4, queue 4

    async def main():
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            items = [incoming(f"long {i}", agent=f"agent-{i % 4}", max_tokens=200) for i in range(8)]
            for item in items:
                await pipeline.submit(item)
            await trio.sleep(0.1)
            used = pipeline.context.cache.pool.num_used
            extra = incoming("one too many", agent="agent-0")
            with trio.fail_after(10):  # (a guard against hanging; refusal happens inside submit)
                try:
                    await pipeline.submit(extra)
                except RequestError as e:
                    error = e
            after = pipeline.context.cache.pool.num_used
            for item in items:
                item.request.cancel()
            pipeline.close()
        return error, used, after, extra

    error, used, after, extra = trio.run(main)
    assert error.kind is ErrorKind.RATE_LIMITED and error.retry_after  # Anthropic 429 rate_limit_error
    assert after == used  # nothing reserved for it
    assert extra.request.cancelled and pipeline.context.metrics.counters["rejected_queue_full"] == 1
    assert all("one too many" not in g.model.tokenizer.decode(g.prompt) for g in pipeline.model.generations)


def test_thousands_of_cancellations_leak_no_sequences_or_blocks(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted)
    pipeline.config.limits.max_queue_depth = 64
    pipeline.config.limits.max_concurrent_sessions = 16
    rng = random.Random(7)
    outcomes = {"finished": 0, "cancelled": 0, "refused": 0}

    async def one(i: int) -> None:
        item = incoming(f"request number {i} " + "x" * rng.randrange(0, 40), agent=f"a{i % 24}", max_tokens=rng.randrange(1, 60))
        when = rng.choice(["at-once", "after-start", "after-text", "never"])
        try:
            await pipeline.submit(item)
        except RequestError:
            outcomes["refused"] += 1
            return
        if when == "at-once":
            item.request.cancel()
        async for ev in item.request.events():
            if when == "after-start" and isinstance(ev, Started) or when == "after-text" and isinstance(ev, TextDelta):
                item.request.cancel()
                break
        outcomes["cancelled" if item.request.cancelled else "finished"] += 1

    async def main():
        async with trio.open_nursery() as n:
            await n.start(pipeline.run)
            for wave in range(40):
                async with trio.open_nursery() as clients:
                    for i in range(wave * 60, wave * 60 + 60):
                        clients.start_soon(one, i)
            decode = stage(pipeline, "decode")
            with trio.move_on_after(10):  # cancelled sequences leave at decode's next step
                while decode._seqs or decode.engine.active:
                    await trio.sleep(0.01)
            state = (
                pipeline.context.cache.pool.num_used,
                len(pipeline._inflight),
                stage(pipeline, "schedule").admitted,
                len(decode._seqs),
                stage(pipeline, "cache-lookup")._agents,
                (pipeline.context.upstream, pipeline.context.parked),
            )
            engine_active = decode.engine.active
            pipeline.close()
        return state, engine_active

    (used, inflight, admitted, seqs, agents, on_their_way), engine_active = trio.run(main)
    assert outcomes["cancelled"] > 1000 and outcomes["finished"] > 100
    assert used == 0  # every reservation and pin released: no leaked blocks
    pipeline.context.cache.pool.check()
    assert inflight == 0 and admitted == 0 and seqs == 0 and agents == {} and engine_active == 0
    assert on_their_way == (0, 0)  # decode's count of requests still coming never drifts


def test_a_failing_sequence_fails_alone_and_decode_keeps_serving(registry, scripted):
    pipeline = scripted_pipeline(registry, scripted, fail_during="explode", token_delay_s=0.01)
    results = run_many(pipeline, [incoming("please explode", agent="x"), incoming("stay calm", agent="y")])
    bad, good = results[0], results[1]
    assert isinstance(bad[-1], Failed) and bad[-1].error.kind is ErrorKind.INTERNAL  # a 500-class error
    assert "RuntimeError" in bad[-1].error.message
    assert text_of(good) == "You said: stay calm"


class _BrokenStep:
    """A batch engine whose next step raises, as a crashed MLX step would."""

    def __init__(self, inner) -> None:
        self.inner, self.stats, self.model = inner, inner.stats, inner.model

    def add(self, spec):
        self.inner.add(spec)

    def step(self):
        raise RuntimeError("the batch step failed")

    def remove(self, ids):
        return self.inner.remove(ids)

    @property
    def active(self):
        return self.inner.active

    def close(self):
        self.inner.close()


def test_a_failed_batch_step_fails_its_requests_and_a_new_batch_serves_the_next(scripted):
    model = scripted(token_delay_s=0.01)
    engines = []
    plain = type(model).batch_engine

    def batch_engine(self, options):
        engine = plain(self, options)
        engines.append(engine)
        return _BrokenStep(engine) if len(engines) == 1 else engine

    model.batch_engine = batch_engine.__get__(model)

    async def main():
        async with stage_context(model=model) as ctx:
            decode = Decode(None, ctx)
            items = [incoming(f"q{i}").advance(Tokenized, agent_id=f"a{i}", prompt_tokens=(5, 6, 7 + i)) for i in range(3)]
            first = await run_stage(decode, items[:2])
            second = await run_stage(Decode(None, ctx), items[2:])
            return items, first, second, ctx

    items, first, second, ctx = trio.run(main)
    assert first == []
    for item in items[:2]:
        (*_, last) = _events(item)
        assert isinstance(last, Failed) and last.error.kind is ErrorKind.INTERNAL
    assert [o.stop_reason for o in second] == ["end_turn"]
    assert ctx.metrics.counters["decode_step_failures"] == 1


def _events(item):
    from semantic.harness import drain

    return drain(item.request)
