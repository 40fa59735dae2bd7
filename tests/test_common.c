/* test_common.c: parameter specs, RNG determinism, error messages. */
#include "sim/common/kv_common.h"
#include "sim/common/kv_params.h"
#include "sim/common/kv_rng.h"
#include "tests/kv_test.h"

#include <math.h>
#include <string.h>

static const kv_param_def_t defs[] = {
    {"window", KV_PARAM_INT, "32", 1, 4096, NULL, "observation window"},
    {"pool", KV_PARAM_ENUM, "max", 0, -1, "max|avg|none", "pooling"},
    {"alpha", KV_PARAM_FLOAT, "0.2", 0, 1, NULL, "safeguard"},
    {"sum", KV_PARAM_BOOL, "false", 0, -1, NULL, "sum instead of mean"},
    {"inner", KV_PARAM_STRING, "snapkv", 0, -1, NULL, "inner scorer"},
};

START_TEST(split_respects_nesting)
{
    char **items;
    int n;
    ck_assert_int_eq(kv_spec_split(" a, b(x=1,y=2) ,adakv(inner=snapkv(window=8,pool=avg)),", &items, &n), KV_OK);
    ck_assert_int_eq(n, 3);
    ck_assert_str_eq(items[0], "a");
    ck_assert_str_eq(items[1], "b(x=1,y=2)");
    ck_assert_str_eq(items[2], "adakv(inner=snapkv(window=8,pool=avg))");
    kv_free(items);
    ck_assert_int_ne(kv_spec_split("a(b", &items, &n), KV_OK);
    ck_assert_int_ne(kv_spec_split("a)b(", &items, &n), KV_OK);
}
END_TEST

START_TEST(parse_resolve_label_round_trip)
{
    char name[64], label[512], name2[64], label2[512];
    kv_params_t raw, res, raw2, res2;
    ck_assert_int_eq(kv_spec_parse("snapkv(pool=avg, window=8, inner=adakv(inner=x,y=2))", name, sizeof name, &raw),
                     KV_OK);
    ck_assert_str_eq(name, "snapkv");
    ck_assert_int_eq(raw.n, 3);
    ck_assert_str_eq(raw.val[2], "adakv(inner=x,y=2)");
    ck_assert_int_eq(kv_params_resolve(defs, 5, &raw, &res, "policy snapkv"), KV_OK);
    ck_assert_int_eq(kv_params_int(&res, "window"), 8);
    ck_assert_str_eq(kv_params_str(&res, "pool"), "avg");
    ck_assert(fabs(kv_params_float(&res, "alpha") - 0.2) < 1e-12);
    ck_assert_int_eq(kv_params_bool(&res, "sum"), 0);
    ck_assert_int_eq(kv_params_label(name, &res, label, sizeof label), KV_OK);
    ck_assert_str_eq(label, "snapkv(window=8,pool=avg,alpha=0.2,sum=0,inner=adakv(inner=x,y=2))");
    /* the label parses back to the same configuration */
    ck_assert_int_eq(kv_spec_parse(label, name2, sizeof name2, &raw2), KV_OK);
    ck_assert_int_eq(kv_params_resolve(defs, 5, &raw2, &res2, "policy snapkv"), KV_OK);
    ck_assert_int_eq(kv_params_label(name2, &res2, label2, sizeof label2), KV_OK);
    ck_assert_str_eq(label, label2);
}
END_TEST

START_TEST(bad_parameters_are_named)
{
    char name[64];
    kv_params_t raw, res;
    ck_assert_int_eq(kv_spec_parse("snapkv(windw=8)", name, sizeof name, &raw), KV_OK);
    ck_assert_int_eq(kv_params_resolve(defs, 5, &raw, &res, "policy snapkv"), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "windw"));
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "window, pool, alpha, sum, inner"));
    ck_assert_int_eq(kv_spec_parse("snapkv(window=0)", name, sizeof name, &raw), KV_OK);
    ck_assert_int_eq(kv_params_resolve(defs, 5, &raw, &res, "p"), KV_ERANGE);
    ck_assert_int_eq(kv_spec_parse("snapkv(window=1.5)", name, sizeof name, &raw), KV_OK);
    ck_assert_int_eq(kv_params_resolve(defs, 5, &raw, &res, "p"), KV_EINVAL);
    ck_assert_int_eq(kv_spec_parse("snapkv(pool=median)", name, sizeof name, &raw), KV_OK);
    ck_assert_int_eq(kv_params_resolve(defs, 5, &raw, &res, "p"), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "max|avg|none"));
    ck_assert_int_ne(kv_spec_parse("snapkv(window)", name, sizeof name, &raw), KV_OK);
    ck_assert_int_ne(kv_spec_parse("snapkv(window=1,window=2)", name, sizeof name, &raw), KV_OK);
    ck_assert_int_ne(kv_spec_parse("snap kv", name, sizeof name, &raw), KV_OK);
}
END_TEST

START_TEST(rng_is_deterministic_and_uniform)
{
    kv_rng_t a, b;
    kv_rng_seed(&a, 42);
    kv_rng_seed(&b, 42);
    for (int i = 0; i < 100; i++)
        ck_assert_uint_eq(kv_rng_u64(&a), kv_rng_u64(&b));
    kv_rng_seed_task(&a, 1, 2, 3, 4);
    kv_rng_seed_task(&b, 1, 3, 2, 4);
    ck_assert_uint_ne(kv_rng_u64(&a), kv_rng_u64(&b));
    /* mean of 1e5 uniforms within 5 standard errors (0.0046) of 0.5; normals: mean 0, variance 1 */
    double s = 0, m = 0, v = 0;
    kv_rng_seed(&a, 7);
    for (int i = 0; i < 100000; i++)
        s += kv_rng_uniform(&a);
    ck_assert(fabs(s / 100000 - 0.5) < 0.0046);
    for (int i = 0; i < 100000; i++) {
        double x = kv_rng_normal(&a);
        m += x;
        v += x * x;
    }
    ck_assert(fabs(m / 100000) < 0.016);
    ck_assert(fabs(v / 100000 - 1) < 0.03);
    int counts[5] = {0};
    for (int i = 0; i < 50000; i++)
        counts[kv_rng_below(&a, 5)]++;
    for (int i = 0; i < 5; i++)
        ck_assert(counts[i] > 9500 && counts[i] < 10500);
}
END_TEST

START_TEST(error_context_chains)
{
    kv_error(KV_EIO, "inner %d", 3);
    kv_error_context(KV_EIO, "outer");
    ck_assert_str_eq(kv_last_error(), "outer: inner 3");
}
END_TEST

Suite *suite_common(void)
{
    Suite *s = suite_create("common");
    TCase *tc = tcase_create("params");
    tcase_add_test(tc, split_respects_nesting);
    tcase_add_test(tc, parse_resolve_label_round_trip);
    tcase_add_test(tc, bad_parameters_are_named);
    tcase_add_test(tc, rng_is_deterministic_and_uniform);
    tcase_add_test(tc, error_context_chains);
    suite_add_tcase(s, tc);
    return s;
}
