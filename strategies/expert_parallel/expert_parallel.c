/* expert_parallel.c — the `expert_parallel` strategy: routed experts partitioned across an
 * expert-parallel (EP) group, every other parameter handed to an inner dense strategy (ddp, fsdp or
 * any third-party strategy plugin) loaded through host->load_strategy.
 *
 * Config: strategy: {name: "expert_parallel", expert_parallel_size: P, dense: {name: "ddp", ...}}.
 *
 * Groups (DeepSpeed's layout, reference §4.4): with world W and P | W,
 *   - EP group: consecutive ranks [g*P, (g+1)*P), g = rank / P. EP rank r = rank % P owns the global
 *     experts [r*E/P, (r+1)*E/P) of every ST_PARAM_EXPERT parameter (dim 0 = experts).
 *   - expert-data-parallel (EDP) group: the W/P ranks with the same EP rank (strided: r, r+P, ...),
 *     which hold the same experts.
 *   - dense parameters: the inner strategy over the whole world (they are replicated on every rank).
 *
 * Token exchange: init installs host->moe. dispatch takes the model's rows sorted by expert, counts
 * rows per expert, all-gathers (counts, receive capacity) over the EP group (so every rank sees the
 * same table and an overflow anywhere fails every rank at once instead of leaving some waiting in
 * the next collective), then one all-to-all-v of the rows. Received rows are ordered
 * [source rank][expert] and their expert ids are rebuilt from the table (the model regroups them).
 * combine is the all-to-all-v with the split sizes swapped. Backward uses the same two calls (the model's mirror
 * images). Zero-row exchanges take part like any other.
 *
 * Gradients: an expert's local gradient already sums the contributions of the tokens every EP peer
 * sent it. On the last micro-step each unit's expert gradients are summed over the EDP group by an
 * asynchronous all-reduce launched at its post_backward; at the step they are divided by the world
 * size (DeepSpeed/Megatron: divide by the full data-parallel size, not by EDP), which with
 * the inner strategy's average over the world gives EP = P and EP = 1 the same update.
 * grad_norm_sq = inner norm + the expert squares summed over the EP group (each expert counted once).
 *
 * Checkpoints: experts under their GLOBAL names at global offsets (expert e of a [E, ...] tensor is
 * elements [e*row, (e+1)*row)); EDP rank 0 of each expert slice writes it, so any EP size (and any
 * other strategy) can read them back. */
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <strata/strategy.h>

#include "strategy_util.h"

#define EP_NAME "expert_parallel"

typedef struct ep_param {
  const st_param_desc *desc;
  int64_t row;                          /* elements per expert */
  int64_t local_numel, global_offset;   /* this rank's slice in the global flattening */
  int64_t local_shape[ST_MAX_DIMS];
  size_t param_off, master_off, state_off, grad_off; /* bytes; SIZE_MAX = none */
  bool trainable;
} ep_param;

typedef struct ep_ctx {
  const st_host *host;
  st_strategy_setup setup;
  const st_comm_plugin_v1 *comm;
  int rank, world, ep, ep_rank, edp;
  st_comm *ep_group, *edp_group; /* NULL when the group would be this rank alone */
  st_comm *edp_comm;             /* edp_group, or the world when EP = 1, or NULL when EDP = 1 */

  /* inner dense strategy */
  const st_strategy_plugin_v1 *inner;
  void *ictx;
  st_model_desc sub;
  st_unit_desc *sub_units;
  st_param_desc *sub_params;

  /* every model parameter in descriptor order: slot >= 0 expert index, -1 dense */
  int n_units, n_params;
  int *unit_first;
  int *slot;
  ep_param *experts;
  int n_experts;
  st_tensor *windows, *grad_windows;
  char *param_mem, *grad_mem, *master_mem, *state_mem;
  size_t param_bytes, grad_bytes, master_bytes, state_bytes;
  int n_states;
  bool reduced;
  /* per unit: its expert gradients as one byte range of grad_mem, and the EDP all-reduce launched
   * at its last post_backward (overlapped with the backward of the units before it) */
  size_t *ugrad_off, *ugrad_bytes;
  st_comm_request **ureq;
  bool *ulaunched;

  /* MoE exchange */
  st_moe_api moe;
  st_moe_ext moe_ext;
  const st_moe_api *prev_moe;
  const st_moe_ext *prev_moe_ext;
  bool host_has_ext; /* the core's st_host carries moe_ext/set_moe_ext (appended after v1) */
  int64_t *table;            /* [P][E+1]: rank s's rows for each expert, then its receive capacity */
  int table_experts;
  int64_t *srows, *rrows;    /* rows this rank sends to / receives from each EP rank (last dispatch) */
  int64_t *scnt, *sdsp, *rcnt, *rdsp; /* element counts and displacements for one all_to_all_v */
  int32_t *ids_host;
  int64_t ids_cap;
  int64_t last_n, last_nrecv;
  bool have_dispatch;
  /* exchange statistics, logged at finalize: calls, bytes sent + received, seconds */
  int64_t n_dispatch, n_combine, n_pipelined;
  double bytes_moved, sec_counts, sec_rows;
  /* strategy.recv_capacity_factor (0 = not set) and recv_capacity's all-gather buffer [P] */
  double cap_factor;
  int64_t *cap_rows;
  /* the pipelined exchange (dispatch_start .. combine); per-peer arrays are [P], indexed by EP rank */
  int64_t *soff, *roff;      /* row offsets of srows / rrows */
  bool pl_active;
  bool *pl_waited, *pl_returned;                            /* by block index */
  st_comm_request **pl_rreq, **pl_sreq, **pl_breq, **pl_bsreq; /* rows in, rows out, back in, back out */
  uint32_t pl_seq;
  int pl_tag;
  st_dtype pl_dt;
  int64_t pl_hidden;
  void *pl_recv, *pl_out;
} ep_ctx;

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- configuration ------------------------------------------------------------------------ */

static const char *const ep_keys[] = {"name", "plugin", "expert_parallel_size", "dense", "recv_capacity_factor", NULL};

static st_result ep_validate(st_cfg *cfg, const st_cfg_api *api, st_error *err) {
  if (!cfg) return ST_OK;
  ST_CHECK(api->check_keys(cfg, ep_keys, err));
  int64_t p;
  ST_CHECK(api->get_int(cfg, "expert_parallel_size", 1, &p, err));
  if (p < 1)
    return st_error_set(err, ST_ERR_CONFIG, "strategy.expert_parallel_size",
                        "strategy.expert_parallel_size must be >= 1, found %lld", (long long)p);
  if (api->type(cfg, "recv_capacity_factor") != ST_CFG_ABSENT) {
    double f = 0;
    ST_CHECK(api->get_number(cfg, "recv_capacity_factor", 0.0, &f, err));
    if (!(f >= 1.0))
      return st_error_set(err, ST_ERR_CONFIG, "strategy.recv_capacity_factor",
                          "strategy.recv_capacity_factor must be a number >= 1 (the receive capacity as a multiple of "
                          "the largest rank's rows; 1 = perfectly balanced routing), found %g; remove it for no cap", f);
  }
  st_cfg_type t = api->type(cfg, "dense");
  if (t != ST_CFG_ABSENT && t != ST_CFG_OBJECT)
    return st_error_set(err, ST_ERR_CONFIG, "strategy.dense",
                        "strategy.dense must be an object such as {\"name\": \"ddp\"} or {\"name\": \"fsdp\"}");
  st_cfg *dense = NULL;
  if (t == ST_CFG_OBJECT) ST_CHECK(api->get_object(cfg, "dense", false, &dense, err));
  if (dense) {
    const char *name = NULL;
    if (api->type(dense, "name") != ST_CFG_ABSENT) ST_CHECK(api->get_string(dense, "name", "ddp", &name, err));
    if (name && !strcmp(name, EP_NAME))
      return st_error_set(err, ST_ERR_CONFIG, "strategy.dense.name",
                          "strategy.dense cannot be expert_parallel itself: use \"ddp\" or \"fsdp\"");
  }
  return ST_OK;
}

