/* trainer.c — the step loop: data -> units forward -> loss -> units backward -> strategy step.
 *
 * The trainer owns activation memory: the carries at every unit boundary, each unit's saved set
 * (or, under activation checkpointing, one reusable saved buffer and a replay of the unit's
 * forward before its backward), two gradient carries used in turn, and one shared workspace. */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "callbacks.h"
#include "checkpoint.h"
#include "config.h"
#include "cpu_ops.h"
#include "data.h"
#include "host_impl.h"
#include "launch.h"
#include "local_comm.h"
#include "local_strategy.h"
#include "metrics.h"
#include "optim.h"
#include "plugin.h"
#include "safetensors.h"
#include "trainer.h"

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* a grow-only device buffer */
typedef struct arena {
  char *base;
  size_t cap;
} arena;

static st_result arena_reserve(const st_host *h, arena *a, size_t bytes, const char *category, st_error *err) {
  if (bytes <= a->cap) return ST_OK;
  h->free(h, h->device, a->base);
  a->base = h->alloc(h, h->device, bytes, category);
  a->cap = a->base ? bytes : 0;
  if (!a->base)
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, category,
                        "cannot allocate %.1f MiB of %s; lower train_micro_batch_size_per_gpu or enable "
                        "activation checkpointing",
                        (double)bytes / (1 << 20), category);
  return ST_OK;
}

typedef struct trainer {
  st_run_options opt;
  st_config *cfg;
  st_settings s;
  st_logger *logger;
  const st_ops *ops;
  st_host *host;
  st_plugin model_plugin, strategy_plugin;
  const st_model_plugin_v1 *model;
  const st_strategy_plugin_v1 *strategy;
  void *mctx, *sctx;
  const st_model_desc *desc;
  int *unit_order;
  int rank, world_size, local_rank, local_world_size;
  /* the process group: the store ranks meet through, the comm backend and its world group */
  st_dist_env denv;
  st_store_server *store_server;
  st_store *store;
  st_plugin comm_plugin;
  const st_comm_plugin_v1 *comm;
  st_comm *world;
  st_dataset *data;
  st_dataset *val_data;       /* NULL without data.validation */
  int64_t val_batches;        /* per rank, one sample each */
  double best_val;            /* best val_loss so far (NAN before the first) */
  int64_t evals_since_best;   /* early stopping */
  bool eval_only;             /* `strata eval`: no training data, no outputs */
  st_safetensors_writer *dump;/* `strata eval --dump` */
  st_on_save_jobs *jobs;      /* train.on_save commands still running */
  st_metrics *metrics;
  st_progress *progress;
  st_loss_scaler scaler;
  st_trainer_state ts;
  /* activation memory */
  arena carry_mem, saved_mem, dcarry_mem, work_mem;
  st_carry_layout *layouts; /* n_units + 1 */
  st_tensor *carries;       /* (n_units + 1) * ST_MAX_CARRY, data set per micro-step */
  size_t *saved_bytes;      /* per unit */
  size_t *saved_off;        /* per unit, into saved_mem */
  double fwd_flops;         /* of the last micro-batch */
} trainer;

/* ---- which plugin call is in flight (for the CLI's fatal-signal report), and whose error ---- */

static void call_enter(const trainer *t, const st_plugin *p, const char *method) {
  st_call_site *s = t->opt.call_site;
  if (!s) return;
  int d = s->depth;
  if (d >= 0 && d < ST_CALL_DEPTH) {
    s->at[d].kind = st_plugin_kind_name(p->kind);
    s->at[d].name = p->header && p->header->name ? p->header->name : "?";
    s->at[d].path = p->path;
    s->at[d].method = method;
  }
  atomic_signal_fence(memory_order_seq_cst); /* the entry is complete before depth publishes it */
  s->depth = d + 1;
}

static st_result call_leave(const trainer *t, st_result r) {
  if (t->opt.call_site) t->opt.call_site->depth--;
  return r;
}

/* MODEL_CALL(t, "init", t->model->init(...)) evaluates to the call's st_result; the _VOID forms
 * take any expression (a void call, an assignment). */
#define MODEL_CALL(t, method, expr) (call_enter((t), &(t)->model_plugin, (method)), call_leave((t), (expr)))
#define STRATEGY_CALL(t, method, expr) (call_enter((t), &(t)->strategy_plugin, (method)), call_leave((t), (expr)))
#define MODEL_CALL_VOID(t, method, expr) \
  (call_enter((t), &(t)->model_plugin, (method)), (expr), (void)call_leave((t), ST_OK))
#define STRATEGY_CALL_VOID(t, method, expr) \
  (call_enter((t), &(t)->strategy_plugin, (method)), (expr), (void)call_leave((t), ST_OK))

/* A plugin method failed: keep its message and add which plugin, method and file it came from. A
 * plugin that returned an error without filling err gets a message saying so. */
static st_result plugin_failed(const st_plugin *p, const char *method, st_result r, st_error *err) {
  if (err->code == ST_OK || !err->message[0])
    st_error_set(err, r, "", "%s() returned \"%s\" without an error message", method, st_result_string(r));
  size_t n = strlen(err->message);
  snprintf(err->message + n, sizeof err->message - n, "\n  (from %s plugin \"%s\", %s(), %s)",
           st_plugin_kind_name(p->kind), p->header && p->header->name ? p->header->name : "?", method, p->path);
  return err->code;
}

static void log_sink(void *user, st_log_level level, const char *msg) { st_log((st_logger *)user, level, "%s", msg); }

int st_builtin_plugins(st_plugin_builtin *out) {
  out[0] = (st_plugin_builtin){ST_PLUGIN_STRATEGY, "local", st_local_strategy()};
  out[1] = (st_plugin_builtin){ST_PLUGIN_COMM, "local", st_local_comm()};
  return ST_N_BUILTINS;
}

static st_result load_strategy_cb(void *user, const char *name, const st_strategy_plugin_v1 **out, st_error *err) {
  (void)user;
  st_plugin p;
  st_plugin_builtin b[ST_N_BUILTINS];
  ST_CHECK(st_plugin_load(ST_PLUGIN_STRATEGY, name, b, st_builtin_plugins(b), &p, err));
  *out = p.v.strategy; /* the handle stays open for the life of the process: strategies are few */
  return ST_OK;
}

/* a load failure for a configured name points at the config key that named it */
static st_result load_configured(st_plugin_kind kind, const char *ref, const char *key, const st_plugin_builtin *b,
                                 int nb, st_plugin *out, st_error *err) {
  st_result r = st_plugin_load(kind, ref, b, nb, out, err);
  if (r != ST_OK && err && !err->where[0]) snprintf(err->where, sizeof err->where, "%s", key);
  return r;
}

/* rank and world from `strata launch`, torchrun, Open MPI, PMI or Slurm variables */
static st_result read_world(trainer *t, st_error *err) {
  ST_CHECK(st_dist_env_detect(NULL, &t->denv, err));
  t->rank = t->denv.rank;
  t->world_size = t->denv.world_size;
  t->local_rank = t->denv.local_rank;
  t->local_world_size = t->denv.local_world_size;
  return ST_OK;
}

/* a collective barrier over the world group; a no-op for one process */
static st_result world_barrier(void *user, st_error *err) {
  trainer *t = user;
  if (!t->world) return ST_OK;
  return t->comm->barrier(t->world, err);
}

/* The store (rank 0 or the launcher hosts it), the comm backend and the world group. One process
 * uses the built-in local backend and no store. */
static st_result setup_world(trainer *t, st_error *err) {
  const char *backend = t->s.comm_backend;
  if (t->world_size == 1 && (!strcmp(backend, "auto") || !strcmp(backend, "local"))) {
    t->comm = st_local_comm();
  } else {
    if (!strcmp(backend, "auto")) backend = t->s.device_type == ST_DEVICE_CUDA ? "nccl" : "gloo";
    ST_CHECK(st_dist_store_open(&t->denv, t->s.comm_timeout_ms, &t->store_server, &t->store, err));
    st_plugin_builtin b[ST_N_BUILTINS];
    ST_CHECK(load_configured(ST_PLUGIN_COMM, backend, "device.comm", b, st_builtin_plugins(b), &t->comm_plugin, err));
    t->comm = t->comm_plugin.v.comm;
  }
  st_comm_init_args a = {.struct_size = sizeof a, .rank = t->rank, .world_size = t->world_size,
                         .local_rank = t->local_rank, .local_world_size = t->local_world_size,
                         .device = t->host->device, .store = t->store, .timeout_ms = t->s.comm_timeout_ms,
                         .interface = t->s.comm_interface};
  ST_CHECK(t->comm->init(t->host, &a, &t->world, err));
  t->host->comm = t->comm;
  t->host->world = t->world;
  return ST_OK;
}

