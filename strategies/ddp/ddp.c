/* ddp.c — the `ddp` strategy: a full replica per rank, gradients averaged over the group in buckets.
 *
 * Storage mirrors the built-in local strategy (one allocation per category, each parameter an
 * offset), except that gradients are laid out in BACKWARD order (units in reverse of the static
 * order), so every bucket — a run of consecutive units in backward order holding at least
 * reduce_bucket_size elements — is one contiguous range of the gradient allocation and is reduced
 * in place by a single all-reduce.
 *
 * Schedule: gradients accumulate locally over micro-steps (no_sync); on the last micro-step, the
 * moment post_backward has been called for every unit of a bucket, the bucket's all-reduce is
 * launched asynchronously and backward goes on with the next units while it runs. grad_norm_sq
 * waits for all of them (launching any bucket whose units never reported, in bucket order, so
 * every rank issues the same sequence of collectives).
 *
 * Averaging: the trainer scales each micro-step's loss by 1/gradient_accumulation_steps and the
 * model averages over its micro-batch; the all-reduce uses ST_REDUCE_AVG, so N ranks with a
 * per-rank batch B produce exactly the gradient of one rank with batch N*B (mean of equal-size
 * means). After the reduction every replica holds the same gradients, so the norm needs no
 * further reduction and every rank applies the same update.
 *
 * Checkpoints: rank 0 writes every trainable parameter whole (so the checkpoint's model file is
 * complete); the optimizer state of each parameter is split evenly across ranks (rank r writes
 * elements [r*c, (r+1)*c) with c = ceil(n/N)), so state I/O is spread over the ranks and no slice
 * is written twice. Loading reads full tensors on every rank. */
#include <stdlib.h>

#include <strata/strategy.h>

#include "strategy_util.h"

#define DDP_NAME "ddp"

typedef struct ddp_param {
  const st_param_desc *desc;
  int unit;
  int64_t numel;
  size_t param_off, master_off, state_off; /* bytes; SIZE_MAX = none */
  int64_t grad_elem;                       /* element offset into grad_mem; -1 = frozen */
  bool trainable;
} ddp_param;

typedef struct ddp_bucket {
  int64_t first, count; /* elements of grad_mem */
  int n_units, pending;
  bool launched, done;
  st_comm_request *req;
  void *rbuf; /* reduce-dtype staging when it differs from the gradient dtype */
} ddp_bucket;

typedef struct ddp_ctx {
  const st_host *host;
  st_strategy_setup setup;
  const st_comm_plugin_v1 *comm;
  st_comm *group;
  int rank, world;
  int n_units, n_params;
  int *unit_first;
  int *unit_bucket;     /* -1: the unit has no trainable parameter */
  bool *unit_reported;  /* post_backward(last) seen since the last step */
  ddp_param *params;
  st_tensor *windows, *grad_windows;
  char *param_mem, *grad_mem, *master_mem, *state_mem;
  size_t param_bytes, grad_bytes, master_bytes, state_bytes, comm_bytes;
  int n_states;
  ddp_bucket *buckets;
  int n_buckets;
  int64_t bucket_elems;
  bool overlap;
  bool reduced; /* buckets waited since the last step */
} ddp_ctx;

/* ---- configuration ------------------------------------------------------------------------ */

static const char *const ddp_keys[] = {"name", "plugin", "reduce_bucket_size", "bucket_cap_mb", "overlap_comm",
                                       "find_unused_parameters", "gradient_as_bucket_view", NULL};

/* DeepSpeed zero_optimization keys that mean something at stage 0 (plain data parallelism) */
static const char *const ddp_zero_keys[] = {"stage", "reduce_bucket_size", "overlap_comm", "contiguous_gradients",
                                            "reduce_scatter", "allgather_partitions", "allgather_bucket_size",
                                            "load_from_fp32_weights", "ignore_unused_parameters",
                                            "round_robin_gradients", NULL};

