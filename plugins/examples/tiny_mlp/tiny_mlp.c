/* tiny_mlp.c — an out-of-tree model plugin: a one-hidden-layer SiLU MLP regressing a fixed
 * random teacher, in two units.
 *
 *   unit 0 "hidden":  a = x W1^T + b1,  h = silu(a)      x [B, in]  -> h [B, H]   saves a [B, H]
 *   unit 1 "head":    y = h W2^T + b2                     h [B, H]   -> y [B, out]
 *   loss:             mean squared error against the sample's target t
 *
 * Samples are {"x": [in], "y": [out]}; synth_sample draws x ~ N(0, 1) and y = tanh(T x) for a
 * teacher T fixed by the model's shape, so `data.synthetic` trains it with no files at all.
 * Every number is computed by the host's ops table, so nothing here is device-specific; the
 * plugin links nothing but libc. */
#include <math.h>
#include <stdlib.h>

#include <strata/model.h>

#define TM_NAME "tiny_mlp"

typedef struct tm_model {
  const st_host *host;
  int64_t in, hidden, out;
  st_param_desc params[4];
  st_unit_desc units[2];
  st_model_desc desc;
} tm_model;

typedef struct tm_batch {
  int64_t rows;
  float *x, *y; /* device copies of the inputs and targets */
} tm_batch;

static const char *const tm_keys[] = {"name", "plugin", "in_features", "hidden", "out_features", NULL};

/* ---- configuration and description ------------------------------------------------------------ */

static st_result read_dims(st_cfg *cfg, const st_cfg_api *api, int64_t dims[3], st_error *err) {
  static const char *const keys[3] = {"in_features", "hidden", "out_features"};
  static const int64_t dflt[3] = {8, 32, 2};
  for (int i = 0; i < 3; i++) {
    ST_CHECK(api->get_int(cfg, keys[i], dflt[i], &dims[i], err));
    if (dims[i] < 1 || dims[i] > 4096)
      return st_error_set(err, ST_ERR_CONFIG, "model", "model.%s: must be in [1, 4096], found %lld", keys[i],
                          (long long)dims[i]);
  }
  return ST_OK;
}

static st_result tm_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  ST_CHECK(api->check_keys(cfg, tm_keys, err));
  int64_t dims[3];
  return read_dims(cfg, api, dims, err);
}

static st_param_desc param(const char *name, int64_t rows, int64_t cols, uint32_t flags) {
  st_param_desc p = {.name = name, .ndim = cols ? 2 : 1, .shape = {rows, cols}, .flags = ST_PARAM_TRAINABLE | flags};
  return p;
}

static st_result tm_init(const st_host *host, st_cfg *cfg, void **ctx, st_error *err) {
  *ctx = NULL;
  int64_t dims[3];
  ST_CHECK(read_dims(cfg, host->cfg, dims, err));
  tm_model *m = calloc(1, sizeof *m);
  if (!m) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model", "tiny_mlp: cannot allocate the model");
  m->host = host;
  m->in = dims[0], m->hidden = dims[1], m->out = dims[2];
  /* names as a PyTorch nn.Sequential(Linear, SiLU, Linear) state dict spells them */
  m->params[0] = param("0.weight", m->hidden, m->in, 0);
  m->params[1] = param("0.bias", m->hidden, 0, ST_PARAM_NO_DECAY);
  m->params[2] = param("2.weight", m->out, m->hidden, 0);
  m->params[3] = param("2.bias", m->out, 0, ST_PARAM_NO_DECAY);
  m->units[0] = (st_unit_desc){.name = "hidden", .n_params = 2, .params = &m->params[0]};
  m->units[1] = (st_unit_desc){.name = "head", .n_params = 2, .params = &m->params[2]};
  m->desc = (st_model_desc){.n_units = 2, .units = m->units, .compute_dtype = ST_F32, .hidden_size = m->hidden,
                            .n_params_total = m->hidden * (m->in + 1) + m->out * (m->hidden + 1)};
  *ctx = m;
  return ST_OK;
}

static void tm_finalize(void *ctx) { free(ctx); }

