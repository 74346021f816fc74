/* bench_qwen_image — one Qwen-Image training step on the CPU: forward over every unit, the
 * flow-matching loss, the hand-written backward and a fused AdamW update of every trainable
 * parameter, driven through the model plugin and the CPU ops table (no trainer, no data loader).
 * bench/qwen_image_torch.py runs the same shapes through diffusers' QwenImageTransformer2DModel in
 * PyTorch eager; bench/qwen_image_vs_torch.sh runs both and prints the ratio.
 *
 *   bench_qwen_image MODULE.so [--config tiny|mid] [--threads N] [--steps N]
 *
 * Configs (the same in qwen_image_torch.py):
 *   tiny: the reference tiny model (2 layers, 2x16 heads, D 32, joint_attention_dim 24, in 16 /
 *         out 4, axes 4/6/6), batch 2, grid 3x5 = 15 image tokens, 7 text tokens
 *   mid:  4 layers, 4x128 heads (D 512), joint_attention_dim 512, in 64 / out 16, axes 16/56/56,
 *         batch 1, grid 32x32 = 1024 image tokens, 64 text tokens
 * fp32 everywhere. Output: one line `strata <config>: ...` with the median step time over --steps
 * timed steps after one warm-up step, and the process's peak RSS (getrusage; after loading and
 * at the end: model, grads, AdamW state, activations). */
#include <cblas.h>
#include <stdio.h>
#include <sys/resource.h>
#include <time.h>

#include "qwen_image_harness.h"

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double peak_rss_mib(void) {
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  return (double)ru.ru_maxrss / 1024.0; /* KiB on Linux */
}

typedef struct bench_cfg {
  const char *name, *json;
  int batch, grid_h, grid_w, text_len, lat_channels, joint_dim;
} bench_cfg;

static const bench_cfg CONFIGS[] = {
    {"tiny", "{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"dtype\": \"fp32\"}}", 2, 3, 5, 7, 4, 24},
    {"mid",
     "{\"model\": {\"name\": \"qwen_image\", \"preset\": \"tiny\", \"dtype\": \"fp32\", \"overrides\": "
     "{\"num_layers\": 4, \"num_attention_heads\": 4, \"attention_head_dim\": 128, \"joint_attention_dim\": 512, "
     "\"in_channels\": 64, \"out_channels\": 16, \"patch_size\": 2, \"axes_dims_rope\": [16, 56, 56]}}}",
     1, 32, 32, 64, 16, 512},
};

static float *randn_buf(const st_host *h, uint64_t stream, int64_t n, double std) {
  float *x = malloc(sizeof(float) * (size_t)(n ? n : 1));
  if (x) h->rng->normal(99, stream, 0, n, 0.0, std, ST_F32, x);
  return x;
}

