/*
 * test_policies_kvpress.c: hand-computed kept sets of the policies and conventions that reproduce
 * the reference toolkits (issue 12): kvpress's compression-ratio budgets, torch.topk's tie order,
 * presets, PyramidKV's kvpress schedule, ChunkKV's context grid, TOVA one-shot, knorm ties and
 * skipped layers, H2O with KVCache-Factory ffac160's mask, and the new policies expected_attention,
 * keydiff, lagkv, simlayerkv, criticalkv, cake and decoding. Each case builds a tiny trace whose
 * scores are known in closed form (written out in the comments); tests/test_kvpress_parity.c checks
 * the same code against kvpress itself on a real model.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/policies/window.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "tests/kv_test.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

enum { MAXT = 32, MAXS = 8 };

/* An in-memory trace of zeros: fill it through kv_trace_mem_tensor. */
static kv_trace_t *zero_trace(int L, int H, int Hkv, int d, int T, int NP, double theta, int with_wo)
{
    kv_trace_meta_t m = {.n_layers = L, .n_heads = H, .n_kv_heads = Hkv, .head_dim = d, .n_tokens = T, .n_prompt = NP};
    m.rope_theta = (float)theta;
    m.has_wo = with_wo;
    m.model_dim = with_wo ? H * d : 0;
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    for (int l = 0; l < L; l++) {
        ck_assert_ptr_nonnull(kv_trace_mem_tensor(t, l, KV_T_Q));
        ck_assert_ptr_nonnull(kv_trace_mem_tensor(t, l, KV_T_K));
        ck_assert_ptr_nonnull(kv_trace_mem_tensor(t, l, KV_T_V));
        if (with_wo)
            ck_assert_ptr_nonnull(kv_trace_mem_tensor(t, l, KV_T_WO));
    }
    return t;
}

/* The mask (S, T) evaluation query e reads at `layer` for budget text `budget`. */
static void probe(kv_trace_t *t, int layer, const char *spec, const char *budget, int e, uint8_t *mask)
{
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list(budget, &b, &nb), KV_OK);
    memset(mask, 0xee, MAXS * MAXT);
    ck_assert_msg(kv_replay_probe(t, layer, p, b, e, NULL, be, mask) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_free(b);
    kv_backend_close(be);
    kv_policy_free(p);
}

static void expect_set(const uint8_t *mask, int T, int s, const int *want, int n_want, int upto, const char *what,
                       int line)
{
    uint8_t w[MAXT] = {0};
    for (int i = 0; i < n_want; i++)
        w[want[i]] = 1;
    for (int j = 0; j < upto; j++)
        ck_assert_msg(mask[(size_t)s * T + j] == w[j], "line %d: %s, head %d: token %d %s", line, what, s, j,
                      mask[(size_t)s * T + j] ? "kept, expected evicted" : "evicted, expected kept");
}

#define EXPECT(mask, T, s, upto, what, ...)                                                                            \
    do {                                                                                                               \
        const int want_[] = {__VA_ARGS__};                                                                             \
        expect_set(mask, T, s, want_, (int)(sizeof want_ / sizeof want_[0]), upto, what, __LINE__);                    \
    } while (0)

/* Key j of KV head g (d = 4) as (x, 0, 0, 0) scaled so its norm is nrm[j]. */
static void set_key_norms(kv_trace_t *t, int l, int g, int T, const float *nrm)
{
    float *k = kv_trace_mem_tensor(t, l, KV_T_K);
    for (int j = 0; j < T; j++)
        k[((size_t)g * T + j) * 4] = nrm[j];
}

/* ---------------------------------------------------------------- budgets and ties */

/* cr:X keeps int(n (1 - X)) in double precision: 20 (1 - 0.8) = 20 x 0.19999999999999996 =
 * 3.9999999999999991 -> 3, where the fraction 0.2 keeps 4; at least 1 token; 0 <= X < 1. */
