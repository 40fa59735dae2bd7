/*
 * test_policies_accum.c: hand-computed kept sets of the accumulated-attention and decode-time
 * policies (h2o, tova, threshold, shotkv, kvcompress) on tiny traces.
 *
 * Traces are built so that attention is a ratio of chosen weights: head_dim 8, scale 1/sqrt(8), a
 * key j carries log(w_x[j]) on axis x and a query carries a * sqrt(8) on axis x, so the score is
 * a * log(w_x[j]) and a query with a = 1 on axis x attends to the keys it sees in proportion to
 * w_x[j]. A zero query attends uniformly to every key it sees: over n causal prompt queries key j
 * then accumulates sum_{i=j}^{n-1} 1/(i+1) = H(n) - H(j) (harmonic numbers) and its largest
 * attention is 1/(j+1) (from its own query). Expected sets below are derived by hand from these
 * ratios (the derivation is in each test's comment) and written out as literals.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "tests/kv_test.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

enum { D = 8 };

/* L layers, H query heads, Hkv KV heads, T tokens of which NP prompt; optional segments; all
 * queries and keys zero (uniform attention) until weights are set. */
static kv_trace_t *wtrace(int L, int H, int Hkv, int T, int NP, const int32_t *seg, int nseg)
{
    kv_trace_meta_t m = {.n_layers = L,
                         .n_heads = H,
                         .n_kv_heads = Hkv,
                         .head_dim = D,
                         .n_tokens = T,
                         .n_prompt = NP,
                         .dtype = KV_DTYPE_F32,
                         .n_segments = nseg,
                         .segments = (int32_t *)seg};
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    for (int l = 0; l < L; l++) {
        float *v = kv_trace_mem_tensor(t, l, KV_T_V);
        (void)kv_trace_mem_tensor(t, l, KV_T_Q);
        (void)kv_trace_mem_tensor(t, l, KV_T_K);
        for (int g = 0; g < Hkv; g++)
            for (int j = 0; j < T; j++)
                v[((size_t)g * T + j) * D + (j % D)] = 1.0f;
    }
    return t;
}

/* Weight w of key j of KV head g in layer l on axis x. */
static void kw(kv_trace_t *t, int l, int g, int j, int x, double w)
{
    const int T = kv_trace_meta(t)->n_tokens;
    kv_trace_mem_tensor(t, l, KV_T_K)[((size_t)g * T + j) * D + x] = (float)log(w);
}

/* Query i of head h in layer l follows axis x (a = 1). */
static void qa(kv_trace_t *t, int l, int h, int i, int x)
{
    const int T = kv_trace_meta(t)->n_tokens;
    kv_trace_mem_tensor(t, l, KV_T_Q)[((size_t)h * T + i) * D + x] = (float)sqrt((double)D);
}

/* The cache evaluation query e reads (n_store rows of T). */
static void probe(kv_trace_t *t, const char *spec, int B, int e, uint8_t *mask)
{
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = B};
    const kv_trace_meta_t *m = kv_trace_meta(t);
    memset(mask, 0, (size_t)m->n_heads * m->n_tokens);
    ck_assert_msg(kv_replay_probe(t, 0, p, &b, e, NULL, be, mask) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_backend_close(be);
    kv_policy_free(p);
}

/* mask[0..upto) holds exactly the tokens want[0..n_want) (-1 terminated lists are not used). */
static void expect_set(const uint8_t *mask, const int *want, int n_want, int upto, const char *what)
{
    uint8_t w[64] = {0};
    for (int i = 0; i < n_want; i++)
        w[want[i]] = 1;
    for (int j = 0; j < upto; j++)
        ck_assert_msg(mask[j] == w[j], "%s: token %d %s", what, j, mask[j] ? "kept, expected evicted" : "evicted");
}

#define EXPECT(mask, upto, what, ...)                                                                                  \
    do {                                                                                                               \
        const int want_[] = {__VA_ARGS__};                                                                             \
        expect_set((mask), want_, (int)(sizeof want_ / sizeof want_[0]), (upto), (what));                              \
    } while (0)

/* ---------------------------------------------------------------- h2o */

