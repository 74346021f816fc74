/* config.c — the configuration: JSON loading (jansson, duplicate keys rejected), the DeepSpeed and
 * strata schema, "auto" resolution, provenance of every value, --set overrides, and the st_cfg_api
 * that plugins read their own blocks through (host.h).
 *
 * This file depends on libc, jansson and the strata headers only: the libFuzzer target
 * (tests/fuzz/fuzz_config.c, scripts/fuzz-smoke) compiles it alone.
 *
 * Data model. The merged document is one jansson object (`root`). Provenance lives beside it in a
 * second jansson object used as a hash map, keyed by dotted key path ("optimizer.params.lr"), with
 * one entry per leaf: a scalar, an array, or an empty object. Whenever a value is put into the
 * document the entries of what it replaced are dropped and its own leaves are recorded.
 * Plugin-facing nodes (st_cfg) are small handles owned by the st_config (a list, freed with it);
 * each holds a reference to its JSON node and its dotted path, so messages can name full paths.
 *
 * Defaults (what an absent key means; `strata validate` prints each one with provenance "default"):
 *   gradient_clipping 1.0              DeepSpeed's current code default (0 turns clipping off)
 *   steps_per_print 0                  the progress bar only (DeepSpeed's code default is None)
 *   wall_clock_breakdown false
 *   optimizer {"type": "AdamW", "params": {lr 1e-3, betas [0.9, 0.999], eps 1e-8,
 *              weight_decay 0, adam_w_mode true}}   DeepSpeed FusedAdam's / torch's defaults;
 *              SGD: lr 1e-3, momentum 0
 *   scheduler absent                   constant learning rate
 *     WarmupLR / WarmupDecayLR: warmup_min_lr 0, warmup_max_lr = optimizer lr, warmup_num_steps
 *     1000, warmup_type "log"; total_num_steps absent = "auto"
 *     WarmupCosineLR: warmup_min_ratio 0, cos_min_ratio 1e-4, warmup_num_steps 1000, "log"
 *   fp16 (when enabled): loss_scale 0 (dynamic), initial_scale_power 16, loss_scale_window 1000,
 *     hysteresis 2, consecutive_hysteresis false, min_loss_scale 1
 *   tensorboard / csv_monitor (when present): enabled false, output_path null (= under
 *     train.output_path), job_name "DeepSpeedJobName"
 *   strategy.name "local" (when neither name nor plugin is given)
 *   data: dataset_repeat 1, num_workers 1 (one prefetch thread; 0 loads inline), shuffle true,
 *     synthetic.num_samples 0 (no synthetic data), synthetic.seed 1 (the synthetic data set: independent of
 *     train.seed, so runs with different training seeds see the same data)
 *   train: max_steps 0 (= num_epochs over the data), num_epochs 1, seed 42, output_path "out",
 *     save_steps 0 (only at the end), keep_last 0 (keep all), resume null, max_bad_steps 3,
 *     peak_tflops 0 (unknown: MFU is not reported), gradient_checkpointing = whether an
 *     activation_checkpointing block is present, gradient_checkpointing_offload =
 *     activation_checkpointing.cpu_checkpointing
 *   device: type "cpu", threads 0 (all cores), comm "auto" (gloo on the CPU, nccl on CUDA; the
 *     built-in local backend for one process), comm_timeout_s 1800 (torch's default), interface null
 *   batch triple entirely absent: train_micro_batch_size_per_gpu 1, gradient_accumulation_steps 1.
 *
 * "auto" (resolved by st_config_resolve, provenance "derived"; as Hugging Face resolves it, with
 * torch/DeepSpeed defaults standing in for the TrainingArguments strata does not have):
 *   batch triple: treated as absent, then DeepSpeed's resolution order (reference §1.2);
 *   gradient_clipping 1.0; optimizer.params lr 1e-3, betas [0.9, 0.999], eps 1e-8,
 *   weight_decay 0; scheduler.params warmup_min_lr 0, warmup_max_lr = optimizer lr,
 *   warmup_num_steps 0 (HF's default warmup), total_num_steps = train.max_steps (when 0, it stays
 *   unresolved in the document and st_settings gets 0 = "the trainer's total");
 *   fp16/bf16.enabled false; zero_optimization reduce_bucket_size h², stage3_prefetch_bucket_size
 *   0.9·h², stage3_param_persistence_threshold 10·h, stage3_gather_16bit_weights_on_model_save
 *   false. */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

struct st_cfg {
  st_config *owner;
  json_t *node; /* a reference is held: the node outlives a --set that replaces it */
  char *path;   /* dotted; "" for the root */
  st_cfg *next;
};

struct st_config {
  json_t *root;
  json_t *prov;     /* dotted path -> st_prov (integer), one entry per leaf */
  st_cfg *nodes;    /* every handle given out, freed with the config */
  char *file_name;  /* the main source, for messages */
  char *ds_name;    /* the --deepspeed file, or NULL */
};

#define PATH_CAP ST_ERROR_WHERE_MAX

const char *st_prov_name(st_prov p) {
  switch (p) {
  case ST_PROV_DEFAULT: return "default";
  case ST_PROV_FILE: return "file";
  case ST_PROV_DEEPSPEED: return "deepspeed";
  case ST_PROV_SET: return "--set";
  case ST_PROV_DERIVED: return "derived";
  }
  return "?";
}

/* ---- paths and provenance ------------------------------------------------------------------ */

static char *path_join(const char *parent, const char *key) {
  size_t a = parent ? strlen(parent) : 0, b = strlen(key);
  char *p = malloc(a + b + 2);
  if (!p) return NULL;
  if (a) {
    memcpy(p, parent, a);
    p[a] = '.';
    memcpy(p + a + 1, key, b + 1);
  } else {
    memcpy(p, key, b + 1);
  }
  return p;
}

/* the same into a fixed buffer (messages: truncation is harmless there) */
static void path_fmt(char *buf, size_t cap, const char *parent, const char *key) {
  if (parent && parent[0] && key) snprintf(buf, cap, "%s.%s", parent, key);
  else snprintf(buf, cap, "%s", key ? key : (parent ? parent : ""));
}

static bool prov_mark(st_config *c, const char *path, json_t *v, st_prov p) {
  if (json_is_object(v) && json_object_size(v) > 0) {
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
      char *cp = path_join(path, k);
      if (!cp) return false;
      bool ok = prov_mark(c, cp, x, p);
      free(cp);
      if (!ok) return false;
    }
    return true;
  }
  if (!path[0]) return true; /* an empty root is not a leaf */
  return json_object_set_new(c->prov, path, json_integer(p)) == 0;
}

static void prov_clear(st_config *c, const char *path, json_t *v) {
  if (json_is_object(v) && json_object_size(v) > 0) {
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) {
      char *cp = path_join(path, k);
      if (!cp) return;
      prov_clear(c, cp, x);
      free(cp);
    }
    return;
  }
  if (path[0]) json_object_del(c->prov, path);
}

/* the leaf's own entry, else the nearest ancestor's (an empty object that later got keys) */
static st_prov prov_get(const st_config *c, const char *path) {
  json_t *e = json_object_get(c->prov, path);
  if (e) return (st_prov)json_integer_value(e);
  char *copy = strdup(path);
  if (!copy) return ST_PROV_DEFAULT;
  st_prov p = ST_PROV_DEFAULT;
  char *dot;
  while ((dot = strrchr(copy, '.'))) {
    *dot = '\0';
    if ((e = json_object_get(c->prov, copy))) {
      p = (st_prov)json_integer_value(e);
      break;
    }
  }
  free(copy);
  return p;
}

st_prov st_config_provenance(const st_config *c, const char *dotted_path) { return prov_get(c, dotted_path); }

static st_result oom(st_error *err, const char *where) {
  return st_error_set(err, ST_ERR_OUT_OF_MEMORY, where, "out of memory while building the configuration");
}

/* obj[key] = value (the reference is stolen), every leaf of value recorded with provenance p */
static st_result cfg_put(st_config *c, json_t *obj, const char *obj_path, const char *key, json_t *value, st_prov p,
                         st_error *err) {
  if (!value) return oom(err, key);
  char *path = path_join(obj_path, key);
  if (!path) {
    json_decref(value);
    return oom(err, key);
  }
  json_t *old = json_object_get(obj, key);
  if (old) prov_clear(c, path, old);
  if (obj_path[0]) json_object_del(c->prov, obj_path); /* obj stops being an empty leaf */
  if (json_object_set_new(obj, key, value) != 0) {
    st_result r = st_error_set(err, ST_ERR_CONFIG, path, "%s: the key is not valid UTF-8", path);
    free(path);
    return r;
  }
  bool ok = prov_mark(c, path, value, p);
  free(path);
  return ok ? ST_OK : oom(err, key);
}

/* ---- messages ------------------------------------------------------------------------------ */

static bool is_auto(const json_t *v) { return json_is_string(v) && strcmp(json_string_value(v), "auto") == 0; }

static void describe(const json_t *v, char *buf, size_t cap) {
  switch (json_typeof(v)) {
  case JSON_STRING: {
    char *s = json_dumps(v, JSON_ENCODE_ANY);
    if (s && strlen(s) > 64) strcpy(s + 58, "...\"");
    snprintf(buf, cap, "a string (%s)", s ? s : "?");
    free(s);
    break;
  }
  case JSON_INTEGER: snprintf(buf, cap, "an integer (%" JSON_INTEGER_FORMAT ")", json_integer_value(v)); break;
  case JSON_REAL: snprintf(buf, cap, "a number (%g)", json_real_value(v)); break;
  case JSON_TRUE: snprintf(buf, cap, "a boolean (true)"); break;
  case JSON_FALSE: snprintf(buf, cap, "a boolean (false)"); break;
  case JSON_NULL: snprintf(buf, cap, "null"); break;
  case JSON_ARRAY: snprintf(buf, cap, "an array of %zu items", json_array_size(v)); break;
  case JSON_OBJECT: snprintf(buf, cap, "an object"); break;
  default: snprintf(buf, cap, "a value"); break;
  }
}

/* " (in my.json)" / " (from --set)": where the offending value came from */
static void source_hint(const st_config *c, const char *path, char *buf, size_t cap) {
  switch (prov_get(c, path)) {
  case ST_PROV_FILE: snprintf(buf, cap, " (in %s)", c->file_name ? c->file_name : "the config"); break;
  case ST_PROV_DEEPSPEED: snprintf(buf, cap, " (in the DeepSpeed file %s)", c->ds_name ? c->ds_name : ""); break;
  case ST_PROV_SET: snprintf(buf, cap, " (from --set)"); break;
  default: buf[0] = '\0'; break;
  }
}

static st_result auto_error(const st_config *c, const char *path, st_error *err) {
  char hint[PATH_CAP + 40];
  source_hint(c, path, hint, sizeof hint);
  return st_error_set(err, ST_ERR_CONFIG, path,
                      "%s: \"auto\" is not resolved here%s: strata resolves \"auto\" only where DeepSpeed and "
                      "Hugging Face do (the batch sizes, gradient_clipping, optimizer.params, scheduler.params, "
                      "fp16/bf16.enabled, the zero_optimization bucket sizes), after the world size and the "
                      "model are known; give a value",
                      path, hint);
}

static st_result type_error(const st_config *c, const char *path, const char *expected, const json_t *found,
                            st_error *err) {
  if (is_auto(found)) return auto_error(c, path, err);
  char desc[128], hint[PATH_CAP + 40];
  describe(found, desc, sizeof desc);
  source_hint(c, path, hint, sizeof hint);
  return st_error_set(err, ST_ERR_CONFIG, path, "%s: expected %s, found %s%s", path, expected, desc, hint);
}

