/* tensor.h — dtypes, devices, the tensor view, and exact float conversions.
 *
 * A tensor view is a pointer plus dtype, device and a row-major contiguous shape. Views never own
 * memory: whoever allocated the bytes frees them. */
#ifndef STRATA_TENSOR_H
#define STRATA_TENSOR_H

#include "strata.h"

#include <math.h>

typedef enum st_dtype {
  ST_F32 = 0,
  ST_F64 = 1, /* the CPU reference path: finite-difference checks run the models in double */
  ST_BF16 = 2,
  ST_F16 = 3,
  ST_I32 = 4,
  ST_I64 = 5,
  ST_U8 = 6,
  ST_DTYPE_COUNT
} st_dtype;

static inline size_t st_dtype_size(st_dtype dt) {
  static const size_t sizes[ST_DTYPE_COUNT] = {4, 8, 2, 2, 4, 8, 1};
  return (unsigned)dt < ST_DTYPE_COUNT ? sizes[dt] : 0;
}

/* Names as safetensors spells them. */
static inline const char *st_dtype_name(st_dtype dt) {
  static const char *names[ST_DTYPE_COUNT] = {"F32", "F64", "BF16", "F16", "I32", "I64", "U8"};
  return (unsigned)dt < ST_DTYPE_COUNT ? names[dt] : "?";
}

/* Accepts safetensors names ("BF16") and config spellings ("bf16", "bfloat16", "fp32", "float32"). */
static inline bool st_dtype_parse(const char *s, st_dtype *out) {
  static const struct { const char *name; st_dtype dt; } table[] = {
      {"F32", ST_F32},   {"fp32", ST_F32},  {"float32", ST_F32}, {"f32", ST_F32},
      {"F64", ST_F64},   {"fp64", ST_F64},  {"float64", ST_F64}, {"f64", ST_F64},
      {"BF16", ST_BF16}, {"bf16", ST_BF16}, {"bfloat16", ST_BF16},
      {"F16", ST_F16},   {"fp16", ST_F16},  {"float16", ST_F16}, {"f16", ST_F16},
      {"I32", ST_I32},   {"int32", ST_I32}, {"I64", ST_I64},     {"int64", ST_I64},
      {"U8", ST_U8},     {"uint8", ST_U8},  {"BOOL", ST_U8},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (strcmp(s, table[i].name) == 0) { *out = table[i].dt; return true; }
  return false;
}

static inline bool st_dtype_is_float(st_dtype dt) { return dt <= ST_F16; }

typedef enum st_device_type { ST_DEVICE_CPU = 0, ST_DEVICE_CUDA = 1 } st_device_type;

typedef struct st_device {
  st_device_type type;
  int index; /* CUDA ordinal; 0 on the CPU */
} st_device;

#define ST_MAX_DIMS 8

typedef struct st_tensor {
  void *data;
  st_dtype dtype;
  st_device device;
  int ndim;
  int64_t shape[ST_MAX_DIMS];
} st_tensor;

static inline int64_t st_tensor_numel(const st_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
  return n;
}

static inline size_t st_tensor_nbytes(const st_tensor *t) {
  return (size_t)st_tensor_numel(t) * st_dtype_size(t->dtype);
}

/* st_tensor_make(ptr, ST_F32, dev, 3, (int64_t[]){B, T, D}) */
static inline st_tensor st_tensor_make(void *data, st_dtype dt, st_device dev, int ndim, const int64_t *shape) {
  st_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dt;
  t.device = dev;
  t.ndim = ndim < 0 ? 0 : (ndim > ST_MAX_DIMS ? ST_MAX_DIMS : ndim);
  for (int i = 0; i < t.ndim; i++) t.shape[i] = shape[i];
  return t;
}

static inline bool st_tensor_same_shape(const st_tensor *a, const st_tensor *b) {
  if (a->ndim != b->ndim) return false;
  for (int i = 0; i < a->ndim; i++)
    if (a->shape[i] != b->shape[i]) return false;
  return true;
}

/* "[2, 15, 32]" into buf; returns buf. */
static inline const char *st_shape_str(const int64_t *shape, int ndim, char *buf, size_t cap) {
  size_t used = 0;
  used += (size_t)snprintf(buf + used, cap > used ? cap - used : 0, "[");
  for (int i = 0; i < ndim; i++)
    used += (size_t)snprintf(buf + used, cap > used ? cap - used : 0, "%s%lld", i ? ", " : "", (long long)shape[i]);
  snprintf(buf + used, cap > used ? cap - used : 0, "]");
  return buf;
}

/* Exact conversions, round-to-nearest-even, NaN kept quiet, overflow to Inf as IEEE says. */
static inline float st_bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t st_f32_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float st_f16_to_f32(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else { /* subnormal: renormalize */
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; exp--; }
      man &= 0x3ffu;
      u = sign | (exp << 23) | (man << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t st_f32_to_f16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);     /* NaN */
  if (absu >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);    /* rounds to >= 65520: Inf */
  if (absu < 0x38800000u) {                                      /* result is subnormal or zero */
    if (absu < 0x33000000u) return (uint16_t)sign;               /* < 2^-25: rounds to zero */
    uint32_t exp = absu >> 23, man = (absu & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exp; /* mantissa bits to drop so that one unit is 2^-24 */
    uint32_t half = 1u << (shift - 1), rest = man & ((1u << shift) - 1), q = man >> shift;
    if (rest > half || (rest == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
  }
  uint32_t q = absu - 0x38000000u; /* rebias 127 -> 15 */
  uint32_t rest = q & 0x1fffu, out = q >> 13;
  if (rest > 0x1000u || (rest == 0x1000u && (out & 1u))) out++;
  return (uint16_t)(sign | out);
}

#endif /* STRATA_TENSOR_H */
