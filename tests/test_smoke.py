"""Smoke: the real server on loopback with the embedded model, the official anthropic SDK as client."""

from __future__ import annotations

import anthropic
import httpx
import pytest

pytestmark = [pytest.mark.smoke, pytest.mark.integration]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_sdk_non_streaming_and_streaming(real_server):
    client = anthropic.Anthropic(base_url=real_server.url, api_key="local", max_retries=0, timeout=300)
    msg = client.messages.create(model="claude-local", max_tokens=30, messages=QUESTION, extra_body={"temperature": 0})
    assert "Paris" in msg.content[0].text and msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 20

    with client.messages.stream(model="claude-local", max_tokens=30, messages=QUESTION, extra_body={"temperature": 0}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" in text and final.content[0].text == text
    # the same prompt again, same agent: all but the last prompt token comes from its cached tail
    assert final.usage.cache_read_input_tokens == final.usage.input_tokens + final.usage.cache_read_input_tokens - 1


def test_bad_input_then_service_continues(real_server):
    url = real_server.url + "/v1/messages"
    bad = [
        (b"{oops", 400, "invalid_request_error"),
        (b'{"model": "smollm2", "messages": []}', 400, "invalid_request_error"),
        (b'{"model": "llama-70b", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}', 404, "not_found_error"),
        (b'{"x": "' + b"a" * (5 * 1024 * 1024) + b'"}', 413, "request_too_large"),
    ]
    for body, status, kind in bad:
        r = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert (r.status_code, r.json()["error"]["type"]) == (status, kind)
    client = anthropic.Anthropic(base_url=real_server.url, api_key="local", max_retries=0, timeout=300)
    msg = client.messages.create(model="smollm2", max_tokens=30, messages=QUESTION, extra_body={"temperature": 0})
    assert "Paris" in msg.content[0].text
    assert httpx.get(real_server.url + "/health").json()["status"] == "ready"