/* DeepSpeed's top-level communication_data_type: the dtype gradients are all-reduced in */
static st_result comm_dtype(st_cfg *root, const st_cfg_api *api, st_dtype *out, st_error *err) {
  if (api->type(root, "communication_data_type") == ST_CFG_ABSENT) return ST_OK;
  const char *s;
  ST_CHECK(api->get_string(root, "communication_data_type", "fp32", &s, err));
  st_dtype dt;
  if (!st_dtype_parse(s, &dt) || !(dt == ST_F32 || dt == ST_BF16 || dt == ST_F16))
    return st_error_set(err, ST_ERR_CONFIG, "communication_data_type",
                        "communication_data_type: \"%s\" is not one of fp32, bf16, fp16", s);
  *out = dt;
  return ST_OK;
}

static st_result ddp_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  if (!cfg) return ST_OK;
  ST_CHECK(api->check_keys(cfg, ddp_keys, err));
  if (api->type(cfg, "reduce_bucket_size") != ST_CFG_ABSENT && api->type(cfg, "bucket_cap_mb") != ST_CFG_ABSENT)
    return st_error_set(err, ST_ERR_CONFIG, api->path(cfg),
                        "%s: give reduce_bucket_size (elements) or bucket_cap_mb (MiB), not both", api->path(cfg));
  int64_t v;
  if (api->type(cfg, "reduce_bucket_size") != ST_CFG_ABSENT) {
    ST_CHECK(api->get_int(cfg, "reduce_bucket_size", 0, &v, err));
    if (v <= 0)
      return st_error_set(err, ST_ERR_CONFIG, api->path(cfg), "%s.reduce_bucket_size: must be > 0 elements, found %lld",
                          api->path(cfg), (long long)v);
  }
  if (api->type(cfg, "bucket_cap_mb") != ST_CFG_ABSENT) {
    double mb;
    ST_CHECK(api->get_number(cfg, "bucket_cap_mb", 25.0, &mb, err));
    if (!(mb > 0))
      return st_error_set(err, ST_ERR_CONFIG, api->path(cfg), "%s.bucket_cap_mb: must be > 0, found %g", api->path(cfg), mb);
  }
  st_cfg *root = api->root ? api->root(cfg) : NULL;
  st_cfg *z = NULL;
  if (root) {
    st_dtype dt;
    ST_CHECK(comm_dtype(root, api, &dt, err));
    ST_CHECK(api->get_object(root, "zero_optimization", false, &z, err));
  }
  if (!z) return ST_OK;
  if (api->type(z, "stage") != ST_CFG_ABSENT) {
    ST_CHECK(api->get_int(z, "stage", 0, &v, err));
    if (v != 0)
      return st_error_set(err, ST_ERR_CONFIG, "zero_optimization.stage",
                          "zero_optimization.stage is %lld, but strategy \"ddp\" keeps a full replica (stage 0): use "
                          "\"strategy\": {\"name\": \"fsdp\"} for stage 3 (or 2 with sharding_strategy SHARD_GRAD_OP), "
                          "or set stage to 0",
                          (long long)v);
  }
  st_error kerr;
  if (api->check_keys(z, ddp_zero_keys, &kerr) != ST_OK)
    return st_error_set(err, ST_ERR_CONFIG, kerr.where[0] ? kerr.where : "zero_optimization",
                        "strategy \"ddp\" (ZeRO stage 0) does not implement this zero_optimization key: %s; remove it "
                        "or use strategy \"fsdp\"",
                        kerr.message);
  return ST_OK;
}

/* reduce_bucket_size in elements: the strategy block wins over zero_optimization; default 25 MiB
 * worth of gradients (PyTorch DDP's bucket_cap_mb) */
