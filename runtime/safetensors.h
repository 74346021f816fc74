/* safetensors.h (internal) — reading (mmap, fully validated header) and writing safetensors files.
 *
 * Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape,
 * data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the data section. The reader
 * rejects, with a message naming the file and the tensor: a file shorter than 8 bytes or than its
 * header, a header over 100 MB, invalid JSON or duplicate names, unknown dtypes, offsets out of
 * range / overlapping / not covering the data section exactly, and byte lengths that disagree
 * with dtype x shape. */
#ifndef STRATA_RUNTIME_SAFETENSORS_H
#define STRATA_RUNTIME_SAFETENSORS_H

#include <strata/tensor.h>

typedef struct st_safetensors st_safetensors;

typedef struct st_st_entry {
  const char *name;
  st_dtype dtype;
  int ndim;
  int64_t shape[ST_MAX_DIMS];
  uint64_t begin, end; /* byte offsets within the data section */
} st_st_entry;

st_result st_safetensors_open(const char *path, st_safetensors **out, st_error *err);
/* Parses a buffer the caller keeps alive (fuzzing, tests); name is used in messages. */
st_result st_safetensors_open_memory(const void *buf, size_t len, const char *name, st_safetensors **out,
                                     st_error *err);
void st_safetensors_close(st_safetensors *f);

int st_safetensors_count(const st_safetensors *f);
const st_st_entry *st_safetensors_entry(const st_safetensors *f, int i); /* in file order */
const st_st_entry *st_safetensors_find(const st_safetensors *f, const char *name);
const void *st_safetensors_data(const st_safetensors *f, const st_st_entry *e);
/* a host tensor view of entry e (read-only data) */
st_tensor st_safetensors_tensor(const st_safetensors *f, const st_st_entry *e);
const char *st_safetensors_metadata(const st_safetensors *f, const char *key); /* NULL if absent */
const char *st_safetensors_path(const st_safetensors *f);
/* Fault the data section in (one read per page) so that a later reader does not wait on the disk:
 * the data loader's prefetch thread calls it. A no-op for buffers from open_memory. */
void st_safetensors_populate(const st_safetensors *f);

/* Writer: the header lists tensors in the order added; `data` must stay valid until finish unless
 * copy is true. finish writes to `path` directly (callers that need atomicity write into a
 * temporary directory and rename it), fsyncs when asked, and closes: it always frees the writer,
 * on success and on failure (a failed finish removes the partial file), so do not call
 * st_safetensors_writer_free after it; writer_free is for a writer abandoned unfinished.
 * The header is {"__metadata__": {...}, tensors in the order added}, padded with spaces to a
 * multiple of 8 bytes; the data section groups tensors by element size (8, 4, 2, 1 bytes, in the
 * order added within a size) so that each is aligned, as the Rust library does. Adding a name
 * twice is an error; setting a metadata key twice keeps the last value.
 *
 * Reader notes: entries are in header order; st_safetensors_find is a binary search. Tensor views
 * point into the read-only mapping (or the caller's buffer) and are aligned to their element size:
 * a tensor that a hand-made file stores misaligned gets an aligned copy. Dtypes: F32 F64 BF16 F16
 * I32 I64 U8 (BOOL reads as U8); the other safetensors dtypes (I8, F8_*, ...) are
 * ST_ERR_UNSUPPORTED naming the dtype. Errors set `where` to the file name and start the message
 * with it. */
typedef struct st_safetensors_writer st_safetensors_writer;
st_result st_safetensors_writer_create(st_safetensors_writer **out, st_error *err);
st_result st_safetensors_writer_add(st_safetensors_writer *w, const char *name, st_dtype dt, int ndim,
                                    const int64_t *shape, const void *data, bool copy, st_error *err);
st_result st_safetensors_writer_metadata(st_safetensors_writer *w, const char *key, const char *value,
                                         st_error *err);
st_result st_safetensors_writer_finish(st_safetensors_writer *w, const char *path, bool fsync_file, st_error *err);
void st_safetensors_writer_free(st_safetensors_writer *w);

#endif /* STRATA_RUNTIME_SAFETENSORS_H */
