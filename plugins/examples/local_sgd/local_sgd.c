/* local_sgd.c — an out-of-tree strategy: local SGD (periodic parameter averaging).
 *
 * Every rank keeps a full replica and steps its optimizer on its OWN gradients, with no gradient
 * communication at all; every `sync_every` optimizer steps the replicas' parameters are averaged
 * over the group with one all-reduce. With sync_every = 1 and plain SGD this is exactly DDP (the
 * mean of (p - lr g_r) is p - lr mean(g_r)); with larger values it trades communication for
 * drift between the replicas (Lin et al., "Don't Use Large Mini-Batches, Use Local SGD", 2018).
 *
 * Storage, llm.c style: one allocation each for parameters, gradients and optimizer state; each
 * parameter is an offset into them. Only fp32 and fp64 windows are supported (no master copies),
 * which keeps the example short.
 *
 * It uses nothing but the SDK: host->alloc/free, host->ops, host->optim_update, host->comm. */
#include <stdlib.h>

#include <strata/strategy.h>

#define LSGD_NAME "local_sgd"

typedef struct lsgd_param {
  const st_param_desc *desc;
  int64_t numel;
  size_t param_off, grad_off, state_off; /* bytes; grad/state SIZE_MAX for frozen parameters */
} lsgd_param;

typedef struct lsgd_ctx {
  const st_host *host;
  st_strategy_setup setup;
  const st_comm_plugin_v1 *comm;
  st_comm *group;
  int rank, world;
  int64_t sync_every;
  int n_units, n_params, n_states;
  int *unit_first; /* first parameter of each unit; n_units + 1 entries */
  lsgd_param *params;
  st_tensor *windows, *grad_windows;
  char *param_mem, *grad_mem, *state_mem;
  size_t param_bytes, grad_bytes, state_bytes;
} lsgd_ctx;

static const char *const lsgd_keys[] = {"name", "plugin", "sync_every", NULL};

static st_result lsgd_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  if (!cfg) return ST_OK;
  ST_CHECK(api->check_keys(cfg, lsgd_keys, err));
  int64_t every;
  ST_CHECK(api->get_int(cfg, "sync_every", 8, &every, err));
  if (every < 1)
    return st_error_set(err, ST_ERR_CONFIG, "strategy.sync_every",
                        "strategy.sync_every: must be >= 1 optimizer steps, found %lld", (long long)every);
  return ST_OK;
}

