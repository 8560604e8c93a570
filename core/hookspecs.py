"""The hooks plugins implement. Marker, project and entry-point group are all ``semantic``.

Every hook here is a registration hook: it is called once when the plugin manager is built, gets a
``register`` callback and calls it for each thing it provides. Hooks register things; they do no
I/O and hold no state. A plugin may implement any subset of them and may accept only some of the
arguments (pluggy passes what the implementation names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("semantic")


@hookspec
def register_stages(register: Callable[[type], None]) -> None:
    """Register pipeline stage classes.

    Called once at start-up. Call ``register(StageClass)`` for each
    :class:`semantic.stage.Stage` subclass; its ``name`` is the ``type:`` YAML uses, its
    ``Settings`` (a pydantic model) validates the stage's ``settings:``, and its ``takes``/``gives``
    types are checked against its neighbours when a pipeline loads. Returns nothing.
    """


@hookspec
def register_model_loaders(register: Callable[[Any], None]) -> None:
    """Register model loaders (onboarding of a model family or file format).

    Called once at start-up. Call ``register(LoaderSpec(name, load, options_model, ...))``;
    ``name`` is what YAML's ``model.plugin`` selects, ``options_model`` (pydantic) validates
    ``model.options``, and ``load(source, options, context)`` is later called on the MLX worker
    thread and returns a :class:`semantic.model.Model`. Returns nothing.
    """


@hookspec
def register_protocols(register: Callable[[Any], None]) -> None:
    """Register wire protocols (HTTP routes and their request/response mapping).

    Called once at start-up. Call ``register(ProtocolSpec(name, blueprint))``; when a pipeline's
    ``protocols:`` lists ``name``, ``blueprint(pipeline)`` is called once to build the Quart
    blueprint whose handlers turn requests into :class:`semantic.items.Incoming` items and the
    pipeline's events into responses and errors in the protocol's own format. Returns nothing.
    """


@hookspec
def register_eviction_policies(register: Callable[[Any], None]) -> None:
    """Register KV-cache eviction policies.

    Called once at start-up. Call ``register(PolicySpec(name, factory))``; YAML's
    ``eviction.policy`` selects one by name and ``factory()`` makes the policy object, whose
    ``priority(entry)`` orders cache entries: the lowest priority is evicted first.
    Returns nothing.
    """
