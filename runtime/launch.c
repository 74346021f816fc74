/* launch.c — `strata launch` (one process per rank, fail-fast, restarts, logs, CPU binding), the
 * detection of a job's shape from the environment, and opening the rendezvous store (launch.h). */
#include "launch.h"

#include <errno.h>
#include <fcntl.h>
#include <hwloc.h>
#include <hwloc/glibc-sched.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

/* ================================================================ environment detection */

static const char *env_get(const char *const *envp, const char *name) {
  if (!envp) return getenv(name);
  size_t n = strlen(name);
  for (const char *const *e = envp; *e; e++)
    if (!strncmp(*e, name, n) && (*e)[n] == '=') return *e + n + 1;
  return NULL;
}

/* a strict non-negative integer from variable `name`; false (err filled) when set but malformed */
static bool env_int(const char *const *envp, const char *name, int *out, bool *present, st_error *err) {
  const char *v = env_get(envp, name);
  *present = v && *v;
  if (!*present) return true;
  char *end;
  errno = 0;
  long x = strtol(v, &end, 10);
  if (errno || end == v || *end || x < 0 || x > INT_MAX) {
    st_error_set(err, ST_ERR_CONFIG, name, "%s=%s is not a non-negative integer", name, v);
    return false;
  }
  *out = (int)x;
  return true;
}

/* "4", "4(x2)", "4(x2),3": the count for node `node` (by order); 0 when unparsable */
static int slurm_tasks_on_node(const char *spec, int node) {
  int seen = 0;
  const char *p = spec;
  while (p && *p) {
    char *end;
    long count = strtol(p, &end, 10);
    if (end == p) return 0;
    long reps = 1;
    if (*end == '(' && end[1] == 'x') {
      reps = strtol(end + 2, &end, 10);
      if (*end == ')') end++;
    }
    if (node < seen + reps) return (int)count;
    seen += (int)reps;
    p = *end == ',' ? end + 1 : NULL;
  }
  return 0;
}

/* the first host of a Slurm node list: "gpu[003-004,010],cpu1" -> "gpu003"; "a,b" -> "a" */
static void slurm_first_host(const char *list, char *out, size_t cap) {
  size_t i = 0, o = 0;
  while (list[i] && list[i] != ',' && list[i] != '[' && o + 1 < cap) out[o++] = list[i++];
  if (list[i] == '[') {
    i++;
    while (list[i] && list[i] != '-' && list[i] != ',' && list[i] != ']' && o + 1 < cap) out[o++] = list[i++];
  }
  out[o] = '\0';
}

