/* comm_gloo.c — st_comm_plugin_v1 over Gloo's TCP transport (CPU buffers).
 *
 * Each group (the world and every split) owns a Gloo full-mesh context and one worker thread that
 * runs its collectives in call order; a blocking call is an asynchronous one followed by wait.
 * Collective tags are the group's call sequence number, so ranks that call in the same order match.
 * send/recv are posted from the calling thread (so an exchange that posts both before waiting cannot
 * deadlock) and waited for on the worker.
 *
 * Numerics: BF16/F16 all-reduce runs in fp32 (converted in and out, one rounding at the end);
 * reduce-scatter is an all-to-all of the blocks followed by a local reduction in rank order
 * (fp32 for half types), so its result is the same on every run; AVG is the sum divided by the group
 * size (integer division for integer types).
 *
 * Failures: the first error breaks the group; its Gloo context is closed at once so that peers
 * blocked on it fail fast, and the message names the collective, its sequence number, the group,
 * and the rank behind it: a rank whose store connection dropped (the store's dead-rank list), or,
 * on a timeout, the ranks that did not reach the same call. Later calls on a broken group fail
 * with the first message. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include <strata/comm.h>
#include <strata/host.h>

#include "gloo_shim.h"

#ifndef ST_GLOO_VERSION
#define ST_GLOO_VERSION "unknown"
#endif
#define DEAD_RANKS_KEY "strata/dead_ranks" /* served by the core's store (runtime/store.h) */
#define MSG_CAP 1024

typedef enum job_kind {
  JOB_ALL_REDUCE,
  JOB_REDUCE_SCATTER,
  JOB_ALL_GATHER_V,
  JOB_ALL_TO_ALL_V,
  JOB_BROADCAST,
  JOB_BARRIER,
  JOB_P2P_WAIT,
} job_kind;

static const char *job_names[] = {"all_reduce", "reduce_scatter", "all_gather", "all_to_all_v", "broadcast",
                                  "barrier", "send/recv"};

struct st_comm_request {
  st_comm *comm;
  job_kind kind;
  uint32_t seq;
  const void *send;
  void *recv;
  int64_t count; /* elements: per rank block (reduce_scatter, all_gather), total (all_reduce, broadcast) */
  st_dtype dt;
  st_reduce_op op;
  int root;
  int64_t *counts; /* [4 * size]: send counts, send displs, recv counts, recv displs (v collectives) */
  gs_p2p *p2p;
  int peer;
  bool is_send;
  int64_t timeout_ms; /* the group's timeout when the call was made */
  /* completion */
  bool done;
  st_result result;
  st_error err;
  struct st_comm_request *next;
};

struct st_comm {
  const st_host *host;
  st_store *store;
  gs_device *dev; /* owned by the world group */
  gs_ctx *ctx;
  st_comm *parent;
  int rank, size;
  int *world_ranks; /* group rank -> world rank */
  char name[160];
  int64_t timeout_ms;
  uint32_t seq, split_seq;
  int children;
  /* worker */
  pthread_t worker;
  bool has_worker;
  pthread_mutex_t mu;
  pthread_cond_t cv;      /* queue changed */
  pthread_cond_t done_cv; /* a request completed */
  st_comm_request *head, *tail;
  bool stop;
  bool broken;
  st_result broken_code;
  char broken_msg[ST_ERROR_MESSAGE_MAX];
};

static int64_t now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ numerics */

static float load_f(const void *p, st_dtype dt, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  case ST_F16: return st_f16_to_f32(((const uint16_t *)p)[i]);
  default: return 0.0f;
  }
}

static void store_f(void *p, st_dtype dt, int64_t i, float v) {
  switch (dt) {
  case ST_F32: ((float *)p)[i] = v; break;
  case ST_BF16: ((uint16_t *)p)[i] = st_f32_to_bf16(v); break;
  case ST_F16: ((uint16_t *)p)[i] = st_f32_to_f16(v); break;
  default: break;
  }
}

static gs_type gs_type_of(st_dtype dt) {
  switch (dt) {
  case ST_F64: return GS_F64;
  case ST_I32: return GS_I32;
  case ST_I64: return GS_I64;
  case ST_U8: return GS_U8;
  default: return GS_F32;
  }
}

static gs_op gs_op_of(st_reduce_op op) { return op == ST_REDUCE_MAX ? GS_MAX : op == ST_REDUCE_MIN ? GS_MIN : GS_SUM; }

/* acc[i] (op)= x for every dtype; acc has dt's element type except halves, which accumulate in fp32 */
#define REDUCE_LOOP(T, acc_, x_, n_, op_)                                                                  \
  do {                                                                                                     \
    T *a_ = (T *)(acc_);                                                                                   \
    const T *b_ = (const T *)(x_);                                                                         \
    for (int64_t i_ = 0; i_ < (n_); i_++) {                                                                \
      if ((op_) == ST_REDUCE_MAX) a_[i_] = b_[i_] > a_[i_] ? b_[i_] : a_[i_];                              \
      else if ((op_) == ST_REDUCE_MIN) a_[i_] = b_[i_] < a_[i_] ? b_[i_] : a_[i_];                         \
      else a_[i_] = (T)(a_[i_] + b_[i_]);                                                                  \
    }                                                                                                      \
  } while (0)

