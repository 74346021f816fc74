/* fsdp.c — the `fsdp` strategy: fully sharded data parallelism (PyTorch FSDP FULL_SHARD, DeepSpeed
 * ZeRO-3), with SHARD_GRAD_OP (ZeRO-2-like) as a cheap variant of the same code.
 *
 * Layout. Each unit's parameters form up to two flat parameters ("groups"): the trainable ones and
 * the frozen ones (so LoRA's frozen base weights cost no gradient, master or optimizer memory).
 * Inside a group the parameters follow descriptor order, each starting on a 16-element boundary;
 * the group is padded to a multiple of 16 * world_size elements and rank r owns the contiguous
 * shard [r * shard, (r + 1) * shard). Every rank keeps its shard of each group in the window dtype
 * (what the all-gather sends), and for the trainable group also an fp32 master (when the window
 * dtype is a half type), a gradient shard and the optimizer state, all of shard size. Padding is
 * zero and stays zero (its gradient is zero; the optimizer never touches it: updates run per
 * parameter segment, so weight decay can differ between parameters of one shard). Parameters of
 * at most stage3_param_persistence_threshold elements form a third group that every rank keeps
 * whole (DeepSpeed's persistent parameters): never gathered, gradients all-reduced on the last
 * micro-step like DDP's, updated identically on every rank, saved by rank 0.
 *
 * Schedule (units in the static order of the setup):
 *   pre_forward(u)   all-gather u into a gather slot (or find it already there), then start the
 *                    all-gather of the next unit when a slot is free (forward_prefetch)
 *   post_forward(u)  FULL_SHARD: free u's slot, except for the last unit, which backward needs
 *                    first, and except during backward (activation-checkpoint replays)
 *   pre_backward(u)  u gathered as above; a zeroed full-size gradient buffer for its trainable
 *                    group; start gathering the previous unit (backward_prefetch)
 *   post_backward(u) reduce-scatter (average) the gradient buffer into this rank's gradient shard,
 *                    asynchronously; free u's slot
 * Gradients are reduce-scattered on EVERY micro-step and accumulated in the shard (as DeepSpeed
 * ZeRO-3 does), so memory stays sharded under gradient accumulation; the sum of per-micro-step
 * averages equals the average of the sums. Two gather slots bound live parameters to two units
 * (limit_all_gathers); two gradient buffers let one reduce-scatter run while the next unit's
 * backward computes.
 *
 * Averaging: ST_REDUCE_AVG over the group, so N ranks with per-rank batch B match one rank with
 * batch N*B (the trainer has already divided by the accumulation steps).
 *
 * Checkpoints: each rank writes its shard as slices of the parameters it overlaps, at GLOBAL
 * element offsets (a shard may cover the tail of one parameter and the head of the next); loading
 * reads exactly those slices, so a checkpoint from any world size and any strategy loads.
 *
 * Offload (built a second time with -DST_FSDP_OFFLOAD=1 as libstrata-strategy-zero3_offload.so:
 * the same layout, schedule and checkpoints, only the placement differs; strategies/zero3_offload/
 * README.md). offload_optimizer: the fp32 master (or, for fp32/fp64 windows, a host copy of the
 * window-dtype shard that serves as the master) and the optimizer state of every trainable group
 * live in (pinned) host memory; the gradient shard accumulates on the device where the
 * reduce-scatter lands, and step() streams it in tiles of sub_group_size elements: gradient tile
 * D2H into one of two host staging buffers, the CPU optimizer (host->optim_update on the CPU) on
 * the tile, the updated window-dtype tile H2D into the device shard. offload_param: the window-dtype
 * shards of the sharded groups live on the host too (updated in place by the CPU optimizer) and a
 * unit's shard is copied H2D into a per-slot upload buffer right before its all-gather; persistent
 * parameters stay on the device (they are read in place by every window). */
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#include <strata/strategy.h>

#include "strategy_util.h"

#ifndef ST_FSDP_OFFLOAD
#define ST_FSDP_OFFLOAD 0
#endif
#if ST_FSDP_OFFLOAD
#define NAME "zero3_offload"
#else
#define NAME "fsdp"
#endif

#define FSDP_ALIGN 16 /* elements: parameter starts and shard sizes */
#define N_GRAD_SLOTS 2

/* G_PERSIST: parameters of at most stage3_param_persistence_threshold elements, trainable or not,
 * kept whole on every rank (never gathered); their gradients are all-reduced like DDP's */
enum { G_TRAIN = 0, G_FROZEN = 1, G_PERSIST = 2, N_GROUPS = 3 };

typedef struct fsdp_group {
  int64_t numel;        /* flattened length including alignment gaps, before padding */
  int64_t shard;        /* elements per rank; padded length = shard * world */
  size_t pshard_off;    /* bytes into pshard_mem (window dtype) */
  size_t master_off;    /* bytes into master_mem (fp32); SIZE_MAX = none */
  size_t gshard_off;    /* bytes into gshard_mem (grad dtype), trainable group only */
  size_t state_off;     /* bytes into state_mem: n_states consecutive fp32 shards */
  size_t slot_off;      /* bytes into a gather slot */
  bool p_host;          /* offload_param: the window-dtype shard is in hpshard_mem (host), not pshard_mem */
  size_t hparam_off;    /* offload_optimizer, fp32/fp64 windows: bytes into hparam_mem (host copy of the
                           shard, the optimizer's master); SIZE_MAX = none */
} fsdp_group;

typedef struct fsdp_param {
  const st_param_desc *desc;
  int64_t numel;
  int group;
  int64_t flat_off; /* element offset inside its group */
} fsdp_param;

typedef struct fsdp_unit {
  int first, n;            /* params[first .. first + n) */
  fsdp_group g[N_GROUPS];
  int slot;                /* gather slot holding the full parameters, or -1 */
  st_comm_request *greq[2];
  st_comm_request *preq;   /* all-reduce of the persistent group's gradients */
  bool persist_grads;      /* the persistent group holds trainable parameters */
  bool persist_reduced;    /* ... and their all-reduce was issued since the last step */
  bool open;               /* a window is handed out */
  int gslot;               /* gradient slot during backward, or -1 */
  bool grad_fresh;         /* the gradient shard holds nothing since the last step */
} fsdp_unit;

typedef struct grad_slot {
  char *buf;               /* full trainable group, grad dtype: what the model accumulates into */
  void *rbuf;              /* the same in the reduce dtype (when it differs) */
  void *rtmp;              /* one shard in the reduce dtype: reduce-scatter output when accumulating */
  void *gtmp;              /* one shard in the grad dtype (when the dtypes differ) */
  st_comm_request *req;
  int unit;                /* unit whose reduction is in flight, or -1 */
  bool direct;             /* reduced straight into the gradient shard */
} grad_slot;

typedef enum { SHARD_FULL = 0, SHARD_GRAD_OP = 1 } shard_mode;

/* zero3_offload's per-step time breakdown (seconds, summed over the steps since the last report) */
typedef struct offload_times {
  double gather, reduce, d2h, adam, h2d, upload, wall;
  int64_t steps, adam_elems, d2h_bytes, h2d_bytes, upload_bytes;
} offload_times;

typedef struct fsdp_ctx {
  const st_host *host;
  st_strategy_setup setup;
  const st_comm_plugin_v1 *comm;
  st_comm *group;
  int rank, world;
  int n_units, n_params;
  fsdp_unit *units;
  fsdp_param *params;
  int *order_pos;          /* position of each unit in the static order */
  st_tensor *windows, *grad_windows;
  char *pshard_mem, *master_mem, *gshard_mem, *state_mem;
  size_t pshard_bytes, master_bytes, gshard_bytes, state_bytes;
  int n_states;
  char **slots;
  int *slot_owner;
  int n_slots;
  size_t slot_bytes;
  grad_slot gslots[N_GRAD_SLOTS];
  size_t gslot_bytes, comm_bytes;
  int next_gslot;
  bool in_backward;
  /* options */
  shard_mode mode;
  bool forward_prefetch, backward_prefetch, overlap;
  int64_t prefetch_elems, max_live_elems, persist_elems;
  st_dtype reduce_dtype;
  /* placement (zero3_offload; all off in fsdp) */
  bool off_optim, off_param, pin;
  int64_t tile;            /* sub_group_size: elements per optimizer tile */
  int64_t report_steps;    /* log the time breakdown every this many steps (0: at the end only) */
  st_device hdev;          /* the host */
  st_device mdev;          /* where master_mem and state_mem live */
  char *hpshard_mem, *hparam_mem;
  size_t hpshard_bytes, hparam_bytes;
  char *gstage[2], *pstage[2]; /* host tiles: gradient D2H targets, half-precision param H2D sources */
  size_t gstage_bytes, pstage_bytes;
  char **upload;           /* offload_param: one device buffer per gather slot, the all-gather's input */
  size_t upload_bytes;
  offload_times tm, tm_total;
  double last_step_end;
} fsdp_ctx;

/* ---- configuration ------------------------------------------------------------------------ */

static const char *const fsdp_keys[] = {
    "name", "plugin",
    /* PyTorch FSDP vocabulary */
    "sharding_strategy", "mixed_precision", "cpu_offload", "limit_all_gathers", "forward_prefetch",
    "backward_prefetch", "reshard_after_forward",
    /* DeepSpeed zero_optimization vocabulary, where it means the same */
    "reduce_bucket_size", "overlap_comm", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
    "stage3_param_persistence_threshold",
#if ST_FSDP_OFFLOAD
    /* zero3_offload: optimizer tile (DeepSpeed's sub_group_size) and the time report's period */
    "sub_group_size", "report_steps",
#endif
    NULL};

static const char *const mp_keys[] = {"param_dtype", "reduce_dtype", "buffer_dtype", NULL};
static const char *const sharding_choices[] = {"FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD",
                                               "_HYBRID_SHARD_ZERO2", NULL};
static const char *const prefetch_choices[] = {"BACKWARD_PRE", "BACKWARD_POST", "NONE", NULL};

/* zero_optimization keys: what this strategy does with each (the core already rejects unknown ones) */
typedef enum { Z_USE, Z_ACCEPT, Z_BOOL_FALSE, Z_INT_AT_MOST, Z_OFFLOAD } z_policy;
typedef struct z_rule {
  const char *key;
  z_policy policy;
  int64_t limit;   /* Z_INT_AT_MOST: the largest value that means "off" */
  const char *why; /* for the error: what to do instead */
} z_rule;