/* ---- the MoE exchange --------------------------------------------------------------------- */

static int ep_num_local(st_moe_exchange *x, int num_experts) {
  ep_ctx *c = (ep_ctx *)x;
  return num_experts % c->ep ? 0 : num_experts / c->ep;
}

static int ep_first_local(st_moe_exchange *x, int num_experts) {
  ep_ctx *c = (ep_ctx *)x;
  return num_experts % c->ep ? 0 : c->ep_rank * (num_experts / c->ep);
}

static st_result a2a(ep_ctx *c, const void *send, const int64_t *send_rows, void *recv, const int64_t *recv_rows,
                     int64_t width, st_dtype dt, const char *what, st_error *err) {
  int64_t s = 0, r = 0;
  for (int i = 0; i < c->ep; i++) {
    c->scnt[i] = send_rows[i] * width;
    c->sdsp[i] = s;
    s += c->scnt[i];
    c->rcnt[i] = recv_rows[i] * width;
    c->rdsp[i] = r;
    r += c->rcnt[i];
  }
  double t0 = now_s();
  c->bytes_moved += (double)(s + r) * (double)st_dtype_size(dt);
  if (!c->ep_group) { /* EP = 1: everything stays here */
    const st_ops *o = c->host->ops;
    st_result res = s ? o->copy(o, recv, c->host->device, send, c->host->device, (size_t)s * st_dtype_size(dt)) : ST_OK;
    c->sec_rows += now_s() - t0;
    return res;
  }
  st_result res = c->comm->all_to_all_v(c->ep_group, send, c->scnt, c->sdsp, recv, c->rcnt, c->rdsp, dt, NULL, err);
  c->sec_rows += now_s() - t0;
  if (res != ST_OK) return st_error_prefix(err, "expert_parallel: all-to-all-v of %s over the expert-parallel group: ", what);
  return ST_OK;
}

/* the count exchange shared by dispatch and dispatch_start: checks the rows, all-gathers the table
 * (rows per expert + receive capacity) over the EP group, checks every rank's capacity from the same
 * table (so all fail together), then sets srows/rrows and their row offsets and rebuilds the received
 * rows' expert ids in ids_host[0 .. *n_recv). */
static st_result exchange_counts(ep_ctx *c, const int32_t *expert_ids, int64_t n, int num_experts, int64_t recv_cap,
                                 const char *what, int64_t *n_recv, st_error *err) {
  const st_host *h = c->host;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  int P = c->ep;
  if (num_experts < 1 || num_experts % P)
    return st_error_set(err, ST_ERR_CONFIG, "strategy.expert_parallel_size",
                        "%d experts cannot be split evenly over expert_parallel_size %d", num_experts, P);
  if (n < 0) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what, "negative row count %lld", (long long)n);
  int nl = num_experts / P;
  if (n > c->ids_cap) {
    int64_t cap = n * 2;
    h->free(h, cpu, c->ids_host);
    c->ids_host = h->alloc(h, cpu, (size_t)cap * sizeof(int32_t), "comm");
    c->ids_cap = c->ids_host ? cap : 0;
    if (!c->ids_host) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, what, "expert id staging (%lld)", (long long)n);
  }
  int64_t width = num_experts + 1; /* a table row: rows per expert, then the receive capacity */
  if (num_experts != c->table_experts) {
    free(c->table);
    c->table = calloc((size_t)P * (size_t)width, sizeof *c->table);
    c->table_experts = c->table ? num_experts : 0;
    if (!c->table) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, what, "token count table");
  }
  if (n) ST_CHECK(h->ops->copy(h->ops, c->ids_host, cpu, expert_ids, h->device, (size_t)n * sizeof(int32_t)));
  /* rows per expert; sorted by expert is what lets the receiver rebuild the ids from the counts */
  int64_t *mine = &c->table[(size_t)c->ep_rank * (size_t)width];
  for (int64_t i = 0; i < width; i++) mine[i] = 0;
  int prev = 0;
  for (int64_t i = 0; i < n; i++) {
    int e = c->ids_host[i];
    if (e < 0 || e >= num_experts)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what, "row %lld names expert %d of %d", (long long)i, e,
                          num_experts);
    if (e < prev)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what,
                          "rows must arrive sorted by expert: row %lld (expert %d) follows a row for expert %d",
                          (long long)i, e, prev);
    prev = e;
    mine[e]++;
  }
  mine[num_experts] = recv_cap;
  c->n_dispatch++;
  if (c->ep_group) {
    double t0 = now_s();
    st_result r = c->comm->all_gather(c->ep_group, mine, c->table, width, ST_I64, NULL, err);
    c->sec_counts += now_s() - t0;
    if (r != ST_OK) return st_error_prefix(err, "expert_parallel: exchanging token counts over the expert-parallel group: ");
  }
#define T_AT(s_, e_) c->table[(size_t)(s_) * (size_t)width + (size_t)(e_)]
  for (int d = 0; d < P; d++) {
    int64_t total = 0;
    for (int s2 = 0; s2 < P; s2++)
      for (int e = d * nl; e < (d + 1) * nl; e++) total += T_AT(s2, e);
    int64_t cap = T_AT(d, num_experts);
    if (total <= cap) continue;
    if (c->cap_factor > 0)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what,
                          "expert-parallel rank %d would receive %lld rows but its buffer holds %lld (the receive "
                          "capacity is capped by strategy.recv_capacity_factor = %g x the largest rank's rows, and this "
                          "routing is more uneven than that): raise strategy.recv_capacity_factor above %g, or remove "
                          "it to size the buffers for the worst case", d, (long long)total, (long long)cap,
                          c->cap_factor, c->cap_factor);
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what,
                        "expert-parallel rank %d would receive %lld rows but its buffer holds %lld (the model's "
                        "recv_cap is too small for this routing: size it with st_moe_ext.recv_capacity; "
                        "strategy.recv_capacity_factor is not set)", d, (long long)total, (long long)cap);
  }
  int64_t nr = 0, ns = 0, first = (int64_t)c->ep_rank * nl;
  for (int s2 = 0; s2 < P; s2++) {
    c->srows[s2] = 0;
    c->rrows[s2] = 0;
    for (int e = s2 * nl; e < (s2 + 1) * nl; e++) c->srows[s2] += mine[e];
    for (int64_t e = first; e < first + nl; e++) c->rrows[s2] += T_AT(s2, e);
    c->soff[s2] = ns;
    c->roff[s2] = nr;
    ns += c->srows[s2];
    nr += c->rrows[s2];
  }
  /* received rows are [source rank][expert]: their ids follow from the table, no second exchange */
  if (nr > c->ids_cap) {
    h->free(h, cpu, c->ids_host);
    c->ids_host = h->alloc(h, cpu, (size_t)nr * 2 * sizeof(int32_t), "comm");
    c->ids_cap = c->ids_host ? nr * 2 : 0;
    if (!c->ids_host) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, what, "expert id staging (%lld)", (long long)nr);
  }
  int64_t k = 0;
  for (int s2 = 0; s2 < P; s2++)
    for (int64_t e = first; e < first + nl; e++)
      for (int64_t j = 0; j < T_AT(s2, e); j++) c->ids_host[k++] = (int32_t)e;