st_result st_dist_env_detect(const char *const *envp, st_dist_env *out, st_error *err) {
  memset(out, 0, sizeof *out);
  out->world_size = out->local_world_size = out->num_nodes = 1;
  out->master_port = 29500;
  snprintf(out->master_addr, sizeof out->master_addr, "127.0.0.1");
  out->source = "single process";
  int rank = 0, world = 1, lrank = -1, lworld = -1;
  bool has_rank = false, has_world = false, has_l = false, has_lw = false;
  const char *rank_var = "RANK", *world_var = "WORLD_SIZE";

  /* 1. strata launch / torchrun */
  if (!env_int(envp, "RANK", &rank, &has_rank, err) || !env_int(envp, "WORLD_SIZE", &world, &has_world, err))
    return err->code;
  if (has_rank || has_world) {
    if (!has_rank || !has_world)
      return st_error_set(err, ST_ERR_CONFIG, has_rank ? "WORLD_SIZE" : "RANK",
                          "RANK and WORLD_SIZE must be set together (found only %s)", has_rank ? "RANK" : "WORLD_SIZE");
    if (!env_int(envp, "LOCAL_RANK", &lrank, &has_l, err) || !env_int(envp, "LOCAL_WORLD_SIZE", &lworld, &has_lw, err))
      return err->code;
    const char *launched = env_get(envp, "STRATA_LAUNCHED");
    out->source = launched && !strcmp(launched, "1") ? "strata launch"
                  : env_get(envp, "TORCHELASTIC_RUN_ID") ? "torchrun" : "RANK/WORLD_SIZE";
  } else if (env_get(envp, "OMPI_COMM_WORLD_RANK")) { /* 2. Open MPI */
    rank_var = "OMPI_COMM_WORLD_RANK", world_var = "OMPI_COMM_WORLD_SIZE";
    if (!env_int(envp, rank_var, &rank, &has_rank, err) || !env_int(envp, world_var, &world, &has_world, err) ||
        !env_int(envp, "OMPI_COMM_WORLD_LOCAL_RANK", &lrank, &has_l, err) ||
        !env_int(envp, "OMPI_COMM_WORLD_LOCAL_SIZE", &lworld, &has_lw, err))
      return err->code;
    out->source = "openmpi";
  } else if (env_get(envp, "PMI_RANK")) { /* 3. MPICH / Intel MPI (hydra) */
    rank_var = "PMI_RANK", world_var = "PMI_SIZE";
    if (!env_int(envp, rank_var, &rank, &has_rank, err) || !env_int(envp, world_var, &world, &has_world, err) ||
        !env_int(envp, "MPI_LOCALRANKID", &lrank, &has_l, err) || !env_int(envp, "MPI_LOCALNRANKS", &lworld, &has_lw, err))
      return err->code;
    out->source = "pmi";
  } else if (env_get(envp, "SLURM_PROCID")) { /* 4. Slurm (srun) */
    rank_var = "SLURM_PROCID", world_var = "SLURM_NTASKS";
    if (!env_int(envp, rank_var, &rank, &has_rank, err) || !env_int(envp, world_var, &world, &has_world, err) ||
        !env_int(envp, "SLURM_LOCALID", &lrank, &has_l, err))
      return err->code;
    int node = 0;
    bool has_node = false;
    if (!env_int(envp, "SLURM_NODEID", &node, &has_node, err)) return err->code;
    const char *tpn = env_get(envp, "SLURM_TASKS_PER_NODE");
    if (!tpn) tpn = env_get(envp, "SLURM_NTASKS_PER_NODE");
    if (tpn && (lworld = slurm_tasks_on_node(tpn, node)) > 0) has_lw = true;
    const char *nodes = env_get(envp, "SLURM_JOB_NODELIST");
    if (!nodes) nodes = env_get(envp, "SLURM_NODELIST");
    if (nodes && *nodes) slurm_first_host(nodes, out->master_addr, sizeof out->master_addr);
    const char *job = env_get(envp, "SLURM_JOB_ID");
    if (job) out->master_port = 20000 + (int)(strtoul(job, NULL, 10) % 20000); /* the same on every task */
    out->source = "slurm";
  }
  if (has_rank && !has_world)
    return st_error_set(err, ST_ERR_CONFIG, world_var, "%s is set but %s is not", rank_var, world_var);
  if (world < 1) return st_error_set(err, ST_ERR_CONFIG, world_var, "%s=%d: the world needs at least one rank", world_var, world);
  if (rank >= world)
    return st_error_set(err, ST_ERR_CONFIG, rank_var, "%s=%d is not below the world size %d (%s)", rank_var, rank, world,
                        world_var);
  if (!has_lw) lworld = world; /* unknown: assume one node */
  if (!has_l) lrank = lworld == world ? rank : rank % lworld;
  if (lworld < 1 || lworld > world || world % lworld)
    return st_error_set(err, ST_ERR_CONFIG, "LOCAL_WORLD_SIZE",
                        "local world size %d does not divide the world size %d (every node must run as many ranks)",
                        lworld, world);
  if (lrank >= lworld)
    return st_error_set(err, ST_ERR_CONFIG, "LOCAL_RANK", "local rank %d is not below the local world size %d", lrank,
                        lworld);
  out->rank = rank;
  out->world_size = world;
  out->local_rank = lrank;
  out->local_world_size = lworld;
  out->num_nodes = world / lworld;
  out->node_rank = rank / lworld;

  const char *addr = env_get(envp, "MASTER_ADDR");
  if (addr && *addr) {
    if (strlen(addr) >= sizeof out->master_addr)
      return st_error_set(err, ST_ERR_CONFIG, "MASTER_ADDR", "MASTER_ADDR is longer than %zu characters",
                          sizeof out->master_addr - 1);
    snprintf(out->master_addr, sizeof out->master_addr, "%s", addr);
  }
  int port = 0;
  bool has_port = false;
  if (!env_int(envp, "MASTER_PORT", &port, &has_port, err)) return err->code;
  if (has_port) {
    if (port < 1 || port > 65535) return st_error_set(err, ST_ERR_CONFIG, "MASTER_PORT", "MASTER_PORT=%d is not a TCP port", port);
    out->master_port = port;
  }
  out->store_port = out->master_port + (!strcmp(out->source, "torchrun") ? 1 : 0);
  if (out->store_port > 65535) out->store_port = out->master_port - 1;
  if (!env_int(envp, "STRATA_STORE_PORT", &port, &has_port, err)) return err->code;
  if (has_port) {
    if (port < 1 || port > 65535)
      return st_error_set(err, ST_ERR_CONFIG, "STRATA_STORE_PORT", "STRATA_STORE_PORT=%d is not a TCP port", port);
    out->store_port = port;
  }
  const char *ext = env_get(envp, "STRATA_STORE_EXTERNAL");
  out->store_external = ext && !strcmp(ext, "1");
  const char *token = env_get(envp, "STRATA_STORE_TOKEN");
  if (token && strlen(token) > ST_STORE_TOKEN_MAX)
    return st_error_set(err, ST_ERR_CONFIG, "STRATA_STORE_TOKEN", "STRATA_STORE_TOKEN is longer than %d characters",
                        ST_STORE_TOKEN_MAX);
  snprintf(out->token, sizeof out->token, "%s", token ? token : "");
  bool has_rc = false;
  if (!env_int(envp, "STRATA_RESTART_COUNT", &out->restart_count, &has_rc, err)) return err->code;
  if (!has_rc && !env_int(envp, "TORCHELASTIC_RESTART_COUNT", &out->restart_count, &has_rc, err)) return err->code;
  return ST_OK;
}

