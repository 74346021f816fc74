/* fsutil.h (internal) — small file-system helpers shared by the writers (checkpoints, data,
 * metrics). */
#ifndef STRATA_RUNTIME_FSUTIL_H
#define STRATA_RUNTIME_FSUTIL_H

#include <strata/strata.h>

/* mkdir -p: creates `dir` and its parents (0755); an error names the part that failed, or says
 * that `dir` exists and is not a folder. */
st_result st_mkdir_p(const char *dir, st_error *err);

/* Writes len bytes to path atomically: into "<dir>/.<name>.tmp", fsync'd, then renamed over path,
 * so a reader (or a crash) sees the old file or the new one, never a part. */
st_result st_write_file_atomic(const char *path, const void *bytes, size_t len, st_error *err);

#endif /* STRATA_RUNTIME_FSUTIL_H */
