/* log.c — leveled log lines, prefixed with the rank when there is more than one. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "metrics.h"

struct st_logger {
  FILE *stream;
  int rank, world_size;
  st_log_level level;
  bool color;
  st_progress *progress; /* while a bar is shown, lines go through it */
};

static bool parse_level(const char *s, st_log_level *out) {
  static const char *const names[] = {"error", "warn", "info", "debug"};
  for (int i = 0; i < 4; i++)
    if (strcmp(s, names[i]) == 0) {
      *out = (st_log_level)i;
      return true;
    }
  return false;
}

st_logger *st_logger_create(FILE *stream, int rank, int world_size, st_log_level level) {
  st_logger *l = calloc(1, sizeof *l);
  if (!l) return NULL;
  l->stream = stream ? stream : stderr;
  l->rank = rank;
  l->world_size = world_size;
  l->level = level;
  const char *env = getenv("STRATA_LOG_LEVEL");
  if (env && *env && !parse_level(env, &l->level))
    fprintf(l->stream, "strata: warning: STRATA_LOG_LEVEL=%s is not one of error, warn, info, debug; using %s\n", env,
            level == ST_LOG_DEBUG ? "debug" : level == ST_LOG_INFO ? "info" : level == ST_LOG_WARN ? "warn" : "error");
  const char *term = getenv("TERM");
  l->color = isatty(fileno(l->stream)) && !getenv("NO_COLOR") && !(term && strcmp(term, "dumb") == 0);
  return l;
}

void st_logger_free(st_logger *l) { free(l); }

void st_logger_set_progress(st_logger *l, st_progress *p) {
  if (l) l->progress = p;
}

bool st_log_enabled(const st_logger *l, st_log_level level) { return l && level <= l->level; }

void st_logv(st_logger *l, st_log_level level, const char *fmt, va_list ap) {
  if (!st_log_enabled(l, level)) return;
  static const char *const tags[] = {"error: ", "warning: ", "", "debug: "};
  static const char *const colors[] = {"\033[1;31m", "\033[1;33m", "", "\033[2m"};
  char who[48], line[4096];
  time_t now = time(NULL);
  struct tm tm;
  localtime_r(&now, &tm);
  if (l->world_size > 1) snprintf(who, sizeof who, "[rank %d/%d]", l->rank, l->world_size);
  else snprintf(who, sizeof who, "strata");
  int n = snprintf(line, sizeof line, "%02d:%02d:%02d %s %s%s", tm.tm_hour, tm.tm_min, tm.tm_sec, who,
                   l->color ? colors[level] : "", tags[level]);
  if (n < 0) n = 0;
  if ((size_t)n < sizeof line) n += vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
  if ((size_t)n >= sizeof line) n = (int)sizeof line - 1;
  while (n > 0 && line[n - 1] == '\n') line[--n] = '\0';
  if (l->color && colors[level][0]) snprintf(line + n, sizeof line - (size_t)n, "\033[0m");
  if (l->progress) st_progress_message(l->progress, line);
  else {
    fprintf(l->stream, "%s\n", line);
    fflush(l->stream);
  }
}

void st_log(st_logger *l, st_log_level level, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  st_logv(l, level, fmt, ap);
  va_end(ap);
}
