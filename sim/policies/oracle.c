/*
 * oracle.c: for every evaluation query, the B context tokens that query attends to most (its true
 * top-B under the full softmax), plus the appended tokens. No real cache can do this (it needs the
 * future query), which makes it the upper bound of recall at a given budget: by Ada-KV's Theorem 3.2
 * per-head top-k of the true attention also minimises the L1 loss bound. With a KV-head cache the
 * group's probabilities are combined with `agg` (mean by default) before ranking.
 * Memory is reported for the cache each query reads (B context tokens + the appended ones); choosing
 * it needs every key, so no real cache achieves it at that memory.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <string.h>

static int oracle_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                        kv_keep_t *cache)
{
    (void)cstate;
    const int n = c->n_ctx, E = c->n_eval, T = c->T, e = i - n;
    const int nh = p->gran == KV_GRAN_KV ? c->G : 1;
    float *sc = kv_malloc(sizeof(float) * (size_t)(n ? n : 1), "oracle scores");
    if (!sc)
        return KV_ENOMEM;
    for (int s = 0; s < cache->n_store; s++) {
        const int h0 = p->gran == KV_GRAN_KV ? s * c->G : s;
        for (int j = 0; j < n; j++) {
            float a = c->p_eval[((size_t)h0 * E + e) * T + j];
            for (int h = h0 + 1; h < h0 + nh; h++) {
                float x = c->p_eval[((size_t)h * E + e) * T + j];
                a = p->agg == KV_AGG_MAX ? (x > a ? x : a) : a + x;
            }
            sc[j] = p->agg == KV_AGG_MEAN ? a / (float)nh : a;
        }
        uint8_t *mk = cache->mask + (size_t)s * cache->T;
        memset(mk, 0, (size_t)cache->T);
        kv_topk_mask(sc, n, b->tokens, mk);
    }
    kv_free(sc);
    return KV_OK;
}

const kv_policy_desc_t kv_policy_oracle = {
    .name = "oracle",
    .doc = "each evaluation query's true top-B context tokens: the upper bound at a budget",
    .paper = "Ada-KV Theorem 3.2, arXiv:2407.11550",
    .code = "-",
    .flags = KV_POL_PER_QUERY | KV_POL_NESTED | KV_POL_ORACLE,
    .admit = oracle_admit,
};
