/* safetensors.c — the safetensors reader (mmap or caller's buffer, every header field validated) and
 * writer (insertion order, 8-byte aligned header, checked writes).
 *
 * Depends on libc, jansson and the strata headers only: scripts/fuzz-smoke compiles this file alone
 * into a libFuzzer target. */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* The Rust library refuses headers over 100 MB; a header that large is corruption, not a model. */
#define ST_HEADER_LIMIT ((uint64_t)100 * 1000 * 1000)

struct st_safetensors {
  char *name;                /* the path or the caller's name, for messages */
  const uint8_t *map;        /* the whole file (mmap) or the caller's buffer */
  size_t map_len;
  bool mapped;
  const uint8_t *data;       /* the data section */
  uint64_t data_len;
  const uint8_t **ptrs;      /* per entry: its bytes in place, or its aligned copy */
  void **copies;             /* per entry: an aligned copy when the file stores it misaligned */
  json_t *header;            /* owns the names and metadata strings the entries point at */
  int n;
  st_st_entry *entries;      /* header order */
  int *by_name;              /* entry indices sorted by name, for find */
  int n_meta;
  const char **meta_keys, **meta_values;
};

/* ---------------------------------------------------------------------------------------------
 * Reader */

/* Safetensors dtype names strata does not compute with; they are valid files, so the error says
 * "unsupported" rather than "malformed". */
static const char *const unsupported_dtypes[] = {"I8", "I16", "U16", "U32", "U64", "F8_E4M3", "F8_E5M2",
                                                  "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "C64", "F8_E4M3FNUZ",
                                                  "F8_E5M2FNUZ"};

static bool parse_st_dtype(const char *s, st_dtype *out) {
  static const struct { const char *name; st_dtype dt; } table[] = {
      {"F32", ST_F32}, {"F64", ST_F64}, {"BF16", ST_BF16}, {"F16", ST_F16},
      {"I32", ST_I32}, {"I64", ST_I64}, {"U8", ST_U8},     {"BOOL", ST_U8},
  };
  for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
    if (strcmp(s, table[i].name) == 0) { *out = table[i].dt; return true; }
  return false;
}

static bool is_unsupported_dtype(const char *s) {
  for (size_t i = 0; i < sizeof unsupported_dtypes / sizeof unsupported_dtypes[0]; i++)
    if (strcmp(s, unsupported_dtypes[i]) == 0) return true;
  return false;
}

/* A JSON integer that is a valid non-negative count or offset. */
static bool json_u64(const json_t *v, uint64_t *out) {
  if (!json_is_integer(v)) return false;
  json_int_t i = json_integer_value(v);
  if (i < 0) return false;
  *out = (uint64_t)i;
  return true;
}

/* jansson reports a duplicate key without naming it; its position is just past the key's closing
 * quote, so the name is the last quoted string before it. Best effort, for the message only. */
static void duplicate_key_name(const char *text, size_t len, size_t pos, char *out, size_t cap) {
  out[0] = '\0';
  if (pos > len) pos = len;
  size_t end = pos;
  while (end > 0 && text[end - 1] != '"') end--;
  if (end == 0) return;
  end--; /* the closing quote */
  size_t begin = end;
  while (begin > 0 && !(text[begin - 1] == '"' && (begin < 2 || text[begin - 2] != '\\'))) begin--;
  if (begin == 0) return;
  size_t n = end - begin;
  if (n >= cap) n = cap - 1;
  memcpy(out, text + begin, n);
  out[n] = '\0';
}

typedef struct span {
  uint64_t begin, end;
  int index;
} span;

static int cmp_span(const void *a, const void *b) {
  const span *x = a, *y = b;
  if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
  if (x->end != y->end) return x->end < y->end ? -1 : 1;
  return x->index - y->index;
}

typedef struct name_sort_item {
  const char *name;
  int index;
} name_sort_item;

static int cmp_name_item(const void *a, const void *b) {
  return strcmp(((const name_sort_item *)a)->name, ((const name_sort_item *)b)->name);
}

static st_result fmt_err(st_error *err, const char *name, const char *fmt_tail, const char *detail) {
  return st_error_set(err, ST_ERR_FORMAT, name, "%s: %s%s", name, fmt_tail, detail ? detail : "");
}

