/* cpu_optim.c — fused AdamW / Adam / SGD for one tensor or shard, torch.optim's formulas:
 *   AdamW: p *= 1 - lr wd; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
 *          p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 *   Adam (adam_w_mode false): g += wd p first, no decoupled decay
 *   SGD: g += wd p; with momentum, buf = g at step 1, else buf = momentum buf + g; p -= lr buf
 * g is grad * grad_scale. fp32 params and grads take the per-ISA kernel; every other combination
 * (bf16/f16 params through the fp32 master, f64 params, bf16/f16/f64 grads) takes the loop below,
 * which computes in double and stores state in fp32. */
#include "cpu_internal.h"

#include <math.h>
#include <stdlib.h>

st_result st_cpu_optim_update(const st_ops *self, const st_optim_desc *d);

typedef struct optim_ctx {
  const st_optim_desc *d;
  const st_cpu_kern *k;
  st_adam_consts c;
} optim_ctx;

static inline double load_any(st_dtype dt, const void *p, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  default: return st_f16_to_f32(((const uint16_t *)p)[i]);
  }
}

static inline void store_param(st_dtype dt, void *p, int64_t i, double v) {
  switch (dt) {
  case ST_F32: ((float *)p)[i] = (float)v; break;
  case ST_F64: ((double *)p)[i] = v; break;
  case ST_BF16: ((uint16_t *)p)[i] = st_f32_to_bf16((float)v); break;
  default: ((uint16_t *)p)[i] = st_f32_to_f16((float)v); break;
  }
}

static void adam_fast_task(void *v, int64_t b, int64_t e, int tid) {
  optim_ctx *o = v;
  const st_optim_desc *d = o->d;
  o->k->adam_f32((float *)d->param + b, (const float *)d->grad + b, d->exp_avg + b, d->exp_avg_sq + b, e - b, &o->c);
}

static void general_task(void *v, int64_t b, int64_t e, int tid) {
  optim_ctx *o = v;
  const st_optim_desc *d = o->d;
  bool adam = d->type != ST_OPTIM_SGD;
  bool decoupled = d->type == ST_OPTIM_ADAMW || (d->type == ST_OPTIM_ADAM && d->adam_w_mode);
  double bc1 = 1.0 - pow(d->beta1, (double)d->step), bc2 = 1.0 - pow(d->beta2, (double)d->step);
  double step_size = d->lr / bc1, bc2_sqrt = sqrt(bc2);
  for (int64_t i = b; i < e; i++) {
    double g = load_any(d->grad_dtype, d->grad, i) * d->grad_scale;
    double p = d->master ? (double)d->master[i] : load_any(d->param_dtype, d->param, i);
    if (adam) {
      if (decoupled) p *= 1.0 - d->lr * d->weight_decay;
      else g += d->weight_decay * p;
      double m = d->beta1 * d->exp_avg[i] + (1.0 - d->beta1) * g;
      double vv = d->beta2 * d->exp_avg_sq[i] + (1.0 - d->beta2) * g * g;
      d->exp_avg[i] = (float)m;
      d->exp_avg_sq[i] = (float)vv;
      p -= step_size * m / (sqrt(vv) / bc2_sqrt + d->eps);
    } else {
      g += d->weight_decay * p;
      if (d->momentum != 0) {
        double buf = d->step <= 1 ? g : d->momentum * d->exp_avg[i] + g;
        d->exp_avg[i] = (float)buf;
        g = buf;
      }
      p -= d->lr * g;
    }
    if (d->master) d->master[i] = (float)p;
    store_param(d->param_dtype, d->param, i, d->master ? (double)(float)p : p);
  }
}

st_result st_cpu_optim_update(const st_ops *self, const st_optim_desc *d) {
  if (!d || d->n < 0) return ST_ERR_INVALID_ARGUMENT;
  if (d->type != ST_OPTIM_ADAMW && d->type != ST_OPTIM_ADAM && d->type != ST_OPTIM_SGD) return ST_ERR_INVALID_ARGUMENT;
  if (!st_dtype_is_float(d->param_dtype) || !st_dtype_is_float(d->grad_dtype)) return ST_ERR_UNSUPPORTED;
  if ((d->param_dtype == ST_BF16 || d->param_dtype == ST_F16) && !d->master) return ST_ERR_INVALID_ARGUMENT;
  if (d->n == 0) return ST_OK;
  if (!d->param || !d->grad) return ST_ERR_INVALID_ARGUMENT;
  if (d->type != ST_OPTIM_SGD && (!d->exp_avg || !d->exp_avg_sq || d->step < 1)) return ST_ERR_INVALID_ARGUMENT;
  if (d->type == ST_OPTIM_SGD && d->momentum != 0 && !d->exp_avg) return ST_ERR_INVALID_ARGUMENT;
  const st_cpu_impl *im = st_cpu_impl_of(self);
  optim_ctx o = {.d = d, .k = &im->kern};
  if (d->type != ST_OPTIM_SGD && d->param_dtype == ST_F32 && d->grad_dtype == ST_F32 && !d->master) {
    bool decoupled = d->type == ST_OPTIM_ADAMW || d->adam_w_mode;
    double bc1 = 1.0 - pow(d->beta1, (double)d->step), bc2 = 1.0 - pow(d->beta2, (double)d->step);
    o.c = (st_adam_consts){
        .beta1 = (float)d->beta1, .beta2 = (float)d->beta2,
        .one_minus_beta1 = (float)(1.0 - d->beta1), .one_minus_beta2 = (float)(1.0 - d->beta2),
        .step_size = (float)(d->lr / bc1), .bc2_sqrt = (float)sqrt(bc2), .eps = (float)d->eps,
        .decay = decoupled ? (float)(1.0 - d->lr * d->weight_decay) : 1.0f,
        .l2 = decoupled ? 0.0f : (float)d->weight_decay, .grad_scale = (float)d->grad_scale};
    st_pool_for(im->pool, d->n, 1 << 15, adam_fast_task, &o);
    return ST_OK;
  }
  st_pool_for(im->pool, d->n, 1 << 13, general_task, &o);
  return ST_OK;
}
