/* cuda_attn.cu — straightforward scaled dot-product attention: correct, not fast (cuDNN SDPA or a
 * FlashAttention-style tiled kernel replace it later). One warp per query row (forward, dQ) or key
 * row (dK, dV); each lane holds head_dim / 32 elements; scores stream through an online softmax
 * in float, so memory stays O(B S H d) whatever the sequence length.
 *
 * Masks follow cpu_attn_tmpl.h: causal (query i sees keys j <= i + seq_k - seq_q), key_mask
 * [B, seq_k] (nonzero = visible), segment_ids [B, seq] (equal ids only). A query with no visible
 * key gets out = 0 and lse = -inf, and no gradient. */
#include "cuda_dev.cuh"

#define HPL (STC_ATTN_MAX_HEAD_DIM / 32)

struct attn_p {
  int64_t B, Sq, Sk, H, KVH, hd;
  float scale;
  bool causal;
  const uint8_t *km;
  const int32_t *seg;
};

static attn_p make_p(const st_attn_desc *d) {
  attn_p p;
  p.B = d->batch;
  p.Sq = d->seq_q;
  p.Sk = d->seq_k;
  p.H = d->heads;
  p.KVH = d->kv_heads;
  p.hd = d->head_dim;
  p.scale = (float)d->scale;
  p.causal = d->causal;
  p.km = d->key_mask;
  p.seg = d->segment_ids;
  return p;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/* keys [0, lim) are candidates for query i; visible() applies key_mask and segments */
__device__ __forceinline__ int64_t key_limit(const attn_p &p, int64_t i) {
  if (!p.causal) return p.Sk;
  int64_t last = i + (p.Sk - p.Sq);
  int64_t lim = last + 1 < 0 ? 0 : last + 1;
  return lim < p.Sk ? lim : p.Sk;
}

__device__ __forceinline__ bool visible(const attn_p &p, int64_t b, int64_t i, int64_t j) {
  if (p.km && !p.km[b * p.Sk + j]) return false;
  if (p.seg && p.seg[b * p.Sk + j] != p.seg[b * p.Sq + i]) return false;
  return true;
}

#define WARP_LOOP(w, total)                                                                   \
  for (int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < (total);        \
       w += ((int64_t)gridDim.x * blockDim.x) >> 5)

template <typename T>
__global__ void k_attn_fwd(attn_p p, const T *q, const T *k, const T *v, T *out, T *lse) {
  int lane = threadIdx.x & 31;
  WARP_LOOP(w, p.B * p.Sq * p.H) {
    int64_t h = w % p.H, i = (w / p.H) % p.Sq, b = w / (p.H * p.Sq);
    int64_t kvh = h / (p.H / p.KVH);
    float qv[HPL], acc[HPL];
#pragma unroll
    for (int t = 0; t < HPL; t++) {
      int64_t c = lane + 32 * t;
      qv[t] = c < p.hd ? stc_ld(q, w * p.hd + c) * p.scale : 0.0f;
      acc[t] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    int64_t lim = key_limit(p, i);
    for (int64_t j = 0; j < lim; j++) {
      if (!visible(p, b, i, j)) continue;
      int64_t ko = ((b * p.Sk + j) * p.KVH + kvh) * p.hd;
      float dot = 0.0f;
#pragma unroll
      for (int t = 0; t < HPL; t++) {
        int64_t c = lane + 32 * t;
        if (c < p.hd) dot += qv[t] * stc_ld(k, ko + c);
      }
      float sc = warp_sum(dot);
      float mn = fmaxf(m, sc), corr = expf(m - mn), e = expf(sc - mn);
      l = l * corr + e;
#pragma unroll
      for (int t = 0; t < HPL; t++) {
        int64_t c = lane + 32 * t;
        if (c < p.hd) acc[t] = acc[t] * corr + e * stc_ld(v, ko + c);
      }
      m = mn;
    }
    float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
    for (int t = 0; t < HPL; t++) {
      int64_t c = lane + 32 * t;
      if (c < p.hd) stc_st(out, w * p.hd + c, acc[t] * inv);
    }
    if (lane == 0) stc_st(lse, (b * p.H + h) * p.Sq + i, l > 0.0f ? m + logf(l) : -INFINITY);
  }
}

static unsigned warp_grid(int64_t warps) {
  int64_t g = (warps + (STC_BLOCK / 32) - 1) / (STC_BLOCK / 32);
  if (g < 1) g = 1;
  return (unsigned)(g > 65536 ? 65536 : g);
}

extern "C" cudaError_t stc_attention_fwd(cudaStream_t s, const st_attn_desc *d) {
  attn_p p = make_p(d);
  int64_t warps = p.B * p.Sq * p.H;
  if (warps == 0) return cudaSuccess;
  STC_DISPATCH(d->dtype, k_attn_fwd<T><<<warp_grid(warps), STC_BLOCK, 0, s>>>(
                             p, (const T *)d->q, (const T *)d->k, (const T *)d->v, (T *)d->out, (T *)d->lse));
  return cudaGetLastError();
}

/* D[w] = sum_c dO[w, c] O[w, c], w = (b Sq + i) H + h */
template <typename T>
__global__ void k_attn_delta(attn_p p, const T *dout, const T *out, float *D) {
  int lane = threadIdx.x & 31;
  WARP_LOOP(w, p.B * p.Sq * p.H) {
    float a = 0.0f;
    for (int64_t c = lane; c < p.hd; c += 32) a += stc_ld(dout, w * p.hd + c) * stc_ld(out, w * p.hd + c);
    a = warp_sum(a);
    if (lane == 0) D[w] = a;
  }
}

/* dQ_i = scale sum_j P_ij (dP_ij - D_i) K_j, P_ij = exp(scale q_i.k_j - lse_i), dP_ij = dO_i.v_j */
template <typename T>
__global__ void k_attn_dq(attn_p p, const T *q, const T *k, const T *v, const T *lse, const T *dout, const float *D,
                          T *dq) {
  int lane = threadIdx.x & 31;
  WARP_LOOP(w, p.B * p.Sq * p.H) {
    int64_t h = w % p.H, i = (w / p.H) % p.Sq, b = w / (p.H * p.Sq);
    int64_t kvh = h / (p.H / p.KVH);
    float L = stc_ld(lse, (b * p.H + h) * p.Sq + i), Di = D[w];
    float qv[HPL], dov[HPL], acc[HPL];
#pragma unroll
    for (int t = 0; t < HPL; t++) {
      int64_t c = lane + 32 * t;
      qv[t] = c < p.hd ? stc_ld(q, w * p.hd + c) * p.scale : 0.0f;
      dov[t] = c < p.hd ? stc_ld(dout, w * p.hd + c) : 0.0f;
      acc[t] = 0.0f;
    }
    int64_t lim = L == -INFINITY ? 0 : key_limit(p, i);
    for (int64_t j = 0; j < lim; j++) {
      if (!visible(p, b, i, j)) continue;
      int64_t ko = ((b * p.Sk + j) * p.KVH + kvh) * p.hd;
      float dot = 0.0f, dpp = 0.0f;
#pragma unroll
      for (int t = 0; t < HPL; t++) {
        int64_t c = lane + 32 * t;
        if (c < p.hd) {
          dot += qv[t] * stc_ld(k, ko + c);
          dpp += dov[t] * stc_ld(v, ko + c);
        }
      }
      float sc = warp_sum(dot), dp = warp_sum(dpp);
      float ds = expf(sc - L) * (dp - Di);
#pragma unroll
      for (int t = 0; t < HPL; t++) {
        int64_t c = lane + 32 * t;
        if (c < p.hd) acc[t] += ds * stc_ld(k, ko + c);
      }
    }
#pragma unroll
    for (int t = 0; t < HPL; t++) {
      int64_t c = lane + 32 * t;
      if (c < p.hd) stc_st(dq, w * p.hd + c, acc[t] * p.scale);
    }
  }
}

/* dV_j = sum_{h in group, i} P_ij dO_i;  dK_j = scale sum P_ij (dP_ij - D_i) q_i; one warp per
 * (b, j, kv head), w = (b Sk + j) KVH + kvh */
template <typename T>
__global__ void k_attn_dkv(attn_p p, const T *q, const T *k, const T *v, const T *lse, const T *dout, const float *D,
                           T *dk, T *dv) {
  int lane = threadIdx.x & 31;
  int64_t group = p.H / p.KVH;
  WARP_LOOP(w, p.B * p.Sk * p.KVH) {
    int64_t kvh = w % p.KVH, j = (w / p.KVH) % p.Sk, b = w / (p.KVH * p.Sk);
    float kv[HPL], vv[HPL], ak[HPL], av[HPL];
#pragma unroll
    for (int t = 0; t < HPL; t++) {
      int64_t c = lane + 32 * t;
      kv[t] = c < p.hd ? stc_ld(k, w * p.hd + c) : 0.0f;
      vv[t] = c < p.hd ? stc_ld(v, w * p.hd + c) : 0.0f;
      ak[t] = av[t] = 0.0f;
    }
    bool key_ok = !p.km || p.km[b * p.Sk + j];
    int64_t i0 = 0;
    if (p.causal) {
      i0 = j - (p.Sk - p.Sq);
      if (i0 < 0) i0 = 0;
    }
    for (int64_t h = kvh * group; key_ok && h < (kvh + 1) * group; h++) {
      for (int64_t i = i0; i < p.Sq; i++) {
        if (p.seg && p.seg[b * p.Sk + j] != p.seg[b * p.Sq + i]) continue;
        float L = stc_ld(lse, (b * p.H + h) * p.Sq + i);
        if (L == -INFINITY) continue;
        int64_t qo = ((b * p.Sq + i) * p.H + h) * p.hd;
        float dot = 0.0f, dpp = 0.0f;
#pragma unroll
        for (int t = 0; t < HPL; t++) {
          int64_t c = lane + 32 * t;
          if (c < p.hd) {
            dot += stc_ld(q, qo + c) * kv[t];
            dpp += stc_ld(dout, qo + c) * vv[t];
          }
        }
        float sc = warp_sum(dot) * p.scale, dp = warp_sum(dpp);
        float pij = expf(sc - L), ds = pij * (dp - D[(b * p.Sq + i) * p.H + h]);
#pragma unroll
        for (int t = 0; t < HPL; t++) {
          int64_t c = lane + 32 * t;
          if (c < p.hd) {
            av[t] += pij * stc_ld(dout, qo + c);
            ak[t] += ds * stc_ld(q, qo + c);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < HPL; t++) {
      int64_t c = lane + 32 * t;
      if (c < p.hd) {
        stc_st(dk, w * p.hd + c, ak[t] * p.scale);
        stc_st(dv, w * p.hd + c, av[t]);
      }
    }
  }
}

template <typename T>
static cudaError_t attn_bwd(cudaStream_t s, const st_attn_desc *d, const T *dout, T *dq, T *dk, T *dv) {
  attn_p p = make_p(d);
  int64_t qwarps = p.B * p.Sq * p.H, kwarps = p.B * p.Sk * p.KVH;
  float *D = NULL;
  cudaError_t e = cudaMallocAsync((void **)&D, sizeof(float) * (size_t)(qwarps > 0 ? qwarps : 1), s);
  if (e != cudaSuccess) return e;
  const T *q = (const T *)d->q, *k = (const T *)d->k, *v = (const T *)d->v, *lse = (const T *)d->lse;
  if (qwarps > 0) {
    k_attn_delta<T><<<warp_grid(qwarps), STC_BLOCK, 0, s>>>(p, dout, (const T *)d->out, D);
    e = cudaGetLastError();
    if (e == cudaSuccess) {
      k_attn_dq<T><<<warp_grid(qwarps), STC_BLOCK, 0, s>>>(p, q, k, v, lse, dout, D, dq);
      e = cudaGetLastError();
    }
  }
  if (e == cudaSuccess && kwarps > 0) {
    k_attn_dkv<T><<<warp_grid(kwarps), STC_BLOCK, 0, s>>>(p, q, k, v, lse, dout, D, dk, dv);
    e = cudaGetLastError();
  }
  cudaError_t e2 = cudaFreeAsync(D, s);
  return e != cudaSuccess ? e : e2;
}

extern "C" cudaError_t stc_attention_bwd(cudaStream_t s, const st_attn_desc *d, const void *dout, void *dq, void *dk,
                                         void *dv) {
  STC_DISPATCH(d->dtype, return attn_bwd<T>(s, d, (const T *)dout, (T *)dq, (T *)dk, (T *)dv));
  return cudaSuccess;
}