#undef T_AT
  *n_recv = nr;
  return ST_OK;
}

static st_result busy(ep_ctx *c, const char *what, st_error *err) {
  if (!c->pl_active) return ST_OK;
  return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what,
                      "a pipelined exchange (dispatch_start) is still in flight: wait for its blocks and call combine "
                      "before %s", what);
}

static st_result ep_dispatch(st_moe_exchange *x, st_dtype dt, const void *tokens, const int32_t *expert_ids, int64_t n,
                             int64_t hidden, int num_experts, void *recv, int32_t *recv_expert, int64_t recv_cap,
                             int64_t *n_recv, st_error *err) {
  ep_ctx *c = (ep_ctx *)x;
  const st_host *h = c->host;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  ST_CHECK(busy(c, "moe.dispatch", err));
  c->have_dispatch = false;
  int64_t nr = 0;
  ST_CHECK(exchange_counts(c, expert_ids, n, num_experts, recv_cap, "moe.dispatch", &nr, err));
  /* the ids are rebuilt in ids_host, which a2a does not touch */
  ST_CHECK(a2a(c, tokens, c->srows, recv, c->rrows, hidden, dt, "token rows", err));
  if (nr) ST_CHECK(h->ops->copy(h->ops, recv_expert, h->device, c->ids_host, cpu, (size_t)nr * sizeof(int32_t)));
  c->last_n = n;
  c->last_nrecv = nr;
  c->have_dispatch = true;
  *n_recv = nr;
  return ST_OK;
}

/* ---- the pipelined form: point-to-point messages per peer, on tags unique to the exchange ------
 *
 * Gloo waits for p2p requests on the group's worker thread in posting order, so dispatch_start posts
 * the block receives first (in block order), then the sends of this rank's rows (to the peer that
 * needs them first first), then the receives of the rows coming back. wait_block(i) therefore only
 * queues behind blocks < i; nothing a rank waits for depends on a later call of another rank. No
 * other collective of the EP group may run while an exchange is in flight (it would queue behind the
 * returning rows): dispatch, recv_capacity and a second dispatch_start are refused until combine.
 * Tags: 2 * (sequence number mod 2^29) for rows going out, + 1 for rows coming back; the sequence
 * number advances identically on every rank (dispatch_start is collective), and every message of an
 * exchange is complete before its combine returns. Zero-row messages are skipped on both sides (both
 * know them from the table). Rows are sent straight from the caller's buffers, without staging (a
 * staging copy cost more than the overlap gained on loopback Gloo): `tokens` (dispatch_start) and
 * `processed` (return_block, and combine's) must stay valid and unchanged until combine returns,
 * like recv and out. */

static size_t row_bytes(const ep_ctx *c) { return (size_t)c->pl_hidden * st_dtype_size(c->pl_dt); }

/* after a failure: wait for (and free) every outstanding request in posting order (the order Gloo's
 * worker completes them), close the exchange, and keep the first failure in *first */
static st_result pl_drain(ep_ctx *c, st_error *first) {
  st_result res = ST_OK;
  int P = c->ep;
  for (int k = 0; k < 4; k++)
    for (int i = 1; i < P; i++) {
      int p = k == 0 ? (c->ep_rank + i) % P : (c->ep_rank - i + P) % P;
      st_comm_request **req = k == 0 ? &c->pl_rreq[p] : k == 1 ? &c->pl_sreq[p] : k == 2 ? &c->pl_breq[p] : &c->pl_bsreq[p];
      if (!*req) continue;
      st_comm_request *r = *req;
      *req = NULL;
      st_error e;
      st_error_clear(&e);
      st_result rr = c->comm->wait(r, &e);
      if (rr != ST_OK && res == ST_OK) {
        res = rr;
        if (first) *first = e;
      }
    }
  c->pl_active = false;
  return res;
}

/* a call failed with r/err in the middle of an exchange: drain it; when a wait failed too, its error
 * wins (it carries the comm's diagnosis, e.g. which rank died), else r/err stand */
static st_result pl_abort(ep_ctx *c, st_result r, st_error *err) {
  st_error first;
  st_error_clear(&first);
  st_result fr = pl_drain(c, &first);
  if (fr == ST_OK) return r;
  if (err) *err = first;
  return fr;
}

static st_result ep_dispatch_start(st_moe_exchange *x, st_dtype dt, const void *tokens, const int32_t *expert_ids,
                                   int64_t n, int64_t hidden, int num_experts, void *recv, int32_t *recv_expert,
                                   int64_t recv_cap, void *out, int64_t *n_recv, int *n_blocks, st_error *err) {
  ep_ctx *c = (ep_ctx *)x;
  const st_host *h = c->host;
  const st_ops *o = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  if (c->pl_active)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.dispatch_start",
                        "dispatch_start while the previous pipelined exchange is still in flight: call combine first");
  c->have_dispatch = false;
  int64_t nr = 0;
  ST_CHECK(exchange_counts(c, expert_ids, n, num_experts, recv_cap, "moe.dispatch_start", &nr, err));
  if (nr) ST_CHECK(o->copy(o, recv_expert, h->device, c->ids_host, cpu, (size_t)nr * sizeof(int32_t)));
  int P = c->ep, me = c->ep_rank;
  c->pl_dt = dt;
  c->pl_hidden = hidden;
  c->pl_recv = recv;
  c->pl_out = out;
  c->last_n = n;
  c->last_nrecv = nr;
  size_t rb = row_bytes(c);
  for (int i = 0; i < P; i++) c->pl_waited[i] = c->pl_returned[i] = false;
  c->n_pipelined++;
  c->bytes_moved += (double)(n + nr) * (double)rb;
  double t0 = now_s();
  /* this rank's own block: a local copy */
  if (c->srows[me])
    ST_CHECK(o->copy(o, (char *)recv + (size_t)c->roff[me] * rb, h->device, (const char *)tokens + (size_t)c->soff[me] * rb,
                     h->device, (size_t)c->srows[me] * rb));
  c->pl_active = true;
  if (c->ep_group) {
    int tag = (int)((c->pl_seq++ % (1u << 29)) * 2);
    c->pl_tag = tag;
    for (int i = 1; i < P; i++) { /* block order */
      int s = (me + i) % P;
      if (!c->rrows[s]) continue;
      st_result r = c->comm->recv(c->ep_group, (char *)recv + (size_t)c->roff[s] * rb, c->rrows[s] * hidden, dt, s,
                                  tag, &c->pl_rreq[s], err);
      if (r != ST_OK) { r = pl_abort(c, r, err); st_error_prefix(err, "expert_parallel: posting the receive of EP rank %d's rows: ", s); return r; }
    }
    for (int i = 1; i < P; i++) { /* peer me-i has this rank as its block i */
      int d = (me - i + P) % P;
      if (!c->srows[d]) continue;
      st_result r = c->comm->send(c->ep_group, (const char *)tokens + (size_t)c->soff[d] * rb, c->srows[d] * hidden, dt,
                                  d, tag, &c->pl_sreq[d], err);
      if (r != ST_OK) { r = pl_abort(c, r, err); st_error_prefix(err, "expert_parallel: posting the send of rows to EP rank %d: ", d); return r; }
    }
    for (int i = 1; i < P; i++) {
      int d = (me - i + P) % P;
      if (!c->srows[d]) continue;
      st_result r = c->comm->recv(c->ep_group, (char *)out + (size_t)c->soff[d] * rb, c->srows[d] * hidden, dt, d,
                                  tag + 1, &c->pl_breq[d], err);
      if (r != ST_OK) { r = pl_abort(c, r, err); st_error_prefix(err, "expert_parallel: posting the receive of rows coming back from EP rank %d: ", d); return r; }
    }
  }
  c->sec_rows += now_s() - t0;
  *n_recv = nr;
  *n_blocks = P;
  return ST_OK;
}

