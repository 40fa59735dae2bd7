/*
 * test_policies_review.c: checks from the review of sim/policies/ against docs/POLICIES.md.
 *
 *   - hand-computed kept sets for the discrepancies the review fixed (each test names the fix);
 *   - the decode-time contract of every registered decode policy and variant at tiny budgets: the
 *     cache a query reads holds its own token, at most B tokens, and nothing from its future;
 *   - every declared variant (not only the defaults) reused from a small trace on a larger one
 *     gives what a fresh policy gives (per-layer buffers follow the trace);
 *   - an independent double-precision re-implementation of the reference algorithms (SnapKV §1 /
 *     §2.3 with every pooling and GQA option, PyramidKV §2.4, Ada-KV's two safeguards §2.5,
 *     ChunkKV §2.7, KVCache-Factory's causal H2O and kvpress's ObservedAttention §2.2), written from
 *     the spec and not from the policy code, must select exactly the policies' kept sets on a
 *     random trace. Gaussian data make near-ties between different tokens improbable (float vs
 *     double scores differ by ~1e-7 relative); the exact ties that max pooling creates are exact in
 *     both, and both resolve them with the project rule (later token first).
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "tests/kv_test.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAXS = 8, MAXT = 64 };

/* The cache mask (n_store, T) that evaluation query e reads at `layer` for a budget of B tokens. */
static void probe(kv_trace_t *t, int layer, const char *spec, int B, int e, uint8_t *mask)
{
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    kv_budget_t b = {.kind = KV_BUDGET_TOKENS, .value = B};
    memset(mask, 0xee, (size_t)MAXS * MAXT);
    ck_assert_msg(kv_replay_probe(t, layer, p, &b, e, NULL, be, mask) == KV_OK, "%s: %s", spec, kv_last_error());
    kv_backend_close(be);
    kv_policy_free(p);
}

/* Storage head s of mask (row stride T) holds exactly `want` among tokens [0, upto). */
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

/* Calls fn(spec) for a policy's defaults and every declared variant, at granularity `gran`. */
static void for_each_variant(const kv_policy_desc_t *d, const char *gran, void (*fn)(const char *spec, void *arg),
                             void *arg)
{
    char spec[512];
    snprintf(spec, sizeof spec, "%s(gran=%s)", d->name, gran);
    fn(spec, arg);
    for (const char *v = d->variants; v && *v;) {
        const char *semi = strchr(v, ';');
        int len = semi ? (int)(semi - v) : (int)strlen(v);
        snprintf(spec, sizeof spec, "%s(%.*s,gran=%s)", d->name, len, v, gran);
        fn(spec, arg);
        v = semi ? semi + 1 : NULL;
    }
}

/* ---------------------------------------------------------------- streaming_llm below the sinks */

/* Fix: a budget below the sinks. Before the review, mode=decode with B <= sinks read the first B
 * tokens and NOT its own token (tokens 0..3 for every query at B = 4, breaking the decode contract),
 * and mode=oneshot kept the LAST B sinks (the engine's +inf ties resolve later-first: tokens 1, 2, 3
 * at B = 3) although the sinks that matter are the first tokens.
 * 12 context tokens + 2 decode tokens (positions only matter), sinks = 4:
 *   oneshot B 3: {0, 1, 2}; B 4: {0..3}; B 6: {0..3} + the 2 most recent {10, 11}
 *   decode, query 12 (e = 0), B 4: {0, 1, 2} + 12; query 13: {0, 1, 2} + 13;
 *           B 1: {13}; B 5: {0..3} + 13; B 6: {0..3} + {12, 13}
 *   sinks 2, B 2, query 13: {0, 13}. */
