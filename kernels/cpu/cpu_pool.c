/* cpu_pool.c — the small fork-join pool behind the CPU ops table. One generation counter wakes the
 * workers; worker i runs chunk i of the current job; the caller runs chunk 0 and waits. */
#include "cpu_internal.h"

#include <stdlib.h>
#include <unistd.h>

typedef struct st_pool_worker {
  st_pool *pool;
  int index; /* 1..threads-1 */
} st_pool_worker;

struct st_pool {
  int threads;
  pthread_t *tids;
  st_pool_worker *workers;
  int started;
  pthread_mutex_t submit; /* held by the one caller using the workers */
  pthread_mutex_t mu;
  pthread_cond_t cv_work, cv_done;
  uint64_t generation;
  int pending;
  bool stop;
  /* the current job */
  st_pool_fn fn;
  void *ctx;
  int64_t n;
  int chunks;
};

static void run_chunk(st_pool_fn fn, void *ctx, int64_t n, int chunks, int i) {
  int64_t begin = n * i / chunks, end = n * (i + 1) / chunks;
  if (end > begin) fn(ctx, begin, end, i);
}

static void *worker_main(void *arg) {
  st_pool_worker *w = arg;
  st_pool *p = w->pool;
  uint64_t seen = 0;
  pthread_mutex_lock(&p->mu);
  for (;;) {
    while (!p->stop && p->generation == seen) pthread_cond_wait(&p->cv_work, &p->mu);
    if (p->stop) break;
    seen = p->generation;
    if (w->index >= p->chunks) continue;
    st_pool_fn fn = p->fn;
    void *ctx = p->ctx;
    int64_t n = p->n;
    int chunks = p->chunks;
    pthread_mutex_unlock(&p->mu);
    run_chunk(fn, ctx, n, chunks, w->index);
    pthread_mutex_lock(&p->mu);
    if (--p->pending == 0) pthread_cond_signal(&p->cv_done);
  }
  pthread_mutex_unlock(&p->mu);
  return NULL;
}

st_result st_pool_create(int threads, st_pool **out) {
  *out = NULL;
  if (threads <= 0) {
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    threads = online > 0 ? (int)online : 1;
  }
  if (threads > 256) threads = 256;
  st_pool *p = calloc(1, sizeof *p);
  if (!p) return ST_ERR_OUT_OF_MEMORY;
  p->threads = threads;
  pthread_mutex_init(&p->submit, NULL);
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv_work, NULL);
  pthread_cond_init(&p->cv_done, NULL);
  if (threads > 1) {
    p->tids = calloc((size_t)threads, sizeof *p->tids);
    p->workers = calloc((size_t)threads, sizeof *p->workers);
    if (!p->tids || !p->workers) {
      st_pool_destroy(p);
      return ST_ERR_OUT_OF_MEMORY;
    }
    for (int i = 1; i < threads; i++) {
      p->workers[i].pool = p;
      p->workers[i].index = i;
      if (pthread_create(&p->tids[i], NULL, worker_main, &p->workers[i]) != 0) {
        st_pool_destroy(p);
        return ST_ERR_INTERNAL;
      }
      p->started = i;
    }
  }
  *out = p;
  return ST_OK;
}

void st_pool_destroy(st_pool *p) {
  if (!p) return;
  pthread_mutex_lock(&p->mu);
  p->stop = true;
  pthread_cond_broadcast(&p->cv_work);
  pthread_mutex_unlock(&p->mu);
  for (int i = 1; i <= p->started; i++) pthread_join(p->tids[i], NULL);
  pthread_cond_destroy(&p->cv_work);
  pthread_cond_destroy(&p->cv_done);
  pthread_mutex_destroy(&p->mu);
  pthread_mutex_destroy(&p->submit);
  free(p->tids);
  free(p->workers);
  free(p);
}

int st_pool_threads(const st_pool *p) { return p ? p->threads : 1; }

void st_pool_for(st_pool *p, int64_t n, int64_t min_chunk, st_pool_fn fn, void *ctx) {
  if (n <= 0) return;
  if (min_chunk < 1) min_chunk = 1;
  int64_t want = n / min_chunk;
  int chunks = p ? p->threads : 1;
  if (want < chunks) chunks = (int)(want < 1 ? 1 : want);
  if (chunks <= 1 || pthread_mutex_trylock(&p->submit) != 0) {
    fn(ctx, 0, n, 0);
    return;
  }
  pthread_mutex_lock(&p->mu);
  p->fn = fn;
  p->ctx = ctx;
  p->n = n;
  p->chunks = chunks;
  p->pending = chunks - 1;
  p->generation++;
  pthread_cond_broadcast(&p->cv_work);
  pthread_mutex_unlock(&p->mu);
  run_chunk(fn, ctx, n, chunks, 0);
  pthread_mutex_lock(&p->mu);
  while (p->pending > 0) pthread_cond_wait(&p->cv_done, &p->mu);
  pthread_mutex_unlock(&p->mu);
  pthread_mutex_unlock(&p->submit);
}
