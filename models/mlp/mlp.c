/* mlp.c — a residual MLP regression model: the smallest complete model plugin, used by the
 * trainer's tests and as an example of the model ABI.
 *
 *   embed:   h = x W_in^T + b_in                       x [B, in]   -> h [B, H]
 *   block.i: h = h + W2 gelu(W1 LN(h) + b1) + b2        h [B, H]    -> h [B, H]
 *   final:   y = h W_out^T + b_out                      h [B, H]    -> y [B, out]
 *   loss:    mean squared error against the sample's target
 *
 * Samples are {"x": [in], "y": [out]}; synthetic ones follow a fixed random teacher
 * y = tanh(T x) so a run can watch the loss fall. */
#include <math.h>
#include <stdlib.h>

#include <strata/model.h>

#define MAX_LAYERS 64

typedef struct mlp {
  const st_host *host;
  int64_t in, hidden, ffn, out, layers;
  st_dtype dt;
  st_model_desc desc;
  st_unit_desc units[MAX_LAYERS + 2];
  st_param_desc params[2 * 2 + 4 * MAX_LAYERS];
  char names[4 * MAX_LAYERS + 4][48];
  char unit_names[MAX_LAYERS + 2][24];
} mlp;

typedef struct mlp_batch {
  int64_t b;
  void *x, *y; /* device copies of the inputs and targets */
} mlp_batch;

static const char *const mlp_keys[] = {"name", "plugin", "in_features", "hidden", "ffn", "out_features", "layers",
                                       "dtype", NULL};

static st_result mlp_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  ST_CHECK(api->check_keys(cfg, mlp_keys, err));
  int64_t layers;
  ST_CHECK(api->get_int(cfg, "layers", 2, &layers, err));
  if (layers < 0 || layers > MAX_LAYERS)
    return st_error_set(err, ST_ERR_CONFIG, "model.layers", "must be in [0, %d], got %lld", MAX_LAYERS, (long long)layers);
  return ST_OK;
}

static void add_param(mlp *m, int *np, const char *name, int64_t rows, int64_t cols, uint32_t flags) {
  st_param_desc *p = &m->params[*np];
  snprintf(m->names[*np], sizeof m->names[*np], "%s", name);
  p->name = m->names[*np];
  p->ndim = cols ? 2 : 1;
  p->shape[0] = rows;
  p->shape[1] = cols;
  p->flags = flags | ST_PARAM_TRAINABLE;
  (*np)++;
}

