/*
 * quest.c: Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
 * Inference", arXiv:2406.10774; docs/POLICIES.md §2.13). Nothing is ever evicted: the whole KV cache
 * stays in memory, and each decode query reads only the pages it is likely to need. The cache is cut
 * into pages of `page` tokens; per page and KV head the channel-wise min and max of the (post-RoPE)
 * keys are kept as metadata; decode query q scores page p with the upper bound
 *     U(p) = sum_d max(q_d max_d, q_d min_d)  >=  q.k  for every key k of the page
 * and reads the union of its top pages within the token budget: B / page pages, of which the last
 * page (the one holding the query's own token, possibly partial) is always one (the kernel path,
 * quest/utils/controller.py); the rest are the top B/page - 1 of the earlier pages by U (ties: later
 * page first). So a query never reads more than B tokens. Prefill is dense; the first `dense_layers`
 * layers are always dense; a budget >= the current length is dense.
 * Granularity: the reference scores per query head (its eval path repeats K/V to H heads): that is
 * gran=query. gran=kv combines the G page scores of a group with `agg` and reads one page set per
 * KV head.
 * Memory: the full cache (KV_POL_NO_EVICT) plus the metadata, 2 d values per page per storage head
 * at the trace dtype (meta_bytes; counted on the layers that select pages, over ceil(T/page) pages).
 * Deviation in the accounting at gran=query: the engine's per-query-head layout stores the cache
 * and its page min/max G times (as the eval path's repeat_kv does); Quest itself evicts nothing,
 * so per-query-head page choices need no copy, and its real cache is Hkv heads plus 2 d values per
 * page per KV head (docs/POLICIES.md §4). Compare Quest's memory at gran=kv.
 * Defaults: page 16 and 2 dense layers (_quest_skip_layer = 2), as every Quest script.
 * Deviations: B < page (no whole page fits) reads the last min(B, tokens of the last page) tokens;
 * the accuracy-eval path's K = min(max(3, B/16), pages) without a forced last page is not
 * reproduced; U is computed in fp32 without the 1/sqrt(d) scale.
 */
#include "sim/policies/quest.h"

#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <string.h>

typedef struct {
    int page, dense_layers;
    /* per layer, from prepare (read-only in admit) */
    int dense, S, E, npg;
    int *ord; /* (S, E, npg): for evaluation query e, its earlier pages by decreasing score */
    size_t cap;
} quest_state_t;

static const kv_param_def_t params[] = {
    {"page", KV_PARAM_INT, "16", 1, 1 << 16, NULL, "tokens per page (chunk_size)"},
    {"dense_layers", KV_PARAM_INT, "2", 0, 1 << 20, NULL, "the first N layers always read the whole cache"},
};

void kv_quest_page_minmax(const float *k, int n, int d, float *kmin, float *kmax)
{
    for (int x = 0; x < d; x++)
        kmin[x] = kmax[x] = k[x];
    for (int j = 1; j < n; j++)
        for (int x = 0; x < d; x++) {
            float v = k[(size_t)j * d + x];
            kmin[x] = v < kmin[x] ? v : kmin[x];
            kmax[x] = v > kmax[x] ? v : kmax[x];
        }
}

float kv_quest_page_bound(const float *q, const float *kmin, const float *kmax, int d)
{
    float u = 0;
    for (int x = 0; x < d; x++) {
        float a = q[x] * kmax[x], b = q[x] * kmin[x];
        u += a > b ? a : b;
    }
    return u;
}

static int quest_init(kv_policy_t *p)
{
    quest_state_t *st = kv_calloc(1, sizeof *st, "quest state");
    if (!st)
        return KV_ENOMEM;
    p->state = st;
    st->page = (int)kv_params_int(&p->params, "page");
    st->dense_layers = (int)kv_params_int(&p->params, "dense_layers");
    return KV_OK;
}

static void quest_fini(kv_policy_t *p)
{
    quest_state_t *st = p->state;
    if (st)
        kv_free(st->ord);
    kv_free(st);
}

