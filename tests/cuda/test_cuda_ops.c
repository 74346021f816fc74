/* test_cuda_ops.c — every op of the CUDA ops table against the CPU ops table (kernels/cpu, itself
 * tested against naive references and finite differences in tests/unit), on random inputs, in F32
 * and BF16.
 *
 * Without a usable GPU (cudaGetDeviceCount fails or finds none) it checks that st_cuda_ops_create
 * refuses with ST_ERR_DEVICE and a message, then exits 77 (meson: SKIP).
 *
 * BF16 runs feed both tables the same values: inputs are rounded to bf16 first, the CPU computes in
 * F32 on those values, the GPU reads the bf16 words and computes in float. Where the contract stores
 * a bf16 intermediate (norm statistics, attention lse and out), the CPU backward reads the GPU's
 * bf16 values, so each comparison measures one kernel.
 *
 * Tolerances: |gpu - cpu| <= rtol (|cpu| + rms(cpu)), i.e. relative to the element, or to the RMS of
 * the whole output for elements near zero (cancellation makes a pure relative test meaningless
 * there).
 *   F32 elementwise, norms, softmax, RoPE, modulation, losses, optimizer: 1e-5 (float math on both
 *     sides, different reduction order: a few ulps).
 *   F32 GEMM and attention: 1e-4 (sums of k products in a different order; TF32 is off).
 *   BF16 outputs: 1e-2. bf16 keeps 8 significant bits, so the single rounding of a float result is
 *     up to 2^-9 = 2e-3 relative; an output computed from a bf16 intermediate (stats, lse) can be one
 *     more ulp off; 1e-2 is about 2.5 bf16 ulps (2^-8 = 3.9e-3) and still catches any wrong formula.
 *   BF16 GEMM with F32 output: 1e-4 (bf16 x bf16 products are exact in fp32, accumulation fp32).
 *   Host scalars (sumsq, MSE, cross-entropy sums): 1e-5 in both dtypes (no bf16 rounding of the
 *     result; partial sums in double).
 *   Casts, fill, copy, gather, top-k: bit-exact (a NaN only has to stay a NaN). */
#include "st_test.h"

#include <cpu_ops.h>
#include <cuda_ops.h>
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdlib.h>

static const st_ops *G; /* the CUDA table */
static const st_ops *C; /* the CPU table */

#define TOL_F32 1e-5
#define TOL_F32_GEMM 1e-4
#define TOL_BF16 1e-2

static const st_dtype DTS[2] = {ST_F32, ST_BF16};

/* ---- deterministic inputs ---- */
typedef struct trng { uint64_t s; } trng;
static double uni(trng *r, double lo, double hi) {
  r->s ^= r->s >> 12;
  r->s ^= r->s << 25;
  r->s ^= r->s >> 27;
  uint64_t v = r->s * 2685821657736338717ull;
  return lo + (hi - lo) * (double)(v >> 11) / 9007199254740992.0;
}

/* ---- per-case allocations, freed by release() ---- */
#define MAX_ALLOCS 512
static void *dev_allocs[MAX_ALLOCS], *host_allocs[MAX_ALLOCS];
static int n_dev, n_host;

static void *hmalloc(size_t bytes) {
  void *p = calloc(1, bytes ? bytes : 1);
  if (!p || n_host == MAX_ALLOCS) { fprintf(stderr, "out of host memory or slots\n"); exit(1); }
  host_allocs[n_host++] = p;
  return p;
}

static void *dmalloc(size_t bytes) {
  void *p = NULL;
  cudaError_t e = cudaMalloc(&p, bytes ? bytes : 16);
  if (e != cudaSuccess || n_dev == MAX_ALLOCS) {
    fprintf(stderr, "cudaMalloc(%zu): %s\n", bytes, cudaGetErrorString(e));
    exit(1);
  }
  dev_allocs[n_dev++] = p;
  return p;
}

static void release(void) {
  if (G) G->synchronize(G);
  for (int i = 0; i < n_dev; i++) cudaFree(dev_allocs[i]);
  for (int i = 0; i < n_host; i++) free(host_allocs[i]);
  n_dev = n_host = 0;
}

static const char *gmsg(void) {
  static st_error e;
  st_cuda_ops_last_error(G, &e);
  return e.message;
}

#define GPU_OK(expr)                                                                               \
  do {                                                                                             \
    st_result r_ = (expr);                                                                         \
    CHECK_MSG(r_ == ST_OK, "returned %d: %s", (int)r_, gmsg());                                    \
  } while (0)
#define CPU_OK(expr) CHECK_OK(expr, NULL)

static const st_device HOST = {ST_DEVICE_CPU, 0};

/* n floats in [lo, hi), rounded to bf16 when dt is BF16 */
static float *rnd(trng *r, int64_t n, double lo, double hi, st_dtype dt) {
  float *x = hmalloc(sizeof(float) * (size_t)n);
  for (int64_t i = 0; i < n; i++) {
    float v = (float)uni(r, lo, hi);
    x[i] = dt == ST_BF16 ? st_bf16_to_f32(st_f32_to_bf16(v)) : v;
  }
  return x;
}

static float *dupf(const float *x, int64_t n) {
  float *y = hmalloc(sizeof(float) * (size_t)n);
  memcpy(y, x, sizeof(float) * (size_t)n);
  return y;
}

/* device copy of x in dt, through the table's copy (ordered on its stream) */
static void *up(st_dtype dt, const float *x, int64_t n) {
  size_t es = st_dtype_size(dt);
  void *h = hmalloc(es * (size_t)n), *d = dmalloc(es * (size_t)n);
  for (int64_t i = 0; i < n; i++) {
    if (dt == ST_BF16) ((uint16_t *)h)[i] = st_f32_to_bf16(x[i]);
    else ((float *)h)[i] = x[i];
  }
  GPU_OK(G->copy(G, d, G->device, h, HOST, es * (size_t)n));
  return d;
}

static void *up_raw(const void *h, size_t bytes) {
  void *d = dmalloc(bytes);
  GPU_OK(G->copy(G, d, G->device, h, HOST, bytes));
  return d;
}

static float *down(st_dtype dt, const void *d, int64_t n) {
  size_t es = st_dtype_size(dt);
  void *h = hmalloc(es * (size_t)n);
  float *x = hmalloc(sizeof(float) * (size_t)n);
  GPU_OK(G->copy(G, h, HOST, d, G->device, es * (size_t)n));
  for (int64_t i = 0; i < n; i++) x[i] = dt == ST_BF16 ? st_bf16_to_f32(((uint16_t *)h)[i]) : ((float *)h)[i];
  return x;
}

