/* strategy_util.h — small helpers shared by the in-tree strategy plugins (ddp, fsdp). Header-only
 * so each plugin stays one self-contained shared object built from the SDK headers alone. */
#ifndef STRATA_STRATEGIES_UTIL_H
#define STRATA_STRATEGIES_UTIL_H

#include <strata/strategy.h>

/* a failed read with the parameter, the slice and what to check in the message */
static inline st_result read_failed(st_error *err, st_result r, const char *who, const st_param_desc *p, st_state_kind kind,
                             int64_t off, int64_t count) {
  static const char *const kinds[] = {"value", "exp_avg", "exp_avg_sq"};
  const char *k = (unsigned)kind < 3 ? kinds[kind] : "state";
  if (err && err->code == r && err->message[0])
    return st_error_prefix(err, "%s: loading the %s of %s[%lld:%lld]: ", who, k, p->name, (long long)off,
                           (long long)(off + count));
  return st_error_set(err, r, p->name, "%s: cannot load the %s of %s, elements [%lld, %lld): %s%s", who, k, p->name,
                      (long long)off, (long long)(off + count), st_result_string(r),
                      r == ST_ERR_NOT_FOUND ? " (the checkpoint or weights do not hold this parameter)" : "");
}

#endif /* STRATA_STRATEGIES_UTIL_H */
