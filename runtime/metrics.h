/* metrics.h (internal) — the process logger, metric sinks (metrics.jsonl, TensorBoard event files,
 * CSV) and the progress bar. Only rank 0 writes metrics and draws progress. */
#ifndef STRATA_RUNTIME_METRICS_H
#define STRATA_RUNTIME_METRICS_H

#include <strata/strata.h>

/* ---- log.c: leveled, rank-prefixed log lines to a stream (stderr by default) ---------------- */
typedef struct st_logger st_logger;
/* level from STRATA_LOG_LEVEL (error|warn|info|debug) when set, else `level` */
st_logger *st_logger_create(FILE *stream, int rank, int world_size, st_log_level level);
void st_logger_free(st_logger *l);
void st_log(st_logger *l, st_log_level level, const char *fmt, ...) ST_PRINTF(3, 4);
void st_logv(st_logger *l, st_log_level level, const char *fmt, va_list ap);
bool st_log_enabled(const st_logger *l, st_log_level level);
/* while a progress bar is shown, log lines go through st_progress_message (NULL: straight out) */
struct st_progress;
void st_logger_set_progress(st_logger *l, struct st_progress *p);

/* ---- tfevents.c: TensorBoard event files written directly --------------------------------- */
/* TFRecord framing: u64 length, u32 masked crc32c(length), data, u32 masked crc32c(data); each
 * record an Event protobuf: wall_time(1, double), step(2, int64), file_version(3, string) for the
 * first record, summary(5) { value(1) { tag(1, string), simple_value(2, float) } }. */
typedef struct st_tfevents st_tfevents;
uint32_t st_crc32c(const void *data, size_t len);
/* creates dir if needed; file "events.out.tfevents.<unix seconds>.<hostname>" */
st_result st_tfevents_open(const char *dir, st_tfevents **out, st_error *err);
st_result st_tfevents_scalar(st_tfevents *t, int64_t step, double wall_time, const char *tag, float value,
                             st_error *err);
/* summary.value.image { height(1), width(2), colorspace(3), encoded_image_string(4) }: a PNG */
st_result st_tfevents_image(st_tfevents *t, int64_t step, double wall_time, const char *tag, const void *png,
                            size_t png_len, int32_t width, int32_t height, st_error *err);
st_result st_tfevents_flush(st_tfevents *t, st_error *err);
void st_tfevents_close(st_tfevents *t);
const char *st_tfevents_path(const st_tfevents *t);

/* ---- metrics.c: one object fanning a step's scalars out to every enabled sink ---------------- */
typedef struct st_metrics_options {
  const char *jsonl_path;      /* NULL: off */
  const char *tensorboard_dir; /* NULL: off */
  const char *csv_path;        /* NULL: off; header row from the first step's tags */
  /* jsonl/csv lines of steps after this one are dropped from existing files (a resumed run
   * rewrites the steps it repeats); 0 starts the files afresh */
  int64_t keep_through_step;
} st_metrics_options;

typedef struct st_metrics st_metrics;
st_result st_metrics_open(const st_metrics_options *opt, st_metrics **out, st_error *err);
/* Buffer a scalar for the current step ("train/loss", "train/lr", ...). */
void st_metrics_add(st_metrics *m, const char *tag, double value);
/* Write the buffered scalars of `step` to every sink: one JSON object per line in metrics.jsonl
 * ({"step": N, "time": unix, "train/loss": ...}), one event per scalar, one CSV row. */
st_result st_metrics_commit(st_metrics *m, int64_t step, st_error *err);
void st_metrics_close(st_metrics *m);
/* the TensorBoard writer (NULL when off), for images */
st_tfevents *st_metrics_tensorboard(st_metrics *m);

/* ---- progress.c: a progress bar on a TTY, plain lines otherwise ----------------------------- */
typedef struct st_progress st_progress;
/* tty: 1 / 0 forces, -1 detects isatty(fileno(out)) (and honours NO_COLOR / TERM=dumb).
 * plain_every: on a non-TTY print a line every N steps (and at the end). */
st_progress *st_progress_create(FILE *out, int64_t total_steps, int64_t first_step, int tty, int64_t plain_every);
/* "step 120/2000 ▕███▍  ▏ 6% | 3.1 it/s | loss 0.4213 | lr 1.0e-04 | ETA 10:05" */
void st_progress_update(st_progress *p, int64_t step, double loss, double lr, const char *extra);
/* log lines printed while a bar is shown go through here so the bar is redrawn below them */
void st_progress_message(st_progress *p, const char *line);
void st_progress_finish(st_progress *p);

#endif /* STRATA_RUNTIME_METRICS_H */