START_TEST(streaming_llm_budget_below_sinks)
{
    enum { T = 14, NP = 12 };
    kv_trace_t *t = kv_test_trace(1, 2, 2, 8, T, NP, 0, 0, 3);
    uint8_t mask[MAXS * MAXT];
    const char *grans[2] = {"kv", "query"};
    char spec[96];
    for (int gi = 0; gi < 2; gi++) {
        snprintf(spec, sizeof spec, "streaming_llm(sinks=4,gran=%s)", grans[gi]);
        probe(t, 0, spec, 3, 0, mask);
        EXPECT(mask, T, 0, NP, spec, 0, 1, 2);
        EXPECT(mask, T, 1, NP, spec, 0, 1, 2);
        probe(t, 0, spec, 4, 1, mask);
        EXPECT(mask, T, 1, NP, spec, 0, 1, 2, 3);
        probe(t, 0, spec, 6, 1, mask);
        EXPECT(mask, T, 0, NP, spec, 0, 1, 2, 3, 10, 11);
        snprintf(spec, sizeof spec, "streaming_llm(sinks=4,mode=decode,gran=%s)", grans[gi]);
        probe(t, 0, spec, 4, 0, mask);
        EXPECT(mask, T, 0, T, spec, 0, 1, 2, 12);
        EXPECT(mask, T, 1, T, spec, 0, 1, 2, 12);
        probe(t, 0, spec, 4, 1, mask);
        EXPECT(mask, T, 1, T, spec, 0, 1, 2, 13);
        probe(t, 0, spec, 1, 1, mask);
        EXPECT(mask, T, 0, T, spec, 13);
        probe(t, 0, spec, 5, 1, mask);
        EXPECT(mask, T, 0, T, spec, 0, 1, 2, 3, 13);
        probe(t, 0, spec, 6, 1, mask);
        EXPECT(mask, T, 1, T, spec, 0, 1, 2, 3, 12, 13);
    }
    probe(t, 0, "streaming_llm(sinks=2,mode=decode)", 2, 1, mask);
    EXPECT(mask, T, 0, T, "sinks 2, B 2", 0, 13);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- decode-time contract */

enum { CL = 3, CH = 4, CHKV = 2, CD = 16, CT = 40, CNP = 32 };

static void check_decode_spec(const char *spec, void *arg)
{
    kv_trace_t *t = arg;
    kv_policy_t *p;
    ck_assert_msg(kv_policy_create(spec, &p) == KV_OK, "%s: %s", spec, kv_last_error());
    const int decode = (p->flags & KV_POL_DECODE) != 0, S = p->gran == KV_GRAN_KV ? CHKV : CH;
    kv_policy_free(p);
    if (!decode)
        return;
    const int budgets[] = {1, 2, 3, 5, 9, 33}, evals[] = {0, 3, CT - CNP - 1};
    uint8_t mask[MAXS * MAXT];
    for (int bi = 0; bi < 6; bi++)
        for (int ei = 0; ei < 3; ei++) {
            const int B = budgets[bi], e = evals[ei], i = CNP + e;
            probe(t, CL - 1, spec, B, e, mask);
            for (int s = 0; s < S; s++) {
                const uint8_t *mk = mask + (size_t)s * CT;
                int held = 0;
                for (int j = 0; j <= i; j++)
                    held += mk[j] != 0;
                ck_assert_msg(mk[i], "%s B=%d: query %d does not read its own token (head %d)", spec, B, i, s);
                ck_assert_msg(held <= B, "%s B=%d: query %d reads %d tokens (head %d)", spec, B, i, held, s);
                for (int j = i + 1; j < CT; j++)
                    ck_assert_msg(!mk[j], "%s B=%d: query %d reads future token %d (head %d)", spec, B, i, j, s);
            }
        }
}

/* Every decode-time policy and variant, both granularities, at budgets down to 1 (the contract
 * suite starts at 8): a decode query reads its own token, at most B tokens and no later token.
 * Quest's dense layers are 0 and 1 by default; the probe reads layer 2, where it selects pages. */
START_TEST(decode_caches_hold_the_query_token)
{
    kv_trace_t *t = kv_test_trace(CL, CH, CHKV, CD, CT, CNP, 4, 0, 77);
    ck_assert_ptr_nonnull(t);
    for (int k = 0; k < kv_policy_count(); k++) {
        for_each_variant(kv_policy_desc_at(k), "kv", check_decode_spec, t);
        for_each_variant(kv_policy_desc_at(k), "query", check_decode_spec, t);
    }
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- reuse across traces */

typedef struct {
    kv_trace_t *small, *big;
    kv_backend_t *be;
} reuse_ctx_t;

static void check_reuse_spec(const char *spec, void *arg)
{
    reuse_ctx_t *x = arg;
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list("3,8,24", &b, &nb), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_policy_t *reused, *fresh;
    ck_assert_msg(kv_policy_create(spec, &reused) == KV_OK, "%s: %s", spec, kv_last_error());
    ck_assert_int_eq(kv_policy_create(spec, &fresh), KV_OK);
    kv_results_t *r0, *r1, *r2;
    ck_assert_msg(kv_replay(x->small, &reused, 1, b, nb, x->be, &o, &r0) == KV_OK, "%s: %s", spec, kv_last_error());
    ck_assert_msg(kv_replay(x->big, &reused, 1, b, nb, x->be, &o, &r1) == KV_OK, "%s: %s", spec, kv_last_error());
    ck_assert_msg(kv_replay(x->big, &fresh, 1, b, nb, x->be, &o, &r2) == KV_OK, "%s: %s", spec, kv_last_error());
    ck_assert_uint_eq(r1->n, r2->n);
    for (size_t i = 0; i < r1->n; i++)
        ck_assert_msg(r1->rows[i].recall_mean == r2->rows[i].recall_mean && r1->rows[i].kept == r2->rows[i].kept &&
                          r1->rows[i].cache_peak == r2->rows[i].cache_peak &&
                          r1->rows[i].meta_bytes == r2->rows[i].meta_bytes,
                      "%s: row %zu differs after reuse", spec, i);
    kv_results_free(r0);
    kv_results_free(r1);
    kv_results_free(r2);
    kv_policy_free(reused);
    kv_policy_free(fresh);
    kv_free(b);
}

/* The contract suite checks the defaults; the variants have their own buffers (Ada-KV's ranking,
 * ChunkKV's reuse masks, Quest's page orders, KV-Compress's metrics, accumulators). The larger
 * trace has more layers, heads, tokens and segments. */
START_TEST(variants_are_reusable_across_traces)
{
    reuse_ctx_t x;
    x.small = kv_test_trace(2, 2, 1, 8, 30, 24, 3, 0, 5);
    x.big = kv_test_trace(3, 8, 4, 16, 64, 52, 5, 0, 6);
    ck_assert_int_eq(kv_backend_cpu_open(1, &x.be), KV_OK);
    for (int k = 0; k < kv_policy_count(); k++)
        for_each_variant(kv_policy_desc_at(k), "kv", check_reuse_spec, &x);
    kv_backend_close(x.be);
    kv_trace_close(x.small);
    kv_trace_close(x.big);
}
END_TEST

/* ---------------------------------------------------------------- independent reference */

enum { RL = 3, RH = 4, RHKV = 2, RG = 2, RD = 16, RT = 56, RN = 48 };

typedef struct {
    float q[RL][RH * RT * RD], k[RL][RHKV * RT * RD];
} ref_data_t;

static ref_data_t *ref_read(kv_trace_t *t)
{
    ref_data_t *x = kv_calloc(1, sizeof *x, "test");
    for (int l = 0; l < RL; l++) {
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_Q, x->q[l]), KV_OK);
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_K, x->k[l]), KV_OK);
    }
    return x;
}

