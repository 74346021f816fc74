/* test_strategies.c — the ddp and fsdp strategy plugins against the built-in local strategy.
 *
 * Ranks are threads of this process talking through thread_comm (a fake st_comm_plugin_v1), so the
 * strategies are tested without a network backend. Each rank loads the plugin the way production
 * does (st_plugin_load by name from the build tree), gets its own host table, and is driven
 * exactly like runtime/trainer.c drives a strategy: per micro-step pre_forward/post_forward over
 * the units in order, then pre_backward/post_backward in reverse (last_micro_step on the last
 * one), then grad_norm_sq, clipping, step.
 *
 * The "model" is a synthetic parameter set whose gradients the test computes itself: sample s
 * contributes loss_s = sum_i (c_si w_i^2 / 2 + d_si w_i), so dloss/dw_i = c_si w_i + d_si with
 * c, d hashed from (step, micro-step, sample, parameter, element). The gradient depends on the
 * parameter values the window shows, so a wrong gather shows up at once; frozen parameters are
 * checked against their initial values in every window. Each global micro-batch has G samples;
 * rank r of N takes samples [r G/N, (r+1) G/N) and averages over them, like the trainer's loss.
 *
 * Tolerances. Every strategy runs the same fp32 optimizer kernel on the same elements; the only
 * difference is the order in which per-sample gradients are summed (G at once on one rank, G/N
 * per rank then averaged by the collective, per micro-step or accumulated), i.e. a few fp32
 * roundings of each gradient (relative 1e-7). AdamW turns a relative gradient error e into an
 * update error of about lr * e, and clipping rescales by a coefficient computed from norms with
 * the same relative error, so after 5 steps at lr 1e-2 parameters of magnitude ~1 agree to a few
 * ulps: we allow 2e-6 absolute + 1e-5 relative. A missing average, a dropped micro-step or a
 * stale gather changes updates by O(lr) = 1e-2 and the grad norm by O(1), far outside. Because
 * Adam is nearly invariant to a constant gradient scale, grad norms are compared too (1e-5
 * relative) and one run uses SGD with momentum, which is not.
 *
 *   test_strategies          ranks as threads (suite 'distributed', test 'strategies')
 *   test_strategies gloo     the same runs as forked processes over the Gloo backend, plus a rank
 *                            SIGKILLed mid-step: the survivors must fail naming the collective
 *   test_strategies bench [FMAs per element]   step time and memory, local vs ddp/fsdp on 2 ranks
 *                            over Gloo, with and without overlap (not a test; prints a table) */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "cpu_ops.h"
#include "host_impl.h"
#include "local_strategy.h"
#include "plugin.h"
#include "st_test.h"
#include "store.h"
#include "thread_comm.h"

/* ---- the synthetic parameter set --------------------------------------------------------- */

#define T ST_PARAM_TRAINABLE
#define ND ST_PARAM_NO_DECAY
static const st_param_desc embed_params[] = {
    {"embed.weight", 2, {7, 5}, T},
    {"embed.bias", 1, {3}, T | ND},
};
static const st_param_desc block0_params[] = {
    {"block.0.weight", 2, {11, 3}, T},
    {"block.0.frozen", 2, {6, 2}, 0},
    {"block.0.norm", 1, {5}, T | ND},
};
static const st_param_desc block1_params[] = {
    {"block.1.weight", 2, {20, 9}, T},
    {"block.1.bias", 1, {1}, T | ND},
};
static const st_param_desc final_params[] = {
    {"final.frozen", 1, {10}, 0},
};
static const st_unit_desc units[] = {
    {"embed", 2, embed_params},
    {"block.0", 3, block0_params},
    {"block.1", 2, block1_params},
    {"final", 1, final_params},
};
#define N_UNITS 4
static const st_model_desc model = {.n_units = N_UNITS, .units = units, .compute_dtype = ST_F32, .hidden_size = 8,
                                    .n_params_total = 35 + 3 + 33 + 12 + 5 + 180 + 1 + 10};
#define G 12 /* samples per global micro-batch: divisible by 1, 2, 3 and 4 ranks */

/* what the ranks train: the test model above, or the benchmark's larger one */
static const st_model_desc *cur = &model;
static int g_samples = G;
static int identity_order[64] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

static uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
static uint64_t name_hash(const char *s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s; s++) h = (h ^ (uint8_t)*s) * 1099511628211ull;
  return h;
}
static double u01(uint64_t a, uint64_t b, uint64_t c, uint64_t d) {
  return (double)(mix(mix(mix(mix(a) ^ b) ^ c) ^ d) >> 11) / 9007199254740992.0;
}
static double init_value(const st_param_desc *p, int64_t i) { return u01(name_hash(p->name), (uint64_t)i, 7, 7) - 0.5; }

static int64_t numel(const st_param_desc *p) {
  int64_t n = 1;
  for (int d = 0; d < p->ndim; d++) n *= p->shape[d];
  return n;
}

/* ---- an in-memory state store: full tensors keyed by (param, kind), with a write count per
 * element so overlaps and gaps are caught ---- */

#define MAX_ENTRIES 64
typedef struct entry {
  const st_param_desc *p;
  st_state_kind kind;
  float *data;
  uint8_t *written;
} entry;

typedef struct mem_store {
  st_state_writer w;
  st_state_reader r;
  pthread_mutex_t mu;
  entry e[MAX_ENTRIES];
  int n;
  bool from_init;  /* reader: PARAM falls back to init values (like the trainer's model init) */
  int overlaps;    /* elements written twice */
} mem_store;

static entry *find(mem_store *s, const st_param_desc *p, st_state_kind kind) {
  for (int i = 0; i < s->n; i++)
    if (!strcmp(s->e[i].p->name, p->name) && s->e[i].kind == kind) return &s->e[i];
  return NULL;
}

static st_result store_write(st_state_writer *w, const st_param_desc *p, st_state_kind kind, int64_t off,
                             int64_t count, st_dtype dt, const void *data, st_error *err) {
  mem_store *s = w->self;
  if (dt != ST_F32) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, p->name, "expected F32 state");
  pthread_mutex_lock(&s->mu);
  entry *e = find(s, p, kind);
  if (!e && s->n < MAX_ENTRIES) {
    e = &s->e[s->n++];
    *e = (entry){.p = p, .kind = kind, .data = calloc((size_t)numel(p), sizeof(float)),
                 .written = calloc((size_t)numel(p), 1)};
  }
  st_result r = ST_OK;
  if (!e || off < 0 || off + count > numel(p)) {
    r = st_error_set(err, ST_ERR_INVALID_ARGUMENT, p->name, "slice [%lld, %lld) outside the tensor", (long long)off,
                     (long long)(off + count));
  } else {
    memcpy(e->data + off, data, (size_t)count * sizeof(float));
    for (int64_t i = off; i < off + count; i++)
      if (e->written[i]++) s->overlaps++;
  }
  pthread_mutex_unlock(&s->mu);
  return r;
}

static st_result store_read(st_state_reader *rd, const st_param_desc *p, st_state_kind kind, int64_t off,
                            int64_t count, st_dtype dt, void *dst, st_error *err) {
  mem_store *s = rd->self;
  if (dt != ST_F32) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, p->name, "expected F32 state");
  pthread_mutex_lock(&s->mu);
  entry *e = find(s, p, kind);
  pthread_mutex_unlock(&s->mu);
  if (e) {
    memcpy(dst, e->data + off, (size_t)count * sizeof(float));
    return ST_OK;
  }
  if (kind == ST_STATE_PARAM && s->from_init) {
    for (int64_t i = 0; i < count; i++) ((float *)dst)[i] = (float)init_value(p, off + i);
    return ST_OK;
  }
  return st_error_set(err, ST_ERR_NOT_FOUND, p->name, "no state of kind %d in the test store", (int)kind);
}

static void store_init(mem_store *s, bool from_init) {
  memset(s, 0, sizeof *s);
  pthread_mutex_init(&s->mu, NULL);
  s->w = (st_state_writer){.self = s, .write = store_write};
  s->r = (st_state_reader){.self = s, .read = store_read};
  s->from_init = from_init;
}

static void store_free(mem_store *s) {
  for (int i = 0; i < s->n; i++) {
    free(s->e[i].data);
    free(s->e[i].written);
  }
  pthread_mutex_destroy(&s->mu);
}

/* every element of every trainable parameter's PARAM and optimizer states written exactly once;
 * frozen parameters absent */
static void check_complete(mem_store *s, int n_states, const char *what) {
  CHECK_MSG(s->overlaps == 0, "%s: %d elements written twice", what, s->overlaps);
  for (int u = 0; u < N_UNITS; u++)
    for (int k = 0; k < units[u].n_params; k++) {
      const st_param_desc *p = &units[u].params[k];
      for (int kind = 0; kind <= n_states; kind++) {
        entry *e = find(s, p, (st_state_kind)kind);
        if (!(p->flags & T)) {
          CHECK_MSG(!e, "%s: frozen %s saved", what, p->name);
          continue;
        }
        int64_t missing = e ? 0 : numel(p);
        for (int64_t i = 0; e && i < numel(p); i++) missing += e->written[i] != 1;
        CHECK_MSG(missing == 0, "%s: %s kind %d: %lld elements not written exactly once", what, p->name, kind,
                  (long long)missing);
      }
    }
}

/* max |a - b| over every saved tensor; -1 if the stores do not hold the same tensors */
static double store_diff(mem_store *a, mem_store *b) {
  if (a->n != b->n) return -1;
  double worst = 0;
  for (int i = 0; i < a->n; i++) {
    entry *x = &a->e[i], *y = find(b, x->p, x->kind);
    if (!y) return -1;
    for (int64_t j = 0; j < numel(x->p); j++) {
      double d = fabs((double)x->data[j] - (double)y->data[j]);
      if (d > worst || isnan(d)) worst = isnan(d) ? INFINITY : d;
    }
  }
  return worst;
}

/* ---- one rank ------------------------------------------------------------------------------ */

#define MAX_STEPS 8
#define TOTAL_ELEMS 512

typedef struct run_spec {
  const char *strategy;   /* "local", "ddp", "fsdp" */
  int world;
  const char *config;     /* JSON of the whole config (strategy block + zero_optimization), or NULL */
  int first_step, n_steps;
  int gas;
  double max_norm;        /* clipping; 0 = off */
  double lr;
  bool recompute;         /* activation checkpointing: replay forward before each backward */
  bool sgd;
  st_dtype pdt, rdt;      /* window and reduce dtypes of the setup (0 = F32) */
  const int *order;       /* static unit order (NULL: 0, 1, 2, ...) */
  int kill_step;          /* > 0 (forked ranks only): the last rank SIGKILLs itself in this step's backward */
  int bench_work;         /* > 0: benchmark model, cheap synthetic gradients costing this many FMAs per
                             element, no parameter capture */
  mem_store *load;        /* state_load source */
  mem_store *save;        /* state_save target after training, or NULL */
  bool resolve;           /* resolve "auto" in config (st_config_resolve, the model's hidden size) */
  bool capture_log;       /* keep the plugin's log lines in rank_out.log */
} run_spec;

