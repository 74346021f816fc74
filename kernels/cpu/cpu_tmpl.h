/* cpu_tmpl.h — portable row and stream kernels, instantiated twice by cpu_kernels.c:
 * T = float (the generic F32 level) and T = double (the F64 reference path).
 * Needs T, SFX, EXP, LOG, TANH, ERF, SQRT defined by the includer. Reductions accumulate in double. */

#define ST_CAT2(a, b) a##_##b
#define ST_CAT(a, b) ST_CAT2(a, b)
#define K(name) ST_CAT(name, SFX)

void K(st_k_add)(const T *a, const T *b, T *out, int64_t n);
void K(st_k_add)(const T *a, const T *b, T *out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = a[i] + b[i];
}

void K(st_k_mul)(const T *a, const T *b, T *out, int64_t n);
void K(st_k_mul)(const T *a, const T *b, T *out, int64_t n) {
  for (int64_t i = 0; i < n; i++) out[i] = a[i] * b[i];
}

void K(st_k_axpy)(int64_t n, T alpha, const T *x, T *y);
void K(st_k_axpy)(int64_t n, T alpha, const T *x, T *y) {
  for (int64_t i = 0; i < n; i++) y[i] += alpha * x[i];
}

void K(st_k_scale)(T *x, int64_t n, T alpha);
void K(st_k_scale)(T *x, int64_t n, T alpha) {
  for (int64_t i = 0; i < n; i++) x[i] *= alpha;
}

double K(st_k_sumsq)(const T *x, int64_t n);
double K(st_k_sumsq)(const T *x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += (double)x[i] * (double)x[i];
  return s;
}

void K(st_k_ln_fwd_row)(const T *x, T *y, T *mean, T *rstd, int64_t cols, T eps);
void K(st_k_ln_fwd_row)(const T *x, T *y, T *mean, T *rstd, int64_t cols, T eps) {
  double s = 0;
  for (int64_t c = 0; c < cols; c++) s += x[c];
  double mu = s / (double)cols, v = 0;
  for (int64_t c = 0; c < cols; c++) v += ((double)x[c] - mu) * ((double)x[c] - mu);
  double r = 1.0 / sqrt(v / (double)cols + (double)eps);
  for (int64_t c = 0; c < cols; c++) y[c] = (T)(((double)x[c] - mu) * r);
  *mean = (T)mu;
  *rstd = (T)r;
}

/* dx = rstd * (dy - mean(dy) - xhat * mean(dy * xhat)) */
void K(st_k_ln_bwd_row)(const T *dy, const T *x, T mean, T rstd, T *dx, int64_t cols);
void K(st_k_ln_bwd_row)(const T *dy, const T *x, T mean, T rstd, T *dx, int64_t cols) {
  double sdy = 0, sdyx = 0;
  for (int64_t c = 0; c < cols; c++) {
    double xh = ((double)x[c] - mean) * rstd;
    sdy += dy[c];
    sdyx += dy[c] * xh;
  }
  sdy /= (double)cols;
  sdyx /= (double)cols;
  for (int64_t c = 0; c < cols; c++) {
    double xh = ((double)x[c] - mean) * rstd;
    dx[c] = (T)((double)rstd * ((double)dy[c] - sdy - xh * sdyx));
  }
}

void K(st_k_rms_fwd_row)(const T *x, const T *w, T *y, T *rstd, int64_t cols, T eps);
void K(st_k_rms_fwd_row)(const T *x, const T *w, T *y, T *rstd, int64_t cols, T eps) {
  double s = 0;
  for (int64_t c = 0; c < cols; c++) s += (double)x[c] * (double)x[c];
  double r = 1.0 / sqrt(s / (double)cols + (double)eps);
  for (int64_t c = 0; c < cols; c++) y[c] = (T)((double)x[c] * r * (w ? (double)w[c] : 1.0));
  *rstd = (T)r;
}

/* g = dy * w; dx = rstd * (g - xhat * mean(g * xhat)); dw += dy * xhat */
void K(st_k_rms_bwd_row)(const T *dy, const T *x, const T *w, T rstd, T *dx, T *dw_acc, int64_t cols);
void K(st_k_rms_bwd_row)(const T *dy, const T *x, const T *w, T rstd, T *dx, T *dw_acc, int64_t cols) {
  double sgx = 0;
  for (int64_t c = 0; c < cols; c++) {
    double g = (double)dy[c] * (w ? (double)w[c] : 1.0);
    sgx += g * (double)x[c] * rstd;
  }
  sgx /= (double)cols;
  for (int64_t c = 0; c < cols; c++) {
    double xh = (double)x[c] * rstd;
    double g = (double)dy[c] * (w ? (double)w[c] : 1.0);
    dx[c] = (T)((double)rstd * (g - xh * sgx));
    if (dw_acc) dw_acc[c] += (T)((double)dy[c] * xh);
  }
}