static void reduce_into(void *acc, const void *x, int64_t n, st_dtype dt, st_reduce_op op) {
  switch (dt) {
  case ST_F32: REDUCE_LOOP(float, acc, x, n, op); break;
  case ST_F64: REDUCE_LOOP(double, acc, x, n, op); break;
  case ST_I32: REDUCE_LOOP(int32_t, acc, x, n, op); break;
  case ST_I64: REDUCE_LOOP(int64_t, acc, x, n, op); break;
  case ST_U8: REDUCE_LOOP(uint8_t, acc, x, n, op); break;
  case ST_BF16:
  case ST_F16: {
    float *a = acc;
    for (int64_t i = 0; i < n; i++) {
      float v = load_f(x, dt, i);
      if (op == ST_REDUCE_MAX) a[i] = v > a[i] ? v : a[i];
      else if (op == ST_REDUCE_MIN) a[i] = v < a[i] ? v : a[i];
      else a[i] += v;
    }
    break;
  }
  default: break;
  }
}

/* divides by the group size for AVG (buf holds dt, or fp32 for halves) */
static void average(void *buf, int64_t n, st_dtype dt, int size) {
  switch (dt) {
  case ST_F64:
    for (int64_t i = 0; i < n; i++) ((double *)buf)[i] /= size;
    break;
  case ST_I32:
    for (int64_t i = 0; i < n; i++) ((int32_t *)buf)[i] /= size;
    break;
  case ST_I64:
    for (int64_t i = 0; i < n; i++) ((int64_t *)buf)[i] /= size;
    break;
  case ST_U8:
    for (int64_t i = 0; i < n; i++) ((uint8_t *)buf)[i] = (uint8_t)(((uint8_t *)buf)[i] / size);
    break;
  default: /* F32 and halves (fp32 accumulators) */
    for (int64_t i = 0; i < n; i++) ((float *)buf)[i] /= (float)size;
    break;
  }
}

static bool is_half(st_dtype dt) { return dt == ST_BF16 || dt == ST_F16; }

/* ------------------------------------------------------------------ diagnosis */

/* "all_reduce #12 on group 'world' (rank 1 of 4)" */
static void describe(const st_comm_request *r, char *out, size_t cap) {
  const st_comm *c = r->comm;
  if (r->kind == JOB_P2P_WAIT)
    snprintf(out, cap, "%s group rank %d on group '%s' (rank %d of %d, %lld x %s)", r->is_send ? "send to" : "recv from",
             r->peer, c->name, c->rank, c->size, (long long)r->count, st_dtype_name(r->dt));
  else
    snprintf(out, cap, "%s #%u on group '%s' (rank %d of %d, %lld x %s)", job_names[r->kind], r->seq, c->name, c->rank,
             c->size, (long long)r->count, st_dtype_name(r->dt));
}

/* group rank of world rank w, or -1 */
static int group_rank_of(const st_comm *c, int w) {
  for (int i = 0; i < c->size; i++)
    if (c->world_ranks[i] == w) return i;
  return -1;
}

/* the first dead member of the group per the store (-1: none; -2: the store is unreachable) */
static int dead_member(st_comm *c, int64_t wait_ms) {
  int64_t deadline = now_ms() + wait_ms;
  for (;;) {
    char list[4096];
    size_t len = sizeof list - 1;
    st_error e;
    st_result r = c->store->get(c->store, DEAD_RANKS_KEY, list, &len, 0, &e);
    if (r == ST_ERR_COMM || r == ST_ERR_TIMEOUT) return -2;
    if (r == ST_OK) {
      list[len] = '\0';
      for (char *p = list; *p;) {
        char *end;
        long w = strtol(p, &end, 10);
        if (end == p) break;
        if (group_rank_of(c, (int)w) >= 0) return (int)w;
        p = *end == ',' ? end + 1 : end;
      }
    }
    if (now_ms() >= deadline) return -1;
    usleep(100 * 1000);
  }
}

/* On a timeout: every rank stuck in call #seq says so in the store, with what it called there;
 * whoever did not within `window_ms` is listed in missing[], whoever called something else at the
 * same position in differ[] (the ranks' collective schedules differ). Returns the number missing
 * (-1: the store failed). */
static int missing_ranks(st_comm *c, uint32_t seq, const char *mine, int64_t window_ms, char *missing_out,
                         size_t missing_cap, char *differ_out, size_t differ_cap) {
  char key[256];
  st_error e;
  snprintf(key, sizeof key, "gloo/%s/stuck/%u/%d", c->name, seq, c->rank);
  if (c->store->set(c->store, key, mine, strlen(mine), &e) != ST_OK) return -1;
  int64_t deadline = now_ms() + window_ms;
  int missing = 0;
  size_t used = 0, dused = 0;
  missing_out[0] = differ_out[0] = '\0';
  for (int r = 0; r < c->size; r++) {
    if (r == c->rank) continue;
    snprintf(key, sizeof key, "gloo/%s/stuck/%u/%d", c->name, seq, r);
    char v[160];
    size_t len = sizeof v - 1;
    int64_t left = deadline - now_ms();
    st_result res = c->store->get(c->store, key, v, &len, left > 0 ? left : 0, &e);
    if (res == ST_ERR_COMM) return -1;
    if (res != ST_OK) {
      missing++;
      used += (size_t)snprintf(missing_out + used, used < missing_cap ? missing_cap - used : 0, "%s%d (world rank %d)",
                               used ? ", " : "", r, c->world_ranks[r]);
    } else {
      v[len] = '\0';
      if (strcmp(v, mine))
        dused += (size_t)snprintf(differ_out + dused, dused < differ_cap ? differ_cap - dused : 0,
                                  "%sgroup rank %d called %s", dused ? "; " : "", r, v);
    }
  }
  return missing;
}

