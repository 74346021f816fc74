/* comm.h — st_comm_plugin_v1: collectives over a process group, and the rendezvous store.
 *
 * Backends: comm_gloo (CPU, TCP) and comm_nccl (GPU). The core also has a built-in "local"
 * backend for world size 1. Every collective honours the group's timeout: on timeout or a peer's
 * death it returns ST_ERR_TIMEOUT / ST_ERR_COMM with a message naming the collective, the group
 * and the rank that did not arrive. It never hangs. */
#ifndef STRATA_COMM_H
#define STRATA_COMM_H

#include "strata.h"
#include "tensor.h"

typedef enum st_reduce_op { ST_REDUCE_SUM = 0, ST_REDUCE_AVG = 1, ST_REDUCE_MAX = 2, ST_REDUCE_MIN = 3 } st_reduce_op;

/* The core's TCP key-value store (hosted by rank 0 or the launcher), handed to comm backends to
 * exchange addresses and unique ids. Values are opaque bytes. `get` with timeout_ms == 0 checks once
 * and returns ST_ERR_NOT_FOUND when the key is absent. The virtual key "strata/dead_ranks" reads as
 * a comma-separated list of the world ranks whose store connection dropped without a goodbye, so a
 * backend can name a dead peer instead of reporting a bare timeout. */
typedef struct st_store {
  void *self;
  st_result (*set)(struct st_store *s, const char *key, const void *value, size_t len, st_error *err);
  /* waits up to timeout_ms for the key; *len in: capacity, out: value length */
  st_result (*get)(struct st_store *s, const char *key, void *value, size_t *len, int64_t timeout_ms, st_error *err);
  st_result (*add)(struct st_store *s, const char *key, int64_t delta, int64_t *result, st_error *err);
  st_result (*barrier)(struct st_store *s, const char *name, int rank, int world, int64_t timeout_ms, st_error *err);
} st_store;

typedef struct st_comm st_comm;               /* a process group; backend-defined */
typedef struct st_comm_request st_comm_request; /* an in-flight asynchronous operation */

typedef struct st_comm_init_args {
  uint32_t struct_size;
  int rank, world_size;
  int local_rank, local_world_size;
  st_device device;      /* where buffers live (CPU for gloo, CUDA for nccl) */
  st_store *store;
  int64_t timeout_ms;    /* default for every collective of the world group and its sub-groups */
  const char *interface; /* network interface, or NULL for the backend's default */
} st_comm_init_args;

struct st_host;

/* Collectives: `req == NULL` runs blocking; otherwise *req receives a handle for wait/test and the
 * buffers must stay valid until it completes. Counts are elements of `dt`; half types are reduced
 * with fp32 accumulation. In-place is allowed where send == recv (all_reduce) or where send is
 * recv + rank * count (all_gather, like NCCL). */
typedef struct st_comm_plugin_v1 {
  st_plugin_header header;
  st_result (*init)(const struct st_host *host, const st_comm_init_args *args, st_comm **world, st_error *err);
  void (*finalize)(st_comm *world); /* the world group; sub-groups must be freed first */
  st_result (*split)(st_comm *comm, int color, int key, st_comm **out, st_error *err); /* color < 0: *out = NULL */
  void (*group_free)(st_comm *group);
  int (*rank)(const st_comm *comm);
  int (*size)(const st_comm *comm);

  st_result (*all_reduce)(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt, st_reduce_op op,
                          st_comm_request **req, st_error *err);
  /* send [count * size] -> recv [count]: rank r receives the reduction of block r */
  st_result (*reduce_scatter)(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                              st_reduce_op op, st_comm_request **req, st_error *err);
  /* send [count] -> recv [count * size] */
  st_result (*all_gather)(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                          st_comm_request **req, st_error *err);
  st_result (*all_gather_v)(st_comm *comm, const void *send, int64_t send_count, void *recv,
                            const int64_t *recv_counts, const int64_t *recv_displs, st_dtype dt,
                            st_comm_request **req, st_error *err);
  st_result (*all_to_all_v)(st_comm *comm, const void *send, const int64_t *send_counts, const int64_t *send_displs,
                            void *recv, const int64_t *recv_counts, const int64_t *recv_displs, st_dtype dt,
                            st_comm_request **req, st_error *err);
  st_result (*broadcast)(st_comm *comm, void *buf, int64_t count, st_dtype dt, int root, st_comm_request **req,
                         st_error *err);
  st_result (*send)(st_comm *comm, const void *buf, int64_t count, st_dtype dt, int peer, int tag,
                    st_comm_request **req, st_error *err);
  st_result (*recv)(st_comm *comm, void *buf, int64_t count, st_dtype dt, int peer, int tag, st_comm_request **req,
                    st_error *err);
  st_result (*barrier)(st_comm *comm, st_error *err);
  st_result (*wait)(st_comm_request *req, st_error *err); /* frees the request */
  st_result (*test)(st_comm_request *req, bool *done, st_error *err);
  st_result (*set_timeout)(st_comm *comm, int64_t timeout_ms, st_error *err);
} st_comm_plugin_v1;

#define ST_COMM_PLUGIN_SYMBOL_V1 "strata_comm_plugin_v1"

#endif /* STRATA_COMM_H */
