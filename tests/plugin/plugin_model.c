/* plugin_model.c — the model plugins of the loader test: one good minimal plugin and variants that
 * are broken in exactly one way, selected by -D flags from meson.build (PLUGIN_NAME is the <name>
 * of libstrata-model-<name>.so):
 *   (none)            good: every method set, header from the SDK's values (mirrors models/mlp)
 *   BAD_ABI_NEWER     abi_version ST_ABI_VERSION + 1 under the v1 symbol
 *   BAD_ABI_ZERO      abi_version 0 under the v1 symbol (a header not made by ST_PLUGIN_HEADER)
 *   BAD_STRUCT_SMALL  struct_size ends before unit_backward (required methods cut off)
 *   SHORT_OPTIONAL    struct_size ends before synth_sample (only optional methods cut off: loads),
 *                     while the object itself still has synth_sample set past struct_size
 *   BAD_NULL_METHODS  unit_backward and loss are NULL
 *   BAD_NAME          the header's name differs from the file's
 *   BAD_KIND          the header's kind says "strategy"
 *   BAD_CUDA          the fingerprint says cuda=99
 *   BAD_NO_SYMBOL     the struct is exported as strata_model_plugin (no _v1)
 *   BAD_V2_ONLY       only strata_model_plugin_v2 is exported (a newer SDK's plugin)
 *   BAD_UNDEFINED     references a function nothing defines: dlopen(RTLD_NOW) fails */
#include <strata/model.h>

#ifndef PLUGIN_NAME
#error "PLUGIN_NAME must be defined"
#endif

#define HEADER_NAME PLUGIN_NAME
#define HEADER_KIND "model"
#define ABI ST_ABI_VERSION
#define STRUCT_SIZE ((uint32_t)sizeof(st_model_plugin_v1))
#define FINGERPRINT ST_BUILD_FINGERPRINT
#define SYMBOL strata_model_plugin_v1

#if defined(BAD_ABI_NEWER)
#undef ABI
#define ABI (ST_ABI_VERSION + 1)
#elif defined(BAD_ABI_ZERO)
#undef ABI
#define ABI 0
#elif defined(BAD_STRUCT_SMALL)
#undef STRUCT_SIZE
#define STRUCT_SIZE ((uint32_t)offsetof(st_model_plugin_v1, unit_backward))
#elif defined(SHORT_OPTIONAL)
#undef STRUCT_SIZE
#define STRUCT_SIZE ((uint32_t)offsetof(st_model_plugin_v1, synth_sample))
#elif defined(BAD_NAME)
#undef HEADER_NAME
#define HEADER_NAME "someone_else"
#elif defined(BAD_KIND)
#undef HEADER_KIND
#define HEADER_KIND "strategy"
#elif defined(BAD_CUDA)
#undef FINGERPRINT
#define FINGERPRINT "abi=" ST_STR(ST_ABI_VERSION) ";cuda=99;cc=test"
#elif defined(BAD_NO_SYMBOL)
#undef SYMBOL
#define SYMBOL strata_model_plugin
#elif defined(BAD_V2_ONLY)
#undef SYMBOL
#define SYMBOL strata_model_plugin_v2
#undef ABI
#define ABI 2
#endif

typedef struct toy {
  int initialized;
  st_param_desc params[2];
  st_unit_desc units[2];
  st_model_desc desc;
} toy;

static toy the_toy; /* the plugin's one context: a test plugin needs no allocator */

#ifdef BAD_UNDEFINED
/* defined nowhere; default visibility, or the hidden-by-default build would not even link */
__attribute__((visibility("default"))) void st_test_no_such_function(void);
#endif

static st_result toy_validate(st_cfg *model_cfg, const st_cfg_api *cfg, st_error *err) {
#ifdef BAD_UNDEFINED
  st_test_no_such_function();
#endif
  return ST_OK;
}