static st_result read_options(ddp_ctx *c, st_cfg *cfg, st_error *err) {
  const st_cfg_api *api = c->host->cfg;
  size_t gsz = st_dtype_size(c->setup.grad_dtype);
  c->bucket_elems = (int64_t)((25u << 20) / gsz);
  c->overlap = true;
  if (!api || !cfg) return ST_OK;
  st_cfg *root = api->root ? api->root(cfg) : NULL;
  st_cfg *z = NULL;
  if (root) ST_CHECK(api->get_object(root, "zero_optimization", false, &z, err));
  if (z && api->type(z, "reduce_bucket_size") != ST_CFG_ABSENT)
    ST_CHECK(api->get_int(z, "reduce_bucket_size", c->bucket_elems, &c->bucket_elems, err));
  if (z && api->type(z, "overlap_comm") != ST_CFG_ABSENT) ST_CHECK(api->get_bool(z, "overlap_comm", true, &c->overlap, err));
  if (api->type(cfg, "reduce_bucket_size") != ST_CFG_ABSENT)
    ST_CHECK(api->get_int(cfg, "reduce_bucket_size", c->bucket_elems, &c->bucket_elems, err));
  if (api->type(cfg, "bucket_cap_mb") != ST_CFG_ABSENT) {
    double mb;
    ST_CHECK(api->get_number(cfg, "bucket_cap_mb", 25.0, &mb, err));
    c->bucket_elems = (int64_t)(mb * (1 << 20) / (double)gsz);
  }
  if (api->type(cfg, "overlap_comm") != ST_CFG_ABSENT) ST_CHECK(api->get_bool(cfg, "overlap_comm", true, &c->overlap, err));
  if (c->bucket_elems < 1) c->bucket_elems = 1;
  if (root && c->setup.grad_dtype != ST_F64) ST_CHECK(comm_dtype(root, api, &c->setup.reduce_dtype, err));
  return ST_OK;
}

/* ---- set-up ------------------------------------------------------------------------------- */

