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
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Scores become 64-bit integers that order exactly like the project's rule: the upper 32 bits
 * are the float mapped to an order-preserving unsigned integer (NaN lowest), the lower 32 bits the
 * token index, so "larger key" means "larger score, then later token". */
static inline uint64_t rank_key(float f, int idx)
{
    uint32_t u;
    if (isnan(f)) {
        u = 0;
    } else {
        if (f == 0)
            f = 0.0f; /* -0 ranks with +0 */
        memcpy(&u, &f, 4);
        u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
        if (u == 0)
            u = 1; /* keep 0 for NaN */
    }
    return ((uint64_t)u << 32) | (uint32_t)idx;
}

/* LSD radix sort of keys in descending order (8 passes of 8 bits; passes whose byte is constant
 * are skipped). tmp: n scratch entries. */
static void radix_desc(uint64_t *a, uint64_t *tmp, int n)
{
    for (int i = 0; i < n; i++)
        a[i] = ~a[i]; /* ascending order of the complement = descending order */
    for (int shift = 0; shift < 64; shift += 8) {
        size_t count[257] = {0};
        for (int i = 0; i < n; i++)
            count[((a[i] >> shift) & 0xff) + 1]++;
        if (count[((a[0] >> shift) & 0xff) + 1] == (size_t)n)
            continue;
        for (int b = 0; b < 256; b++)
            count[b + 1] += count[b];
        for (int i = 0; i < n; i++)
            tmp[count[(a[i] >> shift) & 0xff]++] = a[i];
        memcpy(a, tmp, sizeof(uint64_t) * (size_t)n);
    }
    for (int i = 0; i < n; i++)
        a[i] = ~a[i];
}

void kv_argsort_desc(const float *key, int n, int *idx)
{
    uint64_t *k = kv_malloc(sizeof(uint64_t) * 2 * (size_t)(n ? n : 1), "argsort");
    if (!k) { /* fall back to position order, latest first (allocation of a few KiB failed) */
        for (int i = 0; i < n; i++)
            idx[i] = n - 1 - i;
        return;
    }
    for (int i = 0; i < n; i++)
        k[i] = rank_key(key[i], i);
    radix_desc(k, k + n, n);
    for (int i = 0; i < n; i++)
        idx[i] = (int)(uint32_t)k[i];
    kv_free(k);
}

void kv_topk_mask(const float *key, int n, int k, uint8_t *mask)
{
    memset(mask, 0, (size_t)(n > 0 ? n : 0));
    if (k >= n) {
        memset(mask, 1, (size_t)(n > 0 ? n : 0));
        return;
    }
    if (k <= 0)
        return;
    uint64_t *a = kv_malloc(sizeof(uint64_t) * (size_t)n, "top-k");
    if (!a) {
        int *idx = kv_malloc(sizeof(int) * (size_t)n, "top-k");
        if (idx) {
            kv_argsort_desc(key, n, idx);
            for (int r = 0; r < k; r++)
                mask[idx[r]] = 1;
        }
        kv_free(idx);
        return;
    }
    for (int i = 0; i < n; i++)
        a[i] = rank_key(key[i], i);
    /* quickselect: afterwards a[0..k) hold the k largest keys (all keys are distinct) */
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        uint64_t piv = a[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (a[i] > piv)
                i++;
            while (a[j] < piv)
                j--;
            if (i <= j) {
                uint64_t t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (k - 1 <= j)
            hi = j;
        else if (k - 1 >= i)
            lo = i;
        else
            break;
    }
    for (int r = 0; r < k; r++)
        mask[(uint32_t)a[r]] = 1;
    kv_free(a);
}

int kv_policy_order(kv_policy_t *p, const kv_layer_ctx_t *c)
{
    const int n = c->n_ctx, H = c->H, G = c->G;
    const int S = p->gran == KV_GRAN_KV ? c->Hkv : c->H;
    const size_t need = (size_t)S * (size_t)(n ? n : 1);
    if (p->order_cap < need || !p->sscores) {
        kv_free(p->sscores);
        kv_free(p->order);
        p->sscores = kv_malloc(sizeof(float) * need, "storage scores");
        p->order = kv_malloc(sizeof(int) * need, "selection order");
        p->order_cap = 0;
        if (!p->sscores || !p->order)
            return KV_ENOMEM;
        p->order_cap = need;
    }
    p->n_store = S;
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

int kv_select_uniform(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)cstate;
    if (!p->order)
        return kv_error(KV_EINTERNAL, "%s: no selection order (prepare set no scores)", p->label);
    for (int s = 0; s < keep->n_store; s++) {
        if (p->tie_torch) { /* torch.topk's set: the same scores, its own choice among equal ones */
            uint8_t *mask = keep->mask + (size_t)s * keep->T;
            memset(mask, 0, (size_t)keep->T);
            kv_topk_mask_torch(p->sscores + (size_t)s * c->n_ctx, c->n_ctx, b->tokens, mask);
        } else {
            kv_keep_prefix(p, c, s, b->tokens, keep);
        }
    }
    return KV_OK;
}

void kv_policy_read_tie(kv_policy_t *p)
{
    p->tie_torch = !strcmp(kv_params_str(&p->params, "tie"), "torch");
    if (p->tie_torch)
        p->flags &= ~KV_POL_NESTED;
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
