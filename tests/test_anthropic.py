"""The Anthropic protocol on a real server (scripted model), through the official SDK and raw HTTP."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import pytest
from pipeline_helpers import events_of

MODEL = "claude-test-1"
PIPELINES = Path(__file__).parent / "pipelines"


@pytest.fixture(scope="module")
def client(scripted_server):
    return anthropic.Anthropic(base_url=scripted_server.url, api_key="local", max_retries=0)


def test_non_streaming_message(client):
    msg = client.messages.create(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "ping pong"}])
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == "You said: ping pong"
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens == len("You said: ping pong")


def test_streaming_message_with_the_sdk(client):
    with client.messages.stream(model=MODEL, max_tokens=100, messages=[{"role": "user", "content": "streamed"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "You said: streamed" == final.content[0].text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == len(text)


def test_sse_event_sequence(scripted_server):
    body = {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "seq"}]}
    r = httpx.post(f"{scripted_server.url}/v1/messages?beta=true", json=body, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r.text)
    names = [e for e, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert all(data["type"] == name for name, data in events)
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens" and delta["usage"]["output_tokens"] == 5
    assert "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta") == "You s"


def test_stop_sequences(client):
    msg = client.messages.create(
        model=MODEL, max_tokens=100, stop_sequences=["id: "], messages=[{"role": "user", "content": "x"}]
    )
    assert msg.content[0].text == "You sa" and msg.stop_reason == "stop_sequence" and msg.stop_sequence == "id: "


def test_second_turn_reads_the_cache(client, scripted_server):
    first = [{"role": "user", "content": "remember the number 12345"}]
    a = client.messages.create(model=MODEL, max_tokens=100, messages=first)
    turn = [*first, {"role": "assistant", "content": a.content[0].text}, {"role": "user", "content": "and now?"}]
    b = client.messages.create(model=MODEL, max_tokens=100, messages=turn)
    assert a.usage.cache_read_input_tokens == 0 or a.usage.cache_read_input_tokens < b.usage.cache_read_input_tokens
    assert b.usage.cache_read_input_tokens > a.usage.input_tokens  # the whole first turn came from cache
    assert b.content[0].text == "You said: and now?"
    counters = httpx.get(scripted_server.url + "/health").json()["counters"]
    assert counters["cache_hits"] >= 1 and counters["cache_hit_tokens"] >= b.usage.cache_read_input_tokens
    assert counters["cache_bytes"] > 0 and 0 <= counters["cache_pool_pressure"] < 1


def test_system_prompt_as_string_and_blocks(client):
    for system in ("be terse", [{"type": "text", "text": "be terse", "cache_control": {"type": "ephemeral"}}]):
        msg = client.messages.create(model=MODEL, max_tokens=50, system=system, messages=[{"role": "user", "content": "ok"}])
        assert msg.content[0].text == "You said: ok"


@pytest.mark.parametrize(
    ("body", "status", "kind", "needle"),
    [
        (b"{not json", 400, "invalid_request_error", "not valid JSON"),
        (b"[1, 2]", 400, "invalid_request_error", "JSON object"),
        (b"[" * 100_000, 400, "invalid_request_error", "nested too deeply"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "invalid_request_error", "max_tokens"),
        (json.dumps({"model": MODEL, "max_tokens": 5, "messages": []}).encode(), 400, "invalid_request_error", "messages"),
        (json.dumps({"model": MODEL, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}).encode(), 400, "invalid_request_error", "max_tokens"),
        (json.dumps({"model": "gpt-4o", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).encode(), 404, "not_found_error", "gpt-4o"),
        (
            json.dumps({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}).encode(),
            400,
            "invalid_request_error",
            "'image' are not supported",
        ),
        (b"{" + b" " * (9 * 1024 * 1024) + b"}", 413, "request_too_large", "larger than"),
    ],
)
def test_bad_requests_get_anthropic_errors_and_the_server_keeps_serving(scripted_server, client, body, status, kind, needle):
    r = httpx.post(f"{scripted_server.url}/v1/messages", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == kind and needle in err["error"]["message"]
    ok = client.messages.create(model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "still there?"}])
    assert ok.content[0].text == "You said: still there?"


def test_sdk_raises_typed_errors(client):
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="gpt-4o", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert info.value.body["error"]["type"] == "not_found_error"


def test_overload_is_refused_with_retry_after(start_server, tmp_path):
    text = (PIPELINES / "scripted.yaml").read_text().replace("reply: null", "token_delay_s: 0.05\n    reply: slow reply")
    path = tmp_path / "slow.yaml"
    path.write_text(text)
    server = start_server(str(path))
    body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}

    def call(i):
        return httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-agent-id": f"agent-{i}"}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(12)))
    refused = [r for r in responses if r.status_code != 200]
    assert refused and len(refused) < 12
    kinds = {(r.status_code, r.json()["error"]["type"]) for r in refused}
    # more agents than sessions: 529 overloaded; beyond sessions + queue depth: 429 at the door
    assert (529, "overloaded_error") in kinds and kinds <= {(529, "overloaded_error"), (429, "rate_limit_error")}
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
    for r in responses:
        if r.status_code == 200:
            assert r.json()["content"][0]["text"] == "slow reply"


def test_a_full_queue_is_refused_with_429_rate_limit_and_retry_after(start_server, tmp_path):
    text = (PIPELINES / "scripted.yaml").read_text().replace("reply: null", "token_delay_s: 0.1\n    reply: slow reply")
    path = tmp_path / "slow.yaml"
    path.write_text(text)
    server = start_server(str(path))  # 4 sessions + 4 waiting
    body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "x"}]}

    def call(i):  # four agents, three requests each: one runs, the others wait their turn
        return httpx.post(f"{server.url}/v1/messages", json=body, headers={"x-agent-id": f"agent-{i % 4}"}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, range(12)))
    refused = [r for r in responses if r.status_code != 200]
    assert len(refused) >= 4
    for r in refused:
        assert r.status_code == 429 and r.json()["type"] == "error" and r.json()["error"]["type"] == "rate_limit_error"
        assert r.json()["request_id"] == r.headers["request-id"]
        assert "queue is full" in r.json()["error"]["message"] and int(r.headers["retry-after"]) >= 1
    assert all(r.json()["content"][0]["text"] == "slow reply" for r in responses if r.status_code == 200)
    assert httpx.post(f"{server.url}/v1/messages", json=body, timeout=30).status_code == 200  # still serving


def test_a_model_failure_is_a_500_api_error_and_the_server_keeps_serving(start_server, tmp_path):
    text = (PIPELINES / "scripted.yaml").read_text().replace("reply: null", "fail_during: explode\n    reply: null")
    path = tmp_path / "failing.yaml"
    path.write_text(text)
    server = start_server(str(path))
    url = f"{server.url}/v1/messages"

    def body(text):
        return {"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": text}]}

    r = httpx.post(url, json=body("please explode"), timeout=30)
    assert r.status_code == 500 and r.json()["type"] == "error" and r.json()["error"]["type"] == "api_error"
    assert "explode" not in r.json()["error"]["message"]  # no request content in errors
    ok = httpx.post(url, json=body("stay calm"), timeout=30)
    assert ok.status_code == 200 and ok.json()["content"][0]["text"] == "You said: stay calm"


def test_an_unpaired_surrogate_is_a_400_and_the_server_keeps_serving(scripted_server):
    url = f"{scripted_server.url}/v1/messages"
    raw = '{"model": "%s", "max_tokens": 5, "messages": [{"role": "user", "content": "bad \\ud800 text"}]}' % MODEL
    r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "surrogate" in r.json()["error"]["message"]
    raw = '{"model": "claude-\\udfff", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}'
    r = httpx.post(url, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "model" in r.json()["error"]["message"]
    ok = httpx.post(url, json={"model": MODEL, "max_tokens": 50, "messages": [{"role": "user", "content": "fine"}]}, timeout=30)
    assert ok.status_code == 200 and httpx.get(f"{scripted_server.url}/health").json()["status"] == "ready"


def test_service_routes(scripted_server):
    url = scripted_server.url
    assert httpx.head(url + "/").status_code == 200
    assert httpx.get(url + "/health").json()["status"] == "ready"
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "test-model"
    r = httpx.get(url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.get(url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"


def test_client_disconnect_stops_generation(start_server, tmp_path):
    text = (PIPELINES / "scripted.yaml").read_text().replace("reply: null", "token_delay_s: 0.05\n    reply: " + "z" * 200)
    path = tmp_path / "slow.yaml"
    path.write_text(text)
    server = start_server(str(path))
    body = {"model": MODEL, "max_tokens": 250, "stream": True, "messages": [{"role": "user", "content": "long"}]}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if "content_block_delta" in line:
                break  # leave mid-stream: the connection closes
    # A generation left running would hold the only decode slot for ~10 s more.
    quick = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "next"}]}
    r = httpx.post(f"{server.url}/v1/messages", json=quick, timeout=8)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "zzz"


def test_client_leaving_while_queued_is_never_generated(start_server, tmp_path):
    text = (PIPELINES / "scripted.yaml").read_text().replace("reply: null", "token_delay_s: 0.05\n    reply: " + "q" * 200)
    text = text.replace("- type: decode", "- type: decode\n    settings: {max_batch: 1}")  # one at a time: the next one queues
    path = tmp_path / "slow.yaml"
    path.write_text(text)
    server = start_server(str(path))
    url = f"{server.url}/v1/messages"
    busy = {"model": MODEL, "max_tokens": 40, "stream": True, "messages": [{"role": "user", "content": "busy"}]}
    queued = {"model": MODEL, "max_tokens": 200, "stream": True, "messages": [{"role": "user", "content": "queued"}]}
    decoding = threading.Event()

    def hold_decode():  # streams ~2 s of tokens; signals once decode is busy with it
        with httpx.stream("POST", url, json=busy, timeout=30) as r:
            for line in r.iter_lines():
                if "content_block_delta" in line:
                    decoding.set()
            return r.status_code

    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(hold_decode)
        assert decoding.wait(10)
        with pytest.raises(httpx.ReadTimeout):  # gives up while still queued: no byte was sent yet
            httpx.post(url, json=queued, headers={"x-agent-id": "leaver"}, timeout=0.5)
        assert first.result() == 200
    # Had the abandoned request run, it would hold decode for ~10 s more.
    quick = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "next"}]}
    r = httpx.post(url, json=quick, timeout=6)
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "qqq"


def test_streams_ping_while_waiting_in_the_queue_and_prefilling(start_server, tmp_path):
    from semantic.plugins.anthropic.routes import KEEPALIVE_S

    text = (PIPELINES / "scripted.yaml").read_text().replace("reply: null", f"prefill_delay_s: {KEEPALIVE_S + 1.5}\n    reply: ok")
    text = text.replace("- type: decode", "- type: decode\n    settings: {max_batch: 1}")
    path = tmp_path / "slow-prefill.yaml"
    path.write_text(text)
    server = start_server(str(path))
    body = {"model": MODEL, "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    def events(agent):
        with httpx.stream("POST", f"{server.url}/v1/messages", json=body, headers={"x-agent-id": agent}, timeout=60) as r:
            assert r.status_code == 200
            return [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]

    with ThreadPoolExecutor(2) as pool:  # the second waits in the queue while the first prefills
        results = list(pool.map(events, ["first", "second"]))
    for names in results:
        assert names[0] == "message_start" and names[-1] == "message_stop"
        silent = names[: names.index("content_block_start")]
        assert silent.count("ping") >= 2  # the opening ping and at least one keep-alive
        # (a ping may also come between later events: persisting the first waits for the worker
        # while it prefills the second)
        content = [n for n in names[names.index("content_block_start") :] if n != "ping"]
        assert content == ["content_block_start", "content_block_delta", "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
