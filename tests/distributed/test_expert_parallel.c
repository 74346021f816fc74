/* test_expert_parallel.c — the expert_parallel strategy plugin on N forked ranks over Gloo.
 *
 *   test_expert_parallel N P      (N ranks, expert_parallel_size P)
 *
 * Each rank loads the plugin by name (as the trainer does), with a small synthetic parameter set:
 * unit 0 {dense.w [3], experts.w [4, 2, 3] (expert, trainable)}, unit 1 {experts.frozen [4, 2]
 * (expert, frozen), dense.b [2]}. Checked against references computed here from every rank's
 * deterministic inputs:
 *   - host->moe is the strategy's after init: 4/P local experts from (rank % P) * 4/P;
 *   - state_load asks for each expert tensor's slice at its GLOBAL offset and the windows hold it;
 *   - dispatch/combine: rows land on the rank owning their expert, ordered [source rank][expert],
 *     with their expert ids; combine brings f(row) back to the source row. Rounds with uneven
 *     counts, a rank with no rows, ranks routing only to their own experts, and nothing at all;
 *   - the pipelined form (dispatch_start, wait_block / return_block per block, combine) gives the
 *     blocking form's recv, recv_expert and out exactly, blocks returned in order, scrambled, or left
 *     to combine, with a per-block expert transform; blocks are the own one first, then rank+1, ...;
 *     misuse (out-of-range block, combine before every wait, a second dispatch_start, dispatch or
 *     recv_capacity in flight) fails cleanly and the exchange still completes; the same on the
 *     core's local exchange (one block); `N P kill`: a rank SIGKILLed mid-exchange makes the others
 *     fail with the comm's error naming it, fast;
 *   - recv_capacity: the EP group's sum; strategy.recv_capacity_factor 1.5 caps it at ceil(1.5 x max),
 *     an overflow under it fails every rank naming the key, and a factor < 1 is a config error;
 *   - a receive buffer too small on one rank fails EVERY rank of the group with the numbers
 *     (nobody is left waiting in a collective); unsorted rows fail before any collective;
 *   - gradients: dense ones averaged by the inner ddp; expert ones summed over the expert-data-
 *     parallel group (ranks with the same rank % P) and divided by N; grad_norm_sq counts every
 *     expert once; an SGD step (lr 1) moves each owned expert by exactly that gradient;
 *   - state_save: expert slices under global names at global offsets, written once (EDP rank 0);
 *   - config errors: a P that does not divide the world, experts not divisible by P.
 * Values are small integers or exact binary fractions: results are compared exactly (1e-6 on the
 * norm, which sums in double). */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "cpu_ops.h"
#include "host_impl.h"
#include "plugin.h"
#include "st_test.h"
#include "store.h"
#include "store_process.h"

static const char *TOKEN = "ep-test-token";
#define E 4
#define H 3

static int N, P, RANK;
static bool KILL; /* `N P kill`: the last rank dies in the middle of a pipelined exchange */

/* ---- the parameter set -------------------------------------------------------------------- */

static st_param_desc u0[] = {{"dense.w", 1, {3}, ST_PARAM_TRAINABLE},
                             {"experts.w", 3, {E, 2, 3}, ST_PARAM_TRAINABLE | ST_PARAM_EXPERT}};
static st_param_desc u1[] = {{"experts.frozen", 2, {E, 2}, ST_PARAM_EXPERT}, {"dense.b", 1, {2}, ST_PARAM_TRAINABLE}};
static st_unit_desc units[] = {{"u0", 2, u0}, {"u1", 2, u1}};
static const st_model_desc model = {.n_units = 2, .units = units, .compute_dtype = ST_F32, .hidden_size = 3,
                                    .n_params_total = 3 + 24 + 8 + 2};

static double base_of(const char *name) { return 1000.0 * (double)(strlen(name) % 7 + 1); }

/* ---- a reader serving value(name, i) = base + i, and recording what was asked ------------- */

typedef struct rec {
  char name[32];
  st_state_kind kind;
  int64_t offset, count;
  float first;
} rec;

typedef struct io_log {
  st_state_reader r;
  st_state_writer w;
  rec recs[64];
  int n;
} io_log;

static st_result rd(st_state_reader *r, const st_param_desc *p, st_state_kind kind, int64_t offset, int64_t count,
                    st_dtype dt, void *dst, st_error *err) {
  io_log *l = r->self;
  if (l->n < 64) {
    rec *x = &l->recs[l->n++];
    snprintf(x->name, sizeof x->name, "%s", p->name);
    x->kind = kind, x->offset = offset, x->count = count;
  }
  if (kind != ST_STATE_PARAM) return ST_ERR_NOT_FOUND;
  if (dt != ST_F32) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "test", "expected f32");
  for (int64_t i = 0; i < count; i++) ((float *)dst)[i] = (float)(base_of(p->name) + (double)(offset + i));
  return ST_OK;
}

static st_result wr(st_state_writer *w, const st_param_desc *p, st_state_kind kind, int64_t offset, int64_t count,
                    st_dtype dt, const void *data, st_error *err) {
  (void)err;
  io_log *l = w->self;
  if (l->n < 64) {
    rec *x = &l->recs[l->n++];
    snprintf(x->name, sizeof x->name, "%s", p->name);
    x->kind = kind, x->offset = offset, x->count = count;
    x->first = dt == ST_F32 && count ? ((const float *)data)[0] : 0.0f;
  }
  return ST_OK;
}

/* ---- plugin loading through the host, as the trainer does --------------------------------- */

static st_result load_cb(void *user, const char *name, const st_strategy_plugin_v1 **out, st_error *err) {
  (void)user;
  st_plugin p;
  ST_CHECK(st_plugin_load(ST_PLUGIN_STRATEGY, name, NULL, 0, &p, err));
  *out = p.v.strategy; /* kept open for the process, like the trainer */
  return ST_OK;
}

