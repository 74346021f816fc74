/* bench_offload — zero3_offload's optimizer path on the CPU against a memory-bandwidth roofline, and
 * its step time against fsdp's at the same size, in one run (one rank, in-process; the 2-rank
 * comparison over Gloo is `test_strategies bench`, benchmark 'strategies_offload').
 *
 *   roofline  memcpy bandwidth (read + write bytes / s) with the kernel pool's thread count, best
 *             of 5, over buffers as large as one fp32 state array of the run; and the CPU table's
 *             own axpy (y += a x, 12 bytes per element, vectorized, the optimizer's thread pool),
 *             a streaming read-modify-write like AdamW's: memcpy counted as 2 x bytes can
 *             understate what in-place streams reach (its destination is read too, unless the
 *             library uses non-temporal stores), so a kernel may beat the memcpy roofline
 *   kernel    the fused fp32 AdamW kernel alone (ops->optim_update on the whole array): it moves
 *             28 bytes per element (reads param, grad, m, v; writes param, m, v), so the roofline is
 *             bandwidth / 28 elements/s
 *   strategy  zero3_offload's own breakdown (its "whole run" log line): the CPU optimizer over the
 *             tiles, and the whole tile loop, which adds the gradient D2H and the parameter H2D
 *             copies: 28 + 8 + 8 = 44 bytes per element (on the CPU both copies are memcpy)
 *   step      forward/backward windows with a trivial "model" (a constant gradient), grad norm and
 *             step, median of steps 2..N: fsdp vs zero3_offload at the same size
 *
 *   bench_offload [M ELEMENTS (default 16)] [THREADS (default 0 = every core)] [SUB_GROUP_SIZE] */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#include "config.h"
#include "cpu_ops.h"
#include "host_impl.h"
#include "plugin.h"

#define UNITS 8
#define STEPS 6

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* ---- memcpy roofline ---- */
typedef struct copy_job {
  char *dst;
  const char *src;
  size_t bytes;
} copy_job;

static void *copy_main(void *p) {
  copy_job *j = p;
  memcpy(j->dst, j->src, j->bytes);
  return NULL;
}

static double memcpy_bandwidth(size_t bytes, int threads) {
  char *a = malloc(bytes), *b = malloc(bytes);
  if (!a || !b) {
    free(a);
    free(b);
    return 0;
  }
  memset(a, 1, bytes);
  memset(b, 2, bytes);
  double best = 1e30;
  for (int it = 0; it < 5; it++) {
    pthread_t th[64];
    copy_job jobs[64];
    size_t chunk = (bytes / (size_t)threads + 63) & ~(size_t)63;
    double t0 = now();
    for (int t = 0; t < threads; t++) {
      size_t lo = (size_t)t * chunk, hi = lo + chunk < bytes ? lo + chunk : bytes;
      jobs[t] = (copy_job){b + lo, a + lo, hi > lo ? hi - lo : 0};
      pthread_create(&th[t], NULL, copy_main, &jobs[t]);
    }
    for (int t = 0; t < threads; t++) pthread_join(th[t], NULL);
    double dt = now() - t0;
    if (dt < best) best = dt;
  }
  free(a);
  free(b);
  return 2.0 * (double)bytes / best;
}

/* bytes / s of the CPU table's own axpy (y += a x: reads x and y, writes y, 12 bytes per element),
 * vectorized and spread over the same thread pool as the optimizer kernel */
static double axpy_bandwidth(const st_ops *ops, int64_t n) {
  float *x = malloc((size_t)n * sizeof(float)), *y = malloc((size_t)n * sizeof(float));
  if (!x || !y) {
    free(x);
    free(y);
    return 0;
  }
  for (int64_t i = 0; i < n; i++) x[i] = y[i] = 1.0f; /* written first: no page faults while timed */
  double best = 1e30;
  for (int it = 0; it < 5; it++) {
    double t0 = now();
    ops->axpy(ops, ST_F32, n, 1e-7, x, y);
    double dt = now() - t0;
    if (dt < best) best = dt;
  }
  free(x);
  free(y);
  return 12.0 * (double)n / best;
}