START_TEST(h2o_oneshot_sum_and_mean)
{
    /* 12 prompt tokens. Head 0: every query follows axis 0 where key 7 weighs 4 (others 1); head 1:
     * uniform. h2o(window=2), B=4: tokens 10, 11 + the 2 best of 0..9.
     * Head 0, norm=sum: key 7 gets 4/(i+4) from each query i >= 7: 4/11+4/12+4/13+4/14+4/15 = 1.557;
     * key 0: H(7) + (1/11+..+1/15) = 2.593 + 0.389 = 2.982; key 1: 2.982 - 1 = 1.982; key 2:
     * 1.982 - 1/2 = 1.482 < 1.557. Top 2 = {0, 1} (7 is third).
     * norm=mean (divide by the 12 - j queries that saw j): key 7: 1.557/5 = 0.311, key 0:
     * 2.982/12 = 0.249, key 1: 1.982/11 = 0.180. Top 2 = {7, 0}.
     * Head 1 (uniform, H(12) - H(j) decreasing in j; its mean is decreasing too): {0, 1}. */
    kv_trace_t *t = wtrace(1, 2, 2, 14, 12, NULL, 0);
    for (int i = 0; i < 14; i++)
        qa(t, 0, 0, i, 0);
    kw(t, 0, 0, 7, 0, 4);
    uint8_t mask[2 * 14];
    probe(t, "h2o(window=2)", 4, 0, mask);
    EXPECT(mask, 12, "h2o sum head 0", 0, 1, 10, 11);
    EXPECT(mask + 14, 12, "h2o sum head 1", 0, 1, 10, 11);
    probe(t, "h2o(window=2,norm=mean)", 4, 0, mask);
    EXPECT(mask, 12, "h2o mean head 0", 0, 7, 10, 11);
    EXPECT(mask + 14, 12, "h2o mean head 1", 0, 1, 10, 11);
    /* one-shot: the context set does not change while decoding, and B = 5 adds key 7 (sum order) */
    probe(t, "h2o(window=2)", 5, 1, mask);
    EXPECT(mask, 12, "h2o sum head 0, B=5, second decode query", 0, 1, 7, 10, 11);
    kv_trace_close(t);
}
END_TEST

