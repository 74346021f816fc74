/* cuda_loss.cu — MSE and cross-entropy (partial sums in double, summed on the host in block
 * order), MoE routing (top-k, gather, scatter-add) and the fused optimizer update. */
#include "cuda_dev.cuh"

/* ---- MSE: loss = sum_r w_r mean_c (p - t)^2 / rows ---- */
template <typename T>
__global__ void k_mse_fwd(const T *p, const T *t, const T *w, int64_t rows, int64_t cols, double *part) {
  __shared__ double sh[32];
  double acc = 0;
  STC_FOR(i, rows * cols) {
    double d = (double)stc_ld(p, i) - (double)stc_ld(t, i);
    acc += (w ? (double)stc_ld(w, i / cols) : 1.0) * d * d;
  }
  double tot = stc_block_sum(acc, sh);
  if (threadIdx.x == 0) part[blockIdx.x] = tot / (double)cols;
}

extern "C" cudaError_t stc_mse_fwd_partial(cudaStream_t s, st_dtype dt, const void *pred, const void *target,
                                           const void *w, int64_t rows, int64_t cols, double *part, int *nparts) {
  unsigned g = stc_grid(rows * cols);
  if (g > STC_MAX_PARTIALS) g = STC_MAX_PARTIALS;
  *nparts = (int)g;
  STC_DISPATCH(dt, k_mse_fwd<T><<<g, STC_BLOCK, 0, s>>>((const T *)pred, (const T *)target, (const T *)w, rows, cols,
                                                       part));
  return cudaGetLastError();
}

template <typename T>
__global__ void k_mse_bwd(const T *p, const T *t, const T *w, int64_t rows, int64_t cols, double base, T *dp) {
  STC_FOR(i, rows * cols) {
    double f = base * (w ? (double)stc_ld(w, i / cols) : 1.0);
    stc_st(dp, i, (float)(f * ((double)stc_ld(p, i) - (double)stc_ld(t, i))));
  }
}

extern "C" cudaError_t stc_mse_bwd(cudaStream_t s, st_dtype dt, const void *pred, const void *target, const void *w,
                                   int64_t rows, int64_t cols, double grad_scale, void *dpred) {
  double base = grad_scale * 2.0 / ((double)cols * (double)rows);
  STC_DISPATCH(dt, k_mse_bwd<T><<<stc_grid(rows * cols), STC_BLOCK, 0, s>>>(
                       (const T *)pred, (const T *)target, (const T *)w, rows, cols, base, (T *)dpred));
  return cudaGetLastError();
}

/* ---- cross-entropy: one block per row; lse with float exponentials summed in double ---- */
template <typename T>
__device__ float row_lse(const T *xr, int64_t vocab, float *shf, double *shd) {
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) m = fmaxf(m, stc_ld(xr, c));
  m = stc_block_max(m, shf);
  if (m == -INFINITY) return m;
  double a = 0;
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) a += (double)expf(stc_ld(xr, c) - m);
  return (float)((double)m + log(stc_block_sum(a, shd)));
}

__device__ __forceinline__ bool bad_label(int64_t lab, int64_t vocab, int64_t ignore) {
  return lab != ignore && (lab < 0 || lab >= vocab);
}

template <typename T>
__global__ void k_ce_fwd(const T *x, const int64_t *labels, int64_t rows, int64_t vocab, int64_t ignore, double *part,
                         unsigned long long *bad) {
  __shared__ float shf[32];
  __shared__ double shd[32];
  double loss = 0, counted = 0;
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t lab = labels[r];
    if (lab == ignore) continue;
    if (bad_label(lab, vocab, ignore)) {
      if (threadIdx.x == 0) atomicMin(bad, (unsigned long long)r);
      continue;
    }
    float lse = row_lse(x + r * vocab, vocab, shf, shd);
    loss += (double)lse - (double)stc_ld(x, r * vocab + lab);
    counted += 1;
  }
  if (threadIdx.x == 0) {
    part[2 * blockIdx.x] = loss;
    part[2 * blockIdx.x + 1] = counted;
  }
}

extern "C" cudaError_t stc_ce_fwd_partial(cudaStream_t s, st_dtype dt, const void *logits, const int64_t *labels,
                                          int64_t rows, int64_t vocab, int64_t ignore, double *part, int *nblocks,
                                          unsigned long long *bad_row) {
  int64_t g = rows < STC_MAX_PARTIALS / 2 ? rows : STC_MAX_PARTIALS / 2;
  if (g < 1) g = 1;
  *nblocks = (int)g;
  STC_DISPATCH(dt, k_ce_fwd<T><<<(unsigned)g, STC_BLOCK, 0, s>>>((const T *)logits, labels, rows, vocab, ignore, part,
                                                                bad_row));
  return cudaGetLastError();
}

