/* host.c — the st_host table: memory with accounting, logging, optimizer, composition, MoE. */
#include <stdlib.h>

#include "host_impl.h"

#define ST_ALLOC_ALIGN 64

typedef struct alloc_header { /* sits in the 64 bytes before every CPU block */
  size_t bytes;
  uint32_t magic;
} alloc_header;
#define ALLOC_MAGIC 0x5354414cu

typedef struct host_state {
  st_host pub;
  st_host_options opt;
  const st_optimizer_settings *optimizer; /* the caller's, read at every update ("auto" resolves late) */
  uint64_t live[2], peak[2];
  const st_moe_api *moe;
  const st_moe_ext *moe_ext;
  st_moe_api local_moe;
  st_moe_ext local_moe_ext;
  int64_t moe_rows; /* rows of the last local dispatch, for combine */
  /* the local pipelined exchange: one block (this rank's own) */
  bool moe_pl_active, moe_pl_waited, moe_pl_returned;
  void *moe_pl_out;
  st_dtype moe_pl_dt;
  int64_t moe_pl_hidden;
} host_state;

static host_state *state_of(const st_host *h) { return (host_state *)h->core; }

static void account(host_state *s, st_device_type t, int64_t delta) {
  int i = t == ST_DEVICE_CPU ? 0 : 1;
  s->live[i] = (uint64_t)((int64_t)s->live[i] + delta);
  if (s->live[i] > s->peak[i]) s->peak[i] = s->live[i];
}

static void *host_alloc(const st_host *h, st_device dev, size_t bytes, const char *category) {
  (void)category;
  if (dev.type != ST_DEVICE_CPU) return NULL; /* device memory arrives with the CUDA backend */
  size_t total = ST_ALLOC_ALIGN + ((bytes + ST_ALLOC_ALIGN - 1) / ST_ALLOC_ALIGN) * ST_ALLOC_ALIGN;
  char *raw = aligned_alloc(ST_ALLOC_ALIGN, total);
  if (!raw) return NULL;
  alloc_header *hdr = (alloc_header *)raw;
  hdr->bytes = bytes;
  hdr->magic = ALLOC_MAGIC;
  account(state_of(h), dev.type, (int64_t)bytes);
  return raw + ST_ALLOC_ALIGN;
}

static void *host_alloc_pinned(const st_host *h, size_t bytes, const char *category) {
  /* page-locked memory only matters for device transfers; the CPU build has none */
  return host_alloc(h, (st_device){ST_DEVICE_CPU, 0}, bytes, category);
}

static void host_free(const st_host *h, st_device dev, void *ptr) {
  if (!ptr || dev.type != ST_DEVICE_CPU) return;
  char *raw = (char *)ptr - ST_ALLOC_ALIGN;
  alloc_header *hdr = (alloc_header *)raw;
  if (hdr->magic != ALLOC_MAGIC) return; /* not ours: leak rather than corrupt the heap */
  hdr->magic = 0;
  account(state_of(h), dev.type, -(int64_t)hdr->bytes);
  free(raw);
}

