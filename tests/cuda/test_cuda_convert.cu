/* test_cuda_convert.cu — the bf16/f16 conversions the CUDA kernels use (kernels/cuda/cuda_dev.cuh,
 * __host__ __device__) against tensor.h's, bit for bit. Runs on the host, so it needs no GPU and
 * runs everywhere the CUDA build does: the kernels compile the very same functions for the device.
 *
 * Coverage: every 16-bit pattern decoded (bf16 and f16 -> f32); for f32 -> bf16/f16, every value of
 * the top 20 bits (all signs, exponents, and the mantissa bits that decide bf16 and f16 rounding)
 * combined with 8 low-bit patterns (exact ties, just above and below, all ones, pseudo-random). */
#include "st_test.h"

#include <cuda_dev.cuh>
#include <stdint.h>

static float from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static uint32_t to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

int main(void) {
  long bad_dec_bf16 = 0, bad_dec_f16 = 0, bad_bf16 = 0, bad_f16 = 0;
  for (uint32_t h = 0; h < 65536; h++) {
    if (to_bits(stc_bf16_to_f32((uint16_t)h)) != to_bits(st_bf16_to_f32((uint16_t)h))) bad_dec_bf16++;
    if (to_bits(stc_f16_to_f32((uint16_t)h)) != to_bits(st_f16_to_f32((uint16_t)h))) bad_dec_f16++;
  }
  const uint32_t lows[8] = {0x000u, 0x001u, 0x7ffu, 0x800u, 0x801u, 0xfffu, 0x5a3u, 0x2c6u};
  uint32_t first_bf16 = 0, first_f16 = 0;
  for (uint32_t hi = 0; hi < (1u << 20); hi++)
    for (int l = 0; l < 8; l++) {
      uint32_t u = (hi << 12) | lows[l];
      float f = from_bits(u);
      if (stc_f32_to_bf16(f) != st_f32_to_bf16(f) && bad_bf16++ == 0) first_bf16 = u;
      if (stc_f32_to_f16(f) != st_f32_to_f16(f) && bad_f16++ == 0) first_f16 = u;
    }
  CHECK_MSG(bad_dec_bf16 == 0, "%ld bf16 decodes differ", bad_dec_bf16);
  CHECK_MSG(bad_dec_f16 == 0, "%ld f16 decodes differ", bad_dec_f16);
  CHECK_MSG(bad_bf16 == 0, "%ld f32 -> bf16 roundings differ, first at bits 0x%08x", bad_bf16, first_bf16);
  CHECK_MSG(bad_f16 == 0, "%ld f32 -> f16 roundings differ, first at bits 0x%08x", bad_f16, first_f16);
  /* spot values that must hold whatever both sides do: ties to even, overflow, NaN stays NaN */
  CHECK(stc_f32_to_bf16(1.0f + 1.0f / 256) == 0x3f80);          /* tie, even below */
  CHECK(stc_f32_to_bf16(1.0f + 3.0f / 256) == 0x3f82);          /* tie, even above */
  CHECK(stc_f32_to_f16(65520.0f) == 0x7c00);                    /* rounds to infinity */
  CHECK(stc_f32_to_f16(65519.0f) == 0x7bff);                    /* the largest f16 */
  CHECK(stc_f32_to_f16(5.9604645e-08f) == 0x0001);              /* the smallest subnormal */
  CHECK(isnan(stc_bf16_to_f32(stc_f32_to_bf16(from_bits(0x7f800001u))))); /* signalling NaN -> quiet */
  return st_test_finish("test_cuda_convert");
}
