/* model.h — st_model_plugin_v1: a model as parameter tables grouped into units, with hand-written
 * forward and backward passes over the ops table.
 *
 * The trainer drives one step as:
 *   batch_prepare(samples) -> for u in 0..U-1: unit_forward(u) -> loss -> for u in U-1..0:
 *   unit_backward(u) -> batch_release.
 * What flows between units is the model's "carry" (a few named tensors). carry_layout tells the
 * trainer their shapes for the current batch at each boundary b (b = 0 is the input of unit 0,
 * b = U the output of the last unit, which the loss reads). The trainer owns all activation memory:
 * carries, each unit's `saved` buffer (sized by unit_memory) and a shared workspace. Under
 * activation checkpointing it keeps only the carries and replays unit_forward before unit_backward. */
#ifndef STRATA_MODEL_H
#define STRATA_MODEL_H

#include "host.h"

/* parameter flags */
#define ST_PARAM_TRAINABLE (1u << 0) /* receives gradients and optimizer state */
#define ST_PARAM_NO_DECAY (1u << 1)  /* excluded from weight decay */
#define ST_PARAM_EXPERT (1u << 2)    /* a routed expert's weight: expert_parallel partitions dim 0 */
#define ST_PARAM_LORA (1u << 3)      /* a LoRA adapter tensor (saved in PEFT naming) */

typedef struct st_param_desc {
  const char *name; /* public name: diffusers / transformers state-dict key */
  int ndim;
  int64_t shape[ST_MAX_DIMS];
  uint32_t flags;
} st_param_desc;

typedef struct st_unit_desc {
  const char *name; /* "embed", "block.3", "final" */
  int n_params;
  const st_param_desc *params;
} st_unit_desc;

typedef struct st_model_desc {
  int n_units;
  const st_unit_desc *units; /* in forward execution order */
  st_dtype compute_dtype;    /* activations and the parameter windows the strategy hands in */
  int64_t hidden_size;       /* resolves DeepSpeed's hidden-size "auto" bucket sizes */
  int64_t n_params_total;    /* every parameter, trainable or not */
} st_model_desc;

#define ST_MAX_CARRY 8
typedef struct st_carry_layout {
  int n;
  const char *names[ST_MAX_CARRY];
  st_tensor t[ST_MAX_CARRY]; /* dtype, device and shape; data NULL */
} st_carry_layout;

/* One cached sample as the data loader read it: named host tensors (a safetensors file). */
typedef struct st_sample {
  const char *id; /* the metadata row / file the sample came from, for error messages */
  int n_tensors;
  const char *const *names;
  const st_tensor *tensors;
} st_sample;

typedef struct st_batch {
  int n_samples;
  const st_sample *samples;
  uint64_t seed;     /* per run: the model derives noise, sigma, dropout from (seed, first_sample + i) */
  int64_t step;      /* optimizer step (for logs and schedules inside the model) */
  bool training;     /* false: validation, no backward will follow */
  /* global ordinal of samples[0] in the data stream: keying per-sample randomness on it makes a run
   * independent of how the global batch is split into ranks and micro-batches */
  int64_t first_sample;
} st_batch;

typedef struct st_loss {
  double loss;          /* the value to log (mean over the micro-batch's items) */
  int64_t n_items;      /* loss items (tokens or samples) the loss averaged over; the core weights
                         * loss and metrics by it across micro-batches and ranks */
  int n_metrics;        /* extra per-model metrics, e.g. "moe/aux_loss", "moe/load_cv" */
  const char *metric_names[8];
  double metric_values[8];
} st_loss;

/* A sink for named host tensors (synthetic samples, exports) and small text files (config.json);
 * the core writes tensors to safetensors files. */
typedef struct st_tensor_sink {
  void *self;
  st_result (*put)(struct st_tensor_sink *sink, const char *name, const st_tensor *host_tensor, st_error *err);
  st_result (*put_file)(struct st_tensor_sink *sink, const char *filename, const void *bytes, size_t len,
                        st_error *err);
} st_tensor_sink;

/* Reads full parameter values (host memory, dtype dt) by unit and index, for export. */
typedef struct st_param_source {
  void *self;
  st_result (*read)(struct st_param_source *src, int unit, int param, st_dtype dt, void *host_dst, st_error *err);
} st_param_source;

