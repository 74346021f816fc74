/* test_plugin_loader.c — runtime/plugin.c against the plugins of this folder (see plugin_model.c):
 * loading by name through STRATA_PLUGIN_PATH and by explicit path, each broken plugin's message,
 * the "nothing loads" error listing every path tried in search order, built-ins winning over files,
 * falling through a broken file to a good one, the zero-padded copy of a short struct,
 * STRATA_DEBUG=plugins being the only output, st_plugin_search_dirs and st_plugin_list.
 *
 * Expected paths are rebuilt here from ST_BUILD_ROOT / ST_PLUGINDIR / TEST_PLUGIN_DIR and the
 * documented search order, not read back from the loader. */
#include "local_strategy.h"
#include "plugin.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include "st_test.h"

#ifndef TEST_PLUGIN_DIR
#error "TEST_PLUGIN_DIR must be defined"
#endif

static char tmp[256];

static const char *plugin_file(const char *kind, const char *name) {
  static char buf[8][1024];
  static int next = 0;
  char *p = buf[next++ % 8];
  snprintf(p, sizeof buf[0], "%s/libstrata-%s-%s.so", TEST_PLUGIN_DIR, kind, name);
  return p;
}

static const char *tmp_path(const char *rel) {
  static char buf[8][1024];
  static int next = 0;
  char *p = buf[next++ % 8];
  snprintf(p, sizeof buf[0], "%s/%s", tmp, rel);
  return p;
}

static void make_dir(const char *p) {
  if (mkdir(p, 0755) != 0) {
    perror(p);
    exit(1);
  }
}

static void link_to(const char *target, const char *link) {
  unlink(link);
  if (symlink(target, link) != 0) {
    perror(link);
    exit(1);
  }
}

static int count_of(const char *hay, const char *needle) {
  int n = 0;
  size_t nl = strlen(needle);
  for (const char *p = strstr(hay, needle); p; p = strstr(p + nl, needle)) n++;
  return n;
}

/* ---- stderr capture, for the STRATA_DEBUG check ---- */
static int saved_stderr = -1;
static void capture_begin(void) {
  fflush(stderr);
  saved_stderr = dup(2);
  int fd = open(tmp_path("stderr.txt"), O_CREAT | O_TRUNC | O_WRONLY, 0644);
  dup2(fd, 2);
  close(fd);
}
static char *capture_end(void) {
  fflush(stderr);
  dup2(saved_stderr, 2);
  close(saved_stderr);
  FILE *f = fopen(tmp_path("stderr.txt"), "rb");
  static char text[65536];
  size_t n = f ? fread(text, 1, sizeof text - 1, f) : 0;
  text[n] = '\0';
  if (f) fclose(f);
  return text;
}

/* load a model by name or path expecting ST_ERR_PLUGIN, returning the message */
static const char *model_fails(const char *ref, st_error *err) {
  st_plugin p;
  st_error_clear(err);
  CHECK_RESULT(st_plugin_load(ST_PLUGIN_MODEL, ref, NULL, 0, &p, err), ST_ERR_PLUGIN, err);
  CHECK(p.handle == NULL && p.v.any == NULL);
  return err->message;
}

static void test_good_model(void) {
  st_error err;
  st_plugin p;
  setenv("STRATA_PLUGIN_PATH", TEST_PLUGIN_DIR, 1);
  const char *refs[2] = {"good", plugin_file("model", "good")};
  for (int i = 0; i < 2; i++) {
    CHECK_OK(st_plugin_load(ST_PLUGIN_MODEL, refs[i], NULL, 0, &p, &err), &err);
    if (!p.v.model) continue;
    CHECK(p.kind == ST_PLUGIN_MODEL);
    CHECK(p.handle != NULL);
    CHECK(strcmp(p.path, plugin_file("model", "good")) == 0);
    CHECK(p.header == &p.v.model->header);
    CHECK(strcmp(p.header->name, "good") == 0 && strcmp(p.header->kind, "model") == 0);
    CHECK(strcmp(p.header->version, "1.2.3") == 0);
    CHECK(p.header->abi_version == ST_ABI_VERSION && p.header->struct_size == sizeof(st_model_plugin_v1));
    /* the methods are the plugin's code: call them */
    const st_model_plugin_v1 *m = p.v.model;
    CHECK_OK(m->validate(NULL, NULL, &err), &err);
    void *ctx = NULL;
    CHECK_OK(m->init(NULL, NULL, &ctx, &err), &err);
    CHECK(ctx != NULL);
    const st_model_desc *d = m->describe(ctx);
    CHECK(d && d->n_units == 2 && d->n_params_total == 15 && strcmp(d->units[1].name, "final") == 0);
    float v[4] = {0};
    CHECK_OK(m->init_param(ctx, 5, 1, 0, 2, 4, ST_F32, v, &err), &err);
    CHECK(v[0] == 1005.0f + 2.0f && v[3] == 1005.0f + 5.0f); /* seed + 1000*unit + offset + i */
    CHECK(m->forward_flops(ctx, NULL) == 42.0);
    CHECK(m->synth_sample != NULL && m->export_weights == NULL);
    m->finalize(ctx);
    st_plugin_unload(&p);
    CHECK(p.handle == NULL && p.v.any == NULL && p.header == NULL && p.path[0] == '\0');
  }
  st_plugin_unload(&p); /* twice is harmless */
}

