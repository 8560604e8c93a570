"""Direct agent API (/v1/agents): create (system prompt cached at once), list, get, delete (only
the agent's own blocks freed, in memory and on disk), stateful turns streamed or not, tool calls,
id validation, busy agents, turns that fail or are abandoned changing nothing, restarts.

The scripted model runs the protocol cases; the embedded model runs the whole lifecycle across a
server restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import trio
from conftest import ServerProcess, _pipeline_copy
from hypothesis import given
from hypothesis import strategies as st
from pipeline_helpers import events_of, pipeline_yaml

from semantic.errors import RequestError
from semantic.model import ChatMessage, ToolCall, ToolSpec
from semantic.plugins.agents.store import AgentRecord, AgentStore

SYSTEM = "You are agent zero. You keep notes about every city you are told about, and you answer briefly. " * 2
CALL = '<tool_call>\n{"name": "lookup", "arguments": {"city": "Paris"}}\n</tool_call>'
SCRIPT = [
    {"when": "<tool_response>", "reply": "The tool said: {last}"},
    {"when": "look it up", "reply": "Looking.\n" + CALL},
]
LOOKUP = {"name": "lookup", "description": "Facts about a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def error_of(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"type", "message"}, err
    return err["message"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("agents")
    path = pipeline_yaml(folder, script=SCRIPT, options={"token_delay_s": 0.01}, cache={"disk_dir": str(folder / "kv"), "disk_mb": 64})
    s = ServerProcess(path)
    s.folder = folder
    yield s
    assert s.stop() == 0, "".join(s.output)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def create(client, **body) -> dict:
    r = client.post("/v1/agents", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def say(client, agent: str, content: str, **extra) -> dict:
    r = client.post(f"/v1/agents/{agent}/messages", json={"content": content, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_create_prefills_the_system_prompt_so_the_first_turn_is_warm(client):
    agent = create(client, id="warm-1", system=SYSTEM, metadata={"team": "a"})
    assert agent["object"] == "agent" and agent["id"] == "warm-1" and agent["metadata"] == {"team": "a"}
    prefill = agent["prefill"]
    assert prefill["cached_tokens"] == 0 and prefill["cache_created_tokens"] == prefill["prompt_tokens"] > 40
    assert agent["cache"]["tokens"] >= prefill["prompt_tokens"] and agent["cache"]["memory_blocks"] >= 2
    reply = say(client, "warm-1", "hello there")
    assert reply["content"] == "You said: hello there" and reply["turn"] == 1 and reply["stop_reason"] == "end_turn"
    assert reply["usage"]["cached_tokens"] >= prefill["prompt_tokens"]  # the whole system prompt came from cache


def test_the_server_keeps_the_conversation_and_each_turn_reads_the_last_from_cache(client):
    create(client, id="talker", system=SYSTEM)
    first = say(client, "talker", "first message")
    second = say(client, "talker", "second message")
    assert second["turn"] == 2 and second["content"] == "You said: second message"
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + first["usage"]["output_tokens"]
    assert second["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"]
    detail = client.get("/v1/agents/talker").json()
    assert [(m["role"], m["content"]) for m in detail["conversation"]] == [
        ("user", "first message"),
        ("assistant", "You said: first message"),
        ("user", "second message"),
        ("assistant", "You said: second message"),
    ]
    assert detail["turns"] == 2 and detail["messages"] == 4 and detail["system"] == SYSTEM


def test_a_streamed_turn_sends_named_events_and_is_appended_when_complete(client):
    create(client, id="streamer", system=SYSTEM)
    r = client.post("/v1/agents/streamer/messages", json={"content": "stream this", "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [(name, data) for name, data in events_of(r.text)]
    while events[0][0] == "ping":  # (while queued)
        events.pop(0)
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-1] == "message_stop" and set(names[1:-1]) <= {"text_delta", "ping"}
    assert all(data["type"] == name for name, data in events)
    text = "".join(d["text"] for name, d in events if name == "text_delta")
    reply = events[-1][1]["message"]
    assert text == reply["content"] == "You said: stream this"
    assert events[0][1]["usage"]["cached_tokens"] == reply["usage"]["cached_tokens"] > 0
    assert client.get("/v1/agents/streamer").json()["conversation"][-1]["content"] == text


def test_tool_calls_come_back_and_tool_results_continue_the_conversation(client):
    create(client, id="tooler", system=SYSTEM, tools=[LOOKUP])
    reply = say(client, "tooler", "please look it up")
    assert reply["stop_reason"] == "tool_use" and reply["content"] == "Looking."
    (call,) = reply["tool_calls"]
    assert call["name"] == "lookup" and json.loads(call["arguments"]) == {"city": "Paris"}
    r = client.post("/v1/agents/tooler/messages", json={"messages": [{"role": "tool", "content": "sunny, 21 C", "tool_call_id": call["id"], "name": "lookup"}]})
    assert r.status_code == 200, r.text
    assert r.json()["content"].startswith("The tool said:") and "sunny, 21 C" in r.json()["content"]
    conversation = client.get("/v1/agents/tooler").json()["conversation"]
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]
    assert conversation[1]["tool_calls"] == [call] and conversation[2]["tool_call_id"] == call["id"]


def test_list_shows_every_agent_with_its_cache(client):
    create(client, id="listed", system="A short one.")
    agents = {a["id"]: a for a in client.get("/v1/agents").json()["data"]}
    assert "listed" in agents and "conversation" not in agents["listed"]
    for a in agents.values():
        assert {"tokens", "memory_blocks", "disk_blocks", "memory_bytes", "disk_bytes"} == set(a["cache"])
        assert a["last_used_at"] >= a["created_at"] > 0


@pytest.mark.parametrize("bad", [".hidden", "..%2Fetc", "a%2Fb", "-dash-first", "has space", "x" * 129, "semi;colon", "%2e%2e"])
def test_bad_agent_ids_are_400s_on_every_route(client, bad):
    assert "invalid agent id" in error_of(client.get(f"/v1/agents/{bad}"), 400)
    assert "invalid agent id" in error_of(client.delete(f"/v1/agents/{bad}"), 400)
    assert "invalid agent id" in error_of(client.post(f"/v1/agents/{bad}/messages", json={"content": "hi"}), 400)


def test_bad_requests_get_clear_errors_and_change_nothing(client):
    create(client, id="strict", system=SYSTEM)
    error_of(client.post("/v1/agents", json={"id": "strict"}), 409)
    error_of(client.post("/v1/agents", json={"id": "../up"}), 400)
    error_of(client.post("/v1/agents", json={"model": "no-such-model"}), 404)
    error_of(client.post("/v1/agents", content=b"{not json"), 400)
    error_of(client.get("/v1/agents/nobody"), 404)
    error_of(client.delete("/v1/agents/nobody"), 404)
    error_of(client.post("/v1/agents/nobody/messages", json={"content": "hi"}), 404)
    assert "exactly one" in error_of(client.post("/v1/agents/strict/messages", json={}), 400)
    assert "exactly one" in error_of(client.post("/v1/agents/strict/messages", json={"content": "a", "messages": [{"content": "b"}]}), 400)
    assert "tool_call_id" in error_of(client.post("/v1/agents/strict/messages", json={"messages": [{"role": "tool", "content": "x"}]}), 400)
    assert "too long" in error_of(client.post("/v1/agents/strict/messages", json={"content": "word " * 5000}), 400)
    assert client.get("/v1/agents/strict").json()["messages"] == 0
    say(client, "strict", "still fine")


def test_one_turn_per_agent_at_a_time_and_an_abandoned_turn_changes_nothing(server, client):
    create(client, id="busy", system=SYSTEM)
    long = "tell me " + "more and more " * 30  # echoed back: 256 tokens (the cap) at 10 ms each
    with httpx.stream("POST", f"{server.url}/v1/agents/busy/messages", json={"content": long, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("event: message")) == "event: message_start"
        assert "busy" in error_of(client.post("/v1/agents/busy/messages", json={"content": "me too"}), 409)
        assert "busy" in error_of(client.delete("/v1/agents/busy"), 409)
        # leave mid-reply: the exchange is not appended
    for _ in range(100):
        r = client.post("/v1/agents/busy/messages", json={"content": "after"})
        if r.status_code != 409:
            break
        time.sleep(0.05)
    assert r.status_code == 200, r.text
    conversation = client.get("/v1/agents/busy").json()["conversation"]
    assert [m["content"] for m in conversation] == ["after", "You said: after"]


def test_delete_frees_the_agents_own_blocks_in_memory_and_on_disk_and_keeps_shared_ones(server, client):
    shared = "A long shared preamble that both agents start with, word for word. " * 4
    create(client, id="twin-a", system=shared)
    create(client, id="twin-b", system=shared + "Twin b differs at the end.")
    say(client, "twin-a", "only twin a says this, and it is long enough to fill blocks of its own " * 2)
    kv = server.folder / "kv"

    def settled(agent: str) -> dict:  # blocks are written to disk in the background
        for _ in range(100):
            a = client.get(f"/v1/agents/{agent}").json()
            if a["cache"]["disk_blocks"] == a["cache"]["memory_blocks"]:
                return a
            time.sleep(0.05)
        raise AssertionError(a)

    a, b = settled("twin-a"), settled("twin-b")
    files = len(list(kv.rglob("*.safetensors")))
    r = client.delete("/v1/agents/twin-a")
    assert r.status_code == 200, r.text
    freed = r.json()["freed"]
    assert r.json() == {"id": "twin-a", "object": "agent.deleted", "deleted": True, "freed": freed}
    assert freed["shared_blocks_kept"] >= 4 and freed["memory_blocks"] == freed["disk_blocks"] == a["cache"]["memory_blocks"] - freed["shared_blocks_kept"] > 0
    assert freed["disk_bytes"] > 0 and freed["memory_bytes"] > 0
    assert len(list(kv.rglob("*.safetensors"))) == files - freed["disk_blocks"]
    error_of(client.get("/v1/agents/twin-a"), 404)
    assert client.get("/v1/agents/twin-b").json()["cache"] == b["cache"]  # untouched
    warm = say(client, "twin-b", "still warm?")
    assert warm["usage"]["cached_tokens"] >= b["cache"]["tokens"] - 1  # (its state ends with the prefill's one sampled token)
    create(client, id="twin-a", system="The id can be used again.")


def test_agent_ids_are_their_own_namespace(client):
    create(client, id="named", system=SYSTEM)
    say(client, "named", "my own turn")
    memory = ("tokens", "memory_blocks", "memory_bytes")  # (its blocks reach the disk meanwhile)
    before = {k: client.get("/v1/agents/named").json()["cache"][k] for k in memory}
    chat = {"model": "claude-test-1", "max_tokens": 8, "messages": [{"role": "user", "content": "someone else entirely"}]}
    r = client.post("/v1/chat/completions", json={**chat, "session_id": "named"})  # an OpenAI session of the same name
    assert r.status_code == 200, r.text
    assert {k: client.get("/v1/agents/named").json()["cache"][k] for k in memory} == before  # its tail and blocks are untouched
    r = client.post("/v1/chat/completions", json={**chat, "session_id": "agents/named"})
    assert "agent id" in error_of(r, 400)
    r = client.post("/v1/messages", json={**chat, "model": "claude-test-1"}, headers={"x-agent-id": "agents/named"})
    assert r.status_code == 400 and r.json()["type"] == "error"


def test_ids_are_unique_without_regard_to_case(client):
    create(client, id="CaseAgent")
    assert "exists already" in error_of(client.post("/v1/agents", json={"id": "caseagent"}), 409)
    assert error_of(client.get("/v1/agents/caseagent"), 404)


def test_the_api_is_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/agents"]) == {"get", "post"}
    assert set(paths["/v1/agents/{agent_id}"]) == {"get", "delete"}
    assert "201" in paths["/v1/agents"]["post"]["responses"]
    turn = paths["/v1/agents/{agent_id}/messages"]["post"]
    assert "text/event-stream" in turn["responses"]["200"]["content"] and "409" in turn["responses"]


# --- the store on its own -----------------------------------------------------------------------

TEXT = st.text(max_size=40)
CALLS = st.lists(st.builds(ToolCall, st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8), TEXT), max_size=2)
MESSAGES = st.lists(
    st.one_of(
        st.builds(ChatMessage, st.just("user"), TEXT),
        st.builds(ChatMessage, st.just("assistant"), TEXT, CALLS.map(tuple)),
        st.builds(ChatMessage, st.just("tool"), TEXT, st.just(()), st.text(min_size=1, max_size=8), st.none() | st.text(max_size=8)),
    ),
    max_size=6,
)
HASHES = st.lists(st.binary(min_size=32, max_size=32), max_size=4)


@given(
    agent_id=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
    system=TEXT,
    conversation=MESSAGES,
    chain=HASHES,
    metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
)
def test_records_round_trip_through_json(agent_id, system, conversation, chain, metadata):
    record = AgentRecord(agent_id, "m", system, (ToolSpec("t", "d", {"type": "object"}),), metadata, conversation, 1.5, 2.5, 3, tuple(chain), set(chain))
    again = AgentRecord.from_json(json.loads(json.dumps(record.to_json())))
    assert again == record


def test_the_store_persists_skips_damaged_files_and_caps_the_number_of_agents(tmp_path: Path):
    trio.run(_store_checks, tmp_path)


async def _store_checks(tmp_path: Path) -> None:
    store = AgentStore(tmp_path, limit=2)
    await store.save(AgentRecord("one", "m", "sys", conversation=[ChatMessage("user", "hi")]))
    turn = store.begin("two", new=True)
    await store.save(AgentRecord("two", "m"))
    turn.end()
    (tmp_path / "three.json").write_text("{broken")
    (tmp_path / "other.json").write_text(json.dumps(AgentRecord("not-other", "m").to_json()))
    again = AgentStore(tmp_path, limit=2)
    assert again.load() == 2 and again.get("one").conversation == [ChatMessage("user", "hi")]
    with pytest.raises(Exception, match="at most 2 agents"):
        again.begin("four", new=True)
    await again.remove("two")
    assert not (tmp_path / "two.json").exists()
    again.begin("four", new=True).end()
    with pytest.raises(Exception, match="exists already"):
        again.begin("ONE", new=True)

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    broken = AgentStore(blocked / "agents", limit=2)  # its folder cannot be made
    with pytest.raises(RequestError, match="nothing was changed"):
        await broken.save(AgentRecord("x", "m"))
    with pytest.raises(RequestError):
        broken.get("x")

    with trio.CancelScope() as scope:  # the client leaves while the record is written
        scope.cancel()
        await again.save(AgentRecord("five", "m", turns=7))
    assert again.get("five").turns == 7 and json.loads((tmp_path / "five.json").read_text())["turns"] == 7


# --- the embedded model, across a restart ---------------------------------------------------------


def test_lifecycle_on_the_embedded_model_across_a_restart(tmp_path, smollm):
    kv = tmp_path / "kv"
    path = str(_pipeline_copy(tmp_path, disk_dir=str(kv), block_tokens=16))
    system = "You are a careful assistant for a small bakery. You answer questions about bread, opening hours and prices in one short sentence."
    server = ServerProcess(path)
    try:
        c = httpx.Client(base_url=server.url, timeout=300)
        agent = create(c, id="baker", system=system)
        prefill = agent["prefill"]["prompt_tokens"]
        one = say(c, "baker", "When do you open?", max_tokens=12, temperature=0)
        two = say(c, "baker", "And on Sundays?", max_tokens=12, temperature=0, stream=False)
        assert one["usage"]["cached_tokens"] >= prefill - 1  # created warm
        assert two["usage"]["cached_tokens"] >= one["usage"]["prompt_tokens"]  # the first turn's cache
        for _ in range(200):
            before = c.get("/v1/agents/baker").json()
            if before["cache"]["disk_blocks"] >= before["cache"]["memory_blocks"] > 0:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(before)
    finally:
        assert server.stop() == 0, "".join(server.output)

    server = ServerProcess(path)
    try:
        c = httpx.Client(base_url=server.url, timeout=300)
        after = c.get("/v1/agents/baker").json()
        assert after["conversation"] == before["conversation"] and after["turns"] == 2
        assert after["cache"]["memory_blocks"] == 0 and after["cache"]["disk_blocks"] == before["cache"]["disk_blocks"]
        assert after["cache"]["tokens"] >= 16 * (before["cache"]["tokens"] // 16) - 16
        three = say(c, "baker", "Thanks!", max_tokens=8, temperature=0)
        assert three["usage"]["cached_tokens"] >= two["usage"]["prompt_tokens"] - 16 > 0  # warm from disk
        assert c.get("/health").json()["counters"]["cache_disk_hit_blocks"] > 0
        for _ in range(200):  # the last turn's blocks reach the disk in the background
            now = c.get("/v1/agents/baker").json()["cache"]
            if now["disk_blocks"] >= now["memory_blocks"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError(now)
        r = c.delete("/v1/agents/baker")
        freed = r.json()["freed"]
        assert r.status_code == 200 and freed["disk_blocks"] > 0 and freed["memory_blocks"] > 0 and freed["shared_blocks_kept"] == 0
        assert list(kv.rglob("*.safetensors")) == [] and not list(kv.rglob("baker.json"))
        counters = c.get("/health").json()["counters"]
        assert counters["cache_bytes"] == 0 and counters["cache_disk_bytes"] == 0
    finally:
        assert server.stop() == 0, "".join(server.output)