typedef struct rank_out {
  double loss[MAX_STEPS], norm[MAX_STEPS], step_s[MAX_STEPS];
  float params[TOTAL_ELEMS]; /* every parameter, descriptor order, after the run */
  int64_t ar_after_nonlast;  /* all-reduce calls during non-last micro-steps */
  int64_t ar_after_first_unit; /* all-reduce calls right after the first post_backward of the last micro-step */
  int64_t ar_per_step, rs_per_micro, ag_per_micro;
  int64_t open_requests;
  uint64_t peak_bytes, plan_bytes;
  st_memory_plan plan;
  char log[4096];            /* capture_log: the plugin's log lines, newline-separated (truncated) */
  st_result result;
  st_error err;
} rank_out;

typedef struct rank_args {
  const run_spec *spec;
  const st_strategy_plugin_v1 *sp;
  const st_comm_plugin_v1 *comm; /* NULL: one rank, no comm (the local reference) */
  st_comm *world_comm;
  thread_world *tw;              /* set when ranks are threads: collective counters */
  int rank;
  rank_out *out;
} rank_args;

static double wval(const st_tensor *t, int64_t i) {
  return t->dtype == ST_BF16 ? st_bf16_to_f32(((const uint16_t *)t->data)[i]) : ((const float *)t->data)[i];
}

/* the benchmark's gradient: data-dependent, a fixed number of dependent FMAs per element */
static void bench_backward(const run_spec *sp, int rank, int step, int u, const st_tensor *params, st_tensor *grads,
                           double grad_scale) {
  for (int k = 0; k < cur->units[u].n_params; k++) {
    if (!grads[k].data) continue;
    const float *w = params[k].data;
    float *g = grads[k].data;
    int64_t n = st_tensor_numel(&params[k]);
    for (int64_t i = 0; i < n; i++) {
      float x = (float)(((uint32_t)(i * 2654435761u) ^ (uint32_t)(step * 97 + rank * 13)) & 1023) / 1024.0f - 0.5f;
      for (int j = 0; j < sp->bench_work; j++) x = x * 0.999f + w[i] * 0.001f;
      g[i] += (float)grad_scale * x;
    }
  }
}

static void model_backward(const run_spec *sp, int rank, int step, int micro, int u, const st_tensor *params,
                           st_tensor *grads, double grad_scale) {
  if (sp->bench_work > 0) {
    bench_backward(sp, rank, step, u, params, grads, grad_scale);
    return;
  }
  int b = g_samples / sp->world;
  for (int k = 0; k < cur->units[u].n_params; k++) {
    const st_param_desc *p = &cur->units[u].params[k];
    if (!grads[k].data) continue;
    float *g = grads[k].data;
    for (int64_t i = 0; i < numel(p); i++) {
      double w_i = wval(&params[k], i);
      double acc = 0;
      for (int s = rank * b; s < (rank + 1) * b; s++) {
        uint64_t key = name_hash(p->name) ^ ((uint64_t)i << 20);
        double c = 0.5 + u01((uint64_t)step, (uint64_t)micro, (uint64_t)s, key);
        double d = 2 * u01((uint64_t)step, (uint64_t)micro, (uint64_t)s, key ^ 0x5555) - 1;
        acc += c * w_i + d;
      }
      g[i] += (float)(grad_scale * acc / b);
    }
  }
}

static double model_forward(const run_spec *sp, int rank, int step, int micro, int u, const st_tensor *params,
                            int *bad_frozen) {
  if (sp->bench_work > 0) return 0;
  int b = g_samples / sp->world;
  double loss = 0;
  for (int k = 0; k < cur->units[u].n_params; k++) {
    const st_param_desc *p = &cur->units[u].params[k];
    for (int64_t i = 0; i < numel(p); i++) {
      double w_i = wval(&params[k], i);
      float w0 = (float)init_value(p, i);
      if (!(p->flags & T) && w_i != (params[k].dtype == ST_BF16 ? st_bf16_to_f32(st_f32_to_bf16(w0)) : w0)) (*bad_frozen)++;
      for (int s = rank * b; s < (rank + 1) * b; s++) {
        uint64_t key = name_hash(p->name) ^ ((uint64_t)i << 20);
        double c = 0.5 + u01((uint64_t)step, (uint64_t)micro, (uint64_t)s, key);
        double d = 2 * u01((uint64_t)step, (uint64_t)micro, (uint64_t)s, key ^ 0x5555) - 1;
        loss += (c * w_i * w_i / 2 + d * w_i) / b;
      }
    }
  }
  return loss;
}

static void capture_sink(void *user, st_log_level level, const char *message) {
  rank_out *out = user;
  size_t n = strlen(out->log);
  snprintf(out->log + n, sizeof out->log - n, "%s\n", message);
}

static st_result run_rank(rank_args *a, st_error *err) {
  const run_spec *sp = a->spec;
  rank_out *out = a->out;
  const int *order = sp->order ? sp->order : identity_order;
  const st_ops *ops = NULL;
  st_host *host = NULL;
  st_config *cfg = NULL;
  void *ctx = NULL;
  st_result r;
  static const st_optimizer_settings sgd = {.type = ST_OPTIM_SGD, .lr = 1e-2, .momentum = 0.9, .weight_decay = 0.01};
  static const st_optimizer_settings adamw = {.type = ST_OPTIM_ADAMW, .lr = 1e-2, .beta1 = 0.9, .beta2 = 0.999,
                                              .eps = 1e-8, .weight_decay = 0.01, .adam_w_mode = true};
  ST_CHECK_GOTO(st_cpu_ops_create(1, &ops, err), r, done);
  st_host_options ho = {.ops = ops, .cpu_ops = ops, .optimizer = sp->sgd ? &sgd : &adamw, .cfg = st_config_api(),
                        .rank = a->rank, .world_size = sp->world};
  if (a->comm) {
    ho.comm = a->comm;
    ho.world = a->world_comm;
  }
  if (sp->capture_log) {
    ho.log_sink = capture_sink;
    ho.log_user = out;
  }
  ST_CHECK_GOTO(st_host_create(&ho, &host, err), r, done);
  ST_CHECK_GOTO(st_config_load_string(sp->config ? sp->config : "{}", "test", &cfg, err), r, done);
  if (sp->resolve) {
    st_settings settings;
    ST_CHECK_GOTO(st_config_resolve(cfg, sp->world, cur->hidden_size, &settings, err), r, done);
  }
  st_cfg *scfg;
  ST_CHECK_GOTO(st_config_api()->get_object(st_config_root(cfg), "strategy", true, &scfg, err), r, done);
  ST_CHECK_GOTO(a->sp->validate(scfg, st_config_api(), err), r, done);
  st_strategy_setup setup = {.struct_size = sizeof setup, .model = cur, .unit_order = order,
                             .param_dtype = sp->pdt, .master_dtype = ST_F32, .grad_dtype = ST_F32,
                             .reduce_dtype = sp->rdt, .grad_accum_steps = sp->gas, .group = NULL};
  ST_CHECK_GOTO(a->sp->init(host, scfg, &setup, &ctx, err), r, done);
  ST_CHECK_GOTO(a->sp->state_load(ctx, &sp->load->r, err), r, done);
  int bad_frozen = 0;
  for (int t = sp->first_step; t < sp->first_step + sp->n_steps; t++) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    double loss = 0;
    int64_t ar0 = a->tw ? thread_comm_calls(a->tw, a->rank, TC_ALL_REDUCE) : 0;
    for (int m = 0; m < sp->gas; m++) {
      bool last = m == sp->gas - 1;
      int64_t rs0 = a->tw ? thread_comm_calls(a->tw, a->rank, TC_REDUCE_SCATTER) : 0;
      int64_t ag0 = a->tw ? thread_comm_calls(a->tw, a->rank, TC_ALL_GATHER) : 0;
      for (int i = 0; i < cur->n_units; i++) {
        const st_tensor *params;
        ST_CHECK_GOTO(a->sp->pre_forward(ctx, order[i], &params, err), r, done);
        loss += model_forward(sp, a->rank, t, m, order[i], params, &bad_frozen) / sp->gas;
        ST_CHECK_GOTO(a->sp->post_forward(ctx, order[i], err), r, done);
      }
      for (int i = cur->n_units - 1; i >= 0; i--) {
        int u = order[i];
        const st_tensor *params;
        st_tensor *grads;
        if (sp->recompute) {
          ST_CHECK_GOTO(a->sp->pre_forward(ctx, u, &params, err), r, done);
          ST_CHECK_GOTO(a->sp->post_forward(ctx, u, err), r, done);
        }
        ST_CHECK_GOTO(a->sp->pre_backward(ctx, u, &params, &grads, err), r, done);
        if (t == sp->kill_step && last && i == 1 && !a->tw && a->rank == sp->world - 1) raise(SIGKILL);
        model_backward(sp, a->rank, t, m, u, params, grads, 1.0 / sp->gas);
        ST_CHECK_GOTO(a->sp->post_backward(ctx, u, last, err), r, done);
        if (last && i == cur->n_units - 2 && a->tw) /* unit N-1 has no gradients: N-2 is the first with a bucket */
          out->ar_after_first_unit = thread_comm_calls(a->tw, a->rank, TC_ALL_REDUCE) - ar0;
      }
      if (!last && a->tw) out->ar_after_nonlast += thread_comm_calls(a->tw, a->rank, TC_ALL_REDUCE) - ar0;
      if (a->tw) {
        out->rs_per_micro = thread_comm_calls(a->tw, a->rank, TC_REDUCE_SCATTER) - rs0;
        out->ag_per_micro = thread_comm_calls(a->tw, a->rank, TC_ALL_GATHER) - ag0;
      }
    }
    double norm_sq;
    ST_CHECK_GOTO(a->sp->grad_norm_sq(ctx, &norm_sq, err), r, done);
    if (a->tw) out->ar_per_step = thread_comm_calls(a->tw, a->rank, TC_ALL_REDUCE) - ar0;
    double norm = sqrt(norm_sq);
    double clip = sp->max_norm > 0 && norm > sp->max_norm ? sp->max_norm / (norm + 1e-6) : 1.0;
    st_step_args sa = {.step = t, .lr = sp->lr, .grad_scale = clip};
    ST_CHECK_GOTO(a->sp->step(ctx, &sa, err), r, done);
    out->loss[t - sp->first_step] = loss;
    out->norm[t - sp->first_step] = norm;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    out->step_s[t - sp->first_step] = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
  }
  if (bad_frozen) {
    r = st_error_set(err, ST_ERR_INTERNAL, "test", "%d frozen elements differed from their initial values", bad_frozen);
    goto done;
  }
  /* after step() nothing may be in flight (later prefetches of the capture below may be) */
  if (a->tw) out->open_requests = thread_comm_open_requests(a->tw, a->rank);
  out->peak_bytes = st_host_peak_bytes(host, ST_DEVICE_CPU);
  if (a->sp->memory_plan) {
    a->sp->memory_plan(ctx, &out->plan);
    for (int i = 0; i < ST_MEMORY_CATEGORIES; i++) out->plan_bytes += out->plan.device_bytes[i];
  }
  int64_t off = 0;
  for (int u = 0; u < cur->n_units && !sp->bench_work; u++) { /* descriptor order, whatever the unit order */
    const st_tensor *params;
    ST_CHECK_GOTO(a->sp->pre_forward(ctx, u, &params, err), r, done);
    for (int k = 0; k < cur->units[u].n_params; k++)
      for (int64_t e = 0; e < st_tensor_numel(&params[k]); e++) out->params[off++] = (float)wval(&params[k], e);
    ST_CHECK_GOTO(a->sp->post_forward(ctx, u, err), r, done);
  }
  if (sp->save) ST_CHECK_GOTO(a->sp->state_save(ctx, &sp->save->w, err), r, done);
  r = ST_OK;