/* Causal softmax row of query i of head h over keys [0, i], in double: p (i + 1). */
static void ref_row(const ref_data_t *x, int l, int h, int i, double *p)
{
    const float *q = x->q[l] + ((size_t)h * RT + i) * RD;
    const float *kb = x->k[l] + (size_t)(h / RG) * RT * RD;
    double mx = -INFINITY;
    for (int j = 0; j <= i; j++) {
        double s = 0;
        for (int c = 0; c < RD; c++)
            s += (double)q[c] * kb[(size_t)j * RD + c];
        p[j] = s / sqrt((double)RD);
        mx = p[j] > mx ? p[j] : mx;
    }
    double z = 0;
    for (int j = 0; j <= i; j++)
        z += (p[j] = exp(p[j] - mx));
    for (int j = 0; j <= i; j++)
        p[j] /= z;
}

typedef enum { R_MAX, R_AVG, R_NONE } ref_pool_t;

/* POOL_k along [0, m), stride 1, padding k/2: max ignores the padding, avg divides by k always. */
static void ref_pool(const double *in, int m, int k, ref_pool_t pool, double *out)
{
    for (int j = 0; j < m; j++) {
        double a = pool == R_MAX ? -INFINITY : 0;
        for (int t = j - k / 2; t <= j + k / 2; t++) {
            if (pool == R_NONE) {
                a = in[j];
                break;
            }
            if (t < 0 || t >= m)
                continue;
            a = pool == R_MAX ? (in[t] > a ? in[t] : a) : a + in[t];
        }
        out[j] = pool == R_AVG ? a / k : a;
    }
}

