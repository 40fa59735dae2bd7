/* kv_test.c: see kv_test.h. */
#include "tests/kv_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

const char *kv_test_shared(const char *rel, char *buf, size_t len)
{
    const char *env = getenv("KVSIM_SHARED");
    const char *roots[] = {env, "../shared", "."};
    for (size_t i = 0; i < sizeof roots / sizeof roots[0]; i++) {
        if (!roots[i])
            continue;
        snprintf(buf, len, "%s/%s", roots[i], rel);
        if (access(buf, R_OK) == 0)
            return buf;
    }
    return NULL;
}

const char *kv_test_tmp(const char *name, char *buf, size_t len)
{
    static int n = 0;
    mkdir("build", 0755);
    mkdir("build/test-tmp", 0755);
    snprintf(buf, len, "build/test-tmp/%d-%d-%s", (int)getpid(), n++, name);
    return buf;
}

void kv_test_skip(const char *test, const char *why)
{
    fprintf(stderr, "kvsim tests: not registered: %s (%s)\n", test, why);
}
