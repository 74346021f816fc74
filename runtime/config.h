/* config.h (internal) — loading, validating and resolving the JSON configuration.
 *
 * Sources, lowest priority first: defaults < --deepspeed file < main config file < --set overrides
 * (DESIGN §4: the DeepSpeed file merges under the main config; --set wins over both).
 * Every leaf value remembers where it came from (st_prov) for `strata validate`. */
#ifndef STRATA_RUNTIME_CONFIG_H
#define STRATA_RUNTIME_CONFIG_H

#include <strata/host.h>
#include <strata/ops.h>

#include <math.h>

typedef struct st_config st_config;

typedef enum st_prov {
  ST_PROV_DEFAULT = 0,  /* filled in by strata or a plugin */
  ST_PROV_FILE = 1,     /* the main config file */
  ST_PROV_DEEPSPEED = 2,/* the --deepspeed file */
  ST_PROV_SET = 3,      /* a --set override */
  ST_PROV_DERIVED = 4,  /* computed from other values ("auto" resolution) */
} st_prov;

const char *st_prov_name(st_prov p); /* "default", "file", "deepspeed", "--set", "derived" */

/* Parse `path` (jansson, JSON_REJECT_DUPLICATES; syntax errors as "file:line:col: text"), merge
 * `deepspeed_path` under it (may be NULL), apply `sets` ("a.b=v": v parsed as JSON when it parses
 * — numbers, true/false, null, objects, arrays — else taken as a string). */
st_result st_config_load(const char *path, const char *deepspeed_path, const char *const *sets, int n_sets,
                         st_config **out, st_error *err);
/* Same from memory; source_name is used in messages. */
st_result st_config_load_string(const char *json_text, const char *source_name, st_config **out, st_error *err);
st_result st_config_apply_set(st_config *c, const char *assignment, st_error *err);
void st_config_free(st_config *c);

/* The SDK view (host.h): nodes and the getter table plugins use. */
const st_cfg_api *st_config_api(void);
st_cfg *st_config_root(st_config *c);
st_cfg *st_config_node(st_config *c, const char *dotted_path); /* NULL if absent */

/* ---- the core's own settings, extracted and checked ---------------------------------------- */
typedef enum st_sched_type {
  ST_SCHED_CONSTANT = 0, ST_SCHED_WARMUP_LR, ST_SCHED_WARMUP_DECAY_LR, ST_SCHED_WARMUP_COSINE_LR
} st_sched_type;

typedef struct st_optimizer_settings {
  st_optim_type type;      /* "AdamW" | "Adam" | "SGD" (DeepSpeed spelling, case-insensitive) */
  double lr, beta1, beta2, eps, weight_decay, momentum;
  bool adam_w_mode;        /* DeepSpeed: default true, even for "Adam" */
} st_optimizer_settings;

typedef struct st_scheduler_settings {
  st_sched_type type;
  double warmup_min_lr, warmup_max_lr; /* WarmupLR / WarmupDecayLR (max defaults to optimizer lr) */
  int64_t warmup_num_steps;            /* DeepSpeed default 1000 */
  bool warmup_linear;                  /* warmup_type "linear"; default "log" */
  int64_t total_num_steps;             /* required by WarmupDecayLR / WarmupCosineLR ("auto": max_steps) */
  double warmup_min_ratio, cos_min_ratio; /* WarmupCosineLR */
} st_scheduler_settings;

typedef struct st_precision_settings {
  st_dtype dtype;             /* ST_F32 (neither enabled), ST_BF16 or ST_F16 */
  double static_loss_scale;   /* fp16.loss_scale; 0 = dynamic */
  int initial_scale_power;    /* 16 */
  int64_t loss_scale_window;  /* 1000 */
  int hysteresis;             /* 2 */
  bool consecutive_hysteresis;
  double min_loss_scale;      /* 1 */
} st_precision_settings;

