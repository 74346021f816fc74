/* Elementwise ops of the CPU table: memory, casts, arithmetic, activations, softmax, SwiGLU.
 * References are written here in double from the formulas in ops.h; backward ops are checked
 * against central differences of the F64 forward op, F32 against F64. Tolerances: F64 vs naive
 * 1e-12 (same formula, different summation order); F32 vs double 1e-5 relative + 1e-6 absolute
 * (float rounding of a few operations plus the AVX2 exp's ~1e-7 error); FD 1e-6 (see FD_EPS). */
#include "test_ops_common.h"

#include <pthread.h>

static const st_ops *ops;

static void test_memory(void) {
  enum { N = 1000 };
  unsigned char a[N], b[N];
  for (int i = 0; i < N; i++) a[i] = (unsigned char)(i * 7 + 3);
  st_device cpu = {ST_DEVICE_CPU, 0}, gpu = {ST_DEVICE_CUDA, 0};
  CHECK(ops->copy(ops, b, cpu, a, cpu, N) == ST_OK);
  CHECK(memcmp(a, b, N) == 0);
  CHECK(ops->copy(ops, b, gpu, a, cpu, N) == ST_ERR_UNSUPPORTED);

  float f[5];
  double d[5];
  uint16_t h[5];
  int32_t i32[5];
  int64_t i64[5];
  uint8_t u8[5];
  CHECK(ops->fill(ops, ST_F32, f, 5, 1.5) == ST_OK && f[0] == 1.5f && f[4] == 1.5f);
  CHECK(ops->fill(ops, ST_F64, d, 5, -2.25) == ST_OK && d[4] == -2.25);
  CHECK(ops->fill(ops, ST_BF16, h, 5, 3.0) == ST_OK && h[4] == 0x4040);
  CHECK(ops->fill(ops, ST_F16, h, 5, 1.0) == ST_OK && h[3] == 0x3C00);
  CHECK(ops->fill(ops, ST_I32, i32, 5, 7) == ST_OK && i32[4] == 7);
  CHECK(ops->fill(ops, ST_I64, i64, 5, -9) == ST_OK && i64[4] == -9);
  CHECK(ops->fill(ops, ST_U8, u8, 5, 1) == ST_OK && u8[4] == 1);
  CHECK(ops->synchronize(ops) == ST_OK);
}

