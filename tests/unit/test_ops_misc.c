/* RoPE, adaptive modulation, gated residual, losses and MoE routing ops of the CPU table against
 * naive double references written here from ops.h; backward ops against central differences of
 * the F64 forward (parameter-like grads start non-zero: they must accumulate), F32 against F64.
 * Tolerances as in the other kernels tests: F64 1e-12, FD 1e-6, F32 1e-5 relative + small floor. */
#include "test_ops_common.h"

static const st_ops *ops;

/* ---- RoPE ---- */
static void test_rope(st_rope_layout layout, int64_t tbs_mode) {
  const int64_t B = 2, S = 5, H = 3, d = 6, half = d / 2, n = B * S * H * d;
  int64_t tbs = tbs_mode ? S * half : 0;
  test_rng rg = {21 + (uint64_t)layout * 2 + (uint64_t)tbs_mode};
  double *x = test_randd(&rg, n, -1, 1), *th = test_randd(&rg, B * S * half, -3, 3);
  double *co = test_zerosd(B * S * half), *si = test_zerosd(B * S * half), *ref = test_dupd(x, n), *y = test_dupd(x, n);
  for (int64_t i = 0; i < B * S * half; i++) { co[i] = cos(th[i]); si[i] = sin(th[i]); }
  for (int64_t b = 0; b < B; b++)
    for (int64_t s = 0; s < S; s++)
      for (int64_t h = 0; h < H; h++)
        for (int64_t k = 0; k < half; k++) {
          double t = th[(tbs_mode ? b * S * half : 0) + s * half + k];
          int64_t base = ((b * S + s) * H + h) * d;
          int64_t i0 = layout == ST_ROPE_INTERLEAVED ? base + 2 * k : base + k;
          int64_t i1 = layout == ST_ROPE_INTERLEAVED ? base + 2 * k + 1 : base + k + half;
          ref[i0] = x[i0] * cos(t) - x[i1] * sin(t);
          ref[i1] = x[i0] * sin(t) + x[i1] * cos(t);
        }
  CHECK(ops->rope_apply(ops, ST_F64, layout, y, co, si, tbs, B, S, H, d, false) == ST_OK);
  CLOSE_D("rope f64", y, ref, n, 1e-12, 1e-14);
  float *yf = test_tof(x, n), *cf = test_tof(co, B * S * half), *sf = test_tof(si, B * S * half);
  CHECK(ops->rope_apply(ops, ST_F32, layout, yf, cf, sf, tbs, B, S, H, d, false) == ST_OK);
  CLOSE_F("rope f32", yf, ref, n, 1e-5, 1e-6);
  /* inverse undoes forward: it is the backward (the rotation is orthogonal, its transpose is the
   * rotation by -theta) */
  CHECK(ops->rope_apply(ops, ST_F64, layout, y, co, si, tbs, B, S, H, d, true) == ST_OK);
  CLOSE_D("rope inverse", y, x, n, 1e-12, 1e-14);
  free(x); free(th); free(co); free(si); free(ref); free(y); free(yf); free(cf); free(sf);
}

/* ---- modulation ---- */
typedef struct mod_ctx { int64_t B, T, D, stride; double *x, *shift, *scale, *y, *r; bool has_shift; } mod_ctx;
static double mod_loss(void *v) {
  mod_ctx *c = v;
  ops->modulate_forward(ops, ST_F64, c->x, c->has_shift ? c->shift : NULL, c->scale, c->stride, c->y, c->B, c->T, c->D);
  return test_dot(c->y, c->r, c->B * c->T * c->D);
}

