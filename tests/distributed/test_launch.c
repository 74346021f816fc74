/* test_launch.c — runtime/launch.c: st_dist_env_detect for every launcher's variables, and
 * `strata launch` driving this binary as its ranks (argv[1] == "child"): environment, per-rank logs
 * and prefixed console, the launcher-hosted store and its token, fail-fast by exit status and by
 * signal with the failed rank's log tail, restarts, the CONFIG.json shorthand, usage errors.
 *
 * "Same as torchrun": the rank/world/local line a rank prints under `strata launch` must equal the
 * one it prints when started by hand with the variables torchrun would set. */
#include "launch.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "st_test.h"

static st_error *ep(st_error *e) { return e; }
static const char *s_(const char *p) { return p; } /* arrays through st_test.h's NULL test */
static char tmpdir[256];
static char self[4096];

static int64_t ms_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------------ child mode */

static int child_main(int argc, char **argv) {
  st_error err;
  st_error_clear(&err);
  st_dist_env e;
  if (st_dist_env_detect(NULL, &e, &err) != ST_OK) {
    printf("detect failed: %s\n", err.message);
    return 5;
  }
  printf("whoami rank=%d world=%d local_rank=%d local_world=%d node=%d/%d\n", e.rank, e.world_size, e.local_rank,
         e.local_world_size, e.node_rank, e.num_nodes);
  printf("source=%s restart=%d token_len=%zu external=%d\n", e.source, e.restart_count, strlen(e.token),
         (int)e.store_external);
  printf("tty=%d\n", isatty(STDOUT_FILENO));
  for (int i = 2; i < argc; i++) printf("arg[%d]=%s\n", i - 2, argv[i]);
  fflush(stdout);
  const char *use_store = getenv("TEST_STORE");
  if (use_store && !strcmp(use_store, "1")) {
    st_store_server *srv = NULL;
    st_store *store = NULL;
    if (st_dist_store_open(&e, 10000, &srv, &store, &err) != ST_OK) {
      printf("store failed: %s\n", err.message);
      return 6;
    }
    int64_t v = 0;
    if (store->add(store, "ranks", 1, &v, &err) != ST_OK ||
        store->barrier(store, "all-here", e.rank, e.world_size, 10000, &err) != ST_OK) {
      printf("store op failed: %s\n", err.message);
      return 7;
    }
    char got[32];
    if (st_store_get_str(store, "ranks", got, sizeof got, 1000, &err) != ST_OK || atoi(got) != e.world_size) {
      printf("store count wrong: %s\n", got);
      return 8;
    }
    printf("store ok (hosted here: %d)\n", srv != NULL);
    st_dist_store_close(&e, srv, store, 10000);
  }
  const char *fail = getenv("TEST_FAIL_RANK");
  if (fail && atoi(fail) == e.rank) {
    const char *attempts = getenv("TEST_FAIL_ATTEMPTS");
    if (!attempts || e.restart_count < atoi(attempts)) {
      printf("rank %d failing on purpose\n", e.rank);
      fflush(stdout);
      usleep(200 * 1000);
      const char *sig = getenv("TEST_FAIL_SIGNAL");
      if (sig) raise(atoi(sig));
      return 3;
    }
  } else if (fail) {
    const char *attempts = getenv("TEST_FAIL_ATTEMPTS");
    if (!attempts || e.restart_count < atoi(attempts)) sleep(60); /* must be stopped by the launcher */
  }
  return 0;
}

/* ------------------------------------------------------------------ env detection */