void st_dist_env_describe(const st_dist_env *e, char *buf, size_t cap) {
  snprintf(buf, cap, "rank %d of %d (local %d of %d, node %d of %d), store %s:%d, from %s", e->rank, e->world_size,
           e->local_rank, e->local_world_size, e->node_rank, e->num_nodes, e->master_addr, e->store_port, e->source);
}

st_result st_dist_store_open(const st_dist_env *env, int64_t timeout_ms, st_store_server **server, st_store **store,
                             st_error *err) {
  *server = NULL;
  *store = NULL;
  if (env->world_size <= 1) return ST_OK;
  if (env->rank == 0 && !env->store_external) {
    const char *bind = env->num_nodes > 1 ? NULL : "127.0.0.1";
    ST_CHECK(st_store_server_start(bind, env->store_port, env->token, server, err));
  }
  st_result r = st_store_connect(env->master_addr, env->store_port, env->token, env->rank, timeout_ms, store, err);
  if (r != ST_OK) {
    st_store_server_stop(*server);
    *server = NULL;
  }
  return r;
}

void st_dist_store_close(const st_dist_env *env, st_store_server *server, st_store *store, int64_t timeout_ms) {
  if (store) { /* everyone meets first, so that the host does not take the store down under the others */
    st_error e;
    store->barrier(store, "strata/exit", env->rank, env->world_size, timeout_ms, &e);
  }
  st_store_close(store);
  st_store_server_stop(server);
}

/* ================================================================ strata launch */

typedef enum bind_mode { BIND_AUTO, BIND_NONE, BIND_CORE, BIND_NUMA } bind_mode;

typedef struct launch_opts {
  int nproc_per_node, num_processes, nnodes, node_rank, master_port, max_restarts;
  char master_addr[256];
  char log_dir[1024];
  bind_mode bind;
  double stop_grace_s;
  char **cmd; /* NULL-terminated */
  int ncmd;
} launch_opts;

typedef struct rank_proc {
  int rank, local_rank;
  pid_t pid;
  int out_fd; /* read end of the child's stdout+stderr; -1 once at EOF */
  int log_fd;
  char log_path[1200];
  bool at_line_start, exited;
  int status;
} rank_proc;

static volatile sig_atomic_t launch_interrupted = 0;
static void on_launch_signal(int sig) { launch_interrupted = sig; }

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static const char launch_usage[] =
    "usage: strata launch [options] [--] COMMAND [ARGS...]\n"
    "       strata launch [options] CONFIG.json [train options]   (runs `strata train CONFIG.json ...`)\n"
    "\n"
    "options (accelerate and torchrun spellings are both accepted):\n"
    "  --num_processes N            total processes across all machines (accelerate)\n"
    "  --nproc_per_node N           processes on this machine (torchrun)\n"
    "  --num_machines M, --nnodes M number of machines (default 1)\n"
    "  --machine_rank R, --node_rank R   this machine's index (default 0; machine 0 hosts the store)\n"
    "  --main_process_ip A, --master_addr A     address of machine 0 (default 127.0.0.1)\n"
    "  --main_process_port P, --master_port P   store port on machine 0 (default: a free port on one\n"
    "                               machine, 29500 on several)\n"
    "  --max_restarts N             restart all ranks up to N times after a failure (default 0)\n"
    "  --bind none|core|numa        pin each local rank to its share of cores or to one NUMA node\n"
    "                               (default: numa on multi-NUMA machines, else none)\n"
    "  --log_dir DIR                per-rank logs: DIR/attempt_K/rank_R.log (default strata-launch-logs)\n"
    "  --stop_grace S               seconds between SIGTERM and SIGKILL when stopping ranks (default 5)\n"
    "\n"
    "children get RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT,\n"
    "STRATA_STORE_TOKEN (a random per-job secret; set it yourself to share one across machines) and\n"
    "STRATA_RESTART_COUNT. When one rank fails the others are stopped and the launcher exits non-zero\n"
    "naming the rank, how it ended, and the tail of its log.\n";

static bool parse_int_arg(const char *flag, const char *v, int lo, int *out) {
  char *end;
  errno = 0;
  long x = v ? strtol(v, &end, 10) : 0;
  if (!v || errno || end == v || *end || x < lo || x > INT_MAX) {
    fprintf(stderr, "strata launch: %s needs an integer >= %d (got '%s')\n", flag, lo, v ? v : "");
    return false;
  }
  *out = (int)x;
  return true;
}

static const char *self_exe(char *buf, size_t cap) {
  const char *e = getenv("STRATA_EXE");
  if (e && *e) return e;
  ssize_t n = readlink("/proc/self/exe", buf, cap - 1);
  if (n <= 0) return "strata";
  buf[n] = '\0';
  return buf;
}

