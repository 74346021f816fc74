/* cpu_ops.c — the CPU ops table: argument checks, dtype dispatch and row-parallel loops over the
 * kernels of cpu_tmpl.h (F64, generic F32) or the per-ISA F32 kernels (st_cpu_kern). */
#include "cpu_ops.h"

#include "cpu_internal.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>

/* ---- the portable kernels, twice ---- */
#define T float
#define SFX f32
#define EXP expf
#define LOG logf
#define TANH tanhf
#define ERF erff
#define SQRT sqrtf
#include "cpu_tmpl.h"
#undef T
#undef SFX
#undef EXP
#undef LOG
#undef TANH
#undef ERF
#undef SQRT
#define T double
#define SFX f64
#define EXP exp
#define LOG log
#define TANH tanh
#define ERF erf
#define SQRT sqrt
#include "cpu_tmpl.h"
#undef T
#undef SFX
#undef EXP
#undef LOG
#undef TANH
#undef ERF
#undef SQRT

st_result st_cpu_attention_forward(const st_ops *self, const st_attn_desc *d);
st_result st_cpu_attention_backward(const st_ops *self, const st_attn_desc *d, const void *dout, void *dq, void *dk,
                                    void *dv);
st_result st_cpu_optim_update(const st_ops *self, const st_optim_desc *d);

float st_cpu_gelu_f32(st_gelu_kind kind, float x) { return gelu_one_f32(kind, x); }
float st_cpu_gelu_grad_f32(st_gelu_kind kind, float x) { return gelu_grad_one_f32(kind, x); }

static void adam_generic_f32(float *p, const float *g, float *m, float *v, int64_t n, const st_adam_consts *c) {
  for (int64_t i = 0; i < n; i++) {
    float gi = g[i] * c->grad_scale;
    float pi = p[i];
    gi = gi + c->l2 * pi;
    pi = pi * c->decay;
    float mi = m[i] * c->beta1 + c->one_minus_beta1 * gi;
    float vi = v[i] * c->beta2 + c->one_minus_beta2 * gi * gi;
    float denom = sqrtf(vi) / c->bc2_sqrt + c->eps;
    p[i] = pi - c->step_size * (mi / denom);
    m[i] = mi;
    v[i] = vi;
  }
}

void st_cpu_kern_generic(st_cpu_kern *k) {
  k->level = "generic";
  k->add = st_k_add_f32;
  k->mul = st_k_mul_f32;
  k->axpy = st_k_axpy_f32;
  k->scale = st_k_scale_f32;
  k->sumsq = st_k_sumsq_f32;
  k->ln_fwd_row = st_k_ln_fwd_row_f32;
  k->ln_bwd_row = st_k_ln_bwd_row_f32;
  k->rms_fwd_row = st_k_rms_fwd_row_f32;
  k->rms_bwd_row = st_k_rms_bwd_row_f32;
  k->gelu_fwd = st_k_gelu_fwd_f32;
  k->gelu_bwd = st_k_gelu_bwd_f32;
  k->silu_fwd = st_k_silu_fwd_f32;
  k->silu_bwd = st_k_silu_bwd_f32;
  k->swiglu_fwd = st_k_swiglu_fwd_f32;
  k->swiglu_bwd = st_k_swiglu_bwd_f32;
  k->exp_shift_sum = st_k_exp_shift_sum_f32;
  k->adam_f32 = adam_generic_f32;
}

/* ---- SIMD level ---- */
typedef enum { LEVEL_GENERIC = 0, LEVEL_AVX2 = 1 } cpu_level;

static cpu_level detect_level(void) {
  cpu_level lv = LEVEL_GENERIC;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) lv = LEVEL_AVX2;
#endif
  const char *cap = getenv("STRATA_CPU_ISA");
  if (cap && strcmp(cap, "generic") == 0) lv = LEVEL_GENERIC;
  return lv;
}

const char *st_cpu_simd_level(void) { return detect_level() == LEVEL_AVX2 ? "avx2" : "generic"; }

/* ---- helpers ---- */
#define ELEM_CHUNK 16384 /* elements per task below which threading costs more than it gains */

static inline st_pool *pool_of(const st_ops *self) { return st_cpu_impl_of(self)->pool; }
static inline const st_cpu_kern *kern_of(const st_ops *self) { return &st_cpu_impl_of(self)->kern; }
static inline bool is_f(st_dtype dt) { return dt == ST_F32 || dt == ST_F64; }
static inline int64_t rows_chunk(int64_t cols) { int64_t r = ELEM_CHUNK / (cols > 0 ? cols : 1); return r > 0 ? r : 1; }

#define CHECK_ARG(cond) do { if (!(cond)) return ST_ERR_INVALID_ARGUMENT; } while (0)
#define CHECK_FLOAT(dt) do { if (!is_f(dt)) return ST_ERR_UNSUPPORTED; } while (0)

/* ---- memory ---- */
typedef struct copy_ctx { char *dst; const char *src; } copy_ctx;
static void copy_task(void *v, int64_t b, int64_t e, int tid) {
  copy_ctx *c = v;
  memcpy(c->dst + b, c->src + b, (size_t)(e - b));
}

static st_result op_copy(const st_ops *self, void *dst, st_device dst_dev, const void *src, st_device src_dev,
                         size_t bytes) {
  if (dst_dev.type != ST_DEVICE_CPU || src_dev.type != ST_DEVICE_CPU) return ST_ERR_UNSUPPORTED;
  if (bytes == 0) return ST_OK;
  CHECK_ARG(dst && src);
  if (dst == src) return ST_OK;
  copy_ctx c = {dst, src};
  st_pool_for(pool_of(self), (int64_t)bytes, 1 << 22, copy_task, &c);
  return ST_OK;
}

static st_result op_fill(const st_ops *self, st_dtype dt, void *x, int64_t n, double value) {
  CHECK_ARG(n >= 0 && (x || n == 0));
  switch (dt) {
  case ST_F32: { float v = (float)value; float *p = x; for (int64_t i = 0; i < n; i++) p[i] = v; break; }
  case ST_F64: { double *p = x; for (int64_t i = 0; i < n; i++) p[i] = value; break; }
  case ST_BF16: { uint16_t v = st_f32_to_bf16((float)value), *p = x; for (int64_t i = 0; i < n; i++) p[i] = v; break; }
  case ST_F16: { uint16_t v = st_f32_to_f16((float)value), *p = x; for (int64_t i = 0; i < n; i++) p[i] = v; break; }
  case ST_I32: { int32_t v = (int32_t)value, *p = x; for (int64_t i = 0; i < n; i++) p[i] = v; break; }
  case ST_I64: { int64_t v = (int64_t)value, *p = x; for (int64_t i = 0; i < n; i++) p[i] = v; break; }
  case ST_U8: memset(x, (int)(uint8_t)value, (size_t)n); break;
  default: return ST_ERR_UNSUPPORTED;
  }
  return ST_OK;
}

static st_result op_synchronize(const st_ops *self) { return ST_OK; }

/* ---- cast ---- */
/* double -> float rounded to odd: the float that truncation gives, with its last bit set when the
 * conversion was inexact. Rounding that to bf16/f16 (nearest-even) then equals rounding the double
 * directly, because float keeps at least two more bits than either. */
