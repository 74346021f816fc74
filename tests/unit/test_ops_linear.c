/* GEMM, bias backward, LayerNorm and RMSNorm of the CPU table against naive double references,
 * backward ops against central differences of the F64 forward, F32 against F64.
 * Tolerances: F64 1e-12 (summation order only); F32 1e-5 relative with an absolute floor scaled to
 * the magnitudes involved (k-term float dot products); FD 1e-6 (see FD_EPS in test_ops_common.h). */
#include "test_ops_common.h"

static const st_ops *ops;

static void gemm_case(st_dtype dt, bool ta, bool tb, int64_t batch, bool bias, double alpha, double beta) {
  const int64_t m = 7, n = 13, k = 5;
  /* leading dimensions larger than the matrices, to check they are honoured */
  int64_t lda = (ta ? m : k) + 2, ldb = (tb ? k : n) + 1, ldc = n + 3;
  int64_t a_rows = ta ? k : m, b_rows = tb ? n : k;
  int64_t sa = a_rows * lda + 4, sb = b_rows * ldb + 1, sc = m * ldc + 2;
  test_rng rg = {(uint64_t)(ta * 2 + tb + 10 * batch)};
  double *a = test_randd(&rg, batch * sa, -1, 1), *b = test_randd(&rg, batch * sb, -1, 1);
  double *c = test_randd(&rg, batch * sc, -1, 1), *bi = test_randd(&rg, n, -1, 1), *ref = test_dupd(c, batch * sc);
  for (int64_t p = 0; p < batch; p++)
    for (int64_t i = 0; i < m; i++)
      for (int64_t j = 0; j < n; j++) {
        double s = 0;
        for (int64_t q = 0; q < k; q++) {
          double av = ta ? a[p * sa + q * lda + i] : a[p * sa + i * lda + q];
          double bv = tb ? b[p * sb + j * ldb + q] : b[p * sb + q * ldb + j];
          s += av * bv;
        }
        double *o = &ref[p * sc + i * ldc + j];
        *o = alpha * s + beta * *o + (bias ? bi[j] : 0);
      }
  st_gemm_desc d = {.dtype = dt, .c_dtype = dt, .trans_a = ta, .trans_b = tb, .m = m, .n = n, .k = k,
                    .alpha = alpha, .beta = beta, .lda = lda, .stride_a = sa, .ldb = ldb, .stride_b = sb,
                    .ldc = ldc, .stride_c = sc, .batch = batch};
  if (dt == ST_F64) {
    d.a = a; d.b = b; d.c = c; d.bias = bias ? bi : NULL;
    CHECK(ops->gemm(ops, &d) == ST_OK);
    CLOSE_D("gemm f64", c, ref, batch * sc, 1e-12, 1e-13);
  } else {
    float *af = test_tof(a, batch * sa), *bf = test_tof(b, batch * sb), *cf = test_tof(c, batch * sc), *bif = test_tof(bi, n);
    /* the reference uses the double inputs: rounding them to float moves the result by ~1e-7
     * relative, well inside the tolerance */
    d.a = af; d.b = bf; d.c = cf; d.bias = bias ? bif : NULL;
    CHECK(ops->gemm(ops, &d) == ST_OK);
    CLOSE_F("gemm f32", cf, ref, batch * sc, 1e-5, 1e-5);
    free(af); free(bf); free(cf); free(bif);
  }
  free(a); free(b); free(c); free(bi); free(ref);
}

static void test_gemm(void) {
  for (int t = 0; t < 4; t++) {
    gemm_case(ST_F64, t & 1, t & 2, 1, false, 1.0, 0.0);
    gemm_case(ST_F64, t & 1, t & 2, 2, true, 0.5, 1.0);
    gemm_case(ST_F32, t & 1, t & 2, 1, true, 1.0, 0.0);
    gemm_case(ST_F32, t & 1, t & 2, 3, false, -2.0, 0.25);
  }
  float x[4] = {0};
  st_gemm_desc d = {.dtype = ST_BF16, .c_dtype = ST_F32, .m = 1, .n = 1, .k = 1, .lda = 1, .ldb = 1, .ldc = 1,
                    .batch = 1, .a = x, .b = x, .c = x, .alpha = 1};
  CHECK(ops->gemm(ops, &d) == ST_ERR_UNSUPPORTED);
  d.dtype = ST_F32;
  d.c_dtype = ST_F64;
  CHECK(ops->gemm(ops, &d) == ST_ERR_UNSUPPORTED);
  d.c_dtype = ST_F32;
  d.k = 3; /* lda 1 < k */
  CHECK(ops->gemm(ops, &d) == ST_ERR_INVALID_ARGUMENT);
}

