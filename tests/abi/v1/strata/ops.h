/* ops.h — the kernel table. One table per device; models call nothing else to compute.
 *
 * Conventions (every op):
 * - `self` is the table itself: `ops->gemm(ops, &desc)`. Implementations keep their state (thread
 *   pool, CUDA stream, cuBLAS handle) behind `self->impl`.
 * - Pointers are device pointers of the table's device; tensors are row-major and contiguous.
 * - `dt` is the element type of the floating-point operands. The CPU table implements ST_F32 and
 *   ST_F64 (the reference path); the CUDA table implements ST_BF16 and ST_F32. Anything else
 *   returns ST_ERR_UNSUPPORTED. Per-row statistics (mean, rstd, lse) have type `dt` as well.
 * - Forward ops write their outputs. Backward ops WRITE input gradients (dx) and ACCUMULATE (+=)
 *   parameter-like gradients (dw, dbias, dshift, dscale, dgate), because parameter gradients sum
 *   over micro-batches and over every place a shared tensor is used.
 * - Ops may run asynchronously on devices with streams; `synchronize` waits. Ops that return a
 *   host scalar (sumsq, mse, cross_entropy) synchronize themselves.
 * - Shape comments use B batch, T tokens, D features, H heads, d head dim. */
#ifndef STRATA_OPS_H
#define STRATA_OPS_H

#include "strata.h"
#include "tensor.h"

/* C[b] = alpha * op(A[b]) @ op(B[b]) + beta * C[b] (+ bias, broadcast over rows), row-major.
 * op(A) is [m, k] (A stored [k, m] when trans_a), op(B) is [k, n] (B stored [n, k] when trans_b).
 * A linear layer y = x W^T + b with W [out, in] is {m = tokens, n = out, k = in, trans_b = true}. */
typedef struct st_gemm_desc {
  st_dtype dtype;   /* of A and B */
  st_dtype c_dtype; /* of C and bias; usually == dtype, ST_F32 to accumulate bf16 products in fp32 */
  bool trans_a, trans_b;
  int64_t m, n, k;
  double alpha, beta;
  const void *a;
  int64_t lda, stride_a; /* leading dimension (row stride) and batch stride, in elements */
  const void *b;
  int64_t ldb, stride_b;
  void *c;
  int64_t ldc, stride_c;
  int64_t batch;    /* >= 1 */
  const void *bias; /* [n] or NULL */
} st_gemm_desc;

typedef enum st_gelu_kind {
  ST_GELU_TANH = 0,    /* 0.5 x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3))) — diffusers */
  ST_GELU_SIGMOID = 1, /* x sigmoid(1.702 x) — DiffSynth's ApproximateGELU */
  ST_GELU_ERF = 2,     /* exact: 0.5 x (1 + erf(x / sqrt 2)) */
} st_gelu_kind;

typedef enum st_rope_layout {
  ST_ROPE_INTERLEAVED = 0, /* pair k = elements (2k, 2k+1): FLUX / Qwen-Image */
  ST_ROPE_HALF = 1,        /* pair k = elements (k, k + d/2): rotate_half, transformers LLMs */
} st_rope_layout;

/* Scaled dot-product attention over [B, S, H, d] tensors (token-major, heads interleaved, exactly
 * what a linear layer produces). Grouped-query attention: K and V have kv_heads heads, and query
 * head h reads kv head h / (heads / kv_heads). */
typedef struct st_attn_desc {
  st_dtype dtype;
  int64_t batch, seq_q, seq_k, heads, kv_heads, head_dim;
  double scale;                /* usually 1/sqrt(head_dim) */
  bool causal;                 /* query i sees keys j <= i + (seq_k - seq_q) */
  const uint8_t *key_mask;     /* [B, seq_k], nonzero = may be attended; NULL = all */
  const int32_t *segment_ids;  /* [B, seq] (seq_q == seq_k): attend only within equal ids; NULL */
  const void *q;               /* [B, seq_q, heads, d] */
  const void *k, *v;           /* [B, seq_k, kv_heads, d] */
  void *out;                   /* [B, seq_q, heads, d] */
  void *lse;                   /* [B, heads, seq_q] log-sum-exp of the scaled scores: written by
                                  forward, read by backward. A query that may attend no key gets
                                  out = 0 and lse = -inf. */
} st_attn_desc;

/* Fused optimizer update for one tensor or shard, n elements. */
typedef enum st_optim_type { ST_OPTIM_ADAMW = 0, ST_OPTIM_ADAM = 1, ST_OPTIM_SGD = 2 } st_optim_type;

