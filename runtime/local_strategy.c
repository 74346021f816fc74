/* local_strategy.c — placeholder until its module lands. */
#include <strata/strata.h>
