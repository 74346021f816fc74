/* placeholder */
#include "cpu_ops.h"