/* Combine the G values of a group: 0 mean, 1 max, 2 sum. */
static double ref_agg(const double *v, int n, int agg)
{
    double a = v[0];
    for (int g = 1; g < n; g++)
        a = agg == 1 ? (v[g] > a ? v[g] : a) : a + v[g];
    return agg == 0 ? a / n : a;
}

typedef struct {
    int w, k, qmean, before, query, agg;
    ref_pool_t pool;
} ref_snap_t;

/* SnapKV storage scores of layer l (§1): sc (S, m), m = n - w. */
static int ref_snap_scores(const ref_data_t *x, int l, const ref_snap_t *o, double sc[RH][RN])
{
    const int m = RN - o->w;
    double raw[RH][RN], pooled[RH][RN], p[RT];
    for (int h = 0; h < RH; h++) {
        for (int j = 0; j < m; j++)
            raw[h][j] = 0;
        for (int i = RN - o->w; i < RN; i++) {
            ref_row(x, l, h, i, p); /* softmax over every key the window query sees */
            for (int j = 0; j < m; j++)
                raw[h][j] += p[j]; /* window columns dropped after the softmax */
        }
        if (o->qmean)
            for (int j = 0; j < m; j++)
                raw[h][j] /= o->w;
        ref_pool(raw[h], m, o->k, o->pool, pooled[h]);
    }
    if (o->query) {
        for (int h = 0; h < RH; h++)
            memcpy(sc[h], pooled[h], sizeof(double) * m);
        return RH;
    }
    for (int g = 0; g < RHKV; g++) {
        double red[RN], v[RG];
        for (int j = 0; j < m; j++) {
            for (int y = 0; y < RG; y++)
                v[y] = (o->before ? raw : pooled)[g * RG + y][j];
            red[j] = ref_agg(v, RG, o->agg);
        }
        if (o->before)
            ref_pool(red, m, o->k, o->pool, sc[g]);
        else
            memcpy(sc[g], red, sizeof(double) * m);
    }
    return RHKV;
}

/* Tokens [0, m) of score row sc by decreasing score, ties: the later token first. */
static void ref_order(const double *sc, int m, int *ord)
{
    for (int j = 0; j < m; j++)
        ord[j] = j;
    for (int a = 1; a < m; a++) /* insertion sort: m <= 48 */
        for (int b = a; b > 0; b--) {
            int u = ord[b - 1], v = ord[b];
            if (sc[v] > sc[u] || (sc[v] == sc[u] && v > u)) {
                ord[b - 1] = v;
                ord[b] = u;
            } else {
                break;
            }
        }
}

/* Window [n - w, n) plus the first `cap` tokens of ord; B >= n keeps everything, B <= w the last B. */
static void ref_keep(uint8_t *mk, int w, const int *ord, int cap, int B)
{
    memset(mk, 0, RN);
    if (B >= RN) {
        memset(mk, 1, RN);
        return;
    }
    if (B <= w) {
        memset(mk + RN - B, 1, (size_t)B);
        return;
    }
    memset(mk + RN - w, 1, (size_t)w);
    for (int r = 0; r < cap && r < RN - w; r++)
        mk[ord[r]] = 1;
}

/* The policy's context mask of storage head s equals the reference row. */
static void ref_compare(const uint8_t *mask, int s, const uint8_t *want, const char *spec, int l, int B)
{
    for (int j = 0; j < RN; j++)
        ck_assert_msg(mask[(size_t)s * RT + j] == want[j], "%s layer %d B=%d head %d: token %d %s", spec, l, B, s, j,
                      want[j] ? "evicted, the reference keeps it" : "kept, the reference evicts it");
}

static const int ref_budgets[] = {4, 12, 20, 30, 47};

/* SnapKV: every pooling, both query aggregations, GQA before/after pooling with each agg, per query
 * head. Budget B includes the window: top B - w + window. */
