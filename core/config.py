"""Pipeline definitions: the YAML format, its pydantic models, and located validation errors.

The fixed part of the format is declared here; the parts that plugins provide (stage types and
their settings, model loaders and their options, protocol and eviction-policy names) are added by
:func:`config_model` from the registry, so the JSON Schema and validation always match what is
installed. Every problem in a file is reported at once, each with file, line, column and key path.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from .items import Generated, Incoming
from .stage import SAME

if TYPE_CHECKING:
    from .plugin_manager import Registry


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsConfig(_Strict):
    """Hard caps, enforced before anything is allocated for a request."""

    max_request_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Largest request body accepted.")
    max_prompt_tokens: int = Field(8192, ge=1, description="Longest prompt accepted, in tokens.")
    max_output_tokens: int = Field(4096, ge=1, description="Cap on generated tokens per request.")
    max_queue_depth: int = Field(64, ge=1, description="Requests waiting to be scheduled; more are refused.")
    max_concurrent_sessions: int = Field(32, ge=1, description="Agents with requests in flight at once.")
    max_agents: int = Field(1024, ge=0, description="Agents the direct agent API keeps (/v1/agents); creating more is refused.")


class CacheConfig(_Strict):
    """KV-cache budgets."""

    memory_mb: float = Field(1024, ge=0, description="Memory for kept KV caches, in MB.")
    block_tokens: int = Field(256, ge=16, le=4096, description="Tokens per cache block.")
    disk_dir: str | None = Field(None, description="Folder for persisted caches (default: user cache dir).")
    disk_mb: float = Field(8192, ge=0, description="Disk budget for persisted caches, in MB.")


class ServerConfig(_Strict):
    host: str = Field("127.0.0.1", description="Address to bind; loopback unless told otherwise.")
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[Annotated[str, Field(min_length=8)]] = Field(
        default_factory=list,
        description="If set, requests must carry one of these keys (x-api-key or Authorization: Bearer); else 401.",
    )


class EvictionConfigBase(_Strict):
    policy: str = "lru"


class SamplingDefaults(_Strict):
    """Sampling for requests that do not set it themselves (Claude Code sends no temperature)."""

    temperature: float | None = Field(None, ge=0, le=2, description="Default temperature (the protocol's own default otherwise).")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)


class ModelConfigBase(_Strict):
    plugin: str = Field(description="Model loader (registered by a plugin), e.g. gguf.")
    source: str = Field(description="Path (relative to this file) or pkg:PACKAGE/PATH of the model.")
    name: str = Field(min_length=1, description="Name the model is served as.")
    aliases: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Other names (glob patterns) clients may ask for; default: every name. Others get 404.",
    )
    context_window: int | None = Field(
        None,
        ge=16,
        description="Context window reported to clients and enforced, when smaller than the model's "
        "(Claude Code then compacts its conversation in time).",
    )
    options: dict[str, Any] = Field(default_factory=dict)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)

    def accepts(self, requested: str) -> bool:
        return requested == self.name or any(fnmatch.fnmatchcase(requested, p) for p in self.aliases)


class StageConfigBase(_Strict):
    type: str
    settings: dict[str, Any] = Field(default_factory=dict)


class PipelineConfig(_Strict):
    """The plugin-independent shape; :func:`config_model` narrows the plugin-provided parts."""

    name: str = Field(min_length=1)
    description: str = ""
    model: ModelConfigBase
    protocols: list[str] = Field(min_length=1)
    stages: list[StageConfigBase] = Field(min_length=1)
    eviction: EvictionConfigBase = Field(default_factory=EvictionConfigBase)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    server: ServerConfig = Field(default_factory=ServerConfig)


def _tagged_union(variants: list[type[BaseModel]], tag: str) -> Any:
    if len(variants) == 1:
        return variants[0]
    return Annotated[Union[tuple(variants)], Field(discriminator=tag)]  # noqa: UP007


def config_model(registry: Registry) -> type[PipelineConfig]:
    """The pipeline model for what is installed: stage settings and loader options per name."""
    stage_variants = [
        create_model(
            f"Stage_{name.replace('-', '_')}",
            __base__=StageConfigBase,
            __doc__=cls.description or cls.__doc__,
            type=(Literal[name], ...),
            settings=(cls.Settings, Field(default_factory=cls.Settings)),
        )
        for name, cls in sorted(registry.stages.items())
    ]
    model_variants = [
        create_model(
            f"Model_{name.replace('-', '_')}",
            __base__=ModelConfigBase,
            __doc__=spec.description or None,
            plugin=(Literal[name], ...),
            options=(spec.options_model, Field(default_factory=spec.options_model))
            if spec.options_model
            else (dict[str, Any], Field(default_factory=dict)),
        )
        for name, spec in sorted(registry.loaders.items())
    ]
    protocol_names = Literal[tuple(sorted(registry.protocols))] if registry.protocols else str
    policy_names = Literal[tuple(sorted(registry.policies))] if registry.policies else str
    eviction = create_model("EvictionConfig", __base__=EvictionConfigBase, policy=(policy_names, "lru"))
    return create_model(
        "Pipeline",
        __base__=PipelineConfig,
        __doc__="A semantic pipeline definition.",
        model=(_tagged_union(model_variants, "plugin"), ...),
        protocols=(list[protocol_names], Field(min_length=1)),
        stages=(list[_tagged_union(stage_variants, "type")], Field(min_length=1)),
        eviction=(eviction, Field(default_factory=eviction)),
    )


def json_schema(registry: Registry) -> dict[str, Any]:
    """JSON Schema of the pipeline format for the installed plugins."""
    schema = config_model(registry).model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "semantic pipeline"
    return schema


# --- errors with locations -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a pipeline file."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class ConfigError(ValueError):
    """A pipeline definition with problems; ``issues`` lists all of them."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _path_text(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