typedef struct st_optim_desc {
  st_optim_type type;
  int64_t n;
  void *param;           /* working copy, param_dtype (F32, BF16 or F16; F64 on the CPU path) */
  st_dtype param_dtype;
  float *master;         /* fp32 master copy, or NULL when param_dtype is F32/F64 */
  const void *grad;      /* grad_dtype */
  st_dtype grad_dtype;
  float *exp_avg;        /* Adam m, or SGD momentum buffer (NULL when momentum == 0) */
  float *exp_avg_sq;     /* Adam v; unused by SGD */
  double lr, beta1, beta2, eps, weight_decay, momentum;
  bool adam_w_mode;      /* Adam: decoupled weight decay (DeepSpeed's default even for "Adam") */
  int64_t step;          /* 1-based optimizer step, for bias correction */
  double grad_scale;     /* every grad is multiplied by this first: 1/loss_scale times the clip
                            coefficient */
} st_optim_desc;

typedef struct st_ops st_ops;

struct st_ops {
  uint32_t struct_size;
  const char *name;   /* "cpu-avx2", "cpu-generic", "cuda" */
  st_device device;
  void *impl;

  /* ---- memory ---- */
  /* Copies between any two of {host, this device}; either pointer may be host memory. */
  st_result (*copy)(const st_ops *self, void *dst, st_device dst_dev, const void *src, st_device src_dev, size_t bytes);
  st_result (*fill)(const st_ops *self, st_dtype dt, void *x, int64_t n, double value);
  st_result (*synchronize)(const st_ops *self);

  /* ---- elementwise ---- */
  st_result (*cast)(const st_ops *self, st_dtype src_dt, const void *src, st_dtype dst_dt, void *dst, int64_t n);
  st_result (*scale)(const st_ops *self, st_dtype dt, void *x, int64_t n, double alpha);             /* x *= a */
  st_result (*axpy)(const st_ops *self, st_dtype dt, int64_t n, double alpha, const void *x, void *y); /* y += a x */
  st_result (*add)(const st_ops *self, st_dtype dt, const void *a, const void *b, void *out, int64_t n);
  st_result (*mul)(const st_ops *self, st_dtype dt, const void *a, const void *b, void *out, int64_t n);
  /* sum of x^2 accumulated in double, returned on the host (global grad norm, overflow checks) */
  st_result (*sumsq)(const st_ops *self, st_dtype dt, const void *x, int64_t n, double *out);

  /* ---- linear algebra ---- */
  st_result (*gemm)(const st_ops *self, const st_gemm_desc *desc);
  /* dbias[c] += sum_r dy[r, c]   (dy [rows, cols]) */
  st_result (*bias_backward)(const st_ops *self, st_dtype dt, const void *dy, int64_t rows, int64_t cols, void *dbias);

  /* ---- normalization ---- */
  /* Parameter-free LayerNorm over the last dim: y = (x - mean) * rstd. x, y [rows, cols];
   * mean, rstd [rows]. */
  st_result (*layernorm_forward)(const st_ops *self, st_dtype dt, const void *x, void *y, void *mean, void *rstd,
                                 int64_t rows, int64_t cols, double eps);
  st_result (*layernorm_backward)(const st_ops *self, st_dtype dt, const void *dy, const void *x, const void *mean,
                                  const void *rstd, void *dx, int64_t rows, int64_t cols);
  /* RMSNorm: y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); w [cols] or NULL (no gain).
   * Per-head QK norm is rows = tokens*heads, cols = head_dim. */
  st_result (*rmsnorm_forward)(const st_ops *self, st_dtype dt, const void *x, const void *w, void *y, void *rstd,
                               int64_t rows, int64_t cols, double eps);
  st_result (*rmsnorm_backward)(const st_ops *self, st_dtype dt, const void *dy, const void *x, const void *w,
                                const void *rstd, void *dx, void *dw, int64_t rows, int64_t cols);

  /* ---- activations ---- */
  st_result (*gelu_forward)(const st_ops *self, st_dtype dt, st_gelu_kind kind, const void *x, void *y, int64_t n);
  st_result (*gelu_backward)(const st_ops *self, st_dtype dt, st_gelu_kind kind, const void *x, const void *dy,
                             void *dx, int64_t n);
  st_result (*silu_forward)(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t n);
  st_result (*silu_backward)(const st_ops *self, st_dtype dt, const void *x, const void *dy, void *dx, int64_t n);
  /* x [rows, 2*cols] = [gate | up] per row; y [rows, cols] = silu(gate) * up */
  st_result (*swiglu_forward)(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t rows, int64_t cols);
  st_result (*swiglu_backward)(const st_ops *self, st_dtype dt, const void *x, const void *dy, void *dx, int64_t rows,
                               int64_t cols);
  /* softmax over the last dim, x, y [rows, cols] */
  st_result (*softmax_forward)(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t rows, int64_t cols);
  st_result (*softmax_backward)(const st_ops *self, st_dtype dt, const void *y, const void *dy, void *dx,
                                int64_t rows, int64_t cols);

