"""Claude Code against `semantic serve`: recorded sessions replayed turn by turn (warm cache),
and the real CLI (npm `@anthropic-ai/claude-code`, installed here) in `-p` mode.

The recordings in fixtures/claude_code/ were made from the installed CLI by
`tests/record_claude_code.py`; nothing here writes a Claude Code request by hand.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import ROOT, ServerProcess

TESTS = Path(__file__).parent
RECORDED = TESTS / "fixtures" / "claude_code"

SCRIPT = [
    {"when": "<tool_response>", "reply": "The command printed: {last}"},
    {"when": "run echo hi", "reply": '<tool_call>\n{"name": "Bash", "arguments": {"command": "echo hi", "description": "Print hi"}}\n</tool_call>'},
    {"when": "say hello", "reply": "Hello!"},
    {"when": "goodbye", "reply": "Goodbye!"},
]


def scripted_pipeline(tmp_path: Path) -> str:
    """The scripted model with room for Claude Code's ~50K-byte prompts (one token a byte)."""
    data = yaml.safe_load((TESTS / "pipelines" / "scripted.yaml").read_text())
    data["model"]["options"] = {"reply": "OK.", "script": SCRIPT, "context_length": 262144}
    data["stages"] = [s for s in data["stages"] if s["type"] != "system-prompt"]
    data["cache"].update(memory_mb=64, block_tokens=256)
    data["limits"].update(max_prompt_tokens=200000, max_output_tokens=256, max_request_bytes=4 * 1024 * 1024)
    path = tmp_path / "claude-code-scripted.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def sse_usage(body: str) -> dict:
    usage = {}
    for chunk in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        if lines.get("event") == "message_delta":
            usage = json.loads(lines["data"])["usage"]
    return usage


def replay(url: str, recording: dict, *, edit=None) -> list[dict]:
    """Send a recording's main requests in order, as recorded (headers included); usage per turn."""
    out = []
    for r in recording["requests"]:
        if not r["path"].startswith("/v1/messages?") or r["body"].get("max_tokens", 0) <= 1:
            continue
        body = edit(r["body"]) if edit else r["body"]
        headers = {k: v for k, v in r["headers"].items() if k.startswith(("anthropic-", "x-claude-code"))}
        resp = httpx.post(url + r["path"], json=body, headers=headers, timeout=120)
        assert resp.status_code == 200, resp.text
        out.append(sse_usage(resp.text))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(scripted_pipeline(tmp_path_factory.mktemp("cc")))
    yield s
    assert s.stop() == 0, "".join(s.output)


def test_a_recorded_session_is_warm_from_turn_two(server):
    recording = json.loads((RECORDED / "session_tools.json").read_text())
    turns = replay(server.url, recording)
    assert len(turns) == 3
    prompts = [u["input_tokens"] + u["cache_read_input_tokens"] for u in turns]
    assert turns[0]["cache_read_input_tokens"] == 0 and prompts[0] > 40_000  # the full Claude Code prompt, cold
    for prev, now, usage in zip(prompts, prompts[1:], turns[1:]):
        # turn N+1 extends turn N: all of turn N's prompt (and more) comes from the block pool
        assert usage["cache_read_input_tokens"] >= prev, (prev, usage)
        assert usage["cache_read_input_tokens"] / now >= 0.99
        assert usage["cache_creation_input_tokens"] > 0


def test_another_session_with_another_billing_line_shares_the_prompt_prefix(start_server, tmp_path):
    server = start_server(scripted_pipeline(tmp_path))  # an empty cache
    recording = json.loads((RECORDED / "session_no_tools.json").read_text())
    first = replay(server.url, recording)
    assert first[0]["cache_read_input_tokens"] == 0

    def other_session(body: dict) -> dict:
        body = json.loads(json.dumps(body))
        assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
        body["system"][0]["text"] = body["system"][0]["text"].replace("cc_version=", "cc_version=9.9.9.zzz-")
        return body

    again = replay(server.url, recording, edit=other_session)
    # a new session, same system prompt and first message: cached from its first turn
    assert again[0]["cache_read_input_tokens"] >= 0.95 * (again[0]["input_tokens"] + again[0]["cache_read_input_tokens"])


def test_recorded_count_tokens_and_tool_round_trip_requests_are_served(server):
    for name in ("read_count_tokens.json", "tool_round_trip.json", "max_tokens_retry.json"):
        for r in json.loads((RECORDED / name).read_text())["requests"]:
            resp = httpx.post(server.url + r["path"], json=r["body"], timeout=120)
            assert resp.status_code == 200, (name, resp.text)
            if "count_tokens" in r["path"]:
                assert resp.json()["input_tokens"] > 1000


# --- the real CLI ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def claude():
    from claude_code import install_claude_code

    try:
        return install_claude_code(ROOT)
    except (OSError, subprocess.CalledProcessError) as e:  # no npm registry: a setup failure, not a skip
        pytest.fail(f"could not install the Claude Code CLI: {e}")


