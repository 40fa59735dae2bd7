/*
 * adakv.c: Ada-KV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget
 * Allocation for Efficient LLM Inference", arXiv:2407.11550; docs/POLICIES.md §2.5): inside each
 * layer, the storage heads share Hs * B tokens and each head gets what its scores earn against the
 * other heads (Theorem 3.3: the global top-k over the concatenated heads minimises the L1 loss
 * bound), with a safeguard so no head starves. It allocates over ANY one-shot token scorer given as
 * `inner` (created with the outer gran/agg, prepared every layer; its sorted scores are used):
 *   adakv(inner=snapkv(...))     Ada-SnapKV
 *   adakv(inner=pyramidkv(...))  Ada-PyramidKV: the layer's base comes from the pyramid schedule
 *
 * With w protected tokens per head (the inner's window and sinks), B tokens per head window
 * included, base = B - w, Hs storage heads:
 *   safeguard=interp (FFY0/AdaKV AdaptiveSnapKVCluster, the paper code): c[h] = number of head h's
 *     entries in the global top Hs*base of the per-head sorted past scores; cap[h] =
 *     round(c[h] (1 - floor_alpha) + int(base floor_alpha)) with round half to even (torch.round,
 *     computed in float32); keep the window + top cap[h]. Sum of caps = Hs*base up to rounding.
 *   safeguard=floor (kvpress AdaKVPress(alpha_safeguard)): every head first gets its top
 *     int(B floor_alpha) tokens (window first, it counts inside the floor as in kvpress), then the
 *     remaining Hs*(B - floor) go greedily to the best remaining entries of the layer.
 * The global ranking of (head, token) entries is a merge of the per-head orders: score, then later
 * token, then lower head first (torch.topk leaves ties unspecified).
 * Defaults follow FFY0/AdaKV: floor_alpha 0.2, skip 0, inner snapkv with window 32, kernel 7, max
 * pooling, mean over the window and, at gran=kv, the group mean before pooling (gqa_support=True).
 * Budget scope: a layer's heads share Hs * B (KV_POL_BUDGET_LAYER; interp may be off by a few
 * tokens from rounding); with inner=pyramidkv the layer budget follows the pyramid
 * (KV_POL_OVER_BUDGET: the sequence total carries PyramidKV's floored-steps overshoot).
 * Metadata (meta_bytes): the flattened cache's int32 head lengths (Hs) and cu_seqlens (Hs + 1) per
 * layer.
 * normalize=1 (KVCache-Factory's AdaKVCluster default, init_adakv; FFY0 leaves it off): before the
 * competition each head's sorted past scores are scaled by (sum of its top base) / (sum of all of
 * them), so the ranking depends on the budget; computed per budget.
 * safeguard=floor takes kvpress's guarantee exactly: n_safe = int(B * floor_alpha), at least 1 when
 * floor_alpha > 0 (kvpress 0.5.5 AdaKVPress).
 * Presets: adakv@paper (FFY0/AdaKV defaults: interp, 0.2, inner snapkv@adakv), adakv@kvcache_factory
 * (KCF ffac160: normalize on, per query head, window 8; KCF HEAD's --floor is read by nothing, so the
 * floor stays 0.2 whatever the runner says), adakv@kvpress (AdaKVPress(SnapKVPress()), alpha 0.2),
 * adakv@kvpress_expected_attention (the kvpress leaderboard's "expected_attention" entry).
 * Deviations: B >= n_ctx keeps everything (FFY0 compresses at B = n exactly, where rounding can drop
 * a token); B <= w keeps the last B tokens per head (undefined in the references); Ada-PyramidKV uses KCF's regimes
 * through the inner pyramidkv, while FFY0's pyram_mode applies the clamped pyramid whenever it compresses; kvpress's
 * eviction is fake (memory not freed), ours is accounted as really freed.
 */
#include "sim/common/kv_common.h"
#include "sim/policies/window.h"

#include <math.h>
#include <string.h>

typedef struct {
    int interp;    /* safeguard: 1 interp (FFY0), 0 floor (kvpress) */
    int normalize; /* KCF's per-head rescaling before the competition */
    double alpha;  /* floor_alpha */
    int skip;      /* layers < skip keep uniform budgets */
    int pyramid;   /* inner is pyramidkv */
    /* per layer, from prepare (read-only in select) */
    int S, n, prot;
    int *seq; /* (S * n) storage head of each entry of the global ranking */
} ada_state_t;

static const kv_param_def_t params[] = {
    {"inner", KV_PARAM_STRING, "snapkv(qagg=mean,gqa=before_pool)", 0, -1, NULL,
     "token scorer whose per-head rankings are allocated (snapkv, pyramidkv, knorm, ...)"},
    {"safeguard", KV_PARAM_ENUM, "interp", 0, -1, "interp|floor",
     "interp: cap = round(c(1-a) + int(base a)) (paper, FFY0); floor: int(B a) per head, then greedy (kvpress)"},
    {"floor_alpha", KV_PARAM_FLOAT, "0.2", 0, 1, NULL, "safeguard share a (uniform part of each head's budget)"},
    {"skip", KV_PARAM_INT, "0", 0, 1 << 20, NULL, "layers below this keep uniform budgets (FFY0 skip)"},
    {"normalize", KV_PARAM_BOOL, "0", 0, -1, NULL,
     "scale each head's scores by (sum of its top base) / (sum of all) first (KVCache-Factory's default)"},
};

