/* plugin.c — finding, opening and checking plugin shared objects (the contract is in plugin.h).
 *
 * A candidate file goes through: exists? -> dlopen(RTLD_NOW|RTLD_LOCAL) -> the newest
 * strata_<kind>_plugin_v<N> it exports -> header checks (abi_version, struct_size, kind, name,
 * fingerprint) -> every required method non-NULL. The first candidate that passes wins; each one
 * that does not is recorded with its reason, and when none passes the error lists them all.
 *
 * A plugin built against an older minor revision has a smaller struct (methods are only ever
 * appended). When its struct_size still covers every required method the loader hands out a
 * zero-padded copy, so the optional methods it does not have read as NULL instead of as whatever
 * follows its struct in memory. The copy is recognizable by header->struct_size < sizeof(struct)
 * and is freed by st_plugin_unload.
 *
 * Beyond plugin.h: comm backends live in the build tree as plugins/comm_<name>/ (plugins/comm_gloo/),
 * so for kind comm that folder is searched too; and a fingerprint with cuda=0 (a plugin that does
 * not use CUDA) loads into any core, while cuda=N>0 must equal the core's ST_CUDA_MAJOR. */
#include "plugin.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <sys/stat.h>

#ifndef ST_BUILD_ROOT
#define ST_BUILD_ROOT ""
#endif
#ifndef ST_PLUGINDIR
#define ST_PLUGINDIR ""
#endif

/* How many ABI generations above ours are probed, only to say "built for a newer strata". */
#define NEWER_ABI_PROBE 8

/* ---- the method tables ---------------------------------------------------------------------- */

typedef void (*any_fn)(void);

typedef struct method_spec {
  const char *name;
  size_t offset;
  bool optional;
} method_spec;

#define METHOD(T, f, opt) {#f, offsetof(T, f), opt}

/* Optional methods are the ones model.h / strategy.h / comm.h document as "Optional" / "may be
 * NULL"; everything else must be set. */
static const method_spec model_methods[] = {
    METHOD(st_model_plugin_v1, validate, false),      METHOD(st_model_plugin_v1, init, false),
    METHOD(st_model_plugin_v1, finalize, false),      METHOD(st_model_plugin_v1, describe, false),
    METHOD(st_model_plugin_v1, init_param, false),    METHOD(st_model_plugin_v1, batch_prepare, false),
    METHOD(st_model_plugin_v1, batch_release, false), METHOD(st_model_plugin_v1, carry_layout, false),
    METHOD(st_model_plugin_v1, unit_memory, false),   METHOD(st_model_plugin_v1, unit_forward, false),
    METHOD(st_model_plugin_v1, unit_backward, false), METHOD(st_model_plugin_v1, loss, false),
    METHOD(st_model_plugin_v1, forward_flops, false), METHOD(st_model_plugin_v1, synth_sample, true),
    METHOD(st_model_plugin_v1, export_weights, true),
};
static const method_spec strategy_methods[] = {
    METHOD(st_strategy_plugin_v1, validate, false),      METHOD(st_strategy_plugin_v1, init, false),
    METHOD(st_strategy_plugin_v1, finalize, false),      METHOD(st_strategy_plugin_v1, pre_forward, false),
    METHOD(st_strategy_plugin_v1, post_forward, false),  METHOD(st_strategy_plugin_v1, pre_backward, false),
    METHOD(st_strategy_plugin_v1, post_backward, false), METHOD(st_strategy_plugin_v1, grad_norm_sq, false),
    METHOD(st_strategy_plugin_v1, step, false),          METHOD(st_strategy_plugin_v1, skip_step, false),
    METHOD(st_strategy_plugin_v1, state_save, false),    METHOD(st_strategy_plugin_v1, state_load, false),
    METHOD(st_strategy_plugin_v1, memory_plan, true),
};
static const method_spec comm_methods[] = {
    METHOD(st_comm_plugin_v1, init, false),           METHOD(st_comm_plugin_v1, finalize, false),
    METHOD(st_comm_plugin_v1, split, false),          METHOD(st_comm_plugin_v1, group_free, false),
    METHOD(st_comm_plugin_v1, rank, false),           METHOD(st_comm_plugin_v1, size, false),
    METHOD(st_comm_plugin_v1, all_reduce, false),     METHOD(st_comm_plugin_v1, reduce_scatter, false),
    METHOD(st_comm_plugin_v1, all_gather, false),     METHOD(st_comm_plugin_v1, all_gather_v, false),
    METHOD(st_comm_plugin_v1, all_to_all_v, false),   METHOD(st_comm_plugin_v1, broadcast, false),
    METHOD(st_comm_plugin_v1, send, false),           METHOD(st_comm_plugin_v1, recv, false),
    METHOD(st_comm_plugin_v1, barrier, false),        METHOD(st_comm_plugin_v1, wait, false),
    METHOD(st_comm_plugin_v1, test, false),           METHOD(st_comm_plugin_v1, set_timeout, false),
};