static st_result toy_init(const st_host *host, st_cfg *model_cfg, void **ctx, st_error *err) {
  toy *t = &the_toy;
  t->params[0] = (st_param_desc){.name = "w", .ndim = 2, .shape = {3, 4}, .flags = ST_PARAM_TRAINABLE};
  t->params[1] = (st_param_desc){.name = "b", .ndim = 1, .shape = {3}, .flags = ST_PARAM_TRAINABLE | ST_PARAM_NO_DECAY};
  t->units[0] = (st_unit_desc){.name = "embed", .n_params = 1, .params = &t->params[0]};
  t->units[1] = (st_unit_desc){.name = "final", .n_params = 1, .params = &t->params[1]};
  t->desc = (st_model_desc){.n_units = 2, .units = t->units, .compute_dtype = ST_F32, .hidden_size = 4,
                            .n_params_total = 15};
  t->initialized = 1;
  *ctx = t;
  return ST_OK;
}

static void toy_finalize(void *ctx) { ((toy *)ctx)->initialized = 0; }

static const st_model_desc *toy_describe(void *ctx) { return &((toy *)ctx)->desc; }

/* value = seed + 1000 * unit + 100 * param + element index, so a caller can tell it ran */
static st_result toy_init_param(void *ctx, uint64_t seed, int unit, int param, int64_t offset, int64_t count,
                                st_dtype dtype, void *host_dst, st_error *err) {
  if (dtype != ST_F32) return st_error_set(err, ST_ERR_UNSUPPORTED, "", "toy: f32 only");
  float *d = host_dst;
  for (int64_t i = 0; i < count; i++) d[i] = (float)(seed + 1000u * (unsigned)unit + 100u * (unsigned)param) + (float)(offset + i);
  return ST_OK;
}

static st_result toy_batch_prepare(void *ctx, const st_batch *batch, void **bctx, st_error *err) {
  *bctx = NULL;
  return ST_OK;
}
static void toy_batch_release(void *ctx, void *bctx) {}
static st_result toy_carry_layout(void *ctx, void *bctx, int boundary, st_carry_layout *out, st_error *err) {
  out->n = 0;
  return ST_OK;
}
static st_result toy_unit_memory(void *ctx, void *bctx, int unit, size_t *saved_bytes, size_t *workspace_bytes,
                                 st_error *err) {
  *saved_bytes = 0;
  *workspace_bytes = 0;
  return ST_OK;
}
static st_result toy_unit_forward(void *ctx, void *bctx, int unit, const st_tensor *params, const st_tensor *carry_in,
                                  st_tensor *carry_out, void *saved, void *workspace, st_error *err) {
  return ST_OK;
}
#if !defined(BAD_NULL_METHODS)
static st_result toy_unit_backward(void *ctx, void *bctx, int unit, const st_tensor *params, st_tensor *grads,
                                   const st_tensor *carry_in, const void *saved, const st_tensor *dcarry_out,
                                   st_tensor *dcarry_in, void *workspace, st_error *err) {
  return ST_OK;
}
static st_result toy_loss(void *ctx, void *bctx, const st_tensor *final_carry, double grad_scale, st_tensor *dfinal,
                          st_loss *out, st_error *err) {
  out->loss = 0.5;
  return ST_OK;
}
#endif
static double toy_forward_flops(void *ctx, void *bctx) { return 42.0; }
static st_result toy_synth_sample(void *ctx, uint64_t seed, int64_t index, st_tensor_sink *sink, st_error *err) {
  return ST_OK;
}

ST_EXPORT const st_model_plugin_v1 SYMBOL = {
    .header = {.abi_version = ABI, .struct_size = STRUCT_SIZE, .kind = HEADER_KIND, .name = HEADER_NAME,
               .version = "1.2.3", .fingerprint = FINGERPRINT},
    .validate = toy_validate,
    .init = toy_init,
    .finalize = toy_finalize,
    .describe = toy_describe,
    .init_param = toy_init_param,
    .batch_prepare = toy_batch_prepare,
    .batch_release = toy_batch_release,
    .carry_layout = toy_carry_layout,
    .unit_memory = toy_unit_memory,
    .unit_forward = toy_unit_forward,
#if !defined(BAD_NULL_METHODS)
    .unit_backward = toy_unit_backward,
    .loss = toy_loss,
#endif
    .forward_flops = toy_forward_flops,
    .synth_sample = toy_synth_sample,
};