static inline T K(gelu_one)(st_gelu_kind kind, T x) {
  switch (kind) {
  case ST_GELU_TANH: { /* 0.5 (1 + tanh u) = sigmoid(2u): no cancellation where tanh u -> -1 */
    T u = (T)0.7978845608028654 * (x + (T)0.044715 * x * x * x);
    return x / ((T)1 + EXP((T)-2 * u));
  }
  case ST_GELU_SIGMOID: return x / ((T)1 + EXP((T)-1.702 * x));
  default: return (T)0.5 * x * ((T)1 + ERF(x * (T)0.7071067811865476));
  }
}

static inline T K(gelu_grad_one)(st_gelu_kind kind, T x) {
  switch (kind) {
  case ST_GELU_TANH: {
    const T c = (T)0.7978845608028654, a = (T)0.044715;
    T s = (T)1 / ((T)1 + EXP((T)-2 * c * (x + a * x * x * x)));
    return s + (T)2 * x * s * ((T)1 - s) * c * ((T)1 + (T)3 * a * x * x);
  }
  case ST_GELU_SIGMOID: {
    T s = (T)1 / ((T)1 + EXP((T)-1.702 * x));
    return s + (T)1.702 * x * s * ((T)1 - s);
  }
  default:
    return (T)0.5 * ((T)1 + ERF(x * (T)0.7071067811865476)) +
           x * (T)0.3989422804014327 * EXP((T)-0.5 * x * x);
  }
}

void K(st_k_gelu_fwd)(st_gelu_kind kind, const T *x, T *y, int64_t n);
void K(st_k_gelu_fwd)(st_gelu_kind kind, const T *x, T *y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = K(gelu_one)(kind, x[i]);
}

void K(st_k_gelu_bwd)(st_gelu_kind kind, const T *x, const T *dy, T *dx, int64_t n);
void K(st_k_gelu_bwd)(st_gelu_kind kind, const T *x, const T *dy, T *dx, int64_t n) {
  for (int64_t i = 0; i < n; i++) dx[i] = dy[i] * K(gelu_grad_one)(kind, x[i]);
}

static inline T K(sigmoid_one)(T x) { return (T)1 / ((T)1 + EXP(-x)); }

void K(st_k_silu_fwd)(const T *x, T *y, int64_t n);
void K(st_k_silu_fwd)(const T *x, T *y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = x[i] * K(sigmoid_one)(x[i]);
}

/* silu'(x) = s (1 + x (1 - s)) */
void K(st_k_silu_bwd)(const T *x, const T *dy, T *dx, int64_t n);
void K(st_k_silu_bwd)(const T *x, const T *dy, T *dx, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    T s = K(sigmoid_one)(x[i]);
    dx[i] = dy[i] * s * ((T)1 + x[i] * ((T)1 - s));
  }
}

void K(st_k_swiglu_fwd)(const T *g, const T *u, T *y, int64_t n);
void K(st_k_swiglu_fwd)(const T *g, const T *u, T *y, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] = g[i] * K(sigmoid_one)(g[i]) * u[i];
}

void K(st_k_swiglu_bwd)(const T *g, const T *u, const T *dy, T *dg, T *du, int64_t n);
void K(st_k_swiglu_bwd)(const T *g, const T *u, const T *dy, T *dg, T *du, int64_t n) {
  for (int64_t i = 0; i < n; i++) {
    T s = K(sigmoid_one)(g[i]);
    T silu = g[i] * s;
    dg[i] = dy[i] * u[i] * s * ((T)1 + g[i] * ((T)1 - s));
    du[i] = dy[i] * silu;
  }
}

T K(st_k_exp_shift_sum)(T *x, int64_t n, T shift);
T K(st_k_exp_shift_sum)(T *x, int64_t n, T shift) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) {
    x[i] = EXP(x[i] - shift);
    s += x[i];
  }
  return (T)s;
}

/* softmax of one row; a row of all -inf gives zeros */
void K(st_k_softmax_fwd_row)(const T *x, T *y, int64_t cols);
void K(st_k_softmax_fwd_row)(const T *x, T *y, int64_t cols) {
  T m = -INFINITY;
  for (int64_t c = 0; c < cols; c++)
    if (x[c] > m) m = x[c];
  if (m == -INFINITY) {
    for (int64_t c = 0; c < cols; c++) y[c] = 0;
    return;
  }
  double s = 0;
  for (int64_t c = 0; c < cols; c++) {
    y[c] = EXP(x[c] - m);
    s += y[c];
  }
  T inv = (T)(1.0 / s);
  for (int64_t c = 0; c < cols; c++) y[c] *= inv;
}

/* dx = y * (dy - sum(dy * y)) */
void K(st_k_softmax_bwd_row)(const T *y, const T *dy, T *dx, int64_t cols);
void K(st_k_softmax_bwd_row)(const T *y, const T *dy, T *dx, int64_t cols) {
  double s = 0;
  for (int64_t c = 0; c < cols; c++) s += (double)y[c] * (double)dy[c];
  for (int64_t c = 0; c < cols; c++) dx[c] = (T)((double)y[c] * ((double)dy[c] - s));
}

#undef K
#undef ST_CAT
#undef ST_CAT2
