"""Each stage alone, on typed inputs, through the harness in semantic.harness."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from semantic.config import LimitsConfig
from semantic.errors import ErrorKind, RequestError
from semantic.harness import drain, incoming, run_stage, stage_context
from semantic.items import Generated, Identified, Tokenized
from semantic.model import ChatMessage, KVState
from semantic.request import Failed, Finished, Started, TextDelta, Usage
from semantic.stages.cache_lookup import CacheLookup, CacheLookupSettings
from semantic.stages.decode import Decode, DecodeSettings
from semantic.stages.identify import Identify, IdentifySettings
from semantic.stages.persist import Persist
from semantic.stages.schedule import Schedule, ScheduleSettings
from semantic.stages.tokenize import Tokenize


def run(fn, *args):
    return trio.run(fn, *args)


def failure(item) -> Failed:
    events = drain(item.request)
    assert events and isinstance(events[-1], Failed), events
    return events[-1]


# --- identify ---------------------------------------------------------------------------------


def test_identify_names_agents_by_explicit_id_or_conversation_start():
    async def main():
        async with stage_context(worker=False) as ctx:
            conv = [ChatMessage("system", "be brief"), ChatMessage("user", "hi")]
            later = [*conv, ChatMessage("assistant", "hello"), ChatMessage("user", "more")]
            other = [ChatMessage("system", "be brief"), ChatMessage("user", "something else")]
            items = [incoming(conv), incoming(later), incoming(other), incoming("x", agent="agent-7")]
            return await run_stage(Identify(None, ctx), items)

    a, b, c, d = run(main)
    assert all(isinstance(x, Identified) for x in (a, b, c, d))
    assert a.agent_id == b.agent_id != c.agent_id
    assert a.agent_id.startswith("h-") and not a.explicit_agent
    assert (d.agent_id, d.explicit_agent) == ("agent-7", True)


def test_identify_content_id_can_cover_more_messages():
    async def main():
        async with stage_context(worker=False) as ctx:
            s = Identify(IdentifySettings(hash_messages=0), ctx)
            return await run_stage(s, [incoming("one"), incoming("two")])

    a, b = run(main)
    assert a.agent_id == b.agent_id  # only the (empty) system prompt and model are hashed


@pytest.mark.parametrize(
    ("item", "kind"),
    [
        (incoming("x", request_bytes=10_000), ErrorKind.TOO_LARGE),
        (incoming("x", model="gpt-9"), ErrorKind.NOT_FOUND),
        (incoming([ChatMessage("system", "only a system prompt")]), ErrorKind.INVALID_REQUEST),
        (incoming("x", agent="../etc/passwd"), ErrorKind.INVALID_REQUEST),
    ],
)
def test_identify_refuses_bad_requests_before_allocating(item, kind):
    async def main():
        async with stage_context(worker=False, limits=LimitsConfig(max_request_bytes=2048)) as ctx:
            ctx.accepts_model = lambda name: name == "test-model"
            stage = Identify(None, ctx)
            out = await run_stage(stage, [item])
            return out, stage.active

    out, active = run(main)
    assert out == [] and active == {}
    assert failure(item).error.kind is kind


def test_identify_caps_concurrent_sessions_and_releases_them():
    async def main():
        async with stage_context(worker=False, limits=LimitsConfig(max_concurrent_sessions=2)) as ctx:
            stage = Identify(None, ctx)
            a1, a2, b, c = incoming("a", agent="a"), incoming("a", agent="a"), incoming("b", agent="b"), incoming("c", agent="c")
            out = await run_stage(stage, [a1, a2, b, c])
            assert [x.agent_id for x in out] == ["a", "a", "b"]
            err = failure(c).error
            assert err.kind is ErrorKind.OVERLOADED and err.retry_after
            a1.request.cancel()
            assert stage.active == {"a": 1, "b": 1}
            a2.request.cancel()
            b.request.push(Finished("end_turn", Usage()))
            assert stage.active == {}
            again = incoming("c", agent="c")
            assert [x.agent_id for x in await run_stage(stage, [again])] == ["c"]

    run(main)


# --- tokenize ---------------------------------------------------------------------------------


async def _identified(ctx, *items):
    return await run_stage(Identify(None, ctx), items)


def test_tokenize_applies_the_chat_template_and_caps_output(scripted):
    model = scripted()

    async def main():
        async with stage_context(model=model, worker=False, limits=LimitsConfig(max_output_tokens=20)) as ctx:
            items = await _identified(ctx, incoming("hello", max_tokens=500), incoming("hi", max_tokens=5))
            return await run_stage(Tokenize(None, ctx), items)

    big, small = run(main)
    assert isinstance(big, Tokenized)
    assert list(big.prompt_tokens) == model.tokenizer.encode_chat([ChatMessage("user", "hello")])
    assert big.params.max_tokens == 20 and small.params.max_tokens == 5


def test_a_prefill_only_request_is_tokenized_as_what_every_next_turn_shares(scripted):
    model = scripted()
    system = [ChatMessage("system", "You are terse.")]

    async def main():
        async with stage_context(model=model, worker=False) as ctx:
            item = incoming(system)
            item.prefill_only = True  # no user message: still valid, for this purpose only
            (out,) = await run_stage(Tokenize(None, ctx), await _identified(ctx, item))
            return out

    out = run(main)
    for user in ("hello", "Zebra", ""):
        turn = model.tokenizer.encode_chat([*system, ChatMessage("user", user)])
        assert tuple(turn[: len(out.prompt_tokens)]) == out.prompt_tokens
    assert len(out.prompt_tokens) > len(model.tokenizer.encode("You are terse."))


def test_tokenize_refuses_prompts_over_the_limit(scripted):
    async def main():
        async with stage_context(model=scripted(), worker=False, limits=LimitsConfig(max_prompt_tokens=30)) as ctx:
            items = await _identified(ctx, incoming("x" * 40), incoming("short"))
            out = await run_stage(Tokenize(None, ctx), items)
            return items, out

    items, out = run(main)
    assert len(out) == 1 and out[0] is not items[0]
    err = failure(items[0]).error
    assert err.kind is ErrorKind.INVALID_REQUEST
    assert err.message.startswith("prompt is too long: ") and err.message.endswith("tokens > 30 maximum")


def test_tokenize_refuses_output_that_would_overflow_the_context(scripted):
    async def main():
        async with stage_context(model=scripted(context_length=64), worker=False) as ctx:
            fits = 64 - len(ctx.model.tokenizer.encode_chat([ChatMessage("user", "hello")]))
            items = await _identified(ctx, incoming("hello", max_tokens=1000), incoming("hello", max_tokens=fits))
            return items, fits, await run_stage(Tokenize(None, ctx), items)

    items, fits, out = run(main)
    err = failure(items[0]).error  # never truncated silently: the form clients retry on
    assert err.kind is ErrorKind.INVALID_REQUEST
    assert err.message.startswith(f"input length and `max_tokens` exceed context limit: {64 - fits} + 1000 > 64")
    assert len(out) == 1 and len(out[0].prompt_tokens) + out[0].params.max_tokens == 64


# --- cache-lookup ---------------------------------------------------------------------------


def _lookup(ctx) -> CacheLookup:
    """cache-lookup without per-agent ordering: these tests send one agent's probes together."""
    return CacheLookup(CacheLookupSettings(serialize_agents=False), ctx)


