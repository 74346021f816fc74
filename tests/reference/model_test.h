/* model_test.h — what the model reference tests share: the plugin, the CPU ops table and host,
 * the fixture, fixture access, a model instance with host-side parameter and gradient windows, and
 * small sinks/sources for the exporters. Each test sets PL, OPS, HOST and FX in main. */
#ifndef STRATA_TESTS_MODEL_TEST_H
#define STRATA_TESTS_MODEL_TEST_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <strata/model.h>

#include "config.h"
#include "host_impl.h"
#include "safetensors.h"
#include "st_test.h"

static const st_model_plugin_v1 *PL;
static const st_ops *OPS;
static st_host *HOST;
static st_safetensors *FX; /* the (first) fixture */
static const st_device CPU = {ST_DEVICE_CPU, 0};

/* ---- fixture access ---- */
static inline const st_st_entry *fx(const char *name) {
  const st_st_entry *e = st_safetensors_find(FX, name);
  if (!e) {
    fprintf(stderr, "fixture has no tensor %s\n", name);
    exit(1);
  }
  return e;
}

static inline double fx_at(const st_st_entry *e, int64_t i) {
  const void *p = st_safetensors_data(FX, e);
  switch (e->dtype) {
  case ST_F64: return ((const double *)p)[i];
  case ST_F32: return ((const float *)p)[i];
  case ST_I64: return (double)((const int64_t *)p)[i];
  case ST_I32: return ((const int32_t *)p)[i];
  case ST_U8: return ((const uint8_t *)p)[i];
  default: return NAN;
  }
}

static inline int64_t numel(const int64_t *shape, int ndim) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}

static inline double get(st_dtype dt, const void *p, int64_t i) {
  return dt == ST_F64 ? ((const double *)p)[i] : (double)((const float *)p)[i];
}
static inline void set(st_dtype dt, void *p, int64_t i, double v) {
  if (dt == ST_F64) ((double *)p)[i] = v;
  else ((float *)p)[i] = (float)v;
}

/* ---- a model instance with host-side parameter and gradient windows ---- */
typedef struct qrun {
  st_config *cfg;
  void *ctx;
  const st_model_desc *d;
  st_dtype dt;
  st_tensor **P, **G;
} qrun;

static inline st_result qrun_open(qrun *r, const char *json, st_error *err) {
  memset(r, 0, sizeof *r);
  ST_CHECK(st_config_load_string(json, "test", &r->cfg, err));
  st_cfg *node = st_config_node(r->cfg, "model");
  ST_CHECK(PL->validate(node, st_config_api(), err));
  ST_CHECK(PL->init(HOST, node, &r->ctx, err));
  r->d = PL->describe(r->ctx);
  r->dt = r->d->compute_dtype;
  r->P = calloc((size_t)r->d->n_units, sizeof *r->P);
  r->G = calloc((size_t)r->d->n_units, sizeof *r->G);
  for (int u = 0; u < r->d->n_units; u++) {
    const st_unit_desc *ud = &r->d->units[u];
    r->P[u] = calloc((size_t)ud->n_params, sizeof(st_tensor));
    r->G[u] = calloc((size_t)ud->n_params, sizeof(st_tensor));
    for (int k = 0; k < ud->n_params; k++) {
      const st_param_desc *p = &ud->params[k];
      r->P[u][k] = st_tensor_make(calloc((size_t)numel(p->shape, p->ndim), st_dtype_size(r->dt)), r->dt, CPU, p->ndim,
                                  p->shape);
      r->G[u][k] = r->P[u][k];
      r->G[u][k].data = (p->flags & ST_PARAM_TRAINABLE)
                            ? calloc((size_t)numel(p->shape, p->ndim), st_dtype_size(r->dt)) : NULL;
    }
  }
  return ST_OK;
}

/* the micro-batch's loss, and with dfinal its gradient as the mean's: the model's gradient is of the
 * sum over its loss items (model.h), so the second call scales it by 1 / n_items */