static void ref_check_snapkv(kv_trace_t *t, const ref_data_t *x)
{
    static const struct {
        const char *spec;
        ref_snap_t o;
    } cases[] = {
        {"snapkv(window=8,kernel=5,pool=avg,qagg=mean)", {8, 5, 1, 0, 0, 0, R_AVG}},
        {"snapkv(window=8,kernel=7,pool=max,gqa=before_pool,agg=max)", {8, 7, 0, 1, 0, 1, R_MAX}},
        {"snapkv(window=8,kernel=5,pool=avg,gqa=before_pool)", {8, 5, 0, 1, 0, 0, R_AVG}},
        {"snapkv(window=6,kernel=3,pool=max,agg=sum)", {6, 3, 0, 0, 0, 2, R_MAX}},
        {"snapkv(window=6,kernel=3,pool=none,gran=query)", {6, 3, 0, 0, 1, 0, R_NONE}},
        {"snapkv(window=8,kernel=7,pool=avg,gran=query)", {8, 7, 0, 0, 1, 0, R_AVG}},
    };
    double sc[RH][RN];
    int ord[RN];
    uint8_t want[RN], mask[MAXS * MAXT];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int S = ref_snap_scores(x, 0, &cases[c].o, sc), w = cases[c].o.w;
        for (int bi = 0; bi < 5; bi++) {
            const int B = ref_budgets[bi];
            probe(t, 0, cases[c].spec, B, 0, mask);
            for (int s = 0; s < S; s++) {
                ref_order(sc[s], RN - w, ord);
                ref_keep(want, w, ord, B - w, B);
                ref_compare(mask, s, want, cases[c].spec, 0, B);
            }
        }
    }
}

/* PyramidKV (KVCache-Factory PyramidKVCluster): per-layer caps from the integer schedule with its
 * regimes, SnapKV scores of each layer. */
static void ref_check_pyramidkv(kv_trace_t *t, const ref_data_t *x)
{
    const ref_snap_t o = {8, 5, 0, 0, 0, 0, R_AVG};
    const char *spec = "pyramidkv(window=8,kernel=5,pool=avg,beta=4)";
    const int w = 8, beta = 4;
    double sc[RH][RN];
    int ord[RN];
    uint8_t want[RN], mask[MAXS * MAXT];
    for (int l = 0; l < RL; l++) {
        const int S = ref_snap_scores(x, l, &o, sc);
        for (int bi = 0; bi < 5; bi++) {
            const int B = ref_budgets[bi], base = B - w;
            int cap;
            if (RN < B) {
                cap = RN;
            } else if (RN < 2 * base) {
                cap = base; /* uniform SnapKV */
            } else {
                int mn = base / beta, mx = 2 * base - mn;
                if (mx >= RN - w) {
                    mx = RN - w;
                    mn = 2 * base - mx;
                }
                cap = mx - l * ((mx - mn) / (RL - 1));
            }
            probe(t, l, spec, B, 0, mask);
            for (int s = 0; s < S; s++) {
                ref_order(sc[s], RN - w, ord);
                ref_keep(want, w, ord, cap, B);
                ref_compare(mask, s, want, spec, l, B);
            }
        }
    }
}

/* Global rank of entry (score a, token ja, head sa) before (b, jb, sb): score, later token, lower
 * head. */
static int ref_before(double a, int ja, int sa, double b, int jb, int sb)
{
    if (a != b)
        return a > b;
    if (ja != jb)
        return ja > jb;
    return sa < sb;
}

/* Ada-KV over SnapKV scores of layer 0, window w. interp (FFY0 AdaptiveSnapKVCluster):
 * c[h] = head h's entries in the global top S * base of the past scores, cap = round(c (1 - a) +
 * int(base a)) (torch.round in float32: half to even); floor (kvpress AdaKVPress): each head's
 * top int(B a) of its order (window first) is guaranteed, the rest S (B - floor) entries go
 * greedily by score. */