def _tokenized(tokens, agent="a", **kw) -> Tokenized:
    base = incoming("x", **kw)
    return base.advance(Tokenized, agent_id=agent, prompt_tokens=tuple(tokens))


def _finished(item: Tokenized, output=(), **kw) -> Generated:
    tokens = item.prompt_tokens + tuple(output)
    return item.advance(Generated, stop_reason="end_turn", output_tokens=len(output), kv_state=KVState(tokens, tokens, 100 * len(tokens)), **kw)


def test_cache_lookup_finds_blocks_tails_and_shared_prefixes(scripted):
    """Block size 4: full blocks are shared by hash; the partial tail only with its own agent."""
    model = scripted()

    async def main():
        async with stage_context(model=model, block_tokens=4) as ctx:
            first = _tokenized(range(10))  # blocks [0-3] [4-7], tail [8, 9]
            (looked,) = await run_stage(_lookup(ctx), [first])
            await run_stage(Persist(None, ctx), [_finished(looked, output=(50, 51))])  # tail 8 9 50 51 → full block
            probes = [
                _tokenized([*range(12), 7, 7]),  # 2 full blocks, then 8 9 of the cached [8 9 50 51]
                _tokenized([*range(10), 50, 51, 1, 2], agent="a"),  # all 12 cached tokens
                _tokenized([*range(10), 50, 51, 1, 2], agent="b"),  # another agent: the same blocks
                _tokenized([*range(9), 99, 1], agent="a"),  # diverges inside block 3: 8 + 1
                _tokenized([7, 7, 7, 7, 7], agent="c"),
            ]
            out = await run_stage(_lookup(ctx), probes)
            for item in out:
                item.request.cancel()  # releases its reservation
            return out, ctx

    out, ctx = run(main)
    assert [o.prefix_len for o in out] == [10, 12, 12, 9, 0]
    for o in out[:4]:
        assert o.prefix.tokens == o.prompt_tokens[: o.prefix_len]  # the scripted model checks the KV data too
    assert ctx.cache.pool.num_used == 0  # pins and reservations all released
    assert ctx.metrics.counters["cache_misses"] == 2 and ctx.metrics.counters["cache_hits"] == 4


