/*
 * cake.c: CAKE (Qin et al., "CAKE: Cascading and Adaptive KV Cache Eviction with Layer Preferences",
 * arXiv:2503.12491, ICLR 2025; reference code: the cakekv repository, cake/cake_cache.py
 * (CakeprefillKVCache, adjust_budgets in cake/utils.py) and cake/model/modify_llama.py). Layer budgets
 * follow each layer's attention DISPERSION: layers whose window attention is spread out (high
 * entropy) and shifting (high variance across the window's queries) get more of the sequence's cache.
 *
 * Per layer, with P the softmax of the last w context queries over the context keys (causal inside
 * the window, kv_ctx_window_probs) and the keys before the window j < n - w:
 *   dispersion  D = - sum_{h, r, j} P log(P + 1e-10)          (all query heads and window queries)
 *   shift       V = sum_{h, j} var_r P[h, r, j]                (unbiased variance over the window)
 *   preference  pref = D^(1 / tau1) V^(1 / tau2)
 *   token score s[h, j] = mean_r P + gamma var_r P, average-pooled (k 5, count_include_pad), averaged
 *               over the group (agg), window tokens kept.
 * Allocation over the sequence (cross-layer: a pre-pass scores every layer first): with B tokens per
 * head window included, total = (B - w) L; layer l gets int(pref_l / sum pref * total), then the
 * reference's adjust_budgets: budgets are capped at n - w and the excess is spread over the layers
 * below the cap (the first `remainder` of them one more), then the total is restored the same way;
 * each layer keeps its window + top budget_l by token score.
 * The reference compresses only when n > B + w (cake_cache.py: seq_len <= cache_size + window_size
 * returns the cache untouched): below that everything is kept (budget_slack).
 * Defaults: window 32, gamma 200 (pred_cake.py), tau1 = tau2 = 1 (pred_cake.py's fallback; the
 * per-model values of config/model2tau.json, e.g. Llama-3.1-8B at cache 1024: tau1 1.6, tau2 0.4,
 * are parameters). The cascading mode (budgets of the layers seen so far, re-evicting earlier layers
 * as later ones arrive) ends at the same layer budgets and is not replayed step by step.
 * Deviations: the reference's decode-time eviction (CakeDecodingKVCache_LayerWise, each step
 * re-ranks the cache by the new query) is not replayed: appended tokens are kept, as for SnapKV;
 * B <= w keeps the last B tokens per head (the reference's total turns negative); fp32 scores.
 */
#include "sim/common/kv_common.h"
#include "sim/policies/window.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"window", KV_PARAM_INT, "32", 1, 1 << 20, NULL, "observation window (kept, inside the budget)"},
    {"gamma", KV_PARAM_FLOAT, "200", 0, 1e12, NULL, "weight of the variance in the token score"},
    {"tau1", KV_PARAM_FLOAT, "1", 1e-6, 1e6, NULL, "preference = dispersion^(1/tau1) x shift^(1/tau2)"},
    {"tau2", KV_PARAM_FLOAT, "1", 1e-6, 1e6, NULL, "see tau1"},
};

static const kv_preset_t presets[] = {
    {"paper", "window=32,gamma=200,tau1=1,tau2=1,gran=kv,agg=mean",
     "cakekv pred_cake.py defaults (tau from config/model2tau.json per model and cache size)"},
};

typedef struct {
    int window;
    double gamma, tau1, tau2;
    int L, n;
    double *pref; /* (L) from the pre-pass */
    int n_budgets;
    char (*btext)[32];
    int *cap; /* (n_budgets, L) past tokens kept per head; -1: everything */
} cake_t;

static int cake_init(kv_policy_t *p)
{
    cake_t *s = kv_calloc(1, sizeof *s, "cake state");
    if (!s)
        return KV_ENOMEM;
    p->state = s;
    s->window = (int)kv_params_int(&p->params, "window");
    s->gamma = kv_params_float(&p->params, "gamma");
    s->tau1 = kv_params_float(&p->params, "tau1");
    s->tau2 = kv_params_float(&p->params, "tau2");
    return KV_OK;
}