static st_result parse_metadata(st_safetensors *f, json_t *meta, st_error *err) {
  if (!json_is_object(meta))
    return st_error_set(err, ST_ERR_FORMAT, f->name, "%s: \"__metadata__\" must be an object of strings", f->name);
  size_t n = json_object_size(meta);
  f->meta_keys = calloc(n ? n : 1, sizeof *f->meta_keys);
  f->meta_values = calloc(n ? n : 1, sizeof *f->meta_values);
  if (!f->meta_keys || !f->meta_values)
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, f->name, "%s: out of memory reading the metadata", f->name);
  const char *key;
  json_t *val;
  json_object_foreach(meta, key, val) {
    if (!json_is_string(val))
      return st_error_set(err, ST_ERR_FORMAT, f->name, "%s: metadata value \"%s\" must be a string", f->name, key);
    f->meta_keys[f->n_meta] = key;
    f->meta_values[f->n_meta] = json_string_value(val);
    f->n_meta++;
  }
  return ST_OK;
}

static st_result parse_entry(st_safetensors *f, const char *key, json_t *info, st_st_entry *e, st_error *err) {
  const char *fn = f->name;
  if (!json_is_object(info))
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s': expected an object with dtype, shape, data_offsets",
                        fn, key);
  json_t *jdt = json_object_get(info, "dtype"), *jshape = json_object_get(info, "shape"),
         *joff = json_object_get(info, "data_offsets");
  if (!json_is_string(jdt))
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s': \"dtype\" is missing or not a string", fn, key);
  const char *dts = json_string_value(jdt);
  if (!parse_st_dtype(dts, &e->dtype)) {
    if (is_unsupported_dtype(dts))
      return st_error_set(err, ST_ERR_UNSUPPORTED, fn,
                          "%s: tensor '%s' has dtype %s, which strata does not support (supported: F32, F64, BF16, "
                          "F16, I32, I64, U8, BOOL); convert the file first", fn, key, dts);
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s' has unknown dtype \"%.64s\"", fn, key, dts);
  }
  if (!json_is_array(jshape))
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s': \"shape\" is missing or not an array", fn, key);
  size_t nd = json_array_size(jshape);
  if (nd > ST_MAX_DIMS)
    return st_error_set(err, ST_ERR_UNSUPPORTED, fn, "%s: tensor '%s' has %zu dimensions; strata supports up to %d",
                        fn, key, nd, ST_MAX_DIMS);
  e->ndim = (int)nd;
  uint64_t numel = 1;
  bool overflow = false;
  for (size_t d = 0; d < nd; d++) {
    uint64_t dim;
    if (!json_u64(json_array_get(jshape, d), &dim))
      return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s': shape[%zu] is not a non-negative integer", fn,
                          key, d);
    e->shape[d] = (int64_t)dim;
    if (dim != 0 && numel > (uint64_t)INT64_MAX / dim) overflow = true;
    else numel *= dim;
  }
  for (size_t d = 0; d < nd; d++)
    if (e->shape[d] == 0) overflow = false, numel = 0; /* a zero dimension makes any product empty */
  size_t esz = st_dtype_size(e->dtype);
  if (overflow || numel > (uint64_t)INT64_MAX / esz) {
    char sb[256];
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s': shape %s overflows a 64-bit byte count", fn, key,
                        st_shape_str(e->shape, e->ndim, sb, sizeof sb));
  }
  uint64_t nbytes = numel * esz;
  if (!json_is_array(joff) || json_array_size(joff) != 2 || !json_u64(json_array_get(joff, 0), &e->begin) ||
      !json_u64(json_array_get(joff, 1), &e->end))
    return st_error_set(err, ST_ERR_FORMAT, fn,
                        "%s: tensor '%s': \"data_offsets\" must be [begin, end] with non-negative integers", fn, key);
  if (e->end < e->begin)
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s' data_offsets [%llu, %llu) end before they begin", fn,
                        key, (unsigned long long)e->begin, (unsigned long long)e->end);
  if (e->end - e->begin != nbytes) {
    char sb[256];
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s' data_offsets [%llu, %llu) hold %llu bytes but %s %s "
                        "needs %llu", fn, key, (unsigned long long)e->begin, (unsigned long long)e->end,
                        (unsigned long long)(e->end - e->begin), dts, st_shape_str(e->shape, e->ndim, sb, sizeof sb),
                        (unsigned long long)nbytes);
  }
  if (e->end > f->data_len)
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensor '%s' data_offsets [%llu, %llu) run past the end of the "
                        "%llu-byte data section (truncated file?)", fn, key, (unsigned long long)e->begin,
                        (unsigned long long)e->end, (unsigned long long)f->data_len);
  e->name = key;
  return ST_OK;
}

