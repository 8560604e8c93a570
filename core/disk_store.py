"""KV blocks on disk: one safetensors file per block, named by its chained hash. No MLX here.

A file holds the block's tensors (numpy arrays from the model's ``kv_to_arrays``) and, in its
metadata, the format, the model fingerprint and cache layout, the block's hash, parent hash, depth,
token ids and a SHA-256 checksum of the tensor bytes. Writes are atomic (temporary file, fsync,
rename). Reading checks everything — checksum, fingerprint, hash chain, tensor names, shapes and
dtypes — and a file that fails is moved to ``quarantine/`` and never used. Start-up rebuilds the
index from the files' headers only. Every method here does blocking file I/O: call it from a
worker thread (``trio.to_thread``), never from the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .block_pool import BlockHash, hash_block
from .eviction import EntryStats, EvictionPolicy

log = logging.getLogger(__name__)

FORMAT = "semantic-kv/1"
MAX_HEADER = 1 << 20


class CorruptBlock(ValueError):
    """A block file that must not be used."""


@dataclass(slots=True)
class DiskEntry:
    path: Path
    block_hash: BlockHash
    parent: BlockHash
    depth: int
    nbytes: int
    last_used: float
    uses: int = 0

    def stats(self) -> EntryStats:
        return EntryStats(self.block_hash.hex(), 0, self.nbytes, self.last_used, self.last_used, self.uses, depth=self.depth)


def _checksum(arrays: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(arrays[name].tobytes())
    return h.hexdigest()


def read_header(path: Path) -> dict[str, Any]:
    """The safetensors header (tensor table and ``__metadata__``) without reading the tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        size = _header_size(head)
        return _header_of(head + f.read(size))


def _header_size(head: bytes) -> int:
    if len(head) < 8:
        raise CorruptBlock("truncated header")
    (size,) = struct.unpack("<Q", head[:8])
    if not 0 < size <= MAX_HEADER:
        raise CorruptBlock(f"implausible header size {size}")
    return size


