/* test_headers_model.c — <strata/model.h> compiles on its own. */
#include <strata/model.h>

int st_header_check_model(void);
int st_header_check_model(void) {
  static const st_model_plugin_v1 p = {.header = ST_PLUGIN_HEADER("model", "h", "0", st_model_plugin_v1)};
  return p.header.struct_size == sizeof p && strcmp(ST_MODEL_PLUGIN_SYMBOL_V1, "strata_model_plugin_v1") == 0;
}
