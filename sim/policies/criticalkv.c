/*
 * criticalkv.c: CriticalKV (Feng et al., "Identify Critical KV Cache in LLM Inference from an Output
 * Perturbation Perspective", arXiv:2502.03805), as kvpress 0.5.5 runs it
 * (kvpress/presses/criticalkv_press.py: CriticalKVPress and, with ada=1, CriticalAdaKVPress;
 * docs/POLICIES.md §2.12). A token's attention score is not enough: what it changes in the output is
 * its value projected by W_O, so the score is rescaled by ||v_j W_O^(h)||_1, in two stages.
 *
 * Wraps any one-shot token scorer `inner` (SnapKV by default). Its scores s (per storage head, the
 * inner's protected tokens at max + 1 as kvpress pads them, max over the layer) and, per storage
 * head, the projected value norm w_j = ||v_j W_O^(h)||_1 (mean over the group's query heads; needs a
 * trace captured with --with-wo). For a budget of B tokens (kvpress's n_kept):
 *   ada=0 (CriticalKVPress): stage 1 keeps the top k1 = max(1, int(x * first_stage)) by s, where x is
 *     the unrounded budget (n (1 - cr) on "cr:" budgets); stage 2 ranks the rest by (s + epsilon) w,
 *     and the top B of the two stages together are kept (stage 1 first);
 *   ada=1 (CriticalAdaKVPress): Ada-KV's allocation inside the layer first: every head's top
 *     n_safe = max(1, int(B floor_alpha)) go to the front (score FLT_MAX), the top S B entries of the
 *     layer decide each head's budget B_h; then per head stage 1 keeps its top int(B_h first_stage),
 *     and stage 2 fills B_h by (s + epsilon) w (computed in float: kvpress's FLT_MAX entries can
 *     overflow to inf, which only moves them further to the front).
 * Every top-k is torch.topk's set with tie=torch (kvpress), the project's rule (later token first)
 * otherwise. Nothing is protected: the inner's window is favoured through its padded score but a
 * stage-1 budget smaller than the window lets the value norms decide.
 * Defaults: epsilon 1e-4, first_stage 0.5, floor_alpha 0.2 (kvpress's). Presets: criticalkv@kvpress
 * (CriticalKVPress(SnapKVPress())), criticalkv@kvpress_ada (CriticalAdaKVPress(SnapKVPress())).
 * Deviations: kvpress's ada stages take the first k of one sorted top-max(k) list per layer, which
 * orders equal scores its own way; here each head's stage is its own top-k (the same set except
 * among exactly equal scores). Memory as really freed (kvpress's Ada variants only mask).
 */
#include "sim/common/kv_common.h"
#include "sim/policies/window.h"

#include <cblas.h>
#include <float.h>
#include <math.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"inner", KV_PARAM_STRING, "snapkv", 0, -1, NULL, "token scorer whose scores are rescaled (snapkv, ...)"},
    {"epsilon", KV_PARAM_FLOAT, "0.0001", 0, 1e9, NULL, "added to the score before the value-norm rescaling"},
    {"first_stage", KV_PARAM_FLOAT, "0.5", 0, 1, NULL, "share of the budget chosen by the inner score alone"},
    {"ada", KV_PARAM_BOOL, "0", 0, -1, NULL, "1: head-adaptive budgets inside the layer (CriticalAdaKVPress)"},
    {"floor_alpha", KV_PARAM_FLOAT, "0.2", 0, 1, NULL, "ada: every head's guaranteed share (alpha_safeguard)"},
    KV_PARAM_TIE,
};

static const kv_preset_t presets[] = {
    {"kvpress", "inner=snapkv@kvpress,epsilon=0.0001,first_stage=0.5,ada=0,tie=torch,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 CriticalKVPress(SnapKVPress())"},
    {"kvpress_ada",
     "inner=snapkv@kvpress,epsilon=0.0001,first_stage=0.5,ada=1,floor_alpha=0.2,tie=torch,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 CriticalAdaKVPress(SnapKVPress())"},
};

typedef struct {
    double eps, fsr, alpha;
    int ada;
    /* per layer, from prepare (read-only in select) */
    int S, n;
    float *sc; /* (S, n) inner scores, protected tokens at max + 1 */
    float *w;  /* (S, n) projected value norms */
} ck_t;

