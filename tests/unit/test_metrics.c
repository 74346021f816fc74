/* Logs: CRC-32C against RFC 3720's check values, TensorBoard event files decoded by an independent
 * reader in this file (framing, CRCs, Event/Summary fields), metrics.jsonl / CSV content and the
 * resume rewrite, the progress bar's two modes, the logger's levels and prefixes.
 * `test_metrics --write-tb DIR` writes a known event file for tests/unit/tb_verify.py. */
#include <stdint.h>
#include <unistd.h>

#include "metrics.h"
#include "st_test.h"

static char tmpdir[256];

static char *slurp(const char *path, size_t *len) {
  FILE *f = fopen(path, "rb");
  if (!f) return NULL;
  fseek(f, 0, SEEK_END);
  long n = ftell(f);
  fseek(f, 0, SEEK_SET);
  char *b = calloc(1, (size_t)n + 1);
  if (b && fread(b, 1, (size_t)n, f) != (size_t)n) n = 0;
  fclose(f);
  if (len) *len = (size_t)n;
  return b;
}

static void test_crc32c(void) {
  unsigned char zeros[32] = {0}, ones[32], inc[32];
  for (int i = 0; i < 32; i++) ones[i] = 0xFF, inc[i] = (unsigned char)i;
  CHECK(st_crc32c("123456789", 9) == 0xE3069283u);
  CHECK(st_crc32c(zeros, 32) == 0x8A9136AAu);
  CHECK(st_crc32c(ones, 32) == 0x62A8AB43u);
  CHECK(st_crc32c(inc, 32) == 0x46DD794Eu);
}

/* ---- an independent protobuf reader for the fields TensorBoard uses ---- */
static uint64_t rd_varint(const unsigned char **p, const unsigned char *end) {
  uint64_t v = 0;
  for (int s = 0; *p < end && s < 64; s += 7) {
    unsigned char c = *(*p)++;
    v |= (uint64_t)(c & 0x7F) << s;
    if (!(c & 0x80)) break;
  }
  return v;
}

typedef struct event {
  double wall_time;
  int64_t step;
  char file_version[32];
  char tag[64];
  float value;
  int n_values;
} event;

static void parse_value(const unsigned char *p, const unsigned char *end, event *e) {
  while (p < end) {
    uint64_t key = rd_varint(&p, end);
    if (key == (1 << 3 | 2)) {
      uint64_t n = rd_varint(&p, end);
      snprintf(e->tag, sizeof e->tag, "%.*s", (int)n, (const char *)p);
      p += n;
    } else if (key == (2 << 3 | 5)) {
      memcpy(&e->value, p, 4);
      p += 4;
    } else return;
  }
}

static int parse_event(const unsigned char *p, size_t n, event *e) {
  const unsigned char *end = p + n;
  memset(e, 0, sizeof *e);
  while (p < end) {
    uint64_t key = rd_varint(&p, end);
    switch (key) {
    case 1 << 3 | 1: memcpy(&e->wall_time, p, 8); p += 8; break;
    case 2 << 3 | 0: e->step = (int64_t)rd_varint(&p, end); break;
    case 3 << 3 | 2: {
      uint64_t l = rd_varint(&p, end);
      snprintf(e->file_version, sizeof e->file_version, "%.*s", (int)l, (const char *)p);
      p += l;
      break;
    }
    case 5 << 3 | 2: { /* Summary */
      uint64_t l = rd_varint(&p, end);
      const unsigned char *q = p, *qend = p + l;
      while (q < qend) {
        uint64_t k = rd_varint(&q, qend);
        if (k != (1 << 3 | 2)) return -1;
        uint64_t vl = rd_varint(&q, qend);
        parse_value(q, q + vl, e);
        e->n_values++;
        q += vl;
      }
      p += l;
      break;
    }
    default: return -1;
    }
  }
  return 0;
}

static uint32_t unmask(uint32_t m) {
  uint32_t r = m - 0xA282EAD8u;
  return (r >> 17) | (r << 15);
}

/* reads every record, checking both CRCs; returns the count or -1 */
static int read_events(const char *path, event *ev, int cap) {
  size_t len;
  unsigned char *b = (unsigned char *)slurp(path, &len);
  if (!b) return -1;
  int n = 0;
  size_t off = 0;
  while (off + 12 <= len && n < cap) {
    uint64_t l;
    uint32_t lc, dc;
    memcpy(&l, b + off, 8);
    memcpy(&lc, b + off + 8, 4);
    if (unmask(lc) != st_crc32c(b + off, 8) || off + 16 + l > len) break;
    memcpy(&dc, b + off + 12 + l, 4);
    if (unmask(dc) != st_crc32c(b + off + 12, l) || parse_event(b + off + 12, l, &ev[n]) != 0) break;
    n++;
    off += 16 + l;
  }
  free(b);
  return off == len ? n : -1;
}