/* A method appended to a plugin struct must be added to its table above (required or optional). */
_Static_assert(offsetof(st_model_plugin_v1, export_weights) + sizeof(any_fn) == sizeof(st_model_plugin_v1),
               "plugin.c: model_methods does not end with the last member of st_model_plugin_v1");
_Static_assert(offsetof(st_strategy_plugin_v1, memory_plan) + sizeof(any_fn) == sizeof(st_strategy_plugin_v1),
               "plugin.c: strategy_methods does not end with the last member of st_strategy_plugin_v1");
_Static_assert(offsetof(st_comm_plugin_v1, set_timeout) + sizeof(any_fn) == sizeof(st_comm_plugin_v1),
               "plugin.c: comm_methods does not end with the last member of st_comm_plugin_v1");

typedef struct kind_info {
  const char *name;
  const char *struct_name;
  const char *config_key; /* where a user gives a path instead of a name */
  size_t full_size;
  const method_spec *methods;
  int n_methods;
} kind_info;

#define N_OF(a) ((int)(sizeof(a) / sizeof((a)[0])))
static const kind_info kinds[3] = {
    {"model", "st_model_plugin_v1", "model.plugin", sizeof(st_model_plugin_v1), model_methods, N_OF(model_methods)},
    {"strategy", "st_strategy_plugin_v1", "strategy.plugin", sizeof(st_strategy_plugin_v1), strategy_methods,
     N_OF(strategy_methods)},
    {"comm", "st_comm_plugin_v1", NULL, sizeof(st_comm_plugin_v1), comm_methods, N_OF(comm_methods)},
};

static bool kind_valid(st_plugin_kind k) { return (int)k >= 0 && (int)k < 3; }

const char *st_plugin_kind_name(st_plugin_kind k) { return kind_valid(k) ? kinds[k].name : "unknown"; }

/* bytes a struct must have so that every required method is inside it */
static size_t required_size(const kind_info *ki, const char **first_missing, uint32_t struct_size) {
  size_t need = sizeof(st_plugin_header);
  *first_missing = NULL;
  for (int i = 0; i < ki->n_methods; i++) {
    if (ki->methods[i].optional) continue;
    size_t end = ki->methods[i].offset + sizeof(any_fn);
    if (end > need) need = end;
    if (!*first_missing && end > struct_size) *first_missing = ki->methods[i].name;
  }
  return need;
}

/* ---- debug logging: the loader's one print, gated by STRATA_DEBUG ----------------------------- */

/* STRATA_DEBUG is a list of topics separated by ',' or ' ' ("plugins,config"); "all" and "1"
 * turn every topic on. */
static bool debug_plugins(void) {
  const char *d = getenv("STRATA_DEBUG");
  if (!d) return false;
  while (*d) {
    size_t n = strcspn(d, ", ");
    if ((n == 7 && !strncmp(d, "plugins", 7)) || (n == 3 && !strncmp(d, "all", 3)) || (n == 1 && d[0] == '1'))
      return true;
    d += n;
    while (*d == ',' || *d == ' ') d++;
  }
  return false;
}

static ST_PRINTF(2, 3) void debug_log(bool on, const char *fmt, ...) {
  if (!on) return;
  char line[2048];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  fprintf(stderr, "strata: plugins: %s\n", line);
}

/* ---- checking a plugin struct --------------------------------------------------------------- */

/* the value of `key` ("abi", "cuda") in a fingerprint "abi=1;cuda=12;cc=gcc-12", or false */
static bool fingerprint_field(const char *fp, const char *key, long *value) {
  size_t klen = strlen(key);
  const char *p = fp;
  while (p && *p) {
    if (!strncmp(p, key, klen) && p[klen] == '=') {
      char *end;
      errno = 0;
      long v = strtol(p + klen + 1, &end, 10);
      if (errno || end == p + klen + 1 || (*end && *end != ';')) return false;
      *value = v;
      return true;
    }
    p = strchr(p, ';');
    if (p) p++;
  }
  return false;
}

/* The header and method checks. `symbol_version` is the N of the symbol the struct came from;
 * `expected_name` is NULL when a path does not follow the libstrata-<kind>-<name>.so pattern. */