/* Optimal string alignment distance (Levenshtein plus adjacent transpositions), case-insensitive. */
static int edit_distance(const char *a, const char *b) {
  enum { MAXLEN = 64 };
  size_t n = strlen(a), m = strlen(b);
  if (n > MAXLEN || m > MAXLEN) return INT_MAX / 2;
  int d[MAXLEN + 1][MAXLEN + 1];
  for (size_t i = 0; i <= n; i++) d[i][0] = (int)i;
  for (size_t j = 0; j <= m; j++) d[0][j] = (int)j;
  for (size_t i = 1; i <= n; i++) {
    for (size_t j = 1; j <= m; j++) {
      int ca = tolower((unsigned char)a[i - 1]), cb = tolower((unsigned char)b[j - 1]);
      int best = d[i - 1][j - 1] + (ca != cb);
      if (d[i - 1][j] + 1 < best) best = d[i - 1][j] + 1;
      if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
      if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2]) && tolower((unsigned char)a[i - 2]) == cb &&
          d[i - 2][j - 2] + 1 < best)
        best = d[i - 2][j - 2] + 1;
      d[i][j] = best;
    }
  }
  return d[n][m];
}

/* the closest name within a distance that still reads as a typo, or NULL */
static const char *closest_name(const char *key, const char *const *names, size_t n) {
  size_t len = strlen(key);
  int limit = len <= 3 ? 1 : len <= 8 ? 2 : 3, best_d = INT_MAX;
  const char *best = NULL;
  for (size_t i = 0; i < n; i++) {
    int d = edit_distance(key, names[i]);
    if (d <= limit && d < best_d) {
      best_d = d;
      best = names[i];
    }
  }
  return best;
}

static void join_names(char *buf, size_t cap, const char *const *names, size_t n, bool quote) {
  size_t used = 0;
  buf[0] = '\0';
  for (size_t i = 0; i < n && used + 1 < cap; i++) {
    int w = snprintf(buf + used, cap - used, quote ? "%s\"%s\"" : "%s%s", i ? ", " : "", names[i]);
    if (w < 0) break;
    used += (size_t)w;
  }
  if (used >= cap && cap > 4) strcpy(buf + cap - 4, "...");
}

/* `elsewhere`: where this key does belong, when it is a known key of another block */
static st_result unknown_key_error(const st_config *c, const char *obj_path, const char *key,
                                   const char *const *names, size_t n, const char *elsewhere, st_error *err) {
  char path[PATH_CAP], hint[PATH_CAP + 40];
  path_fmt(path, sizeof path, obj_path, key);
  source_hint(c, path, hint, sizeof hint);
  const char *near = closest_name(key, names, n);
  if (near) {
    char sugg[PATH_CAP];
    path_fmt(sugg, sizeof sugg, obj_path, near);
    return st_error_set(err, ST_ERR_CONFIG, path, "%s: unknown key%s; did you mean \"%s\"?", path, hint, sugg);
  }
  if (elsewhere)
    return st_error_set(err, ST_ERR_CONFIG, path, "%s: unknown key%s; did you mean \"%s\"?", path, hint, elsewhere);
  char list[900];
  join_names(list, sizeof list, names, n, false);
  return st_error_set(err, ST_ERR_CONFIG, path, "%s: unknown key%s; the keys allowed %s are: %s", path, hint,
                      obj_path && obj_path[0] ? "here" : "at the top level", list);
}

static size_t count_names(const char *const *names) {
  size_t n = 0;
  while (names && names[n]) n++;
  return n;
}

static const char *match_choice(const char *s, const char *const *choices) {
  for (size_t i = 0; choices[i]; i++)
    if (strcasecmp(s, choices[i]) == 0) return choices[i];
  return NULL;
}

static st_result enum_error(const st_config *c, const char *path, const json_t *v, const char *const *choices,
                            st_error *err) {
  char list[600], hint[PATH_CAP + 40], desc[128], dym[200] = "";
  join_names(list, sizeof list, choices, count_names(choices), true);
  source_hint(c, path, hint, sizeof hint);
  describe(v, desc, sizeof desc);
  if (json_is_string(v)) {
    const char *near = closest_name(json_string_value(v), choices, count_names(choices));
    if (near) snprintf(dym, sizeof dym, "; did you mean \"%s\"?", near);
  }
  return st_error_set(err, ST_ERR_CONFIG, path, "%s: expected one of %s (any case), found %s%s%s", path, list, desc,
                      hint, dym);
}

/* an integer, or a JSON real with an integral value that fits (8.0, 5e8) */
static bool json_as_int(const json_t *v, int64_t *out) {
  if (json_is_integer(v)) {
    *out = (int64_t)json_integer_value(v);
    return true;
  }
  if (json_is_real(v)) {
    double d = json_real_value(v);
    if (d == floor(d) && d >= -9223372036854775808.0 && d < 9223372036854775808.0) {
      *out = (int64_t)d;
      return true;
    }
  }
  return false;
}

/* ---- node handles ------------------------------------------------------------------------- */

static st_cfg *node_handle(st_config *c, json_t *node, const char *path) {
  for (st_cfg *n = c->nodes; n; n = n->next)
    if (n->node == node && strcmp(n->path, path) == 0) return n;
  st_cfg *n = calloc(1, sizeof *n);
  if (!n) return NULL;
  n->path = strdup(path);
  if (!n->path) {
    free(n);
    return NULL;
  }
  n->owner = c;
  n->node = json_incref(node);
  n->next = c->nodes;
  c->nodes = n;
  return n;
}

st_cfg *st_config_root(st_config *c) { return c ? node_handle(c, c->root, "") : NULL; }

st_cfg *st_config_node(st_config *c, const char *dotted_path) {
  if (!c) return NULL;
  if (!dotted_path || !dotted_path[0]) return st_config_root(c);
  char *copy = strdup(dotted_path);
  if (!copy) return NULL;
  json_t *cur = c->root;
  char *save = NULL;
  for (char *seg = strtok_r(copy, ".", &save); seg && cur; seg = strtok_r(NULL, ".", &save))
    cur = json_is_object(cur) ? json_object_get(cur, seg) : NULL;
  free(copy);
  return cur ? node_handle(c, cur, dotted_path) : NULL;
}

/* ---- st_cfg_api --------------------------------------------------------------------------- */

static st_cfg_type cfg_type_of(const json_t *v) {
  if (!v) return ST_CFG_ABSENT;
  switch (json_typeof(v)) {
  case JSON_NULL: return ST_CFG_NULL;
  case JSON_TRUE:
  case JSON_FALSE: return ST_CFG_BOOL;
  case JSON_INTEGER: return ST_CFG_INT;
  case JSON_REAL: return ST_CFG_NUMBER;
  case JSON_STRING: return ST_CFG_STRING;
  case JSON_ARRAY: return ST_CFG_ARRAY;
  case JSON_OBJECT: return ST_CFG_OBJECT;
  }
  return ST_CFG_ABSENT;
}

static st_cfg_type api_type(const st_cfg *obj, const char *key) {
  if (!obj) return ST_CFG_ABSENT;
  if (!key) return cfg_type_of(obj->node);
  return json_is_object(obj->node) ? cfg_type_of(json_object_get(obj->node, key)) : ST_CFG_ABSENT;
}

static const char *api_path(const st_cfg *node) { return node ? node->path : ""; }

/* The value of obj[key] (NULL when absent; a NULL obj reads as an empty object that stores
 * nothing) and the key's full path for messages. */
static st_result lookup(const st_cfg *obj, const char *key, json_t **v, char *path, size_t cap, st_error *err) {
  *v = NULL;
  path_fmt(path, cap, obj ? obj->path : "", key);
  if (!key) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, path, "config getter called with a NULL key");
  if (!obj) return ST_OK;
  if (!json_is_object(obj->node)) return type_error(obj->owner, obj->path, "an object", obj->node, err);
  *v = json_object_get(obj->node, key);
  return ST_OK;
}

/* absent (or null) key: store the default so `strata validate` shows it */
static st_result put_default(st_cfg *obj, const char *key, json_t *value, st_error *err) {
  if (!obj) {
    json_decref(value);
    return ST_OK;
  }
  if (!value) return ST_OK; /* NaN / inf defaults have no JSON form: returned, not stored */
  return cfg_put(obj->owner, obj->node, obj->path, key, value, ST_PROV_DEFAULT, err);
}

static st_result api_get_int(st_cfg *obj, const char *key, int64_t dflt, int64_t *out, st_error *err) {
  json_t *v;
  char path[PATH_CAP];
  ST_CHECK(lookup(obj, key, &v, path, sizeof path, err));
  if (!v || json_is_null(v)) {
    *out = dflt;
    return put_default(obj, key, json_integer(dflt), err);
  }
  if (!json_as_int(v, out)) return type_error(obj->owner, path, "an integer", v, err);
  return ST_OK;
}

static st_result api_get_number(st_cfg *obj, const char *key, double dflt, double *out, st_error *err) {
  json_t *v;
  char path[PATH_CAP];
  ST_CHECK(lookup(obj, key, &v, path, sizeof path, err));
  if (!v || json_is_null(v)) {
    *out = dflt;
    return put_default(obj, key, isfinite(dflt) ? json_real(dflt) : NULL, err);
  }
  if (!json_is_number(v)) return type_error(obj->owner, path, "a number", v, err);
  *out = json_number_value(v);
  return ST_OK;
}

static st_result api_get_bool(st_cfg *obj, const char *key, bool dflt, bool *out, st_error *err) {
  json_t *v;
  char path[PATH_CAP];
  ST_CHECK(lookup(obj, key, &v, path, sizeof path, err));
  if (!v || json_is_null(v)) {
    *out = dflt;
    return put_default(obj, key, json_boolean(dflt), err);
  }
  if (!json_is_boolean(v)) return type_error(obj->owner, path, "a boolean (true or false)", v, err);
  *out = json_is_true(v);
  return ST_OK;
}

/* A string getter cannot tell "auto" from a value, so "auto" is returned as it is. */
static st_result api_get_string(st_cfg *obj, const char *key, const char *dflt, const char **out, st_error *err) {
  json_t *v;
  char path[PATH_CAP];
  ST_CHECK(lookup(obj, key, &v, path, sizeof path, err));
  if (!v || json_is_null(v)) {
    *out = dflt;
    if (!dflt || !obj) return ST_OK;
    ST_CHECK(put_default(obj, key, json_string(dflt), err));
    json_t *stored = json_object_get(obj->node, key);
    if (stored) *out = json_string_value(stored); /* lives as long as the config */
    return ST_OK;
  }
  if (!json_is_string(v)) return type_error(obj->owner, path, "a string", v, err);
  *out = json_string_value(v);
  return ST_OK;
}

/* *out is the matching entry of `choices` (its spelling), so callers may compare with strcmp. */
static st_result api_get_enum(st_cfg *obj, const char *key, const char *const *choices, const char *dflt,
                              const char **out, st_error *err) {
  json_t *v;
  char path[PATH_CAP];
  ST_CHECK(lookup(obj, key, &v, path, sizeof path, err));
  if (!v || json_is_null(v)) {
    *out = dflt ? match_choice(dflt, choices) : NULL;
    if (dflt && !*out) *out = dflt;
    return dflt ? put_default(obj, key, json_string(*out), err) : ST_OK;
  }
  const char *m = json_is_string(v) ? match_choice(json_string_value(v), choices) : NULL;
  if (!m) return enum_error(obj->owner, path, v, choices, err);
  *out = m;
  return ST_OK;
}