static inline float f64_to_f32_odd(double d) {
  float f = (float)d;
  if (isnan(d) || (double)f == d) return f;
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 1u) == 0) f = nextafterf(f, (float)(d > (double)f ? INFINITY : -INFINITY));
  return f;
}

static inline double load_f(st_dtype dt, const void *p, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  default: return st_f16_to_f32(((const uint16_t *)p)[i]);
  }
}

typedef struct cast_ctx { st_dtype sdt, ddt; const void *src; void *dst; } cast_ctx;
static void cast_task(void *v, int64_t b, int64_t e, int tid) {
  cast_ctx *c = v;
  if (c->sdt == ST_I32 && c->ddt == ST_I64) {
    for (int64_t i = b; i < e; i++) ((int64_t *)c->dst)[i] = ((const int32_t *)c->src)[i];
    return;
  }
  if (c->sdt == ST_I64 && c->ddt == ST_I32) {
    for (int64_t i = b; i < e; i++) ((int32_t *)c->dst)[i] = (int32_t)((const int64_t *)c->src)[i];
    return;
  }
  switch (c->ddt) {
  case ST_F32:
    if (c->sdt == ST_F64)
      for (int64_t i = b; i < e; i++) ((float *)c->dst)[i] = (float)((const double *)c->src)[i];
    else
      for (int64_t i = b; i < e; i++) ((float *)c->dst)[i] = (float)load_f(c->sdt, c->src, i);
    break;
  case ST_F64:
    for (int64_t i = b; i < e; i++) ((double *)c->dst)[i] = load_f(c->sdt, c->src, i);
    break;
  case ST_BF16:
    if (c->sdt == ST_F64)
      for (int64_t i = b; i < e; i++) ((uint16_t *)c->dst)[i] = st_f32_to_bf16(f64_to_f32_odd(((const double *)c->src)[i]));
    else
      for (int64_t i = b; i < e; i++) ((uint16_t *)c->dst)[i] = st_f32_to_bf16((float)load_f(c->sdt, c->src, i));
    break;
  default: /* F16 */
    if (c->sdt == ST_F64)
      for (int64_t i = b; i < e; i++) ((uint16_t *)c->dst)[i] = st_f32_to_f16(f64_to_f32_odd(((const double *)c->src)[i]));
    else
      for (int64_t i = b; i < e; i++) ((uint16_t *)c->dst)[i] = st_f32_to_f16((float)load_f(c->sdt, c->src, i));
    break;
  }
}

static st_result op_cast(const st_ops *self, st_dtype sdt, const void *src, st_dtype ddt, void *dst, int64_t n) {
  CHECK_ARG(n >= 0 && ((src && dst) || n == 0));
  if (sdt == ddt) {
    CHECK_ARG((unsigned)sdt < ST_DTYPE_COUNT);
    if (n && src != dst) memmove(dst, src, (size_t)n * st_dtype_size(sdt));
    return ST_OK;
  }
  bool ints = (sdt == ST_I32 || sdt == ST_I64) && (ddt == ST_I32 || ddt == ST_I64);
  if (!ints && !(st_dtype_is_float(sdt) && st_dtype_is_float(ddt))) return ST_ERR_UNSUPPORTED;
  cast_ctx c = {sdt, ddt, src, dst};
  st_pool_for(pool_of(self), n, 1 << 16, cast_task, &c);
  return ST_OK;
}

/* ---- simple elementwise ---- */
enum { EW_SCALE, EW_AXPY, EW_ADD, EW_MUL, EW_SUMSQ, EW_GELU_F, EW_GELU_B, EW_SILU_F, EW_SILU_B };

typedef struct ew_ctx {
  const st_cpu_kern *k;
  int op;
  st_dtype dt;
  const void *a, *b;
  void *out;
  double alpha;
  st_gelu_kind kind;
  double partial[256];
} ew_ctx;

static void ew_task(void *v, int64_t b, int64_t e, int tid) {
  ew_ctx *c = v;
  int64_t n = e - b;
  if (c->dt == ST_F32) {
    const float *a = c->a ? (const float *)c->a + b : NULL, *bb = c->b ? (const float *)c->b + b : NULL;
    float *o = c->out ? (float *)c->out + b : NULL;
    switch (c->op) {
    case EW_SCALE: c->k->scale(o, n, (float)c->alpha); break;
    case EW_AXPY: c->k->axpy(n, (float)c->alpha, a, o); break;
    case EW_ADD: c->k->add(a, bb, o, n); break;
    case EW_MUL: c->k->mul(a, bb, o, n); break;
    case EW_SUMSQ: c->partial[tid] = c->k->sumsq(a, n); break;
    case EW_GELU_F: c->k->gelu_fwd(c->kind, a, o, n); break;
    case EW_GELU_B: c->k->gelu_bwd(c->kind, a, bb, o, n); break;
    case EW_SILU_F: c->k->silu_fwd(a, o, n); break;
    case EW_SILU_B: c->k->silu_bwd(a, bb, o, n); break;
    }
  } else if (c->dt == ST_F64) {
    const double *a = c->a ? (const double *)c->a + b : NULL, *bb = c->b ? (const double *)c->b + b : NULL;
    double *o = c->out ? (double *)c->out + b : NULL;
    switch (c->op) {
    case EW_SCALE: st_k_scale_f64(o, n, c->alpha); break;
    case EW_AXPY: st_k_axpy_f64(n, c->alpha, a, o); break;
    case EW_ADD: st_k_add_f64(a, bb, o, n); break;
    case EW_MUL: st_k_mul_f64(a, bb, o, n); break;
    case EW_SUMSQ: c->partial[tid] = st_k_sumsq_f64(a, n); break;
    case EW_GELU_F: st_k_gelu_fwd_f64(c->kind, a, o, n); break;
    case EW_GELU_B: st_k_gelu_bwd_f64(c->kind, a, bb, o, n); break;
    case EW_SILU_F: st_k_silu_fwd_f64(a, o, n); break;
    case EW_SILU_B: st_k_silu_bwd_f64(a, bb, o, n); break;
    }
  } else { /* sumsq of BF16 / F16 */
    double s = 0;
    for (int64_t i = b; i < e; i++) {
      double x = load_f(c->dt, c->a, i);
      s += x * x;
    }
    c->partial[tid] = s;
  }
}

static st_result run_ew(const st_ops *self, int op, st_dtype dt, const void *a, const void *b, void *out, int64_t n,
                        double alpha, st_gelu_kind kind) {
  CHECK_FLOAT(dt);
  CHECK_ARG(n >= 0);
  if (n == 0) return ST_OK;
  ew_ctx c = {.k = kern_of(self), .op = op, .dt = dt, .a = a, .b = b, .out = out, .alpha = alpha, .kind = kind};
  int64_t chunk = (op == EW_GELU_F || op == EW_GELU_B || op == EW_SILU_F || op == EW_SILU_B) ? 4096 : ELEM_CHUNK * 4;
  st_pool_for(pool_of(self), n, chunk, ew_task, &c);
  return ST_OK;
}