static bool check_vtable(st_plugin_kind kind, const void *vt, int symbol_version, const char *expected_name,
                         char *why, size_t cap) {
  const kind_info *ki = &kinds[kind];
  const st_plugin_header *h = vt;
  if (h->abi_version > ST_ABI_VERSION) {
    snprintf(why, cap,
             "abi_version %u is newer than this strata (%d): rebuild the plugin against strata %d.%d or upgrade "
             "strata",
             h->abi_version, ST_ABI_VERSION, ST_VERSION_MAJOR, ST_VERSION_MINOR);
    return false;
  }
  if ((int)h->abi_version != symbol_version) {
    snprintf(why, cap,
             "abi_version %u does not match its symbol (ABI %d): the header was not made with ST_PLUGIN_HEADER "
             "of the SDK the plugin was built against; rebuild it against strata %d.%d",
             h->abi_version, symbol_version, ST_VERSION_MAJOR, ST_VERSION_MINOR);
    return false;
  }
  const char *first_missing;
  size_t need = required_size(ki, &first_missing, h->struct_size);
  if (h->struct_size < need) {
    snprintf(why, cap,
             "struct_size %u is too small: %s needs at least %zu bytes to hold its required methods (%s and "
             "later are missing); rebuild the plugin against strata %d.%d",
             h->struct_size, ki->struct_name, need, first_missing ? first_missing : "the header", ST_VERSION_MAJOR,
             ST_VERSION_MINOR);
    return false;
  }
  if (!h->kind || strcmp(h->kind, ki->name)) {
    snprintf(why, cap, "header kind is \"%s\", expected \"%s\" (the file exports a %s symbol)",
             h->kind ? h->kind : "(null)", ki->name, ki->name);
    return false;
  }
  if (!h->name || !h->name[0]) {
    snprintf(why, cap, "header name is empty: set it to the <name> of libstrata-%s-<name>.so", ki->name);
    return false;
  }
  if (expected_name && strcmp(h->name, expected_name)) {
    snprintf(why, cap,
             "name mismatch: the header says \"%s\" but the file is named for \"%s\" (libstrata-%s-%s.so must "
             "hold the plugin named %s): rename the file or fix the header's name",
             h->name, expected_name, ki->name, expected_name, expected_name);
    return false;
  }
  if (!h->fingerprint) {
    snprintf(why, cap, "header fingerprint is NULL: build the header with ST_PLUGIN_HEADER");
    return false;
  }
  long abi, cuda;
  if (!fingerprint_field(h->fingerprint, "abi", &abi) || abi != (long)h->abi_version) {
    snprintf(why, cap, "fingerprint \"%s\" does not carry abi=%u: build the header with ST_PLUGIN_HEADER",
             h->fingerprint, h->abi_version);
    return false;
  }
  if (!fingerprint_field(h->fingerprint, "cuda", &cuda)) {
    snprintf(why, cap, "fingerprint \"%s\" has no cuda=<major> part: build the header with ST_PLUGIN_HEADER",
             h->fingerprint);
    return false;
  }
  /* cuda=0: the plugin does not use CUDA, so it runs with any core; otherwise the majors match */
  if (cuda != 0 && cuda != ST_CUDA_MAJOR) {
    if (ST_CUDA_MAJOR == 0)
      snprintf(why, cap,
               "built for CUDA %ld (fingerprint \"%s\"), but this strata was built without CUDA: use a strata "
               "built with CUDA %ld or rebuild the plugin without it",
               cuda, h->fingerprint, cuda);
    else
      snprintf(why, cap,
               "built for CUDA %ld (fingerprint \"%s\"), but this strata uses CUDA %d: rebuild the plugin "
               "against this strata",
               cuda, h->fingerprint, ST_CUDA_MAJOR);
    return false;
  }
  char nulls[512] = "", opts[256] = "";
  size_t nl = 0, ol = 0;
  int n_null = 0;
  for (int i = 0; i < ki->n_methods; i++) {
    const method_spec *m = &ki->methods[i];
    if (m->optional) {
      if (ol < sizeof opts) ol += (size_t)snprintf(opts + ol, sizeof opts - ol, "%s%s", ol ? ", " : "", m->name);
      continue;
    }
    any_fn f;
    memcpy(&f, (const char *)vt + m->offset, sizeof f);
    if (f) continue;
    n_null++;
    if (nl < sizeof nulls) nl += (size_t)snprintf(nulls + nl, sizeof nulls - nl, "%s%s", nl ? ", " : "", m->name);
  }
  if (n_null) {
    snprintf(why, cap, "required method%s %s %s NULL (%s%s may be NULL): set %s", n_null > 1 ? "s" : "", nulls,
             n_null > 1 ? "are" : "is", ol ? "only " : "", ol ? opts : "no method of this kind",
             n_null > 1 ? "them" : "it");
    return false;
  }
  return true;
}

/* ---- opening one file ----------------------------------------------------------------------- */

