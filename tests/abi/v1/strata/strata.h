/* strata.h — result codes, versions, the error object, logging levels, check macros.
 *
 * Everything here is header-only so that a plugin needs nothing but libc to use it: plugins
 * never link libstrata; the core reaches them through the versioned structs in model.h,
 * strategy.h and comm.h, and they reach the core through the host table in host.h. */
#ifndef STRATA_STRATA_H
#define STRATA_STRATA_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define ST_VERSION_MAJOR 0
#define ST_VERSION_MINOR 1
#define ST_VERSION_PATCH 0
#define ST_VERSION_STRING "0.1.0"

/* The plugin ABI generation. A plugin struct carries the value it was built with; the loader
 * probes `strata_<kind>_plugin_v<N>` from the newest N it knows downwards. */
#define ST_ABI_VERSION 1

#define ST_STR_(x) #x
#define ST_STR(x) ST_STR_(x)

#if defined(__GNUC__)
#define ST_EXPORT __attribute__((visibility("default")))
#define ST_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define ST_EXPORT
#define ST_PRINTF(a, b)
#endif

/* A closed set: every function in the runtime, the kernels and every plugin returns one of these.
 * Foreign errors (errno, jansson, CUDA, Gloo) are translated at the boundary. */
typedef enum st_result {
  ST_OK = 0,
  ST_ERR_INVALID_ARGUMENT = 1, /* a caller broke a documented precondition */
  ST_ERR_CONFIG = 2,           /* the configuration is wrong: the error names the key */
  ST_ERR_IO = 3,               /* the file system said no: path, permission, space */
  ST_ERR_FORMAT = 4,           /* a file's content is malformed (JSON, safetensors, checkpoint) */
  ST_ERR_OUT_OF_MEMORY = 5,
  ST_ERR_PLUGIN = 6,           /* a plugin could not be found, opened or accepted */
  ST_ERR_UNSUPPORTED = 7,      /* valid, but not available in this build or on this device */
  ST_ERR_COMM = 8,             /* a collective failed or a peer went away */
  ST_ERR_TIMEOUT = 9,          /* a peer or a resource did not answer in time */
  ST_ERR_NUMERIC = 10,         /* NaN/Inf where numbers were expected */
  ST_ERR_DEVICE = 11,          /* the accelerator or its driver failed */
  ST_ERR_NOT_FOUND = 12,       /* a named thing is absent (a tensor, a key); often recoverable */
  ST_ERR_INTERNAL = 13,        /* a bug in strata or a plugin: please report it */
  ST_ERR_INTERRUPTED = 14,     /* stopped by a signal; state was saved where possible */
  ST_RESULT_COUNT
} st_result;

/* One line per result: what happened and what to try. */
static inline const char *st_result_string(st_result r) {
  switch (r) {
  case ST_OK: return "success";
  case ST_ERR_INVALID_ARGUMENT: return "invalid argument (a caller broke an API precondition; run with STRATA_DEBUG=1 for details)";
  case ST_ERR_CONFIG: return "configuration error (fix the key named above; `strata validate CONFIG` shows the resolved config)";
  case ST_ERR_IO: return "I/O error (check the path, its permissions and free disk space)";
  case ST_ERR_FORMAT: return "malformed file (the file named above is truncated or not in the expected format)";
  case ST_ERR_OUT_OF_MEMORY: return "out of memory (lower the micro batch size, enable activation checkpointing or an offloading strategy)";
  case ST_ERR_PLUGIN: return "plugin error (`strata plugins` lists what is found; STRATA_PLUGIN_PATH adds folders)";
  case ST_ERR_UNSUPPORTED: return "not supported in this build or on this device";
  case ST_ERR_COMM: return "communication error (a peer failed; see its log)";
  case ST_ERR_TIMEOUT: return "timed out waiting for a peer or resource";
  case ST_ERR_NUMERIC: return "numerical error (NaN or Inf; lower the learning rate or enable gradient clipping)";
  case ST_ERR_DEVICE: return "device error (`strata env` shows the accelerator state)";
  case ST_ERR_NOT_FOUND: return "not found";
  case ST_ERR_INTERNAL: return "internal error (a bug: please report it with the log)";
  case ST_ERR_INTERRUPTED: return "interrupted";
  default: return "unknown result code";
  }
}

/* The error object. Owned by the caller of an API (never a global); filled by the callee on
 * failure. `where` holds a config key path ("optimizer.params.lr"), a file name or a tensor name. */
