/* data.c — cached-sample datasets (DESIGN §5): the sample list from a metadata file or a directory
 * scan, the per-epoch order (repeat, seeded shuffle, rank sharding), a prefetch thread that opens
 * the safetensors files of the next batches, and the synthetic-data writer.
 *
 * The global order of epoch e is a list of n*repeat positions (position p names file p % n),
 * permuted when shuffling by a Fisher–Yates pass driven by splitmix64 seeded from (seed, e). It is
 * cut into batches of batch_size (a partial last batch is dropped) and rank r takes batches r,
 * r + world, r + 2*world, ... (every rank the same count). Cursor c (per rank) is batch c % P of
 * epoch c / P, P = batches_per_epoch, so the sequence depends only on (seed, cursor): resuming is a
 * seek, and prefetching changes nothing but timing. */
#include "data.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"
#include "safetensors.h"

/* ---------------------------------------------------------------------------------------------
 * small helpers */

static char *dup_printf(const char *fmt, ...) ST_PRINTF(1, 2);
static char *dup_printf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  char *s = NULL;
  int n = vasprintf(&s, fmt, ap);
  va_end(ap);
  return n < 0 ? NULL : s;
}

static bool ends_with(const char *s, const char *suffix) {
  size_t a = strlen(s), b = strlen(suffix);
  return a >= b && memcmp(s + a - b, suffix, b) == 0;
}

static uint64_t splitmix64_next(uint64_t *state) {
  uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

/* uniform in [0, bound), without modulo bias */
static uint64_t splitmix64_below(uint64_t *state, uint64_t bound) {
  uint64_t threshold = (0 - bound) % bound; /* 2^64 mod bound */
  for (;;) {
    uint64_t r = splitmix64_next(state);
    if (r >= threshold) return r % bound;
  }
}

static st_result read_text_file(const char *path, const char *what, char **out, size_t *len, st_error *err) {
  FILE *fp = fopen(path, "rb");
  if (!fp) return st_error_set(err, ST_ERR_IO, path, "%s %s: cannot open: %s", what, path, strerror(errno));
  size_t cap = 4096, n = 0;
  char *buf = malloc(cap);
  while (buf) {
    if (n + 1 >= cap) {
      char *b = realloc(buf, cap * 2);
      if (!b) break;
      buf = b;
      cap *= 2;
    }
    size_t got = fread(buf + n, 1, cap - n - 1, fp);
    n += got;
    if (got == 0) break;
  }
  bool failed = ferror(fp);
  fclose(fp);
  if (!buf) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "out of memory reading %s", path);
  if (failed) {
    free(buf);
    return st_error_set(err, ST_ERR_IO, path, "%s %s: read failed", what, path);
  }
  buf[n] = '\0';
  *out = buf;
  *len = n;
  return ST_OK;
}

/* ---------------------------------------------------------------------------------------------
 * the sample list */

typedef struct sample_ref {
  char *path;
  char *id;  /* "<path> (<metadata> line 4)": st_sample.id */
  char *row; /* "<metadata> line 4", or NULL for a scanned folder */
} sample_ref;

typedef struct ref_list {
  sample_ref *v;
  int64_t n, cap;
} ref_list;

static void ref_list_free(ref_list *l) {
  for (int64_t i = 0; i < l->n; i++) {
    free(l->v[i].path);
    free(l->v[i].id);
    free(l->v[i].row);
  }
  free(l->v);
  memset(l, 0, sizeof *l);
}

/* value: the metadata's file/image field; where: "metadata.csv line 4" */
static st_result ref_add(ref_list *l, const char *base, const char *value, const char *where, st_error *err) {
  if (l->n == l->cap) {
    int64_t cap = l->cap ? l->cap * 2 : 64;
    sample_ref *v = realloc(l->v, (size_t)cap * sizeof *v);
    if (!v) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "data", "out of memory listing samples");
    l->v = v;
    l->cap = cap;
  }
  const char *suffix = ends_with(value, ".safetensors") ? "" : ".safetensors";
  char *path = value[0] == '/' ? dup_printf("%s%s", value, suffix) : dup_printf("%s/%s%s", base, value, suffix);
  char *id = path ? (where ? dup_printf("%s (%s)", path, where) : strdup(path)) : NULL;
  char *row = where ? strdup(where) : NULL;
  if (!path || !id || (where && !row)) {
    free(path);
    free(id);
    free(row);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "data", "out of memory listing samples");
  }
  l->v[l->n++] = (sample_ref){path, id, row};
  return ST_OK;
}