START_TEST(compression_ratio_budgets)
{
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list("cr:0.8,0.2,cr:0.99,cr:0", &b, &nb), KV_OK);
    kv_trace_meta_t m = {.n_layers = 2, .n_kv_heads = 3};
    for (int i = 0; i < nb; i++)
        ck_assert_int_eq(kv_budget_resolve(&b[i], &m, 20), KV_OK);
    ck_assert_int_eq(b[0].kind, KV_BUDGET_RATIO);
    ck_assert_str_eq(b[0].text, "cr:0.8");
    ck_assert_int_eq(b[0].tokens, 3);
    ck_assert_int_eq(b[1].tokens, 4);
    ck_assert_int_eq(b[2].tokens, 1); /* int(0.2) = 0, floored to 1 */
    ck_assert_int_eq(b[3].tokens, 20);
    ck_assert_int_eq(b[0].total, 3 * 2 * 3);
    ck_assert(kv_budget_exact(&b[0], 20) == 20 * (1 - 0.8));
    ck_assert(kv_budget_fraction(&b[0], 20) == 1 - 0.8);
    ck_assert(kv_budget_exact(&b[1], 20) == 20 * 0.2);
    kv_free(b);
    ck_assert_int_eq(kv_budget_parse_list("cr:1", &b, &nb), KV_EINVAL);
    ck_assert_int_eq(kv_budget_parse_list("cr:-0.1", &b, &nb), KV_EINVAL);
    ck_assert_int_eq(kv_budget_parse_list("cr:x", &b, &nb), KV_EINVAL);
}
END_TEST

/* torch.topk's sets on the CPU, as torch 2.15 returned them (the nth_element path, and the
 * partial_sort path when k * 64 <= n). The project's rule keeps the later tokens instead. */
START_TEST(torch_topk_tie_order)
{
    uint8_t m[256];
    const float zeros[10] = {0};
    kv_topk_mask_torch(zeros, 10, 3, m);
    for (int j = 0; j < 10; j++)
        ck_assert_int_eq(m[j], j >= 6 && j <= 8); /* {6, 7, 8}, not {7, 8, 9} */
    kv_topk_mask(zeros, 10, 3, m);
    ck_assert(m[7] && m[8] && m[9] && !m[6]);
    const float x[12] = {3, 1, 3, 2, 3, 1, 3, 2, 3, 3, 1, 2};
    kv_topk_mask_torch(x, 12, 3, m);
    for (int j = 0; j < 12; j++)
        ck_assert_int_eq(m[j], j == 4 || j == 8 || j == 9);
    kv_topk_mask_torch(x, 12, 6, m);
    for (int j = 0; j < 12; j++)
        ck_assert_int_eq(m[j], j == 0 || j == 2 || j == 4 || j == 6 || j == 8 || j == 9);
    float y[200] = {0};
    y[50] = 1;
    kv_topk_mask_torch(y, 200, 3, m); /* partial_sort: 3 * 64 <= 200 */
    for (int j = 0; j < 200; j++)
        ck_assert_int_eq(m[j], j == 0 || j == 1 || j == 50);
}
END_TEST

/* Presets expand to their parameters (the label prints them all), given keys override them, an
 * inner preset's granularity gives way to the outer's, and a bad preset lists the valid ones. */
