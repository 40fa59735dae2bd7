/*
 * window.c: the SnapKV observation-window score shared by snapkv, pyramidkv, adakv and chunkkv
 * (docs/POLICIES.md §1), and the composition of an inner scorer (adakv(inner=...),
 * chunkkv(inner=...)).
 *
 * Score of context token j for query head h, with n = n_ctx and w = min(window, n):
 *   P = softmax of the last w context queries over ALL context keys, causal inside the window
 *       (kv_ctx_window_probs: fp32, scale 1/sqrt(d));
 *   s[h, j] = sum (or mean) over the w window queries of P[h, r, j], for j < n - w (the window
 *             columns are dropped after the softmax, without renormalising);
 *   s = pool(s) along j over the pre-window region [0, n - w): stride 1, padding k/2; max ignores
 *       the padding, avg always divides by k (PyTorch avg_pool1d count_include_pad=True, so the
 *       first and last k/2 positions are biased low, as in every reference);
 *   granularity kv: the engine combines the group with `agg` after pooling (kvpress), or with
 *       gqa=before_pool the group is combined first and then pooled (KVCache-Factory HEAD's
 *       --gqa_score_agg, FFY0/AdaKV gqa_support).
 * The window tokens are protected (p->protect_last = w) and sit inside the budget.
 * Deviation from every reference: the references cast the fp32 probabilities back to the model
 * dtype (bf16/fp16) before the sum and the pooling; we keep fp32 (sums accumulated in double), so
 * near-ties can resolve differently. Ties resolve with the project rule (later token first).
 */
#include "sim/policies/window.h"

#include "sim/common/kv_common.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

int kv_obswin_read(const kv_params_t *pr, kv_obswin_t *o, const char *owner)
{
    o->window = (int)kv_params_int(pr, "window");
    o->kernel = (int)kv_params_int(pr, "kernel");
    const char *pool = kv_params_str(pr, "pool");
    o->pool = !strcmp(pool, "max") ? KV_POOL_MAX : !strcmp(pool, "avg") ? KV_POOL_AVG : KV_POOL_NONE;
    o->qagg_mean = !strcmp(kv_params_str(pr, "qagg"), "mean");
    o->gqa_before = !strcmp(kv_params_str(pr, "gqa"), "before_pool");
    if (o->kernel % 2 == 0)
        return kv_error(KV_EINVAL,
                        "%s: kernel=%d must be odd (stride-1 pooling with padding k/2 keeps the length only for odd k)",
                        owner, o->kernel);
    return KV_OK;
}

void kv_pool1d(const float *in, int m, int k, kv_pool_t pool, float *out)
{
    const int r = k / 2;
    for (int j = 0; j < m; j++) {
        if (pool == KV_POOL_NONE) {
            out[j] = in[j];
            continue;
        }
        int lo = j - r < 0 ? 0 : j - r, hi = j + r >= m ? m - 1 : j + r;
        if (pool == KV_POOL_MAX) {
            float a = in[lo];
            for (int t = lo + 1; t <= hi; t++)
                a = in[t] > a ? in[t] : a;
            out[j] = a;
        } else {
            double a = 0;
            for (int t = lo; t <= hi; t++)
                a += in[t];
            out[j] = (float)(a / k); /* padding counts as zeros: always divide by k */
        }
    }
}

int kv_obswin_score(kv_policy_t *p, kv_layer_ctx_t *c, const kv_obswin_t *o)
{
    const int n = c->n_ctx, H = c->H, G = c->G;
    const int w = o->window < n ? o->window : n, m = n - w;
    const float *P; /* (H, w, n) */
    int rc = kv_ctx_window_probs(c, w, &P);
    if (rc)
        return rc;
    float *raw = kv_malloc(sizeof(float) * (size_t)H * (size_t)(m ? m : 1), "window scores"); /* (H, m) */
    float *red = kv_malloc(sizeof(float) * (size_t)(m ? m : 1), "group scores");              /* (m) */
    if (!raw || !red) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int h = 0; h < H; h++)
        for (int j = 0; j < m; j++) {
            double a = 0;
            for (int r = 0; r < w; r++)
                a += P[((size_t)h * w + r) * n + j];
            raw[(size_t)h * m + j] = (float)(o->qagg_mean ? a / w : a);
        }
    if (p->gran == KV_GRAN_KV && o->gqa_before) {
        for (int g = 0; g < c->Hkv; g++) {
            const float *src = raw + (size_t)g * G * m;
            for (int j = 0; j < m; j++) {
                float a = src[j];
                for (int x = 1; x < G; x++) {
                    float y = src[(size_t)x * m + j];
                    a = p->agg == KV_AGG_MAX ? (y > a ? y : a) : a + y;
                }
                red[j] = p->agg == KV_AGG_MEAN ? a / (float)G : a;
            }
            for (int x = 0; x < G; x++)
                kv_pool1d(red, m, o->kernel, o->pool, p->qscores + (size_t)(g * G + x) * n);
        }
    } else {
        for (int h = 0; h < H; h++)
            kv_pool1d(raw + (size_t)h * m, m, o->kernel, o->pool, p->qscores + (size_t)h * n);
    }
    for (int h = 0; h < H; h++)
        for (int j = m; j < n; j++)
            p->qscores[(size_t)h * n + j] = 0; /* window: protected, lifted to +inf by the engine */
    p->protect_last = w;
    p->scored = 1;