/* The column holding the sample: `file`, else `image` (DiffSynth's metadata names the image). */
static int pick_column(char *const *names, int n) {
  for (int i = 0; i < n; i++)
    if (strcmp(names[i], "file") == 0) return i;
  for (int i = 0; i < n; i++)
    if (strcmp(names[i], "image") == 0) return i;
  return -1;
}

/* One CSV record (RFC 4180: quoted fields may hold commas, quotes doubled, newlines). Fields are
 * written NUL-terminated into a scratch copy; returns the field count or -1 on a syntax error. */
typedef struct csv_reader {
  const char *text;
  size_t len, pos;
  int line; /* 1-based line where the current record starts */
  int next_line;
} csv_reader;

typedef struct csv_record {
  char **fields;
  int n, cap;
  char *buf;
  size_t buf_cap;
} csv_record;

static void csv_record_free(csv_record *r) {
  free(r->fields);
  free(r->buf);
}

/* returns 1 with a record, 0 at the end, -1 on an error (err filled) */
static int csv_next(csv_reader *c, csv_record *rec, const char *path, st_error *err) {
  /* skip blank lines */
  while (c->pos < c->len && (c->text[c->pos] == '\n' || c->text[c->pos] == '\r')) {
    if (c->text[c->pos] == '\n') c->next_line++;
    c->pos++;
  }
  if (c->pos >= c->len) return 0;
  c->line = c->next_line;
  if (rec->buf_cap < c->len - c->pos + 1) {
    char *b = realloc(rec->buf, c->len - c->pos + 1);
    if (!b) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "out of memory"), -1;
    rec->buf = b;
    rec->buf_cap = c->len - c->pos + 1;
  }
  size_t out = 0;
  rec->n = 0;
  for (;;) { /* one field per iteration */
    if (rec->n == rec->cap) {
      int cap = rec->cap ? rec->cap * 2 : 16;
      char **f = realloc(rec->fields, (size_t)cap * sizeof *f);
      if (!f) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "out of memory"), -1;
      rec->fields = f;
      rec->cap = cap;
    }
    rec->fields[rec->n++] = rec->buf + out;
    if (c->pos < c->len && c->text[c->pos] == '"') {
      int open_line = c->next_line;
      c->pos++;
      for (;;) {
        if (c->pos >= c->len)
          return st_error_set(err, ST_ERR_FORMAT, path, "%s line %d: a quoted field is never closed", path,
                              open_line), -1;
        char ch = c->text[c->pos++];
        if (ch == '"') {
          if (c->pos < c->len && c->text[c->pos] == '"') {
            rec->buf[out++] = '"';
            c->pos++;
            continue;
          }
          break;
        }
        if (ch == '\n') c->next_line++;
        rec->buf[out++] = ch;
      }
      if (c->pos < c->len && c->text[c->pos] != ',' && c->text[c->pos] != '\n' && c->text[c->pos] != '\r')
        return st_error_set(err, ST_ERR_FORMAT, path, "%s line %d: unexpected '%c' after a closing quote", path,
                            c->next_line, c->text[c->pos]), -1;
    } else {
      while (c->pos < c->len && c->text[c->pos] != ',' && c->text[c->pos] != '\n' && c->text[c->pos] != '\r')
        rec->buf[out++] = c->text[c->pos++];
    }
    rec->buf[out++] = '\0';
    if (c->pos < c->len && c->text[c->pos] == ',') {
      c->pos++;
      continue;
    }
    if (c->pos < c->len && c->text[c->pos] == '\r') c->pos++;
    if (c->pos < c->len && c->text[c->pos] == '\n') {
      c->pos++;
      c->next_line++;
    }
    return 1;
  }
}

static void trim(char *s) {
  size_t n = strlen(s), a = 0;
  while (a < n && (s[a] == ' ' || s[a] == '\t')) a++;
  while (n > a && (s[n - 1] == ' ' || s[n - 1] == '\t')) n--;
  memmove(s, s + a, n - a);
  s[n - a] = '\0';
}

