"""Record what the real Claude Code CLI sends, into ``tests/fixtures/claude_code/*.json``.

Run ``python tests/record_claude_code.py [--model NAME] [scenario ...]``. Each fixture is
``{"claude_code_version", "scenario", "model", "turns": [{"args", "returncode", "seconds",
"stdout", "stderr"}], "requests": [{"turn", "method", "path", "reply", "headers", "body"}]}``
where ``stdout`` is the CLI's ``--output-format json`` result and ``reply`` says what the
Recorder answered. The CLI runs in a fixed throwaway project (a git repo with one commit) and
``HOME`` under the temp dir, so system prompts differ between runs only in dates and ids.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from claude_code import CLAUDE_CODE_VERSION, Recorder, Reply, install_claude_code, run_claude  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "claude_code"
BASE = Path(tempfile.gettempdir()) / "semantic-claude-code"
#: An unrecognized model name, as a local server would advertise: max_tokens 32000, effort high.
MODEL = "claude-test-1"
OVERFLOW = "input length and `max_tokens` exceed context limit: 1000 + 32000 > 8192"


def make_project() -> tuple[Path, Path]:
    """A fresh, deterministic project (git repo, fixed names, dates and author) and HOME."""
    shutil.rmtree(BASE, ignore_errors=True)
    home, project = BASE / "home", BASE / "project"
    project.mkdir(parents=True)
    home.mkdir()
    (project / "README.md").write_text("# demo\n\nA tiny project for recording Claude Code requests.\n")
    (project / "hello.py").write_text('print("hello")\n')
    git_env = {**os.environ, "HOME": str(home), "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "test@example.com",
               "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "test@example.com",
               "GIT_AUTHOR_DATE": "2025-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2025-01-01T00:00:00Z"}
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "."], ["git", "commit", "-q", "-m", "Initial commit"]):
        subprocess.run(cmd, cwd=project, env=git_env, check=True)
    return home, project


def record(binary: Path, name: str, turns: list[list[str]], replies: list[Reply], model: str,
           setup: Callable[[Path], None] | None = None) -> dict:
    """Run ``turns`` (CLI args each) in one project against a Recorder; write and return the fixture."""
    home, project = make_project()
    if setup:
        setup(project)
    out: dict = {"claude_code_version": CLAUDE_CODE_VERSION, "scenario": name, "model": model, "cwd": str(project),
                 "turns": [], "requests": []}
    with Recorder(replies) as rec:
        for i, args in enumerate(turns):
            args = [*args, "--output-format", "json", "--model", model]
            seen = len(rec.requests)
            start = time.monotonic()
            proc = run_claude(binary, rec.url, args, home=home, cwd=project)
            try:
                stdout = json.loads(proc.stdout)
            except ValueError:
                stdout = proc.stdout
            out["turns"].append({"args": args, "returncode": proc.returncode,
                                 "seconds": round(time.monotonic() - start, 2), "stdout": stdout,
                                 "stderr": proc.stderr})
            out["requests"] += [{"turn": i, **r.to_json()} for r in rec.requests[seen:]]
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{name}.json"
    path.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(ROOT)}: {len(out['requests'])} requests, {path.stat().st_size // 1024} KB, "
          f"turns took {[t['seconds'] for t in out['turns']]} s, exit {[t['returncode'] for t in out['turns']]}")
    return out


def three_turns(extra: list[str]) -> list[list[str]]:
    return [["-p", "say hello", *extra], ["--continue", "-p", "and now say goodbye", *extra],
            ["--continue", "-p", "one more", *extra]]


def big_file(project: Path) -> None:
    """A file large enough (~30 KB) that the Read tool asks count_tokens before returning it."""
    (project / "big.txt").write_text("".join(f"line {i:04d} of a file that is long enough to be counted\n"
                                             for i in range(520)))


SCENARIOS: dict[str, Callable[[Path, str], dict]] = {
    "session_tools": lambda b, m: record(b, "session_tools", three_turns([]),
                                         [Reply(text="Hello!"), Reply(text="Goodbye!"), Reply(text="One more.")], m),
    "session_no_tools": lambda b, m: record(
        b, "session_no_tools", three_turns(["--tools", "", "--system-prompt", "You are terse."]),
        [Reply(text="Hello!"), Reply(text="Goodbye!"), Reply(text="One more.")], m),
    "tool_round_trip": lambda b, m: record(
        b, "tool_round_trip", [["-p", "run echo hi", "--allowedTools", "Bash"]],
        [Reply(tool="Bash", input={"command": "echo hi", "description": "Print hi"}), Reply(text="It printed hi.")], m),
    "max_tokens_retry": lambda b, m: record(
        b, "max_tokens_retry", [["-p", "say hello", "--tools", ""]],
        [Reply(status=400, error=OVERFLOW), Reply(text="Hello!")], m),
    "read_count_tokens": lambda b, m: record(
        b, "read_count_tokens", [["-p", "read big.txt", "--tools", "Read"]],
        [Reply(tool="Read", input={"file_path": str(BASE / "project" / "big.txt")}), Reply(text="Read it.")], m,
        setup=big_file),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: all of {', '.join(SCENARIOS)}")
    parser.add_argument("--model", default=MODEL)
    opts = parser.parse_args()
    if unknown := set(opts.scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    binary = install_claude_code(ROOT)
    print(f"{binary.relative_to(ROOT)}: Claude Code {CLAUDE_CODE_VERSION}")
    for name in opts.scenarios or SCENARIOS:
        SCENARIOS[name](binary, opts.model)
    shutil.rmtree(BASE, ignore_errors=True)


if __name__ == "__main__":
    main()