static const st_model_desc *tm_describe(void *ctx) { return &((tm_model *)ctx)->desc; }

/* weights ~ N(0, 1/fan_in), biases 0. Element i of a parameter depends only on (seed, unit,
 * param, i): the counter-based RNG makes every sharding of it initialize identically. */
static st_result tm_init_param(void *ctx, uint64_t seed, int unit, int p, int64_t offset, int64_t count, st_dtype dt,
                               void *dst, st_error *err) {
  tm_model *m = ctx;
  const st_param_desc *d = &m->units[unit].params[p];
  if (d->ndim == 1) {
    if (dt != ST_F32 && dt != ST_F64) return st_error_set(err, ST_ERR_UNSUPPORTED, d->name, "tiny_mlp: dtype %s", st_dtype_name(dt));
    memset(dst, 0, (size_t)count * st_dtype_size(dt));
    return ST_OK;
  }
  m->host->rng->normal(seed, (uint64_t)(unit * 2 + p), (uint64_t)offset, count, 0.0, 1.0 / sqrt((double)d->shape[1]),
                       dt, dst);
  return ST_OK;
}

/* ---- batches ----------------------------------------------------------------------------------- */

static const st_tensor *find(const st_sample *s, const char *name) {
  for (int i = 0; i < s->n_tensors; i++)
    if (!strcmp(s->names[i], name)) return &s->tensors[i];
  return NULL;
}

static void tm_batch_release(void *ctx, void *vb) {
  tm_model *m = ctx;
  tm_batch *b = vb;
  if (!b) return;
  m->host->free(m->host, m->host->device, b->x);
  m->host->free(m->host, m->host->device, b->y);
  free(b);
}

static st_result tm_batch_prepare(void *ctx, const st_batch *batch, void **out, st_error *err) {
  tm_model *m = ctx;
  const st_host *h = m->host;
  tm_batch *b = calloc(1, sizeof *b);
  if (!b) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model", "tiny_mlp: batch");
  b->rows = batch->n_samples;
  b->x = h->alloc(h, h->device, sizeof(float) * (size_t)(b->rows * m->in), "activations");
  b->y = h->alloc(h, h->device, sizeof(float) * (size_t)(b->rows * m->out), "activations");
  if (!b->x || !b->y) {
    tm_batch_release(m, b);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model", "tiny_mlp: batch inputs");
  }
  for (int i = 0; i < batch->n_samples; i++) {
    const st_sample *s = &batch->samples[i];
    const st_tensor *x = find(s, "x"), *y = find(s, "y");
    const char *bad = !x || !y ? "lacks tensor 'x' or 'y'"
                      : st_tensor_numel(x) != m->in ? "has an 'x' whose size is not model.in_features"
                      : st_tensor_numel(y) != m->out ? "has a 'y' whose size is not model.out_features"
                      : !st_dtype_is_float(x->dtype) || !st_dtype_is_float(y->dtype) ? "holds non-float tensors"
                                                                                      : NULL;
    st_result r = bad ? ST_ERR_FORMAT : ST_OK;
    if (!bad) r = h->ops->cast(h->ops, x->dtype, x->data, ST_F32, b->x + i * m->in, m->in);
    if (r == ST_OK) r = h->ops->cast(h->ops, y->dtype, y->data, ST_F32, b->y + i * m->out, m->out);
    if (r != ST_OK) {
      tm_batch_release(m, b);
      return st_error_set(err, r, s->id, "tiny_mlp: sample %s", bad ? bad : "cannot be copied to the device");
    }
  }
  *out = b;
  return ST_OK;
}

/* boundary 0 is unit 0's input (read from the batch, so no carry), 1 the hidden activations,
 * 2 the prediction the loss reads */
static st_result tm_carry_layout(void *ctx, void *vb, int boundary, st_carry_layout *out, st_error *err) {
  tm_model *m = ctx;
  tm_batch *b = vb;
  (void)err;
  memset(out, 0, sizeof *out);
  if (boundary == 0) return ST_OK;
  out->n = 1;
  out->names[0] = boundary == 1 ? "h" : "pred";
  out->t[0] = st_tensor_make(NULL, ST_F32, m->host->device, 2, (int64_t[]){b->rows, boundary == 1 ? m->hidden : m->out});
  return ST_OK;
}

