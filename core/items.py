"""The typed items that flow between stages.

Each stage declares the item type it takes and the one it gives; the loader checks that they
connect. Later items extend earlier ones, so a stage that takes ``Incoming`` accepts any of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from .model import ChatMessage, KVState, SamplingParams, ToolSpec
from .request import RequestHandle

T = TypeVar("T", bound="Incoming")


@dataclass(slots=True, kw_only=True)
class Incoming:
    """A request as a protocol hands it to the pipeline (already parsed and size-checked)."""

    request: RequestHandle
    protocol: str
    model: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    tools: tuple[ToolSpec, ...] = ()
    raw_prompt: str | None = None  # a plain-text prompt (no chat template); ``messages`` then hold it as one user message
    agent_hint: str | None = None
    request_bytes: int = 0
    prefill_only: bool = False  # cache what every continuation of ``messages`` shares; no reply wanted

    def advance(self, cls: type[T], **fields: Any) -> T:
        """This item as the next stage's type ``cls``, with ``fields`` added or replaced."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return cls(**{**own, **fields})


@dataclass(slots=True, kw_only=True)
class Identified(Incoming):
    """The agent this request belongs to is known and the request passed the limits."""

    agent_id: str
    explicit_agent: bool = False


@dataclass(slots=True, kw_only=True)
class Tokenized(Identified):
    """The prompt is tokenized; ``prefix`` is a cached KV state covering ``prefix_len`` of it
    (after cache-lookup its payload may still be a :class:`~semantic.model.PendingJoin`)."""

    prompt_tokens: tuple[int, ...]
    prefix: KVState | None = None
    prefix_len: int = 0
    cache_blocks: Any = None  # pool blocks reserved for this request's new tokens


@dataclass(slots=True, kw_only=True)
class Generated(Tokenized):
    """Generation ended; ``kv_state`` is the cache it left (for persist)."""

    stop_reason: str
    output_tokens: int
    stop_sequence: str | None = None
    kv_state: KVState | None = None
    cache_created_tokens: int = 0