static st_result op_scale(const st_ops *self, st_dtype dt, void *x, int64_t n, double alpha) {
  CHECK_ARG(x || n == 0);
  return run_ew(self, EW_SCALE, dt, NULL, NULL, x, n, alpha, 0);
}
static st_result op_axpy(const st_ops *self, st_dtype dt, int64_t n, double alpha, const void *x, void *y) {
  CHECK_ARG((x && y) || n == 0);
  return run_ew(self, EW_AXPY, dt, x, NULL, y, n, alpha, 0);
}
static st_result op_add(const st_ops *self, st_dtype dt, const void *a, const void *b, void *out, int64_t n) {
  CHECK_ARG((a && b && out) || n == 0);
  return run_ew(self, EW_ADD, dt, a, b, out, n, 0, 0);
}
static st_result op_mul(const st_ops *self, st_dtype dt, const void *a, const void *b, void *out, int64_t n) {
  CHECK_ARG((a && b && out) || n == 0);
  return run_ew(self, EW_MUL, dt, a, b, out, n, 0, 0);
}
static st_result op_sumsq(const st_ops *self, st_dtype dt, const void *x, int64_t n, double *out) {
  CHECK_ARG(out && n >= 0 && (x || n == 0));
  if (!st_dtype_is_float(dt)) return ST_ERR_UNSUPPORTED;
  *out = 0;
  if (n == 0) return ST_OK;
  ew_ctx c = {.k = kern_of(self), .op = EW_SUMSQ, .dt = dt, .a = x};
  st_pool_for(pool_of(self), n, ELEM_CHUNK * 4, ew_task, &c);
  double s = 0;
  for (int i = 0; i < st_pool_threads(pool_of(self)) && i < 256; i++) s += c.partial[i];
  *out = s;
  return ST_OK;
}

static st_result op_gelu_forward(const st_ops *self, st_dtype dt, st_gelu_kind kind, const void *x, void *y, int64_t n) {
  CHECK_ARG(((x && y) || n == 0) && (unsigned)kind <= ST_GELU_ERF);
  return run_ew(self, EW_GELU_F, dt, x, NULL, y, n, 0, kind);
}
static st_result op_gelu_backward(const st_ops *self, st_dtype dt, st_gelu_kind kind, const void *x, const void *dy,
                                  void *dx, int64_t n) {
  CHECK_ARG(((x && dy && dx) || n == 0) && (unsigned)kind <= ST_GELU_ERF);
  return run_ew(self, EW_GELU_B, dt, x, dy, dx, n, 0, kind);
}
static st_result op_silu_forward(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t n) {
  CHECK_ARG((x && y) || n == 0);
  return run_ew(self, EW_SILU_F, dt, x, NULL, y, n, 0, 0);
}
static st_result op_silu_backward(const st_ops *self, st_dtype dt, const void *x, const void *dy, void *dx, int64_t n) {
  CHECK_ARG((x && dy && dx) || n == 0);
  return run_ew(self, EW_SILU_B, dt, x, dy, dx, n, 0, 0);
}

/* ---- GEMM ---- */
static bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

static st_result op_gemm(const st_ops *self, const st_gemm_desc *d) {
  CHECK_ARG(d);
  CHECK_FLOAT(d->dtype);
  if (d->c_dtype != d->dtype) return ST_ERR_UNSUPPORTED;
  CHECK_ARG(d->m >= 0 && d->n >= 0 && d->k >= 0 && d->batch >= 1);
  CHECK_ARG(fits_int(d->m) && fits_int(d->n) && fits_int(d->k));
  CHECK_ARG(fits_int(d->lda) && fits_int(d->ldb) && fits_int(d->ldc));
  int64_t a_cols = d->trans_a ? d->m : d->k, b_cols = d->trans_b ? d->k : d->n;
  CHECK_ARG(d->lda >= (a_cols > 1 ? a_cols : 1) && d->ldb >= (b_cols > 1 ? b_cols : 1) &&
            d->ldc >= (d->n > 1 ? d->n : 1));
  if (d->m == 0 || d->n == 0) return ST_OK;
  CHECK_ARG(d->c && ((d->a && d->b) || d->k == 0));
  enum CBLAS_TRANSPOSE ta = d->trans_a ? CblasTrans : CblasNoTrans, tb = d->trans_b ? CblasTrans : CblasNoTrans;
  size_t es = st_dtype_size(d->dtype);
  for (int64_t bi = 0; bi < d->batch; bi++) {
    const char *a = (const char *)d->a + (size_t)(bi * d->stride_a) * es;
    const char *b = (const char *)d->b + (size_t)(bi * d->stride_b) * es;
    char *c = (char *)d->c + (size_t)(bi * d->stride_c) * es;
    if (d->k == 0) { /* BLAS would do this too, but some builds read A/B anyway */
      for (int64_t r = 0; r < d->m; r++)
        if (d->dtype == ST_F32)
          for (int64_t j = 0; j < d->n; j++) {
            float *cp = (float *)c + r * d->ldc + j;
            *cp = d->beta == 0 ? 0.0f : (float)(d->beta * *cp);
          }
        else
          for (int64_t j = 0; j < d->n; j++) {
            double *cp = (double *)c + r * d->ldc + j;
            *cp = d->beta == 0 ? 0.0 : d->beta * *cp;
          }
    } else if (d->dtype == ST_F32) {
      cblas_sgemm(CblasRowMajor, ta, tb, (int)d->m, (int)d->n, (int)d->k, (float)d->alpha, (const float *)a,
                  (int)d->lda, (const float *)b, (int)d->ldb, (float)d->beta, (float *)c, (int)d->ldc);
    } else {
      cblas_dgemm(CblasRowMajor, ta, tb, (int)d->m, (int)d->n, (int)d->k, d->alpha, (const double *)a, (int)d->lda,
                  (const double *)b, (int)d->ldb, d->beta, (double *)c, (int)d->ldc);
    }
    if (d->bias) {
      for (int64_t r = 0; r < d->m; r++) {
        if (d->dtype == ST_F32)
          st_cpu_impl_of(self)->kern.add((float *)c + r * d->ldc, d->bias, (float *)c + r * d->ldc, d->n);
        else
          st_k_add_f64((double *)c + r * d->ldc, d->bias, (double *)c + r * d->ldc, d->n);
      }
    }
  }
  return ST_OK;
}

/* dbias[c] += sum_r dy[r, c]; threads split the columns */
typedef struct colsum_ctx { st_dtype dt; const void *dy; int64_t rows, cols; void *dbias; } colsum_ctx;
static void colsum_task(void *v, int64_t b, int64_t e, int tid) {
  colsum_ctx *c = v;
  if (c->dt == ST_F32) {
    float *db = c->dbias;
    const float *dy = c->dy;
    for (int64_t r = 0; r < c->rows; r++)
      for (int64_t j = b; j < e; j++) db[j] += dy[r * c->cols + j];
  } else {
    double *db = c->dbias;
    const double *dy = c->dy;
    for (int64_t r = 0; r < c->rows; r++)
      for (int64_t j = b; j < e; j++) db[j] += dy[r * c->cols + j];
  }
}