/* ---- the strategy run ---- */
static char names[UNITS][32];
static st_param_desc params[UNITS];
static st_unit_desc units[UNITS];
static st_model_desc model;
static int order[UNITS];

typedef struct capture {
  char text[16384];
} capture;

static void sink(void *user, st_log_level level, const char *msg) {
  capture *c = user;
  size_t n = strlen(c->text);
  snprintf(c->text + n, sizeof c->text - n, "%s\n", msg);
}

static st_result reader_read(st_state_reader *r, const st_param_desc *p, st_state_kind kind, int64_t off,
                             int64_t count, st_dtype dt, void *dst, st_error *err) {
  if (kind != ST_STATE_PARAM) return st_error_set(err, ST_ERR_NOT_FOUND, p->name, "no optimizer state");
  float *f = dst;
  for (int64_t i = 0; i < count; i++) f[i] = 0.01f * (float)((off + i) % 97) - 0.4f;
  return ST_OK;
}

typedef struct run_result {
  double step_ms, strategy_step_ms; /* median whole step, median step() call */
  double adam_ms, d2h_ms, h2d_ms;   /* zero3_offload's per-step breakdown (from its log) */
  bool ok;
} run_result;

static double parse_after(const char *log, const char *anchor, const char *key) {
  const char *a = strstr(log, anchor);
  const char *k = a ? strstr(a, key) : NULL;
  double v = -1;
  if (k && sscanf(k + strlen(key), "%lf", &v) != 1) v = -1;
  return v;
}

