/* plugin.h (internal) — finding, opening and checking plugin shared objects.
 *
 * A name maps to libstrata-<kind>-<name>.so, searched in: each folder of STRATA_PLUGIN_PATH
 * (colon-separated), the build tree (ST_BUILD_ROOT/{models,strategies,plugins}/<name>/, and
 * plugins/comm_<name>/ for comm backends), then the installed plugindir (ST_PLUGINDIR). The
 * loader test's deliberately broken plugins are reached through STRATA_PLUGIN_PATH only. Anything containing a
 * '/' is taken as a path. Opened with RTLD_NOW|RTLD_LOCAL; symbols probed newest ABI first
 * (strata_<kind>_plugin_v<N>); the header is checked (abi_version, struct_size large enough for
 * every required method, kind, name equal to the file's, fingerprint's abi and cuda parts) and
 * every required method is non-NULL. When nothing loads, one error lists every path tried and
 * why each failed. STRATA_DEBUG=plugins logs each attempt. */
#ifndef STRATA_RUNTIME_PLUGIN_H
#define STRATA_RUNTIME_PLUGIN_H

#include <strata/comm.h>
#include <strata/model.h>
#include <strata/strategy.h>

typedef enum st_plugin_kind { ST_PLUGIN_MODEL = 0, ST_PLUGIN_STRATEGY = 1, ST_PLUGIN_COMM = 2 } st_plugin_kind;

const char *st_plugin_kind_name(st_plugin_kind k); /* "model", "strategy", "comm" */

typedef struct st_plugin {
  st_plugin_kind kind;
  void *handle;                   /* dlopen handle; NULL for built-ins */
  const st_plugin_header *header; /* first member of the struct below */
  union {
    const void *any;
    const st_model_plugin_v1 *model;
    const st_strategy_plugin_v1 *strategy;
    const st_comm_plugin_v1 *comm;
  } v;
  char path[4096];                /* resolved path, or "<built-in>" */
} st_plugin;

/* Built-ins (the `local` strategy, the `local` comm) are registered by the core and found by name
 * before the search path. */
typedef struct st_plugin_builtin {
  st_plugin_kind kind;
  const char *name;
  const void *vtable;
} st_plugin_builtin;

st_result st_plugin_load(st_plugin_kind kind, const char *name_or_path, const st_plugin_builtin *builtins,
                         int n_builtins, st_plugin *out, st_error *err);
void st_plugin_unload(st_plugin *p);

/* `strata plugins`: every plugin found on the search path and among the built-ins, with kind,
 * name, ABI version, plugin version and path; broken ones listed with the reason. */
void st_plugin_list(FILE *out, const st_plugin_builtin *builtins, int n_builtins);

/* the search folders in order (for `strata env` and messages); returns the count written */
int st_plugin_search_dirs(const char **dirs, int cap, char *storage, size_t storage_len);

#endif /* STRATA_RUNTIME_PLUGIN_H */
