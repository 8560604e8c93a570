"""/openapi.json is generated from the handlers' pydantic models; hypothesis-generated bodies
against every documented POST route never get a 5xx, and every error is in the route's format."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semantic.plugins.anthropic.schema import MessagesRequest
from semantic.plugins.openai.schema import ChatCompletionRequest

VALID = {
    "/v1/messages": {"model": "claude-test-1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/messages/count_tokens": {"model": "claude-test-1", "messages": [{"role": "user", "content": "hi"}]},
    "/v1/chat/completions": {"model": "claude-test-1", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    "/v1/completions": {"model": "claude-test-1", "max_tokens": 8, "prompt": "hi"},
    "/v1/agents": {"system": "hi", "metadata": {"k": "v"}},
    "/v1/agents/{agent_id}/messages": {"content": "hi", "max_tokens": 8},
}
FUZZ_AGENT = "fuzz-agent"
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = sorted(
    {k for body in VALID.values() for k in body}
    | {"stream", "tools", "tool_choice", "system", "temperature", "stop", "thinking", "session_id", "n", "seed", "id", "messages"}
)


@st.composite
def bodies(draw, route: str):
    """A valid body with some keys dropped or replaced by arbitrary JSON, or arbitrary JSON."""
    if draw(st.integers(0, 9)) == 0:
        return draw(JSON)
    body = dict(VALID[route])
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3, unique=True)):
        if key in body and draw(st.booleans()):
            del body[key]
        else:
            body[key] = draw(JSON)
    return body


@pytest.fixture(scope="module")
def doc(scripted_server):
    return httpx.get(f"{scripted_server.url}/openapi.json").json()


def test_the_document_lists_every_route_with_the_handlers_models(doc):
    paths = doc["paths"]
    for path in ("/v1/messages", "/v1/messages/count_tokens", "/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/v1/agents", "/v1/agents/{agent_id}", "/v1/agents/{agent_id}/messages"):
        assert path in paths
    schemas = doc["components"]["schemas"]

    def resolved(ref: dict) -> dict:
        return schemas[ref["$ref"].rsplit("/", 1)[1]]

    messages = resolved(paths["/v1/messages"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    assert set(messages["properties"]) == set(MessagesRequest.model_json_schema()["properties"])
    chat = resolved(paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    assert set(chat["properties"]) == set(ChatCompletionRequest.model_json_schema()["properties"])
    reply = resolved(paths["/v1/messages"]["post"]["responses"]["200"]["content"]["application/json"]["schema"])
    assert {"id", "content", "stop_reason", "usage"} <= set(reply["properties"])
    assert "text/event-stream" in paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert paths["/v1/messages"]["post"]["responses"]["400"]


@pytest.mark.parametrize("route", sorted(VALID))
def test_generated_bodies_never_get_a_5xx_and_errors_keep_their_format(scripted_server, doc, route):
    assert route in doc["paths"]
    client = httpx.Client(base_url=scripted_server.url, timeout=30)
    if "{agent_id}" in route:
        assert client.post("/v1/agents", json={"id": FUZZ_AGENT}).status_code in (201, 409)
    url = route.replace("{agent_id}", FUZZ_AGENT)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(bodies(route))
    def check(body):
        r = client.post(url, json=body, headers={"x-agent-id": "fuzz"})
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            err = r.json()
            if route.startswith("/v1/messages"):
                assert err["type"] == "error" and {"type", "message"} <= set(err["error"]), err
            elif route.startswith("/v1/agents"):
                assert {"type", "message"} <= set(err["error"]), err
            else:
                assert {"message", "type", "param", "code"} <= set(err["error"]), err

    check()
    assert client.get("/health").json()["status"] == "ready"
