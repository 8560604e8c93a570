"""A third-party semantic plugin, installed through the ``semantic`` entry-point group.

It adds:

* model loader ``scripted``: a deterministic model with a byte-level tokenizer whose reply is
  chosen by script rules on the last turn, a fixed text, or an echo of the last user message
  (tool calls and reasoning are just text in the family's format); no MLX, so protocol tests
  and Claude Code sessions run fast;
* stage ``system-prompt``: puts a system message in front of requests that have none;
* eviction policy ``fifo``: the oldest cache entry goes first.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from semantic import hookimpl
from semantic.detokenize import IncrementalDecoder
from semantic.eviction import EntryStats, PolicySpec
from semantic.items import Incoming
from semantic.chat_format import HERMES, HERMES_THINK
from semantic.model import ChatMessage, Generation, KVState, LoaderSpec, Model, ModelInfo, SamplingParams, ToolSpec
from semantic.stage import SAME, NoSettings, Stage

EOS, START, END = 0, 1, 2
MLX_THREAD = "semantic-mlx"  # models run only on the engine's MLX worker thread; checked here


def _on_worker_thread() -> None:
    name = threading.current_thread().name
    if name != MLX_THREAD:
        raise AssertionError(f"model used on thread {name!r}, not the MLX worker")
OFFSET = 3  # token id of byte b is b + OFFSET


class ScriptedTokenizer:
    eos_token_ids = frozenset({EOS})

    def encode(self, text: str) -> list[int]:
        return [b + OFFSET for b in text.encode("utf-8")]

    def decode(self, tokens: Sequence[int]) -> str:
        return bytes(t - OFFSET for t in tokens if t >= OFFSET).decode("utf-8", errors="replace")

    def encode_chat(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        if any("refuse-to-render" in m.content for m in messages):  # like a template's raise_exception
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant")
        if tools or any(m.tool_calls or m.role == "tool" for m in messages):
            messages = HERMES.render(messages, tools)  # no native tool template: the generic format
        out: list[int] = []
        for m in messages:
            out += [START, *self.encode(f"{m.role}\n{m.content}"), END]
        if messages and messages[-1].role == "assistant":  # continue a prefilled reply
            return out[:-1]
        return out + [START, *self.encode("assistant\n")]

    def stream_decoder(self) -> IncrementalDecoder:
        return IncrementalDecoder(self.decode)


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    when: str = Field(description="Substring of the last turn (everything after the last assistant turn).")
    reply: str


class ScriptedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reply: str | None = Field(None, description="Fixed reply; default: echo the last user message.")
    script: list[Rule] = Field(
        default_factory=list,
        description="Replies chosen by the prompt: the first rule whose 'when' occurs in the last turn's text "
        "wins; '{last}' in a reply is replaced by that text. Before 'reply'.",
    )
    thinks: bool = Field(False, description="Use the <think> reasoning format (for thinking-block tests).")
    fail_on: str | None = Field(None, description="Raise inside generation when the prompt contains this.")
    fail_during: str | None = Field(None, description="Raise after the first token when the prompt contains this.")
    token_delay_s: float = Field(0.0, ge=0, description="Sleep per generated token (worker thread).")
    prefill_delay_s: float = Field(0.0, ge=0, description="Sleep before the first token (a long prefill).")
    context_length: int = Field(4096, ge=16)


@dataclass
class _Gen(Generation):
    model: ScriptedModel
    prompt: list[int]
    reply: list[int]
    params: SamplingParams

    def __post_init__(self) -> None:
        self.fed: list[int] = []
        self.started: float | None = None  # monotonic time of the first and the last step
        self.ended: float | None = None

    def __iter__(self) -> Iterator[int]:
        _on_worker_thread()
        self.started = time.monotonic()
        time.sleep(self.model.options.prefill_delay_s)
        fail = self.model.options.fail_during
        for token in self.reply[: self.params.max_tokens]:
            if self.model.options.token_delay_s:
                time.sleep(self.model.options.token_delay_s)
            if fail and self.fed and fail in self.model.tokenizer.decode(self.prompt):
                raise RuntimeError("scripted failure during generation")
            self.fed.append(token)
            self.ended = time.monotonic()
            yield token

    def kv_state(self) -> KVState:
        _on_worker_thread()
        tokens = tuple(self.prompt + self.fed)
        # the "KV data" of a scripted model is the token ids themselves: joins can be checked
        return KVState(tokens, tokens, len(tokens) * self.model.info.kv_bytes_per_token)


def _last_turn(prompt: list[int], tokenizer: ScriptedTokenizer) -> str:
    """The user messages after the last assistant message (the new turn or tool results)."""
    messages, current = [], None
    for t in prompt:
        if t == START:
            current = []
        elif t == END and current is not None:
            messages.append(tokenizer.decode(current))
            current = None
        elif current is not None:
            current.append(t)
    last = max((i for i, m in enumerate(messages) if m.startswith("assistant\n")), default=-1)
    return "\n".join(m.split("\n", 1)[-1] for m in messages[last + 1 :] if not m.startswith("system\n"))


class ScriptedModel(Model):
    def __init__(self, name: str, options: ScriptedOptions) -> None:
        self.options = options
        self.tokenizer = ScriptedTokenizer()
        self.chat_format = HERMES_THINK if options.thinks else HERMES
        self.info = ModelInfo(
            name, f"scripted:{options.reply!r}", options.context_length, 100, "scripted", cache_layout="scripted", pageable=True
        )
        self.calls: list[tuple[int, int]] = []  # (prompt length, reused prefix length) per generate
        self.generations: list[_Gen] = []

    def generate(self, prompt, prefix, prefix_len, params) -> Generation:
        _on_worker_thread()
        prompt = list(prompt)
        if prefix is not None and (
            list(prefix.tokens[:prefix_len]) != prompt[:prefix_len] or list(prefix.payload[:prefix_len]) != prompt[:prefix_len]
        ):
            raise AssertionError("cache prefix does not match the prompt")
        if prefix_len >= len(prompt):
            raise AssertionError("no prompt token left to prefill")
        text = self.tokenizer.decode(prompt)
        if self.options.fail_on and self.options.fail_on in text:
            raise RuntimeError("scripted failure")
        self.calls.append((len(prompt), prefix_len if prefix is not None else 0))
        last = _last_turn(prompt, self.tokenizer)
        reply = next((r.reply.replace("{last}", last.strip()) for r in self.options.script if r.when in last), None)
        if reply is None:
            reply = self.options.reply
        if reply is None:
            last_user = text.rsplit("user\n", 1)[-1].split("assistant\n")[0]
            reply = f"You said: {last_user}"
        gen = _Gen(self, prompt, [*self.tokenizer.encode(reply), EOS], params)
        self.generations.append(gen)
        return gen


    # block pool support: a block's payload is its token ids

    def split_kv(self, state, bounds):
        _on_worker_thread()
        return [tuple(state.payload[a:b]) for a, b in bounds]

    def join_kv(self, pieces, tokens):
        _on_worker_thread()
        data = tuple(t for payload, n in pieces for t in payload[:n])
        return KVState(tuple(tokens[: len(data)]), data, len(data) * self.info.kv_bytes_per_token, exclusive=True)

    def kv_to_arrays(self, payload):
        import numpy as np

        _on_worker_thread()
        return {"tokens": np.array(payload, dtype=np.int64)}

    def kv_from_arrays(self, arrays):
        _on_worker_thread()
        return tuple(int(t) for t in arrays["tokens"])

    def block_shapes(self, block_tokens):
        return {"tokens": ((block_tokens,), "int64")}


def load_scripted(source: str, options: ScriptedOptions, context) -> ScriptedModel:
    return ScriptedModel(context.name, options)


class SystemPromptSettings(NoSettings):
    text: str = Field(min_length=1, description="System message for requests without one.")


class SystemPrompt(Stage):
    """Puts a system message in front of requests that have none."""

    name = "system-prompt"
    takes = Incoming
    gives = SAME
    Settings = SystemPromptSettings

    async def process(self, item: Incoming) -> Incoming:
        if not any(m.role == "system" for m in item.messages):
            item.messages = (ChatMessage("system", self.settings.text), *item.messages)
        return item


class FIFO:
    def priority(self, entry: EntryStats) -> float:
        return entry.created


@hookimpl
def register_stages(register):
    register(SystemPrompt)


@hookimpl
def register_model_loaders(register):
    register(LoaderSpec("scripted", load_scripted, ScriptedOptions, "deterministic scripted model (tests)"))


@hookimpl
def register_eviction_policies(register):
    register(PolicySpec("fifo", FIFO, "Evict the oldest cache first."))
