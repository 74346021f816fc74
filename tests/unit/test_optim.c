/* test_optim.c — LR schedules, clipping and the fp16 loss scaler against DeepSpeed's documented
 * semantics (reference deepspeed_fsdp.md §1.5–1.6), re-derived here step by step. */
#include <math.h>

#include "optim.h"
#include "st_test.h"

static void test_warmup_lr(void) {
  st_scheduler_settings s = {.type = ST_SCHED_WARMUP_LR, .warmup_min_lr = 1e-5, .warmup_max_lr = 1e-3,
                             .warmup_num_steps = 100};
  /* log warmup: gamma = ln(t+1)/ln(N) */
  CHECK_CLOSE(st_sched_lr(&s, 0.5, 0), 1e-5, 0, 1e-15);
  CHECK_CLOSE(st_sched_lr(&s, 0.5, 9), 1e-5 + (1e-3 - 1e-5) * log(10.0) / log(100.0), 1e-12, 0);
  CHECK_CLOSE(st_sched_lr(&s, 0.5, 100), 1e-3, 1e-12, 0);
  CHECK_CLOSE(st_sched_lr(&s, 0.5, 5000), 1e-3, 1e-12, 0);
  s.warmup_linear = true;
  CHECK_CLOSE(st_sched_lr(&s, 0.5, 25), 1e-5 + (1e-3 - 1e-5) * 0.25, 1e-12, 0);
  s.warmup_num_steps = 1; /* DeepSpeed forces N >= 2 */
  CHECK_CLOSE(st_sched_lr(&s, 0.5, 1), 1e-5 + (1e-3 - 1e-5) * 0.5, 1e-12, 0);
}

static void test_warmup_decay(void) {
  st_scheduler_settings s = {.type = ST_SCHED_WARMUP_DECAY_LR, .warmup_min_lr = 0, .warmup_max_lr = 2e-4,
                             .warmup_num_steps = 10, .warmup_linear = true, .total_num_steps = 110};
  CHECK_CLOSE(st_sched_lr(&s, 1.0, 5), 1e-4, 1e-12, 0);
  CHECK_CLOSE(st_sched_lr(&s, 1.0, 10), 2e-4, 1e-12, 0);             /* (110-10)/(110-10) */
  CHECK_CLOSE(st_sched_lr(&s, 1.0, 60), 2e-4 * 50.0 / 100.0, 1e-12, 0); /* halfway down */
  CHECK_CLOSE(st_sched_lr(&s, 1.0, 110), 0.0, 0, 1e-18);
  CHECK_CLOSE(st_sched_lr(&s, 1.0, 500), 0.0, 0, 1e-18); /* clamped, never negative */
}

static void test_warmup_cosine(void) {
  st_scheduler_settings s = {.type = ST_SCHED_WARMUP_COSINE_LR, .warmup_min_ratio = 0.0, .warmup_num_steps = 10,
                             .warmup_linear = true, .total_num_steps = 110, .cos_min_ratio = 0.1};
  double base = 3e-4;
  CHECK_CLOSE(st_sched_lr(&s, base, 0), 0.0, 0, 1e-18);
  CHECK_CLOSE(st_sched_lr(&s, base, 10), base, 1e-12, 0);
  CHECK_CLOSE(st_sched_lr(&s, base, 60), base * (0.1 + 0.9 * 0.5), 1e-12, 0); /* cos(pi/2) = 0 */
  CHECK_CLOSE(st_sched_lr(&s, base, 110), base * 0.1, 1e-12, 0);
  CHECK_CLOSE(st_sched_lr(&s, base, 200), base * 0.1, 1e-12, 0);
  st_scheduler_settings c = {.type = ST_SCHED_CONSTANT};
  CHECK_CLOSE(st_sched_lr(&c, base, 77), base, 0, 0);
}

static void test_clip(void) {
  CHECK_CLOSE(st_clip_coefficient(10.0, 1.0), 1.0 / (10.0 + 1e-6), 1e-15, 0); /* torch: max/(norm+eps) */
  CHECK_CLOSE(st_clip_coefficient(0.5, 1.0), 1.0, 0, 0);
  CHECK_CLOSE(st_clip_coefficient(10.0, 0.0), 1.0, 0, 0); /* 0 disables clipping */
}

/* DeepSpeed DynamicLossScaler with hysteresis 2, window 3, from 2^4 */
static void test_loss_scaler(void) {
  st_precision_settings p = {.dtype = ST_F16, .initial_scale_power = 4, .loss_scale_window = 3, .hysteresis = 2,
                             .min_loss_scale = 2.0};
  st_loss_scaler ls;
  st_loss_scaler_init(&ls, &p);
  CHECK(ls.dynamic);
  CHECK_CLOSE(ls.scale, 16.0, 0, 0);
  /* iteration 0 clean: (0 - (-1)) % 3 != 0 -> unchanged */
  CHECK(!st_loss_scaler_update(&ls, false));
  CHECK_CLOSE(ls.scale, 16.0, 0, 0);
  /* iteration 1 overflow: hysteresis 2 -> 1, scale kept, step skipped */
  CHECK(st_loss_scaler_update(&ls, true));
  CHECK_CLOSE(ls.scale, 16.0, 0, 0);
  /* iteration 2 overflow: budget spent -> halve */
  CHECK(st_loss_scaler_update(&ls, true));
  CHECK_CLOSE(ls.scale, 8.0, 0, 0);
  /* iterations 3, 4 clean; iteration 5: (5 - 2) % 3 == 0 -> double, hysteresis refilled */
  st_loss_scaler_update(&ls, false);
  st_loss_scaler_update(&ls, false);
  CHECK_CLOSE(ls.scale, 8.0, 0, 0);
  st_loss_scaler_update(&ls, false);
  CHECK_CLOSE(ls.scale, 16.0, 0, 0);
  CHECK(ls.hysteresis_left == 2);
  /* floor at min_loss_scale */
  for (int i = 0; i < 20; i++) st_loss_scaler_update(&ls, true);
  CHECK_CLOSE(ls.scale, 2.0, 0, 0);
  /* static scale and bf16: never changes, overflow still skips */
  st_precision_settings st = {.dtype = ST_F16, .static_loss_scale = 128.0};
  st_loss_scaler_init(&ls, &st);
  CHECK(!ls.dynamic);
  CHECK(st_loss_scaler_update(&ls, true));
  CHECK_CLOSE(ls.scale, 128.0, 0, 0);
  st_precision_settings bf = {.dtype = ST_BF16};
  st_loss_scaler_init(&ls, &bf);
  CHECK_CLOSE(ls.scale, 1.0, 0, 0);
}

int main(void) {
  test_warmup_lr();
  test_warmup_decay();
  test_warmup_cosine();
  test_clip();
  test_loss_scaler();
  return st_test_finish("test_optim");
}