static st_result mlp_init(const st_host *host, st_cfg *cfg, void **ctx, st_error *err) {
  const st_cfg_api *api = host->cfg;
  mlp *m = calloc(1, sizeof *m);
  if (!m) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model", "mlp");
  m->host = host;
  const char *dtype;
  st_result r = api->get_int(cfg, "in_features", 8, &m->in, err);
  if (r == ST_OK) r = api->get_int(cfg, "hidden", 32, &m->hidden, err);
  if (r == ST_OK) r = api->get_int(cfg, "ffn", 64, &m->ffn, err);
  if (r == ST_OK) r = api->get_int(cfg, "out_features", 4, &m->out, err);
  if (r == ST_OK) r = api->get_int(cfg, "layers", 2, &m->layers, err);
  if (r == ST_OK) r = api->get_enum(cfg, "dtype", (const char *const[]){"fp32", "fp64", NULL}, "fp32", &dtype, err);
  if (r != ST_OK) {
    free(m);
    return r;
  }
  m->dt = strcmp(dtype, "fp64") ? ST_F32 : ST_F64;
  int np = 0, nu = 0;
  m->units[nu] = (st_unit_desc){.name = "embed", .params = &m->params[np], .n_params = 2};
  add_param(m, &np, "in_proj.weight", m->hidden, m->in, 0);
  add_param(m, &np, "in_proj.bias", m->hidden, 0, ST_PARAM_NO_DECAY);
  nu++;
  for (int64_t l = 0; l < m->layers; l++, nu++) {
    snprintf(m->unit_names[nu], sizeof m->unit_names[nu], "block.%lld", (long long)l);
    m->units[nu] = (st_unit_desc){.name = m->unit_names[nu], .params = &m->params[np], .n_params = 4};
    char n[48];
    snprintf(n, sizeof n, "blocks.%lld.fc1.weight", (long long)l);
    add_param(m, &np, n, m->ffn, m->hidden, 0);
    snprintf(n, sizeof n, "blocks.%lld.fc1.bias", (long long)l);
    add_param(m, &np, n, m->ffn, 0, ST_PARAM_NO_DECAY);
    snprintf(n, sizeof n, "blocks.%lld.fc2.weight", (long long)l);
    add_param(m, &np, n, m->hidden, m->ffn, 0);
    snprintf(n, sizeof n, "blocks.%lld.fc2.bias", (long long)l);
    add_param(m, &np, n, m->hidden, 0, ST_PARAM_NO_DECAY);
  }
  m->units[nu] = (st_unit_desc){.name = "final", .params = &m->params[np], .n_params = 2};
  add_param(m, &np, "out_proj.weight", m->out, m->hidden, 0);
  add_param(m, &np, "out_proj.bias", m->out, 0, ST_PARAM_NO_DECAY);
  nu++;
  int64_t total = 0;
  for (int i = 0; i < np; i++) total += m->params[i].shape[0] * (m->params[i].ndim == 2 ? m->params[i].shape[1] : 1);
  m->desc = (st_model_desc){.n_units = nu, .units = m->units, .compute_dtype = m->dt, .hidden_size = m->hidden,
                            .n_params_total = total};
  *ctx = m;
  return ST_OK;
}

static void mlp_finalize(void *ctx) { free(ctx); }

static const st_model_desc *mlp_describe(void *ctx) { return &((mlp *)ctx)->desc; }

static st_result mlp_init_param(void *ctx, uint64_t seed, int unit, int param, int64_t offset, int64_t count,
                                st_dtype dt, void *dst, st_error *err) {
  mlp *m = ctx;
  const st_param_desc *p = &m->units[unit].params[param];
  if (p->ndim == 1) { /* biases start at zero */
    for (int64_t i = 0; i < count; i++) {
      if (dt == ST_F64) ((double *)dst)[i] = 0.0;
      else ((float *)dst)[i] = 0.0f;
    }
    return ST_OK;
  }
  double std = 1.0 / sqrt((double)p->shape[1]);
  if (unit > 0 && unit < m->desc.n_units - 1 && param == 2) std *= 0.5; /* keep the residual stream tame */
  m->host->rng->normal(seed, (uint64_t)(unit * 16 + param), (uint64_t)offset, count, 0.0, std, dt, dst);
  (void)err;
  return ST_OK;
}

/* ---- batches -------------------------------------------------------------------------------- */

static const st_tensor *find(const st_sample *s, const char *name) {
  for (int i = 0; i < s->n_tensors; i++)
    if (!strcmp(s->names[i], name)) return &s->tensors[i];
  return NULL;
}

static void mlp_batch_release(void *ctx, void *vb) {
  mlp *m = ctx;
  mlp_batch *b = vb;
  if (!b) return;
  m->host->free(m->host, m->host->device, b->x);
  m->host->free(m->host, m->host->device, b->y);
  free(b);
}