START_TEST(presets_expand)
{
    kv_policy_t *a, *b;
    ck_assert_int_eq(kv_policy_create("snapkv@kvpress", &a), KV_OK);
    ck_assert_int_eq(kv_policy_create("snapkv(window=64,kernel=5,pool=avg,qagg=mean)", &b), KV_OK);
    ck_assert_str_eq(a->label, b->label);
    kv_policy_free(a);
    kv_policy_free(b);
    ck_assert_int_eq(kv_policy_create("snapkv@kvpress(window=32)", &a), KV_OK);
    ck_assert_str_eq(a->label, "snapkv(window=32,kernel=5,pool=avg,qagg=mean,gqa=after_pool,gran=kv,agg=mean)");
    kv_policy_free(a);
    ck_assert_int_eq(kv_policy_create("adakv@kvcache_factory", &a), KV_OK);
    ck_assert_int_eq(a->gran, KV_GRAN_QUERY);
    ck_assert_int_eq(a->inner->gran, KV_GRAN_QUERY);
    ck_assert(!(a->flags & KV_POL_NESTED)); /* normalize=1 */
    kv_policy_free(a);
    ck_assert_int_eq(kv_policy_create("adakv(inner=snapkv@kvcache_factory)", &a),
                     KV_OK); /* preset's gran=query yields */
    ck_assert_int_eq(a->inner->gran, KV_GRAN_KV);
    kv_policy_free(a);
    ck_assert_int_eq(kv_policy_create("snapkv@nope", &a), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "snapkv@kvpress"));
    ck_assert_int_eq(kv_policy_create("full@kvpress", &a), KV_EINVAL);
    ck_assert_int_eq(kv_policy_create("knorm@kvpress", &a), KV_OK);
    ck_assert(a->tie_torch && !(a->flags & KV_POL_NESTED));
    kv_policy_free(a);
}
END_TEST

/* ---------------------------------------------------------------- conventions */

/* kvpress's PyramidKVPress.get_layer_budget, 5 layers, window 64, beta 20, n = 453, cr 0.25:
 * x = 339.75, cap = 403.75, min = 16.9875, max = 662.5125 >= n - w = 389 -> max = 389,
 * min = 679.5 - 389 = 290.5 >= 64: the pyramid, steps = 98.5 / 4 = 24.625,
 * kept = round(389, 364.375, 339.75, 315.125, 290.5) = 389, 364, 340, 315, 290 (290.5: half to even).
 * At cr 0.75: x = 113.25, min 5.66 < 64 after the clamp check -> SnapKV with round(113.25) = 113.
 * And the worked example of 32 layers, n = 4000, cr 0.5: max 3900, min 100, steps 3800/31. */
START_TEST(pyramid_kvpress_schedule)
{
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("pyramidkv@kvpress", &p), KV_OK);
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list("cr:0.25,cr:0.75,cr:0.5", &b, &nb), KV_OK);
    kv_trace_meta_t m = {.n_layers = 5, .n_kv_heads = 4};
    for (int i = 0; i < nb; i++)
        ck_assert_int_eq(kv_budget_resolve(&b[i], &m, 453), KV_OK);
    const int want[5] = {389, 364, 340, 315, 290};
    for (int l = 0; l < 5; l++) {
        ck_assert_int_eq(kv_pyramid_layer_tokens(p, l, 5, 453, &b[0]), want[l]);
        ck_assert_int_eq(kv_pyramid_layer_tokens(p, l, 5, 453, &b[1]), 113);
    }
    ck_assert_int_eq(kv_budget_resolve(&b[2], &m, 4000), KV_OK);
    ck_assert_int_eq(kv_pyramid_layer_tokens(p, 0, 32, 4000, &b[2]), 3900);
    ck_assert_int_eq(kv_pyramid_layer_tokens(p, 1, 32, 4000, &b[2]), 3777); /* 3900 - 122.58 */
    ck_assert_int_eq(kv_pyramid_layer_tokens(p, 31, 32, 4000, &b[2]), 100);
    kv_free(b);
    kv_policy_free(p);
}
END_TEST

/* chunkkv grid=context with knorm scores: 10 context tokens of norms 5 5 5 5 | 1 1 1 1 | 2 2 (one
 * KV head), chunks of 4 from token 0: means -5, -1, -2 (the last chunk partial). Budget B gives
 * max(1, int(3 B / 10)) chunks: B = 5 -> 1 chunk (tokens 4-7); B = 7 -> 2 chunks (4-9); the prefix
 * grid keeps floor(B / 4) chunks of the same order: B = 5 -> 4-7, B = 7 -> 4-7. */
