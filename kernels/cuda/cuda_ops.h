/* cuda_ops.h — the CUDA ops table (kernels/cuda), built when meson finds nvcc (-Dcuda).
 *
 * One table per device: its own non-blocking stream and cuBLAS handle; every op enqueues on that
 * stream (ops that return a host scalar, copies touching host memory and ops that validate device
 * data, such as the labels of cross_entropy, synchronize it). Pointers are device pointers of the
 * table's device unless the op says otherwise (copy); every op first makes the table's device
 * current on the calling thread (cudaSetDevice). Element types: F32 and BF16 for every
 * implemented op (GEMM: F32 x F32 -> F32, BF16 x BF16 -> BF16 or F32, fp32 accumulation, no TF32);
 * fill and cast also take F64, F16 and the integer types as the CPU table does. An op or dtype the
 * table cannot do returns ST_ERR_UNSUPPORTED, never a wrong result.
 *
 * The ops table returns bare st_result codes; the message behind a failure (the op, the CUDA or
 * cuBLAS call, its error string) is kept per table and read with st_cuda_ops_last_error. */
#ifndef STRATA_KERNELS_CUDA_OPS_H
#define STRATA_KERNELS_CUDA_OPS_H

#include <strata/ops.h>

/* Number of usable CUDA devices; 0 when there is none or no driver, with the reason in `why`
 * (may be NULL). Never fails. */
int st_cuda_device_count(char *why, size_t why_cap);

/* A table on CUDA device `device` (an ordinal < st_cuda_device_count()). ST_ERR_DEVICE with a
 * message naming the reason (no device, no driver, ordinal out of range, stream or cuBLAS setup
 * failed). */
st_result st_cuda_ops_create(int device, const st_ops **out, st_error *err);
void st_cuda_ops_destroy(const st_ops *ops);

/* The error behind the last failing op of this table (thread-safe; the table keeps one). Returns
 * its code (ST_OK and an empty message when nothing failed since create or the last clear). */
st_result st_cuda_ops_last_error(const st_ops *ops, st_error *out);
void st_cuda_ops_clear_error(const st_ops *ops);

/* Plain device and page-locked host memory for the core's st_host alloc/free until the caching
 * allocator lands: cudaMalloc on the table's device (NULL on failure, the reason in the table's last
 * error) and cudaMallocHost. Free with the matching call; NULL is ignored. */
void *st_cuda_alloc(const st_ops *ops, size_t bytes);
void st_cuda_free(const st_ops *ops, void *ptr);
void *st_cuda_alloc_pinned(const st_ops *ops, size_t bytes);
void st_cuda_free_pinned(const st_ops *ops, void *ptr);

/* The table's stream (a cudaStream_t) and cuBLAS handle (a cublasHandle_t), for code that must
 * order its own work with the table's (the NCCL comm plugin, benchmarks). */
void *st_cuda_ops_stream(const st_ops *ops);
void *st_cuda_ops_cublas(const st_ops *ops);

#endif
