/* qwen_image_interop — tests-only helper for the interop suite (test_qwen_image_interop.py):
 * strata's side of the comparisons with diffusers / PEFT, through the model plugin and the CPU ops
 * table exactly as the trainer drives it (bench/qwen_image_harness.h).
 *
 *   qwen_image_interop forward MODULE.so MODEL_JSON INPUTS.safetensors OUT.safetensors WEIGHTS...
 *     MODEL_JSON: {"model": {...}} (the run's model block). Every parameter is read by its public
 *     name from the WEIGHTS sources (a .safetensors file, or a folder: all its *.safetensors); a
 *     name found in several sources is taken from the last one (base weights first, then a
 *     checkpoint's LoRA tensors). A parameter found nowhere, or with another element count, is an
 *     error naming it. INPUTS holds in.latents [B,C,H,W], in.noise [B,C,H,W], in.prompt_emb
 *     [B,Nt,J], in.prompt_mask [B,Nt], in.sigma [B] (any float dtype); the model noises with the
 *     pinned sigma/noise and OUT gets out.pred [B, Ni, patch^2 * out_channels] F32 and out.loss.
 *
 *   qwen_image_interop check-data MODULE.so MODEL_JSON BASE_PATH METADATA
 *     Opens the cached-sample dataset with strata's loader (runtime/data.h), reads every sample
 *     as a batch of 1 and runs the model's batch_prepare and a forward + loss on it (seeded init):
 *     the check that tools/qwen_image_prepare.py writes what strata reads. Prints one line per
 *     sample. */
#include <dirent.h>
#include <stdio.h>
#include <sys/stat.h>

#include "data.h"
#include "qwen_image_harness.h"
#include "safetensors.h"

#define MAX_SOURCES 64

static double elem(const st_st_entry *e, const void *p, int64_t i) {
  switch (e->dtype) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  case ST_F16: return st_f16_to_f32(((const uint16_t *)p)[i]);
  case ST_U8: return ((const uint8_t *)p)[i];
  case ST_I64: return (double)((const int64_t *)p)[i];
  case ST_I32: return ((const int32_t *)p)[i];
  default: return NAN;
  }
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* path: a file, or every *.safetensors of a folder in sorted order */
static st_result open_sources(const char *path, st_safetensors **src, int *n, st_error *err) {
  struct stat sb;
  if (stat(path, &sb) != 0) return st_error_set(err, ST_ERR_NOT_FOUND, path, "no such file or folder");
  if (!S_ISDIR(sb.st_mode)) {
    if (*n >= MAX_SOURCES) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, path, "too many weight files");
    return st_safetensors_open(path, &src[(*n)++], err);
  }
  DIR *d = opendir(path);
  if (!d) return st_error_set(err, ST_ERR_IO, path, "cannot list the folder");
  char *names[MAX_SOURCES];
  int k = 0;
  for (struct dirent *de; (de = readdir(d)) && k < MAX_SOURCES;) {
    size_t l = strlen(de->d_name);
    if (l > 12 && !strcmp(de->d_name + l - 12, ".safetensors")) names[k++] = strdup(de->d_name);
  }
  closedir(d);
  qsort(names, (size_t)k, sizeof *names, cmp_str);
  st_result r = ST_OK;
  for (int i = 0; i < k; i++) {
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", path, names[i]);
    if (r == ST_OK && *n >= MAX_SOURCES) r = st_error_set(err, ST_ERR_INVALID_ARGUMENT, path, "too many weight files");
    if (r == ST_OK) r = st_safetensors_open(p, &src[(*n)++], err);
    free(names[i]);
  }
  if (r == ST_OK && k == 0) r = st_error_set(err, ST_ERR_NOT_FOUND, path, "the folder holds no .safetensors file");
  return r;
}

static st_result load_weights(qh_run *r, st_safetensors **src, int n, st_error *err) {
  for (int u = 0; u < r->d->n_units; u++)
    for (int k = 0; k < r->d->units[u].n_params; k++) {
      const st_param_desc *p = &r->d->units[u].params[k];
      const st_st_entry *e = NULL;
      st_safetensors *f = NULL;
      for (int i = n - 1; i >= 0 && !e; i--)
        if ((e = st_safetensors_find(src[i], p->name))) f = src[i];
      if (!e) return st_error_set(err, ST_ERR_NOT_FOUND, p->name, "no weight source holds this parameter");
      int64_t ne = qh_numel(e->shape, e->ndim), np = qh_numel(p->shape, p->ndim);
      if (ne != np)
        return st_error_set(err, ST_ERR_FORMAT, p->name, "%s holds %lld elements, the model needs %lld",
                            st_safetensors_path(f), (long long)ne, (long long)np);
      const void *data = st_safetensors_data(f, e);
      for (int64_t q = 0; q < np; q++) qh_set(r->dt, r->P[u][k].data, q, elem(e, data, q));
    }
  return ST_OK;
}