/* fills r->err after a Gloo failure; breaks the group and closes its connections first */
static void fail_request(st_comm_request *r, int gs_code, const char *gloo_msg) {
  st_comm *c = r->comm;
  char what[256];
  describe(r, what, sizeof what);
  pthread_mutex_lock(&c->mu);
  bool first = !c->broken;
  c->broken = true;
  gs_ctx *ctx = c->ctx;
  c->ctx = NULL;
  pthread_mutex_unlock(&c->mu);
  if (ctx) gs_free(ctx); /* peers blocked on us fail now rather than at their timeout */

  int dead = dead_member(c, 2000);
  if (dead >= 0) {
    st_error_set(&r->err, ST_ERR_COMM, c->name,
                 "%s failed: rank %d died (group rank %d; its connection to the store closed without a goodbye — see "
                 "rank %d's log) [gloo: %s]",
                 what, dead, group_rank_of(c, dead), dead, gloo_msg);
  } else if (dead == -2) {
    st_error_set(&r->err, ST_ERR_COMM, c->name,
                 "%s failed and the rendezvous store is unreachable too: the process hosting it (the launcher or rank "
                 "0) is gone — see its log [gloo: %s]",
                 what, gloo_msg);
  } else if (r->kind != JOB_P2P_WAIT) {
    /* a timeout here, or a peer that broke the group after its own timeout: compare what every rank
     * was doing at this call through the store */
    bool timed_out = gs_code == GS_TIMEOUT;
    char list[512], differ[768], mine[160];
    static const char *op_names[] = {"sum", "avg", "max", "min"};
    snprintf(mine, sizeof mine, "%s of %lld x %s%s%s", job_names[r->kind], (long long)r->count, st_dtype_name(r->dt),
             r->kind == JOB_ALL_REDUCE || r->kind == JOB_REDUCE_SCATTER ? " " : "",
             r->kind == JOB_ALL_REDUCE || r->kind == JOB_REDUCE_SCATTER ? op_names[r->op & 3] : "");
    int64_t window = timed_out ? (r->timeout_ms < 5000 ? r->timeout_ms : 5000) : 2000;
    int n = missing_ranks(c, r->seq, mine, window, list, sizeof list, differ, sizeof differ);
    char how[64] = "failed";
    if (timed_out) snprintf(how, sizeof how, "timed out after %lld ms", (long long)r->timeout_ms);
    if (n >= 0 && differ[0])
      st_error_set(&r->err, ST_ERR_COMM, c->name,
                   "%s %s because the ranks' collective schedules differ: at call #%u this rank called %s, %s%s%s "
                   "[gloo: %s]",
                   what, how, r->seq, mine, differ, n > 0 ? "; not arrived: group rank " : "", n > 0 ? list : "",
                   gloo_msg);
    else if (timed_out && n > 0)
      st_error_set(&r->err, ST_ERR_TIMEOUT, c->name,
                   "%s timed out after %lld ms: group rank %s did not arrive (the other ranks are waiting in the same "
                   "call; check that every rank runs the same collectives in the same order) [gloo: %s]",
                   what, (long long)r->timeout_ms, list, gloo_msg);
    else if (timed_out)
      st_error_set(&r->err, ST_ERR_TIMEOUT, c->name,
                   "%s timed out after %lld ms waiting for a peer (no rank has died%s; raise the comm timeout if a "
                   "rank is legitimately slow) [gloo: %s]",
                   what, (long long)r->timeout_ms, n == 0 ? " and every rank reached this call" : "", gloo_msg);
    else
      st_error_set(&r->err, ST_ERR_COMM, c->name,
                   "%s failed: %s (no rank has died; a peer may have failed first — see the other ranks' logs)", what,
                   gloo_msg);
  } else {
    st_error_set(&r->err, gs_code == GS_TIMEOUT ? ST_ERR_TIMEOUT : ST_ERR_COMM, c->name,
                 "%s failed: %s (no rank has died; a peer may have failed first — see the other ranks' logs)", what,
                 gloo_msg);
  }
  r->result = r->err.code;
  if (first) {
    pthread_mutex_lock(&c->mu);
    c->broken_code = r->result;
    snprintf(c->broken_msg, sizeof c->broken_msg, "%s", r->err.message);
    pthread_mutex_unlock(&c->mu);
  }
}

/* ------------------------------------------------------------------ job execution (worker thread) */

static int run_all_reduce(st_comm_request *r, gs_ctx *ctx, char *msg) {
  st_comm *c = r->comm;
  size_t es = st_dtype_size(r->dt);
  int rc = GS_OK;
  if (is_half(r->dt)) {
    float *tmp = malloc((size_t)(r->count ? r->count : 1) * sizeof(float));
    if (!tmp) {
      snprintf(msg, MSG_CAP, "out of memory for an fp32 buffer of %lld elements", (long long)r->count);
      return GS_ERROR;
    }
    for (int64_t i = 0; i < r->count; i++) tmp[i] = load_f(r->send, r->dt, i);
    rc = gs_allreduce(ctx, tmp, (size_t)r->count, GS_F32, gs_op_of(r->op), r->seq, r->timeout_ms, msg, MSG_CAP);
    if (rc == GS_OK) {
      if (r->op == ST_REDUCE_AVG) average(tmp, r->count, ST_F32, c->size);
      for (int64_t i = 0; i < r->count; i++) store_f(r->recv, r->dt, i, tmp[i]);
    }
    free(tmp);
    return rc;
  }
  if (r->send != r->recv) memcpy(r->recv, r->send, (size_t)r->count * es);
  rc = gs_allreduce(ctx, r->recv, (size_t)r->count, gs_type_of(r->dt), gs_op_of(r->op), r->seq, r->timeout_ms, msg,
                    MSG_CAP);
  if (rc == GS_OK && r->op == ST_REDUCE_AVG) average(r->recv, r->count, r->dt, c->size);
  return rc;
}

