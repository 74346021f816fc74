/* callbacks.c — train.on_save commands: started after a checkpoint is complete, never blocking the
 * training loop, reaped between steps. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "callbacks.h"
#include "fsutil.h"

typedef struct job {
  pid_t pid;
  int64_t step;
  char dir[4096];
} job;

struct st_on_save_jobs {
  char *command;
  st_logger *log;
  st_tfevents *tb; /* NULL: images are not logged */
  job *jobs;
  int n, cap;
};

st_on_save_jobs *st_on_save_create(const char *command, st_logger *log, st_tfevents *tb) {
  st_on_save_jobs *j = calloc(1, sizeof *j);
  if (!j) return NULL;
  j->command = strdup(command);
  j->log = log;
  j->tb = tb;
  if (!j->command) {
    free(j);
    return NULL;
  }
  return j;
}

void st_on_save_start(st_on_save_jobs *j, const char *checkpoint_dir, const char *samples_dir, int64_t step) {
  if (!j) return;
  st_error err = {0};
  if (st_mkdir_p(samples_dir, &err) != ST_OK) {
    st_log(j->log, ST_LOG_WARN, "on_save: %s; the command was not run", err.message);
    return;
  }
  if (j->n == j->cap) {
    int cap = j->cap ? 2 * j->cap : 4;
    job *g = realloc(j->jobs, (size_t)cap * sizeof *g);
    if (!g) return;
    j->jobs = g;
    j->cap = cap;
  }
  char logpath[4200], stepbuf[32];
  snprintf(logpath, sizeof logpath, "%s/on_save.log", samples_dir);
  snprintf(stepbuf, sizeof stepbuf, "%lld", (long long)step);
  fflush(NULL);
  pid_t pid = fork();
  if (pid < 0) {
    st_log(j->log, ST_LOG_WARN, "on_save: cannot start the command: %s", strerror(errno));
    return;
  }
  if (pid == 0) { /* the child: only async-signal-safe calls until exec */
    int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd >= 0) {
      dup2(fd, 1);
      dup2(fd, 2);
      close(fd);
    }
    int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, 0);
    setenv("STRATA_CHECKPOINT", checkpoint_dir, 1);
    setenv("STRATA_STEP", stepbuf, 1);
    setenv("STRATA_SAMPLES_DIR", samples_dir, 1);
    execl("/bin/sh", "sh", "-c", j->command, (char *)NULL);
    _exit(127);
  }
  job *jb = &j->jobs[j->n++];
  jb->pid = pid;
  jb->step = step;
  snprintf(jb->dir, sizeof jb->dir, "%s", samples_dir);
  st_log(j->log, ST_LOG_INFO, "on_save: started for step %lld (output in %s)", (long long)step, logpath);
}

static void log_tail(st_on_save_jobs *j, const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) return;
  char lines[5][512] = {{0}};
  int n = 0;
  char buf[512];
  while (fgets(buf, sizeof buf, f)) {
    buf[strcspn(buf, "\n")] = '\0';
    snprintf(lines[n % 5], sizeof lines[0], "%s", buf);
    n++;
  }
  fclose(f);
  for (int i = n > 5 ? n - 5 : 0; i < n; i++) st_log(j->log, ST_LOG_WARN, "on_save:   | %s", lines[i % 5]);
}

/* width and height from a PNG's IHDR; false when the file is not a PNG */
static bool png_size(const unsigned char *b, size_t n, int32_t *w, int32_t *h) {
  static const unsigned char sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  if (n < 24 || memcmp(b, sig, 8) != 0 || memcmp(b + 12, "IHDR", 4) != 0) return false;
  *w = (int32_t)((uint32_t)b[16] << 24 | (uint32_t)b[17] << 16 | (uint32_t)b[18] << 8 | b[19]);
  *h = (int32_t)((uint32_t)b[20] << 24 | (uint32_t)b[21] << 16 | (uint32_t)b[22] << 8 | b[23]);
  return true;
}

static void add_images(st_on_save_jobs *j, const job *jb) {
  if (!j->tb) return;
  DIR *d = opendir(jb->dir);
  if (!d) return;
  struct dirent *e;
  int added = 0;
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  while ((e = readdir(d))) {
    size_t len = strlen(e->d_name);
    if (len < 5 || strcmp(e->d_name + len - 4, ".png") != 0) continue;
    char path[4400];
    snprintf(path, sizeof path, "%s/%s", jb->dir, e->d_name);
    FILE *f = fopen(path, "rb");
    if (!f) continue;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *png = size > 0 && size < (64l << 20) ? malloc((size_t)size) : NULL;
    bool ok = png && fread(png, 1, (size_t)size, f) == (size_t)size;
    fclose(f);
    int32_t w, h;
    char tag[300];
    snprintf(tag, sizeof tag, "samples/%.*s", (int)(len - 4), e->d_name);
    st_error err = {0};
    if (ok && png_size(png, (size_t)size, &w, &h)) {
      if (st_tfevents_image(j->tb, jb->step, (double)ts.tv_sec, tag, png, (size_t)size, w, h, &err) == ST_OK) added++;
      else st_log(j->log, ST_LOG_WARN, "on_save: %s", err.message);
    } else {
      st_log(j->log, ST_LOG_WARN, "on_save: %s is not a PNG file (or larger than 64 MiB): skipped", path);
    }
    free(png);
  }
  closedir(d);
  if (added) {
    st_error err = {0};
    st_tfevents_flush(j->tb, &err);
    st_log(j->log, ST_LOG_INFO, "on_save: added %d image(s) of step %lld to TensorBoard", added, (long long)jb->step);
  }
}

void st_on_save_poll(st_on_save_jobs *j, bool wait) {
  if (!j) return;
  for (int i = 0; i < j->n;) {
    int status;
    pid_t r = waitpid(j->jobs[i].pid, &status, wait ? 0 : WNOHANG);
    if (r == 0 || (r < 0 && errno == EINTR)) {
      i++;
      continue;
    }
    job jb = j->jobs[i];
    j->jobs[i] = j->jobs[--j->n];
    if (r < 0) continue;
    char logpath[4200];
    snprintf(logpath, sizeof logpath, "%s/on_save.log", jb.dir);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
      st_log(j->log, ST_LOG_INFO, "on_save: the command for step %lld finished", (long long)jb.step);
    } else {
      if (WIFEXITED(status))
        st_log(j->log, ST_LOG_WARN, "on_save: the command for step %lld failed with exit code %d (training goes on); "
               "last lines of %s:", (long long)jb.step, WEXITSTATUS(status), logpath);
      else
        st_log(j->log, ST_LOG_WARN, "on_save: the command for step %lld was killed by signal %d (training goes on); "
               "last lines of %s:", (long long)jb.step, WTERMSIG(status), logpath);
      log_tail(j, logpath);
    }
    add_images(j, &jb);
  }
}

void st_on_save_free(st_on_save_jobs *j) {
  if (!j) return;
  if (j->n) st_log(j->log, ST_LOG_INFO, "on_save: waiting for %d command(s) to finish", j->n);
  st_on_save_poll(j, true);
  free(j->jobs);
  free(j->command);
  free(j);
}
