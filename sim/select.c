/*
 * select.c: the selection shared by every scorer policy.
 *
 * Scores per query head are combined over each KV group (mean, max or sum) when the cache is kept
 * per KV head, protected tokens (sinks, window) are lifted to +inf, and each storage head's context
 * tokens are sorted once by decreasing score. The project-wide tie-break: equal scores keep the
 * later token first (recent tokens are the safer choice, and the order is then fully determined,
 * unlike torch.topk on a GPU). A budget B keeps the first B tokens of that order, so larger budgets
 * keep supersets and every budget reuses the same sort.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float key;
    int idx;
} kv_pair_t;

static int cmp_desc(const void *a, const void *b)
{
    const kv_pair_t *x = a, *y = b;
    /* NaN scores sort last */
    int xn = isnan(x->key), yn = isnan(y->key);
    if (xn != yn)
        return xn - yn;
    if (x->key > y->key)
        return -1;
    if (x->key < y->key)
        return 1;
    return (x->idx < y->idx) - (x->idx > y->idx);
}

void kv_argsort_desc(const float *key, int n, int *idx)
{
    kv_pair_t *pr = kv_malloc(sizeof *pr * (size_t)(n ? n : 1), "argsort");
    if (!pr) { /* fall back to position order, latest first (never reached in practice) */
        for (int i = 0; i < n; i++)
            idx[i] = n - 1 - i;
        return;
    }
    for (int i = 0; i < n; i++)
        pr[i] = (kv_pair_t){key[i], i};
    qsort(pr, (size_t)n, sizeof *pr, cmp_desc);
    for (int i = 0; i < n; i++)
        idx[i] = pr[i].idx;
    kv_free(pr);
}

int kv_policy_order(kv_policy_t *p, const kv_layer_ctx_t *c)
{
    const int n = c->n_ctx, H = c->H, G = c->G;
    const int S = p->gran == KV_GRAN_KV ? c->Hkv : c->H;
    if (p->n_store != S || !p->sscores) {
        kv_free(p->sscores);
        kv_free(p->order);
        p->sscores = kv_malloc(sizeof(float) * (size_t)S * (size_t)(n ? n : 1), "storage scores");
        p->order = kv_malloc(sizeof(int) * (size_t)S * (size_t)(n ? n : 1), "selection order");
        if (!p->sscores || !p->order)
            return KV_ENOMEM;
        p->n_store = S;
    }
    (void)H;
#pragma omp parallel for schedule(dynamic, 1)
    for (int s = 0; s < S; s++) {
        float *dst = p->sscores + (size_t)s * n;
        if (p->gran == KV_GRAN_QUERY) {
            memcpy(dst, p->qscores + (size_t)s * n, sizeof(float) * (size_t)n);
        } else {
            const float *src = p->qscores + (size_t)s * G * n;
            for (int j = 0; j < n; j++) {
                float a = src[j];
                for (int g = 1; g < G; g++) {
                    float x = src[(size_t)g * n + j];
                    a = p->agg == KV_AGG_MAX ? (x > a ? x : a) : a + x;
                }
                dst[j] = p->agg == KV_AGG_MEAN ? a / (float)G : a;
            }
        }
        int pf = KV_MIN(p->protect_first, n), pl = KV_MIN(p->protect_last, n);
        for (int j = 0; j < pf; j++)
            dst[j] = INFINITY;
        for (int j = n - pl; j < n; j++)
            dst[j] = INFINITY;
        kv_argsort_desc(dst, n, p->order + (size_t)s * n);
    }
    return KV_OK;
}

void kv_keep_prefix(const kv_policy_t *p, const kv_layer_ctx_t *c, int s, int m, kv_keep_t *keep)
{
    const int n = c->n_ctx;
    uint8_t *mask = keep->mask + (size_t)s * keep->T;
    memset(mask, 0, (size_t)keep->T);
    if (m > n)
        m = n;
    const int *ord = p->order + (size_t)s * n;
    for (int r = 0; r < m; r++)
        mask[ord[r]] = 1;
}

int kv_select_uniform(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate,
                      kv_keep_t *keep)
{
    (void)cstate;
    if (!p->order)
        return kv_error(KV_EINTERNAL, "%s: no selection order (prepare set no scores)", p->label);
    for (int s = 0; s < keep->n_store; s++)
        kv_keep_prefix(p, c, s, b->tokens, keep);
    return KV_OK;
}

int kv_policy_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    size_t need = (size_t)c->H * (size_t)(c->n_ctx ? c->n_ctx : 1);
    kv_free(p->qscores);
    p->qscores = kv_calloc(need, sizeof(float), "policy scores");
    if (!p->qscores)
        return KV_ENOMEM;
    p->scored = 0;
    p->protect_first = p->protect_last = 0;
    if (p->desc->prepare) {
        int rc = p->desc->prepare(p, c);
        if (rc != KV_OK)
            return kv_error_context(rc, "%s: layer %d", p->label, c->layer);
    }
    if (p->scored)
        return kv_policy_order(p, c);
    return KV_OK;
}
