/* launch.h (internal) — `strata launch`, and how a process finds its place in a distributed job.
 *
 * st_dist_env_detect reads the variables the common launchers set (strata launch and torchrun:
 * RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT; Open MPI:
 * OMPI_COMM_WORLD_*; MPICH/Intel MPI: PMI_RANK/PMI_SIZE/MPI_LOCALRANKID/MPI_LOCALNRANKS; Slurm:
 * SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID/SLURM_NTASKS_PER_NODE/SLURM_JOB_NODELIST), so a run
 * started by any of them works without `strata launch`. st_dist_store_open then hosts (rank 0,
 * unless the launcher already does) and connects the rendezvous store the comm backends need. */
#ifndef STRATA_RUNTIME_LAUNCH_H
#define STRATA_RUNTIME_LAUNCH_H

#include <strata/comm.h>

#include "store.h"

typedef struct st_dist_env {
  int rank, world_size;             /* global */
  int local_rank, local_world_size; /* on this node */
  int node_rank, num_nodes;         /* derived: rank / local_world_size, world / local_world_size */
  char master_addr[256];            /* where the store listens (rank 0's or the launcher's host) */
  int master_port;
  int store_port;      /* the store's port: STRATA_STORE_PORT, else MASTER_PORT (+1 under torchrun,
                          whose own store already holds MASTER_PORT) */
  bool store_external; /* the launcher hosts the store (STRATA_STORE_EXTERNAL=1): rank 0 must not */
  char token[ST_STORE_TOKEN_MAX + 1]; /* STRATA_STORE_TOKEN, "" when unset */
  int restart_count;                  /* STRATA_RESTART_COUNT / TORCHELASTIC_RESTART_COUNT */
  const char *source; /* "strata launch", "torchrun", "openmpi", "pmi", "slurm" or "single process" */
} st_dist_env;

/* envp: a NULL-terminated "NAME=value" array, or NULL for the process environment. A malformed or
 * inconsistent variable is ST_ERR_CONFIG naming it (err->where = the variable). */
st_result st_dist_env_detect(const char *const *envp, st_dist_env *out, st_error *err);

/* "rank 1 of 4 (local 1 of 2, node 0 of 2), store 10.0.0.1:29500, from torchrun" */
void st_dist_env_describe(const st_dist_env *env, char *buf, size_t cap);

/* For world_size > 1: rank 0 starts the store server unless env->store_external (bound to all
 * interfaces when the job spans nodes, else to 127.0.0.1), then every rank connects to
 * master_addr:store_port with its rank, waiting up to timeout_ms for the server. *server is NULL
 * on other ranks. For world_size 1 both outputs are NULL and nothing is started. */
st_result st_dist_store_open(const st_dist_env *env, int64_t timeout_ms, st_store_server **server, st_store **store,
                             st_error *err);
/* Ranks meet in a store barrier (so rank 0 does not stop the server under the others), then the
 * client is closed and the server stopped. Safe with NULLs. */
void st_dist_store_close(const st_dist_env *env, st_store_server *server, st_store *store, int64_t timeout_ms);

/* `strata launch [options] [--] COMMAND ...` and `strata launch CONFIG.json [train options]`.
 * argv[0] is "launch" (the subcommand). Returns the process exit code: 0 when every rank exited 0;
 * otherwise non-zero after stopping the others and printing which rank failed, how, and the tail
 * of its log. `strata launch --help` lists the options. */
int st_launch_main(int argc, char **argv);

#endif /* STRATA_RUNTIME_LAUNCH_H */