done:
  if (ctx) a->sp->finalize(ctx);
  st_config_free(cfg);
  st_host_destroy(host);
  if (ops) st_cpu_ops_destroy(ops);
  return r;
}

static void *rank_main(void *vp) {
  rank_args *a = vp;
  st_error_clear(&a->out->err);
  a->out->result = run_rank(a, &a->out->err);
  if (a->out->result != ST_OK && a->tw) thread_world_abort(a->tw);
  return NULL;
}

#define N_PLUGINS 3
static st_plugin plugins[N_PLUGINS];

static const st_strategy_plugin_v1 *strategy(const char *name) {
  if (!strcmp(name, "local")) return st_local_strategy();
  st_plugin *p = !strcmp(name, "ddp") ? &plugins[0] : !strcmp(name, "fsdp") ? &plugins[1] : &plugins[2];
  if (!p->v.strategy) {
    st_error err;
    st_result r = st_plugin_load(ST_PLUGIN_STRATEGY, name, NULL, 0, p, &err);
    if (r != ST_OK) {
      fprintf(stderr, "cannot load strategy %s: %s: %s\n", name, err.where, err.message);
      exit(1);
    }
  }
  return p->v.strategy;
}

/* runs spec on spec->world threads; out[0..world) */
static bool run(const run_spec *spec, rank_out *out) {
  int n = spec->world;
  thread_world *tw = NULL;
  st_error err;
  if (strcmp(spec->strategy, "local") != 0 && thread_world_create(n, 60000, &tw, &err) != ST_OK) return false;
  pthread_t th[8];
  rank_args args[8];
  for (int r = 0; r < n; r++) {
    memset(&out[r], 0, sizeof out[r]);
    args[r] = (rank_args){.spec = spec, .sp = strategy(spec->strategy), .tw = tw, .rank = r, .out = &out[r]};
    if (tw) {
      args[r].comm = thread_comm_plugin();
      args[r].world_comm = thread_world_comm(tw, r);
    }
    pthread_create(&th[r], NULL, rank_main, &args[r]);
  }
  bool ok = true;
  for (int r = 0; r < n; r++) {
    pthread_join(th[r], NULL);
    if (out[r].result != ST_OK) {
      fprintf(stderr, "%s on %d, rank %d: %s: %s\n", spec->strategy, n, r, out[r].err.where, out[r].err.message);
      ok = false;
    }
  }
  thread_world_free(tw);
  CHECK_MSG(ok, "%s on %d ranks failed", spec->strategy, n);
  return ok;
}

static int64_t total_elems(void) {
  int64_t n = 0;
  for (int u = 0; u < N_UNITS; u++)
    for (int k = 0; k < units[u].n_params; k++) n += numel(&units[u].params[k]);
  return n;
}

typedef struct tolerance {
  double param_atol, param_rtol, loss_rtol, norm_rtol;
} tolerance;
/* fp32 everywhere: see the top of the file */
static const tolerance FP32_TOL = {2e-6, 1e-5, 1e-6, 1e-5};

/* every rank of `got` holds the reference's parameters, losses and norms; returns the worst
 * parameter difference */
static double compare_tol(const char *what, const run_spec *spec, const rank_out *got, const rank_out *ref,
                          const tolerance *tol) {
  int64_t n = total_elems();
  double worst = 0;
  bool within = true;
  for (int r = 0; r < spec->world; r++)
    for (int64_t i = 0; i < n; i++) {
      double d = fabs((double)got[r].params[i] - (double)ref->params[i]);
      within = within && d <= tol->param_atol + tol->param_rtol * fabs((double)ref->params[i]);
      worst = isnan(d) ? INFINITY : fmax(worst, d);
    }
  CHECK_MSG(within, "%s: parameters differ from the local strategy by up to %g, beyond %g + %g |x|", what, worst,
            tol->param_atol, tol->param_rtol);
  for (int t = 0; t < spec->n_steps; t++) {
    double loss = 0;
    for (int r = 0; r < spec->world; r++) loss += got[r].loss[t] / spec->world;
    CHECK_CLOSE(loss, ref->loss[t], tol->loss_rtol, 1e-9);
    for (int r = 0; r < spec->world; r++) CHECK_CLOSE(got[r].norm[t], ref->norm[t], tol->norm_rtol, 1e-9);
  }
  /* the parameters moved: the comparison is not between two untouched sets */
  double moved = 0;
  int64_t off = 0;
  for (int u = 0; u < N_UNITS; u++)
    for (int k = 0; k < units[u].n_params; k++)
      for (int64_t i = 0; i < numel(&units[u].params[k]); i++, off++)
        moved = fmax(moved, fabs(ref->params[off] - init_value(&units[u].params[k], i)));
  CHECK_MSG(moved > 5e-3, "%s: the reference barely trained (max change %g)", what, moved);
  fprintf(stderr, "%-44s %s: worst parameter difference %.3g, loss[last] %.9g\n", what, within ? "ok" : "MISMATCH",
          worst, ref->loss[spec->n_steps - 1]);
  return worst;
}

static void compare(const char *what, const run_spec *spec, const rank_out *got, const rank_out *ref) {
  compare_tol(what, spec, got, ref, &FP32_TOL);
}

/* ---- tests --------------------------------------------------------------------------------- */

static rank_out outs[8], ref_out;

static void test_equivalence(void) {
  static const int permuted[N_UNITS] = {2, 0, 3, 1};
  /* embed.bias, block.0.frozen, block.0.norm, block.1.bias, final.frozen stay whole on every rank */
  const char *persist12 = "{\"zero_optimization\": {\"stage\": 3, \"stage3_param_persistence_threshold\": 12}}";
  const char *small_buckets = "{\"strategy\": {\"name\": \"ddp\", \"reduce_bucket_size\": 1}}";
  struct {
    const char *strategy;
    int world;
    const char *config;
    bool recompute, sgd;
    const char *label;
    const int *order;
  } cases[] = {
      {"ddp", 2, NULL, false, false, "ddp 2 ranks (one bucket)"},
      {"ddp", 4, small_buckets, false, false, "ddp 4 ranks, bucket per unit"},
      {"ddp", 2, "{\"strategy\": {\"name\": \"ddp\", \"overlap_comm\": false, \"bucket_cap_mb\": 0.0002}}", false,
       false, "ddp 2 ranks, sequential"},
      {"fsdp", 2, NULL, false, false, "fsdp 2 ranks FULL_SHARD"},
      {"fsdp", 4, NULL, false, false, "fsdp 4 ranks FULL_SHARD"},
      {"fsdp", 4, NULL, true, false, "fsdp 4 ranks, activation checkpointing"},
      {"fsdp", 3, "{\"zero_optimization\": {\"stage\": 2}}", false, false, "fsdp 3 ranks SHARD_GRAD_OP (stage 2)"},
      {"fsdp", 2, "{\"strategy\": {\"name\": \"fsdp\", \"forward_prefetch\": false, \"backward_prefetch\": \"NONE\"}}",
       false, false, "fsdp 2 ranks, no prefetch"},
      {"ddp", 2, NULL, false, true, "ddp 2 ranks, SGD momentum"},
      {"fsdp", 4, NULL, false, true, "fsdp 4 ranks, SGD momentum"},
      {"fsdp", 2, NULL, true, false, "fsdp 2 ranks, unit order 2 0 3 1", permuted},
      {"fsdp", 4, persist12, false, false, "fsdp 4 ranks, persistence threshold 12"},
      {"fsdp", 3, persist12, true, true, "fsdp 3 ranks, persistence 12, ckpt, SGD"},
      {"ddp", 4, small_buckets, false, false, "ddp 4 ranks, unit order 2 0 3 1", permuted},
  };
  mem_store init;
  store_init(&init, true);
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    run_spec ref = {.strategy = "local", .world = 1, .first_step = 1, .n_steps = 5, .gas = 2, .max_norm = 0.5,
                    .lr = 1e-2, .recompute = cases[c].recompute, .sgd = cases[c].sgd, .load = &init};
    run_spec spec = ref;
    spec.strategy = cases[c].strategy;
    spec.world = cases[c].world;
    spec.config = cases[c].config;
    spec.order = cases[c].order;
    if (!run(&ref, &ref_out) || !run(&spec, outs)) continue;
    /* clipping was active (norms above max_norm), so the clip path is exercised */
    CHECK_MSG(ref_out.norm[0] > 0.5, "clipping inactive: norm %g", ref_out.norm[0]);
    compare(cases[c].label, &spec, outs, &ref_out);
    for (int r = 0; r < spec.world; r++) CHECK(outs[r].open_requests == 0);
  }
  store_free(&init);
}

/* Mixed precision. bf16 windows with fp32 masters: the masters follow the fp32 analysis above
 * (compared through state_save), the windows are the masters rounded to bf16, so they agree to one
 * bf16 ulp (2^-8 relative) where a master sits at a rounding boundary. bf16 gradient reduction
 * (communication_data_type / mixed_precision.reduce_dtype): each gradient is rounded to bf16 (2^-9
 * relative) before the average, which moves Adam updates by ~lr * 2^-9 per step: parameters within
 * 5e-4 after 5 steps, norms within 1e-2; and they must differ from the fp32 result by more than fp32
 * noise, which shows the reduction really ran in bf16. */
