/* Skinny GEMM: decode-shaped float32 matmuls that read the weights once.
 *
 * Preloaded ahead of the BLAS (see blas.py), this library defines cblas_sgemm. MLX's Linear
 * layers call it as  C[M,N] = alpha * A[M,K] . B[N,K]^T (+ beta * C), row major. When M is small
 * (a decode step: one row per sequence) a general GEMM spends its time packing B, a weight
 * matrix read from memory once per step; here each weight row is streamed once, in memory order,
 * and dotted with every row of A, on the calling thread. Up to SEMANTIC_SKINNY_ROWS rows (default
 * 4, at most 8); other calls go on to the next cblas_sgemm in the process (OpenBLAS or MLX's own
 * reference BLAS), or, if there is none, to a plain loop here.
 *
 * Each output element is computed the same way whatever M is: 16-lane products summed in K
 * order, then one shared (not inlined) epilogue adds the lanes in order and the K % 16 tail with
 * explicit fmaf. So a sequence's decode rows are bitwise the same alone or in a batch of up to
 * the row limit.
 *
 * Built on the machine that runs it (cc -O3 -march=native -ffp-contract=fast); GCC vector
 * extensions keep it portable across x86-64 and aarch64.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <link.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#define SKINNY_MAX_ROWS 8
#define SKINNY_DEFAULT_ROWS 4

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn next_sgemm;
static int next_looked_up;
static int max_rows = SKINNY_DEFAULT_ROWS;
static long skinny_calls, passed_calls;

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

static inline v16 load(const float *p) { return *(const v16u *)p; }

/* The epilogue of every output element, one copy for all row counts: lanes in order, the K tail,
 * alpha and beta (beta 0 never reads C, as in BLAS). */
__attribute__((noinline)) static void finish_row(int M, const v16 *acc, const float *a, int lda,
                                                 const float *w, int k16, int K, float alpha,
                                                 float beta, float *c, int ldc) {
  for (int m = 0; m < M; m++) {
    const float *x = a + (size_t)m * lda;
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += acc[m][i];
    for (int k = k16; k < K; k++) s = fmaf(x[k], w[k], s);
    float *o = c + (size_t)m * ldc;
    *o = beta == 0.0f ? alpha * s : alpha * s + beta * *o;
  }
}

/* One weight row at a time, dotted with MM rows of A: the weights stream through once, in
 * memory order, which is what a single core's prefetchers read fastest. */
#define ROWS(MM)                                                                             \
  static void rows_##MM(int N, int K, float alpha, const float *a, int lda, const float *b,  \
                        int ldb, float beta, float *c, int ldc) {                            \
    int k16 = K & ~15;                                                                       \
    for (int n = 0; n < N; n++) {                                                            \
      const float *w = b + (size_t)n * ldb;                                                  \
      v16 acc[MM];                                                                           \
      for (int m = 0; m < MM; m++) acc[m] = (v16){0};                                        \
      for (int k = 0; k < k16; k += 16) {                                                    \
        v16 wk = load(w + k);                                                                \
        for (int m = 0; m < MM; m++) acc[m] += load(a + (size_t)m * lda + k) * wk;          \
      }                                                                                      \
      finish_row(MM, acc, a, lda, w, k16, K, alpha, beta, c + n, ldc);                       \
    }                                                                                        \
  }
ROWS(1)
ROWS(2)
ROWS(3)
ROWS(4)
ROWS(5)
ROWS(6)
ROWS(7)
ROWS(8)

typedef void (*rows_fn)(int, int, float, const float *, int, const float *, int, float, float *,
                        int);
static const rows_fn ROWS_FOR[SKINNY_MAX_ROWS + 1] = {
    0, rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7, rows_8};

/* The products this library computes itself (whatever the row limit). */
static int skinny_shape(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                        int lda, int ldb, int ldc) {
  return order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && M >= 1 &&
         M <= SKINNY_MAX_ROWS && N >= 1 && K >= 1 && lda >= K && ldb >= K && ldc >= N &&
         alpha != 0.0f;
}