static st_result pl_check(ep_ctx *c, int i, const char *what, st_error *err) {
  if (!c->pl_active)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what, "%s(%d) without a dispatch_start in flight", what + 4, i);
  if (i < 0 || i >= c->ep)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what, "block %d out of range [0, %d)", i, c->ep);
  return ST_OK;
}

static st_result ep_wait_block(st_moe_exchange *x, int i, int64_t *first_row, int64_t *n_rows, st_error *err) {
  ep_ctx *c = (ep_ctx *)x;
  ST_CHECK(pl_check(c, i, "moe.wait_block", err));
  int s = (c->ep_rank + i) % c->ep;
  if (c->pl_rreq[s]) {
    double t0 = now_s();
    st_comm_request *req = c->pl_rreq[s];
    c->pl_rreq[s] = NULL;
    st_result r = c->comm->wait(req, err);
    c->sec_rows += now_s() - t0;
    if (r != ST_OK) { r = pl_abort(c, r, err); st_error_prefix(err, "expert_parallel: receiving the rows of EP rank %d: ", s); return r; }
  }
  c->pl_waited[i] = true;
  *first_row = c->roff[s];
  *n_rows = c->rrows[s];
  return ST_OK;
}

static st_result ep_return_block(st_moe_exchange *x, int i, const void *processed, st_error *err) {
  ep_ctx *c = (ep_ctx *)x;
  ST_CHECK(pl_check(c, i, "moe.return_block", err));
  if (!c->pl_waited[i])
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.return_block",
                        "return_block(%d) before wait_block(%d): its rows have not arrived yet", i, i);
  if (c->pl_returned[i])
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.return_block", "block %d was already returned", i);
  const st_host *h = c->host;
  const st_ops *o = h->ops;
  size_t rb = row_bytes(c);
  int s = (c->ep_rank + i) % c->ep;
  double t0 = now_s();
  c->pl_returned[i] = true;
  if (c->rrows[s]) {
    const char *src = (const char *)processed + (size_t)c->roff[s] * rb;
    if (s == c->ep_rank) { /* own block: home is here */
      ST_CHECK(o->copy(o, (char *)c->pl_out + (size_t)c->soff[s] * rb, h->device, src, h->device, (size_t)c->rrows[s] * rb));
    } else {
      st_result r = c->comm->send(c->ep_group, src, c->rrows[s] * c->pl_hidden, c->pl_dt, s, c->pl_tag + 1,
                                  &c->pl_bsreq[s], err);
      if (r != ST_OK) { r = pl_abort(c, r, err); st_error_prefix(err, "expert_parallel: sending processed rows back to EP rank %d: ", s); return r; }
    }
  }
  c->sec_rows += now_s() - t0;
  return ST_OK;
}

static st_result pl_combine(ep_ctx *c, const void *processed, void *out, st_error *err) {
  int P = c->ep;
  for (int i = 0; i < P; i++)
    if (!c->pl_waited[i])
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.combine",
                          "combine after dispatch_start before every block was waited for: block %d (from EP rank %d) "
                          "was not; call wait_block(%d) first", i, (c->ep_rank + i) % P, i);
  for (int i = 0; i < P; i++)
    if (!c->pl_returned[i]) ST_CHECK(ep_return_block((st_moe_exchange *)c, i, processed, err));
  double t0 = now_s();
  st_result res = ST_OK;
  /* in posting order (the order Gloo's worker completes them), so the first failure is reported */
  for (int k = 0; k < 3 && res == ST_OK; k++) {
    for (int i = 1; i < P && res == ST_OK; i++) {
      int p = (c->ep_rank - i + P) % P;
      st_comm_request **reqs[3] = {&c->pl_sreq[p], &c->pl_breq[p], &c->pl_bsreq[p]};
      if (!*reqs[k]) continue;
      st_comm_request *r = *reqs[k];
      *reqs[k] = NULL;
      res = c->comm->wait(r, err);
      if (res != ST_OK)
        st_error_prefix(err, "expert_parallel: %s EP rank %d: ",
                        k == 0 ? "sending rows to" : k == 1 ? "receiving processed rows back from"
                                                            : "sending processed rows back to", p);
    }
  }
  c->sec_rows += now_s() - t0;
  c->n_combine++;
  c->bytes_moved += (double)(c->last_n + c->last_nrecv) * (double)row_bytes(c);
  pl_drain(c, NULL); /* nothing left on success; on a failure, whatever is still outstanding */
  if (res != ST_OK) return res;
  if (out && out != c->pl_out && c->last_n) {
    const st_host *h = c->host;
    ST_CHECK(h->ops->copy(h->ops, out, h->device, c->pl_out, h->device, (size_t)c->last_n * row_bytes(c)));
  }
  return ST_OK;
}

static st_result ep_combine(st_moe_exchange *x, st_dtype dt, const void *processed, int64_t hidden, void *out,
                            st_error *err) {
  ep_ctx *c = (ep_ctx *)x;
  if (c->pl_active) {
    if (dt != c->pl_dt || hidden != c->pl_hidden)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.combine",
                          "combine with dtype %s and hidden %lld after a dispatch_start with %s and %lld",
                          st_dtype_name(dt), (long long)hidden, st_dtype_name(c->pl_dt), (long long)c->pl_hidden);
    return pl_combine(c, processed, out, err);
  }
  if (!c->have_dispatch)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.combine", "combine without a preceding dispatch");
  c->have_dispatch = false;
  c->n_combine++;
  return a2a(c, processed, c->rrows, out, c->srows, hidden, dt, "expert outputs", err);
}

