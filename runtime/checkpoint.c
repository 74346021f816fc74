/* checkpoint.c — atomic, topology-independent checkpoints and weight stores. See checkpoint.h. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "checkpoint.h"
#include "fsutil.h"
#include "safetensors.h"

static const char *const kind_tags[ST_STATE_KIND_COUNT] = {"param", "exp_avg", "exp_avg_sq"};

/* ------------------------------------------------------------------------------------------ */
/* small file-system helpers                                                                  */

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
  (void)sb;
  (void)flag;
  (void)ftw;
  return remove(path);
}

static void rm_rf(const char *path) { nftw(path, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static st_result fsync_path(const char *path, st_error *err) {
  int fd = open(path, O_RDONLY);
  if (fd < 0) return st_error_set(err, ST_ERR_IO, path, "cannot open for fsync: %s", strerror(errno));
  int rc = fsync(fd);
  int e = errno;
  close(fd);
  if (rc != 0 && e != EINVAL) return st_error_set(err, ST_ERR_IO, path, "fsync failed: %s", strerror(e));
  return ST_OK;
}

static void test_pause(const st_ckpt_options *opt) {
  if (!opt->slow_write_ms) return;
  struct timespec ts = {.tv_sec = opt->slow_write_ms / 1000, .tv_nsec = (long)(opt->slow_write_ms % 1000) * 1000000L};
  nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------------------------------------ */
/* saving                                                                                      */

typedef struct shard {
  st_safetensors_writer *w;
  uint64_t bytes;
} shard;

typedef struct ckpt_writer {
  st_state_writer pub;
  const st_ckpt_options *opt;
  shard *model_shards;
  int n_model_shards;
  json_t *weight_map; /* name -> shard index (as integer), for the index json */
  int n_full_params;  /* trainable parameters rank 0 received whole */
  st_safetensors_writer *rank_file;
  uint64_t total_model_bytes;
} ckpt_writer;

static int64_t numel_of(const st_param_desc *p) {
  int64_t n = 1;
  for (int d = 0; d < p->ndim; d++) n *= p->shape[d];
  return n;
}

static st_result ckpt_write(st_state_writer *sw, const st_param_desc *param, st_state_kind kind, int64_t offset,
                            int64_t count, st_dtype dt, const void *data, st_error *err) {
  ckpt_writer *w = (ckpt_writer *)sw;
  uint64_t bytes = (uint64_t)count * st_dtype_size(dt);
  bool full = offset == 0 && count == numel_of(param);
  if (kind == ST_STATE_PARAM && full && w->opt->rank == 0) {
    uint64_t cap = w->opt->max_shard_bytes ? w->opt->max_shard_bytes : (4ull << 30);
    shard *cur = w->n_model_shards ? &w->model_shards[w->n_model_shards - 1] : NULL;
    if (!cur || (cur->bytes > 0 && cur->bytes + bytes > cap)) {
      shard *grown = realloc(w->model_shards, sizeof *grown * (size_t)(w->n_model_shards + 1));
      if (!grown) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, param->name, "checkpoint shard table");
      w->model_shards = grown;
      cur = &w->model_shards[w->n_model_shards];
      *cur = (shard){0};
      ST_CHECK(st_safetensors_writer_create(&cur->w, err));
      w->n_model_shards++;
    }
    ST_CHECK(st_safetensors_writer_add(cur->w, param->name, dt, param->ndim, param->shape, data, true, err));
    cur->bytes += bytes;
    w->total_model_bytes += bytes;
    json_object_set_new(w->weight_map, param->name, json_integer(w->n_model_shards - 1));
    if (param->flags & ST_PARAM_TRAINABLE) w->n_full_params++;
    return ST_OK;
  }
  char name[1024], key[1100], shape_json[256];
  snprintf(name, sizeof name, "%s/%s@%lld", kind_tags[kind], param->name, (long long)offset);
  snprintf(key, sizeof key, "shape:%s", param->name);
  size_t used = (size_t)snprintf(shape_json, sizeof shape_json, "[");
  for (int d = 0; d < param->ndim; d++)
    used += (size_t)snprintf(shape_json + used, sizeof shape_json - used, "%s%lld", d ? ", " : "",
                             (long long)param->shape[d]);
  snprintf(shape_json + used, sizeof shape_json - used, "]");
  ST_CHECK(st_safetensors_writer_metadata(w->rank_file, key, shape_json, err));
  int64_t shape1[1] = {count};
  return st_safetensors_writer_add(w->rank_file, name, dt, 1, shape1, data, true, err);
}

static void ckpt_writer_free(ckpt_writer *w) {
  for (int i = 0; i < w->n_model_shards; i++) st_safetensors_writer_free(w->model_shards[i].w);
  free(w->model_shards);
  st_safetensors_writer_free(w->rank_file);
  json_decref(w->weight_map);
}

static st_result write_model_files(ckpt_writer *w, const char *tmp, st_error *err) {
  int n = w->n_model_shards;
  if (n == 0) return ST_OK;
  char path[4200];
  if (w->opt->n_param_tensors > 0 && w->n_full_params < w->opt->n_param_tensors) {
    /* a sharded strategy: not a loadable model file, so it must not look like one */
    for (int i = 0; i < n; i++) {
      snprintf(path, sizeof path, "%s/model-partial-rank%05d-%05d.safetensors", tmp, w->opt->rank, i + 1);
      st_result r = st_safetensors_writer_finish(w->model_shards[i].w, path, true, err);
      w->model_shards[i].w = NULL;
      if (r != ST_OK) return r;
    }
    return ST_OK;
  }
  if (n == 1) {
    snprintf(path, sizeof path, "%s/model.safetensors", tmp);
    ST_CHECK(st_safetensors_writer_finish(w->model_shards[0].w, path, true, err));
    w->model_shards[0].w = NULL;
    return ST_OK;
  }
  json_t *map = json_object();
  const char *key;
  json_t *val;
  json_object_foreach(w->weight_map, key, val) {
    char fname[64];
    snprintf(fname, sizeof fname, "model-%05lld-of-%05d.safetensors", (long long)json_integer_value(val) + 1, n);
    json_object_set_new(map, key, json_string(fname));
  }
  for (int i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", tmp, i + 1, n);
    st_result r = st_safetensors_writer_finish(w->model_shards[i].w, path, true, err);
    w->model_shards[i].w = NULL;
    test_pause(w->opt);
    if (r != ST_OK) {
      json_decref(map);
      return r;
    }
  }
  json_t *index = json_pack("{s:{s:I}, s:o}", "metadata", "total_size", (json_int_t)w->total_model_bytes,
                            "weight_map", map);
  char *text = json_dumps(index, JSON_INDENT(2) | JSON_SORT_KEYS);
  json_decref(index);
  snprintf(path, sizeof path, "%s/model.safetensors.index.json", tmp);
  st_result r = text ? st_write_file_atomic(path, text, strlen(text), err)
                     : st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "json");
  free(text);
  return r;
}

static char *trainer_state_json(const st_trainer_state *ts) {
  json_t *o = json_pack("{s:I, s:I, s:I, s:f, s:I, s:I, s:i, s:s, s:i, s:s, s:s, s:s}", "step", (json_int_t)ts->step,
                        "samples_seen", (json_int_t)ts->samples_seen, "bad_steps", (json_int_t)ts->bad_steps,
                        "loss_scale", ts->loss_scale, "scaler_iteration", (json_int_t)ts->scaler_iteration,
                        "scaler_last_overflow", (json_int_t)ts->scaler_last_overflow, "scaler_hysteresis_left",
                        ts->scaler_hysteresis_left, "seed", "", "world_size", ts->world_size, "model", ts->model,
                        "strategy", ts->strategy, "strata_version", ST_VERSION_STRING);
  if (!o) return NULL;
  char seed[32];
  snprintf(seed, sizeof seed, "%llu", (unsigned long long)ts->seed); /* u64 does not fit a JSON integer */
  json_object_set_new(o, "seed", json_string(seed));
  if (isfinite(ts->val_loss)) json_object_set_new(o, "val_loss", json_real(ts->val_loss));
  char *text = json_dumps(o, JSON_INDENT(2) | JSON_SORT_KEYS);
  json_decref(o);
  return text;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* step-* directory names of `out`, sorted (oldest first); *n set; NULL when none */
static char **step_dirs(const char *out, size_t *n) {
  *n = 0;
  DIR *d = opendir(out);
  if (!d) return NULL;
  char **names = NULL;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (strncmp(e->d_name, "step-", 5) != 0 || strchr(e->d_name, '.')) continue;
    char **grown = realloc(names, sizeof *names * (*n + 1));
    if (!grown) break;
    names = grown;
    names[(*n)++] = strdup(e->d_name);
  }
  closedir(d);
  if (names) qsort(names, *n, sizeof *names, cmp_str);
  return names;
}

typedef struct scored {
  char *name;
  double value; /* monitored value, sign-flipped for "max" so lower is better; NAN when unknown */
} scored;

static int cmp_scored(const void *a, const void *b) {
  double x = ((const scored *)a)->value, y = ((const scored *)b)->value;
  if (isnan(x) || isnan(y)) return isnan(x) - isnan(y); /* unknown last */
  return (x > y) - (x < y);
}

/* train.checkpoint: keep the save_top_k best by val_loss plus the newest (which `latest` names);
 * point `best` at the best one. Checkpoints that never saw a validation count as the worst. */
static st_result select_best(const st_ckpt_options *opt, const char *latest, st_error *err) {
  size_t n;
  char **names = step_dirs(opt->output_path, &n);
  scored *sc = calloc(n ? n : 1, sizeof *sc);
  st_result r = sc ? ST_OK : st_error_set(err, ST_ERR_OUT_OF_MEMORY, opt->output_path, "checkpoint list");
  for (size_t i = 0; r == ST_OK && i < n; i++) {
    char dir[4200];
    snprintf(dir, sizeof dir, "%s/%s", opt->output_path, names[i]);
    st_trainer_state ts;
    st_error ignored;
    sc[i].name = names[i];
    sc[i].value = st_ckpt_read_trainer_state(dir, &ts, &ignored) == ST_OK ? ts.val_loss : NAN;
    if (opt->monitor_max) sc[i].value = -sc[i].value;
  }
  if (r == ST_OK && n) {
    qsort(sc, n, sizeof *sc, cmp_scored);
    if (!isnan(sc[0].value)) {
      char path[4200], text[80];
      snprintf(path, sizeof path, "%s/best", opt->output_path);
      snprintf(text, sizeof text, "%s\n", sc[0].name);
      r = st_write_file_atomic(path, text, strlen(text), err);
    }
    for (size_t i = (size_t)opt->save_top_k; r == ST_OK && i < n; i++) {
      if (strcmp(sc[i].name, latest) == 0) continue;
      char path[4200];
      snprintf(path, sizeof path, "%s/%s", opt->output_path, sc[i].name);
      rm_rf(path);
    }
  }
  free(sc);
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
  return r;
}

/* keep the newest keep_last step-* directories; never the one `latest` names */
static void prune(const char *out, int64_t keep_last, const char *latest) {
  if (keep_last <= 0) return;
  size_t n;
  char **names = step_dirs(out, &n);
  for (size_t i = 0; i + (size_t)keep_last < n; i++) {
    if (names[i] && strcmp(names[i], latest) != 0) {
      char path[4200];
      snprintf(path, sizeof path, "%s/%s", out, names[i]);
      rm_rf(path);
    }
  }
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
}

st_result st_ckpt_save(const st_ckpt_options *opt, const st_strategy_plugin_v1 *strategy, void *sctx,
                       const st_trainer_state *ts, const char *config_json, st_error *err) {
  char tmp[4200], final[4200], name[64], path[4300];
  snprintf(name, sizeof name, "step-%06lld", (long long)ts->step);
  snprintf(tmp, sizeof tmp, "%s/.%s.tmp", opt->output_path, name);
  snprintf(final, sizeof final, "%s/%s", opt->output_path, name);
  ST_CHECK(st_mkdir_p(opt->output_path, err));
  if (opt->rank == 0) {
    rm_rf(tmp); /* left over from a crash */
    if (mkdir(tmp, 0755) != 0)
      return st_error_set(err, ST_ERR_IO, tmp, "cannot create the checkpoint directory: %s (is %s writable?)",
                          strerror(errno), opt->output_path);
  }
  /* every rank writes into the folder rank 0 created; rank 0 completes it after every rank wrote */
  if (opt->barrier) ST_CHECK(opt->barrier(opt->barrier_user, err));
  ckpt_writer w = {.pub = {.self = NULL, .write = ckpt_write}, .opt = opt, .weight_map = json_object()};
  w.pub.self = &w;
  st_result r = st_safetensors_writer_create(&w.rank_file, err);
  if (r == ST_OK) r = strategy->state_save(sctx, &w.pub, err);
  if (r == ST_OK) {
    snprintf(path, sizeof path, "%s/state-rank%05d-of-%05d.safetensors", tmp, opt->rank, opt->world_size);
    r = st_safetensors_writer_finish(w.rank_file, path, true, err);
    w.rank_file = NULL;
    test_pause(opt);
  }
  if (r == ST_OK) r = write_model_files(&w, tmp, err);
  ckpt_writer_free(&w);
  if (r != ST_OK) {
    st_error_prefix(err, "saving checkpoint %s: ", final);
    return r;
  }
  if (opt->barrier) ST_CHECK(opt->barrier(opt->barrier_user, err));
  if (opt->rank != 0) return ST_OK; /* rank 0 finishes the directory once every rank has written */

  char *state = trainer_state_json(ts);
  snprintf(path, sizeof path, "%s/trainer_state.json", tmp);
  r = state ? st_write_file_atomic(path, state, strlen(state), err)
            : st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "json");
  free(state);
  if (r == ST_OK && config_json) {
    snprintf(path, sizeof path, "%s/config.json", tmp);
    r = st_write_file_atomic(path, config_json, strlen(config_json), err);
  }
  test_pause(opt);
  if (r == ST_OK) r = fsync_path(tmp, err);
  if (r != ST_OK) return r;
  /* a step directory of the same name (a re-run of the same step) is swapped out, then removed */
  char old[4300];
  snprintf(old, sizeof old, "%s/.%s.old", opt->output_path, name);
  struct stat sb;
  if (stat(final, &sb) == 0) {
    rm_rf(old);
    if (rename(final, old) != 0) return st_error_set(err, ST_ERR_IO, final, "cannot replace: %s", strerror(errno));
  }
  if (rename(tmp, final) != 0)
    return st_error_set(err, ST_ERR_IO, final, "cannot move the checkpoint into place: %s", strerror(errno));
  rm_rf(old);
  ST_CHECK(fsync_path(opt->output_path, err));
  snprintf(path, sizeof path, "%s/latest", opt->output_path);
  char latest[80];
  snprintf(latest, sizeof latest, "%s\n", name);
  ST_CHECK(st_write_file_atomic(path, latest, strlen(latest), err));
  ST_CHECK(fsync_path(opt->output_path, err));
  if (opt->save_top_k > 0) return select_best(opt, name, err);
  prune(opt->output_path, opt->keep_last, name);
  return ST_OK;
}