static int crit_init(kv_policy_t *p)
{
    ck_t *st = kv_calloc(1, sizeof *st, "criticalkv state");
    if (!st)
        return KV_ENOMEM;
    p->state = st;
    st->eps = kv_params_float(&p->params, "epsilon");
    st->fsr = kv_params_float(&p->params, "first_stage");
    st->alpha = kv_params_float(&p->params, "floor_alpha");
    st->ada = kv_params_bool(&p->params, "ada");
    kv_policy_read_tie(p);
    p->flags &= ~KV_POL_NESTED; /* stage 1 grows with the budget */
    if (st->ada)
        p->flags |= KV_POL_BUDGET_LAYER;
    return kv_policy_inner_create(p, "inner", 0);
}

static void crit_fini(kv_policy_t *p)
{
    ck_t *st = p->state;
    if (st) {
        kv_free(st->sc);
        kv_free(st->w);
    }
    kv_free(st);
}

/* w (S, n): ||v_j W_O^(h)||_1 per query head, averaged over each storage head's query heads. */
static int value_norms(const kv_policy_t *p, const kv_layer_ctx_t *c, float *w)
{
    const int n = c->n_ctx, d = c->d, H = c->H, D = c->meta->model_dim, RB = 256;
    if (!c->wo || D <= 0)
        return kv_error(KV_EINVAL, "criticalkv needs W_O: capture the trace with --with-wo");
    const int nh = p->gran == KV_GRAN_KV ? c->G : 1, S = p->gran == KV_GRAN_KV ? c->Hkv : H;
    float *Y = kv_malloc(sizeof(float) * (size_t)RB * D, "projected values"); /* (RB, D) */
    if (!Y)
        return KV_ENOMEM;
    memset(w, 0, sizeof(float) * (size_t)S * n);
    for (int h = 0; h < H; h++) {
        const int s = p->gran == KV_GRAN_KV ? h / c->G : h;
        const float *V = c->v + (size_t)(h / c->G) * c->T * d; /* (T, d) */
        for (int j0 = 0; j0 < n; j0 += RB) {
            const int nr = KV_MIN(RB, n - j0);
            /* Y = V[j0 .. j0 + nr) W_O[:, h d : (h + 1) d]^T */
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nr, D, d, 1.0f, V + (size_t)j0 * d, d,
                        c->wo + (size_t)h * d, H * d, 0.0f, Y, D);
            for (int r = 0; r < nr; r++) {
                double a = 0;
                for (int o = 0; o < D; o++)
                    a += fabs(Y[(size_t)r * D + o]);
                w[(size_t)s * n + j0 + r] += (float)(a / nh);
            }
        }
    }
    kv_free(Y);
    return KV_OK;
}

static int crit_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    ck_t *st = p->state;
    kv_policy_t *in = p->inner;
    int rc = kv_policy_prepare(in, c);
    if (rc)
        return rc;
    if (!in->scored || !in->order)
        return kv_error(KV_EINVAL, "criticalkv: inner policy %s gave no token scores", in->label);
    const int n = c->n_ctx, S = in->n_store;
    if (st->S != S || st->n != n || !st->sc) {
        kv_free(st->sc);
        kv_free(st->w);
        st->sc = kv_malloc(sizeof(float) * (size_t)S * (size_t)(n ? n : 1), "criticalkv scores");
        st->w = kv_malloc(sizeof(float) * (size_t)S * (size_t)(n ? n : 1), "criticalkv norms");
        if (!st->sc || !st->w)
            return KV_ENOMEM;
        st->S = S;
        st->n = n;
    }
    /* kvpress's padding of the protected tokens: the layer's largest other score + 1 */
    float mx = -INFINITY;
    for (size_t x = 0; x < (size_t)S * n; x++)
        if (isfinite(in->sscores[x]))
            mx = in->sscores[x] > mx ? in->sscores[x] : mx;
    const float pad = isfinite(mx) ? mx + 1.0f : 1.0f;
    for (size_t x = 0; x < (size_t)S * n; x++)
        st->sc[x] = isinf(in->sscores[x]) && in->sscores[x] > 0 ? pad : in->sscores[x];
    return value_norms(p, c, st->w);
}

static void topk(const kv_policy_t *p, const float *key, int n, int k, uint8_t *mask)
{
    if (p->tie_torch)
        kv_topk_mask_torch(key, n, k, mask);
    else
        kv_topk_mask(key, n, k, mask);
}

