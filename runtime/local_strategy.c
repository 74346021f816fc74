/* local_strategy.c — the built-in `local` strategy.
 *
 * One allocation per category (llm.c style): working parameters in the window dtype, fp32 master
 * copies when that dtype is a half type, gradients, and optimizer state; each parameter is an
 * offset into them. Frozen parameters get no gradient, master or optimizer storage and are not
 * saved in checkpoints (they come back from the model's weights or its seeded init). */
#include <stdlib.h>

#include "local_strategy.h"

typedef struct local_param {
  const st_param_desc *desc;
  int64_t numel;
  size_t param_off, grad_off, master_off, state_off; /* byte offsets; SIZE_MAX = none */
  bool trainable;
} local_param;

typedef struct local_ctx {
  const st_host *host;
  st_strategy_setup setup;
  int n_units;
  int *unit_first;       /* index of each unit's first param in params[] */
  local_param *params;
  int n_params;
  st_tensor *windows;    /* n_params param views, in unit order */
  st_tensor *grad_windows;
  char *param_mem, *grad_mem, *master_mem, *state_mem;
  size_t param_bytes, grad_bytes, master_bytes, state_bytes;
  int n_states;
} local_ctx;

static const char *const local_keys[] = {"name", "plugin", NULL};

static st_result local_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  return cfg ? api->check_keys(cfg, local_keys, err) : ST_OK;
}

static void local_finalize(void *vctx) {
  local_ctx *c = vctx;
  if (!c) return;
  const st_host *h = c->host;
  h->free(h, h->device, c->param_mem);
  h->free(h, h->device, c->grad_mem);
  h->free(h, h->device, c->master_mem);
  h->free(h, h->device, c->state_mem);
  free(c->unit_first);
  free(c->params);
  free(c->windows);
  free(c->grad_windows);
  free(c);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static st_result local_init(const st_host *host, st_cfg *cfg, const st_strategy_setup *setup, void **out,
                            st_error *err) {
  (void)cfg;
  *out = NULL;
  local_ctx *c = calloc(1, sizeof *c);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.local", "cannot allocate the strategy state");
  c->host = host;
  c->setup = *setup;
  const st_model_desc *m = setup->model;
  c->n_units = m->n_units;
  for (int u = 0; u < m->n_units; u++) c->n_params += m->units[u].n_params;
  c->unit_first = calloc((size_t)m->n_units + 1, sizeof *c->unit_first);
  c->params = calloc((size_t)c->n_params + 1, sizeof *c->params);
  c->windows = calloc((size_t)c->n_params + 1, sizeof *c->windows);
  c->grad_windows = calloc((size_t)c->n_params + 1, sizeof *c->grad_windows);
  if (!c->unit_first || !c->params || !c->windows || !c->grad_windows) {
    local_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.local", "cannot allocate the parameter tables");
  }
  bool need_master = setup->param_dtype == ST_BF16 || setup->param_dtype == ST_F16;
  c->n_states = host->optim_state_count(host);
  size_t psz = st_dtype_size(setup->param_dtype), gsz = st_dtype_size(setup->grad_dtype);
  int i = 0;
  for (int u = 0; u < m->n_units; u++) {
    c->unit_first[u] = i;
    for (int k = 0; k < m->units[u].n_params; k++, i++) {
      local_param *p = &c->params[i];
      p->desc = &m->units[u].params[k];
      p->numel = 1;
      for (int d = 0; d < p->desc->ndim; d++) p->numel *= p->desc->shape[d];
      p->trainable = (p->desc->flags & ST_PARAM_TRAINABLE) != 0;
      p->param_off = c->param_bytes;
      c->param_bytes += align64((size_t)p->numel * psz);
      p->grad_off = p->master_off = p->state_off = SIZE_MAX;
      if (!p->trainable) continue;
      p->grad_off = c->grad_bytes;
      c->grad_bytes += align64((size_t)p->numel * gsz);
      if (need_master) {
        p->master_off = c->master_bytes;
        c->master_bytes += align64((size_t)p->numel * sizeof(float));
      }
      p->state_off = c->state_bytes;
      c->state_bytes += align64((size_t)p->numel * sizeof(float)) * (size_t)c->n_states;
    }
  }
  c->unit_first[m->n_units] = i;
  st_device dev = host->device;
  c->param_mem = host->alloc(host, dev, c->param_bytes ? c->param_bytes : 64, "params");
  c->grad_mem = host->alloc(host, dev, c->grad_bytes ? c->grad_bytes : 64, "grads");
  c->master_mem = c->master_bytes ? host->alloc(host, dev, c->master_bytes, "master") : NULL;
  c->state_mem = c->state_bytes ? host->alloc(host, dev, c->state_bytes, "optim") : NULL;
  if (!c->param_mem || !c->grad_mem || (c->master_bytes && !c->master_mem) || (c->state_bytes && !c->state_mem)) {
    size_t total = c->param_bytes + c->grad_bytes + c->master_bytes + c->state_bytes;
    local_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.local",
                        "cannot allocate %.2f GiB for parameters, gradients and optimizer state on one device; "
                        "use a sharding strategy (fsdp, zero3_offload) or LoRA",
                        (double)total / (1 << 30));
  }
  const st_ops *ops = host->ops;
  ST_CHECK(ops->fill(ops, ST_U8, c->grad_mem, (int64_t)(c->grad_bytes ? c->grad_bytes : 64), 0.0));
  if (c->state_mem) ST_CHECK(ops->fill(ops, ST_U8, c->state_mem, (int64_t)c->state_bytes, 0.0));
  for (int j = 0; j < c->n_params; j++) {
    local_param *p = &c->params[j];
    c->windows[j] = st_tensor_make(c->param_mem + p->param_off, setup->param_dtype, dev, p->desc->ndim, p->desc->shape);
    c->grad_windows[j] = st_tensor_make(p->trainable ? c->grad_mem + p->grad_off : NULL, setup->grad_dtype, dev,
                                        p->desc->ndim, p->desc->shape);
  }
  *out = c;
  return ST_OK;
}

