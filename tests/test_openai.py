"""The OpenAI protocol on a real server (scripted model), through the official `openai` SDK."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import yaml

PIPELINES = Path(__file__).parent / "pipelines"
MODEL = "claude-test-1"  # the scripted pipeline maps claude-* names
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCRIPT = [
    {"when": "<tool_response>", "reply": "The tool said: {last}"},
    {"when": "weather", "reply": 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'},
]


def pipeline_yaml(tmp_path: Path, **options) -> str:
    data = yaml.safe_load((PIPELINES / "scripted.yaml").read_text())
    data["model"]["options"] = {"reply": None, "script": SCRIPT, **options}
    path = tmp_path / "openai.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import ServerProcess

    s = ServerProcess(pipeline_yaml(tmp_path_factory.mktemp("openai")))
    yield s
    assert s.stop() == 0, "".join(s.output)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="local", max_retries=0)


def test_chat_completion(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ping"}], max_tokens=50)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == "You said: ping"
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.completion_tokens == len("You said: ping") and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details.cached_tokens >= 0


def test_streamed_chat_completion_with_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "stream me"}], max_completion_tokens=50, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "You said: stream me"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text)


def test_raw_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}
    lines = [line for line in httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["object"] == "chat.completion.chunk" and last["choices"][0]["finish_reason"] == "length"


def test_tool_calls_round_trip(client):
    ask = {"role": "user", "content": "weather in Oslo?"}
    r = client.chat.completions.create(model=MODEL, messages=[ask], tools=[WEATHER], max_tokens=200)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content == "Checking."
    (call,) = msg.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Oslo"}
    assert call.id.startswith("call_")
    follow = [ask, msg.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "-3C, snow"}]
    done = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=200)
    assert done.choices[0].message.content == "The tool said: <tool_response>\n-3C, snow\n</tool_response>"
    # streamed: the call arrives as a tool_calls delta
    chunks = list(client.chat.completions.create(model=MODEL, messages=[ask], tools=[WEATHER], max_tokens=200, stream=True))
    calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    assert calls[0].function.name == "get_weather" and json.loads("".join(tc.function.arguments for tc in calls)) == {"city": "Oslo"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_text_completion(client):
    r = client.completions.create(model=MODEL, prompt="user\nhello there", max_tokens=40)
    assert r.object == "text_completion" and r.choices[0].text and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model=MODEL, prompt="anything", max_tokens=5, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == client.completions.create(model=MODEL, prompt="anything", max_tokens=5).choices[0].text


def test_a_session_is_warm_on_its_second_turn(client):
    history = [{"role": "system", "content": "A long shared system prompt. " * 20}, {"role": "user", "content": "first turn"}]
    one = client.chat.completions.create(model=MODEL, messages=history, max_tokens=50, extra_body={"session_id": "sess-1"})
    history += [{"role": "assistant", "content": one.choices[0].message.content}, {"role": "user", "content": "second turn"}]
    two = client.chat.completions.create(model=MODEL, messages=history, max_tokens=50, extra_headers={"X-Session-Id": "sess-1"})
    assert two.usage.prompt_tokens_details.cached_tokens >= one.usage.prompt_tokens - 16  # all but a partial block


def test_errors_in_openai_format(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert info.value.body["code"] == "model_not_found" if "code" in info.value.body else info.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=2)
    for raw, status in [(b"{nope", 400), (b"[]", 400), (json.dumps({"model": MODEL}).encode(), 400), (b"{" + b" " * (9 * 1024 * 1024) + b"}", 413)]:
        r = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text
    r = httpx.post(f"{server.url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}], "session_id": "bad/id"}, timeout=30)
    assert r.status_code == 400 and "agent id" in r.json()["error"]["message"]
    assert client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "ok"}], max_tokens=20).choices[0].message.content == "You said: ok"


def test_models_list_reads_in_both_sdks(client, server):
    import anthropic

    assert [m.id for m in client.models.list()] == ["test-model"]
    assert [m.id for m in anthropic.Anthropic(base_url=server.url, api_key="x").models.list()] == ["test-model"]
