/* model_util.h — small helpers shared by the in-tree model plugins (qwen_image, qwen3_vl_moe).
 * Header-only, so each plugin stays one shared object built from the SDK headers alone. */
#ifndef STRATA_MODELS_UTIL_H
#define STRATA_MODELS_UTIL_H

#include <string.h>

#include <strata/model.h>

/* a sample's tensor by name, NULL when absent */
static inline const st_tensor *find_tensor(const st_sample *s, const char *name) {
  for (int i = 0; i < s->n_tensors; i++)
    if (!strcmp(s->names[i], name)) return &s->tensors[i];
  return NULL;
}

/* element i of a host tensor of any dtype, as a double */
static inline double load_elem(const st_tensor *t, int64_t i) {
  const void *p = t->data;
  switch (t->dtype) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  case ST_F16: return st_f16_to_f32(((const uint16_t *)p)[i]);
  case ST_I32: return ((const int32_t *)p)[i];
  case ST_I64: return (double)((const int64_t *)p)[i];
  case ST_U8: return ((const uint8_t *)p)[i];
  default: return 0.0;
  }
}

/* n elements of dst (a float dtype) set to v */
static inline void store_const(st_dtype dt, void *dst, int64_t n, double v) {
  for (int64_t i = 0; i < n; i++) {
    switch (dt) {
    case ST_F64: ((double *)dst)[i] = v; break;
    case ST_F32: ((float *)dst)[i] = (float)v; break;
    case ST_BF16: ((uint16_t *)dst)[i] = st_f32_to_bf16((float)v); break;
    case ST_F16: ((uint16_t *)dst)[i] = st_f32_to_f16((float)v); break;
    default: break;
    }
  }
}

/* element i of an F64 or F32 buffer */
static inline void store_elem(st_dtype dt, void *p, int64_t i, double v) {
  if (dt == ST_F64) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

/* a bump allocator over one workspace: with base NULL it only measures */
typedef struct bump {
  char *base; /* NULL: only measure */
  size_t off;
} bump;

static inline void *take(bump *bp, size_t bytes) {
  void *p = bp->base ? bp->base + bp->off : NULL;
  bp->off += (bytes + 63) & ~(size_t)63;
  return p;
}

#endif /* STRATA_MODELS_UTIL_H */
