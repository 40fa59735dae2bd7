/*
 * tova.c: TOVA, Token Omission Via Attention (Oren et al., "Transformers are Multi-State RNNs",
 * arXiv:2401.06104; schwartz-lab-NLP/TOVA src/tova_cache.py, TOVACache.reduce). A fixed-size cache:
 * whenever it is over capacity, keep the tokens the LAST query attends to most, where the score of a
 * token is its attention averaged over ALL query heads of the layer, and the same indices are kept
 * for every KV head (GQA-agnostic). In steady state one token leaves per decode step.
 *
 * Prefill: the last prompt query's attention over the prompt (kv_ctx_window_probs, w = 1) ranks the
 * prompt; decode: the attention of the most recent query over the cache it read (the renormalised
 * attention `observe` gets, which is what TOVA computes inside its cache) ranks the cache.
 * Timing: the reference reduces after the forward pass, so a query reads cache_size + 1 keys and
 * the cache then drops the one its attention ranks lowest. Our caches never exceed B keys for the
 * query that reads them (the engine's decode contract), so at step i we drop the lowest-ranked token
 * by query i - 1's attention and append token i: exactly the reference with cache_size = B - 1.
 * At the end of prefill the cache keeps the top B; the first decode step drops one more (again
 * cache_size = B - 1).
 * Granularity: TOVA's indices are shared by all heads, so gran=kv and gran=query keep the same
 * tokens; gran=query only stores them G times (the memory of a per-query-head layout), and `agg` is
 * unused (the mean runs over all query heads, as in the reference). No token is protected (the
 * reference protects none; kvpress's prefill-only TOVAPress forces the last token, a deviation its
 * docstring acknowledges).
 * mode=oneshot (kvpress 0.5.5 TOVAPress): once, at the end of prefill: the last context query's
 * attention over the earlier context tokens (its softmax over all of them, its own column dropped),
 * averaged over ALL query heads, the same ranking for every storage head; the last context token is
 * kept first (kvpress pads it with max + 1); top B, appended tokens never evicted. A one-shot token
 * scorer, usable inside adakv, chunkkv, criticalkv. Presets: tova@paper (mode=decode), tova@kvpress
 * (mode=oneshot).
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/policies/accum_internal.h"

#include <string.h>

static const kv_param_def_t params[] = {
    {"mode", KV_PARAM_ENUM, "decode", 0, -1, "decode|oneshot",
     "decode: the fixed-size cache of every step (the paper's code); oneshot: once at prefill (kvpress TOVAPress)"},
};

static const kv_preset_t presets[] = {
    {"paper", "mode=decode", "schwartz-lab-NLP/TOVA src/tova_cache.py (TOVACache)"},
    {"kvpress", "mode=oneshot,gran=kv", "NVIDIA kvpress 0.5.5 TOVAPress"},
};

static int tova_init(kv_policy_t *p)
{
    if (!strcmp(kv_params_str(&p->params, "mode"), "oneshot"))
        p->flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER;
    return KV_OK;
}

static int tova_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const float *P; /* (H, 1, n_ctx) */
    int rc = kv_ctx_window_probs(c, 1, &P);
    if (rc)
        return rc;
    const int n = c->n_ctx, H = c->H;
    if (!(p->flags & KV_POL_ONESHOT)) {
        memcpy(p->qscores, P, sizeof(float) * (size_t)H * n);
        return KV_OK;
    }
    /* oneshot: the mean over all query heads for every head (the group mean keeps it) */
    for (int j = 0; j + 1 < n; j++) {
        double a = 0;
        for (int h = 0; h < H; h++)
            a += P[(size_t)h * n + j];
        for (int h = 0; h < H; h++)
            p->qscores[(size_t)h * n + j] = (float)(a / H);
    }
    p->protect_last = n > 0 ? 1 : 0;
    p->scored = 1;
    return KV_OK;
}

/* Copy storage head 0's cache row to the others (same indices for every head). */
static void share_row0(kv_keep_t *k)
{
    for (int s = 1; s < k->n_store; s++)
        memcpy(k->mask + (size_t)s * k->T, k->mask, (size_t)k->T);
}

static int tova_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    if (p->flags & KV_POL_ONESHOT)
        return kv_select_uniform(p, c, b, cstate, keep);
    kv_acc_state_t *st;
    int rc = kv_acc_state_get(cstate, c->H, c->T, &st);
    if (rc)
        return rc;
    const int n = c->n_ctx, T = c->T, H = c->H;
    memset(st->vec, 0, sizeof(float) * (size_t)T);
    for (int j = 0; j < n; j++) {
        double a = 0;
        for (int h = 0; h < H; h++)
            a += p->qscores[(size_t)h * n + j];
        st->vec[j] = (float)(a / H);
    }
    memset(keep->mask, 0, (size_t)T);
    for (int j = 0; j < n; j++) {
        keep->mask[j] = 1;
        st->pos[j] = j;
    }
    kv_acc_keep_best(st, st->pos, st->vec, n, b->tokens, keep->mask);
    share_row0(keep);
    return KV_OK;
}

static int tova_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                      kv_keep_t *cache)
{
    (void)p, (void)c;
    kv_acc_state_t *st = *cstate;
    if (!st)
        return kv_error(KV_EINTERNAL, "tova: admit before select");
    int nc = kv_acc_cached(cache->mask, i, st->pos);
    for (int k = 0; k < nc; k++)
        st->key[k] = st->vec[st->pos[k]];
    kv_acc_keep_best(st, st->pos, st->key, nc, b->tokens - 1, cache->mask);
    cache->mask[i] = 1;
    share_row0(cache);
    return KV_OK;
}

static int tova_observe(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                        const kv_keep_t *cache, const float *attn)
{
    (void)p, (void)b, (void)cache;
    kv_acc_state_t *st = *cstate;
    for (int j = 0; j <= i; j++) {
        double a = 0;
        for (int h = 0; h < c->H; h++)
            a += attn[(size_t)h * c->T + j];
        st->vec[j] = (float)(a / c->H);
    }
    return KV_OK;
}

static int tova_kept_window(const kv_policy_t *p)
{
    return (p->flags & KV_POL_ONESHOT) ? 1 : 0;
}

const kv_policy_desc_t kv_policy_tova = {
    .name = "tova",
    .doc = "fixed-size cache, each step drops the token the last query (mean over all heads) attends to "
           "least (Oren et al. 2024)",
    .paper = "arXiv:2401.06104",
    .code = "schwartz-lab-NLP/TOVA src/tova_cache.py; NVIDIA/kvpress kvpress/presses/tova_press.py (mode=oneshot)",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_DECODE,
    .variants = "mode=oneshot",
    .init = tova_init,
    .prepare = tova_prepare,
    .select = tova_select,
    .admit = tova_admit,
    .observe = tova_observe,
    .cstate_free = kv_acc_state_free,
    .kept_window = tova_kept_window,
};
