/* cmd_pending.c: commands whose implementation has not landed yet (removed as each lands). */
#include "sim/cli/cli.h"
#include "sim/common/kv_common.h"

#include <stdio.h>

#define PENDING(fn, name)                                                                                 \
    int fn(int argc, char **argv)                                                                         \
    {                                                                                                     \
        (void)argc;                                                                                       \
        (void)argv;                                                                                       \
        fprintf(stderr, "kvsim %s: not implemented yet\n", name);                                         \
        return 1;                                                                                         \
    }

