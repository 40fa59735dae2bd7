/*
 * test_policies_window.c: hand-computed kept sets of the observation-window family (snapkv,
 * pyramidkv, adakv, chunkkv) and of quest, on tiny traces built so the attention is known in
 * closed form; the PyramidKV schedule against the worked example of docs/POLICIES.md; Quest's page
 * bound on random data; oracle >= snapkv >= random on a trace with planted heavy hitters.
 *
 * Closed-form attention ("weight traces"): head_dim 4, so the softmax scale is 1/2; key j of a KV
 * head is (2 ln a_j, 2 ln b_j, 0, 0) and every query of head h is the unit vector on axis[h]
 * (0 unless given). The logit of key j is then ln a_j (or ln b_j), and a window query i attends
 * P[i, j] = a_j / Z_i with Z_i = sum_{t <= i} a_t. Summed over the window queries, the score of a
 * pre-window token is s_j = a_j * A with A = sum_i 1/Z_i, the same factor for every j of a head:
 * SnapKV's ranking inside a head is the ranking of the weights a_j (pooled). Window and decode
 * tokens have weight 1. Where two heads are compared (adakv, chunkkv, gqa) their pre-window
 * weights have equal sums, so their Z_i and A agree (up to float rounding, and no expected set
 * relies on an exact tie between heads), or A is written out in the comment.
 * Exact ties inside a head (equal weights, max pooling of the same entry) are exact in float too
 * and resolve with the project rule: later token first.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "sim/kv_policy.h"
#include "sim/policies/quest.h"
#include "sim/policies/window.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "tests/kv_test.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

enum { D = 4, MAXT = 32, MAXS = 4 };

/* wa, wb: (L, Hkv, T) weights, NULL = 1 everywhere; axis (H), NULL = 0 for every head. */
static kv_trace_t *weight_trace(int L, int H, int Hkv, int T, int NP, const float *wa, const float *wb, const int *axis)
{
    kv_trace_meta_t m = {.n_layers = L, .n_heads = H, .n_kv_heads = Hkv, .head_dim = D, .n_tokens = T, .n_prompt = NP};
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    for (int l = 0; l < L; l++) {
        float *q = kv_trace_mem_tensor(t, l, KV_T_Q), *k = kv_trace_mem_tensor(t, l, KV_T_K);
        float *v = kv_trace_mem_tensor(t, l, KV_T_V);
        for (int g = 0; g < Hkv; g++)
            for (int j = 0; j < T; j++) {
                size_t o = ((size_t)l * Hkv + g) * T + j;
                k[((size_t)g * T + j) * D + 0] = 2.0f * logf(wa ? wa[o] : 1.0f);
                k[((size_t)g * T + j) * D + 1] = 2.0f * logf(wb ? wb[o] : 1.0f);
                v[((size_t)g * T + j) * D + (j % D)] = 1.0f;
            }
        for (int h = 0; h < H; h++)
            for (int i = 0; i < T; i++)
                q[((size_t)h * T + i) * D + (axis ? axis[h] : 0)] = 1.0f;
    }
    return t;
}

/* One row of weights: the given pre-window weights, then 1 (window and decode tokens). */
static void row(float *w, int T, const float *past, int n_past)
{
    for (int j = 0; j < T; j++)
        w[j] = j < n_past ? past[j] : 1.0f;
}

/* The cache mask (S, T) that evaluation query e reads at `layer` for budget B. */
static void probe(kv_trace_t *t, int layer, const char *spec, int B, int e, uint8_t *mask)
{
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = B};
    memset(mask, 0xee, MAXS * MAXT);
    ck_assert_msg(kv_replay_probe(t, layer, p, &b, e, NULL, be, mask) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_backend_close(be);
    kv_policy_free(p);
}

/* Storage head s of mask (stride T) holds exactly `want` among tokens [0, upto). */
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

/* ---------------------------------------------------------------- snapkv */

/* 12 context tokens = 8 pre-window + window 4, 2 decode tokens, kernel 3. Head 0 weights
 *   a     = [12, 1, 1, 1, 5, 6, 4, 1]
 * avg pool, count_include_pad (sum of 3 neighbours / 3, padding = 0):
 *   sums  = [13, 14, 3, 7, 12, 15, 11, 5]     -> rank 5 (15), 1 (14), 0 (13), 4 (12), 6, 3, 7, 2
 *   (count_exclude_pad would give token 0 13/2 = 6.5, the best, and token 7 5/2)
 * max pool: [12, 12, 1, 5, 6, 6, 6, 4]      -> 1, 0 (12, tie: later first), 6, 5, 4 (6), 3, 7, 2
 * no pool:  a                               -> 0 (12), 5 (6), 4 (5), 6 (4), then the 1s
 * Head 1 (second KV head) has the mirrored weights, so every set mirrors (j -> 7 - j), except
 * that ties still go to the later token. */
