/* thread_comm.c — see thread_comm.h. */
#include "thread_comm.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

typedef struct post {
  const void *send;
  int64_t count;
  st_dtype dt;
  int op_kind; /* thread_comm_op, to catch mismatched collectives */
  int root;
} post;

struct st_comm {
  thread_world *world;
  int rank;
};

struct st_comm_request {
  thread_world *world;
  int rank;
};

struct thread_world {
  int n;
  int64_t timeout_ms;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int arrived;
  uint64_t generation;
  bool aborted;
  post *posts;
  st_comm *comms;
  int64_t (*calls)[TC_OP_COUNT];
  int64_t (*elements)[TC_OP_COUNT];
  int64_t *open_requests;
};

st_result thread_world_create(int n, int64_t timeout_ms, thread_world **out, st_error *err) {
  *out = NULL;
  thread_world *w = calloc(1, sizeof *w);
  if (!w) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "thread_comm", "world");
  w->n = n;
  w->timeout_ms = timeout_ms;
  w->posts = calloc((size_t)n, sizeof *w->posts);
  w->comms = calloc((size_t)n, sizeof *w->comms);
  w->calls = calloc((size_t)n, sizeof *w->calls);
  w->elements = calloc((size_t)n, sizeof *w->elements);
  w->open_requests = calloc((size_t)n, sizeof *w->open_requests);
  if (!w->posts || !w->comms || !w->calls || !w->elements || !w->open_requests) {
    thread_world_free(w);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "thread_comm", "world tables");
  }
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  for (int r = 0; r < n; r++) w->comms[r] = (st_comm){.world = w, .rank = r};
  *out = w;
  return ST_OK;
}

void thread_world_free(thread_world *w) {
  if (!w) return;
  if (w->comms) {
    pthread_mutex_destroy(&w->mu);
    pthread_cond_destroy(&w->cv);
  }
  free(w->posts);
  free(w->comms);
  free(w->calls);
  free(w->elements);
  free(w->open_requests);
  free(w);
}

st_comm *thread_world_comm(thread_world *w, int rank) { return &w->comms[rank]; }

void thread_world_abort(thread_world *w) {
  pthread_mutex_lock(&w->mu);
  w->aborted = true;
  pthread_cond_broadcast(&w->cv);
  pthread_mutex_unlock(&w->mu);
}

int64_t thread_comm_calls(thread_world *w, int rank, thread_comm_op op) {
  pthread_mutex_lock(&w->mu);
  int64_t v = w->calls[rank][op];
  pthread_mutex_unlock(&w->mu);
  return v;
}

int64_t thread_comm_elements(thread_world *w, int rank, thread_comm_op op) {
  pthread_mutex_lock(&w->mu);
  int64_t v = w->elements[rank][op];
  pthread_mutex_unlock(&w->mu);
  return v;
}

int64_t thread_comm_open_requests(thread_world *w, int rank) {
  pthread_mutex_lock(&w->mu);
  int64_t v = w->open_requests[rank];
  pthread_mutex_unlock(&w->mu);
  return v;
}

static st_result meet(thread_world *w, const char *what, int rank, st_error *err) {
  pthread_mutex_lock(&w->mu);
  if (w->aborted) {
    pthread_mutex_unlock(&w->mu);
    return st_error_set(err, ST_ERR_COMM, what, "rank %d: another rank failed (thread world aborted)", rank);
  }
  uint64_t gen = w->generation;
  if (++w->arrived == w->n) {
    w->arrived = 0;
    w->generation++;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->mu);
    return ST_OK;
  }
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += w->timeout_ms / 1000;
  until.tv_nsec += (w->timeout_ms % 1000) * 1000000;
  if (until.tv_nsec >= 1000000000) {
    until.tv_sec++;
    until.tv_nsec -= 1000000000;
  }
  while (w->generation == gen && !w->aborted) {
    if (pthread_cond_timedwait(&w->cv, &w->mu, &until) == ETIMEDOUT) {
      w->aborted = true; /* the world is broken from here on */
      pthread_cond_broadcast(&w->cv);
      pthread_mutex_unlock(&w->mu);
      return st_error_set(err, ST_ERR_TIMEOUT, what, "rank %d waited %lld ms for the other ranks", rank,
                          (long long)w->timeout_ms);
    }
  }
  bool ok = w->generation != gen;
  pthread_mutex_unlock(&w->mu);
  return ok ? ST_OK : st_error_set(err, ST_ERR_COMM, what, "rank %d: another rank failed (thread world aborted)", rank);
}