/* `failed`: this rank is leaving on an error; it leaves the store as a crash would, so the other
 * ranks fail at once naming it instead of waiting in a collective until the timeout */
static void trainer_free(trainer *t, bool failed) {
  st_logger_set_progress(t->logger, NULL);
  if (t->progress) st_progress_finish(t->progress);
  st_on_save_free(t->jobs);
  st_metrics_close(t->metrics);
  st_dataset_close(t->data);
  st_dataset_close(t->val_data);
  st_safetensors_writer_free(t->dump);
  if (t->host) {
    const st_host *h = t->host;
    h->free(h, h->device, t->carry_mem.base);
    h->free(h, h->device, t->saved_mem.base);
    h->free(h, h->device, t->dcarry_mem.base);
    h->free(h, h->device, t->work_mem.base);
  }
  if (t->strategy && t->sctx) STRATEGY_CALL_VOID(t, "finalize", t->strategy->finalize(t->sctx));
  if (t->model && t->mctx) MODEL_CALL_VOID(t, "finalize", t->model->finalize(t->mctx));
  if (t->comm && t->world) t->comm->finalize(t->world);
  st_plugin_unload(&t->comm_plugin);
  if (failed && t->store) {
    st_store_abandon(t->store);
    st_store_server_stop(t->store_server);
  } else {
    st_dist_store_close(&t->denv, t->store_server, t->store, t->s.comm_timeout_ms);
  }
  st_plugin_unload(&t->strategy_plugin);
  st_plugin_unload(&t->model_plugin);
  st_host_destroy(t->host);
  if (t->ops) st_cpu_ops_destroy(t->ops);
  free(t->layouts);
  free(t->carries);
  free(t->saved_bytes);
  free(t->saved_off);
  free(t->unit_order);
  st_config_free(t->cfg);
  st_logger_free(t->logger);
}

/* ---- plugin set-up shared by train and validate ------------------------------------------- */

static st_result setup_plugins(trainer *t, st_error *err) {
  st_settings *s = &t->s;
  ST_CHECK(st_config_load(t->opt.config_path, t->opt.deepspeed_path, t->opt.sets, t->opt.n_sets, &t->cfg, err));
  ST_CHECK(st_config_extract(t->cfg, s, err));
  ST_CHECK(read_world(t, err));
  /* `strata launch` prefixes every child line with its rank already */
  bool launcher_prefixes = strcmp(t->denv.source, "strata launch") == 0;
  t->logger = st_logger_create(t->opt.console ? t->opt.console : stderr, t->rank,
                               launcher_prefixes ? 1 : t->world_size, ST_LOG_INFO);
  if (strcmp(t->denv.source, "single process") != 0) { /* where rank and world came from */
    char where[512];
    st_dist_env_describe(&t->denv, where, sizeof where);
    st_log(t->logger, ST_LOG_INFO, "%s", where);
  }
  if (s->device_type != ST_DEVICE_CPU)
    return st_error_set(err, ST_ERR_UNSUPPORTED, "device.type",
                        "\"cuda\" needs the CUDA backend, which this build does not have; use \"cpu\"");
  ST_CHECK(st_cpu_ops_create(s->threads, &t->ops, err));

  const char *model_ref = s->model_plugin ? s->model_plugin : s->model_name;
  if (!model_ref) return st_error_set(err, ST_ERR_CONFIG, "model.name", "no model: set model.name (or model.plugin)");
  ST_CHECK(load_configured(ST_PLUGIN_MODEL, model_ref, s->model_plugin ? "model.plugin" : "model.name", NULL, 0,
                           &t->model_plugin, err));
  t->model = t->model_plugin.v.model;

  st_plugin_builtin b[ST_N_BUILTINS];
  int nb = st_builtin_plugins(b);
  const char *strategy_ref = s->strategy_plugin ? s->strategy_plugin : (s->strategy_name ? s->strategy_name : "local");
  ST_CHECK(load_configured(ST_PLUGIN_STRATEGY, strategy_ref, s->strategy_plugin ? "strategy.plugin" : "strategy.name",
                           b, nb, &t->strategy_plugin, err));
  t->strategy = t->strategy_plugin.v.strategy;

  st_host_options ho = {.ops = t->ops, .cpu_ops = t->ops, .log_sink = log_sink, .log_user = t->logger,
                        .optimizer = &s->optimizer, .cfg = st_config_api(), .load_strategy = load_strategy_cb,
                        .rank = t->rank, .world_size = t->world_size, .local_rank = t->local_rank,
                        .local_world_size = t->local_world_size};
  ST_CHECK(st_host_create(&ho, &t->host, err));
  ST_CHECK(setup_world(t, err));

  st_cfg *model_cfg = st_config_node(t->cfg, "model");
  st_result r = MODEL_CALL(t, "validate", t->model->validate(model_cfg, st_config_api(), err));
  if (r != ST_OK) return plugin_failed(&t->model_plugin, "validate", r, err);
  r = MODEL_CALL(t, "init", t->model->init(t->host, model_cfg, &t->mctx, err));
  if (r != ST_OK) return plugin_failed(&t->model_plugin, "init", r, err);
  MODEL_CALL_VOID(t, "describe", t->desc = t->model->describe(t->mctx));
  ST_CHECK(st_config_resolve(t->cfg, t->world_size, t->desc->hidden_size, s, err));
  st_cfg *strategy_cfg; /* created when absent, so the strategy can still reach the root */
  ST_CHECK(st_config_api()->get_object(st_config_root(t->cfg), "strategy", true, &strategy_cfg, err));
  r = STRATEGY_CALL(t, "validate", t->strategy->validate(strategy_cfg, st_config_api(), err));
  if (r != ST_OK) return plugin_failed(&t->strategy_plugin, "validate", r, err);
  return ST_OK;
}

st_result st_validate(const st_run_options *opt, FILE *out, st_error *err) {
  trainer t = {.opt = *opt};
  st_result r = setup_plugins(&t, err);
  if (r == ST_OK) {
    st_config_print_resolved(t.cfg, out);
    fprintf(out, "\nmodel %s (%s): %d units, %lld parameters; strategy %s (%s)\n", t.model->header.name,
            t.model_plugin.path, t.desc->n_units, (long long)t.desc->n_params_total, t.strategy->header.name,
            t.strategy_plugin.path);
  }
  trainer_free(&t, r != ST_OK);
  return r;
}

/* ---- initial and resumed state ------------------------------------------------------------ */

typedef struct source_reader {
  st_state_reader pub;
  trainer *t;
  st_tensor_store *ckpt, *weights;
} source_reader;

static bool locate_param(const st_model_desc *d, const st_param_desc *p, int *unit, int *index) {
  for (int u = 0; u < d->n_units; u++)
    for (int k = 0; k < d->units[u].n_params; k++)
      if (&d->units[u].params[k] == p || !strcmp(d->units[u].params[k].name, p->name)) {
        *unit = u;
        *index = k;
        return true;
      }
  return false;
}

static st_result source_read(st_state_reader *sr, const st_param_desc *p, st_state_kind kind, int64_t offset,
                             int64_t count, st_dtype dt, void *dst, st_error *err) {
  source_reader *r = (source_reader *)sr;
  if (r->ckpt) {
    st_result res = st_tensor_store_read(r->ckpt, kind, p->name, offset, count, dt, dst, err);
    if (res != ST_ERR_NOT_FOUND) return res;
    st_error_clear(err);
  }
  if (kind != ST_STATE_PARAM) return ST_ERR_NOT_FOUND;
  if (r->weights && st_tensor_store_has(r->weights, ST_STATE_PARAM, p->name, NULL, NULL))
    return st_tensor_store_read(r->weights, kind, p->name, offset, count, dt, dst, err);
  int unit, index;
  if (!locate_param(r->t->desc, p, &unit, &index))
    return st_error_set(err, ST_ERR_INTERNAL, p->name, "the strategy asked for a parameter the model does not have");
  return MODEL_CALL(r->t, "init_param",
                    r->t->model->init_param(r->t->mctx, r->t->s.seed, unit, index, offset, count, dt, dst, err));
}