static void test_broken_models(void) {
  st_error err;
  char want[512];
  setenv("STRATA_PLUGIN_PATH", TEST_PLUGIN_DIR, 1);
  /* each by name (STRATA_PLUGIN_PATH) and by path: the same reason, naming the file */
  static const struct {
    const char *name;
    const char *words[3];
  } cases[] = {
      {"newer_abi", {"abi_version 2 is newer than this strata (1): rebuild the plugin against strata 0.1 or upgrade "
                     "strata",
                     NULL, NULL}},
      {"abi_zero", {"abi_version 0 does not match its symbol (ABI 1)", "ST_PLUGIN_HEADER", NULL}},
      {"small_struct", {"struct_size", "too small", "unit_backward and later are missing"}},
      {"null_method", {"required methods unit_backward, loss are NULL", "only synth_sample, export_weights may be NULL",
                       NULL}},
      {"wrong_name", {"name mismatch", "\"someone_else\"", "\"wrong_name\""}},
      {"wrong_kind", {"header kind is \"strategy\", expected \"model\"", NULL, NULL}},
      {"bad_cuda", {"built for CUDA 99", NULL, NULL}},
      {"no_symbol", {"no symbol strata_model_plugin_v1", "ST_EXPORT", NULL}},
      {"v2_only", {"exports only strata_model_plugin_v2", "newer than this strata", NULL}},
      {"undefined", {"dlopen failed", "undefined symbol", "st_test_no_such_function"}},
  };
  /* the test's literal expectations assume ABI 1 / strata 0.1: say so if the SDK moved */
  CHECK(ST_ABI_VERSION == 1 && ST_VERSION_MAJOR == 0 && ST_VERSION_MINOR == 1);
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    const char *file = plugin_file("model", cases[i].name);
    for (int by_path = 0; by_path < 2; by_path++) {
      const char *msg = model_fails(by_path ? file : cases[i].name, &err);
      snprintf(want, sizeof want, "  %s: ", file);
      CHECK_CONTAINS(msg, want);
      CHECK_MSG(count_of(msg, file) == 1, "%s listed %d times in: %s", file, count_of(msg, file), msg);
      for (int w = 0; w < 3; w++)
        if (cases[i].words[w]) CHECK_CONTAINS(msg, cases[i].words[w]);
      CHECK(strcmp(err.where, by_path ? file : "") == 0);
      CHECK_CONTAINS(msg, by_path ? "model plugin could not be loaded from the path given; tried:\n"
                                  : "model plugin \"");
    }
  }
  /* a strategy / comm file loaded as a model names what it is */
  CHECK_CONTAINS(model_fails(plugin_file("comm", "stub"), &err), "it is a comm plugin, not a model plugin");
  /* not an ELF file */
  FILE *f = fopen(tmp_path("libstrata-model-garbage.so"), "w");
  fputs("this is not a shared object\n", f);
  fclose(f);
  const char *msg = model_fails(tmp_path("libstrata-model-garbage.so"), &err);
  CHECK_CONTAINS(msg, "libstrata-model-garbage.so: dlopen failed: ");
  /* a path that does not exist, and a folder */
  CHECK_CONTAINS(model_fails("/nonexistent/libstrata-model-x.so", &err), "/nonexistent/libstrata-model-x.so: not found");
  CHECK_CONTAINS(model_fails(tmp, &err), "is a directory");
}

