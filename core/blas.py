"""An optimized BLAS on Linux, when the machine has one.

MLX's Linux CPU wheel links a slow reference BLAS; preloading OpenBLAS makes prefill about ten
times faster (see docs). The library must be preloaded before the process starts, so ``semantic
serve`` re-executes itself once with ``LD_PRELOAD`` set. ``SEMANTIC_BLAS`` chooses: ``auto``
(default: use OpenBLAS if installed), ``reference`` (never preload), or a path to a
``libopenblas.so``. Debian/Ubuntu: ``apt-get install libopenblas0-pthread``.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ENV = "SEMANTIC_BLAS"
_KNOWN = tuple(
    f"/usr/lib/{arch}-linux-gnu/{sub}libopenblas.so.0"
    for arch in ("x86_64", "aarch64")
    for sub in ("openblas-pthread/", "")
) + ("/usr/lib64/libopenblas.so.0", "/usr/lib/libopenblas.so.0")


def find_openblas(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> str | None:
    """The OpenBLAS library to preload, or None (not Linux, turned off, or not installed)."""
    choice = env.get(ENV, "auto")
    if platform != "linux" or choice == "reference":
        return None
    if choice != "auto":
        return choice if Path(choice).is_file() else None
    for path in _KNOWN:
        if Path(path).is_file():
            return path
    return ctypes.util.find_library("openblas")


def reexec_plan(argv: Sequence[str], env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment to re-execute with OpenBLAS preloaded, or None if not needed."""
    lib = find_openblas(env, platform)
    if lib is None or lib in env.get("LD_PRELOAD", "").split(":"):
        return None
    new_env = dict(env)
    new_env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    new_env.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
    return [sys.executable, "-m", "semantic.cli", *argv], new_env


def ensure_preloaded(argv: Sequence[str]) -> None:
    """Re-execute this command with OpenBLAS preloaded when that helps (returns if not)."""
    plan = reexec_plan(argv)
    if plan is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, plan[0], plan[1])


def loaded_blas() -> str | None:
    """Path of the OpenBLAS library mapped into this process, if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        if "openblas" in line and "/" in line:
            return line[line.index("/") :].strip()
    return None
