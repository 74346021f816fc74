/* cuda_ops.c — the CUDA ops table: argument checks (the CPU table's), dtype gates, cuBLAS for GEMM,
 * the launchers of the *.cu files for everything else, and error messages that name the op, the
 * CUDA or cuBLAS call and its error string. Host C11; the kernels live in cuda_*.cu. */
#include "cuda_ops.h"

#include "cuda_internal.h"

#include <cublas_v2.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>

typedef struct stc_impl {
  int device;
  cudaStream_t stream;
  cublasHandle_t blas;
  double *d_part;              /* STC_MAX_PARTIALS doubles: partial sums of host-scalar ops */
  unsigned long long *d_bad;   /* the first bad row (label or index) of the last checked op */
  pthread_mutex_t scratch_mu;  /* d_part, d_bad: one host-scalar op at a time */
  pthread_mutex_t err_mu;      /* last */
  st_error last;
  char name[16];
} stc_impl;

typedef struct stc_table {
  st_ops ops; /* first member: the table pointer is the allocation */
  stc_impl impl;
} stc_table;

static inline stc_impl *impl_of(const st_ops *self) { return (stc_impl *)self->impl; }

/* ---- errors ---- */
static ST_PRINTF(4, 5) st_result set_err(const st_ops *self, st_result code, const char *op, const char *fmt, ...) {
  stc_impl *im = impl_of(self);
  char msg[ST_ERROR_MESSAGE_MAX];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  pthread_mutex_lock(&im->err_mu);
  st_error_set(&im->last, code, op, "cuda:%d %s: %s", im->device, op, msg);
  pthread_mutex_unlock(&im->err_mu);
  return code;
}

/* `call` is the source text of the failing call; only its name (up to the parenthesis) is kept */
static st_result cuda_fail(const st_ops *self, const char *op, const char *call, cudaError_t e) {
  int len = 0;
  while (call[len] && call[len] != '(' && len < 64) len++;
  cudaGetLastError(); /* clear a non-sticky error so the next op starts clean */
  if (e == cudaErrorMemoryAllocation)
    return set_err(self, ST_ERR_OUT_OF_MEMORY, op,
                   "%.*s failed: %s (%s); free device memory or lower the micro batch size", len, call,
                   cudaGetErrorString(e), cudaGetErrorName(e));
  if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction)
    return set_err(self, ST_ERR_DEVICE, op,
                   "%.*s failed: %s (%s); this build's kernels target sm_90 (+PTX compute_90): rebuild for "
                   "this GPU's architecture", len, call, cudaGetErrorString(e), cudaGetErrorName(e));
  return set_err(self, ST_ERR_DEVICE, op,
                 "%.*s failed: %s (%s); errors of kernels surface at the next call on the stream: rerun with "
                 "CUDA_LAUNCH_BLOCKING=1 to pin the op that caused it",
                 len, call, cudaGetErrorString(e), cudaGetErrorName(e));
}

static st_result blas_fail(const st_ops *self, const char *op, const char *call, cublasStatus_t st) {
  return set_err(self, st == CUBLAS_STATUS_ALLOC_FAILED ? ST_ERR_OUT_OF_MEMORY : ST_ERR_DEVICE, op,
                 "%s failed: %s (%s)", call, cublasGetStatusString(st), cublasGetStatusName(st));
}

#define CU(op, call)                                                                               \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) return cuda_fail(self, (op), #call, e_);                                \
  } while (0)

