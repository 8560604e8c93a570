"""The direct API's agents: their conversations in memory, and one JSON file each on disk.

A record keeps what the server needs to continue the agent after a restart: system prompt,
tools, conversation, and which KV blocks it stored (so its cache can be reported and freed).
Files are written atomically (temporary file, fsync, rename) before memory changes, shielded
from cancellation, so what a client was told and what survives a restart agree. A file that
cannot be read back is skipped with a warning, never a reason not to start. Ids are unique
without regard to case (file names on macOS are case-insensitive).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import trio

from semantic.block_pool import BlockHash
from semantic.errors import ErrorKind, RequestError
from semantic.model import ChatMessage, ToolCall, ToolSpec

from .schema import AGENT_ID

log = logging.getLogger(__name__)

FORMAT = "semantic-agent/1"


@dataclass(slots=True)
class AgentRecord:
    id: str
    model: str
    system: str = ""
    tools: tuple[ToolSpec, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    conversation: list[ChatMessage] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    turns: int = 0
    chain: tuple[BlockHash, ...] = ()  # its latest KV state's full blocks
    blocks: set[BlockHash] = field(default_factory=set)  # every block it stored or read

    def messages(self) -> list[ChatMessage]:
        """The whole conversation as the model sees it (system prompt first, if any)."""
        return ([ChatMessage("system", self.system)] if self.system else []) + self.conversation

    def with_cache(self, chain: tuple[BlockHash, ...] | None, **changes: Any) -> AgentRecord:
        """A copy with ``changes`` and the chain of blocks the cache just stored for this agent."""
        if chain is None:
            return replace(self, **changes, blocks=set(self.blocks))
        return replace(self, **changes, chain=chain, blocks=self.blocks | set(chain))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "id": self.id,
            "model": self.model,
            "system": self.system,
            "tools": [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in self.tools],
            "metadata": self.metadata,
            "conversation": [_message_json(m) for m in self.conversation],
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "turns": self.turns,
            "chain": [h.hex() for h in self.chain],
            "blocks": sorted(h.hex() for h in self.blocks),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentRecord:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} record")
        if not isinstance(data.get("id"), str) or not AGENT_ID.fullmatch(data["id"]):
            raise ValueError("bad agent id")
        if not all(math.isfinite(float(data[k])) for k in ("created_at", "last_used_at")):
            raise ValueError("bad times")
        return cls(
            id=data["id"],
            model=str(data["model"]),
            system=str(data.get("system", "")),
            tools=tuple(ToolSpec(str(t["name"]), str(t.get("description", "")), dict(t.get("parameters") or {})) for t in data.get("tools", ())),
            metadata={str(k): str(v) for k, v in dict(data.get("metadata") or {}).items()},
            conversation=[_message_of(m) for m in data.get("conversation", ())],
            created_at=float(data["created_at"]),
            last_used_at=float(data["last_used_at"]),
            turns=int(data.get("turns", 0)),
            chain=tuple(bytes.fromhex(h) for h in data.get("chain", ())),
            blocks={bytes.fromhex(h) for h in data.get("blocks", ())},
        )


def _message_json(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in m.tool_calls]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def _message_of(d: dict[str, Any]) -> ChatMessage:
    if d.get("role") not in ("user", "assistant", "tool"):
        raise ValueError("bad role")
    calls = tuple(ToolCall(str(c["id"]), str(c["name"]), str(c["arguments"])) for c in d.get("tool_calls", ()))
    call_id, name = d.get("tool_call_id"), d.get("name")
    if not isinstance(call_id, str | None) or not isinstance(name, str | None):
        raise ValueError("bad tool message")
    return ChatMessage(d["role"], str(d["content"]), calls, call_id, name)


class Turn:
    """An agent is busy from ``begin`` until ``end`` (idempotent: called by whichever of the
    handler, the stream or the stream's finaliser gets there first)."""

    def __init__(self, store: AgentStore, agent_id: str) -> None:
        self._store, self.agent_id = store, agent_id
        self._open = True

    def end(self) -> None:
        if self._open:
            self._open = False
            self._store._busy.discard(self.agent_id.lower())
            self._store._creating.discard(self.agent_id.lower())


class AgentStore:
    """Agents by id, at most ``limit``; persisted in ``folder`` (None: in memory only)."""

    def __init__(self, folder: Path | None, limit: int) -> None:
        self.folder = folder
        self.limit = limit
        self._agents: dict[str, AgentRecord] = {}
        self._busy: set[str] = set()  # lower-cased ids, as every id set here
        self._creating: set[str] = set()
        self._ids: set[str] = set()

    def load(self) -> int:
        """Read every record in the folder (blocking; at start-up). Returns how many."""
        if self.folder is None or not self.folder.is_dir():
            return 0
        for leftover in self.folder.glob(".writing-*"):
            leftover.unlink(missing_ok=True)
        for path in sorted(self.folder.glob("*.json")):
            try:
                record = AgentRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
                if path.stem != record.id or record.id.lower() in self._ids:
                    raise ValueError("file name and id differ")
            except Exception as e:  # whatever is in the file, the server starts
                log.warning("skipping unreadable agent record %s (%s)", path.name, type(e).__name__)
                continue
            self._agents[record.id] = record
            self._ids.add(record.id.lower())
        return len(self._agents)

    def __len__(self) -> int:
        return len(self._agents)

    def get(self, agent_id: str) -> AgentRecord:
        record = self._agents.get(agent_id)
        if record is None:
            raise RequestError(ErrorKind.NOT_FOUND, f"no agent {agent_id!r}")
        return record

    def all(self) -> list[AgentRecord]:
        return sorted(self._agents.values(), key=lambda r: r.created_at)

    def begin(self, agent_id: str, *, new: bool = False) -> Turn:
        """Mark the agent busy (409 if it is). ``new``: it must not exist yet, and there must be room."""
        key = agent_id.lower()
        if key in self._busy:
            raise RequestError(ErrorKind.CONFLICT, f"agent {agent_id!r} is busy with another request; retry when it is done")
        if new and (key in self._ids or key in self._creating):
            raise RequestError(ErrorKind.CONFLICT, f"agent {agent_id!r} exists already (ids are compared without case)")
        if new and len(self._agents) + len(self._creating) >= self.limit:
            raise RequestError(ErrorKind.CONFLICT, f"the server keeps at most {self.limit} agents; delete some first")
        self._busy.add(key)
        if new:
            self._creating.add(key)
        return Turn(self, agent_id)

    async def save(self, record: AgentRecord) -> None:
        """Write ``record``'s file, then keep it in memory; neither changes if the write fails
        (``RequestError``), and a client leaving meanwhile does not cut it in half."""
        text = json.dumps(record.to_json(), ensure_ascii=False)
        with trio.CancelScope(shield=True):
            if self.folder is not None:
                try:
                    await trio.to_thread.run_sync(self._write, record.id, text)
                except OSError as e:
                    log.error("saving agent %s failed: %s", record.id, type(e).__name__)
                    raise RequestError(ErrorKind.INTERNAL, "the agent could not be saved; nothing was changed") from None
            self._agents[record.id] = record
            self._ids.add(record.id.lower())

    async def remove(self, agent_id: str) -> None:
        """Delete the agent's file, then forget it; neither happens if the file cannot go."""
        with trio.CancelScope(shield=True):
            if self.folder is not None:
                path = self.folder / f"{agent_id}.json"
                try:
                    await trio.to_thread.run_sync(lambda: path.unlink(missing_ok=True))
                except OSError as e:
                    log.error("deleting agent %s failed: %s", agent_id, type(e).__name__)
                    raise RequestError(ErrorKind.INTERNAL, "the agent's file could not be deleted; nothing was changed") from None
            self._agents.pop(agent_id, None)
            self._ids.discard(agent_id.lower())

    def _write(self, agent_id: str, text: str) -> None:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".writing-", dir=self.folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / f"{agent_id}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