/* returns 0 on success, 2 on a usage error (printed), 1 for --help (printed) */
static int parse_launch_args(int argc, char **argv, launch_opts *o, char *exe_buf, size_t exe_cap) {
  memset(o, 0, sizeof *o);
  o->nproc_per_node = o->num_processes = o->nnodes = o->node_rank = o->master_port = -1;
  o->bind = BIND_AUTO;
  o->stop_grace_s = 5.0;
  snprintf(o->log_dir, sizeof o->log_dir, "strata-launch-logs");
  int i = argc > 0 && !strcmp(argv[0], "launch") ? 1 : 0;
  for (; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--")) {
      i++;
      break;
    }
    if (strncmp(a, "--", 2)) break; /* the command starts */
    if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
      fputs(launch_usage, stdout);
      return 1;
    }
    char flag[64];
    const char *val = NULL, *eq = strchr(a, '=');
    if (eq) {
      snprintf(flag, sizeof flag, "%.*s", (int)(eq - a), a);
      val = eq + 1;
    } else {
      snprintf(flag, sizeof flag, "%s", a);
    }
    for (char *p = flag; *p; p++)
      if (*p == '-' && p > flag + 1) *p = '_'; /* --nproc-per-node == --nproc_per_node */
    bool known = true;
#define TAKE()                                                                                                    \
  do {                                                                                                            \
    if (!val) {                                                                                                   \
      if (i + 1 >= argc) {                                                                                        \
        fprintf(stderr, "strata launch: %s needs a value\n", flag);                                               \
        return 2;                                                                                                 \
      }                                                                                                           \
      val = argv[++i];                                                                                            \
    }                                                                                                             \
  } while (0)
    if (!strcmp(flag, "--num_processes")) {
      TAKE();
      if (!parse_int_arg(flag, val, 1, &o->num_processes)) return 2;
    } else if (!strcmp(flag, "--nproc_per_node")) {
      TAKE();
      if (!parse_int_arg(flag, val, 1, &o->nproc_per_node)) return 2;
    } else if (!strcmp(flag, "--num_machines") || !strcmp(flag, "--nnodes")) {
      TAKE();
      if (!parse_int_arg(flag, val, 1, &o->nnodes)) return 2;
    } else if (!strcmp(flag, "--machine_rank") || !strcmp(flag, "--node_rank")) {
      TAKE();
      if (!parse_int_arg(flag, val, 0, &o->node_rank)) return 2;
    } else if (!strcmp(flag, "--main_process_ip") || !strcmp(flag, "--master_addr")) {
      TAKE();
      snprintf(o->master_addr, sizeof o->master_addr, "%s", val);
    } else if (!strcmp(flag, "--main_process_port") || !strcmp(flag, "--master_port")) {
      TAKE();
      if (!parse_int_arg(flag, val, 1, &o->master_port) || o->master_port > 65535) return 2;
    } else if (!strcmp(flag, "--max_restarts")) {
      TAKE();
      if (!parse_int_arg(flag, val, 0, &o->max_restarts)) return 2;
    } else if (!strcmp(flag, "--bind")) {
      TAKE();
      if (!strcmp(val, "none")) o->bind = BIND_NONE;
      else if (!strcmp(val, "core")) o->bind = BIND_CORE;
      else if (!strcmp(val, "numa")) o->bind = BIND_NUMA;
      else {
        fprintf(stderr, "strata launch: --bind takes none, core or numa (got '%s')\n", val);
        return 2;
      }
    } else if (!strcmp(flag, "--log_dir")) {
      TAKE();
      snprintf(o->log_dir, sizeof o->log_dir, "%s", val);
    } else if (!strcmp(flag, "--stop_grace")) {
      TAKE();
      char *end;
      o->stop_grace_s = strtod(val, &end);
      if (end == val || *end || o->stop_grace_s < 0) {
        fprintf(stderr, "strata launch: --stop_grace needs seconds >= 0 (got '%s')\n", val);
        return 2;
      }
    } else {
      known = false;
    }
#undef TAKE
    if (!known) {
      fprintf(stderr, "strata launch: unknown option '%s' (strata launch --help lists them)\n", a);
      return 2;
    }
  }
  if (i >= argc) {
    fprintf(stderr, "strata launch: no command given\n\n%s", launch_usage);
    return 2;
  }
  /* the command: CONFIG.json is shorthand for `strata train CONFIG.json`; a leading `strata` is this binary */
  int rest = argc - i;
  size_t len = strlen(argv[i]);
  bool shorthand = len > 5 && !strcmp(argv[i] + len - 5, ".json");
  o->cmd = calloc((size_t)rest + 3, sizeof(char *));
  if (!o->cmd) return 2;
  const char *exe = self_exe(exe_buf, exe_cap);
  if (shorthand) {
    o->cmd[o->ncmd++] = (char *)exe;
    o->cmd[o->ncmd++] = "train";
  }
  for (int k = i; k < argc; k++) o->cmd[o->ncmd++] = argv[k];
  if (!shorthand && !strcmp(o->cmd[0], "strata")) o->cmd[0] = (char *)exe;

  /* shape */
  if (o->nnodes < 0) o->nnodes = 1;
  if (o->node_rank < 0) o->node_rank = 0;
  if (o->node_rank >= o->nnodes) {
    fprintf(stderr, "strata launch: --machine_rank/--node_rank %d is not below --num_machines/--nnodes %d\n",
            o->node_rank, o->nnodes);
    return 2;
  }
  if (o->num_processes > 0 && o->nproc_per_node > 0 && o->num_processes != o->nproc_per_node * o->nnodes) {
    fprintf(stderr, "strata launch: --num_processes %d is not --nproc_per_node %d x %d machine(s)\n", o->num_processes,
            o->nproc_per_node, o->nnodes);
    return 2;
  }
  if (o->nproc_per_node < 0) {
    if (o->num_processes > 0) {
      if (o->num_processes % o->nnodes) {
        fprintf(stderr, "strata launch: --num_processes %d does not split evenly over %d machines\n", o->num_processes,
                o->nnodes);
        return 2;
      }
      o->nproc_per_node = o->num_processes / o->nnodes;
    } else {
      o->nproc_per_node = 1;
    }
  }
  if (!o->master_addr[0]) {
    if (o->nnodes > 1) {
      fprintf(stderr, "strata launch: with %d machines, --main_process_ip/--master_addr must name machine 0\n",
              o->nnodes);
      return 2;
    }
    snprintf(o->master_addr, sizeof o->master_addr, "127.0.0.1");
  }
  if (o->master_port < 0 && o->nnodes > 1) o->master_port = 29500;
  return 0;
}