static void test_bias_backward(void) {
  const int64_t rows = 7, cols = 13;
  test_rng rg = {3};
  double *dy = test_randd(&rg, rows * cols, -1, 1), *db = test_randd(&rg, cols, -1, 1), *ref = test_dupd(db, cols);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) ref[c] += dy[r * cols + c];
  float *dyf = test_tof(dy, rows * cols), *dbf = test_tof(db, cols);
  CHECK(ops->bias_backward(ops, ST_F64, dy, rows, cols, db) == ST_OK);
  CLOSE_D("bias_backward (accumulates)", db, ref, cols, 1e-13, 1e-14);
  CHECK(ops->bias_backward(ops, ST_F32, dyf, rows, cols, dbf) == ST_OK);
  CLOSE_F("bias_backward f32", dbf, ref, cols, 1e-5, 1e-6);
  free(dy); free(db); free(ref); free(dyf); free(dbf);
}

/* ---- norms ---- */
typedef struct norm_ctx { bool rms; int64_t rows, cols; double *x, *w, *r, *y, *mean, *rstd; double eps; } norm_ctx;
static double norm_loss(void *v) {
  norm_ctx *c = v;
  if (c->rms) ops->rmsnorm_forward(ops, ST_F64, c->x, c->w, c->y, c->rstd, c->rows, c->cols, c->eps);
  else ops->layernorm_forward(ops, ST_F64, c->x, c->y, c->mean, c->rstd, c->rows, c->cols, c->eps);
  return test_dot(c->y, c->r, c->rows * c->cols);
}