static st_result op_bias_backward(const st_ops *self, st_dtype dt, const void *dy, int64_t rows, int64_t cols,
                                  void *dbias) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols >= 0 && ((dy && dbias) || rows * cols == 0));
  colsum_ctx c = {dt, dy, rows, cols, dbias};
  st_pool_for(pool_of(self), cols, rows * cols > 65536 ? 64 : cols, colsum_task, &c);
  return ST_OK;
}

/* ---- row ops: norms, softmax, swiglu ---- */
enum { ROW_LN_F, ROW_LN_B, ROW_RMS_F, ROW_RMS_B, ROW_SM_F, ROW_SM_B, ROW_SWIGLU_F, ROW_SWIGLU_B };

typedef struct row_ctx {
  const st_cpu_kern *k;
  int op;
  st_dtype dt;
  int64_t cols;
  const void *x, *dy, *w, *mean_in, *rstd_in;
  void *y, *mean, *rstd, *dx;
  double eps;
  char *dw_partial; /* [threads, cols] of dt, NULL when no dw */
} row_ctx;

static void row_task(void *v, int64_t b, int64_t e, int tid) {
  row_ctx *c = v;
  int64_t C = c->cols;
  if (c->dt == ST_F32) {
    const float *x = c->x, *dy = c->dy, *w = c->w, *mi = c->mean_in, *ri = c->rstd_in;
    float *y = c->y, *mean = c->mean, *rstd = c->rstd, *dx = c->dx;
    float *dwp = c->dw_partial ? (float *)c->dw_partial + (size_t)tid * (size_t)C : NULL;
    for (int64_t r = b; r < e; r++) {
      switch (c->op) {
      case ROW_LN_F: c->k->ln_fwd_row(x + r * C, y + r * C, mean + r, rstd + r, C, (float)c->eps); break;
      case ROW_LN_B: c->k->ln_bwd_row(dy + r * C, x + r * C, mi[r], ri[r], dx + r * C, C); break;
      case ROW_RMS_F: c->k->rms_fwd_row(x + r * C, w, y + r * C, rstd + r, C, (float)c->eps); break;
      case ROW_RMS_B: c->k->rms_bwd_row(dy + r * C, x + r * C, w, ri[r], dx + r * C, dwp, C); break;
      case ROW_SM_F: st_k_softmax_fwd_row_f32(x + r * C, y + r * C, C); break;
      case ROW_SM_B: st_k_softmax_bwd_row_f32(y + r * C, dy + r * C, dx + r * C, C); break;
      case ROW_SWIGLU_F: c->k->swiglu_fwd(x + r * 2 * C, x + r * 2 * C + C, y + r * C, C); break;
      case ROW_SWIGLU_B:
        c->k->swiglu_bwd(x + r * 2 * C, x + r * 2 * C + C, dy + r * C, dx + r * 2 * C, dx + r * 2 * C + C, C);
        break;
      }
    }
  } else {
    const double *x = c->x, *dy = c->dy, *w = c->w, *mi = c->mean_in, *ri = c->rstd_in;
    double *y = c->y, *mean = c->mean, *rstd = c->rstd, *dx = c->dx;
    double *dwp = c->dw_partial ? (double *)c->dw_partial + (size_t)tid * (size_t)C : NULL;
    for (int64_t r = b; r < e; r++) {
      switch (c->op) {
      case ROW_LN_F: st_k_ln_fwd_row_f64(x + r * C, y + r * C, mean + r, rstd + r, C, c->eps); break;
      case ROW_LN_B: st_k_ln_bwd_row_f64(dy + r * C, x + r * C, mi[r], ri[r], dx + r * C, C); break;
      case ROW_RMS_F: st_k_rms_fwd_row_f64(x + r * C, w, y + r * C, rstd + r, C, c->eps); break;
      case ROW_RMS_B: st_k_rms_bwd_row_f64(dy + r * C, x + r * C, w, ri[r], dx + r * C, dwp, C); break;
      case ROW_SM_F: st_k_softmax_fwd_row_f64(x + r * C, y + r * C, C); break;
      case ROW_SM_B: st_k_softmax_bwd_row_f64(y + r * C, dy + r * C, dx + r * C, C); break;
      case ROW_SWIGLU_F: st_k_swiglu_fwd_f64(x + r * 2 * C, x + r * 2 * C + C, y + r * C, C); break;
      case ROW_SWIGLU_B:
        st_k_swiglu_bwd_f64(x + r * 2 * C, x + r * 2 * C + C, dy + r * C, dx + r * 2 * C, dx + r * 2 * C + C, C);
        break;
      }
    }
  }
}

static void run_rows(const st_ops *self, row_ctx *c, int64_t rows, int64_t work_per_row) {
  c->k = kern_of(self);
  st_pool_for(pool_of(self), rows, rows_chunk(work_per_row), row_task, c);
}

static st_result op_layernorm_forward(const st_ops *self, st_dtype dt, const void *x, void *y, void *mean, void *rstd,
                                      int64_t rows, int64_t cols, double eps) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((x && y && mean && rstd) || rows == 0));
  row_ctx c = {.op = ROW_LN_F, .dt = dt, .cols = cols, .x = x, .y = y, .mean = mean, .rstd = rstd, .eps = eps};
  run_rows(self, &c, rows, cols);
  return ST_OK;
}

static st_result op_layernorm_backward(const st_ops *self, st_dtype dt, const void *dy, const void *x,
                                       const void *mean, const void *rstd, void *dx, int64_t rows, int64_t cols) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((dy && x && mean && rstd && dx) || rows == 0));
  row_ctx c = {.op = ROW_LN_B, .dt = dt, .cols = cols, .x = x, .dy = dy, .mean_in = mean, .rstd_in = rstd, .dx = dx};
  run_rows(self, &c, rows, cols);
  return ST_OK;
}

static st_result op_rmsnorm_forward(const st_ops *self, st_dtype dt, const void *x, const void *w, void *y, void *rstd,
                                    int64_t rows, int64_t cols, double eps) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((x && y && rstd) || rows == 0));
  row_ctx c = {.op = ROW_RMS_F, .dt = dt, .cols = cols, .x = x, .w = w, .y = y, .rstd = rstd, .eps = eps};
  run_rows(self, &c, rows, cols);
  return ST_OK;
}

static st_result op_rmsnorm_backward(const st_ops *self, st_dtype dt, const void *dy, const void *x, const void *w,
                                     const void *rstd, void *dx, void *dw, int64_t rows, int64_t cols) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((dy && x && rstd && dx) || rows == 0));
  if (rows == 0) return ST_OK;
  size_t es = st_dtype_size(dt);
  int threads = st_pool_threads(pool_of(self));
  row_ctx c = {.op = ROW_RMS_B, .dt = dt, .cols = cols, .x = x, .dy = dy, .w = w, .rstd_in = rstd, .dx = dx};
  if (dw) {
    c.dw_partial = calloc((size_t)threads * (size_t)cols, es);
    if (!c.dw_partial) return ST_ERR_OUT_OF_MEMORY;
  }
  run_rows(self, &c, rows, cols);
  if (dw) {
    for (int t = 0; t < threads; t++)
      for (int64_t j = 0; j < cols; j++) {
        if (dt == ST_F32) ((float *)dw)[j] += ((float *)c.dw_partial)[(size_t)t * (size_t)cols + (size_t)j];
        else ((double *)dw)[j] += ((double *)c.dw_partial)[(size_t)t * (size_t)cols + (size_t)j];
      }
    free(c.dw_partial);
  }
  return ST_OK;
}

