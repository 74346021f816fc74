/* env.c — `strata env`: versions, SIMD level, cores and NUMA, memory limits, accelerators. */
#include <arpa/inet.h>
#include <errno.h>
#include <cblas.h>
#include <hwloc.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <jansson.h>
#include <sys/resource.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "cpu_ops.h"
#include "env.h"
#include "launch.h"
#include "plugin.h"

/* OpenBLAS's own introspection (declared in its cblas.h on Debian; repeated for other layouts) */
char *openblas_get_config(void);
int openblas_get_num_threads(void);

static void print_limit(FILE *out, const char *label, rlim_t v) {
  if (v == RLIM_INFINITY) fprintf(out, "  %-22s unlimited\n", label);
  else fprintf(out, "  %-22s %.1f MiB\n", label, (double)v / (1024.0 * 1024.0));
}

/* the comm backends this build finds, loaded the way a run loads them; Gloo's version comes from
 * the plugin's version string ("0.1.0 (gloo 0.5.0, tcp)") */
static void report_comm(FILE *out) {
  fprintf(out, "  %-22s local (built-in, world size 1)\n", "comm backends");
  static const char *names[] = {"gloo", "nccl"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    st_plugin p;
    st_error err;
    st_error_clear(&err);
    memset(&p, 0, sizeof p);
    if (st_plugin_load(ST_PLUGIN_COMM, names[i], NULL, 0, &p, &err) == ST_OK) {
      fprintf(out, "  %-22s %s %s (%s)\n", "", p.header->name, p.header->version, p.path);
      st_plugin_unload(&p);
    } else {
      fprintf(out, "  %-22s %s: not found%s\n", "", names[i],
              !strcmp(names[i], "gloo") ? " (build with libgloo-dev installed: -Dgloo=enabled)" : " (not built)");
    }
  }
  st_dist_env de;
  st_error err;
  if (st_dist_env_detect(NULL, &de, &err) == ST_OK) {
    char desc[512];
    st_dist_env_describe(&de, desc, sizeof desc);
    fprintf(out, "  %-22s %s\n", "this process", desc);
  } else {
    fprintf(out, "  %-22s %s: %s\n", "this process", err.where, err.message);
  }
  const char *iface = getenv("STRATA_COMM_INTERFACE");
  if (!iface) iface = getenv("GLOO_SOCKET_IFNAME");
  fprintf(out, "  %-22s %s\n", "comm interface", iface ? iface : "default (loopback on one machine, else the host name's address; set STRATA_COMM_INTERFACE)");
}

static void report_interfaces(FILE *out) {
  struct ifaddrs *ifs = NULL;
  if (getifaddrs(&ifs) != 0) {
    fprintf(out, "  %-22s unavailable (%s)\n", "network interfaces", strerror(errno));
    return;
  }
  const char *label = "network interfaces";
  for (struct ifaddrs *a = ifs; a; a = a->ifa_next) {
    if (!a->ifa_addr || (a->ifa_addr->sa_family != AF_INET && a->ifa_addr->sa_family != AF_INET6)) continue;
    char addr[INET6_ADDRSTRLEN] = "?";
    const void *raw = a->ifa_addr->sa_family == AF_INET ? (const void *)&((struct sockaddr_in *)a->ifa_addr)->sin_addr
                                                        : (const void *)&((struct sockaddr_in6 *)a->ifa_addr)->sin6_addr;
    inet_ntop(a->ifa_addr->sa_family, raw, addr, sizeof addr);
    fprintf(out, "  %-22s %-10s %-28s %s%s\n", label, a->ifa_name, addr, (a->ifa_flags & IFF_UP) ? "up" : "down",
            (a->ifa_flags & IFF_LOOPBACK) ? ", loopback" : "");
    label = "";
  }
  freeifaddrs(ifs);
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
  report_comm(out);
  report_interfaces(out);
}