static const kv_preset_t presets[] = {
    {"paper", "inner=snapkv@adakv,safeguard=interp,floor_alpha=0.2,skip=0,normalize=0,gran=kv,agg=mean",
     "FFY0/AdaKV AdaptiveSnapKVCluster (gqa_support, pred.py defaults)"},
    {"kvcache_factory", "inner=snapkv@kvcache_factory,safeguard=interp,floor_alpha=0.2,skip=0,normalize=1,gran=query",
     "KVCache-Factory ffac160 AdaKVCluster (init_adakv: normalize on), per query head"},
    {"kvpress", "inner=snapkv@kvpress,safeguard=floor,floor_alpha=0.2,skip=0,normalize=0,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 AdaKVPress(SnapKVPress())"},
    {"kvpress_expected_attention",
     "inner=expected_attention@kvpress(epsilon=0.01),safeguard=floor,floor_alpha=0.2,skip=0,normalize=0,gran=kv,agg="
     "mean",
     "the kvpress leaderboard's expected_attention: AdaKVPress(ExpectedAttentionPress(epsilon=1e-2))"},
};

static int ada_init(kv_policy_t *p)
{
    ada_state_t *st = kv_calloc(1, sizeof *st, "adakv state");
    if (!st)
        return KV_ENOMEM;
    p->state = st;
    st->interp = !strcmp(kv_params_str(&p->params, "safeguard"), "interp");
    st->alpha = kv_params_float(&p->params, "floor_alpha");
    st->skip = (int)kv_params_int(&p->params, "skip");
    st->normalize = kv_params_bool(&p->params, "normalize");
    int rc = kv_policy_inner_create(p, "inner", 1);
    if (rc)
        return rc;
    st->pyramid = p->inner->desc == &kv_policy_pyramidkv;
    if (st->pyramid) /* the layer budget follows the pyramid: not per layer, not nested */
        p->flags = KV_POL_ONESHOT | KV_POL_OVER_BUDGET | (p->flags & KV_POL_RANDOM);
    if (st->normalize) /* the ranking depends on the budget */
        p->flags &= ~KV_POL_NESTED;
    return KV_OK;
}

static void ada_fini(kv_policy_t *p)
{
    ada_state_t *st = p->state;
    if (st)
        kv_free(st->seq);
    kv_free(st);
}

/* Is entry (score a, token ja, head sa) ranked before (b, jb, sb)? NaN last. */
static int before(float a, int ja, int sa, float b, int jb, int sb)
{
    int an = isnan(a), bn = isnan(b);
    if (an != bn)
        return bn;
    if (!an && a != b)
        return a > b;
    if (ja != jb)
        return ja > jb;
    return sa < sb;
}

/* Merge the per-head orders of `in` into one ranking seq (S * n storage heads), consistent with each
 * head's order; scale (S) multiplies each head's scores (NULL: 1). */
static int merge_orders(const kv_policy_t *in, int S, int n, const float *scale, int *seq)
{
    int *ptr = kv_calloc((size_t)S, sizeof(int), "adakv merge");
    if (!ptr)
        return KV_ENOMEM;
    for (long x = 0; x < (long)S * n; x++) {
        int best = -1;
        float bs = 0;
        int bj = 0;
        for (int s = 0; s < S; s++) {
            if (ptr[s] >= n)
                continue;
            int j = in->order[(size_t)s * n + ptr[s]];
            float v = in->sscores[(size_t)s * n + j];
            if (scale)
                v *= scale[s];
            if (best < 0 || before(v, j, s, bs, bj, best)) {
                best = s;
                bs = v;
                bj = j;
            }
        }
        seq[x] = best;
        ptr[best]++;
    }
    kv_free(ptr);
    return KV_OK;
}

static int ada_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    ada_state_t *st = p->state;
    kv_policy_t *in = p->inner;
    int rc = kv_policy_prepare(in, c);
    if (rc)
        return rc;
    if (!in->scored || !in->order)
        return kv_error(KV_EINVAL, "adakv: inner policy %s gave no token scores", in->label);
    const int n = c->n_ctx, S = in->n_store;
    p->protect_first = in->protect_first;
    p->protect_last = in->protect_last;
    int pf = KV_MIN(in->protect_first, n), pl = KV_MIN(in->protect_last, n);
    st->prot = KV_MIN(pf + pl, n);
    if (st->S != S || st->n != n || !st->seq) {
        kv_free(st->seq);
        st->seq = kv_malloc(sizeof(int) * (size_t)S * (size_t)(n ? n : 1), "adakv ranking");
        if (!st->seq)
            return KV_ENOMEM;
        st->S = S;
        st->n = n;
    }
    return merge_orders(in, S, n, NULL, st->seq);
}