static float bits_f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static void test_cast(void) {
  /* ties, NaN, infinities, subnormals (of float, bf16 and f16), overflow to f16 Inf */
  const float vals[] = {0.0f, -0.0f, 1.0f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f, 1.0f + 0x1p-11f, 1.0f + 3 * 0x1p-11f,
                        -2.5f, 65504.0f, 65519.0f, 65520.0f, 1e6f, 0x1p-24f, 0x1p-25f, 3 * 0x1p-26f, 0x1p-14f,
                        1e-40f, -1e-41f, bits_f(0x7f800000u), bits_f(0xff800000u), bits_f(0x7fc00000u),
                        bits_f(0x7f800001u), 3.14159265f, -1e-3f, bits_f(0x7f7fffffu)};
  enum { N = sizeof vals / sizeof vals[0] };
  uint16_t bf[N], hf[N], back[N];
  float f[N];
  double d[N];
  CHECK(ops->cast(ops, ST_F32, vals, ST_BF16, bf, N) == ST_OK);
  CHECK(ops->cast(ops, ST_F32, vals, ST_F16, hf, N) == ST_OK);
  for (int i = 0; i < N; i++) {
    CHECK_MSG(bf[i] == st_f32_to_bf16(vals[i]), "f32->bf16 of %a: %04x vs %04x", vals[i], bf[i], st_f32_to_bf16(vals[i]));
    CHECK_MSG(hf[i] == st_f32_to_f16(vals[i]), "f32->f16 of %a: %04x vs %04x", vals[i], hf[i], st_f32_to_f16(vals[i]));
  }
  /* known answers of the tie cases, independent of tensor.h */
  CHECK(bf[3] == 0x3F80 && bf[4] == 0x3F82); /* 1+2^-8 ties down to even, 1+3*2^-8 ties up */
  CHECK(hf[5] == 0x3C00 && hf[6] == 0x3C02);
  CHECK(hf[10] == 0x7C00 && hf[9] == 0x7BFF); /* 65520 overflows, 65519 rounds to max */
  CHECK(hf[12] == 0x0001 && hf[13] == 0x0000 && hf[14] == 0x0001); /* 2^-25 ties to 0, 1.5*2^-25 rounds up */
  CHECK((bf[20] & 0x7f80) == 0x7f80 && (bf[20] & 0x7f) != 0);
  CHECK((hf[21] & 0x7c00) == 0x7c00 && (hf[21] & 0x3ff) != 0);

  /* widening is exact */
  CHECK(ops->cast(ops, ST_BF16, bf, ST_F32, f, N) == ST_OK);
  for (int i = 0; i < N; i++) CHECK(memcmp(&f[i], &(float){st_bf16_to_f32(bf[i])}, 4) == 0);
  CHECK(ops->cast(ops, ST_F16, hf, ST_F64, d, N) == ST_OK);
  for (int i = 0; i < N; i++) CHECK(isnan(d[i]) ? isnan(st_f16_to_f32(hf[i])) : d[i] == (double)st_f16_to_f32(hf[i]));
  CHECK(ops->cast(ops, ST_F16, hf, ST_BF16, back, N) == ST_OK);
  for (int i = 0; i < N; i++) CHECK(back[i] == st_f32_to_bf16(st_f16_to_f32(hf[i])));
  CHECK(ops->cast(ops, ST_BF16, bf, ST_F16, back, N) == ST_OK);
  for (int i = 0; i < N; i++) CHECK(back[i] == st_f32_to_f16(st_bf16_to_f32(bf[i])));

  /* F64 sources: float-representable values agree with the float converters; values between
   * floats must round once (a double rounding through float would get these wrong) */
  for (int i = 0; i < N; i++) d[i] = vals[i];
  CHECK(ops->cast(ops, ST_F64, d, ST_BF16, bf, N) == ST_OK);
  CHECK(ops->cast(ops, ST_F64, d, ST_F16, hf, N) == ST_OK);
  CHECK(ops->cast(ops, ST_F64, d, ST_F32, f, N) == ST_OK);
  for (int i = 0; i < N; i++) {
    CHECK(bf[i] == st_f32_to_bf16(vals[i]));
    CHECK(hf[i] == st_f32_to_f16(vals[i]));
    CHECK(isnan(vals[i]) ? isnan(f[i]) : f[i] == vals[i]);
  }
  double tricky[4] = {1.0 + 0x1p-8 + 0x1p-30, 1.0 + 0x1p-11 + 0x1p-30, -(1.0 + 0x1p-8 + 0x1p-40), 1e300};
  CHECK(ops->cast(ops, ST_F64, tricky, ST_BF16, bf, 4) == ST_OK);
  CHECK(ops->cast(ops, ST_F64, tricky, ST_F16, hf, 4) == ST_OK);
  CHECK_MSG(bf[0] == 0x3F81, "%04x", bf[0]);
  CHECK_MSG(hf[1] == 0x3C01, "%04x", hf[1]);
  CHECK_MSG(bf[2] == 0xBF81, "%04x", bf[2]);
  CHECK(bf[3] == 0x7F80 && hf[3] == 0x7C00);

  int32_t i32[3] = {-5, 0, 2147483647};
  int64_t i64[3];
  CHECK(ops->cast(ops, ST_I32, i32, ST_I64, i64, 3) == ST_OK && i64[0] == -5 && i64[2] == 2147483647);
  i64[1] = 42;
  CHECK(ops->cast(ops, ST_I64, i64, ST_I32, i32, 3) == ST_OK && i32[1] == 42);
  CHECK(ops->cast(ops, ST_F32, vals, ST_I32, i32, 3) == ST_ERR_UNSUPPORTED);
}

