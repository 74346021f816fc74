/* trainer.h (internal) — `strata train` and `strata validate`: load the config and the plugins,
 * then drive the unit loop (DESIGN §3). */
#ifndef STRATA_RUNTIME_TRAINER_H
#define STRATA_RUNTIME_TRAINER_H

#include <signal.h>

#include <strata/strata.h>

#include "plugin.h"

/* The plugin calls in flight, recorded by the trainer for the CLI's fatal-signal handler (which may
 * only read memory): at[0 .. depth-1], innermost last. Every string lives as long as its plugin. */
#define ST_CALL_DEPTH 4
typedef struct st_call_site {
  struct {
    const char *kind, *name, *path, *method;
  } at[ST_CALL_DEPTH];
  volatile sig_atomic_t depth;
} st_call_site;

typedef struct st_run_options {
  const char *config_path;
  const char *deepspeed_path;       /* NULL: none */
  const char *const *sets;          /* --set a.b=v, in order */
  int n_sets;
  volatile sig_atomic_t *stop;      /* set by the CLI's SIGINT/SIGTERM handler: save and stop */
  FILE *console;                    /* progress bar and log lines (stderr) */
  int progress_tty;                 /* -1 detect, 0 plain lines, 1 bar */
  unsigned ckpt_slow_write_ms;      /* test hook (STRATA_TEST_SLOW_SAVE_MS) */
  int64_t test_die_at_step;         /* test hook (STRATA_TEST_DIE_AT_STEP=STEP:RANK): that rank SIGKILLs */
  int test_die_rank;                /*   itself after that step, on the job's first attempt only */
  st_call_site *call_site;          /* NULL, or where the trainer records the plugin call in flight */
} st_run_options;

/* The core's built-in plugins, found by name before any file: the `local` strategy and the `local`
 * comm backend. Fills out and returns the count. */
#define ST_N_BUILTINS 2
int st_builtin_plugins(st_plugin_builtin *out); /* out: ST_N_BUILTINS entries */

/* Train until max_steps / num_epochs; on return the last checkpoint is on disk. */
st_result st_train(const st_run_options *opt, st_error *err);

/* Resolve everything (plugins included) and print the final config with provenance. */
st_result st_validate(const st_run_options *opt, FILE *out, st_error *err);

/* `strata eval`: one pass over data.validation with the weights of opt's config (model.weights, or
 * train.resume naming a checkpoint); prints val_loss (and model metrics) to out. */
typedef struct st_eval_options {
  const char *dump_path; /* NULL, or a safetensors file: "<sample>/output", "<sample>/loss" per sample */
} st_eval_options;
st_result st_eval(const st_run_options *opt, const st_eval_options *eo, FILE *out, st_error *err);

/* `strata export CKPT --format F --out DIR`: the checkpoint's weights in an ecosystem layout,
 * written to DIR.tmp and renamed into place. */
typedef struct st_export_options {
  const char *checkpoint; /* a step directory */
  const char *format;     /* safetensors | diffusers | peft | transformers */
  const char *out_dir;
  bool merge_lora;
} st_export_options;
st_result st_export(const st_export_options *opt, st_error *err);

#endif