static void test_detect(void) {
  st_error err;
  st_dist_env e;
  st_error_clear(&err);

  const char *none[] = {NULL};
  CHECK_OK(st_dist_env_detect(none, &e, &err), ep(&err));
  CHECK(e.rank == 0 && e.world_size == 1 && e.local_rank == 0 && e.local_world_size == 1);
  CHECK(strcmp(e.source, "single process") == 0);

  const char *torchrun[] = {"RANK=5",         "WORLD_SIZE=8",       "LOCAL_RANK=1",          "LOCAL_WORLD_SIZE=4",
                            "MASTER_ADDR=10.1.2.3", "MASTER_PORT=29400", "TORCHELASTIC_RUN_ID=x", "TORCHELASTIC_RESTART_COUNT=2",
                            NULL};
  CHECK_OK(st_dist_env_detect(torchrun, &e, &err), ep(&err));
  CHECK(e.rank == 5 && e.world_size == 8 && e.local_rank == 1 && e.local_world_size == 4);
  CHECK(e.node_rank == 1 && e.num_nodes == 2);
  CHECK(strcmp(e.master_addr, "10.1.2.3") == 0 && e.master_port == 29400);
  CHECK(e.store_port == 29401); /* torchrun's own store holds MASTER_PORT */
  CHECK(e.restart_count == 2 && strcmp(e.source, "torchrun") == 0 && !e.store_external);

  const char *launched[] = {"RANK=1", "WORLD_SIZE=2", "LOCAL_RANK=1", "LOCAL_WORLD_SIZE=2", "MASTER_PORT=4000",
                            "STRATA_LAUNCHED=1", "STRATA_STORE_EXTERNAL=1", "STRATA_STORE_TOKEN=abc", "STRATA_RESTART_COUNT=1", NULL};
  CHECK_OK(st_dist_env_detect(launched, &e, &err), ep(&err));
  CHECK(e.store_port == 4000 && e.store_external && strcmp(e.token, "abc") == 0 && e.restart_count == 1);
  CHECK(strcmp(e.source, "strata launch") == 0 && strcmp(e.master_addr, "127.0.0.1") == 0);

  const char *ompi[] = {"OMPI_COMM_WORLD_RANK=3", "OMPI_COMM_WORLD_SIZE=4", "OMPI_COMM_WORLD_LOCAL_RANK=1",
                        "OMPI_COMM_WORLD_LOCAL_SIZE=2", "MASTER_ADDR=head", NULL};
  CHECK_OK(st_dist_env_detect(ompi, &e, &err), ep(&err));
  CHECK(e.rank == 3 && e.world_size == 4 && e.local_rank == 1 && e.local_world_size == 2 && e.node_rank == 1);
  CHECK(strcmp(e.source, "openmpi") == 0 && strcmp(e.master_addr, "head") == 0 && e.master_port == 29500);

  const char *pmi[] = {"PMI_RANK=2", "PMI_SIZE=3", NULL};
  CHECK_OK(st_dist_env_detect(pmi, &e, &err), ep(&err));
  CHECK(e.rank == 2 && e.world_size == 3 && e.local_rank == 2 && e.local_world_size == 3 && strcmp(e.source, "pmi") == 0);

  const char *slurm[] = {"SLURM_PROCID=6", "SLURM_NTASKS=8", "SLURM_LOCALID=2", "SLURM_NODEID=1",
                         "SLURM_TASKS_PER_NODE=4(x2)", "SLURM_JOB_NODELIST=gpu[003-004,010]", "SLURM_JOB_ID=123456", NULL};
  CHECK_OK(st_dist_env_detect(slurm, &e, &err), ep(&err));
  CHECK(e.rank == 6 && e.world_size == 8 && e.local_rank == 2 && e.local_world_size == 4 && e.node_rank == 1);
  CHECK(strcmp(e.master_addr, "gpu003") == 0);
  CHECK(e.master_port == 20000 + 123456 % 20000);
  CHECK(strcmp(e.source, "slurm") == 0);
  const char *slurm2[] = {"SLURM_PROCID=0", "SLURM_NTASKS=3", "SLURM_LOCALID=0", "SLURM_NODEID=0",
                          "SLURM_TASKS_PER_NODE=3", "SLURM_NODELIST=alpha,beta", "MASTER_PORT=1234", NULL};
  CHECK_OK(st_dist_env_detect(slurm2, &e, &err), ep(&err));
  CHECK(strcmp(e.master_addr, "alpha") == 0 && e.master_port == 1234 && e.local_world_size == 3);

  /* torchrun variables win over the batch system's (torchrun inside an allocation) */
  const char *both[] = {"RANK=1", "WORLD_SIZE=2", "SLURM_PROCID=0", "SLURM_NTASKS=1", NULL};
  CHECK_OK(st_dist_env_detect(both, &e, &err), ep(&err));
  CHECK(e.rank == 1 && e.world_size == 2);

  /* errors name the variable */
  const char *bad_int[] = {"RANK=abc", "WORLD_SIZE=2", NULL};
  CHECK_RESULT(st_dist_env_detect(bad_int, &e, &err), ST_ERR_CONFIG, ep(&err));
  CHECK(strcmp(err.where, "RANK") == 0);
  CHECK_CONTAINS(err.message, "RANK=abc is not a non-negative integer");
  const char *too_big[] = {"RANK=2", "WORLD_SIZE=2", NULL};
  CHECK_RESULT(st_dist_env_detect(too_big, &e, &err), ST_ERR_CONFIG, ep(&err));
  CHECK_CONTAINS(err.message, "RANK=2 is not below the world size 2");
  const char *half[] = {"RANK=0", NULL};
  CHECK_RESULT(st_dist_env_detect(half, &e, &err), ST_ERR_CONFIG, ep(&err));
  CHECK_CONTAINS(err.message, "must be set together");
  const char *uneven[] = {"RANK=0", "WORLD_SIZE=5", "LOCAL_WORLD_SIZE=2", NULL};
  CHECK_RESULT(st_dist_env_detect(uneven, &e, &err), ST_ERR_CONFIG, ep(&err));
  CHECK_CONTAINS(err.message, "does not divide");
  const char *bad_port[] = {"RANK=0", "WORLD_SIZE=1", "MASTER_PORT=70000", NULL};
  CHECK_RESULT(st_dist_env_detect(bad_port, &e, &err), ST_ERR_CONFIG, ep(&err));
  CHECK(strcmp(err.where, "MASTER_PORT") == 0);

  char desc[256];
  CHECK_OK(st_dist_env_detect(torchrun, &e, &err), ep(&err));
  st_dist_env_describe(&e, desc, sizeof desc);
  CHECK_CONTAINS(s_(desc), "rank 5 of 8 (local 1 of 4, node 1 of 2), store 10.1.2.3:29401, from torchrun");
}