st_result st_ckpt_resolve(const char *output_path, const char *resume, char *dir, size_t cap, st_error *err) {
  struct stat sb;
  if (strcmp(resume, "latest") == 0) {
    char path[4200], name[256] = "";
    snprintf(path, sizeof path, "%s/latest", output_path);
    FILE *f = fopen(path, "r");
    if (!f)
      return st_error_set(err, ST_ERR_NOT_FOUND, "train.resume",
                          "resume is \"latest\" but %s does not exist: no checkpoint has been saved in %s yet "
                          "(remove train.resume to start fresh)",
                          path, output_path);
    if (!fgets(name, sizeof name, f)) name[0] = '\0';
    fclose(f);
    name[strcspn(name, "\r\n")] = '\0';
    if (!name[0] || strchr(name, '/'))
      return st_error_set(err, ST_ERR_FORMAT, path, "does not name a checkpoint directory");
    snprintf(dir, cap, "%s/%s", output_path, name);
  } else {
    snprintf(dir, cap, "%s", resume);
  }
  char state[4200];
  snprintf(state, sizeof state, "%s/trainer_state.json", dir);
  if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
    return st_error_set(err, ST_ERR_NOT_FOUND, "train.resume", "checkpoint directory %s does not exist", dir);
  if (stat(state, &sb) != 0)
    return st_error_set(err, ST_ERR_FORMAT, "train.resume", "%s is not a strata checkpoint (no trainer_state.json)", dir);
  return ST_OK;
}