START_TEST(chunkkv_context_grid)
{
    enum { T = 11, NP = 10 };
    kv_trace_t *t = zero_trace(1, 1, 1, 4, T, NP, 0, 0);
    const float nrm[T] = {5, 5, 5, 5, 1, 1, 1, 1, 2, 2, 1};
    set_key_norms(t, 0, 0, T, nrm);
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "chunkkv(inner=knorm,chunk=4,score=mean,grid=context)", "5", 0, mask);
    EXPECT(mask, T, 0, NP, "context grid B=5", 4, 5, 6, 7);
    probe(t, 0, "chunkkv(inner=knorm,chunk=4,score=mean,grid=context)", "7", 0, mask);
    EXPECT(mask, T, 0, NP, "context grid B=7", 4, 5, 6, 7, 8, 9);
    probe(t, 0, "chunkkv(inner=knorm,chunk=4,score=mean,grid=context)", "cr:0.75", 0, mask);
    EXPECT(mask, T, 0, NP, "context grid cr 0.75: max(1, int(0.75)) chunk", 4, 5, 6, 7);
    probe(t, 0, "chunkkv(inner=knorm,chunk=4,score=mean)", "7", 0, mask);
    EXPECT(mask, T, 0, NP, "prefix grid B=7", 4, 5, 6, 7);
    kv_trace_close(t);
}
END_TEST

/* tova mode=oneshot: 6 context tokens, the last query's logits ln(8, 4, 2, 1, 1, 1) (head_dim 4,
 * scale 1/2: keys 2 ln w on axis 0, queries on axis 0), so its attention is w / 17; the mean over
 * the heads is the same; the last token is kept first. B = 3 -> {5, 0, 1}; mode=decode keeps the
 * top B of the whole prompt by the same attention without forcing the last token: {0, 1, 2}. */
START_TEST(tova_oneshot)
{
    enum { T = 7, NP = 6 };
    kv_trace_t *t = zero_trace(1, 2, 1, 4, T, NP, 0, 0);
    const float w[T] = {8, 4, 2, 1, 1, 1, 1};
    float *k = kv_trace_mem_tensor(t, 0, KV_T_K), *q = kv_trace_mem_tensor(t, 0, KV_T_Q);
    for (int j = 0; j < T; j++)
        k[(size_t)j * 4] = 2.0f * logf(w[j]);
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < T; i++)
            q[((size_t)h * T + i) * 4] = 1.0f;
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "tova(mode=oneshot)", "3", 0, mask);
    EXPECT(mask, T, 0, NP, "tova oneshot B=3", 0, 1, 5);
    probe(t, 0, "tova@paper", "4", 0, mask); /* decode: top 3 at prefill end, then token 6 appended */
    EXPECT(mask, T, 0, T, "tova decode B=4", 0, 1, 2, 6);
    kv_trace_close(t);
}
END_TEST

/* knorm ties: ten keys of equal norm; B = 3 keeps the three latest (tie=later) or torch.topk's
 * {6, 7, 8} (tie=torch); skip=1 keeps layer 0 whole. */
START_TEST(knorm_ties_and_skip)
{
    enum { T = 11, NP = 10 };
    kv_trace_t *t = zero_trace(2, 1, 1, 4, T, NP, 0, 0);
    const float nrm[T] = {3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3};
    set_key_norms(t, 0, 0, T, nrm);
    set_key_norms(t, 1, 0, T, nrm);
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "knorm", "3", 0, mask);
    EXPECT(mask, T, 0, NP, "knorm later", 7, 8, 9);
    probe(t, 0, "knorm(tie=torch)", "3", 0, mask);
    EXPECT(mask, T, 0, NP, "knorm torch", 6, 7, 8);
    probe(t, 0, "knorm(skip=1)", "3", 0, mask);
    EXPECT(mask, T, 0, NP, "knorm skipped layer", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9);
    probe(t, 1, "knorm(skip=1)", "3", 0, mask);
    EXPECT(mask, T, 0, NP, "knorm layer 1", 7, 8, 9);
    kv_trace_close(t);
}
END_TEST

/* h2o mask=kcf_ffac160 with zero queries (uniform attention), 4 context tokens, window 1: ffac160's
 * rows 0-2 spread over all 4 keys, so keys 0-2 all score 3/4 + 1/4 = 1 and tie (later first: B = 2
 * keeps {2, 3}); causal rows favour the early keys (key 0: 1 + 1/2 + 1/3 + 1/4): {0, 3}. */