START_TEST(snapkv_pooling_and_window)
{
    enum { T = 14, NP = 12 };
    const float a[8] = {12, 1, 1, 1, 5, 6, 4, 1}, r[8] = {1, 4, 6, 5, 1, 1, 1, 12};
    float wa[2 * T];
    row(wa, T, a, 8);
    row(wa + T, T, r, 8);
    kv_trace_t *t = weight_trace(1, 2, 2, T, NP, wa, NULL, NULL);
    uint8_t mask[MAXS * MAXT];
    const char *qagg[2] = {"sum", "mean"}; /* mean = sum / w: the same ranking */
    char spec[128];
    for (int qa = 0; qa < 2; qa++) {
        /* avg pooling, B = 6: window 8..11 + the top 2: {5, 1} (count_include_pad drops token 0) */
        snprintf(spec, sizeof spec, "snapkv(window=4,kernel=3,pool=avg,qagg=%s)", qagg[qa]);
        probe(t, 0, spec, 6, 0, mask);
        EXPECT(mask, T, 0, NP, spec, 5, 1, 8, 9, 10, 11);
        EXPECT(mask, T, 1, NP, spec, 2, 6, 8, 9, 10, 11);
        probe(t, 0, spec, 7, 0, mask);
        EXPECT(mask, T, 0, NP, spec, 5, 1, 0, 8, 9, 10, 11);
        /* max pooling: B = 6 keeps the tied pair {0, 1}; B = 7 adds 6 of the tied 4, 5, 6; B = 8 adds 5 */
        snprintf(spec, sizeof spec, "snapkv(window=4,kernel=3,pool=max,qagg=%s)", qagg[qa]);
        probe(t, 0, spec, 6, 0, mask);
        EXPECT(mask, T, 0, NP, spec, 0, 1, 8, 9, 10, 11);
        EXPECT(mask, T, 1, NP, spec, 6, 7, 8, 9, 10, 11);
        probe(t, 0, spec, 7, 0, mask);
        EXPECT(mask, T, 0, NP, spec, 0, 1, 6, 8, 9, 10, 11);
        EXPECT(mask, T, 1, NP, spec, 3, 6, 7, 8, 9, 10, 11); /* mirrored tie 1, 2, 3: later first */
        probe(t, 0, spec, 8, 0, mask);
        EXPECT(mask, T, 0, NP, spec, 0, 1, 5, 6, 8, 9, 10, 11);
        EXPECT(mask, T, 1, NP, spec, 2, 3, 6, 7, 8, 9, 10, 11);
    }
    probe(t, 0, "snapkv(window=4,pool=none)", 7, 0, mask);
    EXPECT(mask, T, 0, NP, "no pooling", 0, 5, 4, 8, 9, 10, 11);
    EXPECT(mask, T, 1, NP, "no pooling", 7, 2, 3, 8, 9, 10, 11);
    /* the window is inside the budget: B = 4 is the window alone, B = 3 its last 3 tokens */
    probe(t, 0, "snapkv(window=4,kernel=3)", 4, 0, mask);
    EXPECT(mask, T, 0, NP, "window only", 8, 9, 10, 11);
    probe(t, 0, "snapkv(window=4,kernel=3)", 3, 0, mask);
    EXPECT(mask, T, 1, NP, "budget below the window", 9, 10, 11);
    /* B >= n_ctx keeps everything, and decode tokens are appended */
    probe(t, 0, "snapkv(window=4,kernel=3)", 12, 1, mask);
    EXPECT(mask, T, 0, NP, "full budget", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11);
    /* the window longer than the context is clamped: everything is window, the last B kept */
    probe(t, 0, "snapkv(window=32)", 5, 0, mask);
    EXPECT(mask, T, 0, NP, "window clamped", 7, 8, 9, 10, 11);
    kv_trace_close(t);
    /* an even kernel is refused with a message */
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("snapkv(kernel=4)", &p), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "odd"));
}
END_TEST

/* Two query heads share one KV head (G = 2); head 0 reads weights a (axis 0), head 1 weights b
 * (axis 1); both sum to 14 over the pre-window tokens, so A is common. Max pool k = 3, agg = mean.
 *   a = [1, 6, 1, 1, 1, 1, 1, 2]   maxpool a = [6, 6, 6, 1, 1, 1, 2, 2]
 *   b = [1, 1, 1, 7, 1, 1, 1, 1]   maxpool b = [1, 1, 7, 7, 7, 1, 1, 1]
 * after_pool (kvpress): mean of the pooled = [3.5, 3.5, 6.5, 4, 4, 1, 1.5, 1.5] -> 2, then 4, 3
 * before_pool (KCF HEAD / AdaKV): mean = [1, 3.5, 1, 4, 1, 1, 1, 1.5], pooled
 *                                 = [3.5, 3.5, 4, 4, 4, 1, 1.5, 1.5] -> 4, 3, 2 (tie: later first)
 * gran=query: head 0 alone -> 2 (tie 0, 1, 2: later first), head 1 alone -> 4 (tie 2, 3, 4). */
START_TEST(snapkv_group_before_after_pool)
{
    enum { T = 14, NP = 12 };
    const float a[8] = {1, 6, 1, 1, 1, 1, 1, 2}, b[8] = {1, 1, 1, 7, 1, 1, 1, 1};
    const int axis[2] = {0, 1};
    float wa[T], wb[T];
    row(wa, T, a, 8);
    row(wb, T, b, 8);
    kv_trace_t *t = weight_trace(1, 2, 1, T, NP, wa, wb, axis);
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "snapkv(window=4,kernel=3,gqa=after_pool)", 5, 0, mask);
    EXPECT(mask, T, 0, NP, "after pool B=5", 2, 8, 9, 10, 11);
    probe(t, 0, "snapkv(window=4,kernel=3,gqa=after_pool)", 6, 0, mask);
    EXPECT(mask, T, 0, NP, "after pool B=6", 2, 4, 8, 9, 10, 11);
    probe(t, 0, "snapkv(window=4,kernel=3,gqa=before_pool)", 5, 0, mask);
    EXPECT(mask, T, 0, NP, "before pool B=5", 4, 8, 9, 10, 11);
    probe(t, 0, "snapkv(window=4,kernel=3,gqa=before_pool)", 6, 0, mask);
    EXPECT(mask, T, 0, NP, "before pool B=6", 3, 4, 8, 9, 10, 11);
    probe(t, 0, "snapkv(window=4,kernel=3,gran=query)", 5, 0, mask);
    EXPECT(mask, T, 0, NP, "query head 0", 2, 8, 9, 10, 11);
    EXPECT(mask, T, 1, NP, "query head 1", 4, 8, 9, 10, 11);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- pyramidkv */

