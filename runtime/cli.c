/* cli.c — `strata train | validate | env | plugins | launch | export`. The CLI is the only layer
 * that prints errors and chooses exit codes; everything below returns st_result. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include "cli.h"
#include "env.h"
#include "launch.h"
#include "plugin.h"
#include "trainer.h"

static volatile sig_atomic_t stop_requested = 0; /* written by the signal handler only */

static void on_signal(int sig) {
  if (stop_requested) { /* second signal: give up at once */
    signal(sig, SIG_DFL);
    raise(sig);
  }
  stop_requested = 1;
}

/* ---- a crash inside a plugin: name it -------------------------------------------------------- */

static st_call_site call_site; /* written by the trainer around every plugin call, read by on_fatal */
static const int fatal_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT};
static const char *const fatal_names[] = {"SIGSEGV", "SIGBUS", "SIGFPE", "SIGILL", "SIGABRT"};
#define N_FATAL ((int)(sizeof fatal_signals / sizeof fatal_signals[0]))
static struct sigaction fatal_previous[N_FATAL];
static char fatal_stack[1 << 16]; /* so that a stack overflow inside a plugin is reported too */

static void put(const char *s) { /* write(2) is async-signal-safe; stdio is not */
  size_t n = 0;
  while (s && s[n]) n++;
  while (n > 0) {
    ssize_t w = write(STDERR_FILENO, s, n);
    if (w <= 0) return;
    s += w;
    n -= (size_t)w;
  }
}

/* Names the plugin call in flight, then gives the signal back to whoever had it before (the default
 * action, or a sanitizer's report): the previous action is restored and, once this returns, the
 * faulting instruction runs again or the re-raised signal is delivered. */
static void on_fatal(int sig, siginfo_t *info, void *uctx) {
  (void)uctx;
  int i = 0;
  while (i < N_FATAL - 1 && fatal_signals[i] != sig) i++;
  int depth = call_site.depth;
  put("strata: fatal signal ");
  put(fatal_names[i]);
  if (depth > 0) {
    int k = depth <= ST_CALL_DEPTH ? depth - 1 : ST_CALL_DEPTH - 1;
    put(" in ");
    put(call_site.at[k].kind);
    put(" plugin \"");
    put(call_site.at[k].name);
    put("\" during its ");
    put(call_site.at[k].method);
    put("() call\nstrata: plugin library: ");
    put(call_site.at[k].path);
    put("\nstrata: this is a bug in that plugin: run it under gdb, or build strata and the plugin with "
        "-Db_sanitize=address,undefined to see the faulting line\n");
  } else {
    put(" outside any plugin call: a bug in strata, please report it with this log\n");
  }
  sigaction(sig, &fatal_previous[i], NULL);
  if (!info || info->si_code <= 0) raise(sig); /* sent by kill/raise/abort: delivered after return */
}

static void install_fatal_handlers(void) {
  stack_t ss = {.ss_sp = fatal_stack, .ss_size = sizeof fatal_stack};
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_fatal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (int i = 0; i < N_FATAL; i++) sigaction(fatal_signals[i], &sa, &fatal_previous[i]);
}

static const char usage[] =
    "usage: strata <command> [options]\n"
    "\n"
    "commands:\n"
    "  train CONFIG [--deepspeed DS.json] [--set key.path=value]...   train a model\n"
    "  validate CONFIG [--deepspeed DS.json] [--set ...]   print the resolved config with provenance\n"
    "  eval CONFIG [--weights PATH | --checkpoint DIR] [--dump OUT.safetensors] [--set ...]\n"
    "                          validation loss of data.validation (fixed sigma and noise per sample)\n"
    "  launch [--num_processes N ...] [--] strata train CONFIG   start one process per rank\n"
    "  export CKPT --format safetensors|diffusers|peft --out DIR [--merge-lora]\n"
    "                          write a checkpoint's weights in an ecosystem layout\n"
    "  env                     versions, SIMD level, cores, NUMA, memory limits, accelerators\n"
    "  plugins                 every plugin found, its ABI version and where it came from\n"
    "  --version, --help\n"
    "\n"
    "exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error\n"
    "environment: STRATA_PLUGIN_PATH (extra plugin folders), STRATA_LOG_LEVEL (error|warn|info|debug)\n";

static int exit_code_for(st_result r) {
  switch (r) {
  case ST_OK: return 0;
  case ST_ERR_CONFIG:
  case ST_ERR_INVALID_ARGUMENT:
  case ST_ERR_PLUGIN:
  case ST_ERR_NOT_FOUND: return 2;
  case ST_ERR_INTERRUPTED: return 130;
  default: return 1;
  }
}

static int report(st_result r, const st_error *err) {
  if (r == ST_OK) return 0;
  /* messages that already start with their file name or key path are printed as they are */
  bool show_where = err->where[0] && strncmp(err->message, err->where, strlen(err->where)) != 0;
  fprintf(stderr, "strata: error: %s%s%s\n", show_where ? err->where : "", show_where ? ": " : "", err->message);
  fprintf(stderr, "strata: %s\n", st_result_string(r));
  return exit_code_for(r);
}