START_TEST(h2o_ffac160_mask)
{
    enum { T = 5, NP = 4 };
    kv_trace_t *t = zero_trace(1, 1, 1, 4, T, NP, 0, 0);
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "h2o(window=1,mask=kcf_ffac160)", "2", 0, mask);
    EXPECT(mask, T, 0, NP, "ffac160", 2, 3);
    probe(t, 0, "h2o(window=1)", "2", 0, mask);
    EXPECT(mask, T, 0, NP, "causal", 0, 3);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- new policies */

/* expected_attention with rope_theta 0 (no rotation), no sinks: every context query is (2, 0, 0, 0),
 * so mu = that, Sigma = 0, and key j = (a_j, 0, 0, 0) gets z_j = 2 a_j / sqrt(4) = a_j; with
 * a = (0, ln 2, ln 4, 0) the softmax is (1, 2, 4, 1) / 8; the value norms (8, 2, 0.5, 1) make the
 * scores (8, 4, 2, 1) / 8: B = 2 keeps {0, 1}; without vnorm the order is 2, 1, then 0 = 3 (later). */
START_TEST(expected_attention_closed_form)
{
    enum { T = 5, NP = 4 };
    kv_trace_t *t = zero_trace(1, 1, 1, 4, T, NP, 0, 0);
    float *q = kv_trace_mem_tensor(t, 0, KV_T_Q), *k = kv_trace_mem_tensor(t, 0, KV_T_K);
    float *v = kv_trace_mem_tensor(t, 0, KV_T_V);
    const float a[T] = {0, logf(2), logf(4), 0, 0}, vn[T] = {8, 2, 0.5f, 1, 1};
    for (int j = 0; j < T; j++) {
        q[(size_t)j * 4] = 2;
        k[(size_t)j * 4] = a[j];
        v[(size_t)j * 4 + 1] = vn[j];
    }
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "expected_attention(sinks=0)", "2", 0, mask);
    EXPECT(mask, T, 0, NP, "expected attention x value norm", 0, 1);
    probe(t, 0, "expected_attention(sinks=0,vnorm=0)", "2", 0, mask);
    EXPECT(mask, T, 0, NP, "expected attention", 1, 2);
    probe(t, 0, "expected_attention(sinks=1,vnorm=0)", "2", 0, mask); /* the sink first, then token 2 */
    EXPECT(mask, T, 0, NP, "expected attention, 1 sink", 0, 2);
    kv_trace_close(t);
}
END_TEST

/* keydiff: keys (1,0), (1,0), (0,1), (1,0): anchor = (3/4, 1/4), cosines 0.949, 0.949, 0.316,
 * 0.949; score = -cosine: token 2 first, then the tied three (later first). */
START_TEST(keydiff_closed_form)
{
    enum { T = 5, NP = 4 };
    kv_trace_t *t = zero_trace(1, 1, 1, 4, T, NP, 0, 0);
    float *k = kv_trace_mem_tensor(t, 0, KV_T_K);
    const int axis[T] = {0, 0, 1, 0, 0};
    for (int j = 0; j < T; j++)
        k[(size_t)j * 4 + axis[j]] = 1;
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "keydiff", "1", 0, mask);
    EXPECT(mask, T, 0, NP, "keydiff B=1", 2);
    probe(t, 0, "keydiff", "2", 0, mask);
    EXPECT(mask, T, 0, NP, "keydiff B=2", 2, 3);
    kv_trace_close(t);
}
END_TEST