static st_result api_get_object(st_cfg *obj, const char *key, bool create, st_cfg **out, st_error *err) {
  json_t *v;
  char path[PATH_CAP];
  *out = NULL;
  ST_CHECK(lookup(obj, key, &v, path, sizeof path, err));
  if (!obj) return ST_OK;
  if (!v || json_is_null(v)) {
    if (!create) return ST_OK;
    ST_CHECK(cfg_put(obj->owner, obj->node, obj->path, key, json_object(), ST_PROV_DEFAULT, err));
    v = json_object_get(obj->node, key);
  } else if (!json_is_object(v)) {
    return type_error(obj->owner, path, "an object", v, err);
  }
  char *full = path_join(obj->path, key);
  if (!full) return oom(err, path);
  *out = node_handle(obj->owner, v, full);
  free(full);
  return *out ? ST_OK : oom(err, path);
}

typedef enum { LIST_STRING, LIST_INT, LIST_NUMBER } list_kind;

static st_result get_list(st_cfg *obj, const char *key, list_kind kind, void *out, size_t cap, size_t *n,
                          st_error *err) {
  json_t *v;
  char path[PATH_CAP];
  *n = 0;
  ST_CHECK(lookup(obj, key, &v, path, sizeof path, err));
  if (!v || json_is_null(v)) return ST_OK;
  static const char *const what[] = {"a list of strings", "a list of integers", "a list of numbers"};
  if (!json_is_array(v)) return type_error(obj->owner, path, what[kind], v, err);
  size_t len = json_array_size(v);
  if (len > cap) {
    char hint[PATH_CAP + 40];
    source_hint(obj->owner, path, hint, sizeof hint);
    return st_error_set(err, ST_ERR_CONFIG, path, "%s: at most %zu items are allowed, found %zu%s", path, cap, len,
                        hint);
  }
  for (size_t i = 0; i < len; i++) {
    json_t *x = json_array_get(v, i);
    char ipath[PATH_CAP + 24];
    snprintf(ipath, sizeof ipath, "%s[%zu]", path, i);
    switch (kind) {
    case LIST_STRING:
      if (!json_is_string(x)) return type_error(obj->owner, ipath, "a string", x, err);
      ((const char **)out)[i] = json_string_value(x);
      break;
    case LIST_INT:
      if (!json_as_int(x, &((int64_t *)out)[i])) return type_error(obj->owner, ipath, "an integer", x, err);
      break;
    case LIST_NUMBER:
      if (!json_is_number(x)) return type_error(obj->owner, ipath, "a number", x, err);
      ((double *)out)[i] = json_number_value(x);
      break;
    }
  }
  *n = len;
  return ST_OK;
}

static st_result api_get_string_list(st_cfg *obj, const char *key, const char **out, size_t cap, size_t *n,
                                     st_error *err) {
  return get_list(obj, key, LIST_STRING, (void *)out, cap, n, err);
}
static st_result api_get_int_list(st_cfg *obj, const char *key, int64_t *out, size_t cap, size_t *n, st_error *err) {
  return get_list(obj, key, LIST_INT, out, cap, n, err);
}
static st_result api_get_number_list(st_cfg *obj, const char *key, double *out, size_t cap, size_t *n,
                                     st_error *err) {
  return get_list(obj, key, LIST_NUMBER, out, cap, n, err);
}

static st_result api_check_keys(const st_cfg *obj, const char *const *allowed, st_error *err) {
  if (!obj) return ST_OK;
  if (!json_is_object(obj->node)) return type_error(obj->owner, obj->path, "an object", obj->node, err);
  size_t n = count_names(allowed);
  const char *k;
  json_t *x;
  json_object_foreach(obj->node, k, x) {
    bool known = false;
    for (size_t i = 0; i < n && !known; i++) known = strcmp(k, allowed[i]) == 0;
    if (!known) return unknown_key_error(obj->owner, obj->path, k, allowed, n, NULL, err);
  }
  return ST_OK;
}

/* malloc'd (release it with free(), whichever allocator jansson was given) */
static char *dup_json_text(const json_t *v, size_t flags) {
  char *s = json_dumps(v, flags | JSON_ENCODE_ANY);
  if (!s) return NULL;
  size_t len = strlen(s);
  char *copy = malloc(len + 1);
  if (copy) memcpy(copy, s, len + 1);
  json_free_t jfree;
  json_get_alloc_funcs(NULL, &jfree);
  jfree(s);
  return copy;
}

static char *api_to_json(const st_cfg *node) {
  return node ? dup_json_text(node->node, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
}

static st_cfg *api_root(const st_cfg *node) { return node ? st_config_root(node->owner) : NULL; }

static const st_cfg_api cfg_api = {
    .struct_size = sizeof(st_cfg_api),
    .type = api_type,
    .path = api_path,
    .get_int = api_get_int,
    .get_number = api_get_number,
    .get_bool = api_get_bool,
    .get_string = api_get_string,
    .get_enum = api_get_enum,
    .get_object = api_get_object,
    .get_string_list = api_get_string_list,
    .get_int_list = api_get_int_list,
    .get_number_list = api_get_number_list,
    .check_keys = api_check_keys,
    .to_json = api_to_json,
    .root = api_root,
};

const st_cfg_api *st_config_api(void) { return &cfg_api; }

/* ---- loading, merging, --set ---------------------------------------------------------------- */

static st_config *config_new(const char *file_name) {
  st_config *c = calloc(1, sizeof *c);
  if (!c) return NULL;
  c->root = json_object();
  c->prov = json_object();
  c->file_name = strdup(file_name ? file_name : "<config>");
  if (!c->root || !c->prov || !c->file_name) {
    st_config_free(c);
    return NULL;
  }
  return c;
}

void st_config_free(st_config *c) {
  if (!c) return;
  for (st_cfg *n = c->nodes, *next; n; n = next) {
    next = n->next;
    json_decref(n->node);
    free(n->path);
    free(n);
  }
  json_decref(c->root);
  json_decref(c->prov);
  free(c->file_name);
  free(c->ds_name);
  free(c);
}

/* A config that is not valid JSON is a configuration error (exit code 2), not a damaged data file. */
static st_result parse_text(const char *text, size_t len, const char *name, json_t **out, st_error *err) {
  json_error_t je;
  json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
  if (!j) return st_error_set(err, ST_ERR_CONFIG, name, "%s:%d:%d: %s", name, je.line, je.column, je.text);
  if (!json_is_object(j)) {
    json_decref(j);
    return st_error_set(err, ST_ERR_CONFIG, name, "%s: the top level must be a JSON object ({...})", name);
  }
  *out = j;
  return ST_OK;
}

static st_result parse_file(const char *path, json_t **out, st_error *err) {
  FILE *f = fopen(path, "rb");
  if (!f) return st_error_set(err, ST_ERR_IO, path, "cannot open config file %s: %s", path, strerror(errno));
  size_t cap = 1 << 16, len = 0;
  char *buf = malloc(cap);
  st_result r = ST_OK;
  while (buf) {
    size_t got = fread(buf + len, 1, cap - len, f);
    len += got;
    if (len < cap) break;
    char *bigger = realloc(buf, cap * 2);
    if (!bigger) {
      free(buf);
      buf = NULL;
      break;
    }
    buf = bigger;
    cap *= 2;
  }
  if (!buf) r = oom(err, path);
  else if (ferror(f)) r = st_error_set(err, ST_ERR_IO, path, "cannot read config file %s: %s", path, strerror(errno));
  fclose(f);
  if (r == ST_OK) r = parse_text(buf, len, path, out, err);
  free(buf);
  return r;
}

/* Two {"type": ..., "params": ...} blocks naming different types (a WarmupCosineLR scheduler over a
 * DeepSpeed file's WarmupLR) do not mix: the upper one replaces the lower one whole. */
static bool different_types(const json_t *a, const json_t *b) {
  const json_t *ta = json_object_get(a, "type"), *tb = json_object_get(b, "type");
  return json_is_string(ta) && json_is_string(tb) && strcasecmp(json_string_value(ta), json_string_value(tb)) != 0;
}

/* Deep merge: src's objects merge into dst's objects, anything else replaces. */
static st_result overlay(st_config *c, json_t *dst, const char *dst_path, json_t *src, st_prov p, st_error *err) {
  const char *k;
  json_t *v;
  json_object_foreach(src, k, v) {
    json_t *d = json_object_get(dst, k);
    bool both = d && json_is_object(d) && json_is_object(v);
    if (both && json_object_size(v) == 0) continue; /* {} over a block adds nothing */
    if (both && !different_types(d, v)) {
      char *path = path_join(dst_path, k);
      if (!path) return oom(err, k);
      st_result r = overlay(c, d, path, v, p, err);
      free(path);
      ST_CHECK(r);
    } else {
      ST_CHECK(cfg_put(c, dst, dst_path, k, json_deep_copy(v), p, err));
    }
  }
  return ST_OK;
}

st_result st_config_load_string(const char *json_text, const char *source_name, st_config **out, st_error *err) {
  *out = NULL;
  if (!json_text) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "", "st_config_load_string: NULL text");
  st_config *c = config_new(source_name);
  if (!c) return oom(err, source_name ? source_name : "");
  json_t *doc = NULL;
  st_result r = parse_text(json_text, strlen(json_text), c->file_name, &doc, err);
  if (r == ST_OK) r = overlay(c, c->root, "", doc, ST_PROV_FILE, err);
  json_decref(doc);
  if (r != ST_OK) {
    st_config_free(c);
    return r;
  }
  *out = c;
  return ST_OK;
}

st_result st_config_load(const char *path, const char *deepspeed_path, const char *const *sets, int n_sets,
                         st_config **out, st_error *err) {
  *out = NULL;
  if (!path) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "", "st_config_load: no config path");
  st_config *c = config_new(path);
  if (!c) return oom(err, path);
  st_result r = ST_OK;
  json_t *doc = NULL;
  if (deepspeed_path) {
    c->ds_name = strdup(deepspeed_path);
    if (!c->ds_name) r = oom(err, deepspeed_path);
    if (r == ST_OK) r = parse_file(deepspeed_path, &doc, err);
    if (r == ST_OK) r = overlay(c, c->root, "", doc, ST_PROV_DEEPSPEED, err);
    json_decref(doc);
    doc = NULL;
  }
  if (r == ST_OK) r = parse_file(path, &doc, err);
  if (r == ST_OK) r = overlay(c, c->root, "", doc, ST_PROV_FILE, err); /* the main file wins */
  json_decref(doc);
  for (int i = 0; r == ST_OK && i < n_sets; i++) r = st_config_apply_set(c, sets[i], err);
  if (r != ST_OK) {
    st_config_free(c);
    return r;
  }
  *out = c;
  return ST_OK;
}

/* "a.b=v": v is JSON when it parses as JSON (8, 1e-4, true, null, [1,2], {"x":1}, "\"s\""), else the
 * string itself. Missing parents are created; the value replaces whatever was at a.b. */