/* cpu sets per local rank; false (message printed) when hwloc fails. *mode_out: the mode applied */
static bool compute_binding(bind_mode mode, int nproc, cpu_set_t *sets, bind_mode *mode_out, char *desc, size_t cap) {
  hwloc_topology_t topo;
  *mode_out = BIND_NONE;
  desc[0] = '\0';
  if (mode == BIND_NONE) return true;
  if (hwloc_topology_init(&topo) || hwloc_topology_load(topo)) {
    fprintf(stderr, "strata launch: hwloc cannot read the topology; running without --bind\n");
    return mode == BIND_AUTO;
  }
  int ncores = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_CORE);
  int nnuma = hwloc_get_nbobjs_by_type(topo, HWLOC_OBJ_NUMANODE);
  if (mode == BIND_AUTO) mode = nnuma > 1 && nproc > 1 ? BIND_NUMA : BIND_NONE;
  bool ok = true;
  for (int lr = 0; lr < nproc && mode != BIND_NONE; lr++) {
    hwloc_bitmap_t set = hwloc_bitmap_alloc();
    if (mode == BIND_NUMA && nnuma > 0) {
      hwloc_obj_t node = hwloc_get_obj_by_type(topo, HWLOC_OBJ_NUMANODE, (unsigned)(lr % nnuma));
      if (node && node->cpuset) hwloc_bitmap_copy(set, node->cpuset);
    } else if (ncores > 0) {
      int first = ncores >= nproc ? lr * ncores / nproc : lr % ncores;
      int last = ncores >= nproc ? (lr + 1) * ncores / nproc : first + 1;
      for (int c = first; c < last; c++) {
        hwloc_obj_t core = hwloc_get_obj_by_type(topo, HWLOC_OBJ_CORE, (unsigned)c);
        if (core && core->cpuset) hwloc_bitmap_or(set, set, core->cpuset);
      }
    }
    if (hwloc_bitmap_iszero(set) || hwloc_cpuset_to_glibc_sched_affinity(topo, set, &sets[lr], sizeof sets[lr])) ok = false;
    if (lr < 4 && ok) {
      char s[128];
      hwloc_bitmap_list_snprintf(s, sizeof s, set);
      size_t used = strlen(desc);
      snprintf(desc + used, cap - used, "%slocal rank %d -> cpus %s", lr ? ", " : "", lr, s);
    }
    hwloc_bitmap_free(set);
  }
  hwloc_topology_destroy(topo);
  if (!ok) {
    fprintf(stderr, "strata launch: could not compute a CPU binding; running without --bind\n");
    return true;
  }
  *mode_out = mode;
  return true;
}

/* writes all of buf; ignores errors (a full disk must not stop training) */
static void write_all(int fd, const char *buf, size_t n) {
  while (n) {
    ssize_t k = write(fd, buf, n);
    if (k < 0 && errno == EINTR) continue;
    if (k <= 0) return;
    buf += k;
    n -= (size_t)k;
  }
}

/* copies a chunk of rank output to its log and to stdout with "[rank R] " at each line start */
static void forward_output(rank_proc *p, const char *buf, size_t n) {
  if (p->log_fd >= 0) write_all(p->log_fd, buf, n);
  char prefix[32];
  int plen = snprintf(prefix, sizeof prefix, "[rank %d] ", p->rank);
  size_t start = 0;
  for (size_t k = 0; k < n; k++) {
    if (p->at_line_start) {
      write_all(STDOUT_FILENO, buf + start, k - start);
      start = k;
      write_all(STDOUT_FILENO, prefix, (size_t)plen);
      p->at_line_start = false;
    }
    if (buf[k] == '\n' || buf[k] == '\r') p->at_line_start = true;
  }
  write_all(STDOUT_FILENO, buf + start, n - start);
}

static void drain(rank_proc *p) {
  char buf[8192];
  for (;;) {
    ssize_t k = read(p->out_fd, buf, sizeof buf);
    if (k > 0) {
      forward_output(p, buf, (size_t)k);
      continue;
    }
    if (k < 0 && errno == EINTR) continue;
    if (k == 0 || (k < 0 && errno != EAGAIN)) {
      close(p->out_fd);
      p->out_fd = -1;
    }
    return;
  }
}