START_TEST(h2o_decode_eviction_order)
{
    /* 12 prompt tokens with uniform attention, 4 decode queries. Head 0's decode queries follow
     * axis 0 where key 10 weighs 64 (others 1); head 1's decode queries are uniform.
     * B = 8: decode mode splits it into 4 heavy + 4 recent; one-shot h2o(window=4) keeps the same
     * prefill set for good: window {8..11} + top 4 by H(12) - H(j) = {0, 1, 2, 3}.
     * Decode, head 0 (prefill scores: token 0: 3.103, 1: 2.103, 2: 1.603, 3: 1.270, 8: 0.385,
     * 9: 0.274, 10: 0.174, 11: 0.083):
     *   end of prefill: {0,1,2,3} + recent {8,9,10,11}
     *   query 12: 8 leaves the recent window, 8 (0.385) is the lowest of {0,1,2,3,8}: evicted;
     *     cache {0,1,2,3,9,10,11,12}; key 10 takes 64/71 of query 12's attention, the others 1/71
     *   query 13: 9 (0.274 + 1/71) evicted: {0,1,2,3,10,11,12,13}, key 10 again gets 64/71
     *   query 14: 10 leaves the window with 0.174 + 2 * 64/71 = 1.977 > token 3's 1.270 + 2/71:
     *     the new heavy hitter 10 stays, 3 is evicted: {0,1,2,10,11,12,13,14}
     *   query 15: 11 (0.083 + 3/71) evicted: {0,1,2,10,12,13,14,15}
     * Head 1 (uniform decode queries, 1/8 each): the token leaving the window is always the lowest
     * (10 at query 14: 0.174 + 2/8 < token 3's 1.270 + 2/8): a sliding window after {0,1,2,3}. */
    kv_trace_t *t = wtrace(1, 2, 2, 16, 12, NULL, 0);
    for (int i = 12; i < 16; i++)
        qa(t, 0, 0, i, 0);
    kw(t, 0, 0, 10, 0, 64);
    uint8_t mask[2 * 16];
    for (int e = 0; e < 4; e++) {
        probe(t, "h2o(window=4)", 8, e, mask);
        EXPECT(mask, 12, "h2o oneshot head 0", 0, 1, 2, 3, 8, 9, 10, 11);
        EXPECT(mask + 16, 12, "h2o oneshot head 1", 0, 1, 2, 3, 8, 9, 10, 11);
    }
    probe(t, "h2o(mode=decode)", 8, 0, mask);
    EXPECT(mask, 16, "h2o decode head 0, query 12", 0, 1, 2, 3, 9, 10, 11, 12);
    EXPECT(mask + 16, 16, "h2o decode head 1, query 12", 0, 1, 2, 3, 9, 10, 11, 12);
    probe(t, "h2o(mode=decode)", 8, 1, mask);
    EXPECT(mask, 16, "h2o decode head 0, query 13", 0, 1, 2, 3, 10, 11, 12, 13);
    EXPECT(mask + 16, 16, "h2o decode head 1, query 13", 0, 1, 2, 3, 10, 11, 12, 13);
    probe(t, "h2o(mode=decode)", 8, 2, mask);
    EXPECT(mask, 16, "h2o decode head 0, query 14", 0, 1, 2, 10, 11, 12, 13, 14);
    EXPECT(mask + 16, 16, "h2o decode head 1, query 14", 0, 1, 2, 3, 11, 12, 13, 14);
    probe(t, "h2o(mode=decode)", 8, 3, mask);
    EXPECT(mask, 16, "h2o decode head 0, query 15", 0, 1, 2, 10, 12, 13, 14, 15);
    EXPECT(mask + 16, 16, "h2o decode head 1, query 15", 0, 1, 2, 3, 12, 13, 14, 15);
    /* recent_ratio=1: a pure sliding window of 8 */
    probe(t, "h2o(mode=decode,recent_ratio=1)", 8, 3, mask);
    EXPECT(mask, 16, "h2o decode sliding", 8, 9, 10, 11, 12, 13, 14, 15);
    /* key 10 weighing 8 instead of 64 takes 8/15 of each decode query: before query 14, by sum
     * 10 has 0.174 + 16/15 = 1.241 < token 3's 1.270 + 2/15 = 1.403 and goes; by mean (norm=mean)
     * 1.241/4 = 0.310 beats 3's 1.403/11 = 0.128 (and 2's 0.145, 1's 0.172, 0's 0.231): 3 goes */
    kw(t, 0, 0, 10, 0, 8);
    probe(t, "h2o(mode=decode)", 8, 2, mask);
    EXPECT(mask, 16, "h2o decode sum, key 10 at 8", 0, 1, 2, 3, 11, 12, 13, 14);
    probe(t, "h2o(mode=decode,norm=mean)", 8, 2, mask);
    EXPECT(mask, 16, "h2o decode mean, key 10 at 8", 0, 1, 2, 10, 11, 12, 13, 14);
    kv_trace_close(t);

    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("h2o(mode=decode)", &p), KV_OK);
    ck_assert(p->flags & KV_POL_DECODE);
    ck_assert(!(p->flags & (KV_POL_ONESHOT | KV_POL_NESTED)));
    kv_policy_free(p);
}
END_TEST

/* ---------------------------------------------------------------- tova */