static st_result mlp_batch_prepare(void *ctx, const st_batch *batch, void **out, st_error *err) {
  mlp *m = ctx;
  const st_host *h = m->host;
  size_t es = st_dtype_size(m->dt);
  mlp_batch *b = calloc(1, sizeof *b);
  if (!b) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.mlp", "batch");
  b->b = batch->n_samples;
  b->x = h->alloc(h, h->device, (size_t)(b->b * m->in) * es, "activations");
  b->y = h->alloc(h, h->device, (size_t)(b->b * m->out) * es, "activations");
  if (!b->x || !b->y) {
    mlp_batch_release(m, b);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.mlp", "batch inputs");
  }
  for (int i = 0; i < batch->n_samples; i++) {
    const st_sample *s = &batch->samples[i];
    const st_tensor *x = find(s, "x"), *y = find(s, "y");
    const char *bad = !x ? "has no tensor 'x'" : !y ? "has no tensor 'y'" : NULL;
    if (!bad && st_tensor_numel(x) != m->in) bad = "has an 'x' of the wrong size (model.in_features)";
    if (!bad && st_tensor_numel(y) != m->out) bad = "has a 'y' of the wrong size (model.out_features)";
    if (!bad && (!st_dtype_is_float(x->dtype) || !st_dtype_is_float(y->dtype))) bad = "holds non-float tensors";
    if (bad) {
      mlp_batch_release(m, b);
      return st_error_set(err, ST_ERR_FORMAT, s->id, "sample %s", bad);
    }
    st_result r = h->ops->cast(h->ops, x->dtype, x->data, m->dt, (char *)b->x + (size_t)(i * m->in) * es, m->in);
    if (r == ST_OK) r = h->ops->cast(h->ops, y->dtype, y->data, m->dt, (char *)b->y + (size_t)(i * m->out) * es, m->out);
    if (r != ST_OK) {
      mlp_batch_release(m, b);
      return st_error_set(err, r, s->id, "cannot copy the sample to the device");
    }
  }
  *out = b;
  return ST_OK;
}

static st_result mlp_carry_layout(void *ctx, void *vb, int boundary, st_carry_layout *out, st_error *err) {
  mlp *m = ctx;
  mlp_batch *b = vb;
  (void)err;
  memset(out, 0, sizeof *out);
  if (boundary == 0) return ST_OK; /* embed reads the batch */
  out->n = 1;
  int64_t cols = boundary == m->desc.n_units ? m->out : m->hidden;
  out->names[0] = boundary == m->desc.n_units ? "pred" : "h";
  out->t[0] = st_tensor_make(NULL, m->dt, m->host->device, 2, (int64_t[]){b->b, cols});
  return ST_OK;
}

/* saved set of a block: mean [B], rstd [B], ln [B,H], a [B,F], g [B,F]; workspace 2 [B,F] + 2 [B,H] */
static st_result mlp_unit_memory(void *ctx, void *vb, int unit, size_t *saved, size_t *work, st_error *err) {
  mlp *m = ctx;
  mlp_batch *b = vb;
  (void)err;
  size_t es = st_dtype_size(m->dt);
  bool block = unit > 0 && unit < m->desc.n_units - 1;
  *saved = block ? (size_t)(2 * b->b + b->b * m->hidden + 2 * b->b * m->ffn) * es : 0;
  *work = (size_t)(2 * b->b * m->ffn + 2 * b->b * m->hidden) * es;
  return ST_OK;
}

/* y[rows, n] = x[rows, k] W[n, k]^T + bias */
static st_result linear(const st_ops *o, st_dtype dt, const void *x, const void *w, const void *bias, void *y,
                        int64_t rows, int64_t n, int64_t k) {
  st_gemm_desc g = {.dtype = dt, .c_dtype = dt, .trans_b = true, .m = rows, .n = n, .k = k, .alpha = 1.0, .beta = 0.0,
                    .a = x, .lda = k, .b = w, .ldb = k, .c = y, .ldc = n, .batch = 1, .bias = bias};
  return o->gemm(o, &g);
}

