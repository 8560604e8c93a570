"""identify: who is asking, and may they — before anything is allocated for the request."""

from __future__ import annotations

import hashlib
import json
import re

from pydantic import Field

from semantic import hookimpl
from semantic.chat import unencodable
from semantic.errors import ErrorKind, RequestError
from semantic.items import Identified, Incoming
from semantic.stage import NoSettings, Stage

AGENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def valid_agent_hint(hint: str, protocol: str) -> bool:
    """An explicit agent id: 1-128 of ``A-Z a-z 0-9 . _ : -``. A protocol may keep its own
    namespace as ``<protocol>/<id>`` (the direct agent API does); no other protocol can name it."""
    namespace, slash, name = hint.rpartition("/")
    return AGENT_ID.fullmatch(name) is not None and (not slash or namespace == protocol)


class IdentifySettings(NoSettings):
    hash_messages: int = Field(
        1, ge=0, le=16, description="Leading non-system messages hashed with the system prompt for a content-based id."
    )


def content_agent_id(item: Incoming, hash_messages: int) -> str:
    """A stable id from the conversation's start: system messages plus the first few others.

    Later turns of the same conversation keep that start, so they map to the same agent.
    """
    system = [m.content for m in item.messages if m.role == "system"]
    rest = [(m.role, m.content) for m in item.messages if m.role != "system"][:hash_messages]
    blob = json.dumps([item.model, system, rest], ensure_ascii=False, separators=(",", ":"))
    return "h-" + hashlib.sha256(blob.encode()).hexdigest()[:24]


class Identify(Stage):
    """Names the agent (explicit id or content hash) and enforces the request limits."""

    name = "identify"
    takes = Incoming
    gives = Identified
    Settings = IdentifySettings
    description = "Agent id (explicit or content hash); request-size, model and session limits."

    async def setup(self) -> None:
        self.active: dict[str, int] = {}

    async def process(self, item: Incoming) -> Identified:
        limits = self.context.limits
        if item.request_bytes > limits.max_request_bytes:
            raise RequestError(
                ErrorKind.TOO_LARGE, f"request is {item.request_bytes} bytes; the limit is {limits.max_request_bytes}"
            )
        if not self.context.accepts_model(item.model):
            raise RequestError(ErrorKind.NOT_FOUND, f"model {item.model!r} is not served here")
        extra = [("model", item.model), *((f"stop sequence {i}", s) for i, s in enumerate(item.params.stop))]
        where = unencodable(item.messages, item.tools, extra)
        if where is not None:
            raise RequestError(ErrorKind.INVALID_REQUEST, f"{where}: text is not valid Unicode (unpaired surrogate)")
        if not item.prefill_only and not any(m.role != "system" for m in item.messages):
            raise RequestError(ErrorKind.INVALID_REQUEST, "messages: at least one user message is required")
        if item.agent_hint is not None and not valid_agent_hint(item.agent_hint, item.protocol):
            raise RequestError(ErrorKind.INVALID_REQUEST, "agent id: 1-128 characters of A-Z a-z 0-9 . _ : -")
        agent = item.agent_hint or content_agent_id(item, self.settings.hash_messages)
        if agent not in self.active and len(self.active) >= limits.max_concurrent_sessions:
            self.context.metrics.inc("rejected_sessions")
            raise RequestError(
                ErrorKind.OVERLOADED,
                f"{limits.max_concurrent_sessions} sessions are already active; retry shortly",
                retry_after=1.0,
            )
        self.active[agent] = self.active.get(agent, 0) + 1
        item.request.on_done(lambda _req, a=agent: self._release(a))
        return item.advance(Identified, agent_id=agent, explicit_agent=item.agent_hint is not None)

    def _release(self, agent: str) -> None:
        left = self.active.get(agent, 0) - 1
        if left > 0:
            self.active[agent] = left
        else:
            self.active.pop(agent, None)


@hookimpl
def register_stages(register):
    register(Identify)

