"""Request and response shapes of the direct agent API (``/v1/agents``).

Unknown request fields are ignored. Agent ids are names, never paths: 1–128 characters of
letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AGENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
AGENT_ID_RULE = "agent ids are 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or digit"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ToolIn(_Open):
    """A tool the agent's model may call (its arguments as a JSON Schema)."""

    name: str = Field(min_length=1, max_length=256)
    description: str = Field("", max_length=65536)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class AgentCreate(_Open):
    """A new agent: its system prompt is prefilled and cached before the reply, so the first turn is warm."""

    id: str | None = Field(None, pattern=AGENT_ID.pattern, description="The agent's id (default: a new random one).")
    model: str | None = Field(None, min_length=1, description="A model name the pipeline answers to (default: its model).")
    system: str = Field("", description="The system prompt.")
    tools: list[ToolIn] = Field(default_factory=list, max_length=128)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] = Field(default_factory=dict, max_length=16)


class MessageIn(_Open):
    """A message to append: the user's, or a tool's result for a call the agent made."""

    role: Literal["user", "tool"] = "user"
    content: str
    tool_call_id: str | None = Field(None, max_length=256, description="For role tool: the call this answers.")
    name: str | None = Field(None, max_length=256, description="For role tool: the tool's name.")

    @model_validator(mode="after")
    def _tool_result_names_its_call(self) -> MessageIn:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self


Stop = Annotated[str, Field(max_length=256)] | Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=32)] | None


class TurnRequest(_Open):
    """One exchange: ``content`` (a user message) or ``messages`` (e.g. tool results) are appended
    to the agent's conversation with the reply, once the reply is complete."""

    content: str | None = Field(None, description="The user's message.")
    messages: list[MessageIn] | None = Field(None, min_length=1, max_length=256, description="Messages to append instead of content.")
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, description="Cap on generated tokens (default: as many as fit, up to the pipeline's limit).")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: Stop = None

    @model_validator(mode="after")
    def _one_input(self) -> TurnRequest:
        if (self.content is None) == (self.messages is None):
            raise ValueError("give exactly one of content and messages")
        return self

    def appended(self) -> list[MessageIn]:
        return [MessageIn(role="user", content=self.content)] if self.content is not None else list(self.messages or ())

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


# --- responses --------------------------------------------------------------------------------


class CacheOut(BaseModel):
    tokens: int = Field(description="Leading tokens of the agent's latest state a next turn reads from cache now.")
    memory_blocks: int = Field(description="Its blocks in the memory pool.")
    disk_blocks: int = Field(description="Its blocks on disk.")
    memory_bytes: int
    disk_bytes: int


class UsageOut(BaseModel):
    prompt_tokens: int
    cached_tokens: int = Field(description="Prompt tokens read from cache.")
    output_tokens: int
    cache_created_tokens: int = Field(description="Prompt tokens newly put in the cache.")


class AgentOut(BaseModel):
    id: str
    object: Literal["agent"] = "agent"
    model: str
    system: str
    tools: list[str] = Field(description="Names of the tools it may call.")
    metadata: dict[str, str]
    created_at: int = Field(description="Unix time.")
    last_used_at: int = Field(description="Unix time of its last turn (or creation).")
    turns: int
    messages: int = Field(description="Messages in its conversation (system prompt excluded).")
    cache: CacheOut
    prefill: UsageOut | None = Field(None, description="On creation: the system prompt's prefill.")


class AgentList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AgentOut]


class ToolCallOut(BaseModel):
    id: str
    name: str
    arguments: str = Field(description="JSON text of the arguments object.")


class ConversationMessage(BaseModel):
    role: Literal["user", "assistant", "tool"]
    content: str
    tool_calls: list[ToolCallOut] = Field(default_factory=list)
    tool_call_id: str | None = None
    name: str | None = None


class AgentDetail(AgentOut):
    conversation: list[ConversationMessage]


class FreedOut(BaseModel):
    memory_blocks: int
    disk_blocks: int
    memory_bytes: int
    disk_bytes: int
    shared_blocks_kept: int = Field(description="Blocks other agents use: kept.")


class AgentDeleted(BaseModel):
    id: str
    object: Literal["agent.deleted"] = "agent.deleted"
    deleted: Literal[True] = True
    freed: FreedOut


StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AgentReply(BaseModel):
    """The agent's reply to one exchange; it is now part of the conversation."""

    id: str
    object: Literal["agent.message"] = "agent.message"
    agent_id: str
    model: str
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[ToolCallOut]
    stop_reason: StopReason
    stop_sequence: str | None = None
    turn: int = Field(description="The agent's turn count, this one included.")
    usage: UsageOut


class ErrorDetail(BaseModel):
    type: str
    message: str
    request_id: str | None = None


class ErrorOut(BaseModel):
    """Every error of the agent API."""

    error: ErrorDetail