/* lagkv, sinks 1, lag 2, 7 context tokens: partitions [1,3), [3,5) scored, [5,7) is the tail.
 * K = V rows: tok 0 (.3 .3 .3 .3), 1 (.5 .5 .5 .75), 2 (0 1 0 1), 3 (0 1 0 1), 4 (1 0 1 .5),
 * 5 (0 0 0 0), 6 (1 1 1 1). Partition [3,5) against the tail (min 0, max 1 per channel): std of
 * tok 3's row .577 > tok 4's .479 -> ranks 4: 0, 3: 1/2. Partition [1,3) against [3,5) (min 0 0 0 .5,
 * max 1 1 1 1): tok 1 -> (.5 .5 .5 .5), std 0; tok 2 -> (0 1 0 1), std .577 -> 1: 0, 2: 1/2.
 * Scores (1, 0, .5, .5, 0, 1, 1): B = 5 keeps {0, 2, 3, 5, 6}; B = 4 one of the tied 2, 3: the
 * later (3), and torch.topk also returns {0, 3, 5, 6} on these scores. Below s + 2 lag the context
 * is not scored: 4 tokens keep the sink and the latest. */
START_TEST(lagkv_closed_form)
{
    enum { T = 8, NP = 7 };
    kv_trace_t *t = zero_trace(2, 1, 1, 4, T, NP, 0, 0);
    const float rows[T][4] = {{.3f, .3f, .3f, .3f}, {.5f, .5f, .5f, .75f}, {0, 1, 0, 1}, {0, 1, 0, 1},
                              {1, 0, 1, .5f},       {0, 0, 0, 0},          {1, 1, 1, 1}, {0, 0, 0, 0}};
    for (int l = 0; l < 2; l++) {
        float *k = kv_trace_mem_tensor(t, l, KV_T_K), *v = kv_trace_mem_tensor(t, l, KV_T_V);
        memcpy(k, rows, sizeof rows);
        memcpy(v, rows, sizeof rows);
    }
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "lagkv(sinks=1,lag=2)", "5", 0, mask);
    EXPECT(mask, T, 0, NP, "lagkv B=5", 0, 2, 3, 5, 6);
    probe(t, 0, "lagkv(sinks=1,lag=2)", "4", 0, mask);
    EXPECT(mask, T, 0, NP, "lagkv B=4", 0, 3, 5, 6);
    probe(t, 0, "lagkv(sinks=1,lag=2,tie=torch)", "4", 0, mask);
    EXPECT(mask, T, 0, NP, "lagkv B=4 torch", 0, 3, 5, 6);
    probe(t, 0, "lagkv(sinks=1,lag=4)", "3", 0, mask); /* 7 < 1 + 8: by position */
    EXPECT(mask, T, 0, NP, "lagkv unscored", 0, 5, 6);
    kv_trace_close(t);
}
END_TEST

/* simlayerkv, initial 1, last 1, threshold 0.5, 12 context tokens, B = 4 (n_recent 4): the last
 * context query's attention over keys 0..10 (its own column dropped) with logits ln w:
 * layer 0: w_0 = 100, the rest 1 -> key 0 alone takes 100/111 > 0.5: lazy, keeps {0} + the last 3;
 * layer 1: w_3 = 100 -> initial + keys 7-10 hold 5/111: not lazy, keeps all 12. */
START_TEST(simlayerkv_lazy_layers)
{
    enum { T = 13, NP = 12 };
    kv_trace_t *t = zero_trace(2, 1, 1, 4, T, NP, 0, 0);
    for (int l = 0; l < 2; l++) {
        float *k = kv_trace_mem_tensor(t, l, KV_T_K), *q = kv_trace_mem_tensor(t, l, KV_T_Q);
        for (int j = 0; j < T; j++) {
            k[(size_t)j * 4] = (j == (l == 0 ? 0 : 3)) ? 2.0f * logf(100) : 0;
            q[(size_t)j * 4] = 1;
        }
    }
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "simlayerkv(threshold=0.5,initial=1,last=1)", "4", 0, mask);
    EXPECT(mask, T, 0, NP, "lazy layer", 0, 9, 10, 11);
    probe(t, 1, "simlayerkv(threshold=0.5,initial=1,last=1)", "4", 0, mask);
    EXPECT(mask, T, 0, NP, "busy layer", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);
    probe(t, 0, "simlayerkv(threshold=1,initial=1,last=1)", "4", 0, mask); /* threshold 1: never lazy */
    EXPECT(mask, T, 0, NP, "threshold 1", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);
    kv_trace_close(t);
}
END_TEST

