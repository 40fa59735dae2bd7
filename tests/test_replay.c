/*
 * test_replay.c: the replay engine. Metrics against a brute-force double-precision recomputation;
 * budgets; results files; hand-computed kept sets of the basic policies (full, oracle,
 * streaming_llm, knorm, random) on tiny traces; layer prefetch (the same bytes with and without
 * it, failures in the reader or the engine stop both); CLI error handling.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "sim/kept.h"
#include "sim/kv_policy.h"
#include "sim/metrics.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "tests/kv_test.h"

#include <hdf5.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---------------------------------------------------------------- metrics vs brute force */

START_TEST(metrics_match_brute_force)
{
    enum { H = 4, HKV = 2, D = 8, T = 40, NP = 32 };
    kv_trace_t *t = kv_test_trace(1, H, HKV, D, T, NP, 0, 1, 99);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(2, &be), KV_OK);
    kv_layer_t lay = {0};
    ck_assert_int_eq(kv_trace_read_layer(t, 0, &lay), KV_OK);
    const int E = T - NP;
    float *p_eval = kv_malloc(sizeof(float) * H * E * T, "t");
    kv_qk_args_t a = {lay.q + (size_t)NP * D, (size_t)T * D, lay.k, (size_t)T * D, H, HKV, D, E, NP, T, 1,
                      1.0f / sqrtf(D)};
    ck_assert_int_eq(be->ops->attn_probs(be, &a, p_eval, NULL), KV_OK);
    float *wo = kv_malloc(sizeof(float) * (size_t)H * D * H * D, "t");
    ck_assert_int_eq(kv_trace_read(t, 0, KV_T_WO, wo), KV_OK);
    kv_layer_ctx_t c = {.meta = kv_trace_meta(t),
                        .layer = 0,
                        .n_layers = 1,
                        .H = H,
                        .Hkv = HKV,
                        .G = H / HKV,
                        .d = D,
                        .T = T,
                        .n_ctx = NP,
                        .n_eval = E,
                        .q = lay.q,
                        .k = lay.k,
                        .v = lay.v,
                        .wo = wo,
                        .p_eval = p_eval,
                        .be = be};
    kv_metrics_layer_t ml;
    ck_assert_int_eq(kv_metrics_layer_init(&ml, &c), KV_OK);
    /* a mask that keeps every third context token of KV head 0 (and tokens 0..2) */
    uint8_t mask[T];
    for (int j = 0; j < T; j++)
        mask[j] = (j < NP) && (j % 3 == 0 || j < 3);
    float rec[2 * E], err[2 * E], bnd[2 * E], ev[2 * E * D];
    ck_assert_int_eq(kv_metrics_oneshot(&ml, 0, 2, mask, rec, err, bnd, ev), KV_OK);
    double C = 0;
    for (int j = 0; j < T; j++) {
        double s = 0;
        for (int x = 0; x < D; x++)
            s += fabs(lay.v[j * D + x]);
        C = s > C ? s : C;
    }
    for (int h = 0; h < 2; h++)
        for (int e = 0; e < E; e++) {
            const int i = NP + e;
            double sc[T], mx = -1e300, z = 0;
            for (int j = 0; j <= i; j++) {
                double s = 0;
                for (int x = 0; x < D; x++)
                    s += (double)lay.q[((size_t)h * T + i) * D + x] * lay.k[(size_t)j * D + x];
                sc[j] = s / sqrt(D);
                mx = sc[j] > mx ? sc[j] : mx;
            }
            for (int j = 0; j <= i; j++)
                z += exp(sc[j] - mx);
            double F = 0, o[D] = {0}, os[D] = {0};
            for (int j = 0; j <= i; j++) {
                double p = exp(sc[j] - mx) / z;
                int kept = mask[j] || j >= NP;
                F += kept ? p : 0;
                for (int x = 0; x < D; x++) {
                    o[x] += p * lay.v[j * D + x];
                    if (kept)
                        os[x] += p * lay.v[j * D + x];
                }
            }
            double E1 = 0;
            for (int x = 0; x < D; x++)
                E1 += fabs(o[x] - os[x] / F);
            /* float32 softmax and sums over <= 40 terms: 1e-5 relative is ~100 ulps of slack */
            kv_assert_close(rec[h * E + e], F, 1e-6, 1e-5, "recall");
            kv_assert_close(err[h * E + e], E1, 1e-6, 1e-4, "error");
            kv_assert_close(bnd[h * E + e], 2 * (1 - F) * C, 1e-6, 1e-4, "bound");
            ck_assert(err[h * E + e] <= bnd[h * E + e]);
            /* the per-query path gives the same numbers */
            float r2, e2, b2, attn[T];
            kv_metrics_query(&ml, h, e, mask, 1, &r2, &e2, &b2, NULL, attn);
            kv_assert_close(r2, F, 1e-6, 1e-5, "recall (per query)");
            kv_assert_close(e2, E1, 1e-6, 1e-4, "error (per query)");
            double sa = 0;
            for (int j = 0; j < T; j++)
                sa += attn[j];
            kv_assert_close(sa, 1.0, 1e-5, 0, "renormalised attention sums to 1");
        }
    /* a scratch reused across calls (growing, shrinking, contiguous runs that skip the gather) gives
     * the same bits as a fresh one per call */
    {
        kv_metrics_scratch_t ws = {0};
        for (int v = 0; v < 4; v++) {
            uint8_t mk[T];
            for (int j = 0; j < T; j++)
                mk[j] = v == 0 ? mask[j] : v == 1 ? j >= 5 : v == 2 ? (j >= 10 && j < 14) : (j % 2 == 0);
            for (int e = 0; e < E; e++)
                for (int app = 0; app < 2; app++) {
                    float r1[2], e1[2], b1[2], v1[2 * D], a1[2 * T], r2[2], e2[2], b2[2], v2[2 * D], a2[2 * T];
                    ck_assert_int_eq(kv_metrics_query_group(&ml, 0, 2, e, mk, app, r1, e1, b1, v1, a1, NULL), KV_OK);
                    ck_assert_int_eq(kv_metrics_query_group(&ml, 0, 2, e, mk, app, r2, e2, b2, v2, a2, &ws), KV_OK);
                    ck_assert(!memcmp(r1, r2, sizeof r1) && !memcmp(e1, e2, sizeof e1) && !memcmp(b1, b2, sizeof b1));
                    ck_assert(!memcmp(v1, v2, sizeof v1) && !memcmp(a1, a2, sizeof a1));
                }
        }
        kv_metrics_scratch_free(&ws);
    }
    /* model-space error: ||sum_h W_O^h (o_h - o_hat_h)||_1 over all four heads */
    uint8_t mask_all[T];
    for (int j = 0; j < T; j++)
        mask_all[j] = mask[j];
    float recs[H * E], errs[H * E], bnds[H * E], evs[H * E * D];
    ck_assert_int_eq(kv_metrics_oneshot(&ml, 0, 2, mask_all, recs, errs, bnds, evs), KV_OK);
    ck_assert_int_eq(kv_metrics_oneshot(&ml, 2, 2, mask_all, recs + 2 * E, errs + 2 * E, bnds + 2 * E, evs + 2 * E * D),
                     KV_OK);
    float eq[H * D], fq[H], we, wb;
    for (int h = 0; h < H; h++) {
        memcpy(eq + h * D, evs + ((size_t)h * E + 0) * D, sizeof(float) * D);
        fq[h] = recs[h * E + 0];
    }
    kv_metrics_wo(&ml, eq, fq, &we, &wb);
    double y = 0;
    for (int r = 0; r < H * D; r++) {
        double s = 0;
        for (int k = 0; k < H * D; k++)
            s += (double)wo[(size_t)r * H * D + k] * eq[k];
        y += fabs(s);
    }
    kv_assert_close(we, y, 1e-6, 1e-5, "model-space error");
    ck_assert(we <= wb);
    kv_metrics_layer_free(&ml);
    kv_free(p_eval);
    kv_free(wo);
    kv_layer_free(&lay);
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- selection primitives */