static const z_rule zero_rules[] = {
    {"stage", Z_USE, 0, NULL},
    {"reduce_bucket_size", Z_USE, 0, NULL},
    {"overlap_comm", Z_USE, 0, NULL},
    {"stage3_prefetch_bucket_size", Z_USE, 0, NULL},
    {"stage3_max_live_parameters", Z_USE, 0, NULL},
    {"stage3_param_persistence_threshold", Z_USE, 0, NULL},
    /* same meaning, nothing to configure here */
    {"contiguous_gradients", Z_ACCEPT, 0, NULL},        /* gradient buffers are always contiguous */
    {"reduce_scatter", Z_ACCEPT, 0, NULL},              /* gradients are always reduce-scattered */
    {"allgather_partitions", Z_ACCEPT, 0, NULL},
    {"allgather_bucket_size", Z_ACCEPT, 0, NULL},       /* a unit is gathered in one call */
    {"load_from_fp32_weights", Z_ACCEPT, 0, NULL},      /* checkpoints always hold fp32 masters */
    {"sub_group_size", Z_ACCEPT, 0, NULL},              /* the optimizer already runs per parameter slice */
    {"stage3_max_reuse_distance", Z_ACCEPT, 0, NULL},   /* units are released after use */
    {"stage3_gather_16bit_weights_on_model_save", Z_ACCEPT, 0, NULL}, /* export consolidates */
    {"stage3_gather_fp16_weights_on_model_save", Z_ACCEPT, 0, NULL},
    {"stage3_model_persistence_threshold", Z_ACCEPT, 0, NULL},
    {"ignore_unused_parameters", Z_ACCEPT, 0, NULL},    /* unused parameters get zero gradients */
    {"round_robin_gradients", Z_ACCEPT, 0, NULL},
    {"elastic_checkpoint", Z_ACCEPT, 0, NULL},          /* checkpoints load at any world size */
    {"log_trace_cache_warnings", Z_ACCEPT, 0, NULL},    /* the schedule is static: no trace */
    /* not implemented: an error unless set to the value that means "off" */
    {"offload_param", Z_OFFLOAD, 0, "use \"strategy\": {\"name\": \"zero3_offload\"}"},
    {"offload_optimizer", Z_OFFLOAD, 0, "use \"strategy\": {\"name\": \"zero3_offload\"}"},
    {"cpu_offload", Z_BOOL_FALSE, 0, "use \"strategy\": {\"name\": \"zero3_offload\"}"},
    {"zero_quantized_weights", Z_BOOL_FALSE, 0, "collectives run in the window and reduce dtypes"},
    {"zero_quantized_gradients", Z_BOOL_FALSE, 0, "collectives run in the window and reduce dtypes"},
    {"zero_hpz_partition_size", Z_INT_AT_MOST, 1, "every rank holds one shard of the whole group"},
    {"mics_shard_size", Z_INT_AT_MOST, 0, "shards span the whole data-parallel group"},
    {"stage3_module_granularity_threshold", Z_INT_AT_MOST, 0, "units are defined by the model plugin"},
    {"stage3_use_all_reduce_for_fetch_params", Z_BOOL_FALSE, 0, "parameters are fetched with all-gather"},
    {"stage3_allgather_sequential", Z_BOOL_FALSE, 0, "a unit is gathered in one call"},
};

static st_result not_implemented(st_error *err, const char *key, const char *why) {
  return st_error_set(err, ST_ERR_CONFIG, key, "%s: not implemented by strategy \"" NAME "\" (%s); remove the key or set "
                      "it to its default", key, why);
}

static st_result check_zero_block(st_cfg *z, const st_cfg_api *api, st_error *err) {
  size_t n_rules = sizeof zero_rules / sizeof zero_rules[0];
  const char *allowed[sizeof zero_rules / sizeof zero_rules[0] + 1];
  for (size_t i = 0; i < n_rules; i++) allowed[i] = zero_rules[i].key;
  allowed[n_rules] = NULL;
  ST_CHECK(api->check_keys(z, allowed, err));
  char path[320];
  for (size_t i = 0; i < n_rules; i++) {
    const z_rule *rule = &zero_rules[i];
    if (api->type(z, rule->key) == ST_CFG_ABSENT) continue;
    /* zero3_offload reads the offload keys itself (parse_offload) */
    if (ST_FSDP_OFFLOAD && (rule->policy == Z_OFFLOAD || !strcmp(rule->key, "cpu_offload"))) continue;
    snprintf(path, sizeof path, "zero_optimization.%s", rule->key);
    if (rule->policy == Z_BOOL_FALSE) {
      bool v;
      ST_CHECK(api->get_bool(z, rule->key, false, &v, err));
      if (v) return not_implemented(err, path, rule->why);
    } else if (rule->policy == Z_INT_AT_MOST) {
      int64_t v;
      ST_CHECK(api->get_int(z, rule->key, 0, &v, err));
      if (v > rule->limit) return not_implemented(err, path, rule->why);
    } else if (rule->policy == Z_OFFLOAD) {
      st_cfg *o;
      const char *dev = "none";
      ST_CHECK(api->get_object(z, rule->key, false, &o, err));
      if (o && api->type(o, "device") != ST_CFG_ABSENT) ST_CHECK(api->get_string(o, "device", "none", &dev, err));
      if (strcmp(dev, "none") != 0) return not_implemented(err, path, rule->why);
    }
  }
  if (api->type(z, "stage") != ST_CFG_ABSENT) {
    int64_t stage;
    ST_CHECK(api->get_int(z, "stage", 3, &stage, err));
    if (ST_FSDP_OFFLOAD && stage != 3)
      return st_error_set(err, ST_ERR_CONFIG, "zero_optimization.stage",
                          "zero_optimization.stage is %lld, but strategy \"" NAME "\" implements stage 3 only "
                          "(offload with stage 1/2 is not supported yet); use \"fsdp\" for stage 2 or \"ddp\" "
                          "for stage 0", (long long)stage);
    if (stage < 2)
      return st_error_set(err, ST_ERR_CONFIG, "zero_optimization.stage",
                          "zero_optimization.stage is %lld, but strategy \"" NAME "\" implements stage 3 (FULL_SHARD) and "
                          "2 (SHARD_GRAD_OP); use \"strategy\": {\"name\": \"ddp\"} for stage 0",
                          (long long)stage);
  }
  return ST_OK;
}

static st_result read_dtype(st_cfg *obj, const st_cfg_api *api, const char *key, st_dtype *out, bool *given,
                            st_error *err) {
  *given = false;
  if (!obj || api->type(obj, key) == ST_CFG_ABSENT) return ST_OK;
  const char *s;
  ST_CHECK(api->get_string(obj, key, "fp32", &s, err));
  if (!st_dtype_parse(s, out) || !st_dtype_is_float(*out) || *out == ST_F64)
    return st_error_set(err, ST_ERR_CONFIG, key, "%s.%s: \"%s\" is not one of fp32, bf16, fp16", api->path(obj), key, s);
  *given = true;
  return ST_OK;
}

#if ST_FSDP_OFFLOAD
typedef struct offload_opts {
  bool optim, param, pin;
  int64_t tile, report_steps;
} offload_opts;

static st_result not_yet(st_error *err, const char *key, const char *why) {
  return st_error_set(err, ST_ERR_CONFIG, key, "%s: not supported yet by strategy \"" NAME "\" (%s)", key, why);
}

/* zero_optimization.offload_optimizer / offload_param: device none|cpu (nvme: not supported yet),
 * pin_memory; the NVMe-only keys (nvme_path, buffer_*, max_in_cpu, pipeline_*) mean nothing for
 * "cpu" and are accepted, as DeepSpeed does */
static st_result read_offload_block(st_cfg *z, const st_cfg_api *api, const char *key, bool *on, bool *pin,
                                    st_error *err) {
  static const char *const devices[] = {"none", "cpu", "nvme", NULL};
  st_cfg *o = NULL;
  ST_CHECK(api->get_object(z, key, false, &o, err));
  if (!o) return ST_OK;
  char path[320];
  const char *dev;
  ST_CHECK(api->get_enum(o, "device", devices, *on ? "cpu" : "none", &dev, err));
  snprintf(path, sizeof path, "zero_optimization.%s.device", key);
  if (!strcmp(dev, "nvme"))
    return not_yet(err, path, "NVMe offload; use \"cpu\", which keeps this state in host memory");
  *on = !strcmp(dev, "cpu");
  if (api->type(o, "pin_memory") != ST_CFG_ABSENT) {
    bool p;
    ST_CHECK(api->get_bool(o, "pin_memory", true, &p, err));
    if (!p) *pin = false;
  }
  if (api->type(o, "ratio") != ST_CFG_ABSENT) {
    double ratio;
    ST_CHECK(api->get_number(o, "ratio", 1.0, &ratio, err));
    snprintf(path, sizeof path, "zero_optimization.%s.ratio", key);
    if (ratio != 1.0) return not_yet(err, path, "partial offload; remove the key or set it to 1");
  }
  if (api->type(o, "super_offload") != ST_CFG_ABSENT) {
    bool v;
    ST_CHECK(api->get_bool(o, "super_offload", false, &v, err));
    snprintf(path, sizeof path, "zero_optimization.%s.super_offload", key);
    if (v) return not_yet(err, path, "SuperOffload; remove the key or set it to false");
  }
  return ST_OK;
}

/* The placement: zero_optimization's offload blocks (offload_optimizer defaults to "cpu" here, that
 * is what the strategy is for; offload_param to "none", DeepSpeed's default), its deprecated
 * cpu_offload, sub_group_size, and the top-level aio block (NVMe only: an error). */
static st_result parse_offload(st_cfg *root, st_cfg *z, const st_cfg_api *api, offload_opts *o, st_error *err) {
  if (root && api->type(root, "aio") != ST_CFG_ABSENT)
    return not_yet(err, "aio", "the aio block configures NVMe offload; remove it");
  if (!z) return ST_OK;
  if (api->type(z, "cpu_offload") != ST_CFG_ABSENT) {
    bool v;
    ST_CHECK(api->get_bool(z, "cpu_offload", true, &v, err));
    o->optim = v;
  }
  ST_CHECK(read_offload_block(z, api, "offload_optimizer", &o->optim, &o->pin, err));
  bool pin_param = true;
  ST_CHECK(read_offload_block(z, api, "offload_param", &o->param, &pin_param, err));
  if (o->param && !pin_param) o->pin = false;
  if (o->param && !o->optim)
    return not_yet(err, "zero_optimization.offload_param", "offloading parameters without the optimizer; set "
                   "offload_optimizer.device to \"cpu\" as well");
  if (api->type(z, "sub_group_size") != ST_CFG_ABSENT) {
    ST_CHECK(api->get_int(z, "sub_group_size", o->tile, &o->tile, err));
    if (o->tile < 1)
      return st_error_set(err, ST_ERR_CONFIG, "zero_optimization.sub_group_size", "zero_optimization.sub_group_size "
                          "is %lld: give the optimizer tile in elements (>= 1; DeepSpeed's default is 1e9)",
                          (long long)o->tile);
  }
  return ST_OK;
}
#endif