class _Locator:
    """Maps a key path in the loaded data back to the YAML node (line, column) it came from."""

    def __init__(self, file: str, root: yaml.Node | None) -> None:
        self.file = file
        self.root = root

    def issue(self, loc: tuple[Any, ...], message: str, *, at_key: bool = False) -> Issue:
        node, clean, missing = self._walk(loc, at_key=at_key)
        mark = node.start_mark if node is not None else None
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        if missing is not None:
            message = f"{message} (in the mapping that starts here)" if message == "Field required" else message
        return Issue(self.file, line, col, _path_text(clean), message)

    def _walk(self, loc: tuple[Any, ...], *, at_key: bool = False) -> tuple[yaml.Node | None, tuple[Any, ...], Any]:
        node, clean = self.root, ()
        for i, part in enumerate(loc):
            if isinstance(node, yaml.MappingNode):
                for key, value in node.value:
                    if key.value == str(part):
                        last = i == len(loc) - 1
                        node, clean = (key if at_key and last else value), (*clean, part)
                        break
                else:
                    if self._is_tag(node, part):
                        continue  # a discriminated union's tag: not a key in the file
                    return node, (*clean, *loc[i:]), part
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node, clean = node.value[part], (*clean, part)
            else:
                return node, (*clean, *loc[i:]), None
        return node, clean, None

    @staticmethod
    def _is_tag(node: yaml.MappingNode, part: Any) -> bool:
        return any(k.value in ("type", "plugin") and getattr(v, "value", None) == part for k, v in node.value)

    def key_node(self, loc: tuple[Any, ...], key: str) -> tuple[Any, ...]:
        """``loc + (key,)`` when the mapping at ``loc`` has ``key`` (to point at it), else ``loc``."""
        node, _, _ = self._walk(loc)
        if isinstance(node, yaml.MappingNode) and any(k.value == key for k, _ in node.value):
            return (*loc, key)
        return loc


def _duplicate_keys(node: yaml.Node | None, loc: tuple[Any, ...] = ()) -> list[tuple[yaml.Node, tuple[Any, ...], str]]:
    found: list[tuple[yaml.Node, tuple[Any, ...], str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            if key.value in seen:
                found.append((key, (*loc, key.value), f"duplicate key {key.value!r}"))
            seen.add(key.value)
            found += _duplicate_keys(value, (*loc, key.value))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            found += _duplicate_keys(value, (*loc, i))
    return found


def _pydantic_message(err: dict[str, Any]) -> str:
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return f"unknown {ctx.get('discriminator', 'tag').strip(chr(39))} {ctx.get('tag')!r}; installed: {ctx.get('expected_tags')}"
    if err["type"] == "literal_error":
        return f"{err['msg']} (got {err.get('input')!r})"
    return str(err["msg"])


def stage_chain_issues(stages: list[Any], registry: Registry, locate: Any) -> list[Issue]:
    """Check that each stage's output type is accepted by the next stage's input type."""
    issues: list[Issue] = []
    current, prev_name = Incoming, "the protocol"
    for i, entry in enumerate(stages):
        name = entry.get("type") if isinstance(entry, dict) else None
        cls = registry.stages.get(name) if isinstance(name, str) else None
        if cls is None:
            return issues  # already reported as an unknown type; nothing to check past it
        if not issubclass(current, cls.takes):
            issues.append(
                locate(
                    ("stages", i, "type"),
                    f"stage {prev_name!r} gives {current.__name__} but stage {name!r} takes {cls.takes.__name__}",
                )
            )
            current = cls.takes if cls.gives is SAME else cls.gives
        else:
            current = current if cls.gives is SAME else cls.gives
        prev_name = name
    if stages and not issubclass(current, Generated):
        issues.append(
            locate(
                ("stages", len(stages) - 1, "type"),
                f"the last stage {prev_name!r} gives {current.__name__} but the pipeline's end takes {Generated.__name__}",
            )
        )
    return issues


def load_pipeline(path: str | Path, registry: Registry) -> PipelineConfig:
    """Read, validate and type-check a pipeline file; raise :class:`ConfigError` with every issue."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([Issue(str(path), 1, 1, "", f"cannot read: {e.strerror or e}")]) from e
    return parse_pipeline(text, str(path), registry)


def parse_pipeline(text: str, file: str, registry: Registry) -> PipelineConfig:
    """Validate pipeline YAML ``text`` (named ``file`` in messages)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise ConfigError([Issue(file, line, col, "", f"YAML syntax error: {e.problem or e}")]) from e
    locator = _Locator(file, root)
    if not isinstance(data, dict):
        raise ConfigError([Issue(file, 1, 1, "", "a pipeline file must be a mapping (name:, model:, stages:, ...)")])

    issues = [
        Issue(file, node.start_mark.line + 1, node.start_mark.column + 1, _path_text(loc), msg)
        for node, loc, msg in _duplicate_keys(root)
    ]
    model = config_model(registry)
    config: PipelineConfig | None = None
    try:
        config = model.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            if err["type"] == "union_tag_invalid":
                loc = locator.key_node(loc, err.get("ctx", {}).get("discriminator", "").strip("'"))
            issues.append(locator.issue(loc, _pydantic_message(err), at_key=err["type"] == "extra_forbidden"))
    stages = data.get("stages")
    if isinstance(stages, list):
        issues += stage_chain_issues(stages, registry, locator.issue)
    if issues:
        issues.sort(key=lambda i: (i.line, i.column))
        raise ConfigError(issues)
    assert config is not None
    return config