  /* ---- attention and position ---- */
  st_result (*attention_forward)(const st_ops *self, const st_attn_desc *desc);
  /* desc->out and desc->lse as written by the forward; dq [like q]; dk, dv [like k, v] */
  st_result (*attention_backward)(const st_ops *self, const st_attn_desc *desc, const void *dout, void *dq, void *dk,
                                  void *dv);
  /* In-place rotation of x [B, S, H, d] by angle tables cos, sin [S, d/2] (pair k of token s
   * rotates by theta[s][k]); table_batch_stride = 0 shares one table across the batch, S*d/2 gives
   * each sample its own. inverse rotates by -theta: the backward of the forward. */
  st_result (*rope_apply)(const st_ops *self, st_dtype dt, st_rope_layout layout, void *x, const void *cos,
                          const void *sin, int64_t table_batch_stride, int64_t batch, int64_t seq, int64_t heads,
                          int64_t head_dim, bool inverse);

  /* ---- adaptive modulation (DiT) ---- */
  /* y[b,t,:] = x[b,t,:] * (1 + scale[b,:]) + shift[b,:]; x, y [B, T, D]; shift/scale rows are
   * mod_stride elements apart (slices of a [B, k*D] modulation vector). shift may be NULL. */
  st_result (*modulate_forward)(const st_ops *self, st_dtype dt, const void *x, const void *shift, const void *scale,
                                int64_t mod_stride, void *y, int64_t batch, int64_t tokens, int64_t dim);
  /* dx = dy (1 + scale); dshift += sum_t dy; dscale += sum_t dy x. dshift may be NULL. */
  st_result (*modulate_backward)(const st_ops *self, st_dtype dt, const void *dy, const void *x, const void *scale,
                                 int64_t mod_stride, void *dx, void *dshift, void *dscale, int64_t batch,
                                 int64_t tokens, int64_t dim);
  /* h[b,t,:] += gate[b,:] * a[b,t,:]; gate NULL means a plain residual add. */
  st_result (*gated_residual_forward)(const st_ops *self, st_dtype dt, void *h, const void *gate, int64_t gate_stride,
                                      const void *a, int64_t batch, int64_t tokens, int64_t dim);
  /* da = dh * gate; dgate += sum_t dh * a (gate and dgate may be NULL: da = dh). */
  st_result (*gated_residual_backward)(const st_ops *self, st_dtype dt, const void *dh, const void *gate,
                                       int64_t gate_stride, const void *a, void *da, void *dgate, int64_t batch,
                                       int64_t tokens, int64_t dim);

  /* ---- losses ---- */
  /* Weighted mean squared error. pred, target [rows, cols]; row_weight [rows] or NULL (= 1).
   * loss = sum_r w_r * mean_c (pred - target)^2 / rows (returned on the host);
   * backward: dpred = grad_scale * d(loss)/d(pred) (written). */
  st_result (*mse_forward)(const st_ops *self, st_dtype dt, const void *pred, const void *target,
                           const void *row_weight, int64_t rows, int64_t cols, double *loss);
  st_result (*mse_backward)(const st_ops *self, st_dtype dt, const void *pred, const void *target,
                            const void *row_weight, int64_t rows, int64_t cols, double grad_scale, void *dpred);
  /* Cross-entropy over logits [rows, vocab] with int64 labels [rows]; rows whose label equals
   * ignore_index contribute nothing. Forward returns the SUM of per-row losses and the number of
   * counted rows; backward writes dlogits = grad_scale * (softmax - onehot) (zero for ignored rows). */
  st_result (*cross_entropy_forward)(const st_ops *self, st_dtype dt, const void *logits, const int64_t *labels,
                                     int64_t rows, int64_t vocab, int64_t ignore_index, double *loss_sum,
                                     int64_t *n_counted);
  st_result (*cross_entropy_backward)(const st_ops *self, st_dtype dt, const void *logits, const int64_t *labels,
                                      int64_t rows, int64_t vocab, int64_t ignore_index, double grad_scale,
                                      void *dlogits);

  /* ---- routing (MoE) ---- */
  /* Per row of x [rows, cols]: the k largest values, descending (ties: lower index first), and
   * their column indices (int32). */
  st_result (*topk)(const st_ops *self, st_dtype dt, const void *x, int64_t rows, int64_t cols, int64_t k,
                    void *values, int32_t *indices);
  /* dst[i, :] = src[idx[i], :], i < n */
  st_result (*gather_rows)(const st_ops *self, st_dtype dt, const void *src, const int32_t *idx, int64_t n,
                           int64_t cols, void *dst);
  /* dst[idx[i], :] += (row_weight ? row_weight[i] : 1) * src[i, :], i < n (duplicates accumulate) */
  st_result (*scatter_add_rows)(const st_ops *self, st_dtype dt, const void *src, const int32_t *idx,
                                const void *row_weight, int64_t n, int64_t cols, void *dst);

  /* ---- optimizer ---- */
  st_result (*optim_update)(const st_ops *self, const st_optim_desc *desc);
};

#endif /* STRATA_OPS_H */