static void ref_check_adakv(kv_trace_t *t, const ref_data_t *x)
{
    static const struct {
        const char *spec;
        int interp, query;
        double a;
    } cases[] = {
        {"adakv(inner=snapkv(window=8,kernel=5,qagg=mean,gqa=before_pool))", 1, 0, 0.2},
        {"adakv(inner=snapkv(window=8,kernel=5,qagg=mean,gqa=before_pool),floor_alpha=0.35)", 1, 0, 0.35},
        {"adakv(inner=snapkv(window=8,kernel=5,qagg=mean,gqa=before_pool),safeguard=floor)", 0, 0, 0.2},
        {"adakv(inner=snapkv(window=8,kernel=5,qagg=mean,gqa=before_pool),safeguard=floor,floor_alpha=0.5)", 0, 0, 0.5},
        {"adakv(inner=snapkv(window=8,kernel=5,qagg=mean),gran=query)", 1, 1, 0.2},
        {"adakv(inner=snapkv(window=8,kernel=5,qagg=mean),safeguard=floor,gran=query)", 0, 1, 0.2},
    };
    const int w = 8, m = RN - w;
    double sc[RH][RN];
    int ord[RH][RN];
    uint8_t want[RN], mask[MAXS * MAXT];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const ref_snap_t o = {w, 5, 1, !cases[c].query, cases[c].query, 0, R_MAX};
        const int S = ref_snap_scores(x, 0, &o, sc);
        for (int s = 0; s < S; s++)
            ref_order(sc[s], m, ord[s]);
        for (int bi = 0; bi < 5; bi++) {
            const int B = ref_budgets[bi];
            int cap[RH] = {0};
            if (B > w && B < RN) {
                int ptr[RH] = {0}, cnt[RH] = {0};
                const int guard = cases[c].interp ? 0 : (int)(B * cases[c].a); /* floor: guaranteed */
                /* floor: the guarantee covers the window first, then the head's best past tokens */
                const int gpast = guard > w ? guard - w : 0;
                for (int s = 0; s < S; s++)
                    ptr[s] = gpast;
                /* interp: the competition is S * base past entries; floor: S * (B - guard) entries,
                 * the unguaranteed window tokens (+inf) first */
                long need = cases[c].interp ? (long)S * (B - w) : (long)S * (B - guard);
                if (!cases[c].interp)
                    for (int s = 0; s < S; s++)
                        need -= guard < w ? w - guard : 0;
                for (long taken = 0; taken < need; taken++) {
                    int best = -1;
                    for (int s = 0; s < S; s++) {
                        if (ptr[s] >= m)
                            continue;
                        if (best < 0 || ref_before(sc[s][ord[s][ptr[s]]], ord[s][ptr[s]], s,
                                                   sc[best][ord[best][ptr[best]]], ord[best][ptr[best]], best))
                            best = s;
                    }
                    cnt[best]++;
                    ptr[best]++;
                }
                for (int s = 0; s < S; s++) {
                    if (cases[c].interp) {
                        const int base = B - w, fl = (int)(base * cases[c].a);
                        const float v = (float)cnt[s] * (float)(1.0 - cases[c].a) + (float)fl;
                        cap[s] = (int)nearbyintf(v); /* default rounding mode: half to even */
                        cap[s] = cap[s] > m ? m : cap[s];
                    } else {
                        cap[s] = gpast + cnt[s];
                    }
                }
            }
            probe(t, 0, cases[c].spec, B, 0, mask);
            for (int s = 0; s < S; s++) {
                ref_keep(want, w, ord[s], cap[s], B);
                ref_compare(mask, s, want, cases[c].spec, 0, B);
            }
        }
    }
}

/* ChunkKV (paper Algorithm 1 / kvpress ChunkKVPress): token scores summed over the storage heads,
 * chunks of c from the start of the pre-window region (the last one partial), chunk score = sum or
 * mean, top floor((B - w) / c) chunks + the window, one set for every head. */
