"""Drive the real Claude Code CLI against a local recording Anthropic endpoint.

``install_claude_code`` puts the pinned npm package under ``<root>/.cache/claude-code``;
``run_claude`` runs it with a throwaway ``HOME`` so it never logs in, onboards or calls another
host; ``Recorder`` is a tiny scripted Anthropic server that records every request.

What CLI 2.1.330 sends with ``claude_env`` (``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1``):
one ``POST /v1/messages?beta=true`` (``stream: true``) per model call and nothing else; no
``HEAD`` preflight, no title / quota / ``max_tokens: 1`` side requests. Without that variable
it also sends ``HEAD /api/hello`` and tries api.anthropic.com (bootstrap, telemetry).
``POST /v1/messages/count_tokens?beta=true`` (``{model, messages, tools: []}``) comes when the
Read tool returns a large file (~25 KB+); a 404 there is tolerated. ``-p`` needs no config
file; interactive mode needs the ``~/.claude.json`` that ``prepare_home`` writes, or it runs
onboarding, which calls api.anthropic.com. Still, ``Recorder`` consumes scripted replies only
for requests ``is_main`` accepts (default: ``max_tokens > 1``), so a side probe cannot steal one.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

CLAUDE_CODE_VERSION = "2.1.330"
PACKAGE = "@anthropic-ai/claude-code"
DUMMY_API_KEY = "sk-ant-local-test-key"
#: The native binary is hundreds of MB; the placeholder npm ships before postinstall is tiny.
_MIN_BINARY_BYTES = 10_000_000


def _platform_key() -> str:
    """The suffix of the per-platform npm package, as the package's install.cjs computes it."""
    cpu = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine().lower()]
    if sys.platform == "darwin":
        return f"darwin-{cpu}"
    musl = platform.libc_ver()[0] != "glibc"
    return f"linux-{cpu}" + ("-musl" if musl else "")


def install_claude_code(root: Path, version: str = CLAUDE_CODE_VERSION) -> Path:
    """Install the pinned CLI under ``root/.cache/claude-code`` (idempotent); return its binary.

    The wrapper package's ``bin/claude.exe`` is a placeholder that its postinstall
    (``node install.cjs``) replaces with the binary from the per-platform optional dependency
    ``@anthropic-ai/claude-code-<os>-<cpu>``. Both are installed explicitly so that neither
    ``--omit=optional`` nor skipped install scripts leave a stub behind.
    """
    prefix = root.resolve() / ".cache" / "claude-code"
    pkg_dir = prefix / "node_modules" / PACKAGE
    binary = pkg_dir / "bin" / "claude.exe"
    if not _works(binary, version):
        platform_pkg = f"{PACKAGE}-{_platform_key()}@{version}"
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--no-save", "--include=optional",
             "--prefix", str(prefix), f"{PACKAGE}@{version}", platform_pkg],
            check=True, capture_output=True, text=True, timeout=900,
        )
        if binary.stat().st_size < _MIN_BINARY_BYTES:  # the postinstall did not run: run it
            subprocess.run(["node", "install.cjs"], cwd=pkg_dir, capture_output=True, timeout=300)
        if binary.stat().st_size < _MIN_BINARY_BYTES:  # or it failed: do what it does
            native = prefix / "node_modules" / f"{PACKAGE}-{_platform_key()}" / "claude"
            shutil.copy2(native, binary)
        if not _works(binary, version):
            raise RuntimeError(f"{binary} does not report version {version}")
    return binary


def _works(binary: Path, version: str) -> bool:
    if not binary.is_file() or binary.stat().st_size < _MIN_BINARY_BYTES:
        return False
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.startswith(version)


