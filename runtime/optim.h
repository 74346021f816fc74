/* optim.h (internal) — what the trainer does around the optimizer kernel: the learning-rate
 * schedule, global-norm clipping and fp16 dynamic loss scaling (DeepSpeed semantics). The update
 * math itself is the ops table's optim_update, reached through host->optim_update. */
#ifndef STRATA_RUNTIME_OPTIM_H
#define STRATA_RUNTIME_OPTIM_H

#include "config.h"

/* Learning rate for the optimizer step that follows `t` completed steps (t = 0 for the first).
 * WarmupLR: min + (max - min) * g, g = ln(t + 1) / ln(N) (log) or t / N (linear) while t < N, else 1.
 * WarmupDecayLR: warmup as above, then linear to 0 at total_num_steps.
 * WarmupCosineLR: ratios of base_lr: warmup from warmup_min_ratio to 1, then cosine to cos_min_ratio. */
double st_sched_lr(const st_scheduler_settings *s, double base_lr, int64_t t);

/* torch.nn.utils.clip_grad_norm_: coefficient min(1, max_norm / (norm + 1e-6)); max_norm <= 0: 1. */
double st_clip_coefficient(double grad_norm, double max_norm);

typedef struct st_loss_scaler {
  double scale;
  double min_scale;
  int64_t window;
  int hysteresis, hysteresis_left;
  bool consecutive_hysteresis;
  bool dynamic;
  int64_t iteration, last_overflow_iteration;
} st_loss_scaler;

/* bf16 / fp32: scale 1, never changes. fp16: static loss_scale, or dynamic from 2^initial_scale_power. */
void st_loss_scaler_init(st_loss_scaler *ls, const st_precision_settings *p);
/* Record one optimizer boundary; returns true when the step must be skipped (overflow). */
bool st_loss_scaler_update(st_loss_scaler *ls, bool overflow);

#endif