static st_result ep_recv_capacity(st_moe_exchange *x, int64_t n_rows, int num_experts, int64_t *cap, st_error *err) {
  ep_ctx *c = (ep_ctx *)x;
  ST_CHECK(busy(c, "moe.recv_capacity", err));
  if (num_experts < 1 || num_experts % c->ep)
    return st_error_set(err, ST_ERR_CONFIG, "strategy.expert_parallel_size",
                        "%d experts cannot be split evenly over expert_parallel_size %d", num_experts, c->ep);
  if (n_rows < 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.recv_capacity", "negative row count %lld", (long long)n_rows);
  int64_t sum = n_rows, mx = n_rows;
  if (c->ep_group) {
    c->cap_rows[c->ep_rank] = n_rows;
    st_result r = c->comm->all_gather(c->ep_group, &n_rows, c->cap_rows, 1, ST_I64, NULL, err);
    if (r != ST_OK) return st_error_prefix(err, "expert_parallel: exchanging row counts for recv_capacity: ");
    sum = 0;
    mx = 0;
    for (int p = 0; p < c->ep; p++) {
      sum += c->cap_rows[p];
      if (c->cap_rows[p] > mx) mx = c->cap_rows[p];
    }
  }
  if (c->cap_factor > 0) {
    double want = c->cap_factor * (double)mx;
    int64_t lim = (int64_t)want; /* ceil without libm */
    if ((double)lim < want) lim++;
    if (lim < sum) sum = lim;
  }
  *cap = sum;
  return ST_OK;
}

/* ---- set-up ------------------------------------------------------------------------------- */

static void ep_finalize(void *vctx) {
  ep_ctx *c = vctx;
  if (!c) return;
  const st_host *h = c->host;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  if (c->n_dispatch && h->log) {
    h->log(h, ST_LOG_INFO,
           "expert_parallel: %lld dispatch (%lld of them pipelined) + %lld combine calls moved %.1f MiB (sent + "
           "received) in %.3f s of all-to-all-v / posting and waiting (%.1f MiB/s) + %.3f s exchanging counts",
           (long long)c->n_dispatch, (long long)c->n_pipelined, (long long)c->n_combine, c->bytes_moved / (1 << 20), c->sec_rows,
           c->sec_rows > 0 ? c->bytes_moved / (1 << 20) / c->sec_rows : 0.0, c->sec_counts);
  }
  if (c->pl_active) pl_drain(c, NULL); /* an exchange left in flight: free its requests before the group */
  if (c->inner && c->ictx) c->inner->finalize(c->ictx);
  if (c->prev_moe && h->moe(h) == &c->moe) {
    h->set_moe(h, c->prev_moe);
    if (c->host_has_ext) h->set_moe_ext(h, c->prev_moe_ext);
  }
  if (c->ep_group) c->comm->group_free(c->ep_group);
  if (c->edp_group) c->comm->group_free(c->edp_group);
  h->free(h, h->device, c->param_mem);
  h->free(h, h->device, c->grad_mem);
  h->free(h, h->device, c->master_mem);
  h->free(h, h->device, c->state_mem);
  h->free(h, cpu, c->ids_host);
  for (int u = 0; c->ureq && u < c->n_units; u++)
    if (c->ureq[u]) c->comm->wait(c->ureq[u], NULL);
  free(c->ureq);
  free(c->ugrad_off);
  free(c->ugrad_bytes);
  free(c->ulaunched);
  free(c->sub_units);
  free(c->sub_params);
  free(c->unit_first);
  free(c->slot);
  free(c->experts);
  free(c->windows);
  free(c->grad_windows);
  free(c->table);
  free(c->srows);
  free(c->rrows);
  free(c->scnt);
  free(c->sdsp);
  free(c->rcnt);
  free(c->rdsp);
  free(c->cap_rows);
  free(c->soff);
  free(c->roff);
  free(c->pl_waited);
  free(c->pl_returned);
  free(c->pl_rreq);
  free(c->pl_sreq);
  free(c->pl_breq);
  free(c->pl_bsreq);
  free(c);
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

static st_result fail(ep_ctx *c, st_result r) {
  ep_finalize(c);
  return r;
}

static st_result ep_init(const st_host *host, st_cfg *cfg, const st_strategy_setup *setup, void **out, st_error *err) {
  *out = NULL;
  const st_cfg_api *api = host->cfg;
  ep_ctx *c = calloc(1, sizeof *c);
  if (!c) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.expert_parallel", "cannot allocate the strategy state");
  c->host = host;
  c->setup = *setup;
  c->comm = host->comm;
  st_comm *world = setup->group ? setup->group : host->world;
  c->rank = 0;
  c->world = 1;
  if (c->comm && world) {
    c->rank = c->comm->rank(world);
    c->world = c->comm->size(world);
  }
  int64_t p = 1;
  if (cfg && api) {
    st_result r = ep_validate(cfg, api, err);
    if (r == ST_OK) r = api->get_int(cfg, "expert_parallel_size", 1, &p, err);
    if (r == ST_OK && api->type(cfg, "recv_capacity_factor") != ST_CFG_ABSENT)
      r = api->get_number(cfg, "recv_capacity_factor", 0.0, &c->cap_factor, err);
    if (r != ST_OK) return fail(c, r);
  }
  if (p > c->world || c->world % p)
    return fail(c, st_error_set(err, ST_ERR_CONFIG, "strategy.expert_parallel_size",
                                "the world size %d is not divisible by strategy.expert_parallel_size %lld: use a "
                                "divisor of %d", c->world, (long long)p, c->world));
  c->ep = (int)p;
  c->ep_rank = c->rank % c->ep;
  c->edp = c->world / c->ep;

  const st_model_desc *m = setup->model;
  c->n_units = m->n_units;
  for (int u = 0; u < m->n_units; u++) c->n_params += m->units[u].n_params;
  c->unit_first = calloc((size_t)m->n_units + 1, sizeof *c->unit_first);
  c->slot = calloc((size_t)c->n_params + 1, sizeof *c->slot);
  c->experts = calloc((size_t)c->n_params + 1, sizeof *c->experts);
  c->windows = calloc((size_t)c->n_params + 1, sizeof *c->windows);
  c->grad_windows = calloc((size_t)c->n_params + 1, sizeof *c->grad_windows);
  c->sub_units = calloc((size_t)m->n_units + 1, sizeof *c->sub_units);
  c->ugrad_off = calloc((size_t)m->n_units + 1, sizeof *c->ugrad_off);
  c->ugrad_bytes = calloc((size_t)m->n_units + 1, sizeof *c->ugrad_bytes);
  c->ureq = calloc((size_t)m->n_units + 1, sizeof *c->ureq);
  c->ulaunched = calloc((size_t)m->n_units + 1, sizeof *c->ulaunched);
  c->sub_params = calloc((size_t)c->n_params + 1, sizeof *c->sub_params);
  c->srows = calloc((size_t)c->ep, sizeof(int64_t));
  c->rrows = calloc((size_t)c->ep, sizeof(int64_t));
  c->scnt = calloc((size_t)c->ep, sizeof(int64_t));
  c->sdsp = calloc((size_t)c->ep, sizeof(int64_t));
  c->rcnt = calloc((size_t)c->ep, sizeof(int64_t));
  c->rdsp = calloc((size_t)c->ep, sizeof(int64_t));
  c->cap_rows = calloc((size_t)c->ep, sizeof(int64_t));
  c->soff = calloc((size_t)c->ep, sizeof(int64_t));
  c->roff = calloc((size_t)c->ep, sizeof(int64_t));
  c->pl_waited = calloc((size_t)c->ep, sizeof(bool));
  c->pl_returned = calloc((size_t)c->ep, sizeof(bool));
  c->pl_rreq = calloc((size_t)c->ep, sizeof(st_comm_request *));
  c->pl_sreq = calloc((size_t)c->ep, sizeof(st_comm_request *));
  c->pl_breq = calloc((size_t)c->ep, sizeof(st_comm_request *));
  c->pl_bsreq = calloc((size_t)c->ep, sizeof(st_comm_request *));
  if (!c->unit_first || !c->slot || !c->experts || !c->windows || !c->grad_windows || !c->sub_units || !c->sub_params ||
      !c->ugrad_off || !c->ugrad_bytes || !c->ureq || !c->ulaunched ||
      !c->srows || !c->rrows || !c->scnt || !c->sdsp || !c->rcnt || !c->rdsp || !c->cap_rows || !c->soff ||
      !c->roff || !c->pl_waited || !c->pl_returned || !c->pl_rreq || !c->pl_sreq || !c->pl_breq || !c->pl_bsreq)
    return fail(c, st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.expert_parallel", "parameter tables"));

  /* split the parameter set: experts here, the rest to the inner strategy */
  bool need_master = setup->param_dtype == ST_BF16 || setup->param_dtype == ST_F16;
  c->n_states = host->optim_state_count(host);
  size_t psz = st_dtype_size(setup->param_dtype), gsz = st_dtype_size(setup->grad_dtype);
  int i = 0, ns = 0;
  for (int u = 0; u < m->n_units; u++) {
    c->unit_first[u] = i;
    c->sub_units[u] = (st_unit_desc){.name = m->units[u].name, .n_params = 0, .params = &c->sub_params[ns]};
    c->ugrad_off[u] = c->grad_bytes; /* experts are laid out in descriptor order: a unit's are contiguous */
    for (int k = 0; k < m->units[u].n_params; k++, i++) {
      const st_param_desc *d = &m->units[u].params[k];
      if (!(d->flags & ST_PARAM_EXPERT)) {
        c->slot[i] = -1;
        c->sub_params[ns++] = *d;
        c->sub_units[u].n_params++;
        continue;
      }
      if (d->ndim < 1 || d->shape[0] % c->ep)
        return fail(c, st_error_set(err, ST_ERR_CONFIG, "strategy.expert_parallel_size",
                                    "%s has %lld experts, not divisible by strategy.expert_parallel_size %d: use an "
                                    "expert_parallel_size that divides %lld",
                                    d->name, (long long)(d->ndim ? d->shape[0] : 0), c->ep,
                                    (long long)(d->ndim ? d->shape[0] : 0)));
      ep_param *e = &c->experts[c->n_experts];
      c->slot[i] = c->n_experts++;
      e->desc = d;
      e->row = 1;
      for (int q = 1; q < d->ndim; q++) e->row *= d->shape[q];
      int64_t nl = d->shape[0] / c->ep;
      memcpy(e->local_shape, d->shape, sizeof e->local_shape);
      e->local_shape[0] = nl;
      e->local_numel = nl * e->row;
      e->global_offset = (int64_t)c->ep_rank * nl * e->row;
      e->trainable = (d->flags & ST_PARAM_TRAINABLE) != 0;
      e->param_off = c->param_bytes;
      c->param_bytes += align64((size_t)e->local_numel * psz);
      e->master_off = e->state_off = e->grad_off = SIZE_MAX;
      if (!e->trainable) continue;
      e->grad_off = c->grad_bytes;
      c->grad_bytes += align64((size_t)e->local_numel * gsz);
      if (need_master) {
        e->master_off = c->master_bytes;
        c->master_bytes += align64((size_t)e->local_numel * sizeof(float));
      }
      e->state_off = c->state_bytes;
      c->state_bytes += align64((size_t)e->local_numel * sizeof(float)) * (size_t)c->n_states;
    }
    c->ugrad_bytes[u] = c->grad_bytes - c->ugrad_off[u];
  }
  c->unit_first[m->n_units] = i;
  c->sub = *m;
  c->sub.units = c->sub_units;
  c->sub.n_params_total = 0;
  for (int j = 0; j < ns; j++) {
    int64_t n = 1;
    for (int q = 0; q < c->sub_params[j].ndim; q++) n *= c->sub_params[j].shape[q];
    c->sub.n_params_total += n;
  }

  /* groups: EP = consecutive ranks, EDP = strided ranks holding the same experts. split is
   * collective over the world, so every rank makes the same calls. */
  if (c->ep > 1) {
    st_result r = c->comm->split(world, c->rank / c->ep, c->ep_rank, &c->ep_group, err);
    if (r != ST_OK) return fail(c, st_error_prefix(err, "expert_parallel: creating the expert-parallel group: "));
  }
  if (c->edp > 1 && c->ep > 1) {
    st_result r = c->comm->split(world, c->ep_rank, c->rank / c->ep, &c->edp_group, err);
    if (r != ST_OK) return fail(c, st_error_prefix(err, "expert_parallel: creating the expert-data-parallel group: "));
    c->edp_comm = c->edp_group;
  } else if (c->edp > 1) {
    c->edp_comm = world; /* EP = 1: the EDP group is the world itself */
  }

  /* storage */
  st_device dev = host->device;
  c->param_mem = host->alloc(host, dev, c->param_bytes ? c->param_bytes : 64, "params");
  c->grad_mem = host->alloc(host, dev, c->grad_bytes ? c->grad_bytes : 64, "grads");
  c->master_mem = c->master_bytes ? host->alloc(host, dev, c->master_bytes, "master") : NULL;
  c->state_mem = c->state_bytes ? host->alloc(host, dev, c->state_bytes, "optim") : NULL;
  if (!c->param_mem || !c->grad_mem || (c->master_bytes && !c->master_mem) || (c->state_bytes && !c->state_mem))
    return fail(c, st_error_set(err, ST_ERR_OUT_OF_MEMORY, "strategy.expert_parallel",
                                "cannot allocate %.2f GiB for this rank's experts; raise expert_parallel_size",
                                (double)(c->param_bytes + c->grad_bytes + c->master_bytes + c->state_bytes) /
                                    (1 << 30)));
  const st_ops *ops = host->ops;
  st_result r = ops->fill(ops, ST_U8, c->grad_mem, (int64_t)(c->grad_bytes ? c->grad_bytes : 64), 0.0);
  if (r == ST_OK && c->state_mem) r = ops->fill(ops, ST_U8, c->state_mem, (int64_t)c->state_bytes, 0.0);
  if (r == ST_OK) r = ops->fill(ops, ST_U8, c->param_mem, (int64_t)(c->param_bytes ? c->param_bytes : 64), 0.0);
  if (r != ST_OK) return fail(c, st_error_set(err, r, "strategy.expert_parallel", "cannot clear the expert buffers"));

  /* the inner dense strategy over the whole world, with the non-expert parameters */
  st_cfg *dense = NULL;
  const char *ref = "ddp";
  if (cfg && api) {
    r = api->get_object(cfg, "dense", true, &dense, err);
    if (r == ST_OK && api->type(dense, "plugin") != ST_CFG_ABSENT) r = api->get_string(dense, "plugin", NULL, &ref, err);
    else if (r == ST_OK) r = api->get_string(dense, "name", "ddp", &ref, err);
    if (r != ST_OK) return fail(c, r);
  }
  r = host->load_strategy(host, ref, &c->inner, err);
  if (r != ST_OK) return fail(c, st_error_prefix(err, "strategy.dense: loading \"%s\": ", ref));
  if (dense && c->inner->validate) {
    r = c->inner->validate(dense, api, err);
    if (r != ST_OK) return fail(c, st_error_prefix(err, "strategy.dense (%s): ", ref));
  }
  st_strategy_setup is = *setup;
  is.model = &c->sub;
  is.group = world;
  r = c->inner->init(host, dense, &is, &c->ictx, err);
  if (r != ST_OK) {
    c->ictx = NULL;
    return fail(c, st_error_prefix(err, "strategy.dense (%s): ", ref));
  }

  for (int j = 0; j < c->n_params; j++) {
    if (c->slot[j] < 0) continue;
    ep_param *e = &c->experts[c->slot[j]];
    c->windows[j] = st_tensor_make(c->param_mem + e->param_off, setup->param_dtype, dev, e->desc->ndim, e->local_shape);
    c->grad_windows[j] = st_tensor_make(e->trainable ? c->grad_mem + e->grad_off : NULL, setup->grad_dtype, dev,
                                        e->desc->ndim, e->local_shape);
  }

  c->moe = (st_moe_api){.self = (st_moe_exchange *)c, .num_local_experts = ep_num_local,
                        .first_local_expert = ep_first_local, .dispatch = ep_dispatch, .combine = ep_combine};
  c->moe_ext = (st_moe_ext){.struct_size = sizeof(st_moe_ext), .recv_capacity = ep_recv_capacity,
                            .dispatch_start = ep_dispatch_start, .wait_block = ep_wait_block,
                            .return_block = ep_return_block};
  c->host_has_ext = host->struct_size >= offsetof(st_host, set_moe_ext) + sizeof host->set_moe_ext;
  c->prev_moe = host->moe(host);
  c->prev_moe_ext = c->host_has_ext ? host->moe_ext(host) : NULL;
  host->set_moe(host, &c->moe);
  if (c->host_has_ext) host->set_moe_ext(host, &c->moe_ext);
  if (host->log)
    host->log(host, ST_LOG_INFO,
              "expert_parallel: rank %d of %d, expert-parallel size %d (EP rank %d, group of ranks %d..%d), "
              "expert-data-parallel size %d, %d expert tensor(s) (%.1f MiB here), dense parameters via \"%s\"",
              c->rank, c->world, c->ep, c->ep_rank, (c->rank / c->ep) * c->ep, (c->rank / c->ep) * c->ep + c->ep - 1,
              c->edp, c->n_experts, (double)c->param_bytes / (1 << 20), ref);
  *out = c;
  return ST_OK;
}

/* ---- windows ------------------------------------------------------------------------------ */

static st_result check_unit(ep_ctx *c, int unit, st_error *err) {
  if (unit < 0 || unit >= c->n_units)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "strategy.expert_parallel", "unit %d out of range [0, %d)", unit,
                        c->n_units);
  return ST_OK;
}

/* merge the inner window of unit u with this rank's expert windows, in descriptor order */
static void merge(ep_ctx *c, int unit, const st_tensor *inner, st_tensor *dst, const st_tensor *mine) {
  int k = 0;
  for (int j = c->unit_first[unit]; j < c->unit_first[unit + 1]; j++) {
    if (c->slot[j] < 0) dst[j] = inner[k++];
    else dst[j] = mine[j];
  }
}

static st_result ep_pre_forward(void *vctx, int unit, const st_tensor **params, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  const st_tensor *ip = NULL;
  ST_CHECK(c->inner->pre_forward(c->ictx, unit, &ip, err));
  merge(c, unit, ip, c->windows, c->windows);
  *params = &c->windows[c->unit_first[unit]];
  return ST_OK;
}

static st_result ep_post_forward(void *vctx, int unit, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  return c->inner->post_forward(c->ictx, unit, err);
}

static st_result ep_pre_backward(void *vctx, int unit, const st_tensor **params, st_tensor **grads, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  const st_tensor *ip = NULL;
  st_tensor *ig = NULL;
  ST_CHECK(c->inner->pre_backward(c->ictx, unit, &ip, &ig, err));
  merge(c, unit, ip, c->windows, c->windows);
  merge(c, unit, ig, c->grad_windows, c->grad_windows);
  *params = &c->windows[c->unit_first[unit]];
  *grads = &c->grad_windows[c->unit_first[unit]];
  return ST_OK;
}

/* sum unit u's expert gradients over the EDP group, asynchronously (waited in reduce_experts) */
static st_result launch_unit(ep_ctx *c, int u, st_error *err) {
  c->ulaunched[u] = true;
  if (!c->edp_comm || !c->ugrad_bytes[u]) return ST_OK;
  st_dtype gdt = c->setup.grad_dtype;
  void *g = c->grad_mem + c->ugrad_off[u];
  st_result r = c->comm->all_reduce(c->edp_comm, g, g, (int64_t)(c->ugrad_bytes[u] / st_dtype_size(gdt)), gdt,
                                    ST_REDUCE_SUM, &c->ureq[u], err);
  if (r != ST_OK)
    return st_error_prefix(err, "expert_parallel: all-reduce of the expert gradients of unit %d over the "
                           "expert-data-parallel group: ", u);
  return ST_OK;
}

static st_result ep_post_backward(void *vctx, int unit, bool last, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(check_unit(c, unit, err));
  ST_CHECK(c->inner->post_backward(c->ictx, unit, last, err));
  if (!last || c->ulaunched[unit]) return ST_OK; /* accumulation micro-steps stay local */
  return launch_unit(c, unit, err);
}

/* expert gradients: sum over the EDP group (launched per unit during backward; any unit that never
 * reported is launched here, in unit order, so every rank issues the same collectives), then divide
 * by the world size (the full data-parallel degree) */
static st_result reduce_experts(ep_ctx *c, st_error *err) {
  if (c->reduced) return ST_OK;
  for (int u = c->n_units - 1; u >= 0; u--)
    if (!c->ulaunched[u]) ST_CHECK(launch_unit(c, u, err));
  for (int u = c->n_units - 1; u >= 0; u--) {
    if (!c->ureq[u]) continue;
    st_comm_request *req = c->ureq[u];
    c->ureq[u] = NULL;
    st_result r = c->comm->wait(req, err);
    if (r != ST_OK) return st_error_prefix(err, "expert_parallel: waiting for an expert-gradient all-reduce: ");
  }
  int64_t n = (int64_t)(c->grad_bytes / st_dtype_size(c->setup.grad_dtype));
  if (n && c->world > 1) ST_CHECK(c->host->ops->scale(c->host->ops, c->setup.grad_dtype, c->grad_mem, n, 1.0 / c->world));
  c->reduced = true;
  return ST_OK;
}

static st_result ep_grad_norm_sq(void *vctx, double *out, st_error *err) {
  ep_ctx *c = vctx;
  double inner = 0.0, mine = 0.0;
  ST_CHECK(c->inner->grad_norm_sq(c->ictx, &inner, err));
  ST_CHECK(reduce_experts(c, err));
  int64_t n = (int64_t)(c->grad_bytes / st_dtype_size(c->setup.grad_dtype));
  if (n) {
    st_result r = c->host->ops->sumsq(c->host->ops, c->setup.grad_dtype, c->grad_mem, n, &mine);
    if (r != ST_OK) return st_error_set(err, r, "strategy.expert_parallel", "expert gradient norm failed");
  }
  if (c->ep_group) {
    st_result r = c->comm->all_reduce(c->ep_group, &mine, &mine, 1, ST_F64, ST_REDUCE_SUM, NULL, err);
    if (r != ST_OK) return st_error_prefix(err, "expert_parallel: summing the expert gradient norm: ");
  }
  *out = inner + mine;
  return ST_OK;
}

static float *state_ptr(ep_ctx *c, ep_param *e, int k) {
  return (float *)(c->state_mem + e->state_off + (size_t)k * align64((size_t)e->local_numel * sizeof(float)));
}

static st_result zero_grads(ep_ctx *c) {
  c->reduced = false;
  for (int u = 0; u < c->n_units; u++) c->ulaunched[u] = false;
  const st_ops *ops = c->host->ops;
  return c->grad_bytes ? ops->fill(ops, ST_U8, c->grad_mem, (int64_t)c->grad_bytes, 0.0) : ST_OK;
}

static st_result ep_step(void *vctx, const st_step_args *a, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(c->inner->step(c->ictx, a, err));
  ST_CHECK(reduce_experts(c, err));
  const st_host *h = c->host;
  for (int j = 0; j < c->n_experts; j++) {
    ep_param *e = &c->experts[j];
    if (!e->trainable) continue;
    st_optim_desc d = {
        .n = e->local_numel,
        .param = c->param_mem + e->param_off,
        .param_dtype = c->setup.param_dtype,
        .master = e->master_off != SIZE_MAX ? (float *)(c->master_mem + e->master_off) : NULL,
        .grad = c->grad_mem + e->grad_off,
        .grad_dtype = c->setup.grad_dtype,
        .exp_avg = c->n_states > 0 ? state_ptr(c, e, 0) : NULL,
        .exp_avg_sq = c->n_states > 1 ? state_ptr(c, e, 1) : NULL,
        .lr = a->lr,
        .weight_decay = (e->desc->flags & ST_PARAM_NO_DECAY) ? 0.0 : 1.0,
        .step = a->step,
        .grad_scale = a->grad_scale,
    };
    st_result r = h->optim_update(h, h->device, &d, err);
    if (r != ST_OK)
      return st_error_prefix(err, "%s (experts from %lld): ", e->desc->name,
                             (long long)(e->global_offset / (e->row ? e->row : 1)));
  }
  return zero_grads(c);
}

static st_result ep_skip_step(void *vctx, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(c->inner->skip_step(c->ictx, err));
  ST_CHECK(reduce_experts(c, err)); /* every rank completes the collectives the others make */
  return zero_grads(c);
}

/* ---- checkpoints -------------------------------------------------------------------------- */

static st_dtype io_dtype(const ep_ctx *c) { return c->setup.param_dtype == ST_F64 ? ST_F64 : ST_F32; }

static st_result ep_state_save(void *vctx, st_state_writer *w, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(c->inner->state_save(c->ictx, w, err));
  if (c->rank / c->ep != 0) return ST_OK; /* EDP rank 0 writes each expert slice once */
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_experts && r == ST_OK; j++) {
    ep_param *e = &c->experts[j];
    if (!e->trainable) continue;
    size_t bytes = (size_t)e->local_numel * st_dtype_size(io);
    void *buf = h->alloc(h, cpu, bytes ? bytes : 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, e->desc->name, "no host memory to stage a checkpoint");
    if (e->master_off != SIZE_MAX) r = ops->copy(ops, buf, cpu, c->master_mem + e->master_off, h->device, bytes);
    else r = ops->cast(ops, c->setup.param_dtype, c->param_mem + e->param_off, io, buf, e->local_numel);
    if (r == ST_OK) r = w->write(w, e->desc, ST_STATE_PARAM, e->global_offset, e->local_numel, io, buf, err);
    for (int k = 0; k < c->n_states && r == ST_OK; k++) {
      r = ops->copy(ops, buf, cpu, state_ptr(c, e, k), h->device, (size_t)e->local_numel * sizeof(float));
      if (r == ST_OK)
        r = w->write(w, e->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), e->global_offset, e->local_numel, ST_F32, buf,
                     err);
    }
    h->free(h, cpu, buf);
  }
  return r;
}

