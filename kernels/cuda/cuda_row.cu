/* cuda_row.cu — row kernels, one block per row (grids stride over rows): LayerNorm and RMSNorm
 * forward/backward, softmax forward/backward; and RoPE. Reductions in float with a two-pass
 * variance, as cpu_tmpl.h does in double. Statistics (mean, rstd) are stored in the data type. */
#include "cuda_dev.cuh"

template <typename T>
__global__ void k_ln_fwd(const T *x, T *y, T *mean, T *rstd, int64_t rows, int64_t cols, float eps) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = x + r * cols;
    float s = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) s += stc_ld(xr, c);
    float mu = stc_block_sum(s, sh) / (float)cols;
    float v = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float d = stc_ld(xr, c) - mu;
      v += d * d;
    }
    float rs = 1.0f / sqrtf(stc_block_sum(v, sh) / (float)cols + eps);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) stc_st(y + r * cols, c, (stc_ld(xr, c) - mu) * rs);
    if (threadIdx.x == 0) {
      stc_st(mean, r, mu);
      stc_st(rstd, r, rs);
    }
  }
}

extern "C" cudaError_t stc_layernorm_fwd(cudaStream_t s, st_dtype dt, const void *x, void *y, void *mean, void *rstd,
                                         int64_t rows, int64_t cols, double eps) {
  if (rows == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_ln_fwd<T><<<stc_row_grid(rows), STC_BLOCK, 0, s>>>((const T *)x, (T *)y, (T *)mean, (T *)rstd,
                                                                       rows, cols, (float)eps));
  return cudaGetLastError();
}

/* dx = rstd (dy - mean(dy) - xhat mean(dy xhat)) */
template <typename T>
__global__ void k_ln_bwd(const T *dy, const T *x, const T *mean, const T *rstd, T *dx, int64_t rows, int64_t cols) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = x + r * cols, *dyr = dy + r * cols;
    float mu = stc_ld(mean, r), rs = stc_ld(rstd, r);
    float a = 0.0f, b = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float g = stc_ld(dyr, c), xh = (stc_ld(xr, c) - mu) * rs;
      a += g;
      b += g * xh;
    }
    float sdy = stc_block_sum(a, sh) / (float)cols;
    float sdyx = stc_block_sum(b, sh) / (float)cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float xh = (stc_ld(xr, c) - mu) * rs;
      stc_st(dx + r * cols, c, rs * (stc_ld(dyr, c) - sdy - xh * sdyx));
    }
  }
}

extern "C" cudaError_t stc_layernorm_bwd(cudaStream_t s, st_dtype dt, const void *dy, const void *x, const void *mean,
                                         const void *rstd, void *dx, int64_t rows, int64_t cols) {
  if (rows == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_ln_bwd<T><<<stc_row_grid(rows), STC_BLOCK, 0, s>>>((const T *)dy, (const T *)x, (const T *)mean,
                                                                       (const T *)rstd, (T *)dx, rows, cols));
  return cudaGetLastError();
}

template <typename T>
__global__ void k_rms_fwd(const T *x, const T *w, T *y, T *rstd, int64_t rows, int64_t cols, float eps) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = x + r * cols;
    float s = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float v = stc_ld(xr, c);
      s += v * v;
    }
    float rs = 1.0f / sqrtf(stc_block_sum(s, sh) / (float)cols + eps);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x)
      stc_st(y + r * cols, c, stc_ld(xr, c) * rs * (w ? stc_ld(w, c) : 1.0f));
    if (threadIdx.x == 0) stc_st(rstd, r, rs);
  }
}

extern "C" cudaError_t stc_rmsnorm_fwd(cudaStream_t s, st_dtype dt, const void *x, const void *w, void *y, void *rstd,
                                       int64_t rows, int64_t cols, double eps) {
  if (rows == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_rms_fwd<T><<<stc_row_grid(rows), STC_BLOCK, 0, s>>>((const T *)x, (const T *)w, (T *)y,
                                                                        (T *)rstd, rows, cols, (float)eps));
  return cudaGetLastError();
}

/* g = dy w; dx = rstd (g - xhat mean(g xhat)) */
template <typename T>
__global__ void k_rms_bwd(const T *dy, const T *x, const T *w, const T *rstd, T *dx, int64_t rows, int64_t cols) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = x + r * cols, *dyr = dy + r * cols;
    float rs = stc_ld(rstd, r);
    float a = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float g = stc_ld(dyr, c) * (w ? stc_ld(w, c) : 1.0f);
      a += g * stc_ld(xr, c) * rs;
    }
    float sgx = stc_block_sum(a, sh) / (float)cols;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float xh = stc_ld(xr, c) * rs, g = stc_ld(dyr, c) * (w ? stc_ld(w, c) : 1.0f);
      stc_st(dx + r * cols, c, rs * (g - xh * sgx));
    }
  }
}