/* "libstrata-<kind>-<name>.so" -> name (into buf), or NULL when the file name has another form */
static const char *name_from_file(const char *path, st_plugin_kind kind, char *buf, size_t cap) {
  const char *base = strrchr(path, '/');
  base = base ? base + 1 : path;
  char prefix[64];
  snprintf(prefix, sizeof prefix, "libstrata-%s-", kinds[kind].name);
  size_t pl = strlen(prefix), bl = strlen(base);
  if (bl <= pl + 3 || strncmp(base, prefix, pl) || strcmp(base + bl - 3, ".so")) return NULL;
  size_t nl = bl - pl - 3;
  if (nl + 1 > cap) return NULL;
  memcpy(buf, base + pl, nl);
  buf[nl] = '\0';
  return buf;
}

static void symbol_name(char *buf, size_t cap, const char *kind, int n) {
  snprintf(buf, cap, "strata_%s_plugin_v%d", kind, n);
}

/* Tries one file; on success fills *out (with its handle) and returns true, otherwise writes the
 * reason to `why` and leaves nothing open. */
static bool try_file(st_plugin_kind kind, const char *path, const char *expected_name, st_plugin *out, char *why,
                     size_t cap) {
  const kind_info *ki = &kinds[kind];
  struct stat sb;
  if (stat(path, &sb) != 0) {
    if (errno == ENOENT || errno == ENOTDIR)
      snprintf(why, cap, "not found");
    else
      snprintf(why, cap, "cannot access: %s", strerror(errno));
    return false;
  }
  if (S_ISDIR(sb.st_mode)) {
    snprintf(why, cap, "is a directory, not a shared object");
    return false;
  }
  if (strlen(path) >= sizeof out->path) {
    snprintf(why, cap, "path longer than %zu bytes", sizeof out->path - 1);
    return false;
  }
  dlerror();
  int flags = RTLD_NOW | RTLD_LOCAL;
#if defined(__SANITIZE_ADDRESS__)
  flags |= RTLD_NODELETE; /* keep plugin code mapped at exit, so leak reports can name its frames */
#endif
  void *handle = dlopen(path, flags);
  if (!handle) {
    const char *e = dlerror();
    if (!e) e = "dlopen failed";
    size_t pl = strlen(path); /* glibc starts its message with the path: do not repeat it */
    if (!strncmp(e, path, pl) && !strncmp(e + pl, ": ", 2)) e += pl + 2;
    snprintf(why, cap, "dlopen failed: %s", e);
    return false;
  }
  char sym[64];
  const void *vt = NULL;
  int n;
  for (n = ST_ABI_VERSION; n >= 1 && !vt; n--) {
    symbol_name(sym, sizeof sym, ki->name, n);
    vt = dlsym(handle, sym);
  }
  n++; /* the version found (the loop decremented once more) */
  if (!vt) {
    char first[64];
    symbol_name(first, sizeof first, ki->name, ST_ABI_VERSION);
    for (int m = ST_ABI_VERSION + NEWER_ABI_PROBE; m > ST_ABI_VERSION; m--) {
      symbol_name(sym, sizeof sym, ki->name, m);
      if (dlsym(handle, sym)) {
        snprintf(why, cap,
                 "exports only %s, an ABI newer than this strata (%d): rebuild the plugin against strata %d.%d or "
                 "upgrade strata",
                 sym, ST_ABI_VERSION, ST_VERSION_MAJOR, ST_VERSION_MINOR);
        dlclose(handle);
        return false;
      }
    }
    for (int k = 0; k < 3; k++) {
      if (k == (int)kind) continue;
      symbol_name(sym, sizeof sym, kinds[k].name, ST_ABI_VERSION);
      if (dlsym(handle, sym)) {
        snprintf(why, cap, "no symbol %s: it exports %s, so it is a %s plugin, not a %s plugin", first, sym,
                 kinds[k].name, ki->name);
        dlclose(handle);
        return false;
      }
    }
    snprintf(why, cap,
             "no symbol %s (not a strata %s plugin, or the struct is not exported: declare it `ST_EXPORT const "
             "%s %s`)",
             first, ki->name, ki->struct_name, first);
    dlclose(handle);
    return false;
  }
  if (!check_vtable(kind, vt, n, expected_name, why, cap)) {
    dlclose(handle);
    return false;
  }
  const st_plugin_header *h = vt;
  if (h->struct_size < ki->full_size) { /* an older revision: hand out a zero-padded copy */
    void *copy = calloc(1, ki->full_size);
    if (!copy) {
      snprintf(why, cap, "out of memory");
      dlclose(handle);
      return false;
    }
    memcpy(copy, vt, h->struct_size);
    vt = copy;
  }
  out->kind = kind;
  out->handle = handle;
  out->v.any = vt;
  out->header = vt;
  snprintf(out->path, sizeof out->path, "%s", path);
  return true;
}