static double tol(st_dtype dt, double f32) { return dt == ST_BF16 ? TOL_BF16 : f32; }

/* |got - ref| <= rtol (|ref| + rms(ref)); equal values (infinities included) pass */
static void cmp_at(const char *what, st_dtype dt, const float *got, const float *ref, int64_t n, double rtol,
                   int line) {
  double ss = 0;
  int64_t fin = 0;
  for (int64_t i = 0; i < n; i++)
    if (isfinite(ref[i])) { ss += (double)ref[i] * ref[i]; fin++; }
  double rms = fin ? sqrt(ss / (double)fin) : 0;
  double worst = 0;
  int64_t wi = -1;
  for (int64_t i = 0; i < n; i++) {
    if (got[i] == ref[i]) continue;
    double e = fabs((double)got[i] - ref[i]) / (rtol * (fabs(ref[i]) + rms) + 1e-30);
    if (!(e <= worst)) { worst = e; wi = i; }
  }
  st_test_checks_++;
  if (!(worst <= 1.0)) {
    st_test_failures_++;
    fprintf(stderr, "test_cuda_ops.c:%d: %s [%s]: element %lld = %.9g, expected %.9g (rtol %g, rms %g)\n", line,
            what, st_dtype_name(dt), (long long)wi, (double)got[wi], (double)ref[wi], rtol, rms);
  }
}
#define CMP(what, dt, got, ref, n, rtol) cmp_at(what, dt, got, ref, n, rtol, __LINE__)

static void cmp_scalar(const char *what, st_dtype dt, double got, double ref, double rtol) {
  CHECK_MSG(fabs(got - ref) <= rtol * fabs(ref) + 1e-12, "%s [%s]: %.12g, expected %.12g", what,
            st_dtype_name(dt), got, ref);
}

/* ================================ memory, fill, cast ================================ */
static void test_copy_fill(void) {
  trng r = {11};
  int64_t n = 1001;
  float *x = rnd(&r, n, -3, 3, ST_F32);
  void *d1 = up(ST_F32, x, n), *d2 = dmalloc(sizeof(float) * (size_t)n);
  GPU_OK(G->copy(G, d2, G->device, d1, G->device, sizeof(float) * (size_t)n)); /* D2D */
  float *back = down(ST_F32, d2, n);
  CHECK(memcmp(back, x, sizeof(float) * (size_t)n) == 0);

  /* the table's allocators: device and pinned memory, a round trip through both, and a refusal */
  float *pin = st_cuda_alloc_pinned(G, sizeof(float) * (size_t)n), *pin2 = st_cuda_alloc_pinned(G, sizeof(float) * (size_t)n);
  void *dev = st_cuda_alloc(G, sizeof(float) * (size_t)n);
  CHECK(pin && pin2 && dev);
  if (pin && pin2 && dev) {
    memcpy(pin, x, sizeof(float) * (size_t)n);
    GPU_OK(G->copy(G, dev, G->device, pin, HOST, sizeof(float) * (size_t)n));
    GPU_OK(G->copy(G, pin2, HOST, dev, G->device, sizeof(float) * (size_t)n));
    CHECK(memcmp(pin2, x, sizeof(float) * (size_t)n) == 0);
  }
  st_cuda_free(G, dev);
  st_cuda_free_pinned(G, pin);
  st_cuda_free_pinned(G, pin2);
  CHECK(st_cuda_alloc(G, (size_t)1 << 62) == NULL); /* 4 EiB */
  CHECK_CONTAINS(gmsg(), "cudaMalloc");

  for (int t = 0; t < ST_DTYPE_COUNT; t++) {
    st_dtype dt = (st_dtype)t;
    size_t es = st_dtype_size(dt);
    void *d = dmalloc(es * (size_t)n), *h = hmalloc(es * (size_t)n), *ref = hmalloc(es * (size_t)n);
    GPU_OK(G->fill(G, dt, d, n, 2.71828)); /* positive: a negative value into U8 is undefined in C */
    CPU_OK(C->fill(C, dt, ref, n, 2.71828));
    GPU_OK(G->copy(G, h, HOST, d, G->device, es * (size_t)n));
    CHECK_MSG(memcmp(h, ref, es * (size_t)n) == 0, "fill %s differs from the CPU's", st_dtype_name(dt));
  }
  release();
}

static double decode(st_dtype dt, const void *p, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  default: return st_f16_to_f32(((const uint16_t *)p)[i]);
  }
}

/* every float<->float pair and I32<->I64, bit for bit against the CPU cast, special values included
 * (a NaN must stay a NaN; its payload may differ: CUDA's double->float conversion makes a canonical
 * NaN where x86 keeps the payload) */
static void test_cast(void) {
  trng r = {12};
  enum { N = 4099 };
  double *src64 = hmalloc(sizeof(double) * N);
  const double specials[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 1e-45, -1e-40, 6e-8, 3e-5, 65504.0, 65519.99,
                             65520.0, 1e38, 3.5e38, 1.0 + 1.0 / 512, 1.0 + 3.0 / 512, 1.00390625, 2.5e-39};
  int ns = (int)(sizeof specials / sizeof specials[0]);
  for (int i = 0; i < N; i++) {
    if (i < ns) src64[i] = specials[i];
    else if (i % 3 == 0) src64[i] = uni(&r, -70000, 70000);
    else if (i % 3 == 1) src64[i] = uni(&r, -1, 1) * pow(2.0, uni(&r, -30, 30));
    else src64[i] = uni(&r, -4, 4);
  }
  const st_dtype fl[4] = {ST_F32, ST_F64, ST_BF16, ST_F16};
  for (int a = 0; a < 4; a++)
    for (int b = 0; b < 4; b++) {
      st_dtype s = fl[a], d = fl[b];
      size_t ss = st_dtype_size(s), ds = st_dtype_size(d);
      void *hs = hmalloc(ss * N), *ref = hmalloc(ds * N), *got = hmalloc(ds * N);
      CPU_OK(C->cast(C, ST_F64, src64, s, hs, N));
      CPU_OK(C->cast(C, s, hs, d, ref, N));
      void *dsrc = up_raw(hs, ss * N), *ddst = dmalloc(ds * N);
      GPU_OK(G->cast(G, s, dsrc, d, ddst, N));
      GPU_OK(G->copy(G, got, HOST, ddst, G->device, ds * N));
      int64_t first = -1;
      for (int64_t i = 0; i < N && first < 0; i++)
        if (memcmp((char *)got + i * ds, (char *)ref + i * ds, ds) != 0 &&
            !(isnan(decode(d, got, i)) && isnan(decode(d, ref, i))))
          first = i;
      CHECK_MSG(first < 0, "cast %s -> %s: element %lld (source %.17g) differs from the CPU's bits", st_dtype_name(s),
                st_dtype_name(d), (long long)first, first >= 0 ? src64[first] : 0.0);
    }
  int64_t *i64 = hmalloc(sizeof(int64_t) * N), *i64b = hmalloc(sizeof(int64_t) * N);
  int32_t *i32 = hmalloc(sizeof(int32_t) * N), *i32ref = hmalloc(sizeof(int32_t) * N);
  for (int i = 0; i < N; i++) i64[i] = (int64_t)(uni(&r, -1, 1) * 3e9);
  CPU_OK(C->cast(C, ST_I64, i64, ST_I32, i32ref, N));
  void *d64 = up_raw(i64, sizeof(int64_t) * N), *d32 = dmalloc(sizeof(int32_t) * N), *d64b = dmalloc(sizeof(int64_t) * N);
  GPU_OK(G->cast(G, ST_I64, d64, ST_I32, d32, N));
  GPU_OK(G->cast(G, ST_I32, d32, ST_I64, d64b, N));
  GPU_OK(G->copy(G, i32, HOST, d32, G->device, sizeof(int32_t) * N));
  GPU_OK(G->copy(G, i64b, HOST, d64b, G->device, sizeof(int64_t) * N));
  CHECK(memcmp(i32, i32ref, sizeof(int32_t) * N) == 0);
  bool widen_ok = true;
  for (int i = 0; i < N; i++) widen_ok &= i64b[i] == (int64_t)i32ref[i];
  CHECK(widen_ok);
  release();
}

