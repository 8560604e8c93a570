"""Building the plugin manager and the typed registry the rest of the code uses.

Built-in plugins are registered exactly like third-party ones: modules with ``@hookimpl``
functions. Third-party plugins load from the ``semantic`` entry-point group. After loading,
``check_pending()`` makes a misspelled hook implementation fail at start-up.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import PROJECT, hookspecs
from .eviction import PolicySpec
from .model import LoaderSpec
from .protocol import ProtocolSpec
from .stage import SAME, Stage

DEFAULT_PLUGINS: tuple[str, ...] = (
    "semantic.stages.identify",
    "semantic.stages.tokenize",
    "semantic.stages.cache_lookup",
    "semantic.stages.schedule",
    "semantic.stages.decode",
    "semantic.stages.persist",
    "semantic.plugins.gguf",
    "semantic.plugins.mlx_dir",
    "semantic.plugins.eviction",
    "semantic.plugins.anthropic",
    "semantic.plugins.openai",
    "semantic.plugins.agents",
)


class PluginError(RuntimeError):
    """A plugin registered something invalid, or two plugins claimed the same name."""


def plugin_manager(*, entry_points: bool = True, block: Iterable[str] = (), extra: Iterable[Any] = ()) -> pluggy.PluginManager:
    """Default plugins, then entry-point plugins (minus ``block``), then ``extra`` objects."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    blocked = set(block)
    for name in blocked:
        pm.set_blocked(name)
    for modname in DEFAULT_PLUGINS:
        if modname not in blocked:
            pm.register(importlib.import_module(modname), name=modname)
    if entry_points:
        pm.load_setuptools_entrypoints(PROJECT)
    for obj in extra:
        pm.register(obj)
    pm.check_pending()
    return pm


@dataclass
class Registry:
    """Everything the installed plugins registered, by name."""

    stages: dict[str, type[Stage]] = field(default_factory=dict)
    loaders: dict[str, LoaderSpec] = field(default_factory=dict)
    protocols: dict[str, ProtocolSpec] = field(default_factory=dict)
    policies: dict[str, PolicySpec] = field(default_factory=dict)

    @classmethod
    def from_plugins(cls, pm: pluggy.PluginManager | None = None) -> Registry:
        pm = pm or plugin_manager()
        reg = cls()
        pm.hook.register_stages(register=reg._adder("stage", reg.stages, Stage, _check_stage))
        pm.hook.register_model_loaders(register=reg._adder("model loader", reg.loaders, LoaderSpec))
        pm.hook.register_protocols(register=reg._adder("protocol", reg.protocols, ProtocolSpec))
        pm.hook.register_eviction_policies(register=reg._adder("eviction policy", reg.policies, PolicySpec))
        return reg

    @staticmethod
    def _adder(what: str, table: dict[str, Any], kind: type, check: Any = None) -> Any:
        def register(obj: Any) -> None:
            valid = issubclass(obj, kind) if isinstance(obj, type) and kind is Stage else isinstance(obj, kind)
            if not valid:
                raise PluginError(f"register_{what.replace(' ', '_')}s got {obj!r}, expected a {kind.__name__}")
            if check:
                check(obj)
            if obj.name in table:
                raise PluginError(f"two plugins register the {what} {obj.name!r}")
            table[obj.name] = obj

        return register


def _check_stage(cls: type[Stage]) -> None:
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise PluginError(f"stage class {cls.__qualname__} has no name")
    if not isinstance(cls.takes, type):
        raise PluginError(f"stage {name!r}: takes must be a class, got {cls.takes!r}")
    if cls.gives is not SAME and not isinstance(cls.gives, type):
        raise PluginError(f"stage {name!r}: gives must be a class or SAME, got {cls.gives!r}")