static st_result op_swiglu_forward(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t rows, int64_t cols) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((x && y) || rows == 0));
  row_ctx c = {.op = ROW_SWIGLU_F, .dt = dt, .cols = cols, .x = x, .y = y};
  run_rows(self, &c, rows, cols * 4);
  return ST_OK;
}

static st_result op_swiglu_backward(const st_ops *self, st_dtype dt, const void *x, const void *dy, void *dx,
                                    int64_t rows, int64_t cols) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((x && dy && dx) || rows == 0));
  row_ctx c = {.op = ROW_SWIGLU_B, .dt = dt, .cols = cols, .x = x, .dy = dy, .dx = dx};
  run_rows(self, &c, rows, cols * 4);
  return ST_OK;
}

static st_result op_softmax_forward(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t rows, int64_t cols) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((x && y) || rows == 0));
  row_ctx c = {.op = ROW_SM_F, .dt = dt, .cols = cols, .x = x, .y = y};
  run_rows(self, &c, rows, cols * 4);
  return ST_OK;
}

static st_result op_softmax_backward(const st_ops *self, st_dtype dt, const void *y, const void *dy, void *dx,
                                     int64_t rows, int64_t cols) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && ((y && dy && dx) || rows == 0));
  row_ctx c = {.op = ROW_SM_B, .dt = dt, .cols = cols, .y = (void *)(uintptr_t)y, .dy = dy, .dx = dx};
  run_rows(self, &c, rows, cols);
  return ST_OK;
}

/* ---- RoPE ---- */
typedef struct rope_ctx {
  st_dtype dt;
  st_rope_layout layout;
  void *x;
  const void *cos, *sin;
  int64_t tbs, seq, heads, d;
  bool inverse;
} rope_ctx;

#define ROPE_BODY(TT)                                                                                     \
  do {                                                                                                    \
    int64_t half = c->d / 2;                                                                              \
    for (int64_t tok = b; tok < e; tok++) {                                                               \
      int64_t bi = tok / c->seq, s = tok % c->seq;                                                        \
      const TT *ct = (const TT *)c->cos + bi * c->tbs + s * half;                                         \
      const TT *st = (const TT *)c->sin + bi * c->tbs + s * half;                                         \
      for (int64_t h = 0; h < c->heads; h++) {                                                            \
        TT *xh = (TT *)c->x + (tok * c->heads + h) * c->d;                                                \
        for (int64_t kk = 0; kk < half; kk++) {                                                           \
          int64_t i0 = c->layout == ST_ROPE_INTERLEAVED ? 2 * kk : kk;                                    \
          int64_t i1 = c->layout == ST_ROPE_INTERLEAVED ? 2 * kk + 1 : kk + half;                         \
          TT co = ct[kk], si = c->inverse ? -st[kk] : st[kk];                                             \
          TT x0 = xh[i0], x1 = xh[i1];                                                                    \
          xh[i0] = x0 * co - x1 * si;                                                                     \
          xh[i1] = x0 * si + x1 * co;                                                                     \
        }                                                                                                 \
      }                                                                                                   \
    }                                                                                                     \
  } while (0)

static void rope_task(void *v, int64_t b, int64_t e, int tid) {
  rope_ctx *c = v;
  if (c->dt == ST_F32) ROPE_BODY(float);
  else ROPE_BODY(double);
}

static st_result op_rope_apply(const st_ops *self, st_dtype dt, st_rope_layout layout, void *x, const void *cos,
                               const void *sin, int64_t table_batch_stride, int64_t batch, int64_t seq, int64_t heads,
                               int64_t head_dim, bool inverse) {
  CHECK_FLOAT(dt);
  CHECK_ARG(batch >= 0 && seq >= 0 && heads >= 0 && head_dim > 0 && head_dim % 2 == 0 && table_batch_stride >= 0);
  CHECK_ARG(layout == ST_ROPE_INTERLEAVED || layout == ST_ROPE_HALF);
  if (batch * seq * heads == 0) return ST_OK;
  CHECK_ARG(x && cos && sin);
  rope_ctx c = {dt, layout, x, cos, sin, table_batch_stride, seq, heads, head_dim, inverse};
  st_pool_for(pool_of(self), batch * seq, rows_chunk(heads * head_dim), rope_task, &c);
  return ST_OK;
}

/* ---- modulation and gated residual ---- */
typedef struct mod_ctx {
  st_dtype dt;
  const void *x, *shift, *scale, *dy, *a;
  void *y, *dx, *dshift, *dscale, *h;
  int64_t stride, tokens, dim;
} mod_ctx;

#define MOD_FWD_BODY(TT)                                                                                  \
  do {                                                                                                    \
    for (int64_t r = b; r < e; r++) {                                                                     \
      int64_t bi = r / c->tokens;                                                                         \
      const TT *x = (const TT *)c->x + r * c->dim, *sc = (const TT *)c->scale + bi * c->stride;           \
      const TT *sh = c->shift ? (const TT *)c->shift + bi * c->stride : NULL;                             \
      TT *y = (TT *)c->y + r * c->dim;                                                                    \
      for (int64_t j = 0; j < c->dim; j++) y[j] = x[j] * ((TT)1 + sc[j]) + (sh ? sh[j] : (TT)0);          \
    }                                                                                                     \
  } while (0)

static void mod_fwd_task(void *v, int64_t b, int64_t e, int tid) {
  mod_ctx *c = v;
  if (c->dt == ST_F32) MOD_FWD_BODY(float);
  else MOD_FWD_BODY(double);
}