static void test_arith(st_dtype dt, int64_t n) {
  test_rng r = {0x1234 + (uint64_t)n};
  double *a = test_randd(&r, n, -2, 2), *b = test_randd(&r, n, -2, 2), *ref = test_zerosd(n);
  size_t es = st_dtype_size(dt);
  void *A = malloc(es * (size_t)n), *B = malloc(es * (size_t)n), *O = malloc(es * (size_t)n);
  ST_CHECK_GOTO(ops->cast(ops, ST_F64, a, dt, A, n), (st_result){0}, out);
  ops->cast(ops, ST_F64, b, dt, B, n);
  /* references from the values actually stored in dt */
  double *ad = test_zerosd(n), *bd = test_zerosd(n), *od = test_zerosd(n);
  ops->cast(ops, dt, A, ST_F64, ad, n);
  ops->cast(ops, dt, B, ST_F64, bd, n);
  double rt = dt == ST_F32 ? 1e-6 : 1e-15, at = dt == ST_F32 ? 1e-6 : 1e-15;

  CHECK(ops->add(ops, dt, A, B, O, n) == ST_OK);
  for (int64_t i = 0; i < n; i++) ref[i] = ad[i] + bd[i];
  ops->cast(ops, dt, O, ST_F64, od, n);
  CLOSE_D("add", od, ref, n, rt, at);
  CHECK(ops->mul(ops, dt, A, B, O, n) == ST_OK);
  for (int64_t i = 0; i < n; i++) ref[i] = ad[i] * bd[i];
  ops->cast(ops, dt, O, ST_F64, od, n);
  CLOSE_D("mul", od, ref, n, rt, at);
  memcpy(O, B, es * (size_t)n);
  CHECK(ops->axpy(ops, dt, n, -0.75, A, O) == ST_OK);
  for (int64_t i = 0; i < n; i++) ref[i] = bd[i] - 0.75 * ad[i];
  ops->cast(ops, dt, O, ST_F64, od, n);
  CLOSE_D("axpy", od, ref, n, rt, at);
  CHECK(ops->scale(ops, dt, O, n, 3.0) == ST_OK);
  for (int64_t i = 0; i < n; i++) ref[i] *= 3.0;
  ops->cast(ops, dt, O, ST_F64, od, n);
  CLOSE_D("scale", od, ref, n, rt * 3, at * 3);
  double s = 0, got = -1;
  for (int64_t i = 0; i < n; i++) s += ad[i] * ad[i];
  CHECK(ops->sumsq(ops, dt, A, n, &got) == ST_OK);
  CHECK_CLOSE(got, s, 1e-12, 0); /* both accumulate in double */
  free(ad);
  free(bd);
  free(od);
out:
  free(a); free(b); free(ref); free(A); free(B); free(O);
}

static void test_sumsq_bf16(void) {
  uint16_t h[300];
  double s = 0;
  for (int i = 0; i < 300; i++) {
    h[i] = st_f32_to_bf16((float)(i - 150) * 0.01f);
    double v = st_bf16_to_f32(h[i]);
    s += v * v;
  }
  double got;
  CHECK(ops->sumsq(ops, ST_BF16, h, 300, &got) == ST_OK);
  CHECK_CLOSE(got, s, 1e-12, 0);
}

/* ---- activations ---- */
static double gelu_ref(int kind, double x) {
  if (kind == ST_GELU_TANH) return 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
  if (kind == ST_GELU_SIGMOID) return x / (1 + exp(-1.702 * x));
  return 0.5 * x * (1 + erf(x / sqrt(2.0)));
}
static double silu_ref(double x) { return x / (1 + exp(-x)); }

enum { ACT_GELU0, ACT_GELU1, ACT_GELU2, ACT_SILU };

typedef struct act_ctx { int act; int64_t n; double *x, *r, *y; } act_ctx;

static st_result act_fwd(int act, st_dtype dt, const void *x, void *y, int64_t n) {
  return act == ACT_SILU ? ops->silu_forward(ops, dt, x, y, n) : ops->gelu_forward(ops, dt, (st_gelu_kind)act, x, y, n);
}
static st_result act_bwd(int act, st_dtype dt, const void *x, const void *dy, void *dx, int64_t n) {
  return act == ACT_SILU ? ops->silu_backward(ops, dt, x, dy, dx, n)
                         : ops->gelu_backward(ops, dt, (st_gelu_kind)act, x, dy, dx, n);
}
static double act_loss(void *v) {
  act_ctx *c = v;
  act_fwd(c->act, ST_F64, c->x, c->y, c->n);
  return test_dot(c->y, c->r, c->n);
}