static double load(st_dtype dt, const void *p, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  case ST_F16: return st_f16_to_f32(((const uint16_t *)p)[i]);
  case ST_I32: return ((const int32_t *)p)[i];
  case ST_I64: return (double)((const int64_t *)p)[i];
  default: return ((const uint8_t *)p)[i];
  }
}

static void store(st_dtype dt, void *p, int64_t i, double v) {
  switch (dt) {
  case ST_F32: ((float *)p)[i] = (float)v; break;
  case ST_F64: ((double *)p)[i] = v; break;
  case ST_BF16: ((uint16_t *)p)[i] = st_f32_to_bf16((float)v); break;
  case ST_F16: ((uint16_t *)p)[i] = st_f32_to_f16((float)v); break;
  case ST_I32: ((int32_t *)p)[i] = (int32_t)v; break;
  case ST_I64: ((int64_t *)p)[i] = (int64_t)v; break;
  default: ((uint8_t *)p)[i] = (uint8_t)v; break;
  }
}

static st_result make_request(st_comm *c, st_comm_request **req, st_error *err) {
  if (!req) return ST_OK;
  *req = malloc(sizeof **req);
  if (!*req) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "thread_comm", "request");
  (*req)->world = c->world;
  (*req)->rank = c->rank;
  pthread_mutex_lock(&c->world->mu);
  c->world->open_requests[c->rank]++;
  pthread_mutex_unlock(&c->world->mu);
  return ST_OK;
}

/* post, meet, check that everyone called the same collective with the same count */
static st_result enter(st_comm *c, thread_comm_op op, const char *what, const void *send, int64_t count, st_dtype dt,
                       int root, st_error *err) {
  thread_world *w = c->world;
  pthread_mutex_lock(&w->mu);
  w->calls[c->rank][op]++;
  w->elements[c->rank][op] += count;
  w->posts[c->rank] = (post){.send = send, .count = count, .dt = dt, .op_kind = (int)op, .root = root};
  pthread_mutex_unlock(&w->mu);
  ST_CHECK(meet(w, what, c->rank, err));
  for (int r = 0; r < w->n; r++) {
    const post *p = &w->posts[r];
    if (p->op_kind != (int)op || p->count != count || p->dt != dt || p->root != root) {
      thread_world_abort(w);
      return st_error_set(err, ST_ERR_COMM, what,
                          "rank %d called %s with %lld elements of %s, but rank %d called op %d with %lld of %s",
                          c->rank, what, (long long)count, st_dtype_name(dt), r, p->op_kind, (long long)p->count,
                          st_dtype_name(p->dt));
    }
  }
  return ST_OK;
}

static double reduce_elem(thread_world *w, st_dtype dt, int64_t i, st_reduce_op op) {
  double acc = load(dt, w->posts[0].send, i);
  for (int r = 1; r < w->n; r++) {
    double v = load(dt, w->posts[r].send, i);
    if (op == ST_REDUCE_MAX) acc = v > acc ? v : acc;
    else if (op == ST_REDUCE_MIN) acc = v < acc ? v : acc;
    else acc += v;
  }
  return op == ST_REDUCE_AVG ? acc / w->n : acc;
}

/* the shared second half of every collective: wait until all have read, then write recv */
static st_result finish(st_comm *c, const char *what, void *tmp, void *recv, size_t bytes, st_comm_request **req,
                        st_error *err) {
  st_result r = meet(c->world, what, c->rank, err);
  if (r == ST_OK && bytes) memcpy(recv, tmp, bytes);
  free(tmp);
  if (r == ST_OK) r = make_request(c, req, err);
  return r;
}

static st_result tc_all_reduce(st_comm *c, const void *send, void *recv, int64_t count, st_dtype dt, st_reduce_op op,
                               st_comm_request **req, st_error *err) {
  ST_CHECK(enter(c, TC_ALL_REDUCE, "all_reduce", send, count, dt, (int)op, err));
  size_t bytes = (size_t)count * st_dtype_size(dt);
  void *tmp = malloc(bytes ? bytes : 1);
  if (!tmp) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "all_reduce", "temp");
  for (int64_t i = 0; i < count; i++) store(dt, tmp, i, reduce_elem(c->world, dt, i, op));
  return finish(c, "all_reduce", tmp, recv, bytes, req, err);
}