st_result st_ckpt_read_trainer_state(const char *dir, st_trainer_state *ts, st_error *err) {
  char path[4200];
  snprintf(path, sizeof path, "%s/trainer_state.json", dir);
  json_error_t je;
  json_t *o = json_load_file(path, JSON_REJECT_DUPLICATES, &je);
  if (!o) return st_error_set(err, ST_ERR_FORMAT, path, "%d:%d: %s", je.line, je.column, je.text);
  memset(ts, 0, sizeof *ts);
  json_int_t step = -1, cursor = 0, bad = 0, it = 0, last = -1, world = 1;
  int hyst = 0;
  double scale = 1.0;
  const char *seed = "0", *model = "", *strategy = "";
  int rc = json_unpack_ex(o, &je, 0, "{s:I, s:I, s?I, s?F, s?I, s?I, s?i, s?s, s?I, s?s, s?s}", "step", &step,
                          "samples_seen", &cursor, "bad_steps", &bad, "loss_scale", &scale, "scaler_iteration", &it,
                          "scaler_last_overflow", &last, "scaler_hysteresis_left", &hyst, "seed", &seed,
                          "world_size", &world, "model", &model, "strategy", &strategy);
  if (rc != 0) {
    json_decref(o);
    return st_error_set(err, ST_ERR_FORMAT, path, "%s", je.text);
  }
  *ts = (st_trainer_state){.step = step, .samples_seen = cursor, .bad_steps = bad, .loss_scale = scale,
                           .scaler_iteration = it, .scaler_last_overflow = last, .scaler_hysteresis_left = hyst,
                           .seed = strtoull(seed, NULL, 10), .world_size = (int)world};
  snprintf(ts->model, sizeof ts->model, "%s", model);
  snprintf(ts->strategy, sizeof ts->strategy, "%s", strategy);
  json_t *vl = json_object_get(o, "val_loss");
  ts->val_loss = json_is_number(vl) ? json_number_value(vl) : NAN;
  json_decref(o);
  return ST_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* reading: a set of safetensors files indexed by (kind, name) slices                           */

typedef struct slice {
  st_state_kind kind;
  char *name;
  int64_t offset, count;
  int ndim;
  int64_t shape[ST_MAX_DIMS]; /* global shape */
  const st_safetensors *file;
  const st_st_entry *entry;
} slice;

struct st_tensor_store {
  st_safetensors **files;
  int n_files;
  slice *slices;
  size_t n_slices;
};

static int cmp_slice(const void *a, const void *b) {
  const slice *x = a, *y = b;
  if (x->kind != y->kind) return (int)x->kind - (int)y->kind;
  int c = strcmp(x->name, y->name);
  if (c) return c;
  return x->offset < y->offset ? -1 : x->offset > y->offset;
}

void st_tensor_store_close(st_tensor_store *s) {
  if (!s) return;
  for (size_t i = 0; i < s->n_slices; i++) free(s->slices[i].name);
  for (int i = 0; i < s->n_files; i++) st_safetensors_close(s->files[i]);
  free(s->slices);
  free(s->files);
  free(s);
}

static st_result add_slice(st_tensor_store *s, slice sl, st_error *err) {
  slice *grown = realloc(s->slices, sizeof *grown * (s->n_slices + 1));
  if (!grown) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, sl.name, "tensor index");
  s->slices = grown;
  sl.name = strdup(sl.name);
  if (!sl.name) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "", "tensor index");
  s->slices[s->n_slices++] = sl;
  return ST_OK;
}

