/* bench_comm_mpi — the reference for bench_comm: MPI_Allreduce (fp32 SUM, 1-64 MiB) timed exactly as
 * bench_comm times the comm backend (median over iterations of the slowest rank's time; busbw =
 * bytes / time * 2 (n - 1) / n). Built when an MPI is found; run with
 *   mpirun -np 2 bench_comm_mpi ; mpirun -np 4 --oversubscribe bench_comm_mpi */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

int main(int argc, char **argv) {
  MPI_Init(&argc, &argv);
  int rank, world;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  size_t max_bytes = (size_t)64 << 20;
  float *buf = malloc(max_bytes);
  for (size_t i = 0; i < max_bytes / 4; i++) buf[i] = (float)(i % 7);
  for (int mib = 1; mib <= 64; mib *= 2) {
    size_t bytes = (size_t)mib << 20;
    int count = (int)(bytes / 4), iters = bytes >= (32u << 20) ? 6 : bytes >= (8u << 20) ? 10 : 20;
    double t[20];
    MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    for (int it = 0; it < iters; it++) {
      MPI_Barrier(MPI_COMM_WORLD);
      double t0 = MPI_Wtime();
      MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
      double dt = MPI_Wtime() - t0;
      MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      t[it] = dt;
    }
    qsort(t, (size_t)iters, sizeof t[0], cmp_double);
    double med = iters % 2 ? t[iters / 2] : 0.5 * (t[iters / 2 - 1] + t[iters / 2]);
    double algbw = (double)bytes / med / 1e9;
    if (rank == 0)
      printf("%-8s %5d %8d MiB %10.3f ms %9.2f GB/s %9.2f GB/s\n", "mpi", world, mib, med * 1e3, algbw,
             algbw * 2.0 * (world - 1) / world);
  }
  free(buf);
  MPI_Finalize();
  return 0;
}
