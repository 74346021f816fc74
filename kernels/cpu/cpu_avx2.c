/* cpu_avx2.c — AVX2 + FMA versions of the hot F32 kernels. This file alone is compiled with
 * -mavx2 -mfma; st_cpu_kern_avx2 is called only after __builtin_cpu_supports said yes. Loops do
 * 8 lanes at a time and finish the tail with the scalar code of the generic level. */
#include "cpu_internal.h"

#include <immintrin.h>
#include <math.h>

static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline double hsum4d(__m256d v) {
  __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
  return _mm_cvtsd_f64(s);
}


/* e^x: x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial to r^7 (relative error < 1e-8
 * before rounding), times 2^n built in the exponent field. Below -87.3 the result is 0 (the
 * float range ends there); NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_min_ps(hi, x); /* NaN passes through as the second operand */
  xc = _mm256_max_ps(lo, xc);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}

static inline __m256 sigmoid8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_div_ps(one, _mm256_add_ps(one, e));
}

static void add_avx2(const float *a, const float *b, float *o, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; i++) o[i] = a[i] + b[i];
}

static void mul_avx2(const float *a, const float *b, float *o, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i)));
  for (; i < n; i++) o[i] = a[i] * b[i];
}

static void axpy_avx2(int64_t n, float alpha, const float *x, float *y) {
  __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; i++) y[i] += alpha * x[i];
}

static void scale_avx2(float *x, int64_t n, float alpha) {
  __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(a, _mm256_loadu_ps(x + i)));
  for (; i < n; i++) x[i] *= alpha;
}

static double sumsq_avx2(const float *x, int64_t n) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    s0 = _mm256_fmadd_pd(lo, lo, s0);
    s1 = _mm256_fmadd_pd(hi, hi, s1);
  }
  double s = hsum4d(_mm256_add_pd(s0, s1));
  for (; i < n; i++) s += (double)x[i] * (double)x[i];
  return s;
}

static float sum_avx2(const float *x, int64_t n) {
  __m256 s = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + i));
  float r = hsum8(s);
  for (; i < n; i++) r += x[i];
  return r;
}

static void ln_fwd_row_avx2(const float *x, float *y, float *mean, float *rstd, int64_t cols, float eps) {
  float mu = sum_avx2(x, cols) / (float)cols;
  __m256 m = _mm256_set1_ps(mu), acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) {
    __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
    acc = _mm256_fmadd_ps(d, d, acc);
  }
  float var = hsum8(acc);
  for (; i < cols; i++) var += (x[i] - mu) * (x[i] - mu);
  float r = 1.0f / sqrtf(var / (float)cols + eps);
  __m256 rv = _mm256_set1_ps(r);
  for (i = 0; i + 8 <= cols; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), rv));
  for (; i < cols; i++) y[i] = (x[i] - mu) * r;
  *mean = mu;
  *rstd = r;
}

static void ln_bwd_row_avx2(const float *dy, const float *x, float mean, float rstd, float *dx, int64_t cols) {
  __m256 m = _mm256_set1_ps(mean), r = _mm256_set1_ps(rstd), a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) {
    __m256 g = _mm256_loadu_ps(dy + i), xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), r);
    a0 = _mm256_add_ps(a0, g);
    a1 = _mm256_fmadd_ps(g, xh, a1);
  }
  float sdy = hsum8(a0), sdyx = hsum8(a1);
  for (; i < cols; i++) {
    sdy += dy[i];
    sdyx += dy[i] * (x[i] - mean) * rstd;
  }
  sdy /= (float)cols;
  sdyx /= (float)cols;
  __m256 vs = _mm256_set1_ps(sdy), vx = _mm256_set1_ps(sdyx);
  for (i = 0; i + 8 <= cols; i += 8) {
    __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), r);
    __m256 t = _mm256_fnmadd_ps(xh, vx, _mm256_sub_ps(_mm256_loadu_ps(dy + i), vs));
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(r, t));
  }
  for (; i < cols; i++) dx[i] = rstd * (dy[i] - sdy - (x[i] - mean) * rstd * sdyx);
}

static void rms_fwd_row_avx2(const float *x, const float *w, float *y, float *rstd, int64_t cols, float eps) {
  float r = 1.0f / sqrtf((float)(sumsq_avx2(x, cols) / (double)cols) + eps);
  __m256 rv = _mm256_set1_ps(r);
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) {
    __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x + i), rv);
    if (w) v = _mm256_mul_ps(v, _mm256_loadu_ps(w + i));
    _mm256_storeu_ps(y + i, v);
  }
  for (; i < cols; i++) y[i] = x[i] * r * (w ? w[i] : 1.0f);
  *rstd = r;
}

