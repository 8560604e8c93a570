"""KV blocks on disk: atomic files, every kind of corruption detected, budget, unwritable disks."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import trio

from semantic.block_pool import hash_blocks, root_hash
from semantic.disk_store import DiskStore
from semantic.harness import incoming, run_stage, stage_context
from semantic.items import Generated, Tokenized
from semantic.model import KVState, joined
from semantic.plugins.eviction import LRU
from semantic.stages.cache_lookup import CacheLookup
from semantic.stages.persist import Persist

BT = 4
SHAPES = {"tokens": ((BT,), "int64")}
ROOT = root_hash("fp", str(BT), "scripted")


def store(path, **kw) -> DiskStore:
    args = {"fingerprint": "fp", "layout": "scripted", "block_tokens": BT, "shapes": SHAPES, "budget_bytes": 1 << 20, "policy": LRU()}
    return DiskStore(path, **{**args, **kw})


def put(disk: DiskStore, tokens):
    hashes = hash_blocks(ROOT, tokens, BT)
    for i, h in enumerate(hashes):
        block = tuple(tokens[i * BT : (i + 1) * BT])
        assert disk.write(h, hashes[i - 1] if i else ROOT, i, block, {"tokens": np.array(block, dtype=np.int64)})
    return hashes


def test_round_trip_and_index_rebuild(tmp_path):
    disk = store(tmp_path)
    hashes = put(disk, list(range(12)))
    tokens, arrays = disk.read(hashes[1])
    assert tokens == (4, 5, 6, 7) and arrays["tokens"].tolist() == [4, 5, 6, 7]
    assert not list(tmp_path.glob(".writing-*"))  # no temporary file left behind
    (tmp_path / ".writing-abc").write_bytes(b"half a file")  # a crash mid-write leaves one: never read
    again = store(tmp_path)
    report = again.scan()
    assert report["blocks"] == 3 and set(again.entries) == set(hashes) and report["seconds"] >= 0
    assert again.read(hashes[2])[0] == (8, 9, 10, 11)


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-5])


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_flip_last_byte, "checksum"),
        (_truncate, ""),
        (lambda p: p.write_bytes(b"\x00" * 3), "truncated"),
        (lambda p: p.write_bytes(b"\xff" * 64), "implausible"),
    ],
)
def test_damaged_files_are_quarantined_and_never_used(tmp_path, caplog, damage, needle):
    disk = store(tmp_path)
    hashes = put(disk, list(range(8)))
    damage(disk.path_of(hashes[0]))
    with caplog.at_level(logging.WARNING):
        assert disk.read(hashes[0]) is None
    assert not disk.has(hashes[0]) and disk.counters["disk_quarantined"] == 1
    assert (tmp_path / "quarantine" / disk.path_of(hashes[0]).name).exists()
    assert needle in caplog.text
    assert disk.read(hashes[1]) is not None  # the others are fine


def test_files_of_another_model_or_shape_are_refused(tmp_path):
    other = store(tmp_path / "other", fingerprint="another-model")
    hashes = put(other, list(range(4)))
    wrong_shape = store(tmp_path / "shape", shapes={"tokens": ((BT * 2,), "int64")})
    os.makedirs(tmp_path / "mine")
    os.replace(other.path_of(hashes[0]), tmp_path / "mine" / other.path_of(hashes[0]).name)
    mine = store(tmp_path / "mine")
    assert mine.scan()["blocks"] == 0 and mine.counters["disk_quarantined"] == 1  # swapped model: refused
    put(store(tmp_path / "shape"), list(range(4)))
    assert wrong_shape.scan()["blocks"] == 0 and wrong_shape.counters["disk_quarantined"] == 1


def test_tokens_must_match_the_hash(tmp_path):
    disk = store(tmp_path)
    (h,) = hash_blocks(ROOT, [1, 2, 3, 4], BT)
    disk.write(h, ROOT, 0, (9, 9, 9, 9), {"tokens": np.array([1, 2, 3, 4], dtype=np.int64)})
    assert disk.read(h) is None and disk.counters["disk_quarantined"] == 1


def test_budget_evicts_by_policy(tmp_path):
    disk = store(tmp_path)
    hashes = put(disk, list(range(16)))
    size = disk.entries[hashes[0]].nbytes
    disk.budget_bytes = 2 * size
    disk.read(hashes[0])  # recently used: kept
    assert disk.enforce_budget() == 2
    assert hashes[0] in disk.entries and len(disk.entries) == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_unwritable_disk_is_logged_once_and_counted(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    disk = store(blocker / "kv")
    with caplog.at_level(logging.ERROR):
        put_ok = [disk.write(h, ROOT, 0, (1, 2, 3, 4), {"tokens": np.zeros(BT, dtype=np.int64)}) for h in (b"a" * 16, b"b" * 16)]
    assert put_ok == [False, False] and disk.counters["disk_write_errors"] == 2
    assert caplog.text.count("serving from memory only") == 1


# --- through the stages: persist writes, a fresh cache finds the blocks on disk -------------------


def _tokenized(tokens, agent="a"):
    return incoming("x").advance(Tokenized, agent_id=agent, prompt_tokens=tuple(tokens))


def _finished(item, output=()):
    tokens = item.prompt_tokens + tuple(output)
    return item.advance(Generated, stop_reason="end_turn", output_tokens=len(output), kv_state=KVState(tokens, tokens, 100 * len(tokens)))


def _disk_for(model, path):
    return DiskStore(
        path,
        fingerprint=model.info.fingerprint,
        layout=model.info.cache_layout,
        block_tokens=BT,
        shapes=model.block_shapes(BT),
        budget_bytes=1 << 20,
        policy=LRU(),
    )


def test_blocks_written_by_persist_are_found_after_a_restart(scripted, tmp_path):
    model = scripted()
    prompt = list(range(30, 45))  # 3 full blocks of the 14 usable tokens, and a tail

    async def first_life():
        async with stage_context(model=model, block_tokens=BT, disk=_disk_for(model, tmp_path)) as ctx:
            (item,) = await run_stage(CacheLookup(None, ctx), [_tokenized(prompt)])
            await run_stage(Persist(None, ctx), [_finished(item, output=(7,))])  # closing drains the writer
            return ctx.metrics.counters

    async def second_life(damage=None):
        disk = _disk_for(model, tmp_path)
        disk.scan()
        if damage:
            damage(disk)
        async with stage_context(model=model, block_tokens=BT, disk=disk) as ctx:
            (item,) = await run_stage(CacheLookup(None, ctx), [_tokenized([*prompt, 1, 2], agent="new")])
            item.request.cancel()
            item.prefix = await ctx.worker.call(joined, model, item.prefix)  # as decode does when it starts
            return item, ctx

    counters = trio.run(first_life)
    assert counters["cache_disk_bytes"] > 0 and counters["disk_write_errors"] == 0
    item, ctx = trio.run(second_life)
    # blocks [30-33] [34-37] [38-41] match; the fourth stored block was [42, 43, 44, 7]
    assert item.prefix_len == 12 and item.prefix.payload == tuple(prompt[:12])
    assert ctx.metrics.counters["cache_disk_hit_blocks"] == 3 and ctx.cache.pool.num_cached == 3

    def corrupt_second_block(disk):
        h = hash_blocks(ctx.cache.root, prompt, BT)[1]
        _flip_last_byte(disk.path_of(h))

    item, ctx = trio.run(second_life, corrupt_second_block)
    assert item.prefix_len == 4  # the chain stops at the damaged block; the rest is prefilled
    assert ctx.metrics.counters["cache_disk_corrupt"] == 1 and ctx.cache.disk.counters["disk_quarantined"] == 1


def _crafted(header: object) -> bytes:
    import json as _json
    import struct as _struct

    data = _json.dumps(header).encode()
    return _struct.pack("<Q", len(data)) + data


@pytest.mark.parametrize(
    "content",
    [
        _crafted([1, 2, 3]),  # not an object
        _crafted({"__metadata__": {"format": "semantic-kv/1", "fingerprint": "fp", "layout": "scripted", "block_tokens": "4", "block_hash": "zz"}}),
        _crafted({"__metadata__": "nonsense"}),
        b"",
    ],
)
def test_crafted_files_cost_only_themselves(tmp_path, content):
    disk = store(tmp_path)
    good = put(disk, list(range(4)))
    (tmp_path / ("ab" * 16 + ".safetensors")).write_bytes(content)
    again = store(tmp_path)
    assert again.scan()["blocks"] == 1 and again.counters["disk_quarantined"] == 1
    assert again.read(good[0]) is not None


def test_tampered_tokens_are_refused_on_read(tmp_path):
    disk = store(tmp_path)
    (h,) = put(disk, [1, 2, 3, 4])
    path = disk.path_of(h)
    raw = path.read_bytes().replace(b"[1, 2, 3, 4]", b'["a", 2, 3, 4]')
    path.write_bytes(raw)
    assert disk.read(h) is None and disk.counters["disk_quarantined"] == 1


def test_forgetting_an_agent_frees_its_own_blocks_and_keeps_chains_that_others_continue(scripted, tmp_path):
    model = scripted()
    mine = list(range(30, 43))  # 3 full blocks, and a tail
    theirs = [*mine[:12], *range(60, 69)]  # the same 3 blocks, then 2 of its own

    async def first_life():
        async with stage_context(model=model, block_tokens=BT, disk=_disk_for(model, tmp_path)) as ctx:
            for prompt, agent in ((mine, "a"), (theirs, "b")):
                (item,) = await run_stage(CacheLookup(None, ctx), [_tokenized(prompt, agent)])
                await run_stage(Persist(None, ctx), [_finished(item)])
            return ctx.cache.chains["a"], ctx.cache.chains["b"]

    chain_a, chain_b = trio.run(first_life)
    assert chain_b[:3] == chain_a and len(chain_b) == 5

    async def second_life():  # after a restart: the blocks are on disk only, with no owners
        disk = _disk_for(model, tmp_path)
        disk.scan()
        async with stage_context(model=model, block_tokens=BT, disk=disk) as ctx:
            kept_for_b = await ctx.cache.forget("a", chain_a)
            files_after_a = len(disk.entries)
            freed_b = await ctx.cache.forget("b", chain_b)
            return kept_for_b, files_after_a, freed_b, len(disk.entries), list(tmp_path.glob("*.safetensors"))

    kept_for_b, files_after_a, freed_b, files_left, on_disk = trio.run(second_life)
    # b's blocks continue from a's last block: a's whole chain stays, or b's would be unreachable
    assert kept_for_b.disk_blocks == 0 and kept_for_b.shared_blocks_kept == 3 and files_after_a == 5
    assert freed_b.disk_blocks == 5 and freed_b.disk_bytes > 0 and files_left == 0 and on_disk == []