static st_result load_csv(const char *path, const char *text, size_t len, const char *base, ref_list *refs,
                          st_error *err) {
  csv_reader c = {.text = text, .len = len, .line = 1, .next_line = 1};
  if (len >= 3 && memcmp(text, "\xef\xbb\xbf", 3) == 0) c.pos = 3; /* UTF-8 BOM from spreadsheets */
  csv_record rec = {0};
  st_result r = ST_OK;
  int got = csv_next(&c, &rec, path, err);
  if (got <= 0) {
    csv_record_free(&rec);
    return got < 0 ? err->code : st_error_set(err, ST_ERR_CONFIG, path, "%s: empty metadata file (expected a header "
                                                                      "row with a `file` or `image` column)", path);
  }
  int header_fields = rec.n;
  for (int i = 0; i < rec.n; i++) trim(rec.fields[i]);
  int col = pick_column(rec.fields, rec.n);
  if (col < 0) {
    char cols[512] = "";
    size_t used = 0;
    for (int i = 0; i < rec.n && used < sizeof cols; i++)
      used += (size_t)snprintf(cols + used, sizeof cols - used, "%s\"%s\"", i ? ", " : "", rec.fields[i]);
    csv_record_free(&rec);
    return st_error_set(err, ST_ERR_CONFIG, path, "%s: the header row has no `file` or `image` column (found %s)",
                        path, cols);
  }
  while (r == ST_OK && (got = csv_next(&c, &rec, path, err)) > 0) {
    if (rec.n == 1 && rec.fields[0][0] == '\0') continue; /* a line of spaces-free nothing */
    if (rec.n != header_fields) {
      r = st_error_set(err, ST_ERR_FORMAT, path, "%s line %d: %d field(s) but the header has %d (quote fields that "
                       "contain commas)", path, c.line, rec.n, header_fields);
      break;
    }
    if (rec.fields[col][0] == '\0') {
      r = st_error_set(err, ST_ERR_FORMAT, path, "%s line %d: the sample column is empty", path, c.line);
      break;
    }
    char where[64 + 4096];
    snprintf(where, sizeof where, "%s line %d", path, c.line);
    r = ref_add(refs, base, rec.fields[col], where, err);
  }
  if (got < 0) r = err->code;
  csv_record_free(&rec);
  return r;
}

static st_result add_json_row(const char *path, json_t *row, const char *where, const char *base, ref_list *refs,
                              st_error *err) {
  if (!json_is_object(row)) return st_error_set(err, ST_ERR_FORMAT, path, "%s: not a JSON object", where);
  json_t *v = json_object_get(row, "file");
  if (!v) v = json_object_get(row, "image");
  if (!json_is_string(v) || json_string_value(v)[0] == '\0')
    return st_error_set(err, ST_ERR_FORMAT, path, "%s: needs a non-empty string \"file\" (or \"image\") field", where);
  return ref_add(refs, base, json_string_value(v), where, err);
}

static st_result load_json(const char *path, const char *text, size_t len, const char *base, ref_list *refs,
                           st_error *err) {
  json_error_t jerr;
  json_t *root = json_loadb(text, len, 0, &jerr);
  if (!root)
    return st_error_set(err, ST_ERR_FORMAT, path, "%s:%d:%d: invalid JSON: %s", path, jerr.line, jerr.column,
                        jerr.text);
  st_result r = ST_OK;
  if (!json_is_array(root)) {
    r = st_error_set(err, ST_ERR_FORMAT, path, "%s: expected a JSON array of objects", path);
  } else {
    for (size_t i = 0; r == ST_OK && i < json_array_size(root); i++) {
      char where[4200];
      snprintf(where, sizeof where, "%s entry %zu", path, i + 1);
      r = add_json_row(path, json_array_get(root, i), where, base, refs, err);
    }
  }
  json_decref(root);
  return r;
}

static st_result load_jsonl(const char *path, const char *text, size_t len, const char *base, ref_list *refs,
                            st_error *err) {
  size_t pos = 0;
  int line = 0;
  st_result r = ST_OK;
  while (r == ST_OK && pos < len) {
    line++;
    const char *nl = memchr(text + pos, '\n', len - pos);
    size_t end = nl ? (size_t)(nl - text) : len, a = pos;
    pos = nl ? end + 1 : len;
    while (a < end && (text[a] == ' ' || text[a] == '\t' || text[a] == '\r')) a++;
    if (a == end) continue; /* blank line */
    json_error_t jerr;
    json_t *row = json_loadb(text + a, end - a, 0, &jerr);
    char where[4200];
    snprintf(where, sizeof where, "%s line %d", path, line);
    if (!row) {
      r = st_error_set(err, ST_ERR_FORMAT, path, "%s: invalid JSON: %s (column %d)", where, jerr.text, jerr.column);
      break;
    }
    r = add_json_row(path, row, where, base, refs, err);
    json_decref(row);
  }
  return r;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

static st_result scan_dir(const char *base, ref_list *refs, st_error *err) {
  DIR *dir = opendir(base);
  if (!dir)
    return st_error_set(err, errno == ENOENT ? ST_ERR_CONFIG : ST_ERR_IO, "data.dataset_base_path",
                        "dataset_base_path %s: cannot open the directory: %s", base, strerror(errno));
  char **names = NULL;
  size_t n = 0, cap = 0;
  st_result r = ST_OK;
  struct dirent *de;
  while (r == ST_OK && (de = readdir(dir))) {
    if (de->d_name[0] == '.' || !ends_with(de->d_name, ".safetensors")) continue;
    if (n == cap) {
      cap = cap ? cap * 2 : 256;
      char **v = realloc(names, cap * sizeof *v);
      if (!v) {
        r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, base, "out of memory scanning %s", base);
        break;
      }
      names = v;
    }
    if (!(names[n] = strdup(de->d_name))) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, base, "out of memory");
    else n++;
  }
  closedir(dir);
  if (r == ST_OK && n > 1) qsort(names, n, sizeof *names, cmp_str);
  for (size_t i = 0; r == ST_OK && i < n; i++) r = ref_add(refs, base, names[i], NULL, err);
  for (size_t i = 0; i < n; i++) free(names[i]);
  free(names);
  return r;
}

