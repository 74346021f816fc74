/* qwen_image_harness.h — drive the qwen_image model plugin through its ops table without the
 * trainer: dlopen the module, build a CPU ops table and a host, hold host-side parameter, gradient
 * and AdamW-state windows, and run one step (batch_prepare -> unit_forward x U -> loss ->
 * unit_backward x U) the way tests/reference/test_qwen_image.c does. Used by
 * bench/bench_qwen_image.c and tests/interop/qwen_image_forward.c (header-only: static functions).
 * Errors are returned as st_result with st_error filled; only main() decides to exit. */
#ifndef STRATA_BENCH_QWEN_IMAGE_HARNESS_H
#define STRATA_BENCH_QWEN_IMAGE_HARNESS_H

#include <dlfcn.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <strata/model.h>

#include "config.h"
#include "cpu_ops.h"
#include "host_impl.h"

typedef struct qh_env {
  void *so;
  const st_model_plugin_v1 *pl;
  const st_ops *ops;
  st_host *host;
} qh_env;

static const st_device QH_CPU = {ST_DEVICE_CPU, 0};

static inline st_result qh_env_open(qh_env *e, const char *module, int threads, st_error *err) {
  memset(e, 0, sizeof *e);
  e->so = dlopen(module, RTLD_NOW | RTLD_LOCAL);
  if (!e->so) return st_error_set(err, ST_ERR_NOT_FOUND, module, "dlopen failed: %s", dlerror());
  e->pl = dlsym(e->so, ST_MODEL_PLUGIN_SYMBOL_V1);
  if (!e->pl) return st_error_set(err, ST_ERR_FORMAT, module, "not a strata model plugin (no %s)", ST_MODEL_PLUGIN_SYMBOL_V1);
  ST_CHECK(st_cpu_ops_create(threads, &e->ops, err));
  return st_host_create(&(st_host_options){.ops = e->ops, .cpu_ops = e->ops, .cfg = st_config_api()}, &e->host, err);
}

static inline void qh_env_close(qh_env *e) {
  if (e->host) st_host_destroy(e->host);
  if (e->ops) st_cpu_ops_destroy(e->ops);
  if (e->so) dlclose(e->so);
}

static inline int64_t qh_numel(const int64_t *shape, int ndim) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}

static inline double qh_get(st_dtype dt, const void *p, int64_t i) {
  return dt == ST_F64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void qh_set(st_dtype dt, void *p, int64_t i, double v) {
  if (dt == ST_F64) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

/* A model instance: parameters P, gradients G (NULL data when frozen), AdamW moments M1/M2 (fp32,
 * only when with_optim). */
typedef struct qh_run {
  const qh_env *env;
  st_config *cfg;
  void *ctx;
  const st_model_desc *d;
  st_dtype dt;
  st_tensor **P, **G;
  float ***M1, ***M2; /* [unit][param]: AdamW exp_avg / exp_avg_sq, NULL when frozen */
} qh_run;

static inline st_result qh_run_open(qh_run *r, const qh_env *e, const char *json, bool with_optim, st_error *err) {
  memset(r, 0, sizeof *r);
  r->env = e;
  ST_CHECK(st_config_load_string(json, "model", &r->cfg, err));
  st_cfg *node = st_config_node(r->cfg, "model");
  ST_CHECK(e->pl->validate(node, st_config_api(), err));
  ST_CHECK(e->pl->init(e->host, node, &r->ctx, err));
  r->d = e->pl->describe(r->ctx);
  r->dt = r->d->compute_dtype;
  int U = r->d->n_units;
  r->P = calloc((size_t)U, sizeof *r->P);
  r->G = calloc((size_t)U, sizeof *r->G);
  r->M1 = calloc((size_t)U, sizeof *r->M1);
  r->M2 = calloc((size_t)U, sizeof *r->M2);
  if (!r->P || !r->G || !r->M1 || !r->M2) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "harness", "out of host memory");
  for (int u = 0; u < U; u++) {
    const st_unit_desc *ud = &r->d->units[u];
    r->P[u] = calloc((size_t)ud->n_params, sizeof(st_tensor));
    r->G[u] = calloc((size_t)ud->n_params, sizeof(st_tensor));
    r->M1[u] = calloc((size_t)ud->n_params, sizeof(float *));
    r->M2[u] = calloc((size_t)ud->n_params, sizeof(float *));
    if (!r->P[u] || !r->G[u] || !r->M1[u] || !r->M2[u]) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "harness", "out of host memory");
    for (int k = 0; k < ud->n_params; k++) {
      const st_param_desc *p = &ud->params[k];
      size_t n = (size_t)qh_numel(p->shape, p->ndim);
      r->P[u][k] = st_tensor_make(calloc(n, st_dtype_size(r->dt)), r->dt, QH_CPU, p->ndim, p->shape);
      r->G[u][k] = r->P[u][k];
      r->G[u][k].data = (p->flags & ST_PARAM_TRAINABLE) ? calloc(n, st_dtype_size(r->dt)) : NULL;
      if (with_optim && (p->flags & ST_PARAM_TRAINABLE)) {
        r->M1[u][k] = calloc(n, sizeof(float));
        r->M2[u][k] = calloc(n, sizeof(float));
        if (!r->M1[u][k] || !r->M2[u][k])
          return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "out of host memory for AdamW state");
      }
      if (!r->P[u][k].data || ((p->flags & ST_PARAM_TRAINABLE) && !r->G[u][k].data))
        return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "out of host memory");
    }
  }
  return ST_OK;
}