static void ddp_finalize(void *vctx) {
  ddp_ctx *c = vctx;
  if (!c) return;
  const st_host *h = c->host;
  for (int b = 0; b < c->n_buckets; b++) {
    if (c->buckets[b].req && c->comm) c->comm->wait(c->buckets[b].req, NULL);
    h->free(h, h->device, c->buckets[b].rbuf);
  }
  h->free(h, h->device, c->param_mem);
  h->free(h, h->device, c->grad_mem);
  h->free(h, h->device, c->master_mem);
  h->free(h, h->device, c->state_mem);
  free(c->buckets);
  free(c->unit_first);
  free(c->unit_bucket);
  free(c->unit_reported);
  free(c->params);
  free(c->windows);
  free(c->grad_windows);
  free(c);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static st_result ddp_init(const st_host *host, st_cfg *cfg, const st_strategy_setup *setup, void **out, st_error *err) {
  *out = NULL;
  ddp_ctx *c = calloc(1, sizeof *c);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.ddp", "cannot allocate the strategy state");
  c->host = host;
  c->setup = *setup;
  c->comm = host->comm;
  c->group = setup->group ? setup->group : host->world;
  c->rank = 0;
  c->world = 1;
  if (c->comm && c->group) {
    c->rank = c->comm->rank(c->group);
    c->world = c->comm->size(c->group);
  }
  st_result r = read_options(c, cfg, err);
  if (r != ST_OK) {
    ddp_finalize(c);
    return r;
  }
  const st_model_desc *m = setup->model;
  c->n_units = m->n_units;
  for (int u = 0; u < m->n_units; u++) c->n_params += m->units[u].n_params;
  c->unit_first = calloc((size_t)m->n_units + 1, sizeof *c->unit_first);
  c->unit_bucket = calloc((size_t)m->n_units + 1, sizeof *c->unit_bucket);
  c->unit_reported = calloc((size_t)m->n_units + 1, sizeof *c->unit_reported);
  c->buckets = calloc((size_t)m->n_units + 1, sizeof *c->buckets);
  c->params = calloc((size_t)c->n_params + 1, sizeof *c->params);
  c->windows = calloc((size_t)c->n_params + 1, sizeof *c->windows);
  c->grad_windows = calloc((size_t)c->n_params + 1, sizeof *c->grad_windows);
  if (!c->unit_first || !c->unit_bucket || !c->unit_reported || !c->buckets || !c->params || !c->windows ||
      !c->grad_windows) {
    ddp_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.ddp", "cannot allocate the parameter tables");
  }
  bool need_master = setup->param_dtype == ST_BF16 || setup->param_dtype == ST_F16;
  c->n_states = host->optim_state_count(host);
  size_t psz = st_dtype_size(setup->param_dtype), gsz = st_dtype_size(setup->grad_dtype);
  int64_t galign = (int64_t)(64 / gsz);
  int i = 0;
  for (int u = 0; u < m->n_units; u++) {
    c->unit_first[u] = i;
    for (int k = 0; k < m->units[u].n_params; k++, i++) {
      ddp_param *p = &c->params[i];
      p->desc = &m->units[u].params[k];
      p->unit = u;
      p->numel = 1;
      for (int d = 0; d < p->desc->ndim; d++) p->numel *= p->desc->shape[d];
      p->trainable = (p->desc->flags & ST_PARAM_TRAINABLE) != 0;
      p->param_off = c->param_bytes;
      c->param_bytes += align64((size_t)p->numel * psz);
      p->master_off = p->state_off = SIZE_MAX;
      p->grad_elem = -1;
      if (!p->trainable) continue;
      if (need_master) {
        p->master_off = c->master_bytes;
        c->master_bytes += align64((size_t)p->numel * sizeof(float));
      }
      p->state_off = c->state_bytes;
      c->state_bytes += align64((size_t)p->numel * sizeof(float)) * (size_t)c->n_states;
    }
  }
  c->unit_first[m->n_units] = i;

  /* gradients in backward order, grouped into buckets at unit boundaries */
  int64_t gelems = 0;
  ddp_bucket *cur = NULL;
  for (int o = m->n_units - 1; o >= 0; o--) {
    int u = setup->unit_order ? setup->unit_order[o] : o;
    int64_t unit_start = gelems;
    for (int j = c->unit_first[u]; j < c->unit_first[u + 1]; j++) {
      ddp_param *p = &c->params[j];
      if (!p->trainable) continue;
      p->grad_elem = gelems;
      gelems += (p->numel + galign - 1) / galign * galign;
    }
    c->unit_bucket[u] = -1;
    if (gelems == unit_start) continue;
    if (!cur || cur->count >= c->bucket_elems) {
      cur = &c->buckets[c->n_buckets++];
      cur->first = unit_start;
    }
    cur->count = gelems - cur->first;
    cur->n_units++;
    c->unit_bucket[u] = (int)(cur - c->buckets);
  }
  for (int b = 0; b < c->n_buckets; b++) c->buckets[b].pending = c->buckets[b].n_units;
  c->grad_bytes = (size_t)gelems * gsz;

  st_device dev = host->device;
  c->param_mem = host->alloc(host, dev, c->param_bytes ? c->param_bytes : 64, "params");
  c->grad_mem = host->alloc(host, dev, c->grad_bytes ? c->grad_bytes : 64, "grads");
  c->master_mem = c->master_bytes ? host->alloc(host, dev, c->master_bytes, "master") : NULL;
  c->state_mem = c->state_bytes ? host->alloc(host, dev, c->state_bytes, "optim") : NULL;
  bool ok = c->param_mem && c->grad_mem && (!c->master_bytes || c->master_mem) && (!c->state_bytes || c->state_mem);
  if (ok && c->setup.reduce_dtype != setup->grad_dtype && c->world > 1) {
    for (int b = 0; b < c->n_buckets && ok; b++) {
      size_t bytes = (size_t)c->buckets[b].count * st_dtype_size(c->setup.reduce_dtype);
      c->buckets[b].rbuf = host->alloc(host, dev, bytes, "comm");
      c->comm_bytes += bytes;
      ok = c->buckets[b].rbuf != NULL;
    }
  }
  if (!ok) {
    size_t total = c->param_bytes + c->grad_bytes + c->master_bytes + c->state_bytes + c->comm_bytes;
    ddp_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.ddp",
                        "cannot allocate %.2f GiB for a full replica of parameters, gradients and optimizer state; "
                        "use strategy \"fsdp\" to shard them across ranks, or LoRA",
                        (double)total / (1 << 30));
  }
  const st_ops *ops = host->ops;
  r = ops->fill(ops, ST_U8, c->grad_mem, (int64_t)(c->grad_bytes ? c->grad_bytes : 64), 0.0);
  if (r == ST_OK && c->state_mem) r = ops->fill(ops, ST_U8, c->state_mem, (int64_t)c->state_bytes, 0.0);
  if (r == ST_OK) r = ops->fill(ops, ST_U8, c->param_mem, (int64_t)(c->param_bytes ? c->param_bytes : 64), 0.0);
  if (r != ST_OK) {
    ddp_finalize(c);
    return st_error_set(err, r, "strategy.ddp", "cannot clear the gradient buffers");
  }
  for (int j = 0; j < c->n_params; j++) {
    ddp_param *p = &c->params[j];
    c->windows[j] = st_tensor_make(c->param_mem + p->param_off, setup->param_dtype, dev, p->desc->ndim, p->desc->shape);
    c->grad_windows[j] = st_tensor_make(p->trainable ? c->grad_mem + (size_t)p->grad_elem * gsz : NULL,
                                        setup->grad_dtype, dev, p->desc->ndim, p->desc->shape);
  }
  if (host->log)
    host->log(host, ST_LOG_INFO, "ddp: rank %d of %d, %d gradient bucket(s) of >= %lld elements, %s", c->rank, c->world,
              c->n_buckets, (long long)c->bucket_elems, c->overlap ? "overlapped with backward" : "reduced after backward");
  *out = c;
  return ST_OK;
}

