/* Skinny GEMM: decode-shaped float32 matmuls that read the weights once.
 *
 * Preloaded ahead of the BLAS (see blas.py), this library defines cblas_sgemm and takes two
 * kinds of row-major products with few rows of A (a decode step: one row per sequence), where a
 * general GEMM spends its time packing a weight matrix it reads once per step:
 *
 * - C[M,N] = A[M,K] . B[N,K]^T, MLX's plain Linear layers and attention's scores (the query
 *   heads that share a key head against its keys): the rows of B are streamed once, in memory
 *   order, four at a time, and dotted with every row of A. Up to SEMANTIC_SKINNY_ROWS rows
 *   (default 4, at most 8). Each output element: 16-lane products summed in K order, then one
 *   shared (not inlined) epilogue adds the lanes by a fixed tree and the K % 16 tail with
 *   explicit fmaf.
 * - C[M,N] = A[M,K] . B[K,N] with N <= 256, the panels of packed_weights.py (B is K rows of 32
 *   contiguous floats) and attention's values: for each k, 8 rows of A are broadcast against
 *   32 columns of B held in registers, so B streams once per 8 rows at about memory speed, and
 *   more rows run near the core's FMA peak. Any number of rows (SEMANTIC_SKINNY_NN_ROWS sets a
 *   limit, 0 turns it off); from SEMANTIC_SKINNY_SPLIT_ROWS rows (default 32, at least 16; 0: never) a
 *   helper thread takes half of them. Each output element is one fused multiply-add chain in K
 *   order.
 *
 * Either way an element is computed the same way whatever M is and wherever its row of B sits,
 * so a sequence's decode rows are bitwise the same alone or in a batch (up to the row limit of
 * the first kind). Other calls go on to the next
 * cblas_sgemm in the process (OpenBLAS or MLX's own reference BLAS), or, if there is none, to a
 * plain loop here.
 *
 * It also defines powf: base 2 (MLX's power(), which mlx_cpu.py's exp stand-ins use) goes to exp2f,
 * the same bits in half the time.
 *
 * Built on the machine that runs it (cc -O3 -march=native -ffp-contract=fast); GCC vector
 * extensions keep it portable across x86-64 and aarch64.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <link.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <time.h>

#define SKINNY_MAX_ROWS 8
#define SKINNY_DEFAULT_ROWS 4
#define NN_MAX_COLS 256
#define SPLIT_DEFAULT_ROWS 32
#define SPIN_NS 200000L

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);

static sgemm_fn next_sgemm;
static int next_looked_up;
static int max_rows = SKINNY_DEFAULT_ROWS;
static int nn_rows = INT_MAX;
static int split_rows = SPLIT_DEFAULT_ROWS;
static long skinny_calls, passed_calls, nn_calls;

void cblas_sgemm(int order, int trans_a, int trans_b, int M, int N, int K, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);

static inline v16 load(const float *p) { return *(const v16u *)p; }

/* The sums of four 16-lane accumulators, each added up by the same fixed tree: lanes i and i+8,
 * then i and i+4, then neighbours, then pairs (one shuffle-and-add a level for all four). */
