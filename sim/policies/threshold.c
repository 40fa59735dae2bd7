/*
 * threshold.c: evict the tokens whose MAXIMUM observed attention stays under a threshold tau, with
 * the budget B as a cap. The rule family of kvpress's DMSPress (scores below a threshold are evicted
 * once out of a sliding window) and of Scissorhands' "persistence of importance" (arXiv:2305.17118):
 * a token that no query has ever attended to noticeably is unlikely to matter later.
 *
 * Score of token j for query head h: the largest attention any query has given it so far. Prefill:
 * the maximum over the causal prompt rows (kv_ctx_colstats max); every decode step: the maximum with
 * the new query's attention over the cache it read (renormalised, as the cache sees it). With a
 * KV-head cache the group's maxima combine with `agg` (mean by default; agg=max evicts a token only
 * when every head of the group left it under tau).
 * Rule, at the end of prefill and before every decode step i (the appended token i is always kept):
 *   protected = the first `sinks` tokens and the last `recent` positions (at step i: (i - recent, i]);
 *   eligible  = protected tokens and tokens with score >= tau;
 *   keep the eligible tokens, at most B: the appended token first, then sinks, then the recent
 *   window, then by decreasing score (ties: later token).
 * The recent window lets a fresh token be observed by a few queries before it is judged: a token just
 * appended has been seen only by its own query. Defaults: sinks 0 (sinks draw large attention and
 * pass the threshold on their own), recent 8 (the protected window of KVCache-Factory's runner and
 * of KV-Compress's KVC-w).
 * Why tau = 0.01: the Ada-KV bound charges an eviction 2 C (1 - F) for each query, and a token whose
 * attention never reached tau removed less than tau of recall from every query observed so far; 1 %
 * per token is a loose "never mattered" level for the short and medium prompts kvsim replays
 * (uniform attention over 100 keys is exactly 0.01, so tokens attended at least as much as uniform
 * by some query in the first ~100 positions survive). It is an absolute level: on long contexts
 * uniform attention falls far below it, so tau should scale down with the context (tau=0 disables
 * the rule and leaves a budget-capped max-attention policy).
 * Flag BUDGET_FREE: even a budget above the sequence length loses the tokens under tau (except with
 * tau = 0). Memory: one fp32 maximum per cached token and query head is kept between steps
 * (meta_bytes).
 * No reference implementation exists for this exact rule; it is the "evict tokens whose
 * maximum observed attention stays under a threshold".
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/policies/accum_internal.h"

#include <float.h>
#include <math.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"tau", KV_PARAM_FLOAT, "0.01", 0, 1, NULL,
     "evict tokens whose maximum observed attention is below tau (0: budget only)"},
    {"sinks", KV_PARAM_INT, "0", 0, 1 << 20, NULL, "first tokens exempt from the threshold"},
    {"recent", KV_PARAM_INT, "8", 0, 1 << 20, NULL,
     "most recent positions exempt from the threshold (fresh tokens are judged once they leave it)"},
};

typedef struct {
    float tau;
    int sinks, recent;
} thr_t;

static int thr_init(kv_policy_t *p)
{
    thr_t *s = kv_calloc(1, sizeof *s, "threshold state");
    if (!s)
        return KV_ENOMEM;
    s->tau = (float)kv_params_float(&p->params, "tau");
    s->sinks = (int)kv_params_int(&p->params, "sinks");
    s->recent = (int)kv_params_int(&p->params, "recent");
    p->state = s;
    if (s->tau <= 0)
        p->flags &= ~KV_POL_BUDGET_FREE; /* every token is eligible: a full budget keeps everything */
    return KV_OK;
}

static void thr_fini(kv_policy_t *p)
{
    kv_free(p->state);
}

static int thr_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const float *mx;
    int rc = kv_ctx_colstats(c, NULL, NULL, &mx);
    if (rc)
        return rc;
    memcpy(p->qscores, mx, sizeof(float) * (size_t)c->H * c->n_ctx);
    p->protect_first = ((const thr_t *)p->state)->sinks; /* the sliding window is not a fixed range */
    return KV_OK;
}

