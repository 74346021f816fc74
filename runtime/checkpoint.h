/* checkpoint.h (internal) — atomic, topology-independent checkpoints (DESIGN §5).
 *
 *   <output_path>/step-000100/
 *     model.safetensors            full parameters in the model's public naming (fp32 masters), or
 *     model-0000K-of-0000N.safetensors + model.safetensors.index.json when large; when the strategy
 *     shards (fsdp), rank 0's whole tensors go to model-partial-rank00000.safetensors instead and
 *     `strata export` consolidates
 *     state-rank00000-of-00002.safetensors   slices: "<kind>/<param>@<offset>" (1-D), with the
 *                                  global shape in the metadata ("shape:<param>")
 *     trainer_state.json           step, samples seen, loss scaler, world size, names
 *     config.json                  the resolved config
 *   <output_path>/latest           "step-000100", replaced (rename) after the directory is complete
 *   <output_path>/best             the checkpoint with the best val_loss (train.checkpoint)
 *
 * Everything is written into "<output_path>/.step-000100.tmp", fsync'd, renamed into place, and
 * only then is `latest` updated, so a crash at any point leaves the previous checkpoint intact. */
#ifndef STRATA_RUNTIME_CHECKPOINT_H
#define STRATA_RUNTIME_CHECKPOINT_H

#include <strata/strategy.h>

typedef struct st_trainer_state {
  int64_t step;         /* optimizer steps completed */
  int64_t samples_seen; /* global samples consumed: valid at any world size and micro-batch size */
  int64_t bad_steps;    /* consecutive non-finite losses */
  double loss_scale;
  int64_t scaler_iteration, scaler_last_overflow;
  int scaler_hysteresis_left;
  uint64_t seed;
  int world_size;
  char model[64], strategy[64];
  double val_loss;      /* of this step's validation, NAN when none ran (drives save_top_k / best) */
} st_trainer_state;

typedef struct st_ckpt_options {
  const char *output_path;
  int rank, world_size;
  int64_t keep_last;       /* 0 = keep every checkpoint (ignored when save_top_k > 0) */
  int64_t save_top_k;      /* train.checkpoint: keep the k best by val_loss + the newest; `best` names the best */
  bool monitor_max;        /*   higher is better */
  uint64_t max_shard_bytes;/* model weight shard size (0 = 4 GiB) */
  unsigned slow_write_ms;  /* test hook: sleep between files (kill-during-save test) */
  /* trainable parameter tensors of the model: model*.safetensors is written only when rank 0 holds
   * every one in full (a replicated strategy); a sharded one leaves slices for `strata export` */
  int n_param_tensors;
  /* a barrier over every rank (NULL for one process): saving is a collective */
  st_result (*barrier)(void *user, st_error *err);
  void *barrier_user;
} st_ckpt_options;

/* Collects the strategy's slices, then writes the step directory atomically. */
st_result st_ckpt_save(const st_ckpt_options *opt, const st_strategy_plugin_v1 *strategy, void *strategy_ctx,
                       const st_trainer_state *ts, const char *config_json, st_error *err);

/* "latest" -> <output_path>/<contents of latest>; a path is checked to be a checkpoint directory. */
st_result st_ckpt_resolve(const char *output_path, const char *resume, char *dir, size_t cap, st_error *err);

/* A set of safetensors files indexed by (kind, parameter) slices: a checkpoint directory, or a
 * weights source (one .safetensors file, or a folder with *.safetensors.index.json or files). */
typedef struct st_tensor_store st_tensor_store;
st_result st_tensor_store_open_checkpoint(const char *dir, st_tensor_store **out, st_error *err);
st_result st_tensor_store_open_weights(const char *path, st_tensor_store **out, st_error *err);
void st_tensor_store_close(st_tensor_store *s);
/* full tensor present with this name? its shape into shape/ndim when so */
bool st_tensor_store_has(const st_tensor_store *s, st_state_kind kind, const char *name, int64_t *shape, int *ndim);
/* elements [offset, offset + count) of (kind, name) as dt; ST_ERR_NOT_FOUND when absent */
st_result st_tensor_store_read(st_tensor_store *s, st_state_kind kind, const char *name, int64_t offset,
                               int64_t count, st_dtype dt, void *dst, st_error *err);
/* every PARAM name in the store (for unexpected-tensor checks) */
int st_tensor_store_param_count(const st_tensor_store *s);
const char *st_tensor_store_param_name(const st_tensor_store *s, int i);

st_result st_ckpt_read_trainer_state(const char *dir, st_trainer_state *ts, st_error *err);

#endif
