/* fuzz_safetensors.c — libFuzzer target for the safetensors reader: parse arbitrary bytes with
 * st_safetensors_open_memory, walk every entry, read every byte of every tensor, look names and
 * metadata up, close. Built by scripts/fuzz-smoke with runtime/safetensors.c alone (clang, ASan +
 * UBSan). A crash, leak, out-of-bounds read or UB report is a bug; errors are the usual outcome. */
#include "safetensors.h"

#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  st_safetensors *f = NULL;
  st_error err;
  if (st_safetensors_open_memory(data, size, "fuzz.safetensors", &f, &err) != ST_OK) {
    /* the message must be a terminated string that names the input */
    if (!strstr(err.message, "fuzz.safetensors")) abort();
    return 0;
  }
  volatile uint8_t sink = 0;
  for (int i = 0; i < st_safetensors_count(f); i++) {
    const st_st_entry *e = st_safetensors_entry(f, i);
    if (st_safetensors_find(f, e->name) != e) abort();
    st_tensor t = st_safetensors_tensor(f, e);
    if (st_tensor_nbytes(&t) != e->end - e->begin) abort();
    const uint8_t *p = st_safetensors_data(f, e);
    for (uint64_t b = 0; b < e->end - e->begin; b++) sink ^= p[b]; /* ASan checks every byte is in bounds */
    if (t.ndim > 0 && (uintptr_t)t.data % st_dtype_size(t.dtype) != 0 && st_tensor_nbytes(&t) > 0) abort();
  }
  (void)st_safetensors_metadata(f, "format");
  (void)st_safetensors_find(f, "");
  st_safetensors_close(f);
  (void)sink;
  return 0;
}
