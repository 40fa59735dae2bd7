/*
 * h2o.c: H2O, heavy hitters + recent tokens (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient
 * Generative Inference of Large Language Models", arXiv:2306.14048). A token's score is its
 * accumulated attention: the sum over every query that saw it of the attention it received, per
 * query head (unnormalised, so early tokens are favoured: more queries can see them).
 *
 * mode=oneshot (KVCache-Factory H2OKVCluster, the "H2O" baseline of the PyramidKV / Ada-KV papers):
 *   once after prefill, score s[h,j] = sum over all prompt queries i >= j of the CAUSAL attention
 *   A[h,i,j] (kv_ctx_colstats sum); keep the last `window` context tokens plus the top B - window by
 *   score; generated tokens are appended and never evicted. Default window 8 = KVCache-Factory's
 *   run_longbench.py (its init_* default is 32). Deviation: KVCache-Factory before commit 9f9aa2e
 *   (2026-06-22, so also the ffac160 reference version) masked only the last window x window block,
 *   so earlier prompt rows attended to future keys; we use the correct causal mask (the fix).
 *   When B < window only the last B tokens are kept (the reference would fail on topk(B - window)).
 * mode=decode (FMInference/H2O utils_real_drop, H2OKVCache_LayerWise): a cache of B tokens, heavy
 *   part floor(B * (1 - recent_ratio)) and recent part the rest (default recent_ratio 0.5: H2O's
 *   equal heavy/recent split, as its --heavy_ratio 0.1 --recent_ratio 0.1). Scores start from the
 *   prefill rows (causal column sums); every decode query adds its attention over the CURRENT cache
 *   (the attention renormalised over the cache, exactly what the real-drop cache sees), and evicted
 *   tokens' scores are dropped (they never return). Eviction: the reference evicts after the forward
 *   pass, so its query reads hh + recent + 1 keys; our caches never exceed B keys for the query that
 *   reads them (the engine's decode contract), so eviction happens before appending: at step i the
 *   candidates are the cache plus token i, the last `recent` of them are kept and the top
 *   B - recent of the others by the scores accumulated through query i - 1. At the end of prefill
 *   the same rule runs on the prompt (real-drop's first reduction). Per storage head; with a KV-head
 *   cache the per-query-head scores combine with `agg` at each eviction. recent is at least 1 (the
 *   appended token must be read); recent_ratio 1 is a pure sliding window.
 * norm=mean (kvpress ObservedAttentionPress): divide each score by the number of queries that have
 *   seen the token (n - j at prefill; a token in the cache has been seen by every query since it
 *   arrived, so i - j before query i). kvpress also averages over the GQA group (agg=mean here) and
 *   protects no window (window=0).
 * mask=kcf_ffac160 (mode=oneshot): KVCache-Factory's H2OKVCluster as it was until commit 9f9aa2e
 *   (2026-06-22), i.e. in ffac160, the code behind the published PyramidKV / Ada-KV H2O rows: only
 *   the last window x window block of the score matrix is masked, so a prompt query before the
 *   window takes its softmax over ALL context keys, later ones included; the window queries are
 *   causal. Score = sum over the prompt queries of those rows, for the keys before the window.
 *   Computed here with one BLAS product per block of queries (O(n^2 d) per head, like the reference).
 * Presets: h2o@paper (FMInference real-drop: mode=decode, equal heavy and recent parts),
 * h2o@kvcache_factory (HEAD, causal: oneshot, window 8, sum, per query head), h2o@kvcache_factory_ffac160
 * (the same with ffac160's mask), h2o@kvpress (ObservedAttentionPress: norm=mean, window 0, group mean).
 * Memory: mode=decode keeps an fp32 score per cached token and query head (meta_bytes).
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/policies/accum_internal.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"mode", KV_PARAM_ENUM, "oneshot", 0, -1, "oneshot|decode",
     "oneshot: once after prefill (KVCache-Factory); decode: real-drop eviction every step (FMInference)"},
    {"window", KV_PARAM_INT, "8", 0, 1 << 20, NULL,
     "oneshot: last context tokens always kept, inside B (KVCache-Factory runner: 8)"},
    {"recent_ratio", KV_PARAM_FLOAT, "0.5", 0, 1, NULL,
     "decode: share of B for the recent window, the rest for heavy hitters (H2O: 0.5)"},
    {"norm", KV_PARAM_ENUM, "sum", 0, -1, "sum|mean",
     "sum: accumulated attention (H2O); mean: divided by the queries that saw the token (kvpress)"},
    {"mask", KV_PARAM_ENUM, "causal", 0, -1, "causal|kcf_ffac160",
     "oneshot: causal rows, or KVCache-Factory ffac160's (only the window x window block masked)"},
};

static const kv_preset_t presets[] = {
    {"paper", "mode=decode,recent_ratio=0.5,norm=sum",
     "FMInference/H2O h2o_hf/utils_real_drop (H2OKVCache_LayerWise), equal heavy and recent parts"},
    {"kvcache_factory", "mode=oneshot,window=8,norm=sum,mask=causal,gran=query",
     "KVCache-Factory HEAD H2OKVCluster (causal since 9f9aa2e), run_longbench.py's window, per query head"},
    {"kvcache_factory_ffac160", "mode=oneshot,window=8,norm=sum,mask=kcf_ffac160,gran=query",
     "KVCache-Factory ffac160 H2OKVCluster (its mask: the published H2O rows), per query head"},
    {"kvpress", "mode=oneshot,window=0,norm=mean,mask=causal,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 ObservedAttentionPress"},
};

typedef struct {
    int decode, window, mean, ffac160;
    double recent_ratio;
} h2o_t;

static int h2o_init(kv_policy_t *p)
{
    h2o_t *s = kv_calloc(1, sizeof *s, "h2o state");
    if (!s)
        return KV_ENOMEM;
    s->decode = !strcmp(kv_params_str(&p->params, "mode"), "decode");
    s->window = (int)kv_params_int(&p->params, "window");
    s->recent_ratio = kv_params_float(&p->params, "recent_ratio");
    s->mean = !strcmp(kv_params_str(&p->params, "norm"), "mean");
    s->ffac160 = !strcmp(kv_params_str(&p->params, "mask"), "kcf_ffac160");
    p->state = s;
    if (s->decode)
        p->flags = (p->flags & ~(KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER)) | KV_POL_DECODE;
    if (s->decode && s->ffac160)
        return kv_error(KV_EINVAL, "h2o: mask=kcf_ffac160 is KVCache-Factory's one-shot score (mode=oneshot)");
    return KV_OK;
}

static void h2o_fini(kv_policy_t *p)
{
    kv_free(p->state);
}

/* mask=kcf_ffac160: qscores (H, n) = column sums over the prompt queries of ffac160's rows (see the
 * top comment), for the keys before the window. */