def test_cache_lookup_refuses_when_the_pool_cannot_hold_the_request(scripted):
    async def main():
        async with stage_context(model=scripted(), block_tokens=4, cache_bytes=100 * 4 * 5) as ctx:  # 5 blocks
            small = _tokenized(range(6), max_tokens=4)  # needs 3 blocks, holds them while it runs
            big = _tokenized(range(10), max_tokens=6)  # needs 4: only 2 are free
            huge = _tokenized(range(10), max_tokens=40)  # needs 13 > 5: could never fit, runs uncached
            out = await run_stage(_lookup(ctx), [small, big, huge])
            return big, out, ctx

    big, out, ctx = run(main)
    err = failure(big).error
    assert err.kind is ErrorKind.RATE_LIMITED and err.retry_after and "pool is full" in err.message  # 429
    small, huge = out
    assert len(small.cache_blocks.blocks) == 3 and huge.cache_blocks is None
    assert ctx.cache.pool.num_used == 3 and ctx.metrics.counters["cache_unreservable"] == 1


# --- schedule ---------------------------------------------------------------------------------


def test_schedule_admits_up_to_sessions_plus_queue_depth_then_refuses_at_once():
    async def main():
        limits = LimitsConfig(max_queue_depth=2, max_concurrent_sessions=3)
        async with stage_context(worker=False, limits=limits) as ctx:
            stage = Schedule(None, ctx)
            items = [_tokenized([i]) for i in range(7)]
            refused = []
            for item in items:
                try:
                    stage.admit(item)
                except RequestError as e:
                    refused.append((item, e))
            items[0].request.cancel()  # one leaves: there is room for one more
            late = _tokenized([9])
            stage.admit(late)
            return refused, items, stage, ctx

    refused, items, stage, ctx = run(main)
    assert [item for item, _ in refused] == items[5:]  # 3 sessions + 2 waiting
    for item, err in refused:
        assert err.kind is ErrorKind.RATE_LIMITED and err.retry_after == 1.0  # 429 with retry-after
        assert not item.request.done  # refused before entering: the caller answers it
    assert stage.admitted == 5 and ctx.metrics.counters["rejected_queue_full"] == 2


def test_schedule_orders_by_priority_then_arrival():
    rules = [{"priority": 5, "model": "claude-opus-*"}, {"priority": -1, "model": "claude-haiku-*"}]

    async def main():
        async with stage_context(worker=False) as ctx:
            stage = Schedule(ScheduleSettings(batch_window_ms=50, priorities=rules), ctx)
            names = ["claude-haiku-4-5", "other", "claude-opus-4-1", "other", "claude-opus-4-1"]
            items = [_tokenized([i], model=name) for i, name in enumerate(names)]
            in_send, in_recv = trio.open_memory_channel(0)
            out_send, out_recv = trio.open_memory_channel(0)
            async with trio.open_nursery() as n:
                await n.start(stage.run, in_recv, out_send)
                async with in_send:
                    for item in items:  # all arrive inside the first one's batch window
                        await in_send.send(item)
                got = [x async for x in out_recv]
            return got

    got = run(main)
    assert [x.prompt_tokens[0] for x in got] == [2, 4, 1, 3, 0]


def test_schedule_drops_requests_cancelled_while_waiting():
    async def main():
        async with stage_context(worker=False) as ctx:
            items = [_tokenized([1]), _tokenized([2])]
            items[0].request.cancel()
            return await run_stage(Schedule(None, ctx), items)

    assert [x.prompt_tokens for x in run(main)] == [(2,)]


# --- decode -----------------------------------------------------------------------------------


def _decode(model, items, settings=None):
    async def main():
        async with stage_context(model=model) as ctx:
            tok = [i.advance(Tokenized, agent_id="a", prompt_tokens=tuple(model.tokenizer.encode_chat(i.messages))) for i in items]
            return await run_stage(Decode(settings, ctx), tok), ctx

    return trio.run(main)