int main(int argc, char **argv) {
  const char *module = NULL, *which = "mid";
  int threads = 2, steps = 5;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--config") && i + 1 < argc) which = argv[++i];
    else if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--steps") && i + 1 < argc) steps = atoi(argv[++i]);
    else if (argv[i][0] != '-' && !module) module = argv[i];
    else {
      fprintf(stderr, "usage: %s MODULE.so [--config tiny|mid] [--threads N] [--steps N]\n", argv[0]);
      return 2;
    }
  }
  const bench_cfg *bc = NULL;
  for (size_t i = 0; i < sizeof CONFIGS / sizeof CONFIGS[0]; i++)
    if (!strcmp(CONFIGS[i].name, which)) bc = &CONFIGS[i];
  if (!module || !bc || threads < 1 || steps < 1) {
    fprintf(stderr, "usage: %s MODULE.so [--config tiny|mid] [--threads N >= 1] [--steps N >= 1]\n", argv[0]);
    return 2;
  }
  /* OpenBLAS (the GEMMs) and the ops table's own pool both get `threads` */
  openblas_set_num_threads(threads);

  st_error err = {0};
  qh_env env;
  qh_run r = {0};
  st_result res = qh_env_open(&env, module, threads, &err);
  if (res == ST_OK) res = qh_run_open(&r, &env, bc->json, true, &err);
  if (res == ST_OK) res = qh_init_params(&r, 1, &err);
  if (res != ST_OK) {
    fprintf(stderr, "bench_qwen_image: %s: %s\n", err.where, err.message);
    return 1;
  }

  /* the batch: normalized-latent-like N(0,1) latents and prompt embeddings, full text masks */
  const int B = bc->batch;
  int64_t lat_n = (int64_t)bc->lat_channels * 2 * bc->grid_h * 2 * bc->grid_w;
  int64_t emb_n = (int64_t)bc->text_len * bc->joint_dim;
  static const char *names[3] = {"latents", "prompt_emb", "prompt_mask"};
  st_sample *samples = calloc((size_t)B, sizeof *samples);
  st_tensor(*t)[3] = calloc((size_t)B, sizeof *t);
  float **bufs = calloc((size_t)B * 3, sizeof *bufs);
  for (int b = 0; b < B; b++) {
    bufs[3 * b] = randn_buf(env.host, 10 + (uint64_t)b, lat_n, 1.0);
    bufs[3 * b + 1] = randn_buf(env.host, 20 + (uint64_t)b, emb_n, 1.0);
    bufs[3 * b + 2] = malloc(sizeof(float) * (size_t)bc->text_len);
    for (int q = 0; q < bc->text_len; q++) bufs[3 * b + 2][q] = 1.0f;
    t[b][0] = st_tensor_make(bufs[3 * b], ST_F32, QH_CPU, 3,
                             (int64_t[]){bc->lat_channels, 2 * bc->grid_h, 2 * bc->grid_w});
    t[b][1] = st_tensor_make(bufs[3 * b + 1], ST_F32, QH_CPU, 2, (int64_t[]){bc->text_len, bc->joint_dim});
    t[b][2] = st_tensor_make(bufs[3 * b + 2], ST_F32, QH_CPU, 1, (int64_t[]){bc->text_len});
    samples[b] = (st_sample){.id = "bench", .n_tensors = 3, .names = names, .tensors = t[b]};
  }
  double rss_loaded = peak_rss_mib();

  double *times = calloc((size_t)steps, sizeof *times), loss0 = 0, loss = 0;
  for (int s = 0; s <= steps && res == ST_OK; s++) {
    double t0 = now();
    qh_zero_grads(&r);
    res = qh_step(&r, samples, B, 1000 + (uint64_t)s, true, &loss, NULL, NULL, &err);
    if (res == ST_OK) res = qh_adamw(&r, 1e-4, s + 1, &err);
    double dt = now() - t0;
    if (s == 0) loss0 = loss;
    else times[s - 1] = dt;
  }
  if (res != ST_OK) {
    fprintf(stderr, "bench_qwen_image: %s: %s\n", err.where, err.message);
    return 1;
  }
  qsort(times, (size_t)steps, sizeof *times, cmp_double);
  double med = steps % 2 ? times[steps / 2] : 0.5 * (times[steps / 2 - 1] + times[steps / 2]);
  printf("strata %s: params %lld, batch %d, image tokens %d, text tokens %d, threads %d (%s), steps %d: "
         "median %.4f s/step (min %.4f, max %.4f); loss %.4f -> %.4f; peak RSS %.1f MiB (%.1f MiB after setup)\n",
         bc->name, (long long)qh_param_count(&r, false), B, bc->grid_h * bc->grid_w, bc->text_len, threads,
         env.ops->name, steps, med, times[0], times[steps - 1], loss0, loss, peak_rss_mib(), rss_loaded);
  printf("RESULT strata %s step_s=%.6f min_s=%.6f peak_rss_mib=%.1f threads=%d\n", bc->name, med, times[0], peak_rss_mib(),
         threads);
  for (int i = 0; i < 3 * B; i++) free(bufs[i]);
  free(bufs);
  free(t);
  free(samples);
  free(times);
  qh_run_close(&r);
  qh_env_close(&env);
  return 0;
}