done:
    kv_free(raw);
    kv_free(red);
    return rc;
}

/* Append "k=v" pairs of a raw parameter set to buf as a spec. */
static int build_spec(const char *name, const kv_params_t *raw, char *buf, size_t len)
{
    size_t used = (size_t)snprintf(buf, len, "%s", name);
    for (int i = 0; i < raw->n && used < len; i++)
        used += (size_t)snprintf(buf + used, len - used, "%c%s=%s", i ? ',' : '(', raw->key[i], raw->val[i]);
    if (raw->n && used < len)
        used += (size_t)snprintf(buf + used, len - used, ")");
    return used < len ? KV_OK : kv_error(KV_ERANGE, "inner policy spec of %s too long", name);
}

int kv_policy_inner_create(kv_policy_t *outer, const char *key, int allow_pyramid)
{
    const char *owner = outer->desc->name;
    const char *spec = kv_params_str(&outer->params, key);
    char full[2 * KV_PARAM_VAL_LEN];
    kv_params_t raw, given;
    const kv_policy_desc_t *idesc;
    int rc = kv_policy_spec_expand(spec, &idesc, &raw, &given); /* presets allowed: inner=snapkv@kvpress */
    if (rc)
        return kv_error_context(rc, "%s: %s=%s", owner, key, spec);
    const char *name = idesc->name;
    /* the inner scores the same storage heads as the outer allocates over (a preset's gran/agg give
     * way to the outer's; values written in the inner spec must agree) */
    const char *common[2] = {"gran", "agg"};
    for (int i = 0; i < 2; i++) {
        const char *mine = kv_params_str(&outer->params, common[i]);
        for (int j = 0; j < given.n; j++)
            if (!strcmp(given.key[j], common[i]) && strcmp(given.val[j], mine))
                return kv_error(KV_EINVAL, "%s: %s=%s sets %s=%s but the outer policy has %s=%s (set it on %s)", owner,
                                key, spec, common[i], given.val[j], common[i], mine, owner);
        if ((rc = kv_params_set(&raw, common[i], mine)))
            return rc;
    }
    if ((rc = build_spec(name, &raw, full, sizeof full)))
        return rc;
    kv_policy_t *in = NULL;
    if ((rc = kv_policy_create(full, &in)))
        return kv_error_context(rc, "%s: %s", owner, key);
    const kv_policy_desc_t *d = in->desc;
    int is_pyramid = d == &kv_policy_pyramidkv;
    if (!(in->flags & KV_POL_ONESHOT) || !(in->flags & KV_POL_SCORER) ||
        (in->flags & (KV_POL_CROSS_LAYER | KV_POL_NEEDS_SEGMENTS | KV_POL_NEEDS_WO)) ||
        (is_pyramid && !allow_pyramid)) {
        rc = kv_error(KV_EINVAL,
                      "%s: %s=%s: the inner policy must be a one-shot token scorer (snapkv, knorm, "
                      "expected_attention, ...%s); %s has its own allocation or runs at decode time",
                      owner, key, spec, allow_pyramid ? ", or pyramidkv" : "", d->name);
        kv_policy_free(in);
        return rc;
    }
    /* rewrite the parameter with the inner's canonical label, and the outer label with it */
    int idx = -1;
    for (int i = 0; i < outer->params.n; i++)
        if (!strcmp(outer->params.key[i], key))
            idx = i;
    if (idx < 0 || strlen(in->label) >= KV_PARAM_VAL_LEN) {
        rc = kv_error(KV_ERANGE, "%s: inner label %s too long", owner, in->label);
        kv_policy_free(in);
        return rc;
    }
    snprintf(outer->params.val[idx], KV_PARAM_VAL_LEN, "%s", in->label);
    if ((rc = kv_params_label(owner, &outer->params, outer->label, sizeof outer->label))) {
        kv_policy_free(in);
        return rc;
    }
    outer->flags |= in->flags & KV_POL_RANDOM;
    outer->inner = in;
    return KV_OK;
}
