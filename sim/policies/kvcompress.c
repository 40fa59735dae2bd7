/*
 * kvcompress.c: KV-Compress (Rehg, "KV-Compress: Paged KV-Cache Compression with Variable Compression
 * Rates per Attention Head", arXiv:2410.00161; Cloudflare / IsaacRe vllm-kvcompress,
 * vllm/kvcompress/{metrics,scheduler}.py). Eviction in blocks, chosen JOINTLY across all layers and
 * KV heads of the sequence under one per-sequence budget, so layers and heads whose attention is
 * concentrated keep more than diffuse ones.
 *
 * Metric ("L2-sum"), per layer, query head and context key j: the sum of SQUARED attention
 * probabilities over the observation queries: the last `window` prompt queries (default 8, the
 * README's KVC-w; kv_ctx_window_probs) or, with window=0, every prompt query (KVC-full;
 * kv_ctx_colstats sumsq); then optional 1-D max pooling along the keys (pool=max, kernel 7, stride 1,
 * no padding bias; KVC-full runs with --no-maxpool-metrics, i.e. pool=none); then combined over the
 * G query heads of each KV head (the reference sums; agg=mean ranks identically because every head
 * has the same G, agg=max is an alternative). gran=query keeps per-query-head metrics and caches.
 * The README's two settings: KVC-w = the defaults (window 8, max pooling, protected window 8);
 * KVC-full = kvcompress(window=0,pool=none,protect=32).
 * Allocation: within each (layer, storage head) the non-protected context tokens are sorted
 * ascending by metric (ties: the earlier token first, i.e. evicted first: the project's tie-break)
 * and cut into blocks of `block` tokens from the lowest up (the last, highest block of a head may be
 * partial); a block's key is the metric of its last (highest) token. All blocks of all layers and
 * heads are ranked by key, descending (ties: earlier layer, then lower head, then the higher block of
 * the head first, so every head keeps a suffix of its order), and taken in that order while the
 * total fits the budget; the first block that does not fit ends the selection (the order does not
 * depend on the budget, so a larger budget keeps a superset: nested).
 * Budget: a per-sequence total, b->total (= B * n_layers * n_kv_heads for a per-head budget, or the
 * seq:N total); with gran=query a per-head budget counts B * n_layers * n_heads stored entries. The
 * protected window (the last `protect` context tokens of every head, default 8 = KVC-w) is never
 * evicted and counts against the total; if it alone exceeds the total, only it is kept.
 * Deviations / choices: one-shot after prefill (the reference's compress_once; its continual mode,
 * compression every `compression_interval` decode steps with decode-time metric accumulation, is not
 * replayed); no metric-collection buffer (keys within `metric_collection_buffer_size` of a query
 * are credited here) and no attention-sink protection (num_attention_sinks defaults to 0); the
 * budget is not rounded up to whole blocks (the reference sizes budgets in vLLM blocks), so a
 * sequence keeps at most the total, at most one block below it; the pooling window spans the whole
 * context, protected tokens included.
 * Memory metadata (meta_bytes): an fp32 metric per kept slot plus one int32 block-table entry per
 * started block of every (layer, head).
 * Cross-layer: `prescore` (engine pre-pass over all layers, c->p_eval is NULL there) stores each
 * layer's metrics and ascending order; `allocate` ranks the blocks for every budget and stores the
 * kept count per (budget, layer, storage head); `select` reads them, matching the budget by its text.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"window", KV_PARAM_INT, "8", 0, 1 << 20, NULL,
     "observation queries: the last `window` prompt queries (KVC-w: 8), 0 = all (KVC-full)"},
    {"pool", KV_PARAM_ENUM, "max", 0, -1, "max|none", "max pooling of the metric along keys (KVC-full: none)"},
    {"kernel", KV_PARAM_INT, "7", 1, 255, NULL, "max-pooling width (odd)"},
    {"block", KV_PARAM_INT, "16", 1, 1 << 16, NULL, "tokens per eviction block (vLLM block size)"},
    {"protect", KV_PARAM_INT, "8", 0, 1 << 20, NULL, "last context tokens never evicted (KVC-w: 8)"},
};

typedef struct {
    int window, pool, kernel, block, protect;
    /* pre-pass, per layer l: */
    int L, S, n;   /* layers, storage heads, context length */
    int n_cand;    /* non-protected tokens per head */
    float *metric; /* (L, S, n) */
    int *asc;      /* (L, S, n_cand) candidates by increasing metric */
    /* allocation, per budget: */
    int n_budgets;
    char (*btext)[32];
    long *btotal;
    int *count; /* (n_budgets, L, S) candidates kept, the last `count` of asc */
} kvc_t;