static void test_modulate(bool has_shift) {
  const int64_t B = 2, T = 7, D = 13, stride = 3 * D, n = B * T * D;
  test_rng rg = {31 + (uint64_t)has_shift};
  /* shift and scale are slices of a [B, 3D] modulation vector: shift at +0, scale at +D */
  double *modv = test_randd(&rg, B * stride, -1, 1), *x = test_randd(&rg, n, -2, 2), *r = test_randd(&rg, n, -1, 1);
  double *y = test_zerosd(n), *ref = test_zerosd(n);
  double *shift = modv, *scale = modv + D;
  for (int64_t b = 0; b < B; b++)
    for (int64_t t = 0; t < T; t++)
      for (int64_t j = 0; j < D; j++) {
        int64_t i = (b * T + t) * D + j;
        ref[i] = x[i] * (1 + scale[b * stride + j]) + (has_shift ? shift[b * stride + j] : 0);
      }
  CHECK(ops->modulate_forward(ops, ST_F64, x, has_shift ? shift : NULL, scale, stride, y, B, T, D) == ST_OK);
  CLOSE_D("modulate fwd", y, ref, n, 1e-13, 1e-14);
  mod_ctx c = {B, T, D, stride, x, shift, scale, y, r, has_shift};
  double *dmod0 = test_randd(&rg, B * stride, -1, 1), *dmod = test_dupd(dmod0, B * stride), *dx = test_zerosd(n);
  CHECK(ops->modulate_backward(ops, ST_F64, r, x, scale, stride, dx, has_shift ? dmod : NULL, dmod + D, B, T, D) == ST_OK);
  double *fdx = test_zerosd(n), *fdm = test_zerosd(B * stride);
  test_fd(mod_loss, &c, x, n, fdx);
  test_fd(mod_loss, &c, modv, B * stride, fdm);
  CLOSE_D("modulate dx vs fd", dx, fdx, n, 1e-6, 1e-8);
  for (int64_t i = 0; i < B * stride; i++) fdm[i] += dmod0[i]; /* accumulated onto the initial values */
  CLOSE_D("modulate dshift/dscale vs fd", dmod, fdm, B * stride, 1e-6, 1e-8);
  /* F32 */
  float *xf = test_tof(x, n), *mf = test_tof(modv, B * stride), *rf = test_tof(r, n), *yf = test_zerosf(n);
  float *dxf = test_zerosf(n), *dmf = test_tof(dmod0, B * stride);
  CHECK(ops->modulate_forward(ops, ST_F32, xf, has_shift ? mf : NULL, mf + D, stride, yf, B, T, D) == ST_OK);
  CLOSE_F("modulate fwd f32", yf, ref, n, 1e-5, 1e-6);
  CHECK(ops->modulate_backward(ops, ST_F32, rf, xf, mf + D, stride, dxf, has_shift ? dmf : NULL, dmf + D, B, T, D) == ST_OK);
  CLOSE_F("modulate dx f32", dxf, dx, n, 1e-5, 1e-6);
  CLOSE_F("modulate dmod f32", dmf, dmod, B * stride, 1e-5, 1e-5);
  free(modv); free(x); free(r); free(y); free(ref); free(dmod0); free(dmod); free(dx); free(fdx); free(fdm);
  free(xf); free(mf); free(rf); free(yf); free(dxf); free(dmf);
}

typedef struct gres_ctx { int64_t B, T, D, stride; double *h0, *h, *gate, *a, *r; } gres_ctx;
static double gres_loss(void *v) {
  gres_ctx *c = v;
  int64_t n = c->B * c->T * c->D;
  memcpy(c->h, c->h0, sizeof(double) * (size_t)n);
  ops->gated_residual_forward(ops, ST_F64, c->h, c->gate, c->stride, c->a, c->B, c->T, c->D);
  return test_dot(c->h, c->r, n);
}

