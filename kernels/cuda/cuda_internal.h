/* cuda_internal.h — what cuda_ops.c (C11, host side: argument checks, cuBLAS, error messages) and
 * the kernel files (*.cu, compiled by nvcc) share: the launchers. Not installed.
 *
 * Every launcher enqueues its kernels on `s` and returns cudaGetLastError() (or the first error of
 * a CUDA call it made), so the caller can name the op in the message. Launchers trust their
 * arguments: cuda_ops.c has checked them (dtype F32 or BF16 unless a comment says otherwise,
 * sizes >= 0, pointers non-NULL where required). Sizes are int64; grids stride. */
#ifndef STRATA_KERNELS_CUDA_INTERNAL_H
#define STRATA_KERNELS_CUDA_INTERNAL_H

#include <cuda_runtime_api.h>
#include <strata/ops.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Blocks the two-stage reductions use: stage one writes at most this many doubles, the host sums
 * them in index order (deterministic for a given shape). */
#define STC_MAX_PARTIALS 1024

/* cudaSuccess when this build's kernels can run on the current device (cudaFuncGetAttributes
 * on one kernel), else the error: cudaErrorNoKernelImageForDevice for an architecture the fat
 * binary lacks. */
cudaError_t stc_probe_kernels(void);

/* ---- memory and casts ---- */
/* any dtype (F32, F64, BF16, F16, I32, I64, U8), value converted as the CPU table does */
cudaError_t stc_fill(cudaStream_t s, st_dtype dt, void *x, int64_t n, double value);
/* float <-> float (F32, F64, BF16, F16, round to nearest even, bit-identical to tensor.h) and
 * I32 <-> I64 */
cudaError_t stc_cast(cudaStream_t s, st_dtype sdt, const void *src, st_dtype ddt, void *dst, int64_t n);

/* ---- elementwise ---- */
typedef enum stc_ew_op {
  STC_EW_SCALE, /* out *= alpha */
  STC_EW_AXPY,  /* out += alpha a */
  STC_EW_ADD,   /* out = a + b */
  STC_EW_MUL,   /* out = a * b */
  STC_EW_GELU_F, STC_EW_GELU_B, /* out = gelu(a); out = b * gelu'(a) */
  STC_EW_SILU_F, STC_EW_SILU_B,
} stc_ew_op;
cudaError_t stc_elementwise(cudaStream_t s, stc_ew_op op, st_dtype dt, int kind, const void *a, const void *b,
                            void *out, int64_t n, double alpha);
/* partial sums of x^2 (in double) into part[0..*nparts) */
cudaError_t stc_sumsq_partial(cudaStream_t s, st_dtype dt, const void *x, int64_t n, double *part, int *nparts);
cudaError_t stc_swiglu(cudaStream_t s, st_dtype dt, bool backward, const void *x, const void *dy, void *out,
                       int64_t rows, int64_t cols);

/* ---- GEMM helpers ---- */
/* C[b][r, j] += bias[j] over batch x rows x cols at ldc / stride_c */
cudaError_t stc_bias_add(cudaStream_t s, st_dtype dt, void *c, int64_t ldc, int64_t stride_c, int64_t batch,
                         int64_t rows, int64_t cols, const void *bias);
/* C = beta C (beta == 0 writes zeros, NaN or not): the k == 0 case */
cudaError_t stc_scale_matrix(cudaStream_t s, st_dtype dt, void *c, int64_t ldc, int64_t stride_c, int64_t batch,
                             int64_t rows, int64_t cols, double beta);
/* dbias[j] += sum_r dy[r, j] */
cudaError_t stc_bias_backward(cudaStream_t s, st_dtype dt, const void *dy, int64_t rows, int64_t cols, void *dbias);

/* ---- normalization, softmax (one block per row) ---- */
cudaError_t stc_layernorm_fwd(cudaStream_t s, st_dtype dt, const void *x, void *y, void *mean, void *rstd,
                              int64_t rows, int64_t cols, double eps);
cudaError_t stc_layernorm_bwd(cudaStream_t s, st_dtype dt, const void *dy, const void *x, const void *mean,
                              const void *rstd, void *dx, int64_t rows, int64_t cols);
cudaError_t stc_rmsnorm_fwd(cudaStream_t s, st_dtype dt, const void *x, const void *w, void *y, void *rstd,
                            int64_t rows, int64_t cols, double eps);
cudaError_t stc_rmsnorm_bwd(cudaStream_t s, st_dtype dt, const void *dy, const void *x, const void *w,
                            const void *rstd, void *dx, void *dw, int64_t rows, int64_t cols);