static int run_reduce_scatter(st_comm_request *r, gs_ctx *ctx, char *msg) {
  st_comm *c = r->comm;
  size_t es = st_dtype_size(r->dt), block = (size_t)r->count * es;
  int64_t *bytes = malloc(sizeof(int64_t) * (size_t)c->size);
  uint8_t *gathered = malloc(block * (size_t)c->size + 1);
  size_t acc_es = is_half(r->dt) ? sizeof(float) : es;
  uint8_t *acc = malloc((size_t)r->count * acc_es + 1);
  if (!bytes || !gathered || !acc) {
    free(bytes), free(gathered), free(acc);
    snprintf(msg, MSG_CAP, "out of memory for reduce_scatter buffers");
    return GS_ERROR;
  }
  for (int i = 0; i < c->size; i++) bytes[i] = (int64_t)block;
  /* rank r receives block r of every rank, in rank order */
  int rc = gs_alltoallv(ctx, r->send, bytes, gathered, bytes, r->seq, r->timeout_ms, msg, MSG_CAP);
  if (rc == GS_OK) {
    if (is_half(r->dt)) {
      for (int64_t i = 0; i < r->count; i++) ((float *)acc)[i] = load_f(gathered, r->dt, i);
    } else {
      memcpy(acc, gathered, block);
    }
    for (int src = 1; src < c->size; src++) reduce_into(acc, gathered + (size_t)src * block, r->count, r->dt, r->op);
    if (r->op == ST_REDUCE_AVG) average(acc, r->count, r->dt, c->size);
    if (is_half(r->dt))
      for (int64_t i = 0; i < r->count; i++) store_f(r->recv, r->dt, i, ((float *)acc)[i]);
    else
      memcpy(r->recv, acc, block);
  }
  free(bytes), free(gathered), free(acc);
  return rc;
}

/* counts[0..n) send counts, [n..2n) send displs, [2n..3n) recv counts, [3n..4n) recv displs */
static bool packed(const int64_t *counts, const int64_t *displs, int n) {
  int64_t off = 0;
  for (int i = 0; i < n; i++) {
    if (displs[i] != off) return false;
    off += counts[i];
  }
  return true;
}

static int run_all_gather_v(st_comm_request *r, gs_ctx *ctx, char *msg) {
  st_comm *c = r->comm;
  int n = c->size;
  size_t es = st_dtype_size(r->dt);
  const int64_t *rc_ = r->counts + 2 * n, *rd = r->counts + 3 * n;
  size_t *bytes = malloc(sizeof(size_t) * (size_t)n);
  if (!bytes) {
    snprintf(msg, MSG_CAP, "out of memory");
    return GS_ERROR;
  }
  int64_t total = 0;
  for (int i = 0; i < n; i++) {
    bytes[i] = (size_t)rc_[i] * es;
    total += rc_[i];
  }
  int rc;
  if (packed(rc_, rd, n)) {
    uint8_t *mine = (uint8_t *)r->recv + (size_t)rd[c->rank] * es;
    rc = gs_allgatherv(ctx, (const void *)mine == r->send ? NULL : r->send, r->recv, bytes, r->seq, r->timeout_ms, msg,
                       MSG_CAP);
  } else {
    uint8_t *tmp = malloc((size_t)total * es + 1);
    if (!tmp) {
      free(bytes);
      snprintf(msg, MSG_CAP, "out of memory for a %lld-element gather buffer", (long long)total);
      return GS_ERROR;
    }
    rc = gs_allgatherv(ctx, r->send, tmp, bytes, r->seq, r->timeout_ms, msg, MSG_CAP);
    if (rc == GS_OK) {
      size_t off = 0;
      for (int i = 0; i < n; i++) {
        memcpy((uint8_t *)r->recv + (size_t)rd[i] * es, tmp + off, bytes[i]);
        off += bytes[i];
      }
    }
    free(tmp);
  }
  free(bytes);
  return rc;
}

static int run_all_to_all_v(st_comm_request *r, gs_ctx *ctx, char *msg) {
  st_comm *c = r->comm;
  int n = c->size;
  size_t es = st_dtype_size(r->dt);
  const int64_t *sc = r->counts, *sd = r->counts + n, *rcn = r->counts + 2 * n, *rd = r->counts + 3 * n;
  int64_t *sb = malloc(sizeof(int64_t) * (size_t)n * 2), *rb = sb ? sb + n : NULL;
  if (!sb) {
    snprintf(msg, MSG_CAP, "out of memory");
    return GS_ERROR;
  }
  int64_t stot = 0, rtot = 0;
  for (int i = 0; i < n; i++) {
    sb[i] = sc[i] * (int64_t)es;
    rb[i] = rcn[i] * (int64_t)es;
    stot += sb[i];
    rtot += rb[i];
  }
  bool sp = packed(sc, sd, n), rp = packed(rcn, rd, n);
  uint8_t *sbuf = sp ? (uint8_t *)r->send : malloc((size_t)stot + 1);
  uint8_t *rbuf = rp ? (uint8_t *)r->recv : malloc((size_t)rtot + 1);
  int rc = GS_ERROR;
  if (!sbuf || !rbuf) {
    snprintf(msg, MSG_CAP, "out of memory for all_to_all_v staging buffers");
  } else {
    if (!sp) {
      size_t off = 0;
      for (int i = 0; i < n; i++) {
        memcpy(sbuf + off, (const uint8_t *)r->send + (size_t)sd[i] * es, (size_t)sb[i]);
        off += (size_t)sb[i];
      }
    }
    rc = gs_alltoallv(ctx, sbuf, sb, rbuf, rb, r->seq, r->timeout_ms, msg, MSG_CAP);
    if (rc == GS_OK && !rp) {
      size_t off = 0;
      for (int i = 0; i < n; i++) {
        memcpy((uint8_t *)r->recv + (size_t)rd[i] * es, rbuf + off, (size_t)rb[i]);
        off += (size_t)rb[i];
      }
    }
  }
  if (!sp) free(sbuf);
  if (!rp) free(rbuf);
  free(sb);
  return rc;
}