static bool try_builtin(st_plugin_kind kind, const st_plugin_builtin *b, st_plugin *out, char *why, size_t cap) {
  if (!b->vtable) {
    snprintf(why, cap, "built-in has no vtable");
    return false;
  }
  if (!check_vtable(kind, b->vtable, ST_ABI_VERSION, b->name, why, cap)) return false;
  const st_plugin_header *h = b->vtable;
  const void *vt = b->vtable;
  if (h->struct_size < kinds[kind].full_size) {
    void *copy = calloc(1, kinds[kind].full_size);
    if (!copy) {
      snprintf(why, cap, "out of memory");
      return false;
    }
    memcpy(copy, vt, h->struct_size);
    vt = copy;
  }
  out->kind = kind;
  out->handle = NULL;
  out->v.any = vt;
  out->header = vt;
  snprintf(out->path, sizeof out->path, "<built-in>");
  return true;
}

/* ---- the search path ------------------------------------------------------------------------ */

#define MAX_DIRS 64
typedef struct dir_list {
  int n;
  const char *dirs[MAX_DIRS];
  const char *origin[MAX_DIRS]; /* "STRATA_PLUGIN_PATH", "build tree", "plugindir" */
  char storage[16384];
  size_t used;
} dir_list;

static void dir_add(dir_list *dl, const char *origin, const char *fmt, ...) ST_PRINTF(3, 4);
static void dir_add(dir_list *dl, const char *origin, const char *fmt, ...) {
  if (dl->n >= MAX_DIRS || dl->used >= sizeof dl->storage) return;
  char *dst = dl->storage + dl->used;
  size_t room = sizeof dl->storage - dl->used;
  va_list ap;
  va_start(ap, fmt);
  int w = vsnprintf(dst, room, fmt, ap);
  va_end(ap);
  if (w < 0 || (size_t)w >= room) return;
  size_t len = (size_t)w;
  while (len > 1 && dst[len - 1] == '/') dst[--len] = '\0';
  for (int i = 0; i < dl->n; i++)
    if (!strcmp(dl->dirs[i], dst)) return; /* the same folder twice: tried once */
  dl->dirs[dl->n] = dst;
  dl->origin[dl->n] = origin;
  dl->n++;
  dl->used += len + 1;
}

/* The build tree is searched only by a strata running from it: an installed copy has the build
 * folder's path compiled in too, and must not prefer plugins left there over its plugindir. The
 * code running this function (libstrata, or a test linking the core) tells which one we are. */
static bool running_from_build_tree(void) {
  Dl_info info;
  char root[PATH_MAX], self[PATH_MAX];
  if (!ST_BUILD_ROOT[0] || !realpath(ST_BUILD_ROOT, root)) return false; /* no build tree (any more) */
  if (!dladdr((const void *)running_from_build_tree, &info) || !info.dli_fname || !realpath(info.dli_fname, self))
    return false;
  size_t n = strlen(root);
  return strncmp(self, root, n) == 0 && self[n] == '/';
}

/* The folders for `name` of `kind`, in search order. With name == NULL the build-tree folders
 * carry a literal "<name>" (for messages and `strata env`). */
static void build_dirs(dir_list *dl, st_plugin_kind kind, const char *name) {
  dl->n = 0;
  dl->used = 0;
  const char *env = getenv("STRATA_PLUGIN_PATH");
  while (env && *env) {
    size_t n = strcspn(env, ":");
    if (n > 0) dir_add(dl, "STRATA_PLUGIN_PATH", "%.*s", (int)n, env);
    env += n;
    if (*env == ':') env++;
  }
  const char *root = ST_BUILD_ROOT;
  const char *nm = name ? name : "<name>";
  if (root[0] && running_from_build_tree()) {
    dir_add(dl, "build tree", "%s/models/%s", root, nm);
    dir_add(dl, "build tree", "%s/strategies/%s", root, nm);
    dir_add(dl, "build tree", "%s/plugins/%s", root, nm);
    if (kind == ST_PLUGIN_COMM) dir_add(dl, "build tree", "%s/plugins/comm_%s", root, nm);
  }
  if (ST_PLUGINDIR[0]) dir_add(dl, "plugindir", "%s", ST_PLUGINDIR);
}

int st_plugin_search_dirs(const char **dirs, int cap, char *storage, size_t storage_len) {
  if (!dirs || cap <= 0 || !storage || storage_len == 0) return 0;
  dir_list *dl = malloc(sizeof *dl);
  if (!dl) return 0;
  build_dirs(dl, ST_PLUGIN_MODEL, NULL);
  int n = 0;
  size_t used = 0;
  for (int i = 0; i < dl->n && n < cap; i++) {
    size_t len = strlen(dl->dirs[i]);
    if (used + len + 1 > storage_len) break;
    memcpy(storage + used, dl->dirs[i], len + 1);
    dirs[n++] = storage + used;
    used += len + 1;
  }
  free(dl);
  return n;
}

