/* test_safetensors.c — the safetensors reader and writer: round trips of every dtype, the header
 * layout the format specifies (checked by parsing it independently with jansson), every rejection
 * the reader promises with its message, and a file written by the real Python library
 * (tools/reference/safetensors_fixture.py) compared against the same formulas recomputed here. */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "safetensors.h"
#include "st_test.h"

static char tmpdir[256];

static void path_in_tmp(char *out, size_t cap, const char *name) { snprintf(out, cap, "%s/%s", tmpdir, name); }

static uint8_t *read_whole(const char *path, size_t *len) {
  FILE *fp = fopen(path, "rb");
  if (!fp) return NULL;
  fseek(fp, 0, SEEK_END);
  long n = ftell(fp);
  fseek(fp, 0, SEEK_SET);
  uint8_t *buf = malloc((size_t)n + 1);
  if (buf && fread(buf, 1, (size_t)n, fp) != (size_t)n) {
    free(buf);
    buf = NULL;
  }
  fclose(fp);
  *len = (size_t)n;
  return buf;
}

static uint64_t le64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

/* ---- round trip ---------------------------------------------------------------------------- */

#define RT_N 9
static void test_round_trip(void) {
  /* values chosen per dtype; bf16/f16 hold bit patterns written as raw uint16 */
  float f32[6] = {1.5f, -2.25f, 0.0f, 3e-8f, -1e30f, 7.0f};
  double f64[4] = {3.141592653589793, -1e-300, 2.5, 1e300};
  uint16_t bf16[5] = {0x3f80, 0xc000, 0x7f80, 0x0001, 0x4049};
  uint16_t f16[3] = {0x3c00, 0xbc00, 0x7bff};
  int32_t i32[4] = {INT32_MIN, -1, 0, INT32_MAX};
  int64_t i64[2] = {INT64_MIN, INT64_MAX};
  uint8_t u8[7] = {0, 1, 2, 127, 128, 254, 255};
  float scalar = 42.5f;
  struct {
    const char *name;
    st_dtype dt;
    int ndim;
    int64_t shape[3];
    const void *data;
    size_t nbytes;
  } t[RT_N] = {
      {"model.f32", ST_F32, 2, {2, 3}, f32, sizeof f32},
      {"model.f64", ST_F64, 3, {1, 2, 2}, f64, sizeof f64},
      {"model.bf16", ST_BF16, 1, {5}, bf16, sizeof bf16},
      {"model.f16", ST_F16, 2, {3, 1}, f16, sizeof f16},
      {"model.i32", ST_I32, 1, {4}, i32, sizeof i32},
      {"model.i64", ST_I64, 1, {2}, i64, sizeof i64},
      {"model.u8", ST_U8, 1, {7}, u8, sizeof u8},
      {"scalar", ST_F32, 0, {0}, &scalar, sizeof scalar},   /* 0-d */
      {"empty", ST_F32, 3, {4, 0, 2}, NULL, 0},             /* zero-size */
  };
  st_error err_, *err = &err_;
  st_safetensors_writer *w;
  CHECK_OK(st_safetensors_writer_create(&w, err), err);
  CHECK_OK(st_safetensors_writer_metadata(w, "format", "pt", err), err);
  CHECK_OK(st_safetensors_writer_metadata(w, "note", "first", err), err);
  CHECK_OK(st_safetensors_writer_metadata(w, "note", "a \"quoted\", comma'd value", err), err); /* last wins */
  /* half copied, half borrowed */
  for (int i = 0; i < RT_N; i++)
    CHECK_OK(st_safetensors_writer_add(w, t[i].name, t[i].dt, t[i].ndim, t[i].shape, t[i].data, i % 2 == 0, err),
             err);
  f32[0] = 1.5f; /* copies were taken already; borrowed ones must stay valid until finish */
  char path[512];
  path_in_tmp(path, sizeof path, "round.safetensors");
  CHECK_OK(st_safetensors_writer_finish(w, path, true, err), err);

  /* the header as the format specifies it, parsed independently */
  size_t len = 0;
  uint8_t *bytes = read_whole(path, &len);
  CHECK(bytes != NULL && len >= 8);
  if (!bytes) return;
  uint64_t hlen = le64(bytes);
  CHECK(hlen % 8 == 0);           /* data section starts 8-byte aligned */
  CHECK(hlen + 8 <= len);
  size_t expect_data = 0;
  for (int i = 0; i < RT_N; i++) expect_data += t[i].nbytes;
  CHECK(len == 8 + hlen + expect_data);
  json_error_t jerr;
  json_t *root = json_loadb((const char *)bytes + 8, hlen, 0, &jerr);
  CHECK(root != NULL);
  if (root) {
    const char *key;
    json_t *val;
    int k = -1; /* -1: __metadata__ first, then the tensors in insertion order */
    /* data: grouped by element size, largest first, insertion order within a size */
    size_t offs_expect[RT_N], off = 0;
    for (size_t esz = 8; esz >= 1; esz /= 2)
      for (int i = 0; i < RT_N; i++)
        if (st_dtype_size(t[i].dt) == esz) offs_expect[i] = off, off += t[i].nbytes;
    json_object_foreach(root, key, val) {
      if (k == -1) {
        CHECK(strcmp(key, "__metadata__") == 0);
        CHECK(strcmp(json_string_value(json_object_get(val, "format")), "pt") == 0);
      } else if (k < RT_N) {
        CHECK_MSG(strcmp(key, t[k].name) == 0, "header key %d is %s, expected %s", k, key, t[k].name);
        CHECK(strcmp(json_string_value(json_object_get(val, "dtype")), st_dtype_name(t[k].dt)) == 0);
        json_t *offs = json_object_get(val, "data_offsets");
        CHECK((size_t)json_integer_value(json_array_get(offs, 0)) == offs_expect[k]);
        CHECK((size_t)json_integer_value(json_array_get(offs, 1)) == offs_expect[k] + t[k].nbytes);
        CHECK(offs_expect[k] % st_dtype_size(t[k].dt) == 0);
        CHECK((int)json_array_size(json_object_get(val, "shape")) == t[k].ndim);
      }
      k++;
    }
    CHECK(k == RT_N);
    json_decref(root);
  }
  /* padding is spaces */
  CHECK(bytes[8 + hlen - 1] == ' ' || bytes[8 + hlen - 1] == '}');

  /* read back: from the file (mmap) and from memory */
  for (int pass = 0; pass < 2; pass++) {
    st_safetensors *f = NULL;
    if (pass == 0) CHECK_OK(st_safetensors_open(path, &f, err), err);
    else CHECK_OK(st_safetensors_open_memory(bytes, len, "mem.safetensors", &f, err), err);
    if (!f) continue;
    CHECK(st_safetensors_count(f) == RT_N);
    CHECK(strcmp(st_safetensors_metadata(f, "format"), "pt") == 0);
    CHECK(strcmp(st_safetensors_metadata(f, "note"), "a \"quoted\", comma'd value") == 0);
    CHECK(st_safetensors_metadata(f, "absent") == NULL);
    CHECK(strcmp(st_safetensors_path(f), pass == 0 ? path : "mem.safetensors") == 0);
    for (int i = 0; i < RT_N; i++) {
      const st_st_entry *e = st_safetensors_entry(f, i);
      CHECK(e && strcmp(e->name, t[i].name) == 0); /* file order = insertion order */
      CHECK(st_safetensors_find(f, t[i].name) == e);
      if (!e) continue;
      CHECK(e->dtype == t[i].dt && e->ndim == t[i].ndim && e->end - e->begin == t[i].nbytes);
      for (int d = 0; d < t[i].ndim; d++) CHECK(e->shape[d] == t[i].shape[d]);
      st_tensor tv = st_safetensors_tensor(f, e);
      CHECK(tv.dtype == t[i].dt && tv.ndim == t[i].ndim && st_tensor_nbytes(&tv) == t[i].nbytes);
      CHECK(tv.device.type == ST_DEVICE_CPU);
      if (pass == 0 && t[i].nbytes) CHECK((uintptr_t)tv.data % st_dtype_size(tv.dtype) == 0); /* mmap: page aligned */
      if (t[i].nbytes) CHECK(memcmp(st_safetensors_data(f, e), t[i].data, t[i].nbytes) == 0);
    }
    CHECK(st_safetensors_find(f, "nope") == NULL);
    CHECK(st_safetensors_find(f, "__metadata__") == NULL);
    CHECK(st_safetensors_entry(f, RT_N) == NULL && st_safetensors_entry(f, -1) == NULL);
    st_safetensors_close(f);
  }
  free(bytes);

  /* an empty writer makes a valid file with no tensors */
  CHECK_OK(st_safetensors_writer_create(&w, err), err);
  path_in_tmp(path, sizeof path, "empty.safetensors");
  CHECK_OK(st_safetensors_writer_finish(w, path, false, err), err);
  st_safetensors *f = NULL;
  CHECK_OK(st_safetensors_open(path, &f, err), err);
  CHECK(f && st_safetensors_count(f) == 0);
  st_safetensors_close(f);
}

