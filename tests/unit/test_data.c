/* test_data.c — the cached-sample dataset: metadata formats, repeat, shuffle, sharding, seek/resume,
 * prefetch, bad samples, and the synthetic-data writer.
 *
 * Every sample file holds "idx" (I64 scalar: its number) and "x" (F32 [2] = {idx, -idx/2}), so a
 * batch tells which files it came from and that their bytes arrived intact. Expected orders are
 * derived from the definitions in data.h (metadata order, repeat, every world-th batch), never
 * from the code under test. */
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "data.h"
#include "safetensors.h"
#include "st_test.h"

static char tmpdir[256];

static void write_sample(const char *path, int64_t idx) {
  st_error err;
  st_safetensors_writer *w;
  float x[2] = {(float)idx, (float)-idx / 2};
  if (st_safetensors_writer_create(&w, &err) != ST_OK) abort();
  st_safetensors_writer_add(w, "idx", ST_I64, 0, NULL, &idx, true, &err);
  st_safetensors_writer_add(w, "x", ST_F32, 1, (int64_t[]){2}, x, true, &err);
  if (st_safetensors_writer_finish(w, path, false, &err) != ST_OK) {
    fprintf(stderr, "%s\n", err.message);
    abort();
  }
}

/* dir/<name>/s00.safetensors ... s<n-1>.safetensors, sample i holding idx = i */
static void make_dir(char *out, size_t cap, const char *name, int n) {
  snprintf(out, cap, "%s/%s", tmpdir, name);
  mkdir(out, 0755);
  for (int i = 0; i < n; i++) {
    char p[600];
    snprintf(p, sizeof p, "%s/s%02d.safetensors", out, i);
    write_sample(p, i);
  }
}

static void write_text(const char *path, const char *text) {
  FILE *fp = fopen(path, "wb");
  if (!fp) abort();
  fputs(text, fp);
  fclose(fp);
}

/* idx of every sample of `batches` batches, checking each sample's bytes; -1 marks a failure */
static int take(st_dataset *d, int batches, int64_t *out) {
  st_error err_, *err = &err_;
  int k = 0;
  for (int b = 0; b < batches; b++) {
    st_batch batch;
    st_result r = st_dataset_next(d, &batch, err);
    CHECK_OK(r, err);
    if (r != ST_OK) return -1;
    for (int s = 0; s < batch.n_samples; s++) {
      const st_sample *sm = &batch.samples[s];
      CHECK(sm->n_tensors == 2 && strcmp(sm->names[0], "idx") == 0 && strcmp(sm->names[1], "x") == 0);
      CHECK(sm->tensors[0].dtype == ST_I64 && sm->tensors[0].ndim == 0);
      int64_t idx = *(const int64_t *)sm->tensors[0].data;
      const float *x = sm->tensors[1].data;
      CHECK(x[0] == (float)idx && x[1] == (float)-idx / 2);
      CHECK(sm->id && strstr(sm->id, ".safetensors"));
      out[k++] = idx;
    }
  }
  return k;
}

static st_dataset *open_ds(const char *base, const char *meta, int64_t bs, int64_t repeat, bool shuffle,
                           uint64_t seed, int prefetch, int rank, int world) {
  st_dataset_options o = {.base_path = base, .metadata_path = meta, .repeat = repeat, .shuffle = shuffle,
                          .seed = seed, .batch_size = bs, .prefetch = prefetch, .rank = rank, .world_size = world};
  st_dataset *d = NULL;
  st_error err_, *err = &err_;
  CHECK_OK(st_dataset_open(&o, &d, err), err);
  return d;
}

static bool same(const int64_t *a, const int64_t *b, int n) {
  for (int i = 0; i < n; i++)
    if (a[i] != b[i]) return false;
  return true;
}

static bool is_multiset(const int64_t *v, int len, int n, int times) { /* each of 0..n-1 exactly `times` times */
  int count[256] = {0};
  for (int i = 0; i < len; i++) {
    if (v[i] < 0 || v[i] >= n) return false;
    count[v[i]]++;
  }
  for (int i = 0; i < n; i++)
    if (count[i] != times) return false;
  return len == n * times;
}