static st_result op_modulate_forward(const st_ops *self, st_dtype dt, const void *x, const void *shift,
                                     const void *scale, int64_t mod_stride, void *y, int64_t batch, int64_t tokens,
                                     int64_t dim) {
  CHECK_FLOAT(dt);
  CHECK_ARG(batch >= 0 && tokens >= 0 && dim >= 0 && mod_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  CHECK_ARG(x && scale && y);
  mod_ctx c = {.dt = dt, .x = x, .shift = shift, .scale = scale, .y = y, .stride = mod_stride, .tokens = tokens, .dim = dim};
  st_pool_for(pool_of(self), batch * tokens, rows_chunk(dim), mod_fwd_task, &c);
  return ST_OK;
}

/* threads split the feature columns, so the sums over tokens need no reduction across threads */
#define MOD_BWD_BODY(TT)                                                                                  \
  do {                                                                                                    \
    for (int64_t bi = 0; bi < c->batch_; bi++) {                                                          \
      const TT *sc = (const TT *)c->scale + bi * c->stride;                                               \
      TT *dsh = c->dshift ? (TT *)c->dshift + bi * c->stride : NULL;                                      \
      TT *dsc = c->dscale ? (TT *)c->dscale + bi * c->stride : NULL;                                      \
      for (int64_t t = 0; t < c->tokens; t++) {                                                           \
        int64_t off = (bi * c->tokens + t) * c->dim;                                                      \
        const TT *dy = (const TT *)c->dy + off, *x = (const TT *)c->x + off;                              \
        TT *dx = c->dx ? (TT *)c->dx + off : NULL;                                                        \
        for (int64_t j = b; j < e; j++) {                                                                 \
          if (dx) dx[j] = dy[j] * ((TT)1 + sc[j]);                                                        \
          if (dsh) dsh[j] += dy[j];                                                                       \
          if (dsc) dsc[j] += dy[j] * x[j];                                                                \
        }                                                                                                 \
      }                                                                                                   \
    }                                                                                                     \
  } while (0)

typedef struct modb_ctx {
  st_dtype dt;
  const void *dy, *x, *scale;
  void *dx, *dshift, *dscale;
  int64_t stride, batch_, tokens, dim;
} modb_ctx;

static void mod_bwd_task(void *v, int64_t b, int64_t e, int tid) {
  modb_ctx *c = v;
  if (c->dt == ST_F32) MOD_BWD_BODY(float);
  else MOD_BWD_BODY(double);
}

static st_result op_modulate_backward(const st_ops *self, st_dtype dt, const void *dy, const void *x,
                                      const void *scale, int64_t mod_stride, void *dx, void *dshift, void *dscale,
                                      int64_t batch, int64_t tokens, int64_t dim) {
  CHECK_FLOAT(dt);
  CHECK_ARG(batch >= 0 && tokens >= 0 && dim >= 0 && mod_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  CHECK_ARG(dy && x && scale && dx && dscale);
  modb_ctx c = {dt, dy, x, scale, dx, dshift, dscale, mod_stride, batch, tokens, dim};
  st_pool_for(pool_of(self), dim, batch * tokens * dim > 65536 ? 64 : dim, mod_bwd_task, &c);
  return ST_OK;
}

typedef struct gres_ctx {
  st_dtype dt;
  void *h;
  const void *gate, *a, *dh;
  void *da, *dgate;
  int64_t stride, batch_, tokens, dim;
} gres_ctx;

#define GRES_FWD_BODY(TT)                                                                                 \
  do {                                                                                                    \
    for (int64_t r = b; r < e; r++) {                                                                     \
      int64_t bi = r / c->tokens;                                                                         \
      TT *h = (TT *)c->h + r * c->dim;                                                                    \
      const TT *a = (const TT *)c->a + r * c->dim;                                                        \
      const TT *g = c->gate ? (const TT *)c->gate + bi * c->stride : NULL;                                \
      if (g) for (int64_t j = 0; j < c->dim; j++) h[j] += g[j] * a[j];                                    \
      else for (int64_t j = 0; j < c->dim; j++) h[j] += a[j];                                             \
    }                                                                                                     \
  } while (0)

static void gres_fwd_task(void *v, int64_t b, int64_t e, int tid) {
  gres_ctx *c = v;
  if (c->dt == ST_F32) GRES_FWD_BODY(float);
  else GRES_FWD_BODY(double);
}

#define GRES_BWD_BODY(TT)                                                                                 \
  do {                                                                                                    \
    for (int64_t bi = 0; bi < c->batch_; bi++) {                                                          \
      const TT *g = c->gate ? (const TT *)c->gate + bi * c->stride : NULL;                                \
      TT *dg = c->dgate ? (TT *)c->dgate + bi * c->stride : NULL;                                         \
      for (int64_t t = 0; t < c->tokens; t++) {                                                           \
        int64_t off = (bi * c->tokens + t) * c->dim;                                                      \
        const TT *dh = (const TT *)c->dh + off, *a = (const TT *)c->a + off;                              \
        TT *da = (TT *)c->da + off;                                                                       \
        for (int64_t j = b; j < e; j++) {                                                                 \
          da[j] = g ? dh[j] * g[j] : dh[j];                                                               \
          if (dg) dg[j] += dh[j] * a[j];                                                                  \
        }                                                                                                 \
      }                                                                                                   \
    }                                                                                                     \
  } while (0)

static void gres_bwd_task(void *v, int64_t b, int64_t e, int tid) {
  gres_ctx *c = v;
  if (c->dt == ST_F32) GRES_BWD_BODY(float);
  else GRES_BWD_BODY(double);
}

static st_result op_gated_residual_forward(const st_ops *self, st_dtype dt, void *h, const void *gate,
                                           int64_t gate_stride, const void *a, int64_t batch, int64_t tokens,
                                           int64_t dim) {
  CHECK_FLOAT(dt);
  CHECK_ARG(batch >= 0 && tokens >= 0 && dim >= 0 && gate_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  CHECK_ARG(h && a);
  gres_ctx c = {.dt = dt, .h = h, .gate = gate, .a = a, .stride = gate_stride, .batch_ = batch, .tokens = tokens, .dim = dim};
  st_pool_for(pool_of(self), batch * tokens, rows_chunk(dim), gres_fwd_task, &c);
  return ST_OK;
}

static st_result op_gated_residual_backward(const st_ops *self, st_dtype dt, const void *dh, const void *gate,
                                            int64_t gate_stride, const void *a, void *da, void *dgate, int64_t batch,
                                            int64_t tokens, int64_t dim) {
  CHECK_FLOAT(dt);
  CHECK_ARG(batch >= 0 && tokens >= 0 && dim >= 0 && gate_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  CHECK_ARG(dh && da && (!dgate || a));
  gres_ctx c = {.dt = dt, .gate = gate, .a = a, .dh = dh, .da = da, .dgate = gate ? dgate : NULL,
                .stride = gate_stride, .batch_ = batch, .tokens = tokens, .dim = dim};
  st_pool_for(pool_of(self), dim, batch * tokens * dim > 65536 ? 64 : dim, gres_bwd_task, &c);
  return ST_OK;
}

/* ---- losses ---- */
typedef struct loss_ctx {
  st_dtype dt;
  const void *pred, *target, *w;
  const int64_t *labels;
  int64_t cols, ignore;
  double grad_scale;
  void *dout;
  double partial[256];
  int64_t counted[256];
} loss_ctx;

static void mse_fwd_task(void *v, int64_t b, int64_t e, int tid) {
  loss_ctx *c = v;
  double s = 0;
  for (int64_t r = b; r < e; r++) {
    double rs = 0;
    for (int64_t j = 0; j < c->cols; j++) {
      double d = load_f(c->dt, c->pred, r * c->cols + j) - load_f(c->dt, c->target, r * c->cols + j);
      rs += d * d;
    }
    s += (c->w ? load_f(c->dt, c->w, r) : 1.0) * rs / (double)c->cols;
  }
  c->partial[tid] = s;
}

static st_result op_mse_forward(const st_ops *self, st_dtype dt, const void *pred, const void *target,
                                const void *row_weight, int64_t rows, int64_t cols, double *loss) {
  CHECK_FLOAT(dt);
  CHECK_ARG(loss && rows > 0 && cols > 0 && pred && target);
  loss_ctx c = {.dt = dt, .pred = pred, .target = target, .w = row_weight, .cols = cols};
  st_pool_for(pool_of(self), rows, rows_chunk(cols), mse_fwd_task, &c);
  double s = 0;
  for (int i = 0; i < 256; i++) s += c.partial[i];
  *loss = s / (double)rows;
  return ST_OK;
}

static void mse_bwd_task(void *v, int64_t b, int64_t e, int tid) {
  loss_ctx *c = v;
  double base = c->grad_scale * 2.0 / ((double)c->cols * (double)c->ignore); /* ignore carries rows */
  for (int64_t r = b; r < e; r++) {
    double f = base * (c->w ? load_f(c->dt, c->w, r) : 1.0);
    for (int64_t j = 0; j < c->cols; j++) {
      int64_t i = r * c->cols + j;
      double g = f * (load_f(c->dt, c->pred, i) - load_f(c->dt, c->target, i));
      if (c->dt == ST_F32) ((float *)c->dout)[i] = (float)g;
      else ((double *)c->dout)[i] = g;
    }
  }
}

static st_result op_mse_backward(const st_ops *self, st_dtype dt, const void *pred, const void *target,
                                 const void *row_weight, int64_t rows, int64_t cols, double grad_scale, void *dpred) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows > 0 && cols > 0 && pred && target && dpred);
  loss_ctx c = {.dt = dt, .pred = pred, .target = target, .w = row_weight, .cols = cols, .ignore = rows,
                .grad_scale = grad_scale, .dout = dpred};
  st_pool_for(pool_of(self), rows, rows_chunk(cols), mse_bwd_task, &c);
  return ST_OK;
}

/* log-sum-exp of one row, in double */
static double row_lse(st_dtype dt, const void *x, int64_t off, int64_t n) {
  double m = -INFINITY;
  for (int64_t j = 0; j < n; j++) {
    double v = load_f(dt, x, off + j);
    if (v > m) m = v;
  }
  if (m == -INFINITY) return m;
  double s = 0;
  for (int64_t j = 0; j < n; j++) s += exp(load_f(dt, x, off + j) - m);
  return m + log(s);
}

static void ce_fwd_task(void *v, int64_t b, int64_t e, int tid) {
  loss_ctx *c = v;
  double s = 0;
  int64_t n = 0;
  for (int64_t r = b; r < e; r++) {
    int64_t lab = c->labels[r];
    if (lab == c->ignore) continue;
    s += row_lse(c->dt, c->pred, r * c->cols, c->cols) - load_f(c->dt, c->pred, r * c->cols + lab);
    n++;
  }
  c->partial[tid] = s;
  c->counted[tid] = n;
}

static void ce_bwd_task(void *v, int64_t b, int64_t e, int tid) {
  loss_ctx *c = v;
  for (int64_t r = b; r < e; r++) {
    int64_t lab = c->labels[r], off = r * c->cols;
    bool skip = lab == c->ignore;
    double lse = skip ? 0 : row_lse(c->dt, c->pred, off, c->cols);
    for (int64_t j = 0; j < c->cols; j++) {
      double g = skip ? 0.0 : c->grad_scale * (exp(load_f(c->dt, c->pred, off + j) - lse) - (j == lab ? 1.0 : 0.0));
      if (c->dt == ST_F32) ((float *)c->dout)[off + j] = (float)g;
      else ((double *)c->dout)[off + j] = g;
    }
  }
}

static st_result check_labels(const int64_t *labels, int64_t rows, int64_t vocab, int64_t ignore) {
  for (int64_t r = 0; r < rows; r++)
    if (labels[r] != ignore && (labels[r] < 0 || labels[r] >= vocab)) return ST_ERR_INVALID_ARGUMENT;
  return ST_OK;
}

static st_result op_cross_entropy_forward(const st_ops *self, st_dtype dt, const void *logits, const int64_t *labels,
                                          int64_t rows, int64_t vocab, int64_t ignore_index, double *loss_sum,
                                          int64_t *n_counted) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && vocab > 0 && loss_sum && n_counted && ((logits && labels) || rows == 0));
  ST_CHECK(check_labels(labels, rows, vocab, ignore_index));
  loss_ctx c = {.dt = dt, .pred = logits, .labels = labels, .cols = vocab, .ignore = ignore_index};
  st_pool_for(pool_of(self), rows, rows_chunk(vocab), ce_fwd_task, &c);
  double s = 0;
  int64_t n = 0;
  for (int i = 0; i < 256; i++) { s += c.partial[i]; n += c.counted[i]; }
  *loss_sum = s;
  *n_counted = n;
  return ST_OK;
}