static void print_tail(const char *path, int lines) {
  FILE *f = fopen(path, "r");
  if (!f) return;
  fseek(f, 0, SEEK_END);
  long size = ftell(f);
  long from = size > 16384 ? size - 16384 : 0;
  fseek(f, from, SEEK_SET);
  char *buf = malloc(16385);
  size_t n = buf ? fread(buf, 1, 16384, f) : 0;
  fclose(f);
  if (!buf) return;
  buf[n] = '\0';
  int seen = 0;
  size_t start = n;
  while (start > 0) {
    if (buf[start - 1] == '\n' && start != n && ++seen >= lines) break;
    start--;
  }
  fprintf(stderr, "strata launch: last lines of %s:\n", path);
  char *line = buf + start;
  while (*line) {
    char *nl = strchr(line, '\n');
    if (nl) *nl = '\0';
    fprintf(stderr, "  | %s\n", line);
    if (!nl) break;
    line = nl + 1;
  }
  free(buf);
}

static void describe_status(int status, char *buf, size_t cap) {
  if (WIFEXITED(status)) snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
  else if (WIFSIGNALED(status))
    snprintf(buf, cap, "was killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
  else snprintf(buf, cap, "ended with wait status 0x%x", status);
}

static int mkdirs(const char *path) {
  char tmp[1200];
  snprintf(tmp, sizeof tmp, "%s", path);
  for (char *p = tmp + 1; *p; p++)
    if (*p == '/') {
      *p = '\0';
      if (mkdir(tmp, 0755) && errno != EEXIST) return -1;
      *p = '/';
    }
  return mkdir(tmp, 0755) && errno != EEXIST ? -1 : 0;
}

static void signal_all(rank_proc *procs, int n, int sig) {
  for (int i = 0; i < n; i++)
    if (!procs[i].exited && procs[i].pid > 0) kill(-procs[i].pid, sig);
}

/* a pseudo-terminal as a pipe: fd[0] the master (read), fd[1] the slave; output processing off (no
 * \r\n translation) and the launcher's window size, so progress bars fit. -1 on failure. */
static int open_pty(int fd[2]) {
  int m = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (m < 0) return -1;
  char name[128];
  if (grantpt(m) || unlockpt(m) || ptsname_r(m, name, sizeof name)) {
    close(m);
    return -1;
  }
  int sl = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (sl < 0) {
    close(m);
    return -1;
  }
  struct termios t;
  if (tcgetattr(sl, &t) == 0) {
    t.c_oflag &= ~(tcflag_t)OPOST;
    t.c_lflag &= ~(tcflag_t)ECHO;
    tcsetattr(sl, TCSANOW, &t);
  }
  struct winsize ws;
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0) ioctl(sl, TIOCSWINSZ, &ws);
  fd[0] = m;
  fd[1] = sl;
  return 0;
}

static void env_free(char **envp) {
  if (!envp) return;
  for (char **e = envp; *e; e++) free(*e);
  free(envp);
}

/* this process's environment with the rank's variables set (and torchrun's run id dropped, so the
 * child does not think torchrun started it); NULL when out of memory */
static char **child_env(const launch_opts *o, const rank_proc *p, int attempt, int world, int n, int port,
                        const char *token, bool store_external, const char *omp) {
  enum { EXTRA = 16 };
  size_t count = 0;
  for (char **e = environ; *e; e++) count++;
  char **envp = calloc(count + EXTRA + 1, sizeof *envp);
  if (!envp) return NULL;
  static const char *replaced[] = {"RANK=", "LOCAL_RANK=", "WORLD_SIZE=", "LOCAL_WORLD_SIZE=", "GROUP_RANK=",
                                   "MASTER_ADDR=", "MASTER_PORT=", "STRATA_STORE_TOKEN=", "STRATA_LAUNCHED=",
                                   "STRATA_LOG_FILE=", "STRATA_STORE_EXTERNAL=", "STRATA_RESTART_COUNT=",
                                   "STRATA_STORE_PORT=", "TORCHELASTIC_RUN_ID=", NULL};
  size_t k = 0;
  bool has_omp = false;
  for (char **e = environ; *e; e++) {
    bool drop = false;
    for (const char **r = replaced; *r && !drop; r++) drop = !strncmp(*e, *r, strlen(*r));
    has_omp |= !strncmp(*e, "OMP_NUM_THREADS=", 16);
    if (!drop && !(envp[k++] = strdup(*e))) goto oom;
  }
  char v[2048];
#define ADD(...)                                                                                   \
  do {                                                                                             \
    snprintf(v, sizeof v, __VA_ARGS__);                                                            \
    if (!(envp[k++] = strdup(v))) goto oom;                                                        \
  } while (0)
  ADD("RANK=%d", p->rank);
  ADD("LOCAL_RANK=%d", p->local_rank);
  ADD("WORLD_SIZE=%d", world);
  ADD("LOCAL_WORLD_SIZE=%d", n);
  ADD("GROUP_RANK=%d", o->node_rank);
  ADD("MASTER_ADDR=%s", o->master_addr);
  ADD("MASTER_PORT=%d", port);
  ADD("STRATA_STORE_TOKEN=%s", token);
  ADD("STRATA_LAUNCHED=1");
  ADD("STRATA_LOG_FILE=%s", p->log_path);
  ADD("STRATA_RESTART_COUNT=%d", attempt);
  if (store_external) ADD("STRATA_STORE_EXTERNAL=1");
  if (!has_omp) ADD("OMP_NUM_THREADS=%s", omp); /* like torchrun: no oversubscription by default */
#undef ADD
  return envp;
oom:
  env_free(envp);
  return NULL;
}

