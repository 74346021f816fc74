/* test_comm.c — a comm backend against sequential references, on N forked ranks over loopback.
 *
 *   test_comm BACKEND N [kill|timeout]
 *
 * The parent hosts the rendezvous store (as the launcher does) and forks N ranks; each loads the
 * backend the way production does (st_plugin_load("gloo"), or the built-in local backend), runs
 * every collective of comm.h for every dtype and op with uneven sizes, in place and out of place,
 * with packed and gapped displacements, async handles, send/recv, and split sub-groups, and checks
 * each result against a reference computed locally from every rank's (deterministic) input.
 *
 * Exactness: the inputs are small integers, exact in every dtype, so sums are exact in any order and
 * results must match bit for bit (AVG is the fp32/fp64 sum divided by the group size, then rounded
 * once to the dtype, which is what the reference does too). One BF16 case (256 + 1 + 1 + 1) tells
 * fp32 accumulation (259 -> 260) from bf16 accumulation (256), and a random-float F32 case allows a
 * relative 1e-6 for the reordering of a ring all-reduce.
 *
 * `kill`: the last rank SIGKILLs itself while a large all-reduce is in flight; every other rank must
 * fail with an error naming that rank within 30 s. `timeout`: the last rank skips a collective; the
 * others must time out naming it. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "local_comm.h"
#include "plugin.h"
#include "store.h"
#include "store_process.h"

#include "st_test.h"

static const char *TOKEN = "comm-test-token";
static const st_dtype ALL_DTYPES[] = {ST_F32, ST_F64, ST_BF16, ST_F16, ST_I32, ST_I64, ST_U8};
static const st_reduce_op ALL_OPS[] = {ST_REDUCE_SUM, ST_REDUCE_AVG, ST_REDUCE_MAX, ST_REDUCE_MIN};
static const char *OP_NAMES[] = {"sum", "avg", "max", "min"};

static st_error *ep(st_error *e) { return e; }

static int64_t ms_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------ values and references */

/* the input of rank r at element i for test `salt`: a small integer (non-negative for U8) */
static double input_value(int r, int64_t i, int salt, st_dtype dt) {
  int v = (int)((r * 7 + i * 3 + salt * 5) % 11);
  return dt == ST_U8 ? v : v - 5;
}

static double get_d(const void *p, st_dtype dt, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  case ST_F16: return st_f16_to_f32(((const uint16_t *)p)[i]);
  case ST_I32: return ((const int32_t *)p)[i];
  case ST_I64: return (double)((const int64_t *)p)[i];
  case ST_U8: return ((const uint8_t *)p)[i];
  default: return 0;
  }
}

static void set_d(void *p, st_dtype dt, int64_t i, double v) {
  switch (dt) {
  case ST_F32: ((float *)p)[i] = (float)v; break;
  case ST_F64: ((double *)p)[i] = v; break;
  case ST_BF16: ((uint16_t *)p)[i] = st_f32_to_bf16((float)v); break;
  case ST_F16: ((uint16_t *)p)[i] = st_f32_to_f16((float)v); break;
  case ST_I32: ((int32_t *)p)[i] = (int32_t)v; break;
  case ST_I64: ((int64_t *)p)[i] = (int64_t)v; break;
  case ST_U8: ((uint8_t *)p)[i] = (uint8_t)v; break;
  default: break;
  }
}

/* the reduction of inputs over ranks[0..n) at element i, rounded as the dtype would hold it */
static double reference(const int *ranks, int n, int64_t i, int salt, st_dtype dt, st_reduce_op op) {
  double acc = input_value(ranks[0], i, salt, dt);
  for (int k = 1; k < n; k++) {
    double v = input_value(ranks[k], i, salt, dt);
    if (op == ST_REDUCE_MAX) acc = v > acc ? v : acc;
    else if (op == ST_REDUCE_MIN) acc = v < acc ? v : acc;
    else acc += v;
  }
  if (op == ST_REDUCE_AVG) {
    if (dt == ST_F64) acc = acc / n;
    else if (st_dtype_is_float(dt)) acc = (double)((float)acc / (float)n);
    else acc = (double)((int64_t)acc / n); /* C integer division truncates toward zero */
  }
  uint8_t tmp[8];
  set_d(tmp, dt, 0, acc);
  return get_d(tmp, dt, 0);
}

