/* env.h (internal) — `strata env`: what a bug report needs. */
#ifndef STRATA_RUNTIME_ENV_H
#define STRATA_RUNTIME_ENV_H

#include <stdio.h>

void st_env_report(FILE *out);

#endif