static void test_tfevents(void) {
  st_error err = {0};
  char dir[512];
  snprintf(dir, sizeof dir, "%s/tb/nested", tmpdir);
  st_tfevents *t = NULL;
  CHECK_OK(st_tfevents_open(dir, &t, &err), &err);
  if (!t) return;
  CHECK_CONTAINS(st_tfevents_path(t), "/tb/nested/events.out.tfevents.");
  CHECK_OK(st_tfevents_scalar(t, 1, 1700000000.5, "train/loss", 0.75f, &err), &err);
  CHECK_OK(st_tfevents_scalar(t, 300, 1700000001.25, "train/lr", 1e-4f, &err), &err);
  CHECK_OK(st_tfevents_flush(t, &err), &err);
  char path[4400];
  snprintf(path, sizeof path, "%s", st_tfevents_path(t));
  st_tfevents_close(t);
  event ev[8];
  int n = read_events(path, ev, 8);
  CHECK_MSG(n == 3, "read %d events", n);
  if (n != 3) return;
  CHECK(strcmp(ev[0].file_version, "brain.Event:2") == 0);
  CHECK(ev[1].step == 1 && ev[1].wall_time == 1700000000.5 && strcmp(ev[1].tag, "train/loss") == 0 &&
        ev[1].value == 0.75f && ev[1].n_values == 1);
  CHECK(ev[2].step == 300 && ev[2].wall_time == 1700000001.25 && strcmp(ev[2].tag, "train/lr") == 0 &&
        ev[2].value == 1e-4f);

  /* a folder that cannot be created */
  CHECK_RESULT(st_tfevents_open("/proc/strata-no/tb", &t, &err), ST_ERR_IO, &err);
  CHECK_CONTAINS(err.message, "cannot create");
}

static int count_lines(const char *s) {
  int n = 0;
  for (; s && *s; s++) n += *s == '\n';
  return n;
}

static void test_metrics_files(void) {
  st_error err = {0};
  char jsonl[512], csv[512], tb[512];
  snprintf(jsonl, sizeof jsonl, "%s/run/metrics.jsonl", tmpdir);
  snprintf(csv, sizeof csv, "%s/run/metrics.csv", tmpdir);
  snprintf(tb, sizeof tb, "%s/run/tb", tmpdir);
  st_metrics_options o = {.jsonl_path = jsonl, .csv_path = csv, .tensorboard_dir = tb};
  st_metrics *m = NULL;
  CHECK_OK(st_metrics_open(&o, &m, &err), &err);
  if (!m) return;
  const double third = 1.0 / 3.0;
  for (int s = 1; s <= 3; s++) {
    st_metrics_add(m, "train/loss", third * s);
    st_metrics_add(m, "train/lr", 1e-4);
    if (s == 2) st_metrics_add(m, "train/grad_norm", NAN); /* not in the CSV header, not finite */
    st_metrics_add(m, "train/lr", 2e-4);                   /* a second add of a tag replaces it */
    CHECK_OK(st_metrics_commit(m, s, &err), &err);
  }
  st_metrics_close(m);
  char *j = slurp(jsonl, NULL), *c = slurp(csv, NULL);
  CHECK(count_lines(j) == 3);
  CHECK_CONTAINS(j, "{\"step\": 1, \"time\": ");
  /* %.17g: the exact double comes back */
  char *loss = j ? strstr(j, "\"train/loss\": ") : NULL;
  CHECK(loss && strtod(loss + 14, NULL) == third);
  CHECK_CONTAINS(j, "\"train/lr\": 0.00020000000000000001");
  CHECK_CONTAINS(j, "\"train/grad_norm\": null");
  CHECK(c && strncmp(c, "step,time,train/loss,train/lr\n", 30) == 0);
  CHECK(count_lines(c) == 4);
  CHECK_CONTAINS(c, "\n3,");
  free(j);
  free(c);

  /* a run resumed from step 2 drops the lines it will write again, keeps the rest and the header */
  o.keep_through_step = 2;
  o.tensorboard_dir = NULL;
  CHECK_OK(st_metrics_open(&o, &m, &err), &err);
  if (!m) return;
  st_metrics_add(m, "train/loss", 9.5);
  st_metrics_add(m, "train/extra", 1.0); /* unknown to the kept CSV header: not a column */
  CHECK_OK(st_metrics_commit(m, 3, &err), &err);
  st_metrics_close(m);
  j = slurp(jsonl, NULL);
  c = slurp(csv, NULL);
  CHECK(count_lines(j) == 3);
  CHECK_CONTAINS(j, "{\"step\": 2,");
  CHECK_CONTAINS(j, "{\"step\": 3, \"time\": ");
  CHECK_CONTAINS(j, "\"train/loss\": 9.5");
  CHECK(j && !strstr(j, "\"train/loss\": 1,")); /* the first run's step 3 is gone */
  CHECK(count_lines(c) == 4);
  CHECK(c && strncmp(c, "step,time,train/loss,train/lr\n", 30) == 0);
  char *row3 = c ? strstr(c, "\n3,") : NULL;
  CHECK(row3 && strstr(row3, ",9.5,\n")); /* lr missing this step: empty cell */
  free(j);
  free(c);

  /* a fresh run (keep 0) starts the files over */
  o.keep_through_step = 0;
  o.csv_path = NULL;
  CHECK_OK(st_metrics_open(&o, &m, &err), &err);
  st_metrics_close(m);
  j = slurp(jsonl, NULL);
  CHECK(j && j[0] == '\0');
  free(j);

  st_metrics_options bad = {.jsonl_path = "/proc/strata-no/metrics.jsonl"};
  CHECK_RESULT(st_metrics_open(&bad, &m, &err), ST_ERR_IO, &err);
  CHECK_CONTAINS(err.message, "/proc/strata-no");
}