static st_result check_unit(local_ctx *c, int unit, st_error *err) {
  if (unit < 0 || unit >= c->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "strategy.local", "unit %d out of range [0, %d)", unit, c->n_units);
  return ST_OK;
}

static st_result local_pre_forward(void *vctx, int unit, const st_tensor **params, st_error *err) {
  local_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  *params = &c->windows[c->unit_first[unit]];
  return ST_OK;
}

static st_result local_post_forward(void *vctx, int unit, st_error *err) { return check_unit(vctx, unit, err); }

static st_result local_pre_backward(void *vctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err) {
  local_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  *params = &c->windows[c->unit_first[unit]];
  *grads = &c->grad_windows[c->unit_first[unit]];
  return ST_OK;
}

static st_result local_post_backward(void *vctx, int unit, bool last, st_error *err) {
  (void)last;
  return check_unit(vctx, unit, err);
}

static st_result local_grad_norm_sq(void *vctx, double *out, st_error *err) {
  local_ctx *c = vctx;
  const st_ops *ops = c->host->ops;
  double total = 0.0;
  for (int j = 0; j < c->n_params; j++) {
    local_param *p = &c->params[j];
    if (!p->trainable) continue;
    double s = 0.0;
    st_result r = ops->sumsq(ops, c->setup.grad_dtype, c->grad_mem + p->grad_off, p->numel, &s);
    if (r != ST_OK) return st_error_set(err, r, p->desc->name, "gradient norm failed: %s", st_result_string(r));
    total += s;
  }
  *out = total;
  return ST_OK;
}

static float *state_ptr(local_ctx *c, local_param *p, int k) {
  return (float *)(c->state_mem + p->state_off + (size_t)k * align64((size_t)p->numel * sizeof(float)));
}

static st_result zero_grads(local_ctx *c) {
  const st_ops *ops = c->host->ops;
  return c->grad_bytes ? ops->fill(ops, ST_U8, c->grad_mem, (int64_t)c->grad_bytes, 0.0) : ST_OK;
}