static run_result run(const char *name, const st_ops *ops, int64_t tile) {
  run_result res = {0};
  st_error err;
  st_error_clear(&err);
  st_plugin plugin;
  memset(&plugin, 0, sizeof plugin);
  static capture cap;
  cap.text[0] = 0;
  static const st_optimizer_settings adamw = {.type = ST_OPTIM_ADAMW, .lr = 1e-3, .beta1 = 0.9, .beta2 = 0.999,
                                              .eps = 1e-8, .weight_decay = 0.01, .adam_w_mode = true};
  st_host_options ho = {.ops = ops, .cpu_ops = ops, .optimizer = &adamw, .cfg = st_config_api(), .rank = 0,
                        .world_size = 1, .log_sink = sink, .log_user = &cap};
  st_host *host = NULL;
  st_config *cfg = NULL;
  void *ctx = NULL;
  const st_strategy_plugin_v1 *sp = NULL;
  char json[512];
  if (!strcmp(name, "zero3_offload"))
    snprintf(json, sizeof json, "{\"strategy\": {\"name\": \"%s\", \"report_steps\": 0}, \"zero_optimization\": "
             "{\"stage\": 3, \"sub_group_size\": %lld}}", name, (long long)tile);
  else
    snprintf(json, sizeof json, "{\"strategy\": {\"name\": \"%s\"}}", name);
  st_result r = st_plugin_load(ST_PLUGIN_STRATEGY, name, NULL, 0, &plugin, &err);
  if (r == ST_OK) sp = plugin.v.strategy;
  if (r == ST_OK) r = st_host_create(&ho, &host, &err);
  if (r == ST_OK) r = st_config_load_string(json, "bench", &cfg, &err);
  st_cfg *scfg = NULL;
  if (r == ST_OK) r = st_config_api()->get_object(st_config_root(cfg), "strategy", true, &scfg, &err);
  if (r == ST_OK) r = sp->validate(scfg, st_config_api(), &err);
  st_strategy_setup setup = {.struct_size = sizeof setup, .model = &model, .unit_order = order,
                             .param_dtype = ST_F32, .master_dtype = ST_F32, .grad_dtype = ST_F32,
                             .reduce_dtype = ST_F32, .grad_accum_steps = 1};
  if (r == ST_OK) r = sp->init(host, scfg, &setup, &ctx, &err);
  st_state_reader rd = {.read = reader_read};
  if (r == ST_OK) r = sp->state_load(ctx, &rd, &err);
  double steps[STEPS], calls[STEPS];
  for (int t = 1; t <= STEPS && r == ST_OK; t++) {
    double t0 = now();
    for (int u = 0; u < UNITS && r == ST_OK; u++) {
      const st_tensor *w;
      r = sp->pre_forward(ctx, u, &w, &err);
      if (r == ST_OK) r = sp->post_forward(ctx, u, &err);
    }
    for (int u = UNITS - 1; u >= 0 && r == ST_OK; u--) {
      const st_tensor *w;
      st_tensor *g;
      r = sp->pre_backward(ctx, u, &w, &g, &err);
      if (r == ST_OK) r = ops->fill(ops, ST_F32, g[0].data, st_tensor_numel(&g[0]), 1e-3 * (double)t);
      if (r == ST_OK) r = sp->post_backward(ctx, u, true, &err);
    }
    double norm = 0;
    if (r == ST_OK) r = sp->grad_norm_sq(ctx, &norm, &err);
    st_step_args sa = {.step = t, .lr = 1e-3, .grad_scale = 1.0};
    double t1 = now();
    if (r == ST_OK) r = sp->step(ctx, &sa, &err);
    double t2 = now();
    steps[t - 1] = t2 - t0;
    calls[t - 1] = t2 - t1;
  }
  if (ctx) sp->finalize(ctx); /* zero3_offload logs its "whole run" breakdown here */
  if (r == ST_OK) {
    qsort(steps + 1, STEPS - 1, sizeof(double), cmp_double);
    qsort(calls + 1, STEPS - 1, sizeof(double), cmp_double);
    res.step_ms = 1e3 * steps[1 + (STEPS - 1) / 2];
    res.strategy_step_ms = 1e3 * calls[1 + (STEPS - 1) / 2];
    res.adam_ms = parse_after(cap.text, "whole run", "CPU optimizer ");
    res.d2h_ms = parse_after(cap.text, "whole run", "gradient D2H ");
    res.h2d_ms = parse_after(cap.text, "whole run", "parameter H2D ");
    res.ok = true;
  } else {
    fprintf(stderr, "%s: %s: %s\n", name, err.where, err.message);
  }
  st_config_free(cfg);
  st_host_destroy(host);
  if (plugin.handle) st_plugin_unload(&plugin);
  return res;
}