/* ------------------------------------------------------------------ launcher runs */

typedef struct run_result {
  int code;
  int64_t ms;
  char out[65536], err[65536];
} run_result;

static void read_file(const char *path, char *buf, size_t cap) {
  buf[0] = '\0';
  FILE *f = fopen(path, "r");
  if (!f) return;
  size_t n = fread(buf, 1, cap - 1, f);
  buf[n] = '\0';
  fclose(f);
}

/* runs st_launch_main(args) in a forked process with stdout/stderr captured; env: "K=V" to set */
static void run_launch(const char *const *args, const char *const *env, run_result *res) {
  char outp[512], errp[512];
  snprintf(outp, sizeof outp, "%s/launch.out", tmpdir);
  snprintf(errp, sizeof errp, "%s/launch.err", tmpdir);
  int64_t t0 = ms_now();
  pid_t pid = fork();
  if (pid == 0) {
    int fo = open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0644), fe = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fo, 1);
    dup2(fe, 2);
    for (const char *const *e = env; e && *e; e++) putenv((char *)*e);
    int argc = 0;
    char *argv[64];
    argv[argc++] = "launch";
    for (const char *const *a = args; *a; a++) argv[argc++] = (char *)*a;
    argv[argc] = NULL;
    fflush(NULL);
    int code = st_launch_main(argc, argv);
    fflush(NULL);
    _exit(code);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  res->ms = ms_now() - t0;
  res->code = WIFEXITED(status) ? WEXITSTATUS(status) : 1000 + WTERMSIG(status);
  read_file(outp, res->out, sizeof res->out);
  read_file(errp, res->err, sizeof res->err);
}

/* the "whoami" line of a text, or "" */
static void whoami_line(const char *text, char *line, size_t cap) {
  line[0] = '\0';
  const char *w = strstr(text, "whoami ");
  if (!w) return;
  size_t n = strcspn(w, "\n");
  snprintf(line, cap, "%.*s", (int)n, w);
}

static run_result res;

