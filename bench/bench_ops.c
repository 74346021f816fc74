/* bench_ops — throughput of the CPU ops table against its rooflines, in one run:
 *   GEMM 1024^3 through ops->gemm vs cblas_sgemm called directly (target ratio >= 0.95);
 *   fused AdamW (fp32: 4 arrays read, 3 written = 28 B/param) vs memcpy bandwidth measured here;
 *   attention forward + backward GFLOP/s (B=1, S=1024, H=8, d=64).
 * Every figure is the median of several repetitions after a warm-up. */
#include <cpu_ops.h>

#include <cblas.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *t, int n) {
  qsort(t, (size_t)n, sizeof *t, cmp_double);
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static float *randf(size_t n, unsigned seed) {
  float *x = malloc(n * sizeof *x);
  if (!x) { fprintf(stderr, "out of memory\n"); exit(1); }
  for (size_t i = 0; i < n; i++) {
    seed = seed * 1664525u + 1013904223u;
    x[i] = (float)((seed >> 8) * (1.0 / 16777216.0) - 0.5);
  }
  return x;
}

#define REPS 7
#define TIME_MEDIAN(out, body)                                                                     \
  do {                                                                                             \
    double t_[REPS];                                                                               \
    { body; }                                                                                      \
    for (int r_ = 0; r_ < REPS; r_++) {                                                            \
      double t0_ = now();                                                                          \
      { body; }                                                                                    \
      t_[r_] = now() - t0_;                                                                        \
    }                                                                                              \
    (out) = median(t_, REPS);                                                                      \
  } while (0)

int main(void) {
  const st_ops *ops = NULL;
  st_error err;
  if (st_cpu_ops_create(0, &ops, &err) != ST_OK) {
    fprintf(stderr, "st_cpu_ops_create: %s\n", err.message);
    return 1;
  }
  printf("ops table: %s (SIMD level %s), OpenBLAS threads %d\n", ops->name, st_cpu_simd_level(),
         openblas_get_num_threads());

  /* ---- GEMM ---- */
  const int N = 1024;
  float *a = randf((size_t)N * N, 1), *b = randf((size_t)N * N, 2), *c = calloc((size_t)N * N, sizeof(float));
  st_gemm_desc g = {.dtype = ST_F32, .c_dtype = ST_F32, .trans_b = true, .m = N, .n = N, .k = N, .alpha = 1,
                    .beta = 0, .a = a, .lda = N, .b = b, .ldb = N, .c = c, .ldc = N, .batch = 1};
  double t_ops, t_blas;
  TIME_MEDIAN(t_blas, cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, N, N, 1.0f, a, N, b, N, 0.0f, c, N));
  TIME_MEDIAN(t_ops, ops->gemm(ops, &g));
  double flop = 2.0 * N * N * N;
  printf("gemm 1024^3 f32 (x W^T): ops %.1f GFLOP/s, cblas_sgemm %.1f GFLOP/s, ratio %.3f (target >= 0.95)\n",
         flop / t_ops * 1e-9, flop / t_blas * 1e-9, t_blas / t_ops);
  free(a); free(b); free(c);

  /* ---- AdamW vs memcpy ---- */
  const size_t n = (size_t)1 << 23; /* 8M params: 32 MiB per array, far beyond the caches */
  float *p = randf(n, 3), *gr = randf(n, 4), *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
  size_t cp_bytes = (size_t)1 << 28;
  char *src = malloc(cp_bytes), *dst = malloc(cp_bytes);
  if (!m || !v || !src || !dst) { fprintf(stderr, "out of memory\n"); return 1; }
  memset(src, 1, cp_bytes);
  memset(dst, 0, cp_bytes);
  double t_memcpy, t_copy, t_adam;
  st_device cpu = {ST_DEVICE_CPU, 0};
  TIME_MEDIAN(t_memcpy, memcpy(dst, src, cp_bytes));
  TIME_MEDIAN(t_copy, ops->copy(ops, dst, cpu, src, cpu, cp_bytes));
  double bw1 = 2.0 * (double)cp_bytes / t_memcpy, bwp = 2.0 * (double)cp_bytes / t_copy; /* read + write */
  double bw = bw1 > bwp ? bw1 : bwp;
  int64_t step = 1;
  st_optim_desc od = {.type = ST_OPTIM_ADAMW, .n = (int64_t)n, .param = p, .param_dtype = ST_F32, .grad = gr,
                      .grad_dtype = ST_F32, .exp_avg = m, .exp_avg_sq = v, .lr = 1e-4, .beta1 = 0.9, .beta2 = 0.999,
                      .eps = 1e-8, .weight_decay = 0.01, .grad_scale = 1};
  TIME_MEDIAN(t_adam, od.step = step++; ops->optim_update(ops, &od));
  double pps = (double)n / t_adam, roof = bw / 28.0;
  printf("memcpy bandwidth (read+write): 1 thread %.1f GB/s, ops->copy (pool) %.1f GB/s; roofline uses %.1f GB/s\n",
         bw1 * 1e-9, bwp * 1e-9, bw * 1e-9);
  printf("adamw f32: %.1f Mparam/s = %.1f GB/s at 28 B/param; roofline %.1f Mparam/s; ratio %.3f (aim >= 0.8)\n",
         pps * 1e-6, pps * 28e-9, roof * 1e-6, pps / roof);
  free(p); free(gr); free(m); free(v); free(src); free(dst);

  /* ---- attention ---- */
  const int64_t B = 1, S = 1024, H = 8, d = 64, nq = B * S * H * d;
  float *q = randf((size_t)nq, 5), *k = randf((size_t)nq, 6), *vv = randf((size_t)nq, 7), *dout = randf((size_t)nq, 8);
  float *out = malloc(sizeof(float) * (size_t)nq), *lse = malloc(sizeof(float) * (size_t)(B * H * S));
  float *dq = malloc(sizeof(float) * (size_t)nq), *dk = malloc(sizeof(float) * (size_t)nq), *dv = malloc(sizeof(float) * (size_t)nq);
  for (int causal = 0; causal < 2; causal++) {
    st_attn_desc ad = {.dtype = ST_F32, .batch = B, .seq_q = S, .seq_k = S, .heads = H, .kv_heads = H, .head_dim = d,
                       .scale = 0.125, .causal = causal, .q = q, .k = k, .v = vv, .out = out, .lse = lse};
    double t_f, t_b;
    TIME_MEDIAN(t_f, ops->attention_forward(ops, &ad));
    TIME_MEDIAN(t_b, ops->attention_backward(ops, &ad, dout, dq, dk, dv));
    /* FlashAttention's convention: forward 4 B H S^2 d, backward 2.5x that (incl. the recompute);
     * causal counts half */
    double f_fwd = 4.0 * (double)(B * H * S * S * d) * (causal ? 0.5 : 1.0), f_bwd = 2.5 * f_fwd;
    printf("attention f32 B=1 S=1024 H=8 d=64 %s: fwd %.1f GFLOP/s (%.1f ms), bwd %.1f GFLOP/s (%.1f ms), "
           "fwd+bwd %.1f GFLOP/s\n", causal ? "causal" : "full  ", f_fwd / t_f * 1e-9, t_f * 1e3,
           f_bwd / t_b * 1e-9, t_b * 1e3, (f_fwd + f_bwd) / (t_f + t_b) * 1e-9);
  }
  free(q); free(k); free(vv); free(dout); free(out); free(lse); free(dq); free(dk); free(dv);
  st_cpu_ops_destroy(ops);
  return 0;
}