static bool parse_shape(const char *text, int64_t *shape, int *ndim) {
  json_t *a = json_loads(text, 0, NULL);
  bool ok = a && json_is_array(a) && json_array_size(a) <= ST_MAX_DIMS;
  if (ok) {
    *ndim = (int)json_array_size(a);
    for (int d = 0; d < *ndim; d++) shape[d] = json_integer_value(json_array_get(a, (size_t)d));
  }
  json_decref(a);
  return ok;
}

/* full tensors become PARAM slices; "<kind>/<name>@<offset>" entries become sliced state */
static st_result index_file(st_tensor_store *s, const char *path, bool sliced_names, st_error *err) {
  st_safetensors *f;
  ST_CHECK(st_safetensors_open(path, &f, err));
  st_safetensors **grown = realloc(s->files, sizeof *grown * (size_t)(s->n_files + 1));
  if (!grown) {
    st_safetensors_close(f);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "file table");
  }
  s->files = grown;
  s->files[s->n_files++] = f;
  for (int i = 0; i < st_safetensors_count(f); i++) {
    const st_st_entry *e = st_safetensors_entry(f, i);
    slice sl = {.file = f, .entry = e, .kind = ST_STATE_PARAM, .offset = 0, .ndim = e->ndim};
    int64_t n = 1;
    for (int d = 0; d < e->ndim; d++) n *= (sl.shape[d] = e->shape[d]);
    sl.count = n;
    char name[1024];
    snprintf(name, sizeof name, "%s", e->name);
    sl.name = name;
    const char *slash = strchr(e->name, '/'), *at = strrchr(e->name, '@');
    if (sliced_names && slash && at && at > slash) {
      int k;
      for (k = 0; k < ST_STATE_KIND_COUNT; k++)
        if ((size_t)(slash - e->name) == strlen(kind_tags[k]) && !strncmp(e->name, kind_tags[k], (size_t)(slash - e->name)))
          break;
      if (k == ST_STATE_KIND_COUNT) continue; /* a tensor of a newer strata: ignore */
      sl.kind = (st_state_kind)k;
      snprintf(name, sizeof name, "%.*s", (int)(at - slash - 1), slash + 1);
      sl.offset = strtoll(at + 1, NULL, 10);
      char key[1100];
      snprintf(key, sizeof key, "shape:%s", name);
      const char *shape = st_safetensors_metadata(f, key);
      if (!shape || !parse_shape(shape, sl.shape, &sl.ndim))
        return st_error_set(err, ST_ERR_FORMAT, path, "slice '%s' has no global shape in the metadata", e->name);
    }
    ST_CHECK(add_slice(s, sl, err));
  }
  return ST_OK;
}

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* *.safetensors files of dir, sorted, whose names start with prefix (NULL: all) */
static st_result list_files(const char *dir, const char *prefix, char ***out, size_t *n, st_error *err) {
  DIR *d = opendir(dir);
  if (!d) return st_error_set(err, ST_ERR_IO, dir, "cannot open directory: %s", strerror(errno));
  char **names = NULL;
  size_t count = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    size_t len = strlen(e->d_name);
    if (len < 12 || strcmp(e->d_name + len - 12, ".safetensors") != 0) continue;
    if (prefix && strncmp(e->d_name, prefix, strlen(prefix)) != 0) continue;
    char **grown = realloc(names, sizeof *names * (count + 1));
    if (!grown) break;
    names = grown;
    names[count++] = strdup(e->d_name);
  }
  closedir(d);
  qsort(names, count, sizeof *names, cmp_cstr);
  *out = names;
  *n = count;
  return ST_OK;
}