/* A short struct that still has every required method loads; the optional methods past its
 * struct_size read as NULL although the plugin's object has synth_sample set there. */
static void test_short_struct(void) {
  st_error err;
  st_plugin p;
  setenv("STRATA_PLUGIN_PATH", TEST_PLUGIN_DIR, 1);
  CHECK_OK(st_plugin_load(ST_PLUGIN_MODEL, "short_optional", NULL, 0, &p, &err), &err);
  if (!p.v.model) return;
  CHECK(p.header->struct_size == offsetof(st_model_plugin_v1, synth_sample));
  CHECK(p.v.model->synth_sample == NULL && p.v.model->export_weights == NULL);
  CHECK(p.v.model->forward_flops && p.v.model->forward_flops(NULL, NULL) == 42.0);
  /* the object in the .so does have it: the loader handed out a copy */
  const st_model_plugin_v1 *raw = dlsym(p.handle, "strata_model_plugin_v1");
  CHECK(raw && raw != p.v.model && raw->synth_sample != NULL);
  st_plugin_unload(&p); /* frees the copy (the ASan build checks) */
}

static void test_nothing_loads(void) {
  st_error err;
  char env[1024], want[1024];
  make_dir(tmp_path("a"));
  make_dir(tmp_path("b"));
  /* "absent": in no folder at all; every path tried is listed, in search order */
  snprintf(env, sizeof env, "/nonexistent/one:%s:", tmp_path("a"));
  setenv("STRATA_PLUGIN_PATH", env, 1);
  const char *msg = model_fails("absent", &err);
  const char *expected[] = {"/nonexistent/one",
                            tmp_path("a"),
                            ST_BUILD_ROOT "/models/absent",
                            ST_BUILD_ROOT "/strategies/absent",
                            ST_BUILD_ROOT "/plugins/absent",
                            ST_PLUGINDIR};
  const char *prev = msg;
  for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++) {
    snprintf(want, sizeof want, "\n  %s/libstrata-model-absent.so: not found\n", expected[i]);
    const char *at = strstr(msg, want);
    CHECK_MSG(at != NULL, "\"%s\" missing from: %s", want, msg);
    CHECK_MSG(!at || at >= prev, "%s out of order in: %s", expected[i], msg);
    if (at) prev = at;
  }
  CHECK(count_of(msg, ": not found\n") == (int)(sizeof expected / sizeof expected[0]));
  CHECK_CONTAINS(msg, "model plugin \"absent\" could not be loaded; tried:\n");
  CHECK_CONTAINS(msg, "STRATA_PLUGIN_PATH");
  CHECK(err.where[0] == '\0');

  /* "mixed": broken in two folders, absent elsewhere: both reasons, each at its path */
  link_to(plugin_file("model", "newer_abi"), tmp_path("a/libstrata-model-mixed.so"));
  link_to(plugin_file("model", "wrong_name"), tmp_path("b/libstrata-model-mixed.so"));
  snprintf(env, sizeof env, "%s:%s", tmp_path("a"), tmp_path("b"));
  setenv("STRATA_PLUGIN_PATH", env, 1);
  msg = model_fails("mixed", &err);
  snprintf(want, sizeof want, "  %s: abi_version 2 is newer", tmp_path("a/libstrata-model-mixed.so"));
  const char *at_a = strstr(msg, want);
  CHECK_CONTAINS(msg, want);
  snprintf(want, sizeof want, "  %s: name mismatch: the header says \"someone_else\" but the file is named for \"mixed\"",
           tmp_path("b/libstrata-model-mixed.so"));
  const char *at_b = strstr(msg, want);
  CHECK_CONTAINS(msg, want);
  CHECK(at_a && at_b && at_a < at_b);
  CHECK_CONTAINS(msg, ST_BUILD_ROOT "/models/mixed/libstrata-model-mixed.so: not found");
  CHECK_CONTAINS(msg, ST_PLUGINDIR "/libstrata-model-mixed.so: not found");

  /* comm names are also looked for in the build tree's plugins/comm_<name>/ */
  st_plugin p;
  setenv("STRATA_PLUGIN_PATH", "", 1);
  CHECK_RESULT(st_plugin_load(ST_PLUGIN_COMM, "absent", NULL, 0, &p, &err), ST_ERR_PLUGIN, &err);
  CHECK_CONTAINS(err.message, ST_BUILD_ROOT "/plugins/comm_absent/libstrata-comm-absent.so: not found");

  /* bad arguments */
  CHECK_RESULT(st_plugin_load(ST_PLUGIN_MODEL, NULL, NULL, 0, &p, &err), ST_ERR_INVALID_ARGUMENT, &err);
  CHECK_RESULT(st_plugin_load((st_plugin_kind)7, "good", NULL, 0, &p, &err), ST_ERR_INVALID_ARGUMENT, &err);
  CHECK_RESULT(st_plugin_load(ST_PLUGIN_MODEL, "", NULL, 0, &p, &err), ST_ERR_PLUGIN, &err);
  CHECK_CONTAINS(err.message, "empty model plugin name");
}