static void rms_bwd_row_avx2(const float *dy, const float *x, const float *w, float rstd, float *dx, float *dw_acc,
                             int64_t cols) {
  __m256 r = _mm256_set1_ps(rstd), acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) {
    __m256 g = _mm256_loadu_ps(dy + i);
    if (w) g = _mm256_mul_ps(g, _mm256_loadu_ps(w + i));
    acc = _mm256_fmadd_ps(g, _mm256_mul_ps(_mm256_loadu_ps(x + i), r), acc);
  }
  float sgx = hsum8(acc);
  for (; i < cols; i++) sgx += dy[i] * (w ? w[i] : 1.0f) * x[i] * rstd;
  sgx /= (float)cols;
  __m256 vs = _mm256_set1_ps(sgx);
  for (i = 0; i + 8 <= cols; i += 8) {
    __m256 d = _mm256_loadu_ps(dy + i), xh = _mm256_mul_ps(_mm256_loadu_ps(x + i), r);
    __m256 g = w ? _mm256_mul_ps(d, _mm256_loadu_ps(w + i)) : d;
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(r, _mm256_fnmadd_ps(xh, vs, g)));
    if (dw_acc) _mm256_storeu_ps(dw_acc + i, _mm256_fmadd_ps(d, xh, _mm256_loadu_ps(dw_acc + i)));
  }
  for (; i < cols; i++) {
    float xh = x[i] * rstd, g = dy[i] * (w ? w[i] : 1.0f);
    dx[i] = rstd * (g - xh * sgx);
    if (dw_acc) dw_acc[i] += dy[i] * xh;
  }
}

static inline __m256 gelu8(st_gelu_kind kind, __m256 x) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  if (kind == ST_GELU_TANH) {
    /* 0.5 (1 + tanh u) = sigmoid(2u), which keeps its accuracy where tanh u -> -1 */
    __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 u2 = _mm256_mul_ps(_mm256_set1_ps(2 * 0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    (void)half;
    (void)one;
    return _mm256_mul_ps(x, sigmoid8(u2));
  }
  return _mm256_mul_ps(x, sigmoid8(_mm256_mul_ps(_mm256_set1_ps(1.702f), x)));
}

static inline __m256 gelu_grad8(st_gelu_kind kind, __m256 x) {
  const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  if (kind == ST_GELU_TANH) {
    const __m256 c = _mm256_set1_ps(0.7978845608028654f), a = _mm256_set1_ps(0.044715f);
    /* d/dx x sigmoid(2u) = s + 2 x s (1 - s) u' */
    __m256 x2 = _mm256_mul_ps(x, x);
    __m256 s = sigmoid8(_mm256_mul_ps(_mm256_add_ps(c, c), _mm256_fmadd_ps(_mm256_mul_ps(a, x2), x, x)));
    __m256 inner = _mm256_mul_ps(c, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(3.0f), a), x2, one));
    __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_add_ps(x, x), s), _mm256_sub_ps(one, s));
    (void)half;
    return _mm256_fmadd_ps(t, inner, s);
  }
  const __m256 k = _mm256_set1_ps(1.702f);
  __m256 s = sigmoid8(_mm256_mul_ps(k, x));
  return _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(k, x), s), _mm256_sub_ps(one, s), s);
}

static void gelu_fwd_avx2(st_gelu_kind kind, const float *x, float *y, int64_t n) {
  int64_t i = 0;
  if (kind != ST_GELU_ERF)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, gelu8(kind, _mm256_loadu_ps(x + i)));
  for (; i < n; i++) y[i] = st_cpu_gelu_f32(kind, x[i]);
}

static void gelu_bwd_avx2(st_gelu_kind kind, const float *x, const float *dy, float *dx, int64_t n) {
  int64_t i = 0;
  if (kind != ST_GELU_ERF)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), gelu_grad8(kind, _mm256_loadu_ps(x + i))));
  for (; i < n; i++) dx[i] = dy[i] * st_cpu_gelu_grad_f32(kind, x[i]);
}

static inline float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }

static void silu_fwd_avx2(const float *x, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(v, sigmoid8(v)));
  }
  for (; i < n; i++) y[i] = x[i] * sigmoid1(x[i]);
}

static inline __m256 silu_grad8(__m256 v) {
  const __m256 one = _mm256_set1_ps(1.0f);
  __m256 s = sigmoid8(v);
  return _mm256_mul_ps(s, _mm256_fmadd_ps(v, _mm256_sub_ps(one, s), one));
}