static void lsgd_finalize(void *vctx) {
  lsgd_ctx *c = vctx;
  if (!c) return;
  const st_host *h = c->host;
  h->free(h, h->device, c->param_mem);
  h->free(h, h->device, c->grad_mem);
  h->free(h, h->device, c->state_mem);
  free(c->unit_first);
  free(c->params);
  free(c->windows);
  free(c->grad_windows);
  free(c);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static st_result lsgd_init(const st_host *host, st_cfg *cfg, const st_strategy_setup *setup, void **out,
                           st_error *err) {
  *out = NULL;
  if (setup->param_dtype != ST_F32 && setup->param_dtype != ST_F64)
    return st_error_set(err, ST_ERR_UNSUPPORTED, "strategy.plugin",
                        "local_sgd keeps no fp32 master copy, so it trains fp32 or fp64 models only (this model "
                        "computes in %s): use strategy \"ddp\"", st_dtype_name(setup->param_dtype));
  lsgd_ctx *c = calloc(1, sizeof *c);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy", "local_sgd: cannot allocate its state");
  c->host = host;
  c->setup = *setup;
  c->comm = host->comm;
  c->group = setup->group ? setup->group : host->world;
  c->world = 1;
  if (c->comm && c->group) {
    c->rank = c->comm->rank(c->group);
    c->world = c->comm->size(c->group);
  }
  c->sync_every = 8;
  st_result r = cfg ? host->cfg->get_int(cfg, "sync_every", 8, &c->sync_every, err) : ST_OK;
  if (r != ST_OK) {
    lsgd_finalize(c);
    return r;
  }
  const st_model_desc *m = setup->model;
  c->n_units = m->n_units;
  for (int u = 0; u < m->n_units; u++) c->n_params += m->units[u].n_params;
  c->unit_first = calloc((size_t)m->n_units + 1, sizeof *c->unit_first);
  c->params = calloc((size_t)c->n_params + 1, sizeof *c->params);
  c->windows = calloc((size_t)c->n_params + 1, sizeof *c->windows);
  c->grad_windows = calloc((size_t)c->n_params + 1, sizeof *c->grad_windows);
  if (!c->unit_first || !c->params || !c->windows || !c->grad_windows) {
    lsgd_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy", "local_sgd: cannot allocate the parameter tables");
  }
  c->n_states = host->optim_state_count(host);
  size_t psz = st_dtype_size(setup->param_dtype), gsz = st_dtype_size(setup->grad_dtype);
  int i = 0;
  for (int u = 0; u < m->n_units; u++) {
    c->unit_first[u] = i;
    for (int k = 0; k < m->units[u].n_params; k++, i++) {
      lsgd_param *p = &c->params[i];
      p->desc = &m->units[u].params[k];
      p->numel = 1;
      for (int d = 0; d < p->desc->ndim; d++) p->numel *= p->desc->shape[d];
      p->param_off = c->param_bytes;
      c->param_bytes += align64((size_t)p->numel * psz);
      p->grad_off = p->state_off = SIZE_MAX;
      if (!(p->desc->flags & ST_PARAM_TRAINABLE)) continue;
      p->grad_off = c->grad_bytes;
      c->grad_bytes += align64((size_t)p->numel * gsz);
      p->state_off = c->state_bytes;
      c->state_bytes += align64((size_t)p->numel * sizeof(float)) * (size_t)c->n_states;
    }
  }
  c->unit_first[m->n_units] = i;
  st_device dev = host->device;
  /* at least 64 bytes each, so that NULL always means "out of memory" */
  c->param_mem = host->alloc(host, dev, c->param_bytes + 64, "params");
  c->grad_mem = host->alloc(host, dev, c->grad_bytes + 64, "grads");
  c->state_mem = host->alloc(host, dev, c->state_bytes + 64, "optim");
  if (!c->param_mem || !c->grad_mem || !c->state_mem) {
    lsgd_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy", "local_sgd: no memory for a full replica");
  }
  /* zero everything: padding between parameters then averages to zero and never holds garbage */
  const st_ops *ops = host->ops;
  r = ops->fill(ops, ST_U8, c->param_mem, (int64_t)c->param_bytes + 64, 0.0);
  if (r == ST_OK) r = ops->fill(ops, ST_U8, c->grad_mem, (int64_t)c->grad_bytes + 64, 0.0);
  if (r == ST_OK) r = ops->fill(ops, ST_U8, c->state_mem, (int64_t)c->state_bytes + 64, 0.0);
  if (r != ST_OK) {
    lsgd_finalize(c);
    return st_error_set(err, r, "strategy", "local_sgd: cannot clear its buffers");
  }
  for (int j = 0; j < c->n_params; j++) {
    lsgd_param *p = &c->params[j];
    c->windows[j] = st_tensor_make(c->param_mem + p->param_off, setup->param_dtype, dev, p->desc->ndim, p->desc->shape);
    c->grad_windows[j] = st_tensor_make(p->grad_off != SIZE_MAX ? c->grad_mem + p->grad_off : NULL, setup->grad_dtype,
                                        dev, p->desc->ndim, p->desc->shape);
  }
  host->log(host, ST_LOG_INFO, "local_sgd: rank %d of %d, parameters averaged every %lld step(s)", c->rank, c->world,
            (long long)c->sync_every);
  *out = c;
  return ST_OK;
}

/* ---- windows: the replica is always complete, so they are just pointers --------------------- */

static st_result check_unit(lsgd_ctx *c, int unit, st_error *err) {
  if (unit < 0 || unit >= c->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "strategy", "local_sgd: unit %d out of range [0, %d)", unit,
                        c->n_units);
  return ST_OK;
}

static st_result lsgd_pre_forward(void *vctx, int unit, const st_tensor **params, st_error *err) {
  lsgd_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  *params = &c->windows[c->unit_first[unit]];
  return ST_OK;
}

static st_result lsgd_post_forward(void *vctx, int unit, st_error *err) { return check_unit(vctx, unit, err); }

static st_result lsgd_pre_backward(void *vctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err) {
  lsgd_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  *params = &c->windows[c->unit_first[unit]];
  *grads = &c->grad_windows[c->unit_first[unit]];
  return ST_OK;
}

/* no gradient communication: that is the point of local SGD */
static st_result lsgd_post_backward(void *vctx, int unit, bool last, st_error *err) {
  (void)last;
  return check_unit(vctx, unit, err);
}

/* ---- the step --------------------------------------------------------------------------------- */

/* The mean over ranks of each rank's local squared norm. The trainer clips with it and skips the
 * step when it is not finite; every rank must take the same decision, or the ranks would disagree
 * on when to average and the collectives would no longer match. */
static st_result lsgd_grad_norm_sq(void *vctx, double *out, st_error *err) {
  lsgd_ctx *c = vctx;
  const st_ops *ops = c->host->ops;
  double total = 0.0;
  for (int j = 0; j < c->n_params; j++) {
    lsgd_param *p = &c->params[j];
    if (p->grad_off == SIZE_MAX) continue;
    double s = 0.0;
    st_result r = ops->sumsq(ops, c->setup.grad_dtype, c->grad_mem + p->grad_off, p->numel, &s);
    if (r != ST_OK) return st_error_set(err, r, p->desc->name, "local_sgd: gradient norm failed: %s", st_result_string(r));
    total += s;
  }
  if (c->world > 1) {
    st_result r = c->comm->all_reduce(c->group, &total, &total, 1, ST_F64, ST_REDUCE_AVG, NULL, err);
    if (r != ST_OK) return st_error_prefix(err, "local_sgd: averaging the gradient norm: ");
  }
  *out = total;
  return ST_OK;
}

/* every replica's parameters become their mean: one in-place all-reduce over the whole allocation */
static st_result average_params(lsgd_ctx *c, st_error *err) {
  if (c->world == 1) return ST_OK;
  st_dtype dt = c->setup.param_dtype;
  int64_t n = (int64_t)(c->param_bytes / st_dtype_size(dt));
  st_result r = c->comm->all_reduce(c->group, c->param_mem, c->param_mem, n, dt, ST_REDUCE_AVG, NULL, err);
  if (r != ST_OK) return st_error_prefix(err, "local_sgd: averaging %lld parameters: ", (long long)n);
  return ST_OK;
}

static float *state_ptr(lsgd_ctx *c, lsgd_param *p, int k) {
  return (float *)(c->state_mem + p->state_off + (size_t)k * align64((size_t)p->numel * sizeof(float)));
}

static st_result zero_grads(lsgd_ctx *c) {
  const st_ops *ops = c->host->ops;
  return ops->fill(ops, ST_U8, c->grad_mem, (int64_t)c->grad_bytes, 0.0);
}

static st_result lsgd_step(void *vctx, const st_step_args *a, st_error *err) {
  lsgd_ctx *c = vctx;
  const st_host *h = c->host;
  for (int j = 0; j < c->n_params; j++) {
    lsgd_param *p = &c->params[j];
    if (p->grad_off == SIZE_MAX) continue;
    st_optim_desc d = {
        .n = p->numel,
        .param = c->param_mem + p->param_off,
        .param_dtype = c->setup.param_dtype,
        .grad = c->grad_mem + p->grad_off,
        .grad_dtype = c->setup.grad_dtype,
        .exp_avg = c->n_states > 0 ? state_ptr(c, p, 0) : NULL,
        .exp_avg_sq = c->n_states > 1 ? state_ptr(c, p, 1) : NULL,
        .lr = a->lr,
        .weight_decay = (p->desc->flags & ST_PARAM_NO_DECAY) ? 0.0 : 1.0,
        .step = a->step,
        .grad_scale = a->grad_scale,
    };
    st_result r = h->optim_update(h, h->device, &d, err);
    if (r != ST_OK) return st_error_prefix(err, "local_sgd: %s: ", p->desc->name);
  }
  ST_CHECK(zero_grads(c));
  return a->step % c->sync_every == 0 ? average_params(c, err) : ST_OK;
}

static st_result lsgd_skip_step(void *vctx, st_error *err) {
  (void)err;
  return zero_grads(vctx);
}

/* ---- checkpoints: the replicas are averaged first, then rank 0 writes whole tensors ------------ */

static st_dtype io_dtype(const lsgd_ctx *c) { return c->setup.param_dtype; } /* fp32 or fp64, see init */

static st_result lsgd_state_save(void *vctx, st_state_writer *w, st_error *err) {
  lsgd_ctx *c = vctx;
  ST_CHECK(average_params(c, err)); /* every rank calls state_save, so every rank joins this */
  if (c->rank != 0) return ST_OK;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_params && r == ST_OK; j++) {
    lsgd_param *p = &c->params[j];
    if (p->grad_off == SIZE_MAX) continue; /* frozen: comes back from the model's weights */
    size_t bytes = (size_t)p->numel * (st_dtype_size(io) > sizeof(float) ? st_dtype_size(io) : sizeof(float));
    void *buf = h->alloc(h, cpu, bytes + 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->desc->name, "local_sgd: no host memory to stage a checkpoint");
    r = ops->copy(ops, buf, cpu, c->param_mem + p->param_off, h->device, (size_t)p->numel * st_dtype_size(io));
    if (r == ST_OK) r = w->write(w, p->desc, ST_STATE_PARAM, 0, p->numel, io, buf, err);
    for (int k = 0; k < c->n_states && r == ST_OK; k++) {
      r = ops->copy(ops, buf, cpu, state_ptr(c, p, k), h->device, (size_t)p->numel * sizeof(float));
      if (r == ST_OK) r = w->write(w, p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), 0, p->numel, ST_F32, buf, err);
    }
    h->free(h, cpu, buf);
  }
  return r;
}