/* Reads (and so validates) every option; c may be NULL (validate only). */
static st_result parse_options(st_cfg *cfg, const st_cfg_api *api, fsdp_ctx *c, st_error *err) {
  shard_mode mode = SHARD_FULL;
  bool fwd_prefetch = true, bwd_prefetch = true, overlap = true, mode_given = false;
  int64_t prefetch = INT64_MAX, max_live = INT64_MAX, persistence = 0;
  st_dtype reduce = c ? c->setup.reduce_dtype : ST_F32;
  st_cfg *z = NULL;
  st_cfg *root = cfg && api->root ? api->root(cfg) : NULL;
  if (root) ST_CHECK(api->get_object(root, "zero_optimization", false, &z, err));
#if ST_FSDP_OFFLOAD
  offload_opts oo = {.optim = true, .param = false, .pin = true, .tile = 1000000000, .report_steps = 10};
  ST_CHECK(parse_offload(root, z, api, &oo, err));
#endif
  if (root && api->type(root, "communication_data_type") != ST_CFG_ABSENT) {
    const char *s;
    ST_CHECK(api->get_string(root, "communication_data_type", "fp32", &s, err));
    if (!st_dtype_parse(s, &reduce) || !(reduce == ST_F32 || reduce == ST_BF16 || reduce == ST_F16))
      return st_error_set(err, ST_ERR_CONFIG, "communication_data_type",
                          "communication_data_type: \"%s\" is not one of fp32, bf16, fp16", s);
  }
  if (z) {
    ST_CHECK(check_zero_block(z, api, err));
    if (api->type(z, "stage") != ST_CFG_ABSENT) {
      int64_t stage;
      ST_CHECK(api->get_int(z, "stage", 3, &stage, err));
      mode = stage == 2 ? SHARD_GRAD_OP : SHARD_FULL;
      mode_given = true;
    }
    if (api->type(z, "overlap_comm") != ST_CFG_ABSENT) ST_CHECK(api->get_bool(z, "overlap_comm", true, &overlap, err));
    if (api->type(z, "stage3_prefetch_bucket_size") != ST_CFG_ABSENT)
      ST_CHECK(api->get_int(z, "stage3_prefetch_bucket_size", prefetch, &prefetch, err));
    if (api->type(z, "stage3_max_live_parameters") != ST_CFG_ABSENT)
      ST_CHECK(api->get_int(z, "stage3_max_live_parameters", max_live, &max_live, err));
    if (api->type(z, "stage3_param_persistence_threshold") != ST_CFG_ABSENT)
      ST_CHECK(api->get_int(z, "stage3_param_persistence_threshold", 0, &persistence, err));
    if (api->type(z, "reduce_bucket_size") != ST_CFG_ABSENT) {
      int64_t v;
      ST_CHECK(api->get_int(z, "reduce_bucket_size", 1, &v, err));
    }
  }
  if (cfg) {
    ST_CHECK(api->check_keys(cfg, fsdp_keys, err));
    const char *path = api->path(cfg);
    char key[320];
    if (api->type(cfg, "sharding_strategy") != ST_CFG_ABSENT) {
      const char *s;
      ST_CHECK(api->get_enum(cfg, "sharding_strategy", sharding_choices, "FULL_SHARD", &s, err));
      snprintf(key, sizeof key, "%s.sharding_strategy", path);
      if (!strcmp(s, "NO_SHARD"))
        return st_error_set(err, ST_ERR_CONFIG, key, "%s: NO_SHARD is plain data parallelism: use \"strategy\": "
                            "{\"name\": \"ddp\"}", key);
      if (strstr(s, "HYBRID"))
        return not_implemented(err, key, "hybrid sharding needs intra-node sub-groups; use FULL_SHARD");
      shard_mode m = !strcmp(s, "SHARD_GRAD_OP") ? SHARD_GRAD_OP : SHARD_FULL;
      if (mode_given && m != mode)
        return st_error_set(err, ST_ERR_CONFIG, key, "%s is %s, but zero_optimization.stage says %s: keep one of them",
                            key, s, mode == SHARD_FULL ? "3 (FULL_SHARD)" : "2 (SHARD_GRAD_OP)");
      mode = m;
      mode_given = true;
    }
    if (api->type(cfg, "reshard_after_forward") != ST_CFG_ABSENT) {
      bool v;
      ST_CHECK(api->get_bool(cfg, "reshard_after_forward", true, &v, err));
      shard_mode m = v ? SHARD_FULL : SHARD_GRAD_OP;
      if (mode_given && m != mode) {
        snprintf(key, sizeof key, "%s.reshard_after_forward", path);
        return st_error_set(err, ST_ERR_CONFIG, key, "%s contradicts the sharding strategy chosen elsewhere "
                            "(sharding_strategy or zero_optimization.stage): keep one of them", key);
      }
      mode = m;
    }
    if (api->type(cfg, "cpu_offload") != ST_CFG_ABSENT) {
      bool off = false;
      snprintf(key, sizeof key, "%s.cpu_offload", path);
      if (api->type(cfg, "cpu_offload") == ST_CFG_OBJECT) {
        st_cfg *o;
        static const char *const offload_keys[] = {"offload_params", "pin_memory", NULL};
        ST_CHECK(api->get_object(cfg, "cpu_offload", false, &o, err));
        ST_CHECK(api->check_keys(o, offload_keys, err));
        if (api->type(o, "offload_params") != ST_CFG_ABSENT) ST_CHECK(api->get_bool(o, "offload_params", false, &off, err));
        if (api->type(o, "pin_memory") != ST_CFG_ABSENT) {
          bool pin;
          ST_CHECK(api->get_bool(o, "pin_memory", true, &pin, err));
        }
      } else {
        ST_CHECK(api->get_bool(cfg, "cpu_offload", false, &off, err));
      }
#if ST_FSDP_OFFLOAD
      /* FSDP's CPUOffload(offload_params): the optimizer is always offloaded here */
      if (off) oo.param = oo.optim = true;
#else
      if (off) return not_implemented(err, key, "use \"strategy\": {\"name\": \"zero3_offload\"}");
#endif
    }
    if (api->type(cfg, "limit_all_gathers") != ST_CFG_ABSENT) {
      bool v;
      ST_CHECK(api->get_bool(cfg, "limit_all_gathers", true, &v, err));
      if (!v) {
        snprintf(key, sizeof key, "%s.limit_all_gathers", path);
        return not_implemented(err, key, "at most two units are ever gathered; raise nothing, or remove the key");
      }
    }
    if (api->type(cfg, "forward_prefetch") != ST_CFG_ABSENT)
      ST_CHECK(api->get_bool(cfg, "forward_prefetch", true, &fwd_prefetch, err));
    if (api->type(cfg, "backward_prefetch") != ST_CFG_ABSENT) {
      if (api->type(cfg, "backward_prefetch") == ST_CFG_NULL || api->type(cfg, "backward_prefetch") == ST_CFG_BOOL) {
        if (api->type(cfg, "backward_prefetch") == ST_CFG_BOOL)
          ST_CHECK(api->get_bool(cfg, "backward_prefetch", true, &bwd_prefetch, err));
        else
          bwd_prefetch = false;
      } else {
        const char *s;
        ST_CHECK(api->get_enum(cfg, "backward_prefetch", prefetch_choices, "BACKWARD_PRE", &s, err));
        bwd_prefetch = strcmp(s, "NONE") != 0; /* BACKWARD_POST: issued after the unit's gradients, same here */
      }
    }
    if (api->type(cfg, "overlap_comm") != ST_CFG_ABSENT) ST_CHECK(api->get_bool(cfg, "overlap_comm", true, &overlap, err));
    if (api->type(cfg, "stage3_prefetch_bucket_size") != ST_CFG_ABSENT)
      ST_CHECK(api->get_int(cfg, "stage3_prefetch_bucket_size", prefetch, &prefetch, err));
    if (api->type(cfg, "stage3_max_live_parameters") != ST_CFG_ABSENT)
      ST_CHECK(api->get_int(cfg, "stage3_max_live_parameters", max_live, &max_live, err));
    if (api->type(cfg, "stage3_param_persistence_threshold") != ST_CFG_ABSENT)
      ST_CHECK(api->get_int(cfg, "stage3_param_persistence_threshold", 0, &persistence, err));
    if (api->type(cfg, "reduce_bucket_size") != ST_CFG_ABSENT) {
      int64_t v;
      ST_CHECK(api->get_int(cfg, "reduce_bucket_size", 1, &v, err));
    }
#if ST_FSDP_OFFLOAD
    if (api->type(cfg, "sub_group_size") != ST_CFG_ABSENT) {
      ST_CHECK(api->get_int(cfg, "sub_group_size", oo.tile, &oo.tile, err));
      if (oo.tile < 1) {
        snprintf(key, sizeof key, "%s.sub_group_size", path);
        return st_error_set(err, ST_ERR_CONFIG, key, "%s is %lld: give the optimizer tile in elements (>= 1)", key,
                            (long long)oo.tile);
      }
    }
    if (api->type(cfg, "report_steps") != ST_CFG_ABSENT) {
      ST_CHECK(api->get_int(cfg, "report_steps", oo.report_steps, &oo.report_steps, err));
      if (oo.report_steps < 0) {
        snprintf(key, sizeof key, "%s.report_steps", path);
        return st_error_set(err, ST_ERR_CONFIG, key, "%s is %lld: give a period in steps (0: report at the end only)",
                            key, (long long)oo.report_steps);
      }
    }
#endif
    st_cfg *mp = NULL;
    if (api->type(cfg, "mixed_precision") != ST_CFG_ABSENT) {
      ST_CHECK(api->get_object(cfg, "mixed_precision", false, &mp, err));
      ST_CHECK(api->check_keys(mp, mp_keys, err));
      st_dtype dt;
      bool given;
      ST_CHECK(read_dtype(mp, api, "param_dtype", &dt, &given, err));
      if (given && c && dt != c->setup.param_dtype && c->host->log)
        c->host->log(c->host, ST_LOG_WARN, NAME ": mixed_precision.param_dtype is %s, but the model computes in %s "
                     "on this device: windows are %s", st_dtype_name(dt), st_dtype_name(c->setup.param_dtype),
                     st_dtype_name(c->setup.param_dtype));
      ST_CHECK(read_dtype(mp, api, "reduce_dtype", &dt, &given, err));
      if (given) reduce = dt;
      ST_CHECK(read_dtype(mp, api, "buffer_dtype", &dt, &given, err)); /* strata models keep no buffers */
    }
  }
#if ST_FSDP_OFFLOAD
  if (mode != SHARD_FULL)
    return st_error_set(err, ST_ERR_CONFIG, "zero_optimization.stage", "strategy \"" NAME "\" implements FULL_SHARD "
                        "(stage 3) only; SHARD_GRAD_OP / stage 2 with offload is not supported yet (use \"fsdp\")");
  if (c) {
    c->off_optim = oo.optim;
    c->off_param = oo.param;
    c->pin = oo.pin;
    c->tile = oo.tile;
    c->report_steps = oo.report_steps;
  }
#endif
  if (c) {
    c->mode = mode;
    c->forward_prefetch = fwd_prefetch;
    c->backward_prefetch = bwd_prefetch;
    c->overlap = overlap;
    c->prefetch_elems = prefetch;
    c->max_live_elems = max_live;
    c->persist_elems = persistence;
    c->reduce_dtype = c->setup.reduce_dtype == ST_F64 ? ST_F64 : reduce;
  }
  return ST_OK;
}

static st_result fsdp_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  return parse_options(cfg, api, NULL, err);
}

/* ---- set-up ------------------------------------------------------------------------------- */

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }
static int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