/* ---- windows ------------------------------------------------------------------------------ */

static st_result check_unit(ddp_ctx *c, int unit, st_error *err) {
  if (unit < 0 || unit >= c->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "strategy.ddp", "unit %d out of range [0, %d)", unit, c->n_units);
  return ST_OK;
}

static st_result ddp_pre_forward(void *vctx, int unit, const st_tensor **params, st_error *err) {
  ddp_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  *params = &c->windows[c->unit_first[unit]];
  return ST_OK;
}

static st_result ddp_post_forward(void *vctx, int unit, st_error *err) { return check_unit(vctx, unit, err); }

static st_result ddp_pre_backward(void *vctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err) {
  ddp_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  if (c->unit_reported[unit])
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "strategy.ddp",
                        "backward of unit %d after its gradients were already handed to the all-reduce on this "
                        "step's last micro-step", unit);
  *params = &c->windows[c->unit_first[unit]];
  *grads = &c->grad_windows[c->unit_first[unit]];
  return ST_OK;
}

static st_result launch(ddp_ctx *c, ddp_bucket *b, st_error *err) {
  b->launched = true;
  if (c->world == 1) return ST_OK;
  const st_ops *ops = c->host->ops;
  st_dtype gdt = c->setup.grad_dtype, rdt = c->setup.reduce_dtype;
  void *g = c->grad_mem + (size_t)b->first * st_dtype_size(gdt);
  st_comm_request **req = c->overlap ? &b->req : NULL;
  st_result r;
  if (b->rbuf) {
    ST_CHECK(ops->cast(ops, gdt, g, rdt, b->rbuf, b->count));
    r = c->comm->all_reduce(c->group, b->rbuf, b->rbuf, b->count, rdt, ST_REDUCE_AVG, req, err);
  } else {
    r = c->comm->all_reduce(c->group, g, g, b->count, gdt, ST_REDUCE_AVG, req, err);
  }
  if (r != ST_OK) return st_error_prefix(err, "ddp: all-reduce of a gradient bucket (%lld elements): ", (long long)b->count);
  return ST_OK;
}

static st_result ddp_post_backward(void *vctx, int unit, bool last, st_error *err) {
  ddp_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  if (!last) return ST_OK; /* no_sync: accumulate locally */
  if (c->unit_reported[unit]) return ST_OK;
  c->unit_reported[unit] = true;
  int bi = c->unit_bucket[unit];
  if (bi < 0) return ST_OK;
  ddp_bucket *b = &c->buckets[bi];
  if (--b->pending == 0 && c->overlap) return launch(c, b, err);
  return ST_OK;
}

/* Launch what never became ready (units without a post_backward on the last micro-step, or
 * overlap off), then wait for every bucket in order. */