typedef struct st_settings {
  /* batch triple, resolved */
  int64_t train_batch_size, micro_batch_size, grad_accum_steps;
  double gradient_clipping;   /* 0 = off; DeepSpeed's current default is 1.0 */
  st_optimizer_settings optimizer;
  st_scheduler_settings scheduler;
  st_precision_settings precision;
  int64_t steps_per_print;    /* 0 = every step to the progress bar only */
  bool wall_clock_breakdown;
  bool tensorboard;           /* tensorboard.enabled */
  const char *tensorboard_path; /* tensorboard.output_path; NULL = <output_path>/tensorboard */
  const char *job_name;       /* tensorboard.job_name / csv_monitor.job_name */
  bool csv_monitor;
  const char *csv_path;
  bool activation_checkpointing;      /* activation_checkpointing.* or train.gradient_checkpointing */
  bool activation_checkpointing_offload; /* train.gradient_checkpointing_offload / cpu_checkpointing */

  /* model / strategy: the plugins are named by `name` or given by `plugin` (a path) */
  const char *model_name, *model_plugin;
  const char *strategy_name, *strategy_plugin;

  /* data */
  const char *dataset_base_path, *dataset_metadata_path;
  int64_t dataset_repeat;
  int num_workers;
  bool shuffle;
  int64_t synthetic_samples;  /* data.synthetic.num_samples: > 0 generates a synthetic cache */
  uint64_t synthetic_seed;    /* data.synthetic.seed: which synthetic data set (training and validation) */

  /* train */
  int64_t max_steps, num_epochs;
  uint64_t seed;
  const char *output_path;
  int64_t save_steps;         /* 0 = only at the end */
  int64_t keep_last;          /* 0 = keep all */
  const char *resume;         /* NULL, "latest" or a checkpoint directory */
  int64_t eval_steps;         /* validate every N steps (0: only at the end, when a validation set exists) */
  int64_t save_top_k;         /* train.checkpoint: keep the k best by val_loss (0: selection off) */
  bool monitor_max;           /*   mode "max" */
  int64_t early_patience;     /* train.early_stopping: evaluations without improvement (0: off) */
  double early_min_delta;
  const char *on_save;        /* shell command run after each checkpoint (NULL: none) */
  /* data.validation */
  const char *val_base_path, *val_metadata_path;
  int64_t val_max_samples;    /* 0: all */
  int64_t val_synthetic_samples;
  uint64_t val_seed;          /* fixes sigma and noise per validation sample */
  int64_t max_bad_steps;      /* stop after this many consecutive non-finite losses */
  double peak_flops;          /* train.peak_tflops * 1e12, 0 = unknown (MFU not reported) */

  /* device */
  st_device_type device_type;
  int threads;                /* 0 = all cores */
  const char *comm_backend;   /* "auto" or a comm plugin name / path */
  int64_t comm_timeout_ms;    /* every collective and store wait */
  const char *comm_interface; /* network interface for the comm backend, NULL = its default */
} st_settings;

/* Check every key strata owns (unknown key -> path + did-you-mean; wrong type -> expected/found),
 * fill defaults with provenance, and extract. Does NOT look inside model.* (beyond name, plugin)
 * or strategy.* (beyond name, plugin): those blocks belong to the plugins. */
st_result st_config_extract(st_config *c, st_settings *out, st_error *err);

/* Resolve "auto" once the world and the model are known: the batch triple with DeepSpeed's rules
 * (messages spell the numbers out), gradient_clipping, scheduler totals and warmup_max_lr,
 * zero_optimization bucket sizes from hidden_size. Re-extracts into *out. */
st_result st_config_resolve(st_config *c, int dp_world_size, int64_t hidden_size, st_settings *out, st_error *err);

/* st_config_extract leaves these where a value is still "auto" (or, for the batch triple, not given
 * yet); st_config_resolve replaces every one. Booleans have no sentinel: an unresolved "auto"
 * (fp16/bf16.enabled) reads as false, which is what resolution makes it. */
#define ST_CONFIG_AUTO_INT INT64_MIN
#define ST_CONFIG_AUTO_NUMBER ((double)NAN)
static inline bool st_config_is_auto_int(int64_t v) { return v == ST_CONFIG_AUTO_INT; }
static inline bool st_config_is_auto_number(double v) { return v != v; }

/* Where the value at `dotted_path` came from (the nearest recorded ancestor for a path inside a
 * value; ST_PROV_DEFAULT for one never set). */
st_prov st_config_provenance(const st_config *c, const char *dotted_path);

/* The top-level keys present in the config that strata accepts as valid DeepSpeed configuration but
 * does not act on (wandb, comet, flops_profiler, comms_logger, checkpoint, data_types, elasticity,
 * aio, ...), so the trainer can warn "ignored". Fills up to `cap` names (static strings) and returns
 * how many there are. */
size_t st_config_ignored_keys(const st_config *c, const char **keys, size_t cap);

/* `strata validate`: the resolved config, one leaf per line: "key.path = value    (provenance)". */
void st_config_print_resolved(st_config *c, FILE *out);
/* The resolved config as pretty JSON with sorted keys (saved into every checkpoint). Caller frees
 * with free(). The st_cfg_api to_json result is malloc'd too: free() it (host.h says "host free"). */
char *st_config_to_json(st_config *c);

#endif /* STRATA_RUNTIME_CONFIG_H */