START_TEST(argsort_and_topk_agree_with_the_tie_break)
{
    enum { N = 300 };
    float key[N];
    int idx[N];
    uint8_t mask[N];
    kv_rng_t r;
    kv_rng_seed(&r, 11);
    for (int trial = 0; trial < 50; trial++) {
        for (int i = 0; i < N; i++) {
            /* few distinct values (many ties), negatives, zeros of both signs, a NaN, infinities */
            key[i] = (float)((int)kv_rng_below(&r, 7) - 3) * 0.5f;
            if (i % 37 == 5)
                key[i] = -0.0f;
        }
        key[kv_rng_below(&r, N)] = NAN;
        key[kv_rng_below(&r, N)] = INFINITY;
        key[kv_rng_below(&r, N)] = -INFINITY;
        kv_argsort_desc(key, N, idx);
        for (int a = 1; a < N; a++) {
            float x = key[idx[a - 1]], y = key[idx[a]];
            ck_assert_msg(isnan(y) || x > y || (x == y && idx[a - 1] > idx[a]) ||
                              (x == 0 && y == 0 && idx[a - 1] > idx[a]),
                          "order broken at %d: %g@%d then %g@%d", a, x, idx[a - 1], y, idx[a]);
            ck_assert(!isnan(x) || isnan(y));
        }
        int k = (int)kv_rng_below(&r, N + 1);
        kv_topk_mask(key, N, k, mask);
        for (int a = 0; a < N; a++)
            ck_assert_msg(mask[idx[a]] == (a < k), "top-%d mask disagrees with the sort at rank %d", k, a);
    }
}
END_TEST

