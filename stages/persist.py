"""persist: keep the finished request's KV cache so the agent's next turn starts warm."""

from __future__ import annotations

from semantic import hookimpl
from semantic.items import Generated
from semantic.stage import SAME, Stage


class Persist(Stage):
    """Stores the request's KV state as its agent's entry (memory only for now)."""

    name = "persist"
    takes = Generated
    gives = SAME
    description = "Keeps each agent's last KV cache in memory, within the cache budget."

    async def process(self, item: Generated) -> Generated:
        store, state = self.context.store, item.kv_state
        if store is None or state is None or not state.tokens:
            return item
        reused = item.prefix_len if item.prefix is not None else 0
        evicted = store.put(item.agent_id, state)
        metrics = self.context.metrics
        metrics.inc("evictions", len(evicted))
        metrics.counters["cache_bytes"] = store.nbytes
        if item.agent_id not in evicted:
            item.cache_created_tokens = max(0, min(len(state.tokens), len(item.prompt_tokens)) - reused)
        item.kv_state = None  # the store owns it now; the rest of the pipeline must not hold it
        return item


@hookimpl
def register_stages(register):
    register(Persist)
