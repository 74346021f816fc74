/* store.c — placeholder until its module lands. */
#include <strata/strata.h>
