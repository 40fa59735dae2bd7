/*
 * test_policy_contract.c: invariants every registered policy must satisfy, checked by looping over
 * the registry (a new policy is covered the moment it is registered), at both granularities:
 *   - the label round-trips through the parser;
 *   - the budget is respected in its scope (per head; per layer for head-adaptive policies; per
 *     sequence for cross-layer ones; PyramidKV's documented overshoot within 6 %), plus the slack the
 *     policy's descriptor declares (budget_slack: a reference whose schedule overshoots by design);
 *   - protected tokens (sinks, window) are kept;
 *   - the same inputs give the same results, whatever the thread count;
 *   - a budget of the whole sequence gives recall 1 and error 0;
 *   - recall never decreases with the budget for nested policies;
 *   - the exact output error never exceeds the Ada-KV bound (no violations).
 * Every policy runs with its defaults, every declared variant and every preset.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "tests/kv_test.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>

enum { L = 3, H = 4, HKV = 2, D = 16, T = 72, NP = 64, NSEG = 4 };
static const char *BUDGETS = "8,16,32,72"; /* 72 >= T: nothing to evict for any policy */

static kv_trace_t *g_trace;
static kv_backend_t *g_be;

static void setup(void)
{
    g_trace = kv_test_trace(L, H, HKV, D, T, NP, NSEG, 1, 1234);
    ck_assert_ptr_nonnull(g_trace);
    ck_assert_int_eq(kv_backend_cpu_open(2, &g_be), KV_OK);
}

static void teardown(void)
{
    kv_trace_close(g_trace);
    kv_backend_close(g_be);
}

static kv_results_t *run(kv_policy_t *p, int threads)
{
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list(BUDGETS, &b, &nb), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    o.seed = 7;
    omp_set_num_threads(threads);
    kv_results_t *r = NULL;
    int rc = kv_replay(g_trace, &p, 1, b, nb, g_be, &o, &r);
    ck_assert_msg(rc == KV_OK, "%s: %s", p->label, kv_last_error());
    omp_set_num_threads(2);
    kv_free(b);
    return r;
}

static const kv_result_row_t *find(const kv_results_t *r, int budget, int layer, int head)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->rows[i].budget == budget && r->rows[i].layer == layer && r->rows[i].head == head)
            return &r->rows[i];
    return NULL;
}