static void test_order_and_builtins(void) {
  st_error err;
  st_plugin p;
  /* STRATA_PLUGIN_PATH comes before the build tree (which also has libstrata-model-good.so) */
  make_dir(tmp_path("first"));
  link_to(plugin_file("model", "good"), tmp_path("first/libstrata-model-good.so"));
  setenv("STRATA_PLUGIN_PATH", tmp_path("first"), 1);
  CHECK_OK(st_plugin_load(ST_PLUGIN_MODEL, "good", NULL, 0, &p, &err), &err);
  CHECK(strcmp(p.path, tmp_path("first/libstrata-model-good.so")) == 0);
  st_plugin_unload(&p);

  /* a broken file first: the search goes on to the build tree's good one; STRATA_DEBUG=plugins
   * logs both attempts, and without it nothing is printed */
  make_dir(tmp_path("broken"));
  link_to(plugin_file("model", "newer_abi"), tmp_path("broken/libstrata-model-good.so"));
  char broken_first[2048];
  snprintf(broken_first, sizeof broken_first, "%s:%s", tmp_path("broken"), TEST_PLUGIN_DIR);
  setenv("STRATA_PLUGIN_PATH", broken_first, 1);
  for (int debug = 0; debug < 2; debug++) {
    if (debug)
      setenv("STRATA_DEBUG", "config,plugins", 1);
    else
      unsetenv("STRATA_DEBUG");
    capture_begin();
    st_result r = st_plugin_load(ST_PLUGIN_MODEL, "good", NULL, 0, &p, &err);
    const char *printed = capture_end();
    CHECK_OK(r, &err);
    CHECK(strcmp(p.path, TEST_PLUGIN_DIR "/libstrata-model-good.so") == 0);
    st_plugin_unload(&p);
    if (!debug) {
      CHECK_MSG(printed[0] == '\0', "printed without STRATA_DEBUG: %s", printed);
    } else {
      char want[1024];
      snprintf(want, sizeof want, "%s: abi_version 2 is newer", tmp_path("broken/libstrata-model-good.so"));
      CHECK_CONTAINS(printed, want);
      CHECK_CONTAINS(printed, TEST_PLUGIN_DIR "/libstrata-model-good.so: loaded model \"good\"");
      CHECK_CONTAINS(printed, "strata: plugins: ");
    }
  }
  unsetenv("STRATA_DEBUG");

  /* an explicit path whose file name does not follow the pattern: no name to compare, loads */
  link_to(plugin_file("model", "good"), tmp_path("custom.so"));
  CHECK_OK(st_plugin_load(ST_PLUGIN_MODEL, tmp_path("custom.so"), NULL, 0, &p, &err), &err);
  CHECK(p.header && strcmp(p.header->name, "good") == 0);
  st_plugin_unload(&p);

  /* built-ins win over a file of the same name on the search path */
  setenv("STRATA_PLUGIN_PATH", TEST_PLUGIN_DIR, 1);
  st_plugin_builtin b[2] = {{ST_PLUGIN_MODEL, "local", st_local_strategy()}, /* other kind: ignored */
                            {ST_PLUGIN_STRATEGY, "local", st_local_strategy()}};
  CHECK_OK(st_plugin_load(ST_PLUGIN_STRATEGY, "local", b, 2, &p, &err), &err);
  CHECK(p.handle == NULL && p.v.strategy == st_local_strategy() && strcmp(p.path, "<built-in>") == 0);
  CHECK(p.kind == ST_PLUGIN_STRATEGY && strcmp(p.header->version, "test-file") != 0);
  st_plugin_unload(&p);
  CHECK(st_local_strategy()->header.abi_version == ST_ABI_VERSION); /* unload left the built-in alone */
  /* without built-ins the file loads */
  CHECK_OK(st_plugin_load(ST_PLUGIN_STRATEGY, "local", NULL, 0, &p, &err), &err);
  CHECK(p.handle != NULL && strcmp(p.path, plugin_file("strategy", "local")) == 0);
  CHECK(p.header && strcmp(p.header->version, "test-file") == 0);
  if (p.v.strategy) {
    double nsq = 0;
    CHECK_OK(p.v.strategy->grad_norm_sq(NULL, &nsq, &err), &err);
    CHECK(nsq == 7.0 && p.v.strategy->memory_plan == NULL);
  }
  st_plugin_unload(&p);
  /* a built-in registered under the wrong kind is checked like a file, and rejected */
  CHECK_RESULT(st_plugin_load(ST_PLUGIN_MODEL, "local", b, 1, &p, &err), ST_ERR_PLUGIN, &err);
  CHECK_CONTAINS(err.message, "<built-in>: header kind is \"strategy\", expected \"model\"");
  /* a broken built-in is reported, and the search continues */
  st_plugin_builtin wrong = {ST_PLUGIN_STRATEGY, "other", st_local_strategy()};
  CHECK_RESULT(st_plugin_load(ST_PLUGIN_STRATEGY, "other", &wrong, 1, &p, &err), ST_ERR_PLUGIN, &err);
  CHECK_CONTAINS(err.message, "<built-in>: name mismatch: the header says \"local\"");
  CHECK_CONTAINS(err.message, "/libstrata-strategy-other.so: not found");

  /* comm: every method is required */
  CHECK_OK(st_plugin_load(ST_PLUGIN_COMM, "stub", NULL, 0, &p, &err), &err);
  if (p.v.comm) {
    st_comm *w = NULL;
    CHECK_OK(p.v.comm->init(NULL, NULL, &w, &err), &err);
    CHECK(w && p.v.comm->size(w) == 1 && p.v.comm->rank(w) == 0);
  }
  st_plugin_unload(&p);
  CHECK_RESULT(st_plugin_load(ST_PLUGIN_COMM, "stub_null", NULL, 0, &p, &err), ST_ERR_PLUGIN, &err);
  CHECK_CONTAINS(err.message, "required method set_timeout is NULL (no method of this kind may be NULL)");
}

