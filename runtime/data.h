/* data.h (internal) — cached-sample datasets: metadata, sampling, prefetch.
 *
 * A dataset is a list of safetensors files, one cached sample each (DESIGN §5). They are named by
 * `dataset_metadata_path` (CSV with a header row and a column `file` or `image`; JSON array of
 * objects; JSONL — the `file` (or `image`) field of each row, relative to dataset_base_path, with a
 * `.safetensors` suffix added when missing) or, when no metadata is given, every `*.safetensors`
 * under dataset_base_path in sorted order. A bad sample is an error naming the file.
 *
 * Details the implementation (data.c) commits to:
 * - metadata format by suffix: ".jsonl", ".json", anything else CSV (as DiffSynth-Studio does);
 *   CSV is RFC 4180 (quoted fields hold commas, doubled quotes, newlines; CRLF and a BOM are fine);
 *   `file` wins over `image`; absolute paths are kept; without base_path, relative paths resolve
 *   against the metadata file's folder.
 * - epoch e's order: n*repeat positions (position p is file p % n), permuted when shuffling by
 *   Fisher–Yates over splitmix64 seeded from (seed, e); cut into batch_size batches (the partial
 *   tail dropped); rank r takes batches r, r+world, ... and every rank gets
 *   floor(n*repeat / batch_size / world) of them. The sequence depends on (seed, cursor) only:
 *   prefetching never changes it, and seek reproduces it.
 * - repeat 0 means 1 (zero-initialized options).
 * - a failed load is returned by st_dataset_next, which then keeps returning that error without
 *   advancing (the prefetch thread stops at the bad batch); st_dataset_seek clears it. The
 *   message names the sample file and the metadata row ("... metadata.csv line 4: ...").
 * - sample tensors are read-only views into the mapped files (or aligned copies). */
#ifndef STRATA_RUNTIME_DATA_H
#define STRATA_RUNTIME_DATA_H

#include <strata/model.h>

typedef struct st_dataset st_dataset;

typedef struct st_dataset_options {
  const char *base_path;
  const char *metadata_path; /* NULL: scan base_path */
  int64_t repeat;            /* dataset_repeat: the list is repeated this many times per epoch */
  bool shuffle;              /* per-epoch permutation from (seed, epoch) */
  uint64_t seed;
  int64_t batch_size;        /* samples per micro-batch */
  int prefetch;              /* micro-batches loaded ahead on a background thread (0 = synchronous) */
  int rank, world_size;      /* each rank takes every world_size-th batch of the global order */
} st_dataset_options;

st_result st_dataset_open(const st_dataset_options *opt, st_dataset **out, st_error *err);
void st_dataset_close(st_dataset *d);
int64_t st_dataset_size(const st_dataset *d);           /* files, before repeat */
int64_t st_dataset_batches_per_epoch(const st_dataset *d); /* per rank, after repeat; partial batch dropped */

/* The cursor is the global micro-batch index since the start of training (epoch = cursor /
 * batches_per_epoch); a resumed run seeks to where it stopped. */
st_result st_dataset_seek(st_dataset *d, int64_t cursor, st_error *err);
int64_t st_dataset_cursor(const st_dataset *d);
/* Next micro-batch; the batch stays valid until the next call or close. */
st_result st_dataset_next(st_dataset *d, st_batch *out, st_error *err);

/* Write n synthetic samples (model->synth_sample(seed, first + i)) to dir as sample-000000.safetensors ... plus a
 * metadata.jsonl; skips the work when dir already holds exactly those files for this seed.
 * dir and its parents are created. A stamp file (.strata-synthetic.json: n, seed) is written last;
 * when it does not match, earlier sample-*.safetensors in dir are removed first (a folder scan
 * would pick them up; no other file is touched) and every sample is written through a temporary name and a rename. The sink's
 * put_file is ST_ERR_UNSUPPORTED. Single-process: call it on one rank and barrier before others
 * open the folder. */
st_result st_dataset_synthesize(const char *dir, int64_t n, uint64_t seed, int64_t first,
                                st_result (*synth)(void *model_ctx, uint64_t seed, int64_t index,
                                                   st_tensor_sink *sink, st_error *err),
                                void *model_ctx, st_error *err);

#endif /* STRATA_RUNTIME_DATA_H */