def test_decode_streams_text_and_reports_the_kv_state(scripted):
    model = scripted(reply="Hello there, world")
    item = incoming("hi")
    (out,), _ = _decode(model, [item])
    assert isinstance(out, Generated)
    assert (out.stop_reason, out.output_tokens) == ("end_turn", len("Hello there, world"))
    events = drain(item.request)
    assert isinstance(events[0], Started) and events[0].usage.prompt_tokens == len(out.prompt_tokens)
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Hello there, world"
    assert out.kv_state.tokens[: len(out.prompt_tokens)] == out.prompt_tokens


def test_decode_stops_at_max_tokens_and_stop_sequences(scripted):
    model = scripted(reply="one two three four")
    capped, stopped = incoming("a", max_tokens=7), incoming("b", stop=["thr", "zzz"])
    (a, b), _ = _decode(model, [capped, stopped], DecodeSettings(emit_every=3))
    assert (a.stop_reason, a.output_tokens) == ("max_tokens", 7)
    assert "".join(e.text for e in drain(capped.request) if isinstance(e, TextDelta)) == "one two"
    assert (b.stop_reason, b.stop_sequence) == ("stop_sequence", "thr")
    assert "".join(e.text for e in drain(stopped.request) if isinstance(e, TextDelta)) == "one two "


def test_decode_model_failure_fails_only_that_request(scripted):
    model = scripted(reply="fine", fail_on="explode")
    bad, good = incoming("please explode"), incoming("ok")
    out, ctx = _decode(model, [bad, good])
    assert [o.request for o in out] == [good.request]
    err = failure(bad).error
    assert err.kind is ErrorKind.INTERNAL and "RuntimeError" in err.message
    assert ctx.metrics.counters["generation_errors"] == 1


def test_decode_stops_a_cancelled_request_within_a_token(scripted):
    model = scripted(reply="x" * 200, token_delay_s=0.01)
    item = incoming("go", max_tokens=200)

    async def main():
        async with stage_context(model=model) as ctx:
            tok = item.advance(Tokenized, agent_id="a", prompt_tokens=tuple(model.tokenizer.encode_chat(item.messages)))
            async with trio.open_nursery() as n:
                result = []

                async def go():
                    result.extend(await run_stage(Decode(None, ctx), [tok]))

                n.start_soon(go)
                async for ev in item.request.events():
                    if isinstance(ev, TextDelta):
                        item.request.cancel()
                        break
            return result

    out = run(main)
    assert out == []  # a cancelled request is dropped: nobody is left to answer
    (gen,) = model.generations
    assert len(gen.fed) <= 3  # it left the batch at the next step


# --- persist ----------------------------------------------------------------------------------


def test_persist_stores_new_blocks_and_the_tail(scripted):
    model = scripted()

    async def main():
        async with stage_context(model=model, block_tokens=4) as ctx:
            (first,) = await run_stage(_lookup(ctx), [_tokenized(range(6))])
            (a,) = await run_stage(Persist(None, ctx), [_finished(first, output=(90, 91, 92))])
            (again,) = await run_stage(_lookup(ctx), [_tokenized([*range(6), 90, 91, 92, 5, 5])])
            (b,) = await run_stage(Persist(None, ctx), [_finished(again, output=(1,))])
            return a, b, again, ctx

    a, b, again, ctx = run(main)
    assert a.cache_created_tokens == 6 and a.kv_state is None  # the whole prompt is new
    assert again.prefix_len == 9  # two full blocks and the agent's tail [8:9]
    assert b.cache_created_tokens == 2  # prompt tokens 9 and 10 were new
    pool = ctx.cache.pool
    assert pool.num_cached == 3 and pool.num_used == 0  # blocks 0-3, 4-7, 8-11 kept; nothing held
    assert "a" not in ctx.cache.tails  # 12 tokens: no partial tail left




