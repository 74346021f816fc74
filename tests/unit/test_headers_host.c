/* test_headers_host.c — <strata/host.h> compiles on its own. */
#include <strata/host.h>

#include <stddef.h>

int st_header_check_host(void);
int st_header_check_host(void) {
  st_host h = {0};
  h.struct_size = (uint32_t)sizeof h;
  return h.ops == NULL && h.comm == NULL && offsetof(st_host, core) > offsetof(st_host, ops);
}