def prepare_home(home: Path, cwd: Path) -> None:
    """Write a ``~/.claude.json`` that marks onboarding done and trusts ``cwd``."""
    home.mkdir(parents=True, exist_ok=True)
    state = {
        "hasCompletedOnboarding": True,
        "lastOnboardingVersion": CLAUDE_CODE_VERSION,
        "numStartups": 1,
        "autoUpdates": False,
        "customApiKeyResponses": {"approved": [DUMMY_API_KEY[-20:]], "rejected": []},
        "projects": {str(cwd): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True,
                                "allowedTools": []}},
    }
    path = home / ".claude.json"
    if not path.exists():
        path.write_text(json.dumps(state, indent=2))


def claude_env(base_url: str, home: Path, env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a hermetic CLI run: only ``base_url`` is ever contacted."""
    keep = ("PATH", "LANG", "LC_ALL", "TERM", "TMPDIR", "SYSTEMROOT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": DUMMY_API_KEY,
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_BUG_COMMAND": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_RETRIES": "1",
        "API_TIMEOUT_MS": "60000",
        "CI": "1",
    })
    env.update(env_extra or {})
    return env


def run_claude(binary: Path, base_url: str, args: list[str], *, home: Path, cwd: Path, timeout: float = 180,
               env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``claude <args>`` (add ``-p PROMPT`` yourself) once, with no stdin; never raises on exit code.

    Tools: read-only Bash commands run unasked; others need ``--allowedTools Bash``.
    ``--permission-mode bypassPermissions`` / ``--dangerously-skip-permissions`` refuse to run
    as root unless ``env_extra={"IS_SANDBOX": "1"}``.
    """
    prepare_home(home, cwd)
    return subprocess.run([str(binary), *args], cwd=cwd, env=claude_env(base_url, home, env_extra),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


# --- the recording server -------------------------------------------------------------------


@dataclass
class Reply:
    """One scripted answer to a main ``/v1/messages`` request.

    ``text`` and/or a ``tool`` call (name + ``input``); or an error ``status`` with ``error``
    message. ``when`` restricts which request may take it (default: any main request).
    """

    text: str | None = None
    tool: str | None = None
    input: dict[str, Any] = field(default_factory=dict)
    status: int = 200
    error: str = ""
    error_type: str = "invalid_request_error"
    when: Callable[[dict[str, Any]], bool] | None = None


@dataclass
class Recorded:
    """One request as received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    reply: str = ""  # what the Recorder answered: "script", "default", "count_tokens", "404", ...

    def to_json(self, drop: Iterable[str] = ("x-api-key", "authorization", "host", "content-length")) -> dict:
        dropped = {d.lower() for d in drop}
        return {"method": self.method, "path": self.path, "reply": self.reply,
                "headers": {k.lower(): v for k, v in self.headers.items() if k.lower() not in dropped},
                "body": self.body}


def rough_tokens(body: Any) -> int:
    """About one token per 4 bytes of JSON: enough for count_tokens and usage figures."""
    return max(1, len(json.dumps(body)) // 4)


def default_is_main(body: dict[str, Any]) -> bool:
    """A conversation request, not a side probe: it is not a ``max_tokens: 1`` quota check."""
    return body.get("max_tokens", 0) > 1


class Recorder:
    """A scripted, recording Anthropic endpoint on 127.0.0.1 (use as a context manager)."""

    def __init__(self, replies: Iterable[Reply] = (), *, default_text: str = "OK.",
                 is_main: Callable[[dict[str, Any]], bool] = default_is_main, count_tokens: bool = True) -> None:
        self.replies: deque[Reply] = deque(replies)
        self.default_text = default_text
        self.is_main = is_main
        self.count_tokens = count_tokens  # False: answer count_tokens with 404
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add(self, *replies: Reply) -> None:
        """Queue more scripted replies."""
        with self._lock:
            self.replies.extend(replies)

    def messages(self) -> list[Recorded]:
        """The recorded ``POST /v1/messages`` requests (no count_tokens)."""
        return [r for r in self.requests if r.method == "POST" and r.path.split("?")[0] == "/v1/messages"]

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _choose(self, body: dict[str, Any]) -> Reply | None:
        with self._lock:
            if not self.is_main(body):
                return None
            for i, reply in enumerate(self.replies):
                if reply.when is None or reply.when(body):
                    del self.replies[i]
                    return reply
            return None


def _handler(rec: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _record(self, body: Any) -> Recorded:
            item = Recorded(self.command, self.path, dict(self.headers.items()), body)
            with rec._lock:
                rec.requests.append(item)
            return item

        def _read_body(self) -> Any:
            n = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(n) if n else b""
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                return raw.decode("utf-8", "replace")

        def _json(self, status: int, obj: Any, head: bool = False) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
            self.end_headers()
            if not head:
                self.wfile.write(data)

        def _not_found(self, head: bool = False) -> None:
            self._json(404, {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}}, head)

        def do_HEAD(self) -> None:
            self._record(None).reply = "404"
            self._not_found(head=True)

        def do_GET(self) -> None:
            self._record(None).reply = "404"
            self._not_found()

        def do_POST(self) -> None:
            body = self._read_body()
            item = self._record(body)
            route = self.path.split("?")[0]
            if route == "/v1/messages/count_tokens" and isinstance(body, dict) and rec.count_tokens:
                item.reply = "count_tokens"
                self._json(200, {"input_tokens": rough_tokens(body.get("messages", []))
                                 + rough_tokens(body.get("system", "")) + rough_tokens(body.get("tools", []))})
            elif route == "/v1/messages" and isinstance(body, dict):
                reply = rec._choose(body)
                item.reply = "script" if reply else "default"
                self._message(body, reply or Reply(text=rec.default_text))
            else:
                item.reply = "404"
                self._not_found()

        def _message(self, body: dict[str, Any], reply: Reply) -> None:
            if reply.status != 200:
                self._json(reply.status, {"type": "error", "error": {"type": reply.error_type, "message": reply.error}})
                return
            blocks: list[dict[str, Any]] = []
            if reply.text is not None:
                blocks.append({"type": "text", "text": reply.text})
            if reply.tool:
                blocks.append({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": reply.tool,
                               "input": reply.input})
            stop = "tool_use" if reply.tool else "end_turn"
            usage_in = rough_tokens({k: body.get(k) for k in ("system", "messages", "tools")})
            usage_out = sum(rough_tokens(b.get("text") or b.get("input")) for b in blocks)
            message = {"id": f"msg_{uuid.uuid4().hex[:24]}", "type": "message", "role": "assistant",
                       "model": body.get("model", "unknown"), "content": blocks, "stop_reason": stop,
                       "stop_sequence": None,
                       "usage": {"input_tokens": usage_in, "output_tokens": usage_out,
                                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}
            if not body.get("stream"):
                self._json(200, message)
                return
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.send_header("connection", "close")
            self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
            self.end_headers()
            self.close_connection = True
            start = dict(message, content=[], stop_reason=None,
                         usage=dict(message["usage"], output_tokens=1))
            self._event("message_start", {"type": "message_start", "message": start})
            self._event("ping", {"type": "ping"})
            for i, block in enumerate(blocks):
                if block["type"] == "text":
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": {"type": "text", "text": ""}})
                    for piece in _chunks(block["text"]):
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "text_delta", "text": piece}})
                else:
                    self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                        "content_block": dict(block, input={})})
                    for piece in _chunks(json.dumps(block["input"])):
                        self._event("content_block_delta", {"type": "content_block_delta", "index": i,
                                                            "delta": {"type": "input_json_delta",
                                                                      "partial_json": piece}})
                self._event("content_block_stop", {"type": "content_block_stop", "index": i})
            self._event("message_delta", {"type": "message_delta",
                                          "delta": {"stop_reason": stop, "stop_sequence": None},
                                          "usage": {"output_tokens": usage_out}})
            self._event("message_stop", {"type": "message_stop"})

        def _event(self, name: str, data: dict[str, Any]) -> None:
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

    return Handler


def _chunks(text: str, size: int = 8) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)] or [""]
