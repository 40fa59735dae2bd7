/*
 * simlayerkv.c: SimLayerKV (Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache
 * Reduction", arXiv:2410.13846), as kvpress 0.5.5 runs it (kvpress/presses/simlayerkv_press.py,
 * SimLayerKVPress): a layer is "lazy" when its last queries look almost only at the first and the
 * most recent tokens; a lazy layer keeps just those (StreamingLLM), every other layer keeps
 * everything. One decision per layer, for all heads.
 *
 * kvpress sizes the lazy cache with n_recent; kvsim with the budget B = what a lazy layer keeps:
 *     n_recent = B - initial + last   (kvpress keeps keys[:initial] + keys[-n_recent + last:])
 * Per layer, n = context length:
 *   no compression when threshold = 1 or n <= initial + n_recent + last (kvpress's min_length);
 *   else a = attention of the last `last` context queries over the keys before them ([0, n - last)),
 *     averaged over every query head and those queries (kv_ctx_window_probs, their own columns
 *     dropped after the softmax, as SnapKVPress.compute_window_attention); the layer is lazy when
 *     sum_{j < initial} a_j + sum of the last n_recent entries of a > threshold (the measured recent
 *     span ends `last` tokens before the kept one, as in kvpress);
 *   lazy: keep [0, initial) and the last B - initial tokens; otherwise the whole context.
 * Defaults: initial 4, last 1 (kvpress, "to match SKLV-decode"); threshold 0.9 (kvpress's
 * recommendation for Llama 3; 0.65 Llama 2, 0.8 Mistral, 0.85 Qwen; kvpress's default 1.0 disables
 * the press). Preset simlayerkv@kvpress = the defaults with kvpress's granularity.
 * Budget: non-lazy layers keep everything, so the budget holds only for lazy layers (budget_slack);
 * not nested (a layer lazy at a larger budget keeps fewer tokens than when it was not).
 * Deviation: the recent span is clamped to the context (kvpress's slices clamp the same way).
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <string.h>

static const kv_param_def_t params[] = {
    {"threshold", KV_PARAM_FLOAT, "0.9", 0, 1, NULL,
     "lazy when the last queries put more than this on the initial + recent tokens (1: never)"},
    {"initial", KV_PARAM_INT, "4", 0, 1 << 20, NULL, "initial tokens a lazy layer keeps (sinks)"},
    {"last", KV_PARAM_INT, "1", 1, 1 << 20, NULL, "last context queries that judge laziness"},
};

static const kv_preset_t presets[] = {
    {"kvpress", "threshold=0.9,initial=4,last=1,gran=kv", "NVIDIA kvpress 0.5.5 SimLayerKVPress (Llama 3 threshold)"},
};

typedef struct {
    int n;
    float *a; /* (n - last) the mean attention of the last queries */
} slk_state_t;

static int slk_init(kv_policy_t *p)
{
    p->state = kv_calloc(1, sizeof(slk_state_t), "simlayerkv state");
    return p->state ? KV_OK : KV_ENOMEM;
}

static void slk_fini(kv_policy_t *p)
{
    slk_state_t *st = p->state;
    if (st)
        kv_free(st->a);
    kv_free(st);
}

static int slk_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    slk_state_t *st = p->state;
    const int n = c->n_ctx, w = KV_MIN((int)kv_params_int(&p->params, "last"), n), m = n - w;
    const float *P; /* (H, w, n) */
    int rc = kv_ctx_window_probs(c, w, &P);
    if (rc)
        return rc;
    kv_free(st->a);
    st->a = kv_calloc((size_t)(m > 0 ? m : 1), sizeof(float), "simlayerkv attention");
    if (!st->a)
        return KV_ENOMEM;
    st->n = n;
    for (int j = 0; j < m; j++) {
        double a = 0;
        for (int h = 0; h < c->H; h++)
            for (int r = 0; r < w; r++)
                a += P[((size_t)h * w + r) * n + j];
        st->a[j] = (float)(a / ((double)c->H * w));
    }
    return KV_OK;
}

/* 1 when the layer is lazy at budget B (see the top comment). */
static int is_lazy(const kv_policy_t *p, const slk_state_t *st, int B)
{
    const double thr = kv_params_float(&p->params, "threshold");
    const int n = st->n, ini = (int)kv_params_int(&p->params, "initial"), last = (int)kv_params_int(&p->params, "last");
    const long recent = (long)B - ini + last;
    if (thr >= 1.0 || recent < 1 || (long)n <= ini + recent + last)
        return 0;
    const int m = n - KV_MIN(last, n);
    double s = 0;
    for (int j = 0; j < KV_MIN(ini, m); j++)
        s += st->a[j];
    for (long j = KV_MAX(0, m - recent); j < m; j++)
        s += st->a[j];
    return s > thr;
}

static int slk_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)cstate;
    const slk_state_t *st = p->state;
    const int n = c->n_ctx, B = b->tokens, ini = (int)kv_params_int(&p->params, "initial");
    const int lazy = is_lazy(p, st, B);
    for (int s = 0; s < keep->n_store; s++) {
        uint8_t *mk = keep->mask + (size_t)s * keep->T;
        memset(mk, 0, (size_t)keep->T);
        if (!lazy) {
            memset(mk, 1, (size_t)n);
            continue;
        }
        memset(mk, 1, (size_t)KV_MIN(ini, n));
        for (int j = KV_MAX(0, n - (B - ini)); j < n; j++)
            mk[j] = 1;
    }
    return KV_OK;
}

/* a layer that is not lazy keeps the whole context */
static int slk_budget_slack(const kv_policy_t *p, int n_ctx, int B)
{
    (void)p;
    return n_ctx > B ? n_ctx - B : 0;
}

const kv_policy_desc_t kv_policy_simlayerkv = {
    .name = "simlayerkv",
    .doc = "lazy layers (last queries attend to initial + recent tokens) keep only those, the others keep "
           "everything (Zhang et al. 2024)",
    .paper = "arXiv:2410.13846",
    .code = "NVIDIA/kvpress kvpress/presses/simlayerkv_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT,
    .variants = "threshold=0.5;threshold=0.2,initial=2,last=4;threshold=1",
    .init = slk_init,
    .fini = slk_fini,
    .prepare = slk_prepare,
    .select = slk_select,
    .budget_slack = slk_budget_slack,
};