#define ARG(op, cond)                                                                              \
  do {                                                                                             \
    if (!(cond)) return set_err(self, ST_ERR_INVALID_ARGUMENT, (op), "invalid argument: %s does not hold", #cond); \
  } while (0)

/* F32 and BF16, the element types of the CUDA table's compute ops */
#define DT(op, dt)                                                                                 \
  do {                                                                                             \
    if ((dt) != ST_F32 && (dt) != ST_BF16)                                                         \
      return set_err(self, ST_ERR_UNSUPPORTED, (op),                                               \
                     "element type %s is not supported by the CUDA ops table (F32 and BF16 are)",  \
                     st_dtype_name(dt));                                                           \
  } while (0)

#define ENTER(op) CU((op), cudaSetDevice(impl_of(self)->device))

#define STREAM (impl_of(self)->stream)

static bool fits_int(int64_t v) { return v >= 0 && v <= INT_MAX; }

/* sum of parts, in index order (the reductions are deterministic for a given shape) */
static st_result fetch_partials(const st_ops *self, const char *op, int n, double *host) {
  stc_impl *im = impl_of(self);
  CU(op, cudaMemcpyAsync(host, im->d_part, sizeof(double) * (size_t)n, cudaMemcpyDeviceToHost, im->stream));
  CU(op, cudaStreamSynchronize(im->stream));
  return ST_OK;
}

static st_result reset_bad(const st_ops *self, const char *op) {
  CU(op, cudaMemsetAsync(impl_of(self)->d_bad, 0xff, sizeof(unsigned long long), STREAM));
  return ST_OK;
}

static st_result read_bad(const st_ops *self, const char *op, unsigned long long *bad) {
  CU(op, cudaMemcpyAsync(bad, impl_of(self)->d_bad, sizeof *bad, cudaMemcpyDeviceToHost, STREAM));
  CU(op, cudaStreamSynchronize(STREAM));
  return ST_OK;
}

/* ---- memory ---- */
static st_result op_copy(const st_ops *self, void *dst, st_device dst_dev, const void *src, st_device src_dev,
                         size_t bytes) {
  const char *op = "copy";
  ENTER(op);
  stc_impl *im = impl_of(self);
  if ((dst_dev.type == ST_DEVICE_CUDA && dst_dev.index != im->device) ||
      (src_dev.type == ST_DEVICE_CUDA && src_dev.index != im->device))
    return set_err(self, ST_ERR_UNSUPPORTED, op,
                   "copies between CUDA devices (%d -> %d) are not supported by the table of device %d; stage "
                   "through host memory", src_dev.index, dst_dev.index, im->device);
  if (bytes == 0) return ST_OK;
  ARG(op, dst && src);
  if (dst == src) return ST_OK;
  bool dh = dst_dev.type == ST_DEVICE_CUDA, sh = src_dev.type == ST_DEVICE_CUDA;
  enum cudaMemcpyKind kind = dh ? (sh ? cudaMemcpyDeviceToDevice : cudaMemcpyHostToDevice)
                                : (sh ? cudaMemcpyDeviceToHost : cudaMemcpyHostToHost);
  CU(op, cudaMemcpyAsync(dst, src, bytes, kind, im->stream));
  /* correctness first: a copy touching host memory completes before it returns, so the caller may
   * read or reuse the host buffer at once (pinned-memory overlap comes with the allocator) */
  if (kind != cudaMemcpyDeviceToDevice) CU(op, cudaStreamSynchronize(im->stream));
  return ST_OK;
}

static st_result op_fill(const st_ops *self, st_dtype dt, void *x, int64_t n, double value) {
  const char *op = "fill";
  ENTER(op);
  ARG(op, n >= 0 && (x || n == 0));
  if ((unsigned)dt >= ST_DTYPE_COUNT)
    return set_err(self, ST_ERR_UNSUPPORTED, op, "unknown element type %d", (int)dt);
  CU(op, stc_fill(STREAM, dt, x, n, value));
  return ST_OK;
}

static st_result op_synchronize(const st_ops *self) {
  const char *op = "synchronize";
  ENTER(op);
  CU(op, cudaStreamSynchronize(STREAM));
  return ST_OK;
}

static st_result op_cast(const st_ops *self, st_dtype sdt, const void *src, st_dtype ddt, void *dst, int64_t n) {
  const char *op = "cast";
  ENTER(op);
  ARG(op, n >= 0 && ((src && dst) || n == 0));
  ARG(op, (unsigned)sdt < ST_DTYPE_COUNT && (unsigned)ddt < ST_DTYPE_COUNT);
  if (sdt == ddt) {
    if (n && src != dst)
      CU(op, cudaMemcpyAsync(dst, src, (size_t)n * st_dtype_size(sdt), cudaMemcpyDeviceToDevice, STREAM));
    return ST_OK;
  }
  bool ints = (sdt == ST_I32 || sdt == ST_I64) && (ddt == ST_I32 || ddt == ST_I64);
  if (!ints && !(st_dtype_is_float(sdt) && st_dtype_is_float(ddt)))
    return set_err(self, ST_ERR_UNSUPPORTED, op, "no cast from %s to %s (float <-> float and I32 <-> I64 only)",
                   st_dtype_name(sdt), st_dtype_name(ddt));
  CU(op, stc_cast(STREAM, sdt, src, ddt, dst, n));
  return ST_OK;
}

/* ---- elementwise ---- */
static st_result run_ew(const st_ops *self, const char *op, stc_ew_op k, st_dtype dt, int kind, const void *a,
                        const void *b, void *out, int64_t n, double alpha) {
  ENTER(op);
  DT(op, dt);
  ARG(op, n >= 0);
  CU(op, stc_elementwise(STREAM, k, dt, kind, a, b, out, n, alpha));
  return ST_OK;
}

static st_result op_scale(const st_ops *self, st_dtype dt, void *x, int64_t n, double alpha) {
  ARG("scale", x || n == 0);
  return run_ew(self, "scale", STC_EW_SCALE, dt, 0, NULL, NULL, x, n, alpha);
}
static st_result op_axpy(const st_ops *self, st_dtype dt, int64_t n, double alpha, const void *x, void *y) {
  ARG("axpy", (x && y) || n == 0);
  return run_ew(self, "axpy", STC_EW_AXPY, dt, 0, x, NULL, y, n, alpha);
}
static st_result op_add(const st_ops *self, st_dtype dt, const void *a, const void *b, void *out, int64_t n) {
  ARG("add", (a && b && out) || n == 0);
  return run_ew(self, "add", STC_EW_ADD, dt, 0, a, b, out, n, 0);
}
static st_result op_mul(const st_ops *self, st_dtype dt, const void *a, const void *b, void *out, int64_t n) {
  ARG("mul", (a && b && out) || n == 0);
  return run_ew(self, "mul", STC_EW_MUL, dt, 0, a, b, out, n, 0);
}
static st_result op_gelu_forward(const st_ops *self, st_dtype dt, st_gelu_kind kind, const void *x, void *y,
                                 int64_t n) {
  ARG("gelu_forward", ((x && y) || n == 0) && (unsigned)kind <= ST_GELU_ERF);
  return run_ew(self, "gelu_forward", STC_EW_GELU_F, dt, (int)kind, x, NULL, y, n, 0);
}
static st_result op_gelu_backward(const st_ops *self, st_dtype dt, st_gelu_kind kind, const void *x, const void *dy,
                                  void *dx, int64_t n) {
  ARG("gelu_backward", ((x && dy && dx) || n == 0) && (unsigned)kind <= ST_GELU_ERF);
  return run_ew(self, "gelu_backward", STC_EW_GELU_B, dt, (int)kind, x, dy, dx, n, 0);
}
static st_result op_silu_forward(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t n) {
  ARG("silu_forward", (x && y) || n == 0);
  return run_ew(self, "silu_forward", STC_EW_SILU_F, dt, 0, x, NULL, y, n, 0);
}
static st_result op_silu_backward(const st_ops *self, st_dtype dt, const void *x, const void *dy, void *dx, int64_t n) {
  ARG("silu_backward", (x && dy && dx) || n == 0);
  return run_ew(self, "silu_backward", STC_EW_SILU_B, dt, 0, x, dy, dx, n, 0);
}

static st_result op_sumsq(const st_ops *self, st_dtype dt, const void *x, int64_t n, double *out) {
  const char *op = "sumsq";
  ENTER(op);
  ARG(op, out && n >= 0 && (x || n == 0));
  DT(op, dt);
  *out = 0;
  if (n == 0) return ST_OK;
  stc_impl *im = impl_of(self);
  double host[STC_MAX_PARTIALS];
  int np = 0;
  pthread_mutex_lock(&im->scratch_mu);
  cudaError_t e = stc_sumsq_partial(im->stream, dt, x, n, im->d_part, &np);
  st_result r = e == cudaSuccess ? fetch_partials(self, op, np, host) : cuda_fail(self, op, "stc_sumsq_partial", e);
  pthread_mutex_unlock(&im->scratch_mu);
  if (r != ST_OK) return r;
  double s = 0;
  for (int i = 0; i < np; i++) s += host[i];
  *out = s;
  return ST_OK;
}

/* ---- GEMM ---- */
static cudaDataType_t cuda_type(st_dtype dt) { return dt == ST_BF16 ? CUDA_R_16BF : CUDA_R_32F; }

static st_result op_gemm(const st_ops *self, const st_gemm_desc *d) {
  const char *op = "gemm";
  ENTER(op);
  ARG(op, d);
  bool ok = (d->dtype == ST_F32 && d->c_dtype == ST_F32) ||
            (d->dtype == ST_BF16 && (d->c_dtype == ST_BF16 || d->c_dtype == ST_F32));
  if (!ok)
    return set_err(self, ST_ERR_UNSUPPORTED, op,
                   "A/B %s with C %s is not supported (F32 x F32 -> F32, BF16 x BF16 -> BF16 or F32)",
                   st_dtype_name(d->dtype), st_dtype_name(d->c_dtype));
  ARG(op, d->m >= 0 && d->n >= 0 && d->k >= 0 && d->batch >= 1 && fits_int(d->batch));
  ARG(op, fits_int(d->m) && fits_int(d->n) && fits_int(d->k));
  ARG(op, fits_int(d->lda) && fits_int(d->ldb) && fits_int(d->ldc));
  int64_t a_cols = d->trans_a ? d->m : d->k, b_cols = d->trans_b ? d->k : d->n;
  ARG(op, d->lda >= (a_cols > 1 ? a_cols : 1) && d->ldb >= (b_cols > 1 ? b_cols : 1) &&
              d->ldc >= (d->n > 1 ? d->n : 1));
  if (d->m == 0 || d->n == 0) return ST_OK;
  ARG(op, d->c && ((d->a && d->b) || d->k == 0));
  stc_impl *im = impl_of(self);
  if (d->k == 0) {
    CU(op, stc_scale_matrix(im->stream, d->c_dtype, d->c, d->ldc, d->stride_c, d->batch, d->m, d->n, d->beta));
  } else {
    float alpha = (float)d->alpha, beta = (float)d->beta;
    /* row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: swap the operands */
    cublasStatus_t st = cublasGemmStridedBatchedEx(
        im->blas, d->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, d->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, (int)d->n,
        (int)d->m, (int)d->k, &alpha, d->b, cuda_type(d->dtype), (int)d->ldb, (long long)d->stride_b, d->a,
        cuda_type(d->dtype), (int)d->lda, (long long)d->stride_a, &beta, d->c, cuda_type(d->c_dtype), (int)d->ldc,
        (long long)d->stride_c, (int)d->batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) return blas_fail(self, op, "cublasGemmStridedBatchedEx", st);
  }
  if (d->bias)
    CU(op, stc_bias_add(im->stream, d->c_dtype, d->c, d->ldc, d->stride_c, d->batch, d->m, d->n, d->bias));
  return ST_OK;
}

static st_result op_bias_backward(const st_ops *self, st_dtype dt, const void *dy, int64_t rows, int64_t cols,
                                  void *dbias) {
  const char *op = "bias_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols >= 0 && ((dy && dbias) || rows * cols == 0));
  if (rows == 0 || cols == 0) return ST_OK; /* nothing to add (dbias may be NULL then) */
  CU(op, stc_bias_backward(STREAM, dt, dy, rows, cols, dbias));
  return ST_OK;
}

/* ---- normalization ---- */
static st_result op_layernorm_forward(const st_ops *self, st_dtype dt, const void *x, void *y, void *mean, void *rstd,
                                      int64_t rows, int64_t cols, double eps) {
  const char *op = "layernorm_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((x && y && mean && rstd) || rows == 0));
  CU(op, stc_layernorm_fwd(STREAM, dt, x, y, mean, rstd, rows, cols, eps));
  return ST_OK;
}

static st_result op_layernorm_backward(const st_ops *self, st_dtype dt, const void *dy, const void *x,
                                       const void *mean, const void *rstd, void *dx, int64_t rows, int64_t cols) {
  const char *op = "layernorm_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((dy && x && mean && rstd && dx) || rows == 0));
  CU(op, stc_layernorm_bwd(STREAM, dt, dy, x, mean, rstd, dx, rows, cols));
  return ST_OK;
}

static st_result op_rmsnorm_forward(const st_ops *self, st_dtype dt, const void *x, const void *w, void *y, void *rstd,
                                    int64_t rows, int64_t cols, double eps) {
  const char *op = "rmsnorm_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((x && y && rstd) || rows == 0));
  CU(op, stc_rmsnorm_fwd(STREAM, dt, x, w, y, rstd, rows, cols, eps));
  return ST_OK;
}

static st_result op_rmsnorm_backward(const st_ops *self, st_dtype dt, const void *dy, const void *x, const void *w,
                                     const void *rstd, void *dx, void *dw, int64_t rows, int64_t cols) {
  const char *op = "rmsnorm_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((dy && x && rstd && dx) || rows == 0));
  CU(op, stc_rmsnorm_bwd(STREAM, dt, dy, x, w, rstd, dx, dw, rows, cols));
  return ST_OK;
}

/* ---- activations over rows ---- */
static st_result op_swiglu_forward(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t rows, int64_t cols) {
  const char *op = "swiglu_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((x && y) || rows == 0));
  CU(op, stc_swiglu(STREAM, dt, false, x, NULL, y, rows, cols));
  return ST_OK;
}

static st_result op_swiglu_backward(const st_ops *self, st_dtype dt, const void *x, const void *dy, void *dx,
                                    int64_t rows, int64_t cols) {
  const char *op = "swiglu_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((x && dy && dx) || rows == 0));
  CU(op, stc_swiglu(STREAM, dt, true, x, dy, dx, rows, cols));
  return ST_OK;
}

static st_result op_softmax_forward(const st_ops *self, st_dtype dt, const void *x, void *y, int64_t rows, int64_t cols) {
  const char *op = "softmax_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((x && y) || rows == 0));
  CU(op, stc_softmax(STREAM, dt, false, x, NULL, y, rows, cols));
  return ST_OK;
}

static st_result op_softmax_backward(const st_ops *self, st_dtype dt, const void *y, const void *dy, void *dx,
                                     int64_t rows, int64_t cols) {
  const char *op = "softmax_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && ((y && dy && dx) || rows == 0));
  CU(op, stc_softmax(STREAM, dt, true, y, dy, dx, rows, cols));
  return ST_OK;
}

/* ---- attention ---- */
static st_result check_attn(const st_ops *self, const char *op, const st_attn_desc *d) {
  ARG(op, d);
  DT(op, d->dtype);
  ARG(op, d->batch >= 0 && d->seq_q >= 0 && d->seq_k >= 0 && d->heads >= 1 && d->kv_heads >= 1 && d->head_dim >= 1);
  ARG(op, d->heads % d->kv_heads == 0);
  ARG(op, !d->segment_ids || d->seq_q == d->seq_k);
  if (d->head_dim > STC_ATTN_MAX_HEAD_DIM)
    return set_err(self, ST_ERR_UNSUPPORTED, op, "head_dim %lld is above %d, the most the straightforward CUDA "
                   "attention kernel handles", (long long)d->head_dim, STC_ATTN_MAX_HEAD_DIM);
  ARG(op, d->batch * d->seq_q * d->heads == 0 || (d->q && d->out && d->lse));
  ARG(op, d->batch * d->seq_k == 0 || (d->k && d->v));
  return ST_OK;
}

static st_result op_attention_forward(const st_ops *self, const st_attn_desc *d) {
  const char *op = "attention_forward";
  ENTER(op);
  ST_CHECK(check_attn(self, op, d));
  if (d->batch == 0 || d->seq_q == 0) return ST_OK;
  CU(op, stc_attention_fwd(STREAM, d));
  return ST_OK;
}

static st_result op_attention_backward(const st_ops *self, const st_attn_desc *d, const void *dout, void *dq, void *dk,
                                       void *dv) {
  const char *op = "attention_backward";
  ENTER(op);
  ST_CHECK(check_attn(self, op, d));
  if (d->batch == 0) return ST_OK;
  ARG(op, dout && dq && dk && dv);
  CU(op, stc_attention_bwd(STREAM, d, dout, dq, dk, dv));
  return ST_OK;
}

static st_result op_rope_apply(const st_ops *self, st_dtype dt, st_rope_layout layout, void *x, const void *cos,
                               const void *sin, int64_t table_batch_stride, int64_t batch, int64_t seq, int64_t heads,
                               int64_t head_dim, bool inverse) {
  const char *op = "rope_apply";
  ENTER(op);
  DT(op, dt);
  ARG(op, batch >= 0 && seq >= 0 && heads >= 0 && head_dim > 0 && head_dim % 2 == 0 && table_batch_stride >= 0);
  ARG(op, layout == ST_ROPE_INTERLEAVED || layout == ST_ROPE_HALF);
  if (batch * seq * heads == 0) return ST_OK;
  ARG(op, x && cos && sin);
  CU(op, stc_rope(STREAM, dt, layout, x, cos, sin, table_batch_stride, batch, seq, heads, head_dim, inverse));
  return ST_OK;
}

/* ---- modulation and gated residual ---- */
static st_result op_modulate_forward(const st_ops *self, st_dtype dt, const void *x, const void *shift,
                                     const void *scale, int64_t mod_stride, void *y, int64_t batch, int64_t tokens,
                                     int64_t dim) {
  const char *op = "modulate_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, batch >= 0 && tokens >= 0 && dim >= 0 && mod_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  ARG(op, x && scale && y);
  CU(op, stc_modulate_fwd(STREAM, dt, x, shift, scale, mod_stride, y, batch, tokens, dim));
  return ST_OK;
}

static st_result op_modulate_backward(const st_ops *self, st_dtype dt, const void *dy, const void *x,
                                      const void *scale, int64_t mod_stride, void *dx, void *dshift, void *dscale,
                                      int64_t batch, int64_t tokens, int64_t dim) {
  const char *op = "modulate_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, batch >= 0 && tokens >= 0 && dim >= 0 && mod_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  ARG(op, dy && x && scale && dx && dscale);
  CU(op, stc_modulate_bwd(STREAM, dt, dy, x, scale, mod_stride, dx, dshift, dscale, batch, tokens, dim));
  return ST_OK;
}

static st_result op_gated_residual_forward(const st_ops *self, st_dtype dt, void *h, const void *gate,
                                           int64_t gate_stride, const void *a, int64_t batch, int64_t tokens,
                                           int64_t dim) {
  const char *op = "gated_residual_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, batch >= 0 && tokens >= 0 && dim >= 0 && gate_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  ARG(op, h && a);
  CU(op, stc_gated_fwd(STREAM, dt, h, gate, gate_stride, a, batch, tokens, dim));
  return ST_OK;
}

static st_result op_gated_residual_backward(const st_ops *self, st_dtype dt, const void *dh, const void *gate,
                                            int64_t gate_stride, const void *a, void *da, void *dgate, int64_t batch,
                                            int64_t tokens, int64_t dim) {
  const char *op = "gated_residual_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, batch >= 0 && tokens >= 0 && dim >= 0 && gate_stride >= 0);
  if (batch * tokens * dim == 0) return ST_OK;
  ARG(op, dh && da && (!dgate || a));
  CU(op, stc_gated_bwd(STREAM, dt, dh, gate, gate_stride, a, da, gate ? dgate : NULL, batch, tokens, dim));
  return ST_OK;
}

/* ---- losses ---- */
static st_result op_mse_forward(const st_ops *self, st_dtype dt, const void *pred, const void *target,
                                const void *row_weight, int64_t rows, int64_t cols, double *loss) {
  const char *op = "mse_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, loss && rows > 0 && cols > 0 && pred && target);
  stc_impl *im = impl_of(self);
  double host[STC_MAX_PARTIALS];
  int np = 0;
  pthread_mutex_lock(&im->scratch_mu);
  cudaError_t e = stc_mse_fwd_partial(im->stream, dt, pred, target, row_weight, rows, cols, im->d_part, &np);
  st_result r = e == cudaSuccess ? fetch_partials(self, op, np, host) : cuda_fail(self, op, "stc_mse_fwd_partial", e);
  pthread_mutex_unlock(&im->scratch_mu);
  if (r != ST_OK) return r;
  double s = 0;
  for (int i = 0; i < np; i++) s += host[i];
  *loss = s / (double)rows;
  return ST_OK;
}

static st_result op_mse_backward(const st_ops *self, st_dtype dt, const void *pred, const void *target,
                                 const void *row_weight, int64_t rows, int64_t cols, double grad_scale, void *dpred) {
  const char *op = "mse_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows > 0 && cols > 0 && pred && target && dpred);
  CU(op, stc_mse_bwd(STREAM, dt, pred, target, row_weight, rows, cols, grad_scale, dpred));
  return ST_OK;
}

/* the first out-of-range label (row `bad`) as an error naming it and its value */
static st_result bad_label(const st_ops *self, const char *op, const int64_t *labels, unsigned long long bad,
                           int64_t vocab, int64_t ignore) {
  int64_t lab = 0;
  if (cudaMemcpy(&lab, labels + bad, sizeof lab, cudaMemcpyDeviceToHost) != cudaSuccess) cudaGetLastError();
  return set_err(self, ST_ERR_INVALID_ARGUMENT, op, "labels[%llu] = %lld is outside [0, %lld) and is not "
                 "ignore_index (%lld)", bad, (long long)lab, (long long)vocab, (long long)ignore);
}

static st_result op_cross_entropy_forward(const st_ops *self, st_dtype dt, const void *logits, const int64_t *labels,
                                          int64_t rows, int64_t vocab, int64_t ignore_index, double *loss_sum,
                                          int64_t *n_counted) {
  const char *op = "cross_entropy_forward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && vocab > 0 && loss_sum && n_counted && ((logits && labels) || rows == 0));
  *loss_sum = 0;
  *n_counted = 0;
  if (rows == 0) return ST_OK;
  stc_impl *im = impl_of(self);
  double host[STC_MAX_PARTIALS];
  unsigned long long bad = ULLONG_MAX;
  int nb = 0;
  pthread_mutex_lock(&im->scratch_mu);
  st_result r = reset_bad(self, op);
  if (r == ST_OK) {
    cudaError_t e = stc_ce_fwd_partial(im->stream, dt, logits, labels, rows, vocab, ignore_index, im->d_part, &nb,
                                       im->d_bad);
    r = e == cudaSuccess ? fetch_partials(self, op, 2 * nb, host) : cuda_fail(self, op, "stc_ce_fwd_partial", e);
  }
  if (r == ST_OK) r = read_bad(self, op, &bad);
  pthread_mutex_unlock(&im->scratch_mu);
  if (r != ST_OK) return r;
  if (bad != ULLONG_MAX) return bad_label(self, op, labels, bad, vocab, ignore_index);
  double s = 0, n = 0;
  for (int i = 0; i < nb; i++) {
    s += host[2 * i];
    n += host[2 * i + 1];
  }
  *loss_sum = s;
  *n_counted = (int64_t)n;
  return ST_OK;
}

static st_result op_cross_entropy_backward(const st_ops *self, st_dtype dt, const void *logits, const int64_t *labels,
                                           int64_t rows, int64_t vocab, int64_t ignore_index, double grad_scale,
                                           void *dlogits) {
  const char *op = "cross_entropy_backward";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && vocab > 0 && ((logits && labels && dlogits) || rows == 0));
  if (rows == 0) return ST_OK;
  stc_impl *im = impl_of(self);
  unsigned long long bad = ULLONG_MAX;
  pthread_mutex_lock(&im->scratch_mu);
  st_result r = reset_bad(self, op);
  if (r == ST_OK) {
    cudaError_t e = stc_ce_bwd(im->stream, dt, logits, labels, rows, vocab, ignore_index, grad_scale, dlogits,
                               im->d_bad);
    r = e == cudaSuccess ? read_bad(self, op, &bad) : cuda_fail(self, op, "stc_ce_bwd", e);
  }
  pthread_mutex_unlock(&im->scratch_mu);
  if (r != ST_OK) return r;
  if (bad != ULLONG_MAX) return bad_label(self, op, labels, bad, vocab, ignore_index);
  return ST_OK;
}