static void test_activation(int act, int64_t n) {
  test_rng rg = {99 + (uint64_t)act};
  double *x = test_randd(&rg, n, -6, 6), *r = test_randd(&rg, n, -1, 1), *y = test_zerosd(n), *ref = test_zerosd(n);
  for (int64_t i = 0; i < n; i++) ref[i] = act == ACT_SILU ? silu_ref(x[i]) : gelu_ref(act, x[i]);
  CHECK(act_fwd(act, ST_F64, x, y, n) == ST_OK);
  CLOSE_D("act fwd f64", y, ref, n, 1e-12, 1e-14);
  float *xf = test_tof(x, n), *yf = test_zerosf(n), *rf = test_tof(r, n), *dxf = test_zerosf(n);
  for (int64_t i = 0; i < n; i++) ref[i] = act == ACT_SILU ? silu_ref(xf[i]) : gelu_ref(act, xf[i]);
  CHECK(act_fwd(act, ST_F32, xf, yf, n) == ST_OK);
  CLOSE_F("act fwd f32", yf, ref, n, 1e-5, 1e-6);

  /* backward: F64 against central differences (first 200 elements), F32 against F64 */
  /* the FD loss covers only the differentiated elements: a long sum would drown the difference in
   * rounding noise (the op is elementwise, so this changes nothing else) */
  int64_t nfd = n < 200 ? n : 200;
  act_ctx c = {act, nfd, x, r, y};
  double *fd = test_zerosd(nfd), *dx = test_zerosd(n);
  CHECK(act_bwd(act, ST_F64, x, r, dx, n) == ST_OK);
  test_fd(act_loss, &c, x, nfd, fd);
  CLOSE_D("act bwd vs fd", dx, fd, nfd, 1e-6, 1e-8);
  CHECK(act_bwd(act, ST_F32, xf, rf, dxf, n) == ST_OK);
  for (int64_t i = 0; i < n; i++) { /* reference at the float inputs, to isolate the kernel */
    double h = 1e-6, xv = xf[i];
    double g = act == ACT_SILU ? (silu_ref(xv + h) - silu_ref(xv - h)) : (gelu_ref(act, xv + h) - gelu_ref(act, xv - h));
    ref[i] = (double)rf[i] * g / (2 * h);
  }
  CLOSE_F("act bwd f32", dxf, ref, n, 1e-5, 1e-6);
  free(x); free(r); free(y); free(ref); free(xf); free(yf); free(rf); free(dxf); free(fd); free(dx);
}

/* ---- SwiGLU and softmax: row ops ---- */
typedef struct row_ctx { int which; int64_t rows, cols; double *x, *r, *y; } row_ctx;
static double row_loss(void *v) {
  row_ctx *c = v;
  if (c->which == 0) ops->swiglu_forward(ops, ST_F64, c->x, c->y, c->rows, c->cols);
  else ops->softmax_forward(ops, ST_F64, c->x, c->y, c->rows, c->cols);
  return test_dot(c->y, c->r, c->rows * c->cols);
}

static void test_swiglu(void) {
  const int64_t rows = 7, cols = 13, nx = rows * 2 * cols, ny = rows * cols;
  test_rng rg = {5};
  double *x = test_randd(&rg, nx, -4, 4), *r = test_randd(&rg, ny, -1, 1), *y = test_zerosd(ny), *ref = test_zerosd(ny);
  for (int64_t i = 0; i < rows; i++)
    for (int64_t j = 0; j < cols; j++) {
      double g = x[i * 2 * cols + j], u = x[i * 2 * cols + cols + j];
      ref[i * cols + j] = g / (1 + exp(-g)) * u;
    }
  CHECK(ops->swiglu_forward(ops, ST_F64, x, y, rows, cols) == ST_OK);
  CLOSE_D("swiglu fwd", y, ref, ny, 1e-12, 1e-14);
  float *xf = test_tof(x, nx), *yf = test_zerosf(ny), *rf = test_tof(r, ny), *dxf = test_zerosf(nx);
  CHECK(ops->swiglu_forward(ops, ST_F32, xf, yf, rows, cols) == ST_OK);
  CLOSE_F("swiglu fwd f32", yf, ref, ny, 1e-5, 1e-5);
  row_ctx c = {0, rows, cols, x, r, y};
  double *fd = test_zerosd(nx), *dx = test_zerosd(nx);
  CHECK(ops->swiglu_backward(ops, ST_F64, x, r, dx, rows, cols) == ST_OK);
  test_fd(row_loss, &c, x, nx, fd);
  CLOSE_D("swiglu bwd vs fd", dx, fd, nx, 1e-6, 1e-8);
  CHECK(ops->swiglu_backward(ops, ST_F32, xf, rf, dxf, rows, cols) == ST_OK);
  CLOSE_F("swiglu bwd f32", dxf, dx, nx, 1e-5, 1e-5);
  free(x); free(r); free(y); free(ref); free(xf); free(yf); free(rf); free(dxf); free(fd); free(dx);
}