/* The offsets must tile the data section exactly: sorted by begin, each tensor starts where the
 * previous one ended, the first at 0 and the last at the section's end. */
static st_result check_layout(st_safetensors *f, st_error *err) {
  const char *fn = f->name;
  span *s = malloc((size_t)(f->n ? f->n : 1) * sizeof *s);
  if (!s) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, fn, "%s: out of memory checking offsets", fn);
  for (int i = 0; i < f->n; i++) s[i] = (span){f->entries[i].begin, f->entries[i].end, i};
  qsort(s, (size_t)f->n, sizeof *s, cmp_span);
  uint64_t pos = 0;
  int prev = -1;
  st_result r = ST_OK;
  for (int i = 0; i < f->n && r == ST_OK; i++) {
    if (s[i].begin < pos) {
      r = st_error_set(err, ST_ERR_FORMAT, fn, "%s: tensors '%s' and '%s' overlap: [%llu, %llu) and [%llu, %llu)", fn,
                       f->entries[prev].name, f->entries[s[i].index].name, (unsigned long long)f->entries[prev].begin,
                       (unsigned long long)f->entries[prev].end, (unsigned long long)s[i].begin,
                       (unsigned long long)s[i].end);
    } else if (s[i].begin > pos) {
      r = st_error_set(err, ST_ERR_FORMAT, fn, "%s: bytes [%llu, %llu) of the data section belong to no tensor (a "
                       "hole before tensor '%s')", fn, (unsigned long long)pos, (unsigned long long)s[i].begin,
                       f->entries[s[i].index].name);
    } else {
      pos = s[i].end;
      prev = s[i].index;
    }
  }
  free(s);
  if (r == ST_OK && pos != f->data_len)
    r = st_error_set(err, ST_ERR_FORMAT, fn, "%s: the data section has %llu bytes but the tensors cover only %llu "
                     "(trailing bytes belong to no tensor)", fn, (unsigned long long)f->data_len,
                     (unsigned long long)pos);
  return r;
}

