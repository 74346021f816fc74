/* metrics.c — a step's scalars fanned out to metrics.jsonl, TensorBoard and CSV. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "fsutil.h"
#include "metrics.h"

typedef struct scalar {
  char tag[96];
  double value;
} scalar;

struct st_metrics {
  FILE *jsonl, *csv;
  st_tfevents *tb;
  char jsonl_path[4096], csv_path[4096];
  scalar *buf;
  int n, cap;
  char (*csv_cols)[96]; /* the header row, fixed by the first committed step */
  int n_csv_cols;
};

static st_result parent_dir(const char *path, st_error *err) {
  char dir[4096];
  snprintf(dir, sizeof dir, "%s", path);
  char *slash = strrchr(dir, '/');
  if (!slash || slash == dir) return ST_OK;
  *slash = '\0';
  return st_mkdir_p(dir, err);
}

/* The step number a jsonl line ({"step": N, ...}) or csv row (N,...) starts with; -1 if none. */
static long long line_step(const char *line) {
  const char *p = strstr(line, "\"step\":");
  if (p) p += 7;
  else p = line;
  char *end;
  long long v = strtoll(p, &end, 10);
  return end == p ? -1 : v;
}

/* Opens `path` for appending after dropping the lines of steps > keep (keeping a csv header).
 * The rewrite goes through a temporary file and rename, so a crash leaves the old file whole. */
static st_result open_kept(const char *path, int64_t keep, bool has_header, FILE **out, char (*first_line)[4096],
                           st_error *err) {
  *out = NULL;
  if (first_line) (*first_line)[0] = '\0';
  ST_CHECK(parent_dir(path, err));
  FILE *old = keep > 0 ? fopen(path, "r") : NULL;
  if (old) {
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *nw = fopen(tmp, "w");
    if (!nw) {
      fclose(old);
      return st_error_set(err, ST_ERR_IO, path, "cannot write %s: %s", tmp, strerror(errno));
    }
    char line[8192];
    bool first = true;
    while (fgets(line, sizeof line, old)) {
      bool header = first && has_header;
      if (header && first_line) {
        snprintf(*first_line, sizeof *first_line, "%s", line);
      }
      first = false;
      long long s = line_step(line);
      if (header || (s >= 0 && s <= keep && line[strlen(line) - 1] == '\n')) fputs(line, nw);
    }
    fclose(old);
    if (fclose(nw) != 0 || rename(tmp, path) != 0)
      return st_error_set(err, ST_ERR_IO, path, "cannot rewrite %s: %s", path, strerror(errno));
  }
  *out = fopen(path, keep > 0 ? "a" : "w");
  if (!*out) return st_error_set(err, ST_ERR_IO, path, "cannot open %s for writing: %s", path, strerror(errno));
  return ST_OK;
}

st_result st_metrics_open(const st_metrics_options *opt, st_metrics **out, st_error *err) {
  *out = NULL;
  st_metrics *m = calloc(1, sizeof *m);
  if (!m) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "metrics", "out of memory");
  st_result r = ST_OK;
  if (opt->jsonl_path) {
    snprintf(m->jsonl_path, sizeof m->jsonl_path, "%s", opt->jsonl_path);
    r = open_kept(opt->jsonl_path, opt->keep_through_step, false, &m->jsonl, NULL, err);
  }
  if (r == ST_OK && opt->csv_path) {
    char header[4096];
    snprintf(m->csv_path, sizeof m->csv_path, "%s", opt->csv_path);
    r = open_kept(opt->csv_path, opt->keep_through_step, true, &m->csv, &header, err);
    if (r == ST_OK && header[0]) { /* a resumed run keeps the existing columns */
      for (char *tok = strtok(header, ",\n"); tok; tok = strtok(NULL, ",\n")) {
        if (strcmp(tok, "step") == 0 || strcmp(tok, "time") == 0) continue;
        char(*c)[96] = realloc(m->csv_cols, (size_t)(m->n_csv_cols + 1) * sizeof *c);
        if (!c) {
          r = st_error_set(err, ST_ERR_OUT_OF_MEMORY, "metrics", "out of memory");
          break;
        }
        m->csv_cols = c;
        snprintf(c[m->n_csv_cols++], 96, "%s", tok);
      }
    }
  }
  if (r == ST_OK && opt->tensorboard_dir) r = st_tfevents_open(opt->tensorboard_dir, &m->tb, err);
  if (r != ST_OK) {
    st_metrics_close(m);
    return r;
  }
  *out = m;
  return ST_OK;
}

