"""Anthropic protocol: tool use, thinking blocks, count_tokens, auth and context errors, on a real
server with the scripted model, through the official SDK and raw HTTP."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import pytest
from pipeline_helpers import events_of
from pipeline_helpers import pipeline_yaml as scripted_yaml

from semantic.chat_format import HERMES
from semantic.model import ChatMessage, ToolSpec

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = "claude-test-1"

WEATHER = {
    "name": "get_weather",
    "description": "Current weather of a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SCRIPT = [
    {"when": "<tool_response>", "reply": "The tool said: {last}"},
    {"when": "weather", "reply": "Let me look.\n" + CALL},
    {"when": "broken call", "reply": '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>'},
    {"when": "unknown tool", "reply": '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>'},
    {"when": "think", "reply": "<think>\nTwo and two.\n</think>\n\nThe answer is 4."},
    {"when": "golden text", "reply": "Hello, world."},
    {"when": "golden cut", "reply": "Hello, world."},
]


def pipeline_yaml(tmp_path: Path, **settings) -> str:
    return scripted_yaml(tmp_path, script=SCRIPT, **settings)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import ServerProcess

    s = ServerProcess(pipeline_yaml(tmp_path_factory.mktemp("tools"), options={"thinks": True}))
    yield s
    assert s.stop() == 0, "".join(s.output)


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="local", max_retries=0)


def test_tool_use_round_trip_with_the_sdk(client):
    ask = {"role": "user", "content": "What is the weather in Paris?"}
    msg = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=[ask])
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[0].text == "Let me look."
    call = msg.content[1]
    assert call.name == "get_weather" and call.input == {"city": "Paris"} and call.id.startswith("toolu_")
    assert msg.stop_reason == "tool_use"
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C and sunny"}]}
    done = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=[ask, {"role": "assistant", "content": msg.content}, result])
    assert done.stop_reason == "end_turn"
    assert done.content[0].type == "text" and done.content[0].text == "The tool said: <tool_response>\n18C and sunny\n</tool_response>"


def test_streamed_tool_use_arrives_as_input_json_delta(client, server):
    body = {"model": MODEL, "max_tokens": 200, "stream": True, "tools": [WEATHER], "messages": [{"role": "user", "content": "weather please"}]}
    events = events_of(httpx.post(f"{server.url}/v1/messages", json=body, timeout=30).text)
    starts = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"] and starts[1]["input"] == {} and starts[1]["name"] == "get_weather"
    partial = "".join(d["delta"]["partial_json"] for e, d in events if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta")
    assert json.loads(partial) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    with client.messages.stream(model=MODEL, max_tokens=200, tools=[WEATHER], messages=[{"role": "user", "content": "weather please"}]) as stream:
        final = stream.get_final_message()
    assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Paris"}


@pytest.mark.parametrize("prompt", ["broken call", "unknown tool"])
def test_an_unparseable_or_unknown_tool_call_is_text_not_an_error(client, prompt):
    msg = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=[{"role": "user", "content": prompt}])
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text.startswith("<tool_call>")
    assert msg.stop_reason == "end_turn"


def test_without_tools_a_call_shaped_reply_stays_text(client):
    msg = client.messages.create(model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "weather?"}])
    assert [b.type for b in msg.content] == ["text"] and CALL in msg.content[0].text


def test_tool_choice_none_keeps_calls_as_text(client):
    msg = client.messages.create(
        model=MODEL, max_tokens=200, tools=[WEATHER], tool_choice={"type": "none"}, messages=[{"role": "user", "content": "weather?"}]
    )
    assert [b.type for b in msg.content] == ["text"] and msg.stop_reason == "end_turn"


def test_thinking_blocks_with_signatures_and_their_echo(client, server):
    ask = {"role": "user", "content": "think: what is 2+2?"}
    msg = client.messages.create(model=MODEL, max_tokens=200, thinking={"type": "enabled", "budget_tokens": 1024}, messages=[ask])
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Two and two." and msg.content[0].signature
    assert msg.content[1].text == "The answer is 4."
    body = {"model": MODEL, "max_tokens": 200, "stream": True, "messages": [ask]}
    events = events_of(httpx.post(f"{server.url}/v1/messages", json=body, timeout=30).text)
    kinds = [d["delta"]["type"] for e, d in events if e == "content_block_delta"]
    assert kinds[0] == "thinking_delta" and "signature_delta" in kinds and kinds[-1] == "text_delta"
    assert kinds.index("signature_delta") < kinds.index("text_delta")
    # the client echoes the thinking block (with its signature) in the next turn: accepted, not re-read
    follow = [ask, {"role": "assistant", "content": [b.model_dump() for b in msg.content]}, {"role": "user", "content": "thanks"}]
    again = client.messages.create(model=MODEL, max_tokens=200, thinking={"type": "adaptive"}, messages=follow)
    assert again.content[-1].text == "You said: thanks"


def test_count_tokens_is_the_real_prompt_length(client, server):
    from semantic_scripted import ScriptedTokenizer

    messages = [{"role": "user", "content": "How many tokens?"}]
    plain = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=messages)
    expected = ScriptedTokenizer().encode_chat([ChatMessage("system", "Be brief."), ChatMessage("user", "How many tokens?")])
    assert plain.input_tokens == len(expected)
    with_tools = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=messages, tools=[WEATHER])
    tool = ToolSpec(WEATHER["name"], WEATHER["description"], WEATHER["input_schema"])
    rendered = HERMES.render([ChatMessage("system", "Be brief."), ChatMessage("user", "How many tokens?")], [tool])
    assert with_tools.input_tokens == len(ScriptedTokenizer().encode_chat(rendered)) > plain.input_tokens
    # the count matches what a real request reports as its prompt
    msg = client.messages.create(model=MODEL, max_tokens=5, system="Be brief.", messages=messages, tools=[WEATHER], extra_headers={"x-agent-id": "count"})
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == with_tools.input_tokens
    r = httpx.post(f"{server.url}/v1/messages/count_tokens?beta=true", json={"model": "gpt-4o", "messages": messages}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(f"{server.url}/v1/messages/count_tokens?beta=true", json={"model": MODEL, "messages": "nope"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_requests_shaped_like_claude_codes_are_accepted(client):
    system = [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.330.abc; cc_entrypoint=sdk-cli;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
    ]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "<system-reminder>ctx</system-reminder>"}, {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
        {"role": "system", "content": "A mid-conversation system note."},
        {"role": "user", "content": "again"},
    ]
    msg = client.messages.create(
        model="claude-opus-4-8",
        max_tokens=200,
        system=system,
        messages=messages,
        tools=[WEATHER, {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}],
        tool_choice={"type": "auto"},
        thinking={"type": "adaptive"},
        metadata={"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
        extra_body={"context_management": {"edits": []}, "output_config": {"effort": "high"}, "temperature": 1, "some_future_field": {"x": 1}},
        extra_headers={"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"},
    )
    assert msg.model == "claude-opus-4-8" and msg.content[-1].text == "You said: again"


def test_wrong_block_placement_and_images_are_400(server):
    url = f"{server.url}/v1/messages"
    bad = [
        ([{"role": "user", "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": {}}]}], "assistant messages"),
        ([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}]}], "user messages"),
        ([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "image", "source": {}}]}]}], "'image'"),
        ([{"role": "user", "content": [{"type": "document", "source": {}}]}], "'document'"),
    ]
    for messages, needle in bad:
        r = httpx.post(url, json={"model": MODEL, "max_tokens": 5, "messages": messages}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error" and needle in r.json()["error"]["message"], r.text


def test_context_overflow_errors_have_the_forms_claude_code_parses(start_server, tmp_path):
    server = start_server(pipeline_yaml(tmp_path, options={"context_length": 400}, limits={"max_output_tokens": 256}))
    url = f"{server.url}/v1/messages"
    long = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 500}]}
    r = httpx.post(url, json=long, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"].startswith("prompt is too long: ") and "tokens > 399 maximum" in r.json()["error"]["message"]
    short = {"model": MODEL, "max_tokens": 32000, "messages": [{"role": "user", "content": "x" * 200}]}
    r = httpx.post(url, json=short, timeout=30)
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.startswith("input length and `max_tokens` exceed context limit: ")
    prompt = int(message.split(": ", 1)[1].split(" + ")[0])
    assert f"{prompt} + 256 > 400" in message  # max_tokens is first capped by the pipeline's limit
    short["max_tokens"] = 400 - prompt  # what the client retries with: fits exactly
    assert httpx.post(url, json=short, timeout=30).status_code == 200


def test_a_reported_context_window_is_enforced_and_listed(start_server, tmp_path):
    server = start_server(pipeline_yaml(tmp_path, model={"context_window": 300}))
    entry = httpx.get(f"{server.url}/v1/models").json()["data"][0]
    assert entry["max_input_tokens"] == 300
    assert httpx.get(f"{server.url}/v1/models/claude-opus-4-8").json()["id"] == "claude-opus-4-8"
    assert httpx.get(f"{server.url}/v1/models/gpt-4o").status_code == 404
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x" * 300}]}, timeout=30)
    assert r.status_code == 400 and "> 299 maximum" in r.json()["error"]["message"]


def test_api_keys_are_checked_when_configured(start_server, tmp_path):
    server = start_server(pipeline_yaml(tmp_path, server={"api_keys": ["sk-local-123456"]}))
    body = {"model": MODEL, "max_tokens": 20, "messages": [{"role": "user", "content": "x"}]}
    for headers in ({}, {"x-api-key": "wrong-key"}, {"authorization": "Bearer nope"}):
        r = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
        assert set(r.json()) == {"type", "error", "request_id"}
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=server.url, api_key="wrong-key", max_retries=0).messages.create(**body)
    ok = anthropic.Anthropic(base_url=server.url, api_key="sk-local-123456", max_retries=0).messages.create(**body)
    assert ok.content[0].text == "You said: x"
    bearer = httpx.post(f"{server.url}/v1/messages", json=body, headers={"authorization": "Bearer sk-local-123456"}, timeout=30)
    assert bearer.status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # operations routes stay open


def test_every_error_type_reaches_the_sdk_typed(client, start_server, tmp_path):
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.APIStatusError) as info:  # 413 request_too_large
        client.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}])
    assert info.value.status_code == 413 and info.value.body["error"]["type"] == "request_too_large"
    failing = start_server(pipeline_yaml(tmp_path, options={"fail_on": "explode"}))
    with pytest.raises(anthropic.InternalServerError) as info:
        anthropic.Anthropic(base_url=failing.url, api_key="x", max_retries=0).messages.create(
            model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "explode"}]
        )
    assert info.value.body["error"]["type"] == "api_error"


GOLDEN_CASES = {
    "text": {"messages": [{"role": "user", "content": "golden text"}]},
    "tool_use": {"messages": [{"role": "user", "content": "golden weather"}], "tools": [WEATHER]},
    "thinking": {"messages": [{"role": "user", "content": "golden think"}], "thinking": {"type": "enabled", "budget_tokens": 500}},
    "max_tokens": {"messages": [{"role": "user", "content": "golden cut"}], "max_tokens": 4},
}


def normalized(events: list[tuple[str, dict]]) -> list[list]:
    """Events with the random ids replaced (everything else must match exactly)."""
    text = json.dumps([[e, d] for e, d in events])
    import re

    text = re.sub(r"msg_[0-9a-f]{24}", "msg_ID", text)
    text = re.sub(r"toolu_[0-9a-f]{24}", "toolu_ID", text)
    return json.loads(text)


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_sse_transcripts_match_the_goldens_event_by_event(start_server, tmp_path, case):
    import os

    server = start_server(pipeline_yaml(tmp_path, options={"thinks": True}))  # its own: usage counts start from an empty cache
    body = {"model": MODEL, "max_tokens": 200, "stream": True, **GOLDEN_CASES[case]}
    got = normalized(events_of(httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-agent-id": f"golden-{case}"}, timeout=30).text))
    path = FIXTURES / "sse" / f"{case}.json"
    if os.environ.get("SEMANTIC_UPDATE_GOLDENS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"event {i} differs"


def test_a_conversation_the_template_refuses_is_a_400_and_the_server_keeps_serving(client, server):
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "refuse-to-render"}]}, timeout=30)
    assert r.status_code == 400 and "chat template cannot render" in r.json()["error"]["message"]
    assert r.json()["request_id"] == r.headers["request-id"] and r.headers["request-id"].startswith("req_")
    r = httpx.post(f"{server.url}/v1/messages/count_tokens", json={"model": MODEL, "messages": [{"role": "user", "content": "refuse-to-render"}]}, timeout=30)
    assert r.status_code == 400
    assert httpx.get(f"{server.url}/health").json()["status"] == "ready"
    assert client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "fine"}]).content[0].text == "You said: fine"


def test_request_details_the_api_defines(client, server):
    url = f"{server.url}/v1/messages"
    base = {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "x"}]}
    for extra, needle in [({"tool_choice": {"type": "tool"}}, "needs the tool's 'name'"), ({"output_config": {"format": {"type": "json_schema"}}}, "structured output")]:
        r = httpx.post(url, json={**base, **extra}, timeout=30)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    # roles newer clients add are read as user turns
    r = httpx.post(url, json={**base, "messages": [{"role": "ctx", "content": "hello there"}]}, timeout=30)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "You said: hello there"
    # a tool search result in a tool_result is text
    messages = [
        {"role": "user", "content": "find a tool"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "tool_reference", "tool_name": "get_weather"}]}]},
    ]
    done = client.messages.create(model=MODEL, max_tokens=200, tools=[WEATHER], messages=messages)
    assert done.content[0].text == "The tool said: <tool_response>\nTool: get_weather\n</tool_response>"


def test_a_prefilled_reply_is_continued_not_restarted(server):
    from semantic_scripted import ScriptedTokenizer

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, the answer"}]
    r = httpx.post(f"{server.url}/v1/messages/count_tokens", json={"model": MODEL, "system": "S.", "messages": messages}, timeout=30)
    prompt = ScriptedTokenizer().encode_chat([ChatMessage("system", "S."), ChatMessage("user", "hi"), ChatMessage("assistant", "Sure, the answer")])
    assert r.json()["input_tokens"] == len(prompt)
    assert ScriptedTokenizer().decode(prompt).endswith("assistant\nSure, the answer")
    r = httpx.post(f"{server.url}/v1/messages", json={"model": MODEL, "max_tokens": 50, "messages": messages}, timeout=30)
    assert r.status_code == 200 and not r.json()["content"][0]["text"].startswith("Sure, the answer")


def test_a_slowly_written_tool_call_keeps_the_stream_alive_with_pings(start_server, tmp_path):
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'  # ~70 tokens, held until closed
    server = start_server(pipeline_yaml(tmp_path, options={"reply": call, "script": [], "token_delay_s": 0.1}))
    body = {"model": MODEL, "max_tokens": 200, "stream": True, "tools": [WEATHER], "messages": [{"role": "user", "content": "x"}]}
    events = events_of(httpx.post(f"{server.url}/v1/messages", json=body, timeout=60).text)
    names = [e for e, _ in events]
    assert names.count("ping") >= 2 and names.index("ping", 2) < names.index("content_block_start")
    assert [d["content_block"]["type"] for e, d in events if e == "content_block_start"] == ["tool_use"]