static void run_job(st_comm_request *r) {
  st_comm *c = r->comm;
  char msg[MSG_CAP] = "";
  pthread_mutex_lock(&c->mu);
  bool broken = c->broken;
  gs_ctx *ctx = c->ctx;
  pthread_mutex_unlock(&c->mu);
  if (broken) {
    char what[256];
    describe(r, what, sizeof what);
    if (r->p2p) gs_p2p_wait(r->p2p, 1, msg, sizeof msg); /* frees the handle */
    r->result = st_error_set(&r->err, c->broken_code ? c->broken_code : ST_ERR_COMM, c->name,
                             "%s: the group is broken by an earlier error: %s", what, c->broken_msg);
    return;
  }
  int rc = GS_OK;
  switch (r->kind) {
  case JOB_ALL_REDUCE: rc = run_all_reduce(r, ctx, msg); break;
  case JOB_REDUCE_SCATTER: rc = run_reduce_scatter(r, ctx, msg); break;
  case JOB_ALL_GATHER_V: rc = run_all_gather_v(r, ctx, msg); break;
  case JOB_ALL_TO_ALL_V: rc = run_all_to_all_v(r, ctx, msg); break;
  case JOB_BROADCAST:
    rc = gs_broadcast(ctx, r->recv, (size_t)r->count * st_dtype_size(r->dt), r->root, r->seq, r->timeout_ms, msg,
                      sizeof msg);
    break;
  case JOB_BARRIER: rc = gs_barrier(ctx, r->seq, r->timeout_ms, msg, sizeof msg); break;
  case JOB_P2P_WAIT:
    rc = gs_p2p_wait(r->p2p, r->timeout_ms, msg, sizeof msg);
    r->p2p = NULL;
    break;
  }
  if (rc == GS_OK) r->result = ST_OK;
  else fail_request(r, rc, msg);
}

static void *worker_main(void *arg) {
  st_comm *c = arg;
  pthread_mutex_lock(&c->mu);
  for (;;) {
    while (!c->head && !c->stop) pthread_cond_wait(&c->cv, &c->mu);
    if (!c->head) break;
    st_comm_request *r = c->head;
    c->head = r->next;
    if (!c->head) c->tail = NULL;
    pthread_mutex_unlock(&c->mu);
    run_job(r);
    pthread_mutex_lock(&c->mu);
    r->done = true;
    pthread_cond_broadcast(&c->done_cv);
  }
  pthread_mutex_unlock(&c->mu);
  return NULL;
}

/* ------------------------------------------------------------------ requests */

static void request_free(st_comm_request *r) {
  if (!r) return;
  free(r->counts);
  free(r);
}

static st_result enqueue(st_comm *c, st_comm_request *r, st_comm_request **req, st_error *err) {
  pthread_mutex_lock(&c->mu);
  if (r->kind != JOB_P2P_WAIT) r->seq = c->seq++;
  r->timeout_ms = c->timeout_ms;
  if (c->tail) c->tail->next = r;
  else c->head = r;
  c->tail = r;
  pthread_cond_signal(&c->cv);
  pthread_mutex_unlock(&c->mu);
  if (req) {
    *req = r;
    return ST_OK;
  }
  /* blocking: wait here */
  pthread_mutex_lock(&c->mu);
  while (!r->done) pthread_cond_wait(&c->done_cv, &c->mu);
  pthread_mutex_unlock(&c->mu);
  st_result res = r->result;
  if (res != ST_OK && err) *err = r->err;
  request_free(r);
  return res;
}

static st_comm_request *request_new(st_comm *c, job_kind kind, st_error *err) {
  st_comm_request *r = calloc(1, sizeof *r);
  if (!r) {
    st_error_set(err, ST_ERR_OUT_OF_MEMORY, c->name, "out of memory for a comm request");
    return NULL;
  }
  r->comm = c;
  r->kind = kind;
  return r;
}

static st_result check_args(st_comm *c, const char *what, int64_t count, st_dtype dt, st_error *err) {
  if (!c) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "%s on a NULL group", what);
  if (count < 0) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, c->name, "%s: negative count %lld", what, (long long)count);
  if (st_dtype_size(dt) == 0) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, c->name, "%s: unknown dtype %d", what, (int)dt);
  return ST_OK;
}

/* ------------------------------------------------------------------ groups */

static void comm_free(st_comm *c) {
  if (!c) return;
  if (c->has_worker) {
    pthread_mutex_lock(&c->mu);
    c->stop = true;
    pthread_cond_broadcast(&c->cv);
    pthread_mutex_unlock(&c->mu);
    pthread_join(c->worker, NULL);
  }
  if (c->ctx) gs_free(c->ctx);
  if (!c->parent && c->dev) gs_device_free(c->dev);
  pthread_mutex_destroy(&c->mu);
  pthread_cond_destroy(&c->cv);
  pthread_cond_destroy(&c->done_cv);
  free(c->world_ranks);
  free(c);
}

static st_comm *comm_alloc(int size) {
  st_comm *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->world_ranks = calloc((size_t)size, sizeof(int));
  if (!c->world_ranks) {
    free(c);
    return NULL;
  }
  c->size = size;
  pthread_mutex_init(&c->mu, NULL);
  pthread_cond_init(&c->cv, NULL);
  pthread_cond_init(&c->done_cv, NULL);
  return c;
}