/* ---------------------------------------------------------------------------------------------
 * the dataset */

typedef enum slot_state { SLOT_EMPTY, SLOT_LOADING, SLOT_READY, SLOT_HELD } slot_state;

typedef struct slot {
  slot_state state;
  int64_t cursor;
  st_result result;
  st_error err;
  int n_open;              /* files[0..n_open) are open */
  st_safetensors **files;  /* [batch_size] */
  st_sample *samples;      /* [batch_size]; names/tensors arrays allocated per sample */
} slot;

struct st_dataset {
  st_dataset_options opt;
  char *base_path, *metadata_path;
  ref_list refs;
  int64_t positions;       /* n * repeat: the length of one epoch's order */
  int64_t per_epoch;       /* batches per epoch per rank */
  /* the loader's (the worker's, or next()'s without prefetch) order cache */
  int64_t *order;
  int64_t order_epoch;
  /* consumer side */
  int64_t cursor;
  int held;                /* the slot the caller's batch lives in, or -1 */
  bool failed;             /* a load failed: next() repeats the error until seek */
  st_error fail_err;
  /* the ring and the worker */
  slot *slots;
  int nslots;
  bool threaded, running, stop, worker_done;
  int64_t produce_next;
  pthread_t thread;
  pthread_mutex_t mu;
  pthread_cond_t cv;
};

static void slot_release(slot *s) {
  for (int i = 0; i < s->n_open; i++) {
    st_safetensors_close(s->files[i]);
    s->files[i] = NULL;
    free((void *)s->samples[i].names);
    free((void *)s->samples[i].tensors);
    memset(&s->samples[i], 0, sizeof s->samples[i]);
  }
  s->n_open = 0;
  s->state = SLOT_EMPTY;
  s->result = ST_OK;
}

static st_result ensure_order(st_dataset *d, int64_t epoch, st_error *err) {
  if (!d->opt.shuffle || d->order_epoch == epoch) return ST_OK;
  if (!d->order) {
    d->order = malloc((size_t)d->positions * sizeof *d->order);
    if (!d->order)
      return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "data", "out of memory for the order of %lld samples",
                          (long long)d->positions);
  }
  for (int64_t i = 0; i < d->positions; i++) d->order[i] = i;
  uint64_t state = d->opt.seed ^ 0x73687566666c6521ull; /* "shuffle!" */
  state = splitmix64_next(&state) ^ (uint64_t)epoch;
  for (int64_t i = d->positions - 1; i > 0; i--) {
    int64_t j = (int64_t)splitmix64_below(&state, (uint64_t)i + 1);
    int64_t t = d->order[i];
    d->order[i] = d->order[j];
    d->order[j] = t;
  }
  d->order_epoch = epoch;
  return ST_OK;
}