static int quest_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    quest_state_t *st = p->state;
    const int T = c->T, d = c->d, P = st->page, n = c->n_ctx, E = c->n_eval, G = c->G;
    st->dense = c->layer < st->dense_layers;
    if (st->dense)
        return KV_OK;
    const int npg = (T + P - 1) / P, S = p->gran == KV_GRAN_KV ? c->Hkv : c->H;
    const size_t need = (size_t)S * E * npg;
    if (need > st->cap || !st->ord) {
        kv_free(st->ord);
        st->ord = kv_malloc(sizeof(int) * (need ? need : 1), "quest page order");
        if (!st->ord)
            return KV_ENOMEM;
        st->cap = need;
    }
    st->S = S;
    st->E = E;
    st->npg = npg;
    float *kmin = kv_malloc(sizeof(float) * (size_t)c->Hkv * npg * d, "page minima"); /* (Hkv, npg, d) */
    float *kmax = kv_malloc(sizeof(float) * (size_t)c->Hkv * npg * d, "page maxima"); /* (Hkv, npg, d) */
    float *u = kv_malloc(sizeof(float) * (size_t)npg, "page scores");
    int rc = KV_OK;
    if (!kmin || !kmax || !u) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int g = 0; g < c->Hkv; g++)
        for (int pg = 0; pg < npg; pg++) {
            const int a = pg * P, cnt = KV_MIN(P, T - a);
            kv_quest_page_minmax(c->k + ((size_t)g * T + a) * d, cnt, d, kmin + ((size_t)g * npg + pg) * d,
                                 kmax + ((size_t)g * npg + pg) * d);
        }
    const int nh = p->gran == KV_GRAN_KV ? G : 1;
    for (int s = 0; s < S; s++)
        for (int e = 0; e < E; e++) {
            const int i = n + e, lp = i / P; /* pages [0, lp) are complete before query i */
            const int h0 = p->gran == KV_GRAN_KV ? s * G : s;
            for (int pg = 0; pg < lp; pg++) {
                float a = 0;
                for (int h = h0; h < h0 + nh; h++) {
                    const int g = h / G;
                    float x = kv_quest_page_bound(kv_ctx_query(c, h, i), kmin + ((size_t)g * npg + pg) * d,
                                                  kmax + ((size_t)g * npg + pg) * d, d);
                    a = h == h0 ? x : p->agg == KV_AGG_MAX ? (x > a ? x : a) : a + x;
                }
                u[pg] = p->agg == KV_AGG_MEAN ? a / (float)nh : a;
            }
            kv_argsort_desc(u, lp, st->ord + ((size_t)s * E + e) * npg);
        }
done:
    kv_free(kmin);
    kv_free(kmax);
    kv_free(u);
    return rc;
}

/* End of prefill: the dense context. */
static int quest_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)p, (void)b, (void)cstate;
    for (int s = 0; s < keep->n_store; s++) {
        memset(keep->mask + (size_t)s * keep->T, 0, (size_t)keep->T);
        memset(keep->mask + (size_t)s * keep->T, 1, (size_t)c->n_ctx);
    }
    return KV_OK;
}

static int quest_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                       kv_keep_t *cache)
{
    (void)cstate;
    const quest_state_t *st = p->state;
    const int B = b->tokens, P = st->page, len = i + 1, e = i - c->n_ctx;
    for (int s = 0; s < cache->n_store; s++) {
        uint8_t *mk = cache->mask + (size_t)s * cache->T;
        memset(mk, 0, (size_t)cache->T);
        if (st->dense || B >= len) {
            memset(mk, 1, (size_t)len);
            continue;
        }
        const int K = B / P, lp = i / P, start = lp * P;
        if (K == 0) { /* not even one page: the last tokens of the last page */
            int a = KV_MAX(start, i - B + 1);
            memset(mk + a, 1, (size_t)(i - a + 1));
            continue;
        }
        memset(mk + start, 1, (size_t)(i - start + 1)); /* the last page, always read */
        const int *ord = st->ord + ((size_t)s * st->E + e) * st->npg;
        for (int r = 0; r < K - 1 && r < lp; r++)
            memset(mk + (size_t)ord[r] * P, 1, (size_t)P);
    }
    return KV_OK;
}

static size_t quest_meta_bytes(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b,
                               const kv_keep_t *keep)
{
    (void)b;
    const quest_state_t *st = p->state;
    if (c->layer < st->dense_layers)
        return 0;
    const size_t npg = (size_t)(c->T + st->page - 1) / st->page;
    const size_t dt = c->meta && c->meta->dtype == KV_DTYPE_F16 ? 2 : 4;
    return (size_t)keep->n_store * npg * 2 * (size_t)c->d * dt;
}

const kv_policy_desc_t kv_policy_quest = {
    .name = "quest",
    .doc = "decode-time page selection by a min/max-key upper bound, last page kept, no eviction (Tang et al. 2024)",
    .paper = "arXiv:2406.10774",
    .params = params,
    .code = "mit-han-lab/Quest evaluation/quest_attention.py",
    .n_params = (int)KV_ARRAY_LEN(params),
    .flags = KV_POL_DECODE | KV_POL_NO_EVICT | KV_POL_NESTED,
    .variants = "page=4;page=8,dense_layers=0;page=4,dense_layers=1,agg=max",
    .init = quest_init,
    .fini = quest_fini,
    .prepare = quest_prepare,
    .select = quest_select,
    .admit = quest_admit,
    .meta_bytes = quest_meta_bytes,
};