typedef struct rank_env {
  const st_ops *ops;
  st_host *host;
  const st_comm_plugin_v1 *comm;
  st_comm *world;
  const st_strategy_plugin_v1 *sp;
  st_config *cfg;
} rank_env;

static st_result init_strategy_extra(rank_env *x, int p, const st_model_desc *m, const char *extra, void **ctx,
                                     st_error *err) {
  char json[384];
  snprintf(json, sizeof json,
           "{\"strategy\": {\"name\": \"expert_parallel\", \"expert_parallel_size\": %d, \"dense\": {\"name\": "
           "\"ddp\"}%s}}", p, extra);
  st_config_free(x->cfg);
  x->cfg = NULL;
  ST_CHECK(st_config_load_string(json, "test", &x->cfg, err));
  st_cfg *scfg;
  ST_CHECK(st_config_api()->get_object(st_config_root(x->cfg), "strategy", true, &scfg, err));
  ST_CHECK(x->sp->validate(scfg, st_config_api(), err));
  int order[2] = {0, 1};
  st_strategy_setup setup = {.struct_size = sizeof setup, .model = m, .unit_order = order, .param_dtype = ST_F32,
                             .master_dtype = ST_F32, .grad_dtype = ST_F32, .reduce_dtype = ST_F32,
                             .grad_accum_steps = 1, .group = NULL};
  return x->sp->init(x->host, scfg, &setup, ctx, err);
}

static st_result init_strategy(rank_env *x, int p, const st_model_desc *m, void **ctx, st_error *err) {
  return init_strategy_extra(x, p, m, "", ctx, err);
}

/* ---- the token exchange ------------------------------------------------------------------- */

/* rows rank r sends to expert e in round `round` */
static int64_t cnt(int r, int e, int round) {
  switch (round) {
  case 0: return (r + 2 * e + r * e) % 4;    /* uneven, some zero, not symmetric between ranks */
  case 1: return r == 0 ? 0 : (e / (E / P) == r % P ? 2 : 0); /* rank 0 nothing, the others only their own experts */
  case 2: return 0;                          /* nobody sends anything */
  default: return 1;
  }
}

static int64_t rows_of(int r, int round, int32_t *ids, float *tok) {
  int64_t n = 0;
  for (int e = 0; e < E; e++)
    for (int64_t j = 0; j < cnt(r, e, round); j++, n++) {
      if (ids) ids[n] = e;
      for (int c = 0; c < H && tok; c++) tok[n * H + c] = (float)(100 * r + 10 * n + c + round);
    }
  return n;
}

static void exchange_round(rank_env *x, int round) {
  st_error err;
  st_error_clear(&err);
  const st_moe_api *moe = x->host->moe(x->host);
  int32_t ids[64], rids[256];
  float tok[64 * H], recv[256 * H], out[64 * H];
  int64_t n = rows_of(RANK, round, ids, tok), nr = -1;
  CHECK_OK(moe->dispatch(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, &nr, &err), &err);
  /* reference: sources of my EP group in rank order, each one's rows for my experts in order */
  int nl = E / P, first = (RANK % P) * nl, g0 = RANK / P * P;
  int64_t k = 0;
  bool ok = true;
  for (int s = g0; s < g0 + P; s++) {
    int32_t sid[64];
    float stok[64 * H];
    int64_t sn = rows_of(s, round, sid, stok);
    for (int64_t j = 0; j < sn; j++) {
      if (sid[j] < first || sid[j] >= first + nl) continue;
      ok &= k < nr && rids[k] == sid[j];
      for (int c = 0; c < H && k < nr; c++) ok &= recv[k * H + c] == stok[j * H + c];
      k++;
    }
  }
  CHECK_MSG(ok && k == nr, "rank %d round %d: received %lld rows, expected %lld, or wrong rows/ids", RANK, round,
            (long long)nr, (long long)k);
  for (int64_t i = 0; i < nr && i < 256; i++)
    for (int c = 0; c < H; c++) recv[i * H + c] = 2 * recv[i * H + c] + (float)rids[i];
  for (int64_t i = 0; i < n * H; i++) out[i] = -1;
  CHECK_OK(moe->combine(moe->self, ST_F32, recv, H, out, &err), &err);
  ok = true;
  for (int64_t i = 0; i < n; i++)
    for (int c = 0; c < H; c++) ok &= out[i * H + c] == 2 * tok[i * H + c] + (float)ids[i];
  CHECK_MSG(ok, "rank %d round %d: combine did not return f(row) to its source", RANK, round);
}

static void exchange_failures(rank_env *x) {
  st_error err;
  st_error_clear(&err);
  const st_moe_api *moe = x->host->moe(x->host);
  int32_t ids[64], rids[256];
  float tok[64 * H], recv[256 * H];
  int64_t n = rows_of(RANK, 3, ids, tok), nr = -1; /* one row per expert from every rank */
  /* the last EP rank of each group has room for nothing: every rank of the group fails */
  int64_t cap = RANK % P == P - 1 ? 0 : 256;
  st_result r = moe->dispatch(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, cap, &nr, &err);
  CHECK_MSG(r == ST_ERR_INVALID_ARGUMENT, "rank %d: an overflow on EP rank %d returned %d", RANK, P - 1, (int)r);
  char want[96];
  snprintf(want, sizeof want, "expert-parallel rank %d would receive %d rows but its buffer holds 0", P - 1, P * (E / P));
  CHECK_CONTAINS(err.message, want);
  /* rows not sorted by destination: refused on every rank before any collective */
  if (P > 1) {
    st_error_clear(&err);
    int32_t bad[2] = {E - 1, 0};
    r = moe->dispatch(moe->self, ST_F32, tok, bad, 2, H, E, recv, rids, 256, &nr, &err);
    CHECK(r == ST_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err.message, "sorted by expert");
  }
}

/* ---- the pipelined exchange: dispatch_start / wait_block / return_block / combine ------------ */