st_result st_config_apply_set(st_config *c, const char *assignment, st_error *err) {
  if (!c || !assignment) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "--set", "st_config_apply_set: NULL");
  const char *eq = strchr(assignment, '=');
  if (!eq || eq == assignment)
    return st_error_set(err, ST_ERR_CONFIG, "--set", "--set \"%s\": expected KEY.PATH=VALUE (e.g. train.max_steps=100)",
                        assignment);
  char *key = strndup(assignment, (size_t)(eq - assignment));
  if (!key) return oom(err, "--set");
  const char *text = eq + 1;
  json_error_t je;
  json_t *value = json_loads(text, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
  if (!value) value = json_string(text);
  st_result r = ST_OK;
  if (!value) r = st_error_set(err, ST_ERR_CONFIG, key, "--set %s: the value is not valid UTF-8", key);

  json_t *obj = c->root;
  char parent[PATH_CAP * 4] = "";
  size_t klen = strlen(key);
  if (r == ST_OK && (key[0] == '.' || key[klen - 1] == '.' || strstr(key, "..")))
    r = st_error_set(err, ST_ERR_CONFIG, "--set", "--set \"%s\": the key path has an empty part", assignment);
  char *save = NULL, *seg = r == ST_OK ? strtok_r(key, ".", &save) : NULL;
  while (r == ST_OK && seg) {
    char *next = strtok_r(NULL, ".", &save);
    if (!next) {
      r = cfg_put(c, obj, parent, seg, value, ST_PROV_SET, err);
      value = NULL;
      break;
    }
    json_t *child = json_object_get(obj, seg);
    char here[sizeof parent];
    path_fmt(here, sizeof here, parent, seg);
    if (!child || json_is_null(child)) {
      child = json_object();
      if (!child || json_object_set_new(obj, seg, child) != 0) {
        r = st_error_set(err, ST_ERR_CONFIG, here, "--set %s: cannot create \"%s\" (out of memory or not UTF-8)",
                         here, here);
        break;
      }
    } else if (!json_is_object(child)) {
      char desc[128];
      describe(child, desc, sizeof desc);
      r = st_error_set(err, ST_ERR_CONFIG, here, "--set \"%s\": \"%s\" is %s, not an object, so it cannot hold \"%s\"",
                       assignment, here, desc, next);
      break;
    }
    if (parent[0]) json_object_del(c->prov, parent); /* no longer an empty leaf */
    snprintf(parent, sizeof parent, "%s", here);
    obj = child;
    seg = next;
  }
  json_decref(value);
  free(key);
  return r;
}

/* ---- the schema of the blocks strata owns ------------------------------------------------- */

enum { T_INT, T_NUM, T_BOOL, T_STR, T_OBJ, T_ANY, T_PAIR };
enum {
  F_AUTO = 1,    /* "auto" accepted (resolved by st_config_resolve) */
  F_IGNORED = 2, /* a DeepSpeed block or key strata accepts and does not act on */
  F_OPEN = 4,    /* an object whose other keys belong to a plugin: only the listed keys are checked */
};

typedef struct key_spec {
  const char *key;
  unsigned char type, flags;
  const struct key_spec *sub; /* T_OBJ: the keys allowed inside (NULL: anything) */
  const char *const *choices; /* T_STR: the allowed values, case-insensitive */
} key_spec;

#define K(k, t, f) {k, t, f, NULL, NULL}
#define KOBJ(k, f, s) {k, T_OBJ, f, s, NULL}
#define KENUM(k, f, c) {k, T_STR, f, NULL, c}
#define KEND {NULL, 0, 0, NULL, NULL}

static const char *const offload_devices[] = {"none", "cpu", "nvme", NULL};
static const char *const warmup_types[] = {"log", "linear", NULL};
static const char *const device_types[] = {"cpu", "cuda", NULL};
static const char *const optim_types[] = {"AdamW", "Adam", "SGD", NULL};
static const char *const sched_types[] = {"WarmupLR", "WarmupDecayLR", "WarmupCosineLR", NULL};
/* valid in DeepSpeed, not implemented here: a clear "unsupported" rather than "unknown" */
static const char *const ds_only_optims[] = {"OneBitAdam", "ZeroOneAdam", "Lamb", "OneBitLamb", "Muon", "Adagrad",
                                             "FusedAdam", "CPUAdam", "FusedLamb", NULL};
static const char *const ds_only_scheds[] = {"OneCycle", "LRRangeTest", NULL};

static const key_spec offload_param_spec[] = {
    KENUM("device", 0, offload_devices), K("nvme_path", T_STR, 0), K("pin_memory", T_BOOL, 0),
    K("buffer_count", T_INT, 0), K("buffer_size", T_INT, 0), K("max_in_cpu", T_INT, 0), KEND};

static const key_spec offload_optimizer_spec[] = {
    KENUM("device", 0, offload_devices), K("nvme_path", T_STR, 0), K("pin_memory", T_BOOL, 0),
    K("buffer_count", T_INT, 0), K("pipeline_read", T_BOOL, 0), K("pipeline_write", T_BOOL, 0),
    K("fast_init", T_BOOL, 0), K("ratio", T_NUM, 0), K("super_offload", T_BOOL, 0),
    K("cpuadam_cores_perc", T_NUM, 0), KEND};

static const key_spec zero_spec[] = {
    K("stage", T_INT, 0),
    K("contiguous_gradients", T_BOOL, 0),
    K("reduce_scatter", T_BOOL, 0),
    K("reduce_bucket_size", T_INT, F_AUTO),
    K("allgather_partitions", T_BOOL, 0),
    K("allgather_bucket_size", T_INT, 0),
    K("overlap_comm", T_BOOL, 0),
    K("load_from_fp32_weights", T_BOOL, 0),
    K("sub_group_size", T_INT, 0),
    K("stage3_prefetch_bucket_size", T_INT, F_AUTO),
    K("stage3_param_persistence_threshold", T_INT, F_AUTO),
    K("stage3_model_persistence_threshold", T_INT, 0),
    K("stage3_max_live_parameters", T_INT, 0),
    K("stage3_max_reuse_distance", T_INT, 0),
    K("stage3_gather_16bit_weights_on_model_save", T_BOOL, F_AUTO),
    K("stage3_gather_fp16_weights_on_model_save", T_BOOL, F_AUTO), /* DeepSpeed's deprecated spelling */
    K("stage3_module_granularity_threshold", T_INT, 0),
    K("stage3_use_all_reduce_for_fetch_params", T_BOOL, 0),
    K("stage3_allgather_sequential", T_BOOL, 0),
    K("ignore_unused_parameters", T_BOOL, 0),
    K("round_robin_gradients", T_BOOL, 0),
    K("zero_hpz_partition_size", T_INT, 0),
    K("zero_quantized_weights", T_BOOL, 0),
    K("zero_quantized_gradients", T_BOOL, 0),
    K("mics_shard_size", T_INT, 0),
    K("elastic_checkpoint", T_BOOL, 0),
    K("log_trace_cache_warnings", T_BOOL, 0),
    K("cpu_offload", T_BOOL, 0), /* deprecated: offload_optimizer.device "cpu" */
    KOBJ("offload_param", 0, offload_param_spec),
    KOBJ("offload_optimizer", 0, offload_optimizer_spec),
    KEND};

static const key_spec optim_params_spec[] = {
    K("lr", T_NUM, F_AUTO),         K("betas", T_PAIR, F_AUTO),      K("eps", T_NUM, F_AUTO),
    K("weight_decay", T_NUM, F_AUTO), K("momentum", T_NUM, 0),        K("adam_w_mode", T_BOOL, 0),
    K("torch_adam", T_BOOL, 0),     KEND};

static const key_spec optimizer_spec[] = {K("type", T_STR, 0), KOBJ("params", 0, optim_params_spec), KEND};

static const key_spec warmup_lr_params[] = {K("warmup_min_lr", T_NUM, F_AUTO), K("warmup_max_lr", T_NUM, F_AUTO),
                                            K("warmup_num_steps", T_INT, F_AUTO), KENUM("warmup_type", 0, warmup_types),
                                            KEND};
static const key_spec warmup_decay_params[] = {
    K("warmup_min_lr", T_NUM, F_AUTO), K("warmup_max_lr", T_NUM, F_AUTO), K("warmup_num_steps", T_INT, F_AUTO),
    KENUM("warmup_type", 0, warmup_types), K("total_num_steps", T_INT, F_AUTO), KEND};
static const key_spec warmup_cosine_params[] = {
    K("total_num_steps", T_INT, F_AUTO), K("warmup_min_ratio", T_NUM, 0), K("warmup_num_steps", T_INT, F_AUTO),
    K("cos_min_ratio", T_NUM, 0), KENUM("warmup_type", 0, warmup_types), KEND};
/* params are checked against the chosen type's table, after the type */
static const key_spec scheduler_spec[] = {K("type", T_STR, 0), KOBJ("params", 0, NULL), KEND};

static const key_spec fp16_spec[] = {
    K("enabled", T_BOOL, F_AUTO),        K("auto_cast", T_BOOL, 0),         K("loss_scale", T_NUM, 0),
    K("initial_scale_power", T_INT, 0),  K("loss_scale_window", T_INT, 0),  K("hysteresis", T_INT, 0),
    K("consecutive_hysteresis", T_BOOL, 0), K("min_loss_scale", T_NUM, 0),
    K("fp16_master_weights_and_grads", T_BOOL, 0), KEND};

static const key_spec bf16_spec[] = {
    K("enabled", T_BOOL, F_AUTO),          K("immediate_grad_update", T_BOOL, 0), K("check_overflow", T_BOOL, 0),
    K("bf16_master_weights_and_grads", T_BOOL, 0), K("bf16_optimizer_states", T_BOOL, 0), KEND};

static const key_spec ac_spec[] = {
    K("partition_activations", T_BOOL, 0), K("cpu_checkpointing", T_BOOL, 0),
    K("contiguous_memory_optimization", T_BOOL, 0), K("number_checkpoints", T_INT, 0),
    K("synchronize_checkpoint_boundary", T_BOOL, 0), K("profile", T_BOOL, 0), KEND};

static const key_spec monitor_spec[] = {K("enabled", T_BOOL, 0), K("output_path", T_STR, 0), K("job_name", T_STR, 0),
                                        KEND};

static const key_spec plugin_block_spec[] = {K("name", T_STR, 0), K("plugin", T_STR, 0), KEND};

static const key_spec synthetic_spec[] = {K("num_samples", T_INT, 0), K("seed", T_INT, 0), KEND};
static const key_spec validation_spec[] = {
    K("dataset_base_path", T_STR, 0), K("dataset_metadata_path", T_STR, 0), K("max_samples", T_INT, 0),
    K("seed", T_INT, 0), KOBJ("synthetic", 0, synthetic_spec), KEND};
static const char *const monitor_modes[] = {"min", "max", NULL};
static const key_spec ckpt_select_spec[] = {K("monitor", T_STR, 0), KENUM("mode", 0, monitor_modes),
                                            K("save_top_k", T_INT, 0), K("save_last", T_BOOL, 0), KEND};
static const key_spec early_stop_spec[] = {K("patience", T_INT, 0), K("min_delta", T_NUM, 0), KEND};
static const key_spec data_spec[] = {
    K("dataset_base_path", T_STR, 0), K("dataset_metadata_path", T_STR, 0), K("dataset_repeat", T_INT, 0),
    K("num_workers", T_INT, 0),       K("shuffle", T_BOOL, 0),              KOBJ("synthetic", 0, synthetic_spec),
    KOBJ("validation", 0, validation_spec), KEND};

static const key_spec train_spec[] = {
    K("max_steps", T_INT, 0),       K("num_epochs", T_INT, 0),    K("seed", T_INT, 0),
    K("output_path", T_STR, 0),     K("save_steps", T_INT, 0),    K("keep_last", T_INT, 0),
    K("resume", T_STR, 0),          K("gradient_checkpointing", T_BOOL, 0),
    K("gradient_checkpointing_offload", T_BOOL, 0), K("max_bad_steps", T_INT, 0), K("peak_tflops", T_NUM, 0),
    K("eval_steps", T_INT, 0),      KOBJ("checkpoint", 0, ckpt_select_spec), KOBJ("early_stopping", 0, early_stop_spec),
    K("on_save", T_STR, 0),         KEND};

static const key_spec device_spec[] = {KENUM("type", 0, device_types), K("threads", T_INT, 0), K("comm", T_STR, 0),
                                       K("comm_timeout_s", T_NUM, 0), K("interface", T_STR, 0), KEND};

