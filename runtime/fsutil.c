/* fsutil.c — small file-system helpers shared by the writers. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fsutil.h"

st_result st_mkdir_p(const char *dir, st_error *err) {
  char *p = strdup(dir);
  if (!p) return st_error_set(err, ST_ERR_OUT_OF_MEMORY, dir, "out of memory");
  st_result r = ST_OK;
  for (char *s = p + 1;; s++) {
    if (*s != '/' && *s != '\0') continue;
    char c = *s;
    *s = '\0';
    if (mkdir(p, 0755) != 0 && errno != EEXIST) {
      r = st_error_set(err, ST_ERR_IO, dir, "cannot create the directory %s: %s", p, strerror(errno));
      break;
    }
    *s = c;
    if (c == '\0') break;
  }
  free(p);
  if (r == ST_OK) {
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
      r = st_error_set(err, ST_ERR_IO, dir, "%s exists and is not a directory", dir);
  }
  return r;
}

st_result st_write_file_atomic(const char *path, const void *bytes, size_t len, st_error *err) {
  char tmp[4200];
  const char *slash = strrchr(path, '/');
  if (slash) snprintf(tmp, sizeof tmp, "%.*s/.%s.tmp", (int)(slash - path), path, slash + 1);
  else snprintf(tmp, sizeof tmp, ".%s.tmp", path);
  FILE *fp = fopen(tmp, "wb");
  if (!fp) return st_error_set(err, ST_ERR_IO, tmp, "cannot create %s: %s", tmp, strerror(errno));
  bool ok = fwrite(bytes, 1, len, fp) == len;
  ok = (fflush(fp) == 0) && ok;
  ok = (fsync(fileno(fp)) == 0) && ok;
  int e = errno;
  ok = (fclose(fp) == 0) && ok;
  if (!ok || rename(tmp, path) != 0) {
    if (ok) e = errno;
    unlink(tmp);
    return st_error_set(err, ST_ERR_IO, path, "cannot write %s: %s", path, strerror(e));
  }
  return ST_OK;
}