static void cake_fini(kv_policy_t *p)
{
    cake_t *s = p->state;
    if (s) {
        kv_free(s->pref);
        kv_free(s->btext);
        kv_free(s->cap);
    }
    kv_free(s);
}

static int cake_prescore(kv_policy_t *p, kv_layer_ctx_t *c)
{
    cake_t *s = p->state;
    if (c->layer == 0 || !s->pref || s->L != c->n_layers) { /* a new replay */
        kv_free(s->pref);
        s->pref = kv_calloc((size_t)c->n_layers, sizeof(double), "cake preferences");
        if (!s->pref)
            return KV_ENOMEM;
        s->L = c->n_layers;
    }
    const int n = c->n_ctx, w = KV_MIN(s->window, n), m = n - w;
    s->n = n;
    const float *P; /* (H, w, n) */
    int rc = kv_ctx_window_probs(c, w, &P);
    if (rc)
        return rc;
    double disp = 0, var = 0;
    for (int h = 0; h < c->H; h++)
        for (int j = 0; j < m; j++) {
            double a = 0, q = 0;
            for (int r = 0; r < w; r++) {
                const double x = P[((size_t)h * w + r) * n + j];
                disp -= x * log(x + 1e-10);
                a += x;
                q += x * x;
            }
            if (w > 1)
                var += fmax(0.0, (q - a * a / w) / (w - 1));
        }
    s->pref[c->layer] = pow(disp, 1.0 / s->tau1) * pow(var, 1.0 / s->tau2);
    return KV_OK;
}

/* cake/utils.py adjust_budgets, on integer budgets b (L), cap seq_len, target total. */
static void adjust_budgets(long *b, int L, long total, long seq_len)
{
    long excess = 0;
    for (int l = 0; l < L; l++)
        if (b[l] > seq_len) {
            excess += b[l] - seq_len;
            b[l] = seq_len;
        }
    if (excess > 0) {
        long nv = 0;
        for (int l = 0; l < L; l++)
            nv += b[l] < seq_len;
        if (nv > 0) {
            const long per = excess / nv, rem = excess % nv;
            long k = 0;
            for (int l = 0; l < L; l++)
                if (b[l] < seq_len)
                    b[l] += per + (k++ < rem ? 1 : 0);
        }
    }
    long cur = 0;
    for (int l = 0; l < L; l++)
        cur += b[l];
    const long diff = total - cur;
    if (diff != 0) {
        long nv = 0;
        for (int l = 0; l < L; l++)
            nv += diff > 0 ? b[l] < seq_len : b[l] > 1;
        if (nv > 0) {
            const long ad = labs(diff) / nv, rem = labs(diff) % nv;
            long k = 0;
            for (int l = 0; l < L; l++)
                if (diff > 0 ? b[l] < seq_len : b[l] > 1)
                    b[l] += (diff > 0 ? 1 : -1) * (ad + (k++ < rem ? 1 : 0));
        }
    }
}

static int cake_allocate(kv_policy_t *p, const kv_trace_meta_t *m, int n_ctx, const kv_budget_t *budgets, int nb)
{
    (void)m;
    cake_t *s = p->state;
    if (!s->pref)
        return kv_error(KV_EINTERNAL, "cake: allocate without a pre-pass");
    const int L = s->L, w = KV_MIN(s->window, n_ctx);
    kv_free(s->btext);
    kv_free(s->cap);
    s->btext = kv_calloc((size_t)nb, sizeof *s->btext, "cake budgets");
    s->cap = kv_calloc((size_t)nb * L, sizeof(int), "cake allocation");
    long *b = kv_calloc((size_t)L, sizeof(long), "cake layer budgets");
    if (!s->btext || !s->cap || !b) {
        kv_free(b);
        return KV_ENOMEM;
    }
    s->n_budgets = nb;
    double sum = 0;
    for (int l = 0; l < L; l++)
        sum += s->pref[l];
    for (int k = 0; k < nb; k++) {
        snprintf(s->btext[k], sizeof s->btext[k], "%s", budgets[k].text);
        const int B = budgets[k].tokens;
        int *cap = s->cap + (size_t)k * L;
        if (n_ctx <= B + w || B <= w) { /* the reference leaves the cache alone / undefined: see the top */
            for (int l = 0; l < L; l++)
                cap[l] = n_ctx <= B + w ? -1 : 0;
            continue;
        }
        const long total = (long)(B - w) * L;
        for (int l = 0; l < L; l++) /* np.array(..., dtype=int) truncates */
            b[l] = sum > 0 ? (long)(s->pref[l] / sum * (double)total) : B - w;
        adjust_budgets(b, L, total, n_ctx - w);
        for (int l = 0; l < L; l++)
            cap[l] = (int)KV_MAX(0, KV_MIN(b[l], (long)(n_ctx - w)));
    }
    kv_free(b);
    return KV_OK;
}