START_TEST(tova_one_token_per_step)
{
    /* 12 prompt tokens, 2 KV heads (one query head each), B = 6.
     * The last prompt query (11): head 0 follows axis 0 (key 2 weighs 8, key 5 4, key 9 2, others
     * 1; total 23), head 1 axis 1 (key 7 weighs 8, key 4 2, others 1; total 20). Mean over heads:
     * 7: (1/23 + 8/20)/2 = 0.222, 2: (8/23 + 1/20)/2 = 0.199, 5: 0.112, 4: 0.072, 9: 0.069, the
     * rest 0.047 (tie: the later token, 11, wins). End of prefill: {2,4,5,7,9,11}; the first decode
     * step drops the lowest of these (11) and appends 12 (TOVA's cache_size = B - 1).
     * Query 12: head 0 follows axis 2 (key 9 weighs 1/8, key 4 1/2, others 1: total 4.625 over
     * {2,4,5,7,9,12}), head 1 axis 5 (key 4 weighs 1/8: total 5.125). Head 0 alone would drop 9,
     * but the mean over heads gives 9 (0.125/4.625 + 1/5.125)/2 = 0.111 and 4
     * (0.5/4.625 + 0.125/5.125)/2 = 0.066 (others 0.206): 4 goes. Queries 13 and 14 (both heads)
     * follow axes 3 and 4 where key 12, then key 2, weighs 1/4 (others 1): each goes in turn.
     *   query 12 reads {2,4,5,7,9,12}, 13 reads {2,5,7,9,12,13}, 14 reads {2,5,7,9,13,14},
     *   15 reads {5,7,9,13,14,15}: one token in, one out per step.
     * Both KV heads keep the same indices (GQA-agnostic), although per head they would differ. */
    kv_trace_t *t = wtrace(1, 2, 2, 16, 12, NULL, 0);
    qa(t, 0, 0, 11, 0);
    qa(t, 0, 1, 11, 1);
    for (int g = 0; g < 2; g++) {
        kw(t, 0, g, 2, 0, 8);
        kw(t, 0, g, 5, 0, 4);
        kw(t, 0, g, 9, 0, 2);
        kw(t, 0, g, 7, 1, 8);
        kw(t, 0, g, 4, 1, 2);
        kw(t, 0, g, 9, 2, 0.125);
        kw(t, 0, g, 4, 2, 0.5);
        kw(t, 0, g, 4, 5, 0.125);
        kw(t, 0, g, 12, 3, 0.25);
        kw(t, 0, g, 2, 4, 0.25);
    }
    qa(t, 0, 0, 12, 2);
    qa(t, 0, 1, 12, 5);
    for (int h = 0; h < 2; h++) {
        qa(t, 0, h, 13, 3);
        qa(t, 0, h, 14, 4);
    }
    uint8_t mask[2 * 16];
    const char *specs[] = {"tova", "tova(gran=query)"};
    for (int k = 0; k < 2; k++) {
        probe(t, specs[k], 6, 0, mask);
        for (int s = 0; s < 2; s++)
            EXPECT(mask + s * 16, 16, "tova query 12", 2, 4, 5, 7, 9, 12);
        probe(t, specs[k], 6, 1, mask);
        for (int s = 0; s < 2; s++)
            EXPECT(mask + s * 16, 16, "tova query 13", 2, 5, 7, 9, 12, 13);
        probe(t, specs[k], 6, 2, mask);
        for (int s = 0; s < 2; s++)
            EXPECT(mask + s * 16, 16, "tova query 14", 2, 5, 7, 9, 13, 14);
        probe(t, specs[k], 6, 3, mask);
        for (int s = 0; s < 2; s++)
            EXPECT(mask + s * 16, 16, "tova query 15", 5, 7, 9, 13, 14, 15);
    }
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- threshold */

START_TEST(threshold_splits_tokens)
{
    /* Uniform attention everywhere (12 prompt tokens, 4 decode queries). The largest attention
     * prompt token j receives is 1/(j+1) (from its own query), so tau = 0.15 keeps j <= 5
     * (1/6 = 0.167) and drops j >= 6 (1/7 = 0.143). recent = 2 exempts the last two positions.
     * B = 16 (more than the trace): end of prefill {0..5} + {10, 11}; before query 12 the window is
     * {11, 12} and 10 (1/11) falls; query 12 gives 1/8 to each of its 8 keys, so 11 (max 1/8)
     * falls before query 13, 12 before query 14, ...: the cache is {0..5, i-1, i}.
     * B = 5: end of prefill {0, 1, 2} (best maxima 1, 1/2, 1/3) + {10, 11}; query 12 reads
     * {0,1,2,11,12}; it gives 1/5 = 0.2 >= tau to 11, which survives the threshold but not the
     * budget before query 13 (0, 1, 2 rank higher): {0,1,2,12,13}; then {0,1,2,13,14}. */
    kv_trace_t *t = wtrace(1, 2, 2, 16, 12, NULL, 0);
    uint8_t mask[2 * 16];
    const char *spec = "threshold(tau=0.15,recent=2)";
    for (int e = 0; e < 4; e++) {
        probe(t, spec, 16, e, mask);
        const int i = 12 + e;
        const int want[] = {0, 1, 2, 3, 4, 5, i - 1, i};
        expect_set(mask, want, 8, 16, "threshold B=16 head 0");
        expect_set(mask + 16, want, 8, 16, "threshold B=16 head 1");
    }
    probe(t, spec, 5, 0, mask);
    EXPECT(mask, 16, "threshold B=5 query 12", 0, 1, 2, 11, 12);
    probe(t, spec, 5, 1, mask);
    EXPECT(mask, 16, "threshold B=5 query 13", 0, 1, 2, 12, 13);
    probe(t, spec, 5, 2, mask);
    EXPECT(mask + 16, 16, "threshold B=5 query 14", 0, 1, 2, 13, 14);
    /* tau = 0: budget only, every token eligible; B = 16 keeps everything */
    probe(t, "threshold(tau=0,recent=2)", 16, 3, mask);
    for (int j = 0; j < 16; j++)
        ck_assert(mask[j]);
    kv_trace_close(t);

    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("threshold", &p), KV_OK);
    ck_assert(p->flags & KV_POL_BUDGET_FREE);
    kv_policy_free(p);
    ck_assert_int_eq(kv_policy_create("threshold(tau=0)", &p), KV_OK);
    ck_assert(!(p->flags & KV_POL_BUDGET_FREE));
    kv_policy_free(p);
}
END_TEST