static void test_softmax(void) {
  const int64_t rows = 7, cols = 13, n = rows * cols;
  test_rng rg = {6};
  double *x = test_randd(&rg, n, -5, 5), *r = test_randd(&rg, n, -1, 1), *y = test_zerosd(n), *ref = test_zerosd(n);
  x[2 * cols + 3] = -INFINITY; /* a masked logit */
  for (int64_t i = 0; i < rows; i++) {
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < cols; j++) m = fmax(m, x[i * cols + j]);
    for (int64_t j = 0; j < cols; j++) s += exp(x[i * cols + j] - m);
    for (int64_t j = 0; j < cols; j++) ref[i * cols + j] = exp(x[i * cols + j] - m) / s;
  }
  CHECK(ops->softmax_forward(ops, ST_F64, x, y, rows, cols) == ST_OK);
  CLOSE_D("softmax fwd", y, ref, n, 1e-12, 1e-15);
  float *xf = test_tof(x, n), *yf = test_zerosf(n), *rf = test_tof(r, n), *dxf = test_zerosf(n);
  CHECK(ops->softmax_forward(ops, ST_F32, xf, yf, rows, cols) == ST_OK);
  CLOSE_F("softmax fwd f32", yf, ref, n, 1e-5, 1e-7);
  x[2 * cols + 3] = 0.3; /* differentiate at finite points */
  row_ctx c = {1, rows, cols, x, r, y};
  double *fd = test_zerosd(n), *dx = test_zerosd(n);
  ops->softmax_forward(ops, ST_F64, x, y, rows, cols);
  float *yf2 = test_tof(y, n);
  CHECK(ops->softmax_backward(ops, ST_F64, y, r, dx, rows, cols) == ST_OK);
  test_fd(row_loss, &c, x, n, fd);
  CLOSE_D("softmax bwd vs fd", dx, fd, n, 1e-6, 1e-9);
  CHECK(ops->softmax_backward(ops, ST_F32, yf2, rf, dxf, rows, cols) == ST_OK);
  CLOSE_F("softmax bwd f32", dxf, dx, n, 1e-5, 1e-6);
  free(x); free(r); free(y); free(ref); free(xf); free(yf); free(rf); free(dxf); free(fd); free(dx); free(yf2);
}

static void test_errors(void) {
  float x[4] = {0};
  CHECK(ops->add(ops, ST_BF16, x, x, x, 2) == ST_ERR_UNSUPPORTED);
  CHECK(ops->add(ops, ST_F32, NULL, x, x, 2) == ST_ERR_INVALID_ARGUMENT);
  CHECK(ops->softmax_forward(ops, ST_I32, x, x, 1, 4) == ST_ERR_UNSUPPORTED);
}

/* two threads sharing one table: the second caller finds the pool busy and runs inline; both
 * results must be right */
typedef struct conc_arg { float *a, *b, *o; int64_t n; int rc; } conc_arg;
static void *conc_main(void *v) {
  conc_arg *c = v;
  for (int it = 0; it < 20 && c->rc == 0; it++) c->rc = (int)ops->add(ops, ST_F32, c->a, c->b, c->o, c->n);
  return NULL;
}

static void test_concurrent_callers(void) {
  const int64_t n = 1 << 20;
  conc_arg args[2];
  pthread_t th[2];
  for (int t = 0; t < 2; t++) {
    args[t] = (conc_arg){test_zerosf(n), test_zerosf(n), test_zerosf(n), n, 0};
    for (int64_t i = 0; i < n; i++) { args[t].a[i] = (float)(i % 1000); args[t].b[i] = (float)(t + 1); }
    pthread_create(&th[t], NULL, conc_main, &args[t]);
  }
  for (int t = 0; t < 2; t++) {
    pthread_join(th[t], NULL);
    CHECK(args[t].rc == 0);
    bool ok = true;
    for (int64_t i = 0; i < n; i++) ok &= args[t].o[i] == (float)(i % 1000) + (float)(t + 1);
    CHECK_MSG(ok, "caller %d got a wrong sum", t);
    free(args[t].a); free(args[t].b); free(args[t].o);
  }
}

int main(void) {
  ops = test_ops_create(2);
  test_memory();
  test_cast();
  test_arith(ST_F32, 7);
  test_arith(ST_F32, 300007); /* crosses the threading threshold and the SIMD tail */
  test_arith(ST_F64, 13);
  test_arith(ST_F64, 300007);
  test_sumsq_bf16();
  for (int a = ACT_GELU0; a <= ACT_SILU; a++) {
    test_activation(a, 1001);
    test_activation(a, 20011);
  }
  test_swiglu();
  test_softmax();
  test_errors();
  test_concurrent_callers();
  st_cpu_ops_destroy(ops);
  return st_test_finish("test_ops_elementwise");
}
