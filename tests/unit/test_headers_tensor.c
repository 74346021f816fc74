/* test_headers_tensor.c — <strata/tensor.h> compiles on its own. */
#include <strata/tensor.h>

int st_header_check_tensor(void);
int st_header_check_tensor(void) {
  float v[6] = {0};
  int64_t shape[2] = {2, 3};
  st_device cpu = {0};
  st_tensor t = st_tensor_make(v, ST_F32, cpu, 2, shape);
  return st_dtype_size(ST_BF16) == 2 && st_tensor_numel(&t) == 6 && st_tensor_nbytes(&t) == sizeof v;
}