static st_result open_dir(const char *dir, bool checkpoint, st_tensor_store **out, st_error *err) {
  *out = NULL;
  st_tensor_store *s = calloc(1, sizeof *s);
  if (!s) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, dir, "tensor store");
  char **names = NULL;
  size_t n = 0;
  st_result r = list_files(dir, NULL, &names, &n, err);
  for (size_t i = 0; i < n && r == ST_OK; i++) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    bool state_file = checkpoint && strncmp(names[i], "state-rank", 10) == 0;
    r = index_file(s, path, state_file, err);
  }
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
  if (r == ST_OK && s->n_files == 0)
    r = st_error_set(err, ST_ERR_NOT_FOUND, dir, "no .safetensors files in this directory");
  if (r != ST_OK) {
    st_tensor_store_close(s);
    return r;
  }
  qsort(s->slices, s->n_slices, sizeof *s->slices, cmp_slice);
  for (size_t i = 1; i < s->n_slices; i++) {
    slice *a = &s->slices[i - 1], *b = &s->slices[i];
    if (a->kind == b->kind && !strcmp(a->name, b->name) && a->offset + a->count > b->offset) {
      st_error_set(err, ST_ERR_FORMAT, dir, "tensor '%s' (%s) is stored twice (overlapping slices in %s and %s)",
                   a->name, kind_tags[a->kind], st_safetensors_path(a->file), st_safetensors_path(b->file));
      st_tensor_store_close(s);
      return ST_ERR_FORMAT;
    }
  }
  *out = s;
  return ST_OK;
}

