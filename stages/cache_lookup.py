"""cache-lookup: find the longest cached prefix of the prompt so only the rest is prefilled."""

from __future__ import annotations

from semantic import hookimpl
from semantic.items import Tokenized
from semantic.stage import SAME, Stage


class CacheLookup(Stage):
    """Joins the longest cached prefix (memory blocks, disk blocks, the agent's tail) into the
    request's starting KV state, and reserves pool blocks for the tokens it will add."""

    name = "cache-lookup"
    takes = Tokenized
    gives = SAME
    description = "Longest cached prefix from the block pool (memory, then disk); block reservation."

    async def process(self, item: Tokenized) -> Tokenized:
        cache, worker = self.context.cache, self.context.worker
        if cache is not None and worker is not None:
            await cache.prepare(item, worker)
        return item


@hookimpl
def register_stages(register):
    register(CacheLookup)