static st_result parse(st_safetensors *f, st_error *err) {
  const char *fn = f->name;
  if (f->map_len < 8)
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: truncated: the file has %zu bytes, fewer than the 8-byte header "
                        "length", fn, f->map_len);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | f->map[i];
  if (hlen > ST_HEADER_LIMIT) {
    int log2 = 0;
    while (log2 < 64 && (hlen >> log2) > 1) log2++;
    char pow[32] = "";
    if (hlen == (uint64_t)1 << log2) snprintf(pow, sizeof pow, " (2^%d)", log2);
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: header length %llu%s exceeds the 100 MB limit (not a "
                        "safetensors file, or a corrupt one)", fn, (unsigned long long)hlen, pow);
  }
  if (hlen > f->map_len - 8)
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: truncated: header says %llu bytes but the file has %zu", fn,
                        (unsigned long long)hlen, f->map_len);
  const char *text = (const char *)f->map + 8;
  f->data = f->map + 8 + hlen;
  f->data_len = (uint64_t)(f->map_len - 8 - hlen);
  json_error_t jerr;
  f->header = json_loadb(text, (size_t)hlen, JSON_REJECT_DUPLICATES, &jerr);
  if (!f->header) {
    if (json_error_code(&jerr) == json_error_duplicate_key) {
      char dup[256];
      duplicate_key_name(text, (size_t)hlen, (size_t)jerr.position, dup, sizeof dup);
      return st_error_set(err, ST_ERR_FORMAT, fn, "%s: the header names tensor '%s' twice (duplicate key at byte %d)",
                          fn, dup, jerr.position);
    }
    return st_error_set(err, ST_ERR_FORMAT, fn, "%s: the header is not valid JSON: %s at line %d column %d", fn,
                        jerr.text, jerr.line, jerr.column);
  }
  if (!json_is_object(f->header))
    return fmt_err(err, fn, "the header must be a JSON object", NULL);
  size_t total = json_object_size(f->header);
  f->entries = calloc(total ? total : 1, sizeof *f->entries);
  f->by_name = calloc(total ? total : 1, sizeof *f->by_name);
  if (!f->entries || !f->by_name)
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, fn, "%s: out of memory reading %zu header entries", fn, total);
  const char *key;
  json_t *val;
  json_object_foreach(f->header, key, val) {
    if (strcmp(key, "__metadata__") == 0) {
      ST_CHECK(parse_metadata(f, val, err));
      continue;
    }
    ST_CHECK(parse_entry(f, key, val, &f->entries[f->n], err));
    f->n++;
  }
  ST_CHECK(check_layout(f, err));

  name_sort_item *items = malloc((size_t)(f->n ? f->n : 1) * sizeof *items);
  if (!items) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, fn, "%s: out of memory", fn);
  for (int i = 0; i < f->n; i++) items[i] = (name_sort_item){f->entries[i].name, i};
  qsort(items, (size_t)f->n, sizeof *items, cmp_name_item);
  for (int i = 0; i < f->n; i++) f->by_name[i] = items[i].index;
  free(items);

  /* Tensor views must be aligned to their element size (the kernels load floats directly). Files
   * from the Rust/Python library and from our writer are; a tensor stored misaligned in a hand-made
   * file gets an aligned copy of its own. */
  f->ptrs = calloc((size_t)(f->n ? f->n : 1), sizeof *f->ptrs);
  f->copies = calloc((size_t)(f->n ? f->n : 1), sizeof *f->copies);
  if (!f->ptrs || !f->copies) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, fn, "%s: out of memory", fn);
  for (int i = 0; i < f->n; i++) {
    const st_st_entry *e = &f->entries[i];
    size_t nbytes = (size_t)(e->end - e->begin), esz = st_dtype_size(e->dtype);
    f->ptrs[i] = f->data + e->begin;
    if (nbytes == 0 || (uintptr_t)f->ptrs[i] % esz == 0) continue;
    f->copies[i] = aligned_alloc(64, (nbytes + 63) & ~(size_t)63);
    if (!f->copies[i])
      return st_error_set(err, ST_ERR_OUT_OF_MEMORY, fn, "%s: out of memory copying misaligned tensor '%s' (%zu "
                          "bytes)", fn, e->name, nbytes);
    memcpy(f->copies[i], f->ptrs[i], nbytes);
    f->ptrs[i] = f->copies[i];
  }
  return ST_OK;
}

static st_safetensors *alloc_file(const char *name) {
  st_safetensors *f = calloc(1, sizeof *f);
  if (!f) return NULL;
  f->name = strdup(name ? name : "(memory)");
  if (!f->name) {
    free(f);
    return NULL;
  }
  return f;
}

st_result st_safetensors_open_memory(const void *buf, size_t len, const char *name, st_safetensors **out,
                                     st_error *err) {
  *out = NULL;
  if (!buf && len > 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "st_safetensors_open_memory: NULL buffer of %zu bytes", len);
  st_safetensors *f = alloc_file(name);
  if (!f) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, name, "out of memory opening %s", name ? name : "(memory)");
  f->map = buf;
  f->map_len = len;
  st_result r = parse(f, err);
  if (r != ST_OK) {
    st_safetensors_close(f);
    return r;
  }
  *out = f;
  return ST_OK;
}

st_result st_safetensors_open(const char *path, st_safetensors **out, st_error *err) {
  *out = NULL;
  if (!path) return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "safetensors", "st_safetensors_open: NULL path");
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) return st_error_set(err, ST_ERR_IO, path, "%s: cannot open: %s", path, strerror(errno));
  struct stat sb;
  if (fstat(fd, &sb) != 0) {
    int e = errno;
    close(fd);
    return st_error_set(err, ST_ERR_IO, path, "%s: cannot stat: %s", path, strerror(e));
  }
  if (!S_ISREG(sb.st_mode)) {
    close(fd);
    return st_error_set(err, ST_ERR_IO, path, "%s: not a regular file", path);
  }
  st_safetensors *f = alloc_file(path);
  if (!f) {
    close(fd);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "out of memory opening %s", path);
  }
  f->map_len = (size_t)sb.st_size;
  if (f->map_len > 0) {
    void *m = mmap(NULL, f->map_len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      int e = errno;
      close(fd);
      st_safetensors_close(f);
      return st_error_set(err, ST_ERR_IO, path, "%s: cannot map %zu bytes: %s", path, (size_t)sb.st_size, strerror(e));
    }
    f->map = m;
    f->mapped = true;
  }
  close(fd); /* the mapping keeps the file */
  st_result r = parse(f, err);
  if (r != ST_OK) {
    st_safetensors_close(f);
    return r;
  }
  *out = f;
  return ST_OK;
}