#if (defined(__clang__) || __GNUC__ >= 12) && !defined(SKINNY_LANE_TREE)
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
static inline void sum4(const v16 *acc, float *out) {
  v16 b01 = __builtin_shufflevector(acc[0], acc[1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(acc[0], acc[1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  v16 b23 = __builtin_shufflevector(acc[2], acc[3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
            __builtin_shufflevector(acc[2], acc[3], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  v16 c = __builtin_shufflevector(b01, b23, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
          __builtin_shufflevector(b01, b23, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  v8 d = __builtin_shufflevector(c, c, 0, 2, 4, 6, 8, 10, 12, 14) + __builtin_shufflevector(c, c, 1, 3, 5, 7, 9, 11, 13, 15);
  v4 e = __builtin_shufflevector(d, d, 0, 2, 4, 6) + __builtin_shufflevector(d, d, 1, 3, 5, 7);
  for (int j = 0; j < 4; j++) out[j] = e[j];
}
#else /* the same tree, lane by lane (older compilers; -DSKINNY_LANE_TREE for the tests) */
static inline void sum4(const v16 *acc, float *out) {
  for (int j = 0; j < 4; j++) {
    float h[8], q[4];
    for (int i = 0; i < 8; i++) h[i] = acc[j][i] + acc[j][i + 8];
    for (int i = 0; i < 4; i++) q[i] = h[i] + h[i + 4];
    out[j] = (q[0] + q[1]) + (q[2] + q[3]);
  }
}
#endif

/* The epilogue of every output element, one copy for all row counts: the lanes' tree sum, the
 * K tail, alpha and beta (beta 0 never reads C, as in BLAS), for `keys` (1 to 4) rows of B. */
__attribute__((noinline)) static void finish_rows(int M, const v16 (*acc)[4], const float *a, int lda,
                                                  const float *const *w, int keys, int k16, int K,
                                                  float alpha, float beta, float *c, int ldc) {
  for (int m = 0; m < M; m++) {
    const float *x = a + (size_t)m * lda;
    float s[4];
    sum4(acc[m], s);
    for (int j = 0; j < keys; j++) {
      float t = s[j];
      for (int k = k16; k < K; k++) t = fmaf(x[k], w[j][k], t);
      float *o = c + (size_t)m * ldc + j;
      *o = beta == 0.0f ? alpha * t : alpha * t + beta * *o;
    }
  }
}

/* Four rows of B at a time (the last group may repeat its first row, results unused), dotted
 * with MM rows of A: B streams through once, in memory order, and four sums share one reduction. */
#define ROWS(MM)                                                                             \
  static void rows_##MM(int N, int K, float alpha, const float *a, int lda, const float *b,  \
                        int ldb, float beta, float *c, int ldc) {                            \
    int k16 = K & ~15;                                                                       \
    for (int n = 0; n < N; n += 4) {                                                         \
      int keys = N - n < 4 ? N - n : 4;                                                      \
      const float *w[4];                                                                     \
      for (int j = 0; j < 4; j++) w[j] = b + (size_t)(n + (j < keys ? j : 0)) * ldb;         \
      v16 acc[MM][4];                                                                        \
      for (int m = 0; m < MM; m++)                                                           \
        for (int j = 0; j < 4; j++) acc[m][j] = (v16){0};                                    \
      for (int j = 0; j < 4; j++) /* each row of B in memory order */                       \
        for (int k = 0; k < k16; k += 16) {                                                  \
          v16 wk = load(w[j] + k);                                                           \
          for (int m = 0; m < MM; m++) acc[m][j] += load(a + (size_t)m * lda + k) * wk;      \
        }                                                                                    \
      finish_rows(MM, (const v16(*)[4])acc, a, lda, w, keys, k16, K, alpha, beta, c + n, ldc); \
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


/* A[M,K] . B[K,N]: 32 (then 16) columns of B at a time, every row of A broadcast against them;
 * the last N % 16 columns one at a time. Each element is fmaf(a, b, s) over k in order. */
__attribute__((noinline)) static void put(float *o, v16 v, float alpha, float beta) {
  *(v16u *)o = beta == 0.0f ? alpha * v : alpha * v + beta * load(o);
}

/* One copy of each epilogue for every row count: how alpha and beta are fused cannot differ. */
__attribute__((noinline)) static void put1(float *o, float s, float alpha, float beta) {
  *o = beta == 0.0f ? alpha * s : alpha * s + beta * *o;
}

#define NN_ROWS(MM)                                                                          \
  static void nn_##MM(int N, int K, float alpha, const float *a, int lda, const float *b,   \
                      int ldb, float beta, float *c, int ldc) {                              \
    int j = 0;                                                                               \
    for (; j + 32 <= N; j += 32) {                                                           \
      v16 acc[MM][2];                                                                        \
      for (int m = 0; m < MM; m++) acc[m][0] = acc[m][1] = (v16){0};                         \
      for (int k = 0; k < K; k++) {                                                          \
        const float *w = b + (size_t)k * ldb + j;                                            \
        v16 w0 = load(w), w1 = load(w + 16);                                                 \
        for (int m = 0; m < MM; m++) {                                                       \
          float x = a[(size_t)m * lda + k];                                                  \
          acc[m][0] += x * w0;                                                               \
          acc[m][1] += x * w1;                                                               \
        }                                                                                    \
      }                                                                                      \
      for (int m = 0; m < MM; m++) {                                                         \
        put(c + (size_t)m * ldc + j, acc[m][0], alpha, beta);                                \
        put(c + (size_t)m * ldc + j + 16, acc[m][1], alpha, beta);                           \
      }                                                                                      \
    }                                                                                        \
    for (; j + 16 <= N; j += 16) {                                                           \
      v16 acc[MM];                                                                           \
      for (int m = 0; m < MM; m++) acc[m] = (v16){0};                                        \
      for (int k = 0; k < K; k++) {                                                          \
        v16 w0 = load(b + (size_t)k * ldb + j);                                              \
        for (int m = 0; m < MM; m++) acc[m] += a[(size_t)m * lda + k] * w0;                  \
      }                                                                                      \
      for (int m = 0; m < MM; m++) put(c + (size_t)m * ldc + j, acc[m], alpha, beta);        \
    }                                                                                        \
    for (; j < N; j++)                                                                       \
      for (int m = 0; m < MM; m++) {                                                         \
        float s = 0.0f;                                                                      \
        for (int k = 0; k < K; k++) s = fmaf(a[(size_t)m * lda + k], b[(size_t)k * ldb + j], s); \
        put1(c + (size_t)m * ldc + j, s, alpha, beta);                                       \
      }                                                                                      \
  }
NN_ROWS(1)
NN_ROWS(2)
NN_ROWS(3)
NN_ROWS(4)
NN_ROWS(5)
NN_ROWS(6)
NN_ROWS(7)
NN_ROWS(8)

static const rows_fn NN_FOR[SKINNY_MAX_ROWS + 1] = {0, nn_1, nn_2, nn_3, nn_4, nn_5, nn_6, nn_7, nn_8};

static int nn_shape(int order, int trans_a, int trans_b, int M, int N, int K, float alpha, int lda,
                    int ldb, int ldc) {
  return order == ROW_MAJOR && trans_a == NO_TRANS && trans_b == NO_TRANS && M >= 1 && N >= 1 &&
         N <= NN_MAX_COLS && K >= 1 && lda >= K && ldb >= N && ldc >= N && alpha != 0.0f;
}

/* Eight rows of A at a time: B is read once per eight rows. */
static void nn_tiles(int M, int N, int K, float alpha, const float *a, int lda, const float *b,
                     int ldb, float beta, float *c, int ldc) {
  for (int r = 0; r < M; r += SKINNY_MAX_ROWS) {
    int rows = M - r < SKINNY_MAX_ROWS ? M - r : SKINNY_MAX_ROWS;
    NN_FOR[rows](N, K, alpha, a + (size_t)r * lda, lda, b, ldb, beta, c + (size_t)r * ldc, ldc);
  }
}

/* Products of SEMANTIC_SKINNY_SPLIT_ROWS rows or more (prompt chunks) give their second half of
 * rows to one helper thread. It spins briefly for the next product (they come back to back)
 * and then sleeps. One caller at a time: another computes alone meanwhile. */
struct job { int M, N, K, lda, ldb, ldc; float alpha, beta; const float *a, *b; float *c; };
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_posted = PTHREAD_COND_INITIALIZER, job_done = PTHREAD_COND_INITIALIZER;
static struct job job;
static long posted, finished;
static int helper = 0; /* 0 not started, 1 running, -1 could not start */
static int helper_owned;

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void spin_while_equal(long *counter, long value) {
  long start = now_ns();
  while (__atomic_load_n(counter, __ATOMIC_ACQUIRE) == value && now_ns() - start < SPIN_NS) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
}

static void *helper_main(void *unused) {
  (void)unused;
  for (long seen = 0;;) {
    spin_while_equal(&posted, seen);
    pthread_mutex_lock(&job_lock);
    while (__atomic_load_n(&posted, __ATOMIC_ACQUIRE) == seen) pthread_cond_wait(&job_posted, &job_lock);
    seen = __atomic_load_n(&posted, __ATOMIC_ACQUIRE);
    struct job j = job;
    pthread_mutex_unlock(&job_lock);
    nn_tiles(j.M, j.N, j.K, j.alpha, j.a, j.lda, j.b, j.ldb, j.beta, j.c, j.ldc);
    pthread_mutex_lock(&job_lock);
    __atomic_store_n(&finished, seen, __ATOMIC_RELEASE);
    pthread_cond_signal(&job_done);
    pthread_mutex_unlock(&job_lock);
  }
  return NULL;
}

/* A forked child has no helper thread: it starts its own if it needs one. */
static void forget_helper(void) {
  pthread_mutex_init(&job_lock, NULL);
  pthread_cond_init(&job_posted, NULL);
  pthread_cond_init(&job_done, NULL);
  posted = finished = 0;
  helper = helper_owned = 0;
}

static void nn_gemm(int M, int N, int K, float alpha, const float *a, int lda, const float *b,
                    int ldb, float beta, float *c, int ldc) {
  /* at least two tiles each, so the first half (whole tiles) leaves rows for the helper */
  if (split_rows <= 0 || M < split_rows || M < 2 * SKINNY_MAX_ROWS ||
      __atomic_exchange_n(&helper_owned, 1, __ATOMIC_ACQUIRE)) {
    nn_tiles(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  pthread_mutex_lock(&job_lock);
  if (helper == 0) {
    pthread_t thread;
    helper = pthread_create(&thread, NULL, helper_main, NULL) == 0 ? 1 : -1;
    if (helper == 1) pthread_detach(thread);
  }
  if (helper < 0) {
    pthread_mutex_unlock(&job_lock);
    __atomic_store_n(&helper_owned, 0, __ATOMIC_RELEASE);
    nn_tiles(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  int half = (M / 2 + SKINNY_MAX_ROWS - 1) / SKINNY_MAX_ROWS * SKINNY_MAX_ROWS;
  job = (struct job){M - half, N, K, lda, ldb, ldc, alpha, beta, a + (size_t)half * lda, b, c + (size_t)half * ldc};
  long ticket = __atomic_add_fetch(&posted, 1, __ATOMIC_RELEASE);
  pthread_cond_signal(&job_posted);
  pthread_mutex_unlock(&job_lock);
  nn_tiles(half, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
  spin_while_equal(&finished, ticket - 1);
  pthread_mutex_lock(&job_lock);
  while (finished != ticket) pthread_cond_wait(&job_done, &job_lock);
  pthread_mutex_unlock(&job_lock);
  __atomic_store_n(&helper_owned, 0, __ATOMIC_RELEASE);
}

/* The A.B path alone, for the self-check: returns 0 if it does not take the shape. */
int semantic_skinny_gemm_nn(int M, int N, int K, float alpha, const float *a, int lda,
                            const float *b, int ldb, float beta, float *c, int ldc) {
  if (!nn_shape(ROW_MAJOR, NO_TRANS, NO_TRANS, M, N, K, alpha, lda, ldb, ldc)) return 0;
  nn_gemm(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
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
  if (M <= nn_rows && nn_shape(order, trans_a, trans_b, M, N, K, alpha, lda, ldb, ldc)) {
    __atomic_add_fetch(&nn_calls, 1, __ATOMIC_RELAXED);
    nn_gemm(M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  __atomic_add_fetch(&passed_calls, 1, __ATOMIC_RELAXED);
  sgemm_fn next = find_next();
  if (next)
    next(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
  else
    plain_sgemm(order, trans_a, trans_b, M, N, K, alpha, a, lda, b, ldb, beta, c, ldc);
}

/* MLX's CPU backend computes power(), and so the 2 ** x that stands in for exp (mlx_cpu.py), with
 * one libm powf call an element. For base 2, exp2f gives the same bits (checked over a third of a
 * billion arguments with glibc 2.36) in half the time, and in under half when the result is
 * tiny or subnormal, where powf takes a slow path (14 ns against 6 here). Other bases go on to
 * the next powf in the process. */
typedef float (*powf_fn)(float, float);
static powf_fn next_powf;

float powf(float x, float y) {
  if (x == 2.0f) return exp2f(y);
  powf_fn f = __atomic_load_n(&next_powf, __ATOMIC_ACQUIRE);
  if (!f) {
    f = (powf_fn)dlsym(RTLD_NEXT, "powf");
    if (!f) return (float)pow(x, y); /* no libm after us: cannot happen when we link it */
    __atomic_store_n(&next_powf, f, __ATOMIC_RELEASE);
  }
  return f(x, y);
}

/* For `semantic blas` and tests: calls taken here (0: A.B^T, 2: A.B) and passed on (1). */
long semantic_skinny_calls(int which) {
  return __atomic_load_n(which == 1 ? &passed_calls : which == 2 ? &nn_calls : &skinny_calls,
                         __ATOMIC_RELAXED);
}

__attribute__((constructor)) static void skinny_init(void) {
  pthread_atfork(NULL, NULL, forget_helper);
  const char *rows = getenv("SEMANTIC_SKINNY_ROWS");
  if (rows) {
    int r = atoi(rows);
    max_rows = r < 0 ? 0 : r > SKINNY_MAX_ROWS ? SKINNY_MAX_ROWS : r;
  }
  const char *nn = getenv("SEMANTIC_SKINNY_NN_ROWS");
  if (nn) {
    int r = atoi(nn);
    nn_rows = r < 0 ? 0 : r;
  }
  const char *split = getenv("SEMANTIC_SKINNY_SPLIT_ROWS");
  if (split) split_rows = atoi(split);
}