static void ref_check_chunkkv(kv_trace_t *t, const ref_data_t *x)
{
    static const struct {
        const char *spec;
        int chunk, mean, query;
    } cases[] = {
        {"chunkkv(chunk=6,inner=snapkv(window=8,kernel=3))", 6, 0, 0},
        {"chunkkv(chunk=6,score=mean,inner=snapkv(window=8,kernel=3))", 6, 1, 0},
        {"chunkkv(chunk=4,score=mean,inner=snapkv(window=8,kernel=3),gran=query)", 4, 1, 1},
    };
    const int w = 8, m = RN - w;
    double sc[RH][RN];
    uint8_t want[RN], mask[MAXS * MAXT];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const ref_snap_t o = {w, 3, 0, 0, cases[c].query, 0, R_MAX};
        const int S = ref_snap_scores(x, 0, &o, sc), ch = cases[c].chunk, nc = (m + ch - 1) / ch;
        double cs[RN];
        for (int k = 0; k < nc; k++) {
            const int a = k * ch, e = a + ch < m ? a + ch : m;
            cs[k] = 0;
            for (int j = a; j < e; j++)
                for (int s = 0; s < S; s++)
                    cs[k] += sc[s][j];
            if (cases[c].mean)
                cs[k] /= e - a;
        }
        int cord[RN];
        ref_order(cs, nc, cord);
        for (int bi = 0; bi < 5; bi++) {
            const int B = ref_budgets[bi];
            int tok[RN], n_tok = 0;
            for (int r = 0; r < (B - w) / ch && r < nc; r++)
                for (int j = cord[r] * ch; j < cord[r] * ch + ch && j < m; j++)
                    tok[n_tok++] = j;
            ref_keep(want, w, tok, n_tok, B);
            probe(t, 0, cases[c].spec, B, 0, mask);
            for (int s = 0; s < S; s++)
                ref_compare(mask, s, want, cases[c].spec, 0, B);
        }
    }
}

/* H2O one-shot (KVCache-Factory H2OKVCluster with the causal fix): column sums of the causal
 * attention of all n prompt queries, no pooling, top B - w + window; norm=mean divides by the n - j
 * queries that see j (kvpress ObservedAttentionPress, no window). */
static void ref_check_h2o(kv_trace_t *t, const ref_data_t *x)
{
    static const struct {
        const char *spec;
        int w, mean, query, agg;
    } cases[] = {
        {"h2o(window=8)", 8, 0, 0, 0},
        {"h2o(window=4,agg=max)", 4, 0, 0, 1},
        {"h2o(window=0,norm=mean)", 0, 1, 0, 0},
        {"h2o(window=8,gran=query)", 8, 0, 1, 0},
    };
    double col[RH][RN], sc[RH][RN], p[RT];
    for (int h = 0; h < RH; h++) {
        for (int j = 0; j < RN; j++)
            col[h][j] = 0;
        for (int i = 0; i < RN; i++) {
            ref_row(x, 0, h, i, p);
            for (int j = 0; j <= i; j++)
                col[h][j] += p[j];
        }
    }
    int ord[RN];
    uint8_t want[RN], mask[MAXS * MAXT];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int w = cases[c].w, S = cases[c].query ? RH : RHKV;
        for (int s = 0; s < S; s++)
            for (int j = 0; j < RN; j++) {
                double v[RG];
                const int nh = cases[c].query ? 1 : RG;
                for (int y = 0; y < nh; y++)
                    v[y] = col[cases[c].query ? s : s * RG + y][j] / (cases[c].mean ? RN - j : 1);
                sc[s][j] = ref_agg(v, nh, cases[c].agg);
            }
        for (int bi = 0; bi < 5; bi++) {
            const int B = ref_budgets[bi];
            probe(t, 0, cases[c].spec, B, 0, mask);
            for (int s = 0; s < S; s++) {
                ref_order(sc[s], RN - w, ord);
                ref_keep(want, w, ord, B - w, B);
                ref_compare(mask, s, want, cases[c].spec, 0, B);
            }
        }
    }
}

START_TEST(reference_reimplementation_agrees)
{
    kv_trace_t *t = kv_test_trace(RL, RH, RHKV, RD, RT, RN, 0, 0, 2025);
    ck_assert_ptr_nonnull(t);
    ref_data_t *x = ref_read(t);
    ref_check_snapkv(t, x);
    ref_check_pyramidkv(t, x);
    ref_check_adakv(t, x);
    ref_check_chunkkv(t, x);
    ref_check_h2o(t, x);
    kv_free(x);
    kv_trace_close(t);
}
END_TEST

Suite *suite_policies_review(void)
{
    Suite *s = suite_create("policies_review");
    TCase *tc = tcase_create("review");
    tcase_add_test(tc, streaming_llm_budget_below_sinks);
    tcase_add_test(tc, decode_caches_hold_the_query_token);
    tcase_add_test(tc, variants_are_reusable_across_traces);
    tcase_add_test(tc, reference_reimplementation_agrees);
    suite_add_tcase(s, tc);
    return s;
}