/* ---- routing ---- */
static st_result op_topk(const st_ops *self, st_dtype dt, const void *x, int64_t rows, int64_t cols, int64_t k,
                         void *values, int32_t *indices) {
  const char *op = "topk";
  ENTER(op);
  DT(op, dt);
  ARG(op, rows >= 0 && cols > 0 && k >= 1 && k <= cols && cols <= INT32_MAX);
  if (rows == 0) return ST_OK;
  ARG(op, x && values && indices);
  CU(op, stc_topk(STREAM, dt, x, rows, cols, k, values, indices));
  return ST_OK;
}

static st_result check_rows(const st_ops *self, const char *op, const char *what, unsigned long long bad) {
  if (bad == ULLONG_MAX) return ST_OK;
  return set_err(self, ST_ERR_INVALID_ARGUMENT, op, "%s[%llu] is negative", what, bad);
}

static st_result op_gather_rows(const st_ops *self, st_dtype dt, const void *src, const int32_t *idx, int64_t n,
                                int64_t cols, void *dst) {
  const char *op = "gather_rows";
  ENTER(op);
  if (!st_dtype_is_float(dt))
    return set_err(self, ST_ERR_UNSUPPORTED, op, "element type %s (float types only, as on the CPU)",
                   st_dtype_name(dt));
  ARG(op, n >= 0 && cols >= 0);
  if (n == 0 || cols == 0) return ST_OK;
  ARG(op, src && idx && dst);
  stc_impl *im = impl_of(self);
  unsigned long long bad = ULLONG_MAX;
  pthread_mutex_lock(&im->scratch_mu);
  st_result r = reset_bad(self, op);
  if (r == ST_OK) {
    cudaError_t e = stc_gather_rows(im->stream, st_dtype_size(dt), src, idx, n, cols, dst, im->d_bad);
    r = e == cudaSuccess ? read_bad(self, op, &bad) : cuda_fail(self, op, "stc_gather_rows", e);
  }
  pthread_mutex_unlock(&im->scratch_mu);
  if (r != ST_OK) return r;
  return check_rows(self, op, "idx", bad);
}