/* Open the files of batch `cursor` into slot s; on failure s keeps what it opened (released later). */
static st_result load_batch(st_dataset *d, int64_t cursor, slot *s, st_error *err) {
  int64_t epoch = cursor / d->per_epoch, j = cursor % d->per_epoch;
  int64_t global_batch = j * d->opt.world_size + d->opt.rank;
  ST_CHECK(ensure_order(d, epoch, err));
  for (int64_t k = 0; k < d->opt.batch_size; k++) {
    int64_t p = global_batch * d->opt.batch_size + k;
    int64_t pos = d->opt.shuffle ? d->order[p] : p;
    const sample_ref *ref = &d->refs.v[pos % d->refs.n];
    st_safetensors *f = NULL;
    st_result r = st_safetensors_open(ref->path, &f, err);
    if (r != ST_OK) {
      /* the reader's message names the file; add the metadata row that named it */
      if (ref->row) st_error_prefix(err, "loading the sample of %s: ", ref->row);
      else st_error_prefix(err, "loading a sample: ");
      snprintf(err->where, sizeof err->where, "%s", ref->path);
      return r;
    }
    if (d->threaded) st_safetensors_populate(f); /* read the bytes here, not on the training thread */
    int nt = st_safetensors_count(f);
    const char **names = calloc((size_t)(nt ? nt : 1), sizeof *names);
    st_tensor *tensors = calloc((size_t)(nt ? nt : 1), sizeof *tensors);
    s->files[s->n_open] = f;
    s->samples[s->n_open] = (st_sample){.id = ref->id, .n_tensors = nt, .names = names, .tensors = tensors};
    s->n_open++;
    if (!names || !tensors)
      return st_error_set(err, ST_ERR_OUT_OF_MEMORY, ref->path, "out of memory loading sample %s", ref->id);
    for (int i = 0; i < nt; i++) {
      const st_st_entry *e = st_safetensors_entry(f, i);
      names[i] = e->name;
      tensors[i] = st_safetensors_tensor(f, e);
    }
  }
  return ST_OK;
}

static void *worker_main(void *arg) {
  st_dataset *d = arg;
  pthread_mutex_lock(&d->mu);
  for (;;) {
    int64_t k = d->produce_next;
    slot *s = &d->slots[k % d->nslots];
    while (!d->stop && s->state != SLOT_EMPTY) pthread_cond_wait(&d->cv, &d->mu);
    if (d->stop) break;
    s->state = SLOT_LOADING;
    s->cursor = k;
    pthread_mutex_unlock(&d->mu);
    st_error_clear(&s->err);
    st_result r = load_batch(d, k, s, &s->err);
    pthread_mutex_lock(&d->mu);
    s->result = r;
    s->state = SLOT_READY;
    d->produce_next = k + 1;
    pthread_cond_broadcast(&d->cv);
    if (r != ST_OK) break; /* the consumer reports it; nothing after a bad batch is loaded */
  }
  d->worker_done = true;
  pthread_cond_broadcast(&d->cv);
  pthread_mutex_unlock(&d->mu);
  return NULL;
}

static void stop_worker(st_dataset *d) {
  if (!d->running) return;
  pthread_mutex_lock(&d->mu);
  d->stop = true;
  pthread_cond_broadcast(&d->cv);
  pthread_mutex_unlock(&d->mu);
  pthread_join(d->thread, NULL);
  d->running = false;
  d->stop = false;
}

static void reset_ring(st_dataset *d) {
  stop_worker(d);
  for (int i = 0; i < d->nslots; i++) slot_release(&d->slots[i]);
  d->held = -1;
  d->failed = false;
  d->worker_done = false;
  d->produce_next = d->cursor;
}