/* a group's window-dtype shard: on the device, or on the host under offload_param */
static char *pshard_of(const fsdp_ctx *c, const fsdp_group *g) {
  return (g->p_host ? c->hpshard_mem : c->pshard_mem) + g->pshard_off;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void offload_report(fsdp_ctx *c, const offload_times *t, const char *what);
static void add_times(offload_times *dst, const offload_times *s);

/* host memory for offloaded state: pinned when asked for (and the memlock check passed) */
static void *host_mem(fsdp_ctx *c, size_t bytes, const char *category) {
  const st_host *h = c->host;
  if (c->pin && h->alloc_pinned) return h->alloc_pinned(h, bytes, category);
  return h->alloc(h, c->hdev, bytes, category);
}

static void fsdp_finalize(void *vctx) {
  fsdp_ctx *c = vctx;
  if (!c) return;
  const st_host *h = c->host;
  if (ST_FSDP_OFFLOAD && c->off_optim && c->tm.steps + c->tm_total.steps > 0) {
    if (c->tm.steps > 0 && c->tm_total.steps > 0) offload_report(c, &c->tm, "last steps");
    add_times(&c->tm_total, &c->tm);
    offload_report(c, &c->tm_total, "whole run");
  }
  for (int s = 0; s < 2; s++) {
    h->free(h, c->hdev, c->gstage[s]);
    h->free(h, c->hdev, c->pstage[s]);
  }
  for (int s = 0; c->upload && s < c->n_slots; s++) h->free(h, h->device, c->upload[s]);
  free(c->upload);
  h->free(h, c->hdev, c->hpshard_mem);
  h->free(h, c->hdev, c->hparam_mem);
  for (int u = 0; c->units && u < c->n_units; u++) {
    for (int g = 0; g < 2; g++)
      if (c->units[u].greq[g] && c->comm) c->comm->wait(c->units[u].greq[g], NULL);
    if (c->units[u].preq && c->comm) c->comm->wait(c->units[u].preq, NULL);
  }
  for (int s = 0; s < N_GRAD_SLOTS; s++) {
    grad_slot *gs = &c->gslots[s];
    if (gs->req && c->comm) c->comm->wait(gs->req, NULL);
    h->free(h, h->device, gs->buf);
    h->free(h, h->device, gs->rbuf);
    h->free(h, h->device, gs->rtmp);
    h->free(h, h->device, gs->gtmp);
  }
  for (int s = 0; c->slots && s < c->n_slots; s++) h->free(h, h->device, c->slots[s]);
  h->free(h, h->device, c->pshard_mem);
  h->free(h, c->mdev, c->master_mem);
  h->free(h, h->device, c->gshard_mem);
  h->free(h, c->mdev, c->state_mem);
  free(c->slots);
  free(c->slot_owner);
  free(c->units);
  free(c->params);
  free(c->order_pos);
  free(c->windows);
  free(c->grad_windows);
  free(c);
}

static st_result fsdp_init(const st_host *host, st_cfg *cfg, const st_strategy_setup *setup, void **out,
                           st_error *err) {
  *out = NULL;
  fsdp_ctx *c = calloc(1, sizeof *c);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy." NAME, "cannot allocate the strategy state");
  c->host = host;
  c->setup = *setup;
  c->comm = host->comm;
  c->group = setup->group ? setup->group : host->world;
  c->world = 1;
  if (c->comm && c->group) {
    c->rank = c->comm->rank(c->group);
    c->world = c->comm->size(c->group);
  }
  c->reduce_dtype = setup->reduce_dtype;
  c->hdev = (st_device){ST_DEVICE_CPU, 0};
  c->mdev = host->device;
  c->forward_prefetch = c->backward_prefetch = c->overlap = true;
  c->prefetch_elems = c->max_live_elems = INT64_MAX;
#if ST_FSDP_OFFLOAD
  c->off_optim = c->pin = true;
  c->tile = 1000000000;
  c->report_steps = 10;
#endif
  st_result r = host->cfg && cfg ? parse_options(cfg, host->cfg, c, err) : ST_OK;
  if (r != ST_OK) {
    fsdp_finalize(c);
    return r;
  }
  if (c->off_optim) c->mdev = c->hdev;
  const st_model_desc *m = setup->model;
  c->n_units = m->n_units;
  for (int u = 0; u < m->n_units; u++) c->n_params += m->units[u].n_params;
  c->units = calloc((size_t)m->n_units + 1, sizeof *c->units);
  c->order_pos = calloc((size_t)m->n_units + 1, sizeof *c->order_pos);
  c->params = calloc((size_t)c->n_params + 1, sizeof *c->params);
  c->windows = calloc((size_t)c->n_params + 1, sizeof *c->windows);
  c->grad_windows = calloc((size_t)c->n_params + 1, sizeof *c->grad_windows);
  if (!c->units || !c->order_pos || !c->params || !c->windows || !c->grad_windows) {
    fsdp_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy." NAME, "cannot allocate the parameter tables");
  }
  for (int o = 0; o < m->n_units; o++) c->order_pos[setup->unit_order ? setup->unit_order[o] : o] = o;
  bool need_master = setup->param_dtype == ST_BF16 || setup->param_dtype == ST_F16;
  c->n_states = host->optim_state_count(host);
  size_t psz = st_dtype_size(setup->param_dtype), gsz = st_dtype_size(setup->grad_dtype);
  size_t rsz = st_dtype_size(c->reduce_dtype);
  bool cast_reduce = c->reduce_dtype != setup->grad_dtype;
  int64_t max_train_padded = 0, max_train_shard = 0, max_unit_padded = 0;
  size_t max_tile = 0, max_upload = 0; /* offload: the largest trainable shard; a unit's sharded groups */
  int i = 0, n_persist = 0;
  for (int u = 0; u < m->n_units; u++) {
    fsdp_unit *un = &c->units[u];
    un->first = i;
    un->n = m->units[u].n_params;
    un->slot = un->gslot = -1;
    un->grad_fresh = true;
    for (int k = 0; k < un->n; k++, i++) {
      fsdp_param *p = &c->params[i];
      p->desc = &m->units[u].params[k];
      p->numel = 1;
      for (int d = 0; d < p->desc->ndim; d++) p->numel *= p->desc->shape[d];
      bool trainable = (p->desc->flags & ST_PARAM_TRAINABLE) != 0;
      p->group = p->numel <= c->persist_elems ? G_PERSIST : trainable ? G_TRAIN : G_FROZEN;
      if (p->group == G_PERSIST && trainable) un->persist_grads = true;
      if (p->group == G_PERSIST) n_persist++;
      fsdp_group *g = &un->g[p->group];
      p->flat_off = g->numel;
      g->numel += round_up(p->numel, FSDP_ALIGN);
    }
    size_t slot_used = 0;
    for (int gi = 0; gi < N_GROUPS; gi++) {
      fsdp_group *g = &un->g[gi];
      /* the persistent group is not divided: its "shard" is the whole of it, on every rank */
      g->shard = gi == G_PERSIST ? g->numel : round_up(g->numel, (int64_t)FSDP_ALIGN * c->world) / c->world;
      size_t sh = (size_t)g->shard;
      /* offload_param: every sharded group's window-dtype shard on the host; persistent groups are read
       * in place by the windows, so they stay on the device */
      g->p_host = c->off_param && gi != G_PERSIST;
      g->pshard_off = g->p_host ? c->hpshard_bytes : c->pshard_bytes;
      *(g->p_host ? &c->hpshard_bytes : &c->pshard_bytes) += align64(sh * psz);
      g->master_off = g->gshard_off = g->state_off = g->hparam_off = SIZE_MAX;
      g->slot_off = slot_used;
      if (gi != G_PERSIST) slot_used += align64(sh * (size_t)c->world * psz);
      if (gi == G_FROZEN || (gi == G_PERSIST && !un->persist_grads)) continue;
      if (need_master) {
        g->master_off = c->master_bytes;
        c->master_bytes += align64(sh * sizeof(float));
      } else if (c->off_optim && !g->p_host) {
        /* full-precision windows on the device: the CPU optimizer updates a host copy, then H2D */
        g->hparam_off = c->hparam_bytes;
        c->hparam_bytes += align64(sh * psz);
      }
      if (c->off_optim && (size_t)g->shard > max_tile) max_tile = (size_t)g->shard;
      g->gshard_off = c->gshard_bytes;
      c->gshard_bytes += align64(sh * gsz);
      g->state_off = c->state_bytes;
      c->state_bytes += align64(sh * sizeof(float)) * (size_t)c->n_states;
      if (gi == G_PERSIST) continue;
      if (g->shard * c->world > max_train_padded) max_train_padded = g->shard * c->world;
      if (g->shard > max_train_shard) max_train_shard = g->shard;
    }
    if (slot_used > c->slot_bytes) c->slot_bytes = slot_used;
    size_t up = align64((size_t)un->g[G_TRAIN].shard * psz) + align64((size_t)un->g[G_FROZEN].shard * psz);
    if (up > max_upload) max_upload = up;
    int64_t unit_padded = (un->g[0].shard + un->g[1].shard) * c->world;
    if (unit_padded > max_unit_padded) max_unit_padded = unit_padded;
  }
  /* FULL_SHARD: the unit in use plus one prefetched (or the last one kept for backward);
   * SHARD_GRAD_OP keeps every unit from its forward to its backward */
  c->n_slots = c->mode == SHARD_GRAD_OP ? (m->n_units > 2 ? m->n_units : 2) : 2;
  if (c->max_live_elems < 2 * max_unit_padded) c->forward_prefetch = c->backward_prefetch = false;
  c->slots = calloc((size_t)c->n_slots, sizeof *c->slots);
  c->slot_owner = calloc((size_t)c->n_slots, sizeof *c->slot_owner);
  if (!c->slots || !c->slot_owner) {
    fsdp_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy." NAME, "cannot allocate the slot tables");
  }
  st_device dev = host->device;
  bool ok = true;
  c->pshard_mem = host->alloc(host, dev, c->pshard_bytes ? c->pshard_bytes : 64, "params");
  c->gshard_mem = host->alloc(host, dev, c->gshard_bytes ? c->gshard_bytes : 64, "grads");
  const char *pin_note = "";
  if (c->off_optim) {
    if (max_tile > (size_t)c->tile) max_tile = (size_t)c->tile;
    c->tile = max_tile > 0 ? (int64_t)max_tile : 1;
    c->gstage_bytes = align64(max_tile * gsz);
    c->pstage_bytes = need_master ? align64(max_tile * psz) : 0;
    if (c->off_param) c->upload_bytes = max_upload;
    /* pinned memory counts against RLIMIT_MEMLOCK: check it before asking, fall back to pageable */
    size_t pinned = c->master_bytes + c->state_bytes + c->hpshard_bytes + c->hparam_bytes +
                    2 * (c->gstage_bytes + c->pstage_bytes);
    struct rlimit rl;
    if (c->pin && dev.type == ST_DEVICE_CPU) {
      c->pin = false; /* host and device are one memory: nothing to pin */
      pin_note = " (pageable: the device is the CPU)";
    } else if (c->pin && getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY &&
               (uint64_t)rl.rlim_cur < (uint64_t)pinned) {
      c->pin = false;
      pin_note = " (pageable: RLIMIT_MEMLOCK too low)";
      if (host->log)
        host->log(host, ST_LOG_WARN, NAME ": pin_memory: the locked-memory limit is %.1f MiB, below the %.1f MiB of "
                  "offloaded state; using pageable host memory (slower copies). Raise `ulimit -l` (or memlock in "
                  "/etc/security/limits.conf) to pin it", (double)rl.rlim_cur / (1 << 20), (double)pinned / (1 << 20));
    }
    c->master_mem = c->master_bytes ? host_mem(c, c->master_bytes, "master") : NULL;
    c->state_mem = c->state_bytes ? host_mem(c, c->state_bytes, "optim") : NULL;
    c->hpshard_mem = c->hpshard_bytes ? host_mem(c, c->hpshard_bytes, "params") : NULL;
    c->hparam_mem = c->hparam_bytes ? host_mem(c, c->hparam_bytes, "master") : NULL;
    ok = (!c->hpshard_bytes || c->hpshard_mem) && (!c->hparam_bytes || c->hparam_mem);
    for (int s = 0; s < 2 && ok; s++) {
      c->gstage[s] = host_mem(c, c->gstage_bytes + 64, "grads");
      c->pstage[s] = c->pstage_bytes ? host_mem(c, c->pstage_bytes, "buffers") : NULL;
      ok = c->gstage[s] && (!c->pstage_bytes || c->pstage[s]);
    }
    c->upload = c->upload_bytes ? calloc((size_t)c->n_slots, sizeof *c->upload) : NULL;
    ok = ok && (!c->upload_bytes || c->upload);
    for (int s = 0; ok && c->upload && s < c->n_slots; s++) {
      c->upload[s] = host->alloc(host, dev, c->upload_bytes, "buffers");
      ok = c->upload[s] != NULL;
    }
  } else {
    c->master_mem = c->master_bytes ? host->alloc(host, dev, c->master_bytes, "master") : NULL;
    c->state_mem = c->state_bytes ? host->alloc(host, dev, c->state_bytes, "optim") : NULL;
  }
  ok = ok && c->pshard_mem && c->gshard_mem && (!c->master_bytes || c->master_mem) &&
       (!c->state_bytes || c->state_mem);
  for (int s = 0; s < c->n_slots && ok; s++) {
    c->slot_owner[s] = -1;
    c->slots[s] = host->alloc(host, dev, c->slot_bytes ? c->slot_bytes : 64, "buffers");
    ok = c->slots[s] != NULL;
  }
  c->gslot_bytes = align64((size_t)max_train_padded * gsz);
  for (int s = 0; s < N_GRAD_SLOTS && ok; s++) {
    grad_slot *gs = &c->gslots[s];
    gs->unit = -1;
    gs->buf = host->alloc(host, dev, c->gslot_bytes ? c->gslot_bytes : 64, "buffers");
    gs->rtmp = host->alloc(host, dev, align64((size_t)max_train_shard * rsz) + 64, "comm");
    c->comm_bytes += align64((size_t)max_train_shard * rsz) + 64;
    ok = gs->buf && gs->rtmp;
    if (ok && cast_reduce) {
      gs->rbuf = host->alloc(host, dev, align64((size_t)max_train_padded * rsz) + 64, "comm");
      gs->gtmp = host->alloc(host, dev, align64((size_t)max_train_shard * gsz) + 64, "comm");
      c->comm_bytes += align64((size_t)max_train_padded * rsz) + align64((size_t)max_train_shard * gsz) + 128;
      ok = gs->rbuf && gs->gtmp;
    }
  }
  if (!ok) {
    size_t total = c->pshard_bytes + c->gshard_bytes + c->master_bytes + c->state_bytes +
                   c->slot_bytes * (size_t)c->n_slots + c->gslot_bytes * N_GRAD_SLOTS;
    if (c->off_optim) {
      size_t on_host = c->master_bytes + c->state_bytes + c->hpshard_bytes + c->hparam_bytes +
                       2 * (c->gstage_bytes + c->pstage_bytes);
      fsdp_finalize(c);
      return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy." NAME,
                          "cannot allocate this rank's state: %.2f GiB on the host (master, optimizer%s, staging) and "
                          "%.2f GiB on the device; add ranks or host memory, use LoRA, or offload_param",
                          (double)on_host / (1 << 30), c->off_param ? ", parameters" : "",
                          (double)(total - c->master_bytes - c->state_bytes) / (1 << 30));
    }
    fsdp_finalize(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy." NAME,
                        "cannot allocate %.2f GiB for this rank's shards and gather buffers; add ranks, use LoRA, or "
                        "an offloading strategy (zero3_offload)",
                        (double)total / (1 << 30));
  }
  const st_ops *ops = host->ops;
  r = ops->fill(ops, ST_U8, c->pshard_mem, (int64_t)(c->pshard_bytes ? c->pshard_bytes : 64), 0.0);
  if (r == ST_OK) r = ops->fill(ops, ST_U8, c->gshard_mem, (int64_t)(c->gshard_bytes ? c->gshard_bytes : 64), 0.0);
  const st_ops *mops = c->off_optim ? host->cpu_ops : ops;
  if (r == ST_OK && c->master_mem) r = mops->fill(mops, ST_U8, c->master_mem, (int64_t)c->master_bytes, 0.0);
  if (r == ST_OK && c->state_mem) r = mops->fill(mops, ST_U8, c->state_mem, (int64_t)c->state_bytes, 0.0);
  if (r == ST_OK && c->hpshard_mem) r = mops->fill(mops, ST_U8, c->hpshard_mem, (int64_t)c->hpshard_bytes, 0.0);
  if (r == ST_OK && c->hparam_mem) r = mops->fill(mops, ST_U8, c->hparam_mem, (int64_t)c->hparam_bytes, 0.0);
  if (r != ST_OK) {
    fsdp_finalize(c);
    return st_error_set(err, r, "strategy." NAME, "cannot clear the shards");
  }
  for (int j = 0; j < c->n_params; j++) {
    fsdp_param *p = &c->params[j];
    c->windows[j] = st_tensor_make(NULL, setup->param_dtype, dev, p->desc->ndim, p->desc->shape);
    c->grad_windows[j] = st_tensor_make(NULL, setup->grad_dtype, dev, p->desc->ndim, p->desc->shape);
  }
  if (host->log)
    host->log(host, ST_LOG_INFO, NAME ": rank %d of %d, %s, %d gather slot(s) of %.1f MiB, prefetch %s/%s, %d "
              "parameter(s) of <= %lld elements kept whole; a unit's gradients are reduce-scattered as one bucket",
              c->rank, c->world, c->mode == SHARD_FULL ? "FULL_SHARD" : "SHARD_GRAD_OP", c->n_slots,
              (double)c->slot_bytes / (1 << 20), c->forward_prefetch ? "forward" : "-",
              c->backward_prefetch ? "backward" : "-", n_persist, (long long)c->persist_elems);
  if (ST_FSDP_OFFLOAD && host->log) {
    if (!c->off_optim)
      host->log(host, ST_LOG_WARN, NAME ": offload_optimizer and offload_param are both \"none\": nothing is "
                "offloaded, this runs exactly like \"fsdp\"");
    else
      host->log(host, ST_LOG_INFO, NAME ": on the host%s: %.1f MiB (fp32 master %.1f, optimizer %.1f, parameters "
                "%.1f, staging %.1f); on the device: parameters %.1f MiB, gradients %.1f MiB, buffers %.1f MiB; "
                "optimizer tiles of %lld elements (sub_group_size), time breakdown every %lld step(s)",
                pin_note[0] ? pin_note : c->pin ? " (pinned)" : "",
                (double)(c->master_bytes + c->state_bytes + c->hpshard_bytes + c->hparam_bytes +
                         2 * (c->gstage_bytes + c->pstage_bytes)) / (1 << 20),
                (double)(c->master_bytes + c->hparam_bytes) / (1 << 20), (double)c->state_bytes / (1 << 20),
                (double)c->hpshard_bytes / (1 << 20), (double)(2 * (c->gstage_bytes + c->pstage_bytes)) / (1 << 20),
                (double)c->pshard_bytes / (1 << 20), (double)c->gshard_bytes / (1 << 20),
                (double)(c->slot_bytes * (size_t)c->n_slots + c->gslot_bytes * N_GRAD_SLOTS +
                         c->upload_bytes * (size_t)c->n_slots) / (1 << 20),
                (long long)max_tile, (long long)c->report_steps);
  }
  *out = c;
  return ST_OK;
}