static inline st_result qrun_loss(qrun *r, void *bctx, const st_tensor *final, st_tensor *dfinal, st_loss *l,
                                  st_error *err) {
  st_result res = PL->loss(r->ctx, bctx, final, 0.0, NULL, l, err);
  if (res == ST_OK && dfinal)
    res = PL->loss(r->ctx, bctx, final, l->n_items ? 1.0 / (double)l->n_items : 0.0, dfinal, l, err);
  return res;
}

static inline void qrun_close(qrun *r) {
  if (r->d)
    for (int u = 0; u < r->d->n_units; u++) {
      for (int k = 0; k < r->d->units[u].n_params; k++) {
        free(r->P[u][k].data);
        free(r->G[u][k].data);
      }
      free(r->P[u]);
      free(r->G[u]);
    }
  free(r->P);
  free(r->G);
  if (r->ctx) PL->finalize(r->ctx);
  st_config_free(r->cfg);
}

static inline bool find_param(const qrun *r, const char *name, int *u, int *k) {
  for (int uu = 0; uu < r->d->n_units; uu++)
    for (int kk = 0; kk < r->d->units[uu].n_params; kk++)
      if (!strcmp(r->d->units[uu].params[kk].name, name)) {
        *u = uu;
        *k = kk;
        return true;
      }
  return false;
}

static inline void zero_grads(qrun *r) {
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++)
      if (r->G[u][k].data) memset(r->G[u][k].data, 0, st_tensor_nbytes(&r->G[u][k]));
}

/* max |a - b| / max |b| over a tensor (b from the fixture) */
static inline double tensor_rel_err(st_dtype dt, const void *a, const st_st_entry *b, int64_t n, double *ref_max) {
  double num = 0.0, den = 0.0;
  for (int64_t i = 0; i < n; i++) {
    double ref = fx_at(b, i);
    num = fmax(num, fabs(get(dt, a, i) - ref));
    den = fmax(den, fabs(ref));
  }
  if (ref_max) *ref_max = den;
  return den > 0 ? num / den : num;
}

/* a model config that validate or init must refuse, with `needle` in "where: message" */
static inline void expect_config_error(const char *json, const char *needle) {
  st_error err_ = {0}, *err = &err_;
  st_config *c = NULL;
  CHECK_OK(st_config_load_string(json, "test", &c, err), err);
  if (!c) return;
  st_result r = PL->validate(st_config_node(c, "model"), st_config_api(), err);
  void *ctx = NULL;
  if (r == ST_OK) r = PL->init(HOST, st_config_node(c, "model"), &ctx, err);
  CHECK_MSG(r != ST_OK, "accepted: %s", json);
  char both[ST_ERROR_WHERE_MAX + ST_ERROR_MESSAGE_MAX + 4];
  snprintf(both, sizeof both, "%s: %s", err->where, err->message);
  const char *text = both;
  CHECK_CONTAINS(text, needle);
  if (ctx) PL->finalize(ctx);
  st_config_free(c);
}

/* a tensor sink that keeps copies of up to 8 tensors (synthetic samples) */
typedef struct cap_sink {
  st_tensor_sink pub;
  int n;
  char names[8][64];
  st_tensor t[8];
} cap_sink;

static inline st_result cap_put(st_tensor_sink *s, const char *name, const st_tensor *t, st_error *err) {
  (void)err;
  cap_sink *c = s->self;
  snprintf(c->names[c->n], sizeof c->names[c->n], "%s", name);
  c->t[c->n] = *t;
  c->t[c->n].data = malloc(st_tensor_nbytes(t) + 1);
  memcpy(c->t[c->n].data, t->data, st_tensor_nbytes(t));
  c->n++;
  return ST_OK;
}

/* a parameter source reading a model instance's windows (exporters) */
typedef struct run_source {
  st_param_source pub;
  qrun *r;
} run_source;

static inline st_result run_read(st_param_source *src, int unit, int param, st_dtype dt, void *dst, st_error *err) {
  (void)err;
  qrun *r = ((run_source *)src->self)->r;
  for (int64_t i = 0; i < st_tensor_numel(&r->P[unit][param]); i++)
    set(dt, dst, i, get(r->dt, r->P[unit][param].data, i));
  return ST_OK;
}

#endif /* STRATA_TESTS_MODEL_TEST_H */