/* ---------------------------------------------------------------- budgets */

START_TEST(budget_lists)
{
    kv_budget_t *b;
    int n;
    ck_assert_int_eq(kv_budget_parse_list("128, 0.25,10%,seq:6000,1.0", &b, &n), KV_OK);
    ck_assert_int_eq(n, 5);
    ck_assert_int_eq(b[0].kind, KV_BUDGET_TOKENS);
    ck_assert_int_eq(b[1].kind, KV_BUDGET_FRACTION);
    ck_assert_int_eq(b[2].kind, KV_BUDGET_FRACTION);
    ck_assert_int_eq(b[3].kind, KV_BUDGET_SEQUENCE);
    ck_assert_int_eq(b[4].kind, KV_BUDGET_FRACTION);
    kv_trace_meta_t m = {.n_layers = 10, .n_kv_heads = 3};
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(kv_budget_resolve(&b[i], &m, 1000), KV_OK);
    ck_assert_int_eq(b[0].tokens, 128);
    ck_assert_int_eq(b[0].total, 128 * 30);
    ck_assert_int_eq(b[1].tokens, 250);
    ck_assert_int_eq(b[2].tokens, 100);
    ck_assert_int_eq(b[3].tokens, 200);
    ck_assert_int_eq(b[3].total, 6000);
    ck_assert_int_eq(b[4].tokens, 1000);
    kv_free(b);
    const char *bad[] = {"0", "-5", "1.5", "abc", "120%", "seq:0", "seq:x", "64,64", "", "3e20"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        ck_assert_msg(kv_budget_parse_list(bad[i], &b, &n) != KV_OK, "'%s' accepted", bad[i]);
    ck_assert_int_eq(kv_budget_parse_list("seq:5", &b, &n), KV_OK);
    ck_assert_int_ne(kv_budget_resolve(&b[0], &m, 1000), KV_OK); /* less than a token per head */
    kv_free(b);
}
END_TEST

/* ---------------------------------------------------------------- hand-computed kept sets */

/* 1 layer, 2 query heads sharing 1 KV head... or 2 KV heads; 12 context tokens + 2 decode tokens.
 * Keys lie on the first axis with the given lengths, queries on it too, so q.k = q0 * len. */
static kv_trace_t *line_trace(int H, int Hkv, const float *klen, const float *qdir)
{
    enum { D = 4, T = 14, NP = 12 };
    kv_trace_meta_t m = {.n_layers = 1, .n_heads = H, .n_kv_heads = Hkv, .head_dim = D, .n_tokens = T, .n_prompt = NP};
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    float *q = kv_trace_mem_tensor(t, 0, KV_T_Q), *k = kv_trace_mem_tensor(t, 0, KV_T_K);
    float *v = kv_trace_mem_tensor(t, 0, KV_T_V);
    for (int g = 0; g < Hkv; g++)
        for (int j = 0; j < T; j++) {
            k[((size_t)g * T + j) * D] = klen[j];
            v[((size_t)g * T + j) * D + (j % D)] = 1.0f;
        }
    for (int h = 0; h < H; h++)
        for (int i = 0; i < T; i++)
            q[((size_t)h * T + i) * D] = qdir[h];
    return t;
}

static void probe(kv_trace_t *t, const char *spec, int B, int e, int n_store, uint8_t *mask)
{
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s", kv_last_error());
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = B};
    memset(mask, 0, (size_t)n_store * 14);
    ck_assert_msg(kv_replay_probe(t, 0, p, &b, e, NULL, be, mask) == KV_OK, "%s", kv_last_error());
    kv_backend_close(be);
    kv_policy_free(p);
}

static void expect_set(const uint8_t *mask, const int *want, int n_want, int upto, const char *what)
{
    uint8_t w[64] = {0};
    for (int i = 0; i < n_want; i++)
        w[want[i]] = 1;
    for (int j = 0; j < upto; j++)
        ck_assert_msg(mask[j] == w[j], "%s: token %d %s", what, j, mask[j] ? "kept, expected evicted" : "evicted");
}

