/* st_test.h — a minimal test harness: checks that name what failed, exit 1 on any failure,
 * exit 77 to skip (meson's convention). Each test executable is one meson test. */
#ifndef STRATA_TESTS_ST_TEST_H
#define STRATA_TESTS_ST_TEST_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int st_test_failures_ = 0;
static int st_test_checks_ = 0;

#define ST_TEST_SKIP 77

#define CHECK(cond)                                                                                \
  do {                                                                                             \
    st_test_checks_++;                                                                             \
    if (!(cond)) {                                                                                 \
      st_test_failures_++;                                                                         \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);                     \
    }                                                                                              \
  } while (0)

#define CHECK_MSG(cond, ...)                                                                       \
  do {                                                                                             \
    st_test_checks_++;                                                                             \
    if (!(cond)) {                                                                                 \
      st_test_failures_++;                                                                         \
      fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond);                     \
      fprintf(stderr, __VA_ARGS__);                                                                \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

/* st_result equality, printing the error object on mismatch */
#define CHECK_RESULT(expr, expected, errp)                                                         \
  do {                                                                                             \
    int st_r_ = (int)(expr);                                                                       \
    const st_error *st_e_ = (errp); /* a variable, so `&err` does not trip -Waddress */             \
    st_test_checks_++;                                                                             \
    if (st_r_ != (int)(expected)) {                                                                \
      st_test_failures_++;                                                                         \
      fprintf(stderr, "%s:%d: %s returned %d, expected %d (%s%s%s)\n", __FILE__, __LINE__, #expr,  \
              st_r_, (int)(expected), st_e_ ? st_e_->where : "", st_e_ ? ": " : "",                \
              st_e_ ? st_e_->message : "");                                                        \
    }                                                                                              \
  } while (0)
#define CHECK_OK(expr, errp) CHECK_RESULT(expr, 0, errp)

/* the message (or where) contains a substring */
#define CHECK_CONTAINS(haystack, needle)                                                           \
  do {                                                                                             \
    st_test_checks_++;                                                                             \
    if (!(haystack) || !strstr((haystack), (needle))) {                                            \
      st_test_failures_++;                                                                         \
      fprintf(stderr, "%s:%d: expected \"%s\" in \"%s\"\n", __FILE__, __LINE__, (needle),          \
              (haystack) ? (haystack) : "(null)");                                                 \
    }                                                                                              \
  } while (0)

/* |a - b| <= atol + rtol * |b| */
#define CHECK_CLOSE(a, b, rtol, atol)                                                              \
  do {                                                                                             \
    double st_a_ = (double)(a), st_b_ = (double)(b);                                               \
    st_test_checks_++;                                                                             \
    if (!(fabs(st_a_ - st_b_) <= (atol) + (rtol) * fabs(st_b_))) {                                 \
      st_test_failures_++;                                                                         \
      fprintf(stderr, "%s:%d: %s = %.10g, expected %s = %.10g (rtol %g, atol %g)\n", __FILE__,      \
              __LINE__, #a, st_a_, #b, st_b_, (double)(rtol), (double)(atol));                     \
    }                                                                                              \
  } while (0)

/* call at the end of main: prints a summary, returns the exit code */
static inline int st_test_finish(const char *name) {
  if (st_test_checks_ == 0) {
    fprintf(stderr, "%s: no checks ran\n", name);
    return 1;
  }
  fprintf(stderr, "%s: %d checks, %d failed\n", name, st_test_checks_, st_test_failures_);
  return st_test_failures_ ? 1 : 0;
}

#endif
