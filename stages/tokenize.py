"""tokenize: render the chat with the model's template into token ids, and cap them."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import trio

from semantic import hookimpl
from semantic.errors import ErrorKind, RequestError
from semantic.items import Identified, Tokenized
from semantic.model import ChatMessage, Model, ToolSpec, conversation_prefix
from semantic.stage import Stage

log = logging.getLogger(__name__)


async def render(model: Model, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], *, prefix: bool = False) -> list[int]:
    """The prompt's token ids (with ``prefix``: only what every continuation of the conversation
    shares). A conversation the model's chat template refuses (roles that must alternate, a shape
    it does not know) is that request's 400, never a stage failure."""
    try:
        if prefix:
            return await trio.to_thread.run_sync(conversation_prefix, model.tokenizer, messages, tools)
        return await trio.to_thread.run_sync(model.tokenizer.encode_chat, messages, tools)
    except RequestError:
        raise
    except Exception as e:  # the template is the model's code: fail this request closed
        log.info("chat template refused a request: %s", type(e).__name__)
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise RequestError(ErrorKind.INVALID_REQUEST, f"the model's chat template cannot render this conversation: {reason}") from None


class Tokenize(Stage):
    """Applies the chat template; refuses prompts over the limit or the context window, and
    requests whose prompt plus (capped) ``max_tokens`` do not fit the window."""

    name = "tokenize"
    takes = Identified
    gives = Tokenized
    description = "Chat template and tokenizer of the model; prompt-token cap; output cap."

    async def process(self, item: Identified) -> Tokenized:
        model = self.context.model
        assert model is not None, "tokenize needs a loaded model"
        if item.raw_prompt is not None:
            tokens = await trio.to_thread.run_sync(model.tokenizer.encode, item.raw_prompt)
        else:
            tokens = await render(model, item.messages, item.tools, prefix=item.prefill_only)
            if not tokens:
                raise RequestError(ErrorKind.INVALID_REQUEST, "the chat template renders nothing to cache ahead for this conversation")
        limits = self.context.limits
        window = self.context.window()
        cap = min(limits.max_prompt_tokens, window - 1)
        if len(tokens) > cap:
            raise RequestError(ErrorKind.INVALID_REQUEST, f"prompt is too long: {len(tokens)} tokens > {cap} maximum")
        max_tokens = min(item.params.max_tokens, limits.max_output_tokens)
        if item.params.fit_context:
            max_tokens = min(max_tokens, window - len(tokens))
        if len(tokens) + max_tokens > window:
            # the form clients (Claude Code) parse to retry at once with a smaller max_tokens
            raise RequestError(
                ErrorKind.INVALID_REQUEST,
                f"input length and `max_tokens` exceed context limit: {len(tokens)} + {max_tokens} > {window}, "
                "decrease input length or `max_tokens` and try again",
            )
        params = replace(item.params, max_tokens=max_tokens)
        return item.advance(Tokenized, prompt_tokens=tuple(tokens), params=params)


@hookimpl
def register_stages(register):
    register(Tokenize)