cudaError_t stc_softmax(cudaStream_t s, st_dtype dt, bool backward, const void *x_or_y, const void *dy, void *out,
                        int64_t rows, int64_t cols);
cudaError_t stc_rope(cudaStream_t s, st_dtype dt, st_rope_layout layout, void *x, const void *cos, const void *sin,
                     int64_t tbs, int64_t batch, int64_t seq, int64_t heads, int64_t head_dim, bool inverse);

/* ---- modulation, gated residual ---- */
cudaError_t stc_modulate_fwd(cudaStream_t s, st_dtype dt, const void *x, const void *shift, const void *scale,
                             int64_t stride, void *y, int64_t batch, int64_t tokens, int64_t dim);
cudaError_t stc_modulate_bwd(cudaStream_t s, st_dtype dt, const void *dy, const void *x, const void *scale,
                             int64_t stride, void *dx, void *dshift, void *dscale, int64_t batch, int64_t tokens,
                             int64_t dim);
cudaError_t stc_gated_fwd(cudaStream_t s, st_dtype dt, void *h, const void *gate, int64_t stride, const void *a,
                          int64_t batch, int64_t tokens, int64_t dim);
cudaError_t stc_gated_bwd(cudaStream_t s, st_dtype dt, const void *dh, const void *gate, int64_t stride,
                          const void *a, void *da, void *dgate, int64_t batch, int64_t tokens, int64_t dim);

/* ---- losses ---- */
cudaError_t stc_mse_fwd_partial(cudaStream_t s, st_dtype dt, const void *pred, const void *target, const void *w,
                                int64_t rows, int64_t cols, double *part, int *nparts);
cudaError_t stc_mse_bwd(cudaStream_t s, st_dtype dt, const void *pred, const void *target, const void *w,
                        int64_t rows, int64_t cols, double grad_scale, void *dpred);
/* part[2 i] = loss sum, part[2 i + 1] = counted rows of block i; *bad_row (device int64) is
 * atomically lowered to the first row whose label is out of range (set it to INT64_MAX first) */
cudaError_t stc_ce_fwd_partial(cudaStream_t s, st_dtype dt, const void *logits, const int64_t *labels, int64_t rows,
                               int64_t vocab, int64_t ignore, double *part, int *nblocks,
                               unsigned long long *bad_row);
cudaError_t stc_ce_bwd(cudaStream_t s, st_dtype dt, const void *logits, const int64_t *labels, int64_t rows,
                       int64_t vocab, int64_t ignore, double grad_scale, void *dlogits, unsigned long long *bad_row);

/* ---- routing ---- */
cudaError_t stc_topk(cudaStream_t s, st_dtype dt, const void *x, int64_t rows, int64_t cols, int64_t k, void *values,
                     int32_t *indices);
/* negative indices lower *bad_row like the losses do (the row is skipped) */
cudaError_t stc_gather_rows(cudaStream_t s, size_t elem_size, const void *src, const int32_t *idx, int64_t n,
                            int64_t cols, void *dst, unsigned long long *bad_row);
/* atomics: the order of duplicate rows' adds is not fixed (F32: float atomicAdd; BF16: a CAS loop
 * that rounds every add to bf16) */
cudaError_t stc_scatter_add_rows(cudaStream_t s, st_dtype dt, const void *src, const int32_t *idx, const void *w,
                                 int64_t n, int64_t cols, void *dst, unsigned long long *bad_row);

/* ---- optimizer ---- */
typedef struct stc_optim_consts {
  int type;           /* st_optim_type */
  bool decoupled;
  float lr, beta1, beta2, eps, wd, momentum;
  float step_size;    /* lr / (1 - beta1^t) */
  float bc2_sqrt;     /* sqrt(1 - beta2^t) */
  float grad_scale;
  bool first_step;    /* SGD momentum: buf = g */
} stc_optim_consts;
cudaError_t stc_optim(cudaStream_t s, const st_optim_desc *d, const stc_optim_consts *c);

/* ---- attention (straightforward: one warp per query row / key row; head_dim <= 256) ---- */
#define STC_ATTN_MAX_HEAD_DIM 256
cudaError_t stc_attention_fwd(cudaStream_t s, const st_attn_desc *d);
cudaError_t stc_attention_bwd(cudaStream_t s, const st_attn_desc *d, const void *dout, void *dq, void *dk, void *dv);

#ifdef __cplusplus
}
#endif

#endif