/* ================================ elementwise ================================ */
static void test_elementwise(void) {
  for (int t = 0; t < 2; t++) {
    st_dtype dt = DTS[t];
    trng r = {100 + (uint64_t)t};
    int64_t n = 10007;
    float *a = rnd(&r, n, -4, 4, dt), *b = rnd(&r, n, -4, 4, dt), *ref = hmalloc(sizeof(float) * (size_t)n);
    void *da = up(dt, a, n), *db = up(dt, b, n), *dout = up(dt, b, n);
    double tl = tol(dt, TOL_F32);

    GPU_OK(G->add(G, dt, da, db, dout, n));
    CPU_OK(C->add(C, ST_F32, a, b, ref, n));
    CMP("add", dt, down(dt, dout, n), ref, n, tl);
    GPU_OK(G->mul(G, dt, da, db, dout, n));
    CPU_OK(C->mul(C, ST_F32, a, b, ref, n));
    CMP("mul", dt, down(dt, dout, n), ref, n, tl);

    float *y = dupf(b, n);
    void *dy = up(dt, y, n);
    GPU_OK(G->axpy(G, dt, n, -0.375, da, dy));
    CPU_OK(C->axpy(C, ST_F32, n, -0.375, a, y));
    CMP("axpy", dt, down(dt, dy, n), y, n, tl);
    GPU_OK(G->scale(G, dt, dy, n, 1.75));
    CPU_OK(C->scale(C, ST_F32, y, n, 1.75));
    /* bf16: two roundings (after axpy, after scale) against the CPU's float chain */
    CMP("scale", dt, down(dt, dy, n), y, n, dt == ST_BF16 ? 2 * TOL_BF16 : TOL_F32);

    for (int k = 0; k <= ST_GELU_ERF; k++) {
      GPU_OK(G->gelu_forward(G, dt, (st_gelu_kind)k, da, dout, n));
      CPU_OK(C->gelu_forward(C, ST_F32, (st_gelu_kind)k, a, ref, n));
      CMP(k == 0 ? "gelu_forward tanh" : k == 1 ? "gelu_forward sigmoid" : "gelu_forward erf", dt, down(dt, dout, n),
          ref, n, tl);
      GPU_OK(G->gelu_backward(G, dt, (st_gelu_kind)k, da, db, dout, n));
      CPU_OK(C->gelu_backward(C, ST_F32, (st_gelu_kind)k, a, b, ref, n));
      CMP(k == 0 ? "gelu_backward tanh" : k == 1 ? "gelu_backward sigmoid" : "gelu_backward erf", dt,
          down(dt, dout, n), ref, n, tl);
    }
    GPU_OK(G->silu_forward(G, dt, da, dout, n));
    CPU_OK(C->silu_forward(C, ST_F32, a, ref, n));
    CMP("silu_forward", dt, down(dt, dout, n), ref, n, tl);
    GPU_OK(G->silu_backward(G, dt, da, db, dout, n));
    CPU_OK(C->silu_backward(C, ST_F32, a, b, ref, n));
    CMP("silu_backward", dt, down(dt, dout, n), ref, n, tl);

    double gs = 0, cs = 0;
    GPU_OK(G->sumsq(G, dt, da, n, &gs));
    if (dt == ST_BF16) {
      uint16_t *hb = hmalloc(2 * (size_t)n);
      for (int64_t i = 0; i < n; i++) hb[i] = st_f32_to_bf16(a[i]);
      CPU_OK(C->sumsq(C, ST_BF16, hb, n, &cs));
    } else {
      CPU_OK(C->sumsq(C, ST_F32, a, n, &cs));
    }
    cmp_scalar("sumsq", dt, gs, cs, 1e-5);

    /* swiglu: x [rows, 2 cols] */
    int64_t rows = 33, cols = 129;
    float *x = rnd(&r, rows * 2 * cols, -3, 3, dt), *g = rnd(&r, rows * cols, -1, 1, dt);
    float *sy = hmalloc(sizeof(float) * (size_t)(rows * cols)), *sdx = hmalloc(sizeof(float) * (size_t)(rows * 2 * cols));
    void *dx = up(dt, x, rows * 2 * cols), *dg = up(dt, g, rows * cols);
    void *dsy = dmalloc(4 * (size_t)(rows * cols)), *dsdx = dmalloc(4 * (size_t)(rows * 2 * cols));
    GPU_OK(G->swiglu_forward(G, dt, dx, dsy, rows, cols));
    CPU_OK(C->swiglu_forward(C, ST_F32, x, sy, rows, cols));
    CMP("swiglu_forward", dt, down(dt, dsy, rows * cols), sy, rows * cols, tl);
    GPU_OK(G->swiglu_backward(G, dt, dx, dg, dsdx, rows, cols));
    CPU_OK(C->swiglu_backward(C, ST_F32, x, g, sdx, rows, cols));
    CMP("swiglu_backward", dt, down(dt, dsdx, rows * 2 * cols), sdx, rows * 2 * cols, tl);
    release();
  }
}

/* ================================ GEMM ================================ */
typedef struct gemm_case { int64_t m, n, k, batch; bool ta, tb, bias; double alpha, beta; } gemm_case;