/* ---------------------------------------------------------------- shotkv */

START_TEST(shotkv_shot_choice)
{
    /* 16 prompt tokens in segments A [0,2), B [2,7), C [7,9), D [9,12), question Q [12,16); 4
     * decode queries. Prompt queries of both heads follow axis 0 where D's tokens weigh 8 (others
     * 1). Mean accumulated attention per shot, summed over the two heads: A 5.14, D 3.03, B 2.08,
     * C 0.83, Q 0.14 (early tokens are favoured by the causal sum, D by its weight).
     * rd = 0.5 over 4 decode steps reserves ceil(2) = 2 tokens, B = 13 leaves 11 for the prompt:
     * Q (kept, 4) + A (2) = 6, + D (3) = 9, B (5) does not fit (14 > 11):
     *   fit=skip tries C (2): 11 -> {0,1, 7,8, 9,10,11, 12..15};
     *   fit=stop ends there  -> {0,1, 9,10,11, 12..15}.
     * In position order (A, B, C, D) skip would have taken A and B instead: the choice follows the
     * scores. Decoding keeps ceil(0.5 g) of the g generated tokens: query 16 reads {16}, 17 reads
     * {17} (16 evicted), 18 reads {17, 18}; query 18 follows axis 2 where key 17 weighs 8, so before
     * query 19 the best of {17, 18} by its attention is 17: query 19 reads {17, 19}. */
    const int32_t seg[] = {0, 2, 7, 9, 12};
    kv_trace_t *t = wtrace(1, 2, 1, 20, 16, seg, 5);
    for (int h = 0; h < 2; h++) {
        for (int i = 0; i < 16; i++)
            qa(t, 0, h, i, 0);
        qa(t, 0, h, 18, 2);
    }
    for (int j = 9; j < 12; j++)
        kw(t, 0, 0, j, 0, 8);
    kw(t, 0, 0, 17, 2, 8);
    uint8_t mask[2 * 20]; /* probe() clears n_heads x T bytes */
    probe(t, "shotkv(rd=0.5)", 13, 0, mask);
    EXPECT(mask, 20, "shotkv skip, query 16", 0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
    probe(t, "shotkv(rd=0.5,fit=stop)", 13, 0, mask);
    EXPECT(mask, 20, "shotkv stop, query 16", 0, 1, 9, 10, 11, 12, 13, 14, 15, 16);
    probe(t, "shotkv(rd=0.5)", 13, 1, mask);
    EXPECT(mask, 20, "shotkv query 17", 0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17);
    probe(t, "shotkv(rd=0.5)", 13, 2, mask);
    EXPECT(mask, 20, "shotkv query 18", 0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 18);
    probe(t, "shotkv(rd=0.5)", 13, 3, mask);
    EXPECT(mask, 20, "shotkv query 19", 0, 1, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17, 19);
    /* keep_last=0: the question (lowest score) is an ordinary shot and loses its place to B:
     * A 2 + D 3 + B 5 = 10, C (2) no longer fits, Q (4) neither */
    probe(t, "shotkv(rd=0.5,keep_last=0)", 13, 0, mask);
    EXPECT(mask, 20, "shotkv keep_last=0", 0, 1, 2, 3, 4, 5, 6, 9, 10, 11, 16);
    kv_trace_close(t);
    /* a trace without segments is refused with a clear message */
    t = wtrace(1, 2, 1, 20, 16, NULL, 0);
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("shotkv", &p), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = 8};
    ck_assert_int_ne(kv_replay_probe(t, 0, p, &b, 0, NULL, be, mask), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "segments"));
    kv_backend_close(be);
    kv_policy_free(p);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- kvcompress */