/* Every non-LoRA parameter must be in the weights with its shape, and nothing else may be there. */
static st_result check_weights(const st_model_desc *d, const st_tensor_store *w, const char *path, st_error *err) {
  char missing[600] = "", shapes[600] = "", unexpected[600] = "";
  int n_missing = 0, n_shapes = 0, n_unexpected = 0;
  for (int u = 0; u < d->n_units; u++)
    for (int k = 0; k < d->units[u].n_params; k++) {
      const st_param_desc *p = &d->units[u].params[k];
      int64_t shape[ST_MAX_DIMS];
      int ndim = 0;
      if (!st_tensor_store_has(w, ST_STATE_PARAM, p->name, shape, &ndim)) {
        if (p->flags & ST_PARAM_LORA) continue;
        if (n_missing++ < 3)
          snprintf(missing + strlen(missing), sizeof missing - strlen(missing), "%s'%s'", n_missing > 1 ? ", " : "",
                   p->name);
        continue;
      }
      bool same = ndim == p->ndim;
      for (int i = 0; same && i < ndim; i++) same = shape[i] == p->shape[i];
      if (!same && n_shapes++ < 3) {
        char a[96], b[96];
        snprintf(shapes + strlen(shapes), sizeof shapes - strlen(shapes), "%s'%s' is %s, the model needs %s",
                 n_shapes > 1 ? "; " : "", p->name, st_shape_str(shape, ndim, a, sizeof a),
                 st_shape_str(p->shape, p->ndim, b, sizeof b));
      }
    }
  for (int i = 0; i < st_tensor_store_param_count(w); i++) {
    const char *name = st_tensor_store_param_name(w, i);
    bool known = false;
    for (int u = 0; u < d->n_units && !known; u++)
      for (int k = 0; k < d->units[u].n_params && !known; k++) known = !strcmp(d->units[u].params[k].name, name);
    if (!known && n_unexpected++ < 3)
      snprintf(unexpected + strlen(unexpected), sizeof unexpected - strlen(unexpected), "%s'%s'",
               n_unexpected > 1 ? ", " : "", name);
  }
  if (!n_missing && !n_shapes && !n_unexpected) return ST_OK;
  char msg[1400] = "";
  if (n_missing)
    snprintf(msg + strlen(msg), sizeof msg - strlen(msg), "%d missing tensor(s): %s%s. ", n_missing, missing,
             n_missing > 3 ? ", ..." : "");
  if (n_shapes)
    snprintf(msg + strlen(msg), sizeof msg - strlen(msg), "%d mis-shaped: %s%s. ", n_shapes, shapes,
             n_shapes > 3 ? "; ..." : "");
  if (n_unexpected)
    snprintf(msg + strlen(msg), sizeof msg - strlen(msg), "%d unexpected tensor(s): %s%s. ", n_unexpected, unexpected,
             n_unexpected > 3 ? ", ..." : "");
  return st_error_set(err, ST_ERR_FORMAT, path, "%sNothing was loaded.", msg);
}

static st_result load_state(trainer *t, st_error *err) {
  source_reader sr = {.pub = {.read = source_read}, .t = t};
  sr.pub.self = &sr;
  st_result r = ST_OK;
  char dir[4096] = "";
  const char *resume = t->s.resume;
  char latest[4200];
  snprintf(latest, sizeof latest, "%s/latest", t->s.output_path);
  if (!resume && t->denv.restart_count > 0 && access(latest, F_OK) == 0) {
    st_log(t->logger, ST_LOG_INFO, "restart %d of the job: resuming from the latest checkpoint", t->denv.restart_count);
    resume = "latest";
  }
  if (resume) {
    r = st_ckpt_resolve(t->s.output_path, resume, dir, sizeof dir, err);
    if (r == ST_OK) r = st_ckpt_read_trainer_state(dir, &t->ts, err);
    if (r == ST_OK && t->ts.world_size != t->world_size)
      st_log(t->logger, ST_LOG_INFO, "resuming a %d-rank checkpoint on %d rank(s)", t->ts.world_size, t->world_size);
    if (r == ST_OK) r = st_tensor_store_open_checkpoint(dir, &sr.ckpt, err);
  }
  st_cfg *wnode = st_config_node(t->cfg, "model.weights");
  const char *weights = NULL;
  if (r == ST_OK && wnode) r = st_config_api()->get_string(st_config_node(t->cfg, "model"), "weights", NULL, &weights, err);
  if (r == ST_OK && weights) {
    r = st_tensor_store_open_weights(weights, &sr.weights, err);
    if (r == ST_OK) r = check_weights(t->desc, sr.weights, weights, err);
  }
  if (r == ST_OK) r = STRATEGY_CALL(t, "state_load", t->strategy->state_load(t->sctx, &sr.pub, err));
  st_tensor_store_close(sr.ckpt);
  st_tensor_store_close(sr.weights);
  if (r == ST_OK && dir[0]) {
    t->scaler.scale = t->ts.loss_scale;
    t->scaler.iteration = t->ts.scaler_iteration;
    t->scaler.last_overflow_iteration = t->ts.scaler_last_overflow;
    if (t->ts.scaler_hysteresis_left) t->scaler.hysteresis_left = t->ts.scaler_hysteresis_left;
    st_log(t->logger, ST_LOG_INFO, "resumed from %s at step %lld", dir, (long long)t->ts.step);
  }
  return r;
}

static int count_trainable(const st_model_desc *d) {
  int n = 0;
  for (int u = 0; u < d->n_units; u++)
    for (int i = 0; i < d->units[u].n_params; i++) n += (d->units[u].params[i].flags & ST_PARAM_TRAINABLE) != 0;
  return n;
}

static st_result save_checkpoint(trainer *t, st_error *err) {
  t->ts.loss_scale = t->scaler.scale;
  t->ts.scaler_iteration = t->scaler.iteration;
  t->ts.scaler_last_overflow = t->scaler.last_overflow_iteration;
  t->ts.scaler_hysteresis_left = t->scaler.hysteresis_left;
  t->ts.samples_seen = st_dataset_cursor(t->data) * t->world_size * t->s.micro_batch_size;
  st_ckpt_options co = {.output_path = t->s.output_path, .rank = t->rank, .world_size = t->world_size,
                        .keep_last = t->s.keep_last, .slow_write_ms = t->opt.ckpt_slow_write_ms,
                        .save_top_k = t->s.save_top_k, .monitor_max = t->s.monitor_max,
                        .barrier = world_barrier, .barrier_user = t, .n_param_tensors = count_trainable(t->desc)};
  char *config_json = st_config_to_json(t->cfg);
  st_result r = STRATEGY_CALL(t, "state_save", st_ckpt_save(&co, t->strategy, t->sctx, &t->ts, config_json, err));
  free(config_json);
  if (r == ST_OK) st_log(t->logger, ST_LOG_INFO, "saved checkpoint %s/step-%06lld", t->s.output_path, (long long)t->ts.step);
  if (r == ST_OK && t->s.on_save && t->rank == 0) {
    if (!t->jobs) t->jobs = st_on_save_create(t->s.on_save, t->logger, st_metrics_tensorboard(t->metrics));
    char ckpt[4200], samples[4200];
    snprintf(ckpt, sizeof ckpt, "%s/step-%06lld", t->s.output_path, (long long)t->ts.step);
    snprintf(samples, sizeof samples, "%s/samples/step-%06lld", t->s.output_path, (long long)t->ts.step);
    st_on_save_start(t->jobs, ckpt, samples, t->ts.step);
  }
  return r;
}

/* ---- one micro-step ------------------------------------------------------------------------ */

static st_tensor *carry_at(trainer *t, int boundary) { return &t->carries[(size_t)boundary * ST_MAX_CARRY]; }