/* ---- gathering ---------------------------------------------------------------------------- */

static st_result check_unit(fsdp_ctx *c, int unit, st_error *err) {
  if (unit < 0 || unit >= c->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "strategy." NAME, "unit %d out of range [0, %d)", unit, c->n_units);
  return ST_OK;
}

static st_result wait_gather(fsdp_ctx *c, fsdp_unit *un, st_error *err) {
  for (int g = 0; g < 2; g++) {
    if (!un->greq[g]) continue;
    st_comm_request *req = un->greq[g];
    un->greq[g] = NULL;
    st_result r = c->comm->wait(req, err);
    if (r != ST_OK) return st_error_prefix(err, NAME ": waiting for a parameter all-gather: ");
  }
  return ST_OK;
}

static st_result release(fsdp_ctx *c, int u, st_error *err) {
  fsdp_unit *un = &c->units[u];
  if (un->slot < 0) return ST_OK;
  ST_CHECK(wait_gather(c, un, err));
  c->slot_owner[un->slot] = -1;
  un->slot = -1;
  return ST_OK;
}

static st_result release_all(fsdp_ctx *c, st_error *err) {
  for (int u = 0; u < c->n_units; u++) ST_CHECK(release(c, u, err));
  return ST_OK;
}

/* A slot for unit u: a free one, or (when evict) one whose unit has no open window. -1: none. */
static st_result take_slot(fsdp_ctx *c, int u, bool evict, int *out, st_error *err) {
  *out = -1;
  for (int s = 0; s < c->n_slots; s++)
    if (c->slot_owner[s] < 0) {
      *out = s;
      break;
    }
  for (int s = 0; *out < 0 && evict && s < c->n_slots; s++)
    if (!c->units[c->slot_owner[s]].open) {
      ST_CHECK(release(c, c->slot_owner[s], err));
      *out = s;
    }
  if (*out >= 0) {
    c->slot_owner[*out] = u;
    c->units[u].slot = *out;
  }
  return ST_OK;
}

/* start (async) or do the all-gathers that fill unit u's slot */
static st_result gather(fsdp_ctx *c, int u, bool async, st_error *err) {
  fsdp_unit *un = &c->units[u];
  const st_ops *ops = c->host->ops;
  st_dtype pdt = c->setup.param_dtype;
  size_t psz = st_dtype_size(pdt);
  char *slot = c->slots[un->slot];
  for (int g = 0; g < 2; g++) {
    fsdp_group *gr = &un->g[g];
    if (gr->shard == 0) continue;
    char *send = pshard_of(c, gr), *recv = slot + gr->slot_off;
    if (gr->p_host) { /* offload_param: up to the device first, the collective's input */
      char *up = c->upload[un->slot] + (g == G_FROZEN ? align64((size_t)un->g[G_TRAIN].shard * psz) : 0);
      double t0 = now_s();
      ST_CHECK(ops->copy(ops, up, c->host->device, send, c->hdev, (size_t)gr->shard * psz));
      c->tm.upload += now_s() - t0;
      c->tm.upload_bytes += (int64_t)((size_t)gr->shard * psz);
      send = up;
    }
    if (c->world == 1) {
      ST_CHECK(ops->copy(ops, recv, c->host->device, send, c->host->device, (size_t)gr->shard * psz));
      continue;
    }
    st_result r = c->comm->all_gather(c->group, send, recv, gr->shard, pdt, async && c->overlap ? &un->greq[g] : NULL, err);
    if (r != ST_OK) {
      return st_error_prefix(err, NAME ": all-gather of unit %d (%lld elements per rank): ", u, (long long)gr->shard);
    }
  }
  return ST_OK;
}

static void point_windows(fsdp_ctx *c, int u) {
  fsdp_unit *un = &c->units[u];
  size_t psz = st_dtype_size(c->setup.param_dtype);
  char *slot = c->slots[un->slot];
  for (int k = 0; k < un->n; k++) {
    fsdp_param *p = &c->params[un->first + k];
    fsdp_group *g = &un->g[p->group];
    c->windows[un->first + k].data = p->group == G_PERSIST ? pshard_of(c, g) + (size_t)p->flat_off * psz
                                                            : slot + g->slot_off + (size_t)p->flat_off * psz;
  }
}