st_result st_dataset_open(const st_dataset_options *opt, st_dataset **out, st_error *err) {
  *out = NULL;
  if (!opt) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "data", "st_dataset_open: NULL options");
  if (!opt->base_path && !opt->metadata_path)
    return st_error_set(err, ST_ERR_CONFIG, "data.dataset_base_path",
                        "no dataset: set data.dataset_base_path (a folder of cached .safetensors samples)");
  if (opt->batch_size < 1)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "data", "batch size %lld: must be at least 1",
                        (long long)opt->batch_size);
  if (opt->world_size < 1 || opt->rank < 0 || opt->rank >= opt->world_size)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "data", "rank %d of world size %d is out of range", opt->rank,
                        opt->world_size);
  if (opt->repeat < 0 || opt->prefetch < 0)
    return st_error_set(err, ST_ERR_CONFIG, "data.dataset_repeat", "dataset_repeat (%lld) and prefetch (%d) must "
                        "not be negative", (long long)opt->repeat, opt->prefetch);
  st_dataset *d = calloc(1, sizeof *d);
  if (!d) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "data", "out of memory opening the dataset");
  d->opt = *opt;
  if (d->opt.repeat == 0) d->opt.repeat = 1; /* zero-initialized options mean "once" */
  d->held = -1;
  d->order_epoch = -1;
  pthread_mutex_init(&d->mu, NULL);
  pthread_cond_init(&d->cv, NULL);
  st_result r = ST_OK;
  d->metadata_path = opt->metadata_path ? strdup(opt->metadata_path) : NULL;
  if (opt->base_path) {
    d->base_path = strdup(opt->base_path);
  } else { /* relative paths in the metadata are relative to the metadata's folder */
    const char *slash = strrchr(opt->metadata_path, '/');
    d->base_path = slash ? strndup(opt->metadata_path, (size_t)(slash - opt->metadata_path + (slash == opt->metadata_path)))
                         : strdup(".");
  }
  if (!d->base_path || (opt->metadata_path && !d->metadata_path))
    r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "data", "out of memory");
  d->opt.base_path = d->base_path;
  d->opt.metadata_path = d->metadata_path;
  if (r == ST_OK && d->metadata_path) {
    char *text = NULL;
    size_t len = 0;
    r = read_text_file(d->metadata_path, "dataset_metadata_path", &text, &len, err);
    if (r == ST_OK) {
      if (ends_with(d->metadata_path, ".jsonl")) r = load_jsonl(d->metadata_path, text, len, d->base_path, &d->refs, err);
      else if (ends_with(d->metadata_path, ".json")) r = load_json(d->metadata_path, text, len, d->base_path, &d->refs, err);
      else r = load_csv(d->metadata_path, text, len, d->base_path, &d->refs, err); /* as DiffSynth: the rest is CSV */
    }
    free(text);
    if (r == ST_OK && d->refs.n == 0)
      r = st_error_set(err, ST_ERR_CONFIG, "data.dataset_metadata_path", "%s names no samples", d->metadata_path);
  } else if (r == ST_OK) {
    r = scan_dir(d->base_path, &d->refs, err);
    if (r == ST_OK && d->refs.n == 0)
      r = st_error_set(err, ST_ERR_CONFIG, "data.dataset_base_path", "%s holds no *.safetensors samples (prepare the "
                       "data first, or set data.dataset_metadata_path)", d->base_path);
  }
  if (r == ST_OK && d->refs.n > INT64_MAX / d->opt.repeat)
    r = st_error_set(err, ST_ERR_CONFIG, "data.dataset_repeat", "dataset_repeat %lld is too large",
                     (long long)d->opt.repeat);
  if (r == ST_OK) {
    d->positions = d->refs.n * d->opt.repeat;
    d->per_epoch = d->positions / d->opt.batch_size / d->opt.world_size;
    d->threaded = d->opt.prefetch > 0;
    d->nslots = d->threaded ? d->opt.prefetch + 1 : 1; /* +1: the batch the caller holds */
    d->slots = calloc((size_t)d->nslots, sizeof *d->slots);
    for (int i = 0; d->slots && i < d->nslots; i++) {
      d->slots[i].files = calloc((size_t)d->opt.batch_size, sizeof *d->slots[i].files);
      d->slots[i].samples = calloc((size_t)d->opt.batch_size, sizeof *d->slots[i].samples);
      if (!d->slots[i].files || !d->slots[i].samples) r = ST_ERR_OUT_OF_MEMORY;
    }
    if (!d->slots || r != ST_OK) r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "data", "out of memory for the batch ring");
  }
  if (r != ST_OK) {
    st_dataset_close(d);
    return r;
  }
  *out = d;
  return ST_OK;
}

void st_dataset_close(st_dataset *d) {
  if (!d) return;
  stop_worker(d);
  for (int i = 0; d->slots && i < d->nslots; i++) {
    slot_release(&d->slots[i]);
    free(d->slots[i].files);
    free(d->slots[i].samples);
  }
  free(d->slots);
  free(d->order);
  ref_list_free(&d->refs);
  free(d->base_path);
  free(d->metadata_path);
  pthread_mutex_destroy(&d->mu);
  pthread_cond_destroy(&d->cv);
  free(d);
}

int64_t st_dataset_size(const st_dataset *d) { return d ? d->refs.n : 0; }
int64_t st_dataset_batches_per_epoch(const st_dataset *d) { return d ? d->per_epoch : 0; }
int64_t st_dataset_cursor(const st_dataset *d) { return d ? d->cursor : 0; }

st_result st_dataset_seek(st_dataset *d, int64_t cursor, st_error *err) {
  if (!d || cursor < 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "data", "seek to batch %lld: must not be negative",
                        (long long)cursor);
  if (cursor == d->cursor && !d->failed) return ST_OK; /* keep what was prefetched */
  reset_ring(d);
  d->cursor = cursor;
  d->produce_next = cursor;
  return ST_OK;
}

static void fill_batch(const st_dataset *d, const slot *s, st_batch *out) {
  memset(out, 0, sizeof *out);
  out->n_samples = (int)d->opt.batch_size;
  out->samples = s->samples;
  uint64_t state = d->opt.seed ^ (uint64_t)s->cursor * 0x9e3779b97f4a7c15ull;
  out->seed = splitmix64_next(&state);
  out->training = true;
}

