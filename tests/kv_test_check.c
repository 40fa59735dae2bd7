/*
 * kv_test_check.c: helpers of tests/kv_test.h that assert with Check, so only the Check suites link
 * them (the fuzz harnesses link tests/kv_test.c without Check).
 */
#include "tests/kv_test.h"

#include <stdio.h>
#include <stdlib.h>

void *kv_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "cannot open %s (was it written?)", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    ck_assert_msg(n >= 0, "%s: cannot tell its size", path);
    ck_assert_int_eq(fseek(f, 0, SEEK_SET), 0);
    char *b = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(b);
    ck_assert_msg(fread(b, 1, (size_t)n, f) == (size_t)n, "%s: short read", path);
    b[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return b;
}