static void host_log(const st_host *h, st_log_level level, const char *fmt, ...) {
  host_state *s = state_of(h);
  if (!s->opt.log_sink) return;
  char line[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  s->opt.log_sink(s->opt.log_user, level, line);
}

static st_result host_optim_update(const st_host *h, st_device dev, st_optim_desc *d, st_error *err) {
  host_state *s = state_of(h);
  const st_ops *ops = dev.type == h->device.type ? h->ops : h->cpu_ops;
  if (!ops || !ops->optim_update)
    return st_error_set(err, ST_ERR_UNSUPPORTED, "optimizer", "no optimizer kernel for this device");
  const st_optimizer_settings *o = s->optimizer;
  d->type = o->type;
  d->beta1 = o->beta1;
  d->beta2 = o->beta2;
  d->eps = o->eps;
  d->momentum = o->momentum;
  d->adam_w_mode = o->adam_w_mode;
  d->weight_decay *= o->weight_decay;
  st_result r = ops->optim_update(ops, d);
  if (r != ST_OK) return st_error_set(err, r, "optimizer", "%s update of %lld elements failed: %s",
                                      o->type == ST_OPTIM_SGD ? "SGD" : "Adam", (long long)d->n, st_result_string(r));
  return ST_OK;
}

static int host_optim_state_count(const st_host *h) {
  const st_optimizer_settings *o = state_of(h)->optimizer;
  if (o->type == ST_OPTIM_SGD) return o->momentum != 0.0 ? 1 : 0;
  return 2;
}

static st_result host_load_strategy(const st_host *h, const char *name_or_path, const st_strategy_plugin_v1 **out,
                                    st_error *err) {
  host_state *s = state_of(h);
  if (!s->opt.load_strategy)
    return st_error_set(err, ST_ERR_UNSUPPORTED, name_or_path, "this host cannot load strategy plugins");
  return s->opt.load_strategy(s->opt.load_strategy_user, name_or_path, out, err);
}

/* ---- the local MoE exchange: every expert lives here, so dispatch and combine are copies of
 * rows that the model already sorted by expert ---- */
static int local_num_experts(st_moe_exchange *x, int num_experts) { (void)x; return num_experts; }
static int local_first_expert(st_moe_exchange *x, int num_experts) { (void)x; (void)num_experts; return 0; }

static st_result local_dispatch(st_moe_exchange *x, st_dtype dt, const void *tokens, const int32_t *expert_ids,
                                int64_t n, int64_t hidden, int num_experts, void *recv, int32_t *recv_expert,
                                int64_t recv_cap, int64_t *n_recv, st_error *err) {
  (void)num_experts;
  host_state *s = (host_state *)x;
  if (s->moe_pl_active)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.dispatch",
                        "a pipelined exchange (dispatch_start) is still in flight: wait for its block and call combine "
                        "before moe.dispatch");
  if (n > recv_cap)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.dispatch", "%lld rows do not fit a receive buffer of %lld",
                        (long long)n, (long long)recv_cap);
  const st_ops *ops = s->pub.ops;
  ST_CHECK(ops->copy(ops, recv, s->pub.device, tokens, s->pub.device, (size_t)(n * hidden) * st_dtype_size(dt)));
  ST_CHECK(ops->copy(ops, recv_expert, s->pub.device, expert_ids, s->pub.device, (size_t)n * sizeof(int32_t)));
  *n_recv = n;
  s->moe_rows = n;
  return ST_OK;
}

static st_result local_return_block(st_moe_exchange *x, int i, const void *processed, st_error *err);

static st_result local_combine(st_moe_exchange *x, st_dtype dt, const void *processed, int64_t hidden, void *out,
                               st_error *err) {
  host_state *s = (host_state *)x;
  const st_ops *ops = s->pub.ops;
  if (s->moe_pl_active) { /* after dispatch_start: return what is left; the rows land in its `out` */
    if (!s->moe_pl_waited)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.combine",
                          "combine after dispatch_start before every block was waited for: block 0 was not; call "
                          "wait_block(0) first");
    if (!s->moe_pl_returned) ST_CHECK(local_return_block(x, 0, processed, err));
    s->moe_pl_active = false;
    if (out && out != s->moe_pl_out && s->moe_rows)
      return ops->copy(ops, out, s->pub.device, s->moe_pl_out, s->pub.device,
                       (size_t)(s->moe_rows * hidden) * st_dtype_size(dt));
    return ST_OK;
  }
  return ops->copy(ops, out, s->pub.device, processed, s->pub.device, (size_t)(s->moe_rows * hidden) * st_dtype_size(dt));
}

static st_result local_recv_capacity(st_moe_exchange *x, int64_t n_rows, int num_experts, int64_t *cap,
                                     st_error *err) {
  (void)x;
  (void)num_experts;
  if (n_rows < 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.recv_capacity", "negative row count %lld", (long long)n_rows);
  *cap = n_rows;
  return ST_OK;
}

/* the pipelined form: dispatch_start copies the rows at once, block 0 is all of them */
static st_result local_dispatch_start(st_moe_exchange *x, st_dtype dt, const void *tokens, const int32_t *expert_ids,
                                      int64_t n, int64_t hidden, int num_experts, void *recv, int32_t *recv_expert,
                                      int64_t recv_cap, void *out, int64_t *n_recv, int *n_blocks, st_error *err) {
  host_state *s = (host_state *)x;
  if (s->moe_pl_active)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.dispatch_start",
                        "dispatch_start while the previous pipelined exchange is still in flight: call combine first");
  ST_CHECK(local_dispatch(x, dt, tokens, expert_ids, n, hidden, num_experts, recv, recv_expert, recv_cap, n_recv, err));
  s->moe_pl_active = true;
  s->moe_pl_waited = s->moe_pl_returned = false;
  s->moe_pl_out = out;
  s->moe_pl_dt = dt;
  s->moe_pl_hidden = hidden;
  *n_blocks = 1;
  return ST_OK;
}

static st_result local_block_check(host_state *s, int i, const char *what, st_error *err) {
  if (!s->moe_pl_active)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what, "%s(%d) without a dispatch_start in flight", what + 4, i);
  if (i != 0) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, what, "block %d out of range [0, 1)", i);
  return ST_OK;
}