static int ada_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)cstate;
    const ada_state_t *st = p->state;
    const kv_policy_t *in = p->inner;
    const int n = c->n_ctx, S = keep->n_store, prot = st->prot;
    if (S != st->S || n != st->n)
        return kv_error(KV_EINTERNAL, "adakv: select without prepare");
    const int Bl = st->pyramid ? kv_pyramid_layer_tokens(in, c->layer, c->n_layers, n, b) : b->tokens;
    if (Bl >= n || Bl <= prot || c->layer < st->skip) {
        /* everything, only (part of) the protected tokens, or a skipped layer: uniform */
        for (int s = 0; s < S; s++)
            kv_keep_prefix(in, c, s, Bl, keep);
        return KV_OK;
    }
    int *cnt = kv_calloc((size_t)S * 2, sizeof(int), "adakv counts");
    if (!cnt)
        return KV_ENOMEM;
    int *seen = cnt + S;
    const int *seq = st->seq;
    int *own = NULL; /* normalize: this budget's own ranking */
    if (st->normalize) {
        const int base = Bl - prot;
        float *scale = kv_malloc(sizeof(float) * (size_t)S, "adakv scales");
        own = kv_malloc(sizeof(int) * (size_t)S * n, "adakv ranking");
        if (!scale || !own) {
            kv_free(scale), kv_free(own), kv_free(cnt);
            return KV_ENOMEM;
        }
        for (int s = 0; s < S; s++) { /* past scores in decreasing order follow the protected ones */
            const int *ord = in->order + (size_t)s * n;
            double top = 0, all = 0;
            for (int r = prot; r < n; r++) {
                const double v = in->sscores[(size_t)s * n + ord[r]];
                all += v;
                top += r < prot + base ? v : 0;
            }
            scale[s] = all > 0 ? (float)(top / all) : 1.0f;
        }
        int rc = merge_orders(in, S, n, scale, own);
        kv_free(scale);
        if (rc) {
            kv_free(own), kv_free(cnt);
            return rc;
        }
        seq = own;
    }
    /* entries at per-head rank < first are outside the competition (protected / guaranteed) */
    int first = prot;
    if (!st->interp) { /* kvpress: n_safe = int(n_kept * alpha), at least 1 when alpha > 0 */
        first = KV_MIN((int)(Bl * st->alpha), Bl);
        if (st->alpha > 0 && first < 1)
            first = 1;
    }
    const long need = (long)S * (st->interp ? Bl - prot : Bl - first);
    long taken = 0;
    for (long x = 0; x < (long)S * n && taken < need; x++) {
        int s = seq[x];
        if (seen[s]++ < first)
            continue;
        cnt[s]++;
        taken++;
    }
    for (int s = 0; s < S; s++) {
        int m;
        if (st->interp) {
            const int base = Bl - prot, fl = (int)(base * st->alpha);
            float x = (float)cnt[s] * (float)(1.0 - st->alpha) + (float)fl;
            m = (int)rintf(x); /* round half to even, as torch.round */
            m = KV_MAX(0, KV_MIN(m, n - prot));
            m += prot;
        } else {
            m = first + cnt[s];
        }
        kv_keep_prefix(in, c, s, m, keep);
    }
    kv_free(cnt);
    kv_free(own);
    return KV_OK;
}

static int ada_kept_window(const kv_policy_t *p)
{
    return kv_policy_kept_window(p->inner);
}

static size_t ada_meta_bytes(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, const kv_keep_t *keep)
{
    (void)p, (void)c, (void)b;
    return sizeof(int32_t) * (size_t)(2 * keep->n_store + 1); /* head_lens + cu_seqlens */
}

const kv_policy_desc_t kv_policy_adakv = {
    .name = "adakv",
    .doc = "head-adaptive budgets inside a layer over any scorer (Ada-SnapKV, Ada-PyramidKV), interp or floor "
           "safeguard (Feng et al. 2024)",
    .paper = "arXiv:2407.11550",
    .code = "FFY0/AdaKV adaptive_snapkv/monkeypatch/snapkv_utils.py (AdaptiveSnapKVCluster); NVIDIA/kvpress "
            "kvpress/presses/adakv_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_BUDGET_LAYER | KV_POL_NESTED,
    .variants = "safeguard=floor;inner=snapkv(window=8);inner=snapkv(window=8),safeguard=floor;"
                "inner=snapkv(window=8,pool=avg,kernel=5),floor_alpha=0.5;inner=snapkv(window=8),skip=1;"
                "inner=pyramidkv;inner=pyramidkv,safeguard=floor;inner=knorm,safeguard=floor,floor_alpha=0.05;"
                "inner=snapkv(window=8),normalize=1;inner=pyramidkv(schedule=kvpress,window=4),safeguard=floor",
    .init = ada_init,
    .fini = ada_fini,
    .prepare = ada_prepare,
    .select = ada_select,
    .meta_bytes = ada_meta_bytes,
    .kept_window = ada_kept_window,
};
