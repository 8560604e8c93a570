"""Preloading an optimized BLAS on Linux: when, how, and that the re-executed server really has it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from semantic.blas import find_openblas, reexec_plan


def test_choice_and_platform(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    assert find_openblas({"SEMANTIC_BLAS": "reference"}, "linux") is None
    assert find_openblas({"SEMANTIC_BLAS": str(lib)}, "linux") == str(lib)
    assert find_openblas({"SEMANTIC_BLAS": str(tmp_path / "missing.so")}, "linux") is None
    assert find_openblas({"SEMANTIC_BLAS": str(lib)}, "darwin") is None  # Metal: nothing to do


def test_reexec_plan_prepends_the_library_once(tmp_path):
    lib = str(tmp_path / "libopenblas.so.0")
    open(lib, "wb").close()
    cmd, env = reexec_plan(["serve", "--port", "0"], {"SEMANTIC_BLAS": lib, "LD_PRELOAD": "/x/other.so"}, "linux")
    assert cmd[1:] == ["-m", "semantic.cli", "serve", "--port", "0"]
    assert env["LD_PRELOAD"] == f"{lib}:/x/other.so" and env["OPENBLAS_NUM_THREADS"]
    assert reexec_plan(["serve"], env, "linux") is None  # already preloaded: no loop
    assert reexec_plan(["serve"], {"SEMANTIC_BLAS": "reference"}, "linux") is None


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("cc"), reason="needs Linux and a C compiler")
def test_the_reexecuted_process_has_the_library_mapped(tmp_path):
    src = tmp_path / "stub.c"
    src.write_text("int semantic_blas_stub(void) { return 1; }\n")
    lib = tmp_path / "libopenblas.so.0"  # a stand-in: only its being mapped is checked
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    env = {**os.environ, "SEMANTIC_BLAS": str(lib)}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-m", "semantic.cli", "blas"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"preload: {lib}" in out.stdout and f"loaded: {lib}" in out.stdout