void st_safetensors_close(st_safetensors *f) {
  if (!f) return;
  if (f->mapped) munmap((void *)f->map, f->map_len);
  for (int i = 0; f->copies && i < f->n; i++) free(f->copies[i]);
  free(f->copies);
  free(f->ptrs);
  json_decref(f->header);
  free(f->entries);
  free(f->by_name);
  free(f->meta_keys);
  free(f->meta_values);
  free(f->name);
  free(f);
}

int st_safetensors_count(const st_safetensors *f) { return f ? f->n : 0; }

const st_st_entry *st_safetensors_entry(const st_safetensors *f, int i) {
  return (f && i >= 0 && i < f->n) ? &f->entries[i] : NULL;
}

const st_st_entry *st_safetensors_find(const st_safetensors *f, const char *name) {
  if (!f || !name) return NULL;
  int lo = 0, hi = f->n - 1;
  while (lo <= hi) {
    int mid = lo + (hi - lo) / 2;
    int c = strcmp(name, f->entries[f->by_name[mid]].name);
    if (c == 0) return &f->entries[f->by_name[mid]];
    if (c < 0) hi = mid - 1;
    else lo = mid + 1;
  }
  return NULL;
}

const void *st_safetensors_data(const st_safetensors *f, const st_st_entry *e) {
  if (!f || !e || e < f->entries || e >= f->entries + f->n) return NULL;
  return f->ptrs[e - f->entries];
}

st_tensor st_safetensors_tensor(const st_safetensors *f, const st_st_entry *e) {
  st_device cpu = {ST_DEVICE_CPU, 0};
  if (!f || !e) return st_tensor_make(NULL, ST_F32, cpu, 0, NULL);
  /* The view is read-only: the bytes live in a read-only mapping or the caller's buffer. */
  return st_tensor_make((void *)(uintptr_t)st_safetensors_data(f, e), e->dtype, cpu, e->ndim, e->shape);
}

const char *st_safetensors_metadata(const st_safetensors *f, const char *key) {
  if (!f || !key) return NULL;
  for (int i = 0; i < f->n_meta; i++)
    if (strcmp(f->meta_keys[i], key) == 0) return f->meta_values[i];
  return NULL;
}

const char *st_safetensors_path(const st_safetensors *f) { return f ? f->name : NULL; }

void st_safetensors_populate(const st_safetensors *f) {
  if (!f || !f->mapped || f->map_len == 0) return;
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  (void)madvise((void *)f->map, f->map_len, MADV_WILLNEED); /* start readahead of the whole file */
  volatile uint8_t sink = 0;
  for (size_t off = 0; off < f->map_len; off += page) sink ^= f->map[off];
  (void)sink;
}

/* ---------------------------------------------------------------------------------------------
 * Writer */

typedef struct writer_entry {
  char *name;
  st_dtype dtype;
  int ndim;
  int64_t shape[ST_MAX_DIMS];
  const void *data;
  void *owned;
  size_t nbytes;
  uint64_t offset; /* within the data section, set by layout() */
} writer_entry;

struct st_safetensors_writer {
  writer_entry *entries;
  int n, cap;
  char **meta_keys, **meta_values;
  int n_meta, cap_meta;
};

st_result st_safetensors_writer_create(st_safetensors_writer **out, st_error *err) {
  *out = calloc(1, sizeof **out);
  if (!*out) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "safetensors", "out of memory creating a writer");
  return ST_OK;
}

static bool writer_has(const st_safetensors_writer *w, const char *name) {
  for (int i = 0; i < w->n; i++)
    if (strcmp(w->entries[i].name, name) == 0) return true;
  return false;
}