/* the "expert computation" of a block: depends on the row's expert id */
static void expert_f(float *recv, const int32_t *rids, int64_t first, int64_t rows) {
  for (int64_t i = first; i < first + rows; i++)
    for (int c = 0; c < H; c++) recv[i * H + c] = recv[i * H + c] * (float)(rids[i] + 2) - (float)(3 * rids[i]);
}

/* order: 0 = return each block right after computing it; 1 = compute every block, return them in a
 * scrambled order; 2 = scrambled, and the last one left for combine to return */
static void exchange_round_pipelined(rank_env *x, const st_moe_api *moe, const st_moe_ext *ext, int round, int order, bool local) {
  (void)x;
  st_error err;
  st_error_clear(&err);
  int p = local ? 1 : P;
  int32_t ids[64], rids[256], rids2[256];
  float tok[64 * H], keep[64 * H], recv[256 * H], recv2[256 * H], out[64 * H], out2[64 * H];
  int64_t n = rows_of(RANK, round, ids, tok), nr = -1, nr2 = -2;
  memcpy(keep, tok, sizeof tok);
  /* the blocking form is the reference */
  CHECK_OK(moe->dispatch(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, &nr, &err), &err);
  expert_f(recv, rids, 0, nr);
  for (int64_t i = 0; i < n * H; i++) out[i] = -7;
  CHECK_OK(moe->combine(moe->self, ST_F32, recv, H, out, &err), &err);
  /* the pipelined form */
  for (int64_t i = 0; i < 256 * H; i++) recv2[i] = -5;
  for (int64_t i = 0; i < n * H; i++) out2[i] = -9;
  int nb = -1;
  CHECK_OK(ext->dispatch_start(moe->self, ST_F32, tok, ids, n, H, E, recv2, rids2, 256, out2, &nr2, &nb, &err), &err);
  CHECK_MSG(nr2 == nr && nb == p, "rank %d round %d: dispatch_start gave %lld rows in %d blocks, want %lld in %d", RANK,
            round, (long long)nr2, nb, (long long)nr, p);
  bool ids_ok = nr2 == nr;
  for (int64_t i = 0; i < nr && ids_ok; i++) ids_ok = rids2[i] == rids[i];
  CHECK_MSG(ids_ok, "rank %d round %d: recv_expert differs from the blocking dispatch's", RANK, round);
  if (nb != p || nr2 != nr) return;
  /* where each source's rows lie in recv: in source-rank order */
  int64_t off[8] = {0}, len[8] = {0};
  int g0 = local ? RANK : RANK / P * P, nl = E / p, first = local ? 0 : (RANK % P) * nl;
  for (int s = 0; s < p; s++) {
    int32_t sid[64];
    int64_t sn = local ? n : rows_of(g0 + s, round, sid, NULL);
    if (local) memcpy(sid, ids, sizeof sid);
    for (int64_t j = 0; j < sn; j++) len[s] += sid[j] >= first && sid[j] < first + nl;
    if (s + 1 < p) off[s + 1] = off[s] + len[s];
  }
  int me = local ? 0 : RANK % P, perm[8];
  for (int i = 0; i < nb; i++) perm[i] = order == 0 ? i : (nb - 1 - i + (order == 2 ? 1 : 0)) % nb; /* scrambled */
  bool cover_ok = true;
  for (int i = 0; i < nb; i++) {
    int64_t f = -1, r = -1;
    CHECK_OK(ext->wait_block(moe->self, i, &f, &r, &err), &err);
    int s = (me + i) % nb;
    cover_ok &= f == off[s] && r == len[s];
    bool rows_ok = f >= 0 && r >= 0 && f + r <= nr;
    for (int64_t k = f; k < f + r && rows_ok && cover_ok; k++)
      for (int c = 0; c < H; c++) rows_ok &= recv2[k * H + c] * (float)(rids[k] + 2) - (float)(3 * rids[k]) == recv[k * H + c];
    CHECK_MSG(rows_ok, "rank %d round %d: block %d's rows differ from the blocking dispatch's", RANK, round, i);
    if (!rows_ok || !cover_ok) break;
    expert_f(recv2, rids2, f, r);
    if (order == 0) CHECK_OK(ext->return_block(moe->self, i, recv2, &err), &err);
  }
  CHECK_MSG(cover_ok, "rank %d round %d: blocks are not this rank's own first, then rank+1, ... (source-rank layout)",
            RANK, round);
  if (order > 0)
    for (int i = 0; i < nb - (order == 2 ? 1 : 0); i++) CHECK_OK(ext->return_block(moe->self, perm[i], recv2, &err), &err);
  CHECK_OK(moe->combine(moe->self, ST_F32, recv2, H, out2, &err), &err);
  bool ok = true;
  for (int64_t i = 0; i < n * H; i++) ok &= out2[i] == out[i];
  for (int64_t i = 0; i < n; i++)
    for (int c = 0; c < H; c++) ok &= out[i * H + c] == keep[i * H + c] * (float)(ids[i] + 2) - (float)(3 * ids[i]);
  CHECK_MSG(ok, "rank %d round %d order %d%s: pipelined combine differs from the blocking one", RANK, round, order,
            local ? " (local exchange)" : "");
}

