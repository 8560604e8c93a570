"""HTTP/1.1 connections stay usable after quick refusals: a kept-alive connection whose request
body arrived after the server had already answered (a bad id, an unknown route) must serve the
next request, and an oversized body that is never read closes its connection visibly."""

from __future__ import annotations

import socket
import time

import httpx
import pytest


def _response(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """One whole response (Content-Length bodies), or what arrived before the timeout."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    except TimeoutError:
        return data


@pytest.mark.parametrize("path", ["/v1/agents/.bad/messages", "/v1/no-such-route", "/v1/agents/nobody/messages"])
def test_a_body_that_arrives_after_a_quick_refusal_leaves_the_connection_usable(scripted_server, path):
    host, port = scripted_server.url.split("//")[1].rsplit(":", 1)
    body = b'{"content": "hi"}'
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (path.encode(), len(body)))
        time.sleep(0.1)  # the handler could answer before the body is here
        sock.sendall(body)
        first = _response(sock)
        assert first.startswith((b"HTTP/1.1 400", b"HTTP/1.1 404")), first
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        second = _response(sock)
        assert second.startswith(b"HTTP/1.1 200"), second  # (a stalled connection answered nothing)


def test_an_oversized_body_closes_its_connection_and_the_client_goes_on(scripted_server):
    with httpx.Client(base_url=scripted_server.url, timeout=10) as client:
        for route in ("/v1/messages", "/v1/chat/completions", "/v1/agents"):
            r = client.post(route, content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.headers["connection"] == "close", r.text
            assert client.get("/health").status_code == 200


def test_requests_being_received_are_counted_until_submitted_or_answered(scripted_server):
    """Decode gathers a burst with requests the server is still reading; the count must always
    come back to zero: answered, refused, oversized, streamed, abandoned mid-stream."""
    message = {"model": "test-model", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=scripted_server.url, timeout=30) as client:
        assert client.post("/v1/messages", json=message).status_code == 200
        assert client.post("/v1/messages", json={**message, "max_tokens": -1}).status_code == 400
        assert client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
        assert client.post("/v1/messages/count_tokens", json={"model": "test-model", "messages": message["messages"]}).status_code == 200
        assert client.post("/v1/no-such-route", json={}).status_code == 404
        assert client.post("/v1/messages", content=b"x" * (9 * 1024 * 1024), headers={"content-type": "application/json"}).status_code == 413
        with client.stream("POST", "/v1/chat/completions", json={**message, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # leave mid-stream
        with client.stream("POST", "/v1/messages", json={**message, "stream": True}) as r:
            assert any('"message_stop"' in line for line in r.iter_lines())
    deadline = time.monotonic() + 10
    while True:
        counters = httpx.get(f"{scripted_server.url}/health").json()["counters"]
        gauges = (counters["requests_arriving"], counters["requests_upstream"], counters["requests_parked"])
        if gauges == (0, 0, 0) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert gauges == (0, 0, 0)