/* The skinny path alone, for the self-check in blas.py: returns 0 if it does not take the shape. */
int semantic_skinny_gemm(int M, int N, int K, float alpha, const float *a, int lda,
                         const float *b, int ldb, float beta, float *c, int ldc) {
  if (!skinny_shape(ROW_MAJOR, NO_TRANS, TRANS, M, N, K, alpha, lda, ldb, ldc)) return 0;
  ROWS_FOR[M](N, K, alpha, a, lda, b, ldb, beta, c, ldc);
  return 1;
}

/* Another cblas_sgemm in the process: RTLD_NEXT finds the preloaded OpenBLAS; MLX's bundled
 * BLAS is loaded privately (Python imports extensions without RTLD_GLOBAL), so look it up in
 * each loaded object (names gathered first: no dlopen while the loader's list is held). */
#define MAX_OBJECTS 512
struct objects { int n; const char *name[MAX_OBJECTS]; };

static int gather(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  struct objects *o = data;
  if (info->dlpi_name && info->dlpi_name[0] && o->n < MAX_OBJECTS) o->name[o->n++] = info->dlpi_name;
  return 0;
}

static sgemm_fn find_next(void) {
  if (__atomic_load_n(&next_looked_up, __ATOMIC_ACQUIRE)) return __atomic_load_n(&next_sgemm, __ATOMIC_RELAXED);
  void *f = dlsym(RTLD_NEXT, "cblas_sgemm");
  if (!f) {
    struct objects o = {0}; /* no lock: at worst two threads both search */
    dl_iterate_phdr(gather, &o);
    for (int i = 0; i < o.n && !f; i++) {
      void *handle = dlopen(o.name[i], RTLD_NOLOAD | RTLD_LAZY);
      if (!handle) continue;
      void *g = dlsym(handle, "cblas_sgemm");
      dlclose(handle);
      if (g && g != (void *)cblas_sgemm) f = g;
    }
  }
  if (f) { /* not remembered when missing: MLX may not be loaded yet */
    __atomic_store_n(&next_sgemm, (sgemm_fn)f, __ATOMIC_RELAXED);
    __atomic_store_n(&next_looked_up, 1, __ATOMIC_RELEASE);
  }
  return (sgemm_fn)f;
}

/* No other BLAS at all: a plain row-major loop, correct for every order and transpose. */
static void plain_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                        const float *a, int lda, const float *b, int ldb, float beta, float *c,
                        int ldc) {
  if (order != ROW_MAJOR) { /* column major C = A.B is row major C^T = B^T.A^T */
    plain_sgemm(ROW_MAJOR, trans_b, trans_a, N, M, K, alpha, b, ldb, a, lda, beta, c, ldc);
    return;
  }
  for (int i = 0; i < M; i++)
    for (int j = 0; j < N; j++) {
      double s = 0.0;
      for (int k = 0; k < K; k++) {
        float x = trans_a == TRANS ? a[(size_t)k * lda + i] : a[(size_t)i * lda + k];
        float y = trans_b == TRANS ? b[(size_t)j * ldb + k] : b[(size_t)k * ldb + j];
        s += (double)x * y;
      }
      float *o = c + (size_t)i * ldc + j;
      *o = beta == 0.0f ? alpha * (float)s : alpha * (float)s + beta * *o;
    }
}

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (M <= max_rows && skinny_shape(order, trans_a, trans_b, M, N, K, alpha, lda, ldb, ldc)) {
    __atomic_add_fetch(&skinny_calls, 1, __ATOMIC_RELAXED);
    ROWS_FOR[M](N, K, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  __atomic_add_fetch(&passed_calls, 1, __ATOMIC_RELAXED);
  sgemm_fn next = find_next();
  if (next)
    next(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
  else
    plain_sgemm(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* For `semantic blas` and tests: calls taken here and passed on. */
long semantic_skinny_calls(int passed) {
  return __atomic_load_n(passed ? &passed_calls : &skinny_calls, __ATOMIC_RELAXED);
}

__attribute__((constructor)) static void skinny_init(void) {
  const char *rows = getenv("SEMANTIC_SKINNY_ROWS");
  if (rows) {
    int r = atoi(rows);
    max_rows = r < 0 ? 0 : r > SKINNY_MAX_ROWS ? SKINNY_MAX_ROWS : r;
  }
}