/* ---- rejections ----------------------------------------------------------------------------- */

/* 8-byte length + header + data_len zero bytes; hlen_override replaces the length field */
static uint8_t *make_file(const char *header, size_t data_len, uint64_t hlen_override, size_t *len) {
  size_t h = strlen(header);
  *len = 8 + h + data_len;
  uint8_t *buf = calloc(1, *len + 1);
  uint64_t hl = hlen_override ? hlen_override : h;
  for (int i = 0; i < 8; i++) buf[i] = (uint8_t)(hl >> (8 * i));
  memcpy(buf + 8, header, h);
  return buf;
}

static void expect_reject(const char *header, size_t data_len, st_result code, const char *msg1, const char *msg2,
                          int line) {
  size_t len;
  uint8_t *buf = make_file(header, data_len, 0, &len);
  st_safetensors *f = (st_safetensors *)1;
  st_error err_, *err = &err_;
  st_error_clear(err);
  st_result r = st_safetensors_open_memory(buf, len, "bad.safetensors", &f, err);
  CHECK_MSG(r == code, "line %d: result %d, expected %d (%s)", line, (int)r, (int)code, err->message);
  CHECK_MSG(f == NULL, "line %d: out not cleared", line);
  CHECK_CONTAINS(err->message, "bad.safetensors: ");
  CHECK(strcmp(err->where, "bad.safetensors") == 0);
  if (msg1) CHECK_CONTAINS(err->message, msg1);
  if (msg2) CHECK_CONTAINS(err->message, msg2);
  free(buf);
}
#define REJECT(h, dl, code, m1, m2) expect_reject(h, dl, code, m1, m2, __LINE__)