START_TEST(pyramid_schedule_worked_example)
{
    /* docs/POLICIES.md §2.4: L 32, B 128, w 8, beta 20, long prompt: base 120, min 6, max 234,
     * steps 228 / 31 = 7 */
    static const int want[32] = {234, 227, 220, 213, 206, 199, 192, 185, 178, 171, 164, 157, 150, 143, 136, 129,
                                 122, 115, 108, 101, 94,  87,  80,  73,  66,  59,  52,  45,  38,  31,  24,  17};
    int caps[32], total = 0;
    ck_assert_int_eq(kv_pyramid_caps(32, 128, 8, 20, 4096, caps), KV_PYRAMID_PYRAMID);
    for (int l = 0; l < 32; l++) {
        ck_assert_int_eq(caps[l], want[l]);
        total += caps[l];
    }
    ck_assert_int_eq(total, 4016); /* vs uniform 32 * 120 = 3840: +4.6 % */
    ck_assert_int_eq(total - 32 * 120, 176);

    /* regimes at B 128, w 8 */
    ck_assert_int_eq(kv_pyramid_caps(32, 128, 8, 20, 127, caps), KV_PYRAMID_NONE); /* n < B */
    ck_assert_int_eq(caps[0], 119);                                                /* everything */
    ck_assert_int_eq(caps[31], 119);
    ck_assert_int_eq(kv_pyramid_caps(32, 128, 8, 20, 128, caps), KV_PYRAMID_UNIFORM); /* n = B */
    ck_assert_int_eq(caps[0], 120);
    ck_assert_int_eq(kv_pyramid_caps(32, 128, 8, 20, 239, caps), KV_PYRAMID_UNIFORM); /* n < 2 base */
    ck_assert_int_eq(caps[0], 120);
    ck_assert_int_eq(caps[31], 120);
    /* n = 2 base = 240: pyramid, max 234 >= n - w = 232 is clamped: max 232, min 8, steps 224/31 = 7 */
    ck_assert_int_eq(kv_pyramid_caps(32, 128, 8, 20, 240, caps), KV_PYRAMID_PYRAMID);
    ck_assert_int_eq(caps[0], 232);
    ck_assert_int_eq(caps[1], 225);
    ck_assert_int_eq(caps[31], 232 - 7 * 31);
    /* n = 242: n - w = 234 = max: the clamp changes nothing */
    ck_assert_int_eq(kv_pyramid_caps(32, 128, 8, 20, 242, caps), KV_PYRAMID_PYRAMID);
    ck_assert_int_eq(caps[0], 234);
    ck_assert_int_eq(caps[31], 17);

    /* small L: L 4, B 20, w 4, beta 5: base 16, min 3, max 29, steps 26/3 = 8 -> 29, 21, 13, 5 = 68
     * past tokens vs 64 uniform */
    ck_assert_int_eq(kv_pyramid_caps(4, 20, 4, 5, 100, caps), KV_PYRAMID_PYRAMID);
    ck_assert_int_eq(caps[0], 29);
    ck_assert_int_eq(caps[1], 21);
    ck_assert_int_eq(caps[2], 13);
    ck_assert_int_eq(caps[3], 5);
    /* L 3, B 16, w 4, beta 20: base 12, min 0, max 24, steps 12 -> 24, 12, 0 (exactly uniform in total) */
    ck_assert_int_eq(kv_pyramid_caps(3, 16, 4, 20, 40, caps), KV_PYRAMID_PYRAMID);
    ck_assert_int_eq(caps[0], 24);
    ck_assert_int_eq(caps[1], 12);
    ck_assert_int_eq(caps[2], 0);
    /* undefined in the reference: one layer (division by zero) -> uniform; B <= w -> window only */
    ck_assert_int_eq(kv_pyramid_caps(1, 20, 4, 5, 100, caps), KV_PYRAMID_UNIFORM);
    ck_assert_int_eq(caps[0], 16);
    ck_assert_int_eq(kv_pyramid_caps(3, 8, 8, 20, 100, caps), KV_PYRAMID_UNIFORM);
    ck_assert_int_eq(caps[2], 0);
    ck_assert_int_eq(kv_pyramid_caps(0, 20, 4, 5, 100, caps), KV_EINVAL);
    ck_assert_int_eq(kv_pyramid_caps(3, 20, 4, 0, 100, caps), KV_EINVAL);
}
END_TEST

/* Four layers with the same pre-window weights (12 tokens, window 4, no pooling):
 *   a = [3, 9, 1, 7, 2, 8, 4, 11, 5, 10, 6, 12]  ranking 11, 7, 9, 1, 5, 3, 10, 8, 6, 0, 4, 2
 * B 10, beta 4: base 6, min 1, max 11 (< n - w = 12), steps 10/3 = 3 (floored): caps 11, 8, 5, 2
 * past tokens (+ the window 12..15) in layers 0-3: 26 past tokens instead of 4 x 6 = 24. */
