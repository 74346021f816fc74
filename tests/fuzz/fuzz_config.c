/* fuzz_config.c — libFuzzer target for the config loader: parse arbitrary bytes as a config, run
 * the schema and "auto" resolution, print it, free it. Built by scripts/fuzz-smoke together with
 * runtime/config.c alone (clang, ASan + UBSan). Any crash, leak or UB report is a bug; errors are
 * the expected outcome for most inputs. */
#include "config.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *text = malloc(size + 1); /* the loader takes a C string */
  if (!text) return 0;
  memcpy(text, data, size);
  text[size] = '\0';
  st_config *c = NULL;
  st_error err;
  if (st_config_load_string(text, "fuzz.json", &c, &err) == ST_OK) {
    st_settings s;
    if (st_config_extract(c, &s, &err) == ST_OK) (void)st_config_resolve(c, 2, 64, &s, &err);
    /* the plugin view of the blocks the core does not read */
    st_cfg *model = st_config_node(c, "model");
    const st_cfg_api *api = st_config_api();
    int64_t v;
    (void)api->get_int(model, "layers", 2, &v, &err);
    static const char *const allowed[] = {"name", "plugin", "layers", NULL};
    (void)api->check_keys(model, allowed, &err);
    char *j = api->to_json(model);
    free(j);
    FILE *devnull = fopen("/dev/null", "w");
    if (devnull) {
      st_config_print_resolved(c, devnull);
      fclose(devnull);
    }
    j = st_config_to_json(c);
    free(j);
    st_config_free(c);
  }
  free(text);
  return 0;
}