static void gemm_one(st_dtype dt, st_dtype cdt, const gemm_case *gc, trng *r) {
  int64_t m = gc->m, n = gc->n, k = gc->k, B = gc->batch;
  int64_t a_rows = gc->ta ? k : m, a_cols = gc->ta ? m : k, b_rows = gc->tb ? n : k, b_cols = gc->tb ? k : n;
  int64_t lda = a_cols + 3, ldb = b_cols + 1, ldc = n + 2;
  int64_t sa = a_rows * lda + 5, sb = b_rows * ldb + 7, sc = m * ldc + 1;
  float *a = rnd(r, sa * B, -1, 1, dt), *b = rnd(r, sb * B, -1, 1, dt), *c = rnd(r, sc * B, -1, 1, cdt);
  float *bias = gc->bias ? rnd(r, n, -1, 1, cdt) : NULL;
  void *da = up(dt, a, sa * B), *db = up(dt, b, sb * B), *dc = up(cdt, c, sc * B);
  void *dbias = bias ? up(cdt, bias, n) : NULL;
  st_gemm_desc d = {.dtype = dt, .c_dtype = cdt, .trans_a = gc->ta, .trans_b = gc->tb, .m = m, .n = n, .k = k,
                    .alpha = gc->alpha, .beta = gc->beta, .a = da, .lda = lda, .stride_a = sa, .b = db, .ldb = ldb,
                    .stride_b = sb, .c = dc, .ldc = ldc, .stride_c = sc, .batch = B, .bias = dbias};
  GPU_OK(G->gemm(G, &d));
  st_gemm_desc h = d;
  h.dtype = h.c_dtype = ST_F32;
  h.a = a;
  h.b = b;
  h.c = c;
  h.bias = bias;
  CPU_OK(C->gemm(C, &h));
  char what[96];
  snprintf(what, sizeof what, "gemm m%lld n%lld k%lld b%lld ta%d tb%d bias%d C=%s", (long long)m, (long long)n,
           (long long)k, (long long)B, gc->ta, gc->tb, gc->bias, st_dtype_name(cdt));
  /* padding between rows and batches must be untouched, so compare the whole buffer */
  CMP(what, cdt, down(cdt, dc, sc * B), c, sc * B, cdt == ST_BF16 ? TOL_BF16 : TOL_F32_GEMM);
}

static void test_gemm(void) {
  trng r = {200};
  const gemm_case cases[] = {
      {67, 45, 33, 1, false, false, false, 1.0, 0.0}, {67, 45, 33, 1, true, false, true, 0.7, 0.3},
      {67, 45, 33, 1, false, true, true, 1.0, 1.0},   {31, 80, 129, 3, true, true, false, -0.5, 0.25},
      {128, 96, 256, 2, false, true, true, 1.0, 0.0}, {5, 7, 0, 2, false, false, true, 1.0, 0.5}, /* k = 0 */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    gemm_one(ST_F32, ST_F32, &cases[i], &r);
    gemm_one(ST_BF16, ST_BF16, &cases[i], &r);
    gemm_one(ST_BF16, ST_F32, &cases[i], &r);
    release();
  }
  /* F16 and F64 are refused, with the op and the types named */
  st_gemm_desc d = {.dtype = ST_F64, .c_dtype = ST_F64, .m = 1, .n = 1, .k = 1, .batch = 1, .lda = 1, .ldb = 1, .ldc = 1};
  CHECK(G->gemm(G, &d) == ST_ERR_UNSUPPORTED);
  CHECK_CONTAINS(gmsg(), "gemm");
  CHECK_CONTAINS(gmsg(), "F64");

  for (int t = 0; t < 2; t++) { /* bias_backward accumulates */
    st_dtype dt = DTS[t];
    int64_t rows = 300, cols = 77;
    float *dy = rnd(&r, rows * cols, -1, 1, dt), *db = rnd(&r, cols, -1, 1, dt);
    void *ddy = up(dt, dy, rows * cols), *ddb = up(dt, db, cols);
    GPU_OK(G->bias_backward(G, dt, ddy, rows, cols, ddb));
    CPU_OK(C->bias_backward(C, ST_F32, dy, rows, cols, db));
    CMP("bias_backward", dt, down(dt, ddb, cols), db, cols, tol(dt, TOL_F32));
    release();
  }
}

/* ================================ norms, softmax ================================ */
static void test_norms(void) {
  const int64_t shapes[][2] = {{37, 1000}, {5, 3}, {2, 4097}};
  for (int t = 0; t < 2; t++)
    for (int si = 0; si < 3; si++) {
      st_dtype dt = DTS[t];
      trng r = {300 + (uint64_t)(t * 10 + si)};
      int64_t rows = shapes[si][0], cols = shapes[si][1], n = rows * cols;
      double tl = tol(dt, TOL_F32);
      float *x = rnd(&r, n, -2, 3, dt), *dy = rnd(&r, n, -1, 1, dt), *w = rnd(&r, cols, 0.5, 1.5, dt);
      float *y = hmalloc(4 * (size_t)n), *mean = hmalloc(4 * (size_t)rows), *rstd = hmalloc(4 * (size_t)rows);
      float *dx = hmalloc(4 * (size_t)n);
      void *dx_d = up(dt, x, n), *ddy = up(dt, dy, n), *dw = up(dt, w, cols);
      void *dyo = dmalloc(4 * (size_t)n), *dmean = dmalloc(4 * (size_t)rows), *drstd = dmalloc(4 * (size_t)rows);
      void *ddx = dmalloc(4 * (size_t)n);

      GPU_OK(G->layernorm_forward(G, dt, dx_d, dyo, dmean, drstd, rows, cols, 1e-6));
      CPU_OK(C->layernorm_forward(C, ST_F32, x, y, mean, rstd, rows, cols, 1e-6));
      CMP("layernorm_forward y", dt, down(dt, dyo, n), y, n, tl);
      CMP("layernorm_forward mean", dt, down(dt, dmean, rows), mean, rows, tl);
      CMP("layernorm_forward rstd", dt, down(dt, drstd, rows), rstd, rows, tl);
      float *gm = down(dt, dmean, rows), *gr = down(dt, drstd, rows);
      GPU_OK(G->layernorm_backward(G, dt, ddy, dx_d, dmean, drstd, ddx, rows, cols));
      CPU_OK(C->layernorm_backward(C, ST_F32, dy, x, gm, gr, dx, rows, cols));
      CMP("layernorm_backward", dt, down(dt, ddx, n), dx, n, tl);

      for (int withw = 0; withw < 2; withw++) {
        GPU_OK(G->rmsnorm_forward(G, dt, dx_d, withw ? dw : NULL, dyo, drstd, rows, cols, 1e-5));
        CPU_OK(C->rmsnorm_forward(C, ST_F32, x, withw ? w : NULL, y, rstd, rows, cols, 1e-5));
        CMP("rmsnorm_forward y", dt, down(dt, dyo, n), y, n, tl);
        CMP("rmsnorm_forward rstd", dt, down(dt, drstd, rows), rstd, rows, tl);
        gr = down(dt, drstd, rows);
        float *gw = rnd(&r, cols, -1, 1, dt); /* dw accumulates into random contents */
        void *dgw = up(dt, gw, cols);
        GPU_OK(G->rmsnorm_backward(G, dt, ddy, dx_d, withw ? dw : NULL, drstd, ddx, dgw, rows, cols));
        CPU_OK(C->rmsnorm_backward(C, ST_F32, dy, x, withw ? w : NULL, gr, dx, gw, rows, cols));
        CMP("rmsnorm_backward dx", dt, down(dt, ddx, n), dx, n, tl);
        CMP("rmsnorm_backward dw", dt, down(dt, dgw, cols), gw, cols, tl);
      }

      /* softmax; row 1 is all -inf (zeros out) when there is one */
      float *sx = rnd(&r, n, -8, 8, dt);
      if (rows > 1)
        for (int64_t c = 0; c < cols; c++) sx[cols + c] = -INFINITY;
      void *dsx = up(dt, sx, n);
      GPU_OK(G->softmax_forward(G, dt, dsx, dyo, rows, cols));
      CPU_OK(C->softmax_forward(C, ST_F32, sx, y, rows, cols));
      CMP("softmax_forward", dt, down(dt, dyo, n), y, n, tl);
      float *gy = down(dt, dyo, n);
      GPU_OK(G->softmax_backward(G, dt, dyo, ddy, ddx, rows, cols));
      CPU_OK(C->softmax_backward(C, ST_F32, gy, dy, dx, rows, cols));
      CMP("softmax_backward", dt, down(dt, ddx, n), dx, n, tl);
      release();
    }
}

