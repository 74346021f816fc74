/* bench_comm — all-reduce bus bandwidth of a comm backend on local ranks, in one run:
 *   for 2 and 4 forked ranks (or the counts given), fp32 SUM all-reduce of 1, 2, 4 ... 64 MiB through
 *   the backend loaded as production does (default "gloo"), against single-thread memcpy bandwidth
 *   of the same sizes measured here (the ceiling a loopback ring cannot beat per link).
 *   busbw = bytes / time * 2 (n - 1) / n (the nccl-tests definition); time is the median of the
 *   per-iteration maximum over ranks.
 *
 *   bench_comm [BACKEND [N ...]]        e.g. bench_comm gloo 2 4 */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "plugin.h"
#include "store.h"
#include "../tests/distributed/store_process.h"

#define MIN_MIB 1
#define MAX_MIB 64
#define ITERS_MAX 20

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static double median(double *t, int n) {
  qsort(t, (size_t)n, sizeof *t, cmp_double);
  return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

static int iters_for(size_t bytes) { return bytes >= (32u << 20) ? 6 : bytes >= (8u << 20) ? 10 : ITERS_MAX; }

static int rank_main(const char *backend, int rank, int world, int port) {
  st_error err;
  st_error_clear(&err);
  st_store *store = NULL;
  if (st_store_connect("127.0.0.1", port, "bench", rank, 10000, &store, &err) != ST_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, err.message);
    return 1;
  }
  st_plugin plugin;
  if (st_plugin_load(ST_PLUGIN_COMM, backend, NULL, 0, &plugin, &err) != ST_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, err.message);
    return 1;
  }
  const st_comm_plugin_v1 *be = plugin.v.comm;
  st_comm_init_args args = {.struct_size = sizeof args, .rank = rank, .world_size = world, .local_rank = rank,
                            .local_world_size = world, .device = {ST_DEVICE_CPU, 0}, .store = store,
                            .timeout_ms = 120000};
  st_comm *comm = NULL;
  if (be->init(NULL, &args, &comm, &err) != ST_OK) {
    fprintf(stderr, "rank %d: %s\n", rank, err.message);
    return 1;
  }
  size_t max_bytes = (size_t)MAX_MIB << 20;
  float *buf = malloc(max_bytes);
  for (size_t i = 0; i < max_bytes / 4; i++) buf[i] = (float)(i % 7);
  for (int mib = MIN_MIB; mib <= MAX_MIB; mib *= 2) {
    size_t bytes = (size_t)mib << 20;
    int64_t count = (int64_t)(bytes / 4);
    int iters = iters_for(bytes);
    double t[ITERS_MAX];
    /* warm-up */
    if (be->all_reduce(comm, buf, buf, count, ST_F32, ST_REDUCE_SUM, NULL, &err) != ST_OK) break;
    for (int it = 0; it < iters; it++) {
      if (be->barrier(comm, &err) != ST_OK) break;
      double t0 = now();
      if (be->all_reduce(comm, buf, buf, count, ST_F32, ST_REDUCE_SUM, NULL, &err) != ST_OK) break;
      double dt = now() - t0;
      /* the slowest rank's time */
      if (be->all_reduce(comm, &dt, &dt, 1, ST_F64, ST_REDUCE_MAX, NULL, &err) != ST_OK) break;
      t[it] = dt;
    }
    if (err.code != ST_OK) {
      fprintf(stderr, "rank %d: %s\n", rank, err.message);
      break;
    }
    double med = median(t, iters);
    double algbw = (double)bytes / med / 1e9, busbw = algbw * 2.0 * (world - 1) / world;
    if (rank == 0)
      printf("%-8s %5d %8d MiB %10.3f ms %9.2f GB/s %9.2f GB/s\n", backend, world, mib, med * 1e3, algbw, busbw);
    fflush(stdout);
  }
  free(buf);
  be->finalize(comm);
  st_plugin_unload(&plugin);
  st_store_close(store);
  return err.code == ST_OK ? 0 : 1;
}

static void bench_memcpy(void) {
  size_t max_bytes = (size_t)MAX_MIB << 20;
  char *a = malloc(max_bytes), *b = malloc(max_bytes);
  memset(a, 1, max_bytes);
  memset(b, 2, max_bytes);
  printf("\nmemcpy (one thread), the per-link ceiling of a loopback ring:\n");
  for (int mib = MIN_MIB; mib <= MAX_MIB; mib *= 2) {
    size_t bytes = (size_t)mib << 20;
    double t[ITERS_MAX];
    int iters = iters_for(bytes);
    for (int it = 0; it < iters; it++) {
      double t0 = now();
      memcpy(b, a, bytes);
      t[it] = now() - t0;
      a[it] = b[bytes - 1 - (size_t)it]; /* keep the copy observable */
    }
    printf("memcpy         %8d MiB %10.3f ms %9.2f GB/s\n", mib, median(t, iters) * 1e3,
           (double)bytes / median(t, iters) / 1e9);
  }
  free(a);
  free(b);
}

int main(int argc, char **argv) {
  signal(SIGPIPE, SIG_IGN);
  const char *backend = argc > 1 ? argv[1] : "gloo";
  int worlds[8] = {2, 4}, nworlds = 2;
  if (argc > 2) {
    nworlds = 0;
    for (int i = 2; i < argc && nworlds < 8; i++) worlds[nworlds++] = atoi(argv[i]);
  }
  printf("all-reduce fp32 SUM, %d-%d MiB, local ranks over loopback (%ld CPUs online)\n", MIN_MIB, MAX_MIB,
         sysconf(_SC_NPROCESSORS_ONLN));
  printf("%-8s %5s %12s %13s %14s %14s\n", "backend", "ranks", "size", "time", "algbw", "busbw");
  for (int w = 0; w < nworlds; w++) {
    int world = worlds[w];
    if (world < 1 || world > 64) continue;
    int port = 0;
    pid_t store_pid = store_process_start("bench", &port);
    if (store_pid < 0) {
      fprintf(stderr, "bench_comm: cannot start the store process\n");
      return 1;
    }
    fflush(stdout);
    pid_t *pids = calloc((size_t)world, sizeof *pids);
    for (int r = 0; r < world; r++) {
      pids[r] = fork();
      if (pids[r] == 0) _exit(rank_main(backend, r, world, port));
    }
    int failed = 0;
    for (int r = 0; r < world; r++) {
      int status = 0;
      waitpid(pids[r], &status, 0);
      failed |= !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    }
    free(pids);
    store_process_stop(store_pid);
    if (failed) {
      fprintf(stderr, "bench_comm: a rank failed with %d ranks\n", world);
      return 1;
    }
  }
  bench_memcpy();
  return 0;
}