void st_metrics_add(st_metrics *m, const char *tag, double value) {
  if (!m) return;
  for (int i = 0; i < m->n; i++)
    if (strcmp(m->buf[i].tag, tag) == 0) {
      m->buf[i].value = value;
      return;
    }
  if (m->n == m->cap) {
    int cap = m->cap ? 2 * m->cap : 32;
    scalar *b = realloc(m->buf, (size_t)cap * sizeof *b);
    if (!b) return; /* a metric dropped under memory pressure is not worth failing a run */
    m->buf = b;
    m->cap = cap;
  }
  snprintf(m->buf[m->n].tag, sizeof m->buf[m->n].tag, "%s", tag);
  m->buf[m->n++].value = value;
}

/* %.17g round-trips a double exactly; JSON has no NaN/Inf, so those become null. */
static void put_number(FILE *f, double v) {
  if (isfinite(v)) fprintf(f, "%.17g", v);
  else fputs("null", f);
}

static st_result io_error(const char *path, st_error *err) {
  return st_error_set(err, ST_ERR_IO, path, "cannot write %s: %s (disk full?)", path, strerror(errno));
}

static st_result write_csv(st_metrics *m, int64_t step, double now, st_error *err) {
  if (!m->csv_cols) {
    m->csv_cols = calloc((size_t)(m->n ? m->n : 1), sizeof *m->csv_cols);
    if (!m->csv_cols) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, "metrics", "out of memory");
    fputs("step,time", m->csv);
    for (int i = 0; i < m->n; i++) {
      snprintf(m->csv_cols[i], sizeof m->csv_cols[i], "%s", m->buf[i].tag);
      fprintf(m->csv, ",%s", m->buf[i].tag);
    }
    m->n_csv_cols = m->n;
    fputc('\n', m->csv);
  }
  fprintf(m->csv, "%lld,%.3f", (long long)step, now);
  for (int c = 0; c < m->n_csv_cols; c++) { /* a tag missing this step leaves its cell empty */
    fputc(',', m->csv);
    for (int i = 0; i < m->n; i++)
      if (strcmp(m->buf[i].tag, m->csv_cols[c]) == 0 && isfinite(m->buf[i].value)) {
        fprintf(m->csv, "%.9g", m->buf[i].value);
        break;
      }
  }
  fputc('\n', m->csv);
  return fflush(m->csv) == 0 ? ST_OK : io_error(m->csv_path, err);
}

st_result st_metrics_commit(st_metrics *m, int64_t step, st_error *err) {
  if (!m) return ST_OK;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  double now = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
  st_result r = ST_OK;
  if (m->jsonl) {
    fprintf(m->jsonl, "{\"step\": %lld, \"time\": %.3f", (long long)step, now);
    for (int i = 0; i < m->n; i++) {
      fprintf(m->jsonl, ", \"%s\": ", m->buf[i].tag);
      put_number(m->jsonl, m->buf[i].value);
    }
    fputs("}\n", m->jsonl);
    if (fflush(m->jsonl) != 0) r = io_error(m->jsonl_path, err);
  }
  if (r == ST_OK && m->csv) r = write_csv(m, step, now, err);
  for (int i = 0; r == ST_OK && m->tb && i < m->n; i++)
    r = st_tfevents_scalar(m->tb, step, now, m->buf[i].tag, (float)m->buf[i].value, err);
  if (r == ST_OK && m->tb) r = st_tfevents_flush(m->tb, err);
  m->n = 0;
  return r;
}

void st_metrics_close(st_metrics *m) {
  if (!m) return;
  if (m->jsonl) fclose(m->jsonl);
  if (m->csv) fclose(m->csv);
  st_tfevents_close(m->tb);
  free(m->buf);
  free(m->csv_cols);
  free(m);
}

st_tfevents *st_metrics_tensorboard(st_metrics *m) { return m ? m->tb : NULL; }