/* misuse fails with a clear error and leaves the exchange usable; every rank makes the same calls */
static void pipelined_misuse(rank_env *x, const st_moe_api *moe, const st_moe_ext *ext, bool local) {
  (void)x;
  st_error err;
  st_error_clear(&err);
  int p = local ? 1 : P;
  int32_t ids[64], rids[256];
  float tok[64 * H], recv[256 * H], out[64 * H], keep[64 * H];
  int64_t n = rows_of(RANK, 0, ids, tok), nr = -1, f, r;
  memcpy(keep, tok, sizeof tok);
  int nb = 0;
  CHECK(ext->wait_block(moe->self, 0, &f, &r, &err) == ST_ERR_INVALID_ARGUMENT); /* nothing in flight */
  CHECK_CONTAINS(err.message, "without a dispatch_start");
  st_error_clear(&err);
  CHECK_OK(ext->dispatch_start(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, out, &nr, &nb, &err), &err);
  CHECK(ext->wait_block(moe->self, p, &f, &r, &err) == ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.message, "out of range");
  st_error_clear(&err);
  CHECK(ext->wait_block(moe->self, -1, &f, &r, &err) == ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.message, "out of range");
  st_error_clear(&err);
  int nb2 = 0;
  int64_t nr2 = 0;
  CHECK(ext->dispatch_start(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, out, &nr2, &nb2, &err) ==
        ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.message, "call combine first");
  st_error_clear(&err);
  CHECK(moe->dispatch(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, &nr2, &err) == ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.message, "still in flight");
  st_error_clear(&err);
  CHECK(ext->return_block(moe->self, 0, recv, &err) == ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.message, "before wait_block");
  st_error_clear(&err);
  CHECK(moe->combine(moe->self, ST_F32, recv, H, out, &err) == ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.message, "before every block was waited for");
  st_error_clear(&err);
  if (!local) {
    int64_t cap = 0;
    CHECK(ext->recv_capacity(moe->self, 4, E, &cap, &err) == ST_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err.message, "still in flight");
    st_error_clear(&err);
  }
  /* the exchange still completes */
  for (int i = 0; i < nb; i++) CHECK_OK(ext->wait_block(moe->self, i, &f, &r, &err), &err);
  CHECK_OK(ext->return_block(moe->self, 0, recv, &err), &err);
  CHECK(ext->return_block(moe->self, 0, recv, &err) == ST_ERR_INVALID_ARGUMENT);
  CHECK_CONTAINS(err.message, "already returned");
  st_error_clear(&err);
  CHECK_OK(moe->combine(moe->self, ST_F32, recv, H, out, &err), &err);
  bool ok = true;
  for (int64_t i = 0; i < n * H; i++) ok &= out[i] == keep[i];
  CHECK_MSG(ok, "rank %d: the identity round trip after misuse did not bring the rows home", RANK);
  CHECK(ext->wait_block(moe->self, 0, &f, &r, &err) == ST_ERR_INVALID_ARGUMENT); /* closed by combine */
  st_error_clear(&err);
  /* a plain dispatch/combine after a pipelined one */
  CHECK_OK(moe->dispatch(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, &nr, &err), &err);
  CHECK_OK(moe->combine(moe->self, ST_F32, recv, H, out, &err), &err);
}

static void pipelined_all(rank_env *x, const st_moe_api *moe, const st_moe_ext *ext, bool local) {
  for (int round = 0; round < 4; round++)
    for (int order = 0; order < 3; order++) exchange_round_pipelined(x, moe, ext, round, order, local);
  pipelined_misuse(x, moe, ext, local);
  for (int rep = 0; rep < 20; rep++) exchange_round_pipelined(x, moe, ext, rep % 4, rep % 3, local); /* many layers */
}

/* recv_capacity: the sum of the group's n_rows; with strategy.recv_capacity_factor the cap, and an
 * overflow that fails every rank naming the key */
static void recv_capacity_checks(rank_env *x, const st_moe_api *moe, const st_moe_ext *ext) {
  st_error err;
  st_error_clear(&err);
  int g0 = RANK / P * P;
  int64_t cap = -1, sum = 0;
  for (int s = g0; s < g0 + P; s++) sum += 3 * s + 1;
  CHECK_OK(ext->recv_capacity(moe->self, 3 * RANK + 1, E, &cap, &err), &err);
  CHECK_MSG(cap == sum, "rank %d: recv_capacity %lld, want the group's sum %lld", RANK, (long long)cap, (long long)sum);
  (void)x;
}

static void recv_capacity_factor_checks(rank_env *x) {
  st_error err;
  st_error_clear(&err);
  void *ctx = NULL;
  /* factor < 1: a config error, before any collective */
  CHECK(init_strategy_extra(x, P, &model, ", \"recv_capacity_factor\": 0.5", &ctx, &err) == ST_ERR_CONFIG);
  CHECK_CONTAINS(err.message, "strategy.recv_capacity_factor must be a number >= 1");
  st_error_clear(&err);
  ctx = NULL;
  CHECK_OK(init_strategy_extra(x, P, &model, ", \"recv_capacity_factor\": 1.5", &ctx, &err), &err);
  if (!ctx) return;
  const st_moe_api *moe = x->host->moe(x->host);
  const st_moe_ext *ext = x->host->moe_ext(x->host);
  int g0 = RANK / P * P;
  int64_t cap = -1, sum = 0, mx = 0;
  for (int s = g0; s < g0 + P; s++) sum += 3 * s + 1, mx = 3 * s + 1 > mx ? 3 * s + 1 : mx;
  int64_t want = (3 * mx + 1) / 2 < sum ? (3 * mx + 1) / 2 : sum; /* ceil(1.5 * max) */
  CHECK_OK(ext->recv_capacity(moe->self, 3 * RANK + 1, E, &cap, &err), &err);
  CHECK_MSG(cap == want, "rank %d: recv_capacity with factor 1.5 %lld, want %lld", RANK, (long long)cap, (long long)want);
  /* every rank sends 4 rows to expert 0: EP rank 0 receives 4P rows, capacity ceil(1.5 * 4) = 6 */
  int32_t ids[4] = {0, 0, 0, 0}, rids[64];
  float tok[4 * H] = {0}, recv[64 * H], out[4 * H];
  CHECK_OK(ext->recv_capacity(moe->self, 4, E, &cap, &err), &err);
  int64_t nr = 0;
  int nb = 0;
  st_result r = moe->dispatch(moe->self, ST_F32, tok, ids, 4, H, E, recv, rids, cap, &nr, &err);
  if (P > 1) { /* 4P > 6 */
    CHECK_MSG(r == ST_ERR_INVALID_ARGUMENT, "rank %d: an overflow under recv_capacity_factor returned %d", RANK, (int)r);
    CHECK_CONTAINS(err.message, "strategy.recv_capacity_factor");
    CHECK_CONTAINS(err.message, "= 1.5");
    char want_msg[96];
    snprintf(want_msg, sizeof want_msg, "expert-parallel rank 0 would receive %d rows but its buffer holds 6", 4 * P);
    CHECK_CONTAINS(err.message, want_msg);
    st_error_clear(&err);
    r = ext->dispatch_start(moe->self, ST_F32, tok, ids, 4, H, E, recv, rids, cap, out, &nr, &nb, &err);
    CHECK(r == ST_ERR_INVALID_ARGUMENT);
    CHECK_CONTAINS(err.message, "strategy.recv_capacity_factor");
    st_error_clear(&err);
  } else {
    CHECK_OK(r, &err);
    CHECK_OK(moe->combine(moe->self, ST_F32, recv, H, out, &err), &err);
  }
  /* still usable */
  exchange_round(x, 2);
  x->sp->finalize(ctx);
}