static st_result op_scatter_add_rows(const st_ops *self, st_dtype dt, const void *src, const int32_t *idx,
                                     const void *row_weight, int64_t n, int64_t cols, void *dst) {
  const char *op = "scatter_add_rows";
  ENTER(op);
  DT(op, dt);
  ARG(op, n >= 0 && cols >= 0);
  if (n == 0 || cols == 0) return ST_OK;
  ARG(op, src && idx && dst);
  stc_impl *im = impl_of(self);
  unsigned long long bad = ULLONG_MAX;
  pthread_mutex_lock(&im->scratch_mu);
  st_result r = reset_bad(self, op);
  if (r == ST_OK) {
    cudaError_t e = stc_scatter_add_rows(im->stream, dt, src, idx, row_weight, n, cols, dst, im->d_bad);
    r = e == cudaSuccess ? read_bad(self, op, &bad) : cuda_fail(self, op, "stc_scatter_add_rows", e);
  }
  pthread_mutex_unlock(&im->scratch_mu);
  if (r != ST_OK) return r;
  return check_rows(self, op, "idx", bad);
}

/* ---- optimizer ---- */
static st_result op_optim_update(const st_ops *self, const st_optim_desc *d) {
  const char *op = "optim_update";
  ENTER(op);
  ARG(op, d && d->n >= 0);
  ARG(op, d->type == ST_OPTIM_ADAMW || d->type == ST_OPTIM_ADAM || d->type == ST_OPTIM_SGD);
  bool pd = d->param_dtype == ST_F32 || d->param_dtype == ST_BF16 || d->param_dtype == ST_F16;
  bool gd = d->grad_dtype == ST_F32 || d->grad_dtype == ST_BF16 || d->grad_dtype == ST_F16;
  if (!pd || !gd)
    return set_err(self, ST_ERR_UNSUPPORTED, op, "param %s / grad %s: the CUDA optimizer takes F32, BF16 or F16",
                   st_dtype_name(d->param_dtype), st_dtype_name(d->grad_dtype));
  ARG(op, d->param_dtype == ST_F32 || d->master);
  if (d->n == 0) return ST_OK;
  ARG(op, d->param && d->grad);
  ARG(op, d->type == ST_OPTIM_SGD || (d->exp_avg && d->exp_avg_sq && d->step >= 1));
  ARG(op, d->type != ST_OPTIM_SGD || d->momentum == 0 || d->exp_avg);
  double bc1 = 1.0 - pow(d->beta1, (double)d->step), bc2 = 1.0 - pow(d->beta2, (double)d->step);
  stc_optim_consts c = {
      .type = (int)d->type,
      .decoupled = d->type == ST_OPTIM_ADAMW || (d->type == ST_OPTIM_ADAM && d->adam_w_mode),
      .lr = (float)d->lr, .beta1 = (float)d->beta1, .beta2 = (float)d->beta2, .eps = (float)d->eps,
      .wd = (float)d->weight_decay, .momentum = (float)d->momentum,
      .step_size = d->type == ST_OPTIM_SGD ? 0.0f : (float)(d->lr / bc1),
      .bc2_sqrt = d->type == ST_OPTIM_SGD ? 1.0f : (float)sqrt(bc2),
      .grad_scale = (float)d->grad_scale,
      .first_step = d->step <= 1,
  };
  CU(op, stc_optim(STREAM, d, &c));
  return ST_OK;
}