/* make unit u's full parameters available (blocking) */
static st_result acquire(fsdp_ctx *c, int u, st_error *err) {
  fsdp_unit *un = &c->units[u];
  if (un->slot < 0) {
    int s;
    ST_CHECK(take_slot(c, u, true, &s, err));
    if (s < 0)
      return st_error_set(err, ST_ERR_INTERNAL, "strategy." NAME, "no gather slot for unit %d: every slot holds an open "
                          "window (a pre_forward/pre_backward without its post_* call?)", u);
    ST_CHECK(gather(c, u, false, err));
  }
  ST_CHECK(wait_gather(c, un, err));
  point_windows(c, u);
  return ST_OK;
}

/* start gathering unit u if a slot is free; never evicts */
static st_result prefetch(fsdp_ctx *c, int u, st_error *err) {
  fsdp_unit *un = &c->units[u];
  if (un->slot >= 0) return ST_OK;
  if ((un->g[0].shard + un->g[1].shard) * c->world > c->prefetch_elems) return ST_OK;
  int s;
  ST_CHECK(take_slot(c, u, false, &s, err));
  return s < 0 ? ST_OK : gather(c, u, true, err);
}

static int unit_at(const fsdp_ctx *c, int pos) { return c->setup.unit_order ? c->setup.unit_order[pos] : pos; }

static st_result fsdp_pre_forward_impl(void *vctx, int unit, const st_tensor **params, st_error *err) {
  fsdp_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  ST_CHECK(acquire(c, unit, err));
  c->units[unit].open = true;
  int pos = c->order_pos[unit];
  if (c->forward_prefetch && !c->in_backward && pos + 1 < c->n_units) ST_CHECK(prefetch(c, unit_at(c, pos + 1), err));
  *params = &c->windows[c->units[unit].first];
  return ST_OK;
}

static st_result fsdp_post_forward(void *vctx, int unit, st_error *err) {
  fsdp_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  c->units[unit].open = false;
  bool last = c->order_pos[unit] == c->n_units - 1;
  if (c->mode == SHARD_FULL && !c->in_backward && !last) return release(c, unit, err);
  return ST_OK;
}

/* ---- gradients ---------------------------------------------------------------------------- */

/* wait for gradient slot s's reduction and fold it into the unit's gradient shard */
static st_result finish_grad_slot(fsdp_ctx *c, int s, st_error *err) {
  grad_slot *gs = &c->gslots[s];
  if (gs->unit < 0) return ST_OK;
  fsdp_unit *un = &c->units[gs->unit];
  fsdp_group *g = &un->g[G_TRAIN];
  gs->unit = -1;
  if (gs->req) {
    st_comm_request *req = gs->req;
    gs->req = NULL;
    st_result r = c->comm->wait(req, err);
    if (r != ST_OK) return st_error_prefix(err, NAME ": waiting for a gradient reduce-scatter: ");
  }
  if (gs->direct) return ST_OK;
  const st_ops *ops = c->host->ops;
  st_dtype gdt = c->setup.grad_dtype;
  void *dst = c->gshard_mem + g->gshard_off;
  const void *src = gs->rtmp;
  if (c->reduce_dtype != gdt) {
    ST_CHECK(ops->cast(ops, c->reduce_dtype, gs->rtmp, gdt, gs->gtmp, g->shard));
    src = gs->gtmp;
  }
  if (un->grad_fresh)
    ST_CHECK(ops->copy(ops, dst, c->host->device, src, c->host->device, (size_t)g->shard * st_dtype_size(gdt)));
  else
    ST_CHECK(ops->axpy(ops, gdt, g->shard, 1.0, src, dst));
  un->grad_fresh = false;
  return ST_OK;
}

/* average unit u's persistent gradients over the group (in place, like a DDP bucket) */
static st_result reduce_persistent(fsdp_ctx *c, int u, bool async, st_error *err) {
  fsdp_unit *un = &c->units[u];
  if (un->persist_reduced) return ST_OK;
  un->persist_reduced = true;
  if (c->world == 1) return ST_OK;
  fsdp_group *pg = &un->g[G_PERSIST];
  void *pgrad = c->gshard_mem + pg->gshard_off;
  st_result r = c->comm->all_reduce(c->group, pgrad, pgrad, pg->shard, c->setup.grad_dtype, ST_REDUCE_AVG,
                                    async ? &un->preq : NULL, err);
  if (r != ST_OK) return st_error_prefix(err, NAME ": all-reduce of unit %d's persistent gradients: ", u);
  return ST_OK;
}

/* Wait for every gradient reduction. complete: also reduce, in backward order, the persistent
 * gradients of units whose last micro-step never reported (what the step is about to use). */
static st_result finish_all_grads(fsdp_ctx *c, bool complete, st_error *err) {
  /* in launch order, so every rank waits in the same order */
  for (int k = 0; k < N_GRAD_SLOTS; k++) ST_CHECK(finish_grad_slot(c, (c->next_gslot + k) % N_GRAD_SLOTS, err));
  for (int o = c->n_units - 1; o >= 0 && complete; o--)
    if (c->units[unit_at(c, o)].persist_grads) ST_CHECK(reduce_persistent(c, unit_at(c, o), false, err));
  for (int o = c->n_units - 1; o >= 0; o--) {
    fsdp_unit *un = &c->units[unit_at(c, o)];
    if (!un->preq) continue;
    st_comm_request *req = un->preq;
    un->preq = NULL;
    st_result r = c->comm->wait(req, err);
    if (r != ST_OK) return st_error_prefix(err, NAME ": waiting for a persistent-gradient all-reduce: ");
  }
  return ST_OK;
}

static st_result fsdp_pre_backward_impl(void *vctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err) {
  fsdp_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  fsdp_unit *un = &c->units[unit];
  c->in_backward = true;
  ST_CHECK(acquire(c, unit, err));
  un->open = true;
  fsdp_group *g = &un->g[G_TRAIN];
  size_t gsz = st_dtype_size(c->setup.grad_dtype);
  for (int k = 0; k < un->n; k++) c->grad_windows[un->first + k].data = NULL;
  if (g->shard > 0) {
    int s = c->next_gslot;
    c->next_gslot = (s + 1) % N_GRAD_SLOTS;
    ST_CHECK(finish_grad_slot(c, s, err));
    un->gslot = s;
    const st_ops *ops = c->host->ops;
    ST_CHECK(ops->fill(ops, c->setup.grad_dtype, c->gslots[s].buf, g->shard * c->world, 0.0));
    for (int k = 0; k < un->n; k++) {
      fsdp_param *p = &c->params[un->first + k];
      if (p->group == G_TRAIN) c->grad_windows[un->first + k].data = c->gslots[s].buf + (size_t)p->flat_off * gsz;
    }
  }
  if (un->persist_grads) {
    /* persistent gradients accumulate in place over micro-steps, like DDP's */
    if (un->persist_reduced)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "strategy." NAME, "backward of unit %d after its persistent "
                          "gradients were handed to the all-reduce on this step's last micro-step", unit);
    fsdp_group *pg = &un->g[G_PERSIST];
    for (int k = 0; k < un->n; k++) {
      fsdp_param *p = &c->params[un->first + k];
      if (p->group == G_PERSIST && (p->desc->flags & ST_PARAM_TRAINABLE))
        c->grad_windows[un->first + k].data = c->gshard_mem + pg->gshard_off + (size_t)p->flat_off * gsz;
    }
  }
  int pos = c->order_pos[unit];
  if (c->backward_prefetch && pos > 0) ST_CHECK(prefetch(c, unit_at(c, pos - 1), err));
  *params = &c->windows[un->first];
  *grads = &c->grad_windows[un->first];
  return ST_OK;
}

/* Sharded gradients are reduce-scattered every micro-step (ZeRO-3: memory stays sharded);
 * persistent ones are all-reduced on the last micro-step only. */
static st_result fsdp_post_backward_impl(void *vctx, int unit, bool last, st_error *err) {
  fsdp_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  fsdp_unit *un = &c->units[unit];
  un->open = false;
  if (un->gslot >= 0) {
    grad_slot *gs = &c->gslots[un->gslot];
    fsdp_group *g = &un->g[G_TRAIN];
    st_dtype gdt = c->setup.grad_dtype, rdt = c->reduce_dtype;
    const st_ops *ops = c->host->ops;
    gs->unit = unit;
    gs->direct = un->grad_fresh && rdt == gdt;
    void *dst = gs->direct ? (void *)(c->gshard_mem + g->gshard_off) : gs->rtmp;
    const void *send = gs->buf;
    if (rdt != gdt) {
      ST_CHECK(ops->cast(ops, gdt, gs->buf, rdt, gs->rbuf, g->shard * c->world));
      send = gs->rbuf;
    }
    if (c->world == 1) {
      ST_CHECK(ops->copy(ops, dst, c->host->device, send, c->host->device, (size_t)g->shard * st_dtype_size(rdt)));
    } else {
      st_result r = c->comm->reduce_scatter(c->group, send, dst, g->shard, rdt, ST_REDUCE_AVG,
                                            c->overlap ? &gs->req : NULL, err);
      if (r != ST_OK)
        return st_error_prefix(err, NAME ": reduce-scatter of unit %d's gradients (%lld elements per rank): ", unit,
                               (long long)g->shard);
    }
    if (gs->direct) un->grad_fresh = false;
    un->gslot = -1;
  }
  if (un->persist_grads && last) ST_CHECK(reduce_persistent(c, unit, c->overlap, err));
  if (c->order_pos[unit] == 0) c->in_backward = false;
  return release(c, unit, err);
}

static st_result fsdp_grad_norm_sq_impl(void *vctx, double *out, st_error *err) {
  fsdp_ctx *c = vctx;
  ST_CHECK(finish_all_grads(c, true, err));
  const st_ops *ops = c->host->ops;
  double local = 0.0;
  for (int u = 0; u < c->n_units; u++) {
    fsdp_group *g = &c->units[u].g[G_TRAIN];
    if (g->shard == 0 || c->units[u].grad_fresh) continue;
    double s = 0.0;
    st_result r = ops->sumsq(ops, c->setup.grad_dtype, c->gshard_mem + g->gshard_off, g->shard, &s);
    if (r != ST_OK) return st_error_set(err, r, "strategy." NAME, "gradient norm failed: %s", st_result_string(r));
    local += s;
  }
  for (int u = 0; u < c->n_units && c->rank == 0; u++) { /* replicated: counted once, on rank 0 */
    fsdp_group *g = &c->units[u].g[G_PERSIST];
    if (!c->units[u].persist_grads) continue;
    double s = 0.0;
    st_result r = ops->sumsq(ops, c->setup.grad_dtype, c->gshard_mem + g->gshard_off, g->shard, &s);
    if (r != ST_OK) return st_error_set(err, r, "strategy." NAME, "gradient norm failed: %s", st_result_string(r));
    local += s;
  }
  if (c->world > 1) {
    double total = local;
    st_result r = c->comm->all_reduce(c->group, &local, &total, 1, ST_F64, ST_REDUCE_SUM, NULL, err);
    if (r != ST_OK) return st_error_prefix(err, NAME ": all-reduce of the gradient norm: ");
    local = total;
  }
  *out = local;
  return ST_OK;
}

/* zero3_offload times the strategy's side of every window: gathers (with the offload_param uploads)
 * and gradient reductions (with the waits for them and the norm's all-reduce) */
