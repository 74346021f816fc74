/* strategy.h — st_strategy_plugin_v1: where parameters, gradients and optimizer state live.
 *
 * A strategy receives a parameter SET (units of parameter descriptors and their static order),
 * not a model, and owns all of its storage. Around every unit the trainer opens an access window:
 *
 *   forward:  pre_forward(u) -> model reads params -> post_forward(u)
 *   backward: pre_backward(u) -> model reads params, accumulates grads -> post_backward(u, last)
 *   then:     grad_norm_sq() -> step(args) (or skip_step() on fp16 overflow)
 *
 * Windows hold full-size tensors in the model's compute dtype, in descriptor order, valid until
 * the matching post_* call. Recompute under activation checkpointing is just another pre_forward.
 * Units are visited in the static order given at init (forward) and its reverse (backward), so a
 * strategy may prefetch u+1 / u-1 while the model computes u. */
#ifndef STRATA_STRATEGY_H
#define STRATA_STRATEGY_H

#include "model.h"

/* Kinds of state a strategy saves per parameter. Slices are addressed in the GLOBAL row-major
 * flattening of the parameter (offset, count), so any strategy can read what any other wrote, at
 * any world size. */
typedef enum st_state_kind {
  ST_STATE_PARAM = 0, /* the parameter value (fp32 master when there is one) */
  ST_STATE_OPTIM_0 = 1, /* Adam exp_avg / SGD momentum */
  ST_STATE_OPTIM_1 = 2, /* Adam exp_avg_sq */
  ST_STATE_KIND_COUNT
} st_state_kind;

typedef struct st_state_writer {
  void *self;
  /* host_data holds `count` elements of `dt` for elements [offset, offset+count) of `name` */
  st_result (*write)(struct st_state_writer *w, const st_param_desc *param, st_state_kind kind, int64_t offset,
                     int64_t count, st_dtype dt, const void *host_data, st_error *err);
} st_state_writer;

typedef struct st_state_reader {
  void *self;
  /* ST_ERR_NOT_FOUND when the source has no such state (e.g. initial weights carry no optimizer
   * state): the strategy then zero-fills optimizer state; for ST_STATE_PARAM it is an error. */
  st_result (*read)(struct st_state_reader *r, const st_param_desc *param, st_state_kind kind, int64_t offset,
                    int64_t count, st_dtype dt, void *host_dst, st_error *err);
} st_state_reader;

typedef struct st_strategy_setup {
  uint32_t struct_size;
  const st_model_desc *model;   /* units and parameter descriptors (only the set this strategy owns:
                                   expert_parallel hands its inner strategy a subset) */
  const int *unit_order;        /* static forward order, model->n_units entries */
  st_dtype param_dtype;         /* dtype of the windows (the model's compute dtype) */
  st_dtype master_dtype;        /* ST_F32 master weights when param_dtype is a half type */
  st_dtype grad_dtype;          /* dtype of gradient windows */
  st_dtype reduce_dtype;        /* dtype used for gradient collectives */
  int grad_accum_steps;
  st_comm *group;               /* the data-parallel group this strategy reduces over */
} st_strategy_setup;

typedef struct st_step_args {
  int64_t step;      /* 1-based optimizer step */
  double lr;
  double grad_scale; /* multiply every gradient by this before the update: clip / (loss scale x the
                      * global batch's loss items / world size), see model.h's loss */
} st_step_args;

#define ST_MEMORY_CATEGORIES 6
typedef struct st_memory_plan {
  /* predicted bytes per category on the device and on the host */
  const char *category[ST_MEMORY_CATEGORIES]; /* "params", "grads", "master", "optim", "buffers", "comm" */
  uint64_t device_bytes[ST_MEMORY_CATEGORIES];
  uint64_t host_bytes[ST_MEMORY_CATEGORIES];
} st_memory_plan;

typedef struct st_strategy_plugin_v1 {
  st_plugin_header header;

  /* Check the "strategy" block (and, for ZeRO, the DeepSpeed zero_optimization block it is given). */
  st_result (*validate)(st_cfg *strategy_cfg, const st_cfg_api *cfg, st_error *err);
  /* Allocates storage for every parameter; values arrive with state_load before the first step. */
  st_result (*init)(const st_host *host, st_cfg *strategy_cfg, const st_strategy_setup *setup, void **ctx,
                    st_error *err);
  void (*finalize)(void *ctx);

  st_result (*pre_forward)(void *ctx, int unit, const st_tensor **params, st_error *err);
  st_result (*post_forward)(void *ctx, int unit, st_error *err);
  /* grads[i].data == NULL for parameters that are not trainable. Gradient buffers are zero at the
   * first micro-step after a step; the model accumulates into them. */
  st_result (*pre_backward)(void *ctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err);
  st_result (*post_backward)(void *ctx, int unit, bool last_micro_step, st_error *err);

  /* Global squared L2 norm of the reduced gradients as accumulated (loss-scaled, not yet divided
   * by the item count), summed over the group;
   * Inf/NaN when any gradient overflowed. Waits for outstanding reductions. */
  st_result (*grad_norm_sq)(void *ctx, double *out, st_error *err);
  /* Apply the optimizer to every owned shard through host->optim_update, write back working
   * copies, zero gradients. */
  st_result (*step)(void *ctx, const st_step_args *args, st_error *err);
  /* Drop the accumulated gradients without updating (fp16 overflow). */
  st_result (*skip_step)(void *ctx, st_error *err);

  st_result (*state_save)(void *ctx, st_state_writer *writer, st_error *err);
  st_result (*state_load)(void *ctx, st_state_reader *reader, st_error *err);

  /* Optional (may be NULL). */
  st_result (*memory_plan)(void *ctx, st_memory_plan *out);
} st_strategy_plugin_v1;

#define ST_STRATEGY_PLUGIN_SYMBOL_V1 "strata_strategy_plugin_v1"

#endif /* STRATA_STRATEGY_H */