/* ---- gradients, step and checkpoint -------------------------------------------------------- */

static void grads_and_state(rank_env *x, void *ctx) {
  st_error err;
  st_error_clear(&err);
  const st_strategy_plugin_v1 *sp = x->sp;
  int nl = E / P, first = (RANK % P) * nl;
  /* initial values arrived with state_load: the expert windows hold the global slice */
  const st_tensor *pw = NULL;
  CHECK_OK(sp->pre_forward(ctx, 0, &pw, &err), &err);
  if (pw) {
    CHECK(pw[1].shape[0] == nl && pw[1].shape[1] == 2 && pw[1].shape[2] == 3);
    bool ok = true;
    for (int64_t i = 0; i < nl * 6; i++)
      ok &= ((float *)pw[1].data)[i] == (float)(base_of("experts.w") + (double)(first * 6 + i));
    CHECK_MSG(ok, "rank %d: experts.w window does not hold experts [%d, %d)", RANK, first, first + nl);
    CHECK(((float *)pw[0].data)[2] == (float)(base_of("dense.w") + 2));
  }
  CHECK_OK(sp->post_forward(ctx, 0, &err), &err);
  /* gradients: dense = rank + 1; expert global g = (rank + 1) * (g + 1) */
  for (int u = 1; u >= 0; u--) {
    const st_tensor *pp = NULL;
    st_tensor *gg = NULL;
    CHECK_OK(sp->pre_backward(ctx, u, &pp, &gg, &err), &err);
    if (!gg) continue;
    for (int i = 0; i < 2; i++) {
      st_tensor *g = &gg[i];
      const st_param_desc *d = &units[u].params[i];
      if (!(d->flags & ST_PARAM_TRAINABLE)) {
        CHECK(g->data == NULL);
        continue;
      }
      int64_t n = st_tensor_numel(g);
      for (int64_t j = 0; j < n; j++) {
        double v = RANK + 1;
        if (d->flags & ST_PARAM_EXPERT) v *= first + j / (n / nl) + 1;
        ((float *)g->data)[j] += (float)v;
      }
    }
    CHECK_OK(sp->post_backward(ctx, u, true, &err), &err);
  }
  /* references */
  double dense = (N + 1) / 2.0, norm = dense * dense * 5, gexp[E];
  for (int g = 0; g < E; g++) {
    double s = 0;
    for (int r = 0; r < N; r++)
      if (r % P == g / nl) s += (r + 1) * (g + 1);
    gexp[g] = s / N;
    norm += gexp[g] * gexp[g] * 6;
  }
  double got = -1;
  CHECK_OK(sp->grad_norm_sq(ctx, &got, &err), &err);
  CHECK_CLOSE(got, norm, 1e-6, 0);
  st_step_args a = {.step = 1, .lr = 1.0, .grad_scale = 1.0};
  CHECK_OK(sp->step(ctx, &a, &err), &err);
  CHECK_OK(sp->pre_forward(ctx, 0, &pw, &err), &err);
  if (pw) {
    bool ok = true;
    for (int64_t i = 0; i < nl * 6; i++) {
      double want = base_of("experts.w") + (double)(first * 6 + i) - gexp[first + i / 6];
      ok &= ((float *)pw[1].data)[i] == (float)want;
    }
    CHECK_MSG(ok, "rank %d: the SGD step did not move the experts by the reduced gradient", RANK);
    CHECK(((float *)pw[0].data)[0] == (float)(base_of("dense.w") - dense));
  }
  CHECK_OK(sp->post_forward(ctx, 0, &err), &err);
  /* checkpoint: expert slices at global offsets, once per EDP group */
  io_log l = {0};
  l.w = (st_state_writer){.self = &l, .write = wr};
  CHECK_OK(sp->state_save(ctx, &l.w, &err), &err);
  int expert_writes = 0;
  for (int i = 0; i < l.n; i++) {
    if (strncmp(l.recs[i].name, "experts.", 8)) continue;
    expert_writes++;
    CHECK(!strcmp(l.recs[i].name, "experts.w")); /* frozen experts carry no state to save */
    CHECK(l.recs[i].offset == first * 6 && l.recs[i].count == nl * 6);
    if (l.recs[i].kind == ST_STATE_PARAM)
      CHECK(l.recs[i].first == (float)(base_of("experts.w") + first * 6 - gexp[first]));
  }
  CHECK_MSG(expert_writes == (RANK < P ? 1 : 0), "rank %d wrote %d expert slices (SGD without momentum: the value only)", RANK,
            expert_writes);
}

/* `bench N P ROWS HIDDEN`: dispatch + combine through host->moe vs a raw all_to_all_v of the same
 * splits and bytes, in the same run (not a test: prints MiB/s). Rows are spread evenly over the
 * experts, so each rank sends ROWS * (P-1)/P rows away and receives as many. */
