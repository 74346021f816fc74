/* host.h — the services the core hands to every plugin in `init`.
 *
 * Plugins link nothing from strata: memory, kernels, configuration access, collectives, logging,
 * randomness and plugin composition all come through these tables. */
#ifndef STRATA_HOST_H
#define STRATA_HOST_H

#include "comm.h"
#include "ops.h"
#include "strata.h"
#include "tensor.h"

/* ---------------------------------------------------------------------------------------------
 * Configuration access. `st_cfg` is a node of the resolved JSON config (object, array, scalar).
 * The core implements this over its JSON library so plugins need none. Getters read `key` of an
 * object node:
 *   - absent: the default is stored into the resolved config (so `strata validate` shows it with
 *     provenance "default") and returned;
 *   - present with the wrong type: ST_ERR_CONFIG, message "model.lora.rank: expected an integer,
 *     found a string (\"8\")";
 *   - the string "auto" that the core could not resolve: ST_ERR_CONFIG saying so.
 * A plugin validates its own block with check_keys (unknown key -> error with did-you-mean).
 * ------------------------------------------------------------------------------------------- */
typedef struct st_cfg st_cfg;

typedef enum st_cfg_type {
  ST_CFG_ABSENT = 0, ST_CFG_NULL, ST_CFG_BOOL, ST_CFG_INT, ST_CFG_NUMBER, ST_CFG_STRING, ST_CFG_ARRAY, ST_CFG_OBJECT
} st_cfg_type;

typedef struct st_cfg_api {
  uint32_t struct_size;
  st_cfg_type (*type)(const st_cfg *obj, const char *key); /* key NULL: the node itself */
  const char *(*path)(const st_cfg *node);                 /* "strategy.zero_optimization" */
  st_result (*get_int)(st_cfg *obj, const char *key, int64_t dflt, int64_t *out, st_error *err);
  st_result (*get_number)(st_cfg *obj, const char *key, double dflt, double *out, st_error *err);
  st_result (*get_bool)(st_cfg *obj, const char *key, bool dflt, bool *out, st_error *err);
  /* *out points into the config and lives as long as it */
  st_result (*get_string)(st_cfg *obj, const char *key, const char *dflt, const char **out, st_error *err);
  /* a string that must be one of `choices` (NULL-terminated); the error lists them */
  st_result (*get_enum)(st_cfg *obj, const char *key, const char *const *choices, const char *dflt,
                        const char **out, st_error *err);
  /* child object; absent: *out = NULL unless create, which inserts {} */
  st_result (*get_object)(st_cfg *obj, const char *key, bool create, st_cfg **out, st_error *err);
  /* arrays of strings / integers / numbers; absent: *n = 0. More than `cap` items is an error. */
  st_result (*get_string_list)(st_cfg *obj, const char *key, const char **out, size_t cap, size_t *n, st_error *err);
  st_result (*get_int_list)(st_cfg *obj, const char *key, int64_t *out, size_t cap, size_t *n, st_error *err);
  st_result (*get_number_list)(st_cfg *obj, const char *key, double *out, size_t cap, size_t *n, st_error *err);
  /* every key of obj must be in `allowed` (NULL-terminated); else ST_ERR_CONFIG with the key path
   * and the closest allowed key */
  st_result (*check_keys)(const st_cfg *obj, const char *const *allowed, st_error *err);
  /* the node serialized as compact JSON (for fingerprints and logs); the caller free()s it */
  char *(*to_json)(const st_cfg *node);
  /* the root of the whole config, so a strategy handed its own block can read DeepSpeed's top-level
   * blocks (zero_optimization, fp16, ...) */
  st_cfg *(*root)(const st_cfg *node);
} st_cfg_api;

/* Counter-based random numbers: the same (seed, stream, index) gives the same number on every
 * rank, every world size and every device, so shards can be initialized independently. */
typedef struct st_rng_api {
  /* n standard normals for elements [offset, offset + n) of stream `stream` */
  void (*normal)(uint64_t seed, uint64_t stream, uint64_t offset, int64_t n, double mean, double std, st_dtype dt,
                 void *host_out);
  void (*uniform)(uint64_t seed, uint64_t stream, uint64_t offset, int64_t n, double lo, double hi, st_dtype dt,
                  void *host_out);
  uint64_t (*u64)(uint64_t seed, uint64_t stream, uint64_t offset);
} st_rng_api;

/* MoE token exchange. Without an expert-parallel strategy the core installs a local exchange
 * (every expert is on this rank). The model calls dispatch after routing and combine after its
 * local experts ran; backward calls the mirror images. Every call below except num_local_experts
 * and first_local_expert is collective over the exchange's group: every rank makes the same calls
 * in the same order (a rank with no rows passes n = 0).
 *
 * Received rows are laid out in blocks, one per source rank of the group in rank order, and inside
 * a block sorted by expert (rows for one expert keep the sender's order). */
typedef struct st_moe_exchange st_moe_exchange;
typedef struct st_moe_api {
  st_moe_exchange *self;
  int (*num_local_experts)(st_moe_exchange *x, int num_experts);
  int (*first_local_expert)(st_moe_exchange *x, int num_experts);
  /* tokens [n, hidden] with expert ids [n] (sorted by expert); returns how many rows this rank's
   * local experts receive, and fills recv [*n_recv, hidden] and recv_expert [*n_recv] */
  st_result (*dispatch)(st_moe_exchange *x, st_dtype dt, const void *tokens, const int32_t *expert_ids, int64_t n,
                        int64_t hidden, int num_experts, void *recv, int32_t *recv_expert, int64_t recv_cap,
                        int64_t *n_recv, st_error *err);
  /* the inverse permutation of the last dispatch (or dispatch_start): rows of processed [n_recv,
   * hidden] return to their origin, out [n, hidden]. After dispatch_start (st_moe_ext) it returns
   * the blocks not yet handed to return_block and waits until every row has arrived in the `out`
   * given there (pass the same `out`). */
  st_result (*combine)(st_moe_exchange *x, st_dtype dt, const void *processed, int64_t hidden, void *out,
                       st_error *err);
} st_moe_api;