static void test_norm(bool rms, bool gain, int64_t rows, int64_t cols) {
  const int64_t n = rows * cols;
  const double eps = 1e-5;
  test_rng rg = {11 + (uint64_t)rms * 2 + (uint64_t)gain + (uint64_t)cols};
  double *x = test_randd(&rg, n, -2, 3), *w = gain ? test_randd(&rg, cols, 0.5, 1.5) : NULL;
  double *r = test_randd(&rg, n, -1, 1), *y = test_zerosd(n), *mean = test_zerosd(rows), *rstd = test_zerosd(rows);
  double *ref = test_zerosd(n), *ref_rstd = test_zerosd(rows), *ref_mean = test_zerosd(rows);
  for (int64_t i = 0; i < rows; i++) {
    const double *xr = x + i * cols;
    double mu = 0, v = 0;
    for (int64_t j = 0; j < cols; j++) mu += xr[j];
    mu /= (double)cols;
    if (rms) {
      for (int64_t j = 0; j < cols; j++) v += xr[j] * xr[j];
      ref_rstd[i] = 1 / sqrt(v / (double)cols + eps);
      for (int64_t j = 0; j < cols; j++) ref[i * cols + j] = xr[j] * ref_rstd[i] * (w ? w[j] : 1);
    } else {
      for (int64_t j = 0; j < cols; j++) v += (xr[j] - mu) * (xr[j] - mu);
      ref_mean[i] = mu;
      ref_rstd[i] = 1 / sqrt(v / (double)cols + eps);
      for (int64_t j = 0; j < cols; j++) ref[i * cols + j] = (xr[j] - mu) * ref_rstd[i];
    }
  }
  if (rms) CHECK(ops->rmsnorm_forward(ops, ST_F64, x, w, y, rstd, rows, cols, eps) == ST_OK);
  else {
    CHECK(ops->layernorm_forward(ops, ST_F64, x, y, mean, rstd, rows, cols, eps) == ST_OK);
    CLOSE_D("ln mean", mean, ref_mean, rows, 1e-12, 1e-14);
  }
  CLOSE_D("norm fwd", y, ref, n, 1e-12, 1e-13);
  CLOSE_D("norm rstd", rstd, ref_rstd, rows, 1e-12, 0);

  float *xf = test_tof(x, n), *wf = gain ? test_tof(w, cols) : NULL, *rf = test_tof(r, n), *yf = test_zerosf(n);
  float *meanf = test_zerosf(rows), *rstdf = test_zerosf(rows), *dxf = test_zerosf(n), *dwf = gain ? test_zerosf(cols) : NULL;
  if (rms) CHECK(ops->rmsnorm_forward(ops, ST_F32, xf, wf, yf, rstdf, rows, cols, (double)eps) == ST_OK);
  else CHECK(ops->layernorm_forward(ops, ST_F32, xf, yf, meanf, rstdf, rows, cols, eps) == ST_OK);
  CLOSE_F("norm fwd f32", yf, ref, n, 1e-5, 1e-5);
  CLOSE_F("norm rstd f32", rstdf, ref_rstd, rows, 1e-5, 0);

  /* backward: dx against FD of every input; dw starts non-zero to check it accumulates */
  norm_ctx c = {rms, rows, cols, x, w, r, y, mean, rstd, eps};
  norm_loss(&c);
  double *dx = test_zerosd(n), *fd = test_zerosd(n), *dw0 = gain ? test_randd(&rg, cols, -1, 1) : NULL;
  double *dw = gain ? test_dupd(dw0, cols) : NULL;
  if (rms) CHECK(ops->rmsnorm_backward(ops, ST_F64, r, x, w, rstd, dx, dw, rows, cols) == ST_OK);
  else CHECK(ops->layernorm_backward(ops, ST_F64, r, x, mean, rstd, dx, rows, cols) == ST_OK);
  test_fd(norm_loss, &c, x, n, fd);
  CLOSE_D("norm dx vs fd", dx, fd, n, 1e-6, 1e-8);
  if (gain) {
    double *fdw = test_zerosd(cols);
    test_fd(norm_loss, &c, w, cols, fdw);
    for (int64_t j = 0; j < cols; j++) fdw[j] += dw0[j];
    CLOSE_D("rms dw vs fd (+= initial)", dw, fdw, cols, 1e-6, 1e-8);
    free(fdw);
    float *dw0f = test_tof(dw0, cols);
    memcpy(dwf, dw0f, sizeof(float) * (size_t)cols);
    free(dw0f);
  }
  if (rms) CHECK(ops->rmsnorm_backward(ops, ST_F32, rf, xf, wf, rstdf, dxf, dwf, rows, cols) == ST_OK);
  else CHECK(ops->layernorm_backward(ops, ST_F32, rf, xf, meanf, rstdf, dxf, rows, cols) == ST_OK);
  CLOSE_F("norm dx f32", dxf, dx, n, 1e-5, 1e-5);
  if (gain) CLOSE_F("rms dw f32", dwf, dw, cols, 1e-5, 1e-5);
  free(x); free(w); free(r); free(y); free(mean); free(rstd); free(ref); free(ref_rstd); free(ref_mean);
  free(xf); free(wf); free(rf); free(yf); free(meanf); free(rstdf); free(dxf); free(dwf); free(dx); free(fd);
  free(dw0); free(dw);
}

int main(void) {
  ops = test_ops_create(2);
  test_gemm();
  test_bias_backward();
  for (int rms = 0; rms < 2; rms++) {
    test_norm(rms, false, 7, 13);
    test_norm(rms, false, 3, 64);
    if (rms) {
      test_norm(true, true, 7, 13);
      test_norm(true, true, 5, 40);
    }
  }
  /* a large case through the threaded path, forward only against the F64 op */
  {
    const int64_t rows = 301, cols = 257, n = rows * cols;
    test_rng rg = {77};
    double *x = test_randd(&rg, n, -1, 1), *y = test_zerosd(n), *m = test_zerosd(rows), *s = test_zerosd(rows);
    float *xf = test_tof(x, n), *yf = test_zerosf(n), *mf = test_zerosf(rows), *sf = test_zerosf(rows);
    ops->layernorm_forward(ops, ST_F64, x, y, m, s, rows, cols, 1e-6);
    CHECK(ops->layernorm_forward(ops, ST_F32, xf, yf, mf, sf, rows, cols, 1e-6) == ST_OK);
    CLOSE_F("ln large f32", yf, y, n, 1e-5, 1e-5);
    free(x); free(y); free(m); free(s); free(xf); free(yf); free(mf); free(sf);
  }
  st_cpu_ops_destroy(ops);
  return st_test_finish("test_ops_linear");
}