static int ffac160_scores(kv_policy_t *p, kv_layer_ctx_t *c, int w)
{
    const int n = c->n_ctx, H = c->H, d = c->d, m = n - w, RB = 128;
    if (m > 0 && c->q0 > 0)
        return kv_error(KV_EUNAVAIL,
                        "h2o(mask=kcf_ffac160) reads every prompt query, and this lean trace stores them from token "
                        "%d on only (captured with --q-tail %d)",
                        c->q0, c->meta ? c->meta->n_prompt - c->q0 : c->n_ctx - c->q0);
    const float *P; /* (H, w, n): the window rows are causal in ffac160 too */
    int rc = w > 0 ? kv_ctx_window_probs(c, w, &P) : KV_OK;
    if (rc)
        return rc;
    float *S = kv_malloc(sizeof(float) * (size_t)RB * (size_t)(n ? n : 1), "h2o ffac160 rows"); /* (RB, n) */
    double *acc = kv_malloc(sizeof(double) * (size_t)(n ? n : 1), "h2o ffac160 sums");
    if (!S || !acc) {
        kv_free(S), kv_free(acc);
        return KV_ENOMEM;
    }
    const float scale = 1.0f / sqrtf((float)d);
    for (int h = 0; h < H; h++) {
        const float *Q = kv_ctx_query(c, h, 0), *K = c->k + (size_t)(h / c->G) * c->T * d;
        memset(acc, 0, sizeof(double) * (size_t)n);
        for (int i0 = 0; i0 < m; i0 += RB) { /* rows before the window: softmax over ALL n keys */
            const int nr = KV_MIN(RB, m - i0);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, nr, n, d, scale, Q + (size_t)i0 * d, d, K, d, 0.0f, S,
                        n);
            for (int r = 0; r < nr; r++) {
                float *row = S + (size_t)r * n, mx = -INFINITY;
                for (int j = 0; j < n; j++)
                    mx = row[j] > mx ? row[j] : mx;
                double z = 0;
                for (int j = 0; j < n; j++)
                    z += exp((double)row[j] - mx);
                for (int j = 0; j < m; j++)
                    acc[j] += exp((double)row[j] - mx) / z;
            }
        }
        for (int r = 0; r < w; r++) /* window rows: causal */
            for (int j = 0; j < m; j++)
                acc[j] += P[((size_t)h * w + r) * n + j];
        for (int j = 0; j < n; j++)
            p->qscores[(size_t)h * n + j] = j < m ? (float)acc[j] : 0.0f;
    }
    kv_free(S), kv_free(acc);
    return KV_OK;
}

static int h2o_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const h2o_t *s = p->state;
    const int n = c->n_ctx;
    if (s->ffac160) {
        const int w = KV_MIN(s->window, n);
        int rc = ffac160_scores(p, c, w);
        if (rc)
            return rc;
        p->protect_last = w;
        p->scored = 1;
        return KV_OK;
    }
    const float *sum;
    int rc = kv_ctx_colstats(c, &sum, NULL, NULL);
    if (rc)
        return rc;
    memcpy(p->qscores, sum, sizeof(float) * (size_t)c->H * n);
    if (s->decode)
        return KV_OK; /* raw sums: decode mode normalises at each eviction with the current counts */
    if (s->mean)
        for (int h = 0; h < c->H; h++)
            for (int j = 0; j < n; j++)
                p->qscores[(size_t)h * n + j] /= (float)(n - j);
    p->protect_last = s->window;
    p->scored = 1;
    return KV_OK;
}

