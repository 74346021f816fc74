/* local_comm.c — the built-in "local" st_comm_plugin_v1 (local_comm.h). */
#include "local_comm.h"

#include <stdlib.h>

#include <strata/host.h>

struct st_comm {
  const st_host *host;
  st_device device;
  int64_t timeout_ms;
  bool is_world;
};

struct st_comm_request {
  int unused;
};

static st_result local_init(const st_host *host, const st_comm_init_args *args, st_comm **world, st_error *err) {
  *world = NULL;
  if (!args || args->world_size != 1 || args->rank != 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm",
                        "the local comm backend serves a world of one process (got rank %d of %d): use comm_gloo or "
                        "comm_nccl for more",
                        args ? args->rank : -1, args ? args->world_size : 0);
  if (args->device.type != ST_DEVICE_CPU && (!host || !host->ops || !host->ops->copy))
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "local comm on a device needs host->ops->copy");
  st_comm *c = calloc(1, sizeof *c);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "comm", "out of memory");
  c->host = host;
  c->device = args->device;
  c->timeout_ms = args->timeout_ms;
  c->is_world = true;
  *world = c;
  return ST_OK;
}

static void local_finalize(st_comm *world) { free(world); }

static st_result local_split(st_comm *comm, int color, int key, st_comm **out, st_error *err) {
  *out = NULL;
  if (color < 0) return ST_OK;
  st_comm *c = calloc(1, sizeof *c);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "comm", "out of memory");
  *c = *comm;
  c->is_world = false;
  *out = c;
  return ST_OK;
}

static void local_group_free(st_comm *group) { free(group); }
static int local_rank(const st_comm *comm) { return 0; }
static int local_size(const st_comm *comm) { return 1; }

static st_result copy_bytes(st_comm *c, void *dst, const void *src, size_t bytes, st_error *err) {
  if (dst == src || bytes == 0) return ST_OK;
  if (c->device.type == ST_DEVICE_CPU) {
    memmove(dst, src, bytes);
    return ST_OK;
  }
  st_result r = c->host->ops->copy(c->host->ops, dst, c->device, src, c->device, bytes);
  if (r != ST_OK) return st_error_set(err, r, "comm", "local comm: device copy of %zu bytes failed", bytes);
  return ST_OK;
}

/* completes a request at once */
static st_result done(st_comm_request **req, st_error *err) {
  if (!req) return ST_OK;
  *req = malloc(sizeof **req);
  if (!*req) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "comm", "out of memory");
  return ST_OK;
}

static st_result check(const char *what, int64_t count, st_dtype dt, st_error *err) {
  if (count < 0 || st_dtype_size(dt) == 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "%s: count %lld or dtype %d is invalid", what,
                        (long long)count, (int)dt);
  return ST_OK;
}

static st_result local_all_reduce(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                  st_reduce_op op, st_comm_request **req, st_error *err) {
  ST_CHECK(check("all_reduce", count, dt, err));
  if ((unsigned)op > ST_REDUCE_MIN) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "all_reduce: bad op %d", (int)op);
  ST_CHECK(copy_bytes(comm, recv, send, (size_t)count * st_dtype_size(dt), err));
  return done(req, err);
}

static st_result local_reduce_scatter(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                      st_reduce_op op, st_comm_request **req, st_error *err) {
  return local_all_reduce(comm, send, recv, count, dt, op, req, err);
}

static st_result local_all_gather(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                  st_comm_request **req, st_error *err) {
  ST_CHECK(check("all_gather", count, dt, err));
  ST_CHECK(copy_bytes(comm, recv, send, (size_t)count * st_dtype_size(dt), err));
  return done(req, err);
}

static st_result local_all_gather_v(st_comm *comm, const void *send, int64_t send_count, void *recv,
                                    const int64_t *recv_counts, const int64_t *recv_displs, st_dtype dt,
                                    st_comm_request **req, st_error *err) {
  ST_CHECK(check("all_gather_v", send_count, dt, err));
  if (recv_counts[0] != send_count)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "all_gather_v: recv_counts[0] = %lld but send_count = %lld",
                        (long long)recv_counts[0], (long long)send_count);
  size_t es = st_dtype_size(dt);
  ST_CHECK(copy_bytes(comm, (char *)recv + (size_t)recv_displs[0] * es, send, (size_t)send_count * es, err));
  return done(req, err);
}

static st_result local_all_to_all_v(st_comm *comm, const void *send, const int64_t *send_counts,
                                    const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                                    const int64_t *recv_displs, st_dtype dt, st_comm_request **req, st_error *err) {
  ST_CHECK(check("all_to_all_v", send_counts[0], dt, err));
  if (recv_counts[0] != send_counts[0])
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "all_to_all_v: recv_counts[0] = %lld but send_counts[0] = %lld",
                        (long long)recv_counts[0], (long long)send_counts[0]);
  size_t es = st_dtype_size(dt);
  ST_CHECK(copy_bytes(comm, (char *)recv + (size_t)recv_displs[0] * es, (const char *)send + (size_t)send_displs[0] * es,
                      (size_t)send_counts[0] * es, err));
  return done(req, err);
}

static st_result local_broadcast(st_comm *comm, void *buf, int64_t count, st_dtype dt, int root, st_comm_request **req,
                                 st_error *err) {
  ST_CHECK(check("broadcast", count, dt, err));
  if (root != 0) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "broadcast: root %d is not in a world of 1", root);
  return done(req, err);
}

static st_result local_send(st_comm *comm, const void *buf, int64_t count, st_dtype dt, int peer, int tag,
                            st_comm_request **req, st_error *err) {
  return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm",
                      "send to rank %d: the local comm backend has one rank and no peer to send to", peer);
}

static st_result local_recv(st_comm *comm, void *buf, int64_t count, st_dtype dt, int peer, int tag,
                            st_comm_request **req, st_error *err) {
  return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm",
                      "recv from rank %d: the local comm backend has one rank and no peer to receive from", peer);
}

static st_result local_barrier(st_comm *comm, st_error *err) { return ST_OK; }

static st_result local_wait(st_comm_request *req, st_error *err) {
  free(req);
  return ST_OK;
}

static st_result local_test(st_comm_request *req, bool *is_done, st_error *err) {
  *is_done = true;
  return ST_OK;
}

static st_result local_set_timeout(st_comm *comm, int64_t timeout_ms, st_error *err) {
  comm->timeout_ms = timeout_ms;
  return ST_OK;
}

static const st_comm_plugin_v1 local_plugin = {
    .header = ST_PLUGIN_HEADER("comm", "local", ST_VERSION_STRING, st_comm_plugin_v1),
    .init = local_init,
    .finalize = local_finalize,
    .split = local_split,
    .group_free = local_group_free,
    .rank = local_rank,
    .size = local_size,
    .all_reduce = local_all_reduce,
    .reduce_scatter = local_reduce_scatter,
    .all_gather = local_all_gather,
    .all_gather_v = local_all_gather_v,
    .all_to_all_v = local_all_to_all_v,
    .broadcast = local_broadcast,
    .send = local_send,
    .recv = local_recv,
    .barrier = local_barrier,
    .wait = local_wait,
    .test = local_test,
    .set_timeout = local_set_timeout,
};

const st_comm_plugin_v1 *st_local_comm(void) { return &local_plugin; }