/* dw[j] += sum_r dy[r, j] x[r, j] rstd[r] */
template <typename T>
struct f_rms_dw {
  const T *dy, *x, *rstd;
  int64_t cols;
  __device__ float operator()(int64_t b, int64_t t, int64_t j) const {
    return stc_ld(dy, t * cols + j) * stc_ld(x, t * cols + j) * stc_ld(rstd, t);
  }
};

template <typename T>
static cudaError_t rms_bwd(cudaStream_t s, const T *dy, const T *x, const T *w, const T *rstd, T *dx, T *dw,
                           int64_t rows, int64_t cols) {
  if (dw) { /* before dx: dx may alias dy */
    cudaError_t e = stc_colsum<T>(s, f_rms_dw<T>{dy, x, rstd, cols}, 1, rows, cols, dw, 0);
    if (e != cudaSuccess) return e;
  }
  k_rms_bwd<T><<<stc_row_grid(rows), STC_BLOCK, 0, s>>>(dy, x, w, rstd, dx, rows, cols);
  return cudaGetLastError();
}

extern "C" cudaError_t stc_rmsnorm_bwd(cudaStream_t s, st_dtype dt, const void *dy, const void *x, const void *w,
                                       const void *rstd, void *dx, void *dw, int64_t rows, int64_t cols) {
  if (rows == 0) return cudaSuccess;
  STC_DISPATCH(dt, return rms_bwd<T>(s, (const T *)dy, (const T *)x, (const T *)w, (const T *)rstd, (T *)dx, (T *)dw,
                                     rows, cols));
  return cudaSuccess;
}

/* softmax of a row; a row of all -inf gives zeros. backward: dx = y (dy - sum(dy y)) */
template <typename T>
__global__ void k_softmax(bool bwd, const T *xy, const T *dy, T *out, int64_t rows, int64_t cols) {
  __shared__ float sh[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T *xr = xy + r * cols;
    T *o = out + r * cols;
    if (bwd) {
      const T *dyr = dy + r * cols;
      float a = 0.0f;
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) a += stc_ld(xr, c) * stc_ld(dyr, c);
      float sdot = stc_block_sum(a, sh);
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) stc_st(o, c, stc_ld(xr, c) * (stc_ld(dyr, c) - sdot));
      continue;
    }
    float m = -INFINITY;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) m = fmaxf(m, stc_ld(xr, c));
    m = stc_block_max(m, sh);
    if (m == -INFINITY) {
      for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) stc_st(o, c, 0.0f);
      continue;
    }
    float a = 0.0f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) a += expf(stc_ld(xr, c) - m);
    float inv = 1.0f / stc_block_sum(a, sh);
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) stc_st(o, c, expf(stc_ld(xr, c) - m) * inv);
  }
}

extern "C" cudaError_t stc_softmax(cudaStream_t s, st_dtype dt, bool backward, const void *x_or_y, const void *dy,
                                   void *out, int64_t rows, int64_t cols) {
  if (rows == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_softmax<T><<<stc_row_grid(rows), STC_BLOCK, 0, s>>>(backward, (const T *)x_or_y, (const T *)dy,
                                                                        (T *)out, rows, cols));
  return cudaGetLastError();
}

/* RoPE: one thread per (token, head, pair) */
template <typename T>
__global__ void k_rope(int layout, T *x, const T *cs, const T *sn, int64_t tbs, int64_t seq, int64_t heads,
                       int64_t hd, bool inverse, int64_t n) {
  int64_t half = hd / 2;
  STC_FOR(i, n) {
    int64_t kk = i % half, h = (i / half) % heads, tok = i / (half * heads);
    int64_t bi = tok / seq, sidx = tok % seq;
    int64_t toff = bi * tbs + sidx * half + kk;
    float co = stc_ld(cs, toff), si = stc_ld(sn, toff);
    if (inverse) si = -si;
    T *xh = x + (tok * heads + h) * hd;
    int64_t i0 = layout == ST_ROPE_INTERLEAVED ? 2 * kk : kk;
    int64_t i1 = layout == ST_ROPE_INTERLEAVED ? 2 * kk + 1 : kk + half;
    float x0 = stc_ld(xh, i0), x1 = stc_ld(xh, i1);
    stc_st(xh, i0, x0 * co - x1 * si);
    stc_st(xh, i1, x0 * si + x1 * co);
  }
}

extern "C" cudaError_t stc_rope(cudaStream_t s, st_dtype dt, st_rope_layout layout, void *x, const void *cos,
                                const void *sin, int64_t tbs, int64_t batch, int64_t seq, int64_t heads,
                                int64_t head_dim, bool inverse) {
  int64_t n = batch * seq * heads * (head_dim / 2);
  if (n == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_rope<T><<<stc_grid(n), STC_BLOCK, 0, s>>>((int)layout, (T *)x, (const T *)cos, (const T *)sin,
                                                              tbs, seq, heads, head_dim, inverse, n));
  return cudaGetLastError();
}