static st_result comm_connect(st_comm *c, const char *prefix, st_error *err) {
  char msg[MSG_CAP] = "";
  int rc = gs_connect(c->dev, c->store, prefix, c->rank, c->size, c->timeout_ms, &c->ctx, msg, sizeof msg);
  if (rc != GS_OK) {
    int dead = -1;
    if (c->store) dead = dead_member(c, 500);
    if (dead >= 0)
      return st_error_set(err, ST_ERR_COMM, c->name,
                          "connecting group '%s' (rank %d of %d): rank %d died (see its log) [gloo: %s]", c->name,
                          c->rank, c->size, dead, msg);
    return st_error_set(err, rc == GS_TIMEOUT ? ST_ERR_TIMEOUT : ST_ERR_COMM, c->name,
                        "connecting group '%s' (rank %d of %d) through the store under '%s' failed within %lld ms: %s "
                        "(do all ranks agree on WORLD_SIZE and reach each other on this interface? set "
                        "STRATA_COMM_INTERFACE to pick one)",
                        c->name, c->rank, c->size, prefix, (long long)c->timeout_ms, msg);
  }
  if (pthread_create(&c->worker, NULL, worker_main, c) != 0)
    return st_error_set(err, ST_ERR_INTERNAL, c->name, "cannot start the comm worker thread");
  c->has_worker = true;
  return ST_OK;
}

static st_result gloo_init(const st_host *host, const st_comm_init_args *args, st_comm **world, st_error *err) {
  *world = NULL;
  if (!args || args->struct_size < sizeof(st_comm_init_args) - sizeof(const char *))
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "comm_gloo: init arguments missing or too old");
  if (args->world_size < 1 || args->rank < 0 || args->rank >= args->world_size)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "comm_gloo: rank %d is not in a world of %d", args->rank,
                        args->world_size);
  if (args->device.type != ST_DEVICE_CPU)
    return st_error_set(err, ST_ERR_UNSUPPORTED, "comm",
                        "comm_gloo moves host (CPU) buffers only; use comm_nccl for CUDA tensors");
  if (!args->store)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "comm_gloo needs the rendezvous store");
  st_comm *c = comm_alloc(args->world_size);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "comm", "out of memory");
  c->host = host;
  c->store = args->store;
  c->rank = args->rank;
  c->timeout_ms = args->timeout_ms > 0 ? args->timeout_ms : 300000;
  snprintf(c->name, sizeof c->name, "world");
  for (int i = 0; i < c->size; i++) c->world_ranks[i] = i;

  const char *iface = args->interface;
  if (!iface || !*iface) iface = getenv("STRATA_COMM_INTERFACE");
  if (!iface || !*iface) iface = getenv("GLOO_SOCKET_IFNAME");
  /* one node: loopback; several: the address this host's name resolves to (or the interface) */
  const char *hostname = args->local_world_size == args->world_size ? "127.0.0.1" : NULL;
  char msg[MSG_CAP] = "";
  if (gs_device_create(iface, hostname, &c->dev, msg, sizeof msg) != GS_OK) {
    comm_free(c);
    return st_error_set(err, ST_ERR_COMM, iface ? "STRATA_COMM_INTERFACE" : "comm",
                        "comm_gloo: cannot open a TCP device on %s%s: %s (`strata env` lists the network interfaces)",
                        iface ? "interface " : "",
                        iface ? iface : (hostname ? hostname : "this host's address"), msg);
  }
  st_result r = comm_connect(c, "gloo/world/", err);
  if (r != ST_OK) {
    comm_free(c);
    return r;
  }
  *world = c;
  return ST_OK;
}

static void gloo_finalize(st_comm *world) { comm_free(world); }

static void gloo_group_free(st_comm *group) {
  if (!group) return;
  if (group->parent) {
    pthread_mutex_lock(&group->parent->mu);
    group->parent->children--;
    pthread_mutex_unlock(&group->parent->mu);
  }
  comm_free(group);
}

static st_result gloo_all_gather(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                 st_comm_request **req, st_error *err);

static st_result gloo_split(st_comm *comm, int color, int key, st_comm **out, st_error *err) {
  *out = NULL;
  if (!comm) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "split of a NULL group");
  int n = comm->size;
  int32_t mine[2] = {color < 0 ? -1 : color, key};
  int32_t *all = malloc(sizeof(int32_t) * 2 * (size_t)n);
  if (!all) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, comm->name, "out of memory");
  st_result r = gloo_all_gather(comm, mine, all, 2, ST_I32, NULL, err);
  if (r != ST_OK) {
    free(all);
    return st_error_prefix(err, "split of group '%s': ", comm->name);
  }
  uint32_t split_id = comm->split_seq++;
  if (color < 0) {
    free(all);
    return ST_OK;
  }
  /* members: same color, ordered by (key, parent rank) */
  int size = 0;
  for (int i = 0; i < n; i++) size += all[2 * i] == color;
  st_comm *c = comm_alloc(size);
  if (!c) {
    free(all);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, comm->name, "out of memory");
  }
  int *order = malloc(sizeof(int) * (size_t)size);
  if (!order) {
    free(all);
    comm_free(c);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, comm->name, "out of memory");
  }
  int m = 0;
  for (int i = 0; i < n; i++)
    if (all[2 * i] == color) {
      int j = m++;
      while (j > 0 && (all[2 * order[j - 1] + 1] > all[2 * i + 1])) { /* insertion sort by key, stable */
        order[j] = order[j - 1];
        j--;
      }
      order[j] = i;
    }
  for (int j = 0; j < size; j++) {
    c->world_ranks[j] = comm->world_ranks[order[j]];
    if (order[j] == comm->rank) c->rank = j;
  }
  free(order);
  free(all);
  c->host = comm->host;
  c->store = comm->store;
  c->dev = comm->dev;
  c->parent = comm;
  c->timeout_ms = comm->timeout_ms;
  snprintf(c->name, sizeof c->name, "%s.split%u:color%d", comm->name, split_id, color);
  char prefix[256];
  snprintf(prefix, sizeof prefix, "gloo/%s/", c->name);
  r = comm_connect(c, prefix, err);
  if (r != ST_OK) {
    comm_free(c);
    return r;
  }
  pthread_mutex_lock(&comm->mu);
  comm->children++;
  pthread_mutex_unlock(&comm->mu);
  *out = c;
  return ST_OK;
}