static inline void qh_run_close(qh_run *r) {
  if (r->d && r->P && r->G && r->M1 && r->M2)
    for (int u = 0; u < r->d->n_units; u++) {
      for (int k = 0; r->P[u] && r->G[u] && r->M1[u] && r->M2[u] && k < r->d->units[u].n_params; k++) {
        free(r->P[u][k].data);
        free(r->G[u][k].data);
        free(r->M1[u][k]);
        free(r->M2[u][k]);
      }
      free(r->P[u]);
      free(r->G[u]);
      free(r->M1[u]);
      free(r->M2[u]);
    }
  free(r->P);
  free(r->G);
  free(r->M1);
  free(r->M2);
  if (r->ctx) r->env->pl->finalize(r->ctx);
  st_config_free(r->cfg);
  memset(r, 0, sizeof *r);
}

/* every parameter from the plugin's seeded init (what training from scratch starts with) */
static inline st_result qh_init_params(qh_run *r, uint64_t seed, st_error *err) {
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++)
      ST_CHECK(r->env->pl->init_param(r->ctx, seed, u, k, 0, st_tensor_numel(&r->P[u][k]), r->dt, r->P[u][k].data,
                                       err));
  return ST_OK;
}

static inline int64_t qh_param_count(const qh_run *r, bool trainable_only) {
  int64_t n = 0;
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++)
      if (!trainable_only || (r->d->units[u].params[k].flags & ST_PARAM_TRAINABLE)) n += st_tensor_numel(&r->P[u][k]);
  return n;
}

static inline void qh_zero_grads(qh_run *r) {
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++)
      if (r->G[u][k].data) memset(r->G[u][k].data, 0, st_tensor_nbytes(&r->G[u][k]));
}

/* One step over the samples: forward every unit, loss, and (backward) every unit's backward into G.
 * pred (if not NULL, numel of the last carry's first tensor) receives the prediction as floats;
 * pred_desc (if not NULL) its shape (data NULL). */