/* ---- create / destroy ---- */
int st_cuda_device_count(char *why, size_t why_cap) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    cudaGetLastError();
    if (why && why_cap) snprintf(why, why_cap, "cudaGetDeviceCount failed: %s (%s)", cudaGetErrorString(e),
                                 cudaGetErrorName(e));
    return 0;
  }
  if (n == 0 && why && why_cap) snprintf(why, why_cap, "cudaGetDeviceCount found no CUDA device");
  if (n > 0 && why && why_cap) why[0] = '\0';
  return n;
}

static void table_free(stc_table *t) {
  stc_impl *im = &t->impl;
  cudaSetDevice(im->device);
  if (im->stream) cudaStreamSynchronize(im->stream);
  if (im->d_part) cudaFree(im->d_part);
  if (im->d_bad) cudaFree(im->d_bad);
  if (im->blas) cublasDestroy(im->blas);
  if (im->stream) cudaStreamDestroy(im->stream);
  cudaGetLastError();
  pthread_mutex_destroy(&im->scratch_mu);
  pthread_mutex_destroy(&im->err_mu);
  free(t);
}

st_result st_cuda_ops_create(int device, const st_ops **out, st_error *err) {
  const char *where = "st_cuda_ops_create";
  if (!out) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, where, "out must not be NULL");
  *out = NULL;
  char why[256];
  int count = st_cuda_device_count(why, sizeof why);
  if (count == 0)
    return st_error_set(err, ST_ERR_DEVICE, where,
                        "no usable CUDA device: %s; run with device \"cpu\" or check the driver (nvidia-smi)", why);
  if (device < 0 || device >= count) {
    const char *vis = getenv("CUDA_VISIBLE_DEVICES");
    return st_error_set(err, ST_ERR_DEVICE, where, "CUDA device %d requested but %d visible (CUDA_VISIBLE_DEVICES=%s)",
                        device, count, vis ? vis : "unset");
  }
  stc_table *t = calloc(1, sizeof *t);
  if (!t) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, where, "cannot allocate the CUDA ops table");
  stc_impl *im = &t->impl;
  im->device = device;
  pthread_mutex_init(&im->scratch_mu, NULL);
  pthread_mutex_init(&im->err_mu, NULL);
  const char *call = NULL;
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) call = "cudaSetDevice";
  if (!call && (e = stc_probe_kernels()) != cudaSuccess) call = "cudaFuncGetAttributes (kernel image probe)";
  if (!call && (e = cudaStreamCreateWithFlags(&im->stream, cudaStreamNonBlocking)) != cudaSuccess)
    call = "cudaStreamCreateWithFlags";
  if (!call && (e = cudaMalloc((void **)&im->d_part, sizeof(double) * STC_MAX_PARTIALS)) != cudaSuccess)
    call = "cudaMalloc";
  if (!call && (e = cudaMalloc((void **)&im->d_bad, sizeof(unsigned long long))) != cudaSuccess) call = "cudaMalloc";
  if (call) {
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess)
      cudaGetLastError();
    st_error_set(err, e == cudaErrorMemoryAllocation ? ST_ERR_OUT_OF_MEMORY : ST_ERR_DEVICE, where,
                 "CUDA device %d (sm_%d%d): %s failed: %s (%s)%s", device, major, minor, call, cudaGetErrorString(e),
                 cudaGetErrorName(e),
                 e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction
                     ? "; this build targets sm_90 with PTX for compute_90: rebuild for this architecture"
                     : "");
    table_free(t);
    return err ? err->code : ST_ERR_DEVICE;
  }
  cublasStatus_t st = cublasCreate(&im->blas);
  if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetStream(im->blas, im->stream);
  /* no TF32: fp32 GEMMs are fp32 (the tests hold them to 1e-4 of the CPU) */
  if (st == CUBLAS_STATUS_SUCCESS) st = cublasSetMathMode(im->blas, CUBLAS_DEFAULT_MATH);
  if (st != CUBLAS_STATUS_SUCCESS) {
    st_error_set(err, ST_ERR_DEVICE, where, "CUDA device %d: cuBLAS setup failed: %s (%s)", device,
                 cublasGetStatusString(st), cublasGetStatusName(st));
    table_free(t);
    return ST_ERR_DEVICE;
  }
  snprintf(im->name, sizeof im->name, "cuda");

  st_ops *o = &t->ops;
  o->struct_size = sizeof *o;
  o->name = im->name;
  o->device = (st_device){ST_DEVICE_CUDA, device};
  o->impl = im;
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
  o->attention_forward = op_attention_forward;
  o->attention_backward = op_attention_backward;
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
  o->optim_update = op_optim_update;
  *out = o;
  return ST_OK;
}