static void test_precision(void) {
  mem_store init;
  store_init(&init, true);
  static const tolerance bf16_windows = {1e-6, 8e-3, 1e-4, 1e-4};
  static const tolerance bf16_reduce = {5e-4, 0, 1e-3, 1e-2};
  struct {
    const char *strategy;
    int world;
    const char *config;
    st_dtype pdt, rdt;
    const char *label;
  } cases[] = {
      {"fsdp", 4, NULL, ST_BF16, ST_F32, "fsdp 4 ranks, bf16 windows, fp32 master"},
      {"fsdp", 2, "{\"zero_optimization\": {\"stage\": 2}}", ST_BF16, ST_F32, "fsdp 2 ranks stage 2, bf16 windows"},
      {"ddp", 2, NULL, ST_BF16, ST_F32, "ddp 2 ranks, bf16 windows, fp32 master"},
      {"ddp", 2, "{\"communication_data_type\": \"bf16\"}", ST_F32, ST_F32, "ddp 2 ranks, bf16 all-reduce"},
      {"fsdp", 4, "{\"strategy\": {\"name\": \"fsdp\", \"mixed_precision\": {\"reduce_dtype\": \"bf16\"}}}",
       ST_F32, ST_F32, "fsdp 4 ranks, bf16 reduce-scatter"},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    mem_store ref_state, got_state;
    store_init(&ref_state, false);
    store_init(&got_state, false);
    run_spec ref = {.strategy = "local", .world = 1, .first_step = 1, .n_steps = 5, .gas = 2, .max_norm = 0.5,
                    .lr = 1e-2, .pdt = cases[c].pdt, .rdt = cases[c].rdt, .load = &init, .save = &ref_state};
    run_spec spec = ref;
    spec.strategy = cases[c].strategy;
    spec.world = cases[c].world;
    spec.config = cases[c].config;
    spec.save = &got_state;
    if (run(&ref, &ref_out) && run(&spec, outs)) {
      bool windows = cases[c].pdt == ST_BF16;
      double worst = compare_tol(cases[c].label, &spec, outs, &ref_out, windows ? &bf16_windows : &bf16_reduce);
      double state = store_diff(&ref_state, &got_state);
      if (windows) {
        CHECK_MSG(state >= 0 && state < 1e-4, "%s: master/optimizer state differs by %g", cases[c].label, state);
      } else {
        CHECK_MSG(worst > 1e-6, "%s: no sign of bf16 rounding (worst difference %g)", cases[c].label, worst);
      }
      check_complete(&got_state, 2, cases[c].label);
    }
    store_free(&ref_state);
    store_free(&got_state);
  }
  store_free(&init);
}

/* collective schedule: no all-reduce on accumulation micro-steps; a bucket launched as soon as
 * its unit's backward is done; FSDP frees after forward and re-gathers in backward */
static void test_schedule(void) {
  mem_store init;
  store_init(&init, true);
  run_spec spec = {.strategy = "ddp", .world = 2, .first_step = 1, .n_steps = 2, .gas = 3, .lr = 1e-2, .load = &init,
                   .config = "{\"strategy\": {\"name\": \"ddp\", \"reduce_bucket_size\": 1}}"};
  if (run(&spec, outs)) {
    CHECK(outs[0].ar_after_nonlast == 0);
    CHECK(outs[0].ar_after_first_unit == 1); /* block.1's bucket left before block.0's backward ran */
    CHECK(outs[0].ar_per_step == 3);         /* one bucket per unit with gradients */
  }
  spec.config = NULL; /* default 25 MiB: one bucket, launched when embed (the last in backward) is done */
  if (run(&spec, outs)) {
    CHECK(outs[0].ar_after_first_unit == 0);
    CHECK(outs[0].ar_per_step == 1);
  }
  spec.config = "{\"strategy\": {\"name\": \"ddp\", \"overlap_comm\": false, \"reduce_bucket_size\": 1}}";
  if (run(&spec, outs)) {
    CHECK(outs[0].ar_after_first_unit == 0); /* sequential: everything waits for grad_norm_sq */
    CHECK(outs[0].ar_per_step == 3);
  }
  spec.strategy = "fsdp";
  spec.config = NULL;
  if (run(&spec, outs)) {
    /* forward gathers 5 flat params (block.0 has two); backward re-gathers all but the kept last
     * unit: 1 + 2 + 1 */
    CHECK_MSG(outs[0].ag_per_micro == 9, "all-gathers per micro-step: %lld", (long long)outs[0].ag_per_micro);
    CHECK(outs[0].rs_per_micro == 3); /* every micro-step, units with trainable parameters */
    CHECK(outs[0].ar_per_step == 1);  /* the norm */
  }
  spec.config = "{\"strategy\": {\"name\": \"fsdp\", \"stage3_param_persistence_threshold\": 12}}";
  if (run(&spec, outs)) {
    /* the persistent parameters are never gathered: each unit gathers only its weight and final
     * nothing, in forward (3) and again in backward (3); their gradients: one all-reduce per unit
     * on the last micro-step, plus the norm */
    CHECK_MSG(outs[0].ag_per_micro == 3 + 3, "all-gathers per micro-step with persistence: %lld",
              (long long)outs[0].ag_per_micro);
    CHECK(outs[0].ar_after_nonlast == 0);
    CHECK(outs[0].ar_per_step == 3 + 1);
  }
  spec.config = "{\"strategy\": {\"name\": \"fsdp\", \"sharding_strategy\": \"SHARD_GRAD_OP\"}}";
  if (run(&spec, outs)) CHECK_MSG(outs[0].ag_per_micro == 5, "SHARD_GRAD_OP all-gathers: %lld", (long long)outs[0].ag_per_micro);
  store_free(&init);
}

/* save on fsdp x4, load on fsdp x2, ddp x2, local x1: identical state, and training continues the
 * same way as an uninterrupted run */
static void test_resharding(void) {
  mem_store init, s4, s2, d2, l1, direct;
  store_init(&init, true);
  store_init(&s4, false);
  store_init(&s2, false);
  store_init(&d2, false);
  store_init(&l1, false);
  store_init(&direct, false);
  run_spec base = {.first_step = 1, .n_steps = 3, .gas = 2, .max_norm = 0.5, .lr = 1e-2, .load = &init};
  run_spec a = base;
  a.strategy = "fsdp";
  a.world = 4;
  a.save = &s4;
  /* persistent parameters are saved once (by rank 0), the others as shards */
  a.config = "{\"strategy\": {\"name\": \"fsdp\", \"stage3_param_persistence_threshold\": 5}}";
  if (!run(&a, outs)) goto out;
  check_complete(&s4, 2, "fsdp x4 checkpoint");
  s4.from_init = true; /* frozen parameters come from the model's init, as in the trainer */
  run_spec l = base;
  l.strategy = "local";
  l.world = 1;
  l.save = &direct;
  if (!run(&l, &ref_out)) goto out;
  CHECK_MSG(store_diff(&s4, &direct) >= 0 && store_diff(&s4, &direct) < 1e-5,
            "fsdp x4 state vs local state after 3 steps: %g", store_diff(&s4, &direct));

  /* load and save again without training: bit-identical */
  struct { const char *name; int world; mem_store *dst; } targets[] = {{"fsdp", 2, &s2}, {"ddp", 2, &d2}, {"local", 1, &l1}};
  for (int i = 0; i < 3; i++) {
    run_spec b = base;
    b.strategy = targets[i].name;
    b.world = targets[i].world;
    b.n_steps = 0;
    b.load = &s4;
    b.save = targets[i].dst;
    if (!run(&b, outs)) continue;
    check_complete(targets[i].dst, 2, targets[i].name);
    CHECK_MSG(store_diff(&s4, targets[i].dst) == 0, "%s x%d: state after load/save differs by %g", targets[i].name,
              targets[i].world, store_diff(&s4, targets[i].dst));
  }

  /* resume for 2 more steps everywhere; compare with local trained 5 steps straight */
  run_spec straight = base;
  straight.strategy = "local";
  straight.world = 1;
  straight.n_steps = 5;
  if (!run(&straight, &ref_out)) goto out;
  for (int i = 0; i < 3; i++) {
    run_spec b = base;
    b.strategy = targets[i].name;
    b.world = targets[i].world;
    b.first_step = 4;
    b.n_steps = 2;
    b.load = &s4;
    if (!run(&b, outs)) continue;
    rank_out ref_tail = ref_out;
    for (int t = 0; t < 2; t++) {
      ref_tail.loss[t] = ref_out.loss[3 + t];
      ref_tail.norm[t] = ref_out.norm[3 + t];
    }
    char label[64];
    snprintf(label, sizeof label, "resume fsdp x4 -> %s x%d", targets[i].name, targets[i].world);
    compare(label, &b, outs, &ref_tail);
  }
out:
  store_free(&init);
  store_free(&s4);
  store_free(&s2);
  store_free(&d2);
  store_free(&l1);
  store_free(&direct);
}