START_TEST(pyramid_kept_sets_per_layer)
{
    enum { L = 4, T = 18, NP = 16 };
    const float a[12] = {3, 9, 1, 7, 2, 8, 4, 11, 5, 10, 6, 12};
    float wa[L * 2 * T];
    for (int x = 0; x < L * 2; x++)
        row(wa + x * T, T, a, 12);
    kv_trace_t *t = weight_trace(L, 2, 2, T, NP, wa, NULL, NULL);
    uint8_t mask[MAXS * MAXT];
    const char *spec = "pyramidkv(window=4,pool=none,beta=4)";
    probe(t, 0, spec, 10, 0, mask);
    EXPECT(mask, T, 0, NP, "layer 0", 11, 7, 9, 1, 5, 3, 10, 8, 6, 0, 4, 12, 13, 14, 15);
    probe(t, 1, spec, 10, 0, mask);
    EXPECT(mask, T, 1, NP, "layer 1", 11, 7, 9, 1, 5, 3, 10, 8, 12, 13, 14, 15);
    probe(t, 2, spec, 10, 0, mask);
    EXPECT(mask, T, 0, NP, "layer 2", 11, 7, 9, 1, 5, 12, 13, 14, 15);
    probe(t, 3, spec, 10, 0, mask);
    EXPECT(mask, T, 1, NP, "layer 3", 11, 7, 12, 13, 14, 15);
    /* uniform regime: B 13 -> base 9 and n = 16 < 2 base = 18: every layer keeps its top 9 + window */
    probe(t, 3, spec, 13, 0, mask);
    EXPECT(mask, T, 0, NP, "uniform regime", 11, 7, 9, 1, 5, 3, 10, 8, 6, 12, 13, 14, 15);
    /* the overshoot is visible in the results: kept 15, 12, 9, 6 per layer, 10.5 on average at B 10 */
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create(spec, &p), KV_OK);
    ck_assert(p->flags & KV_POL_OVER_BUDGET);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = 10};
    snprintf(b.text, sizeof b.text, "10");
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_results_t *r;
    ck_assert_int_eq(kv_replay(t, &p, 1, &b, 1, be, &o, &r), KV_OK);
    const double want_kept[L] = {15, 12, 9, 6};
    int seen = 0;
    for (size_t i = 0; i < r->n; i++) {
        const kv_result_row_t *x = &r->rows[i];
        if (x->head != KV_ALL)
            continue;
        if (x->layer == KV_ALL) {
            ck_assert(x->kept == 10.5);
        } else {
            ck_assert_msg(x->kept == want_kept[x->layer], "layer %d kept %g", x->layer, x->kept);
            seen++;
        }
    }
    ck_assert_int_eq(seen, L);
    kv_results_free(r);
    kv_backend_close(be);
    kv_policy_free(p);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- adakv */

/* Two KV heads (G = 1), window 4, 12 pre-window tokens, no pooling.
 *   head 0 (concentrated) a0 = [1, 2, 1, 1, 3, 50, 1, 1, 1, 1, 40, 1]   sum 103
 *   head 1 (broad)        a1 = [8, 9, 10, ..., 19]                        sum 162
 * Window weights 1, so A_h = sum_{r=1..4} 1/(sum_h + r):
 *   A0 = 1/104 + 1/105 + 1/106 + 1/107 = 0.037919,  A1 = 1/163 + ... + 1/166 = 0.024317
 * scores: head 0: 50 A0 = 1.896 (token 5), 40 A0 = 1.517 (10), 3 A0 = 0.114 (4), 2 A0 = 0.076 (1),
 *         the 1s 0.038; head 1: 19 A1 = 0.462 (11) down to 8 A1 = 0.195 (0): every head-1 token
 *         beats head 0's third.
 * B = 10: base 6, the global top 2 * 6 = 12 is head 0's {5, 10} and head 1's 10 best: c = [2, 10].
 *   interp a = 0.2: int(6 * 0.2) = 1; caps round(2*0.8 + 1) = round(2.6) = 3, round(10*0.8 + 1) = 9
 *   interp a = 0.5: int(3) = 3; caps round(1 + 3) = 4, round(5 + 3) = 8
 *   interp a = 0.25: int(1.5) = 1; caps round(1.5 + 1) = 2, round(7.5 + 1) = 8: halves go to even
 *        (torch.round), half-up would give 3 and 9
 *   floor a = 0.5 (kvpress): int(10 * 0.5) = 5 per head = the window + the head's best token
 *        ({5}, {11}); the other 2 * 10 - 2 * 5 = 10 go to the best remaining entries: head 0's 10
 *        and head 1's 11 ... 2 (9 tokens): head 0 keeps 2 past tokens, head 1 keeps 10.
 * Uniform SnapKV at B = 10 would keep 6 + window in each head. */