/* criticalkv over tova(mode=oneshot) (attention of the last query, w / 17 with w = 8 4 2 1 1 and the
 * last token padded to the max + 1), W_O = identity so ||v W_O||_1 = ||v||_1 = (1, 1, 1, 10, 1, 1).
 * B = 4: stage 1 keeps int(4 x 0.5) = 2 by score (5 and 0); stage 2 ranks the rest by (s + 1e-4)
 * ||v||: token 3 (10/17), token 1 (4/17), then 2, 4 -> {0, 1, 3, 5}, where tova alone keeps {0, 1,
 * 2, 5}. */
START_TEST(criticalkv_value_norms)
{
    enum { T = 7, NP = 6 };
    kv_trace_t *t = zero_trace(1, 1, 1, 4, T, NP, 0, 1);
    const float w[T] = {8, 4, 2, 1, 1, 1, 1}, vn[T] = {1, 1, 1, 10, 1, 1, 1};
    float *k = kv_trace_mem_tensor(t, 0, KV_T_K), *q = kv_trace_mem_tensor(t, 0, KV_T_Q);
    float *v = kv_trace_mem_tensor(t, 0, KV_T_V), *wo = kv_trace_mem_tensor(t, 0, KV_T_WO);
    for (int j = 0; j < T; j++) {
        k[(size_t)j * 4] = 2.0f * logf(w[j]);
        q[(size_t)j * 4] = 1;
        v[(size_t)j * 4 + 2] = vn[j];
    }
    for (int x = 0; x < 4; x++)
        wo[x * 4 + x] = 1; /* (model_dim 4, H d 4) */
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "tova(mode=oneshot)", "4", 0, mask);
    EXPECT(mask, T, 0, NP, "tova alone", 0, 1, 2, 5);
    probe(t, 0, "criticalkv(inner=tova(mode=oneshot))", "4", 0, mask);
    EXPECT(mask, T, 0, NP, "criticalkv", 0, 1, 3, 5);
    probe(t, 0, "criticalkv(inner=tova(mode=oneshot),ada=1)", "4", 0, mask); /* one head: all of the layer */
    EXPECT(mask, T, 0, NP, "criticalkv ada, one head", 0, 1, 3, 5);
    kv_trace_close(t);
    /* no W_O: an error naming the need */
    t = zero_trace(1, 1, 1, 4, T, NP, 0, 0);
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("criticalkv", &p), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list("4", &b, &nb), KV_OK);
    kv_results_t *r = NULL;
    ck_assert_int_eq(kv_replay(t, &p, 1, b, nb, be, NULL, &r), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "--with-wo"));
    kv_free(b);
    kv_backend_close(be);
    kv_policy_free(p);
    kv_trace_close(t);
}
END_TEST

/* cake over 2 layers, window 2, B = 6, n = 20: total (B - w) L = 8 past tokens per head; whatever
 * the preferences, the layers hold 8 + 2 x 2 = 12 = L B tokens per head together, the layer whose
 * window attention is spread out (keys all 0: uniform) gets more than the one whose attention sits
 * on one key; a context of at most B + w tokens is not compressed (the reference's condition). */
START_TEST(cake_layer_budgets)
{
    enum { T = 21, NP = 20 };
    kv_trace_t *t = zero_trace(2, 1, 1, 4, T, NP, 0, 0);
    float *k = kv_trace_mem_tensor(t, 1, KV_T_K), *q = kv_trace_mem_tensor(t, 1, KV_T_Q);
    for (int j = 0; j < T; j++) {
        k[(size_t)j * 4] = j == 5 ? 20.0f : 0.0f;
        q[(size_t)j * 4] = 1;
    }
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("cake(window=2)", &p), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list("6,18", &b, &nb), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_results_t *r = NULL;
    ck_assert_msg(kv_replay(t, &p, 1, b, nb, be, &o, &r) == KV_OK, "%s", kv_last_error());
    double kept[2][2] = {{0}};
    for (size_t i = 0; i < r->n; i++)
        if (r->rows[i].layer >= 0 && r->rows[i].head == KV_ALL)
            kept[r->rows[i].budget][r->rows[i].layer] = r->rows[i].kept;
    ck_assert(kept[0][0] + kept[0][1] == 12);
    ck_assert_msg(kept[0][0] > kept[0][1], "uniform layer %g, peaked layer %g", kept[0][0], kept[0][1]);
    ck_assert(kept[0][1] >= 2);
    ck_assert(kept[1][0] == 20 && kept[1][1] == 20); /* 20 <= 18 + 2 */
    kv_results_free(r);
    kv_free(b);
    kv_backend_close(be);
    kv_policy_free(p);
    kv_trace_close(t);
}
END_TEST