static st_result local_wait_block(st_moe_exchange *x, int i, int64_t *first_row, int64_t *n_rows, st_error *err) {
  host_state *s = (host_state *)x;
  ST_CHECK(local_block_check(s, i, "moe.wait_block", err));
  s->moe_pl_waited = true;
  *first_row = 0;
  *n_rows = s->moe_rows;
  return ST_OK;
}

static st_result local_return_block(st_moe_exchange *x, int i, const void *processed, st_error *err) {
  host_state *s = (host_state *)x;
  ST_CHECK(local_block_check(s, i, "moe.return_block", err));
  if (!s->moe_pl_waited)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.return_block", "return_block(0) before wait_block(0)");
  if (s->moe_pl_returned)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "moe.return_block", "block 0 was already returned");
  const st_ops *ops = s->pub.ops;
  ST_CHECK(ops->copy(ops, s->moe_pl_out, s->pub.device, processed, s->pub.device,
                     (size_t)(s->moe_rows * s->moe_pl_hidden) * st_dtype_size(s->moe_pl_dt)));
  s->moe_pl_returned = true;
  return ST_OK;
}

static const st_moe_api *host_moe(const st_host *h) { return state_of(h)->moe; }
static void host_set_moe(const st_host *h, const st_moe_api *api) {
  state_of(h)->moe = api;
  state_of(h)->moe_ext = NULL; /* the installer adds its own with set_moe_ext */
}
static const st_moe_ext *host_moe_ext(const st_host *h) { return state_of(h)->moe_ext; }
static void host_set_moe_ext(const st_host *h, const st_moe_ext *ext) { state_of(h)->moe_ext = ext; }

st_result st_host_create(const st_host_options *opt, st_host **out, st_error *err) {
  *out = NULL;
  if (!opt || !opt->ops)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "host", "st_host_create needs an ops table");
  host_state *s = calloc(1, sizeof *s);
  if (!s) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "host", "cannot allocate the host table");
  s->opt = *opt;
  static const st_optimizer_settings adamw_defaults = {.type = ST_OPTIM_ADAMW, .lr = 1e-3, .beta1 = 0.9,
                                                        .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01,
                                                        .adam_w_mode = true}; /* torch.optim.AdamW */
  s->optimizer = opt->optimizer ? opt->optimizer : &adamw_defaults;
  st_host *h = &s->pub;
  h->abi_version = ST_ABI_VERSION;
  h->struct_size = sizeof *h;
  h->ops = opt->ops;
  h->cpu_ops = opt->cpu_ops ? opt->cpu_ops : opt->ops;
  h->device = opt->ops->device;
  h->alloc = host_alloc;
  h->alloc_pinned = host_alloc_pinned;
  h->free = host_free;
  h->log = host_log;
  h->cfg = opt->cfg;
  h->rng = st_rng();
  h->comm = opt->comm;
  h->world = opt->world;
  h->rank = opt->rank;
  h->world_size = opt->world_size > 0 ? opt->world_size : 1;
  h->local_rank = opt->local_rank;
  h->local_world_size = opt->local_world_size > 0 ? opt->local_world_size : 1;
  h->optim_update = host_optim_update;
  h->optim_state_count = host_optim_state_count;
  h->load_strategy = host_load_strategy;
  h->moe = host_moe;
  h->set_moe = host_set_moe;
  h->moe_ext = host_moe_ext;
  h->set_moe_ext = host_set_moe_ext;
  h->core = s;
  s->local_moe = (st_moe_api){.self = (st_moe_exchange *)s, .num_local_experts = local_num_experts,
                              .first_local_expert = local_first_expert, .dispatch = local_dispatch,
                              .combine = local_combine};
  s->local_moe_ext = (st_moe_ext){.struct_size = sizeof(st_moe_ext), .recv_capacity = local_recv_capacity,
                                  .dispatch_start = local_dispatch_start, .wait_block = local_wait_block,
                                  .return_block = local_return_block};
  s->moe = &s->local_moe;
  s->moe_ext = &s->local_moe_ext;
  *out = h;
  return ST_OK;
}

void st_host_destroy(st_host *h) {
  if (!h) return;
  free(state_of(h));
}

uint64_t st_host_peak_bytes(const st_host *h, st_device_type t) { return state_of(h)->peak[t == ST_DEVICE_CPU ? 0 : 1]; }
uint64_t st_host_live_bytes(const st_host *h, st_device_type t) { return state_of(h)->live[t == ST_DEVICE_CPU ? 0 : 1]; }