/* size every buffer for this batch and point the carry tensors into them */
static st_result plan_activations(trainer *t, void *bctx, st_error *err) {
  const st_host *h = t->host;
  int U = t->desc->n_units;
  size_t carry_bytes = 0, saved_total = 0, saved_max = 0, work_max = 0, dslot[ST_MAX_CARRY] = {0};
  for (int b = 0; b <= U; b++) {
    ST_CHECK(MODEL_CALL(t, "carry_layout", t->model->carry_layout(t->mctx, bctx, b, &t->layouts[b], err)));
    for (int i = 0; i < t->layouts[b].n; i++) {
      size_t bytes = align64(st_tensor_nbytes(&t->layouts[b].t[i]));
      carry_bytes += bytes;
      if (bytes > dslot[i]) dslot[i] = bytes;
    }
  }
  for (int u = 0; u < U; u++) {
    size_t saved = 0, work = 0;
    ST_CHECK(MODEL_CALL(t, "unit_memory", t->model->unit_memory(t->mctx, bctx, u, &saved, &work, err)));
    t->saved_bytes[u] = align64(saved);
    t->saved_off[u] = t->s.activation_checkpointing ? 0 : saved_total;
    saved_total += t->saved_bytes[u];
    if (t->saved_bytes[u] > saved_max) saved_max = t->saved_bytes[u];
    if (work > work_max) work_max = work;
  }
  size_t dcarry_bytes = 0;
  for (int i = 0; i < ST_MAX_CARRY; i++) dcarry_bytes += dslot[i];
  ST_CHECK(arena_reserve(h, &t->carry_mem, carry_bytes + 64, "activations", err));
  ST_CHECK(arena_reserve(h, &t->saved_mem, (t->s.activation_checkpointing ? saved_max : saved_total) + 64,
                         "activations", err));
  ST_CHECK(arena_reserve(h, &t->dcarry_mem, 2 * dcarry_bytes + 64, "activation grads", err));
  ST_CHECK(arena_reserve(h, &t->work_mem, align64(work_max) + 64, "workspace", err));
  size_t off = 0;
  for (int b = 0; b <= U; b++)
    for (int i = 0; i < t->layouts[b].n; i++) {
      st_tensor *ct = &carry_at(t, b)[i];
      *ct = t->layouts[b].t[i];
      ct->data = t->carry_mem.base + off;
      off += align64(st_tensor_nbytes(ct));
    }
  return ST_OK;
}

/* gradient carries for boundary b live in half (b % 2) of dcarry_mem */
static void dcarry_at(trainer *t, int b, st_tensor *out) {
  size_t half = (t->dcarry_mem.cap - 64) / 2, off = 0;
  char *base = t->dcarry_mem.base + (size_t)(b % 2) * half;
  for (int i = 0; i < t->layouts[b].n; i++) {
    out[i] = t->layouts[b].t[i];
    out[i].data = base + off;
    size_t slot = 0;
    for (int bb = 0; bb <= t->desc->n_units; bb++)
      if (i < t->layouts[bb].n && align64(st_tensor_nbytes(&t->layouts[bb].t[i])) > slot)
        slot = align64(st_tensor_nbytes(&t->layouts[bb].t[i]));
    off += slot;
  }
}

typedef struct phase_times {
  double data, forward, backward, step;
} phase_times;

/* one unit's forward inside its strategy window; `saved` (NULL: nothing) receives what backward needs */
static st_result forward_unit(trainer *t, void *bctx, int u, void *saved, st_error *err) {
  const st_tensor *params;
  st_result r = STRATEGY_CALL(t, "pre_forward", t->strategy->pre_forward(t->sctx, u, &params, err));
  if (r == ST_OK)
    r = MODEL_CALL(t, "unit_forward", t->model->unit_forward(t->mctx, bctx, u, params, carry_at(t, u),
                                                            carry_at(t, u + 1), saved, t->work_mem.base, err));
  if (r == ST_OK) r = STRATEGY_CALL(t, "post_forward", t->strategy->post_forward(t->sctx, u, err));
  if (r != ST_OK) st_error_prefix(err, "forward of unit %s: ", t->desc->units[u].name);
  return r;
}

/* every unit's forward in the static order; `keep_saved` keeps what backward needs */
static st_result forward_units(trainer *t, void *bctx, bool keep_saved, st_error *err) {
  for (int i = 0; i < t->desc->n_units; i++) {
    int u = t->unit_order[i];
    ST_CHECK(forward_unit(t, bctx, u, keep_saved ? t->saved_mem.base + t->saved_off[u] : NULL, err));
  }
  return ST_OK;
}

static st_result micro_step(trainer *t, int64_t micro_index, bool last_micro, double grad_scale, st_loss *loss,
                            phase_times *pt, st_error *err) {
  const st_model_plugin_v1 *m = t->model;
  const st_strategy_plugin_v1 *sg = t->strategy;
  int U = t->desc->n_units;
  double t0 = now_s();
  st_batch batch;
  ST_CHECK(st_dataset_next(t->data, &batch, err));
  batch.seed = t->host->rng->u64(t->s.seed, 0x6261746368ull /* "batch" */, 0);
  /* rank r's micro-batch j is global micro-batch j * world + r (the data loader's sharding) */
  batch.first_sample = (micro_index * t->world_size + t->rank) * t->s.micro_batch_size;
  batch.step = t->ts.step;
  batch.training = true;
  void *bctx = NULL;
  ST_CHECK(MODEL_CALL(t, "batch_prepare", m->batch_prepare(t->mctx, &batch, &bctx, err)));
  st_result r = plan_activations(t, bctx, err);
  double t1 = now_s();
  pt->data += t1 - t0;
  bool ckpt = t->s.activation_checkpointing;
  if (r == ST_OK) r = forward_units(t, bctx, !ckpt, err);
  st_tensor dcarry[2][ST_MAX_CARRY];
  if (r == ST_OK) {
    dcarry_at(t, U, dcarry[U % 2]);
    r = MODEL_CALL(t, "loss", m->loss(t->mctx, bctx, carry_at(t, U), grad_scale, dcarry[U % 2], loss, err));
    if (r == ST_OK && m->forward_flops)
      MODEL_CALL_VOID(t, "forward_flops", t->fwd_flops = m->forward_flops(t->mctx, bctx) * batch.n_samples);
  }
  double t2 = now_s();
  pt->forward += t2 - t1;
  for (int i = U - 1; i >= 0 && r == ST_OK; i--) {
    int u = t->unit_order[i];
    void *saved = t->saved_mem.base + t->saved_off[u];
    const st_tensor *params;
    st_tensor *grads;
    if (ckpt) { /* replay the forward to rebuild this unit's saved activations */
      r = forward_unit(t, bctx, u, saved, err);
      if (r != ST_OK) break;
    }
    r = STRATEGY_CALL(t, "pre_backward", sg->pre_backward(t->sctx, u, &params, &grads, err));
    if (r != ST_OK) break;
    st_tensor *din = NULL;
    if (t->layouts[u].n > 0) {
      dcarry_at(t, u, dcarry[u % 2]);
      din = dcarry[u % 2];
    }
    r = MODEL_CALL(t, "unit_backward", m->unit_backward(t->mctx, bctx, u, params, grads, carry_at(t, u), saved,
                                                       dcarry[(u + 1) % 2], din, t->work_mem.base, err));
    if (r == ST_OK) r = STRATEGY_CALL(t, "post_backward", sg->post_backward(t->sctx, u, last_micro, err));
    if (r != ST_OK) st_error_prefix(err, "backward of unit %s: ", t->desc->units[u].name);
  }
  pt->backward += now_s() - t2;
  MODEL_CALL_VOID(t, "batch_release", m->batch_release(t->mctx, bctx));
  return r;
}

/* ---- the loop ------------------------------------------------------------------------------ */

static st_result open_outputs(trainer *t, st_error *err) {
  if (t->rank != 0) return ST_OK;
  char jsonl[4200], tb[4200], csv[4200];
  snprintf(jsonl, sizeof jsonl, "%s/metrics.jsonl", t->s.output_path);
  if (t->s.tensorboard_path) snprintf(tb, sizeof tb, "%s", t->s.tensorboard_path);
  else snprintf(tb, sizeof tb, "%s/tensorboard", t->s.output_path);
  if (t->s.csv_path) snprintf(csv, sizeof csv, "%s", t->s.csv_path);
  else snprintf(csv, sizeof csv, "%s/metrics.csv", t->s.output_path);
  st_metrics_options mo = {.jsonl_path = jsonl, .tensorboard_dir = t->s.tensorboard ? tb : NULL,
                           .csv_path = t->s.csv_monitor ? csv : NULL, .keep_through_step = t->ts.step};
  return st_metrics_open(&mo, &t->metrics, err);
}