START_TEST(hand_streaming_llm)
{
    const float klen[14] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1}, qd[2] = {1, 1};
    kv_trace_t *t = line_trace(2, 2, klen, qd);
    uint8_t mask[2 * 14];
    /* one-shot, 2 sinks, B = 5: sinks 0, 1 and the 3 most recent context tokens */
    probe(t, "streaming_llm(sinks=2)", 5, 0, 2, mask);
    const int want1[] = {0, 1, 9, 10, 11};
    expect_set(mask, want1, 5, 12, "oneshot head 0");
    expect_set(mask + 14, want1, 5, 12, "oneshot head 1");
    /* rolling cache read by the second decode query (token 13): sinks + 3 tokens ending at 13 */
    probe(t, "streaming_llm(sinks=2,mode=decode)", 5, 1, 2, mask);
    const int want2[] = {0, 1, 11, 12, 13};
    expect_set(mask, want2, 5, 14, "decode");
    /* budget below the sinks keeps the first B tokens */
    probe(t, "streaming_llm(sinks=4)", 3, 0, 2, mask);
    const int want3[] = {0, 1, 2};
    expect_set(mask, want3, 3, 12, "budget below the sinks");
    kv_trace_close(t);
}
END_TEST

START_TEST(hand_knorm_and_full)
{
    /* key lengths: the 4 smallest (0.1, 0.2, 0.3, 0.4) sit at tokens 7, 2, 10, 4 */
    const float klen[14] = {2.0f, 1.5f, 0.2f, 3.0f, 0.4f, 1.1f, 2.2f, 0.1f, 5.0f, 0.9f, 0.3f, 1.7f, 1, 1};
    const float qd[2] = {1, 1};
    kv_trace_t *t = line_trace(2, 1, klen, qd);
    uint8_t mask[2 * 14];
    probe(t, "knorm", 4, 0, 1, mask);
    const int want[] = {7, 2, 10, 4};
    expect_set(mask, want, 4, 12, "knorm B=4");
    probe(t, "full", 4, 0, 1, mask);
    for (int j = 0; j < 12; j++)
        ck_assert(mask[j]);
    kv_trace_close(t);
}
END_TEST

START_TEST(hand_oracle)
{
    /* q.k = qdir * klen: head 0 (qdir +2) prefers long keys, head 1 (qdir -2) short ones */
    const float klen[14] = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, -1.0f, -2.0f, -3.0f, -4.0f, 0.5f, -0.5f, 0, 0};
    const float qd[2] = {2, -2};
    kv_trace_t *t = line_trace(2, 2, klen, qd);
    uint8_t mask[2 * 14];
    probe(t, "oracle", 3, 0, 2, mask);
    const int h0[] = {5, 4, 3}, h1[] = {9, 8, 7};
    expect_set(mask, h0, 3, 12, "oracle head 0");
    expect_set(mask + 14, h1, 3, 12, "oracle head 1");
    kv_trace_close(t);
    /* one KV head for both: mean of the two heads' probabilities favours the extremes 5 and 9 */
    t = line_trace(2, 1, klen, qd);
    probe(t, "oracle", 2, 0, 1, mask);
    const int both[] = {5, 9};
    expect_set(mask, both, 2, 12, "oracle shared");
    kv_trace_close(t);
}
END_TEST

START_TEST(random_is_seeded_and_uniform)
{
    kv_trace_t *t = kv_test_trace(1, 2, 2, 8, 140, 128, 0, 0, 5);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = 32};
    kv_policy_t *p;
    uint8_t m1[2 * 140], m2[2 * 140], m3[2 * 140];
    ck_assert_int_eq(kv_policy_create("random(gran=query)", &p), KV_OK);
    ck_assert_int_eq(kv_replay_probe(t, 0, p, &b, 0, NULL, be, m1), KV_OK);
    ck_assert_int_eq(kv_replay_probe(t, 0, p, &b, 0, NULL, be, m2), KV_OK);
    kv_policy_free(p);
    ck_assert(memcmp(m1, m2, sizeof m1) == 0);
    ck_assert_int_eq(kv_policy_create("random(gran=query,seed=1)", &p), KV_OK);
    ck_assert_int_eq(kv_replay_probe(t, 0, p, &b, 0, NULL, be, m3), KV_OK);
    kv_policy_free(p);
    ck_assert(memcmp(m1, m3, sizeof m1) != 0);
    int n0 = 0, n1 = 0, first_half = 0;
    for (int j = 0; j < 128; j++) {
        n0 += m1[j];
        n1 += m1[140 + j];
        first_half += j < 64 && m1[j];
    }
    ck_assert_int_eq(n0, 32);
    ck_assert_int_eq(n1, 32);
    /* 32 of 128 drawn uniformly: the first half holds 16 +- 3.5 (sd); 4 sd bounds */
    ck_assert(first_half >= 2 && first_half <= 30);
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- results and the CLI */

