/* bench_cuda_ops.c — GEMM through the CUDA ops table vs the same cuBLAS call made directly, at
 * Qwen-Image shapes (tokens 4096 image + 512 text = 4608, D = 3072, MLP 4D), bf16 with fp32
 * accumulation and fp32 (no TF32). Prints TFLOP/s of both and their ratio: the ratio measures the
 * table's overhead (argument checks, cudaSetDevice, the launch path), not cuBLAS itself.
 *
 * NOT YET RUN: written on a machine without a GPU (it exits 77 there). scripts/gpu-check runs it.
 * Usage: bench_cuda_ops [iters]   (default 20 timed iterations after 3 warm-up ones) */
#include <cuda_ops.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct shape { const char *what; int64_t m, n, k; st_dtype dt; } shape;

#define CK(call)                                                                                   \
  do {                                                                                             \
    cudaError_t e_ = (call);                                                                       \
    if (e_ != cudaSuccess) {                                                                       \
      fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));       \
      exit(1);                                                                                     \
    }                                                                                              \
  } while (0)

static double time_ms(cudaStream_t s, int iters, void (*fn)(void *), void *ctx) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < 3; i++) fn(ctx);
  CK(cudaStreamSynchronize(s));
  CK(cudaEventRecord(a, s));
  for (int i = 0; i < iters; i++) fn(ctx);
  CK(cudaEventRecord(b, s));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / iters;
}

typedef struct ctx {
  const st_ops *ops;
  cublasHandle_t h;
  st_gemm_desc d;
} ctx;

static void via_table(void *v) {
  ctx *c = v;
  st_result r = c->ops->gemm(c->ops, &c->d);
  if (r != ST_OK) {
    st_error e;
    st_cuda_ops_last_error(c->ops, &e);
    fprintf(stderr, "gemm through the table: %s\n", e.message);
    exit(1);
  }
}

static void direct(void *v) {
  ctx *c = v;
  const st_gemm_desc *d = &c->d;
  float alpha = 1, beta = 0;
  cudaDataType_t t = d->dtype == ST_BF16 ? CUDA_R_16BF : CUDA_R_32F;
  /* the linear layer y = x W^T: row-major C[m,n] = A[m,k] B[n,k]^T, column-major C^T = B A^T */
  cublasStatus_t st = cublasGemmEx(c->h, CUBLAS_OP_T, CUBLAS_OP_N, (int)d->n, (int)d->m, (int)d->k, &alpha, d->b, t,
                                   (int)d->ldb, d->a, t, (int)d->lda, &beta, d->c, t, (int)d->ldc, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "cublasGemmEx: %s\n", cublasGetStatusString(st));
    exit(1);
  }
}

int main(int argc, char **argv) {
  int iters = argc > 1 ? atoi(argv[1]) : 20;
  if (iters < 1) iters = 1;
  char why[256];
  if (st_cuda_device_count(why, sizeof why) == 0) {
    fprintf(stderr, "SKIP: %s\n", why);
    return 77;
  }
  st_error err;
  st_error_clear(&err);
  const st_ops *ops = NULL;
  if (st_cuda_ops_create(0, &ops, &err) != ST_OK) {
    fprintf(stderr, "st_cuda_ops_create: %s\n", err.message);
    return 1;
  }
  char name[256] = "?";
  int cc_major = 0, cc_minor = 0;
  cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, 0);
  cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, 0);
  {
    struct cudaDeviceProp p;
    if (cudaGetDeviceProperties(&p, 0) == cudaSuccess) snprintf(name, sizeof name, "%s", p.name);
  }
  printf("device: %s (sm_%d%d), %d timed iterations\n", name, cc_major, cc_minor, iters);
  cudaStream_t s = (cudaStream_t)st_cuda_ops_stream(ops);
  ctx c = {.ops = ops};
  if (cublasCreate(&c.h) != CUBLAS_STATUS_SUCCESS || cublasSetStream(c.h, s) != CUBLAS_STATUS_SUCCESS) {
    fprintf(stderr, "cublasCreate failed\n");
    return 1;
  }
  const shape shapes[] = {
      {"qkv/out proj", 4608, 3072, 3072, ST_BF16},
      {"mlp up", 4608, 12288, 3072, ST_BF16},
      {"mlp down", 4608, 3072, 12288, ST_BF16},
      {"fp32 square", 4096, 4096, 4096, ST_F32},
  };
  printf("%-14s %6s %6s %6s %5s  %12s %12s %7s\n", "shape", "m", "n", "k", "dtype", "table TF/s", "cuBLAS TF/s",
         "ratio");
  for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
    const shape *sh = &shapes[i];
    size_t es = st_dtype_size(sh->dt);
    void *a, *b, *cc;
    CK(cudaMalloc(&a, (size_t)(sh->m * sh->k) * es));
    CK(cudaMalloc(&b, (size_t)(sh->n * sh->k) * es));
    CK(cudaMalloc(&cc, (size_t)(sh->m * sh->n) * es));
    ops->fill(ops, sh->dt, a, sh->m * sh->k, 0.01);
    ops->fill(ops, sh->dt, b, sh->n * sh->k, -0.02);
    c.d = (st_gemm_desc){.dtype = sh->dt, .c_dtype = sh->dt, .trans_b = true, .m = sh->m, .n = sh->n, .k = sh->k,
                         .alpha = 1, .beta = 0, .a = a, .lda = sh->k, .b = b, .ldb = sh->k, .c = cc, .ldc = sh->n,
                         .batch = 1};
    double flop = 2.0 * (double)sh->m * (double)sh->n * (double)sh->k;
    double t_table = time_ms(s, iters, via_table, &c);
    double t_direct = time_ms(s, iters, direct, &c);
    printf("%-14s %6lld %6lld %6lld %5s  %12.1f %12.1f %7.3f\n", sh->what, (long long)sh->m, (long long)sh->n,
           (long long)sh->k, st_dtype_name(sh->dt), flop / t_table / 1e9, flop / t_direct / 1e9, t_direct / t_table);
    cudaFree(a);
    cudaFree(b);
    cudaFree(cc);
  }
  cublasDestroy(c.h);
  st_cuda_ops_destroy(ops);
  return 0;
}