/* cached samples to read from: `base` as given, or synthetic ones written by rank 0 into `synth_dir` */
static st_result data_source(trainer *t, const char *base, int64_t n_synth, int64_t first, const char *synth_dir,
                             const char *what, const char **out, st_error *err) {
  *out = base;
  if (n_synth <= 0) return ST_OK;
  if (!t->model->synth_sample)
    return st_error_set(err, ST_ERR_CONFIG, "data.synthetic", "model %s cannot generate synthetic samples",
                        t->model->header.name);
  if (!base) *out = synth_dir;
  if (t->rank == 0) {
    st_log(t->logger, ST_LOG_INFO, "writing %lld synthetic %s samples to %s", (long long)n_synth, what, *out);
    ST_CHECK(MODEL_CALL(t, "synth_sample", st_dataset_synthesize(*out, n_synth, t->s.synthetic_seed, first,
                                                                 t->model->synth_sample, t->mctx, err)));
  }
  return world_barrier(t, err); /* the other ranks read what rank 0 wrote */
}

/* The validation set: one sample per micro-batch, so every rank count sees the same samples (a
 * multiple of the world size of them; the rest is dropped, as DistributedSampler does). */
static st_result open_val_data(trainer *t, st_error *err) {
  const st_settings *s = &t->s;
  if (!s->val_base_path && s->val_synthetic_samples <= 0) return ST_OK;
  char synth_dir[4200];
  snprintf(synth_dir, sizeof synth_dir, "%s/synthetic-validation", s->output_path);
  const char *base;
  /* the training data's distribution (same seed), other samples (indices past any training set) */
  ST_CHECK(data_source(t, s->val_base_path, s->val_synthetic_samples, (int64_t)1 << 40, synth_dir, "validation",
                       &base, err));
  st_dataset_options o = {.base_path = base, .metadata_path = s->val_synthetic_samples > 0 ? NULL : s->val_metadata_path,
                          .repeat = 1, .shuffle = false, .batch_size = 1, .rank = t->rank, .world_size = t->world_size};
  ST_CHECK(st_dataset_open(&o, &t->val_data, err));
  t->val_batches = st_dataset_batches_per_epoch(t->val_data);
  if (s->val_max_samples > 0 && t->val_batches > s->val_max_samples / t->world_size)
    t->val_batches = s->val_max_samples / t->world_size;
  if (t->val_batches < 1)
    return st_error_set(err, ST_ERR_CONFIG, "data.validation", "the validation set has %lld sample(s): fewer than one "
                        "per rank (%d rank(s))", (long long)st_dataset_size(t->val_data), t->world_size);
  t->best_val = NAN;
  return ST_OK;
}

static st_result open_data(trainer *t, st_error *err) {
  char synth_dir[4200];
  const char *base = t->s.dataset_base_path;
  const char *meta = t->s.dataset_metadata_path;
  snprintf(synth_dir, sizeof synth_dir, "%s/synthetic-data", t->s.output_path);
  ST_CHECK(data_source(t, base, t->s.synthetic_samples, 0, synth_dir, "training", &base, err));
  if (t->s.synthetic_samples > 0) meta = NULL;
  if (!base)
    return st_error_set(err, ST_ERR_CONFIG, "data.dataset_base_path",
                        "no data: set data.dataset_base_path (cached samples) or data.synthetic.num_samples");
  st_dataset_options dopt = {.base_path = base, .metadata_path = meta, .repeat = t->s.dataset_repeat,
                             .shuffle = t->s.shuffle, .seed = t->s.seed, .batch_size = t->s.micro_batch_size,
                             .prefetch = t->s.num_workers > 0 ? 2 : 0, .rank = t->rank, .world_size = t->world_size};
  ST_CHECK(st_dataset_open(&dopt, &t->data, err));
  if (st_dataset_batches_per_epoch(t->data) < 1)
    return st_error_set(err, ST_ERR_CONFIG, "train_micro_batch_size_per_gpu",
                        "the dataset has %lld sample(s) (x%lld repeat) for %d rank(s): fewer than one micro-batch of %lld",
                        (long long)st_dataset_size(t->data), (long long)t->s.dataset_repeat, t->world_size,
                        (long long)t->s.micro_batch_size);
  return ST_OK;
}

static st_result setup_training(trainer *t, st_error *err) {
  const st_model_desc *d = t->desc;
  t->unit_order = calloc((size_t)d->n_units, sizeof *t->unit_order);
  t->layouts = calloc((size_t)d->n_units + 1, sizeof *t->layouts);
  t->carries = calloc(((size_t)d->n_units + 1) * ST_MAX_CARRY, sizeof *t->carries);
  t->saved_bytes = calloc((size_t)d->n_units, sizeof *t->saved_bytes);
  t->saved_off = calloc((size_t)d->n_units, sizeof *t->saved_off);
  if (!t->unit_order || !t->layouts || !t->carries || !t->saved_bytes || !t->saved_off)
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "trainer", "unit tables");
  for (int u = 0; u < d->n_units; u++) t->unit_order[u] = u;
  st_dtype pd = d->compute_dtype;
  st_strategy_setup setup = {.struct_size = sizeof setup, .model = d, .unit_order = t->unit_order, .param_dtype = pd,
                             .master_dtype = ST_F32, .grad_dtype = (pd == ST_F64) ? ST_F64 : ST_F32,
                             .reduce_dtype = (pd == ST_F64) ? ST_F64 : ST_F32,
                             .grad_accum_steps = (int)t->s.grad_accum_steps, .group = t->world};
  if (t->s.precision.dtype != ST_F32 && pd != t->s.precision.dtype)
    st_log(t->logger, ST_LOG_WARN, "%s is enabled but the model computes in %s on this device",
           t->s.precision.dtype == ST_BF16 ? "bf16" : "fp16", st_dtype_name(pd));
  st_result r = STRATEGY_CALL(t, "init", t->strategy->init(t->host, st_config_node(t->cfg, "strategy"), &setup,
                                                          &t->sctx, err));
  if (r != ST_OK) return plugin_failed(&t->strategy_plugin, "init", r, err);
  const char *ignored[16];
  int n_ignored = st_config_ignored_keys(t->cfg, ignored, 16);
  for (int i = 0; i < n_ignored && i < 16; i++)
    st_log(t->logger, ST_LOG_WARN, "config block \"%s\" is a DeepSpeed feature strata does not implement: ignored",
           ignored[i]);
  st_loss_scaler_init(&t->scaler, &t->s.precision);
  t->ts.seed = t->s.seed;
  t->ts.val_loss = NAN;
  t->ts.world_size = t->world_size;
  snprintf(t->ts.model, sizeof t->ts.model, "%s", t->model->header.name);
  snprintf(t->ts.strategy, sizeof t->ts.strategy, "%s", t->strategy->header.name);
  ST_CHECK(load_state(t, err));
  ST_CHECK(open_val_data(t, err));
  if (t->eval_only) return ST_OK;
  ST_CHECK(open_data(t, err));
  int64_t global_micro = (int64_t)t->world_size * t->s.micro_batch_size; /* samples per micro-step, all ranks */
  if (t->ts.samples_seen % global_micro != 0)
    return st_error_set(err, ST_ERR_CONFIG, "train_micro_batch_size_per_gpu",
                        "the checkpoint has seen %lld samples, not a whole number of micro-steps of %d rank(s) x %lld: "
                        "resume with a micro-batch size and rank count whose product divides %lld",
                        (long long)t->ts.samples_seen, t->world_size, (long long)t->s.micro_batch_size,
                        (long long)t->ts.samples_seen);
  ST_CHECK(st_dataset_seek(t->data, t->ts.samples_seen / global_micro, err));
  return open_outputs(t, err);
}

static int64_t total_steps(const trainer *t) {
  if (t->s.max_steps > 0) return t->s.max_steps;
  int64_t per_epoch = st_dataset_batches_per_epoch(t->data) / t->s.grad_accum_steps;
  return (t->s.num_epochs > 0 ? t->s.num_epochs : 1) * (per_epoch > 0 ? per_epoch : 1);
}