START_TEST(results_tsv_round_trip)
{
    kv_trace_t *t = kv_test_trace(2, 4, 2, 8, 40, 32, 0, 1, 3);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(2, &be), KV_OK);
    kv_policy_t **ps;
    int np, nb;
    ck_assert_int_eq(kv_policy_create_list("full,streaming_llm(sinks=2),oracle", &ps, &np), KV_OK);
    kv_budget_t *b;
    ck_assert_int_eq(kv_budget_parse_list("8,0.5", &b, &nb), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_results_t *r;
    ck_assert_int_eq(kv_replay(t, ps, np, b, nb, be, &o, &r), KV_OK);
    /* rows: per (policy, budget): overall + 2 layers x (layer row + 4 heads) */
    ck_assert_uint_eq(r->n, (size_t)np * nb * (1 + 2 * 5));
    kv_results_add_prov(r, "trace", "memory");
    char path[256];
    kv_test_tmp("results.tsv", path, sizeof path);
    ck_assert_int_eq(kv_results_write_tsv(r, path), KV_OK);
    kv_table_t *tb;
    ck_assert_int_eq(kv_table_read(path, &tb), KV_OK);
    ck_assert_uint_eq(tb->n_rows, r->n);
    ck_assert_str_eq(kv_table_prov(tb, "trace"), "memory");
    int cp = kv_table_col(tb, "policy"), cr = kv_table_col(tb, "recall_mean"), cl = kv_table_col(tb, "layer");
    ck_assert(cp >= 0 && cr >= 0 && cl >= 0);
    for (size_t i = 0; i < r->n; i++) {
        ck_assert_str_eq(kv_table_get(tb, i, cp), r->labels[r->rows[i].policy]);
        /* the TSV keeps 9 significant digits */
        ck_assert(fabs(kv_table_num(tb, i, cr) - r->rows[i].recall_mean) <= 1e-8 * fabs(r->rows[i].recall_mean));
    }
    ck_assert_str_eq(kv_table_get(tb, 0, cl), "all");
    /* the full policy: recall 1 everywhere, memory = 2 layers x 2 KV heads x 40 tokens x 8 dims x K,V x f32 */
    ck_assert(fabs(r->rows[0].recall_min - 1) < 1e-6);
    ck_assert(r->rows[0].mem_bytes == 2.0 * 2 * 40 * 8 * 2 * 4);
    kv_table_free(tb);
    kv_test_tmp("results.json", path, sizeof path);
    ck_assert_int_eq(kv_results_write_json(r, path), KV_OK);
    ck_assert_int_ne(kv_results_write_tsv(r, "build/test-tmp/no/such/dir/x.tsv"), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "no/such/dir"));
    kv_results_free(r);
    for (int i = 0; i < np; i++)
        kv_policy_free(ps[i]);
    kv_free(ps);
    kv_free(b);
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

