/* optim_update of the CPU table against a naive double implementation of torch.optim's AdamW,
 * Adam (L2 in the gradient, and DeepSpeed's adam_w_mode) and SGD (with and without momentum),
 * three steps each, with a grad_scale; params in F32, F64, and BF16/F16 through the fp32 master.
 * Tolerances: the kernel keeps m, v (and the master) in fp32, so parameters agree with the double
 * reference to ~1e-7 relative per step; we allow 2e-6 relative + 1e-7 absolute, and 1e-5 for the
 * state (v is a sum of squares: its relative float error is the same ~1e-7, 1e-5 is generous). */
#include "test_ops_common.h"

static const st_ops *ops;

typedef struct ref_state { double *p, *m, *v; } ref_state;

static void ref_step(const st_optim_desc *d, ref_state *s, const double *g_in, int64_t n) {
  double bc1 = 1 - pow(d->beta1, (double)d->step), bc2 = 1 - pow(d->beta2, (double)d->step);
  for (int64_t i = 0; i < n; i++) {
    double g = g_in[i] * d->grad_scale, p = s->p[i];
    if (d->type == ST_OPTIM_SGD) {
      g += d->weight_decay * p;
      if (d->momentum != 0) {
        s->m[i] = d->step == 1 ? g : d->momentum * s->m[i] + g;
        g = s->m[i];
      }
      s->p[i] = p - d->lr * g;
      continue;
    }
    if (d->type == ST_OPTIM_ADAMW || d->adam_w_mode) p *= 1 - d->lr * d->weight_decay;
    else g += d->weight_decay * p;
    s->m[i] = d->beta1 * s->m[i] + (1 - d->beta1) * g;
    s->v[i] = d->beta2 * s->v[i] + (1 - d->beta2) * g * g;
    s->p[i] = p - d->lr / bc1 * s->m[i] / (sqrt(s->v[i]) / sqrt(bc2) + d->eps);
  }
}

static double load(st_dtype dt, const void *p, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  default: return st_f16_to_f32(((const uint16_t *)p)[i]);
  }
}

static void run(st_optim_type type, bool w_mode, double momentum, st_dtype pdt, st_dtype gdt, int64_t n) {
  test_rng rg = {(uint64_t)(type * 100 + pdt * 10 + gdt + n) + (w_mode ? 7u : 0u)};
  size_t pes = st_dtype_size(pdt), ges = st_dtype_size(gdt);
  bool half = pdt == ST_BF16 || pdt == ST_F16;
  double *p0 = test_randd(&rg, n, -1, 1);
  void *param = malloc(pes * (size_t)n), *grad = malloc(ges * (size_t)n);
  float *master = half ? test_tof(p0, n) : NULL;
  ops->cast(ops, ST_F64, p0, pdt, param, n);
  ref_state rs = {test_zerosd(n), test_zerosd(n), test_zerosd(n)};
  for (int64_t i = 0; i < n; i++) rs.p[i] = half ? (double)master[i] : load(pdt, param, i);
  bool has_m = type != ST_OPTIM_SGD || momentum != 0;
  float *m = has_m ? test_zerosf(n) : NULL, *v = type != ST_OPTIM_SGD ? test_zerosf(n) : NULL;
  double *gd = test_zerosd(n);
  st_optim_desc d = {.type = type, .n = n, .param = param, .param_dtype = pdt, .master = master, .grad = grad,
                     .grad_dtype = gdt, .exp_avg = m, .exp_avg_sq = v, .lr = 1e-2, .beta1 = 0.9, .beta2 = 0.95,
                     .eps = 1e-8, .weight_decay = 0.1, .momentum = momentum, .adam_w_mode = w_mode,
                     .grad_scale = 0.5};
  for (int step = 1; step <= 3; step++) {
    double *g = test_randd(&rg, n, -2, 2);
    ops->cast(ops, ST_F64, g, gdt, grad, n);
    for (int64_t i = 0; i < n; i++) gd[i] = load(gdt, grad, i); /* the grads as the kernel sees them */
    d.step = step;
    CHECK(ops->optim_update(ops, &d) == ST_OK);
    ref_step(&d, &rs, gd, n);
    free(g);
  }
  char what[96];
  snprintf(what, sizeof what, "optim type %d w_mode %d mom %g param %s grad %s n %lld", type, w_mode, momentum,
           st_dtype_name(pdt), st_dtype_name(gdt), (long long)n);
  double *got = test_zerosd(n);
  if (half) {
    for (int64_t i = 0; i < n; i++) got[i] = master[i];
    CLOSE_D(what, got, rs.p, n, 2e-6, 1e-7);
    /* the working copy is the master rounded to the param dtype, exactly */
    bool same = true;
    for (int64_t i = 0; i < n; i++)
      same &= ((uint16_t *)param)[i] == (pdt == ST_BF16 ? st_f32_to_bf16(master[i]) : st_f32_to_f16(master[i]));
    CHECK_MSG(same, "%s: param != round(master)", what);
  } else {
    for (int64_t i = 0; i < n; i++) got[i] = load(pdt, param, i);
    CLOSE_D(what, got, rs.p, n, 2e-6, 1e-7);
  }
  if (m) {
    for (int64_t i = 0; i < n; i++) got[i] = m[i];
    CLOSE_D("exp_avg", got, rs.m, n, 1e-5, 1e-7); /* m can cancel to ~0: a few fp32 ulps of 0.3 */
  }
  if (v) {
    for (int64_t i = 0; i < n; i++) got[i] = v[i];
    CLOSE_D("exp_avg_sq", got, rs.v, n, 1e-5, 1e-10);
  }
  free(p0); free(param); free(grad); free(master); free(rs.p); free(rs.m); free(rs.v); free(m); free(v); free(gd); free(got);
}