static const st_st_entry *need(st_safetensors *f, const char *name, int ndim, st_error *err) {
  const st_st_entry *e = st_safetensors_find(f, name);
  if (!e || e->ndim != ndim) {
    st_error_set(err, ST_ERR_FORMAT, st_safetensors_path(f), "needs tensor %s with %d dimensions", name, ndim);
    return NULL;
  }
  return e;
}

static int cmd_forward(qh_env *env, const char *json, const char *inputs, const char *out, int n_w, char **wpaths) {
  st_error err = {0};
  qh_run r = {0};
  st_safetensors *src[MAX_SOURCES], *in = NULL;
  int n_src = 0;
  st_result res = qh_run_open(&r, env, json, false, &err);
  for (int i = 0; res == ST_OK && i < n_w; i++) res = open_sources(wpaths[i], src, &n_src, &err);
  if (res == ST_OK) res = load_weights(&r, src, n_src, &err);
  if (res == ST_OK) res = st_safetensors_open(inputs, &in, &err);
  const st_st_entry *lat = NULL, *nz = NULL, *pe = NULL, *mk = NULL, *sg = NULL;
  if (res == ST_OK && !((lat = need(in, "in.latents", 4, &err)) && (nz = need(in, "in.noise", 4, &err)) &&
                        (pe = need(in, "in.prompt_emb", 3, &err)) && (mk = need(in, "in.prompt_mask", 2, &err)) &&
                        (sg = need(in, "in.sigma", 1, &err))))
    res = ST_ERR_FORMAT;
  if (res != ST_OK) {
    fprintf(stderr, "qwen_image_interop forward: %s: %s\n", err.where, err.message);
    return 1;
  }
  int B = (int)lat->shape[0];
  int64_t C = lat->shape[1], H = lat->shape[2], W = lat->shape[3], NT = pe->shape[1], J = pe->shape[2];
  static const char *names[5] = {"latents", "prompt_emb", "prompt_mask", "noise", "sigma"};
  st_sample *smp = calloc((size_t)B, sizeof *smp);
  st_tensor(*t)[5] = calloc((size_t)B, sizeof *t);
  double **buf = calloc((size_t)B * 5, sizeof *buf);
  for (int b = 0; b < B; b++) {
    int64_t n[5] = {C * H * W, NT * J, NT, C * H * W, 1};
    for (int j = 0; j < 5; j++) buf[5 * b + j] = malloc(sizeof(double) * (size_t)n[j]);
    const void *dl = st_safetensors_data(in, lat), *dn = st_safetensors_data(in, nz), *dp = st_safetensors_data(in, pe);
    const void *dm = st_safetensors_data(in, mk), *ds = st_safetensors_data(in, sg);
    for (int64_t q = 0; q < C * H * W; q++) {
      buf[5 * b][q] = elem(lat, dl, b * C * H * W + q);
      buf[5 * b + 3][q] = elem(nz, dn, b * C * H * W + q);
    }
    for (int64_t q = 0; q < NT * J; q++) buf[5 * b + 1][q] = elem(pe, dp, b * NT * J + q);
    for (int64_t q = 0; q < NT; q++) buf[5 * b + 2][q] = elem(mk, dm, b * NT + q);
    buf[5 * b + 4][0] = elem(sg, ds, b);
    t[b][0] = st_tensor_make(buf[5 * b], ST_F64, QH_CPU, 3, (int64_t[]){C, H, W});
    t[b][1] = st_tensor_make(buf[5 * b + 1], ST_F64, QH_CPU, 2, (int64_t[]){NT, J});
    t[b][2] = st_tensor_make(buf[5 * b + 2], ST_F64, QH_CPU, 1, (int64_t[]){NT});
    t[b][3] = st_tensor_make(buf[5 * b + 3], ST_F64, QH_CPU, 3, (int64_t[]){C, H, W});
    t[b][4] = st_tensor_make(buf[5 * b + 4], ST_F64, QH_CPU, 0, NULL);
    smp[b] = (st_sample){.id = "interop", .n_tensors = 5, .names = names, .tensors = t[b]};
  }
  st_tensor pd = {0};
  double loss = 0;
  res = qh_step(&r, smp, B, 1, false, NULL, NULL, &pd, &err);
  int64_t np = st_tensor_numel(&pd);
  float *pred = res == ST_OK ? calloc((size_t)np, sizeof *pred) : NULL;
  if (res == ST_OK) res = qh_step(&r, smp, B, 1, false, &loss, pred, NULL, &err);
  st_safetensors_writer *w = NULL;
  float lossf = (float)loss;
  if (res == ST_OK) res = st_safetensors_writer_create(&w, &err);
  if (res == ST_OK) res = st_safetensors_writer_add(w, "out.pred", ST_F32, pd.ndim, pd.shape, pred, true, &err);
  if (res == ST_OK) res = st_safetensors_writer_add(w, "out.loss", ST_F32, 1, (int64_t[]){1}, &lossf, true, &err);
  if (res == ST_OK) res = st_safetensors_writer_finish(w, out, false, &err);
  if (res != ST_OK) fprintf(stderr, "qwen_image_interop forward: %s: %s\n", err.where, err.message);
  else fprintf(stderr, "qwen_image_interop forward: %d samples, %lld outputs, loss %.6g -> %s\n", B, (long long)np, loss, out);
  for (int i = 0; i < 5 * B; i++) free(buf[i]);
  free(buf);
  free(t);
  free(smp);
  free(pred);
  st_safetensors_close(in);
  for (int i = 0; i < n_src; i++) st_safetensors_close(src[i]);
  qh_run_close(&r);
  return res == ST_OK ? 0 : 1;
}

