/* cpu_ops.h — the CPU ops table (kernels/cpu). */
#ifndef STRATA_KERNELS_CPU_OPS_H
#define STRATA_KERNELS_CPU_OPS_H

#include <strata/ops.h>

/* threads <= 0: all online cores. The SIMD level is detected at run time; STRATA_CPU_ISA=generic
 * (or avx2) caps it. */
st_result st_cpu_ops_create(int threads, const st_ops **out, st_error *err);
void st_cpu_ops_destroy(const st_ops *ops);
const char *st_cpu_simd_level(void); /* "avx512", "avx2" or "generic": what the tables will use */

#endif