/* ---- the error when nothing loads ------------------------------------------------------------- */

typedef struct attempts {
  int n;
  size_t len;
  char text[8192];
  int dropped;
} attempts;

static void attempt_add(attempts *a, bool debug, const char *path, const char *why) {
  debug_log(debug, "%s: %s", path, why);
  a->n++;
  size_t room = sizeof a->text - a->len;
  int w = snprintf(a->text + a->len, room, "  %s: %s\n", path, why);
  if (w < 0 || (size_t)w >= room) {
    a->text[a->len] = '\0';
    a->dropped++;
    return;
  }
  a->len += (size_t)w;
}

static st_result fail(st_error *err, st_plugin_kind kind, const char *name_or_path, bool is_path,
                      const attempts *a) {
  const kind_info *ki = &kinds[kind];
  char hint[512];
  if (is_path)
    snprintf(hint, sizeof hint, "Fix or rebuild that file; `strata plugins` lists the plugins found and why any is broken.");
  else
    snprintf(hint, sizeof hint,
             "Put libstrata-%s-%s.so in a folder on STRATA_PLUGIN_PATH (colon-separated) or give %s its path; "
             "`strata plugins` lists the plugins found, STRATA_DEBUG=plugins logs each attempt.",
             ki->name, name_or_path, ki->config_key ? ki->config_key : "the plugin");
  /* The head and the hint always fit; paths are dropped from the end of the list when the message
   * is full, and counted. */
  char head[768];
  int hl = is_path ? snprintf(head, sizeof head, "%s plugin could not be loaded from the path given; tried:\n", ki->name)
                   : snprintf(head, sizeof head, "%s plugin \"%s\" could not be loaded; tried:\n", ki->name, name_or_path);
  if (hl < 0 || (size_t)hl >= sizeof head) hl = (int)strlen(head);
  size_t room = ST_ERROR_MESSAGE_MAX - 1 - (size_t)hl - strlen(hint) - 48;
  char list[ST_ERROR_MESSAGE_MAX];
  size_t ll = 0;
  int dropped = a->dropped;
  const char *p = a->text;
  while (*p) {
    const char *nl = strchr(p, '\n');
    size_t line = nl ? (size_t)(nl - p) + 1 : strlen(p);
    if (dropped == a->dropped && ll + line <= room && ll + line < sizeof list) {
      memcpy(list + ll, p, line);
      ll += line;
    } else {
      dropped++;
    }
    p += line;
  }
  list[ll] = '\0';
  char more[48] = "";
  if (dropped) snprintf(more, sizeof more, "  ... and %d more\n", dropped);
  /* `where` is a file name when a path was given; a bare name is not a key path (the caller knows
   * which key it came from), and the message names it already */
  return st_error_set(err, ST_ERR_PLUGIN, is_path ? name_or_path : "", "%s%s%s%s", head, list, more, hint);
}

/* ---- loading -------------------------------------------------------------------------------- */

st_result st_plugin_load(st_plugin_kind kind, const char *name_or_path, const st_plugin_builtin *builtins,
                         int n_builtins, st_plugin *out, st_error *err) {
  if (!out || !name_or_path || !kind_valid(kind) || (n_builtins > 0 && !builtins))
    return st_error_set(err, ST_ERR_INVALID_ARGUMENT, "", "st_plugin_load: %s",
                        !out            ? "out is NULL"
                        : !name_or_path ? "name_or_path is NULL"
                        : !kind_valid(kind) ? "unknown plugin kind"
                                            : "builtins is NULL");
  memset(out, 0, sizeof *out);
  const kind_info *ki = &kinds[kind];
  if (!name_or_path[0])
    return st_error_set(err, ST_ERR_PLUGIN, "", "empty %s plugin name: give a name (libstrata-%s-<name>.so) or a path",
                        ki->name, ki->name);
  bool debug = debug_plugins();
  attempts *a = calloc(1, sizeof *a);
  dir_list *dl = calloc(1, sizeof *dl);
  if (!a || !dl) {
    free(a);
    free(dl);
    return st_error_set(err, ST_ERR_OUT_OF_MEMORY, name_or_path, "out of memory while loading a plugin");
  }
  char why[1024];
  st_result r = ST_OK;

  if (strchr(name_or_path, '/')) {
    char nbuf[256];
    const char *expected = name_from_file(name_or_path, kind, nbuf, sizeof nbuf);
    debug_log(debug, "%s plugin: trying path %s", ki->name, name_or_path);
    if (try_file(kind, name_or_path, expected, out, why, sizeof why)) {
      debug_log(debug, "%s: loaded %s \"%s\" %s", name_or_path, ki->name, out->header->name,
                out->header->version ? out->header->version : "");
      goto done;
    }
    attempt_add(a, debug, name_or_path, why);
    r = fail(err, kind, name_or_path, true, a);
    goto done;
  }

  debug_log(debug, "%s plugin \"%s\": searching", ki->name, name_or_path);
  for (int i = 0; i < n_builtins; i++) {
    if (builtins[i].kind != kind || !builtins[i].name || strcmp(builtins[i].name, name_or_path)) continue;
    if (try_builtin(kind, &builtins[i], out, why, sizeof why)) {
      debug_log(debug, "<built-in>: loaded %s \"%s\"", ki->name, name_or_path);
      goto done;
    }
    attempt_add(a, debug, "<built-in>", why);
  }
  build_dirs(dl, kind, name_or_path);
  for (int i = 0; i < dl->n; i++) {
    char path[4096];
    int w = snprintf(path, sizeof path, "%s/libstrata-%s-%s.so", dl->dirs[i], ki->name, name_or_path);
    if (w < 0 || (size_t)w >= sizeof path) {
      attempt_add(a, debug, dl->dirs[i], "path too long");
      continue;
    }
    if (try_file(kind, path, name_or_path, out, why, sizeof why)) {
      debug_log(debug, "%s: loaded %s \"%s\" %s", path, ki->name, name_or_path,
                out->header->version ? out->header->version : "");
      goto done;
    }
    attempt_add(a, debug, path, why);
  }
  if (a->n == 0) attempt_add(a, debug, "(no folders)", "STRATA_PLUGIN_PATH is empty and no build tree or plugindir is known");
  r = fail(err, kind, name_or_path, false, a);

done:
  free(a);
  free(dl);
  return r;
}

