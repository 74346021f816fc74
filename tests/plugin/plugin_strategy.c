/* plugin_strategy.c — a strategy plugin file named "local", the name of the core's built-in
 * strategy: the loader test checks that the built-in wins when both exist, and that this file is
 * what loads when no built-ins are given. Its version string tells the two apart. */
#include <strata/strategy.h>

static st_result s_validate(st_cfg *c, const st_cfg_api *cfg, st_error *err) { return ST_OK; }
static st_result s_init(const st_host *host, st_cfg *c, const st_strategy_setup *setup, void **ctx, st_error *err) {
  *ctx = NULL;
  return ST_OK;
}
static void s_finalize(void *ctx) {}
static st_result s_pre_forward(void *ctx, int unit, const st_tensor **params, st_error *err) { return ST_OK; }
static st_result s_post_forward(void *ctx, int unit, st_error *err) { return ST_OK; }
static st_result s_pre_backward(void *ctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err) {
  return ST_OK;
}
static st_result s_post_backward(void *ctx, int unit, bool last, st_error *err) { return ST_OK; }
static st_result s_grad_norm_sq(void *ctx, double *out, st_error *err) {
  *out = 7.0;
  return ST_OK;
}
static st_result s_step(void *ctx, const st_step_args *args, st_error *err) { return ST_OK; }
static st_result s_skip_step(void *ctx, st_error *err) { return ST_OK; }
static st_result s_state_save(void *ctx, st_state_writer *w, st_error *err) { return ST_OK; }
static st_result s_state_load(void *ctx, st_state_reader *r, st_error *err) { return ST_OK; }

ST_EXPORT const st_strategy_plugin_v1 strata_strategy_plugin_v1 = {
    .header = {.abi_version = ST_ABI_VERSION, .struct_size = (uint32_t)sizeof(st_strategy_plugin_v1),
               .kind = "strategy", .name = "local", .version = "test-file", .fingerprint = ST_BUILD_FINGERPRINT},
    .validate = s_validate,
    .init = s_init,
    .finalize = s_finalize,
    .pre_forward = s_pre_forward,
    .post_forward = s_post_forward,
    .pre_backward = s_pre_backward,
    .post_backward = s_post_backward,
    .grad_norm_sq = s_grad_norm_sq,
    .step = s_step,
    .skip_step = s_skip_step,
    .state_save = s_state_save,
    .state_load = s_state_load,
    /* memory_plan is optional: left NULL */
};