static st_result local_step(void *vctx, const st_step_args *a, st_error *err) {
  local_ctx *c = vctx;
  const st_host *h = c->host;
  for (int j = 0; j < c->n_params; j++) {
    local_param *p = &c->params[j];
    if (!p->trainable) continue;
    st_optim_desc d = {
        .n = p->numel,
        .param = c->param_mem + p->param_off,
        .param_dtype = c->setup.param_dtype,
        .master = p->master_off != SIZE_MAX ? (float *)(c->master_mem + p->master_off) : NULL,
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
    if (r != ST_OK) return st_error_prefix(err, "%s: ", p->desc->name);
  }
  return zero_grads(c);
}

static st_result local_skip_step(void *vctx, st_error *err) {
  (void)err;
  return zero_grads(vctx);
}

/* Checkpoint values travel through host memory in fp32 (fp64 on the reference path). */
static st_dtype io_dtype(const local_ctx *c) { return c->setup.param_dtype == ST_F64 ? ST_F64 : ST_F32; }

static st_result local_state_save(void *vctx, st_state_writer *w, st_error *err) {
  local_ctx *c = vctx;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_params && r == ST_OK; j++) {
    local_param *p = &c->params[j];
    if (!p->trainable) continue;
    size_t bytes = (size_t)p->numel * st_dtype_size(io);
    void *buf = h->alloc(h, (st_device){ST_DEVICE_CPU, 0}, bytes ? bytes : 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->desc->name, "no host memory to stage a checkpoint");
    if (p->master_off != SIZE_MAX)
      r = ops->copy(ops, buf, (st_device){ST_DEVICE_CPU, 0}, c->master_mem + p->master_off, h->device, bytes);
    else
      r = ops->cast(ops, c->setup.param_dtype, c->param_mem + p->param_off, io, buf, p->numel);
    if (r == ST_OK) r = w->write(w, p->desc, ST_STATE_PARAM, 0, p->numel, io, buf, err);
    for (int k = 0; k < c->n_states && r == ST_OK; k++) {
      r = ops->copy(ops, buf, (st_device){ST_DEVICE_CPU, 0}, state_ptr(c, p, k), h->device,
                    (size_t)p->numel * sizeof(float));
      if (r == ST_OK) r = w->write(w, p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), 0, p->numel, ST_F32, buf, err);
    }
    h->free(h, (st_device){ST_DEVICE_CPU, 0}, buf);
  }
  return r;
}

static st_result local_state_load(void *vctx, st_state_reader *rd, st_error *err) {
  local_ctx *c = vctx;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_params && r == ST_OK; j++) {
    local_param *p = &c->params[j];
    size_t bytes = (size_t)p->numel * st_dtype_size(io);
    void *buf = h->alloc(h, (st_device){ST_DEVICE_CPU, 0}, bytes ? bytes : 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->desc->name, "no host memory to stage a checkpoint");
    r = rd->read(rd, p->desc, ST_STATE_PARAM, 0, p->numel, io, buf, err);
    if (r == ST_OK && p->master_off != SIZE_MAX)
      r = ops->copy(ops, c->master_mem + p->master_off, h->device, buf, (st_device){ST_DEVICE_CPU, 0}, bytes);
    if (r == ST_OK) r = ops->cast(ops, io, buf, c->setup.param_dtype, c->param_mem + p->param_off, p->numel);
    for (int k = 0; k < c->n_states && r == ST_OK && p->trainable; k++) {
      float *dst = state_ptr(c, p, k);
      r = rd->read(rd, p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), 0, p->numel, ST_F32, buf, err);
      if (r == ST_ERR_NOT_FOUND) {
        st_error_clear(err);
        r = ops->fill(ops, ST_F32, dst, p->numel, 0.0);
      } else if (r == ST_OK) {
        r = ops->copy(ops, dst, h->device, buf, (st_device){ST_DEVICE_CPU, 0}, (size_t)p->numel * sizeof(float));
      }
    }
    h->free(h, (st_device){ST_DEVICE_CPU, 0}, buf);
  }
  return r;
}

static st_result local_memory_plan(void *vctx, st_memory_plan *out) {
  local_ctx *c = vctx;
  *out = (st_memory_plan){.category = {"params", "grads", "master", "optim", "buffers", "comm"},
                          .device_bytes = {c->param_bytes, c->grad_bytes, c->master_bytes, c->state_bytes, 0, 0}};
  return ST_OK;
}

static const st_strategy_plugin_v1 local_strategy = {
    .header = ST_PLUGIN_HEADER("strategy", "local", ST_VERSION_STRING, st_strategy_plugin_v1),
    .validate = local_validate,
    .init = local_init,
    .finalize = local_finalize,
    .pre_forward = local_pre_forward,
    .post_forward = local_post_forward,
    .pre_backward = local_pre_backward,
    .post_backward = local_post_backward,
    .grad_norm_sq = local_grad_norm_sq,
    .step = local_step,
    .skip_step = local_skip_step,
    .state_save = local_state_save,
    .state_load = local_state_load,
    .memory_plan = local_memory_plan,
};

const st_strategy_plugin_v1 *st_local_strategy(void) { return &local_strategy; }
