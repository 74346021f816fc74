/* test_qwen_image_weights.c — loading a diffusers-layout Qwen-Image checkpoint (`model.weights`)
 * through st_train, the lowest callable level (the trainer's weight check is internal to it).
 *
 * The tensors come from the diffusers fixture (param.<name> in tests/reference/
 * qwen_image_tiny.safetensors, the tiny model's state dict as diffusers names and shapes it), written
 * under their plain names as a single diffusion_pytorch_model.safetensors or as two shards plus
 * diffusion_pytorch_model.safetensors.index.json. Checks:
 *   - the faithful file (single and sharded) loads: after one step at lr 1e-12 the checkpoint
 *     equals the fixture (the seeded init is nowhere near it), so the weights really were used;
 *   - one tensor renamed: ST_ERR_FORMAT naming the missing name and the unexpected one, "Nothing
 *     was loaded", and no checkpoint written;
 *   - one tensor reshaped (same element count, transposed shape), in a single file and inside the
 *     second shard: an error naming it with both shapes;
 *   - one tensor dropped: an error naming it.
 *
 * Usage: test_qwen_image_weights MODULE.so FIXTURE.safetensors */
#include <math.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "st_test.h"
#include "trainer.h"

static const char *MODULE;
static st_safetensors *FX;
static char TMP[256];

typedef enum { FAITHFUL, RENAME, RESHAPE, DROP } mutation;

/* writes every param.<name> of the fixture as <name>; `target` is renamed / reshaped / dropped.
 * shards == 2: the second half of the tensors go to a second file, with an index. */
static void write_weights(const char *dir, mutation m, const char *target, int shards) {
  mkdir(dir, 0755);
  st_error err = {0};
  st_safetensors_writer *w[2] = {NULL, NULL};
  for (int s = 0; s < shards; s++) CHECK_OK(st_safetensors_writer_create(&w[s], &err), &err);
  int n = st_safetensors_count(FX), n_params = 0;
  for (int i = 0; i < n; i++) n_params += !strncmp(st_safetensors_entry(FX, i)->name, "param.", 6);
  char index[65536];
  size_t used = (size_t)snprintf(index, sizeof index, "{\"metadata\": {\"total_size\": 0}, \"weight_map\": {");
  int k = 0;
  for (int i = 0; i < n; i++) {
    const st_st_entry *e = st_safetensors_entry(FX, i);
    if (strncmp(e->name, "param.", 6)) continue;
    const char *name = e->name + 6;
    char renamed[512];
    int64_t shape[ST_MAX_DIMS];
    memcpy(shape, e->shape, sizeof shape);
    bool hit = !strcmp(name, target);
    if (hit && m == DROP) {
      k++;
      continue;
    }
    if (hit && m == RENAME) {
      const char *at = strstr(name, "to_k.");
      CHECK(at != NULL);
      if (at) snprintf(renamed, sizeof renamed, "%.*sto_key.%s", (int)(at - name), name, at + 5);
      name = renamed;
    }
    if (hit && m == RESHAPE && e->ndim == 2) {
      shape[0] = e->shape[1];
      shape[1] = e->shape[0];
    }
    int s = (shards == 2 && k >= n_params / 2) ? 1 : 0;
    CHECK_OK(st_safetensors_writer_add(w[s], name, e->dtype, e->ndim, shape, st_safetensors_data(FX, e), false, &err),
             &err);
    used += (size_t)snprintf(index + used, sizeof index - used, "%s\"%s\": \"diffusion_pytorch_model-0000%d-of-00002.safetensors\"",
                             k ? ", " : "", name, s + 1);
    k++;
  }
  char path[512];
  if (shards == 1) {
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors", dir);
    CHECK_OK(st_safetensors_writer_finish(w[0], path, false, &err), &err);
    return;
  }
  for (int s = 0; s < 2; s++) {
    snprintf(path, sizeof path, "%s/diffusion_pytorch_model-0000%d-of-00002.safetensors", dir, s + 1);
    CHECK_OK(st_safetensors_writer_finish(w[s], path, false, &err), &err);
  }
  snprintf(index + used, sizeof index - used, "}}\n");
  snprintf(path, sizeof path, "%s/diffusion_pytorch_model.safetensors.index.json", dir);
  FILE *f = fopen(path, "w");
  CHECK(f != NULL);
  if (f) {
    fputs(index, f);
    fclose(f);
  }
}

/* one st_train step of the tiny model from `weights`; returns the result, err filled */
static st_result train_from(const char *weights, const char *out, st_error *err) {
  char cfg[1024], json[2048];
  snprintf(cfg, sizeof cfg, "%s/config-%d.json", TMP, rand());
  snprintf(json, sizeof json,
           "{\"train_micro_batch_size_per_gpu\": 2, \"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": 1e-12}},"
           " \"model\": {\"name\": \"qwen_image\", \"plugin\": \"%s\", \"preset\": \"tiny\", \"weights\": \"%s\"},"
           " \"strategy\": {\"name\": \"local\"}, \"data\": {\"synthetic\": {\"num_samples\": 2}},"
           " \"train\": {\"max_steps\": 1, \"save_steps\": 1, \"output_path\": \"%s\", \"seed\": 3}}",
           MODULE, weights, out);
  FILE *f = fopen(cfg, "w");
  if (!f) return st_error_set(err, ST_ERR_IO, cfg, "cannot write the test config");
  fputs(json, f);
  fclose(f);
  FILE *console = fopen("/dev/null", "w");
  st_run_options o = {.config_path = cfg, .console = console, .progress_tty = 0};
  st_result r = st_train(&o, err);
  if (console) fclose(console);
  return r;
}

