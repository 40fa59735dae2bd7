/*
 * check_main.c: runs every Check suite in one runner. Suites are collected at build time from
 * `Suite *suite_xxx(void)` definitions in tests/test_*.c (see the Makefile), so adding a suite is
 * adding a file. CK_RUN_SUITE=suite_name or CK_RUN_CASE narrow a run (Check's own variables).
 * Exit status is non-zero when any test fails.
 */
#include "sim/common/kv_common.h"

#include <check.h>
#include <stdio.h>
#include <stdlib.h>

#define X(name) Suite *name(void);
#include "suites.h"
#undef X

int main(int argc, char **argv)
{
    (void)argc;
    kv_omp_passive_reexec(argv); /* as the kvsim command does (sim/common/kv_common.h) */
    /* Real-model and HDF5 tests take seconds, not Check's default 4 s budget. */
    setenv("CK_DEFAULT_TIMEOUT", "300", 0);
    SRunner *sr = NULL;
#define X(name)                                                                                                        \
    do {                                                                                                               \
        Suite *s_ = name();                                                                                            \
        if (!sr)                                                                                                       \
            sr = srunner_create(s_);                                                                                   \
        else                                                                                                           \
            srunner_add_suite(sr, s_);                                                                                 \
    } while (0);
#include "suites.h"
#undef X
    if (!sr) {
        fprintf(stderr, "no test suites\n");
        return 1;
    }
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