static int kvc_init(kv_policy_t *p)
{
    kvc_t *s = kv_calloc(1, sizeof *s, "kvcompress state");
    if (!s)
        return KV_ENOMEM;
    p->state = s;
    s->window = (int)kv_params_int(&p->params, "window");
    s->pool = !strcmp(kv_params_str(&p->params, "pool"), "max");
    s->kernel = (int)kv_params_int(&p->params, "kernel");
    s->block = (int)kv_params_int(&p->params, "block");
    s->protect = (int)kv_params_int(&p->params, "protect");
    if (s->kernel % 2 == 0)
        return kv_error(KV_EINVAL, "kvcompress: kernel=%d must be odd (centred max pooling)", s->kernel);
    return KV_OK;
}

static void free_alloc(kvc_t *s)
{
    kv_free(s->btext);
    kv_free(s->btotal);
    kv_free(s->count);
    s->btext = NULL;
    s->btotal = NULL;
    s->count = NULL;
    s->n_budgets = 0;
}

static void kvc_fini(kv_policy_t *p)
{
    kvc_t *s = p->state;
    if (!s)
        return;
    kv_free(s->metric);
    kv_free(s->asc);
    free_alloc(s);
    kv_free(s);
}

static int kvc_prescore(kv_policy_t *p, kv_layer_ctx_t *c)
{
    kvc_t *s = p->state;
    const int n = c->n_ctx, H = c->H, G = c->G, l = c->layer;
    const int S = p->gran == KV_GRAN_KV ? c->Hkv : H;
    int rc = KV_OK;
    float *qm = NULL, *tmp = NULL;
    int *desc = NULL;
    if (l == 0 || !s->metric) { /* a new replay: (re)allocate for this trace */
        kv_free(s->metric);
        kv_free(s->asc);
        free_alloc(s);
        s->L = c->n_layers;
        s->S = S;
        s->n = n;
        s->n_cand = n - KV_MIN(s->protect, n);
        s->metric = kv_malloc(sizeof(float) * (size_t)s->L * S * (n ? n : 1), "kvcompress metrics");
        s->asc = kv_malloc(sizeof(int) * (size_t)s->L * S * (s->n_cand ? s->n_cand : 1), "kvcompress order");
        if (!s->metric || !s->asc)
            return KV_ENOMEM;
    }
    if (l >= s->L || S != s->S || n != s->n)
        return kv_error(KV_EINTERNAL, "kvcompress: pre-pass layer %d does not match the trace", l);
    qm = kv_calloc((size_t)H * (n ? n : 1), sizeof(float), "kvcompress head metrics"); /* (H, n) */
    tmp = kv_malloc(sizeof(float) * (size_t)(n ? n : 1), "kvcompress pooling");
    desc = kv_malloc(sizeof(int) * (size_t)(n ? n : 1), "kvcompress order");
    if (!qm || !tmp || !desc) {
        rc = KV_ENOMEM;
        goto done;
    }
    if (s->window == 0) {
        const float *sq;
        if ((rc = kv_ctx_colstats(c, NULL, &sq, NULL)))
            goto done;
        memcpy(qm, sq, sizeof(float) * (size_t)H * n);
    } else {
        const int w = KV_MIN(s->window, n);
        const float *P; /* (H, w, n) */
        if ((rc = kv_ctx_window_probs(c, w, &P)))
            goto done;
        for (int h = 0; h < H; h++)
            for (int r = 0; r < w; r++) {
                const float *row = P + ((size_t)h * w + r) * n;
                float *dst = qm + (size_t)h * n;
                for (int j = 0; j < n; j++)
                    dst[j] += row[j] * row[j];
            }
    }
    if (s->pool && s->kernel > 1) {
        const int half = s->kernel / 2;
        for (int h = 0; h < H; h++) {
            float *m = qm + (size_t)h * n;
            for (int j = 0; j < n; j++) {
                float a = m[j];
                for (int t = KV_MAX(0, j - half); t <= KV_MIN(n - 1, j + half); t++)
                    a = m[t] > a ? m[t] : a;
                tmp[j] = a;
            }
            memcpy(m, tmp, sizeof(float) * (size_t)n);
        }
    }
    for (int st = 0; st < S; st++) {
        float *dst = s->metric + ((size_t)l * S + st) * n;
        for (int j = 0; j < n; j++) {
            if (p->gran == KV_GRAN_QUERY) {
                dst[j] = qm[(size_t)st * n + j];
                continue;
            }
            float a = qm[(size_t)st * G * n + j];
            for (int g = 1; g < G; g++) {
                float x = qm[((size_t)st * G + g) * n + j];
                a = p->agg == KV_AGG_MAX ? (x > a ? x : a) : a + x;
            }
            dst[j] = p->agg == KV_AGG_MEAN ? a / (float)G : a;
        }
        /* ascending order of the candidates [0, n_cand): reverse of the descending order, whose ties
         * put the later token first, so ties here put the earlier token first */
        int *asc = s->asc + ((size_t)l * S + st) * s->n_cand;
        kv_argsort_desc(dst, s->n_cand, desc);
        for (int r = 0; r < s->n_cand; r++)
            asc[r] = desc[s->n_cand - 1 - r];
    }
done:
    kv_free(qm);
    kv_free(tmp);
    kv_free(desc);
    return rc;
}