/* Apply the rule to the n candidates st->pos[] of storage head s; `newest` is the appended token
 * (-1 at the end of prefill) and positions >= first_recent are in the recent window. */
static void apply(const kv_policy_t *p, const kv_layer_ctx_t *c, kv_acc_state_t *st, int s, int n, int newest,
                  int first_recent, int B, uint8_t *mk)
{
    const thr_t *t = p->state;
    int m = 0;
    for (int k = 0; k < n; k++) {
        const int j = st->pos[k];
        float key;
        if (j == newest || j < t->sinks)
            key = INFINITY;
        else if (j >= first_recent)
            key = FLT_MAX;
        else {
            key = kv_acc_group(p, st->acc, (size_t)c->T, c->G, s, j);
            if (!(key >= t->tau)) {
                mk[j] = 0; /* under the threshold */
                continue;
            }
        }
        st->pos[m] = j; /* compact the eligible candidates in place (m <= k) */
        st->key[m] = key;
        m++;
    }
    kv_acc_keep_best(st, st->pos, st->key, m, B, mk);
}

static int thr_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    kv_acc_state_t *st;
    int rc = kv_acc_state_get(cstate, c->H, c->T, &st);
    if (rc)
        return rc;
    const int n = c->n_ctx, T = c->T;
    const thr_t *t = p->state;
    memset(st->acc, 0, sizeof(float) * (size_t)c->H * T);
    for (int h = 0; h < c->H; h++)
        memcpy(st->acc + (size_t)h * T, p->qscores + (size_t)h * n, sizeof(float) * (size_t)n);
    for (int s = 0; s < keep->n_store; s++) {
        uint8_t *mk = keep->mask + (size_t)s * T;
        memset(mk, 0, (size_t)T);
        memset(mk, 1, (size_t)n);
        for (int j = 0; j < n; j++)
            st->pos[j] = j;
        apply(p, c, st, s, n, -1, n - t->recent, b->tokens, mk);
    }
    return KV_OK;
}

static int thr_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                     kv_keep_t *cache)
{
    kv_acc_state_t *st = *cstate;
    if (!st)
        return kv_error(KV_EINTERNAL, "threshold: admit before select");
    const thr_t *t = p->state;
    for (int s = 0; s < cache->n_store; s++) {
        uint8_t *mk = cache->mask + (size_t)s * cache->T;
        int nc = kv_acc_cached(mk, i, st->pos);
        st->pos[nc++] = i;
        mk[i] = 1;
        apply(p, c, st, s, nc, i, i - t->recent + 1, b->tokens, mk);
    }
    return KV_OK;
}

static int thr_observe(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                       const kv_keep_t *cache, const float *attn)
{
    (void)p, (void)b, (void)cache;
    kv_acc_state_t *st = *cstate;
    for (int h = 0; h < c->H; h++) {
        float *acc = st->acc + (size_t)h * c->T;
        const float *a = attn + (size_t)h * c->T;
        for (int j = 0; j <= i; j++)
            if (a[j] > acc[j])
                acc[j] = a[j];
    }
    return KV_OK;
}

static size_t thr_meta(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, const kv_keep_t *keep)
{
    (void)b;
    return kv_acc_score_bytes(p, c, keep); /* the maximum observed attention */
}

const kv_policy_desc_t kv_policy_threshold = {
    .name = "threshold",
    .doc = "evict tokens whose maximum observed attention stays under tau, every step, budget as a cap "
           "(DMS/Scissorhands-style rule); may evict at any budget",
    .paper = "arXiv:2305.17118 (persistence of importance); kvpress DMSPress",
    .params = params,
    .code = "- (the rule of kvpress's DMSPress; no reference for this exact rule)",
    .n_params = (int)KV_ARRAY_LEN(params),
    .flags = KV_POL_DECODE | KV_POL_BUDGET_FREE,
    .variants = "tau=0;tau=0.05,sinks=4,recent=0,agg=max",
    .init = thr_init,
    .fini = thr_fini,
    .prepare = thr_prepare,
    .select = thr_select,
    .admit = thr_admit,
    .observe = thr_observe,
    .cstate_free = kv_acc_state_free,
    .meta_bytes = thr_meta,
};
