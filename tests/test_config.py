"""Pipeline YAML: validation with every error located, the stage type chain, the JSON Schema."""

from __future__ import annotations

import json
import textwrap

import pytest

from semantic.cli import main
from semantic.config import ConfigError, json_schema, load_pipeline, parse_pipeline
from semantic.pipelines import shipped

GOOD = """\
name: t
model:
  plugin: gguf
  source: model.gguf
  name: m
protocols: [anthropic]
stages:
  - type: identify
  - type: tokenize
  - type: cache-lookup
  - type: schedule
  - type: decode
  - type: persist
"""


def issues_of(text: str, registry) -> list:
    with pytest.raises(ConfigError) as info:
        parse_pipeline(textwrap.dedent(text), "p.yaml", registry)
    return info.value.issues


def test_shipped_pipelines_validate(registry):
    names = shipped()
    assert {"default", "claude-code"} <= set(names)
    for path in names.values():
        config = load_pipeline(path, registry)
        assert [s.type for s in config.stages][-2:] == ["decode", "persist"]


def test_defaults_fill_in(registry):
    config = parse_pipeline(GOOD, "p.yaml", registry)
    assert config.server.host == "127.0.0.1"
    assert config.eviction.policy == "lru"
    assert config.model.options.dtype == "float32"  # the gguf loader's own options model
    assert config.stages[4].settings.emit_every == 1


def test_all_errors_reported_at_once_with_locations(registry):
    text = """\
    name: t
    model:
      plugin: gguff
      source: x
      name: m
    protocols: [anthropic, carrier-pigeon]
    stages:
      - type: identify
        settings:
          hash_messages: -3
      - type: tokenize
      - type: decode
        settings: {emit_every: 0, colour: red}
      - type: persist
    limits:
      max_queue_depth: 0
      max_prompt_tokens: lots
    server:
      port: 70000
    surprise: 1
    """
    issues = issues_of(text, registry)
    got = {(i.path, i.line, i.column) for i in issues}
    assert ("model.plugin", 3, 11) in got
    assert ("protocols[1]", 6, 24) in got
    assert ("stages[0].settings.hash_messages", 10, 22) in got
    assert ("stages[2].settings.emit_every", 13, 28) in got
    assert ("stages[2].settings.colour", 13, 31) in got
    assert ("limits.max_queue_depth", 16, 20) in got
    assert ("limits.max_prompt_tokens", 17, 22) in got
    assert ("server.port", 19, 9) in got
    assert ("surprise", 20, 1) in got
    assert len(issues) == 9
    assert all(i.file == "p.yaml" for i in issues)
    plugin = next(i for i in issues if i.path == "model.plugin")
    assert "gguff" in plugin.message and "gguf" in plugin.message
    assert str(plugin).startswith("p.yaml:3:11: model.plugin: ")


def test_missing_required_keys_point_at_their_mapping(registry):
    issues = issues_of("name: t\nmodel:\n  plugin: gguf\n  source: x\nprotocols: []\n", registry)
    by_path = {i.path: i for i in issues}
    assert by_path["model.name"].line == 3  # the mapping that lacks it
    assert "stages" in by_path and by_path["stages"].line == 1
    assert by_path["protocols"].line == 5


def test_mismatched_stage_chain_is_refused_naming_both_stages_and_types(registry):
    text = GOOD.replace("  - type: tokenize\n", "").replace("  - type: decode\n", "  - type: decode\n  - type: tokenize\n")
    issues = issues_of(text, registry)
    msgs = [i.message for i in issues]
    assert any("'identify' gives Identified" in m and "'cache-lookup' takes Tokenized" in m for m in msgs), msgs
    located = next(i for i in issues if "cache-lookup" in i.message)
    assert (located.path, located.line) == ("stages[1].type", 9)


def test_pipeline_must_end_in_generated_items(registry):
    text = GOOD.split("  - type: schedule")[0]
    issues = issues_of(text, registry)
    assert any("pipeline's end takes Generated" in i.message and "'cache-lookup' gives Tokenized" in i.message for i in issues)


def test_yaml_syntax_error_is_located(registry):
    issues = issues_of("name: t\nstages: [\n  - oops: {\n", registry)
    assert len(issues) == 1 and issues[0].message.startswith("YAML syntax error")
    assert issues[0].line >= 3


def test_duplicate_keys_are_errors(registry):
    issues = issues_of(GOOD + "name: again\n", registry)
    assert any(i.message == "duplicate key 'name'" and i.line == 14 for i in issues)


def test_not_a_mapping(registry):
    assert "must be a mapping" in issues_of("- just\n- a list\n", registry)[0].message


def test_json_schema_lists_installed_plugins(registry):
    schema = json_schema(registry)
    text = json.dumps(schema)
    for name in ("identify", "decode", "persist", "gguf", "anthropic", "lru", "lfu"):
        assert f'"{name}"' in text
    assert "system-prompt" in text and "scripted" in text and "fifo" in text  # the third-party plugin
    assert "emit_every" in text and "prefill_step" in text  # stage settings and loader options


def test_cli_validate_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("plugin: gguf", "plugin: nope").replace("[anthropic]", "[smtp]"))
    assert main(["pipelines", "validate", str(good), "default"]) == 0
    assert capsys.readouterr().out.count(": OK") == 2
    assert main(["pipelines", "validate", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "2 errors" in out and f"{bad}:3:11: model.plugin" in out and f"{bad}:6:" in out


def test_cli_schema_is_json(capsys):
    assert main(["pipelines", "schema"]) == 0
    assert json.loads(capsys.readouterr().out)["title"] == "semantic pipeline"
