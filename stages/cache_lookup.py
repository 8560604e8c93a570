"""cache-lookup: find the longest cached prefix of the prompt so only the rest is prefilled."""

from __future__ import annotations

from semantic import hookimpl
from semantic.items import Tokenized
from semantic.stage import SAME, Stage


class CacheLookup(Stage):
    """Attaches the best cached KV state (own agent first, then any sharing the prefix)."""

    name = "cache-lookup"
    takes = Tokenized
    gives = SAME
    description = "Reuse of a kept KV cache whose tokens start the new prompt."

    async def process(self, item: Tokenized) -> Tokenized:
        store = self.context.store
        if store is None:
            return item
        match = store.lookup(item.agent_id, item.prompt_tokens)
        # At least one prompt token must be fed to the model to get the next token's logits.
        length = min(match.length, len(item.prompt_tokens) - 1) if match else 0
        metrics = self.context.metrics
        if length > 0:
            metrics.inc("cache_hits")
            metrics.inc("cache_hit_tokens", length)
            item.prefix, item.prefix_len = match.state, length
        else:
            metrics.inc("cache_misses")
        return item


@hookimpl
def register_stages(register):
    register(CacheLookup)
