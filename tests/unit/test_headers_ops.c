/* test_headers_ops.c — <strata/ops.h> compiles on its own. */
#include <strata/ops.h>

#include <stddef.h>

int st_header_check_ops(void);
int st_header_check_ops(void) {
  st_ops ops = {0};
  ops.struct_size = (uint32_t)sizeof ops;
  st_gemm_desc g = {0};
  (void)g;
  return ops.copy == NULL && offsetof(st_ops, copy) > offsetof(st_ops, impl);
}