static void check_policy(const char *spec)
{
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s: %s", spec, kv_last_error());
    const unsigned f = p->flags;

    /* label round trip */
    kv_policy_t *p2;
    ck_assert_msg(kv_policy_create(p->label, &p2) == KV_OK, "%s: %s", p->label, kv_last_error());
    ck_assert_str_eq(p2->label, p->label);
    kv_policy_free(p2);

    kv_results_t *r1 = run(p, 1);
    kv_policy_free(p);
    ck_assert_int_eq(kv_policy_create(spec, &p), KV_OK);
    kv_results_t *r2 = run(p, 2);

    /* determinism, whatever the thread count */
    ck_assert_uint_eq(r1->n, r2->n);
    for (size_t i = 0; i < r1->n; i++) {
        const kv_result_row_t *a = &r1->rows[i], *b = &r2->rows[i];
        ck_assert_msg(a->recall_mean == b->recall_mean && a->err_mean == b->err_mean && a->kept == b->kept &&
                          a->mem_bytes == b->mem_bytes && a->recall_min == b->recall_min,
                      "%s: row %zu differs between 1 and 2 threads", p->label, i);
    }

    const int G = H / HKV, S = p->gran == KV_GRAN_KV ? HKV : H;
    const int budgets[] = {8, 16, 32, 72};
    for (int bi = 0; bi < 4; bi++) {
        const int B = budgets[bi], slack = kv_policy_budget_slack(p, NP, B);
        double seq_total = 0;
        for (int l = 0; l < L; l++) {
            const kv_result_row_t *lr = find(r1, bi, l, KV_ALL);
            ck_assert_ptr_nonnull(lr);
            /* error within the bound for every query */
            ck_assert_msg(lr->violations == 0, "%s B=%d layer %d: %ld bound violations", p->label, B, l,
                          lr->violations);
            ck_assert_msg(lr->bound_gap_min >= -1e-5, "%s: bound gap %g", p->label, lr->bound_gap_min);
            double layer_total = 0;
            for (int h = 0; h < H; h++) {
                const kv_result_row_t *hr = find(r1, bi, l, h);
                ck_assert_ptr_nonnull(hr);
                ck_assert(hr->recall_min >= 0 && hr->recall_mean <= 1 + 1e-6);
                /* context tokens held by this head's storage; per-head scope unless flagged */
                double held = (f & KV_POL_DECODE) ? hr->cache_peak : hr->kept;
                if (!(f & (KV_POL_BUDGET_LAYER | KV_POL_BUDGET_SEQUENCE | KV_POL_OVER_BUDGET | KV_POL_NO_EVICT)))
                    ck_assert_msg(held <= B + slack + 1e-9, "%s B=%d layer %d head %d holds %g tokens", p->label, B, l,
                                  h, held);
                layer_total += held / (p->gran == KV_GRAN_KV ? G : 1);
            }
            if (f & KV_POL_BUDGET_LAYER)
                ck_assert_msg(layer_total <= (double)S * (B + slack) + S, "%s B=%d layer %d holds %g > %d", p->label, B,
                              l, layer_total, S * B);
            seq_total += layer_total;
        }
        if (f & KV_POL_BUDGET_SEQUENCE)
            ck_assert_msg(seq_total <= (double)L * S * (B + slack) + 16.0 * L * S, "%s B=%d holds %g", p->label, B,
                          seq_total);
        if (f & KV_POL_OVER_BUDGET)
            ck_assert_msg(seq_total <= 1.06 * L * S * (B + slack) + L * S, "%s B=%d holds %g", p->label, B, seq_total);

        const kv_result_row_t *all = find(r1, bi, KV_ALL, KV_ALL);
        ck_assert_ptr_nonnull(all);
        if (B >= T && !(f & KV_POL_BUDGET_FREE)) {
            /* nothing to evict: recall 1 (float sums of probabilities: 1e-5) and error 0 (1e-4 of C) */
            ck_assert_msg(all->recall_min >= 1 - 1e-5, "%s full budget: recall_min %g", p->label, all->recall_min);
            ck_assert_msg(all->err_max <= 1e-4 * D, "%s full budget: err_max %g", p->label, all->err_max);
        }
        if ((f & KV_POL_NESTED) && bi > 0) {
            for (int l = 0; l < L; l++)
                for (int h = 0; h < H; h++) {
                    const kv_result_row_t *a = find(r1, bi - 1, l, h), *b = find(r1, bi, l, h);
                    /* each query's kept set grows, so its recall cannot fall (float slack 1e-6) */
                    ck_assert_msg(b->recall_min >= a->recall_min - 1e-6 && b->recall_mean >= a->recall_mean - 1e-6,
                                  "%s: recall fell from B=%d to B=%d at layer %d head %d (%g -> %g)", p->label,
                                  budgets[bi - 1], B, l, h, a->recall_mean, b->recall_mean);
                }
        }
    }

    /* protected tokens are kept (probe the cache at a budget that fits them) */
    if (!(f & KV_POL_CROSS_LAYER)) {
        kv_budget_t bud;
        memset(&bud, 0, sizeof bud);
        bud.kind = KV_BUDGET_TOKENS;
        bud.value = 32;
        uint8_t *mask = kv_calloc((size_t)S * T, 1, "mask");
        ck_assert_int_eq(kv_replay_probe(g_trace, L - 1, p, &bud, 0, NULL, g_be, mask), KV_OK);
        int pf = p->protect_first, pl = p->protect_last;
        if (pf + pl <= 32)
            for (int s = 0; s < S; s++) {
                for (int j = 0; j < pf; j++)
                    ck_assert_msg(mask[(size_t)s * T + j], "%s: sink %d evicted", p->label, j);
                for (int j = NP - pl; j < NP; j++)
                    ck_assert_msg(mask[(size_t)s * T + j], "%s: window token %d evicted", p->label, j);
            }
        kv_free(mask);
    }
    kv_results_free(r1);
    kv_results_free(r2);
    kv_policy_free(p);
}

/* The defaults, every variant the policy declares and every preset, at one granularity. */
static void check_all_variants(const kv_policy_desc_t *d, const char *gran)
{
    char spec[512];
    snprintf(spec, sizeof spec, "%s(gran=%s)", d->name, gran);
    check_policy(spec);
    for (int i = 0; i < d->n_presets; i++) {
        snprintf(spec, sizeof spec, "%s@%s(gran=%s)", d->name, d->presets[i].name, gran);
        check_policy(spec);
    }
    const char *v = d->variants;
    while (v && *v) {
        const char *semi = strchr(v, ';');
        int len = semi ? (int)(semi - v) : (int)strlen(v);
        snprintf(spec, sizeof spec, "%s(%.*s,gran=%s)", d->name, len, v, gran);
        check_policy(spec);
        v = semi ? semi + 1 : NULL;
    }
}