static bool exists(const char *path) {
  struct stat sb;
  return stat(path, &sb) == 0;
}

/* the checkpoint after one step at lr 1e-12 holds the fixture's values */
static void expect_loaded(const char *out) {
  char path[600];
  snprintf(path, sizeof path, "%s/step-000001/model.safetensors", out);
  st_error err = {0};
  st_safetensors *ck = NULL;
  CHECK_OK(st_safetensors_open(path, &ck, &err), &err);
  if (!ck) return;
  int compared = 0;
  double worst = 0;
  for (int i = 0; i < st_safetensors_count(ck); i++) {
    const st_st_entry *c = st_safetensors_entry(ck, i);
    char name[600];
    snprintf(name, sizeof name, "param.%s", c->name);
    const st_st_entry *e = st_safetensors_find(FX, name);
    CHECK_MSG(e != NULL, "checkpoint tensor %s is not in the diffusers state dict", c->name);
    if (!e || c->dtype != ST_F32 || e->dtype != ST_F32) continue;
    const float *a = st_safetensors_data(ck, c), *b = st_safetensors_data(FX, e);
    for (int64_t q = 0; q < (int64_t)((c->end - c->begin) / 4); q++) {
      double d = fabs((double)a[q] - b[q]);
      if (d > worst) worst = d;
    }
    compared++;
  }
  CHECK_MSG(compared == 2 * 32 + 13, "compared %d tensors", compared);
  /* Adam's first step moves each weight by ~lr: 1e-12, far below the fixture's values (~0.1) and
   * the seeded init's distance from them */
  CHECK_MSG(worst < 1e-6, "checkpoint differs from the loaded weights by %.3g", worst);
  st_safetensors_close(ck);
}

static void expect_error(const char *weights, const char *label, const char *needles[], int n_needles) {
  char out[600];
  snprintf(out, sizeof out, "%s/out-%s", TMP, label);
  st_error err = {0};
  st_result r = train_from(weights, out, &err);
  CHECK_MSG(r == ST_ERR_FORMAT, "%s: st_train returned %d (%s), expected ST_ERR_FORMAT", label, (int)r, err.message);
  char text[ST_ERROR_WHERE_MAX + ST_ERROR_MESSAGE_MAX + 4];
  snprintf(text, sizeof text, "%s: %s", err.where, err.message);
  const char *t = text;
  for (int i = 0; i < n_needles; i++) CHECK_CONTAINS(t, needles[i]);
  CHECK_CONTAINS(t, "Nothing was loaded");
  char ck[700];
  snprintf(ck, sizeof ck, "%s/step-000001", out);
  CHECK_MSG(!exists(ck), "%s: a checkpoint was written after a failed load", label);
  fprintf(stderr, "%s: %s\n", label, text);
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s MODULE.so FIXTURE.safetensors\n", argv[0]);
    return 1;
  }
  MODULE = argv[1];
  st_error err = {0};
  CHECK_OK(st_safetensors_open(argv[2], &FX, &err), &err);
  snprintf(TMP, sizeof TMP, "/tmp/st-qwen-weights-XXXXXX");
  CHECK(mkdtemp(TMP) != NULL);
  if (!FX) return st_test_finish("qwen_image_weights");
  char dir[600], out[600];

  /* faithful: single file and sharded */
  snprintf(dir, sizeof dir, "%s/ok", TMP);
  write_weights(dir, FAITHFUL, "", 1);
  snprintf(out, sizeof out, "%s/out-ok", TMP);
  CHECK_OK(train_from(dir, out, &err), &err);
  expect_loaded(out);
  snprintf(dir, sizeof dir, "%s/ok-sharded", TMP);
  write_weights(dir, FAITHFUL, "", 2);
  snprintf(out, sizeof out, "%s/out-ok-sharded", TMP);
  CHECK_OK(train_from(dir, out, &err), &err);
  expect_loaded(out);

  /* renamed */
  snprintf(dir, sizeof dir, "%s/renamed", TMP);
  write_weights(dir, RENAME, "transformer_blocks.1.attn.to_k.weight", 1);
  expect_error(dir, "renamed",
               (const char *[]){"missing tensor(s): 'transformer_blocks.1.attn.to_k.weight'",
                                "unexpected tensor(s): 'transformer_blocks.1.attn.to_key.weight'"}, 2);

  /* reshaped, single file: proj_out.weight is [16, 32] (out 4 x patch 2 x 2, D 32) */
  snprintf(dir, sizeof dir, "%s/reshaped", TMP);
  write_weights(dir, RESHAPE, "proj_out.weight", 1);
  expect_error(dir, "reshaped", (const char *[]){"'proj_out.weight' is [32, 16], the model needs [16, 32]"}, 1);

  /* reshaped inside the second shard of a sharded checkpoint */
  snprintf(dir, sizeof dir, "%s/reshaped-sharded", TMP);
  write_weights(dir, RESHAPE, "transformer_blocks.1.img_mlp.net.0.proj.weight", 2);
  expect_error(dir, "reshaped-sharded",
               (const char *[]){"'transformer_blocks.1.img_mlp.net.0.proj.weight' is [32, 128], the model needs [128, 32]"},
               1);

  /* dropped */
  snprintf(dir, sizeof dir, "%s/dropped", TMP);
  write_weights(dir, DROP, "txt_norm.weight", 1);
  expect_error(dir, "dropped", (const char *[]){"missing tensor(s): 'txt_norm.weight'"}, 1);

  st_safetensors_close(FX);
  char cmd[400];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", TMP);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", TMP);
  return st_test_finish("qwen_image_weights");
}