static st_result tm_unit_memory(void *ctx, void *vb, int unit, size_t *saved, size_t *work, st_error *err) {
  tm_model *m = ctx;
  tm_batch *b = vb;
  (void)err;
  *saved = unit == 0 ? sizeof(float) * (size_t)(b->rows * m->hidden) : 0; /* the pre-activation a */
  *work = sizeof(float) * (size_t)(b->rows * m->hidden);                   /* a (validation) or da */
  return ST_OK;
}

/* ---- forward and backward ------------------------------------------------------------------------ */

/* y[rows, n] = x[rows, k] W[n, k]^T + bias */
static st_result linear(const st_ops *o, const void *x, const void *w, const void *bias, void *y, int64_t rows,
                        int64_t n, int64_t k) {
  st_gemm_desc g = {.dtype = ST_F32, .c_dtype = ST_F32, .trans_b = true, .m = rows, .n = n, .k = k, .alpha = 1.0,
                    .a = x, .lda = k, .b = w, .ldb = k, .c = y, .ldc = n, .batch = 1, .bias = bias};
  return o->gemm(o, &g);
}

/* dx = dy W (WRITTEN, when dx); dW += dy^T x; dbias += column sums of dy (ACCUMULATED) */
static st_result linear_backward(const st_ops *o, const void *x, const void *w, const void *dy, void *dx, void *dw,
                                 void *dbias, int64_t rows, int64_t n, int64_t k) {
  if (dx) {
    st_gemm_desc g = {.dtype = ST_F32, .c_dtype = ST_F32, .m = rows, .n = k, .k = n, .alpha = 1.0, .a = dy,
                      .lda = n, .b = w, .ldb = k, .c = dx, .ldc = k, .batch = 1};
    ST_CHECK(o->gemm(o, &g));
  }
  if (dw) {
    st_gemm_desc g = {.dtype = ST_F32, .c_dtype = ST_F32, .trans_a = true, .m = n, .n = k, .k = rows, .alpha = 1.0,
                      .beta = 1.0, .a = dy, .lda = n, .b = x, .ldb = k, .c = dw, .ldc = k, .batch = 1};
    ST_CHECK(o->gemm(o, &g));
  }
  if (dbias) ST_CHECK(o->bias_backward(o, ST_F32, dy, rows, n, dbias));
  return ST_OK;
}

static st_result tm_unit_forward(void *ctx, void *vb, int unit, const st_tensor *params, const st_tensor *cin,
                                 st_tensor *cout, void *saved, void *work, st_error *err) {
  tm_model *m = ctx;
  tm_batch *b = vb;
  const st_ops *o = m->host->ops;
  st_result r;
  if (unit == 0) {
    float *a = saved ? saved : work; /* saved is NULL when no backward follows */
    r = linear(o, b->x, params[0].data, params[1].data, a, b->rows, m->hidden, m->in);
    if (r == ST_OK) r = o->silu_forward(o, ST_F32, a, cout[0].data, b->rows * m->hidden);
  } else {
    r = linear(o, cin[0].data, params[0].data, params[1].data, cout[0].data, b->rows, m->out, m->hidden);
  }
  if (r != ST_OK) return st_error_set(err, r, m->units[unit].name, "tiny_mlp: kernel failed: %s", st_result_string(r));
  return ST_OK;
}