def run(claude, url: str, tmp_path: Path, *args: str) -> dict:
    from claude_code import run_claude

    project = tmp_path / "project"
    project.mkdir(exist_ok=True)
    out = run_claude(claude, url, [*args, "--output-format", "json", "--model", "claude-test-1"], home=tmp_path / "home", cwd=project)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def test_claude_code_runs_a_tool_and_reads_its_result(claude, server, tmp_path):
    result = run(claude, server.url, tmp_path, "-p", "run echo hi", "--allowedTools", "Bash")
    assert result["is_error"] is False and result["num_turns"] >= 2
    # the scripted model called Bash; the CLI ran `echo hi` and sent its output back
    assert result["result"] == "The command printed: <tool_response>\nhi\n</tool_response>"


def test_claude_code_continues_a_session_warm(claude, server, tmp_path):
    first = run(claude, server.url, tmp_path, "-p", "say hello")
    assert first["result"] == "Hello!"
    second = run(claude, server.url, tmp_path, "--continue", "-p", "and now say goodbye")
    assert second["result"] == "Goodbye!" and second["session_id"] == first["session_id"]
    third = run(claude, server.url, tmp_path, "--continue", "-p", "one more")
    assert third["result"] == "OK."
    for turn in (second, third):
        usage = turn["usage"]
        assert usage["cache_read_input_tokens"] / (usage["cache_read_input_tokens"] + usage["input_tokens"]) >= 0.95, usage


def test_claude_code_gets_an_answer_from_the_embedded_model(claude, start_server, tmp_path):
    from semantic.pipelines import shipped

    data = yaml.safe_load(shipped()["claude-code"].read_text())
    data["model"]["sampling"] = {"temperature": 0}  # Claude Code sends none; greedy makes the answer known
    for key in ("context_length", "rope_scaling"):  # this prompt is short: the model as trained
        data["model"]["options"].pop(key)
    data["cache"]["disk_mb"] = 0
    (tmp_path / "cc.yaml").write_text(yaml.safe_dump(data))
    server = start_server(str(tmp_path / "cc.yaml"))
    question = "What is the capital of France? Answer in one word."
    result = run(claude, server.url, tmp_path, "-p", question, "--tools", "", "--system-prompt", "You answer in one word.")
    # the CLI showed the model's own answer (what a 135M model answers is not what is tested)
    assert result["is_error"] is False and result["result"].strip() and result["num_turns"] == 1
    assert result["usage"]["output_tokens"] > 0 and result["usage"]["input_tokens"] > 100


def test_the_content_based_agent_id_is_stable_across_turns_and_billing_lines():
    from types import SimpleNamespace

    from semantic.plugins.anthropic.schema import MessagesRequest, to_chat
    from semantic.stages.identify import content_agent_id

    recording = json.loads((RECORDED / "session_tools.json").read_text())
    bodies = [r["body"] for r in recording["requests"] if r["path"].startswith("/v1/messages?")]
    other = json.loads(json.dumps(bodies[0]))
    other["system"][0]["text"] = "x-anthropic-billing-header: cc_version=2.1.330.999; cc_entrypoint=sdk-cli;"
    for hash_messages in (0, 1):
        ids = {content_agent_id(SimpleNamespace(model=b["model"], messages=to_chat(MessagesRequest.model_validate(b))), hash_messages) for b in [*bodies, other]}
        assert len(ids) == 1


def test_the_installed_cli_still_sends_what_was_recorded(claude, tmp_path):
    """Record one turn live: our request model takes it, and its system prompt and tools are
    the ones the committed recording (replayed above) has — so the fixtures are current."""
    from claude_code import Recorder, run_claude

    from semantic.plugins.anthropic.schema import MessagesRequest, to_chat, tools_of

    project = tmp_path / "project"
    project.mkdir()
    with Recorder(default_text="Hello!") as rec:
        out = run_claude(claude, rec.url, ["-p", "say hello", "--model", "claude-test-1"], home=tmp_path / "home", cwd=project)
    assert out.returncode == 0, out.stdout + out.stderr
    (live,) = rec.messages()
    recording = json.loads((RECORDED / "session_tools.json").read_text())
    recorded = next(r for r in recording["requests"] if r["path"] == live.path)
    req = MessagesRequest.model_validate(live.body)
    assert to_chat(req)[0].role == "system" and len(tools_of(req)) == len(recorded["body"]["tools"])
    assert [t["name"] for t in live.body["tools"]] == [t["name"] for t in recorded["body"]["tools"]]
    def texts(body: dict, home: str, cwd: str) -> list[str]:  # the prompt names the memory folder of HOME and cwd
        slug = re.sub(r"[^A-Za-z0-9]", "-", cwd)
        return [b["text"].replace(home, "HOME").replace(slug, "CWD").replace(cwd, "CWD") for b in body["system"][1:]]

    cwd = recording["cwd"]
    assert texts(live.body, str(tmp_path / "home"), str(project)) == texts(recorded["body"], str(Path(cwd).parent / "home"), cwd)
    assert {k for k in live.body if k != "messages"} == {k for k in recorded["body"] if k != "messages"}
