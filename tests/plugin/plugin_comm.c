/* plugin_comm.c — a comm plugin with every method set (all are required) and a world of one; with
 * -DBAD_NULL_LAST its last method, set_timeout, is NULL. */
#include <strata/comm.h>

#ifndef PLUGIN_NAME
#error "PLUGIN_NAME must be defined"
#endif

struct st_comm {
  int rank, size;
};
static st_comm the_world = {0, 1};

static st_result c_init(const struct st_host *host, const st_comm_init_args *args, st_comm **world, st_error *err) {
  *world = &the_world;
  return ST_OK;
}
static void c_finalize(st_comm *world) {}
static st_result c_split(st_comm *comm, int color, int key, st_comm **out, st_error *err) {
  *out = color < 0 ? NULL : comm;
  return ST_OK;
}
static void c_group_free(st_comm *group) {}
static int c_rank(const st_comm *comm) { return comm->rank; }
static int c_size(const st_comm *comm) { return comm->size; }
static st_result c_all_reduce(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt, st_reduce_op op,
                              st_comm_request **req, st_error *err) {
  if (send != recv) memcpy(recv, send, (size_t)count * st_dtype_size(dt));
  return ST_OK;
}
static st_result c_reduce_scatter(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                  st_reduce_op op, st_comm_request **req, st_error *err) {
  return c_all_reduce(comm, send, recv, count, dt, op, req, err);
}
static st_result c_all_gather(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                              st_comm_request **req, st_error *err) {
  return c_all_reduce(comm, send, recv, count, dt, ST_REDUCE_SUM, req, err);
}
static st_result c_all_gather_v(st_comm *comm, const void *send, int64_t send_count, void *recv,
                                const int64_t *recv_counts, const int64_t *recv_displs, st_dtype dt,
                                st_comm_request **req, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result c_all_to_all_v(st_comm *comm, const void *send, const int64_t *send_counts,
                                const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                                const int64_t *recv_displs, st_dtype dt, st_comm_request **req, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result c_broadcast(st_comm *comm, void *buf, int64_t count, st_dtype dt, int root, st_comm_request **req,
                             st_error *err) {
  return ST_OK;
}
static st_result c_send(st_comm *comm, const void *buf, int64_t count, st_dtype dt, int peer, int tag,
                        st_comm_request **req, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result c_recv(st_comm *comm, void *buf, int64_t count, st_dtype dt, int peer, int tag,
                        st_comm_request **req, st_error *err) {
  return ST_ERR_UNSUPPORTED;
}
static st_result c_barrier(st_comm *comm, st_error *err) { return ST_OK; }
static st_result c_wait(st_comm_request *req, st_error *err) { return ST_OK; }
static st_result c_test(st_comm_request *req, bool *done, st_error *err) {
  *done = true;
  return ST_OK;
}
#ifndef BAD_NULL_LAST
static st_result c_set_timeout(st_comm *comm, int64_t timeout_ms, st_error *err) { return ST_OK; }
#endif

ST_EXPORT const st_comm_plugin_v1 strata_comm_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("comm", PLUGIN_NAME, "0.0.1", st_comm_plugin_v1),
    .init = c_init,
    .finalize = c_finalize,
    .split = c_split,
    .group_free = c_group_free,
    .rank = c_rank,
    .size = c_size,
    .all_reduce = c_all_reduce,
    .reduce_scatter = c_reduce_scatter,
    .all_gather = c_all_gather,
    .all_gather_v = c_all_gather_v,
    .all_to_all_v = c_all_to_all_v,
    .broadcast = c_broadcast,
    .send = c_send,
    .recv = c_recv,
    .barrier = c_barrier,
    .wait = c_wait,
    .test = c_test,
#ifndef BAD_NULL_LAST
    .set_timeout = c_set_timeout,
#endif
};
