"""Preloading an optimized BLAS and the skinny GEMM on Linux: when, how, that the re-executed
server really has them, and that the skinny GEMM computes what MLX would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semantic.blas import _self_check, find_openblas, reexec_plan, skinny_gemm

HAS_CC = sys.platform == "linux" and shutil.which("cc") is not None


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
    cmd, env = reexec_plan(["serve", "--port", "0"], {"SEMANTIC_BLAS": lib, "SEMANTIC_SKINNY_GEMM": "off", "LD_PRELOAD": "/x/other.so"}, "linux")
    assert cmd[1:] == ["-m", "semantic.cli", "serve", "--port", "0"]
    assert env["LD_PRELOAD"] == f"{lib}:/x/other.so" and env["OPENBLAS_NUM_THREADS"]
    assert reexec_plan(["serve"], env, "linux") is None  # already preloaded: no loop
    assert reexec_plan(["serve"], {"SEMANTIC_BLAS": "reference", "SEMANTIC_SKINNY_GEMM": "off"}, "linux") is None


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_the_reexecuted_process_has_the_library_mapped(tmp_path):
    src = tmp_path / "stub.c"
    src.write_text("int semantic_blas_stub(void) { return 1; }\n")
    lib = tmp_path / "libopenblas.so.0"  # a stand-in: only its being mapped is checked
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    env = {**os.environ, "SEMANTIC_BLAS": str(lib), "SEMANTIC_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-m", "semantic.cli", "blas"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert f"preload: {lib}" in out.stdout and f"loaded: {lib}" in out.stdout
    skinny = next(tmp_path.glob("cache/native/skinny_gemm-*.so"))
    assert f"skinny GEMM: {skinny} (built for this machine)" in out.stdout
    assert f"skinny GEMM loaded: {skinny}" in out.stdout


def test_plan_puts_the_skinny_gemm_before_the_blas():
    """It passes every other call on to the next cblas_sgemm, so it must come first."""
    libs = ["/c/skinny_gemm-1.so", "/b/libopenblas.so.0"]
    cmd, env = reexec_plan(["serve"], {"LD_PRELOAD": "/b/libopenblas.so.0:/x/other.so"}, "linux", libs)
    assert env["LD_PRELOAD"] == "/c/skinny_gemm-1.so:/b/libopenblas.so.0:/x/other.so"
    assert reexec_plan(["serve"], env, "linux", libs) is None
    assert reexec_plan(["serve"], {}, "linux", []) is None
    _, env = reexec_plan(["serve"], {}, "linux", libs[:1])  # no OpenBLAS: MLX's own BLAS is next
    assert env["LD_PRELOAD"] == libs[0] and "OPENBLAS_NUM_THREADS" not in env


def test_when_there_is_no_skinny_gemm(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMANTIC_CACHE_DIR", str(tmp_path))
    assert skinny_gemm({}, "darwin") == (None, "not Linux")
    assert skinny_gemm({"SEMANTIC_SKINNY_GEMM": "off"}, "linux") == (None, "SEMANTIC_SKINNY_GEMM=off")
    lib, why = skinny_gemm({"CC": str(tmp_path / "no-such-cc")}, "linux")
    assert lib is None and why.startswith("no C compiler")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_the_library_is_built_once_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMANTIC_CACHE_DIR", str(tmp_path))
    lib, why = skinny_gemm({}, "linux")
    assert why == "built for this machine" and Path(lib).parent == tmp_path / "native"
    built = Path(lib).stat().st_mtime_ns
    assert skinny_gemm({}, "linux")[0] == lib and Path(lib).stat().st_mtime_ns == built
    assert [p.name for p in (tmp_path / "native").iterdir()] == [Path(lib).name]  # no temporary left
    Path(lib).chmod(0o777)  # anybody could have replaced it: built again
    assert skinny_gemm({}, "linux")[0] == lib and Path(lib).stat().st_mode & 0o022 == 0
    Path(lib).parent.chmod(0o777)  # its folder too
    assert skinny_gemm({}, "linux")[0] == lib and Path(lib).parent.stat().st_mode & 0o777 == 0o700
    # a library that computes the wrong thing on either path, or lacks one, is refused
    (tmp_path / "bad.c").write_text(_BAD_LIBRARY)
    for n, (flag, problem) in enumerate([("-DWRONG=1", "self-check failed"), ("-DWRONG=2", "self-check failed"), ("-DWRONG=3", "cannot load")]):
        bad = tmp_path / f"bad{n}.so"  # one name each: the loader keeps a library it has loaded
        subprocess.run(["cc", "-shared", "-fPIC", flag, "-o", str(bad), str(tmp_path / "bad.c")], check=True)
        assert _self_check(bad).startswith(problem), flag
    assert _self_check(Path(lib)) is None


# WRONG=1: A.B^T is off by one in one element; 2: A.B is; 3: there is no A.B.
_BAD_LIBRARY = """
static void gemm(int t, int m, int n, int k, float al, const float *a, int lda, const float *b, int ldb, float be, float *c, int ldc) {
  for (int i = 0; i < m; i++) for (int j = 0; j < n; j++) {
    float s = 0; for (int x = 0; x < k; x++) s += a[i * lda + x] * (t ? b[j * ldb + x] : b[x * ldb + j]);
    c[i * ldc + j] = be == 0 ? al * s : al * s + be * c[i * ldc + j];
  }
}
int semantic_skinny_gemm(int m, int n, int k, float al, const float *a, int lda, const float *b, int ldb, float be, float *c, int ldc) {
  gemm(1, m, n, k, al, a, lda, b, ldb, be, c, ldc);
  if (WRONG == 1) c[0] += 1.0f;
  return 1;
}
#if WRONG != 3
int semantic_skinny_gemm_nn(int m, int n, int k, float al, const float *a, int lda, const float *b, int ldb, float be, float *c, int ldc) {
  gemm(0, m, n, k, al, a, lda, b, ldb, be, c, ldc);
  if (WRONG == 2) c[m * ldc - 1] += 1.0f;
  return 1;
}
#endif
"""


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_a_failed_build_is_remembered_and_nothing_raises(monkeypatch, tmp_path):
    monkeypatch.setenv("SEMANTIC_CACHE_DIR", str(tmp_path / "cache"))
    lib, why = skinny_gemm({"CC": "false"}, "linux")  # a "compiler" that always fails
    assert lib is None and why.startswith("build failed")
    failed = next((tmp_path / "cache" / "native").glob("skinny_gemm-*.failed"))
    assert skinny_gemm({"CC": "false"}, "linux") == (None, failed.read_text())  # not built again
    assert [p.suffix for p in failed.parent.iterdir()] == [".failed"]  # no temporary left
    lib, why = skinny_gemm({"CC": "ccache-not-installed cc"}, "linux")
    assert lib is None and why == "no C compiler (ccache-not-installed not found)"
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("SEMANTIC_CACHE_DIR", str(tmp_path / "file"))  # cannot be a folder
    lib, why = skinny_gemm({}, "linux")
    assert lib is None and why.startswith("build failed")


def _child(mode: str, preload: list[str], **extra: str) -> dict:
    env = {**os.environ, "LD_PRELOAD": ":".join(preload), **extra}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("skinny_child.py")), mode], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def preload():
    """The skinny GEMM and, when the machine has it, OpenBLAS."""
    lib, why = skinny_gemm(os.environ, "linux")
    assert lib, why
    return [lib, *filter(None, [find_openblas()])]


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_skinny_gemm_computes_what_mlx_does(preload):
    """Through MLX: decode-shaped products within float32 rounding of float64, each row bitwise the
    same for any M it takes and for any place of a row of B among the others; alpha/beta, a sliced A
    and transposed A stay right; power() gives the bits libm's powf gives."""
    got = _child("numerics", preload)
    assert got["skinny"] > 0 and got["nn"] > 0 and got["passed"] > 0, got  # it took some calls and passed others on
    assert got["worst"] < 2e-6 and got["variant_rows"] == [] and got["variant_keys"] == [], got
    assert max(got["addmm"], got["sliced"], got["transposed"]) < 1e-4, got
    assert got["powf"]["ours"] and got["powf"]["differ"] == 0 and got["powf"]["checked"] > 18000, got


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_skinny_gemm_without_openblas(preload):
    """With only MLX's own BLAS behind it (SEMANTIC_BLAS=reference), the products it passes on
    still reach a BLAS, and with a row limit of 0 it passes every product on."""
    got = _child("numerics", preload[:1])
    assert got["skinny"] > 0 and got["passed"] > 0 and got["worst"] < 2e-6 and got["variant_rows"] == [], got
    got = _child("numerics", preload[:1], SEMANTIC_SKINNY_ROWS="0", SEMANTIC_SKINNY_NN_ROWS="0")
    assert got["skinny"] == got["nn"] == 0 and got["passed"] > 0 and got["worst"] < 2e-6, got