static void report_step(trainer *t, const st_loss *loss, double lr, double gnorm, const phase_times *pt, double step_s,
                        bool skipped) {
  if (t->rank != 0) return;
  double samples = (double)t->s.train_batch_size;
  st_metrics_add(t->metrics, "train/loss", loss->loss);
  st_metrics_add(t->metrics, "train/lr", lr);
  st_metrics_add(t->metrics, "train/grad_norm", gnorm);
  st_metrics_add(t->metrics, "train/loss_scale", t->scaler.scale);
  st_metrics_add(t->metrics, "train/skipped", skipped ? 1.0 : 0.0);
  st_metrics_add(t->metrics, "time/step_s", step_s);
  st_metrics_add(t->metrics, "time/data_s", pt->data);
  st_metrics_add(t->metrics, "time/forward_s", pt->forward);
  st_metrics_add(t->metrics, "time/backward_s", pt->backward);
  st_metrics_add(t->metrics, "time/optimizer_s", pt->step);
  st_metrics_add(t->metrics, "perf/samples_per_s", samples / step_s);
  if (t->fwd_flops > 0) {
    /* model FLOPs: forward + backward = 3x forward per sample (reference qwen_image.md §5) */
    double flops = 3.0 * t->fwd_flops / (double)t->s.micro_batch_size * samples / step_s;
    st_metrics_add(t->metrics, "perf/flops_per_s", flops);
    if (t->s.peak_flops > 0) st_metrics_add(t->metrics, "perf/mfu", flops / (t->s.peak_flops * t->world_size));
  }
  st_metrics_add(t->metrics, "memory/peak_bytes", (double)st_host_peak_bytes(t->host, t->host->device.type));
  for (int i = 0; i < loss->n_metrics; i++) st_metrics_add(t->metrics, loss->metric_names[i], loss->metric_values[i]);
}

/* One pass over the validation set without gradients: each sample's sigma and noise come from its
 * global index and the validation seed (or from the sample itself), so the number does not depend on
 * the training seed, the strategy or the world size. Returns the mean over every rank's samples. */
/* Accumulates micro-batch losses and metrics weighted by their loss items; `finish` sums over the
 * ranks and divides by the items of the whole global batch (the denominator of a step's loss;
 * validation averages the same way). v[10] counts samples. */
typedef struct step_loss {
  double v[1 + 8 + 2]; /* sum n*loss, sum n*metric_i (st_loss holds at most 8), sum n, samples */
  st_loss first;       /* names of the metrics */
} step_loss;

static void step_loss_add(step_loss *s, const st_loss *l, int n_samples, bool first) {
  if (first) s->first = *l;
  s->v[10] += n_samples;
  double n = (double)l->n_items;
  s->v[0] += n * l->loss;
  for (int i = 0; i < s->first.n_metrics && i < l->n_metrics && i < 8; i++) s->v[1 + i] += n * l->metric_values[i];
  s->v[9] += n;
}

static st_result step_loss_finish(trainer *t, step_loss *s, st_loss *out, st_error *err) {
  if (t->world_size > 1) ST_CHECK(t->comm->all_reduce(t->world, s->v, s->v, 11, ST_F64, ST_REDUCE_SUM, NULL, err));
  double n = s->v[9];
  *out = s->first;
  out->n_items = (int64_t)n;
  out->loss = n > 0 ? s->v[0] / n : NAN;
  for (int i = 0; i < out->n_metrics && i < 8; i++) out->metric_values[i] = n > 0 ? s->v[1 + i] / n : NAN;
  return ST_OK;
}

static st_result run_validation(trainer *t, st_loss *out, int64_t *n_samples, st_error *err) {
  const st_model_plugin_v1 *m = t->model;
  int U = t->desc->n_units;
  step_loss acc = {0};
  ST_CHECK(st_dataset_seek(t->val_data, 0, err));
  for (int64_t j = 0; j < t->val_batches; j++) {
    st_batch batch;
    ST_CHECK(st_dataset_next(t->val_data, &batch, err));
    batch.seed = t->host->rng->u64(t->s.val_seed, 0x76616c6964ull /* "valid" */, 0);
    batch.first_sample = j * t->world_size + t->rank;
    batch.step = t->ts.step;
    batch.training = false;
    void *bctx = NULL;
    ST_CHECK(MODEL_CALL(t, "batch_prepare", m->batch_prepare(t->mctx, &batch, &bctx, err)));
    st_result r = plan_activations(t, bctx, err);
    if (r == ST_OK) r = forward_units(t, bctx, false, err);
    st_loss l = {0};
    st_tensor dcarry[ST_MAX_CARRY];
    if (r == ST_OK) {
      dcarry_at(t, U, dcarry);
      r = MODEL_CALL(t, "loss", m->loss(t->mctx, bctx, carry_at(t, U), 0.0, dcarry, &l, err));
    }
    if (r == ST_OK && t->dump) { /* the model's raw output and the loss, keyed by the sample */
      /* the sample's file name without folder and extension ("sample-000003") */
      const char *id = batch.samples[0].id ? batch.samples[0].id : "sample";
      const char *end = strstr(id, " ("); /* ids from a metadata file end in " (<metadata> line N)" */
      if (!end) end = id + strlen(id);
      for (const char *q = id; q < end; q++)
        if (*q == '/') id = q + 1;
      int id_len = (int)strcspn(id, ".");
      if (id + id_len > end) id_len = (int)(end - id);
      char name[600];
      for (int i = 0; i < t->layouts[U].n && r == ST_OK; i++) {
        const st_tensor *o = &carry_at(t, U)[i];
        if (i) snprintf(name, sizeof name, "%.*s/output.%d", id_len, id, i);
        else snprintf(name, sizeof name, "%.*s/output", id_len, id);
        r = st_safetensors_writer_add(t->dump, name, o->dtype, o->ndim, o->shape, o->data, true, err);
      }
      snprintf(name, sizeof name, "%.*s/loss", id_len, id);
      int64_t one[1] = {1};
      if (r == ST_OK) r = st_safetensors_writer_add(t->dump, name, ST_F64, 1, one, &l.loss, true, err);
    }
    MODEL_CALL_VOID(t, "batch_release", m->batch_release(t->mctx, bctx));
    if (r != ST_OK) return st_error_prefix(err, "validation sample %s: ", batch.samples[0].id ? batch.samples[0].id : "?");
    step_loss_add(&acc, &l, batch.n_samples, j == 0);
  }
  ST_CHECK(step_loss_finish(t, &acc, out, err));
  *n_samples = (int64_t)acc.v[10];
  return ST_OK;
}

/* validation during training: logs val/loss, tracks the best, says whether to stop early */
static st_result validate_step(trainer *t, bool *stop, st_error *err) {
  st_loss v = {0};
  int64_t n_samples = 0;
  ST_CHECK(run_validation(t, &v, &n_samples, err));
  t->ts.val_loss = v.loss;
  double sign = t->s.monitor_max ? -1.0 : 1.0;
  bool better = isnan(t->best_val) || sign * (t->best_val - v.loss) > t->s.early_min_delta;
  if (better) {
    t->best_val = v.loss;
    t->evals_since_best = 0;
  } else {
    t->evals_since_best++;
  }
  if (t->rank == 0) {
    st_metrics_add(t->metrics, "val/loss", v.loss);
    for (int i = 0; i < v.n_metrics; i++) {
      char tag[96];
      snprintf(tag, sizeof tag, "val/%s", v.metric_names[i]);
      st_metrics_add(t->metrics, tag, v.metric_values[i]);
    }
  }
  st_log(t->logger, ST_LOG_INFO, "step %lld: val_loss %.6g over %lld samples%s", (long long)t->ts.step, v.loss,
         (long long)n_samples, better ? " (best so far)" : "");
  *stop = t->s.early_patience > 0 && t->evals_since_best >= t->s.early_patience;
  if (*stop)
    st_log(t->logger, ST_LOG_INFO, "early stopping: val_loss has not improved by more than %g for %lld evaluations "
           "(best %.6g)", t->s.early_min_delta, (long long)t->evals_since_best, t->best_val);
  return ST_OK;
}

/* The strategy's predicted bytes per rank before step 1 and, after it, the measured peak beside the
 * prediction (activations and workspace come on top of the strategy's state). */