void st_cuda_ops_destroy(const st_ops *ops) {
  if (!ops) return;
  table_free((stc_table *)(uintptr_t)ops);
}

st_result st_cuda_ops_last_error(const st_ops *ops, st_error *out) {
  if (!ops) return ST_ERR_INVALID_ARGUMENT;
  stc_impl *im = impl_of(ops);
  pthread_mutex_lock(&im->err_mu);
  st_result r = im->last.code;
  if (out) *out = im->last;
  pthread_mutex_unlock(&im->err_mu);
  return r;
}

void st_cuda_ops_clear_error(const st_ops *ops) {
  if (!ops) return;
  stc_impl *im = impl_of(ops);
  pthread_mutex_lock(&im->err_mu);
  st_error_clear(&im->last);
  pthread_mutex_unlock(&im->err_mu);
}

/* ---- memory ---- */
void *st_cuda_alloc(const st_ops *ops, size_t bytes) {
  if (!ops) return NULL;
  const st_ops *self = ops;
  void *p = NULL;
  cudaError_t e = cudaSetDevice(impl_of(self)->device);
  if (e == cudaSuccess) e = cudaMalloc(&p, bytes ? bytes : 1);
  if (e != cudaSuccess) {
    cuda_fail(self, "alloc", "cudaMalloc", e);
    return NULL;
  }
  return p;
}

void st_cuda_free(const st_ops *ops, void *ptr) {
  if (!ops || !ptr) return;
  if (cudaSetDevice(impl_of(ops)->device) != cudaSuccess || cudaFree(ptr) != cudaSuccess) cudaGetLastError();
}

void *st_cuda_alloc_pinned(const st_ops *ops, size_t bytes) {
  if (!ops) return NULL;
  const st_ops *self = ops;
  void *p = NULL;
  cudaError_t e = cudaMallocHost(&p, bytes ? bytes : 1);
  if (e != cudaSuccess) {
    cuda_fail(self, "alloc_pinned", "cudaMallocHost", e);
    return NULL;
  }
  return p;
}

void st_cuda_free_pinned(const st_ops *ops, void *ptr) {
  if (!ops || !ptr) return;
  if (cudaFreeHost(ptr) != cudaSuccess) cudaGetLastError();
}

void *st_cuda_ops_stream(const st_ops *ops) { return ops ? (void *)impl_of(ops)->stream : NULL; }
void *st_cuda_ops_cublas(const st_ops *ops) { return ops ? (void *)impl_of(ops)->blas : NULL; }