/* memory plan: ZeRO formula per rank, and the measured peak within it + 10% */
static void test_memory_plan(void) {
  mem_store init;
  store_init(&init, true);
  int64_t trainable = 0, all = 0;
  for (int u = 0; u < N_UNITS; u++)
    for (int k = 0; k < units[u].n_params; k++) {
      all += numel(&units[u].params[k]);
      if (units[u].params[k].flags & T) trainable += numel(&units[u].params[k]);
    }
  for (int world = 2; world <= 4; world += 2) {
    run_spec spec = {.strategy = "fsdp", .world = world, .first_step = 1, .n_steps = 1, .gas = 1, .lr = 1e-2,
                     .load = &init};
    if (!run(&spec, outs)) continue;
    for (int r = 0; r < world; r++) {
      const st_memory_plan *p = &outs[r].plan;
      /* fp32 windows and grads, Adam: (4 + 4 + 8) bytes per element / N, plus padding: each unit
       * and group rounds up to 16 * N elements and 64 bytes */
      double slack = 2.0 * N_UNITS * (16.0 * world * 4 + 64);
      CHECK_MSG(p->device_bytes[0] >= 4.0 * all / world && p->device_bytes[0] <= 4.0 * all / world + slack,
                "params %llu for %lld elements on %d ranks", (unsigned long long)p->device_bytes[0], (long long)all, world);
      CHECK(p->device_bytes[1] >= 4.0 * trainable / world && p->device_bytes[1] <= 4.0 * trainable / world + slack);
      CHECK(p->device_bytes[2] == 0); /* fp32 windows need no master copy */
      CHECK(p->device_bytes[3] >= 8.0 * trainable / world && p->device_bytes[3] <= 8.0 * trainable / world + 2 * slack);
      CHECK_MSG((double)outs[r].peak_bytes <= 1.1 * (double)outs[r].plan_bytes + 4096,
                "rank %d: measured peak %llu > plan %llu + 10%%", r, (unsigned long long)outs[r].peak_bytes,
                (unsigned long long)outs[r].plan_bytes);
    }
  }
  /* bf16 windows, fp32 grads and masters, AdamW: (2 + 4 + 4 + 8) bytes per element / N */
  run_spec half = {.strategy = "fsdp", .world = 4, .first_step = 1, .n_steps = 1, .gas = 1, .lr = 1e-2,
                   .pdt = ST_BF16, .load = &init};
  if (run(&half, outs)) {
    const st_memory_plan *p = &outs[1].plan;
    double slack = 2.0 * N_UNITS * (16.0 * 4 * 4 + 64);
    CHECK(p->device_bytes[0] >= 2.0 * all / 4 && p->device_bytes[0] <= 2.0 * all / 4 + slack);
    CHECK(p->device_bytes[2] >= 4.0 * trainable / 4 && p->device_bytes[2] <= 4.0 * trainable / 4 + slack);
    CHECK((double)outs[1].peak_bytes <= 1.1 * (double)outs[1].plan_bytes + 4096);
  }
  run_spec ddp = {.strategy = "ddp", .world = 2, .first_step = 1, .n_steps = 1, .gas = 1, .lr = 1e-2, .load = &init};
  if (run(&ddp, outs)) {
    CHECK(outs[0].plan.device_bytes[0] >= 4.0 * all && outs[0].plan.device_bytes[3] >= 8.0 * trainable);
    CHECK((double)outs[0].peak_bytes <= 1.1 * (double)outs[0].plan_bytes + 4096);
  }
  store_free(&init);
}

/* configuration: known keys of both vocabularies accepted, the rest named in the error */
static void test_config(void) {
  struct {
    const char *strategy, *json, *expect; /* expect NULL: accepted */
  } cases[] = {
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"sharding_strategy\": \"FULL_SHARD\", \"limit_all_gathers\": true, "
               "\"forward_prefetch\": true, \"backward_prefetch\": \"BACKWARD_PRE\", \"cpu_offload\": false, "
               "\"mixed_precision\": {\"param_dtype\": \"fp32\", \"reduce_dtype\": \"fp32\", \"buffer_dtype\": \"fp32\"}, "
               "\"reduce_bucket_size\": 1000, \"stage3_prefetch_bucket_size\": 1000, \"stage3_max_live_parameters\": 1e9, "
               "\"stage3_param_persistence_threshold\": 0}}", NULL},
      {"fsdp", "{\"zero_optimization\": {\"stage\": 3, \"overlap_comm\": true, \"contiguous_gradients\": true, "
               "\"sub_group_size\": 1e9, \"reduce_bucket_size\": 500, \"stage3_prefetch_bucket_size\": 400, "
               "\"stage3_param_persistence_threshold\": 100, \"stage3_max_live_parameters\": 1e9, "
               "\"stage3_max_reuse_distance\": 1e9, \"stage3_gather_16bit_weights_on_model_save\": true, "
               "\"offload_optimizer\": {\"device\": \"none\"}}}", NULL},
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"sharding_stratgy\": \"FULL_SHARD\"}}", "sharding_stratgy"},
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"sharding_strategy\": \"NO_SHARD\"}}", "ddp"},
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"sharding_strategy\": \"HYBRID_SHARD\"}}", "sharding_strategy"},
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"cpu_offload\": {\"offload_params\": true}}}", "zero3_offload"},
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"mixed_precision\": {\"param_dtype\": \"int8\"}}}", "param_dtype"},
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"mixed_precision\": {\"keep_low_precision_grads\": true}}}",
       "keep_low_precision_grads"},
      {"fsdp", "{\"zero_optimization\": {\"stage\": 3, \"offload_param\": {\"device\": \"cpu\"}}}",
       "zero_optimization.offload_param"},
      {"fsdp", "{\"zero_optimization\": {\"stage\": 3, \"zero_quantized_weights\": true}}",
       "zero_optimization.zero_quantized_weights"},
      {"fsdp", "{\"zero_optimization\": {\"stage\": 3, \"zero_hpz_partition_size\": 8}}", "zero_hpz_partition_size"},
      {"fsdp", "{\"zero_optimization\": {\"stage\": 3, \"mics_shard_size\": 4}}", "mics_shard_size"},
      {"fsdp", "{\"zero_optimization\": {\"stage\": 1}}", "stage"},
      {"fsdp", "{\"zero_optimization\": {\"stage\": 2}, \"strategy\": {\"name\": \"fsdp\", \"sharding_strategy\": "
               "\"FULL_SHARD\"}}", "sharding_strategy"},
      {"ddp", "{\"strategy\": {\"name\": \"ddp\", \"reduce_bucket_size\": 100, \"overlap_comm\": true, "
              "\"find_unused_parameters\": true}, \"zero_optimization\": {\"stage\": 0, \"reduce_bucket_size\": 10}}", NULL},
      {"ddp", "{\"strategy\": {\"name\": \"ddp\", \"bucket_size\": 100}}", "bucket_size"},
      {"ddp", "{\"strategy\": {\"name\": \"ddp\", \"reduce_bucket_size\": 0}}", "reduce_bucket_size"},
      {"ddp", "{\"zero_optimization\": {\"stage\": 3}}", "fsdp"},
      {"ddp", "{\"zero_optimization\": {\"stage\": 0, \"stage3_max_live_parameters\": 10}}", "stage3_max_live_parameters"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    st_config *cfg = NULL;
    st_error err;
    st_error_clear(&err);
    st_result r = st_config_load_string(cases[i].json, "test", &cfg, &err);
    st_cfg *scfg = NULL;
    if (r == ST_OK) r = st_config_api()->get_object(st_config_root(cfg), "strategy", true, &scfg, &err);
    if (r == ST_OK) r = strategy(cases[i].strategy)->validate(scfg, st_config_api(), &err);
    if (!cases[i].expect) {
      CHECK_MSG(r == ST_OK, "case %zu rejected: %s: %s", i, err.where, err.message);
    } else {
      CHECK_MSG(r == ST_ERR_CONFIG, "case %zu: expected a config error naming %s, got %d", i, cases[i].expect, (int)r);
      char both[ST_ERROR_WHERE_MAX + ST_ERROR_MESSAGE_MAX + 4];
      snprintf(both, sizeof both, "%s: %s", err.where, err.message);
      const char *text = both;
      CHECK_CONTAINS(text, cases[i].expect);
    }
    st_config_free(cfg);
  }
}

/* a checkpoint without a trainable parameter's value is an error naming it, on every rank that
 * owns a piece of it; missing optimizer state is zero-filled (tested above: init has none) */
static void test_missing_state(void) {
  mem_store empty;
  store_init(&empty, false);
  const char *names[] = {"fsdp", "ddp"};
  for (int i = 0; i < 2; i++) {
    run_spec spec = {.strategy = names[i], .world = 2, .first_step = 1, .n_steps = 1, .gas = 1, .lr = 1e-2,
                     .load = &empty};
    thread_world *tw = NULL;
    st_error err;
    if (thread_world_create(2, 60000, &tw, &err) != ST_OK) continue;
    pthread_t th[2];
    rank_args args[2];
    for (int r = 0; r < 2; r++) {
      args[r] = (rank_args){.spec = &spec, .sp = strategy(names[i]), .comm = thread_comm_plugin(),
                            .world_comm = thread_world_comm(tw, r), .tw = tw, .rank = r, .out = &outs[r]};
      pthread_create(&th[r], NULL, rank_main, &args[r]);
    }
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    thread_world_free(tw);
    CHECK(outs[0].result == ST_ERR_NOT_FOUND);
    CHECK_CONTAINS(outs[0].err.message, "embed.weight");
    CHECK_CONTAINS(outs[0].err.message, names[i]);
  }
  store_free(&empty);
}

/* ---- zero3_offload: fsdp's layout with the optimizer (and the parameters) on the host ---------- */

/* Tolerance against fsdp on the same ranks: gradients are reduced by the same code, and every
 * element is updated by the same kernel from the same inputs, only read from host copies instead
 * of device shards. The one possible difference is where a tile boundary (sub_group_size) splits a
 * parameter: the CPU kernel handles full SIMD vectors and a scalar tail, which may round the last
 * bit differently. That is ulps per step, so FP32_TOL (1e-5 relative) holds with a wide margin;
 * bf16 windows take the scalar path everywhere, so there the masters must agree exactly (1e-7 in
 * the check). A lost tile, a stale copy up, a wrong staging buffer or state at the wrong offset move
 * the update by O(lr) = 1e-2. */
static rank_out fsdp_outs[8];

static const char *find_line(const char *log, const char *needle) { return strstr(log, needle); }

/* a multi-rank run as a reference for compare_tol: rank 0's parameters and norms (every rank holds
 * the same), the loss averaged over the ranks (each reports its own samples' mean) */
static rank_out multi_ref;
static const rank_out *as_reference(const rank_out *o, int world, int n_steps) {
  multi_ref = o[0];
  for (int t = 0; t < n_steps; t++) {
    multi_ref.loss[t] = 0;
    for (int r = 0; r < world; r++) multi_ref.loss[t] += o[r].loss[t] / world;
  }
  return &multi_ref;
}