static void test_search_dirs(void) {
  CHECK(strcmp(st_plugin_kind_name(ST_PLUGIN_MODEL), "model") == 0);
  CHECK(strcmp(st_plugin_kind_name(ST_PLUGIN_STRATEGY), "strategy") == 0);
  CHECK(strcmp(st_plugin_kind_name(ST_PLUGIN_COMM), "comm") == 0);
  setenv("STRATA_PLUGIN_PATH", "/x/a:/x/b/::/x/a", 1); /* trailing '/', empty entry, repeat */
  const char *dirs[16];
  char storage[8192];
  int n = st_plugin_search_dirs(dirs, 16, storage, sizeof storage);
  const char *want[] = {"/x/a",
                        "/x/b",
                        ST_BUILD_ROOT "/models/<name>",
                        ST_BUILD_ROOT "/strategies/<name>",
                        ST_BUILD_ROOT "/plugins/<name>",
                        ST_PLUGINDIR};
  CHECK_MSG(n == 6, "%d dirs", n);
  for (int i = 0; i < n && i < 6; i++) CHECK_MSG(strcmp(dirs[i], want[i]) == 0, "dirs[%d] = %s, want %s", i, dirs[i], want[i]);
  CHECK(st_plugin_search_dirs(dirs, 1, storage, sizeof storage) == 1 && strcmp(dirs[0], "/x/a") == 0);
  CHECK(st_plugin_search_dirs(dirs, 16, storage, 6) == 1); /* "/x/a\0" fits, "/x/b\0" does not */
}