static void memory_report(trainer *t, bool measured) {
  st_memory_plan plan = {0};
  if (!t->strategy->memory_plan || STRATEGY_CALL(t, "memory_plan", t->strategy->memory_plan(t->sctx, &plan)) != ST_OK) return;
  uint64_t total = 0;
  char line[512];
  int n = snprintf(line, sizeof line, "memory per rank, predicted:");
  for (int i = 0; i < ST_MEMORY_CATEGORIES; i++) {
    uint64_t b = plan.device_bytes[i] + plan.host_bytes[i];
    total += b;
    if (plan.category[i] && b && n < (int)sizeof line)
      n += snprintf(line + n, sizeof line - (size_t)n, " %s %.1f MiB", plan.category[i], b / 1048576.0);
  }
  if (!measured) {
    st_log(t->logger, ST_LOG_INFO, "%s, total %.1f MiB (+ activations)", line, total / 1048576.0);
    return;
  }
  uint64_t peak = st_host_peak_bytes(t->host, t->host->device.type);
  st_log(t->logger, ST_LOG_INFO, "memory per rank after step 1: peak %.1f MiB measured, %.1f MiB predicted for "
         "parameters, gradients and optimizer state, %.1f MiB for activations and workspace",
         peak / 1048576.0, total / 1048576.0, peak > total ? (peak - total) / 1048576.0 : 0.0);
}

static st_result train_loop(trainer *t, st_error *err) {
  int64_t total = total_steps(t);
  if (t->s.scheduler.total_num_steps <= 0) t->s.scheduler.total_num_steps = total;
  if (t->rank == 0)
    t->progress = st_progress_create(t->opt.console ? t->opt.console : stderr, total, t->ts.step, t->opt.progress_tty,
                                     t->s.steps_per_print > 0 ? t->s.steps_per_print : 10);
  st_logger_set_progress(t->logger, t->progress);
  st_log(t->logger, ST_LOG_INFO, "training %s with %s: %lld parameters in %d units, %lld steps of %lld samples "
         "(micro-batch %lld x %lld accumulation x %d rank(s))", t->model->header.name, t->strategy->header.name,
         (long long)t->desc->n_params_total, t->desc->n_units, (long long)total, (long long)t->s.train_batch_size,
         (long long)t->s.micro_batch_size, (long long)t->s.grad_accum_steps, t->world_size);
  int64_t gas = t->s.grad_accum_steps;
  int64_t micro_index = st_dataset_cursor(t->data);
  int64_t first_step = t->ts.step;
  memory_report(t, false);
  while (t->ts.step < total) {
    if (t->opt.stop && *t->opt.stop) {
      st_log(t->logger, ST_LOG_WARN, "interrupted: saving a checkpoint at step %lld", (long long)t->ts.step);
      ST_CHECK(save_checkpoint(t, err));
      return st_error_set(err, ST_ERR_INTERRUPTED, "train", "stopped by a signal after step %lld; resume with "
                          "--set train.resume=latest", (long long)t->ts.step);
    }
    double t0 = now_s();
    phase_times pt = {0};
    /* gradients accumulate as loss-scaled sums over loss items (model.h), averaged over ranks by the
     * strategy; dividing by the global item count / world size makes them the mean loss's */
    step_loss acc = {0};
    for (int64_t k = 0; k < gas; k++) {
      st_loss l = {0};
      ST_CHECK(micro_step(t, micro_index++, k == gas - 1, t->scaler.scale, &l, &pt, err));
      step_loss_add(&acc, &l, 0, k == 0);
    }
    st_loss agg;
    ST_CHECK(step_loss_finish(t, &acc, &agg, err));
    double t1 = now_s();
    double norm_sq = 0.0;
    ST_CHECK(STRATEGY_CALL(t, "grad_norm_sq", t->strategy->grad_norm_sq(t->sctx, &norm_sq, err)));
    double unscale = t->scaler.scale * (double)agg.n_items / (double)t->world_size;
    double gnorm = agg.n_items > 0 ? sqrt(norm_sq) / unscale : NAN;
    if (agg.n_items == 0)
      st_log(t->logger, ST_LOG_WARN, "step %lld: the global batch has no loss items (every label is ignored): "
             "skipped", (long long)t->ts.step + 1);
    bool bad_loss = !isfinite(agg.loss);
    bool overflow = !isfinite(norm_sq);
    bool skip = st_loss_scaler_update(&t->scaler, overflow) || bad_loss;
    double lr = st_sched_lr(&t->s.scheduler, t->s.optimizer.lr, t->ts.step);
    if (skip) {
      ST_CHECK(STRATEGY_CALL(t, "skip_step", t->strategy->skip_step(t->sctx, err)));
      if (bad_loss || !t->scaler.dynamic) t->ts.bad_steps++;
      if (t->ts.bad_steps >= t->s.max_bad_steps)
        return st_error_set(err, ST_ERR_NUMERIC, "train.max_bad_steps",
                            "the loss or the gradients were not finite for %lld consecutive steps (last loss %g, "
                            "grad norm %g) at step %lld: lower the learning rate, enable gradient_clipping, or use bf16",
                            (long long)t->ts.bad_steps, agg.loss, gnorm, (long long)t->ts.step);
      if (t->scaler.dynamic && !bad_loss)
        st_log(t->logger, ST_LOG_INFO, "fp16 overflow at step %lld: skipped, loss scale now %g", (long long)t->ts.step,
               t->scaler.scale);
    } else {
      t->ts.bad_steps = 0;
      double clip = st_clip_coefficient(gnorm, t->s.gradient_clipping);
      st_step_args sa = {.step = t->ts.step + 1, .lr = lr, .grad_scale = clip / unscale};
      ST_CHECK(STRATEGY_CALL(t, "step", t->strategy->step(t->sctx, &sa, err)));
      t->ts.step++;
      if (t->opt.test_die_at_step == t->ts.step && t->opt.test_die_rank == t->rank && t->denv.restart_count == 0)
        raise(SIGKILL); /* test hook: a rank dying mid-run (first attempt only) */
    }
    pt.step = now_s() - t1;
    bool stop_early = false;
    t->ts.val_loss = NAN;
    st_on_save_poll(t->jobs, false);
    if (!skip && t->val_data &&
        ((t->s.eval_steps > 0 && t->ts.step % t->s.eval_steps == 0) || t->ts.step == total))
      ST_CHECK(validate_step(t, &stop_early, err));
    if (t->ts.step == first_step + 1 && !skip) memory_report(t, true);
    double step_s = now_s() - t0;
    if (!skip || t->scaler.dynamic) {
      report_step(t, &agg, lr, gnorm, &pt, step_s, skip);
      if (t->rank == 0) {
        ST_CHECK(st_metrics_commit(t->metrics, t->ts.step, err));
        char extra[96];
        int n = snprintf(extra, sizeof extra, "gnorm %.3g", gnorm);
        if (!isnan(t->ts.val_loss)) snprintf(extra + n, sizeof extra - (size_t)n, " | val %.4g", t->ts.val_loss);
        st_progress_update(t->progress, t->ts.step, agg.loss, lr, extra);
      }
    }
    bool selecting = t->s.save_top_k > 0 && !isnan(t->ts.val_loss); /* save after each validation */
    if (!skip && t->ts.step < total && !stop_early &&
        ((t->s.save_steps > 0 && t->ts.step % t->s.save_steps == 0) || selecting))
      ST_CHECK(save_checkpoint(t, err));
    if (stop_early) break;
  }
  return save_checkpoint(t, err);
}

st_result st_train(const st_run_options *opt, st_error *err) {
  trainer t = {.opt = *opt};
  st_result r = setup_plugins(&t, err);
  if (r == ST_OK) r = setup_training(&t, err);
  if (r == ST_OK) r = train_loop(&t, err);
  trainer_free(&t, r != ST_OK);
  return r;
}

/* ---- eval ------------------------------------------------------------------------------------ */

st_result st_eval(const st_run_options *opt, const st_eval_options *eo, FILE *out, st_error *err) {
  trainer t = {.opt = *opt, .eval_only = true};
  st_result r = setup_plugins(&t, err);
  if (r == ST_OK && !t.s.val_base_path && t.s.val_synthetic_samples <= 0)
    r = st_error_set(err, ST_ERR_CONFIG, "data.validation", "strata eval needs a validation set: set "
                     "data.validation.dataset_base_path (or synthetic.num_samples)");
  if (r == ST_OK && eo->dump_path && t.world_size > 1)
    r = st_error_set(err, ST_ERR_UNSUPPORTED, "--dump", "--dump writes one file from one process: run strata eval "
                     "without launch");
  if (r == ST_OK && eo->dump_path) r = st_safetensors_writer_create(&t.dump, err);
  if (r == ST_OK) r = setup_training(&t, err);
  st_loss v = {0};
  int64_t n_samples = 0;
  if (r == ST_OK) r = run_validation(&t, &v, &n_samples, err);
  if (r == ST_OK && t.rank == 0) {
    fprintf(out, "val_loss %.9g over %lld samples\n", v.loss, (long long)n_samples);
    for (int i = 0; i < v.n_metrics; i++) fprintf(out, "val/%s %.9g\n", v.metric_names[i], v.metric_values[i]);
  }
  if (r == ST_OK && t.dump) {
    r = st_safetensors_writer_finish(t.dump, eo->dump_path, true, err);
    t.dump = NULL; /* finish frees the writer */
    if (r == ST_OK) st_log(t.logger, ST_LOG_INFO, "wrote every sample's output and loss to %s", eo->dump_path);
  }
  trainer_free(&t, r != ST_OK);
  return r;
}