static st_result tc_reduce_scatter(st_comm *c, const void *send, void *recv, int64_t count, st_dtype dt,
                                   st_reduce_op op, st_comm_request **req, st_error *err) {
  ST_CHECK(enter(c, TC_REDUCE_SCATTER, "reduce_scatter", send, count, dt, (int)op, err));
  size_t bytes = (size_t)count * st_dtype_size(dt);
  void *tmp = malloc(bytes ? bytes : 1);
  if (!tmp) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "reduce_scatter", "temp");
  int64_t base = (int64_t)c->rank * count;
  for (int64_t i = 0; i < count; i++) store(dt, tmp, i, reduce_elem(c->world, dt, base + i, op));
  return finish(c, "reduce_scatter", tmp, recv, bytes, req, err);
}

static st_result tc_all_gather(st_comm *c, const void *send, void *recv, int64_t count, st_dtype dt,
                               st_comm_request **req, st_error *err) {
  ST_CHECK(enter(c, TC_ALL_GATHER, "all_gather", send, count, dt, -1, err));
  thread_world *w = c->world;
  size_t bytes = (size_t)count * st_dtype_size(dt);
  char *tmp = malloc(bytes * (size_t)w->n + 1);
  if (!tmp) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "all_gather", "temp");
  for (int r = 0; r < w->n; r++) memcpy(tmp + (size_t)r * bytes, w->posts[r].send, bytes);
  return finish(c, "all_gather", tmp, recv, bytes * (size_t)w->n, req, err);
}

static st_result tc_broadcast(st_comm *c, void *buf, int64_t count, st_dtype dt, int root, st_comm_request **req,
                              st_error *err) {
  ST_CHECK(enter(c, TC_BROADCAST, "broadcast", buf, count, dt, root, err));
  size_t bytes = (size_t)count * st_dtype_size(dt);
  char *tmp = malloc(bytes + 1);
  if (!tmp) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "broadcast", "temp");
  memcpy(tmp, c->world->posts[root].send, bytes);
  return finish(c, "broadcast", tmp, buf, bytes, req, err);
}

static st_result tc_barrier(st_comm *c, st_error *err) {
  ST_CHECK(enter(c, TC_BARRIER, "barrier", NULL, 0, ST_U8, -1, err));
  return meet(c->world, "barrier", c->rank, err);
}

static st_result tc_wait(st_comm_request *req, st_error *err) {
  (void)err;
  if (!req) return ST_OK;
  pthread_mutex_lock(&req->world->mu);
  req->world->open_requests[req->rank]--;
  pthread_mutex_unlock(&req->world->mu);
  free(req);
  return ST_OK;
}

static st_result tc_test(st_comm_request *req, bool *done, st_error *err) {
  (void)req;
  (void)err;
  *done = true;
  return ST_OK;
}

static int tc_rank(const st_comm *c) { return c->rank; }
static int tc_size(const st_comm *c) { return c->world->n; }

static st_result tc_split(st_comm *c, int color, int key, st_comm **out, st_error *err) {
  (void)c;
  (void)color;
  (void)key;
  *out = NULL;
  return st_error_set(err, ST_ERR_UNSUPPORTED, "thread_comm", "split is not implemented by the test comm");
}

static void tc_group_free(st_comm *g) { (void)g; }

static st_result tc_set_timeout(st_comm *c, int64_t timeout_ms, st_error *err) {
  (void)err;
  c->world->timeout_ms = timeout_ms;
  return ST_OK;
}

static const st_comm_plugin_v1 thread_comm = {
    .header = ST_PLUGIN_HEADER("comm", "thread", ST_VERSION_STRING, st_comm_plugin_v1),
    .split = tc_split,
    .group_free = tc_group_free,
    .rank = tc_rank,
    .size = tc_size,
    .all_reduce = tc_all_reduce,
    .reduce_scatter = tc_reduce_scatter,
    .all_gather = tc_all_gather,
    .broadcast = tc_broadcast,
    .barrier = tc_barrier,
    .wait = tc_wait,
    .test = tc_test,
    .set_timeout = tc_set_timeout,
};

const st_comm_plugin_v1 *thread_comm_plugin(void) { return &thread_comm; }