template <typename T>
__global__ void k_ce_bwd(const T *x, const int64_t *labels, int64_t rows, int64_t vocab, int64_t ignore, float gs,
                         T *dx, unsigned long long *bad) {
  __shared__ float shf[32];
  __shared__ double shd[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    int64_t lab = labels[r];
    T *o = dx + r * vocab;
    if (lab == ignore || bad_label(lab, vocab, ignore)) {
      if (lab != ignore && threadIdx.x == 0) atomicMin(bad, (unsigned long long)r);
      for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) stc_st(o, c, 0.0f);
      continue;
    }
    const T *xr = x + r * vocab;
    float lse = row_lse(xr, vocab, shf, shd);
    for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x)
      stc_st(o, c, gs * (expf(stc_ld(xr, c) - lse) - (c == lab ? 1.0f : 0.0f)));
  }
}

extern "C" cudaError_t stc_ce_bwd(cudaStream_t s, st_dtype dt, const void *logits, const int64_t *labels, int64_t rows,
                                  int64_t vocab, int64_t ignore, double grad_scale, void *dlogits,
                                  unsigned long long *bad_row) {
  if (rows == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_ce_bwd<T><<<stc_row_grid(rows), STC_BLOCK, 0, s>>>((const T *)logits, labels, rows, vocab, ignore,
                                                                       (float)grad_scale, (T *)dlogits, bad_row));
  return cudaGetLastError();
}

/* ---- top-k: one thread per row, the CPU table's insertion (ties: lower index first; NaN never
 * enters; NaN rows are padded with the first unused indices). The outputs are the working list. */
template <typename T>
__global__ void k_topk(const T *x, int64_t rows, int64_t cols, int64_t k, T *vals, int32_t *idx) {
  STC_FOR(r, rows) {
    T *hv = vals + r * k;
    int32_t *ix = idx + r * k;
    int64_t filled = 0;
    for (int64_t j = 0; j < cols; j++) {
      float v = stc_ld(x, r * cols + j);
      if (filled == k && !(v > stc_ld(hv, filled - 1))) continue;
      if (isnan(v)) continue;
      int64_t pos = filled < k ? filled : k - 1;
      while (pos > 0 && v > stc_ld(hv, pos - 1)) {
        hv[pos] = hv[pos - 1];
        ix[pos] = ix[pos - 1];
        pos--;
      }
      stc_st(hv, pos, v);
      ix[pos] = (int32_t)j;
      if (filled < k) filled++;
    }
    for (int64_t j = 0; filled < k && j < cols; j++) {
      bool used = false;
      for (int64_t q = 0; q < filled; q++) used |= ix[q] == (int32_t)j;
      if (!used) {
        hv[filled] = x[r * cols + j];
        ix[filled++] = (int32_t)j;
      }
    }
  }
}

extern "C" cudaError_t stc_topk(cudaStream_t s, st_dtype dt, const void *x, int64_t rows, int64_t cols, int64_t k,
                                void *values, int32_t *indices) {
  if (rows == 0) return cudaSuccess;
  STC_DISPATCH(dt, k_topk<T><<<stc_grid(rows), STC_BLOCK, 0, s>>>((const T *)x, rows, cols, k, (T *)values, indices));
  return cudaGetLastError();
}

template <typename V>
__global__ void k_gather(const V *src, const int32_t *idx, int64_t n, int64_t cols, V *dst, unsigned long long *bad) {
  STC_FOR(i, n * cols) {
    int64_t r = i / cols, c = i % cols;
    int32_t from = idx[r];
    if (from < 0) {
      if (c == 0) atomicMin(bad, (unsigned long long)r);
      continue;
    }
    dst[i] = src[(int64_t)from * cols + c];
  }
}

