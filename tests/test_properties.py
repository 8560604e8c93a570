"""Property tests (hypothesis) for the invariants the cache and streaming rely on."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from semantic.detokenize import IncrementalDecoder
from semantic.kv_store import KVStore, common_prefix_len
from semantic.model import KVState
from semantic.plugins.eviction import LFU, LRU
from semantic.stops import StopMatcher

tokens = st.lists(st.integers(0, 5), max_size=40)


@given(tokens, tokens)
def test_common_prefix_len_is_the_longest_common_prefix(a, b):
    n = common_prefix_len(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


@settings(max_examples=200)
@given(
    st.lists(st.tuples(st.sampled_from("abcde"), tokens.filter(bool)), max_size=20),
    tokens,
    st.sampled_from([LRU, LFU]),
    st.integers(1, 400),
)
def test_store_lookup_and_budget(puts, query, policy, budget):
    store = KVStore(budget, policy())
    latest: dict[str, tuple[int, ...]] = {}
    for agent, toks in puts:
        state = KVState(tuple(toks), None, 10 * len(toks))
        evicted = store.put(agent, state)
        latest[agent] = tuple(toks)
        for gone in evicted:
            latest.pop(gone, None)
        assert store.nbytes <= budget  # never over budget after a put
        assert {s.key for s in store.agents()} == set(latest)
    match = store.lookup("a", query)
    best = max((common_prefix_len(t, query) for t in latest.values()), default=0)
    if best == 0:
        assert match is None
    else:  # exactly the longest prefix any kept state shares with the query
        assert match.length == best and tuple(query[:best]) == match.state.tokens[:best]
        assert latest[match.agent_id] == match.state.tokens


@given(st.lists(st.text(alphabet="ab\n<>", max_size=6), max_size=12), st.lists(st.text(alphabet="ab\n<>", min_size=1, max_size=4), max_size=3))
def test_stop_matcher_cuts_at_the_first_stop_for_any_chunking(chunks, stops):
    m = StopMatcher(stops)
    emitted, hit = [], None
    for chunk in chunks:
        text, hit = m.push(chunk)
        emitted.append(text)
        if hit:
            break
    if not hit:
        emitted.append(m.flush())
    full = "".join(chunks)
    positions = [(full.find(s), s) for s in stops if s in full]
    if positions:
        at = min(p for p, _ in positions)
        assert "".join(emitted) == full[:at]
        assert hit is not None and full[at:].startswith(hit)
    else:
        assert "".join(emitted) == full and hit is None


@given(st.text(max_size=60))
def test_incremental_decoder_round_trips_utf8_bytes(text):
    data = text.encode("utf-8")

    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    d = IncrementalDecoder(decode)
    pieces = [d.add(b) for b in data]
    assert "".join(pieces) + d.flush() == text
    assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text