static const key_spec top_spec[] = {
    /* DeepSpeed keys strata acts on */
    K("train_batch_size", T_INT, F_AUTO),
    K("train_micro_batch_size_per_gpu", T_INT, F_AUTO),
    K("gradient_accumulation_steps", T_INT, F_AUTO),
    K("gradient_clipping", T_NUM, F_AUTO),
    KOBJ("optimizer", 0, optimizer_spec),
    KOBJ("scheduler", 0, scheduler_spec),
    KOBJ("fp16", 0, fp16_spec),
    KOBJ("bf16", 0, bf16_spec),
    KOBJ("zero_optimization", 0, zero_spec), /* checked here, interpreted by the strategies */
    KOBJ("activation_checkpointing", 0, ac_spec),
    K("steps_per_print", T_INT, 0),
    K("wall_clock_breakdown", T_BOOL, 0),
    KOBJ("tensorboard", 0, monitor_spec),
    KOBJ("csv_monitor", 0, monitor_spec),
    K("prescale_gradients", T_BOOL, 0),         /* for the strategies */
    K("gradient_predivide_factor", T_NUM, 0),   /* for the strategies */
    K("communication_data_type", T_STR, 0),     /* for the strategies */
    /* DeepSpeed keys strata accepts and ignores (st_config_ignored_keys lists those present) */
    K("memory_breakdown", T_BOOL, F_IGNORED),
    K("dump_state", T_BOOL, F_IGNORED),
    K("zero_allow_untested_optimizer", T_BOOL, F_IGNORED),
    K("zero_force_ds_cpu_optimizer", T_BOOL, F_IGNORED),
    K("sparse_gradients", T_BOOL, F_IGNORED),
    K("gradient_allreduce_op", T_STR, F_IGNORED),
    K("sequence_parallel_size", T_INT, F_IGNORED),
    K("wandb", T_ANY, F_IGNORED),
    K("comet", T_ANY, F_IGNORED),
    K("flops_profiler", T_ANY, F_IGNORED),
    K("comms_logger", T_ANY, F_IGNORED),
    K("checkpoint", T_ANY, F_IGNORED),
    K("data_types", T_ANY, F_IGNORED),
    K("elasticity", T_ANY, F_IGNORED),
    K("aio", T_ANY, F_IGNORED),
    K("amp", T_ANY, F_IGNORED),
    K("torch_autocast", T_ANY, F_IGNORED),
    K("tensor_parallel", T_ANY, F_IGNORED),
    K("expert_parallel", T_ANY, F_IGNORED), /* DeepSpeed's AutoEP block; strata's EP is a strategy */
    K("sparse_attention", T_ANY, F_IGNORED),
    K("pipeline", T_ANY, F_IGNORED),
    K("curriculum_learning", T_ANY, F_IGNORED),
    K("data_efficiency", T_ANY, F_IGNORED),
    K("compression_training", T_ANY, F_IGNORED),
    K("autotuning", T_ANY, F_IGNORED),
    K("nebula", T_ANY, F_IGNORED),
    K("hybrid_engine", T_ANY, F_IGNORED),
    K("eigenvalue", T_ANY, F_IGNORED),
    K("progressive_layer_drop", T_ANY, F_IGNORED),
    K("quantize_training", T_ANY, F_IGNORED),
    K("weight_quantization", T_ANY, F_IGNORED),
    /* strata's blocks */
    KOBJ("model", F_OPEN, plugin_block_spec),    /* the rest belongs to the model plugin */
    KOBJ("strategy", F_OPEN, plugin_block_spec), /* the rest belongs to the strategy plugin */
    KOBJ("data", 0, data_spec),
    KOBJ("train", 0, train_spec),
    KOBJ("device", 0, device_spec),
    KEND};

static size_t spec_names(const key_spec *specs, const char **names, size_t cap) {
  size_t n = 0;
  for (; specs->key && n < cap; specs++) names[n++] = specs->key;
  return n;
}

/* a block (depth-first, in table order) that has `key`, for "lr" at the top level */
static bool spec_find(const key_spec *specs, const char *prefix, const char *key, char *out, size_t cap) {
  for (const key_spec *s = specs; s->key; s++) {
    if (!s->sub || (s->flags & F_OPEN)) continue;
    char here[PATH_CAP];
    path_fmt(here, sizeof here, prefix, s->key);
    for (const key_spec *t = s->sub; t->key; t++)
      if (strcmp(t->key, key) == 0) {
        path_fmt(out, cap, here, key);
        return true;
      }
    if (spec_find(s->sub, here, key, out, cap)) return true;
  }
  return false;
}

static st_result validate_block(const st_config *c, const char *path, json_t *obj, const key_spec *specs, bool open,
                                st_error *err);

static st_result validate_value(const st_config *c, const char *path, json_t *v, const key_spec *s, st_error *err) {
  if (json_is_null(v)) return ST_OK; /* null = unset, as in DeepSpeed */
  if ((s->flags & F_AUTO) && is_auto(v)) return ST_OK;
  int64_t iv;
  switch (s->type) {
  case T_INT:
    if (!json_as_int(v, &iv)) return type_error(c, path, "an integer", v, err);
    break;
  case T_NUM:
    if (!json_is_number(v)) return type_error(c, path, "a number", v, err);
    break;
  case T_BOOL:
    if (!json_is_boolean(v)) return type_error(c, path, "a boolean (true or false)", v, err);
    break;
  case T_STR:
    if (!json_is_string(v)) return type_error(c, path, "a string", v, err);
    if (s->choices && !match_choice(json_string_value(v), s->choices)) return enum_error(c, path, v, s->choices, err);
    break;
  case T_PAIR:
    if (!json_is_array(v) || json_array_size(v) != 2 || !json_is_number(json_array_get(v, 0)) ||
        !json_is_number(json_array_get(v, 1)))
      return type_error(c, path, "a list of two numbers", v, err);
    break;
  case T_OBJ:
    if (!json_is_object(v)) return type_error(c, path, "an object", v, err);
    if (s->sub) return validate_block(c, path, v, s->sub, (s->flags & F_OPEN) != 0, err);
    break;
  default: break;
  }
  return ST_OK;
}

static st_result validate_block(const st_config *c, const char *path, json_t *obj, const key_spec *specs, bool open,
                                st_error *err) {
  const char *k;
  json_t *v;
  json_object_foreach(obj, k, v) {
    const key_spec *s = specs;
    while (s->key && strcmp(s->key, k) != 0) s++;
    if (!s->key) {
      if (open) continue;
      const char *names[96];
      size_t n = spec_names(specs, names, 96);
      char elsewhere[PATH_CAP];
      bool found = !path[0] && spec_find(top_spec, "", k, elsewhere, sizeof elsewhere);
      return unknown_key_error(c, path, k, names, n, found ? elsewhere : NULL, err);
    }
    char sub[PATH_CAP];
    path_fmt(sub, sizeof sub, path, k);
    ST_CHECK(validate_value(c, sub, v, s, err));
  }
  return ST_OK;
}

/* optimizer.type / scheduler.type: DeepSpeed names strata lacks are "unsupported", not "unknown" */
static st_result check_type_name(const st_config *c, const char *path, json_t *v, const char *const *choices,
                                 const char *const *ds_only, const char *what, st_error *err) {
  if (!json_is_string(v)) return ST_OK;
  const char *s = json_string_value(v);
  if (match_choice(s, choices)) return ST_OK;
  if (match_choice(s, ds_only)) {
    char list[200], hint[PATH_CAP + 40];
    join_names(list, sizeof list, choices, count_names(choices), true);
    source_hint(c, path, hint, sizeof hint);
    return st_error_set(err, ST_ERR_UNSUPPORTED, path,
                        "%s: \"%s\" is a DeepSpeed %s that strata does not implement%s; choose one of %s", path, s,
                        what, hint, list);
  }
  return enum_error(c, path, v, choices, err);
}

static st_result validate_config(st_config *c, st_error *err) {
  json_t *opt = json_object_get(c->root, "optimizer");
  json_t *params = json_is_object(opt) ? json_object_get(opt, "params") : NULL;
  if (json_is_object(params) && json_object_get(params, "max_grad_norm"))
    return st_error_set(err, ST_ERR_CONFIG, "optimizer.params.max_grad_norm",
                        "optimizer.params.max_grad_norm: not an optimizer parameter; set the top-level "
                        "\"gradient_clipping\" instead (DeepSpeed rejects it too)");
  ST_CHECK(validate_block(c, "", c->root, top_spec, false, err));
  if (json_is_object(opt)) {
    ST_CHECK(check_type_name(c, "optimizer.type", json_object_get(opt, "type"), optim_types, ds_only_optims,
                             "optimizer", err));
  }
  json_t *sched = json_object_get(c->root, "scheduler");
  if (json_is_object(sched)) {
    json_t *type = json_object_get(sched, "type");
    if (!json_is_string(type)) {
      char list[200];
      join_names(list, sizeof list, sched_types, count_names(sched_types), true);
      return st_error_set(err, ST_ERR_CONFIG, "scheduler.type",
                          "scheduler.type: missing; a scheduler block needs a type, one of %s", list);
    }
    ST_CHECK(check_type_name(c, "scheduler.type", type, sched_types, ds_only_scheds, "scheduler", err));
    const char *t = match_choice(json_string_value(type), sched_types);
    const key_spec *ps = strcmp(t, "WarmupLR") == 0         ? warmup_lr_params
                         : strcmp(t, "WarmupDecayLR") == 0 ? warmup_decay_params
                                                            : warmup_cosine_params;
    json_t *sparams = json_object_get(sched, "params");
    if (json_is_object(sparams)) ST_CHECK(validate_block(c, "scheduler.params", sparams, ps, false, err));
  }
  return ST_OK;
}

size_t st_config_ignored_keys(const st_config *c, const char **keys, size_t cap) {
  size_t n = 0;
  for (const key_spec *s = top_spec; s->key; s++) {
    if (!(s->flags & F_IGNORED) || !json_object_get(c->root, s->key)) continue;
    if (n < cap) keys[n] = s->key;
    n++;
  }
  return n;
}

/* ---- extraction ------------------------------------------------------------------------------ */

static ST_PRINTF(5, 6) st_result need(bool ok, const st_cfg *node, const char *key, st_error *err,
                                      const char *fmt, ...) {
  if (ok) return ST_OK;
  char path[PATH_CAP], hint[PATH_CAP + 40], msg[512];
  path_fmt(path, sizeof path, node ? node->path : "", key);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (node) source_hint(node->owner, path, hint, sizeof hint);
  else hint[0] = '\0';
  return st_error_set(err, ST_ERR_CONFIG, path, "%s: %s%s", path, msg, hint);
}

static json_t *child(const st_cfg *obj, const char *key) {
  return obj && json_is_object(obj->node) ? json_object_get(obj->node, key) : NULL;
}

/* getters that leave the "auto" sentinel instead of failing */
static st_result get_int_auto(st_cfg *obj, const char *key, int64_t dflt, int64_t *out, st_error *err) {
  if (is_auto(child(obj, key))) {
    *out = ST_CONFIG_AUTO_INT;
    return ST_OK;
  }
  return api_get_int(obj, key, dflt, out, err);
}

static st_result get_number_auto(st_cfg *obj, const char *key, double dflt, double *out, st_error *err) {
  if (is_auto(child(obj, key))) {
    *out = ST_CONFIG_AUTO_NUMBER;
    return ST_OK;
  }
  return api_get_number(obj, key, dflt, out, err);
}

/* bools have no sentinel: an unresolved "auto" reads as false (what resolution will make it) */
static st_result get_bool_auto(st_cfg *obj, const char *key, bool dflt, bool *out, st_error *err) {
  if (is_auto(child(obj, key))) {
    *out = false;
    return ST_OK;
  }
  return api_get_bool(obj, key, dflt, out, err);
}

static st_result batch_value(st_cfg *root, const char *key, int64_t *out, st_error *err) {
  json_t *v = child(root, key);
  if (!v || json_is_null(v) || is_auto(v)) {
    *out = ST_CONFIG_AUTO_INT;
    return ST_OK;
  }
  ST_CHECK(api_get_int(root, key, 0, out, err));
  return need(*out > 0, root, key, err, "must be a positive integer, found %lld", (long long)*out);
}

