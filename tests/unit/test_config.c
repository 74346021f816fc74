/* test_config.c — runtime/config.c: JSON errors with positions, the schema (unknown keys with
 * did-you-mean, types, enums, ranges), the batch triple, --set and --deepspeed precedence,
 * provenance, "auto" resolution, the st_cfg_api plugins use, and the shipped DeepSpeed configs.
 *
 * Expected numbers are computed here from the rules they test (DeepSpeed's batch arithmetic,
 * Hugging Face's hidden-size formulas), never copied from the code's output. */
#include "config.h"

#include <jansson.h>
#include <stdlib.h>
#include <unistd.h>

#include "st_test.h"

static char tmpdir[256];

static const char *write_tmp(const char *name, const char *text) {
  static char paths[8][512];
  static int next = 0;
  char *p = paths[next++ % 8];
  snprintf(p, sizeof paths[0], "%s/%s", tmpdir, name);
  FILE *f = fopen(p, "w");
  if (!f) {
    perror(p);
    exit(1);
  }
  fputs(text, f);
  fclose(f);
  return p;
}

/* load from memory; returns NULL (and leaves err filled) on failure */
static st_config *load(const char *text, st_error *err) {
  st_config *c = NULL;
  st_error_clear(err);
  if (st_config_load_string(text, "t.json", &c, err) != ST_OK) return NULL;
  return c;
}

/* load + extract, expecting failure; returns the result code */
static st_result extract_fails(const char *text, st_error *err) {
  st_config *c = load(text, err);
  if (!c) return err->code;
  st_settings s;
  st_result r = st_config_extract(c, &s, err);
  st_config_free(c);
  return r;
}

static st_result resolve_text(const char *text, int world, int64_t hidden, st_settings *s, st_error *err) {
  st_config *c = load(text, err);
  if (!c) return err->code;
  st_result r = st_config_resolve(c, world, hidden, s, err);
  st_config_free(c);
  return r;
}

/* the printed listing of c as a malloc'd string */
static char *printed(st_config *c) {
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  st_config_print_resolved(c, f);
  fclose(f);
  return buf;
}

/* the line of `listing` that starts with "key " */
static const char *line_of(const char *listing, const char *key, char *out, size_t cap) {
  size_t kl = strlen(key);
  for (const char *p = listing; p && *p;) {
    const char *eol = strchr(p, '\n');
    size_t n = eol ? (size_t)(eol - p) : strlen(p);
    if (n > kl && strncmp(p, key, kl) == 0 && p[kl] == ' ') {
      snprintf(out, cap, "%.*s", (int)n, p);
      return out;
    }
    p = eol ? eol + 1 : NULL;
  }
  snprintf(out, cap, "(no line for %s)", key);
  return out;
}

