"""Fast float32 matmuls on Linux: an optimized BLAS, and our skinny GEMM in front of it.

MLX's Linux CPU wheel links a slow reference BLAS; preloading OpenBLAS makes prefill about ten
times faster (see docs). A decode step multiplies one row per sequence by every weight matrix,
where a general GEMM (OpenBLAS's too) spends its time packing weights it reads once: the skinny
GEMM (``skinny_gemm.c``, built here on first use with the machine's C compiler) takes those
calls and streams each weight matrix once. Both must be preloaded before the process starts,
so ``semantic serve`` re-executes itself once with ``LD_PRELOAD`` set.

``SEMANTIC_BLAS`` chooses the BLAS: ``auto`` (default: OpenBLAS if installed), ``reference``
(no OpenBLAS), or a path to a ``libopenblas.so``. Debian/Ubuntu: ``apt-get install
libopenblas0-pthread``. ``SEMANTIC_SKINNY_GEMM``: ``auto`` (default: build and preload when a C
compiler is found) or ``off``. ``CC`` names the compiler (default ``cc``). The library passes
other products on to the next ``cblas_sgemm`` in the process: OpenBLAS, or MLX's own. It also
computes the panel products of ``packed_weights.py`` (``A.B`` with a narrow B), which make a
decode step of 8 sequences cost little more than one of a single sequence. And it defines
``powf``, sending base 2 to ``exp2f`` (the same bits, faster): MLX's ``power()`` calls it for each
element, and the CPU kernels' ``exp`` (``mlx_cpu.py``) is a power of 2.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import math
import os
import platform as _platform
import random
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any
from pathlib import Path

ENV = "SEMANTIC_BLAS"
SKINNY_ENV = "SEMANTIC_SKINNY_GEMM"
SKINNY_SOURCE = Path(__file__).with_name("skinny_gemm.c")
SKINNY_FLAGS = ("-O3", "-ffp-contract=fast", "-shared", "-fPIC")
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


def skinny_gemm(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> tuple[str | None, str]:
    """The skinny-GEMM library to preload, built on first use, and why (path, reason).

    The path is None when not on Linux, turned off, without a C compiler, or when the build or
    its self-check failed; the reason says which, and nothing here raises. Built with
    ``-march=native`` for this machine (the cache key includes the CPU's flags) and checked
    against sums in Python before each use. A failed build is remembered next to where the
    library would be (delete ``<cache>/native/skinny_gemm-*.failed`` to try again).
    """
    if platform != "linux":
        return None, "not Linux"
    if env.get(SKINNY_ENV, "auto") == "off":
        return None, f"{SKINNY_ENV}=off"
    cc = shlex.split(env.get("CC", "cc")) or ["cc"]
    found = shutil.which(cc[0])
    if found is None:
        return None, f"no C compiler ({cc[0]} not found)"
    cc[0] = found
    try:
        from .paths import cache_dir

        parts = [SKINNY_SOURCE.read_bytes(), " ".join([*cc, *SKINNY_FLAGS]).encode(), _platform.machine().encode(), _cpu_flags()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        folder = cache_dir() / "native"
        lib, failed = folder / f"skinny_gemm-{key}.so", folder / f"skinny_gemm-{key}.failed"
        if failed.is_file():
            return None, failed.read_text(errors="replace")
        if not _ours(lib):
            error = _build(cc, lib)
            if error:
                failed.write_text(f"{error} (delete {failed} to try again)")
                return None, error
    except (OSError, RuntimeError) as e:  # an unwritable cache, no home folder...
        return None, f"build failed: {e}"
    problem = _self_check(lib)
    return (None, problem) if problem else (str(lib), "built for this machine")


def _cpu_flags() -> bytes:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.encode()
    except OSError:
        pass
    return b""


def _private(path: Path, kind: int) -> bool:
    try:
        st = path.lstat()  # a symbolic link is not ours
    except OSError:
        return False
    return stat.S_IFMT(st.st_mode) == kind and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _ours(lib: Path) -> bool:
    """A library we built, in a folder only this user may write: it is preloaded into the
    server, so anything else is rebuilt."""
    return _private(lib.parent, stat.S_IFDIR) and _private(lib, stat.S_IFREG)


def _build(cc: list[str], lib: Path) -> str | None:
    """Compile into ``lib`` atomically; the error, or None."""
    lib.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not _private(lib.parent, stat.S_IFDIR):
        os.chmod(lib.parent, 0o700)  # raises if the folder is not ours
    fd, tmp = tempfile.mkstemp(prefix="building-", suffix=".so", dir=lib.parent)
    os.close(fd)
    error = "build failed"
    try:
        for arch in (["-march=native"], []):  # some compilers have no -march=native
            cmd = [*cc, *SKINNY_FLAGS, *arch, "-o", tmp, str(SKINNY_SOURCE), "-ldl", "-lm", "-lpthread"]
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as e:
                error = f"build failed: {e}"
                continue
            if out.returncode == 0:
                os.chmod(tmp, 0o755)
                os.replace(tmp, lib)
                return None
            error = f"build failed: {' '.join(cmd)}: {out.stderr.strip()[-500:]}"
        return error
    finally:
        Path(tmp).unlink(missing_ok=True)


# (rows, columns of C, K, lda, ldb, ldc, alpha, beta): K tails of 1..15 and columns beyond whole
# groups of four (A.B^T); column tails of
# 32, 16 and 1..15 and rows beyond 8 and 32 (A.B: more tiles, the helper thread); wider leading
# dimensions, alpha and beta; C starts as NaN where beta is 0 (BLAS never reads it then).
_CHECKS = ((1, 7, 37, 37, 37, 7, 1.0, 0.0), (2, 5, 16, 20, 18, 6, 1.0, 0.0), (4, 9, 70, 70, 75, 9, 0.5, 2.0),
           (3, 4, 31, 33, 31, 4, 1.0, 0.0), (8, 3, 24, 24, 24, 3, -1.5, 0.0), (1, 1, 1, 1, 1, 1, 1.0, 1.0),
           (3, 6, 64, 64, 64, 6, 0.125, 0.0))
_NN_CHECKS = ((1, 32, 9, 9, 32, 32, 1.0, 0.0), (11, 53, 20, 21, 60, 55, 0.5, 2.0), (3, 7, 5, 5, 7, 7, 1.0, 0.0),
              (37, 40, 9, 9, 40, 40, 1.0, 0.0), (9, 48, 3, 3, 48, 48, -1.5, 0.0), (2, 1, 1, 1, 1, 1, 1.0, 1.0))


def _self_check(lib: Path) -> str | None:
    """Run the library's two paths (whatever their row limits) on small random problems against
    sums in Python; a problem, or None."""
    try:
        handle = ctypes.CDLL(str(lib))
        paths = ((handle.semantic_skinny_gemm, _CHECKS, True), (handle.semantic_skinny_gemm_nn, _NN_CHECKS, False))
    except (OSError, AttributeError) as e:
        return f"cannot load {lib}: {e}"
    for f, checks, transposed in paths:
        problem = _check_path(lib, f, checks, transposed)
        if problem:
            return problem
    return _check_powf(lib, handle)


def _check_powf(lib: Path, handle: Any) -> str | None:
    """The library's powf (every power() MLX computes goes through it) against Python's."""
    try:
        powf = handle.powf
    except AttributeError:
        return f"cannot load {lib}: no powf"
    powf.restype, powf.argtypes = ctypes.c_float, [ctypes.c_float, ctypes.c_float]
    for base, y in ((2.0, 0.5), (2.0, -3.25), (2.0, 17.0), (2.0, -140.5), (3.0, 2.5), (0.5, -7.0)):
        got, want = powf(base, y), base**y
        if not abs(got - want) <= 1e-6 * abs(want) + 1e-44:
            return f"self-check failed: {lib} computed powf({base}, {y}) = {got}, not {want}"
    return None


def _check_path(lib: Path, f: Any, checks: Sequence[tuple], transposed: bool) -> str | None:
    fl = ctypes.c_float
    rng = random.Random(0)
    for m, n, k, lda, ldb, ldc, alpha, beta in checks:
        b_len = n * ldb if transposed else k * ldb
        a = (fl * (m * lda))(*[rng.uniform(-1, 1) for _ in range(m * lda)])
        b = (fl * b_len)(*[rng.uniform(-1, 1) for _ in range(b_len)])
        c0 = [rng.uniform(-1, 1) if beta else math.nan for _ in range(m * ldc)]
        c = (fl * (m * ldc))(*c0)
        if not f(m, n, k, fl(alpha), a, lda, b, ldb, fl(beta), c, ldc):
            return f"self-check failed: {lib} refused a {m}x{k} by {k}x{n} product"
        for i in range(m):
            for j in range(n):
                col = (b[j * ldb + t] if transposed else b[t * ldb + j] for t in range(k))
                dot = sum(a[i * lda + t] * y for t, y in enumerate(col))
                want = alpha * dot + (beta * c0[i * ldc + j] if beta else 0.0)
                got = c[i * ldc + j]
                if not abs(got - want) <= 1e-4 * (1 + abs(want)):
                    return f"self-check failed: {lib} computed {got} for {want}"
    return None


def preload_libraries(env: Mapping[str, str] = os.environ, platform: str = sys.platform) -> list[str]:
    """What to preload, in order: the skinny GEMM (it passes other calls on), then OpenBLAS."""
    return [lib for lib in (skinny_gemm(env, platform)[0], find_openblas(env, platform)) if lib]


def preload_env(
    env: Mapping[str, str] = os.environ,
    platform: str = sys.platform,
    libraries: Sequence[str] | None = None,
) -> dict[str, str] | None:
    """``env`` with ``libraries`` (default: the ones this machine should preload) in front of
    ``LD_PRELOAD``, or None when they are all there already."""
    libs = preload_libraries(env, platform) if libraries is None else list(libraries)
    have = env.get("LD_PRELOAD", "").split(":")
    if not libs or all(lib in have for lib in libs):
        return None
    new_env = dict(env)
    new_env["LD_PRELOAD"] = ":".join([*libs, *(p for p in have if p and p not in libs)])
    if find_openblas(env, platform) in libs:
        new_env.setdefault("OPENBLAS_NUM_THREADS", str(os.cpu_count() or 1))
    return new_env


def reexec_plan(
    argv: Sequence[str],
    env: Mapping[str, str] = os.environ,
    platform: str = sys.platform,
    libraries: Sequence[str] | None = None,
) -> tuple[list[str], dict[str, str]] | None:
    """The command and environment to re-execute ``semantic`` with ``libraries`` preloaded (see
    ``preload_env``), or None when nothing needs to change."""
    new_env = preload_env(env, platform, libraries)
    return None if new_env is None else ([sys.executable, "-m", "semantic.cli", *argv], new_env)


def ensure_preloaded(argv: Sequence[str]) -> None:
    """Re-execute this command with the fast libraries preloaded when that helps (returns if not)."""
    plan = reexec_plan(argv)
    if plan is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, plan[0], plan[1])


def loaded_blas() -> str | None:
    """Path of the OpenBLAS library mapped into this process, if any."""
    return _mapped("openblas")


def loaded_skinny_gemm() -> str | None:
    """Path of the skinny-GEMM library mapped into this process, if any."""
    return _mapped("skinny_gemm-")


def _mapped(fragment: str) -> str | None:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        if fragment in line and "/" in line:
            return line[line.index("/") :].strip()
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m semantic.blas CMD [ARGS...]``: run CMD with what ``semantic serve`` preloads
    (the test suite runs this way, so in-process models compute as the server does)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m semantic.blas CMD [ARGS...]")
    env = preload_env() or dict(os.environ)
    sys.stdout.flush()
    os.execvpe(args[0], args, env)


if __name__ == "__main__":
    main()