static bool non_negative(double x) { return x >= 0.0 || !(x == x); /* NaN = the auto sentinel */ }

static st_result extract_optimizer(st_cfg *root, st_settings *s, st_error *err) {
  const st_cfg_api *a = &cfg_api;
  st_optimizer_settings *o = &s->optimizer;
  st_cfg *opt, *p;
  const char *type;
  ST_CHECK(a->get_object(root, "optimizer", true, &opt, err));
  ST_CHECK(a->get_enum(opt, "type", optim_types, "AdamW", &type, err));
  ST_CHECK(a->get_object(opt, "params", true, &p, err));
  o->type = strcmp(type, "AdamW") == 0 ? ST_OPTIM_ADAMW : strcmp(type, "Adam") == 0 ? ST_OPTIM_ADAM : ST_OPTIM_SGD;
  ST_CHECK(get_number_auto(p, "lr", 1e-3, &o->lr, err));
  ST_CHECK(need(non_negative(o->lr), p, "lr", err, "must be >= 0, found %g", o->lr));
  ST_CHECK(get_number_auto(p, "weight_decay", 0.0, &o->weight_decay, err));
  ST_CHECK(need(non_negative(o->weight_decay), p, "weight_decay", err, "must be >= 0, found %g", o->weight_decay));
  o->beta1 = 0.9;
  o->beta2 = 0.999;
  o->eps = 1e-8;
  o->momentum = 0.0;
  o->adam_w_mode = true;
  if (o->type == ST_OPTIM_SGD) {
    ST_CHECK(a->get_number(p, "momentum", 0.0, &o->momentum, err));
    ST_CHECK(need(o->momentum >= 0.0, p, "momentum", err, "must be >= 0, found %g", o->momentum));
    return ST_OK;
  }
  if (is_auto(child(p, "betas"))) {
    o->beta1 = o->beta2 = ST_CONFIG_AUTO_NUMBER;
  } else {
    double betas[2];
    size_t n;
    ST_CHECK(a->get_number_list(p, "betas", betas, 2, &n, err));
    if (n == 0) {
      json_t *dflt = json_pack("[ff]", 0.9, 0.999);
      ST_CHECK(cfg_put(root->owner, p->node, p->path, "betas", dflt, ST_PROV_DEFAULT, err));
    } else {
      ST_CHECK(need(n == 2, p, "betas", err, "expected two numbers [beta1, beta2], found %zu", n));
      o->beta1 = betas[0];
      o->beta2 = betas[1];
    }
    ST_CHECK(need(o->beta1 >= 0 && o->beta1 < 1 && o->beta2 >= 0 && o->beta2 < 1, p, "betas", err,
                  "each beta must be in [0, 1), found [%g, %g]", o->beta1, o->beta2));
  }
  ST_CHECK(get_number_auto(p, "eps", 1e-8, &o->eps, err));
  ST_CHECK(need(non_negative(o->eps), p, "eps", err, "must be >= 0, found %g", o->eps));
  ST_CHECK(a->get_bool(p, "adam_w_mode", true, &o->adam_w_mode, err));
  return ST_OK;
}

static st_result extract_scheduler(st_cfg *root, st_settings *s, st_error *err) {
  const st_cfg_api *a = &cfg_api;
  st_scheduler_settings *sc = &s->scheduler;
  st_cfg *sched, *p;
  *sc = (st_scheduler_settings){.type = ST_SCHED_CONSTANT, .warmup_max_lr = s->optimizer.lr,
                                .warmup_num_steps = 1000, .cos_min_ratio = 1e-4};
  ST_CHECK(a->get_object(root, "scheduler", false, &sched, err));
  if (!sched) return ST_OK;
  const char *type, *wt;
  ST_CHECK(a->get_enum(sched, "type", sched_types, NULL, &type, err));
  ST_CHECK(a->get_object(sched, "params", true, &p, err));
  sc->type = strcmp(type, "WarmupLR") == 0        ? ST_SCHED_WARMUP_LR
             : strcmp(type, "WarmupDecayLR") == 0 ? ST_SCHED_WARMUP_DECAY_LR
                                                   : ST_SCHED_WARMUP_COSINE_LR;
  ST_CHECK(get_int_auto(p, "warmup_num_steps", 1000, &sc->warmup_num_steps, err));
  ST_CHECK(need(sc->warmup_num_steps >= 0 || sc->warmup_num_steps == ST_CONFIG_AUTO_INT, p, "warmup_num_steps", err,
                "must be >= 0, found %lld", (long long)sc->warmup_num_steps));
  ST_CHECK(a->get_enum(p, "warmup_type", warmup_types, "log", &wt, err));
  sc->warmup_linear = strcmp(wt, "linear") == 0;
  if (sc->type != ST_SCHED_WARMUP_LR) {
    /* DeepSpeed requires it; absent reads as "auto" (train.max_steps, else the trainer's total) */
    json_t *t = child(p, "total_num_steps");
    if (!t || json_is_null(t)) sc->total_num_steps = ST_CONFIG_AUTO_INT;
    else ST_CHECK(get_int_auto(p, "total_num_steps", 0, &sc->total_num_steps, err));
    ST_CHECK(need(sc->total_num_steps >= 0 || sc->total_num_steps == ST_CONFIG_AUTO_INT, p, "total_num_steps", err,
                  "must be >= 0, found %lld", (long long)sc->total_num_steps));
  }
  if (sc->type == ST_SCHED_WARMUP_COSINE_LR) {
    ST_CHECK(a->get_number(p, "warmup_min_ratio", 0.0, &sc->warmup_min_ratio, err));
    ST_CHECK(a->get_number(p, "cos_min_ratio", 1e-4, &sc->cos_min_ratio, err));
    ST_CHECK(need(sc->warmup_min_ratio >= 0 && sc->warmup_min_ratio <= 1, p, "warmup_min_ratio", err,
                  "must be in [0, 1], found %g", sc->warmup_min_ratio));
    ST_CHECK(need(sc->cos_min_ratio >= 0 && sc->cos_min_ratio <= 1, p, "cos_min_ratio", err,
                  "must be in [0, 1], found %g", sc->cos_min_ratio));
    return ST_OK; /* works in ratios of the optimizer's lr */
  }
  ST_CHECK(get_number_auto(p, "warmup_min_lr", 0.0, &sc->warmup_min_lr, err));
  ST_CHECK(need(non_negative(sc->warmup_min_lr), p, "warmup_min_lr", err, "must be >= 0, found %g", sc->warmup_min_lr));
  /* absent = the optimizer's lr (stored only once that is known) */
  json_t *mx = child(p, "warmup_max_lr");
  if ((!mx || json_is_null(mx)) && isnan(s->optimizer.lr)) sc->warmup_max_lr = ST_CONFIG_AUTO_NUMBER;
  else ST_CHECK(get_number_auto(p, "warmup_max_lr", s->optimizer.lr, &sc->warmup_max_lr, err));
  ST_CHECK(need(non_negative(sc->warmup_max_lr), p, "warmup_max_lr", err, "must be >= 0, found %g", sc->warmup_max_lr));
  return ST_OK;
}

static st_result extract_precision(st_cfg *root, st_settings *s, st_error *err) {
  const st_cfg_api *a = &cfg_api;
  st_precision_settings *pr = &s->precision;
  *pr = (st_precision_settings){.dtype = ST_F32, .initial_scale_power = 16, .loss_scale_window = 1000,
                                .hysteresis = 2, .min_loss_scale = 1.0};
  st_cfg *fp16, *bf16;
  bool fp16_on = false, bf16_on = false;
  ST_CHECK(a->get_object(root, "fp16", false, &fp16, err));
  ST_CHECK(a->get_object(root, "bf16", false, &bf16, err));
  if (fp16) ST_CHECK(get_bool_auto(fp16, "enabled", false, &fp16_on, err));
  if (bf16) ST_CHECK(get_bool_auto(bf16, "enabled", false, &bf16_on, err));
  if (fp16_on && bf16_on)
    return st_error_set(err, ST_ERR_CONFIG, "bf16.enabled",
                        "fp16.enabled and bf16.enabled are both true; enable at most one (they are mutually exclusive, "
                        "as in DeepSpeed)");
  if (bf16_on) pr->dtype = ST_BF16;
  if (!fp16_on) return ST_OK;
  pr->dtype = ST_F16;
  int64_t isp, hyst;
  ST_CHECK(a->get_number(fp16, "loss_scale", 0.0, &pr->static_loss_scale, err));
  ST_CHECK(need(pr->static_loss_scale >= 0, fp16, "loss_scale", err, "must be >= 0 (0 = dynamic), found %g",
                pr->static_loss_scale));
  ST_CHECK(a->get_int(fp16, "initial_scale_power", 16, &isp, err));
  ST_CHECK(need(isp >= 0 && isp <= 64, fp16, "initial_scale_power", err, "must be in [0, 64], found %lld",
                (long long)isp));
  pr->initial_scale_power = (int)isp;
  ST_CHECK(a->get_int(fp16, "loss_scale_window", 1000, &pr->loss_scale_window, err));
  ST_CHECK(need(pr->loss_scale_window >= 1, fp16, "loss_scale_window", err, "must be >= 1, found %lld",
                (long long)pr->loss_scale_window));
  ST_CHECK(a->get_int(fp16, "hysteresis", 2, &hyst, err));
  ST_CHECK(need(hyst >= 1 && hyst <= INT_MAX, fp16, "hysteresis", err, "must be >= 1, found %lld", (long long)hyst));
  pr->hysteresis = (int)hyst;
  ST_CHECK(a->get_bool(fp16, "consecutive_hysteresis", false, &pr->consecutive_hysteresis, err));
  ST_CHECK(a->get_number(fp16, "min_loss_scale", 1.0, &pr->min_loss_scale, err));
  return need(pr->min_loss_scale > 0, fp16, "min_loss_scale", err, "must be > 0, found %g", pr->min_loss_scale);
}

static st_result extract_monitors(st_cfg *root, st_settings *s, st_error *err) {
  const st_cfg_api *a = &cfg_api;
  st_cfg *tb, *csv, *ac;
  const char *tb_job = NULL, *csv_job = NULL;
  ST_CHECK(a->get_object(root, "tensorboard", false, &tb, err));
  if (tb) {
    ST_CHECK(a->get_bool(tb, "enabled", false, &s->tensorboard, err));
    ST_CHECK(a->get_string(tb, "output_path", NULL, &s->tensorboard_path, err));
    ST_CHECK(a->get_string(tb, "job_name", "DeepSpeedJobName", &tb_job, err));
  }
  ST_CHECK(a->get_object(root, "csv_monitor", false, &csv, err));
  if (csv) {
    ST_CHECK(a->get_bool(csv, "enabled", false, &s->csv_monitor, err));
    ST_CHECK(a->get_string(csv, "output_path", NULL, &s->csv_path, err));
    ST_CHECK(a->get_string(csv, "job_name", "DeepSpeedJobName", &csv_job, err));
  }
  s->job_name = s->tensorboard && tb_job ? tb_job : s->csv_monitor && csv_job ? csv_job : tb_job ? tb_job : csv_job;
  if (s->tensorboard_path && !s->tensorboard_path[0]) s->tensorboard_path = NULL;
  if (s->csv_path && !s->csv_path[0]) s->csv_path = NULL;

  bool cpu_ckpt = false;
  ST_CHECK(a->get_object(root, "activation_checkpointing", false, &ac, err));
  if (ac) ST_CHECK(a->get_bool(ac, "cpu_checkpointing", false, &cpu_ckpt, err));
  s->activation_checkpointing = ac != NULL;
  s->activation_checkpointing_offload = cpu_ckpt;
  return ST_OK;
}