/* ================================ RoPE, modulation, gated residual ================================ */
static void test_rope_mod(void) {
  for (int t = 0; t < 2; t++) {
    st_dtype dt = DTS[t];
    trng r = {400 + (uint64_t)t};
    double tl = tol(dt, TOL_F32);
    int64_t B = 2, S = 19, H = 3, d = 64, n = B * S * H * d;
    for (int layout = 0; layout < 2; layout++)
      for (int per_sample = 0; per_sample < 2; per_sample++)
        for (int inv = 0; inv < 2; inv++) {
          int64_t tbs = per_sample ? S * d / 2 : 0, tn = (per_sample ? B : 1) * S * d / 2;
          float *x = rnd(&r, n, -2, 2, dt), *cs = hmalloc(4 * (size_t)tn), *sn = hmalloc(4 * (size_t)tn);
          for (int64_t i = 0; i < tn; i++) {
            double th = uni(&r, -3.2, 3.2);
            cs[i] = (float)cos(th);
            sn[i] = (float)sin(th);
            if (dt == ST_BF16) {
              cs[i] = st_bf16_to_f32(st_f32_to_bf16(cs[i]));
              sn[i] = st_bf16_to_f32(st_f32_to_bf16(sn[i]));
            }
          }
          void *dxr = up(dt, x, n), *dc = up(dt, cs, tn), *ds = up(dt, sn, tn);
          GPU_OK(G->rope_apply(G, dt, (st_rope_layout)layout, dxr, dc, ds, tbs, B, S, H, d, inv));
          CPU_OK(C->rope_apply(C, ST_F32, (st_rope_layout)layout, x, cs, sn, tbs, B, S, H, d, inv));
          CMP(layout ? "rope_apply half" : "rope_apply interleaved", dt, down(dt, dxr, n), x, n, tl);
        }
    release();

    int64_t T = 45, D = 130, stride = 3 * D, nn = B * T * D;
    float *x = rnd(&r, nn, -2, 2, dt), *mod = rnd(&r, B * stride, -1, 1, dt), *dy = rnd(&r, nn, -1, 1, dt);
    float *y = hmalloc(4 * (size_t)nn), *dx = hmalloc(4 * (size_t)nn);
    void *dxm = up(dt, x, nn), *dmod = up(dt, mod, B * stride), *ddy = up(dt, dy, nn), *dyo = dmalloc(4 * (size_t)nn);
    void *ddx = dmalloc(4 * (size_t)nn);
    const float *shift = mod, *scale = mod + D;
    const char *dshift_dev = (const char *)dmod, *dscale_dev = (const char *)dmod + D * st_dtype_size(dt);
    for (int with_shift = 0; with_shift < 2; with_shift++) {
      GPU_OK(G->modulate_forward(G, dt, dxm, with_shift ? dshift_dev : NULL, dscale_dev, stride, dyo, B, T, D));
      CPU_OK(C->modulate_forward(C, ST_F32, x, with_shift ? shift : NULL, scale, stride, y, B, T, D));
      CMP("modulate_forward", dt, down(dt, dyo, nn), y, nn, tl);
      float *acc = rnd(&r, B * stride, -1, 1, dt); /* dshift = acc[0:D], dscale = acc[D:2D] per batch row */
      void *dacc = up(dt, acc, B * stride);
      GPU_OK(G->modulate_backward(G, dt, ddy, dxm, dscale_dev, stride, ddx,
                                  with_shift ? dacc : NULL, (char *)dacc + D * st_dtype_size(dt), B, T, D));
      CPU_OK(C->modulate_backward(C, ST_F32, dy, x, scale, stride, dx, with_shift ? acc : NULL, acc + D, B, T, D));
      CMP("modulate_backward dx", dt, down(dt, ddx, nn), dx, nn, tl);
      CMP("modulate_backward dshift/dscale", dt, down(dt, dacc, B * stride), acc, B * stride, tl);
    }
    for (int with_gate = 0; with_gate < 2; with_gate++) {
      float *h = rnd(&r, nn, -1, 1, dt);
      void *dh = up(dt, h, nn);
      const char *gate_dev = (const char *)dmod + 2 * D * st_dtype_size(dt);
      GPU_OK(G->gated_residual_forward(G, dt, dh, with_gate ? gate_dev : NULL, stride, dxm, B, T, D));
      CPU_OK(C->gated_residual_forward(C, ST_F32, h, with_gate ? mod + 2 * D : NULL, stride, x, B, T, D));
      CMP("gated_residual_forward", dt, down(dt, dh, nn), h, nn, tl);
      float *acc = rnd(&r, B * stride, -1, 1, dt);
      void *dacc = up(dt, acc, B * stride);
      GPU_OK(G->gated_residual_backward(G, dt, ddy, with_gate ? gate_dev : NULL, stride, dxm, ddx,
                                        with_gate ? (char *)dacc + 2 * D * st_dtype_size(dt) : NULL, B, T, D));
      CPU_OK(C->gated_residual_backward(C, ST_F32, dy, with_gate ? mod + 2 * D : NULL, stride, x, dx,
                                        with_gate ? acc + 2 * D : NULL, B, T, D));
      CMP("gated_residual_backward da", dt, down(dt, ddx, nn), dx, nn, tl);
      CMP("gated_residual_backward dgate", dt, down(dt, dacc, B * stride), acc, B * stride, tl);
    }
    release();
  }
}

