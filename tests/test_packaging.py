"""Packaging: one importable package ``semantic``, in editable and wheel installs alike."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SOURCE_DIRS = ("core", "stages", "plugins", "pipelines", "tests", "bench")
BARE = re.compile(r"^\s*(from|import)\s+(core|stages|plugins|pipelines)(\.|\s|$)", re.M)


def test_editable_install_exposes_only_semantic(tmp_path):
    import semantic
    import semantic.stages

    assert Path(semantic.__file__).parent.name == "core"
    assert Path(semantic.stages.__file__).parent.name == "stages"
    # From outside the repository (so the current folder is not on sys.path):
    probe = "import importlib.util as u; print([m for m in ('core', 'stages', 'plugins', 'pipelines') if u.find_spec(m)])"
    assert run(sys.executable, "-c", probe, cwd=tmp_path).stdout.strip() == "[]"


def test_no_source_file_imports_a_bare_module():
    offenders = [
        f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
        for d in SOURCE_DIRS
        for path in (ROOT / d).rglob("*.py")
        for m in BARE.finditer(path.read_text())
    ]
    assert offenders == []


def run(*cmd, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(tmp_path):
    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp_path / "dist", ROOT)
    (wheel,) = (tmp_path / "dist").glob("semantic-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert all(n.startswith(("semantic/", "semantic-")) for n in names), names
    for expected in ("semantic/__init__.py", "semantic/stages/decode.py", "semantic/plugins/gguf.py", "semantic/pipelines/default.yaml", "semantic/pipelines/claude-code.yaml", "semantic/skinny_gemm.c"):
        assert expected in names

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py, cli = venv / "bin" / "python", venv / "bin" / "semantic"
    run(py, "-m", "pip", "install", "-q", wheel)
    run(py, "-m", "pip", "install", "-q", "--no-deps", ROOT / "tests" / "plugin_pkg")
    assert "serve" in run(cli, "--help").stdout
    assert ": OK" in run(cli, "pipelines", "validate", "default", cwd=tmp_path).stdout
    assert ": OK" in run(cli, "pipelines", "validate", ROOT / "tests" / "pipelines" / "scripted.yaml", cwd=tmp_path).stdout
    listed = run(cli, "plugins", cwd=tmp_path).stdout
    assert "scripted" in listed and "system-prompt" in listed and "fifo" in listed  # loaded from the entry point
    probe = "import importlib.util as u, semantic; print(semantic.__file__); print([m for m in ('core','stages','plugins') if u.find_spec(m)])"
    out = run(py, "-c", probe, cwd=tmp_path).stdout.splitlines()
    assert "site-packages/semantic/__init__.py" in out[0] and out[1] == "[]"
