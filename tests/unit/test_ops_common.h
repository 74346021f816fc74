/* test_ops_common.h — shared helpers of the kernels tests (tests/unit/test_ops_*.c): a table,
 * a deterministic random source, array comparison with a named worst element, and central finite
 * differences of a scalar loss computed with the F64 forward ops. */
#ifndef STRATA_TESTS_OPS_COMMON_H
#define STRATA_TESTS_OPS_COMMON_H

#include "st_test.h"

#include <cpu_ops.h>
#include <stdint.h>
#include <stdlib.h>

static inline const st_ops *test_ops_create(int threads) {
  const st_ops *ops = NULL;
  st_error err;
  st_error_clear(&err);
  if (st_cpu_ops_create(threads, &ops, &err) != ST_OK) {
    fprintf(stderr, "st_cpu_ops_create: %s\n", err.message);
    exit(1);
  }
  return ops;
}

/* xorshift64*: reproducible inputs, no libc rand state */
typedef struct test_rng { uint64_t s; } test_rng;
static inline double test_uniform(test_rng *r, double lo, double hi) {
  r->s ^= r->s >> 12;
  r->s ^= r->s << 25;
  r->s ^= r->s >> 27;
  uint64_t v = r->s * 2685821657736338717ull;
  return lo + (hi - lo) * (double)(v >> 11) / 9007199254740992.0;
}

static inline double *test_randd(test_rng *r, int64_t n, double lo, double hi) {
  double *x = calloc((size_t)(n > 0 ? n : 1), sizeof(double));
  for (int64_t i = 0; i < n; i++) x[i] = test_uniform(r, lo, hi);
  return x;
}

static inline double *test_zerosd(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(double)); }
static inline float *test_zerosf(int64_t n) { return calloc((size_t)(n > 0 ? n : 1), sizeof(float)); }
static inline double *test_dupd(const double *x, int64_t n) {
  double *y = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
  memcpy(y, x, sizeof(double) * (size_t)n);
  return y;
}
static inline float *test_tof(const double *x, int64_t n) {
  float *y = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
  for (int64_t i = 0; i < n; i++) y[i] = (float)x[i];
  return y;
}

/* max_i |a_i - b_i| / (atol + rtol |b_i|) <= 1, reporting the worst element */
static inline void test_close_f(const char *what, const float *a, const double *b, int64_t n, double rtol, double atol,
                                const char *file, int line) {
  double worst = 0;
  int64_t wi = -1;
  for (int64_t i = 0; i < n; i++) {
    double e = fabs((double)a[i] - b[i]) / (atol + rtol * fabs(b[i]));
    if (!(e <= worst)) { worst = e; wi = i; }
  }
  st_test_checks_++;
  if (!(worst <= 1.0)) {
    st_test_failures_++;
    fprintf(stderr, "%s:%d: %s: element %lld = %.10g, expected %.10g (rtol %g, atol %g)\n", file, line, what,
            (long long)wi, (double)a[wi], b[wi], rtol, atol);
  }
}
static inline void test_close_d(const char *what, const double *a, const double *b, int64_t n, double rtol, double atol,
                                const char *file, int line) {
  double worst = 0;
  int64_t wi = -1;
  for (int64_t i = 0; i < n; i++) {
    double e = fabs(a[i] - b[i]) / (atol + rtol * fabs(b[i]));
    if (!(e <= worst)) { worst = e; wi = i; }
  }
  st_test_checks_++;
  if (!(worst <= 1.0)) {
    st_test_failures_++;
    fprintf(stderr, "%s:%d: %s: element %lld = %.15g, expected %.15g (rtol %g, atol %g)\n", file, line, what,
            (long long)wi, a[wi], b[wi], rtol, atol);
  }
}
#define CLOSE_F(what, a, b, n, rtol, atol) test_close_f(what, a, b, n, rtol, atol, __FILE__, __LINE__)
#define CLOSE_D(what, a, b, n, rtol, atol) test_close_d(what, a, b, n, rtol, atol, __FILE__, __LINE__)

/* central differences of loss(ctx) with respect to x[0..n): x is perturbed in place and restored.
 * FD_EPS = 1e-6 in double: truncation error ~eps^2 |L'''| ~ 1e-12 and cancellation error
 * ~1e-16 |L| / eps ~ 1e-10 |L|, so 1e-6 relative (plus a small absolute floor) is a real check. */
#define FD_EPS 1e-6
static inline void test_fd(double (*loss)(void *), void *ctx, double *x, int64_t n, double *grad) {
  for (int64_t i = 0; i < n; i++) {
    double x0 = x[i];
    x[i] = x0 + FD_EPS;
    double lp = loss(ctx);
    x[i] = x0 - FD_EPS;
    double lm = loss(ctx);
    x[i] = x0;
    grad[i] = (lp - lm) / (2 * FD_EPS);
  }
}

static inline double test_dot(const double *a, const double *b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += a[i] * b[i];
  return s;
}

#endif