static void test_rejections(void) {
  st_error err_, *err = &err_;
  st_safetensors *f;
  /* shorter than the length prefix */
  uint8_t tiny[5] = {1, 0, 0, 0, 0};
  CHECK_RESULT(st_safetensors_open_memory(tiny, sizeof tiny, "t.safetensors", &f, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "t.safetensors: truncated: the file has 5 bytes");
  CHECK_RESULT(st_safetensors_open_memory(tiny, 0, "t.safetensors", &f, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "truncated");

  /* header longer than the file */
  size_t len;
  uint8_t *buf = make_file("{}", 90, 1234, &len);
  CHECK(len == 100);
  CHECK_RESULT(st_safetensors_open_memory(buf, len, "model.safetensors", &f, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "model.safetensors: truncated: header says 1234 bytes but the file has 100");
  free(buf);
  /* absurd header length */
  buf = make_file("{}", 0, (uint64_t)1 << 40, &len);
  CHECK_RESULT(st_safetensors_open_memory(buf, len, "model.safetensors", &f, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "header length 1099511627776 (2^40) exceeds the 100 MB limit");
  free(buf);
  buf = make_file("{}", 0, UINT64_MAX, &len); /* no wrap-around in the size arithmetic */
  CHECK_RESULT(st_safetensors_open_memory(buf, len, "model.safetensors", &f, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "exceeds the 100 MB limit");
  free(buf);

  REJECT("{\"a\": ", 0, ST_ERR_FORMAT, "not valid JSON", "line 1");
  REJECT("[1, 2]", 0, ST_ERR_FORMAT, "must be a JSON object", NULL);
  REJECT("{\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"w\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}",
         8, ST_ERR_FORMAT, "names tensor 'w' twice", NULL);
  REJECT("{\"a\":{\"dtype\":\"F99\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_FORMAT,
         "tensor 'a' has unknown dtype \"F99\"", NULL);
  const char *unsupported[] = {"F8_E4M3", "I8", "I16", "U64"};
  for (int i = 0; i < 4; i++) {
    char h[256], m[128];
    snprintf(h, sizeof h, "{\"q\":{\"dtype\":\"%s\",\"shape\":[1],\"data_offsets\":[0,1]}}", unsupported[i]);
    snprintf(m, sizeof m, "tensor 'q' has dtype %s, which strata does not support", unsupported[i]);
    REJECT(h, 1, ST_ERR_UNSUPPORTED, m, NULL);
  }
  REJECT("{\"a.weight\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", 12, ST_ERR_FORMAT,
         "tensor 'a.weight' data_offsets [0, 12) hold 12 bytes but F32 [2, 2] needs 16", NULL);
  REJECT("{\"a\":{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[0,16]}}", 10, ST_ERR_FORMAT,
         "tensor 'a' data_offsets [0, 16) run past the end of the 10-byte data section", NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
         12, ST_ERR_FORMAT, "tensors 'a' and 'b' overlap", NULL);
  REJECT("{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
         12, ST_ERR_FORMAT, "tensors 'a' and 'b' overlap", NULL); /* header order does not matter */
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
         12, ST_ERR_FORMAT, "bytes [4, 8) of the data section belong to no tensor", "before tensor 'b'");
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8, ST_ERR_FORMAT,
         "bytes [0, 4) of the data section belong to no tensor", NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 9, ST_ERR_FORMAT,
         "the data section has 9 bytes but the tensors cover only 4", NULL);
  REJECT("{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", 4, ST_ERR_FORMAT,
         "tensor 'a' data_offsets [4, 0) end before they begin", NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904,4],\"data_offsets\":[0,4]}}", 4, ST_ERR_FORMAT,
         "tensor 'a': shape [4611686018427387904, 4] overflows", NULL);
  REJECT("{\"a\":{\"dtype\":\"F64\",\"shape\":[1152921504606846976],\"data_offsets\":[0,8]}}", 8, ST_ERR_FORMAT,
         "overflows a 64-bit byte count", NULL); /* 2^60 elements x 8 bytes */
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}", 4, ST_ERR_FORMAT,
         "tensor 'a': shape[0] is not a non-negative integer", NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, ST_ERR_FORMAT, "shape[0]", NULL);
  REJECT("{\"a\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, ST_ERR_FORMAT, "tensor 'a': \"dtype\" is missing", NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,4]}}", 4, ST_ERR_FORMAT, "tensor 'a': \"shape\" is missing",
         NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0]}}", 4, ST_ERR_FORMAT,
         "tensor 'a': \"data_offsets\" must be [begin, end]", NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[-4,0]}}", 4, ST_ERR_FORMAT, "data_offsets", NULL);
  REJECT("{\"a\":[1,2]}", 0, ST_ERR_FORMAT, "tensor 'a': expected an object", NULL);
  REJECT("{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1, ST_ERR_UNSUPPORTED,
         "tensor 'a' has 9 dimensions", NULL);
  REJECT("{\"__metadata__\":{\"k\":1}}", 0, ST_ERR_FORMAT, "metadata value \"k\" must be a string", NULL);
  REJECT("{\"__metadata__\":[\"k\"]}", 0, ST_ERR_FORMAT, "\"__metadata__\" must be an object", NULL);
  REJECT("{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}} x", 4, ST_ERR_FORMAT, "not valid JSON",
         NULL);

  /* legal corner cases stay legal: two zero-size tensors at the same offset, a 0-d scalar,
   * unknown keys in a tensor object (the Rust library ignores them), BOOL read as U8 */
  buf = make_file("{\"z1\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]},"
                  "\"s\":{\"dtype\":\"F32\",\"shape\":[],\"data_offsets\":[0,4],\"extra\":true},"
                  "\"z2\":{\"dtype\":\"I64\",\"shape\":[3,0],\"data_offsets\":[4,4]},"
                  "\"m\":{\"dtype\":\"BOOL\",\"shape\":[2],\"data_offsets\":[4,6]}}       ",
                  6, 0, &len);
  f = NULL;
  CHECK_OK(st_safetensors_open_memory(buf, len, "ok.safetensors", &f, err), err);
  CHECK(f && st_safetensors_count(f) == 4);
  if (f) {
    CHECK(st_safetensors_find(f, "s")->ndim == 0);
    CHECK(st_safetensors_find(f, "m")->dtype == ST_U8);
    st_tensor z2 = st_safetensors_tensor(f, st_safetensors_find(f, "z2"));
    CHECK(st_tensor_numel(&z2) == 0 && st_tensor_nbytes(&z2) == 0);
  }
  st_safetensors_close(f);
  free(buf);

  /* files on disk: missing, a directory, empty */
  char path[512];
  path_in_tmp(path, sizeof path, "does-not-exist.safetensors");
  CHECK_RESULT(st_safetensors_open(path, &f, err), ST_ERR_IO, err);
  CHECK_CONTAINS(err->message, path);
  CHECK_CONTAINS(err->message, "No such file or directory");
  CHECK_RESULT(st_safetensors_open(tmpdir, &f, err), ST_ERR_IO, err);
  CHECK_CONTAINS(err->message, "not a regular file");
  path_in_tmp(path, sizeof path, "zero.safetensors");
  FILE *fp = fopen(path, "wb");
  if (fp) fclose(fp);
  CHECK_RESULT(st_safetensors_open(path, &f, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "zero.safetensors: truncated: the file has 0 bytes");
  /* a file cut short inside its data section */
  path_in_tmp(path, sizeof path, "cut.safetensors");
  buf = make_file("{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, 0, &len);
  fp = fopen(path, "wb");
  if (fp) {
    fwrite(buf, 1, len - 5, fp);
    fclose(fp);
  }
  free(buf);
  CHECK_RESULT(st_safetensors_open(path, &f, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "cut.safetensors: tensor 'a' data_offsets [0, 16) run past the end of the 11-byte");
}

/* A header whose length is not a multiple of 8 leaves tensors misaligned in place; views must
 * still be aligned (the reader copies) and hold the right values. */
static void test_misaligned(void) {
  float vals[3] = {1.25f, -3.5f, 1e-3f};
  size_t len;
  uint8_t *buf = make_file("{\"v\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,12]}}", 12, 0, &len);
  size_t hlen = len - 8 - 12;
  CHECK(hlen % 4 != 0); /* the test only means something if the data is misaligned */
  memcpy(buf + 8 + hlen, vals, sizeof vals);
  st_safetensors *f = NULL;
  st_error err_, *err = &err_;
  CHECK_OK(st_safetensors_open_memory(buf, len, "odd.safetensors", &f, err), err);
  if (f) {
    const st_st_entry *e = st_safetensors_find(f, "v");
    const float *p = st_safetensors_data(f, e);
    CHECK((uintptr_t)p % 4 == 0);
    CHECK(p[0] == vals[0] && p[1] == vals[1] && p[2] == vals[2]);
  }
  st_safetensors_close(f);
  free(buf);
}

static void test_writer_errors(void) {
  st_error err_, *err = &err_;
  st_safetensors_writer *w;
  float x[4] = {0};
  CHECK_OK(st_safetensors_writer_create(&w, err), err);
  CHECK_OK(st_safetensors_writer_add(w, "x", ST_F32, 1, (int64_t[]){4}, x, false, err), err);
  CHECK_RESULT(st_safetensors_writer_add(w, "x", ST_F32, 1, (int64_t[]){4}, x, false, err), ST_ERR_INVALID_ARGUMENT,
               err);
  CHECK_CONTAINS(err->message, "tensor 'x' was added twice");
  CHECK_RESULT(st_safetensors_writer_add(w, "__metadata__", ST_F32, 1, (int64_t[]){4}, x, false, err),
               ST_ERR_INVALID_ARGUMENT, err);
  CHECK_RESULT(st_safetensors_writer_add(w, "neg", ST_F32, 1, (int64_t[]){-1}, x, false, err),
               ST_ERR_INVALID_ARGUMENT, err);
  CHECK_CONTAINS(err->message, "negative shape[0]");
  CHECK_RESULT(st_safetensors_writer_add(w, "null", ST_F32, 1, (int64_t[]){4}, NULL, false, err),
               ST_ERR_INVALID_ARGUMENT, err);
  CHECK_RESULT(st_safetensors_writer_add(w, "big", ST_F32, 2, (int64_t[]){INT64_MAX, 2}, x, false, err),
               ST_ERR_INVALID_ARGUMENT, err);
  char path[512];
  path_in_tmp(path, sizeof path, "no-such-dir/out.safetensors");
  CHECK_RESULT(st_safetensors_writer_finish(w, path, true, err), ST_ERR_IO, err); /* frees w */
  CHECK_CONTAINS(err->message, path);
  CHECK_CONTAINS(err->message, "No such file or directory");

  /* a full disk: every write is checked; the device itself is left alone */
  if (access("/dev/full", W_OK) == 0) {
    static uint8_t big[1 << 16];
    CHECK_OK(st_safetensors_writer_create(&w, err), err);
    CHECK_OK(st_safetensors_writer_add(w, "big", ST_U8, 1, (int64_t[]){sizeof big}, big, false, err), err);
    CHECK_RESULT(st_safetensors_writer_finish(w, "/dev/full", false, err), ST_ERR_IO, err);
    CHECK_CONTAINS(err->message, "/dev/full: write failed: No space left on device");
    CHECK(access("/dev/full", F_OK) == 0);
  }
  /* an abandoned writer is freed with writer_free (ASan checks the copies are released) */
  CHECK_OK(st_safetensors_writer_create(&w, err), err);
  CHECK_OK(st_safetensors_writer_add(w, "x", ST_F32, 1, (int64_t[]){4}, x, true, err), err);
  CHECK_OK(st_safetensors_writer_metadata(w, "k", "v", err), err);
  st_safetensors_writer_free(w);
}

/* ---- a file written by the Python safetensors library ------------------------------------ */

static void test_python_fixture(void) {
  const char *root = getenv("ST_SOURCE_ROOT");
  char path[1024];
  snprintf(path, sizeof path, "%s/tests/reference/data/python_written.safetensors", root ? root : ".");
  st_safetensors *f = NULL;
  st_error err_, *err = &err_;
  CHECK_OK(st_safetensors_open(path, &f, err), err);
  if (!f) return;
  CHECK(st_safetensors_count(f) == 8);
  CHECK(strcmp(st_safetensors_metadata(f, "format"), "np") == 0);
  CHECK(strcmp(st_safetensors_metadata(f, "writer"), "safetensors_fixture.py") == 0);
  const st_st_entry *e;
  /* the formulas of tools/reference/safetensors_fixture.py; every value is exact in its dtype */
  e = st_safetensors_find(f, "f32.arange");
  CHECK(e && e->dtype == ST_F32 && e->ndim == 2 && e->shape[0] == 2 && e->shape[1] == 3);
  if (e)
    for (int i = 0; i < 6; i++) CHECK(((const float *)st_safetensors_data(f, e))[i] == (float)(i * 0.5 - 1.0));
  e = st_safetensors_find(f, "f64.scalar");
  CHECK(e && e->dtype == ST_F64 && e->ndim == 0);
  if (e) CHECK(*(const double *)st_safetensors_data(f, e) == 3.141592653589793);
  e = st_safetensors_find(f, "f16.ramp");
  CHECK(e && e->dtype == ST_F16 && e->ndim == 1 && e->shape[0] == 4);
  if (e)
    for (int i = 0; i < 4; i++)
      CHECK(st_f16_to_f32(((const uint16_t *)st_safetensors_data(f, e))[i]) == (float)((i - 1.5) * 0.25));
  e = st_safetensors_find(f, "i32.square");
  CHECK(e && e->dtype == ST_I32 && e->ndim == 2 && e->shape[0] == 3 && e->shape[1] == 2);
  if (e)
    for (int i = 0; i < 6; i++) CHECK(((const int32_t *)st_safetensors_data(f, e))[i] == i * i - 7);
  e = st_safetensors_find(f, "i64.big");
  CHECK(e && e->dtype == ST_I64 && e->shape[0] == 3);
  if (e)
    for (int i = 0; i < 3; i++)
      CHECK(((const int64_t *)st_safetensors_data(f, e))[i] == (int64_t)i * ((int64_t)1 << 33) - 5);
  e = st_safetensors_find(f, "u8.mod");
  CHECK(e && e->dtype == ST_U8 && e->shape[0] == 5);
  if (e)
    for (int i = 0; i < 5; i++) CHECK(((const uint8_t *)st_safetensors_data(f, e))[i] == (i * 37) % 256);
  e = st_safetensors_find(f, "bool.even");
  CHECK(e && e->dtype == ST_U8 && e->shape[0] == 4); /* BOOL reads as U8 */
  if (e)
    for (int i = 0; i < 4; i++) CHECK(((const uint8_t *)st_safetensors_data(f, e))[i] == (i % 2 == 0));
  e = st_safetensors_find(f, "f32.empty");
  CHECK(e && e->ndim == 2 && e->shape[0] == 0 && e->shape[1] == 3 && e->begin == e->end);
  st_safetensors_close(f);
}

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "%s/st-safetensors-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 1;
  }
  test_round_trip();
  test_rejections();
  test_misaligned();
  test_writer_errors();
  test_python_fixture();
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
  return st_test_finish("safetensors");
}