static void silu_bwd_avx2(const float *x, const float *dy, float *dx, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dx + i, _mm256_mul_ps(_mm256_loadu_ps(dy + i), silu_grad8(_mm256_loadu_ps(x + i))));
  for (; i < n; i++) {
    float s = sigmoid1(x[i]);
    dx[i] = dy[i] * s * (1.0f + x[i] * (1.0f - s));
  }
}

static void swiglu_fwd_avx2(const float *g, const float *u, float *y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(g + i);
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(v, sigmoid8(v)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; i++) y[i] = g[i] * sigmoid1(g[i]) * u[i];
}

static void swiglu_bwd_avx2(const float *g, const float *u, const float *dy, float *dg, float *du, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(g + i), d = _mm256_loadu_ps(dy + i), uu = _mm256_loadu_ps(u + i);
    __m256 s = sigmoid8(v);
    __m256 grad = _mm256_mul_ps(s, _mm256_fmadd_ps(v, _mm256_sub_ps(one, s), one));
    _mm256_storeu_ps(dg + i, _mm256_mul_ps(_mm256_mul_ps(d, uu), grad));
    _mm256_storeu_ps(du + i, _mm256_mul_ps(d, _mm256_mul_ps(v, s)));
  }
  for (; i < n; i++) {
    float s = sigmoid1(g[i]);
    dg[i] = dy[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
    du[i] = dy[i] * g[i] * s;
  }
}

static float exp_shift_sum_avx2(float *x, int64_t n, float shift) {
  __m256 sh = _mm256_set1_ps(shift), acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh));
    _mm256_storeu_ps(x + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float s = hsum8(acc);
  for (; i < n; i++) {
    x[i] = expf(x[i] - shift);
    s += x[i];
  }
  return s;
}

static void adam_avx2(float *p, const float *g, float *m, float *v, int64_t n, const st_adam_consts *c) {
  const __m256 gs = _mm256_set1_ps(c->grad_scale), l2 = _mm256_set1_ps(c->l2), decay = _mm256_set1_ps(c->decay);
  const __m256 b1 = _mm256_set1_ps(c->beta1), b2 = _mm256_set1_ps(c->beta2);
  const __m256 ob1 = _mm256_set1_ps(c->one_minus_beta1), ob2 = _mm256_set1_ps(c->one_minus_beta2);
  const __m256 bc2 = _mm256_set1_ps(c->bc2_sqrt), eps = _mm256_set1_ps(c->eps), step = _mm256_set1_ps(c->step_size);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 pi = _mm256_loadu_ps(p + i);
    __m256 gi = _mm256_fmadd_ps(l2, pi, _mm256_mul_ps(_mm256_loadu_ps(g + i), gs));
    pi = _mm256_mul_ps(pi, decay);
    __m256 mi = _mm256_fmadd_ps(ob1, gi, _mm256_mul_ps(b1, _mm256_loadu_ps(m + i)));
    __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(ob2, gi), gi, _mm256_mul_ps(b2, _mm256_loadu_ps(v + i)));
    __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
    pi = _mm256_fnmadd_ps(step, _mm256_div_ps(mi, denom), pi);
    _mm256_storeu_ps(p + i, pi);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
  }
  for (; i < n; i++) {
    float gi = g[i] * c->grad_scale + c->l2 * p[i];
    float pi = p[i] * c->decay;
    float mi = m[i] * c->beta1 + c->one_minus_beta1 * gi;
    float vi = v[i] * c->beta2 + c->one_minus_beta2 * gi * gi;
    p[i] = pi - c->step_size * (mi / (sqrtf(vi) / c->bc2_sqrt + c->eps));
    m[i] = mi;
    v[i] = vi;
  }
}

void st_cpu_kern_avx2(st_cpu_kern *k) {
  k->level = "avx2";
  k->add = add_avx2;
  k->mul = mul_avx2;
  k->axpy = axpy_avx2;
  k->scale = scale_avx2;
  k->sumsq = sumsq_avx2;
  k->ln_fwd_row = ln_fwd_row_avx2;
  k->ln_bwd_row = ln_bwd_row_avx2;
  k->rms_fwd_row = rms_fwd_row_avx2;
  k->rms_bwd_row = rms_bwd_row_avx2;
  k->gelu_fwd = gelu_fwd_avx2;
  k->gelu_bwd = gelu_bwd_avx2;
  k->silu_fwd = silu_fwd_avx2;
  k->silu_bwd = silu_bwd_avx2;
  k->swiglu_fwd = swiglu_fwd_avx2;
  k->swiglu_bwd = swiglu_bwd_avx2;
  k->exp_shift_sum = exp_shift_sum_avx2;
  k->adam_f32 = adam_avx2;
}