static st_result finish_reductions(ddp_ctx *c, st_error *err) {
  if (c->reduced) return ST_OK;
  const st_ops *ops = c->host->ops;
  for (int i = 0; i < c->n_buckets; i++)
    if (!c->buckets[i].launched) ST_CHECK(launch(c, &c->buckets[i], err));
  for (int i = 0; i < c->n_buckets; i++) {
    ddp_bucket *b = &c->buckets[i];
    if (b->req) {
      st_comm_request *req = b->req;
      b->req = NULL;
      st_result r = c->comm->wait(req, err);
      if (r != ST_OK) return st_error_prefix(err, "ddp: waiting for a gradient all-reduce: ");
    }
    if (b->rbuf && c->world > 1)
      ST_CHECK(ops->cast(ops, c->setup.reduce_dtype, b->rbuf, c->setup.grad_dtype,
                         c->grad_mem + (size_t)b->first * st_dtype_size(c->setup.grad_dtype), b->count));
  }
  c->reduced = true;
  return ST_OK;
}

static void reset_schedule(ddp_ctx *c) {
  for (int i = 0; i < c->n_buckets; i++) {
    c->buckets[i].pending = c->buckets[i].n_units;
    c->buckets[i].launched = false;
  }
  for (int u = 0; u < c->n_units; u++) c->unit_reported[u] = false;
  c->reduced = false;
}

static st_result ddp_grad_norm_sq(void *vctx, double *out, st_error *err) {
  ddp_ctx *c = vctx;
  ST_CHECK(finish_reductions(c, err));
  const st_ops *ops = c->host->ops;
  double s = 0.0;
  /* padding between parameters is never written, so the whole allocation can be summed at once */
  st_result r = ops->sumsq(ops, c->setup.grad_dtype, c->grad_mem, (int64_t)(c->grad_bytes / st_dtype_size(c->setup.grad_dtype)), &s);
  if (r != ST_OK) return st_error_set(err, r, "strategy.ddp", "gradient norm failed: %s", st_result_string(r));
  *out = s;
  return ST_OK;
}

static float *state_ptr(ddp_ctx *c, ddp_param *p, int k) {
  return (float *)(c->state_mem + p->state_off + (size_t)k * align64((size_t)p->numel * sizeof(float)));
}

static st_result zero_grads(ddp_ctx *c) {
  const st_ops *ops = c->host->ops;
  reset_schedule(c);
  return c->grad_bytes ? ops->fill(ops, ST_U8, c->grad_mem, (int64_t)c->grad_bytes, 0.0) : ST_OK;
}