START_TEST(adakv_interp_vs_floor)
{
    enum { T = 18, NP = 16 };
    const float a0[12] = {1, 2, 1, 1, 3, 50, 1, 1, 1, 1, 40, 1};
    const float a1[12] = {8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
    float wa[2 * T];
    row(wa, T, a0, 12);
    row(wa + T, T, a1, 12);
    kv_trace_t *t = weight_trace(1, 2, 2, T, NP, wa, NULL, NULL);
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "adakv(inner=snapkv(window=4,pool=none))", 10, 0, mask);
    EXPECT(mask, T, 0, NP, "interp 0.2", 5, 10, 4, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "interp 0.2", 11, 10, 9, 8, 7, 6, 5, 4, 3, 12, 13, 14, 15);
    probe(t, 0, "adakv(inner=snapkv(window=4,pool=none),floor_alpha=0.5)", 10, 0, mask);
    EXPECT(mask, T, 0, NP, "interp 0.5", 5, 10, 4, 1, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "interp 0.5", 11, 10, 9, 8, 7, 6, 5, 4, 12, 13, 14, 15);
    probe(t, 0, "adakv(inner=snapkv(window=4,pool=none),floor_alpha=0.25)", 10, 0, mask);
    EXPECT(mask, T, 0, NP, "interp 0.25", 5, 10, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "interp 0.25", 11, 10, 9, 8, 7, 6, 5, 4, 12, 13, 14, 15);
    probe(t, 0, "adakv(inner=snapkv(window=4,pool=none),safeguard=floor,floor_alpha=0.5)", 10, 0, mask);
    EXPECT(mask, T, 0, NP, "floor 0.5", 5, 10, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "floor 0.5", 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 12, 13, 14, 15);
    probe(t, 0, "snapkv(window=4,pool=none)", 10, 0, mask);
    EXPECT(mask, T, 0, NP, "uniform", 5, 10, 4, 1, 11, 9, 12, 13, 14, 15); /* ties among 1s: later first */
    /* a skipped layer is uniform */
    probe(t, 0, "adakv(inner=snapkv(window=4,pool=none),skip=1)", 10, 0, mask);
    EXPECT(mask, T, 1, NP, "skip", 11, 10, 9, 8, 7, 6, 12, 13, 14, 15);

    /* metadata and the layer total from a replay: head lengths + cu_seqlens = (2 + 3) int32 */
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("adakv(inner=snapkv(window=4,pool=none),floor_alpha=0.5)", &p), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = 10};
    snprintf(b.text, sizeof b.text, "10");
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_results_t *r;
    ck_assert_int_eq(kv_replay(t, &p, 1, &b, 1, be, &o, &r), KV_OK);
    ck_assert(r->rows[0].layer == KV_ALL && r->rows[0].meta_bytes == 20);
    ck_assert(r->rows[0].kept == 10); /* (8 + 12) / 2 */
    kv_results_free(r);
    kv_backend_close(be);
    kv_policy_free(p);
    kv_trace_close(t);
}
END_TEST

START_TEST(adakv_composition_and_labels)
{
    kv_policy_t *p, *q;
    ck_assert_int_eq(kv_policy_create("adakv(inner=pyramidkv(window=16),gran=query,agg=max)", &p), KV_OK);
    /* the inner inherits gran/agg and its canonical label is part of the outer label */
    ck_assert_str_eq(p->label, "adakv(inner=pyramidkv(window=16,kernel=7,pool=max,qagg=sum,gqa=after_pool,beta=20,"
                               "schedule=kvcache_factory,gran=query,agg=max),safeguard=interp,floor_alpha=0.2,skip=0,"
                               "normalize=0,gran=query,agg=max)");
    ck_assert_int_eq(p->inner->gran, KV_GRAN_QUERY);
    ck_assert(p->flags & KV_POL_OVER_BUDGET);
    ck_assert(!(p->flags & KV_POL_NESTED));
    ck_assert_int_eq(kv_policy_create(p->label, &q), KV_OK);
    ck_assert_str_eq(q->label, p->label);
    kv_policy_free(q);
    kv_policy_free(p);
    ck_assert_int_eq(kv_policy_create("adakv", &p), KV_OK);
    ck_assert(p->flags & KV_POL_BUDGET_LAYER);
    ck_assert_ptr_nonnull(strstr(p->label, "inner=snapkv(window=32,kernel=7,pool=max,qagg=mean,gqa=before_pool"));
    kv_policy_free(p);
    /* contradicting granularity, a non-scorer inner, a bad inner spec */
    ck_assert_int_eq(kv_policy_create("adakv(inner=snapkv(gran=query))", &p), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "gran"));
    ck_assert_int_eq(kv_policy_create("adakv(inner=oracle)", &p), KV_EINVAL);
    ck_assert_int_eq(kv_policy_create("adakv(inner=chunkkv)", &p), KV_EINVAL);
    ck_assert_int_eq(kv_policy_create("adakv(inner=nosuch)", &p), KV_EINVAL);
    ck_assert_int_eq(kv_policy_create("chunkkv(inner=pyramidkv)", &p), KV_EINVAL);
}
END_TEST

/* Ada-PyramidKV: the layer's base is the pyramid cap. Same weights in 3 layers as
 * adakv_interp_vs_floor, inner pyramidkv(window=4, beta=4), B = 10: base 6, min 1, max 11, steps 5
 * -> per-layer bases 11, 6, 1. Layer 2 (base 1): the global top 2 = head 0's {5, 10}: c = [2, 0],
 * int(1 * 0.2) = 0, caps round(1.6) = 2 and 0. */
