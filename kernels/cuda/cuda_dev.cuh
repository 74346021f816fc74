/* cuda_dev.cuh — device-side helpers of the kernel files: the bf16/f16 storage types with
 * conversions bit-identical to tensor.h (round to nearest even, quiet NaN), loads to float, block
 * reductions, grid sizing, dtype dispatch and the deterministic column-sum used by every
 * "accumulate over tokens" backward (bias, dshift, dscale, dgate, RMSNorm dw). Not installed. */
#ifndef STRATA_KERNELS_CUDA_DEV_CUH
#define STRATA_KERNELS_CUDA_DEV_CUH

#include "cuda_internal.h"

#include <stdint.h>

#define STC_BLOCK 256

/* bf16 and f16 are stored as 16-bit words and converted by hand, so results match the CPU
 * table's st_f32_to_bf16 / st_f32_to_f16 bit for bit (the CUDA intrinsics differ on NaN payloads). */
struct stc_bf16 { uint16_t u; };
struct stc_f16 { uint16_t u; };

__host__ __device__ __forceinline__ float stc_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

__host__ __device__ __forceinline__ uint16_t stc_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

__host__ __device__ __forceinline__ float stc_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, ex = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (ex == 0) {
    if (man == 0) {
      u = sign;
    } else {
      ex = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; ex--; }
      man &= 0x3ffu;
      u = sign | (ex << 23) | (man << 13);
    }
  } else if (ex == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((ex + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

__host__ __device__ __forceinline__ uint16_t stc_f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
  if (absu < 0x38800000u) {
    if (absu < 0x33000000u) return (uint16_t)sign;
    uint32_t ex = absu >> 23, man = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - ex;
    uint32_t half = 1u << (shift - 1), rest = man & ((1u << shift) - 1), q = man >> shift;
    if (rest > half || (rest == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
  }
  uint32_t q = absu - 0x38000000u;
  uint32_t rest = q & 0x1fffu, out = q >> 13;
  if (rest > 0x1000u || (rest == 0x1000u && (out & 1u))) out++;
  return (uint16_t)(sign | out);
}

__device__ __forceinline__ float stc_ld(const float *p, int64_t i) { return p[i]; }
__device__ __forceinline__ float stc_ld(const stc_bf16 *p, int64_t i) { return stc_bf16_to_f32(p[i].u); }
__device__ __forceinline__ void stc_st(float *p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void stc_st(stc_bf16 *p, int64_t i, float v) { p[i].u = stc_f32_to_bf16(v); }

/* grid-stride loop over [0, n) */
#define STC_FOR(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

static inline unsigned stc_grid(int64_t n) {
  int64_t g = (n + STC_BLOCK - 1) / STC_BLOCK;
  if (g < 1) g = 1;
  return (unsigned)(g > 65536 ? 65536 : g);
}

static inline unsigned stc_row_grid(int64_t rows) { return (unsigned)(rows < 1 ? 1 : (rows > 65535 ? 65535 : rows)); }

/* Run BODY with T = float or stc_bf16 by st_dtype. cuda_ops.c only passes F32 or BF16. */
#define STC_DISPATCH(dt, ...)                      \
  do {                                             \
    if ((dt) == ST_F32) {                          \
      typedef float T;                             \
      __VA_ARGS__;                                 \
    } else if ((dt) == ST_BF16) {                  \
      typedef stc_bf16 T;                          \
      __VA_ARGS__;                                 \
    } else {                                       \
      return cudaErrorInvalidValue;                \
    }                                              \
  } while (0)

/* sum over the block (blockDim.x a multiple of 32, <= 1024); every thread gets the total.
 * `sh` holds 32 values; the call synchronizes, so it may be reused by the next call. */
template <typename V>
__device__ __forceinline__ V stc_block_sum(V v, V *sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  V t = l < nw ? sh[l] : (V)0;
  for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
  return t;
}

__device__ __forceinline__ float stc_block_max(float v, float *sh) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = blockDim.x >> 5;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  float t = l < nw ? sh[l] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
  return t;
}

/* ---- deterministic column sums: out[b * out_stride + j] += sum_t f(b, t, j) ----
 * Stage one: grid (column blocks, batch, token chunks), each thread sums its chunk of tokens for one
 * column into part[(chunk * batch + b) * dim + j] (float). Stage two adds the chunks in order into
 * `out` (type T). The chunking depends on the shape only, so results repeat bit for bit. */
template <typename F>
__global__ void stc_colsum_part_kernel(F f, int64_t batch, int64_t tokens, int64_t dim, int64_t chunk, float *part) {
  int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t z = blockIdx.z;
  if (j >= dim) return;
  int64_t t0 = z * chunk, t1 = t0 + chunk < tokens ? t0 + chunk : tokens;
  for (int64_t b = blockIdx.y; b < batch; b += gridDim.y) {
    float acc = 0.0f;
    for (int64_t t = t0; t < t1; t++) acc += f(b, t, j);
    part[(z * batch + b) * dim + j] = acc;
  }
}

template <typename T>
__global__ void stc_colsum_final_kernel(const float *part, int64_t nchunks, int64_t batch, int64_t dim, T *out,
                                        int64_t out_stride) {
  STC_FOR(i, batch * dim) {
    int64_t b = i / dim, j = i % dim;
    float acc = 0.0f;
    for (int64_t z = 0; z < nchunks; z++) acc += part[(z * batch + b) * dim + j];
    int64_t o = b * out_stride + j;
    stc_st(out, o, stc_ld(out, o) + acc);
  }
}

template <typename T, typename F>
static cudaError_t stc_colsum(cudaStream_t s, F f, int64_t batch, int64_t tokens, int64_t dim, T *out,
                              int64_t out_stride) {
  if (batch == 0 || dim == 0) return cudaSuccess;
  int64_t colblocks = (dim + STC_BLOCK - 1) / STC_BLOCK;
  int64_t by = batch < 65535 ? batch : 65535;
  /* aim for ~4096 blocks in stage one, each chunk at least 16 tokens, at most 1024 chunks */
  int64_t want = 4096 / (colblocks * by);
  if (want < 1) want = 1;
  int64_t maxc = (tokens + 15) / 16;
  if (want > maxc) want = maxc;
  if (want > 1024) want = 1024;
  if (want < 1) want = 1;
  int64_t chunk = (tokens + want - 1) / want;
  if (chunk < 1) chunk = 1;
  int64_t nchunks = tokens > 0 ? (tokens + chunk - 1) / chunk : 1;
  float *part = NULL;
  cudaError_t e = cudaMallocAsync((void **)&part, sizeof(float) * (size_t)(nchunks * batch * dim), s);
  if (e != cudaSuccess) return e;
  if (tokens == 0) {
    e = cudaMemsetAsync(part, 0, sizeof(float) * (size_t)(nchunks * batch * dim), s);
  } else {
    dim3 grid((unsigned)colblocks, (unsigned)by, (unsigned)nchunks);
    stc_colsum_part_kernel<<<grid, STC_BLOCK, 0, s>>>(f, batch, tokens, dim, chunk, part);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) {
    stc_colsum_final_kernel<T><<<stc_grid(batch * dim), STC_BLOCK, 0, s>>>(part, nchunks, batch, dim, out, out_stride);
    e = cudaGetLastError();
  }
  cudaError_t e2 = cudaFreeAsync(part, s);
  return e != cudaSuccess ? e : e2;
}

#endif