static void test_gated_residual(bool has_gate) {
  const int64_t B = 2, T = 7, D = 13, stride = 2 * D, n = B * T * D;
  test_rng rg = {41 + (uint64_t)has_gate};
  double *h0 = test_randd(&rg, n, -1, 1), *a = test_randd(&rg, n, -1, 1), *gv = test_randd(&rg, B * stride, -1, 1);
  double *r = test_randd(&rg, n, -1, 1), *h = test_dupd(h0, n), *ref = test_zerosd(n);
  double *gate = has_gate ? gv + D : NULL; /* gate is the second slice of a [B, 2D] vector */
  for (int64_t b = 0; b < B; b++)
    for (int64_t i = b * T * D; i < (b + 1) * T * D; i++)
      ref[i] = h0[i] + (gate ? gate[b * stride + i % D] : 1) * a[i];
  CHECK(ops->gated_residual_forward(ops, ST_F64, h, gate, stride, a, B, T, D) == ST_OK);
  CLOSE_D("gated_residual fwd", h, ref, n, 1e-13, 1e-14);
  gres_ctx c = {B, T, D, stride, h0, h, gate, a, r};
  double *da = test_zerosd(n), *dg0 = test_randd(&rg, B * stride, -1, 1), *dg = test_dupd(dg0, B * stride);
  CHECK(ops->gated_residual_backward(ops, ST_F64, r, gate, stride, a, da, has_gate ? dg + D : NULL, B, T, D) == ST_OK);
  double *fda = test_zerosd(n);
  test_fd(gres_loss, &c, a, n, fda);
  CLOSE_D("gated_residual da vs fd", da, fda, n, 1e-6, 1e-8);
  if (has_gate) {
    double *fdg = test_zerosd(B * stride);
    test_fd(gres_loss, &c, gv, B * stride, fdg);
    for (int64_t i = 0; i < B * stride; i++) fdg[i] += dg0[i];
    CLOSE_D("gated_residual dgate vs fd", dg, fdg, B * stride, 1e-6, 1e-8);
    free(fdg);
  }
  float *hf = test_tof(h0, n), *af = test_tof(a, n), *gf = test_tof(gv, B * stride), *rf = test_tof(r, n);
  float *daf = test_zerosf(n), *dgf = test_tof(dg0, B * stride);
  CHECK(ops->gated_residual_forward(ops, ST_F32, hf, has_gate ? gf + D : NULL, stride, af, B, T, D) == ST_OK);
  CLOSE_F("gated_residual fwd f32", hf, ref, n, 1e-5, 1e-6);
  CHECK(ops->gated_residual_backward(ops, ST_F32, rf, has_gate ? gf + D : NULL, stride, af, daf,
                                     has_gate ? dgf + D : NULL, B, T, D) == ST_OK);
  CLOSE_F("gated_residual da f32", daf, da, n, 1e-5, 1e-6);
  CLOSE_F("gated_residual dgate f32", dgf, dg, B * stride, 1e-5, 1e-5);
  free(h0); free(a); free(gv); free(r); free(h); free(ref); free(da); free(dg0); free(dg); free(fda);
  free(hf); free(af); free(gf); free(rf); free(daf); free(dgf);
}

/* ---- losses ---- */
typedef struct mse_ctx { int64_t rows, cols; double *p, *t, *w; } mse_ctx;
static double mse_loss(void *v) {
  mse_ctx *c = v;
  double l = 0;
  ops->mse_forward(ops, ST_F64, c->p, c->t, c->w, c->rows, c->cols, &l);
  return l;
}

static void test_mse(bool weighted) {
  const int64_t rows = 7, cols = 13, n = rows * cols;
  test_rng rg = {51 + (uint64_t)weighted};
  double *p = test_randd(&rg, n, -1, 1), *t = test_randd(&rg, n, -1, 1), *w = weighted ? test_randd(&rg, rows, 0, 2) : NULL;
  double ref = 0;
  for (int64_t r = 0; r < rows; r++) {
    double s = 0;
    for (int64_t j = 0; j < cols; j++) s += (p[r * cols + j] - t[r * cols + j]) * (p[r * cols + j] - t[r * cols + j]);
    ref += (w ? w[r] : 1) * s / (double)cols;
  }
  ref /= (double)rows;
  double l = 0;
  CHECK(ops->mse_forward(ops, ST_F64, p, t, w, rows, cols, &l) == ST_OK);
  CHECK_CLOSE(l, ref, 1e-13, 0);
  double *dp = test_zerosd(n), *fd = test_zerosd(n);
  CHECK(ops->mse_backward(ops, ST_F64, p, t, w, rows, cols, 0.5, dp) == ST_OK);
  mse_ctx c = {rows, cols, p, t, w};
  test_fd(mse_loss, &c, p, n, fd);
  for (int64_t i = 0; i < n; i++) fd[i] *= 0.5; /* grad_scale */
  CLOSE_D("mse dpred vs fd", dp, fd, n, 1e-6, 1e-9);
  float *pf = test_tof(p, n), *tf = test_tof(t, n), *wf = weighted ? test_tof(w, rows) : NULL, *dpf = test_zerosf(n);
  double lf = 0;
  CHECK(ops->mse_forward(ops, ST_F32, pf, tf, wf, rows, cols, &lf) == ST_OK);
  CHECK_CLOSE(lf, ref, 1e-5, 0);
  CHECK(ops->mse_backward(ops, ST_F32, pf, tf, wf, rows, cols, 0.5, dpf) == ST_OK);
  CLOSE_F("mse dpred f32", dpf, dp, n, 1e-5, 1e-8);
  free(p); free(t); free(w); free(dp); free(fd); free(pf); free(tf); free(wf); free(dpf);
}