static char *capture(void (*fn)(FILE *)) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  fn(f);
  fclose(f);
  return buf;
}

static void plain_run(FILE *f) {
  st_progress *p = st_progress_create(f, 25, 0, 0, 10);
  for (int s = 1; s <= 25; s++) st_progress_update(p, s, 0.5, 1e-4, s == 25 ? "gnorm 1" : NULL);
  st_progress_message(p, "a log line");
  st_progress_finish(p);
}

static void tty_run(FILE *f) {
  st_progress *p = st_progress_create(f, 8, 4, 1, 10); /* resumed at step 4 */
  st_progress_update(p, 5, 0.25, 1e-3, NULL);
  st_progress_message(p, "saved checkpoint");
  st_progress_update(p, 8, 0.125, 1e-3, NULL);
  st_progress_finish(p);
}

static void test_progress(void) {
  char *s = capture(plain_run);
  /* steps 10, 20 and the last, one line each; then the message */
  CHECK(count_lines(s) == 4);
  CHECK_CONTAINS(s, "step 10/25 ");
  CHECK_CONTAINS(s, "step 20/25 ");
  CHECK_CONTAINS(s, "step 25/25 ");
  CHECK_CONTAINS(s, "100% | ");
  CHECK_CONTAINS(s, "| loss 0.5000 | lr 1.0e-04 | gnorm 1 | ETA 00:00");
  CHECK(s && !strstr(s, "step 5/") && !strchr(s, '\r') && !strstr(s, "\033"));
  free(s);
  s = capture(tty_run);
  CHECK_CONTAINS(s, "\r\033[Kstep 5/8 ▕");
  CHECK_CONTAINS(s, "\r\033[Ksaved checkpoint\nstep 5/8 "); /* the message, then the bar redrawn */
  CHECK_CONTAINS(s, "step 8/8 ▕████████");
  CHECK(s && s[strlen(s) - 1] == '\n');
  free(s);
}

static void test_logger(void) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  unsetenv("STRATA_LOG_LEVEL");
  st_logger *l = st_logger_create(f, 1, 4, ST_LOG_INFO);
  st_log(l, ST_LOG_INFO, "hello %d", 7);
  st_log(l, ST_LOG_DEBUG, "hidden");
  st_log(l, ST_LOG_WARN, "careful\n");
  CHECK(st_log_enabled(l, ST_LOG_WARN) && !st_log_enabled(l, ST_LOG_DEBUG));
  st_logger_free(l);
  setenv("STRATA_LOG_LEVEL", "error", 1);
  l = st_logger_create(f, 0, 1, ST_LOG_INFO);
  st_log(l, ST_LOG_WARN, "also hidden");
  st_log(l, ST_LOG_ERROR, "bad");
  st_logger_free(l);
  setenv("STRATA_LOG_LEVEL", "loud", 1);
  l = st_logger_create(f, 0, 1, ST_LOG_INFO);
  st_logger_free(l);
  unsetenv("STRATA_LOG_LEVEL");
  fclose(f);
  CHECK_CONTAINS(buf, " [rank 1/4] hello 7\n");
  CHECK_CONTAINS(buf, " [rank 1/4] warning: careful\n");
  CHECK_CONTAINS(buf, " strata error: bad\n");
  CHECK_CONTAINS(buf, "STRATA_LOG_LEVEL=loud is not one of error, warn, info, debug");
  CHECK(buf && !strstr(buf, "hidden"));
  free(buf);
}

static void write_tb(const char *dir) {
  st_error err = {0};
  st_tfevents *t = NULL;
  if (st_tfevents_open(dir, &t, &err) != ST_OK) {
    fprintf(stderr, "%s\n", err.message);
    exit(1);
  }
  for (int s = 1; s <= 5; s++) {
    st_tfevents_scalar(t, s, 1700000000.0 + s, "train/loss", 1.0f / (float)s, &err);
    st_tfevents_scalar(t, s, 1700000000.0 + s, "train/lr", 1e-4f * (float)s, &err);
  }
  st_tfevents_close(t);
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "--write-tb") == 0) {
    write_tb(argv[2]);
    return 0;
  }
  snprintf(tmpdir, sizeof tmpdir, "/tmp/strata-test-metrics-XXXXXX");
  if (!mkdtemp(tmpdir)) return 1;
  test_crc32c();
  test_tfevents();
  test_metrics_files();
  test_progress();
  test_logger();
  char cmd[300];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
  return st_test_finish("metrics");
}
