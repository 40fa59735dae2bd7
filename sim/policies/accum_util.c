/*
 * accum_util.c: helpers of the accumulated-attention and decode-time policies (see
 * accum_internal.h): per-(policy, budget) accumulator state, cached-position lists, "keep the m
 * best candidates" with the project-wide tie-break, and KV-group aggregation of per-head values.
 */
#include "sim/policies/accum_internal.h"

#include "sim/common/kv_common.h"

#include <string.h>

int kv_acc_state_get(void **cstate, int H, int T, kv_acc_state_t **out)
{
    kv_acc_state_t *st = *cstate;
    if (st && st->H == H && st->T == T) {
        *out = st;
        return KV_OK;
    }
    kv_acc_state_free(st);
    *cstate = NULL;
    st = kv_calloc(1, sizeof *st, "decode-time policy state");
    if (!st)
        return KV_ENOMEM;
    st->H = H;
    st->T = T;
    size_t ht = (size_t)H * (size_t)(T ? T : 1), t = (size_t)(T ? T : 1);
    st->acc = kv_calloc(ht, sizeof(float), "attention accumulator");
    st->vec = kv_calloc(t, sizeof(float), "token scores");
    st->key = kv_calloc(t, sizeof(float), "candidate scores");
    st->pos = kv_calloc(t, sizeof(int), "candidate positions");
    st->idx = kv_calloc(t, sizeof(int), "candidate ranking");
    if (!st->acc || !st->vec || !st->key || !st->pos || !st->idx) {
        kv_acc_state_free(st);
        return KV_ENOMEM;
    }
    *cstate = st;
    *out = st;
    return KV_OK;
}

void kv_acc_state_free(void *cstate)
{
    kv_acc_state_t *st = cstate;
    if (!st)
        return;
    kv_free(st->acc);
    kv_free(st->vec);
    kv_free(st->key);
    kv_free(st->pos);
    kv_free(st->idx);
    kv_free(st);
}

int kv_acc_cached(const uint8_t *mk, int upto, int *pos)
{
    int n = 0;
    for (int j = 0; j < upto; j++)
        if (mk[j])
            pos[n++] = j;
    return n;
}

void kv_acc_keep_best(kv_acc_state_t *st, const int *pos, const float *key, int n, int m, uint8_t *mk)
{
    if (m >= n)
        return;
    if (m < 0)
        m = 0;
    /* key is in ascending position order, so the "larger index first" tie-break keeps the later
     * token; only membership matters, so a linear-time selection suffices */
    uint8_t *keep = (uint8_t *)st->idx; /* n bytes of the n-int scratch */
    kv_topk_mask(key, n, m, keep);
    for (int r = 0; r < n; r++)
        if (!keep[r])
            mk[pos[r]] = 0;
}

float kv_acc_group(const kv_policy_t *p, const float *v, size_t stride, int G, int s, int j)
{
    if (p->gran == KV_GRAN_QUERY)
        return v[(size_t)s * stride + j];
    const float *src = v + (size_t)s * G * stride;
    float a = src[j];
    for (int g = 1; g < G; g++) {
        float x = src[(size_t)g * stride + j];
        a = p->agg == KV_AGG_MAX ? (x > a ? x : a) : a + x;
    }
    return p->agg == KV_AGG_MEAN ? a / (float)G : a;
}

size_t kv_acc_score_bytes(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_keep_t *keep)
{
    size_t slots = 0;
    for (size_t x = 0; x < (size_t)keep->n_store * keep->T; x++)
        slots += keep->mask[x] != 0;
    return slots * sizeof(float) * (p->gran == KV_GRAN_KV ? (size_t)c->G : 1);
}