typedef struct st_model_plugin_v1 {
  st_plugin_header header;

  /* Check the "model" block (name, preset, overrides, weights, lora, options). No allocation. */
  st_result (*validate)(st_cfg *model_cfg, const st_cfg_api *cfg, st_error *err);
  st_result (*init)(const st_host *host, st_cfg *model_cfg, void **ctx, st_error *err);
  void (*finalize)(void *ctx);

  /* Valid from init to finalize. */
  const st_model_desc *(*describe)(void *ctx);

  /* Initial values for elements [offset, offset + count) of param p of unit u, row-major, written
   * to host memory as dtype. Must depend only on (seed, u, p, element index) so that any sharding
   * initializes identically. */
  st_result (*init_param)(void *ctx, uint64_t seed, int unit, int param, int64_t offset, int64_t count,
                          st_dtype dtype, void *host_dst, st_error *err);

  /* Collate, pad, draw noise/sigma, build position tables; copies to the device. */
  st_result (*batch_prepare)(void *ctx, const st_batch *batch, void **bctx, st_error *err);
  void (*batch_release)(void *ctx, void *bctx);
  st_result (*carry_layout)(void *ctx, void *bctx, int boundary, st_carry_layout *out, st_error *err);
  /* bytes of unit u's saved activations (kept from forward to backward) and of the scratch it
   * needs during forward or backward */
  st_result (*unit_memory)(void *ctx, void *bctx, int unit, size_t *saved_bytes, size_t *workspace_bytes,
                           st_error *err);

  /* params: the strategy's full-size window, in descriptor order. carry_in is read-only.
   * `saved` may be NULL when the trainer only wants carry_out (validation). */
  st_result (*unit_forward)(void *ctx, void *bctx, int unit, const st_tensor *params, const st_tensor *carry_in,
                            st_tensor *carry_out, void *saved, void *workspace, st_error *err);
  /* grads[i].data is NULL for parameters without gradient; others are ACCUMULATED into.
   * dcarry_in is WRITTEN (for unit 0 it may be NULL: inputs are data). */
  st_result (*unit_backward)(void *ctx, void *bctx, int unit, const st_tensor *params, st_tensor *grads,
                             const st_tensor *carry_in, const void *saved, const st_tensor *dcarry_out,
                             st_tensor *dcarry_in, void *workspace, st_error *err);

  /* Reads the last carry and fills *out: the micro-batch's loss as a mean over its n_items loss
   * items (tokens whose label counts, samples), for logging. When dfinal != NULL, writes
   *   dfinal = grad_scale * d(SUM over this micro-batch's items of their loss)/d(final).
   * The core defines a step's loss as the mean over every loss item of the global batch (all
   * ranks, all micro-batches): it divides the accumulated gradients by that global item count
   * before clipping and the update (as Megatron's per-token loss does), so micro-batch and rank
   * boundaries do not weight tokens differently. grad_scale is the loss scale (1 without fp16).
   * A term computed from a whole global micro-batch (e.g. an MoE aux loss over statistics summed
   * over the ranks) enters with the weight of that global micro-batch's items. */
  st_result (*loss)(void *ctx, void *bctx, const st_tensor *final_carry, double grad_scale, st_tensor *dfinal,
                    st_loss *out, st_error *err);

  /* Forward FLOPs per sample of this batch (for MFU), matmuls counted 2 per multiply-add. */
  double (*forward_flops)(void *ctx, void *bctx);

  /* Optional: write synthetic sample `index` (same tensors a real cached sample has). */
  st_result (*synth_sample)(void *ctx, uint64_t seed, int64_t index, st_tensor_sink *sink, st_error *err);

  /* Optional: write the weights in an ecosystem format ("diffusers", "peft", "transformers"),
   * e.g. config.json + tensors; merge_lora folds adapters into base weights. NULL: the core writes
   * every parameter under its public name. */
  st_result (*export_weights)(void *ctx, const char *format, bool merge_lora, st_param_source *params,
                              st_tensor_sink *sink, st_error *err);
} st_model_plugin_v1;

#define ST_MODEL_PLUGIN_SYMBOL_V1 "strata_model_plugin_v1"

#endif /* STRATA_MODEL_H */