/* ---- export ---------------------------------------------------------------------------------- */

typedef struct export_sink {
  st_tensor_sink pub;
  st_safetensors_writer *w;
  const char *dir;
  int n_tensors;
} export_sink;

static st_result export_put(st_tensor_sink *sink, const char *name, const st_tensor *t, st_error *err) {
  export_sink *s = (export_sink *)sink;
  s->n_tensors++;
  return st_safetensors_writer_add(s->w, name, t->dtype, t->ndim, t->shape, t->data, true, err);
}

static st_result export_put_file(st_tensor_sink *sink, const char *filename, const void *bytes, size_t len,
                                 st_error *err) {
  export_sink *s = (export_sink *)sink;
  if (strchr(filename, '/')) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, filename, "export file names are flat");
  char path[4200];
  snprintf(path, sizeof path, "%s/%s", s->dir, filename);
  FILE *f = fopen(path, "wb");
  if (!f) return st_error_set(err, ST_ERR_IO, path, "cannot write: %s", strerror(errno));
  bool ok = fwrite(bytes, 1, len, f) == len;
  ok = (fclose(f) == 0) && ok;
  return ok ? ST_OK : st_error_set(err, ST_ERR_IO, path, "write failed");
}

typedef struct export_source {
  st_param_source pub;
  source_reader *reader;
  const st_model_desc *desc;
} export_source;

static st_result export_read(st_param_source *src, int unit, int param, st_dtype dt, void *dst, st_error *err) {
  export_source *s = (export_source *)src;
  if (unit < 0 || unit >= s->desc->n_units || param < 0 || param >= s->desc->units[unit].n_params)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "export", "no parameter %d of unit %d", param, unit);
  const st_param_desc *p = &s->desc->units[unit].params[param];
  int64_t n = 1;
  for (int d = 0; d < p->ndim; d++) n *= p->shape[d];
  return source_read(&s->reader->pub, p, ST_STATE_PARAM, 0, n, dt, dst, err);
}

/* every parameter under its public name, fp32 */
static st_result export_all(const st_model_desc *d, st_param_source *src, st_tensor_sink *sink, st_error *err) {
  for (int u = 0; u < d->n_units; u++)
    for (int k = 0; k < d->units[u].n_params; k++) {
      const st_param_desc *p = &d->units[u].params[k];
      st_tensor t = st_tensor_make(NULL, ST_F32, (st_device){ST_DEVICE_CPU, 0}, p->ndim, p->shape);
      t.data = malloc(st_tensor_nbytes(&t) ? st_tensor_nbytes(&t) : 4);
      if (!t.data) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, p->name, "export buffer");
      st_result r = src->read(src, u, k, ST_F32, t.data, err);
      if (r == ST_OK) r = sink->put(sink, p->name, &t, err);
      free(t.data);
      if (r != ST_OK) return r;
    }
  return ST_OK;
}

st_result st_export(const st_export_options *eo, st_error *err) {
  char config_path[4200];
  snprintf(config_path, sizeof config_path, "%s/config.json", eo->checkpoint);
  struct stat sb;
  if (stat(config_path, &sb) != 0)
    return st_error_set(err, ST_ERR_NOT_FOUND, eo->checkpoint, "not a strata checkpoint directory (no config.json)");
  static const struct { const char *format, *file; } files[] = {
      {"safetensors", "model.safetensors"}, {"diffusers", "diffusion_pytorch_model.safetensors"},
      {"peft", "adapter_model.safetensors"}, {"transformers", "model.safetensors"}};
  const char *tensor_file = NULL;
  for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
    if (!strcmp(files[i].format, eo->format)) tensor_file = files[i].file;
  if (!tensor_file)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "--format", "unknown format '%s' (safetensors, diffusers, peft, "
                        "transformers)", eo->format);
  /* the checkpoint's config, resolved for one process with the built-in strategy: the batch triple
   * and strategy options of a multi-rank run do not matter for reading its weights */
  const char *sets[] = {"train_batch_size=auto", "strategy={\"name\": \"local\"}"};
  trainer t = {.opt = {.config_path = config_path, .console = stderr, .sets = sets, .n_sets = 2}};
  source_reader sr = {.pub = {.read = source_read}, .t = &t};
  sr.pub.self = &sr;
  export_sink sink = {.pub = {.put = export_put, .put_file = export_put_file}};
  sink.pub.self = &sink;
  char tmp[4200];
  snprintf(tmp, sizeof tmp, "%s.tmp", eo->out_dir);
  sink.dir = tmp;
  st_result r = setup_plugins(&t, err);
  if (r == ST_OK) r = st_tensor_store_open_checkpoint(eo->checkpoint, &sr.ckpt, err);
  const char *weights = NULL;
  if (r == ST_OK && st_config_node(t.cfg, "model.weights"))
    r = st_config_api()->get_string(st_config_node(t.cfg, "model"), "weights", NULL, &weights, err);
  if (r == ST_OK && weights) r = st_tensor_store_open_weights(weights, &sr.weights, err);
  if (r == ST_OK) {
    if (mkdir(tmp, 0755) != 0 && errno != EEXIST)
      r = st_error_set(err, ST_ERR_IO, tmp, "cannot create: %s", strerror(errno));
  }
  if (r == ST_OK) r = st_safetensors_writer_create(&sink.w, err);
  export_source src = {.pub = {.read = export_read}, .reader = &sr, .desc = t.desc};
  src.pub.self = &src;
  if (r == ST_OK) {
    bool generic = !strcmp(eo->format, "safetensors") || !t.model->export_weights;
    if (generic && strcmp(eo->format, "safetensors") != 0)
      st_log(t.logger, ST_LOG_WARN, "model %s has no %s exporter: writing plain safetensors", t.model->header.name,
             eo->format);
    r = generic ? export_all(t.desc, &src.pub, &sink.pub, err)
                : MODEL_CALL((&t), "export_weights", t.model->export_weights(t.mctx, eo->format, eo->merge_lora, &src.pub, &sink.pub, err));
  }
  if (r == ST_OK && sink.n_tensors > 0) {
    char path[4300];
    snprintf(path, sizeof path, "%s/%s", tmp, tensor_file);
    r = st_safetensors_writer_finish(sink.w, path, true, err);
    sink.w = NULL; /* finish frees the writer, whatever it returns */
  }
  st_safetensors_writer_free(sink.w);
  st_tensor_store_close(sr.ckpt);
  st_tensor_store_close(sr.weights);
  if (r == ST_OK) {
    char old[4300];
    snprintf(old, sizeof old, "%s.old", eo->out_dir);
    if (stat(eo->out_dir, &sb) == 0 && rename(eo->out_dir, old) != 0)
      r = st_error_set(err, ST_ERR_IO, eo->out_dir, "cannot replace: %s", strerror(errno));
    if (r == ST_OK && rename(tmp, eo->out_dir) != 0)
      r = st_error_set(err, ST_ERR_IO, eo->out_dir, "cannot move the export into place: %s", strerror(errno));
    if (r == ST_OK) {
      if (stat(old, &sb) == 0) { /* an export folder is flat: its files, then itself */
        DIR *d = opendir(old);
        struct dirent *e;
        char path[8800];
        while (d && (e = readdir(d))) {
          if (e->d_name[0] == '.') continue;
          snprintf(path, sizeof path, "%s/%s", old, e->d_name);
          unlink(path);
        }
        if (d) closedir(d);
        rmdir(old);
      }
      st_log(t.logger, ST_LOG_INFO, "exported %s (%s) to %s", eo->checkpoint, eo->format, eo->out_dir);
    }
  }
  trainer_free(&t, r != ST_OK);
  return r;
}
