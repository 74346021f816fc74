/* test_headers_strata.c — <strata/strata.h> compiles on its own (included first, nothing before
 * it), under -std=c11 -pedantic-errors -Wall -Wextra -Werror. Also holds main() for the headers
 * test, which calls one function from every other test_headers_*.c file, and checks that every
 * header in runtime/include/strata/ has such a file (a new header without one fails here). */
#include <strata/strata.h>

#include <dirent.h>
#include <stdlib.h>

int st_header_check_strata(void);
int st_header_check_tensor(void);
int st_header_check_ops(void);
int st_header_check_host(void);
int st_header_check_model(void);
int st_header_check_strategy(void);
int st_header_check_comm(void);

int st_header_check_strata(void) {
  st_error err;
  st_error_clear(&err);
  st_error_set(&err, ST_ERR_PLUGIN, "x", "%d", 7);
  return err.code == ST_ERR_PLUGIN && strcmp(err.message, "7") == 0 &&
         strncmp(ST_BUILD_FINGERPRINT, "abi=" ST_STR(ST_ABI_VERSION) ";", 6) == 0 &&
         st_result_string(ST_OK) != NULL;
}

int main(void) {
  struct {
    const char *name;
    int (*check)(void);
  } checks[] = {{"strata.h", st_header_check_strata}, {"tensor.h", st_header_check_tensor},
                {"ops.h", st_header_check_ops},       {"host.h", st_header_check_host},
                {"model.h", st_header_check_model},   {"strategy.h", st_header_check_strategy},
                {"comm.h", st_header_check_comm}};
  const int n_checks = (int)(sizeof checks / sizeof checks[0]);
  int failed = 0, ran = 0;
  for (int i = 0; i < n_checks; i++, ran++)
    if (!checks[i].check()) {
      fprintf(stderr, "headers: the check using %s failed\n", checks[i].name);
      failed++;
    }
  /* every SDK header is covered (ST_SOURCE_ROOT comes from the meson test environment) */
  const char *root = getenv("ST_SOURCE_ROOT");
  char dir[4096];
  snprintf(dir, sizeof dir, "%s/runtime/include/strata", root ? root : "");
  DIR *d = root ? opendir(dir) : NULL;
  if (root && !d) {
    fprintf(stderr, "headers: cannot open %s\n", dir);
    failed++;
  }
  for (struct dirent *e; d && (e = readdir(d));) {
    size_t len = strlen(e->d_name);
    if (len < 3 || strcmp(e->d_name + len - 2, ".h")) continue;
    int covered = 0;
    for (int i = 0; i < n_checks; i++) covered |= !strcmp(checks[i].name, e->d_name);
    ran++;
    if (!covered) {
      fprintf(stderr, "headers: %s/%s has no tests/unit/test_headers_*.c (add one and list it in meson.build)\n",
              dir, e->d_name);
      failed++;
    }
  }
  if (d) closedir(d);
  fprintf(stderr, "headers: %d checks, %d failed\n", ran, failed);
  return failed ? 1 : 0;
}