static void test_list(void) {
  setenv("STRATA_PLUGIN_PATH", TEST_PLUGIN_DIR, 1);
  FILE *f = tmpfile();
  st_plugin_builtin b[1] = {{ST_PLUGIN_STRATEGY, "local", st_local_strategy()}};
  capture_begin();
  st_plugin_list(f, b, 1);
  const char *printed = capture_end();
  CHECK_MSG(printed[0] == '\0', "st_plugin_list wrote to stderr: %s", printed);
  static char listing[65536];
  rewind(f);
  size_t n = fread(listing, 1, sizeof listing - 1, f);
  listing[n] = '\0';
  const char *out = listing;
  fclose(f);
  char want[2048];
  CHECK_CONTAINS(out, TEST_PLUGIN_DIR);
  /* usable: kind, name, ABI, version, path on one line */
  snprintf(want, sizeof want, "model     %-20s %-4d %-10s %s\n", "good", ST_ABI_VERSION, "1.2.3",
           plugin_file("model", "good"));
  CHECK_CONTAINS(out, want);
  snprintf(want, sizeof want, "strategy  %-20s %-4d %-10s <built-in>\n", "local", ST_ABI_VERSION, ST_VERSION_STRING);
  CHECK_CONTAINS(out, want);
  snprintf(want, sizeof want, "%s\n           shadowed: loading \"local\" by name gets <built-in>\n",
           plugin_file("strategy", "local"));
  CHECK_CONTAINS(out, want);
  /* broken: flagged with the reason under the line */
  static const char *broken[][2] = {{"newer_abi", "abi_version 2 is newer"},
                                    {"abi_zero", "abi_version 0 does not match"},
                                    {"small_struct", "struct_size"},
                                    {"null_method", "required methods unit_backward, loss are NULL"},
                                    {"wrong_name", "name mismatch"},
                                    {"wrong_kind", "header kind"},
                                    {"bad_cuda", "built for CUDA 99"},
                                    {"v2_only", "exports only strata_model_plugin_v2"},
                                    {"undefined", "dlopen failed: undefined symbol: st_test_no_such_function"}};
  for (size_t i = 0; i < sizeof broken / sizeof broken[0]; i++) {
    snprintf(want, sizeof want, "model     %-20s %-4s %-10s %s\n           BROKEN: %s", broken[i][0], "-", "-",
             plugin_file("model", broken[i][0]), broken[i][1]);
    CHECK_CONTAINS(out, want);
  }
  /* no_symbol and stub_null too; short_optional and stub are usable */
  CHECK_CONTAINS(out, "BROKEN: no symbol strata_model_plugin_v1");
  CHECK_CONTAINS(out, "BROKEN: required method set_timeout is NULL");
  snprintf(want, sizeof want, "model     %-20s %-4d", "short_optional", ST_ABI_VERSION);
  CHECK_CONTAINS(out, want);
  snprintf(want, sizeof want, "comm      %-20s %-4d", "stub", ST_ABI_VERSION);
  CHECK_CONTAINS(out, want);
  /* each file once, though TEST_PLUGIN_DIR is both on STRATA_PLUGIN_PATH and in the build tree */
  CHECK(count_of(out, plugin_file("model", "good")) == 1);
  int usable = -1, nbroken = -1;
  const char *tail = strstr(out, " usable, ");
  while (tail && tail > out && tail[-1] >= '0' && tail[-1] <= '9') tail--;
  CHECK(tail && sscanf(tail, "%d usable, %d broken", &usable, &nbroken) == 2);
  CHECK_MSG(nbroken >= 11 && usable >= 4, "%d usable, %d broken", usable, nbroken);
  CHECK(count_of(out, "BROKEN: ") == nbroken);
}

static void cleanup(void) {
  static const char *links[] = {"a/libstrata-model-mixed.so", "b/libstrata-model-mixed.so",
                                "first/libstrata-model-good.so", "broken/libstrata-model-good.so",
                                "custom.so", "libstrata-model-garbage.so", "stderr.txt"};
  for (size_t i = 0; i < sizeof links / sizeof links[0]; i++) unlink(tmp_path(links[i]));
  static const char *dirs[] = {"a", "b", "first", "broken"};
  for (size_t i = 0; i < sizeof dirs / sizeof dirs[0]; i++) rmdir(tmp_path(dirs[i]));
  rmdir(tmp);
}

int main(void) {
  const char *base = getenv("TMPDIR");
  snprintf(tmp, sizeof tmp, "%s/strata-plugin-test-XXXXXX", base && base[0] ? base : "/tmp");
  if (!mkdtemp(tmp)) {
    perror("mkdtemp");
    return 1;
  }
  unsetenv("STRATA_DEBUG");
  test_good_model();
  test_broken_models();
  test_short_struct();
  test_nothing_loads();
  test_order_and_builtins();
  test_search_dirs();
  test_list();
  cleanup();
  return st_test_finish("plugin_loader");
}
