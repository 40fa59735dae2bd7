/*
 * kv_test_filter.c: the counting stand-in for kvsim's zstd filter (kv_test.h), apart from kv_test.c
 * because it asserts with Check and the fuzz harnesses link kv_test.c without Check.
 */
#include "sim/common/kv_common.h"
#include "tests/kv_test.h"
#include "traces/kv_trace.h"

#include <hdf5.h>
extern const H5Z_class2_t kv_zstd_filter_class; /* kv_zstd_filter.c */
long kv_test_filter_encodes, kv_test_filter_decodes;

static size_t counting_filter(unsigned int flags, size_t cd_nelmts, const unsigned int cd_values[], size_t nbytes,
                              size_t *buf_size, void **buf)
{
    if (flags & H5Z_FLAG_REVERSE)
        kv_test_filter_decodes++;
    else
        kv_test_filter_encodes++;
    return kv_zstd_filter_class.filter(flags, cd_nelmts, cd_values, nbytes, buf_size, buf);
}

void kv_test_count_filter(int on)
{
    ck_assert_int_eq(kv_trace_init(), KV_OK);
    H5Z_class2_t c = kv_zstd_filter_class;
    c.filter = counting_filter;
    /* registering an id that is already registered replaces its class */
    ck_assert(H5Zregister(on ? &c : &kv_zstd_filter_class) >= 0);
    kv_test_filter_encodes = kv_test_filter_decodes = 0;
}
