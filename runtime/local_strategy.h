/* local_strategy.h (internal) — the built-in `local` strategy: everything on one device, one
 * process. It is what the trainer uses before any strategy plugin is involved, and the reference
 * the distributed strategies are compared with. */
#ifndef STRATA_RUNTIME_LOCAL_STRATEGY_H
#define STRATA_RUNTIME_LOCAL_STRATEGY_H

#include <strata/strategy.h>

const st_strategy_plugin_v1 *st_local_strategy(void);

#endif