static int cake_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const cake_t *s = p->state;
    const int n = c->n_ctx, w = KV_MIN(s->window, n), m = n - w;
    const float *P;
    int rc = kv_ctx_window_probs(c, w, &P);
    if (rc)
        return rc;
    float *raw = kv_malloc(sizeof(float) * (size_t)(m ? m : 1), "cake scores");
    if (!raw)
        return KV_ENOMEM;
    for (int h = 0; h < c->H; h++) {
        for (int j = 0; j < m; j++) {
            double a = 0, q = 0;
            for (int r = 0; r < w; r++) {
                const double x = P[((size_t)h * w + r) * n + j];
                a += x;
                q += x * x;
            }
            const double var = w > 1 ? fmax(0.0, (q - a * a / w) / (w - 1)) : 0.0;
            raw[j] = (float)(a / w + s->gamma * var);
        }
        float *out = p->qscores + (size_t)h * n;
        kv_pool1d(raw, m, 5, KV_POOL_AVG, out);
        for (int j = m; j < n; j++)
            out[j] = 0;
    }
    kv_free(raw);
    p->protect_last = w;
    p->scored = 1;
    return KV_OK;
}

static int cake_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)cstate;
    const cake_t *s = p->state;
    int k = -1;
    for (int x = 0; x < s->n_budgets && k < 0; x++)
        if (!strcmp(s->btext[x], b->text))
            k = x;
    if (k < 0 || !s->cap)
        return kv_error(KV_EINTERNAL, "cake: no cross-layer allocation for budget %s (run through kv_replay)", b->text);
    const int n = c->n_ctx, w = KV_MIN(s->window, n), cap = s->cap[(size_t)k * s->L + c->layer];
    const int m = cap < 0 ? n : b->tokens <= w ? b->tokens : w + cap;
    for (int x = 0; x < keep->n_store; x++)
        kv_keep_prefix(p, c, x, m, keep);
    return KV_OK;
}

static int cake_kept_window(const kv_policy_t *p)
{
    return ((const cake_t *)p->state)->window;
}

/* a context of at most B + window tokens is not compressed (the reference's condition) */
static int cake_budget_slack(const kv_policy_t *p, int n_ctx, int B)
{
    const int w = ((const cake_t *)p->state)->window;
    return n_ctx <= B + w && n_ctx > B ? n_ctx - B : 0;
}

const kv_policy_desc_t kv_policy_cake = {
    .name = "cake",
    .doc = "layer budgets from attention dispersion (entropy x variance of the window attention), tokens by "
           "mean + gamma variance (Qin et al. 2025)",
    .paper = "arXiv:2503.12491",
    .code = "cakekv cake/cake_cache.py (CakeprefillKVCache), cake/utils.py (adjust_budgets)",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_CROSS_LAYER | KV_POL_BUDGET_SEQUENCE,
    .variants = "window=8;window=4,gamma=0,tau1=0.5,tau2=2",
    .init = cake_init,
    .fini = cake_fini,
    .prepare = cake_prepare,
    .select = cake_select,
    .prescore = cake_prescore,
    .allocate = cake_allocate,
    .kept_window = cake_kept_window,
    .budget_slack = cake_budget_slack,
};
