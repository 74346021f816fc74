/* local_comm.h (internal) — the built-in "local" comm backend for a world of one process.
 *
 * Every collective is a copy (or nothing when in place); reductions over one rank are the identity
 * (AVG included, exactly). Requests complete at once; wait/test just free/report them. send/recv to
 * oneself is refused (there is no second rank to pair with). Buffers on a device other than the CPU
 * are copied with host->ops->copy. */
#ifndef STRATA_RUNTIME_LOCAL_COMM_H
#define STRATA_RUNTIME_LOCAL_COMM_H

#include <strata/comm.h>

const st_comm_plugin_v1 *st_local_comm(void);

#endif