st_result st_safetensors_writer_add(st_safetensors_writer *w, const char *name, st_dtype dt, int ndim,
                                    const int64_t *shape, const void *data, bool copy, st_error *err) {
  if (!w || !name || !name[0])
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "safetensors", "writer_add: a tensor needs a non-empty name");
  if (strcmp(name, "__metadata__") == 0)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "writer_add: \"__metadata__\" is reserved by the format");
  if ((unsigned)dt >= ST_DTYPE_COUNT)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "writer_add: tensor '%s' has invalid dtype %d", name, (int)dt);
  if (ndim < 0 || ndim > ST_MAX_DIMS || (ndim > 0 && !shape))
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "writer_add: tensor '%s' has %d dimensions (0..%d allowed)",
                        name, ndim, ST_MAX_DIMS);
  uint64_t numel = 1;
  bool zero = false, overflow = false;
  for (int d = 0; d < ndim; d++) {
    if (shape[d] < 0)
      return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "writer_add: tensor '%s' has negative shape[%d] = %lld",
                          name, d, (long long)shape[d]);
    if (shape[d] == 0) zero = true;
    else if (numel > (uint64_t)INT64_MAX / (uint64_t)shape[d]) overflow = true;
    else numel *= (uint64_t)shape[d];
  }
  if (zero) numel = 0, overflow = false;
  if (overflow || numel > (uint64_t)INT64_MAX / st_dtype_size(dt) || numel * st_dtype_size(dt) > SIZE_MAX / 2)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "writer_add: tensor '%s' is too large", name);
  size_t nbytes = (size_t)(numel * st_dtype_size(dt));
  if (nbytes > 0 && !data)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "writer_add: tensor '%s' has NULL data", name);
  if (writer_has(w, name))
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, name, "writer_add: tensor '%s' was added twice", name);
  if (w->n == w->cap) {
    int cap = w->cap ? w->cap * 2 : 16;
    writer_entry *e = realloc(w->entries, (size_t)cap * sizeof *e);
    if (!e) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, name, "out of memory adding tensor '%s'", name);
    w->entries = e;
    w->cap = cap;
  }
  writer_entry *e = &w->entries[w->n];
  memset(e, 0, sizeof *e);
  e->name = strdup(name);
  if (!e->name) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, name, "out of memory adding tensor '%s'", name);
  e->dtype = dt;
  e->ndim = ndim;
  for (int d = 0; d < ndim; d++) e->shape[d] = shape[d];
  e->nbytes = nbytes;
  e->data = data;
  if (copy && nbytes > 0) {
    e->owned = malloc(nbytes);
    if (!e->owned) {
      free(e->name);
      return st_error_set(err, ST_ERR_OUT_OF_MEMORY, name, "out of memory copying tensor '%s' (%zu bytes)", name,
                          nbytes);
    }
    memcpy(e->owned, data, nbytes);
    e->data = e->owned;
  }
  w->n++;
  return ST_OK;
}

st_result st_safetensors_writer_metadata(st_safetensors_writer *w, const char *key, const char *value,
                                         st_error *err) {
  if (!w || !key || !value)
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "safetensors", "writer_metadata: NULL key or value");
  for (int i = 0; i < w->n_meta; i++) {
    if (strcmp(w->meta_keys[i], key) == 0) { /* the last value wins, as in a dict */
      char *v = strdup(value);
      if (!v) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, key, "out of memory");
      free(w->meta_values[i]);
      w->meta_values[i] = v;
      return ST_OK;
    }
  }
  if (w->n_meta == w->cap_meta) {
    int cap = w->cap_meta ? w->cap_meta * 2 : 8;
    char **k = realloc(w->meta_keys, (size_t)cap * sizeof *k);
    if (!k) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, key, "out of memory");
    w->meta_keys = k;
    char **v = realloc(w->meta_values, (size_t)cap * sizeof *v);
    if (!v) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, key, "out of memory");
    w->meta_values = v;
    w->cap_meta = cap;
  }
  char *k = strdup(key), *v = strdup(value);
  if (!k || !v) {
    free(k);
    free(v);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, key, "out of memory");
  }
  w->meta_keys[w->n_meta] = k;
  w->meta_values[w->n_meta] = v;
  w->n_meta++;
  return ST_OK;
}

/* The data section holds the tensors grouped by element size, largest first, and in the order
 * added within a size (the Rust library also sorts by alignment): with the 8-byte aligned header,
 * every tensor is then aligned to its element size in the file and in a mapping of it. Returns
 * the write order. */
static int *layout(st_safetensors_writer *w) {
  int *order = malloc((size_t)(w->n ? w->n : 1) * sizeof *order);
  if (!order) return NULL;
  int k = 0;
  uint64_t off = 0;
  for (size_t esz = 8; esz >= 1; esz /= 2)
    for (int i = 0; i < w->n; i++)
      if (st_dtype_size(w->entries[i].dtype) == esz) {
        order[k++] = i;
        w->entries[i].offset = off;
        off += w->entries[i].nbytes;
      }
  return order;
}