static st_result fsdp_pre_forward(void *vctx, int unit, const st_tensor **params, st_error *err) {
  if (!ST_FSDP_OFFLOAD) return fsdp_pre_forward_impl(vctx, unit, params, err);
  double t0 = now_s();
  st_result r = fsdp_pre_forward_impl(vctx, unit, params, err);
  ((fsdp_ctx *)vctx)->tm.gather += now_s() - t0;
  return r;
}

static st_result fsdp_pre_backward(void *vctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err) {
  if (!ST_FSDP_OFFLOAD) return fsdp_pre_backward_impl(vctx, unit, params, grads, err);
  double t0 = now_s();
  st_result r = fsdp_pre_backward_impl(vctx, unit, params, grads, err);
  ((fsdp_ctx *)vctx)->tm.gather += now_s() - t0;
  return r;
}

static st_result fsdp_post_backward(void *vctx, int unit, bool last, st_error *err) {
  if (!ST_FSDP_OFFLOAD) return fsdp_post_backward_impl(vctx, unit, last, err);
  double t0 = now_s();
  st_result r = fsdp_post_backward_impl(vctx, unit, last, err);
  ((fsdp_ctx *)vctx)->tm.reduce += now_s() - t0;
  return r;
}

static st_result fsdp_grad_norm_sq(void *vctx, double *out, st_error *err) {
  if (!ST_FSDP_OFFLOAD) return fsdp_grad_norm_sq_impl(vctx, out, err);
  double t0 = now_s();
  st_result r = fsdp_grad_norm_sq_impl(vctx, out, err);
  ((fsdp_ctx *)vctx)->tm.reduce += now_s() - t0;
  return r;
}

/* ---- the segments of this rank's shard: (param, offset in the param, count, offset in the shard) */

typedef struct segment {
  fsdp_param *p;
  int64_t param_off, count, shard_off;
} segment;

/* the k-th parameter of unit u restricted to this rank's shard of its group; false when empty */
static bool segment_of(fsdp_ctx *c, fsdp_unit *un, int k, segment *out) {
  fsdp_param *p = &c->params[un->first + k];
  int64_t shard = un->g[p->group].shard;
  int64_t mine_lo = p->group == G_PERSIST ? 0 : (int64_t)c->rank * shard, mine_hi = mine_lo + shard;
  int64_t lo = p->flat_off > mine_lo ? p->flat_off : mine_lo;
  int64_t hi = p->flat_off + p->numel < mine_hi ? p->flat_off + p->numel : mine_hi;
  if (hi <= lo) return false;
  *out = (segment){.p = p, .param_off = lo - p->flat_off, .count = hi - lo, .shard_off = lo - mine_lo};
  return true;
}

/* parameter k of the unit is updated by this strategy (trainable, sharded or persistent) */
static bool owns_update(const fsdp_ctx *c, const fsdp_unit *un, int k) {
  return (c->params[un->first + k].desc->flags & ST_PARAM_TRAINABLE) != 0;
}

static float *state_ptr(fsdp_ctx *c, fsdp_group *g, int k) {
  return (float *)(c->state_mem + g->state_off + (size_t)k * align64((size_t)g->shard * sizeof(float)));
}

static st_result zero_grads(fsdp_ctx *c) {
  const st_ops *ops = c->host->ops;
  for (int u = 0; u < c->n_units; u++) {
    c->units[u].grad_fresh = true;
    c->units[u].persist_reduced = false;
  }
  c->in_backward = false;
  return c->gshard_bytes ? ops->fill(ops, ST_U8, c->gshard_mem, (int64_t)c->gshard_bytes, 0.0) : ST_OK;
}

/* One trainable group under offload_optimizer, streamed in tiles of c->tile elements of the shard:
 * the gradient tile goes D2H into host staging buffer k % 2 (tile k+1's copy is issued before tile
 * k's update, so with asynchronous copies it overlaps the CPU step), the CPU optimizer updates the
 * host master/state and the host param target, and the updated window-dtype elements go H2D into
 * the device shard (not under offload_param: the host shard is the one gathered). Only the elements
 * of trainable parameters are updated and copied up: alignment gaps stay zero and frozen persistent
 * parameters keep their values. Per element this is exactly fsdp's update (same kernel, same
 * inputs), only the memory it reads and writes differs. */
/* gradient tile q of group g (elements [q tile, (q + 1) tile) of the shard) into host staging q % 2 */
static st_result d2h_tile(fsdp_ctx *c, fsdp_unit *un, fsdp_group *g, int64_t q, int64_t tile, st_error *err) {
  const st_ops *ops = c->host->ops;
  size_t gsz = st_dtype_size(c->setup.grad_dtype);
  int64_t lo = q * tile, hi = lo + tile < g->shard ? lo + tile : g->shard;
  double t0 = now_s();
  st_result r = ops->copy(ops, c->gstage[q % 2], c->hdev, c->gshard_mem + g->gshard_off + (size_t)lo * gsz,
                          c->host->device, (size_t)(hi - lo) * gsz);
  c->tm.d2h += now_s() - t0;
  c->tm.d2h_bytes += (int64_t)((size_t)(hi - lo) * gsz);
  if (r != ST_OK)
    return st_error_set(err, r, "strategy." NAME, "gradient copy to the host (tile %lld of unit %d) failed: %s",
                        (long long)q, (int)(un - c->units), st_result_string(r));
  return ST_OK;
}

static st_result offload_group_step(fsdp_ctx *c, fsdp_unit *un, int gi, const st_step_args *a, st_error *err) {
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  fsdp_group *g = &un->g[gi];
  st_dtype pdt = c->setup.param_dtype, gdt = c->setup.grad_dtype;
  size_t psz = st_dtype_size(pdt), gsz = st_dtype_size(gdt);
  int64_t tile = c->tile; /* init clamped it to the largest trainable shard: the staging size */
  int64_t n_tiles = (g->shard + tile - 1) / tile;
  double t0;
  for (int64_t t = 0; t < n_tiles; t++) {
    int64_t lo = t * tile, hi = lo + tile < g->shard ? lo + tile : g->shard;
    if (t == 0) ST_CHECK(d2h_tile(c, un, g, 0, tile, err));
    if (t + 1 < n_tiles) ST_CHECK(d2h_tile(c, un, g, t + 1, tile, err)); /* the next tile's copy goes first */
    const char *gtile = c->gstage[t % 2];
    for (int k = 0; k < un->n; k++) {
      segment sg;
      if (c->params[un->first + k].group != gi || !owns_update(c, un, k) || !segment_of(c, un, k, &sg)) continue;
      int64_t b = sg.shard_off > lo ? sg.shard_off : lo;
      int64_t e = sg.shard_off + sg.count < hi ? sg.shard_off + sg.count : hi;
      if (e <= b) continue;
      /* where the CPU writes the window-dtype value: the host shard, the host copy, or a staging tile */
      char *pdst = g->p_host ? pshard_of(c, g) + (size_t)b * psz
                   : g->hparam_off != SIZE_MAX ? c->hparam_mem + g->hparam_off + (size_t)b * psz
                                               : c->pstage[t % 2] + (size_t)(b - lo) * psz;
      st_optim_desc d = {
          .n = e - b,
          .param = pdst,
          .param_dtype = pdt,
          .master = g->master_off != SIZE_MAX ? (float *)(c->master_mem + g->master_off) + b : NULL,
          .grad = gtile + (size_t)(b - lo) * gsz,
          .grad_dtype = gdt,
          .exp_avg = c->n_states > 0 ? state_ptr(c, g, 0) + b : NULL,
          .exp_avg_sq = c->n_states > 1 ? state_ptr(c, g, 1) + b : NULL,
          .lr = a->lr,
          .weight_decay = (sg.p->desc->flags & ST_PARAM_NO_DECAY) ? 0.0 : 1.0,
          .step = a->step,
          .grad_scale = a->grad_scale,
      };
      t0 = now_s();
      st_result r = h->optim_update(h, c->hdev, &d, err);
      c->tm.adam += now_s() - t0;
      c->tm.adam_elems += e - b;
      if (r != ST_OK)
        return st_error_prefix(err, "%s[%lld:%lld] (CPU optimizer): ", sg.p->desc->name,
                               (long long)(sg.param_off + b - sg.shard_off), (long long)(sg.param_off + e - sg.shard_off));
      if (g->p_host) continue;
      t0 = now_s();
      r = ops->copy(ops, pshard_of(c, g) + (size_t)b * psz, h->device, pdst, c->hdev, (size_t)(e - b) * psz);
      c->tm.h2d += now_s() - t0;
      c->tm.h2d_bytes += (int64_t)((size_t)(e - b) * psz);
      if (r != ST_OK)
        return st_error_set(err, r, sg.p->desc->name, "parameter copy to the device failed: %s", st_result_string(r));
    }
  }
  return ST_OK;
}

static void offload_report(fsdp_ctx *c, const offload_times *t, const char *what) {
  if (!c->host->log || c->rank != 0 || t->steps == 0) return;
  double n = (double)t->steps, ms = 1e3 / n;
  double strat = t->gather + t->reduce + t->d2h + t->adam + t->h2d;
  double other = t->wall > strat ? t->wall - strat : 0.0;
  c->host->log(c->host, ST_LOG_INFO, NAME ": %s (%lld step(s)), per step: gather %.2f ms (of which parameter "
               "upload %.2f ms, %.1f MB), reduce-scatter %.2f ms, gradient D2H %.2f ms (%.1f MB), CPU %s %.2f ms "
               "(%.1f M elements/s), parameter H2D %.2f ms (%.1f MB), forward/backward compute and idle %.2f ms",
               what, (long long)t->steps, t->gather * ms, t->upload * ms, (double)t->upload_bytes / n / 1e6,
               t->reduce * ms, t->d2h * ms,
               (double)t->d2h_bytes / n / 1e6, "optimizer", t->adam * ms,
               t->adam > 0 ? (double)t->adam_elems / t->adam / 1e6 : 0.0, t->h2d * ms,
               (double)t->h2d_bytes / n / 1e6, other * ms);
}

static void add_times(offload_times *dst, const offload_times *s) {
  dst->gather += s->gather;
  dst->reduce += s->reduce;
  dst->d2h += s->d2h;
  dst->adam += s->adam;
  dst->h2d += s->h2d;
  dst->upload += s->upload;
  dst->wall += s->wall;
  dst->steps += s->steps;
  dst->adam_elems += s->adam_elems;
  dst->d2h_bytes += s->d2h_bytes;
  dst->h2d_bytes += s->h2d_bytes;
  dst->upload_bytes += s->upload_bytes;
}

/* after an update (or a skipped one): close the step's timing window, report every report_steps */
static void offload_step_done(fsdp_ctx *c, int64_t step) {
  double now = now_s();
  if (c->last_step_end > 0) c->tm.wall += now - c->last_step_end;
  else c->tm.wall += c->tm.gather + c->tm.reduce + c->tm.d2h + c->tm.adam + c->tm.h2d; /* first: no start mark */
  c->last_step_end = now;
  c->tm.steps++;
  if (c->report_steps > 0 && step > 0 && step % c->report_steps == 0) {
    char what[64];
    snprintf(what, sizeof what, "steps %lld-%lld", (long long)(step - c->tm.steps + 1), (long long)step);
    offload_report(c, &c->tm, what);
    add_times(&c->tm_total, &c->tm);
    c->tm = (offload_times){0};
  }
}