static st_result op_cross_entropy_backward(const st_ops *self, st_dtype dt, const void *logits, const int64_t *labels,
                                           int64_t rows, int64_t vocab, int64_t ignore_index, double grad_scale,
                                           void *dlogits) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && vocab > 0 && ((logits && labels && dlogits) || rows == 0));
  ST_CHECK(check_labels(labels, rows, vocab, ignore_index));
  loss_ctx c = {.dt = dt, .pred = logits, .labels = labels, .cols = vocab, .ignore = ignore_index,
                .grad_scale = grad_scale, .dout = dlogits};
  st_pool_for(pool_of(self), rows, rows_chunk(vocab), ce_bwd_task, &c);
  return ST_OK;
}

/* ---- routing ---- */
typedef struct topk_ctx { st_dtype dt; const void *x; int64_t cols, k; void *values; int32_t *idx; } topk_ctx;

static void topk_task(void *v, int64_t b, int64_t e, int tid) {
  topk_ctx *c = v;
  for (int64_t r = b; r < e; r++) {
    int32_t *ix = c->idx + r * c->k;
    double vals[64];
    double *vv = c->k <= 64 ? vals : NULL;
    /* insertion into a sorted list of the best k so far; strict > keeps the lower index first on
     * ties; NaN never enters (compares false), so a row of NaNs keeps the first k indices */
    int64_t filled = 0;
    double *heap = vv ? vv : malloc(sizeof(double) * (size_t)c->k);
    if (!heap) { for (int64_t i = 0; i < c->k; i++) ix[i] = -1; continue; }
    for (int64_t j = 0; j < c->cols; j++) {
      double x = load_f(c->dt, c->x, r * c->cols + j);
      if (filled == c->k && !(x > heap[filled - 1])) continue;
      if (isnan(x)) continue;
      int64_t pos = filled < c->k ? filled : c->k - 1;
      while (pos > 0 && x > heap[pos - 1]) {
        heap[pos] = heap[pos - 1];
        ix[pos] = ix[pos - 1];
        pos--;
      }
      heap[pos] = x;
      ix[pos] = (int32_t)j;
      if (filled < c->k) filled++;
    }
    for (int64_t j = 0; filled < c->k && j < c->cols; j++) { /* NaN padding: first unused indices */
      bool used = false;
      for (int64_t q = 0; q < filled; q++) used |= ix[q] == (int32_t)j;
      if (!used) { heap[filled] = load_f(c->dt, c->x, r * c->cols + j); ix[filled++] = (int32_t)j; }
    }
    for (int64_t i = 0; i < c->k; i++) {
      if (c->dt == ST_F32) ((float *)c->values)[r * c->k + i] = (float)heap[i];
      else ((double *)c->values)[r * c->k + i] = heap[i];
    }
    if (!vv) free(heap);
  }
}