static void test_syntax_errors(void) {
  st_error err_, *err = &err_;
  st_config *c = NULL;
  /* the '}' that makes the value missing is line 3, column 8 (1-based): `  "b": }` */
  CHECK_RESULT(st_config_load_string("{\n  \"a\": 1,\n  \"b\": }\n", "bad.json", &c, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "bad.json:3:8: ");
  CHECK(c == NULL);

  CHECK_RESULT(st_config_load_string("{\"train\": {\"seed\": 1,\n \"seed\": 2}}", "dup.json", &c, err),
               ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "dup.json:2:");
  CHECK_CONTAINS(err->message, "duplicate object key");

  CHECK_RESULT(st_config_load_string("[1, 2]", "arr.json", &c, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "top level must be a JSON object");

  /* the same from a file, and a missing file */
  const char *bad = write_tmp("bad.json", "{\"train\": {\"max_steps\": 10,}}");
  CHECK_RESULT(st_config_load(bad, NULL, NULL, 0, &c, err), ST_ERR_CONFIG, err);
  char expect[600];
  snprintf(expect, sizeof expect, "%s:1:", bad);
  CHECK_CONTAINS(err->message, expect);
  char missing[300];
  snprintf(missing, sizeof missing, "%s/nope.json", tmpdir);
  CHECK_RESULT(st_config_load(missing, NULL, NULL, 0, &c, err), ST_ERR_IO, err);
  CHECK_CONTAINS(err->message, "nope.json");
}

static void test_unknown_keys(void) {
  st_error err_, *err = &err_;
  CHECK_RESULT(extract_fails("{\"gradient_acumulation_steps\": 2}", err), ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "gradient_acumulation_steps") == 0);
  CHECK_CONTAINS(err->message, "did you mean \"gradient_accumulation_steps\"?");
  CHECK_CONTAINS(err->message, "(in t.json)");

  CHECK_RESULT(extract_fails("{\"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lrr\": 0.1}}}", err), ST_ERR_CONFIG,
                err);
  CHECK(strcmp(err->where, "optimizer.params.lrr") == 0);
  CHECK_CONTAINS(err->message, "did you mean \"optimizer.params.lr\"?");

  CHECK_RESULT(extract_fails("{\"zero_optimization\": {\"offload_optimizer\": {\"devcie\": \"cpu\"}}}", err),
               ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "zero_optimization.offload_optimizer.devcie") == 0);
  CHECK_CONTAINS(err->message, "did you mean \"zero_optimization.offload_optimizer.device\"?");

  CHECK_RESULT(extract_fails("{\"train\": {\"max_step\": 10}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "did you mean \"train.max_steps\"?");

  /* a key of another block, at the top level */
  CHECK_RESULT(extract_fails("{\"lr\": 0.1}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "did you mean \"optimizer.params.lr\"?");

  /* nothing close: the allowed keys are listed */
  CHECK_RESULT(extract_fails("{\"device\": {\"zzzzzzzz\": 1}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "device.zzzzzzzz: unknown key");
  CHECK_CONTAINS(err->message, "type, threads");

  /* scheduler params are checked against the chosen type */
  CHECK_RESULT(extract_fails("{\"scheduler\": {\"type\": \"WarmupLR\", \"params\": {\"total_num_steps\": 5}}}", err),
               ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "scheduler.params.total_num_steps") == 0);

  /* max_grad_norm points at gradient_clipping */
  CHECK_RESULT(extract_fails("{\"optimizer\": {\"params\": {\"max_grad_norm\": 1.0}}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "gradient_clipping");

  /* plugin blocks: only name / plugin are strata's */
  st_settings s;
  st_config *c = load("{\"model\": {\"name\": \"m\", \"anything\": {\"x\": 1}}, \"strategy\": {\"name\": \"fsdp\", "
                      "\"sharding\": 4}}",
                      err);
  CHECK(c != NULL);
  if (c) {
    CHECK_OK(st_config_resolve(c, 1, 0, &s, err), err);
    CHECK(s.model_name && strcmp(s.model_name, "m") == 0); /* strings live as long as the config */
    CHECK(s.strategy_name && strcmp(s.strategy_name, "fsdp") == 0);
    st_config_free(c);
  }
  CHECK_RESULT(extract_fails("{\"model\": {\"name\": 3}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "model.name: expected a string, found an integer (3)");

  /* known DeepSpeed blocks strata ignores are accepted and listed */
  c = load("{\"wandb\": {\"enabled\": true}, \"flops_profiler\": {}, \"train\": {}}", err);
  CHECK(c != NULL);
  if (c) {
    CHECK_OK(st_config_extract(c, &s, err), err);
    const char *keys[8];
    size_t n = st_config_ignored_keys(c, keys, 8);
    CHECK(n == 2);
    bool has_wandb = false, has_flops = false;
    for (size_t i = 0; i < n && i < 8; i++) {
      has_wandb |= strcmp(keys[i], "wandb") == 0;
      has_flops |= strcmp(keys[i], "flops_profiler") == 0;
    }
    CHECK(has_wandb && has_flops);
    st_config_free(c);
  }
}

static void test_types_and_ranges(void) {
  st_error err_, *err = &err_;
  st_settings s;
  CHECK_RESULT(extract_fails("{\"train\": {\"max_steps\": \"8\"}}", err), ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "train.max_steps") == 0);
  CHECK_CONTAINS(err->message, "train.max_steps: expected an integer, found a string (\"8\")");

  CHECK_RESULT(extract_fails("{\"train\": {\"max_steps\": 8.5}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "expected an integer, found a number (8.5)");
  CHECK_RESULT(extract_fails("{\"data\": {\"shuffle\": \"yes\"}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "data.shuffle: expected a boolean");
  CHECK_RESULT(extract_fails("{\"optimizer\": {\"params\": {\"betas\": [0.9]}}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "optimizer.params.betas: expected a list of two numbers");
  CHECK_RESULT(extract_fails("{\"fp16\": 1}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "fp16: expected an object, found an integer (1)");
  CHECK_RESULT(extract_fails("{\"train\": {\"seed\": \"auto\"}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "train.seed: \"auto\" is not resolved here");

  /* integral reals are integers; integers are numbers */
  CHECK_OK(resolve_text("{\"train\": {\"max_steps\": 8.0}, \"gradient_clipping\": 2, \"zero_optimization\": "
                        "{\"sub_group_size\": 1e9}}",
                        1, 0, &s, err),
           err);
  CHECK(s.max_steps == 8);
  CHECK(s.gradient_clipping == 2.0);

  /* enums: any case, choices listed on error, DeepSpeed-only names are "unsupported" */
  CHECK_OK(resolve_text("{\"optimizer\": {\"type\": \"adamw\"}, \"device\": {\"type\": \"CUDA\"}, \"scheduler\": "
                        "{\"type\": \"warmuplr\", \"params\": {\"warmup_type\": \"Linear\"}}}",
                        1, 0, &s, err),
           err);
  CHECK(s.optimizer.type == ST_OPTIM_ADAMW);
  CHECK(s.device_type == ST_DEVICE_CUDA);
  CHECK(s.scheduler.type == ST_SCHED_WARMUP_LR && s.scheduler.warmup_linear);
  CHECK_RESULT(extract_fails("{\"optimizer\": {\"type\": \"Adamx\"}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "\"AdamW\", \"Adam\", \"SGD\"");
  CHECK_CONTAINS(err->message, "did you mean");
  CHECK_RESULT(extract_fails("{\"optimizer\": {\"type\": \"Lamb\"}}", err), ST_ERR_UNSUPPORTED, err);
  CHECK_CONTAINS(err->message, "optimizer.type: \"Lamb\" is a DeepSpeed optimizer that strata does not implement");
  CHECK_RESULT(extract_fails("{\"scheduler\": {\"type\": \"OneCycle\"}}", err), ST_ERR_UNSUPPORTED, err);
  CHECK_CONTAINS(err->message, "WarmupCosineLR");
  CHECK_RESULT(extract_fails("{\"device\": {\"type\": \"tpu\"}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "\"cpu\", \"cuda\"");
  CHECK_RESULT(extract_fails("{\"zero_optimization\": {\"offload_param\": {\"device\": \"disk\"}}}", err),
               ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "\"none\", \"cpu\", \"nvme\"");

  /* fp16 and bf16 together */
  CHECK_RESULT(extract_fails("{\"fp16\": {\"enabled\": true}, \"bf16\": {\"enabled\": true}}", err), ST_ERR_CONFIG,
                err);
  CHECK_CONTAINS(err->message, "both true");

  /* ranges */
  CHECK_RESULT(extract_fails("{\"train_batch_size\": 0}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "train_batch_size: must be a positive integer, found 0");
  CHECK_RESULT(extract_fails("{\"optimizer\": {\"params\": {\"lr\": -1}}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "optimizer.params.lr: must be >= 0");
  CHECK_RESULT(extract_fails("{\"zero_optimization\": {\"stage\": 4}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "zero_optimization.stage");
  CHECK_RESULT(extract_fails("{\"train\": {\"max_bad_steps\": 0}}", err), ST_ERR_CONFIG, err);
  CHECK_RESULT(extract_fails("{\"gradient_clipping\": -1}", err), ST_ERR_CONFIG, err);

  /* defaults, as documented in config.c */
  st_config *c = load("{}", err);
  if (!c) return;
  CHECK_OK(st_config_resolve(c, 1, 0, &s, err), err);
  CHECK(s.max_bad_steps == 3 && s.save_steps == 0 && s.keep_last == 0 && s.seed == 42);
  CHECK(strcmp(s.output_path, "out") == 0);
  CHECK(s.gradient_clipping == 1.0 && s.steps_per_print == 0);
  CHECK(s.num_workers == 1 && s.shuffle && s.dataset_repeat == 1);
  CHECK(s.device_type == ST_DEVICE_CPU && s.threads == 0);
  CHECK(s.optimizer.type == ST_OPTIM_ADAMW && s.optimizer.lr == 1e-3 && s.optimizer.adam_w_mode);
  CHECK(s.scheduler.type == ST_SCHED_CONSTANT);
  CHECK(s.precision.dtype == ST_F32);
  CHECK(strcmp(s.strategy_name, "local") == 0);
  CHECK(s.model_name == NULL);
  st_config_free(c);
}

/* DeepSpeed's rules (reference §1.2), world size 2 unless stated */
static void test_batch_triple(void) {
  st_error err_, *err = &err_;
  st_settings s;
  CHECK_OK(resolve_text("{\"train_batch_size\": 32, \"train_micro_batch_size_per_gpu\": 4}", 2, 0, &s, err), err);
  CHECK(s.train_batch_size == 32 && s.micro_batch_size == 4 && s.grad_accum_steps == 32 / (4 * 2));
  CHECK_OK(resolve_text("{\"train_batch_size\": 32, \"gradient_accumulation_steps\": 2}", 2, 0, &s, err), err);
  CHECK(s.micro_batch_size == 32 / (2 * 2) && s.grad_accum_steps == 2);
  CHECK_OK(resolve_text("{\"train_micro_batch_size_per_gpu\": 4, \"gradient_accumulation_steps\": 3}", 2, 0, &s, err),
           err);
  CHECK(s.train_batch_size == 4 * 3 * 2);
  CHECK_OK(resolve_text("{\"train_batch_size\": 32}", 2, 0, &s, err), err);
  CHECK(s.grad_accum_steps == 1 && s.micro_batch_size == 32 / 2);
  CHECK_OK(resolve_text("{\"train_micro_batch_size_per_gpu\": 4}", 2, 0, &s, err), err);
  CHECK(s.grad_accum_steps == 1 && s.train_batch_size == 4 * 2);
  CHECK_OK(resolve_text("{}", 2, 0, &s, err), err);
  CHECK(s.micro_batch_size == 1 && s.grad_accum_steps == 1 && s.train_batch_size == 2);
  CHECK_OK(resolve_text("{\"train_batch_size\": \"auto\", \"train_micro_batch_size_per_gpu\": 3, "
                        "\"gradient_accumulation_steps\": \"auto\"}",
                        4, 0, &s, err),
           err);
  CHECK(s.train_batch_size == 3 * 1 * 4 && s.grad_accum_steps == 1);
  CHECK_OK(resolve_text("{\"train_batch_size\": 16, \"train_micro_batch_size_per_gpu\": 4, "
                        "\"gradient_accumulation_steps\": 2}",
                        2, 0, &s, err),
           err);

  CHECK_RESULT(resolve_text("{\"train_batch_size\": 10, \"train_micro_batch_size_per_gpu\": 4}", 2, 0, &s, err),
               ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "train_batch_size") == 0);
  CHECK_CONTAINS(err->message,
                 "train_batch_size 10 is not divisible by train_micro_batch_size_per_gpu 4 × world size 2 = 8");
  CHECK_RESULT(resolve_text("{\"train_batch_size\": 10, \"gradient_accumulation_steps\": 4}", 2, 0, &s, err),
               ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "train_batch_size 10 is not divisible by gradient_accumulation_steps 4 × world size 2 = 8");
  CHECK_RESULT(resolve_text("{\"train_batch_size\": 9}", 2, 0, &s, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "train_batch_size 9 is not divisible by the data-parallel world size 2");
  CHECK_RESULT(resolve_text("{\"train_batch_size\": 32, \"train_micro_batch_size_per_gpu\": 4, "
                            "\"gradient_accumulation_steps\": 2}",
                            2, 0, &s, err),
               ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "train_batch_size (32) != train_micro_batch_size_per_gpu (4) × "
                              "gradient_accumulation_steps (2) × data-parallel world size (2) = 16");

  /* resolving again at another world size re-derives what was derived, keeps what was given */
  st_config *c = load("{\"train_micro_batch_size_per_gpu\": 4}", err);
  CHECK(c != NULL);
  if (c) {
    CHECK_OK(st_config_resolve(c, 2, 0, &s, err), err);
    CHECK(s.train_batch_size == 8);
    CHECK_OK(st_config_resolve(c, 4, 0, &s, err), err);
    CHECK(s.train_batch_size == 16 && s.micro_batch_size == 4);
    CHECK(st_config_provenance(c, "train_batch_size") == ST_PROV_DERIVED);
    CHECK(st_config_provenance(c, "train_micro_batch_size_per_gpu") == ST_PROV_FILE);
    st_config_free(c);
  }
}

static void test_set_and_precedence(void) {
  st_error err_, *err = &err_;
  st_settings s;
  st_config *c = NULL;
  const char *ds = write_tmp("ds.json", "{\"gradient_clipping\": 0.5, \"train_micro_batch_size_per_gpu\": 2,\n"
                                        " \"zero_optimization\": {\"stage\": 3, \"overlap_comm\": true},\n"
                                        " \"train\": {\"seed\": 5, \"save_steps\": 7}}");
  const char *main_cfg = write_tmp("main.json", "{\"gradient_clipping\": 0.7, \"zero_optimization\": {\"stage\": 2},\n"
                                                " \"train\": {\"seed\": 6}, \"model\": {\"name\": \"mlp\"}}");
  const char *sets[] = {"gradient_clipping=0.9",       "train.max_steps=100",         "optimizer.params.lr=1e-4",
                        "data.shuffle=false",          "train.output_path=runs/x",    "model.tag=\"quoted\"",
                        "data.validation={\"synthetic\":{\"num_samples\":4}}", "model.extra.deep.key=null"};
  CHECK_OK(st_config_load(main_cfg, ds, sets, 8, &c, err), err);
  if (!c) return;
  CHECK_OK(st_config_resolve(c, 1, 0, &s, err), err);
  CHECK(s.gradient_clipping == 0.9);
  CHECK(s.max_steps == 100);
  CHECK(s.optimizer.lr == 1e-4);
  CHECK(!s.shuffle);
  CHECK(strcmp(s.output_path, "runs/x") == 0);
  CHECK(s.seed == 6);           /* main file over DeepSpeed file */
  CHECK(s.save_steps == 7);     /* only in the DeepSpeed file */
  CHECK(s.micro_batch_size == 2);
  CHECK(s.val_synthetic_samples == 4 && s.val_seed == 1234); /* a JSON object through --set */
  st_cfg *model = st_config_node(c, "model");
  const st_cfg_api *api = st_config_api();
  const char *tag = NULL;
  CHECK_OK(api->get_string(model, "tag", NULL, &tag, err), err);
  CHECK(tag && strcmp(tag, "quoted") == 0);
  CHECK(api->type(st_config_node(c, "data.validation"), "synthetic") == ST_CFG_OBJECT);
  CHECK(api->type(st_config_node(c, "model.extra.deep"), "key") == ST_CFG_NULL);

  CHECK(st_config_provenance(c, "gradient_clipping") == ST_PROV_SET);
  CHECK(st_config_provenance(c, "train.seed") == ST_PROV_FILE);
  CHECK(st_config_provenance(c, "train.save_steps") == ST_PROV_DEEPSPEED);
  CHECK(st_config_provenance(c, "zero_optimization.stage") == ST_PROV_FILE);
  CHECK(st_config_provenance(c, "zero_optimization.overlap_comm") == ST_PROV_DEEPSPEED); /* deep merge */
  CHECK(st_config_provenance(c, "train_micro_batch_size_per_gpu") == ST_PROV_DEEPSPEED);
  CHECK(st_config_provenance(c, "train.keep_last") == ST_PROV_DEFAULT);
  CHECK(st_config_provenance(c, "train_batch_size") == ST_PROV_DERIVED);
  CHECK(st_config_provenance(c, "data.validation.synthetic.num_samples") == ST_PROV_SET);

  /* validation-driven options without a validation set, and an unknown monitor */
  st_config_free(c);
  CHECK_RESULT(extract_fails("{\"train\": {\"checkpoint\": {\"save_top_k\": 2}}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "needs a validation set");
  CHECK_RESULT(extract_fails("{\"data\": {\"validation\": {\"synthetic\": {\"num_samples\": 4}}}, "
                             "\"train\": {\"checkpoint\": {\"monitor\": \"val_acc\"}}}", err), ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "train.checkpoint.monitor") == 0);
  CHECK_RESULT(extract_fails("{\"data\": {\"validation\": {\"max_samples\": 4}}}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "dataset_base_path");
  c = NULL;
  CHECK_OK(st_config_load(main_cfg, ds, sets, 8, &c, err), err);
  if (!c) return;
  CHECK_OK(st_config_resolve(c, 1, 0, &s, err), err);

  /* the listing: every leaf, aligned, with its source */
  char *out = printed(c);
  char line_[512], *line = line_;
  CHECK_CONTAINS(line_of(out, "gradient_clipping", line, sizeof line_), "0.9");
  CHECK_CONTAINS(line, "(--set)");
  CHECK_CONTAINS(line_of(out, "train.seed", line, sizeof line_), "(file)");
  CHECK_CONTAINS(line_of(out, "train.save_steps", line, sizeof line_), "(deepspeed)");
  CHECK_CONTAINS(line_of(out, "train.keep_last", line, sizeof line_), "(default)");
  CHECK_CONTAINS(line_of(out, "train_batch_size", line, sizeof line_), "(derived)");
  CHECK_CONTAINS(line_of(out, "optimizer.params.lr", line, sizeof line_), "0.0001");
  CHECK_CONTAINS(line_of(out, "train.output_path", line, sizeof line_), "\"runs/x\"");
  /* aligned: " = " and "(" at the same column on every line */
  long eq_col = -1, paren_col = -1;
  bool aligned = true;
  int lines = 0;
  for (char *p = out; p && *p; lines++) {
    char *eol = strchr(p, '\n');
    char *eq = strstr(p, " = "), *paren = eol ? memrchr(p, '(', (size_t)(eol - p)) : strrchr(p, '(');
    if (!eq || !paren || (eol && eq > eol)) {
      aligned = false;
      break;
    }
    if (eq_col < 0) eq_col = eq - p, paren_col = paren - p;
    aligned &= (eq - p == eq_col) && (paren - p == paren_col);
    p = eol ? eol + 1 : NULL;
  }
  CHECK_MSG(aligned && lines > 20, "listing not aligned:\n%s", out);
  free(out);
  st_config_free(c);

  /* --set errors */
  c = load("{\"train\": {\"max_steps\": 5}}", err);
  if (!c) return;
  CHECK_RESULT(st_config_apply_set(c, "train.max_steps.x=1", err), ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "train.max_steps") == 0);
  CHECK_CONTAINS(err->message, "\"train.max_steps\" is an integer (5), not an object");
  CHECK_RESULT(st_config_apply_set(c, "novalue", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "KEY.PATH=VALUE");
  CHECK_RESULT(st_config_apply_set(c, "train..seed=1", err), ST_ERR_CONFIG, err);
  /* a value that is not JSON is a string: "8" here is the string "8x", and a typed error follows */
  CHECK_OK(st_config_apply_set(c, "train.max_steps=8x", err), err);
  CHECK_RESULT(st_config_extract(c, &s, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "train.max_steps: expected an integer, found a string (\"8x\") (from --set)");
  /* a --set typo is caught like a file typo */
  CHECK_OK(st_config_apply_set(c, "train.max_steps=3", err), err);
  CHECK_OK(st_config_apply_set(c, "train.sead=3", err), err);
  CHECK_RESULT(st_config_extract(c, &s, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "did you mean \"train.seed\"?");
  st_config_free(c);
}

static void test_auto(void) {
  st_error err_, *err = &err_;
  st_settings s;
  const char *text =
      "{\"train_batch_size\": \"auto\", \"train_micro_batch_size_per_gpu\": \"auto\", \"gradient_clipping\": \"auto\",\n"
      " \"optimizer\": {\"type\": \"AdamW\", \"params\": {\"lr\": 2e-4, \"betas\": \"auto\", \"eps\": \"auto\", "
      "\"weight_decay\": \"auto\"}},\n"
      " \"scheduler\": {\"type\": \"WarmupDecayLR\", \"params\": {\"warmup_min_lr\": \"auto\", \"warmup_max_lr\": "
      "\"auto\", \"warmup_num_steps\": 10, \"total_num_steps\": \"auto\"}},\n"
      " \"fp16\": {\"enabled\": \"auto\"}, \"bf16\": {\"enabled\": true},\n"
      " \"zero_optimization\": {\"stage\": 3, \"reduce_bucket_size\": \"auto\", \"stage3_prefetch_bucket_size\": "
      "\"auto\", \"stage3_param_persistence_threshold\": \"auto\", \"stage3_gather_16bit_weights_on_model_save\": "
      "\"auto\"},\n"
      " \"train\": {\"max_steps\": 500}}";
  st_config *c = load(text, err);
  CHECK(c != NULL);
  if (!c) return;
  /* before resolution the sentinels show what is pending */
  CHECK_OK(st_config_extract(c, &s, err), err);
  CHECK(st_config_is_auto_int(s.train_batch_size) && st_config_is_auto_int(s.micro_batch_size));
  CHECK(st_config_is_auto_number(s.gradient_clipping));
  CHECK(st_config_is_auto_number(s.optimizer.beta1) && st_config_is_auto_number(s.optimizer.eps));
  CHECK(st_config_is_auto_int(s.scheduler.total_num_steps));
  CHECK(s.optimizer.lr == 2e-4);

  const int64_t h = 64;
  CHECK_OK(st_config_resolve(c, 2, h, &s, err), err);
  CHECK(s.gradient_clipping == 1.0);
  CHECK(s.optimizer.beta1 == 0.9 && s.optimizer.beta2 == 0.999 && s.optimizer.eps == 1e-8);
  CHECK(s.optimizer.weight_decay == 0.0);
  CHECK(s.scheduler.warmup_min_lr == 0.0);
  CHECK(s.scheduler.warmup_max_lr == 2e-4); /* the optimizer's lr */
  CHECK(s.scheduler.total_num_steps == 500);
  CHECK(s.scheduler.warmup_num_steps == 10);
  CHECK(s.precision.dtype == ST_BF16);
  CHECK(s.micro_batch_size == 1 && s.train_batch_size == 2);
  const st_cfg_api *api = st_config_api();
  st_cfg *z = st_config_node(c, "zero_optimization");
  int64_t v;
  bool b = true;
  CHECK_OK(api->get_int(z, "reduce_bucket_size", -1, &v, err), err);
  CHECK(v == h * h);
  CHECK_OK(api->get_int(z, "stage3_prefetch_bucket_size", -1, &v, err), err);
  CHECK(v == (int64_t)(0.9 * 64 * 64)); /* 3686.4 -> 3686 */
  CHECK_OK(api->get_int(z, "stage3_param_persistence_threshold", -1, &v, err), err);
  CHECK(v == 10 * h);
  CHECK_OK(api->get_bool(z, "stage3_gather_16bit_weights_on_model_save", true, &b, err), err);
  CHECK(!b);
  CHECK(st_config_provenance(c, "zero_optimization.reduce_bucket_size") == ST_PROV_DERIVED);
  CHECK(st_config_provenance(c, "fp16.enabled") == ST_PROV_DERIVED);
  CHECK(st_config_provenance(c, "optimizer.params.betas") == ST_PROV_DERIVED);
  CHECK(st_config_provenance(c, "optimizer.params.lr") == ST_PROV_FILE);
  char *out = printed(c);
  char line_[512], *line = line_;
  CHECK_CONTAINS(line_of(out, "scheduler.params.total_num_steps", line, sizeof line_), "500");
  CHECK_CONTAINS(line, "(derived)");
  CHECK_CONTAINS(line_of(out, "optimizer.params.betas", line, sizeof line_), "[0.9,0.999]");
  free(out);

  /* the resolved document round-trips as JSON, keys sorted */
  char *json = st_config_to_json(c);
  CHECK(json != NULL);
  if (json) {
    json_error_t je;
    json_t *j = json_loads(json, JSON_REJECT_DUPLICATES, &je);
    CHECK(j != NULL);
    CHECK(json_integer_value(json_object_get(j, "train_batch_size")) == 2);
    CHECK(strstr(json, "\"bf16\"") < strstr(json, "\"fp16\"") && strstr(json, "\"fp16\"") < strstr(json, "\"train\""));
    json_decref(j);
    free(json);
  }
  st_config_free(c);

  /* hidden-size autos need a hidden size */
  CHECK_RESULT(resolve_text("{\"zero_optimization\": {\"reduce_bucket_size\": \"auto\"}}", 1, 0, &s, err),
               ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "zero_optimization.reduce_bucket_size is \"auto\"");
  /* auto where DeepSpeed does not allow it */
  CHECK_RESULT(extract_fails("{\"steps_per_print\": \"auto\"}", err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "\"auto\" is not resolved here");
  /* lr auto: the optimizer default, and warmup_max_lr follows it */
  CHECK_OK(resolve_text("{\"optimizer\": {\"params\": {\"lr\": \"auto\"}}, \"scheduler\": {\"type\": \"WarmupLR\"}}", 1,
                        0, &s, err),
           err);
  CHECK(s.optimizer.lr == 1e-3 && s.scheduler.warmup_max_lr == 1e-3 && s.scheduler.warmup_num_steps == 1000);
  /* total_num_steps with no max_steps: left to the trainer (0) */
  CHECK_OK(resolve_text("{\"scheduler\": {\"type\": \"WarmupCosineLR\"}}", 1, 0, &s, err), err);
  CHECK(s.scheduler.total_num_steps == 0 && s.scheduler.cos_min_ratio == 1e-4);
}

static void test_cfg_api(void) {
  st_error err_, *err = &err_;
  st_config *c = load("{\"model\": {\"name\": \"mlp\", \"lora\": {\"rank\": \"8\", \"alpha\": 16.0, \"targets\": "
                      "[\"q\", \"k\", \"v\"]}, \"act\": \"SiLU\", \"dims\": [1, 2.0, 3], \"scales\": [0.5, 1], "
                      "\"hiden\": 3, \"auto_thing\": \"auto\"}}",
                       err);
  CHECK(c != NULL);
  if (!c) return;
  const st_cfg_api *api = st_config_api();
  CHECK(api->struct_size == sizeof(st_cfg_api));
  st_cfg *model = st_config_node(c, "model");
  CHECK(model != NULL);
  CHECK(strcmp(api->path(model), "model") == 0);
  CHECK(api->type(model, NULL) == ST_CFG_OBJECT);
  CHECK(api->type(model, "name") == ST_CFG_STRING);
  CHECK(api->type(model, "missing") == ST_CFG_ABSENT);

  int64_t layers = 0;
  CHECK_OK(api->get_int(model, "layers", 4, &layers, err), err);
  CHECK(layers == 4);
  double dropout = -1;
  CHECK_OK(api->get_number(model, "dropout", 0.25, &dropout, err), err);
  CHECK(dropout == 0.25);
  bool bias = false;
  CHECK_OK(api->get_bool(model, "bias", true, &bias, err), err);
  CHECK(bias);
  const char *s = NULL;
  CHECK_OK(api->get_string(model, "weights", "none", &s, err), err);
  CHECK(s && strcmp(s, "none") == 0);
  CHECK_OK(api->get_string(model, "preset", NULL, &s, err), err);
  CHECK(s == NULL);
  CHECK(api->type(model, "preset") == ST_CFG_ABSENT); /* no default, nothing stored */

  st_cfg *lora = NULL;
  CHECK_OK(api->get_object(model, "lora", false, &lora, err), err);
  CHECK(lora && strcmp(api->path(lora), "model.lora") == 0);
  int64_t rank;
  CHECK_RESULT(api->get_int(lora, "rank", 4, &rank, err), ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "model.lora.rank") == 0);
  CHECK_CONTAINS(err->message, "model.lora.rank: expected an integer, found a string (\"8\")");
  double alpha;
  CHECK_OK(api->get_number(lora, "alpha", 1, &alpha, err), err);
  CHECK(alpha == 16.0);
  int64_t ia;
  CHECK_OK(api->get_int(lora, "alpha", 1, &ia, err), err); /* 16.0 is an integer */
  CHECK(ia == 16);
  CHECK_RESULT(api->get_bool(lora, "alpha", false, &bias, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "model.lora.alpha: expected a boolean");
  CHECK_RESULT(api->get_int(model, "auto_thing", 1, &ia, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "\"auto\"");

  const char *targets[4];
  size_t n = 0;
  CHECK_OK(api->get_string_list(lora, "targets", targets, 4, &n, err), err);
  CHECK(n == 3 && strcmp(targets[2], "v") == 0);
  CHECK_RESULT(api->get_string_list(lora, "targets", targets, 2, &n, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "at most 2 items");
  CHECK_OK(api->get_string_list(lora, "absent_list", targets, 2, &n, err), err);
  CHECK(n == 0);
  int64_t dims[4];
  CHECK_OK(api->get_int_list(model, "dims", dims, 4, &n, err), err);
  CHECK(n == 3 && dims[0] == 1 && dims[1] == 2 && dims[2] == 3);
  double scales[4];
  CHECK_OK(api->get_number_list(model, "scales", scales, 4, &n, err), err);
  CHECK(n == 2 && scales[0] == 0.5 && scales[1] == 1.0);
  CHECK_RESULT(api->get_int_list(model, "scales", dims, 4, &n, err), ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "model.scales[0]") == 0);

  static const char *const acts[] = {"gelu", "silu", NULL};
  const char *act = NULL;
  CHECK_OK(api->get_enum(model, "act", acts, "gelu", &act, err), err);
  CHECK(act == acts[1]); /* case-insensitive, returns the choice's spelling */
  CHECK_OK(api->get_enum(model, "norm_act", acts, "gelu", &act, err), err);
  CHECK(act && strcmp(act, "gelu") == 0);
  CHECK_RESULT(api->get_enum(model, "name", acts, "gelu", &act, err), ST_ERR_CONFIG, err);
  CHECK_CONTAINS(err->message, "model.name: expected one of \"gelu\", \"silu\"");

  st_cfg *created = NULL;
  CHECK_OK(api->get_object(model, "overrides", false, &created, err), err);
  CHECK(created == NULL);
  CHECK_OK(api->get_object(model, "overrides", true, &created, err), err);
  CHECK(created && api->type(model, "overrides") == ST_CFG_OBJECT);
  int64_t depth;
  CHECK_OK(api->get_int(created, "depth", 2, &depth, err), err);
  CHECK_RESULT(api->get_object(model, "name", false, &created, err), ST_ERR_CONFIG, err);

  static const char *const allowed[] = {"name", "lora", "act", "dims", "scales", "hidden", "auto_thing", "layers",
                                        "dropout", "bias", "weights", "norm_act", "overrides", NULL};
  CHECK_RESULT(api->check_keys(model, allowed, err), ST_ERR_CONFIG, err);
  CHECK(strcmp(err->where, "model.hiden") == 0);
  CHECK_CONTAINS(err->message, "did you mean \"model.hidden\"?");
  static const char *const lora_keys[] = {"rank", "alpha", "targets", NULL};
  CHECK_OK(api->check_keys(lora, lora_keys, err), err);

  char *json = api->to_json(lora);
  CHECK(json && strcmp(json, "{\"alpha\":16.0,\"rank\":\"8\",\"targets\":[\"q\",\"k\",\"v\"]}") == 0);
  free(json);

  /* a NULL node (an absent block) reads as empty and stores nothing */
  CHECK_OK(api->get_int(NULL, "x", 7, &depth, err), err);
  CHECK(depth == 7);
  CHECK(st_config_node(c, "model.nothing") == NULL);

  /* the inserted defaults appear in the listing with provenance "default" */
  char *out = printed(c);
  char line_[512], *line = line_;
  CHECK_CONTAINS(line_of(out, "model.layers", line, sizeof line_), "= 4");
  CHECK_CONTAINS(line, "(default)");
  CHECK_CONTAINS(line_of(out, "model.overrides.depth", line, sizeof line_), "(default)");
  CHECK_CONTAINS(line_of(out, "model.name", line, sizeof line_), "(file)");
  free(out);
  st_config_free(c);
}

static void test_deepspeed_examples(void) {
  const char *root = getenv("ST_SOURCE_ROOT");
  if (!root) root = ".";
  static const char *const files[] = {"configs/deepspeed/ds_z3_cpuoffload.json", "configs/deepspeed/ds_z2.json"};
  const char *main_cfg = write_tmp("user.json", "{\"model\": {\"name\": \"mlp\"}, \"train_micro_batch_size_per_gpu\": "
                                                "4, \"optimizer\": {\"params\": {\"lr\": 3e-4}}, \"train\": "
                                                "{\"max_steps\": 50}}");
  for (int i = 0; i < 2; i++) {
    char ds[512];
    snprintf(ds, sizeof ds, "%s/%s", root, files[i]);
    st_error err_, *err = &err_;
    st_config *c = NULL;
    st_settings s;
    CHECK_OK(st_config_load(main_cfg, ds, NULL, 0, &c, err), err);
    if (!c) continue;
    const int world = 2;
    const int64_t h = 128;
    CHECK_OK(st_config_resolve(c, world, h, &s, err), err);
    CHECK(s.micro_batch_size == 4 && s.grad_accum_steps == 1 && s.train_batch_size == 4 * 1 * world);
    CHECK(s.optimizer.lr == 3e-4 && s.optimizer.type == ST_OPTIM_ADAMW);
    CHECK(s.gradient_clipping == 1.0 && s.precision.dtype == ST_F32);
    CHECK(s.steps_per_print == 2000);
    CHECK(s.scheduler.warmup_max_lr == 3e-4);
    st_cfg *z = st_config_node(c, "zero_optimization");
    int64_t stage = -1, rbs = -1;
    CHECK_OK(st_config_api()->get_int(z, "stage", 0, &stage, err), err);
    CHECK(stage == (i == 0 ? 3 : 2));
    CHECK_OK(st_config_api()->get_int(z, "reduce_bucket_size", 0, &rbs, err), err);
    CHECK(rbs == h * h);
    CHECK(st_config_provenance(c, "zero_optimization.stage") == ST_PROV_DEEPSPEED);
    CHECK(st_config_provenance(c, "optimizer.params.lr") == ST_PROV_FILE);
    if (i == 1) CHECK(s.scheduler.type == ST_SCHED_WARMUP_DECAY_LR && s.scheduler.total_num_steps == 50);
    st_config_free(c);
  }
  /* and the demo config the README trains */
  char demo[512];
  snprintf(demo, sizeof demo, "%s/configs/demo/mlp.json", root);
  st_error err_, *err = &err_;
  st_config *c = NULL;
  st_settings s;
  CHECK_OK(st_config_load(demo, NULL, NULL, 0, &c, err), err);
  if (c) {
    CHECK_OK(st_config_resolve(c, 1, 64, &s, err), err);
    CHECK(s.max_steps == 300 && s.scheduler.total_num_steps == 300 && s.micro_batch_size == 16);
    st_config_free(c);
  }
  /* the demo over the ZeRO-3 file: its WarmupCosineLR replaces the file's WarmupLR whole (the
   * params of two scheduler types do not mix); everything else merges */
  char ds[512];
  snprintf(ds, sizeof ds, "%s/%s", root, files[0]);
  CHECK_OK(st_config_load(demo, ds, NULL, 0, &c, err), err);
  if (c) {
    CHECK_OK(st_config_resolve(c, 2, 64, &s, err), err);
    CHECK(s.scheduler.type == ST_SCHED_WARMUP_COSINE_LR && s.scheduler.warmup_num_steps == 20);
    CHECK(st_config_provenance(c, "scheduler.type") == ST_PROV_FILE);
    CHECK(st_config_node(c, "scheduler.params") && st_config_api()->type(st_config_node(c, "scheduler.params"),
                                                                         "warmup_max_lr") == ST_CFG_ABSENT);
    CHECK(s.train_batch_size == 16 * 1 * 2);
    st_config_free(c);
  }
}

int main(void) {
  snprintf(tmpdir, sizeof tmpdir, "%s/st-config-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  if (!mkdtemp(tmpdir)) {
    perror("mkdtemp");
    return 1;
  }
  test_syntax_errors();
  test_unknown_keys();
  test_types_and_ranges();
  test_batch_triple();
  test_set_and_precedence();
  test_auto();
  test_cfg_api();
  test_deepspeed_examples();
  static const char *const names[] = {"bad.json", "ds.json", "main.json", "user.json"};
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", tmpdir, names[i]);
    unlink(p);
  }
  rmdir(tmpdir);
  return st_test_finish("test_config");
}