static st_result ddp_step(void *vctx, const st_step_args *a, st_error *err) {
  ddp_ctx *c = vctx;
  ST_CHECK(finish_reductions(c, err));
  const st_host *h = c->host;
  size_t gsz = st_dtype_size(c->setup.grad_dtype);
  for (int j = 0; j < c->n_params; j++) {
    ddp_param *p = &c->params[j];
    if (!p->trainable) continue;
    st_optim_desc d = {
        .n = p->numel,
        .param = c->param_mem + p->param_off,
        .param_dtype = c->setup.param_dtype,
        .master = p->master_off != SIZE_MAX ? (float *)(c->master_mem + p->master_off) : NULL,
        .grad = c->grad_mem + (size_t)p->grad_elem * gsz,
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

static st_result ddp_skip_step(void *vctx, st_error *err) {
  ddp_ctx *c = vctx;
  ST_CHECK(finish_reductions(c, err)); /* every rank must complete the collectives it started */
  return zero_grads(c);
}

/* ---- checkpoints -------------------------------------------------------------------------- */

static st_dtype io_dtype(const ddp_ctx *c) { return c->setup.param_dtype == ST_F64 ? ST_F64 : ST_F32; }

static st_result ddp_state_save(void *vctx, st_state_writer *w, st_error *err) {
  ddp_ctx *c = vctx;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_params && r == ST_OK; j++) {
    ddp_param *p = &c->params[j];
    if (!p->trainable) continue;
    size_t bytes = (size_t)p->numel * st_dtype_size(io);
    void *buf = h->alloc(h, cpu, bytes ? bytes : 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->desc->name, "no host memory to stage a checkpoint");
    if (c->rank == 0) {
      if (p->master_off != SIZE_MAX)
        r = ops->copy(ops, buf, cpu, c->master_mem + p->master_off, h->device, bytes);
      else
        r = ops->cast(ops, c->setup.param_dtype, c->param_mem + p->param_off, io, buf, p->numel);
      if (r == ST_OK) r = w->write(w, p->desc, ST_STATE_PARAM, 0, p->numel, io, buf, err);
    }
    int64_t chunk = (p->numel + c->world - 1) / c->world;
    int64_t lo = (int64_t)c->rank * chunk, hi = lo + chunk < p->numel ? lo + chunk : p->numel;
    for (int k = 0; k < c->n_states && r == ST_OK && hi > lo; k++) {
      r = ops->copy(ops, buf, cpu, state_ptr(c, p, k) + lo, h->device, (size_t)(hi - lo) * sizeof(float));
      if (r == ST_OK) r = w->write(w, p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), lo, hi - lo, ST_F32, buf, err);
    }
    h->free(h, cpu, buf);
  }
  return r;
}


static st_result ddp_state_load(void *vctx, st_state_reader *rd, st_error *err) {
  ddp_ctx *c = vctx;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_params && r == ST_OK; j++) {
    ddp_param *p = &c->params[j];
    size_t bytes = (size_t)p->numel * st_dtype_size(io);
    void *buf = h->alloc(h, cpu, bytes ? bytes : 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->desc->name, "no host memory to stage a checkpoint");
    r = rd->read(rd, p->desc, ST_STATE_PARAM, 0, p->numel, io, buf, err);
    if (r != ST_OK) r = read_failed(err, r, "ddp", p->desc, ST_STATE_PARAM, 0, p->numel);
    if (r == ST_OK && p->master_off != SIZE_MAX)
      r = ops->copy(ops, c->master_mem + p->master_off, h->device, buf, cpu, bytes);
    if (r == ST_OK) r = ops->cast(ops, io, buf, c->setup.param_dtype, c->param_mem + p->param_off, p->numel);
    for (int k = 0; k < c->n_states && r == ST_OK && p->trainable; k++) {
      float *dst = state_ptr(c, p, k);
      r = rd->read(rd, p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), 0, p->numel, ST_F32, buf, err);
      if (r == ST_ERR_NOT_FOUND) {
        st_error_clear(err);
        r = ops->fill(ops, ST_F32, dst, p->numel, 0.0);
      } else if (r == ST_OK) {
        r = ops->copy(ops, dst, h->device, buf, cpu, (size_t)p->numel * sizeof(float));
      } else {
        r = read_failed(err, r, "ddp", p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), 0, p->numel);
      }
    }
    h->free(h, cpu, buf);
  }
  return r;
}

static st_result ddp_memory_plan(void *vctx, st_memory_plan *out) {
  ddp_ctx *c = vctx;
  *out = (st_memory_plan){.category = {"params", "grads", "master", "optim", "buffers", "comm"},
                          .device_bytes = {c->param_bytes, c->grad_bytes, c->master_bytes, c->state_bytes, 0,
                                           c->comm_bytes}};
  return ST_OK;
}

ST_EXPORT const st_strategy_plugin_v1 strata_strategy_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("strategy", DDP_NAME, ST_VERSION_STRING, st_strategy_plugin_v1),
    .validate = ddp_validate,
    .init = ddp_init,
    .finalize = ddp_finalize,
    .pre_forward = ddp_pre_forward,
    .post_forward = ddp_post_forward,
    .pre_backward = ddp_pre_backward,
    .post_backward = ddp_post_backward,
    .grad_norm_sq = ddp_grad_norm_sq,
    .step = ddp_step,
    .skip_step = ddp_skip_step,
    .state_save = ddp_state_save,
    .state_load = ddp_state_load,
    .memory_plan = ddp_memory_plan,
};
