/* cpu_internal.h — what the CPU ops table's source files share: the thread pool, the per-ISA
 * table of F32 row kernels, and the F32/F64 generic kernels they fall back on. Not installed. */
#ifndef STRATA_KERNELS_CPU_INTERNAL_H
#define STRATA_KERNELS_CPU_INTERNAL_H

#include <strata/ops.h>

#include <pthread.h>

/* ---- thread pool ----
 * A fixed set of workers owned by one ops table. st_pool_for splits [0, n) into at most `threads`
 * contiguous chunks of at least `min_chunk` items; the calling thread runs chunk 0. If another
 * thread is already using the pool (two callers sharing one table), the call runs inline, so the
 * table is safe to use from several threads at once. */
typedef void (*st_pool_fn)(void *ctx, int64_t begin, int64_t end, int tid);
typedef struct st_pool st_pool;

st_result st_pool_create(int threads, st_pool **out);
void st_pool_destroy(st_pool *pool);
int st_pool_threads(const st_pool *pool);
void st_pool_for(st_pool *pool, int64_t n, int64_t min_chunk, st_pool_fn fn, void *ctx);

/* ---- AdamW / Adam scalars, computed once per call in double ---- */
typedef struct st_adam_consts {
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  float step_size;  /* lr / (1 - beta1^step) */
  float bc2_sqrt;   /* sqrt(1 - beta2^step) */
  float eps;
  float decay;      /* 1 - lr * wd for decoupled decay, else 1 */
  float l2;         /* wd for L2-in-the-gradient Adam, else 0 */
  float grad_scale;
} st_adam_consts;

/* ---- per-ISA F32 kernels ----
 * Every entry has a portable C version (the "generic" level); the AVX2 file overrides the hot ones.
 * Row kernels work on one row of `cols` elements; stream kernels on n contiguous elements. */
typedef struct st_cpu_kern {
  const char *level;
  void (*add)(const float *a, const float *b, float *out, int64_t n);
  void (*mul)(const float *a, const float *b, float *out, int64_t n);
  void (*axpy)(int64_t n, float alpha, const float *x, float *y);
  void (*scale)(float *x, int64_t n, float alpha);
  double (*sumsq)(const float *x, int64_t n);
  void (*ln_fwd_row)(const float *x, float *y, float *mean, float *rstd, int64_t cols, float eps);
  void (*ln_bwd_row)(const float *dy, const float *x, float mean, float rstd, float *dx, int64_t cols);
  void (*rms_fwd_row)(const float *x, const float *w, float *y, float *rstd, int64_t cols, float eps);
  /* dw_acc (may be NULL) += dy * x * rstd */
  void (*rms_bwd_row)(const float *dy, const float *x, const float *w, float rstd, float *dx, float *dw_acc,
                      int64_t cols);
  void (*gelu_fwd)(st_gelu_kind kind, const float *x, float *y, int64_t n);
  void (*gelu_bwd)(st_gelu_kind kind, const float *x, const float *dy, float *dx, int64_t n);
  void (*silu_fwd)(const float *x, float *y, int64_t n);
  void (*silu_bwd)(const float *x, const float *dy, float *dx, int64_t n);
  void (*swiglu_fwd)(const float *g, const float *u, float *y, int64_t n);
  void (*swiglu_bwd)(const float *g, const float *u, const float *dy, float *dg, float *du, int64_t n);
  /* x[i] = exp(x[i] - shift) in place (-inf gives 0); returns the sum */
  float (*exp_shift_sum)(float *x, int64_t n, float shift);
  /* fp32 params and grads, fp32 state */
  void (*adam_f32)(float *p, const float *g, float *m, float *v, int64_t n, const st_adam_consts *c);
} st_cpu_kern;

void st_cpu_kern_generic(st_cpu_kern *k);
/* Fill k with AVX2+FMA kernels; defined in a file compiled with -mavx2 -mfma, call only when the
 * CPU has both. */
void st_cpu_kern_avx2(st_cpu_kern *k);

typedef struct st_cpu_impl {
  st_pool *pool;
  st_cpu_kern kern;
  char name[32];
} st_cpu_impl;

static inline const st_cpu_impl *st_cpu_impl_of(const st_ops *self) { return (const st_cpu_impl *)self->impl; }

/* F64 / generic-F32 scalar kernels shared by the portable table and by the AVX2 tails. */
float st_cpu_gelu_f32(st_gelu_kind kind, float x);
float st_cpu_gelu_grad_f32(st_gelu_kind kind, float x);

#endif
