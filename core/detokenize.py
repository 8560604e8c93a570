"""Incremental detokenization that never emits half a character."""

from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalDecoder:
    """Emit text as tokens arrive, holding back bytes that do not yet form a character.

    Decodes a short window (``prefix:read``) rather than the whole response, so each step costs
    O(window), and tokenizers whose pieces depend on their neighbours (leading-space markers) still
    come out right.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, token: int) -> str:
        self._ids.append(token)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]