int main(void) {
  ops = test_ops_create(2);
  const int64_t sizes[2] = {1031, 100003}; /* a SIMD tail; the threaded path */
  for (int s = 0; s < 2; s++) {
    run(ST_OPTIM_ADAMW, false, 0, ST_F32, ST_F32, sizes[s]);
    run(ST_OPTIM_ADAM, false, 0, ST_F32, ST_F32, sizes[s]);
    run(ST_OPTIM_ADAM, true, 0, ST_F32, ST_F32, sizes[s]);
  }
  run(ST_OPTIM_ADAMW, false, 0, ST_BF16, ST_F32, 1031);
  run(ST_OPTIM_ADAMW, false, 0, ST_BF16, ST_BF16, 1031);
  run(ST_OPTIM_ADAMW, false, 0, ST_F16, ST_F32, 1031);
  run(ST_OPTIM_ADAMW, false, 0, ST_F64, ST_F64, 1031);
  run(ST_OPTIM_ADAM, false, 0, ST_F64, ST_F32, 1031);
  run(ST_OPTIM_ADAMW, false, 0, ST_F32, ST_BF16, 1031);
  run(ST_OPTIM_SGD, false, 0.9, ST_F32, ST_F32, 1031);
  run(ST_OPTIM_SGD, false, 0, ST_F32, ST_F32, 1031);
  run(ST_OPTIM_SGD, false, 0.9, ST_BF16, ST_F32, 1031);

  /* errors: a half-precision param needs the master; Adam needs its state */
  uint16_t p[4] = {0};
  float g[4] = {0}, st[4] = {0};
  st_optim_desc d = {.type = ST_OPTIM_ADAMW, .n = 4, .param = p, .param_dtype = ST_BF16, .grad = g,
                     .grad_dtype = ST_F32, .exp_avg = st, .exp_avg_sq = st, .step = 1, .grad_scale = 1};
  CHECK(ops->optim_update(ops, &d) == ST_ERR_INVALID_ARGUMENT);
  d.param_dtype = ST_F32;
  d.param = g;
  d.exp_avg_sq = NULL;
  CHECK(ops->optim_update(ops, &d) == ST_ERR_INVALID_ARGUMENT);
  d.exp_avg_sq = st;
  d.grad_dtype = ST_I32;
  CHECK(ops->optim_update(ops, &d) == ST_ERR_UNSUPPORTED);
  st_cpu_ops_destroy(ops);
  return st_test_finish("test_ops_optim");
}
