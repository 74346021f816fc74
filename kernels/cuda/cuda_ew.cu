/* cuda_ew.cu — fill, casts, elementwise ops and activations, the GEMM helpers (bias add, k == 0,
 * bias backward), modulation and gated residual. Math follows kernels/cpu/cpu_tmpl.h in float. */
#include "cuda_dev.cuh"

/* ---- fill ---- */
template <typename V>
__global__ void k_fill(V *x, int64_t n, V v) {
  STC_FOR(i, n) x[i] = v;
}

extern "C" cudaError_t stc_fill(cudaStream_t s, st_dtype dt, void *x, int64_t n, double value) {
  if (n == 0) return cudaSuccess;
  unsigned g = stc_grid(n);
  switch (dt) {
  case ST_F32: k_fill<float><<<g, STC_BLOCK, 0, s>>>((float *)x, n, (float)value); break;
  case ST_F64: k_fill<double><<<g, STC_BLOCK, 0, s>>>((double *)x, n, value); break;
  case ST_BF16: k_fill<uint16_t><<<g, STC_BLOCK, 0, s>>>((uint16_t *)x, n, stc_f32_to_bf16((float)value)); break;
  case ST_F16: k_fill<uint16_t><<<g, STC_BLOCK, 0, s>>>((uint16_t *)x, n, stc_f32_to_f16((float)value)); break;
  case ST_I32: k_fill<int32_t><<<g, STC_BLOCK, 0, s>>>((int32_t *)x, n, (int32_t)value); break;
  case ST_I64: k_fill<int64_t><<<g, STC_BLOCK, 0, s>>>((int64_t *)x, n, (int64_t)value); break;
  case ST_U8: return cudaMemsetAsync(x, (int)(uint8_t)value, (size_t)n, s);
  default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

extern "C" cudaError_t stc_probe_kernels(void) {
  cudaFuncAttributes a;
  return cudaFuncGetAttributes(&a, k_fill<float>);
}

/* ---- casts: the same rules as the CPU table (cpu_ops.c cast_task) ---- */
/* double -> float rounded to odd, so that rounding that float to bf16/f16 equals rounding the double */
__device__ __forceinline__ float f64_to_f32_odd(double d) {
  float f = __double2float_rn(d);
  if (isnan(d) || (double)f == d) return f;
  uint32_t u = __float_as_uint(f);
  if ((u & 1u) == 0) f = nextafterf(f, d > (double)f ? INFINITY : -INFINITY);
  return f;
}

__global__ void k_cast(int sdt, const void *src, int ddt, void *dst, int64_t n) {
  STC_FOR(i, n) {
    if (sdt == ST_I32 && ddt == ST_I64) { ((int64_t *)dst)[i] = ((const int32_t *)src)[i]; continue; }
    if (sdt == ST_I64 && ddt == ST_I32) { ((int32_t *)dst)[i] = (int32_t)((const int64_t *)src)[i]; continue; }
    if (sdt == ST_F64) {
      double v = ((const double *)src)[i];
      switch (ddt) {
      case ST_F32: ((float *)dst)[i] = __double2float_rn(v); break;
      case ST_BF16: ((uint16_t *)dst)[i] = stc_f32_to_bf16(f64_to_f32_odd(v)); break;
      default: ((uint16_t *)dst)[i] = stc_f32_to_f16(f64_to_f32_odd(v)); break;
      }
      continue;
    }
    /* from F32 / BF16 / F16 through float, which holds them exactly (NaN sign and payload too) */
    float f = sdt == ST_F32 ? ((const float *)src)[i]
              : sdt == ST_BF16 ? stc_bf16_to_f32(((const uint16_t *)src)[i])
                               : stc_f16_to_f32(((const uint16_t *)src)[i]);
    switch (ddt) {
    case ST_F32: ((float *)dst)[i] = f; break;
    case ST_F64: ((double *)dst)[i] = (double)f; break;
    case ST_BF16: ((uint16_t *)dst)[i] = stc_f32_to_bf16(f); break;
    default: ((uint16_t *)dst)[i] = stc_f32_to_f16(f); break;
    }
  }
}

extern "C" cudaError_t stc_cast(cudaStream_t s, st_dtype sdt, const void *src, st_dtype ddt, void *dst, int64_t n) {
  if (n == 0) return cudaSuccess;
  k_cast<<<stc_grid(n), STC_BLOCK, 0, s>>>((int)sdt, src, (int)ddt, dst, n);
  return cudaGetLastError();
}

/* ---- activations (cpu_tmpl.h's formulas) ---- */
__device__ __forceinline__ float gelu_one(int kind, float x) {
  switch (kind) {
  case ST_GELU_TANH: {
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.0f + expf(-2.0f * u));
  }
  case ST_GELU_SIGMOID: return x / (1.0f + expf(-1.702f * x));
  default: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
  }
}

__device__ __forceinline__ float gelu_grad_one(int kind, float x) {
  switch (kind) {
  case ST_GELU_TANH: {
    const float c = 0.7978845608028654f, a = 0.044715f;
    float sg = 1.0f / (1.0f + expf(-2.0f * c * (x + a * x * x * x)));
    return sg + 2.0f * x * sg * (1.0f - sg) * c * (1.0f + 3.0f * a * x * x);
  }
  case ST_GELU_SIGMOID: {
    float sg = 1.0f / (1.0f + expf(-1.702f * x));
    return sg + 1.702f * x * sg * (1.0f - sg);
  }
  default:
    return 0.5f * (1.0f + erff(x * 0.7071067811865476f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
  }
}

__device__ __forceinline__ float sigmoid_one(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__global__ void k_ew(int op, int kind, const T *a, const T *b, T *out, int64_t n, float alpha) {
  STC_FOR(i, n) {
    float r;
    switch (op) {
    case STC_EW_SCALE: r = stc_ld(out, i) * alpha; break;
    case STC_EW_AXPY: r = stc_ld(out, i) + alpha * stc_ld(a, i); break;
    case STC_EW_ADD: r = stc_ld(a, i) + stc_ld(b, i); break;
    case STC_EW_MUL: r = stc_ld(a, i) * stc_ld(b, i); break;
    case STC_EW_GELU_F: r = gelu_one(kind, stc_ld(a, i)); break;
    case STC_EW_GELU_B: r = stc_ld(b, i) * gelu_grad_one(kind, stc_ld(a, i)); break;
    case STC_EW_SILU_F: { float x = stc_ld(a, i); r = x * sigmoid_one(x); break; }
    default: { /* SILU_B */
      float x = stc_ld(a, i), sg = sigmoid_one(x);
      r = stc_ld(b, i) * sg * (1.0f + x * (1.0f - sg));
      break;
    }
    }
    stc_st(out, i, r);
  }
}

extern "C" cudaError_t stc_elementwise(cudaStream_t s, stc_ew_op op, st_dtype dt, int kind, const void *a,
                                       const void *b, void *out, int64_t n, double alpha) {
  if (n == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_ew<T><<<stc_grid(n), STC_BLOCK, 0, s>>>((int)op, kind, (const T *)a, (const T *)b, (T *)out, n,
                                                             (float)alpha));
  return cudaGetLastError();
}

template <typename T>
__global__ void k_sumsq(const T *x, int64_t n, double *part) {
  __shared__ double sh[32];
  double acc = 0;
  STC_FOR(i, n) {
    double v = stc_ld(x, i);
    acc += v * v;
  }
  double t = stc_block_sum(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = t;
}

extern "C" cudaError_t stc_sumsq_partial(cudaStream_t s, st_dtype dt, const void *x, int64_t n, double *part,
                                         int *nparts) {
  unsigned g = stc_grid(n);
  if (g > STC_MAX_PARTIALS) g = STC_MAX_PARTIALS;
  *nparts = (int)g;
  STC_DISPATCH(dt, k_sumsq<T><<<g, STC_BLOCK, 0, s>>>((const T *)x, n, part));
  return cudaGetLastError();
}

/* x [rows, 2 cols] = [gate | up]; forward y [rows, cols]; backward dx [rows, 2 cols] */
template <typename T>
__global__ void k_swiglu(bool bwd, const T *x, const T *dy, T *out, int64_t rows, int64_t cols) {
  STC_FOR(i, rows * cols) {
    int64_t r = i / cols, c = i % cols;
    float g = stc_ld(x, r * 2 * cols + c), u = stc_ld(x, r * 2 * cols + cols + c);
    float sg = sigmoid_one(g);
    if (!bwd) {
      stc_st(out, i, g * sg * u);
    } else {
      float d = stc_ld(dy, i);
      stc_st(out, r * 2 * cols + c, d * u * sg * (1.0f + g * (1.0f - sg)));
      stc_st(out, r * 2 * cols + cols + c, d * (g * sg));
    }
  }
}

extern "C" cudaError_t stc_swiglu(cudaStream_t s, st_dtype dt, bool backward, const void *x, const void *dy,
                                  void *out, int64_t rows, int64_t cols) {
  if (rows * cols == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_swiglu<T><<<stc_grid(rows * cols), STC_BLOCK, 0, s>>>(backward, (const T *)x, (const T *)dy,
                                                                          (T *)out, rows, cols));
  return cudaGetLastError();
}

/* ---- GEMM helpers ---- */
template <typename T>
__global__ void k_bias_add(T *c, int64_t ldc, int64_t stride_c, int64_t batch, int64_t rows, int64_t cols,
                           const T *bias) {
  STC_FOR(i, batch * rows * cols) {
    int64_t j = i % cols, r = (i / cols) % rows, b = i / (cols * rows);
    int64_t o = b * stride_c + r * ldc + j;
    stc_st(c, o, stc_ld(c, o) + stc_ld(bias, j));
  }
}

extern "C" cudaError_t stc_bias_add(cudaStream_t s, st_dtype dt, void *c, int64_t ldc, int64_t stride_c, int64_t batch,
                                    int64_t rows, int64_t cols, const void *bias) {
  int64_t n = batch * rows * cols;
  if (n == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_bias_add<T><<<stc_grid(n), STC_BLOCK, 0, s>>>((T *)c, ldc, stride_c, batch, rows, cols,
                                                                  (const T *)bias));
  return cudaGetLastError();
}

template <typename T>
__global__ void k_scale_matrix(T *c, int64_t ldc, int64_t stride_c, int64_t batch, int64_t rows, int64_t cols,
                               float beta) {
  STC_FOR(i, batch * rows * cols) {
    int64_t j = i % cols, r = (i / cols) % rows, b = i / (cols * rows);
    int64_t o = b * stride_c + r * ldc + j;
    stc_st(c, o, beta == 0.0f ? 0.0f : beta * stc_ld(c, o));
  }
}

extern "C" cudaError_t stc_scale_matrix(cudaStream_t s, st_dtype dt, void *c, int64_t ldc, int64_t stride_c,
                                        int64_t batch, int64_t rows, int64_t cols, double beta) {
  int64_t n = batch * rows * cols;
  if (n == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_scale_matrix<T><<<stc_grid(n), STC_BLOCK, 0, s>>>((T *)c, ldc, stride_c, batch, rows, cols,
                                                                      (float)beta));
  return cudaGetLastError();
}

/* f(b, t, j) functors for the column sums */
template <typename T>
struct f_val {
  const T *p;
  int64_t tokens, dim;
  __device__ float operator()(int64_t b, int64_t t, int64_t j) const { return stc_ld(p, (b * tokens + t) * dim + j); }
};

template <typename T>
struct f_prod {
  const T *p, *q;
  int64_t tokens, dim;
  __device__ float operator()(int64_t b, int64_t t, int64_t j) const {
    int64_t o = (b * tokens + t) * dim + j;
    return stc_ld(p, o) * stc_ld(q, o);
  }
};

extern "C" cudaError_t stc_bias_backward(cudaStream_t s, st_dtype dt, const void *dy, int64_t rows, int64_t cols,
                                         void *dbias) {
  STC_DISPATCH(dt, return stc_colsum<T>(s, f_val<T>{(const T *)dy, rows, cols}, 1, rows, cols, (T *)dbias, 0));
  return cudaSuccess;
}

/* ---- modulation: y = x (1 + scale) + shift ---- */
template <typename T>
__global__ void k_mod_fwd(const T *x, const T *shift, const T *scale, int64_t stride, T *y, int64_t tokens,
                          int64_t dim, int64_t n) {
  STC_FOR(i, n) {
    int64_t j = i % dim, b = i / (dim * tokens);
    float sh = shift ? stc_ld(shift, b * stride + j) : 0.0f;
    stc_st(y, i, stc_ld(x, i) * (1.0f + stc_ld(scale, b * stride + j)) + sh);
  }
}

extern "C" cudaError_t stc_modulate_fwd(cudaStream_t s, st_dtype dt, const void *x, const void *shift,
                                        const void *scale, int64_t stride, void *y, int64_t batch, int64_t tokens,
                                        int64_t dim) {
  int64_t n = batch * tokens * dim;
  if (n == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_mod_fwd<T><<<stc_grid(n), STC_BLOCK, 0, s>>>((const T *)x, (const T *)shift, (const T *)scale,
                                                                 stride, (T *)y, tokens, dim, n));
  return cudaGetLastError();
}

/* dx = dy (1 + scale) */
template <typename T>
__global__ void k_mod_bwd_dx(const T *dy, const T *scale, int64_t stride, T *dx, int64_t tokens, int64_t dim,
                             int64_t n) {
  STC_FOR(i, n) {
    int64_t j = i % dim, b = i / (dim * tokens);
    stc_st(dx, i, stc_ld(dy, i) * (1.0f + stc_ld(scale, b * stride + j)));
  }
}

template <typename T>
static cudaError_t mod_bwd(cudaStream_t s, const T *dy, const T *x, const T *scale, int64_t stride, T *dx, T *dshift,
                           T *dscale, int64_t batch, int64_t tokens, int64_t dim) {
  int64_t n = batch * tokens * dim;
  /* the sums first: dx may alias dy */
  if (dshift) {
    cudaError_t e = stc_colsum<T>(s, f_val<T>{dy, tokens, dim}, batch, tokens, dim, dshift, stride);
    if (e != cudaSuccess) return e;
  }
  if (dscale) {
    cudaError_t e = stc_colsum<T>(s, f_prod<T>{dy, x, tokens, dim}, batch, tokens, dim, dscale, stride);
    if (e != cudaSuccess) return e;
  }
  k_mod_bwd_dx<T><<<stc_grid(n), STC_BLOCK, 0, s>>>(dy, scale, stride, dx, tokens, dim, n);
  return cudaGetLastError();
}

extern "C" cudaError_t stc_modulate_bwd(cudaStream_t s, st_dtype dt, const void *dy, const void *x, const void *scale,
                                        int64_t stride, void *dx, void *dshift, void *dscale, int64_t batch,
                                        int64_t tokens, int64_t dim) {
  if (batch * tokens * dim == 0) return cudaSuccess;
  STC_DISPATCH(dt, return mod_bwd<T>(s, (const T *)dy, (const T *)x, (const T *)scale, stride, (T *)dx, (T *)dshift,
                                     (T *)dscale, batch, tokens, dim));
  return cudaSuccess;
}

/* ---- gated residual: h += gate a ---- */
template <typename T>
__global__ void k_gated_fwd(T *h, const T *gate, int64_t stride, const T *a, int64_t tokens, int64_t dim, int64_t n) {
  STC_FOR(i, n) {
    int64_t j = i % dim, b = i / (dim * tokens);
    float g = gate ? stc_ld(gate, b * stride + j) : 1.0f;
    stc_st(h, i, gate ? stc_ld(h, i) + g * stc_ld(a, i) : stc_ld(h, i) + stc_ld(a, i));
  }
}

extern "C" cudaError_t stc_gated_fwd(cudaStream_t s, st_dtype dt, void *h, const void *gate, int64_t stride,
                                     const void *a, int64_t batch, int64_t tokens, int64_t dim) {
  int64_t n = batch * tokens * dim;
  if (n == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_gated_fwd<T><<<stc_grid(n), STC_BLOCK, 0, s>>>((T *)h, (const T *)gate, stride, (const T *)a,
                                                                   tokens, dim, n));
  return cudaGetLastError();
}

template <typename T>
__global__ void k_gated_bwd_da(const T *dh, const T *gate, int64_t stride, T *da, int64_t tokens, int64_t dim,
                               int64_t n) {
  STC_FOR(i, n) {
    int64_t j = i % dim, b = i / (dim * tokens);
    stc_st(da, i, gate ? stc_ld(dh, i) * stc_ld(gate, b * stride + j) : stc_ld(dh, i));
  }
}

template <typename T>
static cudaError_t gated_bwd(cudaStream_t s, const T *dh, const T *gate, int64_t stride, const T *a, T *da, T *dgate,
                             int64_t batch, int64_t tokens, int64_t dim) {
  int64_t n = batch * tokens * dim;
  if (gate && dgate) { /* before da: da may alias dh */
    cudaError_t e = stc_colsum<T>(s, f_prod<T>{dh, a, tokens, dim}, batch, tokens, dim, dgate, stride);
    if (e != cudaSuccess) return e;
  }
  k_gated_bwd_da<T><<<stc_grid(n), STC_BLOCK, 0, s>>>(dh, gate, stride, da, tokens, dim, n);
  return cudaGetLastError();
}

extern "C" cudaError_t stc_gated_bwd(cudaStream_t s, st_dtype dt, const void *dh, const void *gate, int64_t stride,
                                     const void *a, void *da, void *dgate, int64_t batch, int64_t tokens,
                                     int64_t dim) {
  if (batch * tokens * dim == 0) return cudaSuccess;
  STC_DISPATCH(dt, return gated_bwd<T>(s, (const T *)dh, (const T *)gate, stride, (const T *)a, (T *)da, (T *)dgate,
                                       batch, tokens, dim));
  return cudaSuccess;
}