static st_result fsdp_step(void *vctx, const st_step_args *a, st_error *err) {
  fsdp_ctx *c = vctx;
  ST_CHECK(finish_all_grads(c, true, err));
  ST_CHECK(release_all(c, err)); /* gathered copies are stale after the update */
  const st_host *h = c->host;
  size_t psz = st_dtype_size(c->setup.param_dtype), gsz = st_dtype_size(c->setup.grad_dtype);
  if (c->off_optim) {
    for (int u = 0; u < c->n_units; u++) {
      fsdp_unit *un = &c->units[u];
      for (int gi = 0; gi < N_GROUPS; gi++)
        if (un->g[gi].shard > 0 && un->g[gi].state_off != SIZE_MAX) ST_CHECK(offload_group_step(c, un, gi, a, err));
    }
    offload_step_done(c, a->step);
    return zero_grads(c);
  }
  for (int u = 0; u < c->n_units && !c->off_optim; u++) {
    fsdp_unit *un = &c->units[u];
    for (int k = 0; k < un->n; k++) {
      segment sg;
      if (!owns_update(c, un, k) || !segment_of(c, un, k, &sg)) continue;
      fsdp_group *g = &un->g[sg.p->group];
      st_optim_desc d = {
          .n = sg.count,
          .param = c->pshard_mem + g->pshard_off + (size_t)sg.shard_off * psz,
          .param_dtype = c->setup.param_dtype,
          .master = g->master_off != SIZE_MAX ? (float *)(c->master_mem + g->master_off) + sg.shard_off : NULL,
          .grad = c->gshard_mem + g->gshard_off + (size_t)sg.shard_off * gsz,
          .grad_dtype = c->setup.grad_dtype,
          .exp_avg = c->n_states > 0 ? state_ptr(c, g, 0) + sg.shard_off : NULL,
          .exp_avg_sq = c->n_states > 1 ? state_ptr(c, g, 1) + sg.shard_off : NULL,
          .lr = a->lr,
          .weight_decay = (sg.p->desc->flags & ST_PARAM_NO_DECAY) ? 0.0 : 1.0,
          .step = a->step,
          .grad_scale = a->grad_scale,
      };
      st_result r = h->optim_update(h, h->device, &d, err);
      if (r != ST_OK) return st_error_prefix(err, "%s[%lld:%lld]: ", sg.p->desc->name, (long long)sg.param_off,
                                             (long long)(sg.param_off + sg.count));
    }
  }
  return zero_grads(c);
}

static st_result fsdp_skip_step(void *vctx, st_error *err) {
  fsdp_ctx *c = vctx;
  ST_CHECK(finish_all_grads(c, true, err));
  if (c->off_optim) offload_step_done(c, 0);
  return zero_grads(c);
}

/* ---- checkpoints -------------------------------------------------------------------------- */

static st_dtype io_dtype(const fsdp_ctx *c) { return c->setup.param_dtype == ST_F64 ? ST_F64 : ST_F32; }

static st_result fsdp_state_save(void *vctx, st_state_writer *w, st_error *err) {
  fsdp_ctx *c = vctx;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c), pdt = c->setup.param_dtype;
  size_t iosz = st_dtype_size(io), psz = st_dtype_size(pdt);
  st_result r = ST_OK;
  for (int u = 0; u < c->n_units && r == ST_OK; u++) {
    fsdp_unit *un = &c->units[u];
    for (int k = 0; k < un->n && r == ST_OK; k++) {
      segment sg;
      if (!owns_update(c, un, k) || !segment_of(c, un, k, &sg)) continue;
      if (sg.p->group == G_PERSIST && c->rank != 0) continue; /* replicated: rank 0 writes it */
      fsdp_group *g = &un->g[sg.p->group];
      size_t bytes = (size_t)sg.count * (iosz > sizeof(float) ? iosz : sizeof(float));
      void *buf = h->alloc(h, cpu, bytes, "checkpoint");
      if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, sg.p->desc->name, "no host memory to stage a checkpoint");
      if (g->master_off != SIZE_MAX)
        r = ops->copy(ops, buf, cpu, (float *)(c->master_mem + g->master_off) + sg.shard_off, c->mdev,
                      (size_t)sg.count * sizeof(float));
      else if (g->hparam_off != SIZE_MAX) /* offload: the host copy the optimizer updates */
        r = h->cpu_ops->cast(h->cpu_ops, pdt, c->hparam_mem + g->hparam_off + (size_t)sg.shard_off * psz, io, buf,
                             sg.count);
      else if (g->p_host)
        r = h->cpu_ops->cast(h->cpu_ops, pdt, pshard_of(c, g) + (size_t)sg.shard_off * psz, io, buf, sg.count);
      else
        r = ops->cast(ops, pdt, pshard_of(c, g) + (size_t)sg.shard_off * psz, io, buf, sg.count);
      if (r == ST_OK) r = w->write(w, sg.p->desc, ST_STATE_PARAM, sg.param_off, sg.count, io, buf, err);
      for (int s = 0; s < c->n_states && r == ST_OK; s++) {
        r = ops->copy(ops, buf, cpu, state_ptr(c, g, s) + sg.shard_off, c->mdev, (size_t)sg.count * sizeof(float));
        if (r == ST_OK)
          r = w->write(w, sg.p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + s), sg.param_off, sg.count, ST_F32, buf, err);
      }
      h->free(h, cpu, buf);
    }
  }
  return r;
}


static st_result fsdp_state_load(void *vctx, st_state_reader *rd, st_error *err) {
  fsdp_ctx *c = vctx;
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c), pdt = c->setup.param_dtype;
  size_t iosz = st_dtype_size(io), psz = st_dtype_size(pdt);
  ST_CHECK(finish_all_grads(c, false, err));
  ST_CHECK(release_all(c, err));
  st_result r = ST_OK;
  for (int u = 0; u < c->n_units && r == ST_OK; u++) {
    fsdp_unit *un = &c->units[u];
    for (int k = 0; k < un->n && r == ST_OK; k++) {
      segment sg;
      if (!segment_of(c, un, k, &sg)) continue;
      fsdp_group *g = &un->g[sg.p->group];
      size_t bytes = (size_t)sg.count * (iosz > sizeof(float) ? iosz : sizeof(float));
      void *buf = h->alloc(h, cpu, bytes, "checkpoint");
      if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, sg.p->desc->name, "no host memory to stage a checkpoint");
      r = rd->read(rd, sg.p->desc, ST_STATE_PARAM, sg.param_off, sg.count, io, buf, err);
      if (r != ST_OK) r = read_failed(err, r, NAME, sg.p->desc, ST_STATE_PARAM, sg.param_off, sg.count);
      if (r == ST_OK && g->master_off != SIZE_MAX)
        r = ops->copy(ops, (float *)(c->master_mem + g->master_off) + sg.shard_off, c->mdev, buf, cpu,
                      (size_t)sg.count * sizeof(float));
      char *pdst = pshard_of(c, g) + (size_t)sg.shard_off * psz;
      if (r == ST_OK && g->hparam_off != SIZE_MAX) { /* offload: the host copy, then the device shard from it */
        char *hp = c->hparam_mem + g->hparam_off + (size_t)sg.shard_off * psz;
        r = h->cpu_ops->cast(h->cpu_ops, io, buf, pdt, hp, sg.count);
        if (r == ST_OK) r = ops->copy(ops, pdst, h->device, hp, c->hdev, (size_t)sg.count * psz);
      } else if (r == ST_OK && g->p_host) {
        r = h->cpu_ops->cast(h->cpu_ops, io, buf, pdt, pdst, sg.count);
      } else if (r == ST_OK) {
        r = ops->cast(ops, io, buf, pdt, pdst, sg.count);
      }
      for (int s = 0; s < c->n_states && r == ST_OK && owns_update(c, un, k); s++) {
        float *dst = state_ptr(c, g, s) + sg.shard_off;
        r = rd->read(rd, sg.p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + s), sg.param_off, sg.count, ST_F32, buf, err);
        if (r == ST_ERR_NOT_FOUND) {
          st_error_clear(err);
          const st_ops *mops = c->off_optim ? h->cpu_ops : ops;
          r = mops->fill(mops, ST_F32, dst, sg.count, 0.0);
        } else if (r == ST_OK) {
          r = ops->copy(ops, dst, c->mdev, buf, cpu, (size_t)sg.count * sizeof(float));
        } else {
          r = read_failed(err, r, NAME, sg.p->desc, (st_state_kind)(ST_STATE_OPTIM_0 + s), sg.param_off, sg.count);
        }
      }
      h->free(h, cpu, buf);
    }
  }
  return r;
}

/* Per-rank bytes. The first four follow the ZeRO formula with this run's dtypes: params psz*P/N,
 * grads gsz*T/N, master 4*T/N (half windows only), optimizer 4*n_states*T/N, P = all parameters,
 * T = trainable ones (plus at most 16*N-1 padding elements per unit and group); for bf16 windows,
 * bf16 grads and Adam that is (2+2+12)P/N. "buffers" are the gather slots and gradient buffers
 * (two units' worth under FULL_SHARD), "comm" the reduce-scatter staging. */
static st_result fsdp_memory_plan(void *vctx, st_memory_plan *out) {
  fsdp_ctx *c = vctx;
  if (c->off_optim) {
    /* zero3_offload: the device keeps the (device-side) parameter shards, the gradient shards, the
     * gather and gradient buffers, the upload buffers (offload_param) and the reduce staging; the
     * host the fp32 masters (or host copies of full-precision shards), the optimizer state, the
     * offloaded parameter shards and the two tiles of staging each way */
    *out = (st_memory_plan){
        .category = {"params", "grads", "master", "optim", "buffers", "comm"},
        .device_bytes = {c->pshard_bytes, c->gshard_bytes, 0, 0,
                         c->slot_bytes * (size_t)c->n_slots + c->gslot_bytes * N_GRAD_SLOTS +
                             c->upload_bytes * (size_t)c->n_slots,
                         c->comm_bytes},
        .host_bytes = {c->hpshard_bytes, 2 * (c->gstage_bytes + 64), c->master_bytes + c->hparam_bytes, c->state_bytes,
                       2 * c->pstage_bytes, 0}};
    return ST_OK;
  }
  *out = (st_memory_plan){.category = {"params", "grads", "master", "optim", "buffers", "comm"},
                          .device_bytes = {c->pshard_bytes, c->gshard_bytes, c->master_bytes, c->state_bytes,
                                           c->slot_bytes * (size_t)c->n_slots + c->gslot_bytes * N_GRAD_SLOTS,
                                           c->comm_bytes}};
  return ST_OK;
}

ST_EXPORT const st_strategy_plugin_v1 strata_strategy_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("strategy", NAME, ST_VERSION_STRING, st_strategy_plugin_v1),
    .validate = fsdp_validate,
    .init = fsdp_init,
    .finalize = fsdp_finalize,
    .pre_forward = fsdp_pre_forward,
    .post_forward = fsdp_post_forward,
    .pre_backward = fsdp_pre_backward,
    .post_backward = fsdp_post_backward,
    .grad_norm_sq = fsdp_grad_norm_sq,
    .step = fsdp_step,
    .skip_step = fsdp_skip_step,
    .state_save = fsdp_state_save,
    .state_load = fsdp_state_load,
    .memory_plan = fsdp_memory_plan,
};