/* ================================ losses ================================ */
static void test_losses(void) {
  for (int t = 0; t < 2; t++) {
    st_dtype dt = DTS[t];
    trng r = {500 + (uint64_t)t};
    double tl = tol(dt, TOL_F32);
    int64_t rows = 50, cols = 333, n = rows * cols;
    float *p = rnd(&r, n, -2, 2, dt), *q = rnd(&r, n, -2, 2, dt), *w = rnd(&r, rows, 0, 2, dt);
    float *dp = hmalloc(4 * (size_t)n);
    void *dpd = up(dt, p, n), *dq = up(dt, q, n), *dw = up(dt, w, rows), *ddp = dmalloc(4 * (size_t)n);
    for (int ww = 0; ww < 2; ww++) {
      double gl = 0, cl = 0;
      GPU_OK(G->mse_forward(G, dt, dpd, dq, ww ? dw : NULL, rows, cols, &gl));
      CPU_OK(C->mse_forward(C, ST_F32, p, q, ww ? w : NULL, rows, cols, &cl));
      cmp_scalar("mse_forward", dt, gl, cl, 1e-5);
      GPU_OK(G->mse_backward(G, dt, dpd, dq, ww ? dw : NULL, rows, cols, 0.5, ddp));
      CPU_OK(C->mse_backward(C, ST_F32, p, q, ww ? w : NULL, rows, cols, 0.5, dp));
      CMP("mse_backward", dt, down(dt, ddp, n), dp, n, tl);
    }
    int64_t vocab = 1000, ne = rows * vocab;
    float *lg = rnd(&r, ne, -6, 6, dt), *dl = hmalloc(4 * (size_t)ne);
    int64_t *lab = hmalloc(sizeof(int64_t) * (size_t)rows);
    for (int64_t i = 0; i < rows; i++) lab[i] = i % 7 == 3 ? -100 : (int64_t)uni(&r, 0, (double)vocab);
    void *dlg = up(dt, lg, ne), *dlab = up_raw(lab, sizeof(int64_t) * (size_t)rows), *ddl = dmalloc(4 * (size_t)ne);
    double gs = 0, cs = 0;
    int64_t gn = 0, cn = 0;
    GPU_OK(G->cross_entropy_forward(G, dt, dlg, dlab, rows, vocab, -100, &gs, &gn));
    CPU_OK(C->cross_entropy_forward(C, ST_F32, lg, lab, rows, vocab, -100, &cs, &cn));
    cmp_scalar("cross_entropy_forward", dt, gs, cs, 1e-5);
    CHECK(gn == cn);
    GPU_OK(G->cross_entropy_backward(G, dt, dlg, dlab, rows, vocab, -100, 0.25, ddl));
    CPU_OK(C->cross_entropy_backward(C, ST_F32, lg, lab, rows, vocab, -100, 0.25, dl));
    CMP("cross_entropy_backward", dt, down(dt, ddl, ne), dl, ne, tl);
    /* an out-of-range label is an error naming the row and the value */
    lab[4] = vocab + 5;
    void *dbad = up_raw(lab, sizeof(int64_t) * (size_t)rows);
    CHECK(G->cross_entropy_forward(G, dt, dlg, dbad, rows, vocab, -100, &gs, &gn) == ST_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(gmsg(), "labels[4] = 1005");
    CHECK(G->cross_entropy_backward(G, dt, dlg, dbad, rows, vocab, -100, 1.0, ddl) == ST_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(gmsg(), "cross_entropy_backward");
    release();
  }
}

/* ================================ routing ================================ */
static void test_routing(void) {
  for (int t = 0; t < 2; t++) {
    st_dtype dt = DTS[t];
    trng r = {600 + (uint64_t)t};
    int64_t rows = 70, cols = 60, k = 6;
    float *x = rnd(&r, rows * cols, -1, 1, dt);
    for (int64_t i = 0; i < rows * cols; i += 5) x[i] = 0.5f; /* ties: lower index first */
    for (int64_t c = 0; c < cols; c++) x[3 * cols + c] = NAN;  /* a NaN row */
    float *vals = hmalloc(4 * (size_t)(rows * k));
    int32_t *idx = hmalloc(4 * (size_t)(rows * k)), *gidx = hmalloc(4 * (size_t)(rows * k));
    void *dxr = up(dt, x, rows * cols), *dv = dmalloc(4 * (size_t)(rows * k)), *di = dmalloc(4 * (size_t)(rows * k));
    GPU_OK(G->topk(G, dt, dxr, rows, cols, k, dv, di));
    CPU_OK(C->topk(C, ST_F32, x, rows, cols, k, vals, idx));
    GPU_OK(G->copy(G, gidx, HOST, di, G->device, 4 * (size_t)(rows * k)));
    CHECK_MSG(memcmp(gidx, idx, 4 * (size_t)(rows * k)) == 0, "topk indices differ [%s]", st_dtype_name(dt));
    float *gv = down(dt, dv, rows * k);
    bool same = true;
    for (int64_t i = 0; i < rows * k; i++) same &= gv[i] == vals[i] || (isnan(gv[i]) && isnan(vals[i]));
    CHECK_MSG(same, "topk values differ [%s]", st_dtype_name(dt));

    int64_t n = 90;
    int32_t *gi = hmalloc(4 * (size_t)n);
    for (int64_t i = 0; i < n; i++) gi[i] = (int32_t)uni(&r, 0, (double)rows);
    void *dgi = up_raw(gi, 4 * (size_t)n), *dgo = dmalloc(4 * (size_t)(n * cols));
    float *go = hmalloc(4 * (size_t)(n * cols));
    float *xs = rnd(&r, rows * cols, -1, 1, dt);
    void *dxs = up(dt, xs, rows * cols);
    GPU_OK(G->gather_rows(G, dt, dxs, dgi, n, cols, dgo));
    CPU_OK(C->gather_rows(C, ST_F32, xs, gi, n, cols, go));
    float *gg = down(dt, dgo, n * cols);
    CHECK_MSG(memcmp(gg, go, 4 * (size_t)(n * cols)) == 0, "gather_rows differs [%s]", st_dtype_name(dt));
    int32_t keep = gi[7];
    gi[7] = -2;
    void *dbad = up_raw(gi, 4 * (size_t)n);
    gi[7] = keep;
    CHECK(G->gather_rows(G, dt, dxs, dbad, n, cols, dgo) == ST_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(gmsg(), "idx[7]");

    float *src = rnd(&r, n * cols, -1, 1, dt), *rw = rnd(&r, n, 0, 1, dt), *acc = rnd(&r, rows * cols, -1, 1, dt);
    void *dsrc = up(dt, src, n * cols), *drw = up(dt, rw, n), *dacc = up(dt, acc, rows * cols);
    /* duplicates in gi: atomics in any order; bf16 rounds after every add (up to ~3 per row here),
     * so its tolerance is twice the usual bf16 one */
    GPU_OK(G->scatter_add_rows(G, dt, dsrc, dgi, drw, n, cols, dacc));
    CPU_OK(C->scatter_add_rows(C, ST_F32, src, gi, rw, n, cols, acc));
    CMP("scatter_add_rows", dt, down(dt, dacc, rows * cols), acc, rows * cols, dt == ST_BF16 ? 2 * TOL_BF16 : TOL_F32);
    CHECK(G->scatter_add_rows(G, dt, dsrc, dbad, drw, n, cols, dacc) == ST_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(gmsg(), "scatter_add_rows");
    release();
  }
}

/* ================================ optimizer ================================ */
static void optim_case(st_optim_type type, bool w_mode, double momentum, int64_t step, st_dtype pdt, st_dtype gdt,
                       trng *r) {
  int64_t n = 5003;
  float *p = rnd(r, n, -1, 1, pdt), *g = rnd(r, n, -0.1, 0.1, gdt), *m = rnd(r, n, -0.01, 0.01, ST_F32);
  float *v = rnd(r, n, 0, 1e-3, ST_F32), *master = dupf(p, n);
  void *dp = up(pdt, p, n), *dg = up(gdt, g, n), *dm = up(ST_F32, m, n), *dv = up(ST_F32, v, n);
  void *dmaster = pdt == ST_F32 ? NULL : up(ST_F32, master, n);
  st_optim_desc d = {.type = type, .n = n, .param = dp, .param_dtype = pdt, .master = dmaster, .grad = dg,
                     .grad_dtype = gdt, .exp_avg = dm, .exp_avg_sq = dv, .lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999,
                     .eps = 1e-8, .weight_decay = 0.1, .momentum = momentum, .adam_w_mode = w_mode, .step = step,
                     .grad_scale = 0.5};
  GPU_OK(G->optim_update(G, &d));
  /* the CPU in F32 on the same values (bf16 params: through its fp32 master as well) */
  st_optim_desc h = d;
  h.param = p;
  h.param_dtype = ST_F32;
  h.master = NULL;
  h.grad = g;
  h.grad_dtype = ST_F32;
  h.exp_avg = m;
  h.exp_avg_sq = v;
  CPU_OK(C->optim_update(C, &h));
  char what[80];
  snprintf(what, sizeof what, "optim type %d step %lld momentum %g param %s grad %s", (int)type, (long long)step,
           momentum, st_dtype_name(pdt), st_dtype_name(gdt));
  if (pdt == ST_F32) {
    CMP(what, ST_F32, down(ST_F32, dp, n), p, n, TOL_F32);
  } else {
    CMP(what, ST_F32, down(ST_F32, dmaster, n), p, n, TOL_F32); /* the master, in fp32 */
    CMP(what, pdt, down(pdt, dp, n), p, n, TOL_BF16);            /* the bf16 working copy */
  }
  if (type != ST_OPTIM_SGD || momentum != 0) CMP(what, ST_F32, down(ST_F32, dm, n), m, n, TOL_F32);
  if (type != ST_OPTIM_SGD) CMP(what, ST_F32, down(ST_F32, dv, n), v, n, TOL_F32);
  release();
}

static void test_optim(void) {
  trng r = {700};
  optim_case(ST_OPTIM_ADAMW, true, 0, 1, ST_F32, ST_F32, &r);
  optim_case(ST_OPTIM_ADAMW, true, 0, 7, ST_F32, ST_F32, &r);
  optim_case(ST_OPTIM_ADAM, false, 0, 3, ST_F32, ST_F32, &r);
  optim_case(ST_OPTIM_ADAM, true, 0, 3, ST_F32, ST_F32, &r);
  optim_case(ST_OPTIM_SGD, false, 0.9, 1, ST_F32, ST_F32, &r);
  optim_case(ST_OPTIM_SGD, false, 0.9, 4, ST_F32, ST_F32, &r);
  optim_case(ST_OPTIM_SGD, false, 0, 4, ST_F32, ST_F32, &r);
  optim_case(ST_OPTIM_ADAMW, true, 0, 5, ST_BF16, ST_BF16, &r);
  optim_case(ST_OPTIM_ADAMW, true, 0, 5, ST_BF16, ST_F32, &r);
}

/* ================================ attention ================================ */
typedef struct attn_case { int64_t B, Sq, Sk, H, KVH, d; bool causal, mask, seg; } attn_case;

static void attn_one(st_dtype dt, const attn_case *ac, trng *r) {
  int64_t nq = ac->B * ac->Sq * ac->H * ac->d, nk = ac->B * ac->Sk * ac->KVH * ac->d, nl = ac->B * ac->H * ac->Sq;
  float *q = rnd(r, nq, -1.5, 1.5, dt), *k = rnd(r, nk, -1.5, 1.5, dt), *v = rnd(r, nk, -1, 1, dt);
  float *dout = rnd(r, nq, -1, 1, dt);
  uint8_t *mask = NULL;
  int32_t *seg = NULL;
  if (ac->mask) {
    mask = hmalloc((size_t)(ac->B * ac->Sk));
    for (int64_t i = 0; i < ac->B * ac->Sk; i++) mask[i] = uni(r, 0, 1) < 0.7;
    for (int64_t j = 0; j < ac->Sk; j++) mask[j] = 0; /* batch 0 sees no key at all */
  }
  if (ac->seg) {
    seg = hmalloc(4 * (size_t)(ac->B * ac->Sq));
    for (int64_t b = 0; b < ac->B; b++)
      for (int64_t i = 0; i < ac->Sq; i++) seg[b * ac->Sq + i] = (int32_t)(i * 3 / ac->Sq + b);
  }
  void *dq = up(dt, q, nq), *dk = up(dt, k, nk), *dv = up(dt, v, nk), *ddout = up(dt, dout, nq);
  void *dout_d = dmalloc(4 * (size_t)nq), *dlse = dmalloc(4 * (size_t)nl);
  void *dmask = mask ? up_raw(mask, (size_t)(ac->B * ac->Sk)) : NULL;
  void *dseg = seg ? up_raw(seg, 4 * (size_t)(ac->B * ac->Sq)) : NULL;
  st_attn_desc d = {.dtype = dt, .batch = ac->B, .seq_q = ac->Sq, .seq_k = ac->Sk, .heads = ac->H,
                    .kv_heads = ac->KVH, .head_dim = ac->d, .scale = 1.0 / sqrt((double)ac->d), .causal = ac->causal,
                    .key_mask = dmask, .segment_ids = dseg, .q = dq, .k = dk, .v = dv, .out = dout_d, .lse = dlse};
  GPU_OK(G->attention_forward(G, &d));
  float *out = hmalloc(4 * (size_t)nq), *lse = hmalloc(4 * (size_t)nl);
  st_attn_desc h = d;
  h.dtype = ST_F32;
  h.key_mask = mask;
  h.segment_ids = seg;
  h.q = q;
  h.k = k;
  h.v = v;
  h.out = out;
  h.lse = lse;
  CPU_OK(C->attention_forward(C, &h));
  char what[128];
  snprintf(what, sizeof what, "attention B%lld Sq%lld Sk%lld H%lld/%lld d%lld causal%d mask%d seg%d",
           (long long)ac->B, (long long)ac->Sq, (long long)ac->Sk, (long long)ac->H, (long long)ac->KVH,
           (long long)ac->d, ac->causal, ac->mask, ac->seg);
  double tl = tol(dt, TOL_F32_GEMM);
  float *gout = down(dt, dout_d, nq), *glse = down(dt, dlse, nl);
  CMP(what, dt, gout, out, nq, tl);
  CMP(what, dt, glse, lse, nl, tl);
  /* backward: the CPU reads the GPU's out and lse, so only the backward kernel is measured */
  void *ddq = dmalloc(4 * (size_t)nq), *ddk = dmalloc(4 * (size_t)nk), *ddv = dmalloc(4 * (size_t)nk);
  GPU_OK(G->attention_backward(G, &d, ddout, ddq, ddk, ddv));
  float *cdq = hmalloc(4 * (size_t)nq), *cdk = hmalloc(4 * (size_t)nk), *cdv = hmalloc(4 * (size_t)nk);
  h.out = gout;
  h.lse = glse;
  CPU_OK(C->attention_backward(C, &h, dout, cdq, cdk, cdv));
  CMP(what, dt, down(dt, ddq, nq), cdq, nq, tl);
  CMP(what, dt, down(dt, ddk, nk), cdk, nk, tl);
  CMP(what, dt, down(dt, ddv, nk), cdv, nk, tl);
}

static void test_attention(void) {
  trng r = {800};
  const attn_case cases[] = {
      {2, 37, 37, 4, 2, 64, true, false, false},   /* GQA, causal */
      {1, 45, 20, 2, 2, 40, true, false, false},   /* seq_q > seq_k: early queries see nothing */
      {2, 20, 45, 3, 1, 32, false, true, false},   /* key mask; batch 0 fully masked */
      {2, 30, 30, 2, 1, 128, false, false, true},  /* segments, d 128 */
      {1, 300, 300, 1, 1, 256, true, false, false}, /* the largest head_dim of this kernel */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    attn_one(ST_F32, &cases[i], &r);
    attn_one(ST_BF16, &cases[i], &r);
    release();
  }
  st_attn_desc d = {.dtype = ST_F32, .batch = 1, .seq_q = 1, .seq_k = 1, .heads = 1, .kv_heads = 1,
                    .head_dim = 512, .scale = 1};
  CHECK(G->attention_forward(G, &d) == ST_ERR_UNSUPPORTED);
  CHECK_CONTAINS(gmsg(), "head_dim 512");
}

/* ================================ errors ================================ */
static void test_errors(void) {
  void *x = dmalloc(64);
  CHECK(G->add(G, ST_F64, x, x, x, 4) == ST_ERR_UNSUPPORTED);
  CHECK_CONTAINS(gmsg(), "add");
  CHECK_CONTAINS(gmsg(), "F64");
  CHECK(G->add(G, ST_F32, NULL, x, x, 4) == ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(gmsg(), "invalid argument");
  st_cuda_ops_clear_error(G);
  CHECK(st_cuda_ops_last_error(G, NULL) == ST_OK);
  st_device other = {ST_DEVICE_CUDA, G->device.index + 1};
  CHECK(G->copy(G, x, other, x, G->device, 16) == ST_ERR_UNSUPPORTED);
  CHECK_CONTAINS(gmsg(), "copy");
  release();
}

int main(void) {
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    /* no GPU: the table must refuse with a message, then the suite skips */
    const st_ops *o = NULL;
    st_error err;
    st_error_clear(&err);
    st_result rr = st_cuda_ops_create(0, &o, &err);
    if (rr != ST_ERR_DEVICE || o || !strstr(err.message, "no usable CUDA device")) {
      fprintf(stderr, "without a GPU st_cuda_ops_create returned %d (%s), expected ST_ERR_DEVICE\n", (int)rr,
              err.message);
      return 1;
    }
    fprintf(stderr, "SKIP: %s (%s)\n", e != cudaSuccess ? cudaGetErrorString(e) : "no CUDA device", err.message);
    return ST_TEST_SKIP;
  }
  st_error err;
  st_error_clear(&err);
  const st_ops *bad = NULL;
  CHECK(st_cuda_ops_create(count, &bad, &err) == ST_ERR_DEVICE); /* one past the last ordinal */
  CHECK_CONTAINS(err.message, "requested");
  if (st_cuda_ops_create(0, &G, &err) != ST_OK) {
    fprintf(stderr, "st_cuda_ops_create: %s\n", err.message);
    return 1;
  }
  if (st_cpu_ops_create(2, &C, &err) != ST_OK) {
    fprintf(stderr, "st_cpu_ops_create: %s\n", err.message);
    return 1;
  }
  test_copy_fill();
  test_cast();
  test_elementwise();
  test_gemm();
  test_norms();
  test_rope_mod();
  test_losses();
  test_routing();
  test_optim();
  test_attention();
  test_errors();
  release();
  st_cuda_ops_destroy(G);
  st_cpu_ops_destroy(C);
  return st_test_finish("test_cuda_ops");
}