static st_result lsgd_state_load(void *vctx, st_state_reader *rd, st_error *err) {
  lsgd_ctx *c = vctx;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_params && r == ST_OK; j++) {
    lsgd_param *p = &c->params[j];
    size_t bytes = (size_t)p->numel * (st_dtype_size(io) > sizeof(float) ? st_dtype_size(io) : sizeof(float));
    void *buf = h->alloc(h, cpu, bytes + 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->desc->name, "local_sgd: no host memory to stage a checkpoint");
    r = rd->read(rd, p->desc, ST_STATE_PARAM, 0, p->numel, io, buf, err);
    if (r == ST_OK) r = ops->copy(ops, c->param_mem + p->param_off, h->device, buf, cpu, (size_t)p->numel * st_dtype_size(io));
    for (int k = 0; k < c->n_states && r == ST_OK && p->grad_off != SIZE_MAX; k++) {
      r = rd->read(rd, p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), 0, p->numel, ST_F32, buf, err);
      if (r == ST_ERR_NOT_FOUND) { /* initial weights carry no optimizer state: start from zero */
        st_error_clear(err);
        r = ops->fill(ops, ST_F32, state_ptr(c, p, k), p->numel, 0.0);
      } else if (r == ST_OK) {
        r = ops->copy(ops, state_ptr(c, p, k), h->device, buf, cpu, (size_t)p->numel * sizeof(float));
      }
    }
    h->free(h, cpu, buf);
  }
  return r;
}

static st_result lsgd_memory_plan(void *vctx, st_memory_plan *out) {
  lsgd_ctx *c = vctx;
  *out = (st_memory_plan){.category = {"params", "grads", "master", "optim", "buffers", "comm"},
                          .device_bytes = {c->param_bytes, c->grad_bytes, 0, c->state_bytes, 0, 0}};
  return ST_OK;
}

ST_EXPORT const st_strategy_plugin_v1 strata_strategy_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("strategy", LSGD_NAME, "1.0.0", st_strategy_plugin_v1),
    .validate = lsgd_validate,
    .init = lsgd_init,
    .finalize = lsgd_finalize,
    .pre_forward = lsgd_pre_forward,
    .post_forward = lsgd_post_forward,
    .pre_backward = lsgd_pre_backward,
    .post_backward = lsgd_post_backward,
    .grad_norm_sq = lsgd_grad_norm_sq,
    .step = lsgd_step,
    .skip_step = lsgd_skip_step,
    .state_save = lsgd_state_save,
    .state_load = lsgd_state_load,
    .memory_plan = lsgd_memory_plan,
};