static st_result ep_state_load(void *vctx, st_state_reader *rd, st_error *err) {
  ep_ctx *c = vctx;
  ST_CHECK(c->inner->state_load(c->ictx, rd, err));
  const st_host *h = c->host;
  const st_ops *ops = h->ops;
  const st_device cpu = {ST_DEVICE_CPU, 0};
  st_dtype io = io_dtype(c);
  st_result r = ST_OK;
  for (int j = 0; j < c->n_experts && r == ST_OK; j++) {
    ep_param *e = &c->experts[j];
    size_t bytes = (size_t)e->local_numel * st_dtype_size(io);
    void *buf = h->alloc(h, cpu, bytes ? bytes : 8, "checkpoint");
    if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, e->desc->name, "no host memory to stage a checkpoint");
    r = rd->read(rd, e->desc, ST_STATE_PARAM, e->global_offset, e->local_numel, io, buf, err);
    if (r != ST_OK) r = read_failed(err, r, EP_NAME, e->desc, ST_STATE_PARAM, e->global_offset, e->local_numel);
    if (r == ST_OK && e->master_off != SIZE_MAX)
      r = ops->copy(ops, c->master_mem + e->master_off, h->device, buf, cpu, bytes);
    if (r == ST_OK) r = ops->cast(ops, io, buf, c->setup.param_dtype, c->param_mem + e->param_off, e->local_numel);
    for (int k = 0; k < c->n_states && r == ST_OK && e->trainable; k++) {
      float *dst = state_ptr(c, e, k);
      r = rd->read(rd, e->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), e->global_offset, e->local_numel, ST_F32, buf,
                   err);
      if (r == ST_ERR_NOT_FOUND) {
        st_error_clear(err);
        r = ops->fill(ops, ST_F32, dst, e->local_numel, 0.0);
      } else if (r == ST_OK) {
        r = ops->copy(ops, dst, h->device, buf, cpu, (size_t)e->local_numel * sizeof(float));
      } else {
        r = read_failed(err, r, EP_NAME, e->desc, (st_state_kind)(ST_STATE_OPTIM_0 + k), e->global_offset,
                        e->local_numel);
      }
    }
    h->free(h, cpu, buf);
  }
  return r;
}