static st_result op_topk(const st_ops *self, st_dtype dt, const void *x, int64_t rows, int64_t cols, int64_t k,
                         void *values, int32_t *indices) {
  CHECK_FLOAT(dt);
  CHECK_ARG(rows >= 0 && cols > 0 && k >= 1 && k <= cols && cols <= INT32_MAX);
  if (rows == 0) return ST_OK;
  CHECK_ARG(x && values && indices);
  topk_ctx c = {dt, x, cols, k, values, indices};
  st_pool_for(pool_of(self), rows, rows_chunk(cols * k / 4 + 1), topk_task, &c);
  return ST_OK;
}

typedef struct rows_ctx { size_t row_bytes; st_dtype dt; const char *src; const int32_t *idx; const void *w; int64_t n, cols; char *dst; } rows_ctx;

static void gather_task(void *v, int64_t b, int64_t e, int tid) {
  rows_ctx *c = v;
  for (int64_t i = b; i < e; i++)
    memcpy(c->dst + (size_t)i * c->row_bytes, c->src + (size_t)c->idx[i] * c->row_bytes, c->row_bytes);
}

static st_result op_gather_rows(const st_ops *self, st_dtype dt, const void *src, const int32_t *idx, int64_t n,
                                int64_t cols, void *dst) {
  CHECK_FLOAT(dt);
  CHECK_ARG(n >= 0 && cols >= 0);
  if (n == 0 || cols == 0) return ST_OK;
  CHECK_ARG(src && idx && dst);
  for (int64_t i = 0; i < n; i++) CHECK_ARG(idx[i] >= 0);
  rows_ctx c = {(size_t)cols * st_dtype_size(dt), dt, src, idx, NULL, n, cols, dst};
  st_pool_for(pool_of(self), n, rows_chunk(cols), gather_task, &c);
  return ST_OK;
}

/* threads split the columns: duplicate indices then never race */
static void scatter_task(void *v, int64_t b, int64_t e, int tid) {
  rows_ctx *c = v;
  for (int64_t i = 0; i < c->n; i++) {
    int64_t r = c->idx[i];
    if (c->dt == ST_F32) {
      float w = c->w ? ((const float *)c->w)[i] : 1.0f;
      const float *s = (const float *)c->src + i * c->cols;
      float *d = (float *)c->dst + r * c->cols;
      for (int64_t j = b; j < e; j++) d[j] += w * s[j];
    } else {
      double w = c->w ? ((const double *)c->w)[i] : 1.0;
      const double *s = (const double *)c->src + i * c->cols;
      double *d = (double *)c->dst + r * c->cols;
      for (int64_t j = b; j < e; j++) d[j] += w * s[j];
    }
  }
}

static st_result op_scatter_add_rows(const st_ops *self, st_dtype dt, const void *src, const int32_t *idx,
                                     const void *row_weight, int64_t n, int64_t cols, void *dst) {
  CHECK_FLOAT(dt);
  CHECK_ARG(n >= 0 && cols >= 0);
  if (n == 0 || cols == 0) return ST_OK;
  CHECK_ARG(src && idx && dst);
  for (int64_t i = 0; i < n; i++) CHECK_ARG(idx[i] >= 0);
  rows_ctx c = {0, dt, src, idx, row_weight, n, cols, dst};
  st_pool_for(pool_of(self), cols, n * cols > 65536 ? 64 : cols, scatter_task, &c);
  return ST_OK;
}

/* ---- create / destroy ---- */
typedef struct st_cpu_table {
  st_ops ops;
  st_cpu_impl impl;
} st_cpu_table;

st_result st_cpu_ops_create(int threads, const st_ops **out, st_error *err) {
  if (!out) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "st_cpu_ops_create", "out must not be NULL");
  *out = NULL;
  const char *cap = getenv("STRATA_CPU_ISA");
  if (cap && *cap && strcmp(cap, "generic") != 0 && strcmp(cap, "avx2") != 0 && strcmp(cap, "avx512") != 0)
    return st_error_set(err, ST_ERR_CONFIG, "STRATA_CPU_ISA",
                        "STRATA_CPU_ISA=%s is not a known level; use generic, avx2 or avx512 (or unset it)", cap);
  st_cpu_table *t = calloc(1, sizeof *t);
  if (!t) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "st_cpu_ops_create", "cannot allocate the CPU ops table");
  if (st_pool_create(threads, &t->impl.pool) != ST_OK) {
    free(t);
    return st_error_set(err, ST_ERR_INTERNAL, "st_cpu_ops_create",
                        "cannot start %d kernel threads (pthread_create failed); lower the thread count", threads);
  }
  st_cpu_kern_generic(&t->impl.kern);
  if (detect_level() == LEVEL_AVX2) st_cpu_kern_avx2(&t->impl.kern);
  snprintf(t->impl.name, sizeof t->impl.name, "cpu-%s", t->impl.kern.level);

  st_ops *o = &t->ops;
  o->struct_size = sizeof *o;
  o->name = t->impl.name;
  o->device = (st_device){ST_DEVICE_CPU, 0};
  o->impl = &t->impl;
  o->copy = op_copy;
  o->fill = op_fill;
  o->synchronize = op_synchronize;
  o->cast = op_cast;
  o->scale = op_scale;
  o->axpy = op_axpy;
  o->add = op_add;
  o->mul = op_mul;
  o->sumsq = op_sumsq;
  o->gemm = op_gemm;
  o->bias_backward = op_bias_backward;
  o->layernorm_forward = op_layernorm_forward;
  o->layernorm_backward = op_layernorm_backward;
  o->rmsnorm_forward = op_rmsnorm_forward;
  o->rmsnorm_backward = op_rmsnorm_backward;
  o->gelu_forward = op_gelu_forward;
  o->gelu_backward = op_gelu_backward;
  o->silu_forward = op_silu_forward;
  o->silu_backward = op_silu_backward;
  o->swiglu_forward = op_swiglu_forward;
  o->swiglu_backward = op_swiglu_backward;
  o->softmax_forward = op_softmax_forward;
  o->softmax_backward = op_softmax_backward;
  o->attention_forward = st_cpu_attention_forward;
  o->attention_backward = st_cpu_attention_backward;
  o->rope_apply = op_rope_apply;
  o->modulate_forward = op_modulate_forward;
  o->modulate_backward = op_modulate_backward;
  o->gated_residual_forward = op_gated_residual_forward;
  o->gated_residual_backward = op_gated_residual_backward;
  o->mse_forward = op_mse_forward;
  o->mse_backward = op_mse_backward;
  o->cross_entropy_forward = op_cross_entropy_forward;
  o->cross_entropy_backward = op_cross_entropy_backward;
  o->topk = op_topk;
  o->gather_rows = op_gather_rows;
  o->scatter_add_rows = op_scatter_add_rows;
  o->optim_update = st_cpu_optim_update;
  *out = o;
  return ST_OK;
}

void st_cpu_ops_destroy(const st_ops *ops) {
  if (!ops) return;
  st_cpu_table *t = (st_cpu_table *)(uintptr_t)ops; /* ops is the first member */
  st_pool_destroy(t->impl.pool);
  free(t);
}