st_result st_tensor_store_open_checkpoint(const char *dir, st_tensor_store **out, st_error *err) {
  return open_dir(dir, true, out, err);
}

st_result st_tensor_store_open_weights(const char *path, st_tensor_store **out, st_error *err) {
  struct stat sb;
  if (stat(path, &sb) != 0)
    return st_error_set(err, ST_ERR_NOT_FOUND, "model.weights", "%s does not exist", path);
  if (S_ISDIR(sb.st_mode)) return open_dir(path, false, out, err);
  st_tensor_store *s = calloc(1, sizeof *s);
  if (!s) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "tensor store");
  st_result r = index_file(s, path, false, err);
  if (r != ST_OK) {
    st_tensor_store_close(s);
    return r;
  }
  qsort(s->slices, s->n_slices, sizeof *s->slices, cmp_slice);
  for (size_t i = 1; i < s->n_slices; i++)
    if (!strcmp(s->slices[i - 1].name, s->slices[i].name)) {
      st_error_set(err, ST_ERR_FORMAT, path, "tensor '%s' appears twice", s->slices[i].name);
      st_tensor_store_close(s);
      return ST_ERR_FORMAT;
    }
  *out = s;
  return ST_OK;
}

/* first slice of (kind, name) */
static const slice *find_first(const st_tensor_store *s, st_state_kind kind, const char *name) {
  size_t lo = 0, hi = s->n_slices;
  while (lo < hi) {
    size_t mid = (lo + hi) / 2;
    const slice *m = &s->slices[mid];
    int c = m->kind != kind ? (int)m->kind - (int)kind : strcmp(m->name, name);
    if (c < 0) lo = mid + 1;
    else hi = mid;
  }
  if (lo < s->n_slices && s->slices[lo].kind == kind && !strcmp(s->slices[lo].name, name)) return &s->slices[lo];
  return NULL;
}

