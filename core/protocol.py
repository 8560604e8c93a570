"""What a protocol plugin registers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """``blueprint(pipeline)`` builds the protocol's Quart blueprint for a running pipeline."""

    name: str
    blueprint: Callable[[Any], Any]
    description: str = ""