/* dx = dy W (written, when dx); dW += dy^T x; dbias += sum_rows dy */
static st_result linear_backward(const st_ops *o, st_dtype dt, const void *x, const void *w, const void *dy, void *dx,
                                 void *dw, void *dbias, int64_t rows, int64_t n, int64_t k) {
  if (dx) {
    st_gemm_desc g = {.dtype = dt, .c_dtype = dt, .m = rows, .n = k, .k = n, .alpha = 1.0, .beta = 0.0, .a = dy,
                      .lda = n, .b = w, .ldb = k, .c = dx, .ldc = k, .batch = 1};
    ST_CHECK(o->gemm(o, &g));
  }
  if (dw) {
    st_gemm_desc g = {.dtype = dt, .c_dtype = dt, .trans_a = true, .m = n, .n = k, .k = rows, .alpha = 1.0,
                      .beta = 1.0, .a = dy, .lda = n, .b = x, .ldb = k, .c = dw, .ldc = k, .batch = 1};
    ST_CHECK(o->gemm(o, &g));
  }
  if (dbias) ST_CHECK(o->bias_backward(o, dt, dy, rows, n, dbias));
  return ST_OK;
}

typedef struct block_saved {
  char *mean, *rstd, *ln, *a, *g;
} block_saved;

static block_saved carve(mlp *m, int64_t B, void *saved) {
  size_t es = st_dtype_size(m->dt);
  char *p = saved;
  block_saved s;
  s.mean = p, p += (size_t)B * es;
  s.rstd = p, p += (size_t)B * es;
  s.ln = p, p += (size_t)(B * m->hidden) * es;
  s.a = p, p += (size_t)(B * m->ffn) * es;
  s.g = p;
  return s;
}

static st_result mlp_unit_forward(void *ctx, void *vb, int unit, const st_tensor *params, const st_tensor *cin,
                                  st_tensor *cout, void *saved, void *work, st_error *err) {
  mlp *m = ctx;
  mlp_batch *b = vb;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->dt;
  size_t es = st_dtype_size(dt);
  int64_t B = b->b, H = m->hidden, F = m->ffn;
  st_result r;
  if (unit == 0) {
    r = linear(o, dt, b->x, params[0].data, params[1].data, cout[0].data, B, H, m->in);
  } else if (unit == m->desc.n_units - 1) {
    r = linear(o, dt, cin[0].data, params[0].data, params[1].data, cout[0].data, B, m->out, H);
  } else {
    /* without a saved buffer (validation) the intermediates go to the workspace */
    block_saved s = carve(m, B, saved ? saved : work);
    r = o->layernorm_forward(o, dt, cin[0].data, s.ln, s.mean, s.rstd, B, H, 1e-5);
    if (r == ST_OK) r = linear(o, dt, s.ln, params[0].data, params[1].data, s.a, B, F, H);
    if (r == ST_OK) r = o->gelu_forward(o, dt, ST_GELU_TANH, s.a, s.g, B * F);
    if (r == ST_OK) r = linear(o, dt, s.g, params[2].data, params[3].data, cout[0].data, B, H, F);
    if (r == ST_OK) r = o->gated_residual_forward(o, dt, cout[0].data, NULL, 0, cin[0].data, 1, B, H);
    (void)es;
  }
  if (r != ST_OK) return st_error_set(err, r, m->desc.units[unit].name, "kernel failed: %s", st_result_string(r));
  return ST_OK;
}

static st_result mlp_unit_backward(void *ctx, void *vb, int unit, const st_tensor *params, st_tensor *grads,
                                   const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                   void *work, st_error *err) {
  mlp *m = ctx;
  mlp_batch *b = vb;
  const st_ops *o = m->host->ops;
  st_dtype dt = m->dt;
  size_t es = st_dtype_size(dt);
  int64_t B = b->b, H = m->hidden, F = m->ffn;
  st_result r;
  if (unit == 0) {
    r = linear_backward(o, dt, b->x, params[0].data, dout[0].data, NULL, grads[0].data, grads[1].data, B, H, m->in);
  } else if (unit == m->desc.n_units - 1) {
    r = linear_backward(o, dt, cin[0].data, params[0].data, dout[0].data, din[0].data, grads[0].data, grads[1].data, B,
                        m->out, H);
  } else {
    block_saved s = carve(m, B, (void *)saved);
    char *dg = work, *da = dg + (size_t)(B * F) * es, *dln = da + (size_t)(B * F) * es, *dx = dln + (size_t)(B * H) * es;
    /* out = h + fc2(gelu(fc1(LN(h)))): the residual passes dout straight through */
    r = linear_backward(o, dt, s.g, params[2].data, dout[0].data, dg, grads[2].data, grads[3].data, B, H, F);
    if (r == ST_OK) r = o->gelu_backward(o, dt, ST_GELU_TANH, s.a, dg, da, B * F);
    if (r == ST_OK) r = linear_backward(o, dt, s.ln, params[0].data, da, dln, grads[0].data, grads[1].data, B, F, H);
    if (r == ST_OK) r = o->layernorm_backward(o, dt, dln, cin[0].data, s.mean, s.rstd, dx, B, H);
    if (r == ST_OK) r = o->add(o, dt, dx, dout[0].data, din[0].data, B * H);
  }
  if (r != ST_OK) return st_error_set(err, r, m->desc.units[unit].name, "kernel failed: %s", st_result_string(r));
  return ST_OK;
}