static st_result tm_unit_backward(void *ctx, void *vb, int unit, const st_tensor *params, st_tensor *grads,
                                  const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                  void *work, st_error *err) {
  tm_model *m = ctx;
  tm_batch *b = vb;
  const st_ops *o = m->host->ops;
  st_result r;
  if (unit == 0) { /* da = silu'(a) * dh; the input is data, so there is no dx */
    r = o->silu_backward(o, ST_F32, saved, dout[0].data, work, b->rows * m->hidden);
    if (r == ST_OK)
      r = linear_backward(o, b->x, params[0].data, work, NULL, grads[0].data, grads[1].data, b->rows, m->hidden, m->in);
  } else {
    r = linear_backward(o, cin[0].data, params[0].data, dout[0].data, din[0].data, grads[0].data, grads[1].data,
                        b->rows, m->out, m->hidden);
  }
  if (r != ST_OK) return st_error_set(err, r, m->units[unit].name, "tiny_mlp: kernel failed: %s", st_result_string(r));
  return ST_OK;
}

static st_result tm_loss(void *ctx, void *vb, const st_tensor *final, double grad_scale, st_tensor *dfinal,
                         st_loss *out, st_error *err) {
  tm_model *m = ctx;
  tm_batch *b = vb;
  const st_ops *o = m->host->ops;
  double loss = 0.0;
  st_result r = o->mse_forward(o, ST_F32, final[0].data, b->y, NULL, b->rows, m->out, &loss);
  if (r == ST_OK && dfinal)
    r = o->mse_backward(o, ST_F32, final[0].data, b->y, NULL, b->rows, m->out, grad_scale * (double)b->rows, dfinal[0].data);
  if (r != ST_OK) return st_error_set(err, r, "model", "tiny_mlp: loss kernel failed: %s", st_result_string(r));
  *out = (st_loss){.loss = loss, .n_items = b->rows};
  return ST_OK;
}

static double tm_forward_flops(void *ctx, void *vb) {
  tm_model *m = ctx;
  (void)vb;
  return 2.0 * (double)(m->in * m->hidden + m->hidden * m->out);
}

/* x ~ N(0, 1) from the run's seed; y = tanh(T x) with T fixed by the model's shape */
static st_result tm_synth_sample(void *ctx, uint64_t seed, int64_t index, st_tensor_sink *sink, st_error *err) {
  tm_model *m = ctx;
  const st_rng_api *rng = m->host->rng;
  float *x = malloc(sizeof(float) * (size_t)m->in), *y = malloc(sizeof(float) * (size_t)m->out);
  float *t = malloc(sizeof(float) * (size_t)(m->in * m->out));
  st_result r = ST_OK;
  if (!x || !y || !t) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model", "tiny_mlp: synthetic sample");
  if (r == ST_OK) {
    rng->normal(seed, 1, (uint64_t)(index * m->in), m->in, 0.0, 1.0, ST_F32, x);
    rng->normal(0x7139, 2, 0, m->in * m->out, 0.0, 1.0 / sqrt((double)m->in), ST_F32, t);
    for (int64_t j = 0; j < m->out; j++) {
      double acc = 0.0;
      for (int64_t i = 0; i < m->in; i++) acc += (double)t[j * m->in + i] * x[i];
      y[j] = (float)tanh(acc);
    }
    st_device cpu = {ST_DEVICE_CPU, 0};
    st_tensor tx = st_tensor_make(x, ST_F32, cpu, 1, (int64_t[]){m->in});
    st_tensor ty = st_tensor_make(y, ST_F32, cpu, 1, (int64_t[]){m->out});
    r = sink->put(sink, "x", &tx, err);
    if (r == ST_OK) r = sink->put(sink, "y", &ty, err);
  }
  free(x);
  free(y);
  free(t);
  return r;
}

ST_EXPORT const st_model_plugin_v1 strata_model_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("model", TM_NAME, "1.0.0", st_model_plugin_v1),
    .validate = tm_validate,
    .init = tm_init,
    .finalize = tm_finalize,
    .describe = tm_describe,
    .init_param = tm_init_param,
    .batch_prepare = tm_batch_prepare,
    .batch_release = tm_batch_release,
    .carry_layout = tm_carry_layout,
    .unit_memory = tm_unit_memory,
    .unit_forward = tm_unit_forward,
    .unit_backward = tm_unit_backward,
    .loss = tm_loss,
    .forward_flops = tm_forward_flops,
    .synth_sample = tm_synth_sample,
    /* export_weights left NULL: `strata export` writes every parameter under its name */
};
