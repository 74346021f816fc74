/* optim.c — clipping and fp16 dynamic loss scaling, as DeepSpeed's DynamicLossScaler does it:
 * on overflow the step is skipped and, once the hysteresis budget is spent, the scale halves
 * (never below min_loss_scale); after `window` clean iterations since the last overflow it doubles
 * and the hysteresis budget refills (every clean step with consecutive_hysteresis). */
#include <math.h>

#include "optim.h"

double st_clip_coefficient(double grad_norm, double max_norm) {
  if (max_norm <= 0.0 || !isfinite(grad_norm)) return 1.0;
  double c = max_norm / (grad_norm + 1e-6);
  return c < 1.0 ? c : 1.0;
}

void st_loss_scaler_init(st_loss_scaler *ls, const st_precision_settings *p) {
  *ls = (st_loss_scaler){.scale = 1.0, .min_scale = 1.0, .window = 1000, .hysteresis = 2, .hysteresis_left = 2,
                         .last_overflow_iteration = -1};
  if (p->dtype != ST_F16) return;
  if (p->static_loss_scale > 0.0) {
    ls->scale = p->static_loss_scale;
    return;
  }
  ls->dynamic = true;
  ls->scale = ldexp(1.0, p->initial_scale_power);
  ls->min_scale = p->min_loss_scale > 0.0 ? p->min_loss_scale : 1.0;
  ls->window = p->loss_scale_window > 0 ? p->loss_scale_window : 1000;
  ls->hysteresis = ls->hysteresis_left = p->hysteresis > 0 ? p->hysteresis : 1;
  ls->consecutive_hysteresis = p->consecutive_hysteresis;
}

bool st_loss_scaler_update(st_loss_scaler *ls, bool overflow) {
  if (!ls->dynamic) {
    ls->iteration++;
    return overflow;
  }
  if (overflow) {
    if (ls->hysteresis == 1 || ls->hysteresis_left == 1) {
      ls->scale = fmax(ls->scale / 2.0, ls->min_scale);
    } else {
      ls->hysteresis_left--;
    }
    ls->last_overflow_iteration = ls->iteration;
  } else {
    if (ls->consecutive_hysteresis) ls->hysteresis_left = ls->hysteresis;
    if ((ls->iteration - ls->last_overflow_iteration) % ls->window == 0) {
      if (!ls->consecutive_hysteresis) ls->hysteresis_left = ls->hysteresis;
      ls->scale *= 2.0;
    }
  }
  ls->iteration++;
  return overflow;
}
