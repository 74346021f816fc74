/* cpu_attn.c — scaled dot-product attention on the CPU: OpenBLAS for Q K^T, P V and the backward
 * products, the pool for masking and the row softmax. See cpu_attn_tmpl.h for the blocking. */
#include "cpu_internal.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>

st_result st_cpu_attention_forward(const st_ops *self, const st_attn_desc *d);
st_result st_cpu_attention_backward(const st_ops *self, const st_attn_desc *d, const void *dout, void *dq, void *dk,
                                    void *dv);

#define ATTN_QB 256 /* queries per block: the [QB, seq_k] score block stays in L2 for seq_k ~ 1-2k */

static double exp_shift_sum_f64(double *x, int64_t n, double shift) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) {
    x[i] = exp(x[i] - shift);
    s += x[i];
  }
  return s;
}

static void scale_row_f64(double *x, int64_t n, double a) {
  for (int64_t i = 0; i < n; i++) x[i] *= a;
}

#define T float
#define SFX f32
#define GEMM cblas_sgemm
#define EXP_SHIFT_SUM(k, x, n, sh) (k)->exp_shift_sum((x), (n), (sh))
#define SCALE_ROW(k, x, n, a) (k)->scale((x), (n), (a))
#define LOGT logf
#include "cpu_attn_tmpl.h"
#undef T
#undef SFX
#undef GEMM
#undef EXP_SHIFT_SUM
#undef SCALE_ROW
#undef LOGT
#define T double
#define SFX f64
#define GEMM cblas_dgemm
#define EXP_SHIFT_SUM(k, x, n, sh) exp_shift_sum_f64((x), (n), (sh))
#define SCALE_ROW(k, x, n, a) scale_row_f64((x), (n), (a))
#define LOGT log
#include "cpu_attn_tmpl.h"

static st_result check_desc(const st_attn_desc *d) {
  if (!d) return ST_ERR_INVALID_ARGUMENT;
  if (d->dtype != ST_F32 && d->dtype != ST_F64) return ST_ERR_UNSUPPORTED;
  if (d->batch < 0 || d->seq_q < 0 || d->seq_k < 0 || d->heads < 1 || d->kv_heads < 1 || d->head_dim < 1)
    return ST_ERR_INVALID_ARGUMENT;
  if (d->heads % d->kv_heads != 0) return ST_ERR_INVALID_ARGUMENT;
  if (d->segment_ids && d->seq_q != d->seq_k) return ST_ERR_INVALID_ARGUMENT;
  /* every GEMM dimension and leading dimension must fit cblas' int */
  if (d->seq_k > INT_MAX || d->seq_q > INT_MAX || d->heads * d->head_dim > INT_MAX) return ST_ERR_INVALID_ARGUMENT;
  if (d->batch * d->seq_q * d->heads > 0 && (!d->q || !d->out || !d->lse)) return ST_ERR_INVALID_ARGUMENT;
  if (d->batch * d->seq_k > 0 && (!d->k || !d->v)) return ST_ERR_INVALID_ARGUMENT;
  return ST_OK;
}

st_result st_cpu_attention_forward(const st_ops *self, const st_attn_desc *d) {
  ST_CHECK(check_desc(d));
  if (d->batch == 0 || d->seq_q == 0) return ST_OK;
  return d->dtype == ST_F32 ? attn_forward_f32(self, d) : attn_forward_f64(self, d);
}

st_result st_cpu_attention_backward(const st_ops *self, const st_attn_desc *d, const void *dout, void *dq, void *dk,
                                    void *dv) {
  ST_CHECK(check_desc(d));
  if (d->batch == 0) return ST_OK;
  if (!dout || !dq || !dk || !dv) return ST_ERR_INVALID_ARGUMENT;
  if (d->seq_q == 0) {
    size_t bytes = (size_t)(d->batch * d->seq_k * d->kv_heads * d->head_dim) * st_dtype_size(d->dtype);
    memset(dk, 0, bytes);
    memset(dv, 0, bytes);
    return ST_OK;
  }
  return d->dtype == ST_F32 ? attn_backward_f32(self, d, dout, dq, dk, dv)
                            : attn_backward_f64(self, d, dout, dq, dk, dv);
}