static void test_offload_equivalence(void) {
  static const int permuted[N_UNITS] = {2, 0, 3, 1};
  const char *persist12 = "\"stage3_param_persistence_threshold\": 12";
  struct {
    const char *zero; /* zero3_offload's zero_optimization block, without braces */
    const char *fsdp_zero; /* fsdp's (the same minus the offload keys) */
    int world;
    bool recompute, sgd;
    st_dtype pdt;
    const int *order;
    const char *label;
  } cases[] = {
      {"\"stage\": 3", "\"stage\": 3", 2, false, false, ST_F32, NULL, "zero3_offload x2 (optimizer offload)"},
      {"\"stage\": 3, \"offload_param\": {\"device\": \"cpu\", \"pin_memory\": true}", "\"stage\": 3", 2, false, false,
       ST_F32, NULL, "zero3_offload x2, offload_param"},
      {"\"stage\": 3, \"sub_group_size\": 7", "\"stage\": 3", 2, false, false, ST_F32, NULL,
       "zero3_offload x2, sub_group_size 7"},
      {"\"stage\": 3, \"sub_group_size\": 5, \"offload_param\": {\"device\": \"cpu\"}, "
       "\"stage3_param_persistence_threshold\": 12", "\"stage\": 3, \"stage3_param_persistence_threshold\": 12", 2, true,
       false, ST_F32, NULL, "zero3_offload x2, param, tile 5, persist 12, ckpt"},
      {"\"stage\": 3, \"sub_group_size\": 3, \"offload_param\": {\"device\": \"cpu\"}", "\"stage\": 3", 4, false, true,
       ST_F32, NULL, "zero3_offload x4, param, tile 3, SGD"},
      {"\"stage\": 3, \"sub_group_size\": 11, \"offload_param\": {\"device\": \"cpu\"}", "\"stage\": 3", 3, true, false,
       ST_F32, permuted, "zero3_offload x3, param, order 2 0 3 1"},
      {"\"stage\": 3, \"sub_group_size\": 7", "\"stage\": 3", 2, false, false, ST_BF16, NULL,
       "zero3_offload x2, bf16 windows, tile 7"},
      {"\"stage\": 3, \"sub_group_size\": 7, \"offload_param\": {\"device\": \"cpu\"}, " , "\"stage\": 3, ", 2, false,
       false, ST_BF16, NULL, "zero3_offload x2, bf16, param, tile 7, persist"},
  };
  /* the last case also keeps small parameters whole (persistent groups: device params, host master) */
  char last_zero[256], last_fsdp[256];
  snprintf(last_zero, sizeof last_zero, "%s%s", cases[7].zero, persist12);
  snprintf(last_fsdp, sizeof last_fsdp, "%s%s", cases[7].fsdp_zero, persist12);
  cases[7].zero = last_zero;
  cases[7].fsdp_zero = last_fsdp;
  static const tolerance bf16_windows = {1e-6, 8e-3, 1e-4, 1e-4};
  mem_store init;
  store_init(&init, true);
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    char zcfg[512], fcfg[512];
    snprintf(zcfg, sizeof zcfg, "{\"zero_optimization\": {%s}, \"strategy\": {\"name\": \"zero3_offload\", "
             "\"report_steps\": 2}}", cases[c].zero);
    snprintf(fcfg, sizeof fcfg, "{\"zero_optimization\": {%s}}", cases[c].fsdp_zero);
    mem_store fstate, zstate;
    store_init(&fstate, false);
    store_init(&zstate, false);
    run_spec ref = {.strategy = "fsdp", .world = cases[c].world, .first_step = 1, .n_steps = 5, .gas = 2,
                    .max_norm = 0.5, .lr = 1e-2, .recompute = cases[c].recompute, .sgd = cases[c].sgd,
                    .pdt = cases[c].pdt, .order = cases[c].order, .config = fcfg, .load = &init, .save = &fstate};
    run_spec spec = ref;
    spec.strategy = "zero3_offload";
    spec.config = zcfg;
    spec.save = &zstate;
    spec.capture_log = true;
    if (run(&ref, fsdp_outs) && run(&spec, outs)) {
      bool bf16 = cases[c].pdt == ST_BF16;
      double worst = compare_tol(cases[c].label, &spec, outs, as_reference(fsdp_outs, spec.world, spec.n_steps),
                                 bf16 ? &bf16_windows : &FP32_TOL);
      double state = store_diff(&fstate, &zstate);
      CHECK_MSG(state >= 0 && state <= (bf16 ? 1e-7 : 2e-5), "%s: master/optimizer state differs from fsdp's by %g",
                cases[c].label, state);
      check_complete(&zstate, cases[c].sgd ? 1 : 2, cases[c].label);
      fprintf(stderr, "%-44s vs fsdp: worst parameter %.3g, state %.3g\n", cases[c].label, worst, state);
      for (int r = 0; r < spec.world; r++) {
        CHECK(outs[r].open_requests == 0);
        /* the optimizer state really is on the host, not on the device */
        CHECK_MSG(outs[r].plan.device_bytes[3] == 0 && outs[r].plan.host_bytes[3] > 0, "%s rank %d: optimizer state "
                  "device %llu host %llu", cases[c].label, r, (unsigned long long)outs[r].plan.device_bytes[3],
                  (unsigned long long)outs[r].plan.host_bytes[3]);
      }
      /* the time breakdown: every 2 steps and for the whole run, from rank 0 only */
      CHECK_MSG(find_line(outs[0].log, "steps 1-2 (2 step(s)), per step: gather") &&
                    find_line(outs[0].log, "steps 3-4") && find_line(outs[0].log, "last steps (1 step(s))") &&
                    find_line(outs[0].log, "whole run (5 step(s))") && find_line(outs[0].log, "CPU optimizer"),
                "%s: time report missing:\n%s", cases[c].label, outs[0].log);
      CHECK(!find_line(outs[1].log, "per step"));
    }
    store_free(&fstate);
    store_free(&zstate);
  }
  store_free(&init);
}

/* checkpoints at global offsets: fsdp x4 -> zero3_offload x2 and zero3_offload x2 -> fsdp x4 load
 * bit-identically (load + save with no step in between) and resume like an uninterrupted local run */
static void test_offload_resharding(void) {
  mem_store init, f4, z2, z2back, f4back;
  store_init(&init, true);
  store_init(&f4, false);
  store_init(&z2, false);
  store_init(&z2back, false);
  store_init(&f4back, false);
  const char *zcfg = "{\"zero_optimization\": {\"stage\": 3, \"sub_group_size\": 6, \"offload_param\": "
                     "{\"device\": \"cpu\"}, \"stage3_param_persistence_threshold\": 5}, \"strategy\": "
                     "{\"name\": \"zero3_offload\"}}";
  run_spec base = {.first_step = 1, .n_steps = 3, .gas = 2, .max_norm = 0.5, .lr = 1e-2, .load = &init};
  run_spec straight = base;
  straight.strategy = "local";
  straight.world = 1;
  straight.n_steps = 5;
  rank_out local5;
  if (!run(&straight, &ref_out)) goto out;
  local5 = ref_out;
  rank_out tail = local5;
  for (int t = 0; t < 2; t++) {
    tail.loss[t] = local5.loss[3 + t];
    tail.norm[t] = local5.norm[3 + t];
  }
  run_spec a = base;
  a.strategy = "fsdp";
  a.world = 4;
  a.save = &f4;
  run_spec b = base;
  b.strategy = "zero3_offload";
  b.world = 2;
  b.config = zcfg;
  b.save = &z2;
  if (!run(&a, outs) || !run(&b, outs)) goto out;
  check_complete(&z2, 2, "zero3_offload x2 checkpoint");
  CHECK_MSG(store_diff(&f4, &z2) >= 0 && store_diff(&f4, &z2) < 2e-5, "fsdp x4 vs zero3_offload x2 state after 3 "
            "steps: %g", store_diff(&f4, &z2));
  f4.from_init = z2.from_init = true; /* frozen parameters come from the model's init */
  /* load and save again with no step in between: bit-identical, both directions */
  run_spec c = b;
  c.n_steps = 0;
  c.load = &f4;
  c.save = &z2back;
  if (run(&c, outs))
    CHECK_MSG(store_diff(&f4, &z2back) == 0, "fsdp x4 -> zero3_offload x2: state differs by %g", store_diff(&f4, &z2back));
  run_spec d = a;
  d.n_steps = 0;
  d.load = &z2;
  d.save = &f4back;
  if (run(&d, outs))
    CHECK_MSG(store_diff(&z2, &f4back) == 0, "zero3_offload x2 -> fsdp x4: state differs by %g", store_diff(&z2, &f4back));
  /* resume for 2 steps on the other strategy: the uninterrupted local run's steps 4-5 */
  run_spec e = b;
  e.first_step = 4;
  e.n_steps = 2;
  e.load = &f4;
  e.save = NULL;
  if (run(&e, outs)) compare("resume fsdp x4 -> zero3_offload x2", &e, outs, &tail);
  run_spec f = a;
  f.first_step = 4;
  f.n_steps = 2;
  f.load = &z2;
  f.save = NULL;
  if (run(&f, outs)) compare("resume zero3_offload x2 -> fsdp x4", &f, outs, &tail);
out:
  store_free(&init);
  store_free(&f4);
  store_free(&z2);
  store_free(&z2back);
  store_free(&f4back);
}

/* the DeepSpeed example config (configs/deepspeed/ds_z3_cpuoffload.json) runs unchanged: its "auto"
 * values resolved as the trainer does (persistence threshold 10 h = 80 keeps every parameter but
 * block.1.weight whole), the same losses and parameters as fsdp with offload set to "none" */
static void test_offload_ds_config(void) {
  const char *root = getenv("ST_SOURCE_ROOT");
  char path[1024];
  snprintf(path, sizeof path, "%s/configs/deepspeed/ds_z3_cpuoffload.json", root ? root : ".");
  FILE *f = fopen(path, "rb");
  CHECK_MSG(f != NULL, "cannot open %s", path);
  if (!f) return;
  static char text[8192], none[8192];
  size_t n = fread(text, 1, sizeof text - 1, f);
  fclose(f);
  text[n] = 0;
  CHECK(strstr(text, "\"offload_param\"") && strstr(text, "\"offload_optimizer\"") && strstr(text, "\"auto\""));
  /* fsdp's reference: the same file with both devices "none" */
  const char *dev = "\"device\": \"cpu\"";
  size_t o = 0;
  int replaced = 0;
  for (const char *p = text; *p && o < sizeof none - 16;) {
    if (!strncmp(p, dev, strlen(dev))) {
      o += (size_t)snprintf(none + o, sizeof none - o, "\"device\": \"none\"");
      p += strlen(dev);
      replaced++;
    } else {
      none[o++] = *p++;
    }
  }
  none[o] = 0;
  CHECK(replaced == 2);
  /* fsdp refuses the file as it is, naming the strategy to use */
  st_config *cfg = NULL;
  st_error err;
  st_error_clear(&err);
  st_cfg *scfg = NULL;
  st_result r = st_config_load_string(text, "ds", &cfg, &err);
  if (r == ST_OK) r = st_config_api()->get_object(st_config_root(cfg), "strategy", true, &scfg, &err);
  if (r == ST_OK) r = strategy("fsdp")->validate(scfg, st_config_api(), &err);
  CHECK(r == ST_ERR_CONFIG);
  CHECK_CONTAINS(err.message, "zero3_offload");
  st_config_free(cfg);

  mem_store init;
  store_init(&init, true);
  run_spec ref = {.strategy = "fsdp", .world = 2, .first_step = 1, .n_steps = 5, .gas = 2, .max_norm = 0.5,
                  .lr = 1e-2, .load = &init, .config = none, .resolve = true};
  run_spec spec = ref;
  spec.strategy = "zero3_offload";
  spec.config = text;
  spec.capture_log = true;
  if (run(&ref, fsdp_outs) && run(&spec, outs)) {
    compare_tol("ds_z3_cpuoffload.json: zero3_offload x2 vs fsdp", &spec, outs, as_reference(fsdp_outs, 2, 5),
                &FP32_TOL);
    /* both offloads on, and the persistent groups ("auto" = 80 elements) on the device */
    CHECK_MSG(find_line(outs[0].log, "7 parameter(s) of <= 80 elements kept whole"), "log:\n%s", outs[0].log);
    CHECK(outs[0].plan.host_bytes[0] > 0 && outs[0].plan.host_bytes[3] > 0 && outs[0].plan.device_bytes[3] == 0);
    CHECK_MSG(find_line(outs[0].log, "whole run (5 step(s))"), "log:\n%s", outs[0].log);
  }
  store_free(&init);
}

