/* rng.c — counter-based random numbers (host->rng).
 *
 * Each element is a pure function of (seed, stream, index): a splitmix64-style mix of the three
 * gives 64 random bits, from which uniforms take 53 bits and normals use Box–Muller on two
 * independent draws. No state, so any shard on any rank draws exactly the numbers the whole
 * tensor would have had. */
#include <math.h>

#include "host_impl.h"

static uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static uint64_t rng_u64(uint64_t seed, uint64_t stream, uint64_t offset) {
  uint64_t h = mix64(seed + 0x9e3779b97f4a7c15ull);
  h = mix64(h ^ (stream * 0xd1b54a32d192ed03ull + 0x632be59bd9b4e019ull));
  return mix64(h ^ (offset * 0x9e3779b97f4a7c15ull + 0x5851f42d4c957f2dull));
}

/* uniform in (0, 1): never exactly 0, so log() is safe */
static double u01_open(uint64_t bits) { return ((double)(bits >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

static void store(st_dtype dt, void *out, int64_t i, double v) {
  switch (dt) {
  case ST_F32: ((float *)out)[i] = (float)v; break;
  case ST_F64: ((double *)out)[i] = v; break;
  case ST_BF16: ((uint16_t *)out)[i] = st_f32_to_bf16((float)v); break;
  case ST_F16: ((uint16_t *)out)[i] = st_f32_to_f16((float)v); break;
  default: break;
  }
}

static void rng_normal(uint64_t seed, uint64_t stream, uint64_t offset, int64_t n, double mean, double std, st_dtype dt,
                       void *host_out) {
  for (int64_t i = 0; i < n; i++) {
    uint64_t idx = offset + (uint64_t)i;
    double u1 = u01_open(rng_u64(seed, stream, 2 * idx));
    double u2 = u01_open(rng_u64(seed, stream, 2 * idx + 1));
    double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    store(dt, host_out, i, mean + std * z);
  }
}

static void rng_uniform(uint64_t seed, uint64_t stream, uint64_t offset, int64_t n, double lo, double hi, st_dtype dt,
                        void *host_out) {
  for (int64_t i = 0; i < n; i++) {
    double u = u01_open(rng_u64(seed, stream, 2 * (offset + (uint64_t)i)));
    store(dt, host_out, i, lo + (hi - lo) * u);
  }
}

static const st_rng_api rng_api = {.normal = rng_normal, .uniform = rng_uniform, .u64 = rng_u64};

const st_rng_api *st_rng(void) { return &rng_api; }