@pytest.mark.integration
@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_the_embedded_model_with_the_skinny_gemm(preload, smollm):
    """Greedy tokens are the same alone and batched, and the same as without the library."""
    fast = _child("tokens", preload)
    assert fast["skinny"] > 0
    assert fast["alone"] == fast["together"]
    plain = _child("tokens", preload[1:])
    assert plain["skinny"] == 0 and plain["alone"] == fast["alone"]


_FORK_CHILD = """
import ctypes, os, random, sys
f = ctypes.CDLL(sys.argv[1]).semantic_skinny_gemm_nn
m, n, k = 40, 32, 50
a = (ctypes.c_float * (m * k))(*[random.uniform(-1, 1) for _ in range(m * k)])
b = (ctypes.c_float * (k * n))(*[random.uniform(-1, 1) for _ in range(k * n)])
def product():
    c = (ctypes.c_float * (m * n))()
    assert f(m, n, k, ctypes.c_float(1.0), a, k, b, n, ctypes.c_float(0.0), c, n)
    return list(c)
first = product()  # 40 rows: the helper thread takes half
pid = os.fork()
if pid == 0:
    os._exit(0 if product() == first else 1)  # the child has no helper thread: it starts one
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), product() == first)
"""


_SPLIT_CHILD = """
import ctypes, random, sys
f = ctypes.CDLL(sys.argv[1]).semantic_skinny_gemm_nn
bad = []
for m in range(1, 41):
    n, k, canary = 9, 7, 64
    a = [random.uniform(-1, 1) for _ in range(m * k)]
    b = [random.uniform(-1, 1) for _ in range(k * n)]
    c = (ctypes.c_float * (m * n + canary))(*([0.0] * (m * n) + [7.0] * canary))
    f(m, n, k, ctypes.c_float(1.0), (ctypes.c_float * len(a))(*a), k, (ctypes.c_float * len(b))(*b), n, ctypes.c_float(0.0), c, n)
    want = [sum(a[i * k + t] * b[t * n + j] for t in range(k)) for i in range(m) for j in range(n)]
    if any(abs(x - y) > 1e-4 for x, y in zip(c[: m * n], want)) or list(c[m * n :]) != [7.0] * canary:
        bad.append(m)
print(bad)
"""


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_any_split_threshold_splits_rows_within_bounds(preload):
    """With the helper thread's threshold at 2, every row count 1..40 computes right and writes
    nothing past C (a canary after it)."""
    env = {**os.environ, "SEMANTIC_SKINNY_SPLIT_ROWS": "2"}
    out = subprocess.run([sys.executable, "-c", _SPLIT_CHILD, preload[0]], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"]


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_products_with_the_helper_thread_work_in_a_forked_child(preload):
    out = subprocess.run([sys.executable, "-c", _FORK_CHILD, preload[0]], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["0", "True"]


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_python_m_semantic_blas_runs_a_command_with_the_preload(preload):
    """What `make test` runs the suite under: the command sees serve's libraries in LD_PRELOAD."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    code = "import os, semantic.blas as b; print(os.environ['LD_PRELOAD']); print(b.loaded_skinny_gemm())"
    out = subprocess.run([sys.executable, "-m", "semantic.blas", sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    preloaded, loaded = out.stdout.split()
    assert preloaded.split(":")[: len(preload)] == preload and loaded == preload[0]
    assert subprocess.run([sys.executable, "-m", "semantic.blas"], capture_output=True, text=True).returncode != 0


_LANES_CHILD = """
import ctypes, random, struct, sys
fast, lanes = (ctypes.CDLL(p).semantic_skinny_gemm for p in sys.argv[1:3])
rng = random.Random(5)
differ = []
for m in range(1, 9):
    for n in (1, 2, 3, 5, 6, 7, 9, 13):
        for k in (16, 31, 64, 70):
            a = (ctypes.c_float * (m * k))(*[rng.uniform(-1, 1) for _ in range(m * k)])
            b = (ctypes.c_float * (n * k))(*[rng.uniform(-1, 1) for _ in range(n * k)])
            out = []
            for f in (fast, lanes):
                c = (ctypes.c_float * (m * n))()
                assert f(m, n, k, ctypes.c_float(1.0), a, k, b, k, ctypes.c_float(0.0), c, n)
                out.append(bytes(c))
            if out[0] != out[1]:
                differ.append([m, n, k])
print(differ)
"""


@pytest.mark.skipif(not HAS_CC, reason="needs Linux and a C compiler")
def test_the_lane_sum_is_the_same_tree_with_or_without_vector_shuffles(preload, tmp_path):
    """Compilers without __builtin_shufflevector add the lanes one by one: the same tree, so the
    same bits as the shuffled build (what one machine computes, another build agrees with)."""
    from semantic.blas import SKINNY_FLAGS, SKINNY_SOURCE

    lanes = tmp_path / "lanes.so"
    cmd = ["cc", *SKINNY_FLAGS, "-march=native", "-DSKINNY_LANE_TREE", "-o", str(lanes), str(SKINNY_SOURCE), "-ldl", "-lm", "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    out = subprocess.run([sys.executable, "-c", _LANES_CHILD, preload[0], str(lanes)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]"]