/* configuration: DeepSpeed's zero_optimization vocabulary for offload; NVMe-only settings and
 * what is not implemented are errors that name the key */
static void test_offload_config(void) {
  struct {
    const char *json, *expect, *expect2; /* expect NULL: accepted */
  } cases[] = {
      {"{\"zero_optimization\": {\"stage\": 3, \"offload_optimizer\": {\"device\": \"cpu\", \"pin_memory\": true, "
       "\"fast_init\": false, \"cpuadam_cores_perc\": 0.8, \"ratio\": 1.0}, \"offload_param\": {\"device\": \"cpu\", "
       "\"pin_memory\": true, \"buffer_count\": 5, \"buffer_size\": 100000000, \"max_in_cpu\": 1000000000}, "
       "\"overlap_comm\": true, \"contiguous_gradients\": true, \"sub_group_size\": 1e9, \"reduce_bucket_size\": 500, "
       "\"stage3_prefetch_bucket_size\": 400, \"stage3_param_persistence_threshold\": 100, "
       "\"stage3_max_live_parameters\": 1e9, \"stage3_max_reuse_distance\": 1e9, "
       "\"stage3_gather_16bit_weights_on_model_save\": true, \"round_robin_gradients\": true}}", NULL, NULL},
      {"{\"strategy\": {\"name\": \"zero3_offload\", \"cpu_offload\": {\"offload_params\": true}, "
       "\"sub_group_size\": 100, \"report_steps\": 0}}", NULL, NULL},
      {"{\"zero_optimization\": {\"stage\": 3, \"cpu_offload\": true}}", NULL, NULL},
      {"{\"zero_optimization\": {\"stage\": 3, \"offload_optimizer\": {\"device\": \"none\"}, \"offload_param\": "
       "{\"device\": \"none\"}}}", NULL, NULL},
      {"{\"zero_optimization\": {\"stage\": 3, \"offload_optimizer\": {\"device\": \"nvme\", \"nvme_path\": "
       "\"/local_nvme\"}}}", "zero_optimization.offload_optimizer.device", "not supported yet"},
      {"{\"zero_optimization\": {\"stage\": 3, \"offload_param\": {\"device\": \"nvme\"}}}",
       "zero_optimization.offload_param.device", "not supported yet"},
      {"{\"zero_optimization\": {\"stage\": 3}, \"aio\": {\"block_size\": 1048576, \"queue_depth\": 8}}", "aio",
       "not supported yet"},
      {"{\"zero_optimization\": {\"stage\": 2, \"offload_optimizer\": {\"device\": \"cpu\"}}}", "zero_optimization.stage",
       "stage 3 only"},
      {"{\"strategy\": {\"name\": \"zero3_offload\", \"sharding_strategy\": \"SHARD_GRAD_OP\"}}", "FULL_SHARD",
       "not supported yet"},
      {"{\"zero_optimization\": {\"stage\": 3, \"offload_optimizer\": {\"device\": \"none\"}, \"offload_param\": "
       "{\"device\": \"cpu\"}}}", "zero_optimization.offload_param", "offload_optimizer.device"},
      {"{\"zero_optimization\": {\"stage\": 3, \"offload_optimizer\": {\"device\": \"cpu\", \"ratio\": 0.3}}}",
       "zero_optimization.offload_optimizer.ratio", "partial offload"},
      {"{\"zero_optimization\": {\"stage\": 3, \"offload_optimizer\": {\"device\": \"cpu\", \"super_offload\": true}}}",
       "super_offload", "not supported yet"},
      {"{\"zero_optimization\": {\"stage\": 3, \"sub_group_size\": 0}}", "zero_optimization.sub_group_size", ">= 1"},
      {"{\"strategy\": {\"name\": \"zero3_offload\", \"report_steps\": -1}}", "report_steps", "0: report"},
      {"{\"strategy\": {\"name\": \"zero3_offload\", \"sub_grup_size\": 10}}", "sub_grup_size", NULL},
      {"{\"zero_optimization\": {\"stage\": 3, \"zero_quantized_weights\": true}}", "zero_quantized_weights",
       "zero3_offload"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    st_config *cfg = NULL;
    st_error err;
    st_error_clear(&err);
    st_result r = st_config_load_string(cases[i].json, "test", &cfg, &err);
    st_cfg *scfg = NULL;
    if (r == ST_OK) r = st_config_api()->get_object(st_config_root(cfg), "strategy", true, &scfg, &err);
    if (r == ST_OK) r = strategy("zero3_offload")->validate(scfg, st_config_api(), &err);
    if (!cases[i].expect) {
      CHECK_MSG(r == ST_OK, "offload case %zu rejected: %s: %s", i, err.where, err.message);
    } else {
      CHECK_MSG(r == ST_ERR_CONFIG, "offload case %zu: expected a config error naming %s, got %d", i, cases[i].expect,
                (int)r);
      char both[ST_ERROR_WHERE_MAX + ST_ERROR_MESSAGE_MAX + 4];
      snprintf(both, sizeof both, "%s: %s", err.where, err.message);
      const char *text = both;
      CHECK_CONTAINS(text, cases[i].expect);
      if (cases[i].expect2) CHECK_CONTAINS(text, cases[i].expect2);
    }
    st_config_free(cfg);
  }
}

/* memory plan: optimizer state and masters on the host (ZeRO-Offload's 4 + 8 bytes per trainable
 * element / N, here with an fp32 host copy as the master), nothing of it on the device; with
 * offload_param the parameter shards too; the measured peak (host and device are one memory here)
 * within the plan's total + 10% */
static void test_offload_memory_plan(void) {
  mem_store init;
  store_init(&init, true);
  int64_t trainable = 0, all = 0;
  for (int u = 0; u < N_UNITS; u++)
    for (int k = 0; k < units[u].n_params; k++) {
      all += numel(&units[u].params[k]);
      if (units[u].params[k].flags & T) trainable += numel(&units[u].params[k]);
    }
  for (int param = 0; param < 2; param++) {
    int world = 2;
    run_spec spec = {.strategy = "zero3_offload", .world = world, .first_step = 1, .n_steps = 1, .gas = 1, .lr = 1e-2,
                     .load = &init,
                     .config = param ? "{\"zero_optimization\": {\"offload_param\": {\"device\": \"cpu\"}, "
                                       "\"sub_group_size\": 16}}"
                                     : "{\"zero_optimization\": {\"sub_group_size\": 16}}"};
    if (!run(&spec, outs)) continue;
    double slack = 2.0 * N_UNITS * (16.0 * world * 4 + 64);
    for (int r = 0; r < world; r++) {
      const st_memory_plan *p = &outs[r].plan;
      CHECK(p->device_bytes[2] == 0 && p->device_bytes[3] == 0);
      CHECK(p->host_bytes[3] >= 8.0 * trainable / world && p->host_bytes[3] <= 8.0 * trainable / world + 2 * slack);
      if (param) /* fp32 windows on the host are the optimizer's master: no copy */
        CHECK(p->host_bytes[2] == 0);
      else /* the host copy of the device shard that the CPU optimizer updates */
        CHECK(p->host_bytes[2] >= 4.0 * trainable / world && p->host_bytes[2] <= 4.0 * trainable / world + slack);
      CHECK(p->host_bytes[1] <= 2 * (16 * 4 + 64) + 128); /* two gradient tiles of sub_group_size */
      if (param) {
        CHECK(p->device_bytes[0] == 0);
        CHECK(p->host_bytes[0] >= 4.0 * all / world && p->host_bytes[0] <= 4.0 * all / world + slack);
      } else {
        CHECK(p->host_bytes[0] == 0);
        CHECK(p->device_bytes[0] >= 4.0 * all / world && p->device_bytes[0] <= 4.0 * all / world + slack);
      }
      uint64_t total = 0;
      for (int i = 0; i < ST_MEMORY_CATEGORIES; i++) total += p->device_bytes[i] + p->host_bytes[i];
      CHECK_MSG((double)outs[r].peak_bytes <= 1.1 * (double)total + 4096, "offload_param %d rank %d: measured peak %llu "
                "> plan %llu + 10%%", param, r, (unsigned long long)outs[r].peak_bytes, (unsigned long long)total);
    }
  }
  store_free(&init);
}

/* ---- the same runs over a real backend: N forked processes, Gloo on loopback ---- */

static int gloo_rank(const run_spec *spec, int rank, int port, rank_out *out) {
  alarm(240);
  st_error err;
  st_error_clear(&err);
  st_store *store = NULL;
  st_plugin plugin;
  memset(&plugin, 0, sizeof plugin);
  st_comm *comm = NULL;
  out->result = st_store_connect("127.0.0.1", port, "strategies-test", rank, 10000, &store, &err);
  if (out->result == ST_OK) out->result = st_plugin_load(ST_PLUGIN_COMM, "gloo", NULL, 0, &plugin, &err);
  st_comm_init_args args = {.struct_size = sizeof args, .rank = rank, .world_size = spec->world, .local_rank = rank,
                            .local_world_size = spec->world, .device = {ST_DEVICE_CPU, 0}, .store = store,
                            .timeout_ms = 60000};
  if (out->result == ST_OK) out->result = plugin.v.comm->init(NULL, &args, &comm, &err);
  if (out->result == ST_OK) {
    rank_args a = {.spec = spec, .sp = strategy(spec->strategy), .comm = plugin.v.comm, .world_comm = comm,
                   .rank = rank, .out = out};
    rank_main(&a);
    plugin.v.comm->finalize(comm);
  } else {
    out->err = err;
  }
  if (plugin.handle) st_plugin_unload(&plugin);
  if (store) st_store_close(store);
  return out->result == ST_OK ? 0 : 1;
}

static bool run_gloo(const run_spec *spec, rank_out *shared) {
  st_error err;
  st_store_server *srv = NULL;
  if (st_store_server_start("127.0.0.1", 0, "strategies-test", &srv, &err) != ST_OK) {
    fprintf(stderr, "store: %s\n", err.message);
    CHECK(false);
    return false;
  }
  int port = st_store_server_port(srv);
  pid_t pids[8];
  memset(shared, 0, sizeof *shared * (size_t)spec->world);
  for (int r = 0; r < spec->world; r++) {
    pids[r] = fork();
    if (pids[r] == 0) _exit(gloo_rank(spec, r, port, &shared[r]));
  }
  bool ok = true;
  for (int r = 0; r < spec->world; r++) {
    int status = 0;
    waitpid(pids[r], &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      fprintf(stderr, "%s on %d (gloo), rank %d: status 0x%x: %s: %s\n", spec->strategy, spec->world, r, status,
              shared[r].err.where, shared[r].err.message);
      ok = false;
    }
  }
  st_store_server_stop(srv);
  CHECK_MSG(ok, "%s on %d gloo ranks failed", spec->strategy, spec->world);
  return ok;
}

/* a rank dies in the middle of a step: the others must fail with an error naming the strategy's
 * collective, not hang */
static void gloo_kill(const char *strategy_name, rank_out *shared) {
  mem_store init;
  store_init(&init, true);
  run_spec spec = {.strategy = strategy_name, .world = 3, .first_step = 1, .n_steps = 3, .gas = 2, .lr = 1e-2,
                   .load = &init, .kill_step = 2};
  st_error err;
  st_store_server *srv = NULL;
  if (st_store_server_start("127.0.0.1", 0, "strategies-test", &srv, &err) != ST_OK) {
    CHECK(false);
    return;
  }
  int port = st_store_server_port(srv);
  pid_t pids[3];
  memset(shared, 0, sizeof *shared * 3);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (int r = 0; r < 3; r++) {
    pids[r] = fork();
    if (pids[r] == 0) _exit(gloo_rank(&spec, r, port, &shared[r]));
  }
  for (int r = 0; r < 3; r++) {
    int status = 0;
    waitpid(pids[r], &status, 0);
    if (r == 2) {
      CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL, "the victim did not die by SIGKILL (0x%x)", status);
      continue;
    }
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 1, "rank %d: status 0x%x", r, status);
    CHECK(shared[r].result == ST_ERR_COMM || shared[r].result == ST_ERR_TIMEOUT);
    CHECK_CONTAINS(shared[r].err.message, strategy_name);
    fprintf(stderr, "%s, rank %d after the death of rank 2: %s: %s\n", strategy_name, r, shared[r].err.where,
            shared[r].err.message);
  }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  CHECK_MSG(t1.tv_sec - t0.tv_sec < 90, "the survivors took %lld s to fail", (long long)(t1.tv_sec - t0.tv_sec));
  st_store_server_stop(srv);
  store_free(&init);
}

