/* host_impl.h (internal) — building the st_host table that plugins receive. */
#ifndef STRATA_RUNTIME_HOST_IMPL_H
#define STRATA_RUNTIME_HOST_IMPL_H

#include <strata/host.h>
#include <strata/strategy.h>

#include "config.h"

typedef struct st_host_options {
  const st_ops *ops;      /* compute device table */
  const st_ops *cpu_ops;  /* CPU table (== ops on the CPU) */
  /* where plugin log lines go (the CLI passes the logger); NULL drops them */
  void (*log_sink)(void *user, st_log_level level, const char *message);
  void *log_user;
  const st_optimizer_settings *optimizer; /* read at every update; NULL: torch AdamW defaults */
  const st_cfg_api *cfg;  /* the config access table (st_config_api()); NULL in kernel-only tests */
  /* how host->load_strategy finds plugins (the trainer passes the plugin loader); NULL: refused */
  st_result (*load_strategy)(void *user, const char *name_or_path, const struct st_strategy_plugin_v1 **out,
                             st_error *err);
  void *load_strategy_user;
  const st_comm_plugin_v1 *comm; /* NULL: the built-in local backend (world size 1) */
  st_comm *world;
  int rank, world_size, local_rank, local_world_size;
} st_host_options;

/* Allocates the host table and its private state. Tests use it with just {ops, cpu_ops}. */
st_result st_host_create(const st_host_options *opt, st_host **out, st_error *err);
void st_host_destroy(st_host *h);
/* bytes currently / at peak allocated through the host, by device type */
uint64_t st_host_peak_bytes(const st_host *h, st_device_type t);
uint64_t st_host_live_bytes(const st_host *h, st_device_type t);

/* the counter-based RNG behind host->rng (rng.c) */
const st_rng_api *st_rng(void);

#endif