static int crit_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)cstate;
    const ck_t *st = p->state;
    const int n = c->n_ctx, S = keep->n_store, B = KV_MIN(b->tokens, n);
    if (S != st->S || n != st->n)
        return kv_error(KV_EINTERNAL, "criticalkv: select without prepare");
    float *sc = kv_malloc(sizeof(float) * (size_t)S * n, "criticalkv scores");
    uint8_t *m1 = kv_malloc((size_t)S * n, "criticalkv stage 1");
    int *hb = kv_malloc(sizeof(int) * (size_t)S, "criticalkv head budgets");
    if (!sc || !m1 || !hb) {
        kv_free(sc), kv_free(m1), kv_free(hb);
        return KV_ENOMEM;
    }
    memcpy(sc, st->sc, sizeof(float) * (size_t)S * n);
    if (!st->ada) {
        int k1 = (int)(kv_budget_exact(b, n) * st->fsr); /* Python: int((1 - cr) * k_len * ratio) */
        if (st->fsr > 0 && k1 < 1)
            k1 = 1;
        for (int s = 0; s < S; s++)
            hb[s] = B;
        for (int s = 0; s < S; s++)
            topk(p, sc + (size_t)s * n, n, KV_MIN(k1, n), m1 + (size_t)s * n);
    } else {
        int safe = (int)(B * st->alpha);
        if (st->alpha > 0 && B > 0 && safe < 1)
            safe = 1;
        for (int s = 0; s < S; s++) { /* the guaranteed tokens go to the front */
            topk(p, sc + (size_t)s * n, n, safe, m1 + (size_t)s * n);
            for (int j = 0; j < n; j++)
                if (m1[(size_t)s * n + j])
                    sc[(size_t)s * n + j] = FLT_MAX;
        }
        uint8_t *all = kv_malloc((size_t)S * n, "criticalkv allocation");
        if (!all) {
            kv_free(sc), kv_free(m1), kv_free(hb);
            return KV_ENOMEM;
        }
        topk(p, sc, S * n, S * B, all); /* the layer's top S B decide the head budgets */
        for (int s = 0; s < S; s++) {
            hb[s] = 0;
            for (int j = 0; j < n; j++)
                hb[s] += all[(size_t)s * n + j];
        }
        kv_free(all);
        for (int s = 0; s < S; s++)
            topk(p, sc + (size_t)s * n, n, (int)((float)hb[s] * (float)st->fsr), m1 + (size_t)s * n);
    }
    /* stage 2: (s + eps) w, stage 1 in front; keep each head's budget */
    const float eps = (float)st->eps;
    for (int s = 0; s < S; s++) {
        float *row = sc + (size_t)s * n;
        for (int j = 0; j < n; j++)
            row[j] = m1[(size_t)s * n + j] ? FLT_MAX : (row[j] + eps) * st->w[(size_t)s * n + j];
        uint8_t *mk = keep->mask + (size_t)s * keep->T;
        memset(mk, 0, (size_t)keep->T);
        topk(p, row, n, hb[s], mk);
    }
    kv_free(sc), kv_free(m1), kv_free(hb);
    return KV_OK;
}

static size_t crit_meta_bytes(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b,
                              const kv_keep_t *keep)
{
    (void)c, (void)b;
    const ck_t *st = p->state;
    return st->ada ? sizeof(int32_t) * (size_t)(2 * keep->n_store + 1) : 0; /* head_lens + cu_seqlens */
}

const kv_policy_desc_t kv_policy_criticalkv = {
    .name = "criticalkv",
    .doc = "any scorer's top share, the rest by score x ||v W_O||_1; ada=1 allocates per head first (Feng et "
           "al. 2025)",
    .paper = "arXiv:2502.03805",
    .code = "NVIDIA/kvpress kvpress/presses/criticalkv_press.py (CriticalKVPress, CriticalAdaKVPress)",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NEEDS_WO,
    .variants = "inner=snapkv(window=8);ada=1,inner=snapkv(window=8);inner=knorm,first_stage=0,tie=torch;"
                "ada=1,inner=expected_attention(sinks=2),floor_alpha=0.5",
    .init = crit_init,
    .fini = crit_fini,
    .prepare = crit_prepare,
    .select = crit_select,
    .meta_bytes = crit_meta_bytes,
};
