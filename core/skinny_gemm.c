/* Skinny GEMM: decode-shaped float32 matmuls that read the weights once.
 *
 * Preloaded ahead of the BLAS (see blas.py), this library defines cblas_sgemm. MLX's Linear
 * layers call it as  C[M,N] = alpha * A[M,K] . B[N,K]^T (+ beta * C), row major. When M is small
 * (a decode step: one row per sequence) a general GEMM spends its time packing B, a weight
 * matrix read from memory once per step; here each block of weight rows is streamed once and
 * dotted with every row of A. Other calls go on to the next cblas_sgemm (OpenBLAS or MLX's own).
 *
 * Each output element is computed the same way whatever M and the thread count are: 16-lane
 * products summed in K order, lanes added in order, then the K % 16 tail. So a sequence's
 * decode rows are bitwise the same alone or in a batch of up to SKINNY_MAX_ROWS.
 *
 * Built on the machine that runs it (cc -O3 -march=native -fopenmp); GCC vector extensions
 * keep it portable across x86-64 and aarch64.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>

#define SKINNY_MAX_ROWS 8
#define SKINNY_DEFAULT_ROWS 4

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn next_sgemm;
static int max_rows = SKINNY_DEFAULT_ROWS;
static long skinny_calls, passed_calls;

static inline v16 load(const float *p) { return *(const v16u *)p; }

static inline float hsum(v16 v) {
  float s = 0.0f;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}

static inline void store(float *o, float s, float alpha, float beta) {
  *o = beta == 0.0f ? alpha * s : alpha * s + beta * *o;
}

static inline float finish(v16 acc, const float *x, const float *w, int k16, int K) {
  float s = hsum(acc);
  for (int k = k16; k < K; k++) s += x[k] * w[k];
  return s;
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
      for (int m = 0; m < MM; m++)                                                           \
        store(c + (size_t)m * ldc + n, finish(acc[m], a + (size_t)m * lda, w, k16, K),       \
              alpha, beta);                                                                  \
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

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == TRANS && M >= 1 &&
      M <= max_rows && N >= 1 && K >= 1) {
    __atomic_add_fetch(&skinny_calls, 1, __ATOMIC_RELAXED);
    ROWS_FOR[M](N, K, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  __atomic_add_fetch(&passed_calls, 1, __ATOMIC_RELAXED);
  if (!next_sgemm) next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  if (!next_sgemm) {
    fprintf(stderr, "semantic skinny GEMM: no cblas_sgemm after it in the process\n");
    abort();
  }
  next_sgemm(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* For `semantic blas` and tests: calls taken here and passed on. */
long semantic_skinny_calls(int passed) { return passed ? passed_calls : skinny_calls; }

__attribute__((constructor)) static void skinny_init(void) {
  const char *rows = getenv("SEMANTIC_SKINNY_ROWS");
  if (rows) {
    int r = atoi(rows);
    max_rows = r < 0 ? 0 : r > SKINNY_MAX_ROWS ? SKINNY_MAX_ROWS : r;
  }
}