typedef struct ce_ctx { int64_t rows, vocab; double *x; int64_t *lab; } ce_ctx;
static double ce_loss(void *v) {
  ce_ctx *c = v;
  double l = 0;
  int64_t cnt = 0;
  ops->cross_entropy_forward(ops, ST_F64, c->x, c->lab, c->rows, c->vocab, -100, &l, &cnt);
  return l;
}

static void test_cross_entropy(void) {
  const int64_t rows = 7, vocab = 13, n = rows * vocab;
  test_rng rg = {61};
  double *x = test_randd(&rg, n, -4, 4);
  int64_t lab[7] = {3, -100, 12, 0, 5, -100, 7};
  double ref = 0;
  for (int64_t r = 0; r < rows; r++) {
    if (lab[r] == -100) continue;
    double m = -INFINITY, s = 0;
    for (int64_t j = 0; j < vocab; j++) m = fmax(m, x[r * vocab + j]);
    for (int64_t j = 0; j < vocab; j++) s += exp(x[r * vocab + j] - m);
    ref += m + log(s) - x[r * vocab + lab[r]];
  }
  double l = 0;
  int64_t cnt = 0;
  CHECK(ops->cross_entropy_forward(ops, ST_F64, x, lab, rows, vocab, -100, &l, &cnt) == ST_OK);
  CHECK_CLOSE(l, ref, 1e-13, 0);
  CHECK(cnt == 5);
  double *dx = test_zerosd(n), *fd = test_zerosd(n);
  CHECK(ops->cross_entropy_backward(ops, ST_F64, x, lab, rows, vocab, -100, 0.2, dx) == ST_OK);
  ce_ctx c = {rows, vocab, x, lab};
  test_fd(ce_loss, &c, x, n, fd);
  for (int64_t i = 0; i < n; i++) fd[i] *= 0.2;
  CLOSE_D("ce dlogits vs fd", dx, fd, n, 1e-6, 1e-9);
  for (int64_t j = 0; j < vocab; j++) CHECK(dx[1 * vocab + j] == 0); /* ignored row */
  float *xf = test_tof(x, n), *dxf = test_zerosf(n);
  double lf = 0;
  CHECK(ops->cross_entropy_forward(ops, ST_F32, xf, lab, rows, vocab, -100, &lf, &cnt) == ST_OK);
  CHECK_CLOSE(lf, ref, 1e-5, 0);
  CHECK(ops->cross_entropy_backward(ops, ST_F32, xf, lab, rows, vocab, -100, 0.2, dxf) == ST_OK);
  CLOSE_F("ce dlogits f32", dxf, dx, n, 1e-5, 1e-7);
  lab[0] = 13; /* out of range and not ignore_index */
  CHECK(ops->cross_entropy_forward(ops, ST_F64, x, lab, rows, vocab, -100, &l, &cnt) == ST_ERR_INVALID_ARGUMENT);
  free(x); free(dx); free(fd); free(xf); free(dxf);
}