static char *build_header(const st_safetensors_writer *w, size_t *len_out) {
  json_t *root = json_object();
  if (!root) return NULL;
  bool ok = true;
  if (w->n_meta > 0) {
    json_t *meta = json_object();
    ok = meta && json_object_set_new(root, "__metadata__", meta) == 0;
    for (int i = 0; ok && i < w->n_meta; i++)
      ok = json_object_set_new(meta, w->meta_keys[i], json_string(w->meta_values[i])) == 0;
  }
  for (int i = 0; ok && i < w->n; i++) {
    const writer_entry *e = &w->entries[i];
    json_t *shape = json_array();
    for (int d = 0; shape && d < e->ndim; d++) json_array_append_new(shape, json_integer((json_int_t)e->shape[d]));
    json_t *info = json_pack("{s:s, s:o, s:[I, I]}", "dtype", st_dtype_name(e->dtype), "shape", shape,
                             "data_offsets", (json_int_t)e->offset, (json_int_t)(e->offset + e->nbytes));
    ok = info && json_object_set_new(root, e->name, info) == 0;
  }
  char *text = ok ? json_dumps(root, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
  json_decref(root);
  if (!text) return NULL;
  /* pad with spaces so the data section starts 8-byte aligned, as the Rust library does */
  size_t len = strlen(text), padded = (len + 7) & ~(size_t)7;
  char *out = realloc(text, padded + 1);
  if (!out) {
    free(text);
    return NULL;
  }
  memset(out + len, ' ', padded - len);
  out[padded] = '\0';
  *len_out = padded;
  return out;
}

static int write_all(int fd, const void *buf, size_t len) {
  const char *p = buf;
  while (len > 0) {
    size_t chunk = len > ((size_t)1 << 30) ? ((size_t)1 << 30) : len;
    ssize_t n = write(fd, p, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (n == 0) return EIO;
    p += n;
    len -= (size_t)n;
  }
  return 0;
}

st_result st_safetensors_writer_finish(st_safetensors_writer *w, const char *path, bool fsync_file, st_error *err) {
  if (!w || !path) {
    st_safetensors_writer_free(w);
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "safetensors", "writer_finish: NULL writer or path");
  }
  size_t hlen = 0;
  int *order = layout(w);
  char *header = order ? build_header(w, &hlen) : NULL;
  if (!header) {
    free(order);
    st_safetensors_writer_free(w);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, path, "%s: out of memory building the header", path);
  }
  st_result r = ST_OK;
  int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    r = st_error_set(err, ST_ERR_IO, path, "%s: cannot create: %s", path, strerror(errno));
    goto done;
  }
  /* Remove only what finish created: a failed write to a device (/dev/full) must not unlink it. */
  struct stat sb;
  bool regular = fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode);
  uint8_t prefix[8];
  for (int i = 0; i < 8; i++) prefix[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
  int e = write_all(fd, prefix, 8);
  if (!e) e = write_all(fd, header, hlen);
  for (int i = 0; !e && i < w->n; i++) e = write_all(fd, w->entries[order[i]].data, w->entries[order[i]].nbytes);
  if (e) r = st_error_set(err, ST_ERR_IO, path, "%s: write failed: %s", path, strerror(e));
  if (r == ST_OK && fsync_file && fsync(fd) != 0)
    r = st_error_set(err, ST_ERR_IO, path, "%s: fsync failed: %s", path, strerror(errno));
  if (close(fd) != 0 && r == ST_OK)
    r = st_error_set(err, ST_ERR_IO, path, "%s: close failed: %s", path, strerror(errno));
  if (r != ST_OK && regular) unlink(path); /* never leave a partial file that looks like a complete one */
done:
  free(order);
  free(header);
  st_safetensors_writer_free(w);
  return r;
}

void st_safetensors_writer_free(st_safetensors_writer *w) {
  if (!w) return;
  for (int i = 0; i < w->n; i++) {
    free(w->entries[i].name);
    free(w->entries[i].owned);
  }
  free(w->entries);
  for (int i = 0; i < w->n_meta; i++) {
    free(w->meta_keys[i]);
    free(w->meta_values[i]);
  }
  free(w->meta_keys);
  free(w->meta_values);
  free(w);
}