static void test_launch_ok(void) {
  char logdir[512];
  snprintf(logdir, sizeof logdir, "%s/logs-ok", tmpdir);
  const char *args[] = {"--num_processes", "3", "--log_dir", logdir, "--bind", "none", "--", self, "child", "x y", NULL};
  const char *env[] = {"TEST_STORE=1", NULL};
  run_launch(args, env, &res);
  CHECK_MSG(res.code == 0, "launch exited %d; stderr:\n%s\nstdout:\n%s", res.code, res.err, res.out);
  for (int r = 0; r < 3; r++) {
    char path[600], log[8192], want[128], line[256];
    snprintf(path, sizeof path, "%s/attempt_0/rank_%d.log", logdir, r);
    read_file(path, log, sizeof log);
    snprintf(want, sizeof want, "whoami rank=%d world=3 local_rank=%d local_world=3 node=0/1", r, r);
    whoami_line(log, line, sizeof line);
    CHECK_MSG(strcmp(line, want) == 0, "rank %d log says '%s', want '%s'", r, line, want);
    CHECK_CONTAINS(s_(log), "source=strata launch restart=0 token_len=32 external=1");
    CHECK_CONTAINS(s_(log), "store ok (hosted here: 0)"); /* the launcher hosts it, not rank 0 */
    CHECK_CONTAINS(s_(log), "arg[0]=x y");
    /* the console has the same lines with a rank prefix */
    char prefixed[160];
    snprintf(prefixed, sizeof prefixed, "[rank %d] %s\n", r, want);
    CHECK_CONTAINS(s_(res.out), prefixed);

    /* the same rank started by hand with torchrun's variables prints the same line */
    char outp[600];
    snprintf(outp, sizeof outp, "%s/manual_%d.out", tmpdir, r);
    pid_t pid = fork();
    if (pid == 0) {
      int fo = open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fo, 1);
      char v[4][32];
      snprintf(v[0], 32, "%d", r), setenv("RANK", v[0], 1), setenv("LOCAL_RANK", v[0], 1);
      setenv("WORLD_SIZE", "3", 1), setenv("LOCAL_WORLD_SIZE", "3", 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1), setenv("MASTER_PORT", "29500", 1);
      setenv("TORCHELASTIC_RUN_ID", "manual", 1);
      unsetenv("TEST_STORE");
      execl(self, self, "child", (char *)NULL);
      _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    char mlog[4096], mline[256];
    read_file(outp, mlog, sizeof mlog);
    whoami_line(mlog, mline, sizeof mline);
    CHECK_MSG(strcmp(mline, line) == 0, "torchrun-style rank %d says '%s', launcher's says '%s'", r, mline, line);
    CHECK_CONTAINS(s_(mlog), "source=torchrun");
  }
}

/* a free TCP port (bound and released; good enough on loopback for a test) */
static int free_port(void) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (bind(fd, (struct sockaddr *)&a, sizeof a) || getsockname(fd, (struct sockaddr *)&a, &len)) return -1;
  close(fd);
  return ntohs(a.sin_port);
}

/* without the launcher (variables as torchrun sets them): rank 0 hosts the store itself, on
 * MASTER_PORT + 1 since torchrun's own store holds MASTER_PORT, and everyone meets there */
static void test_store_without_launcher(void) {
  int port = free_port();
  CHECK(port > 0 && port < 65535);
  char portstr[16];
  snprintf(portstr, sizeof portstr, "%d", port - 1);
  pid_t pids[3];
  char outs[3][600];
  for (int r = 0; r < 3; r++) {
    snprintf(outs[r], sizeof outs[r], "%s/nolauncher_%d.out", tmpdir, r);
    pids[r] = fork();
    if (pids[r] == 0) {
      int fo = open(outs[r], O_WRONLY | O_CREAT | O_TRUNC, 0644);
      dup2(fo, 1);
      char v[16];
      snprintf(v, sizeof v, "%d", r);
      setenv("RANK", v, 1), setenv("LOCAL_RANK", v, 1), setenv("WORLD_SIZE", "3", 1), setenv("LOCAL_WORLD_SIZE", "3", 1);
      setenv("MASTER_ADDR", "127.0.0.1", 1), setenv("MASTER_PORT", portstr, 1), setenv("TORCHELASTIC_RUN_ID", "t", 1);
      setenv("STRATA_STORE_TOKEN", "torchrun-job", 1), setenv("TEST_STORE", "1", 1);
      execl(self, self, "child", (char *)NULL);
      _exit(127);
    }
  }
  for (int r = 0; r < 3; r++) {
    int st = 0;
    waitpid(pids[r], &st, 0);
    char out[4096];
    read_file(outs[r], out, sizeof out);
    CHECK_MSG(WIFEXITED(st) && WEXITSTATUS(st) == 0, "rank %d without launcher: status 0x%x: %s", r, st, out);
    CHECK_CONTAINS(s_(out), r == 0 ? "store ok (hosted here: 1)" : "store ok (hosted here: 0)");
  }
}

