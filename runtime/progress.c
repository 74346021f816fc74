/* progress.c — rank 0's progress bar on a terminal, plain lines otherwise. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#include "metrics.h"

struct st_progress {
  FILE *out;
  bool tty, drawn;
  int64_t total, first, last_step, last_printed;
  int64_t plain_every;
  double t_start, rate; /* steps/s, smoothed */
  double t_last;
  int cells;            /* bar width, fixed at the first draw so the columns do not jump */
  char status[512];     /* the bar as last drawn, to redraw it below messages */
};

static double mono_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

st_progress *st_progress_create(FILE *out, int64_t total_steps, int64_t first_step, int tty, int64_t plain_every) {
  st_progress *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->out = out ? out : stderr;
  if (tty < 0) {
    const char *term = getenv("TERM");
    tty = isatty(fileno(p->out)) && !(term && strcmp(term, "dumb") == 0);
  }
  p->tty = tty != 0;
  p->total = total_steps;
  p->first = p->last_step = p->last_printed = first_step;
  p->plain_every = plain_every > 0 ? plain_every : 10;
  p->t_start = p->t_last = mono_s();
  return p;
}

static int term_width(const st_progress *p) {
  struct winsize ws;
  if (p->tty && ioctl(fileno(p->out), TIOCGWINSZ, &ws) == 0 && ws.ws_col >= 40) return ws.ws_col;
  const char *c = getenv("COLUMNS");
  int w = c ? atoi(c) : 0;
  return w >= 40 ? w : 100;
}

static void fmt_eta(char *buf, size_t n, double s) {
  if (!(s >= 0) || s > 1e7) {
    snprintf(buf, n, "--:--");
    return;
  }
  long t = (long)(s + 0.5);
  if (t >= 3600) snprintf(buf, n, "%ld:%02ld:%02ld", t / 3600, t / 60 % 60, t % 60);
  else snprintf(buf, n, "%02ld:%02ld", t / 60, t % 60);
}

/* "▕███▍   ▏" with eighth-blocks: `cells` wide between the two edges */
static void draw_bar(char *buf, size_t n, double frac, int cells) {
  static const char *const eighths[] = {"", "▏", "▎", "▍", "▌", "▋", "▊", "▉"};
  size_t k = 0;
  int units = (int)(frac * cells * 8 + 0.5);
  k += (size_t)snprintf(buf + k, n - k, "▕");
  for (int i = 0; i < cells && k < n; i++) {
    int u = units - 8 * i;
    k += (size_t)snprintf(buf + k, n - k, "%s", u >= 8 ? "█" : u > 0 ? eighths[u] : " ");
  }
  if (k < n) snprintf(buf + k, n - k, "▏");
}

void st_progress_update(st_progress *p, int64_t step, double loss, double lr, const char *extra) {
  if (!p) return;
  double now = mono_s();
  int64_t done = step - p->last_step;
  if (done > 0) {
    double inst = done / (now - p->t_last > 1e-9 ? now - p->t_last : 1e-9);
    p->rate = p->rate > 0 ? 0.8 * p->rate + 0.2 * inst : inst; /* smooths without hiding a slowdown */
    p->t_last = now;
    p->last_step = step;
  }
  double frac = p->total > 0 ? (double)step / (double)p->total : 0.0;
  if (frac > 1) frac = 1;
  char eta[32], rate[32];
  fmt_eta(eta, sizeof eta, p->rate > 0 ? (double)(p->total - step) / p->rate : -1);
  if (p->rate >= 1 || p->rate == 0) snprintf(rate, sizeof rate, "%.1f it/s", p->rate);
  else snprintf(rate, sizeof rate, "%.1f s/it", 1.0 / p->rate);
  char tail[256];
  snprintf(tail, sizeof tail, " %3.0f%% | %s | loss %.4f | lr %.1e%s%s | ETA %s", frac * 100, rate, loss, lr,
           extra && *extra ? " | " : "", extra ? extra : "", eta);
  char head[64];
  int digits = snprintf(NULL, 0, "%lld", (long long)p->total); /* fixed width: the columns do not jump */
  snprintf(head, sizeof head, "step %*lld/%lld ", digits, (long long)step, (long long)p->total);
  if (p->tty) {
    if (!p->cells) { /* leave room for the tail to grow a little (rates, ETA with hours) */
      p->cells = term_width(p) - (int)strlen(head) - (int)strlen(tail) - 12;
      p->cells = p->cells > 30 ? 30 : p->cells < 5 ? -1 : p->cells;
    }
    char bar[256] = "";
    if (p->cells > 0) draw_bar(bar, sizeof bar, frac, p->cells);
    snprintf(p->status, sizeof p->status, "%s%s%s", head, bar, tail);
    fprintf(p->out, "\r\033[K%s", p->status);
    fflush(p->out);
    p->drawn = true;
  } else if (step - p->last_printed >= p->plain_every || step >= p->total) {
    if (step != p->last_printed) {
      fprintf(p->out, "%s%s\n", head, tail);
      fflush(p->out);
    }
    p->last_printed = step;
  }
}

void st_progress_message(st_progress *p, const char *line) {
  if (!p) return;
  if (p->tty && p->drawn) fprintf(p->out, "\r\033[K%s\n%s", line, p->status);
  else fprintf(p->out, "%s\n", line);
  fflush(p->out);
}

void st_progress_finish(st_progress *p) {
  if (!p) return;
  if (p->tty && p->drawn) fputc('\n', p->out);
  fflush(p->out);
  free(p);
}