static int sh(const char *fmt, const char *a, const char *b)
{
    char cmd[2048];
    snprintf(cmd, sizeof cmd, fmt, getenv("KVSIM_BIN"), a, b);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

START_TEST(cli_errors_leave_no_results)
{
    char trace[256], out[256], nodec[256];
    kv_test_tmp("cli.h5", trace, sizeof trace);
    kv_test_tmp("cli.tsv", out, sizeof out);
    kv_test_tmp("nodecode.h5", nodec, sizeof nodec);
    kv_trace_t *t = kv_test_trace(2, 4, 2, 8, 40, 32, 0, 0, 3);
    ck_assert_int_eq(kv_test_write_trace(t, trace), KV_OK);
    kv_trace_close(t);
    t = kv_test_trace(1, 2, 1, 8, 20, 20, 0, 0, 3);
    ck_assert_int_eq(kv_test_write_trace(t, nodec), KV_OK);
    kv_trace_close(t);
    /* success */
    ck_assert_int_eq(sh("%s replay -q %s full,oracle 8 -o %s", trace, out), 0);
    ck_assert(access(out, F_OK) == 0);
    unlink(out);
    ck_assert_int_eq(sh("%s replay -q --prefetch off %s full,oracle 8 -o %s", trace, out), 0);
    ck_assert(access(out, F_OK) == 0);
    unlink(out);
    ck_assert_int_eq(sh("%s replay -q --prefetch on %s full,oracle 8 -o %s", trace, out), 0);
    ck_assert(access(out, F_OK) == 0);
    unlink(out);
    ck_assert_int_eq(sh("%s replay -q --prefetch maybe %s full 8 -o %s 2>/dev/null", trace, out), 2);
    /* unknown policy, unknown parameter, bad budget, no decode queries, missing segments, bad trace */
    ck_assert_int_ne(sh("%s replay -q %s nosuch 8 -o %s 2>/dev/null", trace, out), 0);
    ck_assert_int_ne(sh("%s replay -q %s 'oracle(x=1)' 8 -o %s 2>/dev/null", trace, out), 0);
    ck_assert_int_ne(sh("%s replay -q %s full 0 -o %s 2>/dev/null", trace, out), 0);
    ck_assert_int_ne(sh("%s replay -q %s full 8 -o %s 2>/dev/null", nodec, out), 0);
    ck_assert_int_ne(sh("%s replay -q %s full 8 -o %s 2>/dev/null", "build/test-tmp/none.h5", out), 0);
    ck_assert_msg(access(out, F_OK) != 0, "a failed replay left %s", out);
    /* the message names the problem */
    char cmd[1024], msg[1024] = "";
    snprintf(cmd, sizeof cmd, "%s replay -q %s nosuch 8 -o %s 2>&1", getenv("KVSIM_BIN"), trace, out);
    FILE *f = popen(cmd, "r");
    size_t n = fread(msg, 1, sizeof msg - 1, f);
    msg[n] = 0;
    pclose(f);
    ck_assert_ptr_nonnull(strstr(msg, "unknown policy 'nosuch'"));
    ck_assert_ptr_nonnull(strstr(msg, "streaming_llm"));
    ck_assert_int_eq(sh("%s replay --help >/dev/null%s%s", "", ""), 0);
    ck_assert_int_eq(sh("%s policies >/dev/null%s%s", "", ""), 0);
}
END_TEST

/* ---------------------------------------------------------------- layer prefetch */

/* Replay `pols` at budgets 8 and 0.5 on the trace at `path`, prefetch on or off; the results as TSV
 * into `out` (NULL: not written). Returns kv_replay's status. */
static int replay_file(const char *path, const char *pols, int prefetch, const char *out)
{
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(path, &t) == KV_OK, "%s", kv_last_error());
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(2, &be), KV_OK);
    kv_policy_t **ps;
    int np, nb;
    ck_assert_msg(kv_policy_create_list(pols, &ps, &np) == KV_OK, "%s", kv_last_error());
    kv_budget_t *b;
    ck_assert_int_eq(kv_budget_parse_list("8,0.5", &b, &nb), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    o.prefetch = prefetch;
    kv_replay_stats_t st;
    o.stats = &st;
    kv_results_t *r = NULL;
    int rc = kv_replay(t, ps, np, b, nb, be, &o, &r);
    if (rc == KV_OK) {
        const int cross = strstr(pols, "kvcompress") != NULL;
        ck_assert_int_eq(st.layers_read, (long)kv_trace_meta(t)->n_layers * (cross ? 2 : 1));
        ck_assert(st.t_read_wait <= st.t_read + 1e-3 || prefetch);
        ck_assert_int_eq(st.prefetched, prefetch);
        if (out) {
            kv_results_add_prov(r, "trace", path);
            ck_assert_int_eq(kv_results_write_tsv(r, out), KV_OK);
        }
    } else {
        ck_assert_ptr_null(r);
    }
    kv_results_free(r);
    for (int i = 0; i < np; i++)
        kv_policy_free(ps[i]);
    kv_free(ps);
    kv_free(b);
    kv_backend_close(be);
    kv_trace_close(t);
    return rc;
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = kv_malloc((size_t)n + 1, "test");
    ck_assert_uint_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

#define PREFETCH_POLICIES "full,streaming_llm(sinks=2),h2o,snapkv(window=4),kvcompress,chunkkv,quest,shotkv,random"

START_TEST(prefetch_gives_the_same_bytes)
{
    char path[256], a[256], b[256];
    kv_test_tmp("prefetch.h5", path, sizeof path);
    kv_test_tmp("prefetch-off.tsv", a, sizeof a);
    kv_test_tmp("prefetch-on.tsv", b, sizeof b);
    /* 5 layers (odd: the buffers alternate unevenly), W_O, segments (ShotKV), a cross-layer policy
     * (KV-Compress: the layers are read twice) */
    kv_trace_t *t = kv_test_trace(5, 4, 2, 8, 48, 40, 2, 1, 9);
    ck_assert_int_eq(kv_test_write_trace(t, path), KV_OK);
    kv_trace_close(t);
    for (int cross = 0; cross < 2; cross++) {
        const char *pols = cross ? PREFETCH_POLICIES : "full,streaming_llm(sinks=2),h2o,snapkv(window=4),quest";
        ck_assert_int_eq(replay_file(path, pols, 0, a), KV_OK);
        ck_assert_int_eq(replay_file(path, pols, 1, b), KV_OK);
        size_t na, nb;
        char *ba = slurp(a, &na), *bb = slurp(b, &nb);
        ck_assert_msg(na == nb && !memcmp(ba, bb, na), "%s: results differ with prefetch", pols);
        kv_free(ba);
        kv_free(bb);
    }
}
END_TEST

/* Everything after the zstd frame header of K's first chunk in `layer` set to 0xff (the reserved
 * block type: a decoding error whatever the zstd version). */
static void corrupt_k(const char *path, int layer)
{
    char name[64];
    snprintf(name, sizeof name, "/layers/%d/k", layer);
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t d = H5Dopen2(f, name, H5P_DEFAULT);
    ck_assert(d >= 0);
    hsize_t off[3] = {0, 0, 0}, size = 0;
    ck_assert(H5Dget_chunk_storage_size(d, off, &size) >= 0);
    unsigned char *raw = kv_malloc(size, "test");
    uint32_t mask = 0;
    ck_assert(H5Dread_chunk(d, H5P_DEFAULT, off, &mask, raw) >= 0);
    const unsigned fhd = raw[4], fcs = fhd >> 6, single = (fhd >> 5) & 1;
    static const size_t did_bytes[4] = {0, 1, 2, 4}, fcs_bytes[4] = {0, 2, 4, 8};
    size_t hdr = 5 + !single + did_bytes[fhd & 3] + (fcs == 0 ? single : fcs_bytes[fcs]);
    ck_assert(hdr + 3 < size);
    memset(raw + hdr, 0xff, size - hdr);
    ck_assert(H5Dwrite_chunk(d, H5P_DEFAULT, 0, off, size, raw) >= 0);
    kv_free(raw);
    H5Dclose(d);
    H5Fclose(f);
}

START_TEST(a_reader_failure_stops_the_replay_with_its_message)
{
    char path[256];
    kv_test_tmp("prefetch-bad.h5", path, sizeof path);
    kv_trace_t *t = kv_test_trace(5, 4, 2, 8, 48, 40, 0, 0, 9);
    ck_assert_int_eq(kv_test_write_trace(t, path), KV_OK);
    kv_trace_close(t);
    corrupt_k(path, 3);
    for (int prefetch = 0; prefetch < 2; prefetch++)
        for (int cross = 0; cross < 2; cross++) {
            kv_clear_error();
            ck_assert_int_ne(replay_file(path, cross ? "full,kvcompress" : "full,h2o", prefetch, NULL), KV_OK);
            ck_assert_msg(strstr(kv_last_error(), "layers/3/k") && strstr(kv_last_error(), path),
                          "prefetch %d: message '%s'", prefetch, kv_last_error());
        }
}
END_TEST

START_TEST(an_engine_failure_stops_the_reader)
{
    char path[256];
    kv_test_tmp("prefetch-engine.h5", path, sizeof path);
    kv_trace_t *t = kv_test_trace(6, 4, 2, 8, 48, 40, 0, 0, 9);
    ck_assert_int_eq(kv_test_write_trace(t, path), KV_OK);
    kv_trace_close(t);
    /* nine observation windows in one layer (the engine keeps eight) fail in layer 0, while the
     * reader is ahead */
    const char *pols = "snapkv(window=1),snapkv(window=2),snapkv(window=3),snapkv(window=4),snapkv(window=5),"
                       "snapkv(window=6),snapkv(window=7),snapkv(window=8),snapkv(window=9)";
    for (int prefetch = 0; prefetch < 2; prefetch++) {
        kv_clear_error();
        ck_assert_int_ne(replay_file(path, pols, prefetch, NULL), KV_OK);
        ck_assert_msg(strstr(kv_last_error(), "observation windows"), "prefetch %d: message '%s'", prefetch,
                      kv_last_error());
    }
}
END_TEST

/* replay --kept: the file holds exactly the kept sets the library computes (one-shot, decode-time and
 * W_O policies, token and kvpress-ratio budgets), and a folder that does not exist fails before any
 * work; kvsim policies lists the presets. */
START_TEST(cli_kept_sets)
{
    char trace[256], out[256], kept[256];
    kv_test_tmp("kept.h5", trace, sizeof trace);
    kv_test_tmp("kept.tsv", out, sizeof out);
    kv_test_tmp("kept-sets.h5", kept, sizeof kept);
    kv_trace_t *t = kv_test_trace(2, 4, 2, 8, 40, 32, 0, 1, 3);
    ck_assert_int_eq(kv_test_write_trace(t, trace), KV_OK);
    kv_trace_close(t);
    const char *pols = "snapkv@kvpress(window=4),tova,criticalkv(inner=snapkv(window=4))", *buds = "cr:0.5,8";
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "%%s replay -q %%s '%s' %s -o %%s --kept %s", pols, buds, kept);
    ck_assert_int_eq(sh(cmd, trace, out), 0);
    kv_kept_t *k = NULL, *ref = NULL;
    ck_assert_msg(kv_kept_read(kept, &k) == KV_OK, "%s", kv_last_error());
    kv_policy_t **ps;
    kv_budget_t *b;
    int np, nb;
    ck_assert_int_eq(kv_policy_create_list(pols, &ps, &np), KV_OK);
    ck_assert_int_eq(kv_budget_parse_list(buds, &b, &nb), KV_OK);
    ck_assert_int_eq(kv_trace_open(trace, &t), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    o.kept = &ref;
    kv_results_t *r;
    ck_assert_int_eq(kv_replay(t, ps, np, b, nb, be, &o, &r), KV_OK);
    ck_assert_int_eq(k->n_pol, 3);
    ck_assert_int_eq(k->n_budgets, 2);
    ck_assert_int_eq(k->n_ctx, 32);
    for (int pi = 0; pi < 3; pi++)
        for (int bi = 0; bi < 2; bi++) {
            const kv_kept_entry_t *a = kv_kept_get(k, pi, bi), *e = kv_kept_get(ref, pi, bi);
            ck_assert_str_eq(a->label, ps[pi]->label);
            ck_assert_str_eq(a->budget, b[bi].text);
            ck_assert_int_eq(a->n_store, 2);
            ck_assert_int_eq(a->last_query, pi == 1); /* tova decodes */
            ck_assert(!memcmp(a->mask, e->mask, (size_t)2 * 2 * 40));
        }
    ck_assert_int_eq(kv_kept_get(k, 0, 0)->budget_tokens, 16);
    kv_kept_free(k);
    kv_kept_free(ref);
    kv_results_free(r);
    for (int i = 0; i < np; i++)
        kv_policy_free(ps[i]);
    kv_free(ps);
    kv_free(b);
    kv_backend_close(be);
    kv_trace_close(t);
    /* an unwritable target fails before the work, leaving nothing */
    unlink(out);
    ck_assert_int_ne(sh("%s replay -q %s full 8 -o %s --kept build/test-tmp/no/such/dir/k.h5 2>/dev/null", trace, out),
                     0);
    ck_assert(access(out, F_OK) != 0);
    /* the presets are listed */
    snprintf(cmd, sizeof cmd, "%s policies", getenv("KVSIM_BIN"));
    FILE *f = popen(cmd, "r");
    static char text[1 << 17];
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = 0;
    pclose(f);
    ck_assert_ptr_nonnull(strstr(text, "preset snapkv@kvpress: NVIDIA kvpress 0.5.5 SnapKVPress"));
    ck_assert_ptr_nonnull(strstr(text, "reference code: NVIDIA/kvpress kvpress/presses/criticalkv_press.py"));
}
END_TEST

Suite *suite_replay(void)
{
    Suite *s = suite_create("replay");
    TCase *tc = tcase_create("engine");
    tcase_add_test(tc, metrics_match_brute_force);
    tcase_add_test(tc, budget_lists);
    tcase_add_test(tc, argsort_and_topk_agree_with_the_tie_break);
    tcase_add_test(tc, hand_streaming_llm);
    tcase_add_test(tc, hand_knorm_and_full);
    tcase_add_test(tc, hand_oracle);
    tcase_add_test(tc, random_is_seeded_and_uniform);
    tcase_add_test(tc, results_tsv_round_trip);
    suite_add_tcase(s, tc);
    TCase *pf = tcase_create("prefetch");
    tcase_add_test(pf, prefetch_gives_the_same_bytes);
    tcase_add_test(pf, a_reader_failure_stops_the_replay_with_its_message);
    tcase_add_test(pf, an_engine_failure_stops_the_reader);
    suite_add_tcase(s, pf);
    if (getenv("KVSIM_BIN")) {
        TCase *cli = tcase_create("cli");
        tcase_add_test(cli, cli_errors_leave_no_results);
        tcase_add_test(cli, cli_kept_sets);
        suite_add_tcase(s, cli);
    } else {
        kv_test_skip("replay cli", "KVSIM_BIN not set (run through make test)");
    }
    return s;
}
