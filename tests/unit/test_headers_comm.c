/* test_headers_comm.c — <strata/comm.h> compiles on its own. */
#include <strata/comm.h>

int st_header_check_comm(void);
int st_header_check_comm(void) {
  static const st_comm_plugin_v1 p = {.header = ST_PLUGIN_HEADER("comm", "h", "0", st_comm_plugin_v1)};
  return p.header.struct_size == sizeof p && strcmp(ST_COMM_PLUGIN_SYMBOL_V1, "strata_comm_plugin_v1") == 0;
}