static void test_fail_fast(bool by_signal) {
  char logdir[512];
  snprintf(logdir, sizeof logdir, "%s/logs-fail-%d", tmpdir, (int)by_signal);
  const char *args[] = {"--nproc_per_node", "3", "--log_dir", logdir, "--stop_grace", "2", self, "child", NULL};
  const char *env_exit[] = {"TEST_FAIL_RANK=1", NULL};
  const char *env_sig[] = {"TEST_FAIL_RANK=2", "TEST_FAIL_SIGNAL=9", NULL};
  run_launch(args, by_signal ? env_sig : env_exit, &res);
  /* the others sleep 60 s: they must have been stopped within seconds */
  CHECK_MSG(res.ms < 15000, "fail-fast took %lld ms", (long long)res.ms);
  if (by_signal) {
    CHECK(res.code == 128 + 9);
    CHECK_CONTAINS(s_(res.err), "failed: rank 2 was killed by signal 9 (Killed)");
    CHECK_CONTAINS(s_(res.err), "rank_2.log");
    CHECK_CONTAINS(s_(res.err), "  | rank 2 failing on purpose");
  } else {
    CHECK(res.code == 3);
    CHECK_CONTAINS(s_(res.err), "rank 1 (local rank 1, pid");
    CHECK_CONTAINS(s_(res.err), "failed: rank 1 exited with status 3");
    CHECK_CONTAINS(s_(res.err), "  | whoami rank=1 world=3");
    CHECK_CONTAINS(s_(res.err), "  | rank 1 failing on purpose");
  }
  CHECK_MSG(strstr(res.err, "restarting") == NULL, "no restart without --max_restarts: %s", res.err);
}

static void test_restart(void) {
  char logdir[512];
  snprintf(logdir, sizeof logdir, "%s/logs-restart", tmpdir);
  const char *args[] = {"--nproc_per_node=2", "--max_restarts=2", "--log_dir", logdir, "--stop_grace", "1", self, "child", NULL};
  const char *env[] = {"TEST_FAIL_RANK=0", "TEST_FAIL_ATTEMPTS=1", NULL}; /* fails on attempt 0 only */
  run_launch(args, env, &res);
  CHECK_MSG(res.code == 0, "restarted launch exited %d: %s", res.code, res.err);
  CHECK_CONTAINS(s_(res.err), "restarting all ranks (restart 1 of 2)");
  CHECK_MSG(strstr(res.err, "restart 2 of 2") == NULL, "restarted twice: %s", res.err);
  char path[600], log[4096];
  snprintf(path, sizeof path, "%s/attempt_1/rank_0.log", logdir);
  read_file(path, log, sizeof log);
  CHECK_CONTAINS(s_(log), "restart=1");
}

