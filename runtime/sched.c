/* sched.c — DeepSpeed's WarmupLR, WarmupDecayLR and WarmupCosineLR (reference deepspeed_fsdp.md §1.5). */
#include <math.h>

#include "optim.h"

static double warmup_gamma(const st_scheduler_settings *s, int64_t t) {
  int64_t n = s->warmup_num_steps < 2 ? 2 : s->warmup_num_steps; /* DeepSpeed forces N >= 2 */
  if (t >= n) return 1.0;
  if (s->warmup_linear) return (double)t / (double)n;
  return log((double)t + 1.0) / log((double)n);
}

double st_sched_lr(const st_scheduler_settings *s, double base_lr, int64_t t) {
  if (t < 0) t = 0;
  int64_t n = s->warmup_num_steps < 2 ? 2 : s->warmup_num_steps;
  switch (s->type) {
  case ST_SCHED_CONSTANT:
    return base_lr;
  case ST_SCHED_WARMUP_LR:
    return s->warmup_min_lr + (s->warmup_max_lr - s->warmup_min_lr) * warmup_gamma(s, t);
  case ST_SCHED_WARMUP_DECAY_LR: {
    if (t < n) return s->warmup_min_lr + (s->warmup_max_lr - s->warmup_min_lr) * warmup_gamma(s, t);
    int64_t span = s->total_num_steps - n;
    double g = (double)(s->total_num_steps - t) / (double)(span > 1 ? span : 1);
    return s->warmup_max_lr * (g > 0.0 ? g : 0.0);
  }
  case ST_SCHED_WARMUP_COSINE_LR: {
    double ratio;
    if (t < n) {
      ratio = s->warmup_min_ratio + (1.0 - s->warmup_min_ratio) * warmup_gamma(s, t);
    } else {
      int64_t span = s->total_num_steps - n;
      double progress = span > 0 ? (double)(t - n) / (double)span : 1.0;
      if (progress > 1.0) progress = 1.0;
      ratio = s->cos_min_ratio + (1.0 - s->cos_min_ratio) * 0.5 * (1.0 + cos(M_PI * progress));
    }
    return base_lr * ratio;
  }
  }
  return base_lr;
}