st_result st_dataset_next(st_dataset *d, st_batch *out, st_error *err) {
  if (!d || !out) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "data", "st_dataset_next: NULL argument");
  if (d->per_epoch < 1)
    return st_error_set(err, ST_ERR_CONFIG, "train_micro_batch_size_per_gpu", "the dataset has %lld sample(s) (x%lld "
                        "repeat) for %d rank(s): fewer than one micro-batch of %lld", (long long)d->refs.n,
                        (long long)d->opt.repeat, d->opt.world_size, (long long)d->opt.batch_size);
  if (!d->threaded) {
    slot *s = &d->slots[0];
    slot_release(s);
    d->held = -1;
    if (d->failed) {
      *err = d->fail_err;
      return err->code;
    }
    st_error_clear(&s->err);
    s->cursor = d->cursor;
    st_result r = load_batch(d, d->cursor, s, &s->err);
    if (r != ST_OK) {
      d->failed = true;
      d->fail_err = s->err;
      slot_release(s);
      *err = d->fail_err;
      return r;
    }
    s->state = SLOT_HELD;
    d->held = 0;
    d->cursor++;
    fill_batch(d, s, out);
    return ST_OK;
  }
  pthread_mutex_lock(&d->mu);
  if (d->held >= 0) {
    slot_release(&d->slots[d->held]);
    d->held = -1;
    pthread_cond_broadcast(&d->cv);
  }
  if (d->failed) {
    pthread_mutex_unlock(&d->mu);
    *err = d->fail_err;
    return err->code;
  }
  if (!d->running) {
    d->produce_next = d->cursor;
    d->worker_done = false;
    d->stop = false;
    int e = pthread_create(&d->thread, NULL, worker_main, d);
    if (e != 0) {
      pthread_mutex_unlock(&d->mu);
      return st_error_set(err, ST_ERR_INTERNAL, "data", "cannot start the prefetch thread: %s", strerror(e));
    }
    d->running = true;
  }
  int idx = (int)(d->cursor % d->nslots);
  slot *s = &d->slots[idx];
  while (!(s->state == SLOT_READY && s->cursor == d->cursor) && !d->worker_done) pthread_cond_wait(&d->cv, &d->mu);
  if (!(s->state == SLOT_READY && s->cursor == d->cursor)) { /* cannot happen: the worker stops only on an error */
    pthread_mutex_unlock(&d->mu);
    return st_error_set(err, ST_ERR_INTERNAL, "data", "the prefetch thread stopped before batch %lld",
                        (long long)d->cursor);
  }
  if (s->result != ST_OK) {
    d->failed = true;
    d->fail_err = s->err;
    pthread_mutex_unlock(&d->mu);
    *err = d->fail_err;
    return err->code;
  }
  s->state = SLOT_HELD;
  d->held = idx;
  d->cursor++;
  pthread_mutex_unlock(&d->mu);
  fill_batch(d, s, out);
  return ST_OK;
}

/* ---------------------------------------------------------------------------------------------
 * synthetic data */

typedef struct synth_sink {
  st_tensor_sink pub;
  st_safetensors_writer *w;
  int n;
} synth_sink;

static st_result synth_put(st_tensor_sink *sink, const char *name, const st_tensor *t, st_error *err) {
  synth_sink *s = sink->self;
  if (!t || t->device.type != ST_DEVICE_CPU)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "synthetic sample tensor '%s' must be a host tensor",
                        name ? name : "?");
  ST_CHECK(st_safetensors_writer_add(s->w, name, t->dtype, t->ndim, t->shape, t->data, true, err));
  s->n++;
  return ST_OK;
}

static st_result synth_put_file(st_tensor_sink *sink, const char *filename, const void *bytes, size_t len,
                                st_error *err) {
  (void)sink, (void)bytes, (void)len;
  return st_error_set(err, ST_ERR_UNSUPPORTED, filename ? filename : "data",
                      "a synthetic sample holds tensors only; put_file(%s) is not supported", filename ? filename : "");
}

/* write bytes to dir/name through a temporary name and a rename */
#define SYNTH_STAMP ".strata-synthetic.json"

/* "sample-000012.safetensors": the only names synthesize writes, and the only ones it removes */
static bool is_synth_sample(const char *name) {
  int digits = 0;
  if (strncmp(name, "sample-", 7) != 0) return false;
  while (name[7 + digits] >= '0' && name[7 + digits] <= '9') digits++;
  return digits >= 6 && strcmp(name + 7 + digits, ".safetensors") == 0;
}