static int gloo_rank(const st_comm *comm) { return comm ? comm->rank : -1; }
static int gloo_size(const st_comm *comm) { return comm ? comm->size : 0; }

/* ------------------------------------------------------------------ collectives */

static st_result gloo_all_reduce(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                 st_reduce_op op, st_comm_request **req, st_error *err) {
  ST_CHECK(check_args(comm, "all_reduce", count, dt, err));
  if ((unsigned)op > ST_REDUCE_MIN)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "all_reduce: unknown op %d", (int)op);
  st_comm_request *r = request_new(comm, JOB_ALL_REDUCE, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  r->send = send;
  r->recv = recv;
  r->count = count;
  r->dt = dt;
  r->op = op;
  return enqueue(comm, r, req, err);
}

static st_result gloo_reduce_scatter(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                     st_reduce_op op, st_comm_request **req, st_error *err) {
  ST_CHECK(check_args(comm, "reduce_scatter", count, dt, err));
  if ((unsigned)op > ST_REDUCE_MIN)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "reduce_scatter: unknown op %d", (int)op);
  st_comm_request *r = request_new(comm, JOB_REDUCE_SCATTER, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  r->send = send;
  r->recv = recv;
  r->count = count;
  r->dt = dt;
  r->op = op;
  return enqueue(comm, r, req, err);
}

/* a v-collective request with copies of the count/displacement arrays (NULL arrays: equal blocks) */
static st_comm_request *v_request(st_comm *comm, job_kind kind, const int64_t *sc, const int64_t *sd,
                                  const int64_t *rc, const int64_t *rd, st_error *err) {
  st_comm_request *r = request_new(comm, kind, err);
  if (!r) return NULL;
  int n = comm->size;
  r->counts = calloc((size_t)n * 4, sizeof(int64_t));
  if (!r->counts) {
    free(r);
    st_error_set(err, ST_ERR_OUT_OF_MEMORY, comm->name, "out of memory");
    return NULL;
  }
  if (sc) memcpy(r->counts, sc, sizeof(int64_t) * (size_t)n);
  if (sd) memcpy(r->counts + n, sd, sizeof(int64_t) * (size_t)n);
  if (rc) memcpy(r->counts + 2 * n, rc, sizeof(int64_t) * (size_t)n);
  if (rd) memcpy(r->counts + 3 * n, rd, sizeof(int64_t) * (size_t)n);
  return r;
}

static st_result gloo_all_gather_v(st_comm *comm, const void *send, int64_t send_count, void *recv,
                                   const int64_t *recv_counts, const int64_t *recv_displs, st_dtype dt,
                                   st_comm_request **req, st_error *err) {
  ST_CHECK(check_args(comm, "all_gather_v", send_count, dt, err));
  if (!recv_counts || !recv_displs)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "all_gather_v: recv_counts and recv_displs are required");
  if (recv_counts[comm->rank] != send_count)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name,
                        "all_gather_v: recv_counts[%d] = %lld but this rank sends %lld", comm->rank,
                        (long long)recv_counts[comm->rank], (long long)send_count);
  for (int i = 0; i < comm->size; i++)
    if (recv_counts[i] < 0 || recv_displs[i] < 0)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "all_gather_v: negative count or displacement for rank %d", i);
  st_comm_request *r = v_request(comm, JOB_ALL_GATHER_V, NULL, NULL, recv_counts, recv_displs, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  r->send = send;
  r->recv = recv;
  r->count = send_count;
  r->dt = dt;
  return enqueue(comm, r, req, err);
}

static st_result gloo_all_gather(st_comm *comm, const void *send, void *recv, int64_t count, st_dtype dt,
                                 st_comm_request **req, st_error *err) {
  ST_CHECK(check_args(comm, "all_gather", count, dt, err));
  st_comm_request *r = v_request(comm, JOB_ALL_GATHER_V, NULL, NULL, NULL, NULL, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  int n = comm->size;
  for (int i = 0; i < n; i++) {
    r->counts[2 * n + i] = count;
    r->counts[3 * n + i] = count * i;
  }
  r->send = send;
  r->recv = recv;
  r->count = count;
  r->dt = dt;
  return enqueue(comm, r, req, err);
}

static st_result gloo_all_to_all_v(st_comm *comm, const void *send, const int64_t *send_counts,
                                   const int64_t *send_displs, void *recv, const int64_t *recv_counts,
                                   const int64_t *recv_displs, st_dtype dt, st_comm_request **req, st_error *err) {
  ST_CHECK(check_args(comm, "all_to_all_v", 0, dt, err));
  if (!send_counts || !send_displs || !recv_counts || !recv_displs)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "all_to_all_v: every count and displacement array is required");
  int64_t total = 0;
  for (int i = 0; i < comm->size; i++) {
    if (send_counts[i] < 0 || send_displs[i] < 0 || recv_counts[i] < 0 || recv_displs[i] < 0)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "all_to_all_v: negative count or displacement for rank %d", i);
    total += recv_counts[i];
  }
  st_comm_request *r = v_request(comm, JOB_ALL_TO_ALL_V, send_counts, send_displs, recv_counts, recv_displs, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  r->send = send;
  r->recv = recv;
  r->count = total;
  r->dt = dt;
  return enqueue(comm, r, req, err);
}