static void test_shorthand_and_usage(void) {
  char logdir[512];
  snprintf(logdir, sizeof logdir, "%s/logs-short", tmpdir);
  /* CONFIG.json runs `<strata> train CONFIG.json ...`; STRATA_EXE stands in for the strata binary */
  char exe_env[4200];
  snprintf(exe_env, sizeof exe_env, "STRATA_EXE=%s", self);
  const char *args[] = {"--log_dir", logdir, "my.json", "--set", "a=1", NULL};
  const char *env[] = {exe_env, NULL};
  run_launch(args, env, &res);
  /* this binary's "train" mode echoes its arguments: it was run as `self train my.json --set a=1` */
  CHECK_CONTAINS(s_(res.out), "[rank 0] train-mode args: my.json --set a=1");

  const char *unknown[] = {"--nprocs", "2", "x", NULL};
  run_launch(unknown, NULL, &res);
  CHECK(res.code == 2);
  CHECK_CONTAINS(s_(res.err), "unknown option '--nprocs'");
  const char *zero[] = {"--num_processes", "0", "x", NULL};
  run_launch(zero, NULL, &res);
  CHECK(res.code == 2);
  CHECK_CONTAINS(s_(res.err), "--num_processes needs an integer >= 1");
  const char *mismatch[] = {"--num_processes", "4", "--nproc_per_node", "3", "x", NULL};
  run_launch(mismatch, NULL, &res);
  CHECK(res.code == 2);
  CHECK_CONTAINS(s_(res.err), "is not --nproc_per_node 3 x 1 machine(s)");
  const char *multi[] = {"--num_machines", "2", "--num_processes", "4", "x", NULL};
  run_launch(multi, NULL, &res);
  CHECK(res.code == 2);
  CHECK_CONTAINS(s_(res.err), "--main_process_ip/--master_addr must name machine 0");
  const char *notoken[] = {"--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "127.0.0.1", "x", NULL};
  run_launch(notoken, NULL, &res);
  CHECK(res.code == 2);
  CHECK_CONTAINS(s_(res.err), "set STRATA_STORE_TOKEN to the same secret on each");
  /* machine 1 of 2 (torchrun spelling): global ranks continue after machine 0's; it hosts no store */
  char logdir2[512];
  snprintf(logdir2, sizeof logdir2, "%s/logs-node1", tmpdir);
  const char *node1[] = {"--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                         "--master_port", "29999", "--log_dir", logdir2, self, "child", NULL};
  const char *node1_env[] = {"STRATA_STORE_TOKEN=shared-secret", NULL};
  run_launch(node1, node1_env, &res);
  CHECK_MSG(res.code == 0, "node 1 launch exited %d: %s", res.code, res.err);
  CHECK_CONTAINS(s_(res.out), "[rank 2] whoami rank=2 world=4 local_rank=0 local_world=2 node=1/2");
  CHECK_CONTAINS(s_(res.out), "[rank 3] whoami rank=3 world=4 local_rank=1 local_world=2 node=1/2");
  CHECK_CONTAINS(s_(res.out), "[rank 3] source=strata launch restart=0 token_len=13 external=0");
  const char *nocmd[] = {"--num_processes", "2", NULL};
  run_launch(nocmd, NULL, &res);
  CHECK(res.code == 2);
  CHECK_CONTAINS(s_(res.err), "no command given");
  const char *bind[] = {"--bind", "socket", "x", NULL};
  run_launch(bind, NULL, &res);
  CHECK(res.code == 2);
  CHECK_CONTAINS(s_(res.err), "--bind takes none, core or numa");
  /* a command that does not exist: the rank exits 127 and the launcher says why */
  const char *missing[] = {"--log_dir", logdir, "/nonexistent/prog", NULL};
  run_launch(missing, NULL, &res);
  CHECK(res.code == 127);
  CHECK_CONTAINS(s_(res.err), "cannot run '/nonexistent/prog'");
}

static void test_bind_core(void) {
  char logdir[512];
  snprintf(logdir, sizeof logdir, "%s/logs-bind", tmpdir);
  const char *args[] = {"--nproc_per_node", "2", "--bind", "core", "--log_dir", logdir, self, "affinity", NULL};
  run_launch(args, NULL, &res);
  CHECK_MSG(res.code == 0, "bind run exited %d: %s", res.code, res.err);
  long cores = sysconf(_SC_NPROCESSORS_ONLN);
  if (cores >= 2) {
    /* each rank sees only its share of the CPUs */
    CHECK_CONTAINS(s_(res.err), "binding local rank 0 -> cpus");
    CHECK_MSG(strstr(res.out, "[rank 0] affinity cpus=") && strstr(res.out, "[rank 1] affinity cpus="), "%s", res.out);
    const char *a0 = strstr(res.out, "[rank 0] affinity cpus=");
    CHECK(a0 && atoi(a0 + strlen("[rank 0] affinity cpus=")) < cores);
  }
}

int main(int argc, char **argv) {
  if (argc > 1 && !strcmp(argv[1], "child")) return child_main(argc, argv);
  if (argc > 1 && !strcmp(argv[1], "train")) {
    printf("train-mode args:");
    for (int i = 2; i < argc; i++) printf(" %s", argv[i]);
    printf("\n");
    return 0;
  }
  if (argc > 1 && !strcmp(argv[1], "affinity")) {
    cpu_set_t set;
    sched_getaffinity(0, sizeof set, &set);
    printf("affinity cpus=%d\n", CPU_COUNT(&set));
    return 0;
  }
  signal(SIGPIPE, SIG_IGN);
  alarm(170);
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  if (n <= 0) return 1;
  self[n] = '\0';
  snprintf(tmpdir, sizeof tmpdir, "/tmp/strata_test_launch_XXXXXX");
  if (!mkdtemp(tmpdir)) return 1;
  unsetenv("STRATA_STORE_TOKEN");
  test_detect();
  test_launch_ok();
  test_store_without_launcher();
  test_fail_fast(false);
  test_fail_fast(true);
  test_restart();
  test_shorthand_and_usage();
  test_bind_core();
  char cmd[600];
  snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
  return st_test_finish("test_launch");
}
