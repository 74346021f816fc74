/* plugin_faulty.c — model plugins that load fine and then misbehave the way third-party code does,
 * for test_faulty_plugins.py. One variant per -D flag (PLUGIN_NAME is the <name> of the file):
 *   FAULT_INIT_ERROR   init returns ST_ERR_CONFIG with a key path and a message (no crash)
 *   FAULT_INIT_SEGV    init writes through a NULL pointer
 *   FAULT_LEAK         finalize forgets to free the context init allocated (4242 bytes)
 *   FAULT_DOUBLE_FREE  finalize frees the context twice
 * Otherwise a minimal model: one unit, one parameter, enough for `strata validate` (validate ->
 * init -> describe -> finalize). The compute methods are never reached by the tests. */
#include <stdlib.h>

#include <strata/model.h>

#ifndef PLUGIN_NAME
#error "PLUGIN_NAME must be defined"
#endif

#define LEAK_BYTES 4242

typedef struct faulty {
  st_param_desc param;
  st_unit_desc unit;
  st_model_desc desc;
  char pad[LEAK_BYTES];
} faulty;

static st_result f_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) { return ST_OK; }

static st_result f_init(const st_host *host, st_cfg *cfg, void **ctx, st_error *err) {
  *ctx = NULL;
#if defined(FAULT_INIT_ERROR)
  return st_error_set(err, ST_ERR_CONFIG, "model.width", "model.width: must be even, found 7");
#elif defined(FAULT_INIT_SEGV)
  volatile int *nowhere = NULL;
  *nowhere = 42;
#endif
  faulty *f = malloc(sizeof *f); /* LEAK_BYTES + the tables: one block the leak report can name */
  if (!f) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "model", PLUGIN_NAME ": no memory");
  f->param = (st_param_desc){.name = "w", .ndim = 1, .shape = {4}, .flags = ST_PARAM_TRAINABLE};
  f->unit = (st_unit_desc){.name = "only", .n_params = 1, .params = &f->param};
  f->desc = (st_model_desc){.n_units = 1, .units = &f->unit, .compute_dtype = ST_F32, .hidden_size = 4,
                            .n_params_total = 4};
  *ctx = f;
  return ST_OK;
}

static void f_finalize(void *ctx) {
#if defined(FAULT_LEAK)
  (void)ctx; /* forgot free(ctx) */
#elif defined(FAULT_DOUBLE_FREE)
  void *volatile again = ctx; /* through a volatile copy: gcc would refuse the double free at compile time */
  free(ctx);
  free(again);
#else
  free(ctx);
#endif
}

static const st_model_desc *f_describe(void *ctx) { return &((faulty *)ctx)->desc; }
static st_result f_init_param(void *ctx, uint64_t seed, int unit, int param, int64_t offset, int64_t count,
                              st_dtype dtype, void *host_dst, st_error *err) {
  return st_error_set(err, ST_ERR_UNSUPPORTED, "model", PLUGIN_NAME ": not a real model");
}
static st_result f_batch_prepare(void *ctx, const st_batch *batch, void **bctx, st_error *err) {
  return st_error_set(err, ST_ERR_UNSUPPORTED, "model", PLUGIN_NAME ": not a real model");
}
static void f_batch_release(void *ctx, void *bctx) {}
static st_result f_carry_layout(void *ctx, void *bctx, int boundary, st_carry_layout *out, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result f_unit_memory(void *ctx, void *bctx, int unit, size_t *saved, size_t *work, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result f_unit_forward(void *ctx, void *bctx, int unit, const st_tensor *params, const st_tensor *cin,
                                st_tensor *cout, void *saved, void *work, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result f_unit_backward(void *ctx, void *bctx, int unit, const st_tensor *params, st_tensor *grads,
                                 const st_tensor *cin, const void *saved, const st_tensor *dout, st_tensor *din,
                                 void *work, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result f_loss(void *ctx, void *bctx, const st_tensor *final, double grad_scale, st_tensor *dfinal,
                        st_loss *out, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static double f_forward_flops(void *ctx, void *bctx) { return 0.0; }

ST_EXPORT const st_model_plugin_v1 strata_model_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("model", PLUGIN_NAME, "0.0.1", st_model_plugin_v1),
    .validate = f_validate,
    .init = f_init,
    .finalize = f_finalize,
    .describe = f_describe,
    .init_param = f_init_param,
    .batch_prepare = f_batch_prepare,
    .batch_release = f_batch_release,
    .carry_layout = f_carry_layout,
    .unit_memory = f_unit_memory,
    .unit_forward = f_unit_forward,
    .unit_backward = f_unit_backward,
    .loss = f_loss,
    .forward_flops = f_forward_flops,
};