static st_result mlp_loss(void *ctx, void *vb, const st_tensor *final, double grad_scale, st_tensor *dfinal,
                          st_loss *out, st_error *err) {
  mlp *m = ctx;
  mlp_batch *b = vb;
  const st_ops *o = m->host->ops;
  double loss = 0.0;
  st_result r = o->mse_forward(o, m->dt, final[0].data, b->y, NULL, b->b, m->out, &loss);
  if (r == ST_OK && dfinal) r = o->mse_backward(o, m->dt, final[0].data, b->y, NULL, b->b, m->out, grad_scale * (double)b->b, dfinal[0].data);
  if (r != ST_OK) return st_error_set(err, r, "model.mlp", "loss kernel failed: %s", st_result_string(r));
  *out = (st_loss){.loss = loss, .n_items = b->b};
  return ST_OK;
}

static double mlp_forward_flops(void *ctx, void *vb) {
  mlp *m = ctx;
  (void)vb;
  return 2.0 * (double)(m->in * m->hidden + m->layers * 2 * m->hidden * m->ffn + m->hidden * m->out);
}

/* x ~ N(0, 1); y = tanh(T x) with a teacher T fixed for the model's shape (not the run's seed) */
static st_result mlp_synth_sample(void *ctx, uint64_t seed, int64_t index, st_tensor_sink *sink, st_error *err) {
  mlp *m = ctx;
  const st_rng_api *rng = m->host->rng;
  float *x = malloc(sizeof(float) * (size_t)m->in), *y = malloc(sizeof(float) * (size_t)m->out);
  double *t = malloc(sizeof(double) * (size_t)(m->in * m->out));
  st_result r = ST_OK;
  if (!x || !y || !t) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model.mlp", "synthetic sample");
  if (r == ST_OK) {
    rng->normal(seed, 1, (uint64_t)(index * m->in), m->in, 0.0, 1.0, ST_F32, x);
    rng->normal(0x7eac4e7, 2, 0, m->in * m->out, 0.0, 1.0 / sqrt((double)m->in), ST_F64, t);
    for (int64_t j = 0; j < m->out; j++) {
      double acc = 0.0;
      for (int64_t i = 0; i < m->in; i++) acc += t[j * m->in + i] * x[i];
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
    .header = ST_PLUGIN_HEADER("model", "mlp", ST_VERSION_STRING, st_model_plugin_v1),
    .validate = mlp_validate,
    .init = mlp_init,
    .finalize = mlp_finalize,
    .describe = mlp_describe,
    .init_param = mlp_init_param,
    .batch_prepare = mlp_batch_prepare,
    .batch_release = mlp_batch_release,
    .carry_layout = mlp_carry_layout,
    .unit_memory = mlp_unit_memory,
    .unit_forward = mlp_unit_forward,
    .unit_backward = mlp_unit_backward,
    .loss = mlp_loss,
    .forward_flops = mlp_forward_flops,
    .synth_sample = mlp_synth_sample,
};
