/*
 * test_backend_select.c: choosing a backend by name, on any machine. Without a usable GPU,
 * "cuda" must fail with KV_EUNAVAIL and the probe's reason and "auto" must fall back to the CPU;
 * with one, "auto" must still stay on the CPU until the CUDA kernels are verified (KV_CUDA_VERIFIED
 * build flag, or KV_CUDA_AUTO=1 for one run), and KV_CUDA_AUTO=0 must force the CPU. The
 * kv_cuda.h extras refuse non-CUDA backends. (The CUDA op bodies themselves are checked by
 * tests/gpu_parity.c on a GPU and by `make test-cuda-emu` in emulation.)
 */
#include "kernels/kv_backend.h"
#include "kernels/kv_cuda.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "tests/kv_test.h"

#include <stdlib.h>
#include <string.h>

#ifndef KV_CUDA_VERIFIED
#define KV_CUDA_VERIFIED 0 /* as kernels/backend.c sees it unless `make CUDA_VERIFIED=1` */
#endif

START_TEST(cuda_by_name_reports_why)
{
    const char *why = kv_cuda_unavailable_reason();
    ck_assert_ptr_nonnull(why);
    kv_backend_t *be = NULL;
    int rc = kv_backend_open("cuda", 1, &be);
    if (why[0]) {
        ck_assert_int_eq(rc, KV_EUNAVAIL);
        ck_assert_ptr_null(be);
        ck_assert_msg(strstr(kv_last_error(), why) != NULL, "message '%s' lacks the reason '%s'", kv_last_error(), why);
    } else {
        ck_assert_int_eq(rc, KV_OK);
        ck_assert_str_eq(be->name, "cuda");
        ck_assert_int_eq(be->host_memory, 0);
        ck_assert_ptr_null(kv_backend_missing_op(be)); /* every op has a CUDA body */
        kv_backend_close(be);
    }
}
END_TEST

START_TEST(auto_stays_on_cpu_unless_allowed)
{
    kv_log_set_level(KV_LOG_QUIET);
    kv_backend_t *be = NULL;
    unsetenv("KV_CUDA_AUTO");
    ck_assert_int_eq(kv_backend_open("auto", 1, &be), KV_OK);
    const int gpu = kv_cuda_unavailable_reason()[0] == 0;
    ck_assert_str_eq(be->name, gpu && KV_CUDA_VERIFIED ? "cuda" : "cpu");
    kv_backend_close(be);
    setenv("KV_CUDA_AUTO", "0", 1);
    ck_assert_int_eq(kv_backend_open("auto", 1, &be), KV_OK);
    ck_assert_str_eq(be->name, "cpu");
    kv_backend_close(be);
    setenv("KV_CUDA_AUTO", "1", 1);
    ck_assert_int_eq(kv_backend_open(NULL, 1, &be), KV_OK); /* NULL means auto */
    ck_assert_str_eq(be->name, gpu ? "cuda" : "cpu");
    kv_backend_close(be);
    unsetenv("KV_CUDA_AUTO");
    kv_log_set_level(KV_LOG_INFO);
}
END_TEST

START_TEST(unknown_name_lists_valid_ones)
{
    kv_backend_t *be = NULL;
    ck_assert_int_eq(kv_backend_open("tpu", 1, &be), KV_EINVAL);
    ck_assert_ptr_null(be);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "cpu, cuda, auto"));
}
END_TEST

START_TEST(cuda_extras_refuse_the_cpu)
{
    kv_backend_t *be = NULL;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_cuda_info_t info;
    double x = 0;
    ck_assert_int_eq(kv_cuda_info(be, &info), KV_EUNAVAIL);
    ck_assert_int_eq(kv_cuda_set_matmul(be, "bf16"), KV_EUNAVAIL);
    ck_assert_str_eq(kv_cuda_get_matmul(be), "fp32");
    ck_assert_int_eq(kv_cuda_copy_ceiling(be, 1024, &x), KV_EUNAVAIL);
    ck_assert_int_eq(kv_cuda_gemm_ceiling(be, 64, "fp32", &x), KV_EUNAVAIL);
    kv_backend_close(be);
}
END_TEST

Suite *suite_backend_select(void)
{
    Suite *s = suite_create("backend_select");
    TCase *tc = tcase_create("select");
    tcase_add_test(tc, cuda_by_name_reports_why);
    tcase_add_test(tc, auto_stays_on_cpu_unless_allowed);
    tcase_add_test(tc, unknown_name_lists_valid_ones);
    tcase_add_test(tc, cuda_extras_refuse_the_cpu);
    suite_add_tcase(s, tc);
    return s;
}