void st_plugin_unload(st_plugin *p) {
  if (!p) return;
  if (p->v.any && p->header && kind_valid(p->kind) && p->header->struct_size < kinds[p->kind].full_size)
    free((void *)p->v.any); /* the zero-padded copy of an older revision */
  if (p->handle) dlclose(p->handle);
  memset(p, 0, sizeof *p);
}

/* ---- `strata plugins` ----------------------------------------------------------------------- */

typedef struct found {
  st_plugin_kind kind;
  char name[256];
  char path[4096];
  char real[PATH_MAX];
} found;

typedef struct found_list {
  found *v;
  int n, cap;
} found_list;

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* every libstrata-<kind>-<name>.so in dir, sorted by file name */
static void scan_dir(found_list *fl, const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  char **names = NULL;
  int n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (strncmp(e->d_name, "libstrata-", 10)) continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 16;
      char **nn = realloc(names, (size_t)cap * sizeof *nn);
      if (!nn) break;
      names = nn;
    }
    if (!(names[n] = strdup(e->d_name))) break;
    n++;
  }
  closedir(d);
  if (n) qsort(names, (size_t)n, sizeof *names, cmp_str);
  for (int i = 0; i < n; i++) {
    char path[4096], nbuf[256];
    snprintf(path, sizeof path, "%s/%s", dir, names[i]);
    for (int k = 0; k < 3; k++) {
      if (!name_from_file(path, (st_plugin_kind)k, nbuf, sizeof nbuf)) continue;
      if (fl->n == fl->cap) {
        int nc = fl->cap ? 2 * fl->cap : 32;
        found *nv = realloc(fl->v, (size_t)nc * sizeof *nv);
        if (!nv) break;
        fl->v = nv;
        fl->cap = nc;
      }
      found *f = &fl->v[fl->n];
      f->kind = (st_plugin_kind)k;
      snprintf(f->name, sizeof f->name, "%s", nbuf);
      snprintf(f->path, sizeof f->path, "%s", path);
      if (!realpath(path, f->real)) snprintf(f->real, sizeof f->real, "%s", path);
      bool dup = false; /* the same file reached through two folders */
      for (int j = 0; j < fl->n && !dup; j++) dup = !strcmp(fl->v[j].real, f->real);
      if (!dup) fl->n++;
      break;
    }
    free(names[i]);
  }
  free(names);
}

/* the subfolders of dir (the build tree's models/<name>/ etc.), sorted */
static void scan_subdirs(found_list *fl, const char *dir) {
  DIR *d = opendir(dir);
  if (!d) return;
  char **names = NULL;
  int n = 0, cap = 0;
  struct dirent *e;
  while ((e = readdir(d))) {
    if (e->d_name[0] == '.') continue;
    char sub[4096];
    struct stat sb;
    snprintf(sub, sizeof sub, "%s/%s", dir, e->d_name);
    if (stat(sub, &sb) != 0 || !S_ISDIR(sb.st_mode)) continue;
    if (n == cap) {
      cap = cap ? 2 * cap : 16;
      char **nn = realloc(names, (size_t)cap * sizeof *nn);
      if (!nn) break;
      names = nn;
    }
    if (!(names[n] = strdup(sub))) break;
    n++;
  }
  closedir(d);
  if (n) qsort(names, (size_t)n, sizeof *names, cmp_str);
  for (int i = 0; i < n; i++) {
    scan_dir(fl, names[i]);
    free(names[i]);
  }
  free(names);
}