static int cmd_check_data(qh_env *env, const char *json, const char *base, const char *meta) {
  st_error err = {0};
  qh_run r = {0};
  st_dataset *d = NULL;
  st_result res = qh_run_open(&r, env, json, false, &err);
  if (res == ST_OK) res = qh_init_params(&r, 1, &err);
  st_dataset_options o = {.base_path = base, .metadata_path = meta, .repeat = 1, .batch_size = 1, .world_size = 1};
  if (res == ST_OK) res = st_dataset_open(&o, &d, &err);
  int64_t n = res == ST_OK ? st_dataset_size(d) : 0;
  for (int64_t i = 0; res == ST_OK && i < n; i++) {
    st_batch b;
    res = st_dataset_next(d, &b, &err);
    double loss = 0;
    if (res == ST_OK) res = qh_step(&r, b.samples, b.n_samples, 7 + (uint64_t)i, false, &loss, NULL, NULL, &err);
    if (res == ST_OK) {
      const st_sample *s = &b.samples[0];
      printf("%s:", s->id);
      for (int j = 0; j < s->n_tensors; j++) {
        char shp[96];
        printf(" %s %s%s", s->names[j], st_shape_str(s->tensors[j].shape, s->tensors[j].ndim, shp, sizeof shp),
               st_dtype_name(s->tensors[j].dtype));
      }
      printf("; loss %.6g\n", loss);
      if (!isfinite(loss)) res = st_error_set(&err, ST_ERR_NUMERIC, s->id, "non-finite loss %g", loss);
    }
  }
  if (res == ST_OK && n == 0) res = st_error_set(&err, ST_ERR_NOT_FOUND, base, "the dataset is empty");
  if (res != ST_OK) fprintf(stderr, "qwen_image_interop check-data: %s: %s\n", err.where, err.message);
  else printf("check-data: %lld samples read by strata's loader and accepted by the model\n", (long long)n);
  st_dataset_close(d);
  qh_run_close(&r);
  return res == ST_OK ? 0 : 1;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s forward MODULE.so MODEL_JSON INPUTS.safetensors OUT.safetensors WEIGHTS...\n"
                    "       %s check-data MODULE.so MODEL_JSON BASE_PATH METADATA\n", argv[0], argv[0]);
    return 2;
  }
  st_error err = {0};
  qh_env env;
  if (qh_env_open(&env, argv[2], 1, &err) != ST_OK) {
    fprintf(stderr, "qwen_image_interop: %s: %s\n", err.where, err.message);
    return 1;
  }
  int rc = 2;
  if (!strcmp(argv[1], "forward") && argc >= 7) rc = cmd_forward(&env, argv[3], argv[4], argv[5], argc - 6, argv + 6);
  else if (!strcmp(argv[1], "check-data") && argc == 6) rc = cmd_check_data(&env, argv[3], argv[4], argv[5]);
  else fprintf(stderr, "qwen_image_interop: unknown command or wrong argument count\n");
  qh_env_close(&env);
  return rc;
}
