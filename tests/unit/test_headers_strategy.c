/* test_headers_strategy.c — <strata/strategy.h> compiles on its own. */
#include <strata/strategy.h>

int st_header_check_strategy(void);
int st_header_check_strategy(void) {
  static const st_strategy_plugin_v1 p = {.header = ST_PLUGIN_HEADER("strategy", "h", "0", st_strategy_plugin_v1)};
  return p.header.struct_size == sizeof p &&
         strcmp(ST_STRATEGY_PLUGIN_SYMBOL_V1, "strata_strategy_plugin_v1") == 0 && ST_STATE_KIND_COUNT == 3;
}