static void *fill(int rank, int64_t n, int salt, st_dtype dt) {
  void *p = malloc((size_t)(n ? n : 1) * st_dtype_size(dt));
  for (int64_t i = 0; i < n; i++) set_d(p, dt, i, input_value(rank, i, salt, dt));
  return p;
}

/* ------------------------------------------------------------ per-rank suite */

typedef struct rank_ctx {
  const st_comm_plugin_v1 *be;
  st_comm *comm;
  int rank, size;
  int *members; /* world ranks of the group, by group rank */
  const char *group;
} rank_ctx;

static int mismatch_reports = 0;
#define REPORT(...)                                                                                \
  do {                                                                                             \
    if (mismatch_reports++ < 20) {                                                                 \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

static void check_all_reduce(rank_ctx *x, st_dtype dt, st_reduce_op op, int64_t count, bool in_place, int salt) {
  st_error err;
  st_error_clear(&err);
  void *send = fill(x->members[x->rank], count, salt, dt);
  void *recv = in_place ? send : malloc((size_t)(count ? count : 1) * st_dtype_size(dt));
  CHECK_OK(x->be->all_reduce(x->comm, send, recv, count, dt, op, NULL, &err), ep(&err));
  int bad = 0;
  for (int64_t i = 0; i < count; i++) {
    double want = reference(x->members, x->size, i, salt, dt, op), got = get_d(recv, dt, i);
    if (got != want && bad++ < 3)
      REPORT("group %s rank %d: all_reduce %s %s n=%lld%s [%lld] = %g, want %g", x->group, x->rank, st_dtype_name(dt),
             OP_NAMES[op], (long long)count, in_place ? " in place" : "", (long long)i, got, want);
  }
  CHECK(bad == 0);
  if (!in_place) free(recv);
  free(send);
}

static void check_reduce_scatter(rank_ctx *x, st_dtype dt, st_reduce_op op, int64_t count, int salt) {
  st_error err;
  st_error_clear(&err);
  void *send = fill(x->members[x->rank], count * x->size, salt, dt);
  void *recv = malloc((size_t)(count ? count : 1) * st_dtype_size(dt));
  CHECK_OK(x->be->reduce_scatter(x->comm, send, recv, count, dt, op, NULL, &err), ep(&err));
  int bad = 0;
  for (int64_t i = 0; i < count; i++) {
    double want = reference(x->members, x->size, x->rank * count + i, salt, dt, op), got = get_d(recv, dt, i);
    if (got != want && bad++ < 3)
      REPORT("group %s rank %d: reduce_scatter %s %s n=%lld [%lld] = %g, want %g", x->group, x->rank,
             st_dtype_name(dt), OP_NAMES[op], (long long)count, (long long)i, got, want);
  }
  CHECK(bad == 0);
  free(send);
  free(recv);
}

static void check_all_gather(rank_ctx *x, st_dtype dt, int64_t count, bool in_place, int salt) {
  st_error err;
  st_error_clear(&err);
  size_t es = st_dtype_size(dt);
  uint8_t *recv = calloc((size_t)(count * x->size + 1), es);
  void *send = fill(x->members[x->rank], count, salt, dt);
  const void *src = send;
  if (in_place) {
    memcpy(recv + (size_t)(x->rank * count) * es, send, (size_t)count * es);
    src = recv + (size_t)(x->rank * count) * es;
  }
  CHECK_OK(x->be->all_gather(x->comm, src, recv, count, dt, NULL, &err), ep(&err));
  int bad = 0;
  for (int r = 0; r < x->size; r++)
    for (int64_t i = 0; i < count; i++) {
      double want = input_value(x->members[r], i, salt, dt), got = get_d(recv + (size_t)(r * count) * es, dt, i);
      if (got != want && bad++ < 3)
        REPORT("group %s rank %d: all_gather %s n=%lld%s from %d [%lld] = %g, want %g", x->group, x->rank,
               st_dtype_name(dt), (long long)count, in_place ? " in place" : "", r, (long long)i, got, want);
    }
  CHECK(bad == 0);
  free(send);
  free(recv);
}

/* counts (r+1)*3 except rank 1 sends nothing; gapped: one empty element between blocks */
static void check_all_gather_v(rank_ctx *x, st_dtype dt, bool gapped, int salt) {
  st_error err;
  st_error_clear(&err);
  size_t es = st_dtype_size(dt);
  int n = x->size;
  int64_t *counts = malloc(sizeof(int64_t) * (size_t)n), *displs = malloc(sizeof(int64_t) * (size_t)n), total = 0;
  for (int r = 0; r < n; r++) {
    counts[r] = r == 1 ? 0 : (r + 1) * 3;
    displs[r] = total;
    total += counts[r] + (gapped ? 1 : 0);
  }
  uint8_t *recv = malloc((size_t)(total + 1) * es);
  memset(recv, 0x5a, (size_t)(total + 1) * es);
  void *send = fill(x->members[x->rank], counts[x->rank], salt, dt);
  CHECK_OK(x->be->all_gather_v(x->comm, send, counts[x->rank], recv, counts, displs, dt, NULL, &err), ep(&err));
  int bad = 0;
  for (int r = 0; r < n; r++) {
    for (int64_t i = 0; i < counts[r]; i++) {
      double want = input_value(x->members[r], i, salt, dt), got = get_d(recv + (size_t)displs[r] * es, dt, i);
      if (got != want && bad++ < 3)
        REPORT("group %s rank %d: all_gather_v %s%s from %d [%lld] = %g, want %g", x->group, x->rank,
               st_dtype_name(dt), gapped ? " gapped" : "", r, (long long)i, got, want);
    }
    if (gapped) { /* the gap stays untouched */
      const uint8_t *gap = recv + (size_t)(displs[r] + counts[r]) * es;
      for (size_t b = 0; b < es; b++) bad += gap[b] != 0x5a;
    }
  }
  CHECK(bad == 0);
  free(send);
  free(recv);
  free(counts);
  free(displs);
}

/* rank s sends (s + 2d) % 4 elements to rank d (zeros included); element values encode s, d, i */
static int64_t a2a_count(int s, int d) { return (s + 2 * d) % 4; }
static double a2a_value(int s, int d, int64_t i, st_dtype dt) { return (double)((s * 5 + d * 3 + (int)i) % 13) - (dt == ST_U8 ? 0 : 6); }

static void check_all_to_all_v(rank_ctx *x, st_dtype dt, bool gapped) {
  st_error err;
  st_error_clear(&err);
  size_t es = st_dtype_size(dt);
  int n = x->size, me = x->rank;
  int64_t sc[16] = {0}, sd[16] = {0}, rc[16] = {0}, rd[16] = {0}, st = 0, rt = 0;
  for (int r = 0; r < n; r++) {
    sc[r] = a2a_count(me, r);
    sd[r] = st;
    st += sc[r] + (gapped ? 2 : 0);
    rc[r] = a2a_count(r, me);
    rd[r] = rt;
    rt += rc[r] + (gapped ? 1 : 0);
  }
  uint8_t *send = calloc((size_t)(st + 1), es), *recv = malloc((size_t)(rt + 1) * es);
  memset(recv, 0x5a, (size_t)(rt + 1) * es);
  for (int r = 0; r < n; r++)
    for (int64_t i = 0; i < sc[r]; i++) set_d(send + (size_t)sd[r] * es, dt, i, a2a_value(me, r, i, dt));
  CHECK_OK(x->be->all_to_all_v(x->comm, send, sc, sd, recv, rc, rd, dt, NULL, &err), ep(&err));
  int bad = 0;
  for (int r = 0; r < n; r++) {
    for (int64_t i = 0; i < rc[r]; i++) {
      double want = a2a_value(r, me, i, dt), got = get_d(recv + (size_t)rd[r] * es, dt, i);
      if (got != want && bad++ < 3)
        REPORT("group %s rank %d: all_to_all_v %s%s from %d [%lld] = %g, want %g", x->group, x->rank,
               st_dtype_name(dt), gapped ? " gapped" : "", r, (long long)i, got, want);
    }
    if (gapped)
      for (size_t b = 0; b < es; b++) bad += recv[(size_t)(rd[r] + rc[r]) * es + b] != 0x5a;
  }
  CHECK(bad == 0);
  free(send);
  free(recv);
}

static void check_broadcast(rank_ctx *x, st_dtype dt, int root, int64_t count, int salt) {
  st_error err;
  st_error_clear(&err);
  void *buf = fill(x->rank == root ? x->members[root] : 1000 + x->rank, count, salt, dt);
  CHECK_OK(x->be->broadcast(x->comm, buf, count, dt, root, NULL, &err), ep(&err));
  int bad = 0;
  for (int64_t i = 0; i < count; i++) bad += get_d(buf, dt, i) != input_value(x->members[root], i, salt, dt);
  if (bad) REPORT("group %s rank %d: broadcast %s from %d: %d wrong", x->group, x->rank, st_dtype_name(dt), root, bad);
  CHECK(bad == 0);
  free(buf);
}

static void check_send_recv(rank_ctx *x) {
  if (x->size < 2) return;
  st_error err;
  st_error_clear(&err);
  int right = (x->rank + 1) % x->size, left = (x->rank + x->size - 1) % x->size;
  int64_t n = 1000 + x->rank;        /* what I send */
  int64_t m = 1000 + left;           /* what I receive */
  float *out = fill(x->members[x->rank], n, 9, ST_F32), *in = calloc((size_t)m, sizeof(float));
  st_comm_request *rs = NULL, *rr = NULL;
  CHECK_OK(x->be->send(x->comm, out, n, ST_F32, right, 7, &rs, &err), ep(&err));
  CHECK_OK(x->be->recv(x->comm, in, m, ST_F32, left, 7, &rr, &err), ep(&err));
  CHECK_OK(x->be->wait(rs, &err), ep(&err));
  CHECK_OK(x->be->wait(rr, &err), ep(&err));
  int bad = 0;
  for (int64_t i = 0; i < m; i++) bad += in[i] != (float)input_value(x->members[left], i, 9, ST_F32);
  if (bad) REPORT("group %s rank %d: recv from %d: %d wrong", x->group, x->rank, left, bad);
  CHECK(bad == 0);
  free(out);
  free(in);
}

/* several all-reduces in flight at once, polled with test, completed with wait */
static void check_async(rank_ctx *x) {
  st_error err;
  st_error_clear(&err);
  enum { K = 4 };
  int64_t count = 5000;
  float *bufs[K];
  st_comm_request *reqs[K];
  for (int k = 0; k < K; k++) {
    bufs[k] = fill(x->members[x->rank], count, 20 + k, ST_F32);
    CHECK_OK(x->be->all_reduce(x->comm, bufs[k], bufs[k], count, ST_F32, ST_REDUCE_SUM, &reqs[k], &err), ep(&err));
  }
  bool done = false;
  for (int spins = 0; spins < 20000 && !done; spins++) {
    CHECK_OK(x->be->test(reqs[K - 1], &done, &err), ep(&err));
    if (!done) usleep(1000);
  }
  CHECK(done);
  for (int k = 0; k < K; k++) {
    CHECK_OK(x->be->wait(reqs[k], &err), ep(&err));
    int bad = 0;
    for (int64_t i = 0; i < count; i++)
      bad += bufs[k][i] != (float)reference(x->members, x->size, i, 20 + k, ST_F32, ST_REDUCE_SUM);
    CHECK_MSG(bad == 0, "async all_reduce %d: %d wrong", k, bad);
    free(bufs[k]);
  }
}

/* fp32 accumulation for BF16: 256 + 1 + 1 + 1 is 259 in fp32 -> 260 in bf16; bf16 steps give 256 */
static void check_half_accumulation(rank_ctx *x) {
  if (x->size < 3) return;
  st_error err;
  st_error_clear(&err);
  for (int k = 0; k < 2; k++) {
    st_dtype dt = k ? ST_F16 : ST_BF16;
    /* f16: 2048 + 1 + 1 (+1) in fp32 then rounded; in f16 steps 2048 + 1 stays 2048 */
    float big = dt == ST_BF16 ? 256.0f : 2048.0f;
    uint16_t v[2], want[2];
    float sum0 = big + (float)(x->size - 1), sum1 = (float)x->size * 0.5f;
    float mine0 = x->rank == 0 ? big : 1.0f;
    v[0] = dt == ST_BF16 ? st_f32_to_bf16(mine0) : st_f32_to_f16(mine0);
    v[1] = dt == ST_BF16 ? st_f32_to_bf16(0.5f) : st_f32_to_f16(0.5f);
    want[0] = dt == ST_BF16 ? st_f32_to_bf16(sum0) : st_f32_to_f16(sum0);
    want[1] = dt == ST_BF16 ? st_f32_to_bf16(sum1) : st_f32_to_f16(sum1);
    CHECK_OK(x->be->all_reduce(x->comm, v, v, 2, dt, ST_REDUCE_SUM, NULL, &err), ep(&err));
    CHECK_MSG(v[0] == want[0] && v[1] == want[1], "%s all_reduce accumulation: got %g, %g want %g, %g",
              st_dtype_name(dt), get_d(v, dt, 0), get_d(v, dt, 1), get_d(want, dt, 0), get_d(want, dt, 1));
    /* and reduce_scatter */
    uint16_t *blocks = malloc(sizeof(uint16_t) * (size_t)x->size), out = 0;
    for (int r = 0; r < x->size; r++) blocks[r] = dt == ST_BF16 ? st_f32_to_bf16(mine0) : st_f32_to_f16(mine0);
    CHECK_OK(x->be->reduce_scatter(x->comm, blocks, &out, 1, dt, ST_REDUCE_SUM, NULL, &err), ep(&err));
    CHECK_MSG(out == want[0], "%s reduce_scatter accumulation: got %g want %g", st_dtype_name(dt), get_d(&out, dt, 0),
              get_d(want, dt, 0));
    free(blocks);
  }
}

/* random floats: a ring all-reduce reorders the sum; allow 1e-6 relative to the sum of |x| */
static void check_random_f32(rank_ctx *x) {
  st_error err;
  st_error_clear(&err);
  int64_t count = 300007; /* uneven and above Gloo's segment size */
  float *buf = malloc(sizeof(float) * (size_t)count);
  uint32_t seed = 12345u + (uint32_t)x->members[x->rank] * 7919u;
  for (int64_t i = 0; i < count; i++) {
    seed = seed * 1664525u + 1013904223u;
    buf[i] = (float)((seed >> 8) / (double)(1u << 24) * 2.0 - 1.0);
  }
  CHECK_OK(x->be->all_reduce(x->comm, buf, buf, count, ST_F32, ST_REDUCE_SUM, NULL, &err), ep(&err));
  double *want = calloc((size_t)count, sizeof(double)), *mag = calloc((size_t)count, sizeof(double));
  for (int k = 0; k < x->size; k++) {
    uint32_t s = 12345u + (uint32_t)x->members[k] * 7919u;
    for (int64_t i = 0; i < count; i++) {
      s = s * 1664525u + 1013904223u;
      float v = (float)((s >> 8) / (double)(1u << 24) * 2.0 - 1.0);
      want[i] += v;
      mag[i] += fabs(v);
    }
  }
  int bad = 0;
  for (int64_t i = 0; i < count; i++)
    if (fabs(buf[i] - want[i]) > 1e-6 * mag[i] + 1e-7 && bad++ < 3)
      REPORT("rank %d: random all_reduce [%lld] = %.9g want %.9g", x->rank, (long long)i, buf[i], want[i]);
  CHECK(bad == 0);
  free(buf);
  free(want);
  free(mag);
}

/* documented preconditions are refused with messages, and the group stays usable */
static void check_bad_args(rank_ctx *x) {
  st_error err;
  st_error_clear(&err);
  const st_comm_plugin_v1 *be = x->be;
  float v[4] = {0};
  CHECK_RESULT(be->broadcast(x->comm, v, 4, ST_F32, x->size, NULL, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  CHECK_CONTAINS(err.message, "root");
  CHECK_RESULT(be->all_reduce(x->comm, v, v, -1, ST_F32, ST_REDUCE_SUM, NULL, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  CHECK_RESULT(be->all_reduce(x->comm, v, v, 4, ST_F32, (st_reduce_op)9, NULL, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  CHECK_RESULT(be->send(x->comm, v, 4, ST_F32, x->rank, 0, NULL, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  int64_t counts[16], displs[16];
  for (int r = 0; r < x->size; r++) counts[r] = 1, displs[r] = r;
  counts[x->rank] = 2; /* but this rank sends 1 */
  CHECK_RESULT(be->all_gather_v(x->comm, v, 1, v, counts, displs, ST_F32, NULL, &err), ST_ERR_INVALID_ARGUMENT, ep(&err));
  CHECK_CONTAINS(err.message, "recv_counts");
  CHECK_OK(be->barrier(x->comm, &err), ep(&err));
}

static void run_suite(rank_ctx *x) {
  st_error err;
  st_error_clear(&err);
  CHECK(x->be->rank(x->comm) == x->rank);
  CHECK(x->be->size(x->comm) == x->size);
  int salt = 0;
  for (size_t d = 0; d < sizeof ALL_DTYPES / sizeof ALL_DTYPES[0]; d++) {
    st_dtype dt = ALL_DTYPES[d];
    for (size_t o = 0; o < sizeof ALL_OPS / sizeof ALL_OPS[0]; o++) {
      check_all_reduce(x, dt, ALL_OPS[o], 1037, false, salt++);
      check_all_reduce(x, dt, ALL_OPS[o], 3, true, salt++);
      check_reduce_scatter(x, dt, ALL_OPS[o], 13, salt++);
    }
    check_all_reduce(x, dt, ST_REDUCE_SUM, 0, false, salt++);
    check_all_gather(x, dt, 7, false, salt++);
    check_all_gather(x, dt, 5, true, salt++);
    check_all_gather_v(x, dt, false, salt++);
    check_all_gather_v(x, dt, true, salt++);
    check_all_to_all_v(x, dt, false);
    check_all_to_all_v(x, dt, true);
    for (int root = 0; root < x->size; root++) check_broadcast(x, dt, root, 101 + root, salt++);
  }
  check_half_accumulation(x);
  check_bad_args(x);
  check_send_recv(x);
  check_async(x);
  CHECK_OK(x->be->barrier(x->comm, &err), ep(&err));
}

/* sub-groups: parity groups keyed in reverse order, a group without rank 0, nested splits */
static void run_split_suite(rank_ctx *world) {
  st_error err;
  st_error_clear(&err);
  const st_comm_plugin_v1 *be = world->be;
  int n = world->size, me = world->rank;
  st_comm *parity = NULL;
  CHECK_OK(be->split(world->comm, me % 2, -me, &parity, &err), ep(&err));
  if (!parity) return;
  /* members of my parity, ordered by key = -rank: highest world rank first */
  int members[16], m = 0;
  for (int r = n - 1; r >= 0; r--)
    if (r % 2 == me % 2) members[m++] = r;
  int my_index = 0;
  while (members[my_index] != me) my_index++;
  CHECK(be->size(parity) == m);
  CHECK(be->rank(parity) == my_index);
  char name[32];
  snprintf(name, sizeof name, "parity%d", me % 2);
  rank_ctx sub = {.be = be, .comm = parity, .rank = my_index, .size = m, .members = members, .group = name};
  for (size_t d = 0; d < sizeof ALL_DTYPES / sizeof ALL_DTYPES[0]; d++) {
    check_all_reduce(&sub, ALL_DTYPES[d], ST_REDUCE_SUM, 77, false, 100 + (int)d);
    check_reduce_scatter(&sub, ALL_DTYPES[d], ST_REDUCE_AVG, 5, 200 + (int)d);
    check_all_to_all_v(&sub, ALL_DTYPES[d], true);
  }
  check_all_gather_v(&sub, ST_F32, true, 300);
  check_broadcast(&sub, ST_I64, m - 1, 33, 301);
  check_send_recv(&sub);

  /* the world still works while a sub-group exists (separate connections and tags) */
  check_all_reduce(world, ST_F32, ST_REDUCE_SUM, 99, false, 400);

  /* rank 0 opts out (color -1) */
  st_comm *no_zero = NULL;
  CHECK_OK(be->split(world->comm, me == 0 ? -1 : 3, me, &no_zero, &err), ep(&err));
  CHECK((me == 0) == (no_zero == NULL));
  if (no_zero) {
    int nz[16];
    for (int r = 1; r < n; r++) nz[r - 1] = r;
    rank_ctx z = {.be = be, .comm = no_zero, .rank = me - 1, .size = n - 1, .members = nz, .group = "no-zero"};
    CHECK(be->size(no_zero) == n - 1);
    check_all_reduce(&z, ST_BF16, ST_REDUCE_MAX, 50, false, 500);
    check_all_gather(&z, ST_I32, 4, false, 501);
  }
  /* a split of a split: everyone in one group, same order */
  st_comm *nested = NULL;
  CHECK_OK(be->split(parity, 0, 0, &nested, &err), ep(&err));
  if (nested) {
    CHECK(be->size(nested) == m && be->rank(nested) == my_index);
    rank_ctx nn = sub;
    nn.comm = nested;
    nn.group = "nested";
    check_all_reduce(&nn, ST_F16, ST_REDUCE_AVG, 21, true, 600);
    be->group_free(nested);
  }
  if (no_zero) be->group_free(no_zero);
  be->group_free(parity);
}

/* the last rank never calls the all_reduce: the others time out naming it */
static void run_timeout_case(rank_ctx *x) {
  st_error err;
  st_error_clear(&err);
  const st_comm_plugin_v1 *be = x->be;
  st_comm *g = NULL;
  CHECK_OK(be->split(x->comm, 0, x->rank, &g, &err), ep(&err));
  if (!g) return;
  CHECK_OK(be->set_timeout(g, 1500, &err), ep(&err));
  float v[64] = {0};
  int last = x->size - 1;
  if (x->rank != last) {
    int64_t t0 = ms_now();
    CHECK_RESULT(be->all_reduce(g, v, v, 64, ST_F32, ST_REDUCE_SUM, NULL, &err), ST_ERR_TIMEOUT, ep(&err));
    int64_t took = ms_now() - t0;
    CHECK_MSG(took >= 1400 && took < 15000, "timeout of 1500 ms took %lld ms", (long long)took);
    char want[64];
    snprintf(want, sizeof want, "group rank %d (world rank %d) did not arrive", last, last);
    CHECK_CONTAINS(err.message, want);
    CHECK_CONTAINS(err.message, "all_reduce #0");
    CHECK_CONTAINS(err.message, "world.split");
    if (x->rank == 0) fprintf(stderr, "timeout message: %s\n", err.message);
    /* the group is broken now: the next call says so at once */
    CHECK_RESULT(be->all_reduce(g, v, v, 64, ST_F32, ST_REDUCE_SUM, NULL, &err), ST_ERR_TIMEOUT, ep(&err));
    CHECK_CONTAINS(err.message, "broken by an earlier error");
  } else {
    /* alive but absent: keep the connections open until the others have timed out and diagnosed */
    usleep(4500 * 1000);
  }
  be->group_free(g);
  /* the world group is untouched */
  CHECK_OK(be->barrier(x->comm, &err), ep(&err));
}

/* the last rank dies mid-collective; the others must name it within 30 s */
static int run_kill_case(rank_ctx *x, int victim) {
  st_error err;
  st_error_clear(&err);
  const st_comm_plugin_v1 *be = x->be;
  CHECK_OK(be->set_timeout(x->comm, 20000, &err), ep(&err));
  int64_t count = 4 << 20; /* 16 MiB of fp32: long enough to be mid-flight */
  float *buf = calloc((size_t)count, sizeof(float));
  st_result r = ST_OK;
  int64_t t0 = ms_now();
  for (int it = 0; it < 50 && r == ST_OK; it++) {
    st_comm_request *req = NULL;
    r = be->all_reduce(x->comm, buf, buf, count, ST_F32, ST_REDUCE_SUM, &req, &err);
    if (r == ST_OK && x->rank == victim && it == 2) {
      usleep(2000); /* the collective is in flight */
      raise(SIGKILL);
    }
    if (r == ST_OK) r = be->wait(req, &err);
  }
  int64_t took = ms_now() - t0;
  free(buf);
  CHECK_MSG(r != ST_OK, "rank %d: 50 all_reduces succeeded although rank %d died", x->rank, victim);
  char want[32];
  snprintf(want, sizeof want, "rank %d died", victim);
  CHECK_CONTAINS(err.message, want);
  CHECK_CONTAINS(err.message, "all_reduce #");
  CHECK_MSG(took < 30000, "rank %d noticed the death after %lld ms", x->rank, (long long)took);
  fprintf(stderr, "rank %d: error after %lld ms: %s\n", x->rank, (long long)took, err.message);
  return 0;
}

/* the last rank calls all_gather where the others call all_reduce: everyone learns the schedules differ */
static void run_mismatch_case(rank_ctx *x) {
  st_error err;
  st_error_clear(&err);
  const st_comm_plugin_v1 *be = x->be;
  CHECK_OK(be->set_timeout(x->comm, 1500, &err), ep(&err));
  int last = x->size - 1;
  float v[64] = {0}, *g = calloc((size_t)64 * (size_t)x->size, sizeof(float));
  st_result r = x->rank == last ? be->all_gather(x->comm, v, g, 64, ST_F32, NULL, &err)
                                : be->all_reduce(x->comm, v, v, 64, ST_F32, ST_REDUCE_SUM, NULL, &err);
  CHECK_RESULT(r, ST_ERR_COMM, ep(&err));
  CHECK_CONTAINS(err.message, "collective schedules differ");
  if (x->rank == last) {
    CHECK_CONTAINS(err.message, "this rank called all_gather of 64 x F32");
    CHECK_CONTAINS(err.message, "group rank 0 called all_reduce of 64 x F32 sum");
  } else {
    char want[96];
    snprintf(want, sizeof want, "group rank %d called all_gather of 64 x F32", last);
    CHECK_CONTAINS(err.message, want);
  }
  if (x->rank == 0) fprintf(stderr, "mismatch message: %s\n", err.message);
  free(g);
}

/* "kill": the last rank dies; "kill0": rank 0 (the first rank, often the store's host elsewhere) */
static int kill_victim(const char *mode, int world) { return !strcmp(mode, "kill0") ? 0 : world - 1; }

static int rank_main(const char *backend, int rank, int world, int port, const char *mode) {
  st_error err;
  st_error_clear(&err);
  alarm(150);
  st_store *store = NULL;
  if (st_store_connect("127.0.0.1", port, TOKEN, rank, 10000, &store, &err) != ST_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, err.message);
    return 2;
  }
  st_plugin plugin;
  memset(&plugin, 0, sizeof plugin);
  const st_comm_plugin_v1 *be = NULL;
  if (!strcmp(backend, "local")) {
    be = st_local_comm();
  } else if (st_plugin_load(ST_PLUGIN_COMM, backend, NULL, 0, &plugin, &err) == ST_OK) {
    be = plugin.v.comm;
  } else {
    fprintf(stderr, "rank %d: %s\n", rank, err.message);
    return 3;
  }
  st_comm_init_args args = {.struct_size = sizeof args, .rank = rank, .world_size = world, .local_rank = rank,
                            .local_world_size = world, .device = {ST_DEVICE_CPU, 0}, .store = store,
                            .timeout_ms = 30000};
  st_comm *comm = NULL;
  CHECK_OK(be->init(NULL, &args, &comm, &err), ep(&err));
  if (comm) {
    int *members = malloc(sizeof(int) * (size_t)world);
    for (int r = 0; r < world; r++) members[r] = r;
    rank_ctx x = {.be = be, .comm = comm, .rank = rank, .size = world, .members = members, .group = "world"};
    if (!strncmp(mode, "kill", 4)) {
      run_kill_case(&x, kill_victim(mode, world));
    } else if (!strcmp(mode, "timeout")) {
      run_timeout_case(&x);
    } else if (!strcmp(mode, "mismatch")) {
      run_mismatch_case(&x);
    } else {
      run_suite(&x);
      check_random_f32(&x);
      run_split_suite(&x);
    }
    be->finalize(comm);
    free(members);
  }
  if (plugin.handle) st_plugin_unload(&plugin);
  st_store_close(store);
  char name[64];
  snprintf(name, sizeof name, "test_comm rank %d", rank);
  return st_test_finish(name);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s BACKEND N [kill|kill0|timeout|mismatch]\n", argv[0]);
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  const char *backend = argv[1], *mode = argc > 3 ? argv[3] : "suite";
  int world = atoi(argv[2]);
  if (world < 1 || world > 16) return 1;
  int port = 0;
  pid_t store_pid = store_process_start(TOKEN, &port); /* the launcher's role */
  if (store_pid < 0) {
    fprintf(stderr, "cannot start the store process\n");
    return 1;
  }
  pid_t pids[16];
  int64_t t0 = ms_now();
  for (int r = 0; r < world; r++) {
    pids[r] = fork();
    if (pids[r] == 0) _exit(rank_main(backend, r, world, port, mode));
  }
  int failures = 0;
  for (int r = 0; r < world; r++) {
    int status = 0;
    waitpid(pids[r], &status, 0);
    bool killed_victim = !strncmp(mode, "kill", 4) && r == kill_victim(mode, world);
    if (killed_victim) {
      CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "the victim rank %d did not die by SIGKILL", r);
    } else {
      CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rank %d exited with status 0x%x", r, status);
      failures += !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
  }
  if (!strncmp(mode, "kill", 4)) CHECK_MSG(ms_now() - t0 < 40000, "the kill test took %lld ms", (long long)(ms_now() - t0));
  store_process_stop(store_pid);
  char name[96];
  snprintf(name, sizeof name, "test_comm %s %d %s", backend, world, mode);
  return st_test_finish(name);
}