#define ST_ERROR_WHERE_MAX 256
#define ST_ERROR_MESSAGE_MAX 1536
typedef struct st_error {
  st_result code;
  char where[ST_ERROR_WHERE_MAX];
  char message[ST_ERROR_MESSAGE_MAX];
} st_error;

static inline void st_error_clear(st_error *err) {
  if (!err) return;
  err->code = ST_OK;
  err->where[0] = '\0';
  err->message[0] = '\0';
}

/* Fill `err` and return `code`, so that `return st_error_set(err, ...)` reads naturally. */
static inline ST_PRINTF(4, 5) st_result st_error_set(st_error *err, st_result code, const char *where,
                                                      const char *fmt, ...) {
  if (!err) return code;
  err->code = code;
  snprintf(err->where, sizeof err->where, "%s", where ? where : "");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(err->message, sizeof err->message, fmt, ap);
  va_end(ap);
  return code;
}

/* Prepend context to an existing message ("loading step-100: " + message); keeps code and where. */
static inline ST_PRINTF(2, 3) st_result st_error_prefix(st_error *err, const char *fmt, ...) {
  if (!err) return ST_ERR_INTERNAL;
  char prefix[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(prefix, sizeof prefix, fmt, ap);
  va_end(ap);
  size_t cap = sizeof err->message, plen = strlen(prefix), mlen = 0;
  while (mlen < cap - 1 && err->message[mlen]) mlen++;
  if (plen > cap - 1) plen = cap - 1;
  if (plen + mlen > cap - 1) mlen = cap - 1 - plen; /* keep the prefix, cut the tail */
  memmove(err->message + plen, err->message, mlen);
  memcpy(err->message, prefix, plen);
  err->message[plen + mlen] = '\0';
  return err->code;
}

/* Propagation, NCCL style: ST_CHECK returns, ST_CHECK_GOTO records and jumps to one cleanup label. */
#define ST_CHECK(expr)                                                                             \
  do {                                                                                             \
    st_result st_check_r_ = (expr);                                                                \
    if (st_check_r_ != ST_OK) return st_check_r_;                                                  \
  } while (0)
#define ST_CHECK_GOTO(expr, res, label)                                                            \
  do {                                                                                             \
    (res) = (expr);                                                                                \
    if ((res) != ST_OK) goto label;                                                                \
  } while (0)

typedef enum st_log_level {
  ST_LOG_ERROR = 0,
  ST_LOG_WARN = 1,
  ST_LOG_INFO = 2,
  ST_LOG_DEBUG = 3,
} st_log_level;

/* Common header of every plugin struct (model, strategy, comm). Methods are appended after it in
 * later minor revisions, never reordered; `struct_size` tells the core how many the plugin has. */
typedef struct st_plugin_header {
  uint32_t abi_version;    /* ST_ABI_VERSION the plugin was compiled against */
  uint32_t struct_size;    /* sizeof(the whole plugin struct) as the plugin saw it */
  const char *kind;        /* "model" | "strategy" | "comm" */
  const char *name;        /* must equal <name> in libstrata-<kind>-<name>.so */
  const char *version;     /* the plugin's own version, free form */
  const char *fingerprint; /* ST_BUILD_FINGERPRINT */
} st_plugin_header;

/* "abi=1;cuda=12;cc=gcc-12": the ABI must match the core's; a plugin with cuda=N>0 loads only into
 * a core built for the same CUDA major, one with cuda=0 (CPU-only) into any core; the compiler is
 * informational. Plugins built with CUDA define ST_CUDA_MAJOR before including strata headers. */
#ifndef ST_CUDA_MAJOR
#define ST_CUDA_MAJOR 0
#endif
#if defined(__clang__)
#define ST_CC_ID "clang-" ST_STR(__clang_major__)
#elif defined(__GNUC__)
#define ST_CC_ID "gcc-" ST_STR(__GNUC__)
#else
#define ST_CC_ID "cc"
#endif
#define ST_BUILD_FINGERPRINT "abi=" ST_STR(ST_ABI_VERSION) ";cuda=" ST_STR(ST_CUDA_MAJOR) ";cc=" ST_CC_ID

#define ST_PLUGIN_HEADER(kind_, name_, version_, struct_type_)                                     \
  {                                                                                                \
    .abi_version = ST_ABI_VERSION, .struct_size = (uint32_t)sizeof(struct_type_), .kind = (kind_), \
    .name = (name_), .version = (version_), .fingerprint = ST_BUILD_FINGERPRINT                   \
  }

#endif /* STRATA_STRATA_H */