static void test_scan_and_repeat(void) {
  char dir[512];
  make_dir(dir, sizeof dir, "scan", 5);
  char p[600];
  snprintf(p, sizeof p, "%s/notes.txt", dir);
  write_text(p, "not a sample");
  snprintf(p, sizeof p, "%s/.hidden.safetensors", dir);
  write_text(p, "garbage");
  int64_t v[64];
  for (int prefetch = 0; prefetch <= 2; prefetch += 2) {
    st_dataset *d = open_ds(dir, NULL, 1, 1, false, 0, prefetch, 0, 1);
    if (!d) return;
    CHECK(st_dataset_size(d) == 5);
    CHECK(st_dataset_batches_per_epoch(d) == 5);
    CHECK(take(d, 10, v) == 10);
    for (int i = 0; i < 10; i++) CHECK(v[i] == i % 5); /* sorted names, then the next epoch */
    CHECK(st_dataset_cursor(d) == 10);
    st_dataset_close(d);
  }
  /* repeat 2, batch 2: 10 positions, 5 batches of [p, p+1] over 0 1 2 3 4 0 1 2 3 4 */
  st_dataset *d = open_ds(dir, NULL, 2, 2, false, 0, 0, 0, 1);
  CHECK(st_dataset_batches_per_epoch(d) == 5);
  CHECK(take(d, 5, v) == 10);
  for (int i = 0; i < 10; i++) CHECK(v[i] == i % 5);
  st_dataset_close(d);
  /* batch 3: 3 batches per epoch, the tail dropped: epoch 2 starts at sample 0 again */
  d = open_ds(dir, NULL, 3, 2, false, 0, 1, 0, 1);
  CHECK(st_dataset_batches_per_epoch(d) == 3);
  CHECK(take(d, 4, v) == 12);
  for (int i = 0; i < 9; i++) CHECK(v[i] == i % 5);
  CHECK(v[9] == 0 && v[10] == 1 && v[11] == 2);
  st_dataset_close(d);
  /* fewer samples than a batch: opens, and next() says so */
  d = open_ds(dir, NULL, 8, 1, false, 0, 0, 0, 1);
  CHECK(st_dataset_batches_per_epoch(d) == 0);
  st_batch b;
  st_error err_, *err = &err_;
  CHECK_RESULT(st_dataset_next(d, &b, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "fewer than one micro-batch of 8");
  st_dataset_close(d);
}

static void test_metadata(void) {
  char dir[512], meta[600], p[700];
  make_dir(dir, sizeof dir, "meta", 4);
  int64_t v[16];
  st_error err_, *err = &err_;
  st_dataset *d;
  st_dataset_options o = {.base_path = dir, .batch_size = 1, .world_size = 1};

  /* CSV: quoted fields with commas, doubled quotes and a newline; CRLF; a BOM; no/with suffix,
   * absolute path; the `file` column wins over `image` */
  snprintf(meta, sizeof meta, "%s/metadata.csv", dir);
  FILE *fp = fopen(meta, "wb");
  fprintf(fp, "\xef\xbb\xbf" "prompt,image,file\r\n"
              "\"a cat, sitting\",img3.jpg,s03\r\n"
              "\"she said \"\"hi\"\"\",img1.jpg,s01.safetensors\r\n"
              "\"two\nlines\",x.jpg,%s/s02.safetensors\r\n"
              "\r\n"
              "plain,y.jpg,s00\r\n", dir);
  fclose(fp);
  d = open_ds(dir, meta, 1, 1, false, 0, 0, 0, 1);
  if (d) {
    CHECK(st_dataset_size(d) == 4);
    CHECK(take(d, 4, v) == 4);
    CHECK(v[0] == 3 && v[1] == 1 && v[2] == 2 && v[3] == 0); /* metadata order */
    st_dataset_close(d);
  }
  /* `image` when there is no `file`; base_path defaults to the metadata's folder */
  snprintf(meta, sizeof meta, "%s/images.csv", dir);
  write_text(meta, "image,prompt\ns02,\"x, y\"\ns00,z\n");
  d = open_ds(NULL, meta, 1, 1, false, 0, 0, 0, 1);
  if (d) {
    CHECK(take(d, 2, v) == 2);
    CHECK(v[0] == 2 && v[1] == 0);
    st_dataset_close(d);
  }
  /* CSV errors name the file and the line */
  snprintf(meta, sizeof meta, "%s/bad1.csv", dir);
  write_text(meta, "prompt,caption\na,b\n");
  o.metadata_path = meta;
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "bad1.csv: the header row has no `file` or `image` column (found \"prompt\", \"caption\")");
  snprintf(meta, sizeof meta, "%s/bad2.csv", dir);
  write_text(meta, "file,prompt\ns00,ok\ns01,a, b\n");
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "bad2.csv line 3: 3 field(s) but the header has 2");
  snprintf(meta, sizeof meta, "%s/bad3.csv", dir);
  write_text(meta, "file,prompt\ns00,\"never closed\ns01,x\n");
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "bad3.csv line 2: a quoted field is never closed");
  snprintf(meta, sizeof meta, "%s/empty.csv", dir);
  write_text(meta, "file\n");
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "empty.csv names no samples");
  snprintf(meta, sizeof meta, "%s/missing.csv", dir);
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_IO, err);
  CHECK_CONTAINS(err->message, "missing.csv: cannot open");

  /* JSON: an array of objects; `image` accepted */
  snprintf(meta, sizeof meta, "%s/metadata.json", dir);
  write_text(meta, "[{\"image\": \"s01\", \"prompt\": \"p\"}, {\"file\": \"s03.safetensors\"}, {\"image\": \"s00\"}]");
  d = open_ds(dir, meta, 1, 1, false, 0, 0, 0, 1);
  if (d) {
    CHECK(take(d, 3, v) == 3);
    CHECK(v[0] == 1 && v[1] == 3 && v[2] == 0);
    st_dataset_close(d);
  }
  write_text(meta, "[{\"image\": \"s01\"}, {\"prompt\": \"no file\"}]");
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "metadata.json entry 2: needs a non-empty string \"file\"");
  write_text(meta, "{\"file\": \"s01\"}");
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "expected a JSON array of objects");
  write_text(meta, "[{\"file\": \"s01\"},");
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "metadata.json:1:");

  /* JSONL: one object per line, blank lines skipped */
  snprintf(meta, sizeof meta, "%s/metadata.jsonl", dir);
  write_text(meta, "{\"file\": \"s02\"}\n\n{\"image\": \"s03\", \"prompt\": \"a, b\"}\r\n{\"file\": \"s00\"}");
  d = open_ds(dir, meta, 1, 1, false, 0, 0, 0, 1);
  if (d) {
    CHECK(take(d, 3, v) == 3);
    CHECK(v[0] == 2 && v[1] == 3 && v[2] == 0);
    st_dataset_close(d);
  }
  write_text(meta, "{\"file\": \"s02\"}\n{\"file\": s03}\n");
  CHECK_RESULT(st_dataset_open(&o, &d, err), ST_ERR_FORMAT, err);
  CHECK_CONTAINS(err->message, "metadata.jsonl line 2: invalid JSON");

  /* no samples / no folder */
  snprintf(p, sizeof p, "%s/empty-folder", tmpdir);
  mkdir(p, 0755);
  st_dataset_options o2 = {.base_path = p, .batch_size = 1, .world_size = 1};
  CHECK_RESULT(st_dataset_open(&o2, &d, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "holds no *.safetensors samples");
  snprintf(p, sizeof p, "%s/no-such-folder", tmpdir);
  CHECK_RESULT(st_dataset_open(&o2, &d, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "no-such-folder: cannot open the directory");
  o2.batch_size = 0;
  CHECK_RESULT(st_dataset_open(&o2, &d, err), ST_ERR_INVALID_ARGUMENT, err);
  o2.batch_size = 1;
  o2.rank = 2;
  o2.world_size = 2;
  CHECK_RESULT(st_dataset_open(&o2, &d, err), ST_ERR_INVALID_ARGUMENT, err);
}

static void test_shuffle_shard_seek(void) {
  char dir[512];
  make_dir(dir, sizeof dir, "shuffle", 12);
  int64_t a[512], b[512], c[512];
  /* determinism and permutation: each epoch is a permutation; epochs differ; seeds differ */
  st_dataset *d = open_ds(dir, NULL, 1, 1, true, 7, 0, 0, 1);
  if (!d) return;
  CHECK(take(d, 36, a) == 36);
  st_dataset_close(d);
  for (int e = 0; e < 3; e++) CHECK(is_multiset(a + 12 * e, 12, 12, 1));
  CHECK(!same(a, a + 12, 12) && !same(a + 12, a + 24, 12));
  int64_t identity[12];
  for (int i = 0; i < 12; i++) identity[i] = i;
  CHECK(!same(a, identity, 12));
  d = open_ds(dir, NULL, 1, 1, true, 7, 3, 0, 1); /* same seed, prefetching: the same sequence */
  CHECK(take(d, 36, b) == 36);
  st_dataset_close(d);
  CHECK(same(a, b, 36));
  d = open_ds(dir, NULL, 1, 1, true, 8, 0, 0, 1);
  CHECK(take(d, 12, b) == 12);
  st_dataset_close(d);
  CHECK(!same(a, b, 12));
  /* with repeat 3 the shuffle covers the repeated list: each file 3 times per epoch */
  d = open_ds(dir, NULL, 4, 3, true, 7, 1, 0, 1);
  CHECK(st_dataset_batches_per_epoch(d) == 9);
  CHECK(take(d, 9, b) == 36);
  st_dataset_close(d);
  CHECK(is_multiset(b, 36, 12, 3));

  /* sharding: 2 ranks, batch 2, repeat 2 -> 12 global batches, 6 per rank; rank r's batch j is
   * global batch 2j + r of the single-rank order, so the ranks partition every epoch */
  d = open_ds(dir, NULL, 2, 2, true, 11, 0, 0, 1);
  CHECK(st_dataset_batches_per_epoch(d) == 12);
  CHECK(take(d, 24, a) == 48); /* two epochs of the global order */
  st_dataset_close(d);
  for (int rank = 0; rank < 2; rank++) {
    d = open_ds(dir, NULL, 2, 2, true, 11, rank, rank, 2); /* prefetch on for rank 1 */
    CHECK(st_dataset_batches_per_epoch(d) == 6);
    CHECK(take(d, 12, b) == 24);
    st_dataset_close(d);
    for (int e = 0; e < 2; e++)
      for (int j = 0; j < 6; j++)
        for (int s = 0; s < 2; s++) {
          int64_t global = e * 12 + 2 * j + rank;
          CHECK_MSG(b[(e * 6 + j) * 2 + s] == a[global * 2 + s], "rank %d epoch %d batch %d", rank, e, j);
        }
  }
  /* 4 ranks over 6 global batches: one each, batches 4 and 5 dropped so every rank steps alike;
   * rank 3 takes global batch 3 (samples 6, 7) in every epoch */
  d = open_ds(dir, NULL, 2, 1, false, 0, 0, 3, 4);
  CHECK(st_dataset_batches_per_epoch(d) == 1);
  CHECK(take(d, 2, b) == 4);
  CHECK(b[0] == 6 && b[1] == 7 && b[2] == 6 && b[3] == 7);
  st_dataset_close(d);

  /* seek / resume: a fresh dataset sought to k continues the sequence exactly, across epochs,
   * with and without prefetch; seeking back replays */
  d = open_ds(dir, NULL, 3, 1, true, 5, 0, 0, 1); /* 4 batches per epoch */
  CHECK(take(d, 14, a) == 42);
  st_dataset_close(d);
  for (int prefetch = 0; prefetch <= 2; prefetch++) {
    st_error err_, *err = &err_;
    d = open_ds(dir, NULL, 3, 1, true, 5, prefetch, 0, 1);
    CHECK_OK(st_dataset_seek(d, 6, err), err);
    CHECK(st_dataset_cursor(d) == 6);
    CHECK(take(d, 5, c) == 15);
    CHECK(same(c, a + 18, 15));
    CHECK(st_dataset_cursor(d) == 11);
    CHECK_OK(st_dataset_seek(d, 1, err), err);
    CHECK(take(d, 2, c) == 6);
    CHECK(same(c, a + 3, 6));
    CHECK_OK(st_dataset_seek(d, 3, err), err); /* == cursor: keeps the prefetched batches */
    CHECK(take(d, 1, c) == 3);
    CHECK(same(c, a + 9, 3));
    CHECK_RESULT(st_dataset_seek(d, -1, err), ST_ERR_INVALID_ARGUMENT, err);
    st_dataset_close(d);
  }
}

static void test_bad_samples(void) {
  char dir[512], meta[600], p[700];
  make_dir(dir, sizeof dir, "bad", 4);
  snprintf(p, sizeof p, "%s/corrupt.safetensors", dir);
  static const char corrupt[] = "\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken json}";
  FILE *fp = fopen(p, "wb");
  if (fp) {
    fwrite(corrupt, 1, sizeof corrupt - 1, fp);
    fclose(fp);
  }
  snprintf(meta, sizeof meta, "%s/metadata.csv", dir);
  /* batch 0 = s00, batch 1 = s01, batch 2 = missing (line 4), batch 3 = corrupt (line 5) */
  write_text(meta, "file\ns00\ns01\ngone\ncorrupt\ns02\n");
  for (int prefetch = 0; prefetch <= 3; prefetch += 3) {
    st_error err_, *err = &err_;
    int64_t v[8];
    st_dataset *d = open_ds(dir, meta, 1, 1, false, 0, prefetch, 0, 1);
    if (!d) return;
    CHECK(take(d, 2, v) == 2);
    st_batch b;
    for (int again = 0; again < 2; again++) { /* the error repeats; it neither hangs nor advances */
      CHECK_RESULT(st_dataset_next(d, &b, err), ST_ERR_IO, err);
      CHECK_CONTAINS(err->message, "metadata.csv line 4");
      CHECK_CONTAINS(err->message, "/gone.safetensors: cannot open: No such file or directory");
      CHECK_CONTAINS(err->where, "gone.safetensors");
      CHECK(st_dataset_cursor(d) == 2);
    }
    /* skipping the bad sample by seeking past it, the corrupt one is next */
    CHECK_OK(st_dataset_seek(d, 3, err), err);
    CHECK_RESULT(st_dataset_next(d, &b, err), ST_ERR_FORMAT, err);
    CHECK_CONTAINS(err->message, "metadata.csv line 5");
    CHECK_CONTAINS(err->message, "corrupt.safetensors: the header is not valid JSON");
    CHECK_OK(st_dataset_seek(d, 4, err), err);
    CHECK(take(d, 1, v) == 1 && v[0] == 2);
    st_dataset_close(d); /* with prefetch: joins a worker that stopped on an error or is waiting */
  }
  /* a worker still loading ahead when the dataset is closed */
  st_dataset *d = open_ds(dir, meta, 1, 1, false, 0, 3, 0, 1);
  int64_t v[2];
  CHECK(take(d, 1, v) == 1);
  st_dataset_close(d);
}

/* ---- synthesize ------------------------------------------------------------------------------ */

typedef struct fake_model {
  int calls;
  int64_t fail_at;
} fake_model;

static st_result fake_synth(void *ctx, uint64_t seed_unused, int64_t index, st_tensor_sink *sink, st_error *err) {
  fake_model *m = ctx;
  m->calls++;
  if (index == m->fail_at) return st_error_set(err, ST_ERR_NUMERIC, "synth", "synthetic failure");
  st_device cpu = {ST_DEVICE_CPU, 0};
  int64_t idx = index;
  float x[2] = {(float)index, (float)-index / 2};
  st_tensor t_idx = st_tensor_make(&idx, ST_I64, cpu, 0, NULL);
  st_tensor t_x = st_tensor_make(x, ST_F32, cpu, 1, (int64_t[]){2});
  ST_CHECK(sink->put(sink, "idx", &t_idx, err));
  ST_CHECK(sink->put(sink, "x", &t_x, err));
  st_error e2;
  if (sink->put_file(sink, "config.json", "{}", 2, &e2) != ST_ERR_UNSUPPORTED) return ST_ERR_INTERNAL;
  return ST_OK;
}

static void test_synthesize(void) {
  char dir[512], p[700];
  snprintf(dir, sizeof dir, "%s/synth/nested", tmpdir); /* parents are created */
  st_error err_, *err = &err_;
  fake_model m = {.fail_at = -1};
  CHECK_OK(st_dataset_synthesize(dir, 6, 42, 0, fake_synth, &m, err), err);
  CHECK(m.calls == 6);
  struct stat sb0, sb1;
  snprintf(p, sizeof p, "%s/sample-000005.safetensors", dir);
  CHECK(stat(p, &sb0) == 0);
  /* the same request again does nothing */
  CHECK_OK(st_dataset_synthesize(dir, 6, 42, 0, fake_synth, &m, err), err);
  CHECK(m.calls == 6);
  CHECK(stat(p, &sb1) == 0 && sb1.st_ino == sb0.st_ino && sb1.st_mtim.tv_nsec == sb0.st_mtim.tv_nsec);
  int64_t v[16];
  char meta[600];
  snprintf(meta, sizeof meta, "%s/metadata.jsonl", dir);
  for (int use_meta = 0; use_meta < 2; use_meta++) {
    st_dataset *d = open_ds(dir, use_meta ? meta : NULL, 2, 1, false, 0, 1, 0, 1);
    if (!d) continue;
    CHECK(st_dataset_size(d) == 6);
    CHECK(take(d, 3, v) == 6);
    for (int i = 0; i < 6; i++) CHECK(v[i] == i);
    st_dataset_close(d);
  }
  /* a different seed regenerates; a smaller n leaves no stale samples behind */
  CHECK_OK(st_dataset_synthesize(dir, 6, 43, 0, fake_synth, &m, err), err);
  CHECK(m.calls == 12);
  CHECK_OK(st_dataset_synthesize(dir, 3, 43, 0, fake_synth, &m, err), err);
  CHECK(m.calls == 15);
  CHECK(access(p, F_OK) != 0);
  st_dataset *d = open_ds(dir, NULL, 1, 1, false, 0, 0, 0, 1);
  CHECK(d && st_dataset_size(d) == 3);
  st_dataset_close(d);
  /* files synthesize did not write are left alone */
  snprintf(p, sizeof p, "%s/user-sample.safetensors", dir);
  write_sample(p, 99);
  CHECK_OK(st_dataset_synthesize(dir, 3, 42, 0, fake_synth, &m, err), err);
  CHECK(m.calls == 18 && access(p, F_OK) == 0);
  CHECK_OK(st_dataset_synthesize(dir, 3, 42, 0, fake_synth, &m, err), err); /* and do not break idempotence */
  CHECK(m.calls == 18);
  unlink(p);
  /* a deleted sample is noticed and rewritten */
  snprintf(p, sizeof p, "%s/sample-000001.safetensors", dir);
  unlink(p);
  CHECK_OK(st_dataset_synthesize(dir, 3, 42, 0, fake_synth, &m, err), err);
  CHECK(m.calls == 21 && access(p, F_OK) == 0);
  /* the model's error comes back with the sample named; the next call starts over */
  m.fail_at = 1;
  CHECK_RESULT(st_dataset_synthesize(dir, 3, 44, 0, fake_synth, &m, err), ST_ERR_NUMERIC, err);
  CHECK_CONTAINS(err->message, "synthesizing sample 1: synthetic failure");
  m.fail_at = -1;
  int before = m.calls;
  CHECK_OK(st_dataset_synthesize(dir, 3, 44, 0, fake_synth, &m, err), err);
  CHECK(m.calls == before + 3);
  /* a file where the directory should be */
  snprintf(p, sizeof p, "%s/plainfile", tmpdir);
  write_text(p, "x");
  CHECK_RESULT(st_dataset_synthesize(p, 3, 1, 0, fake_synth, &m, err), ST_ERR_IO, err);
  CHECK_CONTAINS(err->message, "plainfile");
}

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "%s/st-data-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 1;
  }
  test_scan_and_repeat();
  test_metadata();
  test_shuffle_shard_seek();
  test_bad_samples();
  test_synthesize();
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
  return st_test_finish("data");
}