START_TEST(adakv_pyramid_inner)
{
    enum { L = 3, T = 18, NP = 16 };
    const float a0[12] = {1, 2, 1, 1, 3, 50, 1, 1, 1, 1, 40, 1};
    const float a1[12] = {8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
    float wa[L * 2 * T];
    for (int l = 0; l < L; l++) {
        row(wa + (l * 2) * T, T, a0, 12);
        row(wa + (l * 2 + 1) * T, T, a1, 12);
    }
    kv_trace_t *t = weight_trace(L, 2, 2, T, NP, wa, NULL, NULL);
    uint8_t mask[MAXS * MAXT];
    const char *spec = "adakv(inner=pyramidkv(window=4,pool=none,beta=4))";
    probe(t, 2, spec, 10, 0, mask);
    EXPECT(mask, T, 0, NP, "ada-pyramid layer 2", 5, 10, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "ada-pyramid layer 2", 12, 13, 14, 15);
    /* layer 1, base 6: as Ada-SnapKV at B = 10 */
    probe(t, 1, spec, 10, 0, mask);
    EXPECT(mask, T, 0, NP, "ada-pyramid layer 1", 5, 10, 4, 12, 13, 14, 15);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- chunkkv */

/* Two KV heads, window 4, 12 pre-window tokens in chunks of 5: [0,5), [5,10), [10,12) (partial).
 *   head 0 = [2, 2, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2]   sum 20
 *   head 1 = [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 5]   sum 20 (same A)
 * summed over the heads: [3, 3, 3, 3, 3, 2, 2, 2, 2, 3, 7, 7]
 *   chunk sums 15, 11, 14 (sum: chunk 0 first); means 3, 2.2, 7 (mean: chunk 2 first)
 * On its own head 1 would prefer chunk 2 (sums 5, 5, 10): the set is shared, from the sum. */
START_TEST(chunkkv_chunks)
{
    enum { T = 18, NP = 16 };
    const float h0[12] = {2, 2, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2}, h1[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 5};
    float wa[2 * T];
    row(wa, T, h0, 12);
    row(wa + T, T, h1, 12);
    kv_trace_t *t = weight_trace(1, 2, 2, T, NP, wa, NULL, NULL);
    uint8_t mask[MAXS * MAXT];
    const char *sum = "chunkkv(chunk=5,inner=snapkv(window=4,pool=none))";
    const char *mean = "chunkkv(chunk=5,score=mean,inner=snapkv(window=4,pool=none))";
    /* B 9: floor((9 - 4) / 5) = 1 chunk */
    probe(t, 0, sum, 9, 0, mask);
    EXPECT(mask, T, 0, NP, "sum, 1 chunk", 0, 1, 2, 3, 4, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "sum, 1 chunk (shared)", 0, 1, 2, 3, 4, 12, 13, 14, 15);
    probe(t, 0, mean, 9, 0, mask);
    EXPECT(mask, T, 0, NP, "mean, 1 chunk", 10, 11, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "mean, 1 chunk", 10, 11, 12, 13, 14, 15);
    /* B 14: 2 chunks, the same two for both scores */
    probe(t, 0, sum, 14, 0, mask);
    EXPECT(mask, T, 1, NP, "sum, 2 chunks", 0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15);
    probe(t, 0, mean, 14, 0, mask);
    EXPECT(mask, T, 0, NP, "mean, 2 chunks", 0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 15);
    /* B 8: no chunk fits -> the window; B 3: the last 3 tokens; B 16: everything */
    probe(t, 0, sum, 8, 0, mask);
    EXPECT(mask, T, 0, NP, "no chunk fits", 12, 13, 14, 15);
    probe(t, 0, sum, 3, 0, mask);
    EXPECT(mask, T, 1, NP, "below the window", 13, 14, 15);
    probe(t, 0, sum, 16, 0, mask);
    EXPECT(mask, T, 0, NP, "full", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    kv_trace_close(t);
}
END_TEST

/* Layer-wise reuse over 3 layers: layer 0 has the weights of chunkkv_chunks (sum picks chunk 0 at
 * B 9), layers 1 and 2 have both heads = [1 x 10, 5, 5] (chunk sums 5, 5, 10: chunk 2). With
 * reuse=2, layer 1 follows layer 0 (chunk 0) and layer 2 leads a new block (chunk 2). */
START_TEST(chunkkv_layer_reuse)
{
    enum { L = 3, T = 18, NP = 16 };
    const float h0[12] = {2, 2, 2, 2, 2, 1, 1, 1, 1, 2, 2, 2}, h1[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 5, 5};
    float wa[L * 2 * T];
    row(wa, T, h0, 12);
    row(wa + T, T, h1, 12);
    for (int x = 2; x < L * 2; x++)
        row(wa + x * T, T, h1, 12);
    kv_trace_t *t = weight_trace(L, 2, 2, T, NP, wa, NULL, NULL);
    uint8_t mask[MAXS * MAXT];
    const char *off = "chunkkv(chunk=5,inner=snapkv(window=4,pool=none))";
    const char *on = "chunkkv(chunk=5,reuse=2,inner=snapkv(window=4,pool=none))";
    probe(t, 1, off, 9, 0, mask);
    EXPECT(mask, T, 0, NP, "layer 1, no reuse", 10, 11, 12, 13, 14, 15);
    probe(t, 1, on, 9, 0, mask);
    EXPECT(mask, T, 0, NP, "layer 1 reuses layer 0", 0, 1, 2, 3, 4, 12, 13, 14, 15);
    EXPECT(mask, T, 1, NP, "layer 1 reuses layer 0", 0, 1, 2, 3, 4, 12, 13, 14, 15);
    probe(t, 2, on, 9, 0, mask);
    EXPECT(mask, T, 0, NP, "layer 2 leads", 10, 11, 12, 13, 14, 15);
    /* reuse=3: layer 2 still follows layer 0 */
    probe(t, 2, "chunkkv(chunk=5,reuse=3,inner=snapkv(window=4,pool=none))", 9, 0, mask);
    EXPECT(mask, T, 0, NP, "layer 2 follows layer 0", 0, 1, 2, 3, 4, 12, 13, 14, 15);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- quest */

START_TEST(quest_bound_is_an_upper_bound)
{
    enum { DQ = 8, NPAGE = 16 };
    kv_rng_t r;
    kv_rng_seed(&r, 2024);
    float k[NPAGE * DQ], q[DQ], kmin[DQ], kmax[DQ];
    for (int trial = 0; trial < 2000; trial++) {
        const int n = 1 + (int)kv_rng_below(&r, NPAGE);
        for (int x = 0; x < n * DQ; x++)
            k[x] = (float)(kv_rng_normal(&r) * (1 + trial % 5));
        for (int x = 0; x < DQ; x++)
            q[x] = (float)kv_rng_normal(&r);
        kv_quest_page_minmax(k, n, DQ, kmin, kmax);
        const float u = kv_quest_page_bound(q, kmin, kmax, DQ);
        for (int j = 0; j < n; j++) {
            float dot = 0, mag = 0;
            for (int x = 0; x < DQ; x++) {
                dot += q[x] * k[j * DQ + x];
                mag += fabsf(q[x] * k[j * DQ + x]);
            }
            /* each term of U bounds q_d k_d exactly; only the two float sums of DQ terms differ in
             * rounding: 1e-5 of the sum of magnitudes is ~100 ulps */
            ck_assert_msg(u >= dot - 1e-5f * mag - 1e-6f, "trial %d: U %g < q.k %g", trial, u, dot);
            if (n == 1) /* a one-key page: the bound is that key's dot product */
                kv_assert_close(u, dot, 1e-6, 1e-5, "U of a single-key page");
        }
    }
}
END_TEST

/* One KV head, two query heads, head_dim 4 (channels 0, 1 used), 12 context tokens + 2 decode,
 * pages of 4: page 0 = tokens 0-3, keys (-4, -4); page 1 = 4-7, keys (3, 0), (0, 3), (0, 0), (0, 0);
 * page 2 = 8-11, keys (2, 2), (2, 2), (1, 1), (1, 1); tokens 12, 13 keys (0, 0).
 * Query head 0 = (1, 1), head 1 = (-1, -1). U = sum_d max(q_d max_d, q_d min_d):
 *   head 0: page 0 -8, page 1 3 + 3 = 6, page 2 2 + 2 = 4
 *           (page 1 wins although its best key scores 3 and page 2 holds 4: U is only a bound)
 *   head 1: page 0 4 + 4 = 8, page 1 0 + 0 = 0, page 2 -1 - 1 = -2
 *   group mean: 0, 3, 1 (page 1, then 2); group max: 8, 6, 4 (page 0, then 1)
 * Query 12 (evaluation 0) has the last page = {12}; B 8 = 2 pages: the last + 1. */
START_TEST(quest_page_selection)
{
    enum { T = 14, NP = 12 };
    kv_trace_meta_t m = {.n_layers = 1, .n_heads = 2, .n_kv_heads = 1, .head_dim = D, .n_tokens = T, .n_prompt = NP};
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    float *q = kv_trace_mem_tensor(t, 0, KV_T_Q), *k = kv_trace_mem_tensor(t, 0, KV_T_K);
    float *v = kv_trace_mem_tensor(t, 0, KV_T_V);
    const float keys[T][2] = {{-4, -4}, {-4, -4}, {-4, -4}, {-4, -4}, {3, 0}, {0, 3}, {0, 0},
                              {0, 0},   {2, 2},   {2, 2},   {1, 1},   {1, 1}, {0, 0}, {0, 0}};
    for (int j = 0; j < T; j++) {
        k[j * D] = keys[j][0];
        k[j * D + 1] = keys[j][1];
        v[j * D + j % D] = 1;
    }
    for (int i = 0; i < T; i++)
        for (int x = 0; x < 2; x++) {
            q[(0 * T + i) * D + x] = 1;
            q[(1 * T + i) * D + x] = -1;
        }
    uint8_t mask[MAXS * MAXT];
    probe(t, 0, "quest(page=4,dense_layers=0,gran=query)", 8, 0, mask);
    EXPECT(mask, T, 0, T, "query head 0", 4, 5, 6, 7, 12);
    EXPECT(mask, T, 1, T, "query head 1", 0, 1, 2, 3, 12);
    probe(t, 0, "quest(page=4,dense_layers=0)", 8, 0, mask);
    EXPECT(mask, T, 0, T, "group mean", 4, 5, 6, 7, 12);
    probe(t, 0, "quest(page=4,dense_layers=0,agg=max)", 8, 0, mask);
    EXPECT(mask, T, 0, T, "group max", 0, 1, 2, 3, 12);
    probe(t, 0, "quest(page=4,dense_layers=0)", 12, 0, mask);
    EXPECT(mask, T, 0, T, "3 pages", 4, 5, 6, 7, 8, 9, 10, 11, 12);
    /* query 13: the last page is {12, 13} */
    probe(t, 0, "quest(page=4,dense_layers=0)", 8, 1, mask);
    EXPECT(mask, T, 0, T, "second decode step", 4, 5, 6, 7, 12, 13);
    /* one page: only the last; less than a page: the last tokens of the last page */
    probe(t, 0, "quest(page=4,dense_layers=0)", 5, 1, mask);
    EXPECT(mask, T, 0, T, "one page", 12, 13);
    probe(t, 0, "quest(page=4,dense_layers=0)", 3, 0, mask);
    EXPECT(mask, T, 0, T, "less than a page", 12);
    /* budget >= current length, or a dense layer: everything read */
    probe(t, 0, "quest(page=4,dense_layers=0)", 13, 0, mask);
    EXPECT(mask, T, 0, T, "dense (budget)", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12);
    probe(t, 0, "quest(page=4,dense_layers=1)", 8, 1, mask);
    EXPECT(mask, T, 0, T, "dense layer", 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13);

    /* memory: nothing evicted (14 tokens x 4 dims x K,V x f32) + metadata ceil(14/4) = 4 pages x
     * min,max x 4 dims x f32, per storage head */
    kv_policy_t *p;
    ck_assert_int_eq(kv_policy_create("quest(page=4,dense_layers=0)", &p), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = 8};
    snprintf(b.text, sizeof b.text, "8");
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_results_t *r;
    ck_assert_int_eq(kv_replay(t, &p, 1, &b, 1, be, &o, &r), KV_OK);
    ck_assert(r->rows[0].layer == KV_ALL);
    ck_assert(r->rows[0].mem_bytes == 14.0 * 4 * 2 * 4);
    ck_assert(r->rows[0].meta_bytes == 4.0 * 2 * 4 * 4);
    ck_assert(r->rows[0].cache_peak <= 8);
    kv_results_free(r);
    kv_backend_close(be);
    kv_policy_free(p);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- planted heavy hitters */

/* Gaussian Q, K, V plus, per KV head, a direction u (|u| ~ 3) added to every query of the group and
 * 6 "heavy" keys equal to 2u at random context positions: every query (window and decode) gives
 * those keys logits ~ 2|u|^2 / sqrt(d) = 4.5 above the rest, about two thirds of its mass. */
static kv_trace_t *planted_trace(int L, int H, int Hkv, int d, int T, int NP, int n_heavy, unsigned long long seed)
{
    kv_trace_meta_t m = {.n_layers = L, .n_heads = H, .n_kv_heads = Hkv, .head_dim = d, .n_tokens = T, .n_prompt = NP};
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    kv_rng_t r;
    kv_rng_seed(&r, seed);
    float u[64];
    ck_assert(d <= 64);
    for (int l = 0; l < L; l++) {
        float *q = kv_trace_mem_tensor(t, l, KV_T_Q), *k = kv_trace_mem_tensor(t, l, KV_T_K);
        float *v = kv_trace_mem_tensor(t, l, KV_T_V);
        for (size_t x = 0; x < (size_t)Hkv * T * d; x++) {
            k[x] = (float)kv_rng_normal(&r);
            v[x] = (float)kv_rng_normal(&r);
        }
        for (size_t x = 0; x < (size_t)H * T * d; x++)
            q[x] = (float)kv_rng_normal(&r);
        for (int g = 0; g < Hkv; g++) {
            for (int x = 0; x < d; x++)
                u[x] = 3.0f * (float)kv_rng_normal(&r) / sqrtf((float)d);
            for (int h = g * (H / Hkv); h < (g + 1) * (H / Hkv); h++)
                for (int i = 0; i < T; i++)
                    for (int x = 0; x < d; x++)
                        q[((size_t)h * T + i) * d + x] += u[x];
            for (int c = 0; c < n_heavy; c++) {
                const int j = (int)kv_rng_below(&r, (uint64_t)(NP - 16));
                for (int x = 0; x < d; x++)
                    k[((size_t)g * T + j) * d + x] = 2.0f * u[x];
            }
        }
    }
    return t;
}

/* oracle >= snapkv >= random in mean recall at every budget (issue 3). The heavy hitters are
 * isolated tokens, so SnapKV is run without pooling at every budget; with its default max pooling
 * (k 7) each heavy hitter brings its 6 neighbours along, which only pays once the budget holds
 * those 7-token clusters (here B >= 64): below that, whole clusters around the top hitters crowd
 * out the others and random can do better -- SnapKV's real behaviour on such a trace, not a bug. */
START_TEST(planted_heavy_hitters)
{
    kv_trace_t *t = planted_trace(2, 4, 2, 16, 140, 128, 6, 1);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(2, &be), KV_OK);
    kv_policy_t **ps;
    int np, nb;
    ck_assert_int_eq(kv_policy_create_list("oracle,snapkv(window=8,pool=none),snapkv(window=8),random", &ps, &np),
                     KV_OK);
    kv_budget_t *b;
    ck_assert_int_eq(kv_budget_parse_list("16,32,64,96", &b, &nb), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    o.head_rows = 0;
    kv_results_t *r;
    ck_assert_int_eq(kv_replay(t, ps, np, b, nb, be, &o, &r), KV_OK);
    double rec[4][4] = {{0}};
    for (size_t i = 0; i < r->n; i++)
        if (r->rows[i].layer == KV_ALL)
            rec[r->rows[i].policy][r->rows[i].budget] = r->rows[i].recall_mean;
    const int B[4] = {16, 32, 64, 96};
    for (int k = 0; k < nb; k++) {
        /* the oracle maximises each query's group recall at B tokens: exact inequality (float slack) */
        ck_assert_msg(rec[0][k] >= rec[1][k] - 1e-6, "B=%d: oracle %g < snapkv %g", B[k], rec[0][k], rec[1][k]);
        /* measured margins are 0.2-0.43 for this seed; 0.1 leaves room for float-level changes */
        ck_assert_msg(rec[1][k] >= rec[3][k] + 0.1, "B=%d: snapkv %g vs random %g", B[k], rec[1][k], rec[3][k]);
        if (B[k] >= 64)
            ck_assert_msg(rec[2][k] >= rec[3][k], "B=%d: snapkv maxpool %g < random %g", B[k], rec[2][k], rec[3][k]);
    }
    kv_results_free(r);
    for (int i = 0; i < np; i++)
        kv_policy_free(ps[i]);
    kv_free(ps);
    kv_free(b);
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

Suite *suite_policies_window(void)
{
    Suite *s = suite_create("policies_window");
    TCase *tc = tcase_create("hand");
    tcase_add_test(tc, snapkv_pooling_and_window);
    tcase_add_test(tc, snapkv_group_before_after_pool);
    tcase_add_test(tc, pyramid_schedule_worked_example);
    tcase_add_test(tc, pyramid_kept_sets_per_layer);
    tcase_add_test(tc, adakv_interp_vs_floor);
    tcase_add_test(tc, adakv_composition_and_labels);
    tcase_add_test(tc, adakv_pyramid_inner);
    tcase_add_test(tc, chunkkv_chunks);
    tcase_add_test(tc, chunkkv_layer_reuse);
    tcase_add_test(tc, quest_bound_is_an_upper_bound);
    tcase_add_test(tc, quest_page_selection);
    tcase_add_test(tc, planted_heavy_hitters);
    suite_add_tcase(s, tc);
    return s;
}