/* one attempt: spawn, watch, stop. Returns 0 when all ranks exited 0; else the exit code to use
 * (and *failed_rank set, -1 when interrupted). */
static int run_attempt(const launch_opts *o, int attempt, int port, const char *token, bool store_external,
                       const cpu_set_t *sets, bool bind, int *failed_rank) {
  int n = o->nproc_per_node, world = n * o->nnodes;
  *failed_rank = -1;
  char dir[1100];
  snprintf(dir, sizeof dir, "%s/attempt_%d", o->log_dir, attempt);
  if (mkdirs(dir)) {
    fprintf(stderr, "strata launch: cannot create the log folder %s: %s\n", dir, strerror(errno));
    return 1;
  }
  rank_proc *procs = calloc((size_t)n, sizeof *procs);
  if (!procs) return 1;
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  char omp[16];
  snprintf(omp, sizeof omp, "%ld", cores / n > 0 ? cores / n : 1);
  fflush(stdout);
  fflush(stderr);
  int spawned = 0;
  for (int lr = 0; lr < n; lr++) {
    rank_proc *p = &procs[lr];
    p->local_rank = lr;
    p->rank = o->node_rank * n + lr;
    p->at_line_start = true;
    p->out_fd = p->log_fd = -1;
    snprintf(p->log_path, sizeof p->log_path, "%s/rank_%d.log", dir, p->rank);
    p->log_fd = open(p->log_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int pfd[2];
    /* rank 0 owns the progress bar: on a terminal it writes to a pseudo-terminal, so that it still
     * sees a TTY while its output is logged and prefixed like the others' */
    if (lr == 0 && o->node_rank == 0 && isatty(STDOUT_FILENO) ? open_pty(pfd) : pipe2(pfd, O_CLOEXEC)) {
      fprintf(stderr, "strata launch: pipe: %s\n", strerror(errno));
      break;
    }
    char **envp = child_env(o, p, attempt, world, n, port, token, store_external, omp);
    pid_t pid = envp ? fork() : -1;
    if (pid < 0) {
      fprintf(stderr, "strata launch: fork: %s\n", strerror(errno));
      close(pfd[0]);
      close(pfd[1]);
      env_free(envp);
      break;
    }
    if (pid == 0) {
      setpgid(0, 0);
      dup2(pfd[1], STDOUT_FILENO);
      dup2(pfd[1], STDERR_FILENO);
      signal(SIGPIPE, SIG_DFL);
      signal(SIGINT, SIG_DFL);
      signal(SIGTERM, SIG_DFL);
      /* only async-signal-safe calls between fork and exec: the environment was built before */
      if (bind) sched_setaffinity(0, sizeof sets[lr], &sets[lr]);
      execvpe(o->cmd[0], o->cmd, envp);
      static const char msg1[] = "strata launch: cannot run '", msg2[] = "': ";
      const char *why = strerror(errno);
      write_all(STDERR_FILENO, msg1, sizeof msg1 - 1);
      write_all(STDERR_FILENO, o->cmd[0], strlen(o->cmd[0]));
      write_all(STDERR_FILENO, msg2, sizeof msg2 - 1);
      write_all(STDERR_FILENO, why, strlen(why));
      write_all(STDERR_FILENO, "\n", 1);
      _exit(127);
    }
    env_free(envp);
    setpgid(pid, pid);
    close(pfd[1]);
    fcntl(pfd[0], F_SETFL, fcntl(pfd[0], F_GETFL) | O_NONBLOCK);
    p->pid = pid;
    p->out_fd = pfd[0];
    spawned++;
  }

  int exit_code = 0, alive = spawned;
  bool stopping = spawned < n;
  double stop_deadline = stopping ? now_s() + o->stop_grace_s : 0;
  if (stopping) {
    signal_all(procs, spawned, SIGTERM);
    exit_code = 1;
  }
  struct pollfd *pfds = calloc((size_t)n, sizeof *pfds);
  int *pidx = calloc((size_t)n, sizeof *pidx);
  while (pfds && pidx) {
    int np = 0;
    for (int i = 0; i < spawned; i++)
      if (procs[i].out_fd >= 0) {
        pfds[np] = (struct pollfd){.fd = procs[i].out_fd, .events = POLLIN};
        pidx[np++] = i;
      }
    if (alive == 0 && np == 0) break;
    if (alive == 0) { /* children are gone; a grandchild may still hold a pipe: give it a moment */
      int r = poll(pfds, (nfds_t)np, 200);
      if (r <= 0) break;
    } else if (poll(pfds, (nfds_t)np, 100) < 0 && errno != EINTR) {
      break;
    }
    for (int k = 0; k < np; k++)
      if (pfds[k].revents) drain(&procs[pidx[k]]);
    for (int i = 0; i < spawned; i++) {
      rank_proc *p = &procs[i];
      if (p->exited) continue;
      int status;
      pid_t w = waitpid(p->pid, &status, WNOHANG);
      if (w != p->pid) continue;
      p->exited = true;
      p->status = status;
      alive--;
      bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
      if (!ok && !stopping) {
        char how[128];
        describe_status(status, how, sizeof how);
        *failed_rank = p->rank;
        exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        fprintf(stderr, "strata launch: rank %d (local rank %d, pid %d) %s; stopping the other ranks\n", p->rank,
                p->local_rank, (int)p->pid, how);
        stopping = true;
        stop_deadline = now_s() + o->stop_grace_s;
        signal_all(procs, spawned, SIGTERM);
      }
    }
    if (launch_interrupted && !stopping) {
      fprintf(stderr, "strata launch: %s received; stopping all ranks\n", strsignal(launch_interrupted));
      stopping = true;
      exit_code = 128 + launch_interrupted;
      stop_deadline = now_s() + o->stop_grace_s;
      signal_all(procs, spawned, SIGTERM);
    }
    if (stopping && alive > 0 && now_s() > stop_deadline) {
      signal_all(procs, spawned, SIGKILL);
      stop_deadline = now_s() + 3600;
    }
  }
  free(pfds);
  free(pidx);
  if (*failed_rank >= 0) {
    rank_proc *f = &procs[*failed_rank - o->node_rank * n];
    char how[128];
    describe_status(f->status, how, sizeof how);
    fprintf(stderr, "strata launch: failed: rank %d %s (log: %s)\n", f->rank, how, f->log_path);
    print_tail(f->log_path, 20);
  }
  for (int i = 0; i < n; i++) {
    if (procs[i].out_fd >= 0) close(procs[i].out_fd);
    if (procs[i].log_fd >= 0) close(procs[i].log_fd);
  }
  free(procs);
  return exit_code;
}

int st_launch_main(int argc, char **argv) {
  launch_opts o;
  char exe[4096];
  int pr = parse_launch_args(argc, argv, &o, exe, sizeof exe);
  if (pr) {
    free(o.cmd);
    return pr == 1 ? 0 : 2;
  }
  int n = o.nproc_per_node, world = n * o.nnodes;
  st_error err;
  st_error_clear(&err);

  char token[ST_STORE_TOKEN_MAX + 1];
  const char *given = getenv("STRATA_STORE_TOKEN");
  if (given && *given) {
    snprintf(token, sizeof token, "%s", given);
  } else if (o.nnodes > 1) {
    fprintf(stderr, "strata launch: with %d machines, set STRATA_STORE_TOKEN to the same secret on each (e.g. `export "
                    "STRATA_STORE_TOKEN=$(openssl rand -hex 16)`)\n", o.nnodes);
    free(o.cmd);
    return 2;
  } else if (st_store_token_generate(token, sizeof token, &err) != ST_OK) {
    fprintf(stderr, "strata launch: %s\n", err.message);
    free(o.cmd);
    return 1;
  }

  cpu_set_t *sets = calloc((size_t)n, sizeof *sets);
  bind_mode applied = BIND_NONE;
  char bind_desc[512];
  if (!sets || !compute_binding(o.bind, n, sets, &applied, bind_desc, sizeof bind_desc)) {
    free(sets);
    free(o.cmd);
    return 2;
  }

  struct sigaction sa, old_int, old_term;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_launch_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  launch_interrupted = 0;

  int code = 0, port = o.master_port;
  for (int attempt = 0; attempt <= o.max_restarts; attempt++) {
    st_store_server *srv = NULL;
    if (o.node_rank == 0) { /* machine 0 hosts the store, fresh for every attempt */
      if (st_store_server_start(o.nnodes > 1 ? NULL : "127.0.0.1", port > 0 ? port : 0, token, &srv, &err) != ST_OK) {
        fprintf(stderr, "strata launch: %s\n", err.message);
        code = 1;
        break;
      }
      port = st_store_server_port(srv);
    }
    if (attempt == 0)
      fprintf(stderr, "strata launch: %d rank(s) on this machine (machine %d of %d, world %d), store %s:%d, logs in %s%s%s\n",
              n, o.node_rank, o.nnodes, world, o.master_addr, port, o.log_dir, applied != BIND_NONE ? ", binding " : "",
              applied != BIND_NONE ? bind_desc : "");
    int failed = -1;
    code = run_attempt(&o, attempt, port, token, o.node_rank == 0, sets, applied != BIND_NONE, &failed);
    st_store_server_stop(srv);
    if (code == 0 || launch_interrupted || failed < 0) break;
    if (attempt < o.max_restarts)
      fprintf(stderr, "strata launch: restarting all ranks (restart %d of %d); training resumes from the latest "
                      "checkpoint\n", attempt + 1, o.max_restarts);
  }
  sigaction(SIGINT, &old_int, NULL);
  sigaction(SIGTERM, &old_term, NULL);
  free(sets);
  free(o.cmd);
  return code;
}