/* decoding(inner=knorm, interval=2), B = 3, 6 context tokens and 4 decode tokens with key norms
 * 1 6 2 5 3 4 | 10 .5 7 8. Prefill keeps the 3 smallest: {0, 2, 4}; query 6 reads them + 6;
 * query 7 + 7; before query 8 (2 decode steps done) the cache {0, 2, 4, 6, 7} is re-scored and keeps
 * {7, 0, 2}, + 8; query 9 reads {0, 2, 7, 8, 9}. With prefill=0 the context stays whole until the
 * compression: query 7 reads all 8 tokens, query 8 {0, 2, 7} + 8. */
START_TEST(decoding_recompression)
{
    enum { T = 10, NP = 6 };
    kv_trace_t *t = zero_trace(1, 1, 1, 4, T, NP, 0, 0);
    const float nrm[T] = {1, 6, 2, 5, 3, 4, 10, .5f, 7, 8};
    set_key_norms(t, 0, 0, T, nrm);
    uint8_t mask[MAXS * MAXT];
    const char *spec = "decoding(inner=knorm,interval=2)";
    probe(t, 0, spec, "3", 0, mask);
    EXPECT(mask, T, 0, 7, "query 6", 0, 2, 4, 6);
    probe(t, 0, spec, "3", 1, mask);
    EXPECT(mask, T, 0, 8, "query 7", 0, 2, 4, 6, 7);
    probe(t, 0, spec, "3", 2, mask);
    EXPECT(mask, T, 0, 9, "query 8", 0, 2, 7, 8);
    probe(t, 0, spec, "3", 3, mask);
    EXPECT(mask, T, 0, 10, "query 9", 0, 2, 7, 8, 9);
    probe(t, 0, "decoding(inner=knorm,interval=2,prefill=0)", "3", 1, mask);
    EXPECT(mask, T, 0, 8, "prefill=0, query 7", 0, 1, 2, 3, 4, 5, 6, 7);
    probe(t, 0, "decoding(inner=knorm,interval=2,prefill=0)", "3", 2, mask);
    EXPECT(mask, T, 0, 9, "prefill=0, query 8", 0, 2, 7, 8);
    kv_trace_close(t);
}
END_TEST

Suite *suite_policies_kvpress(void)
{
    Suite *s = suite_create("policies_kvpress");
    TCase *tc = tcase_create("hand");
    tcase_add_test(tc, compression_ratio_budgets);
    tcase_add_test(tc, torch_topk_tie_order);
    tcase_add_test(tc, presets_expand);
    tcase_add_test(tc, pyramid_kvpress_schedule);
    tcase_add_test(tc, chunkkv_context_grid);
    tcase_add_test(tc, tova_oneshot);
    tcase_add_test(tc, knorm_ties_and_skip);
    tcase_add_test(tc, h2o_ffac160_mask);
    tcase_add_test(tc, expected_attention_closed_form);
    tcase_add_test(tc, keydiff_closed_form);
    tcase_add_test(tc, lagkv_closed_form);
    tcase_add_test(tc, simlayerkv_lazy_layers);
    tcase_add_test(tc, criticalkv_value_norms);
    tcase_add_test(tc, cake_layer_budgets);
    tcase_add_test(tc, decoding_recompression);
    suite_add_tcase(s, tc);
    return s;
}