def _arrivals(model, settings, sends, upstream=0, arriving=0, worker=True):
    """Run decode on ``sends`` — (prompt text, pause after it) — sent one by one, the engine's
    steps counted. Returns the steps taken when each sequence was added (in order), the outputs,
    and the upstream count left (``upstream``: requests the pipeline counts on their way;
    ``arriving``: requests the server says it is reading, throughout; ``worker``: as for
    ``stage_context``)."""
    added: dict[int, int] = {}

    async def main():
        async with stage_context(model=model, worker=worker) as ctx:
            ctx.upstream, ctx.arriving = upstream, arriving
            stage = Decode(settings, ctx)
            in_send, in_recv = trio.open_memory_channel(0)
            out_send, out_recv = trio.open_memory_channel(math.inf)
            async with trio.open_nursery() as nursery:
                await nursery.start(stage.run, in_recv, out_send)
                engine = stage.engine
                steps, add, step = [0], engine.add, engine.step

                def counted_step():
                    steps[0] += 1
                    return step()

                def counted_add(spec):
                    added[spec.seq_id] = steps[0]
                    return add(spec)

                engine.add, engine.step = counted_add, counted_step
                async with in_send:
                    for i, (text, pause) in enumerate(sends):
                        item = incoming(text)
                        await in_send.send(item.advance(Tokenized, agent_id=f"a{i}", prompt_tokens=tuple(model.tokenizer.encode_chat(item.messages))))
                        if pause:  # none: back to back, as the schedule stage sends what it holds
                            await trio.sleep(pause)
            return [x async for x in out_recv], ctx.upstream

    out, left = trio.run(main)
    return [added[k] for k in sorted(added)], out, left


@pytest.mark.parametrize(
    "whole_prompt, upstream, gap_ms, gathered",
    [
        (16, 3, 100.0, True),  # long prompts: always gathered on an idle engine
        (16, 3, 0.0, False),  # (no gathering)
        (256, 3, 100.0, True),  # short ones: while others are on their way
        (256, 1, 100.0, False),  # a lone short request never waits
    ],
)
def test_decode_gathers_a_burst_of_new_prompts_on_an_idle_engine(scripted, whole_prompt, upstream, gap_ms, gathered):
    """Prompts arriving a little apart on an idle engine start in one step (prefilled together)."""
    sends = [("a long question, number %d, well past sixteen tokens" % i, 0.03) for i in range(3)]
    added, out, left = _arrivals(scripted(reply="ok"), DecodeSettings(whole_prompt=whole_prompt, idle_gather_ms=gap_ms), sends, upstream)
    assert len(out) == 3 and left == upstream - 3
    if gathered:
        assert added == [0, 0, 0]  # all three before the first step
    else:
        assert added[0] == 0 and added[-1] > 0  # the first one starts alone


@pytest.mark.parametrize("hold_ms, together", [(300.0, True), (0.0, False)])
def test_decode_holds_new_prompts_while_others_are_on_their_way(scripted, hold_ms, together):
    """While a batch decodes, a new short prompt waits for the request behind it (one prefill
    pass for both) — at most ``join_hold_ms``."""
    model = scripted(reply="word " * 60, token_delay_s=0.01)
    sends = [(f"question {i}", pause) for i, pause in enumerate((0.15, 0.08, 0))]
    added, out, left = _arrivals(model, DecodeSettings(idle_gather_ms=0, join_hold_ms=hold_ms), sends, upstream=3)
    assert len(out) == 3 and left == 0
    assert added[0] == 0 and added[1] > 0  # the first one runs alone; the others join while it decodes
    if together:
        assert added[1] == added[2]  # the second waited for the third: one join
    else:
        assert added[1] < added[2]


def test_decode_holds_a_new_prompt_no_longer_than_join_hold_ms(scripted):
    """Someone announced but never arriving does not keep a new prompt out for good: it is held
    for some steps (10 ms each here, 100 ms of hold), then joins."""
    model = scripted(reply="word " * 60, token_delay_s=0.01)
    sends = [("question 0", 0.1), ("question 1", 0)]

    def run(hold_ms):
        added, out, _ = _arrivals(model, DecodeSettings(idle_gather_ms=0, join_hold_ms=hold_ms), sends, upstream=2, arriving=1)
        assert len(out) == 2  # both finished though the announced request never came
        return added

    held, plain = run(100), run(0)
    assert held[1] >= plain[1] + 3  # kept out for several steps, not for good


def test_decode_gathers_prompts_that_come_together_even_unannounced(scripted):
    """Two prompts at once on an idle engine are a burst: a third a little later joins them,
    though nothing counted it on its way (its client was slower to reach the server)."""
    sends = [(f"question {i}", pause) for i, pause in enumerate((0, 0.03, 0))]
    added, out, _ = _arrivals(scripted(reply="ok"), DecodeSettings(idle_gather_ms=100), sends)
    assert len(out) == 3 and added == [0, 0, 0]