static const kv_result_row_t *row(const kv_results_t *r, int budget, int layer, int head)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->rows[i].budget == budget && r->rows[i].layer == layer && r->rows[i].head == head)
            return &r->rows[i];
    ck_abort_msg("no row for budget %d layer %d head %d", budget, layer, head);
    return NULL;
}

/* Mean recall over the 2 evaluation queries (20, 21) of a context set S when query i attends in
 * proportion to j + 1: F = (sum_{j in S} (j+1) + sum_{j=20}^{i} (j+1)) / sum_{j<=i} (j+1). */
static double recall_of(const int *S, int n)
{
    double f = 0;
    for (int i = 20; i <= 21; i++) {
        double kept = 0;
        for (int k = 0; k < n; k++)
            kept += S[k] + 1;
        for (int j = 20; j <= i; j++)
            kept += j + 1;
        f += kept / ((i + 1) * (i + 2) / 2.0);
    }
    return f / 2;
}

START_TEST(kvcompress_blocks_across_layers)
{
    /* 2 layers x 2 KV heads (one query head each), 20 prompt tokens, 2 decode queries.
     * kvcompress(window=1, block=4, protect=4): metric = squared attention of the last prompt query
     * (19); tokens 16..19 protected; the 16 others form 4 blocks per head.
     *   layer 0, both heads: query 19 uniform, p = 1/20, metric 0.0025 everywhere.
     *   layer 1 head 0: query 19 follows axis 0, keys 0..11 weigh 4 (others 1): p = 4/56 or 1/56,
     *     metric 0.0051 (0..11) or 0.00032 (12..15).
     *   layer 1 head 1: keys 0..3 weigh 4: p = 4/32 or 1/32, metric 0.0156 (0..3) or 0.00098.
     * Blocks (ascending, key = highest metric): L1H1 {4..7} {8..11} {12..15} 0.00098, {0..3}
     * 0.0156; L1H0 {12..15} 0.00032, {0..3} {4..7} {8..11} 0.0051; layer 0: four blocks at 0.0025.
     * B = 8: total 8 x 2 layers x 2 heads = 32, protected 16, room for 4 blocks: L1H1 {0..3} and
     * L1H0's three 0.0051 blocks. Kept per head: layer 0: 4, 4 (protected only); layer 1: 16, 8.
     * B = 10: room for 6 blocks, the 2 extra from layer 0 at a tie (0.0025): earlier layer, lower
     * head, higher block first: L0H0 {12..15} and {8..11}. Kept: 12, 4, 16, 8.
     * seq:30 (a total that is not a whole number of blocks): room 14, three blocks fit (L1H1's and
     * two of L1H0's), the fourth would overshoot: kept 4, 4, 12, 8.
     * pool=max, kernel=3 (neighbours +-1), B = 8: L1H1's 0.0156 spreads to token 4, L1H0's 0.0051 to
     * token 12; ascending L1H1: 5..15 then 0..4, blocks {5..8} {9..12} {13,14,15,0} {1..4}, the last
     * two keyed 0.0156; L1H0: 13,14,15 then 0..12, blocks {13,14,15,0} {1..4} {5..8} {9..12} all
     * 0.0051. Room 4: L1H1 {1..4}, {13,14,15,0}, L1H0 {9..12}, {5..8}. Kept: 4, 4, 12, 12.
     * Evaluation queries 20, 21 attend in proportion to j + 1 (axis 2), so the recall of each kept
     * set is a ratio of sums (recall_of) and pins down the exact tokens. */
    kv_trace_t *t = wtrace(2, 2, 2, 22, 20, NULL, 0);
    qa(t, 1, 0, 19, 0);
    qa(t, 1, 1, 19, 0);
    for (int j = 0; j < 12; j++)
        kw(t, 1, 0, j, 0, 4);
    for (int j = 0; j < 4; j++)
        kw(t, 1, 1, j, 0, 4);
    for (int l = 0; l < 2; l++)
        for (int h = 0; h < 2; h++) {
            qa(t, l, h, 20, 2);
            qa(t, l, h, 21, 2);
            for (int j = 0; j < 22; j++)
                kw(t, l, h, j, 2, j + 1);
        }
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(2, &be), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    const char *specs[] = {"kvcompress(window=1,block=4,protect=4,pool=none)",
                           "kvcompress(window=1,block=4,protect=4,kernel=3)"};
    for (int k = 0; k < 2; k++) {
        kv_policy_t *p;
        ck_assert_int_eq(kv_policy_create(specs[k], &p), KV_OK);
        kv_budget_t *b;
        int nb;
        ck_assert_int_eq(kv_budget_parse_list("8,10,seq:30", &b, &nb), KV_OK);
        kv_results_t *r;
        ck_assert_msg(kv_replay(t, &p, 1, b, nb, be, &o, &r) == KV_OK, "%s", kv_last_error());
        const int prot[] = {16, 17, 18, 19};
        if (k == 0) {
            const int l1h0[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 16, 17, 18, 19};
            const int l1h1[] = {0, 1, 2, 3, 16, 17, 18, 19};
            const int l0h0_10[] = {8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
            const double kept8[4] = {4, 4, 16, 8}, kept10[4] = {12, 4, 16, 8};
            for (int x = 0; x < 4; x++) {
                ck_assert_msg(row(r, 0, x / 2, x % 2)->kept == kept8[x], "B=8 layer %d head %d keeps %g", x / 2, x % 2,
                              row(r, 0, x / 2, x % 2)->kept);
                ck_assert_msg(row(r, 1, x / 2, x % 2)->kept == kept10[x], "B=10 layer %d head %d keeps %g", x / 2,
                              x % 2, row(r, 1, x / 2, x % 2)->kept);
            }
            /* seq:30: room 14 holds 3 blocks (L1H1 {0..3}, two of L1H0); the fourth does not fit */
            const double kept30[4] = {4, 4, 12, 8};
            for (int x = 0; x < 4; x++)
                ck_assert_msg(row(r, 2, x / 2, x % 2)->kept == kept30[x], "seq:30 layer %d head %d keeps %g", x / 2,
                              x % 2, row(r, 2, x / 2, x % 2)->kept);
            /* recall: float softmax and sums of 22 terms, 1e-5 relative */
            kv_assert_close(row(r, 0, 0, 0)->recall_mean, recall_of(prot, 4), 1e-6, 1e-5, "B=8 L0H0");
            kv_assert_close(row(r, 0, 0, 1)->recall_mean, recall_of(prot, 4), 1e-6, 1e-5, "B=8 L0H1");
            kv_assert_close(row(r, 0, 1, 0)->recall_mean, recall_of(l1h0, 16), 1e-6, 1e-5, "B=8 L1H0");
            kv_assert_close(row(r, 0, 1, 1)->recall_mean, recall_of(l1h1, 8), 1e-6, 1e-5, "B=8 L1H1");
            kv_assert_close(row(r, 1, 0, 0)->recall_mean, recall_of(l0h0_10, 12), 1e-6, 1e-5, "B=10 L0H0");
            kv_assert_close(row(r, 1, 0, 1)->recall_mean, recall_of(prot, 4), 1e-6, 1e-5, "B=10 L0H1");
            /* metadata: per head 4 bytes per kept slot + 4 per started block: 20 + 20 + 80 + 40 */
            ck_assert_msg(row(r, 0, KV_ALL, KV_ALL)->meta_bytes == 160, "meta %g",
                          row(r, 0, KV_ALL, KV_ALL)->meta_bytes);
        } else {
            const int l1h0[] = {5, 6, 7, 8, 9, 10, 11, 12, 16, 17, 18, 19};
            const int l1h1[] = {0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18, 19};
            const double kept8[4] = {4, 4, 12, 12};
            for (int x = 0; x < 4; x++)
                ck_assert_msg(row(r, 0, x / 2, x % 2)->kept == kept8[x], "pooled B=8 layer %d head %d keeps %g", x / 2,
                              x % 2, row(r, 0, x / 2, x % 2)->kept);
            kv_assert_close(row(r, 0, 1, 0)->recall_mean, recall_of(l1h0, 12), 1e-6, 1e-5, "pooled L1H0");
            kv_assert_close(row(r, 0, 1, 1)->recall_mean, recall_of(l1h1, 12), 1e-6, 1e-5, "pooled L1H1");
        }
        kv_results_free(r);
        kv_free(b);
        kv_policy_free(p);
    }
    kv_trace_close(t);

    /* The metric squares before summing. One layer, one head, window=2 (queries 18 and 19),
     * protect=2, block=1, B=3: one token besides 18, 19. Query 18 follows axis 0 (key 3 weighs 16,
     * key 5 8, the 17 others 1: p = 16/41, 8/41), query 19 axis 1 (key 5 weighs 8, the 19 others
     * 1: p = 8/27, key 3 1/27). Summed, key 5 leads (0.195 + 0.296 = 0.491 vs 0.390 + 0.037 =
     * 0.427); squared, key 3 leads (0.1523 + 0.0014 = 0.1537 vs 0.0381 + 0.0878 = 0.1259). */
    t = wtrace(1, 1, 1, 22, 20, NULL, 0);
    qa(t, 0, 0, 18, 0);
    qa(t, 0, 0, 19, 1);
    kw(t, 0, 0, 3, 0, 16);
    kw(t, 0, 0, 5, 0, 8);
    kw(t, 0, 0, 5, 1, 8);
    for (int i = 20; i < 22; i++)
        qa(t, 0, 0, i, 2);
    for (int j = 0; j < 22; j++)
        kw(t, 0, 0, j, 2, j + 1);
    {
        kv_policy_t *p;
        ck_assert_int_eq(kv_policy_create("kvcompress(window=2,pool=none,block=1,protect=2)", &p), KV_OK);
        kv_budget_t *b;
        int nb;
        ck_assert_int_eq(kv_budget_parse_list("3", &b, &nb), KV_OK);
        kv_results_t *r;
        ck_assert_msg(kv_replay(t, &p, 1, b, nb, be, &o, &r) == KV_OK, "%s", kv_last_error());
        const int want[] = {3, 18, 19};
        ck_assert(row(r, 0, 0, 0)->kept == 3);
        kv_assert_close(row(r, 0, 0, 0)->recall_mean, recall_of(want, 3), 1e-6, 1e-5, "squared metric keeps 3");
        kv_results_free(r);
        kv_free(b);
        kv_policy_free(p);
    }

    /* the probe cannot replay a cross-layer policy: it says so */
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("kvcompress", &p), KV_OK);
    kv_budget_t b1 = {.kind = KV_BUDGET_TOKENS, .value = 8};
    uint8_t mask[2 * 22];
    ck_assert_int_ne(kv_replay_probe(t, 0, p, &b1, 0, NULL, be, mask), KV_OK);
    kv_policy_free(p);
    ck_assert_int_ne(kv_policy_create("kvcompress(kernel=4)", &p), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "odd"));
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

Suite *suite_policies_accum(void)
{
    Suite *s = suite_create("policies_accum");
    TCase *tc = tcase_create("hand");
    tcase_add_test(tc, h2o_oneshot_sum_and_mean);
    tcase_add_test(tc, h2o_decode_eviction_order);
    tcase_add_test(tc, tova_one_token_per_step);
    tcase_add_test(tc, threshold_splits_tokens);
    tcase_add_test(tc, shotkv_shot_choice);
    tcase_add_test(tc, kvcompress_blocks_across_layers);
    suite_add_tcase(s, tc);
    return s;
}