static st_result get_small_int(st_cfg *obj, const char *key, int64_t dflt, int64_t lo, int64_t hi, int64_t *out,
                               st_error *err) {
  ST_CHECK(cfg_api.get_int(obj, key, dflt, out, err));
  if (*out >= lo && *out <= hi) return ST_OK;
  if (hi == INT64_MAX) return need(false, obj, key, err, "must be >= %lld, found %lld", (long long)lo, (long long)*out);
  return need(false, obj, key, err, "must be in [%lld, %lld], found %lld", (long long)lo, (long long)hi,
              (long long)*out);
}

static st_result extract_strata_blocks(st_cfg *root, st_settings *s, st_error *err) {
  const st_cfg_api *a = &cfg_api;
  st_cfg *model, *strategy, *data, *synth, *train, *device;
  int64_t v;

  ST_CHECK(a->get_object(root, "model", false, &model, err));
  ST_CHECK(a->get_string(model, "name", NULL, &s->model_name, err));
  ST_CHECK(a->get_string(model, "plugin", NULL, &s->model_plugin, err));
  ST_CHECK(a->get_object(root, "strategy", true, &strategy, err));
  ST_CHECK(a->get_string(strategy, "plugin", NULL, &s->strategy_plugin, err));
  ST_CHECK(a->get_string(strategy, "name", s->strategy_plugin ? NULL : "local", &s->strategy_name, err));

  ST_CHECK(a->get_object(root, "data", true, &data, err));
  ST_CHECK(a->get_string(data, "dataset_base_path", NULL, &s->dataset_base_path, err));
  ST_CHECK(a->get_string(data, "dataset_metadata_path", NULL, &s->dataset_metadata_path, err));
  ST_CHECK(get_small_int(data, "dataset_repeat", 1, 1, INT64_MAX, &s->dataset_repeat, err));
  ST_CHECK(get_small_int(data, "num_workers", 1, 0, 1024, &v, err));
  s->num_workers = (int)v;
  ST_CHECK(a->get_bool(data, "shuffle", true, &s->shuffle, err));
  ST_CHECK(a->get_object(data, "synthetic", false, &synth, err));
  s->synthetic_samples = 0;
  s->synthetic_seed = 1;
  if (synth) {
    ST_CHECK(get_small_int(synth, "num_samples", 0, 0, INT64_MAX, &s->synthetic_samples, err));
    ST_CHECK(get_small_int(synth, "seed", 1, 0, INT64_MAX, &v, err));
    s->synthetic_seed = (uint64_t)v;
  }

  st_cfg *val, *vsynth;
  ST_CHECK(a->get_object(data, "validation", false, &val, err));
  s->val_max_samples = 0;
  s->val_synthetic_samples = 0;
  s->val_seed = 1234;
  if (val) {
    ST_CHECK(a->get_string(val, "dataset_base_path", NULL, &s->val_base_path, err));
    ST_CHECK(a->get_string(val, "dataset_metadata_path", NULL, &s->val_metadata_path, err));
    ST_CHECK(get_small_int(val, "max_samples", 0, 0, INT64_MAX, &s->val_max_samples, err));
    ST_CHECK(get_small_int(val, "seed", 1234, 0, INT64_MAX, &v, err));
    s->val_seed = (uint64_t)v;
    ST_CHECK(a->get_object(val, "synthetic", false, &vsynth, err));
    if (vsynth) {
      ST_CHECK(get_small_int(vsynth, "num_samples", 0, 0, INT64_MAX, &s->val_synthetic_samples, err));
      ST_CHECK(need(api_type(vsynth, "seed") == ST_CFG_ABSENT, vsynth, "seed", err,
                    "validation samples come from the training data's distribution: set data.synthetic.seed"));
    }
    ST_CHECK(need(s->val_base_path || s->val_synthetic_samples > 0, val, "dataset_base_path", err,
                  "the validation set needs dataset_base_path (cached samples) or synthetic.num_samples"));
  }

  ST_CHECK(a->get_object(root, "train", true, &train, err));
  ST_CHECK(get_small_int(train, "max_steps", 0, 0, INT64_MAX, &s->max_steps, err));
  ST_CHECK(get_small_int(train, "num_epochs", 1, 0, INT64_MAX, &s->num_epochs, err));
  ST_CHECK(get_small_int(train, "seed", 42, 0, INT64_MAX, &v, err));
  s->seed = (uint64_t)v;
  ST_CHECK(a->get_string(train, "output_path", "out", &s->output_path, err));
  ST_CHECK(need(s->output_path[0] != '\0', train, "output_path", err, "must not be empty"));
  ST_CHECK(get_small_int(train, "save_steps", 0, 0, INT64_MAX, &s->save_steps, err));
  ST_CHECK(get_small_int(train, "keep_last", 0, 0, INT64_MAX, &s->keep_last, err));
  ST_CHECK(a->get_string(train, "resume", NULL, &s->resume, err));
  if (s->resume && !s->resume[0]) s->resume = NULL;
  ST_CHECK(get_small_int(train, "eval_steps", 0, 0, INT64_MAX, &s->eval_steps, err));
  st_cfg *sel, *early;
  ST_CHECK(a->get_object(train, "checkpoint", false, &sel, err));
  s->save_top_k = 0;
  s->monitor_max = false;
  if (sel) {
    const char *monitor, *mode;
    ST_CHECK(a->get_string(sel, "monitor", "val_loss", &monitor, err));
    ST_CHECK(need(strcmp(monitor, "val_loss") == 0, sel, "monitor", err,
                  "\"%s\" cannot be monitored: the metric strata computes for selection is \"val_loss\"", monitor));
    ST_CHECK(a->get_enum(sel, "mode", monitor_modes, "min", &mode, err));
    s->monitor_max = strcmp(mode, "max") == 0;
    ST_CHECK(get_small_int(sel, "save_top_k", 1, 1, INT64_MAX, &s->save_top_k, err));
    bool save_last;
    ST_CHECK(a->get_bool(sel, "save_last", true, &save_last, err));
    ST_CHECK(need(save_last, sel, "save_last", err,
                  "must be true: the newest checkpoint is always kept, since `latest` (resume) points at it"));
  }
  ST_CHECK(a->get_object(train, "early_stopping", false, &early, err));
  s->early_patience = 0;
  s->early_min_delta = 0.0;
  if (early) {
    ST_CHECK(get_small_int(early, "patience", 3, 1, INT64_MAX, &s->early_patience, err));
    ST_CHECK(a->get_number(early, "min_delta", 0.0, &s->early_min_delta, err));
  }
  ST_CHECK(a->get_string(train, "on_save", NULL, &s->on_save, err));
  bool has_val = s->val_base_path || s->val_synthetic_samples > 0;
  ST_CHECK(need(has_val || (!sel && !early && s->eval_steps == 0), train, sel ? "checkpoint" : early ? "early_stopping" : "eval_steps", err,
                "needs a validation set: set data.validation (dataset_base_path or synthetic.num_samples)"));
  ST_CHECK(a->get_bool(train, "gradient_checkpointing", s->activation_checkpointing, &s->activation_checkpointing,
                       err));
  ST_CHECK(a->get_bool(train, "gradient_checkpointing_offload", s->activation_checkpointing_offload,
                       &s->activation_checkpointing_offload, err));
  if (s->activation_checkpointing_offload) s->activation_checkpointing = true; /* offload implies checkpointing */
  ST_CHECK(get_small_int(train, "max_bad_steps", 3, 1, INT64_MAX, &s->max_bad_steps, err));
  double tflops;
  ST_CHECK(a->get_number(train, "peak_tflops", 0.0, &tflops, err));
  ST_CHECK(need(tflops >= 0, train, "peak_tflops", err, "must be >= 0 (0 = unknown), found %g", tflops));
  s->peak_flops = tflops * 1e12;

  const char *dev;
  ST_CHECK(a->get_object(root, "device", true, &device, err));
  ST_CHECK(a->get_enum(device, "type", device_types, "cpu", &dev, err));
  s->device_type = strcmp(dev, "cuda") == 0 ? ST_DEVICE_CUDA : ST_DEVICE_CPU;
  ST_CHECK(get_small_int(device, "threads", 0, 0, 65536, &v, err));
  s->threads = (int)v;
  ST_CHECK(a->get_string(device, "comm", "auto", &s->comm_backend, err));
  double timeout_s;
  ST_CHECK(a->get_number(device, "comm_timeout_s", 1800.0, &timeout_s, err));
  ST_CHECK(need(timeout_s > 0, device, "comm_timeout_s", err, "must be > 0 seconds, found %g", timeout_s));
  s->comm_timeout_ms = (int64_t)(timeout_s * 1000.0);
  ST_CHECK(a->get_string(device, "interface", NULL, &s->comm_interface, err));
  return ST_OK;
}

st_result st_config_extract(st_config *c, st_settings *out, st_error *err) {
  if (!c || !out) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "", "st_config_extract: NULL argument");
  *out = (st_settings){0};
  ST_CHECK(validate_config(c, err));
  st_cfg *root = st_config_root(c);
  if (!root) return oom(err, "");
  st_settings *s = out;

  ST_CHECK(batch_value(root, "train_batch_size", &s->train_batch_size, err));
  ST_CHECK(batch_value(root, "train_micro_batch_size_per_gpu", &s->micro_batch_size, err));
  ST_CHECK(batch_value(root, "gradient_accumulation_steps", &s->grad_accum_steps, err));
  ST_CHECK(get_number_auto(root, "gradient_clipping", 1.0, &s->gradient_clipping, err));
  ST_CHECK(need(non_negative(s->gradient_clipping), root, "gradient_clipping", err, "must be >= 0 (0 = off), found %g",
                s->gradient_clipping));
  ST_CHECK(get_small_int(root, "steps_per_print", 0, 0, INT64_MAX, &s->steps_per_print, err));
  ST_CHECK(cfg_api.get_bool(root, "wall_clock_breakdown", false, &s->wall_clock_breakdown, err));

  json_t *z = json_object_get(c->root, "zero_optimization");
  int64_t stage;
  if (json_is_object(z) && json_as_int(json_object_get(z, "stage"), &stage) && (stage < 0 || stage > 3))
    return st_error_set(err, ST_ERR_CONFIG, "zero_optimization.stage",
                        "zero_optimization.stage: must be 0, 1, 2 or 3, found %lld", (long long)stage);

  ST_CHECK(extract_optimizer(root, s, err));
  ST_CHECK(extract_scheduler(root, s, err));
  ST_CHECK(extract_precision(root, s, err));
  ST_CHECK(extract_monitors(root, s, err));
  ST_CHECK(extract_strata_blocks(root, s, err));
  return ST_OK;
}

/* ---- "auto" resolution ---------------------------------------------------------------------- */

/* "auto", or a value this module derived before (so resolving twice gives the same answer) */
static bool wants_derivation(const st_cfg *obj, const char *key) {
  json_t *v = child(obj, key);
  if (!v) return false;
  if (is_auto(v)) return true;
  char path[PATH_CAP * 2];
  path_fmt(path, sizeof path, obj->path, key);
  return json_object_get(obj->owner->prov, path) && prov_get(obj->owner, path) == ST_PROV_DERIVED;
}

static st_result derive(st_cfg *obj, const char *key, json_t *value, st_error *err) {
  return cfg_put(obj->owner, obj->node, obj->path, key, value, ST_PROV_DERIVED, err);
}

/* the batch-triple member as the user gave it: absent, "auto", or earlier derived/default = not given */
static bool batch_given(st_cfg *root, const char *key, int64_t *out) {
  json_t *v = child(root, key);
  if (!v || json_is_null(v) || is_auto(v)) return false;
  st_prov p = prov_get(root->owner, key);
  if (p == ST_PROV_DERIVED || p == ST_PROV_DEFAULT) return false;
  return json_as_int(v, out);
}