bool st_tensor_store_has(const st_tensor_store *s, st_state_kind kind, const char *name, int64_t *shape, int *ndim) {
  const slice *sl = find_first(s, kind, name);
  if (!sl) return false;
  if (shape && ndim) {
    *ndim = sl->ndim;
    for (int d = 0; d < sl->ndim; d++) shape[d] = sl->shape[d];
  }
  return true;
}

static double load_elem(st_dtype dt, const void *p, int64_t i) {
  switch (dt) {
  case ST_F32: return ((const float *)p)[i];
  case ST_F64: return ((const double *)p)[i];
  case ST_BF16: return st_bf16_to_f32(((const uint16_t *)p)[i]);
  case ST_F16: return st_f16_to_f32(((const uint16_t *)p)[i]);
  case ST_I32: return ((const int32_t *)p)[i];
  case ST_I64: return (double)((const int64_t *)p)[i];
  case ST_U8: return ((const uint8_t *)p)[i];
  default: return 0.0;
  }
}

static void store_elem(st_dtype dt, void *p, int64_t i, double v) {
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

st_result st_tensor_store_read(st_tensor_store *s, st_state_kind kind, const char *name, int64_t offset,
                               int64_t count, st_dtype dt, void *dst, st_error *err) {
  const slice *first = find_first(s, kind, name);
  if (!first) return st_error_set(err, ST_ERR_NOT_FOUND, name, "no %s for this tensor", kind_tags[kind]);
  int64_t covered = 0;
  for (const slice *sl = first; sl < s->slices + s->n_slices && sl->kind == kind && !strcmp(sl->name, name); sl++) {
    int64_t lo = sl->offset > offset ? sl->offset : offset;
    int64_t hi = sl->offset + sl->count < offset + count ? sl->offset + sl->count : offset + count;
    if (lo >= hi) continue;
    const char *src = st_safetensors_data(sl->file, sl->entry);
    st_dtype sdt = sl->entry->dtype;
    int64_t src0 = lo - sl->offset, dst0 = lo - offset, n = hi - lo;
    if (sdt == dt) {
      memcpy((char *)dst + (size_t)dst0 * st_dtype_size(dt), src + (size_t)src0 * st_dtype_size(dt),
             (size_t)n * st_dtype_size(dt));
    } else {
      for (int64_t i = 0; i < n; i++) store_elem(dt, dst, dst0 + i, load_elem(sdt, src, src0 + i));
    }
    covered += n;
  }
  if (covered != count)
    return st_error_set(err, ST_ERR_FORMAT, name, "%s elements [%lld, %lld) are only partly stored (%lld of %lld)",
                        kind_tags[kind], (long long)offset, (long long)(offset + count), (long long)covered,
                        (long long)count);
  return ST_OK;
}

int st_tensor_store_param_count(const st_tensor_store *s) {
  int n = 0;
  for (size_t i = 0; i < s->n_slices; i++)
    if (s->slices[i].kind == ST_STATE_PARAM && (i == 0 || strcmp(s->slices[i - 1].name, s->slices[i].name))) n++;
  return n;
}

const char *st_tensor_store_param_name(const st_tensor_store *s, int k) {
  int n = 0;
  for (size_t i = 0; i < s->n_slices; i++)
    if (s->slices[i].kind == ST_STATE_PARAM && (i == 0 || strcmp(s->slices[i - 1].name, s->slices[i].name))) {
      if (n == k) return s->slices[i].name;
      n++;
    }
  return NULL;
}