static bool synth_is_done(const char *dir, int64_t n, uint64_t seed, int64_t first) {
  char path[4200];
  snprintf(path, sizeof path, "%s/%s", dir, SYNTH_STAMP);
  json_t *stamp = json_load_file(path, 0, NULL);
  if (!stamp) return false;
  char seed_str[32];
  snprintf(seed_str, sizeof seed_str, "%llu", (unsigned long long)seed);
  json_t *jn = json_object_get(stamp, "n"), *js = json_object_get(stamp, "seed"), *jf = json_object_get(stamp, "first");
  bool same = json_is_integer(jn) && json_integer_value(jn) == n && json_is_string(js) &&
              strcmp(json_string_value(js), seed_str) == 0 && (jf ? json_integer_value(jf) : 0) == first;
  json_decref(stamp);
  snprintf(path, sizeof path, "%s/metadata.jsonl", dir);
  struct stat sb;
  if (!same || stat(path, &sb) != 0) return false;
  for (int64_t i = 0; i < n; i++) {
    snprintf(path, sizeof path, "%s/sample-%06lld.safetensors", dir, (long long)i);
    if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size < 8) return false;
  }
  /* and no more of them: a directory scan would pick up extra samples */
  DIR *dd = opendir(dir);
  if (!dd) return false;
  int64_t count = 0;
  struct dirent *de;
  while ((de = readdir(dd)))
    if (is_synth_sample(de->d_name)) count++;
  closedir(dd);
  return count == n;
}

st_result st_dataset_synthesize(const char *dir, int64_t n, uint64_t seed, int64_t first,
                                st_result (*synth)(void *model_ctx, uint64_t seed, int64_t index,
                                                   st_tensor_sink *sink, st_error *err),
                                void *model_ctx, st_error *err) {
  if (!dir || !synth || n < 1)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "data.synthetic", "synthesize: needs a directory, a synth "
                        "function and at least one sample (n = %lld)", (long long)n);
  ST_CHECK(st_mkdir_p(dir, err));
  if (synth_is_done(dir, n, seed, first)) return ST_OK;
  char path[4200], tmp[4200];
  snprintf(path, sizeof path, "%s/%s", dir, SYNTH_STAMP);
  unlink(path); /* a run interrupted from here on is not mistaken for a complete one */

  /* samples from an earlier, different request would be picked up by a directory scan (only our
   * own names are removed: the folder may be a user's dataset_base_path) */
  DIR *dd = opendir(dir);
  if (!dd) return st_error_set(err, ST_ERR_IO, dir, "cannot read the directory %s: %s", dir, strerror(errno));
  struct dirent *de;
  while ((de = readdir(dd))) {
    if (!is_synth_sample(de->d_name)) continue;
    snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
    unlink(path);
  }
  closedir(dd);

  size_t meta_cap = (size_t)n * 48 + 1, meta_len = 0;
  char *meta = malloc(meta_cap);
  if (!meta) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, dir, "out of memory");
  st_result r = ST_OK;
  for (int64_t i = 0; i < n && r == ST_OK; i++) {
    synth_sink sink = {.pub = {.put = synth_put, .put_file = synth_put_file}};
    sink.pub.self = &sink;
    r = st_safetensors_writer_create(&sink.w, err);
    if (r != ST_OK) break;
    r = synth(model_ctx, seed, first + i, &sink.pub, err);
    if (r == ST_OK && sink.n == 0)
      r = st_error_set(err, ST_ERR_PLUGIN, "data.synthetic", "the model's synth_sample wrote no tensors for sample %lld",
                       (long long)i);
    if (r != ST_OK) {
      st_safetensors_writer_free(sink.w);
      st_error_prefix(err, "synthesizing sample %lld: ", (long long)i);
      break;
    }
    char name[64];
    snprintf(name, sizeof name, "sample-%06lld.safetensors", (long long)i);
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    r = st_safetensors_writer_finish(sink.w, tmp, false, err); /* frees the writer */
    if (r == ST_OK && rename(tmp, path) != 0) {
      r = st_error_set(err, ST_ERR_IO, path, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
      unlink(tmp);
    }
    meta_len += (size_t)snprintf(meta + meta_len, meta_cap - meta_len, "{\"file\": \"%s\"}\n", name);
  }
  if (r == ST_OK) {
    snprintf(path, sizeof path, "%s/metadata.jsonl", dir);
    r = st_write_file_atomic(path, meta, meta_len, err);
  }
  free(meta);
  if (r == ST_OK) {
    char stamp[160];
    int len = snprintf(stamp, sizeof stamp, "{\"n\": %lld, \"seed\": \"%llu\", \"first\": %lld, \"format\": 1}\n",
                       (long long)n, (unsigned long long)seed, (long long)first);
    snprintf(path, sizeof path, "%s/%s", dir, SYNTH_STAMP);
    r = st_write_file_atomic(path, stamp, (size_t)len, err);
  }
  return r;
}