void st_plugin_list(FILE *out, const st_plugin_builtin *builtins, int n_builtins) {
  if (!out) return;
  fprintf(out, "strata %s, plugin ABI %d. Search order (built-ins first):\n", ST_VERSION_STRING, ST_ABI_VERSION);
  dir_list *dl = calloc(1, sizeof *dl);
  found_list fl = {0};
  if (!dl) {
    fprintf(out, "  (out of memory)\n");
    return;
  }
  build_dirs(dl, ST_PLUGIN_COMM, NULL); /* with plugins/comm_<name>, shown but not scanned twice */
  bool any_env = false;
  for (int i = 0; i < dl->n; i++) {
    if (!strcmp(dl->origin[i], "STRATA_PLUGIN_PATH")) any_env = true;
    fprintf(out, "  %-60s (%s%s)\n", dl->dirs[i], dl->origin[i],
            strstr(dl->dirs[i], "/comm_<name>") ? ", comm plugins only" : "");
  }
  if (!any_env) fprintf(out, "  (STRATA_PLUGIN_PATH is not set: it adds folders in front)\n");

  /* the same order as a by-name search: STRATA_PLUGIN_PATH, the build tree, plugindir */
  for (int i = 0; i < dl->n; i++) {
    if (strcmp(dl->origin[i], "build tree")) {
      scan_dir(&fl, dl->dirs[i]);
      continue;
    }
    if (strstr(dl->dirs[i], "/comm_<name>")) continue; /* its parent is plugins/, scanned above */
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", dl->dirs[i]);
    char *slash = strrchr(parent, '/');
    if (slash) *slash = '\0';
    scan_subdirs(&fl, parent);
  }

  /* what each kind/name resolves to, to mark shadowed files */
  typedef struct winner {
    st_plugin_kind kind;
    const char *name, *path;
  } winner;
  winner *wins = calloc((size_t)(fl.n + (n_builtins > 0 ? n_builtins : 0) + 1), sizeof *wins);
  int n_wins = 0;

  fprintf(out, "\n%-9s %-20s %-4s %-10s %s\n", "KIND", "NAME", "ABI", "VERSION", "PATH");
  int n_ok = 0, n_broken = 0;
  for (int i = 0; i < n_builtins && builtins; i++) {
    const st_plugin_builtin *b = &builtins[i];
    if (!kind_valid(b->kind) || !b->name) continue;
    st_plugin p;
    char why[1024];
    memset(&p, 0, sizeof p);
    if (try_builtin(b->kind, b, &p, why, sizeof why)) {
      fprintf(out, "%-9s %-20s %-4u %-10s %s\n", kinds[b->kind].name, b->name, p.header->abi_version,
              p.header->version ? p.header->version : "?", "<built-in>");
      if (wins) wins[n_wins++] = (winner){b->kind, b->name, "<built-in>"};
      n_ok++;
      st_plugin_unload(&p);
    } else {
      fprintf(out, "%-9s %-20s %-4s %-10s %s\n           BROKEN: %s\n", kinds[b->kind].name, b->name, "-", "-",
              "<built-in>", why);
      n_broken++;
    }
  }
  for (int i = 0; i < fl.n; i++) {
    found *f = &fl.v[i];
    st_plugin p;
    char why[1024];
    memset(&p, 0, sizeof p);
    if (try_file(f->kind, f->path, f->name, &p, why, sizeof why)) {
      const char *shadow = NULL;
      for (int j = 0; j < n_wins && !shadow; j++)
        if (wins[j].kind == f->kind && !strcmp(wins[j].name, f->name)) shadow = wins[j].path;
      fprintf(out, "%-9s %-20s %-4u %-10s %s\n", kinds[f->kind].name, f->name, p.header->abi_version,
              p.header->version ? p.header->version : "?", f->path);
      if (shadow)
        fprintf(out, "           shadowed: loading \"%s\" by name gets %s\n", f->name, shadow);
      else if (wins)
        wins[n_wins++] = (winner){f->kind, f->name, f->path};
      n_ok++;
      st_plugin_unload(&p);
    } else {
      fprintf(out, "%-9s %-20s %-4s %-10s %s\n           BROKEN: %s\n", kinds[f->kind].name, f->name, "-", "-",
              f->path, why);
      n_broken++;
    }
  }
  fprintf(out, "\n%d usable, %d broken\n", n_ok, n_broken);
  free(wins);
  free(fl.v);
  free(dl);
}