START_TEST(every_policy_kv_granularity)
{
    check_all_variants(kv_policy_desc_at(_i), "kv");
}
END_TEST

START_TEST(every_policy_query_granularity)
{
    check_all_variants(kv_policy_desc_at(_i), "query");
}
END_TEST

/* A policy object replayed on one trace and then on a larger one (more tokens, more heads) gives
 * the same results as a fresh object: per-layer buffers must follow the trace's shape. */
START_TEST(policies_are_reusable_across_traces)
{
    const kv_policy_desc_t *d = kv_policy_desc_at(_i);
    kv_trace_t *small = kv_test_trace(2, 2, 1, 8, 40, 32, 4, 1, 5);
    kv_trace_t *big = kv_test_trace(2, 8, 4, 16, 150, 128, 4, 1, 6);
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list("8,24", &b, &nb), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_policy_t *reused, *fresh;
    ck_assert_int_eq(kv_policy_create(d->name, &reused), KV_OK);
    ck_assert_int_eq(kv_policy_create(d->name, &fresh), KV_OK);
    kv_results_t *r0, *r1, *r2;
    ck_assert_msg(kv_replay(small, &reused, 1, b, nb, g_be, &o, &r0) == KV_OK, "%s", kv_last_error());
    ck_assert_msg(kv_replay(big, &reused, 1, b, nb, g_be, &o, &r1) == KV_OK, "%s", kv_last_error());
    ck_assert_msg(kv_replay(big, &fresh, 1, b, nb, g_be, &o, &r2) == KV_OK, "%s", kv_last_error());
    ck_assert_uint_eq(r1->n, r2->n);
    for (size_t i = 0; i < r1->n; i++)
        ck_assert_msg(r1->rows[i].recall_mean == r2->rows[i].recall_mean && r1->rows[i].kept == r2->rows[i].kept,
                      "%s: row %zu differs after reuse", d->name, i);
    kv_results_free(r0);
    kv_results_free(r1);
    kv_results_free(r2);
    kv_policy_free(reused);
    kv_policy_free(fresh);
    kv_free(b);
    kv_trace_close(small);
    kv_trace_close(big);
}
END_TEST

START_TEST(registry_is_consistent)
{
    ck_assert_int_gt(kv_policy_count(), 0);
    for (int i = 0; i < kv_policy_count(); i++) {
        const kv_policy_desc_t *d = kv_policy_desc_at(i);
        ck_assert_ptr_eq(kv_policy_find(d->name), d);
        ck_assert_msg(d->doc && d->doc[0] && d->paper && d->paper[0], "%s: doc and paper required", d->name);
        ck_assert_msg((d->flags & (KV_POL_ONESHOT | KV_POL_DECODE | KV_POL_PER_QUERY)) != 0, "%s: no kind", d->name);
        ck_assert_msg(d->code && d->code[0], "%s: reference code required (\"-\" for none)", d->name);
        for (int k = 0; k < d->n_presets; k++) { /* every preset configures, and its label round-trips */
            char spec[160];
            snprintf(spec, sizeof spec, "%s@%s", d->name, d->presets[k].name);
            kv_policy_t *a, *b;
            ck_assert_msg(kv_policy_create(spec, &a) == KV_OK, "%s: %s", spec, kv_last_error());
            ck_assert_msg(kv_policy_create(a->label, &b) == KV_OK, "%s: %s", a->label, kv_last_error());
            ck_assert_str_eq(a->label, b->label);
            ck_assert_ptr_null(strchr(a->label, '@'));
            kv_policy_free(a);
            kv_policy_free(b);
        }
        for (int j = 0; j < i; j++)
            ck_assert_str_ne(kv_policy_desc_at(j)->name, d->name);
    }
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("no_such_policy", &p), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "valid:"));
    ck_assert_int_eq(kv_policy_create("full(nope=1)", &p), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "gran"));
}
END_TEST

Suite *suite_policy_contract(void)
{
    Suite *s = suite_create("policy_contract");
    TCase *tc = tcase_create("contract");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_add_test(tc, registry_is_consistent);
    tcase_add_loop_test(tc, every_policy_kv_granularity, 0, kv_policy_count());
    tcase_add_loop_test(tc, policies_are_reusable_across_traces, 0, kv_policy_count());
    tcase_add_loop_test(tc, every_policy_query_granularity, 0, kv_policy_count());
    suite_add_tcase(s, tc);
    return s;
}