/* Recent part of a decode cache of B tokens (at least 1: the appended token). */
static int recent_of(const h2o_t *s, int B)
{
    int heavy = (int)floor(B * (1.0 - s->recent_ratio) + 1e-9);
    int r = B - heavy;
    return r < 1 ? 1 : r > B ? B : r;
}

/* Score of token j for storage head s before query `next` (queries [0, next) accumulated). */
static float score_of(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_acc_state_t *st, int s, int j, int next)
{
    const h2o_t *hs = p->state;
    float v = kv_acc_group(p, st->acc, (size_t)c->T, c->G, s, j);
    return hs->mean ? v / (float)(next - j) : v;
}

/* Keep the last `recent` of the n candidates pos[] and the best B - recent of the others. */
static void evict(const kv_policy_t *p, const kv_layer_ctx_t *c, kv_acc_state_t *st, int s, int n_cand, int B, int next,
                  uint8_t *mk)
{
    if (n_cand <= B)
        return;
    const int r = recent_of(p->state, B), m = n_cand - r;
    for (int k = 0; k < m; k++)
        st->key[k] = score_of(p, c, st, s, st->pos[k], next);
    kv_acc_keep_best(st, st->pos, st->key, m, B - r, mk);
}

static int h2o_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    if (!((const h2o_t *)p->state)->decode)
        return kv_select_uniform(p, c, b, cstate, keep);
    kv_acc_state_t *st;
    int rc = kv_acc_state_get(cstate, c->H, c->T, &st);
    if (rc)
        return rc;
    const int n = c->n_ctx, T = c->T;
    /* a new layer: scores restart from this layer's prefill column sums */
    memset(st->acc, 0, sizeof(float) * (size_t)c->H * T);
    for (int h = 0; h < c->H; h++)
        memcpy(st->acc + (size_t)h * T, p->qscores + (size_t)h * n, sizeof(float) * (size_t)n);
    for (int s = 0; s < keep->n_store; s++) {
        uint8_t *mk = keep->mask + (size_t)s * T;
        memset(mk, 0, (size_t)T);
        memset(mk, 1, (size_t)n);
        for (int j = 0; j < n; j++)
            st->pos[j] = j;
        evict(p, c, st, s, n, b->tokens, n, mk);
    }
    return KV_OK;
}

static int h2o_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                     kv_keep_t *cache)
{
    kv_acc_state_t *st = *cstate;
    if (!st)
        return kv_error(KV_EINTERNAL, "h2o: admit before select");
    for (int s = 0; s < cache->n_store; s++) {
        uint8_t *mk = cache->mask + (size_t)s * cache->T;
        int nc = kv_acc_cached(mk, i, st->pos);
        st->pos[nc++] = i;
        mk[i] = 1;
        evict(p, c, st, s, nc, b->tokens, i, mk);
    }
    return KV_OK;
}

static int h2o_observe(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                       const kv_keep_t *cache, const float *attn)
{
    (void)p, (void)b, (void)cache;
    kv_acc_state_t *st = *cstate;
    for (int h = 0; h < c->H; h++) {
        float *acc = st->acc + (size_t)h * c->T;
        const float *a = attn + (size_t)h * c->T;
        for (int j = 0; j <= i; j++)
            acc[j] += a[j]; /* a is 0 outside the cache: evicted tokens gain nothing */
    }
    return KV_OK;
}

static size_t h2o_meta(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, const kv_keep_t *keep)
{
    (void)b;
    if (!((const h2o_t *)p->state)->decode)
        return 0;
    return kv_acc_score_bytes(p, c, keep);
}

static int h2o_kept_window(const kv_policy_t *p)
{
    const h2o_t *s = p->state;
    return s->decode ? 0 : s->window;
}

const kv_policy_desc_t kv_policy_h2o = {
    .name = "h2o",
    .doc = "heavy hitters by accumulated attention + recent tokens; one-shot (KVCache-Factory, causal) or "
           "real-drop decode (Zhang et al. 2023)",
    .paper = "arXiv:2306.14048",
    .code = "FMInference/H2O h2o_hf/utils_real_drop/modify_llama.py; KVCache-Factory H2OKVCluster; NVIDIA/kvpress "
            "kvpress/presses/observed_attention_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER,
    .variants = "norm=mean,window=0;mask=kcf_ffac160;mask=kcf_ffac160,window=4;mode=decode;mode=decode,norm=mean,agg="
                "max;mode=decode,recent_ratio=0;"
                "mode=decode,recent_ratio=1",
    .init = h2o_init,
    .fini = h2o_fini,
    .prepare = h2o_prepare,
    .select = h2o_select,
    .admit = h2o_admit,
    .observe = h2o_observe,
    .cstate_free = kv_acc_state_free,
    .meta_bytes = h2o_meta,
    .kept_window = h2o_kept_window,
};