static st_result ep_memory_plan(void *vctx, st_memory_plan *out) {
  ep_ctx *c = vctx;
  st_memory_plan in = {0};
  if (c->inner->memory_plan) c->inner->memory_plan(c->ictx, &in);
  *out = (st_memory_plan){.category = {"params", "grads", "master", "optim", "buffers", "comm"}};
  uint64_t mine[ST_MEMORY_CATEGORIES] = {c->param_bytes, c->grad_bytes, c->master_bytes, c->state_bytes, 0, 0};
  for (int i = 0; i < ST_MEMORY_CATEGORIES; i++) {
    out->device_bytes[i] = in.device_bytes[i] + mine[i];
    out->host_bytes[i] = in.host_bytes[i];
  }
  return ST_OK;
}

ST_EXPORT const st_strategy_plugin_v1 strata_strategy_plugin_v1 = {
    .header = ST_PLUGIN_HEADER("strategy", EP_NAME, ST_VERSION_STRING, st_strategy_plugin_v1),
    .validate = ep_validate,
    .init = ep_init,
    .finalize = ep_finalize,
    .pre_forward = ep_pre_forward,
    .post_forward = ep_post_forward,
    .pre_backward = ep_pre_backward,
    .post_backward = ep_post_backward,
    .grad_norm_sq = ep_grad_norm_sq,
    .step = ep_step,
    .skip_step = ep_skip_step,
    .state_save = ep_state_save,
    .state_load = ep_state_load,
    .memory_plan = ep_memory_plan,
};
