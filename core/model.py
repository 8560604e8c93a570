"""What the engine needs from a loaded model, whatever plugin loaded it.

A model plugin (see ``register_model_loaders``) returns a :class:`Model`. Everything here except
:class:`Model.generate` and :class:`Generation` is plain Python that the event loop may call;
``generate`` and iterating a :class:`Generation` run only on the MLX worker thread.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .chat import ChatMessage, ToolCall, ToolSpec  # noqa: F401  (re-exported)
from .chat_format import HERMES, ChatFormat

if TYPE_CHECKING:
    from .batching import BatchEngine, BatchOptions


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    fit_context: bool = False  # max_tokens was not given: as many as fit the context (never an error)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """Facts about a loaded model that stages and protocols rely on.

    ``cache_layout`` describes the KV cache for the block pool, e.g.
    ``"full:30x3x64:float32"``; ``pageable`` says whether its KV can be cut into token blocks
    and joined again (every layer full attention). Models with sliding-window layers are not
    pageable: they get exact-match reuse only.
    """

    name: str
    fingerprint: str
    context_length: int
    kv_bytes_per_token: int
    family: str = "unknown"
    cache_layout: str = ""
    pageable: bool = False


@dataclass(slots=True)
class KVState:
    """A model's KV cache covering exactly ``tokens``; ``payload`` is the model's own object.

    Nothing outside the model that made it looks inside ``payload``. ``exclusive`` marks a state
    built for one request (joined from blocks): ``generate`` may adopt it instead of copying.
    """

    tokens: tuple[int, ...]
    payload: Any = None
    nbytes: int = 0
    exclusive: bool = False


@dataclass(frozen=True, slots=True)
class PendingJoin:
    """A :class:`KVState` payload still in pieces: (block payload, tokens of it used) from the
    cache. Decode joins it on the MLX worker when the sequence starts, in the same job as the
    step, so a warm request does not wait a whole decode step for a join of its own."""

    pieces: tuple[tuple[Any, int], ...]


def joined(model: Model, state: KVState | None) -> KVState | None:
    """``state`` with its pending join done (MLX worker only); other states as they are."""
    if state is None or not isinstance(state.payload, PendingJoin):
        return state
    return model.join_kv(list(state.payload.pieces), state.tokens)


class StreamDecoder(Protocol):
    """Turns token ids into text incrementally (multi-byte characters held until whole)."""

    def add(self, token: int) -> str:
        """Take one token, return the text that is now final."""

    def flush(self) -> str:
        """Return whatever text is still held back."""


class ChatTokenizer(Protocol):
    """The model's tokenizer and chat template."""

    eos_token_ids: frozenset[int]

    def encode_chat(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        """Render ``messages`` (and the ``tools`` the model may call) with the chat template into
        token ids: with the generation prompt added, or, when the last message is the
        assistant's, continuing that message (a prefilled reply)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, no special tokens added."""

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of ``tokens``."""

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder for one response."""


_PROBES = ("A", "Z")


def conversation_prefix(tokenizer: ChatTokenizer, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
    """The token ids every continuation of ``messages`` starts with: where the chat template's
    renderings of two different next user messages part. Caching these ahead (an agent's system
    prompt) makes the first real turn warm, whatever the template writes between turns."""
    a, b = (tokenizer.encode_chat([*messages, ChatMessage("user", probe)], tools) for probe in _PROBES)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]


class Generation(ABC):
    """One running generation: iterate for token ids; then ask for the KV state it left."""

    @abstractmethod
    def __iter__(self) -> Iterator[int]:
        """Yield generated token ids until the caller stops iterating (or max_tokens)."""

    @abstractmethod
    def kv_state(self) -> KVState | None:
        """The cache after generation: covers the prompt and the tokens fed back so far."""


class Model(ABC):
    """A loaded model. ``generate`` is called only on the MLX worker thread.

    ``chat_format`` says how this model family writes tool calls and reasoning in its text (the
    loader picks it); protocols use it to turn the text into tool-use and thinking blocks.
    """

    info: ModelInfo
    tokenizer: ChatTokenizer
    chat_format: ChatFormat = HERMES

    @abstractmethod
    def generate(
        self,
        prompt: Sequence[int],
        prefix: KVState | None,
        prefix_len: int,
        params: SamplingParams,
    ) -> Generation:
        """Start generating after ``prompt``, reusing the first ``prefix_len`` tokens of ``prefix``.

        ``prefix.tokens[:prefix_len] == prompt[:prefix_len]`` and ``prefix_len < len(prompt)``
        are guaranteed by the caller. ``prefix`` itself must not be modified: other requests may
        reuse it.
        """

    def batch_engine(self, options: BatchOptions) -> BatchEngine:
        """The engine decode batches this model's sequences with (on the MLX worker thread).

        The default interleaves :meth:`generate` streams one token per step; models that can run
        a real batch (one forward pass for all sequences) return their own engine.
        """
        from .batching import SequentialEngine

        return SequentialEngine(self, options)

    def close(self) -> None:
        """Release what the model holds (weights, buffers). Called on the MLX worker thread."""

    # --- block pool support (pageable models; all on the MLX worker thread) -------------------

    def split_kv(self, state: KVState, bounds: Sequence[tuple[int, int]]) -> list[Any]:
        """Independent copies of ``state``'s KV for each token range ``[start, stop)``."""
        raise TypeError(f"{type(self).__name__} does not support block caching")

    def join_kv(self, pieces: Sequence[tuple[Any, int]], tokens: Sequence[int]) -> KVState:
        """One exclusive KVState from block payloads, using the first ``n`` tokens of each."""
        raise TypeError(f"{type(self).__name__} does not support block caching")

    def kv_to_arrays(self, payload: Any) -> dict[str, Any]:
        """A block payload as named numpy arrays (for disk)."""
        raise TypeError(f"{type(self).__name__} does not support block caching")

    def kv_from_arrays(self, arrays: dict[str, Any]) -> Any:
        """The payload for named numpy arrays read back from disk (shapes already checked)."""
        raise TypeError(f"{type(self).__name__} does not support block caching")

    def block_shapes(self, block_tokens: int) -> dict[str, tuple[tuple[int, ...], str]]:
        """Name → (shape, dtype) every stored block of ``block_tokens`` tokens must have."""
        raise TypeError(f"{type(self).__name__} does not support block caching")


@dataclass(frozen=True, slots=True)
class LoadContext:
    """Where a loader is asked to load from: the YAML file's folder and the user's cache folder."""

    name: str
    base_dir: Any
    cache_dir: Any


@dataclass(frozen=True, slots=True)
class LoaderSpec:
    """A model loader a plugin registers: ``load(source, options, context)`` returns a Model.

    ``load`` runs on the MLX worker thread; ``context`` is a :class:`LoadContext`.

    ``options_model`` is the pydantic model the YAML ``model.options`` are validated with.
    """

    name: str
    load: Any
    options_model: Any = None
    description: str = ""
    extensions: tuple[str, ...] = field(default=())