static st_result resolve_batch(st_cfg *root, int world, st_error *err) {
  static const char *const TBS = "train_batch_size", *const MB = "train_micro_batch_size_per_gpu",
                           *const GAS = "gradient_accumulation_steps";
  int64_t tbs = 0, mb = 0, gas = 0, w = world, d;
  bool has_t = batch_given(root, TBS, &tbs), has_m = batch_given(root, MB, &mb), has_g = batch_given(root, GAS, &gas);
  st_prov pm = ST_PROV_DERIVED, pg = ST_PROV_DERIVED;
  if (has_t && has_m && has_g) {
    if (__builtin_mul_overflow(mb, gas, &d) || __builtin_mul_overflow(d, w, &d) || d != tbs)
      return st_error_set(err, ST_ERR_CONFIG, TBS,
                          "train_batch_size (%lld) != train_micro_batch_size_per_gpu (%lld) × "
                          "gradient_accumulation_steps (%lld) × data-parallel world size (%d) = %lld; "
                          "fix one of them or set it to \"auto\"",
                          (long long)tbs, (long long)mb, (long long)gas, world,
                          (long long)(__builtin_mul_overflow(mb * gas, w, &d) ? -1 : d));
    return ST_OK;
  }
  if (has_t && has_m) {
    if (__builtin_mul_overflow(mb, w, &d) || tbs % d != 0)
      return st_error_set(err, ST_ERR_CONFIG, TBS,
                          "train_batch_size %lld is not divisible by train_micro_batch_size_per_gpu %lld × world "
                          "size %d = %lld; make train_batch_size a multiple of %lld (or give "
                          "gradient_accumulation_steps instead)",
                          (long long)tbs, (long long)mb, world, (long long)(mb * w), (long long)(mb * w));
    gas = tbs / d;
  } else if (has_t && has_g) {
    if (__builtin_mul_overflow(gas, w, &d) || tbs % d != 0)
      return st_error_set(err, ST_ERR_CONFIG, TBS,
                          "train_batch_size %lld is not divisible by gradient_accumulation_steps %lld × world size "
                          "%d = %lld; make train_batch_size a multiple of %lld",
                          (long long)tbs, (long long)gas, world, (long long)(gas * w), (long long)(gas * w));
    mb = tbs / d;
  } else if (has_m && has_g) {
    if (__builtin_mul_overflow(mb, gas, &tbs) || __builtin_mul_overflow(tbs, w, &tbs))
      return st_error_set(err, ST_ERR_CONFIG, MB, "train_micro_batch_size_per_gpu × gradient_accumulation_steps × "
                                                  "world size overflows");
  } else if (has_t) {
    if (tbs % w != 0)
      return st_error_set(err, ST_ERR_CONFIG, TBS,
                          "train_batch_size %lld is not divisible by the data-parallel world size %d; make it a "
                          "multiple of %d",
                          (long long)tbs, world, world);
    gas = 1;
    mb = tbs / w;
  } else {
    /* DeepSpeed would stop here when no micro batch size is known; strata defaults it to 1 */
    if (!has_m) {
      mb = 1;
      pm = ST_PROV_DEFAULT;
    }
    if (!has_g) {
      gas = 1;
      pg = ST_PROV_DEFAULT;
    }
    if (__builtin_mul_overflow(mb, gas, &tbs) || __builtin_mul_overflow(tbs, w, &tbs))
      return st_error_set(err, ST_ERR_CONFIG, MB, "train_micro_batch_size_per_gpu × gradient_accumulation_steps × "
                                                  "world size overflows");
  }
  if (!has_t) ST_CHECK(derive(root, TBS, json_integer(tbs), err));
  if (!has_m) ST_CHECK(cfg_put(root->owner, root->node, "", MB, json_integer(mb), pm, err));
  if (!has_g) ST_CHECK(cfg_put(root->owner, root->node, "", GAS, json_integer(gas), pg, err));
  return ST_OK;
}

st_result st_config_resolve(st_config *c, int dp_world_size, int64_t hidden_size, st_settings *out, st_error *err) {
  if (!c || !out || dp_world_size < 1)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "", "st_config_resolve: NULL config or world size %d < 1",
                        dp_world_size);
  ST_CHECK(st_config_extract(c, out, err)); /* validates and fills the defaults */
  st_cfg *root = st_config_root(c);
  if (!root) return oom(err, "");

  if (wants_derivation(root, "gradient_clipping")) ST_CHECK(derive(root, "gradient_clipping", json_real(1.0), err));

  st_cfg *p = st_config_node(c, "optimizer.params");
  if (p) {
    if (wants_derivation(p, "lr")) ST_CHECK(derive(p, "lr", json_real(1e-3), err));
    if (wants_derivation(p, "betas")) ST_CHECK(derive(p, "betas", json_pack("[ff]", 0.9, 0.999), err));
    if (wants_derivation(p, "eps")) ST_CHECK(derive(p, "eps", json_real(1e-8), err));
    if (wants_derivation(p, "weight_decay")) ST_CHECK(derive(p, "weight_decay", json_real(0.0), err));
  }
  double lr = 1e-3;
  json_t *lrv = child(p, "lr");
  if (json_is_number(lrv)) lr = json_number_value(lrv);

  st_cfg *sp = st_config_node(c, "scheduler.params");
  if (sp && out->scheduler.type != ST_SCHED_CONSTANT) {
    if (wants_derivation(sp, "warmup_min_lr")) ST_CHECK(derive(sp, "warmup_min_lr", json_real(0.0), err));
    if (wants_derivation(sp, "warmup_num_steps")) ST_CHECK(derive(sp, "warmup_num_steps", json_integer(0), err));
    if (out->scheduler.type != ST_SCHED_WARMUP_COSINE_LR) {
      json_t *mx = child(sp, "warmup_max_lr");
      if (!mx || json_is_null(mx) || wants_derivation(sp, "warmup_max_lr"))
        ST_CHECK(derive(sp, "warmup_max_lr", json_real(lr), err));
    }
    if (out->scheduler.type != ST_SCHED_WARMUP_LR && out->max_steps > 0) {
      json_t *t = child(sp, "total_num_steps");
      if (!t || json_is_null(t) || wants_derivation(sp, "total_num_steps"))
        ST_CHECK(derive(sp, "total_num_steps", json_integer(out->max_steps), err));
    }
  }

  static const char *const precisions[] = {"fp16", "bf16"};
  for (int i = 0; i < 2; i++) {
    st_cfg *pr = st_config_node(c, precisions[i]);
    if (pr && wants_derivation(pr, "enabled")) ST_CHECK(derive(pr, "enabled", json_false(), err));
  }

  st_cfg *z = st_config_node(c, "zero_optimization");
  if (z && json_is_object(z->node)) {
    static const char *const sized[] = {"reduce_bucket_size", "stage3_prefetch_bucket_size",
                                        "stage3_param_persistence_threshold"};
    for (int i = 0; i < 3; i++) {
      if (!wants_derivation(z, sized[i])) continue;
      if (hidden_size <= 0 || hidden_size > 3000000000LL)
        return st_error_set(err, ST_ERR_CONFIG, "zero_optimization", "zero_optimization.%s is \"auto\", which is "
                            "derived from the model's hidden size, but the model reported %lld; give a number",
                            sized[i], (long long)hidden_size);
      int64_t h = hidden_size;
      int64_t value = i == 0 ? h * h : i == 1 ? (int64_t)(0.9 * (double)h * (double)h) : 10 * h;
      ST_CHECK(derive(z, sized[i], json_integer(value), err));
    }
    if (wants_derivation(z, "stage3_gather_16bit_weights_on_model_save"))
      ST_CHECK(derive(z, "stage3_gather_16bit_weights_on_model_save", json_false(), err));
    if (wants_derivation(z, "stage3_gather_fp16_weights_on_model_save"))
      ST_CHECK(derive(z, "stage3_gather_fp16_weights_on_model_save", json_false(), err));
  }

  ST_CHECK(resolve_batch(root, dp_world_size, err));
  ST_CHECK(st_config_extract(c, out, err));
  if (out->scheduler.total_num_steps == ST_CONFIG_AUTO_INT) out->scheduler.total_num_steps = 0; /* trainer's total */
  if (out->train_batch_size <= 0 || out->micro_batch_size <= 0 || out->grad_accum_steps <= 0 ||
      isnan(out->gradient_clipping) || isnan(out->optimizer.lr) || isnan(out->optimizer.beta1) ||
      isnan(out->optimizer.eps) || isnan(out->optimizer.weight_decay) || isnan(out->scheduler.warmup_max_lr) ||
      isnan(out->scheduler.warmup_min_lr) || out->scheduler.warmup_num_steps < 0)
    return st_error_set(err, ST_ERR_INTERNAL, "", "st_config_resolve left an \"auto\" value unresolved");
  return ST_OK;
}

/* ---- output --------------------------------------------------------------------------------- */

typedef struct leaf {
  char *path, *value;
  st_prov prov;
} leaf;

typedef struct leaf_list {
  leaf *items;
  size_t n, cap;
  bool failed;
} leaf_list;

static int cmp_str(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static void collect_leaves(const st_config *c, json_t *v, const char *path, leaf_list *out) {
  if (out->failed) return;
  if (json_is_object(v) && json_object_size(v) > 0) {
    size_t n = json_object_size(v), i = 0;
    const char **keys = malloc(n * sizeof *keys);
    if (!keys) {
      out->failed = true;
      return;
    }
    const char *k;
    json_t *x;
    json_object_foreach(v, k, x) keys[i++] = k;
    qsort(keys, n, sizeof *keys, cmp_str);
    for (i = 0; i < n; i++) {
      char *cp = path_join(path, keys[i]);
      if (!cp) {
        out->failed = true;
        break;
      }
      collect_leaves(c, json_object_get(v, keys[i]), cp, out);
      free(cp);
    }
    free(keys);
    return;
  }
  if (!path[0]) return;
  if (out->n == out->cap) {
    size_t cap = out->cap ? out->cap * 2 : 64;
    leaf *bigger = realloc(out->items, cap * sizeof *bigger);
    if (!bigger) {
      out->failed = true;
      return;
    }
    out->items = bigger;
    out->cap = cap;
  }
  leaf *l = &out->items[out->n];
  l->path = strdup(path);
  /* 15 significant digits: 3e-3 reads as 0.003, not 0.0030000000000000001 */
  l->value = dup_json_text(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(15));
  l->prov = prov_get(c, path);
  if (!l->path || !l->value) {
    free(l->path);
    free(l->value);
    out->failed = true;
    return;
  }
  out->n++;
}

void st_config_print_resolved(st_config *c, FILE *out) {
  if (!c || !out) return;
  leaf_list list = {0};
  collect_leaves(c, c->root, "", &list);
  int kw = 0, vw = 0;
  for (size_t i = 0; i < list.n; i++) {
    int pl = (int)strlen(list.items[i].path), vl = (int)strlen(list.items[i].value);
    if (pl > kw) kw = pl;
    if (vl > vw) vw = vl;
  }
  if (kw > 60) kw = 60; /* a very long key or value just pushes its own line out */
  if (vw > 40) vw = 40;
  for (size_t i = 0; i < list.n; i++) {
    fprintf(out, "%-*s = %-*s   (%s)\n", kw, list.items[i].path, vw, list.items[i].value,
            st_prov_name(list.items[i].prov));
    free(list.items[i].path);
    free(list.items[i].value);
  }
  if (list.failed) fprintf(out, "... (out of memory: the listing is incomplete)\n");
  free(list.items);
}

char *st_config_to_json(st_config *c) {
  return c ? dup_json_text(c->root, JSON_INDENT(2) | JSON_SORT_KEYS) : NULL;
}
