/* thread_comm.h — a fake st_comm_plugin_v1 whose "ranks" are threads of one process.
 *
 * Used to test strategies (ddp, fsdp) without a network backend: every collective posts this
 * rank's buffers into a shared table, meets the other ranks at a barrier, computes this rank's
 * result into a private buffer from the others' send buffers, meets them again, and only then
 * writes its receive buffer (so in-place calls are safe). Reductions accumulate in double in rank
 * order. Asynchronous requests complete at launch; wait/test only free/report them.
 *
 * Every call is counted per rank and operation, so tests can assert how many collectives a
 * strategy issued and when (e.g. no all-reduce on accumulation micro-steps). A rank that fails
 * calls thread_world_abort so the others return ST_ERR_COMM instead of waiting forever; a barrier
 * also gives up after a timeout (ST_ERR_TIMEOUT). */
#ifndef STRATA_TESTS_THREAD_COMM_H
#define STRATA_TESTS_THREAD_COMM_H

#include <strata/comm.h>

typedef struct thread_world thread_world;

typedef enum thread_comm_op {
  TC_ALL_REDUCE = 0,
  TC_REDUCE_SCATTER,
  TC_ALL_GATHER,
  TC_BROADCAST,
  TC_BARRIER,
  TC_OP_COUNT
} thread_comm_op;

st_result thread_world_create(int world_size, int64_t timeout_ms, thread_world **out, st_error *err);
void thread_world_free(thread_world *w);
st_comm *thread_world_comm(thread_world *w, int rank);
void thread_world_abort(thread_world *w);

/* calls of `op` issued by `rank` so far, and the element count of its latest one */
int64_t thread_comm_calls(thread_world *w, int rank, thread_comm_op op);
int64_t thread_comm_elements(thread_world *w, int rank, thread_comm_op op);
/* requests handed out and not yet waited (leak check) */
int64_t thread_comm_open_requests(thread_world *w, int rank);

const st_comm_plugin_v1 *thread_comm_plugin(void);

#endif