int main(int argc, char **argv) {
  int64_t m = argc > 1 ? atoll(argv[1]) : 16;
  int threads = argc > 2 ? atoi(argv[2]) : 0;
  int64_t n = m << 20;
  int64_t tile = argc > 3 ? atoll(argv[3]) : 1 << 20;
  const st_ops *ops = NULL;
  st_error err;
  if (st_cpu_ops_create(threads, &ops, &err) != ST_OK) {
    fprintf(stderr, "cpu ops: %s\n", err.message);
    return 1;
  }
  int pool = threads > 0 ? threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
  if (pool > 64) pool = 64;
  for (int u = 0; u < UNITS; u++) {
    snprintf(names[u], sizeof names[u], "block.%d.weight", u);
    params[u] = (st_param_desc){names[u], 2, {n / UNITS / 1024, 1024}, ST_PARAM_TRAINABLE};
    units[u] = (st_unit_desc){"block", 1, &params[u]};
    order[u] = u;
  }
  model = (st_model_desc){.n_units = UNITS, .units = units, .compute_dtype = ST_F32, .hidden_size = 1024,
                          .n_params_total = n};
  printf("bench_offload: %lld M fp32 parameters in %d units, %s, %d thread(s), sub_group_size %lld, AdamW\n",
         (long long)m, UNITS, ops->name, pool, (long long)tile);

  double bw = memcpy_bandwidth((size_t)n * sizeof(float), pool);
  printf("memcpy roofline: %.2f GB/s (read + write bytes, %d thread(s), %.0f MB buffers)\n", bw / 1e9, pool,
         4.0 * (double)n / 1e6);

  /* the kernel alone on one array of n elements */
  float *p = malloc((size_t)n * 4), *g = malloc((size_t)n * 4), *m1 = malloc((size_t)n * 4), *v = malloc((size_t)n * 4);
  if (!p || !g || !m1 || !v) return 1;
  for (int64_t i = 0; i < n; i++) {
    g[i] = 1e-3f * (float)(i % 13);
    p[i] = 0.5f;
    m1[i] = v[i] = 0.0f;
  }
  double kbest = 1e30;
  for (int it = 1; it <= 5; it++) {
    st_optim_desc d = {.type = ST_OPTIM_ADAMW, .n = n, .param = p, .param_dtype = ST_F32, .grad = g,
                       .grad_dtype = ST_F32, .exp_avg = m1, .exp_avg_sq = v, .lr = 1e-3, .beta1 = 0.9,
                       .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.01, .adam_w_mode = true, .step = it,
                       .grad_scale = 1.0};
    double t0 = now();
    ops->optim_update(ops, &d);
    double dt = now() - t0;
    if (dt < kbest) kbest = dt;
  }
  free(p);
  free(g);
  free(m1);
  free(v);
  double sbw = axpy_bandwidth(ops, n);
  printf("axpy roofline (y += a x, 12 B/element, the kernels' pool): %.2f GB/s = %.1f M AdamW elements/s\n",
         sbw / 1e9, sbw / 28.0 / 1e6);
  double roof_adam = bw / 28.0, roof_loop = bw / 44.0, sroof = sbw / 28.0;
  double kern = (double)n / kbest;
  printf("%-48s %9.1f M elem/s  %5.2f of memcpy roofline (%.1f M/s at 28 B/element), %.2f of axpy\n",
         "fused AdamW kernel alone", kern / 1e6, kern / roof_adam, roof_adam / 1e6, kern / sroof);

  run_result f = {0}, z = {0};
  for (int rep = 0; rep < 2; rep++) { /* interleaved, best of two: the machine may be shared */
    run_result a = run("fsdp", ops, tile), b = run("zero3_offload", ops, tile);
    if (a.ok && (!f.ok || a.step_ms < f.step_ms)) f = a;
    if (b.ok && (!z.ok || b.step_ms < z.step_ms)) z = b;
  }
  if (z.ok && z.adam_ms > 0) {
    double adam = (double)n / (z.adam_ms * 1e-3);
    double loop_ms = z.adam_ms + z.d2h_ms + z.h2d_ms;
    double loop = (double)n / (loop_ms * 1e-3);
    printf("%-48s %9.1f M elem/s  %5.2f of memcpy roofline, %.2f of axpy\n",
           "zero3_offload: CPU optimizer over the tiles", adam / 1e6, adam / roof_adam, adam / sroof);
    printf("%-48s %9.1f M elem/s  %5.2f of memcpy roofline (%.1f M/s at 44 B/element)\n",
           "zero3_offload: tile loop (D2H + optimizer + H2D)", loop / 1e6, loop / roof_loop, roof_loop / 1e6);
    printf("  per step: gradient D2H %.2f ms, CPU optimizer %.2f ms, parameter H2D %.2f ms\n", z.d2h_ms, z.adam_ms,
           z.h2d_ms);
  }
  if (f.ok && z.ok) {
    printf("%-48s %9.2f ms (step() %.2f ms)\n", "step, fsdp (1 rank)", f.step_ms, f.strategy_step_ms);
    printf("%-48s %9.2f ms (step() %.2f ms)  %.2fx fsdp\n", "step, zero3_offload (1 rank)", z.step_ms,
           z.strategy_step_ms, z.step_ms / f.step_ms);
  }
  st_cpu_ops_destroy(ops);
  return f.ok && z.ok ? 0 : 1;
}