static st_result gloo_broadcast(st_comm *comm, void *buf, int64_t count, st_dtype dt, int root, st_comm_request **req,
                                st_error *err) {
  ST_CHECK(check_args(comm, "broadcast", count, dt, err));
  if (root < 0 || root >= comm->size)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "broadcast: root %d is not in a group of %d", root,
                        comm->size);
  st_comm_request *r = request_new(comm, JOB_BROADCAST, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  r->recv = buf;
  r->count = count;
  r->dt = dt;
  r->root = root;
  return enqueue(comm, r, req, err);
}

static st_result gloo_barrier(st_comm *comm, st_error *err) {
  if (!comm) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "barrier on a NULL group");
  st_comm_request *r = request_new(comm, JOB_BARRIER, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  r->dt = ST_U8;
  return enqueue(comm, r, NULL, err);
}

static st_result p2p(st_comm *comm, bool is_send, void *buf, int64_t count, st_dtype dt, int peer, int tag,
                     st_comm_request **req, st_error *err) {
  const char *what = is_send ? "send" : "recv";
  ST_CHECK(check_args(comm, what, count, dt, err));
  if (peer < 0 || peer >= comm->size || peer == comm->rank)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "%s: peer %d is not another rank of a group of %d",
                        what, peer, comm->size);
  if (tag < 0) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, comm->name, "%s: negative tag %d", what, tag);
  st_comm_request *r = request_new(comm, JOB_P2P_WAIT, err);
  if (!r) return ST_ERR_OUT_OF_MEMORY;
  r->is_send = is_send;
  r->peer = peer;
  r->count = count;
  r->dt = dt;
  char msg[MSG_CAP] = "";
  size_t bytes = (size_t)count * st_dtype_size(dt);
  pthread_mutex_lock(&comm->mu);
  int rc = GS_ERROR;
  if (comm->broken) snprintf(msg, sizeof msg, "the group is broken by an earlier error: %s", comm->broken_msg);
  else if (is_send) rc = gs_send_post(comm->ctx, buf, bytes, peer, (uint32_t)tag, &r->p2p, msg, sizeof msg);
  else rc = gs_recv_post(comm->ctx, buf, bytes, peer, (uint32_t)tag, &r->p2p, msg, sizeof msg);
  pthread_mutex_unlock(&comm->mu);
  if (rc != GS_OK) {
    request_free(r);
    return st_error_set(err, ST_ERR_COMM, comm->name, "%s %s rank %d on group '%s' failed: %s", what,
                        is_send ? "to" : "from", peer, comm->name, msg);
  }
  return enqueue(comm, r, req, err);
}

static st_result gloo_send(st_comm *comm, const void *buf, int64_t count, st_dtype dt, int peer, int tag,
                           st_comm_request **req, st_error *err) {
  return p2p(comm, true, (void *)buf, count, dt, peer, tag, req, err);
}

static st_result gloo_recv(st_comm *comm, void *buf, int64_t count, st_dtype dt, int peer, int tag,
                           st_comm_request **req, st_error *err) {
  return p2p(comm, false, buf, count, dt, peer, tag, req, err);
}

static st_result gloo_wait(st_comm_request *r, st_error *err) {
  if (!r) return ST_OK;
  st_comm *c = r->comm;
  pthread_mutex_lock(&c->mu);
  while (!r->done) pthread_cond_wait(&c->done_cv, &c->mu);
  pthread_mutex_unlock(&c->mu);
  st_result res = r->result;
  if (res != ST_OK && err) *err = r->err;
  request_free(r);
  return res;
}

static st_result gloo_test(st_comm_request *r, bool *done, st_error *err) {
  if (!r) {
    *done = true;
    return ST_OK;
  }
  st_comm *c = r->comm;
  pthread_mutex_lock(&c->mu);
  *done = r->done;
  pthread_mutex_unlock(&c->mu);
  if (*done && r->result != ST_OK) {
    if (err) *err = r->err;
    return r->result;
  }
  return ST_OK;
}

static st_result gloo_set_timeout(st_comm *comm, int64_t timeout_ms, st_error *err) {
  if (!comm || timeout_ms <= 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "comm", "set_timeout: a positive timeout in ms is required");
  pthread_mutex_lock(&comm->mu);
  comm->timeout_ms = timeout_ms; /* read by the worker for the calls that follow */
  pthread_mutex_unlock(&comm->mu);
  return ST_OK;
}

ST_EXPORT const st_comm_plugin_v1 strata_comm_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("comm", "gloo", "0.1.0 (gloo " ST_GLOO_VERSION ", tcp)", st_comm_plugin_v1),
    .init = gloo_init,
    .finalize = gloo_finalize,
    .split = gloo_split,
    .group_free = gloo_group_free,
    .rank = gloo_rank,
    .size = gloo_size,
    .all_reduce = gloo_all_reduce,
    .reduce_scatter = gloo_reduce_scatter,
    .all_gather = gloo_all_gather,
    .all_gather_v = gloo_all_gather_v,
    .all_to_all_v = gloo_all_to_all_v,
    .broadcast = gloo_broadcast,
    .send = gloo_send,
    .recv = gloo_recv,
    .barrier = gloo_barrier,
    .wait = gloo_wait,
    .test = gloo_test,
    .set_timeout = gloo_set_timeout,
};