static int BENCH_ROWS, BENCH_H;
static double wall(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* the simulated expert computation: `rows` rows at BENCH_ROW_S seconds each (a busy wait, like a
 * kernel would keep a core busy), plus a transform so the results can be compared */
static double BENCH_ROW_S;
static void bench_compute(float *recv, int64_t first, int64_t rows, int64_t h) {
  double until = wall() + (double)rows * BENCH_ROW_S;
  for (int64_t i = first * h; i < (first + rows) * h; i++) recv[i] = recv[i] * 0.5f + 1.0f;
  while (wall() < until) {
  }
}

/* (a) dispatch -> compute everything -> combine vs (b) dispatch_start -> per block wait, compute,
 * return -> combine, with a compute of about the blocking exchange's own cost (rank 0's dispatch +
 * combine time over its rows; ST_BENCH_ROW_US=x sets x microseconds per row instead), same run */
static void bench_pipelined(rank_env *x, float *tok, int32_t *ids, float *recv, int32_t *rids, float *out,
                            double exchange_ms) {
  st_error err;
  st_error_clear(&err);
  const st_moe_api *moe = x->host->moe(x->host);
  const st_moe_ext *ext = x->host->moe_ext(x->host);
  int64_t n = BENCH_ROWS, h = BENCH_H, nr = 0, f, r;
  /* every rank gets the same per-row cost: rank 0's exchange time over the rows it receives */
  double per = exchange_ms * 1e-3 / (double)n;
  CHECK_OK(x->comm->broadcast(x->world, &per, 1, ST_F64, 0, NULL, &err), &err);
  BENCH_ROW_S = getenv("ST_BENCH_ROW_US") ? atof(getenv("ST_BENCH_ROW_US")) * 1e-6 : per;
  float *out2 = calloc((size_t)(n * h), sizeof(float));
  for (int64_t i = 0; i < n * h; i++) tok[i] = (float)(i % 97);
  int iters = 10, nb = 0;
  double best_a = 1e30, best_b = 1e30;
  for (int rep = 0; rep < 4; rep++) { /* rep 0 warms up; the best of the others counts */
    CHECK_OK(x->comm->barrier(x->world, &err), &err);
    double t0 = wall();
    for (int it = 0; it < iters; it++) {
      CHECK_OK(moe->dispatch(moe->self, ST_F32, tok, ids, n, h, E, recv, rids, n * P, &nr, &err), &err);
      bench_compute(recv, 0, nr, h);
      CHECK_OK(moe->combine(moe->self, ST_F32, recv, h, out, &err), &err);
    }
    double ta = (wall() - t0) / iters;
    CHECK_OK(x->comm->barrier(x->world, &err), &err);
    t0 = wall();
    for (int it = 0; it < iters; it++) {
      CHECK_OK(ext->dispatch_start(moe->self, ST_F32, tok, ids, n, h, E, recv, rids, n * P, out2, &nr, &nb, &err), &err);
      for (int i = 0; i < nb; i++) {
        CHECK_OK(ext->wait_block(moe->self, i, &f, &r, &err), &err);
        bench_compute(recv, f, r, h);
        CHECK_OK(ext->return_block(moe->self, i, recv, &err), &err);
      }
      CHECK_OK(moe->combine(moe->self, ST_F32, recv, h, out2, &err), &err);
    }
    double tb = (wall() - t0) / iters;
    if (rep > 0 && ta < best_a) best_a = ta;
    if (rep > 0 && tb < best_b) best_b = tb;
  }
  CHECK_MSG(!memcmp(out, out2, (size_t)(n * h) * sizeof(float)), "rank %d: the pipelined bench result differs", RANK);
  if (RANK == 0)
    printf("EP %d on %d ranks, %lld rows x %lld fp32, simulated expert compute %.2f ms/iter (%.3f us/row): "
           "(a) dispatch+compute+combine %.2f ms/iter, (b) pipelined %.2f ms/iter, ratio a/b %.2f\n",
           P, N, (long long)n, (long long)h, 1e3 * (double)n * BENCH_ROW_S, 1e6 * BENCH_ROW_S, 1e3 * best_a, 1e3 * best_b,
           best_a / best_b);
  fflush(stdout);
  free(out2);
}

static void bench(rank_env *x) {
  st_error err;
  st_error_clear(&err);
  const st_moe_api *moe = x->host->moe(x->host);
  int64_t n = BENCH_ROWS, h = BENCH_H;
  float *tok = calloc((size_t)(n * h), sizeof(float)), *recv = calloc((size_t)(n * h * P), sizeof(float));
  float *out = calloc((size_t)(n * h), sizeof(float));
  int32_t *ids = calloc((size_t)n, sizeof(int32_t)), *rids = calloc((size_t)(n * P), sizeof(int32_t));
  for (int64_t i = 0; i < n; i++) ids[i] = (int32_t)(i * E / n);
  int iters = 20;
  int64_t nr = 0;
  for (int w = 0; w < 2; w++) { /* warm-up */
    moe->dispatch(moe->self, ST_F32, tok, ids, n, h, E, recv, rids, n * P, &nr, &err);
    moe->combine(moe->self, ST_F32, recv, h, out, &err);
  }
  double t0 = wall();
  for (int it = 0; it < iters; it++) {
    CHECK_OK(moe->dispatch(moe->self, ST_F32, tok, ids, n, h, E, recv, rids, n * P, &nr, &err), &err);
    CHECK_OK(moe->combine(moe->self, ST_F32, recv, h, out, &err), &err);
  }
  double t_moe = wall() - t0;
  /* the same splits as a raw all_to_all_v over a group of the same ranks */
  st_comm *g = NULL;
  CHECK_OK(x->comm->split(x->world, RANK / P, RANK % P, &g, &err), &err);
  int64_t sc[8], sd[8], rc[8], rdsp[8], s = 0, r = 0;
  for (int d = 0; d < P; d++) {
    sc[d] = (n / P) * h, sd[d] = s, s += sc[d];
    rc[d] = (n / P) * h, rdsp[d] = r, r += rc[d];
  }
  t0 = wall();
  for (int it = 0; it < iters && g; it++) {
    CHECK_OK(x->comm->all_to_all_v(g, tok, sc, sd, recv, rc, rdsp, ST_F32, NULL, &err), &err);
    CHECK_OK(x->comm->all_to_all_v(g, recv, rc, rdsp, out, sc, sd, ST_F32, NULL, &err), &err);
  }
  double t_raw = wall() - t0;
  if (g) x->comm->group_free(g);
  double mib = 2.0 * (double)iters * (double)(n * h) * 4 / (1 << 20); /* rows sent, both directions */
  if (RANK == 0)
    printf("EP %d on %d ranks, %lld rows x %lld fp32 per rank: dispatch+combine %.2f ms/iter (%.0f MiB/s of rows), "
           "raw all_to_all_v pair %.2f ms/iter (%.0f MiB/s), ratio %.2f\n",
           P, N, (long long)n, (long long)h, 1e3 * t_moe / iters, mib / t_moe, 1e3 * t_raw / iters, mib / t_raw,
           t_moe / t_raw);
  fflush(stdout);
  bench_pipelined(x, tok, ids, recv, rids, out, 1e3 * t_moe / iters);
  free(tok), free(recv), free(out), free(ids), free(rids);
}

/* the last rank dies after receiving its blocks, before returning them: every other rank's wait_block or
 * combine must fail with the comm's error (naming the exchange) instead of hanging */
static void kill_mid_exchange(rank_env *x) {
  st_error err;
  st_error_clear(&err);
  const st_moe_api *moe = x->host->moe(x->host);
  const st_moe_ext *ext = x->host->moe_ext(x->host);
  int32_t ids[64], rids[256];
  float tok[64 * H], recv[256 * H], out[64 * H];
  int64_t n = rows_of(RANK, 3, ids, tok), nr = 0, f, r;
  int nb = 0;
  /* one clean pipelined exchange first */
  CHECK_OK(ext->dispatch_start(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, out, &nr, &nb, &err), &err);
  for (int i = 0; i < nb; i++) CHECK_OK(ext->wait_block(moe->self, i, &f, &r, &err), &err);
  CHECK_OK(moe->combine(moe->self, ST_F32, recv, H, out, &err), &err);
  /* a survivor may already fail here (posting to the dead rank), or in wait_block, return_block or combine */
  st_result res = ext->dispatch_start(moe->self, ST_F32, tok, ids, n, H, E, recv, rids, 256, out, &nr, &nb, &err);
  for (int i = 0; i < nb && res == ST_OK; i++) res = ext->wait_block(moe->self, i, &f, &r, &err);
  if (RANK == N - 1) {
    fflush(stdout);
    raise(SIGKILL);
  }
  double t0 = wall();
  for (int i = 0; i < nb && res == ST_OK; i++) res = ext->return_block(moe->self, i, recv, &err);
  if (res == ST_OK) res = moe->combine(moe->self, ST_F32, recv, H, out, &err);
  CHECK_MSG(res == ST_ERR_COMM || res == ST_ERR_TIMEOUT, "rank %d: a peer dying mid-exchange returned %d (%s)", RANK,
            (int)res, err.message);
  CHECK_CONTAINS(err.message, "expert_parallel");
  char died[32]; /* "rank N-1 died" from a wait, or a post to rank N-1 refused by the closed connection */
  snprintf(died, sizeof died, "rank %d", N - 1);
  CHECK_CONTAINS(err.message, died);
  CHECK_MSG(wall() - t0 < 25, "rank %d: the failure took %.1f s to surface", RANK, wall() - t0);
  if (RANK == 0) fprintf(stderr, "rank 0 after the peer died: %s\n", err.message);
  /* the exchange is closed: the next calls fail cleanly too */
  st_error_clear(&err);
  CHECK(ext->wait_block(moe->self, 0, &f, &r, &err) == ST_ERR_INVALID_ARGUMENT);
}

static void bench_sink(void *user, st_log_level level, const char *msg) {
  (void)user, (void)level;
  if (RANK == 0 && strstr(msg, "calls moved")) fprintf(stderr, "%s\n", msg);
}

static int rank_main(int port) {
  st_error err;
  st_error_clear(&err);
  alarm(120);
  st_store *store = NULL;
  if (st_store_connect("127.0.0.1", port, TOKEN, RANK, 10000, &store, &err) != ST_OK) {
    fprintf(stderr, "rank %d: %s\n", RANK, err.message);
    return 2;
  }
  rank_env x = {0};
  st_plugin comm_plugin = {0}, sp_plugin = {0};
  static const st_optimizer_settings sgd = {.type = ST_OPTIM_SGD, .lr = 1.0, .momentum = 0.0, .weight_decay = 0.0};
  CHECK_OK(st_plugin_load(ST_PLUGIN_COMM, "gloo", NULL, 0, &comm_plugin, &err), &err);
  CHECK_OK(st_plugin_load(ST_PLUGIN_STRATEGY, "expert_parallel", NULL, 0, &sp_plugin, &err), &err);
  CHECK_OK(st_cpu_ops_create(1, &x.ops, &err), &err);
  if (!comm_plugin.handle || !sp_plugin.handle || !x.ops) return st_test_finish("test_expert_parallel setup");
  x.comm = comm_plugin.v.comm;
  x.sp = sp_plugin.v.strategy;
  st_comm_init_args args = {.struct_size = sizeof args, .rank = RANK, .world_size = N, .local_rank = RANK,
                            .local_world_size = N, .device = {ST_DEVICE_CPU, 0}, .store = store,
                            .timeout_ms = KILL ? 10000 : 30000};
  CHECK_OK(x.comm->init(NULL, &args, &x.world, &err), &err);
  st_host_options ho = {.ops = x.ops, .cpu_ops = x.ops, .optimizer = &sgd, .cfg = st_config_api(),
                        .load_strategy = load_cb, .comm = x.comm, .world = x.world, .rank = RANK, .world_size = N,
                        .local_rank = RANK, .local_world_size = N, .log_sink = BENCH_ROWS ? bench_sink : NULL};
  CHECK_OK(st_host_create(&ho, &x.host, &err), &err);
  if (x.world && x.host) {
    const st_moe_api *local = x.host->moe(x.host);
    void *ctx = NULL;
    CHECK_OK(init_strategy(&x, P, &model, &ctx, &err), &err);
    if (ctx && KILL) {
      kill_mid_exchange(&x);
      char name[64];
      snprintf(name, sizeof name, "test_expert_parallel kill rank %d", RANK);
      st_store_close(store); /* a goodbye, so only the killed rank counts as dead */
      return st_test_finish(name); /* no teardown over a group with a dead member */
    }
    if (ctx && BENCH_ROWS) {
      bench(&x);
      x.sp->finalize(ctx);
      ctx = NULL;
    }
    if (ctx) {
      const st_moe_api *moe = x.host->moe(x.host);
      CHECK(moe != local);
      CHECK(moe->num_local_experts(moe->self, E) == E / P);
      CHECK(moe->first_local_expert(moe->self, E) == (RANK % P) * (E / P));
      io_log l = {0};
      l.r = (st_state_reader){.self = &l, .read = rd};
      CHECK_OK(x.sp->state_load(ctx, &l.r, &err), &err);
      int seen = 0;
      for (int i = 0; i < l.n; i++)
        if (!strncmp(l.recs[i].name, "experts.", 8) && l.recs[i].kind == ST_STATE_PARAM) {
          int64_t row = strcmp(l.recs[i].name, "experts.w") ? 2 : 6;
          CHECK(l.recs[i].offset == (RANK % P) * (E / P) * row && l.recs[i].count == (E / P) * row);
          seen++;
        }
      CHECK(seen == 2);
      for (int round = 0; round < 3; round++) exchange_round(&x, round);
      exchange_failures(&x);
      exchange_round(&x, 0); /* the exchange still works after the failed calls */
      pipelined_all(&x, moe, x.host->moe_ext(x.host), false);
      recv_capacity_checks(&x, moe, x.host->moe_ext(x.host));
      exchange_round(&x, 1);
      grads_and_state(&x, ctx);
      x.sp->finalize(ctx);
      CHECK(x.host->moe(x.host) == local); /* finalize puts the previous exchange back */
      /* the core's local exchange: one block, the same results */
      int64_t lcap = -1;
      CHECK_OK(x.host->moe_ext(x.host)->recv_capacity(local->self, 17, E, &lcap, &err), &err);
      CHECK(lcap == 17);
      CHECK(x.host->moe_ext(x.host) != NULL); /* finalize put the local exchange's additions back too */
      pipelined_all(&x, local, x.host->moe_ext(x.host), true);
      recv_capacity_factor_checks(&x);
    }
    /* config errors, raised before any collective so every rank fails alike */
    if (N % 3 && !BENCH_ROWS) {
      ctx = NULL;
      st_error_clear(&err);
      CHECK(init_strategy(&x, 3, &model, &ctx, &err) == ST_ERR_CONFIG);
      char want[96];
      snprintf(want, sizeof want, "world size %d is not divisible by strategy.expert_parallel_size 3", N);
      CHECK_CONTAINS(err.message, want);
    }
    if (P > 1 && !BENCH_ROWS) {
      st_param_desc six[] = {{"odd.experts", 2, {6 * P + 1, 2}, ST_PARAM_TRAINABLE | ST_PARAM_EXPERT}};
      st_unit_desc u[] = {{"u", 1, six}, {"v", 0, NULL}};
      st_model_desc m = {.n_units = 2, .units = u, .compute_dtype = ST_F32, .hidden_size = 2,
                         .n_params_total = (6 * P + 1) * 2};
      ctx = NULL;
      st_error_clear(&err);
      CHECK(init_strategy(&x, P, &m, &ctx, &err) == ST_ERR_CONFIG);
      char want[128];
      snprintf(want, sizeof want, "odd.experts has %d experts, not divisible by strategy.expert_parallel_size %d",
               6 * P + 1, P);
      CHECK_CONTAINS(err.message, want);
    }
  }
  st_config_free(x.cfg);
  st_host_destroy(x.host);
  if (x.world) x.comm->finalize(x.world);
  st_cpu_ops_destroy(x.ops);
  st_store_close(store);
  char name[64];
  snprintf(name, sizeof name, "test_expert_parallel rank %d", RANK);
  return st_test_finish(name);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s N P | bench N P ROWS HIDDEN\n", argv[0]);
    return 1;
  }
  signal(SIGPIPE, SIG_IGN);
  if (!strcmp(argv[1], "bench") && argc >= 6) {
    BENCH_ROWS = atoi(argv[4]);
    BENCH_H = atoi(argv[5]);
    argv++;
  }
  N = atoi(argv[1]);
  P = atoi(argv[2]);
  KILL = argc >= 4 && !strcmp(argv[3], "kill");
  if (N < 1 || N > 8 || P < 1 || N % P || E % P) return 1;
  int port = 0;
  pid_t store_pid = store_process_start(TOKEN, &port);
  if (store_pid < 0) return 1;
  pid_t pids[8];
  for (int r = 0; r < N; r++) {
    pids[r] = fork();
    if (pids[r] == 0) {
      RANK = r;
      _exit(rank_main(port));
    }
  }
  for (int r = 0; r < N; r++) {
    int status = 0;
    waitpid(pids[r], &status, 0);
    if (KILL && r == N - 1)
      CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "rank %d was to die of SIGKILL: status 0x%x", r,
                status);
    else
      CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "rank %d exited with status 0x%x", r, status);
  }
  store_process_stop(store_pid);
  char name[64];
  snprintf(name, sizeof name, "test_expert_parallel %d ranks, EP %d%s", N, P, KILL ? ", a rank killed" : "");
  return st_test_finish(name);
}