def _header_of(raw: bytes) -> dict[str, Any]:
    size = _header_size(raw)
    data = raw[8 : 8 + size]
    if len(data) != size:
        raise CorruptBlock("truncated header")
    try:
        header = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptBlock(f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise CorruptBlock("header is not a JSON object")
    return header


class DiskStore:
    """The block files of one model and cache layout, within a byte budget."""

    def __init__(
        self,
        root: Path,
        *,
        fingerprint: str,
        layout: str,
        block_tokens: int,
        shapes: dict[str, tuple[tuple[int, ...], str]],
        budget_bytes: int,
        policy: EvictionPolicy,
    ) -> None:
        self.root = Path(root)
        self.fingerprint = fingerprint
        self.layout = layout
        self.block_tokens = block_tokens
        self.shapes = shapes
        self.budget_bytes = budget_bytes
        self.policy = policy
        self.entries: dict[BlockHash, DiskEntry] = {}
        self.counters: dict[str, int] = {"disk_quarantined": 0, "disk_write_errors": 0, "disk_evictions": 0}
        self._lock = threading.RLock()  # entries are read in the event loop, changed in threads
        self._write_failed_logged = False

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.entries.values())

    def has(self, block_hash: BlockHash) -> bool:
        return block_hash in self.entries

    def parents(self, excluding: set[BlockHash]) -> set[BlockHash]:
        """Parent hashes of the blocks on disk, except those in ``excluding``."""
        with self._lock:
            return {e.parent for h, e in self.entries.items() if h not in excluding}

    def parent_of(self, block_hash: BlockHash) -> BlockHash | None:
        entry = self.entries.get(block_hash)
        return entry.parent if entry is not None else None

    def size_of(self, block_hash: BlockHash) -> int:
        """Bytes of the block's file (0 if it is not on disk)."""
        entry = self.entries.get(block_hash)
        return entry.nbytes if entry is not None else 0

    def path_of(self, block_hash: BlockHash) -> Path:
        return self.root / f"{block_hash.hex()}.safetensors"

    # --- start-up -----------------------------------------------------------------------------

    def scan(self, time_budget_s: float = 30.0) -> dict[str, float]:
        """Rebuild the index from file headers (bounded by ``time_budget_s``); report what it did."""
        start = time.monotonic()
        found = skipped = 0
        if self.root.is_dir():
            for leftover in self.root.glob(".writing-*"):  # a write cut short by a crash
                leftover.unlink(missing_ok=True)
            for path in self.root.glob("*.safetensors"):
                if time.monotonic() - start > time_budget_s:
                    skipped += 1
                    continue
                try:
                    meta = self._check_header(read_header(path), path)
                    stat = path.stat()
                    block_hash, parent = bytes.fromhex(meta["block_hash"]), bytes.fromhex(meta["parent_hash"])
                    entry = DiskEntry(path, block_hash, parent, int(meta["depth"]), stat.st_size, stat.st_mtime)
                except Exception as e:  # anything wrong with a file only costs that file
                    self._quarantine(path, f"{type(e).__name__}: {e}")
                    continue
                with self._lock:
                    self.entries[entry.block_hash] = entry
                found += 1
        return {"blocks": found, "bytes": self.nbytes, "seconds": time.monotonic() - start, "skipped": skipped}

    # --- write --------------------------------------------------------------------------------

    def write(self, block_hash: BlockHash, parent: BlockHash, depth: int, tokens: tuple[int, ...], arrays: dict[str, Any]) -> bool:
        """Write one block atomically; False (logged once, counted) when the disk refuses."""
        from safetensors.numpy import save

        if block_hash in self.entries:
            return True
        meta = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "block_tokens": str(self.block_tokens),
            "block_hash": block_hash.hex(),
            "parent_hash": parent.hex(),
            "depth": str(depth),
            "tokens": json.dumps(list(tokens)),
            "checksum": _checksum(arrays),
        }
        path = self.path_of(block_hash)
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            data = save(arrays, metadata=meta)
            fd, tmp = tempfile.mkstemp(prefix=".writing-", dir=self.root)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            self.counters["disk_write_errors"] += 1
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            if not self._write_failed_logged:
                log.error("cannot write KV blocks to %s (%s); serving from memory only", self.root, e.strerror or e)
                self._write_failed_logged = True
            return False
        with self._lock:
            self.entries[block_hash] = DiskEntry(path, block_hash, parent, depth, len(data), time.time())
        return True

    def enforce_budget(self, protect: frozenset[BlockHash] = frozenset()) -> int:
        """Delete files by eviction policy until within budget; returns how many went."""
        removed = 0
        with self._lock:
            total = self.nbytes
            if total <= self.budget_bytes:
                return 0
            order = sorted((e for h, e in self.entries.items() if h not in protect), key=lambda e: self.policy.priority(e.stats()))
            victims = []
            for entry in order:
                if total <= self.budget_bytes:
                    break
                total -= entry.nbytes
                victims.append(entry)
                del self.entries[entry.block_hash]
        for entry in victims:
            try:
                entry.path.unlink(missing_ok=True)
            except OSError as e:
                log.warning("cannot delete KV block file %s: %s", entry.path.name, e.strerror or e)
            removed += 1
        self.counters["disk_evictions"] += removed
        return removed

    # --- read ---------------------------------------------------------------------------------

    def read(self, block_hash: BlockHash) -> tuple[tuple[int, ...], dict[str, Any]] | None:
        """The block's tokens and arrays, fully checked; None (and quarantined) if it fails."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        entry = self.entries.get(block_hash)
        if entry is None:
            return None
        try:
            raw = entry.path.read_bytes()
        except OSError:  # gone (evicted meanwhile): a miss, not a corrupt file
            with self._lock:
                self.entries.pop(block_hash, None)
            return None
        try:
            meta = self._check_header(_header_of(raw), entry.path)
            if bytes.fromhex(meta["block_hash"]) != block_hash:
                raise CorruptBlock("file holds another block")
            arrays = load(raw)
            self._check_arrays(arrays)
            if _checksum(arrays) != meta["checksum"]:
                raise CorruptBlock("checksum mismatch")
            tokens = tuple(int(t) for t in json.loads(meta["tokens"]))
            if len(tokens) != self.block_tokens or hash_block(bytes.fromhex(meta["parent_hash"]), tokens) != block_hash:
                raise CorruptBlock("tokens do not match the block hash")
        except Exception as e:  # whatever is wrong with the file, it is never used
            self._quarantine(entry.path, f"{type(e).__name__}: {e}")
            with self._lock:
                self.entries.pop(block_hash, None)
            return None
        entry.uses += 1
        entry.last_used = time.time()
        try:
            os.utime(entry.path)
        except OSError:
            pass
        return tokens, arrays

    def remove(self, block_hash: BlockHash) -> None:
        with self._lock:
            entry = self.entries.pop(block_hash, None)
        if entry is not None:
            entry.path.unlink(missing_ok=True)

    # --- checks -------------------------------------------------------------------------------

    def _check_header(self, header: dict[str, Any], path: Path) -> dict[str, str]:
        meta = header.get("__metadata__") or {}
        if meta.get("format") != FORMAT:
            raise CorruptBlock(f"not a {FORMAT} file")
        if meta.get("fingerprint") != self.fingerprint or meta.get("layout") != self.layout:
            raise CorruptBlock("written for another model or cache layout")
        if meta.get("block_tokens") != str(self.block_tokens):
            raise CorruptBlock("written with another block size")
        if path.name != f"{meta.get('block_hash')}.safetensors":
            raise CorruptBlock("file name does not match its block hash")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        if set(tensors) != set(self.shapes):
            raise CorruptBlock("unexpected tensor names")
        for name, (shape, _dtype) in self.shapes.items():
            if tuple(tensors[name].get("shape", ())) != tuple(shape):
                raise CorruptBlock(f"tensor {name} has shape {tensors[name].get('shape')}, expected {list(shape)}")
        return meta

    def _check_arrays(self, arrays: dict[str, Any]) -> None:
        for name, (shape, dtype) in self.shapes.items():
            a = arrays.get(name)
            if a is None or tuple(a.shape) != tuple(shape) or str(a.dtype) != dtype:
                raise CorruptBlock(f"tensor {name} is not {dtype}{list(shape)}")

    def _quarantine(self, path: Path, reason: str) -> None:
        self.counters["disk_quarantined"] += 1
        log.warning("quarantined KV block file %s: %s", path.name, reason)
        target = self.root / "quarantine" / path.name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        except OSError:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                log.warning("cannot move or delete damaged KV block file %s", path.name)