typedef struct {
    float key;
    int l, s, b, size;
} blk_t;

static int cmp_blk(const void *x, const void *y)
{
    const blk_t *a = x, *b = y;
    if (a->key != b->key)
        return a->key > b->key ? -1 : 1;
    if (a->l != b->l)
        return a->l - b->l;
    if (a->s != b->s)
        return a->s - b->s;
    return b->b - a->b;
}

/* Per-sequence total of stored entries for budget b. */
static long total_of(const kvc_t *s, const kv_budget_t *b)
{
    if (b->kind == KV_BUDGET_SEQUENCE)
        return b->total;
    return (long)b->tokens * s->L * s->S;
}

static int kvc_allocate(kv_policy_t *p, const kv_trace_meta_t *m, int n_ctx, const kv_budget_t *budgets, int n_budgets)
{
    kvc_t *s = p->state;
    (void)m;
    if (!s->metric || s->n != n_ctx)
        return kv_error(KV_EINTERNAL, "kvcompress: allocate without a pre-pass");
    const int L = s->L, S = s->S, bs = s->block, nc = s->n_cand;
    const int per_head = (nc + bs - 1) / bs;
    const size_t nblk = (size_t)L * S * per_head;
    blk_t *blk = kv_malloc(sizeof *blk * (nblk ? nblk : 1), "kvcompress blocks");
    free_alloc(s);
    s->btext = kv_calloc((size_t)n_budgets, sizeof *s->btext, "kvcompress budgets");
    s->btotal = kv_calloc((size_t)n_budgets, sizeof *s->btotal, "kvcompress budgets");
    s->count = kv_calloc((size_t)n_budgets * L * S, sizeof(int), "kvcompress allocation");
    if (!blk || !s->btext || !s->btotal || !s->count) {
        kv_free(blk);
        free_alloc(s);
        return KV_ENOMEM;
    }
    s->n_budgets = n_budgets;
    size_t k = 0;
    for (int l = 0; l < L; l++)
        for (int st = 0; st < S; st++) {
            const float *met = s->metric + ((size_t)l * S + st) * s->n;
            const int *asc = s->asc + ((size_t)l * S + st) * nc;
            for (int b = 0; b < per_head; b++) {
                const int hi = KV_MIN((b + 1) * bs, nc);
                blk[k++] = (blk_t){met[asc[hi - 1]], l, st, b, hi - b * bs};
            }
        }
    qsort(blk, nblk, sizeof *blk, cmp_blk);
    const long protected_total = (long)L * S * (s->n - nc);
    for (int bi = 0; bi < n_budgets; bi++) {
        snprintf(s->btext[bi], sizeof s->btext[bi], "%s", budgets[bi].text);
        s->btotal[bi] = total_of(s, &budgets[bi]);
        long room = s->btotal[bi] - protected_total;
        int *cnt = s->count + (size_t)bi * L * S;
        for (size_t x = 0; x < nblk && room > 0; x++) {
            if (blk[x].size > room)
                break;
            cnt[blk[x].l * S + blk[x].s] += blk[x].size;
            room -= blk[x].size;
        }
    }
    kv_free(blk);
    return KV_OK;
}