static inline st_result qh_step(qh_run *r, const st_sample *samples, int n, uint64_t seed, bool backward, double *loss,
                         float *pred, st_tensor *pred_desc, st_error *err) {
  const st_model_plugin_v1 *PL = r->env->pl;
  st_batch batch = {.n_samples = n, .samples = samples, .seed = seed, .training = true};
  void *bctx = NULL;
  ST_CHECK(PL->batch_prepare(r->ctx, &batch, &bctx, err));
  int U = r->d->n_units;
  st_carry_layout *lay = calloc((size_t)U + 1, sizeof *lay);
  st_tensor(*carry)[ST_MAX_CARRY] = calloc((size_t)U + 1, sizeof *carry);
  st_tensor(*dcarry)[ST_MAX_CARRY] = calloc((size_t)U + 1, sizeof *dcarry);
  void **saved = calloc((size_t)U, sizeof *saved);
  void *work = NULL;
  size_t work_max = 0;
  st_result res = (lay && carry && dcarry && saved) ? ST_OK : st_error_set(err, ST_ERR_OUT_OF_MEMORY, "harness", "out of memory");
  for (int b = 0; b <= U && res == ST_OK; b++) {
    res = PL->carry_layout(r->ctx, bctx, b, &lay[b], err);
    for (int i = 0; res == ST_OK && i < lay[b].n; i++) {
      carry[b][i] = dcarry[b][i] = lay[b].t[i];
      carry[b][i].data = malloc(st_tensor_nbytes(&lay[b].t[i]) + 8);
      dcarry[b][i].data = backward ? malloc(st_tensor_nbytes(&lay[b].t[i]) + 8) : NULL;
    }
  }
  for (int u = 0; u < U && res == ST_OK; u++) {
    size_t sb = 0, wb = 0;
    res = PL->unit_memory(r->ctx, bctx, u, &sb, &wb, err);
    saved[u] = malloc(sb + 8);
    if (wb > work_max) work_max = wb;
  }
  if (res == ST_OK) work = malloc(work_max + 8);
  for (int u = 0; u < U && res == ST_OK; u++)
    res = PL->unit_forward(r->ctx, bctx, u, r->P[u], carry[u], carry[u + 1], saved[u], work, err);
  st_loss l = {0};
  /* the model's gradient is of the sum over its loss items (model.h): 1/n_items gives the mean's */
  if (res == ST_OK) res = PL->loss(r->ctx, bctx, carry[U], 0.0, NULL, &l, err);
  if (res == ST_OK && backward)
    res = PL->loss(r->ctx, bctx, carry[U], l.n_items ? 1.0 / (double)l.n_items : 0.0, dcarry[U], &l, err);
  if (loss) *loss = l.loss;
  if (res == ST_OK && (pred || pred_desc)) {
    int64_t np = st_tensor_numel(&carry[U][0]);
    if (pred_desc) {
      *pred_desc = carry[U][0];
      pred_desc->data = NULL;
    }
    for (int64_t q = 0; pred && q < np; q++) pred[q] = (float)qh_get(r->dt, carry[U][0].data, q);
  }
  for (int u = U - 1; u >= 0 && backward && res == ST_OK; u--)
    res = PL->unit_backward(r->ctx, bctx, u, r->P[u], r->G[u], carry[u], saved[u], dcarry[u + 1],
                            u ? dcarry[u] : NULL, work, err);
  for (int b = 0; b <= U && lay && carry && dcarry; b++)
    for (int i = 0; i < lay[b].n; i++) {
      free(carry[b][i].data);
      free(dcarry[b][i].data);
    }
  for (int u = 0; u < U && saved; u++) free(saved[u]);
  free(saved);
  free(work);
  free(lay);
  free(carry);
  free(dcarry);
  PL->batch_release(r->ctx, bctx);
  return res;
}

/* AdamW (the host's fused update with its default settings = torch.optim.AdamW's: betas
 * 0.9/0.999, eps 1e-8, weight decay 0.01) on every trainable tensor; the descriptor's weight_decay
 * is a multiplier of the configured decay: 0 for ST_PARAM_NO_DECAY tensors */
static inline st_result qh_adamw(qh_run *r, double lr, int64_t step, st_error *err) {
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++) {
      const st_param_desc *p = &r->d->units[u].params[k];
      if (!(p->flags & ST_PARAM_TRAINABLE) || !r->M1[u][k]) continue;
      st_optim_desc od = {.n = st_tensor_numel(&r->P[u][k]), .param = r->P[u][k].data, .param_dtype = r->dt,
                          .grad = r->G[u][k].data, .grad_dtype = r->dt, .exp_avg = r->M1[u][k],
                          .exp_avg_sq = r->M2[u][k], .lr = lr,
                          .weight_decay = (p->flags & ST_PARAM_NO_DECAY) ? 0.0 : 1.0, .step = step,
                          .grad_scale = 1.0};
      ST_CHECK(r->env->host->optim_update(r->env->host, QH_CPU, &od, err));
    }
  return ST_OK;
}

#endif /* STRATA_BENCH_QWEN_IMAGE_HARNESS_H */