/* Additions to the exchange after v1 (st_moe_api has no struct_size, so it cannot grow): the
 * receive sizing and the pipelined form. The strategy that installs an exchange with set_moe
 * installs these with set_moe_ext right after (set_moe clears them); the functions take the
 * installed st_moe_api's `self`. A NULL member is not offered: the model then uses dispatch and
 * combine and sizes its buffers for the worst case. */
typedef struct st_moe_ext {
  uint32_t struct_size;
  /* how many rows one dispatch may deliver to this rank when this rank sends at most n_rows and
   * every other rank at most its own n_rows: the model sizes its receive buffers (and what it saves
   * of them for backward) with it, in batch_prepare. The local exchange returns n_rows;
   * expert_parallel the sum of the group's n_rows, capped by strategy.recv_capacity_factor x the
   * largest of them when that is set. A dispatch that would overflow any rank's capacity fails on
   * every rank with the numbers. */
  st_result (*recv_capacity)(st_moe_exchange *x, int64_t n_rows, int num_experts, int64_t *cap, st_error *err);
  /* Pipelined form, so the exchange overlaps the expert computation: dispatch_start exchanges the
   * counts, fills recv_expert and *n_recv at once and starts moving the rows; *n_blocks blocks
   * then arrive. wait_block(i) (i = 0 .. n_blocks-1, in the exchange's order: this rank's own
   * block first) blocks until the i-th block's rows are in recv and says which rows they are;
   * return_block(i, processed) starts sending those rows of processed [n_recv, hidden] (the same
   * row positions) home to `out`. `tokens`, `processed` and `out` must stay valid and unchanged
   * until combine returns (rows are sent straight from them), every block must be waited for
   * before combine, and no other call on the exchange may come between dispatch_start and combine
   * (it would queue behind the rows in flight). */
  st_result (*dispatch_start)(st_moe_exchange *x, st_dtype dt, const void *tokens, const int32_t *expert_ids,
                              int64_t n, int64_t hidden, int num_experts, void *recv, int32_t *recv_expert,
                              int64_t recv_cap, void *out, int64_t *n_recv, int *n_blocks, st_error *err);
  st_result (*wait_block)(st_moe_exchange *x, int i, int64_t *first_row, int64_t *n_rows, st_error *err);
  st_result (*return_block)(st_moe_exchange *x, int i, const void *processed, st_error *err);
} st_moe_ext;

struct st_strategy_plugin_v1;

typedef struct st_host {
  uint32_t abi_version;
  uint32_t struct_size;

  /* kernels: `ops` for the compute device, `cpu_ops` always (offload paths, host-side math) */
  const st_ops *ops;
  const st_ops *cpu_ops;
  st_device device;

  /* memory on `dev` (CPU or the compute device); category names a line of the memory report
   * ("params", "grads", "optim", "activations", "workspace", "comm"). Returns NULL on failure.
   * pinned asks for page-locked host memory (falls back to pageable, logged once); free it with
   * free(h, CPU device, ptr) like any host allocation. */
  void *(*alloc)(const struct st_host *h, st_device dev, size_t bytes, const char *category);
  void *(*alloc_pinned)(const struct st_host *h, size_t bytes, const char *category);
  void (*free)(const struct st_host *h, st_device dev, void *ptr);

  /* logging into the core's log (rank-prefixed, level-filtered) */
  void (*log)(const struct st_host *h, st_log_level level, const char *fmt, ...) ST_PRINTF(3, 4);

  const st_cfg_api *cfg;
  const st_rng_api *rng;

  /* the world group, its backend, and its shape; a single process gets the built-in local backend */
  const st_comm_plugin_v1 *comm;
  st_comm *world;
  int rank, world_size, local_rank, local_world_size;

  /* the core's optimizer: runs desc on the ops table of `dev` (CPU for offloaded shards). The
   * strategy fills pointers, dtypes, n, step, lr and grad_scale, and sets weight_decay to 1 for a
   * decayed parameter or 0 for an ST_PARAM_NO_DECAY one; the host fills type, betas, eps,
   * momentum, adam_w_mode from the config and multiplies weight_decay by the configured value. */
  st_result (*optim_update)(const struct st_host *h, st_device dev, st_optim_desc *desc, st_error *err);
  /* number of fp32 state buffers per element the configured optimizer needs (AdamW: 2) */
  int (*optim_state_count)(const struct st_host *h);

  /* composition: load another strategy plugin by name or path (expert_parallel's dense inner) */
  st_result (*load_strategy)(const struct st_host *h, const char *name_or_path,
                             const struct st_strategy_plugin_v1 **out, st_error *err);

  /* MoE exchange: the current one (local unless a strategy installed its own), and how a
   * strategy installs one during its init (expert_parallel does). `api` must outlive the run. */
  const st_moe_api *(*moe)(const struct st_host *h);
  void (*set_moe)(const struct st_host *h, const st_moe_api *api);

  void *core; /* private to the core */

  /* appended after v1 (check struct_size before use): the current exchange's additions, or NULL */
  const st_moe_ext *(*moe_ext)(const struct st_host *h);
  void (*set_moe_ext)(const struct st_host *h, const st_moe_ext *ext);
} st_host;

#endif /* STRATA_HOST_H */