static int kvc_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)cstate;
    const kvc_t *s = p->state;
    int bi = -1;
    for (int k = 0; k < s->n_budgets && bi < 0; k++)
        if (!strcmp(s->btext[k], b->text) && s->btotal[k] == total_of(s, b))
            bi = k;
    if (bi < 0 || !s->metric || c->layer >= s->L || keep->n_store != s->S || c->n_ctx != s->n)
        return kv_error(KV_EINTERNAL, "kvcompress: no cross-layer allocation for budget %s (run through kv_replay)",
                        b->text);
    const int n = c->n_ctx, nc = s->n_cand, S = s->S;
    for (int st = 0; st < S; st++) {
        uint8_t *mk = keep->mask + (size_t)st * keep->T;
        memset(mk, 0, (size_t)keep->T);
        memset(mk + nc, 1, (size_t)(n - nc)); /* protected window */
        const int *asc = s->asc + ((size_t)c->layer * S + st) * nc;
        const int cnt = s->count[((size_t)bi * s->L + c->layer) * S + st];
        for (int r = nc - cnt; r < nc; r++)
            mk[asc[r]] = 1;
    }
    return KV_OK;
}

static size_t kvc_meta(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, const kv_keep_t *keep)
{
    (void)b;
    const kvc_t *s = p->state;
    size_t bytes = 0;
    for (int st = 0; st < keep->n_store; st++) {
        size_t kept = 0;
        for (int j = 0; j < c->n_ctx; j++)
            kept += keep->mask[(size_t)st * keep->T + j] != 0;
        bytes += kept * sizeof(float) + (kept + s->block - 1) / s->block * sizeof(int32_t);
    }
    return bytes;
}

static int kvc_kept_window(const kv_policy_t *p)
{
    return (int)kv_params_int(&p->params, "protect");
}

const kv_policy_desc_t kv_policy_kvcompress = {
    .name = "kvcompress",
    .doc = "squared-attention metric, block eviction ranked jointly across all layers and KV heads under a "
           "per-sequence budget (Rehg 2024, Cloudflare vllm-kvcompress)",
    .paper = "arXiv:2410.00161",
    .params = params,
    .code = "IsaacRe/vllm-kvcompress vllm/kvcompress/{metrics,scheduler}.py",
    .n_params = (int)KV_ARRAY_LEN(params),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_CROSS_LAYER | KV_POL_BUDGET_SEQUENCE,
    .variants = "window=0,pool=none;block=4,protect=0,agg=max;window=32,kernel=3",
    .init = kvc_init,
    .fini = kvc_fini,
    .select = kvc_select,
    .meta_bytes = kvc_meta,
    .prescore = kvc_prescore,
    .allocate = kvc_allocate,
    .kept_window = kvc_kept_window,
};