/* CONFIG [--deepspeed F] [--set k=v]... ; returns false on a usage error */
static bool parse_run_args(int argc, char **argv, st_run_options *o, const char **sets) {
  for (int i = 0; i < argc; i++) {
    const char *a = argv[i];
    if (!strcmp(a, "--deepspeed") && i + 1 < argc) {
      o->deepspeed_path = argv[++i];
    } else if (!strncmp(a, "--deepspeed=", 12)) {
      o->deepspeed_path = a + 12;
    } else if (!strcmp(a, "--set") && i + 1 < argc) {
      sets[o->n_sets++] = argv[++i];
    } else if (!strncmp(a, "--set=", 6)) {
      sets[o->n_sets++] = a + 6;
    } else if (a[0] == '-' && a[1] == '-') {
      fprintf(stderr, "strata: unknown option %s\n", a);
      return false;
    } else if (!o->config_path) {
      o->config_path = a;
    } else {
      fprintf(stderr, "strata: unexpected argument %s (one CONFIG only)\n", a);
      return false;
    }
  }
  if (!o->config_path) fprintf(stderr, "strata: missing CONFIG\n");
  o->sets = sets;
  return o->config_path != NULL;
}

/* "key=\"value\"" for --set, with the value's quotes and backslashes escaped as JSON wants */
static void set_string(char *out, size_t cap, const char *key, const char *value) {
  size_t n = (size_t)snprintf(out, cap, "%s=\"", key);
  for (const char *p = value; *p && n + 3 < cap; p++) {
    if (*p == '"' || *p == '\\') out[n++] = '\\';
    out[n++] = *p;
  }
  snprintf(out + n, cap - n, "\"");
}

int st_cli_main(int argc, char **argv) {
  if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
    fputs(usage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const char *cmd = argv[1];
  if (!strcmp(cmd, "--version") || !strcmp(cmd, "version")) {
    printf("strata %s (plugin ABI v%d)\n", ST_VERSION_STRING, ST_ABI_VERSION);
    return 0;
  }
  if (!strcmp(cmd, "launch")) return st_launch_main(argc - 1, argv + 1);
  if (!strcmp(cmd, "env")) {
    st_env_report(stdout);
    return 0;
  }
  if (!strcmp(cmd, "plugins")) {
    st_plugin_builtin b[ST_N_BUILTINS];
    st_plugin_list(stdout, b, st_builtin_plugins(b));
    return 0;
  }
  if (!strcmp(cmd, "train") || !strcmp(cmd, "validate") || !strcmp(cmd, "eval")) {
    const char **sets = calloc((size_t)argc + 2, sizeof *sets);
    char **rest = calloc((size_t)argc + 1, sizeof *rest);
    char weights_set[4200] = "", resume_set[4200] = "";
    st_eval_options eo = {0};
    int n_rest = 0;
    bool usage_error = !sets || !rest;
    bool is_eval = !strcmp(cmd, "eval");
    for (int i = 2; i < argc && !usage_error; i++) { /* eval's own options; the rest as for train */
      if (is_eval && !strcmp(argv[i], "--weights") && i + 1 < argc)
        set_string(weights_set, sizeof weights_set, "model.weights", argv[++i]);
      else if (is_eval && !strcmp(argv[i], "--checkpoint") && i + 1 < argc)
        set_string(resume_set, sizeof resume_set, "train.resume", argv[++i]);
      else if (is_eval && !strcmp(argv[i], "--dump") && i + 1 < argc)
        eo.dump_path = argv[++i];
      else
        rest[n_rest++] = argv[i];
    }
    st_run_options o = {.console = stderr, .progress_tty = -1, .stop = &stop_requested, .call_site = &call_site};
    install_fatal_handlers();
    if (usage_error || !parse_run_args(n_rest, rest, &o, sets)) {
      free(sets);
      free(rest);
      fputs(usage, stderr);
      return 2;
    }
    if (weights_set[0]) sets[o.n_sets++] = weights_set; /* the command line wins over the config */
    if (resume_set[0]) sets[o.n_sets++] = resume_set;
    const char *slow = getenv("STRATA_TEST_SLOW_SAVE_MS");
    o.ckpt_slow_write_ms = slow ? (unsigned)atoi(slow) : 0;
    const char *die = getenv("STRATA_TEST_DIE_AT_STEP");
    long long die_step = 0;
    int die_rank = 0;
    if (die && sscanf(die, "%lld:%d", &die_step, &die_rank) == 2) {
      o.test_die_at_step = die_step;
      o.test_die_rank = die_rank;
    }
    st_error err;
    st_error_clear(&err);
    st_result r;
    if (!strcmp(cmd, "train")) {
      signal(SIGINT, on_signal);
      signal(SIGTERM, on_signal);
      r = st_train(&o, &err);
    } else if (!strcmp(cmd, "eval")) {
      r = st_eval(&o, &eo, stdout, &err);
    } else {
      r = st_validate(&o, stdout, &err);
    }
    free(sets);
    free(rest);
    return report(r, &err);
  }
  if (!strcmp(cmd, "export")) {
    st_export_options eo = {.format = "safetensors"};
    for (int i = 2; i < argc; i++) {
      if (!strcmp(argv[i], "--format") && i + 1 < argc) eo.format = argv[++i];
      else if (!strcmp(argv[i], "--out") && i + 1 < argc) eo.out_dir = argv[++i];
      else if (!strcmp(argv[i], "--merge-lora")) eo.merge_lora = true;
      else if (argv[i][0] != '-' && !eo.checkpoint) eo.checkpoint = argv[i];
      else {
        fprintf(stderr, "strata export: unexpected argument %s\n\n%s", argv[i], usage);
        return 2;
      }
    }
    if (!eo.checkpoint || !eo.out_dir) {
      fprintf(stderr, "strata export: need CKPT and --out DIR\n\n%s", usage);
      return 2;
    }
    st_error err;
    st_error_clear(&err);
    return report(st_export(&eo, &err), &err);
  }
  fprintf(stderr, "strata: unknown command '%s'\n\n%s", cmd, usage);
  return 2;
}