static int gloo_main(void) {
  signal(SIGPIPE, SIG_IGN);
  rank_out *shared = mmap(NULL, sizeof(rank_out) * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shared == MAP_FAILED) return 1;
  struct {
    const char *strategy;
    int world;
    const char *config;
    bool recompute;
    const char *label;
  } cases[] = {
      {"ddp", 2, NULL, false, "gloo: ddp 2 ranks"},
      {"ddp", 4, "{\"strategy\": {\"name\": \"ddp\", \"reduce_bucket_size\": 1}}", false,
       "gloo: ddp 4 ranks, bucket per unit"},
      {"fsdp", 2, NULL, false, "gloo: fsdp 2 ranks"},
      {"fsdp", 4, NULL, true, "gloo: fsdp 4 ranks, checkpointing"},
      {"fsdp", 3, "{\"zero_optimization\": {\"stage\": 2}}", false, "gloo: fsdp 3 ranks SHARD_GRAD_OP"},
      {"fsdp", 4, "{\"zero_optimization\": {\"stage\": 3, \"stage3_param_persistence_threshold\": 12}}", true,
       "gloo: fsdp 4 ranks, persistence 12"},
      {"zero3_offload", 2, NULL, false, "gloo: zero3_offload 2 ranks"},
      {"zero3_offload", 3, "{\"zero_optimization\": {\"stage\": 3, \"sub_group_size\": 7, \"offload_param\": "
       "{\"device\": \"cpu\"}, \"stage3_param_persistence_threshold\": 12}}", true,
       "gloo: zero3_offload 3 ranks, param, tile 7"},
  };
  mem_store init;
  store_init(&init, true);
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    run_spec ref = {.strategy = "local", .world = 1, .first_step = 1, .n_steps = 5, .gas = 2, .max_norm = 0.5,
                    .lr = 1e-2, .recompute = cases[c].recompute, .load = &init};
    run_spec spec = ref;
    spec.strategy = cases[c].strategy;
    spec.world = cases[c].world;
    spec.config = cases[c].config;
    if (!run(&ref, &ref_out) || !run_gloo(&spec, shared)) continue;
    compare(cases[c].label, &spec, shared, &ref_out);
  }
  store_free(&init);
  gloo_kill("ddp", shared);
  gloo_kill("fsdp", shared);
  munmap(shared, sizeof(rank_out) * 8);
  for (int i = 0; i < N_PLUGINS; i++) st_plugin_unload(&plugins[i]);
  return st_test_finish("test_strategies gloo");
}

/* ---- benchmark (not a test): `test_strategies bench [work]` --------------------------------- */

#define BENCH_UNITS 8
static char bench_names[BENCH_UNITS][2][32];
static st_param_desc bench_params[BENCH_UNITS][2];
static st_unit_desc bench_units[BENCH_UNITS];

static double median_step(const rank_out *o, int n) {
  double v[MAX_STEPS];
  int m = 0;
  for (int i = 1; i < n; i++) v[m++] = o->step_s[i]; /* step 1 warms up */
  for (int i = 1; i < m; i++)
    for (int j = i; j > 0 && v[j] < v[j - 1]; j--) {
      double x = v[j];
      v[j] = v[j - 1];
      v[j - 1] = x;
    }
  return v[m / 2];
}

static int bench_main(int work) {
  signal(SIGPIPE, SIG_IGN);
  int64_t total = 0;
  for (int u = 0; u < BENCH_UNITS; u++) {
    snprintf(bench_names[u][0], 32, "block.%d.weight", u);
    snprintf(bench_names[u][1], 32, "block.%d.bias", u);
    bench_params[u][0] = (st_param_desc){bench_names[u][0], 2, {1024, 512}, T};
    bench_params[u][1] = (st_param_desc){bench_names[u][1], 1, {512}, T | ND};
    bench_units[u] = (st_unit_desc){"block", 2, bench_params[u]};
    total += 1024 * 512 + 512;
  }
  static st_model_desc bench_model;
  bench_model = (st_model_desc){.n_units = BENCH_UNITS, .units = bench_units, .compute_dtype = ST_F32,
                                .hidden_size = 512, .n_params_total = total};
  cur = &bench_model;
  rank_out *shared = mmap(NULL, sizeof(rank_out) * 8, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (shared == MAP_FAILED) return 1;
  mem_store init;
  store_init(&init, true);
  const int steps = 7;
  run_spec local = {.strategy = "local", .world = 1, .first_step = 1, .n_steps = steps, .gas = 1, .lr = 1e-3,
                    .load = &init, .bench_work = work};
  printf("benchmark: %d units x %lld parameters (%.1f MB fp32), %d FMAs per element in backward, AdamW, "
         "median of steps 2-%d, rank 0\n", BENCH_UNITS, (long long)(total / BENCH_UNITS), 4.0 * total / 1e6, work,
         steps);
  printf("%-38s %10s %14s %14s %14s\n", "run", "step ms", "plan MiB", "+ host MiB", "peak MiB");
  if (run(&local, &ref_out))
    printf("%-38s %10.1f %14.2f %14.2f %14.2f\n", "local, 1 rank", 1e3 * median_step(&ref_out, steps),
           ref_out.plan_bytes / 1048576.0, 0.0, ref_out.peak_bytes / 1048576.0);
  struct {
    const char *strategy, *config, *label;
  } cases[] = {
      {"ddp", "{\"strategy\": {\"name\": \"ddp\", \"reduce_bucket_size\": 1000000}}", "ddp, 2 ranks, overlap"},
      {"ddp", "{\"strategy\": {\"name\": \"ddp\", \"reduce_bucket_size\": 1000000, \"overlap_comm\": false}}",
       "ddp, 2 ranks, sequential"},
      {"fsdp", NULL, "fsdp, 2 ranks, overlap + prefetch"},
      {"fsdp", "{\"strategy\": {\"name\": \"fsdp\", \"overlap_comm\": false}}", "fsdp, 2 ranks, sequential"},
      {"zero3_offload", NULL, "zero3_offload, 2 ranks (optimizer)"},
      {"zero3_offload", "{\"zero_optimization\": {\"offload_param\": {\"device\": \"cpu\"}}}",
       "zero3_offload, 2 ranks, + offload_param"},
      {"zero3_offload", "{\"zero_optimization\": {\"sub_group_size\": 65536, \"offload_param\": "
       "{\"device\": \"cpu\"}}}", "zero3_offload, 2 ranks, param, tile 64K"},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
    run_spec spec = local;
    spec.strategy = cases[c].strategy;
    spec.world = 2;
    spec.config = cases[c].config;
    if (run_gloo(&spec, shared)) {
      uint64_t host_plan = 0;
      for (int i = 0; i < ST_MEMORY_CATEGORIES; i++) host_plan += shared[0].plan.host_bytes[i];
      printf("%-38s %10.1f %14.2f %14.2f %14.2f\n", cases[c].label, 1e3 * median_step(&shared[0], steps),
             shared[0].plan_bytes / 1048576.0, host_plan / 1048576.0, shared[0].peak_bytes / 1048576.0);
    }
    fflush(stdout);
  }
  store_free(&init);
  munmap(shared, sizeof(rank_out) * 8);
  for (int i = 0; i < N_PLUGINS; i++) st_plugin_unload(&plugins[i]);
  return 0;
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "gloo")) return gloo_main();
  if (argc > 1 && !strcmp(argv[1], "bench")) return bench_main(argc > 2 ? atoi(argv[2]) : 8);
  test_config();
  test_equivalence();
  test_precision();
  test_schedule();
  test_resharding();
  test_memory_plan();
  test_missing_state();
  test_offload_config();
  test_offload_equivalence();
  test_offload_resharding();
  test_offload_ds_config();
  test_offload_memory_plan();
  for (int i = 0; i < N_PLUGINS; i++) st_plugin_unload(&plugins[i]);
  return st_test_finish("test_strategies");
}