extern "C" cudaError_t stc_gather_rows(cudaStream_t s, size_t es, const void *src, const int32_t *idx, int64_t n,
                                       int64_t cols, void *dst, unsigned long long *bad_row) {
  unsigned g = stc_grid(n * cols);
  switch (es) {
  case 2: k_gather<uint16_t><<<g, STC_BLOCK, 0, s>>>((const uint16_t *)src, idx, n, cols, (uint16_t *)dst, bad_row); break;
  case 4: k_gather<uint32_t><<<g, STC_BLOCK, 0, s>>>((const uint32_t *)src, idx, n, cols, (uint32_t *)dst, bad_row); break;
  case 8: k_gather<uint64_t><<<g, STC_BLOCK, 0, s>>>((const uint64_t *)src, idx, n, cols, (uint64_t *)dst, bad_row); break;
  default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

/* cuda_bf16.h's atomicAdd(__nv_bfloat16 *) would do; a CAS on the aligned
 * 32-bit word holding it keeps this file free of that header. Each add rounds to bf16. */
__device__ __forceinline__ void atomic_add_bf16(stc_bf16 *p, float v) {
  uintptr_t a = (uintptr_t)p;
  unsigned int *word = (unsigned int *)(a & ~(uintptr_t)3);
  bool hi = (a & 2) != 0;
  unsigned int old = *word, assumed;
  do {
    assumed = old;
    uint16_t cur = hi ? (uint16_t)(assumed >> 16) : (uint16_t)(assumed & 0xffffu);
    unsigned int nw = stc_f32_to_bf16(stc_bf16_to_f32(cur) + v);
    unsigned int nv = hi ? ((assumed & 0xffffu) | (nw << 16)) : ((assumed & 0xffff0000u) | nw);
    old = atomicCAS(word, assumed, nv);
  } while (assumed != old);
}

__device__ __forceinline__ void atomic_add_t(float *p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add_t(stc_bf16 *p, float v) { atomic_add_bf16(p, v); }

template <typename T>
__global__ void k_scatter(const T *src, const int32_t *idx, const T *w, int64_t n, int64_t cols, T *dst,
                          unsigned long long *bad) {
  STC_FOR(i, n * cols) {
    int64_t r = i / cols, c = i % cols;
    int32_t to = idx[r];
    if (to < 0) {
      if (c == 0) atomicMin(bad, (unsigned long long)r);
      continue;
    }
    atomic_add_t(dst + (int64_t)to * cols + c, (w ? stc_ld(w, r) : 1.0f) * stc_ld(src, i));
  }
}

extern "C" cudaError_t stc_scatter_add_rows(cudaStream_t s, st_dtype dt, const void *src, const int32_t *idx,
                                            const void *w, int64_t n, int64_t cols, void *dst,
                                            unsigned long long *bad_row) {
  STC_DISPATCH(dt, k_scatter<T><<<stc_grid(n * cols), STC_BLOCK, 0, s>>>((const T *)src, idx, (const T *)w, n, cols,
                                                                        (T *)dst, bad_row));
  return cudaGetLastError();
}

/* ---- optimizer: cpu_optim.c's formulas in float (the CPU's general path uses double) ---- */
__device__ __forceinline__ float ld_f(int dt, const void *p, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_BF16: return stc_bf16_to_f32(((const uint16_t *)p)[i]);
  default: return stc_f16_to_f32(((const uint16_t *)p)[i]);
  }
}

__device__ __forceinline__ void st_f(int dt, void *p, int64_t i, float v) {
  switch (dt) {
  case ST_F32: ((float *)p)[i] = v; break;
  case ST_BF16: ((uint16_t *)p)[i] = stc_f32_to_bf16(v); break;
  default: ((uint16_t *)p)[i] = stc_f32_to_f16(v); break;
  }
}

__global__ void k_optim(int64_t n, void *param, int pdt, float *master, const void *grad, int gdt, float *m,
                        float *v, stc_optim_consts c) {
  STC_FOR(i, n) {
    float g = ld_f(gdt, grad, i) * c.grad_scale;
    float p = master ? master[i] : ld_f(pdt, param, i);
    if (c.type != ST_OPTIM_SGD) {
      if (c.decoupled) p *= 1.0f - c.lr * c.wd;
      else g += c.wd * p;
      float mi = c.beta1 * m[i] + (1.0f - c.beta1) * g;
      float vi = c.beta2 * v[i] + (1.0f - c.beta2) * g * g;
      m[i] = mi;
      v[i] = vi;
      p -= c.step_size * (mi / (sqrtf(vi) / c.bc2_sqrt + c.eps));
    } else {
      g += c.wd * p;
      if (c.momentum != 0.0f) {
        float buf = c.first_step ? g : c.momentum * m[i] + g;
        m[i] = buf;
        g = buf;
      }
      p -= c.lr * g;
    }
    if (master) master[i] = p;
    st_f(pdt, param, i, p);
  }
}

extern "C" cudaError_t stc_optim(cudaStream_t s, const st_optim_desc *d, const stc_optim_consts *c) {
  if (d->n == 0) return cudaSuccess;
  k_optim<<<stc_grid(d->n), STC_BLOCK, 0, s>>>(d->n, d->param, (int)d->param_dtype, d->master, d->grad,
                                               (int)d->grad_dtype, d->exp_avg, d->exp_avg_sq, *c);
  return cudaGetLastError();
}