/* ---- routing ---- */
static void test_topk(void) {
  const int64_t rows = 3, cols = 9, k = 4;
  /* row 0: ties at 5 (cols 1, 4, 7) and 2 (cols 0, 8); row 1 all equal; row 2 negative */
  const double x[3][9] = {{2, 5, 1, 3, 5, 0, -1, 5, 2}, {1, 1, 1, 1, 1, 1, 1, 1, 1}, {-3, -1, -2, -9, -1, -7, -4, -5, -6}};
  const int32_t want_idx[3][4] = {{1, 4, 7, 3}, {0, 1, 2, 3}, {1, 4, 2, 0}};
  const double want_val[3][4] = {{5, 5, 5, 3}, {1, 1, 1, 1}, {-1, -1, -2, -3}};
  double vals[12];
  float xf[27], valsf[12];
  int32_t idx[12];
  for (int i = 0; i < 27; i++) xf[i] = (float)x[i / 9][i % 9];
  CHECK(ops->topk(ops, ST_F64, x, rows, cols, k, vals, idx) == ST_OK);
  for (int r = 0; r < 3; r++)
    for (int j = 0; j < 4; j++) {
      CHECK_MSG(idx[r * 4 + j] == want_idx[r][j], "row %d pos %d: index %d, want %d", r, j, idx[r * 4 + j], want_idx[r][j]);
      CHECK(vals[r * 4 + j] == want_val[r][j]);
    }
  CHECK(ops->topk(ops, ST_F32, xf, rows, cols, k, valsf, idx) == ST_OK);
  for (int r = 0; r < 3; r++)
    for (int j = 0; j < 4; j++) CHECK(idx[r * 4 + j] == want_idx[r][j] && valsf[r * 4 + j] == (float)want_val[r][j]);
  CHECK(ops->topk(ops, ST_F32, xf, rows, cols, 10, valsf, idx) == ST_ERR_INVALID_ARGUMENT);
  /* a wide row with k = cols: the full descending sort, stable on ties */
  enum { W = 100 };
  float wide[W], wv[W];
  int32_t wi[W];
  for (int i = 0; i < W; i++) wide[i] = (float)((i * 37) % 11);
  CHECK(ops->topk(ops, ST_F32, wide, 1, W, W, wv, wi) == ST_OK);
  bool sorted = true;
  for (int i = 1; i < W; i++)
    sorted &= wv[i - 1] > wv[i] || (wv[i - 1] == wv[i] && wi[i - 1] < wi[i]);
  for (int i = 0; i < W; i++) sorted &= wide[wi[i]] == wv[i];
  CHECK(sorted);
}

static void test_gather_scatter(void) {
  const int64_t src_rows = 5, cols = 13, n = 7;
  test_rng rg = {71};
  double *src = test_randd(&rg, src_rows * cols, -1, 1), *dst = test_zerosd(n * cols);
  int32_t idx[7] = {4, 0, 0, 3, 1, 4, 2};
  CHECK(ops->gather_rows(ops, ST_F64, src, idx, n, cols, dst) == ST_OK);
  bool ok = true;
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < cols; j++) ok &= dst[i * cols + j] == src[idx[i] * cols + j];
  CHECK(ok);
  float *srcf = test_tof(src, src_rows * cols), *dstf = test_zerosf(n * cols);
  CHECK(ops->gather_rows(ops, ST_F32, srcf, idx, n, cols, dstf) == ST_OK);
  ok = true;
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < cols; j++) ok &= dstf[i * cols + j] == srcf[idx[i] * cols + j];
  CHECK(ok);

  /* scatter back with weights: duplicates (0 and 4 twice) accumulate onto existing values */
  double w[7] = {0.5, 1, 2, -1, 3, 0.25, 1};
  double *acc = test_randd(&rg, src_rows * cols, -1, 1), *ref = test_dupd(acc, src_rows * cols);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < cols; j++) ref[idx[i] * cols + j] += w[i] * dst[i * cols + j];
  CHECK(ops->scatter_add_rows(ops, ST_F64, dst, idx, w, n, cols, acc) == ST_OK);
  CLOSE_D("scatter_add weighted", acc, ref, src_rows * cols, 1e-14, 1e-15);
  float *accf = test_zerosf(src_rows * cols);
  double *ref2 = test_zerosd(src_rows * cols);
  for (int64_t i = 0; i < n; i++)
    for (int64_t j = 0; j < cols; j++) ref2[idx[i] * cols + j] += dstf[i * cols + j];
  CHECK(ops->scatter_add_rows(ops, ST_F32, dstf, idx, NULL, n, cols, accf) == ST_OK);
  CLOSE_F("scatter_add f32", accf, ref2, src_rows * cols, 1e-6, 1e-7);
  free(src); free(dst); free(srcf); free(dstf); free(acc); free(ref); free(accf); free(ref2);
}

int main(void) {
  ops = test_ops_create(2);
  for (int l = 0; l < 2; l++)
    for (int t = 0; t < 2; t++) test_rope((st_rope_layout)l, t);
  test_modulate(true);
  test_modulate(false);
  test_gated_residual(true);
  test_gated_residual(false);
  test_mse(false);
  test_mse(true);
  test_cross_entropy();
  test_topk();
  test_gather_scatter();
  st_cpu_ops_destroy(ops);
  return st_test_finish("test_ops_misc");
}
