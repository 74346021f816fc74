/* env.c — `strata env`: versions, SIMD level, cores and NUMA, memory limits, accelerators. */
#include <cblas.h>
#include <hwloc.h>
#include <jansson.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "cpu_ops.h"
#include "env.h"

/* OpenBLAS's own introspection (declared in its cblas.h on Debian; repeated for other layouts) */
char *openblas_get_config(void);
int openblas_get_num_threads(void);

static void print_limit(FILE *out, const char *label, rlim_t v) {
  if (v == RLIM_INFINITY) fprintf(out, "  %-22s unlimited\n", label);
  else fprintf(out, "  %-22s %.1f MiB\n", label, (double)v / (1024.0 * 1024.0));
}

void st_env_report(FILE *out) {
  fprintf(out, "strata %s (plugin ABI v%d, fingerprint %s)\n", ST_VERSION_STRING, ST_ABI_VERSION, ST_BUILD_FINGERPRINT);
  fprintf(out, "  %-22s %s\n", "compiler", __VERSION__);
  fprintf(out, "  %-22s %s\n", "jansson", JANSSON_VERSION);
  unsigned hv = hwloc_get_api_version();
  fprintf(out, "  %-22s %u.%u.%u\n", "hwloc", hv >> 16, (hv >> 8) & 0xff, hv & 0xff);
  fprintf(out, "  %-22s %s (%d threads)\n", "OpenBLAS", openblas_get_config(), openblas_get_num_threads());
  fprintf(out, "  %-22s not built (CPU only)\n", "CUDA / cuDNN / NCCL");
  fprintf(out, "  %-22s %s\n", "CPU kernels", st_cpu_simd_level());

  hwloc_topology_t topo;
  if (hwloc_topology_init(&topo) == 0 && hwloc_topology_load(topo) == 0) {
    int cores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
    int pus = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PU);
    int numa = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
    int packages = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_PACKAGE);
    fprintf(out, "  %-22s %d package(s), %d core(s), %d hardware thread(s), %d NUMA node(s)\n", "topology", packages,
            cores, pus, numa);
    hwloc_obj_t root = hwloc_get_root_obj(topo);
    if (root && root->total_memory)
      fprintf(out, "  %-22s %.1f GiB\n", "host memory", (double)root->total_memory / (1024.0 * 1024.0 * 1024.0));
    hwloc_topology_destroy(topo);
  } else {
    fprintf(out, "  %-22s unavailable (hwloc could not load it)\n", "topology");
  }
  struct rlimit rl;
  if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
    print_limit(out, "memlock (pinned mem)", rl.rlim_cur);
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < (rlim_t)1 << 30)
      fprintf(out, "  %-22s pinned host buffers fall back to pageable memory (raise `ulimit -l`)\n", "");
  }
  struct statvfs vfs;
  if (statvfs("/dev/shm", &vfs) == 0)
    fprintf(out, "  %-22s %.1f GiB free of %.1f GiB\n", "/dev/shm", (double)vfs.f_bavail * vfs.f_frsize / (1 << 30),
            (double)vfs.f_blocks * vfs.f_frsize / (1 << 30));
  fprintf(out, "  %-22s none (this build has no CUDA backend)\n", "GPUs");
}
