"""The plugin manager: built-ins and entry points through the same hooks, mistakes fail at start-up."""

from __future__ import annotations

import pluggy
import pytest

from semantic import hookimpl
from semantic.eviction import PolicySpec
from semantic.plugin_manager import DEFAULT_PLUGINS, PluginError, Registry, plugin_manager
from semantic.stage import Stage


def test_builtins_and_the_entry_point_plugin_are_registered(registry):
    assert set(registry.stages) >= {"identify", "tokenize", "cache-lookup", "schedule", "decode", "persist", "system-prompt"}
    assert set(registry.loaders) >= {"gguf", "mlx-lm", "scripted"}
    assert set(registry.protocols) >= {"anthropic"}
    assert set(registry.policies) >= {"lru", "lfu", "fifo"}
    pm = plugin_manager()
    dists = {dist.project_name for _, dist in pm.list_plugin_distinfo()}
    assert "semantic-scripted" in dists  # loaded from the `semantic` entry-point group
    assert all(pm.get_plugin(name) is not None for name in DEFAULT_PLUGINS)


def test_entry_point_plugins_can_be_left_out():
    reg = Registry.from_plugins(plugin_manager(entry_points=False))
    assert "scripted" not in reg.loaders and "gguf" in reg.loaders
    reg = Registry.from_plugins(plugin_manager(block=["scripted"]))
    assert "scripted" not in reg.loaders


def test_a_misspelled_hook_fails_at_start_up():
    class Typo:
        @hookimpl
        def register_stage(self, register):  # the hook is register_stages
            pass

    with pytest.raises(pluggy.PluginValidationError, match="register_stage"):
        plugin_manager(extra=[Typo()])


def test_two_plugins_cannot_claim_one_name():
    class Again:
        @hookimpl
        def register_eviction_policies(self, register):
            register(PolicySpec("lru", object))

    with pytest.raises(PluginError, match="two plugins register the eviction policy 'lru'"):
        Registry.from_plugins(plugin_manager(extra=[Again()]))


def test_registered_stages_must_declare_types():
    class Nameless(Stage):
        takes = int

    class BadGives(Stage):
        name = "bad-gives"
        gives = "Tokenized"

    for cls, message in ((Nameless, "has no name"), (BadGives, "gives must be a class or SAME")):

        class Plugin:
            @hookimpl
            def register_stages(self, register, cls=cls):
                register(cls)

        with pytest.raises(PluginError, match=message):
            Registry.from_plugins(plugin_manager(extra=[Plugin()]))


def test_registering_the_wrong_kind_of_object_is_refused():
    class Wrong:
        @hookimpl
        def register_model_loaders(self, register):
            register("gguf")

    with pytest.raises(PluginError, match="expected a LoaderSpec"):
        Registry.from_plugins(plugin_manager(extra=[Wrong()]))
