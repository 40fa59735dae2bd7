/*
 * closed.c: closed-loop evaluation (see closed.h).
 *
 * Layout of one prompt (kv_closed_t): per layer the head-major Q (H, T, d), K and V (Hkv, T, d) of
 * the prompt and, as decoding computes them, of the continuation (T = n + N), a layer context over
 * them and the layer's shared statistics (sim/layer_stats.h, recomputed from these Q and K through
 * the backend, cached for the whole evaluation: they depend on the prompt rows only).
 *
 * A configuration's cache (rcache_t): per layer and storage head `cap` slots of K and V rows with
 * their positions, `len` of them used, in backend memory (the host arrays themselves on the CPU;
 * elsewhere host copies are kept and uploaded when they change). The attention override
 * (eval_attn) runs after each layer's q, k, v projections and RoPE: it copies the block's new rows
 * into the layer context, updates the cache (append, or admit and rebuild for decode-time
 * policies), calls the backend's attn_ragged, and lets decode-time policies observe the attention.
 */
#include "sim/closed.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/layer_stats.h"
#include "traces/capture/kv_model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- types */

typedef struct {
    kv_layer_ctx_t c;
    kv_layer_stats_t *st;
    float *q, *k, *v; /* (H, T, d), (Hkv, T, d), (Hkv, T, d) host */
    float *p_eval;    /* (H, N, T) per-query policies: rows filled as the queries arrive */
} layer_t;

typedef struct {
    int S, cap;
    float *hk, *hv;       /* (L, S, cap, d) host */
    int32_t *hpos, *hlen; /* (L, S, cap), (L, S) host */
    float *dk, *dv;       /* backend memory (== host arrays on host-memory backends) */
    int32_t *dpos, *dlen;
} rcache_t;

struct kv_closed_cfg {
    kv_closed_t *e;
    kv_policy_t *p;   /* the configured policy (selection of one-shot policies) */
    kv_policy_t **pl; /* (L) per-layer instances of decode-time and per-query policies */
    void **cst;       /* (L) their per-layer state */
    kv_budget_t b;
    int S, decode, no_evict;
    uint8_t *mask; /* (L, S, T): one-shot: the kept context; decode-time: the cache of the current step */
    rcache_t rc;
    /* accounting of the current run */
    double sum_ctx, sum_all, n_reads; /* entries read, summed over layers, storage heads, queries */
    double *per_query;                /* (N + 1) entries read by the query at position n + t, over layers and heads */
};

struct kv_closed {
    kv_fwd_t *f;
    kv_backend_t *be;
    const kv_model_t *m;
    int L, H, Hkv, G, d, V, n, N, T, n_ref;
    kv_trace_meta_t meta; /* owns tokens, positions, segments */
    layer_t *ly;
    float *logits0;  /* (V) */
    int32_t *ref;    /* (N) reference continuation (n_ref used) */
    float *ref_blk;  /* (n_ref, V) full cache, block mode: the distribution after feeding R[t], t < n_ref */
    float *ref_step; /* (n_ref, V) the same, one token at a time */
    kv_policy_t *full;
    kv_closed_cfg_t *full_cfg;
    float *sq, *sk, *sv; /* staging of one block's rows: (nb, q_dim), (nb, kv_dim) x2 */
    int stage_rows;
    float *attn;          /* (H, T) observe's attention */
    double *row;          /* (T) */
    float *wo;            /* (L, dim, q_dim) W_O in fp32 when the model keeps its weights as stored */
    kv_closed_cfg_t *cur; /* the configuration the forward pass runs on (eval_attn) */
    int32_t stop[KV_CLOSED_MAX_STOP];
    int n_stop;
    int quiet, greedy_steps;
};

void kv_closed_opts_init(kv_closed_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->steps = 32;
}

/* ---------------------------------------------------------------- small helpers */

static int kv_of(const kv_closed_cfg_t *c, int s)
{
    return c->p->gran == KV_GRAN_KV ? s : s / c->e->G;
}

static int is_stop(const kv_closed_t *e, int32_t t)
{
    for (int i = 0; i < e->n_stop; i++)
        if (e->stop[i] == t)
            return 1;
    return 0;
}

/* log-softmax of logits (V) into lp (double); returns the number of non-finite logits */
static long log_softmax(const float *x, int V, double *lp)
{
    long bad = 0;
    double mx = -INFINITY;
    for (int i = 0; i < V; i++) {
        if (!isfinite(x[i]))
            bad++;
        mx = fmax(mx, (double)x[i]);
    }
    double z = 0;
    for (int i = 0; i < V; i++)
        z += exp((double)x[i] - mx);
    const double lz = z > 0 ? mx + log(z) : INFINITY; /* z >= 1 unless every logit is NaN */
    for (int i = 0; i < V; i++)
        lp[i] = (double)x[i] - lz;
    return bad;
}

/* ---------------------------------------------------------------- the ragged cache */

static void rcache_free(kv_backend_t *be, rcache_t *r)
{
    if (!be->host_memory) {
        kv_be_free(be, r->dk);
        kv_be_free(be, r->dv);
        kv_be_free(be, r->dpos);
        kv_be_free(be, r->dlen);
    }
    kv_free(r->hk);
    kv_free(r->hv);
    kv_free(r->hpos);
    kv_free(r->hlen);
    memset(r, 0, sizeof *r);
}

/* Allocate S x cap slots per layer (kept across runs when the shape is the same). */
static int rcache_alloc(kv_closed_t *e, rcache_t *r, int S, int cap)
{
    if (r->hk && r->S == S && r->cap == cap)
        return KV_OK;
    rcache_free(e->be, r);
    const size_t slots = (size_t)e->L * S * cap, rows = slots * e->d;
    r->S = S;
    r->cap = cap;
    r->hk = kv_malloc(sizeof(float) * (rows ? rows : 1), "compressed cache keys");
    r->hv = kv_malloc(sizeof(float) * (rows ? rows : 1), "compressed cache values");
    r->hpos = kv_malloc(sizeof(int32_t) * (slots ? slots : 1), "compressed cache positions");
    r->hlen = kv_calloc((size_t)e->L * S, sizeof(int32_t), "compressed cache lengths");
    if (!r->hk || !r->hv || !r->hpos || !r->hlen)
        return KV_ENOMEM;
    if (e->be->host_memory) {
        r->dk = r->hk, r->dv = r->hv, r->dpos = r->hpos, r->dlen = r->hlen;
        return KV_OK;
    }
    r->dk = kv_be_alloc(e->be, sizeof(float) * (rows ? rows : 1));
    r->dv = kv_be_alloc(e->be, sizeof(float) * (rows ? rows : 1));
    r->dpos = kv_be_alloc(e->be, sizeof(int32_t) * (slots ? slots : 1));
    r->dlen = kv_be_alloc(e->be, sizeof(int32_t) * (size_t)e->L * S);
    return r->dk && r->dv && r->dpos && r->dlen ? KV_OK : KV_ENOMEM;
}

/* Upload slots [e0, e1) of every storage head of layer l, and the lengths. */
static int rcache_push(kv_closed_t *e, rcache_t *r, int l, int e0, int e1)
{
    if (e->be->host_memory)
        return KV_OK;
    const kv_backend_ops_t *o = e->be->ops;
    const int d = e->d;
    int rc = KV_OK;
    for (int s = 0; s < r->S && rc == KV_OK && e1 > e0; s++) {
        const size_t slot = ((size_t)l * r->S + s) * r->cap + e0, n = (size_t)(e1 - e0);
        if ((rc = o->upload(e->be, r->dk + slot * d, r->hk + slot * d, sizeof(float) * n * d)) ||
            (rc = o->upload(e->be, r->dv + slot * d, r->hv + slot * d, sizeof(float) * n * d)))
            break;
        rc = o->upload(e->be, r->dpos + slot, r->hpos + slot, sizeof(int32_t) * n);
    }
    if (rc == KV_OK)
        rc = o->upload(e->be, r->dlen + (size_t)l * r->S, r->hlen + (size_t)l * r->S, sizeof(int32_t) * (size_t)r->S);
    return rc;
}

/* Layer l's cache from a mask (S, T) over tokens [0, upto): the masked tokens in order, their K and
 * V rows from the layer context; plus every token of [from, upto) when from >= 0 (per-query
 * policies: the continuation is always kept). */
static int rcache_build(kv_closed_cfg_t *c, int l, const uint8_t *mask, int upto, int from)
{
    kv_closed_t *e = c->e;
    rcache_t *r = &c->rc;
    const int d = e->d, T = e->T;
    const layer_t *ly = &e->ly[l];
    int hi = 0;
    for (int s = 0; s < r->S; s++) {
        const uint8_t *mk = mask + (size_t)s * T;
        const int g = kv_of(c, s);
        const size_t base = ((size_t)l * r->S + s) * r->cap;
        int n = 0;
        for (int j = 0; j < upto; j++) {
            if (!mk[j] && !(from >= 0 && j >= from))
                continue;
            if (n == r->cap)
                return kv_error(KV_EINTERNAL, "closed loop: layer %d, storage head %d: more than %d cached tokens", l,
                                s, r->cap);
            memcpy(r->hk + (base + n) * d, ly->k + ((size_t)g * T + j) * d, sizeof(float) * (size_t)d);
            memcpy(r->hv + (base + n) * d, ly->v + ((size_t)g * T + j) * d, sizeof(float) * (size_t)d);
            r->hpos[base + n] = j;
            n++;
        }
        r->hlen[(size_t)l * r->S + s] = n;
        hi = KV_MAX(hi, n);
    }
    return rcache_push(e, r, l, 0, hi);
}

/* ---------------------------------------------------------------- configurations */

void kv_closed_cfg_free(kv_closed_cfg_t *c)
{
    if (!c)
        return;
    kv_closed_t *e = c->e;
    for (int l = 0; l < e->L; l++) {
        if (c->cst && c->cst[l] && c->pl && c->pl[l] && c->pl[l]->desc->cstate_free)
            c->pl[l]->desc->cstate_free(c->cst[l]);
        if (c->pl)
            kv_policy_free(c->pl[l]);
    }
    kv_free(c->pl);
    kv_free(c->cst);
    kv_free(c->mask);
    kv_free(c->per_query);
    rcache_free(e->be, &c->rc);
    kv_free(c);
}

const kv_budget_t *kv_closed_cfg_budget(const kv_closed_cfg_t *c)
{
    return &c->b;
}

static kv_closed_cfg_t *cfg_new(kv_closed_t *e, kv_policy_t *p, const kv_budget_t *b)
{
    kv_closed_cfg_t *c = kv_calloc(1, sizeof *c, "closed-loop configuration");
    if (!c)
        return NULL;
    c->e = e;
    c->p = p;
    c->b = *b;
    c->S = p->gran == KV_GRAN_KV ? e->Hkv : e->H;
    c->decode = (p->flags & (KV_POL_DECODE | KV_POL_PER_QUERY)) != 0;
    c->no_evict = (p->flags & KV_POL_NO_EVICT) != 0;
    c->mask = kv_calloc((size_t)e->L * c->S * e->T, 1, "cache masks");
    c->per_query = kv_calloc((size_t)e->N + 1, sizeof(double), "cache sizes");
    if (!c->mask || !c->per_query) {
        kv_closed_cfg_free(c);
        return NULL;
    }
    return c;
}

int kv_closed_select(kv_closed_t *e, kv_policy_t *p, const kv_budget_t *budgets, int n_budgets, kv_closed_cfg_t **cfgs)
{
    for (int b = 0; b < n_budgets; b++)
        cfgs[b] = NULL;
    if ((p->flags & KV_POL_NEEDS_SEGMENTS) && e->meta.n_segments < 1)
        return kv_error(KV_EINVAL,
                        "policy %s needs segments and the prompt has none (documents separated by <|endoftext|> "
                        "lines, or --segments)",
                        p->label);
    const int L = e->L, T = e->T;
    kv_budget_t *bud = kv_malloc(sizeof *bud * (size_t)(n_budgets ? n_budgets : 1), "budgets");
    void **cst = kv_calloc((size_t)(n_budgets ? n_budgets : 1), sizeof(void *), "selection state");
    int rc = bud && cst ? KV_OK : KV_ENOMEM;
    for (int b = 0; b < n_budgets && rc == KV_OK; b++) {
        bud[b] = budgets[b];
        if ((rc = kv_budget_resolve(&bud[b], &e->meta, e->n)))
            break;
        if (!(cfgs[b] = cfg_new(e, p, &bud[b])))
            rc = KV_ENOMEM;
    }
    if (rc)
        goto done;
    if (p->flags & (KV_POL_DECODE | KV_POL_PER_QUERY)) {
        /* one instance per layer and configuration: they admit at every step of every layer */
        for (int b = 0; b < n_budgets && rc == KV_OK; b++) {
            kv_closed_cfg_t *c = cfgs[b];
            c->pl = kv_calloc((size_t)L, sizeof *c->pl, "per-layer policies");
            c->cst = kv_calloc((size_t)L, sizeof *c->cst, "per-layer policy state");
            if (!c->pl || !c->cst) {
                rc = KV_ENOMEM;
                break;
            }
            for (int l = 0; l < L && rc == KV_OK; l++)
                rc = kv_policy_create(p->label, &c->pl[l]);
        }
        goto done;
    }
    if (p->flags & KV_POL_CROSS_LAYER) { /* the pre-pass over every layer, then the allocation */
        for (int l = 0; l < L && rc == KV_OK; l++)
            if (p->desc->prescore && (rc = p->desc->prescore(p, &e->ly[l].c)))
                kv_error_context(rc, "%s", p->label);
        if (rc == KV_OK && p->desc->allocate)
            rc = p->desc->allocate(p, &e->meta, e->n, bud, n_budgets);
    }
    for (int l = 0; l < L && rc == KV_OK; l++) {
        if ((rc = kv_policy_prepare(p, &e->ly[l].c)))
            break;
        for (int b = 0; b < n_budgets && rc == KV_OK; b++) {
            kv_closed_cfg_t *c = cfgs[b];
            kv_keep_t keep = {c->S, T, c->mask + (size_t)l * c->S * T};
            rc = p->desc->select ? p->desc->select(p, &e->ly[l].c, &c->b, &cst[b], &keep)
                                 : kv_select_uniform(p, &e->ly[l].c, &c->b, &cst[b], &keep);
            for (int s = 0; s < c->S && rc == KV_OK; s++) /* the context only */
                memset(keep.mask + (size_t)s * T + e->n, 0, (size_t)(T - e->n));
        }
    }
done:
    if (cst)
        for (int b = 0; b < n_budgets; b++)
            if (cst[b] && p->desc->cstate_free)
                p->desc->cstate_free(cst[b]);
    kv_free(cst);
    kv_free(bud);
    if (rc) {
        for (int b = 0; b < n_budgets; b++) {
            kv_closed_cfg_free(cfgs[b]);
            cfgs[b] = NULL;
        }
        return kv_error_context(rc, "%s", p->label);
    }
    return KV_OK;
}

/* The cache at the end of prefill, for a new run of c (decode-time policies select again, with fresh
 * state: a run starts from the prompt). */
static int cfg_begin(kv_closed_cfg_t *c)
{
    kv_closed_t *e = c->e;
    const int L = e->L, T = e->T, n = e->n, N = e->N;
    int cap = n + N + 1, rc;
    if (!c->decode) { /* the largest kept set, plus the continuation */
        int hi = 0;
        for (size_t x = 0; x < (size_t)L * c->S; x++) {
            int k = 0;
            for (int j = 0; j < n; j++)
                k += c->mask[x * T + j] != 0;
            hi = KV_MAX(hi, k);
        }
        cap = hi + N + 1;
    }
    if ((rc = rcache_alloc(e, &c->rc, c->S, cap)))
        return rc;
    c->sum_ctx = c->sum_all = c->n_reads = 0;
    memset(c->per_query, 0, sizeof(double) * (size_t)(N + 1));
    /* the continuation rows of the layer contexts belong to this run */
    for (int l = 0; l < L; l++) {
        layer_t *ly = &e->ly[l];
        for (int h = 0; h < e->H; h++)
            memset(ly->q + ((size_t)h * T + n) * e->d, 0, sizeof(float) * (size_t)(T - n) * e->d);
        for (int g = 0; g < e->Hkv; g++) {
            memset(ly->k + ((size_t)g * T + n) * e->d, 0, sizeof(float) * (size_t)(T - n) * e->d);
            memset(ly->v + ((size_t)g * T + n) * e->d, 0, sizeof(float) * (size_t)(T - n) * e->d);
        }
    }
    for (int l = 0; l < L; l++) {
        uint8_t *mk = c->mask + (size_t)l * c->S * T;
        layer_t *ly = &e->ly[l];
        if (c->decode && (c->p->flags & KV_POL_PER_QUERY) && !ly->p_eval) { /* the oracle reads p_eval */
            if (!(ly->p_eval = kv_calloc((size_t)e->H * N * T, sizeof(float), "evaluation attention")))
                return KV_ENOMEM;
            ly->c.p_eval = ly->p_eval;
        }
        if (c->decode) {
            kv_policy_t *p = c->pl[l];
            if (c->cst[l] && p->desc->cstate_free)
                p->desc->cstate_free(c->cst[l]);
            c->cst[l] = NULL;
            kv_keep_t keep = {c->S, T, mk};
            memset(mk, 0, (size_t)c->S * T);
            if ((rc = kv_policy_prepare(p, &e->ly[l].c)))
                return kv_error_context(rc, "%s, layer %d", p->label, l);
            if (p->flags & KV_POL_DECODE)
                rc = p->desc->select ? p->desc->select(p, &e->ly[l].c, &c->b, &c->cst[l], &keep)
                                     : kv_select_uniform(p, &e->ly[l].c, &c->b, &c->cst[l], &keep);
            if (rc)
                return kv_error_context(rc, "%s, layer %d", p->label, l);
        }
        if ((rc = rcache_build(c, l, mk, n, -1)))
            return rc;
    }
    return KV_OK;
}

/* ---------------------------------------------------------------- the attention override */

/* The block's new rows into the layer context (head-major) and the staging buffers. */
static int take_rows(kv_closed_t *e, int l, const kv_attn_args_t *a)
{
    const int nb = a->n_q, p0 = a->q_pos0, d = e->d, H = e->H, Hkv = e->Hkv, T = e->T;
    const size_t KV = (size_t)Hkv * d;
    layer_t *ly = &e->ly[l];
    const kv_backend_ops_t *o = e->be->ops;
    if (nb > e->stage_rows || p0 + nb > T)
        return kv_error(KV_EINTERNAL, "closed loop: a block of %d tokens at %d (staging %d, %d tokens)", nb, p0,
                        e->stage_rows, T);
    int rc = o->download(e->be, e->sq, a->q, sizeof(float) * (size_t)nb * H * d);
    if (rc == KV_OK && a->kv_stride == KV) {
        rc = o->download(e->be, e->sk, a->k + (size_t)p0 * KV, sizeof(float) * (size_t)nb * KV);
        if (rc == KV_OK)
            rc = o->download(e->be, e->sv, a->v + (size_t)p0 * KV, sizeof(float) * (size_t)nb * KV);
    } else {
        for (int t = 0; t < nb && rc == KV_OK; t++) {
            rc = o->download(e->be, e->sk + t * KV, a->k + (size_t)(p0 + t) * a->kv_stride, sizeof(float) * KV);
            if (rc == KV_OK)
                rc = o->download(e->be, e->sv + t * KV, a->v + (size_t)(p0 + t) * a->kv_stride, sizeof(float) * KV);
        }
    }
    if (rc)
        return rc;
    for (int t = 0; t < nb; t++) {
        for (int h = 0; h < H; h++)
            memcpy(ly->q + ((size_t)h * T + p0 + t) * d, e->sq + ((size_t)t * H + h) * d, sizeof(float) * (size_t)d);
        for (int g = 0; g < Hkv; g++) {
            memcpy(ly->k + ((size_t)g * T + p0 + t) * d, e->sk + (size_t)t * KV + (size_t)g * d,
                   sizeof(float) * (size_t)d);
            memcpy(ly->v + ((size_t)g * T + p0 + t) * d, e->sv + (size_t)t * KV + (size_t)g * d,
                   sizeof(float) * (size_t)d);
        }
    }
    return KV_OK;
}

/* softmax of query i of head h over the keys j <= i with sel(j) (all when mk is NULL), double sums,
 * into out (T floats, 0 elsewhere). */
static void host_probs(kv_closed_t *e, int l, int h, int i, const uint8_t *mk, float *out)
{
    const int d = e->d, T = e->T, g = h / e->G;
    const layer_t *ly = &e->ly[l];
    const float *q = ly->q + ((size_t)h * T + i) * d;
    const double scale = 1.0 / sqrt((double)d);
    double mx = -INFINITY;
    for (int j = 0; j <= i; j++) {
        if (mk && !mk[j])
            continue;
        const float *k = ly->k + ((size_t)g * T + j) * d;
        double a = 0;
        for (int x = 0; x < d; x++)
            a += (double)q[x] * k[x];
        e->row[j] = a * scale;
        mx = fmax(mx, e->row[j]);
    }
    double z = 0;
    for (int j = 0; j <= i; j++)
        if (!mk || mk[j])
            z += (e->row[j] = exp(e->row[j] - mx));
    for (int j = 0; j < T; j++)
        out[j] = j <= i && (!mk || mk[j]) ? (float)(e->row[j] / z) : 0.0f;
}

/* Decode-time and per-query policies, query i of layer l: the cache it reads (admit), built. */
static int decode_admit(kv_closed_cfg_t *c, int l, int i)
{
    kv_closed_t *e = c->e;
    layer_t *ly = &e->ly[l];
    kv_policy_t *p = c->pl[l];
    const int T = e->T, n = e->n;
    uint8_t *mk = c->mask + (size_t)l * c->S * T;
    int rc;
    if ((p->flags & KV_POL_PER_QUERY) && ly->p_eval) /* the oracle: this query's attention over its keys */
        for (int h = 0; h < e->H; h++)
            host_probs(e, l, h, i, NULL, ly->p_eval + ((size_t)h * e->N + (i - n)) * T);
    /* preparation again, the current query included (Quest orders its pages by it); the prompt's
     * statistics are cached in the layer's kv_layer_stats_t */
    if ((rc = kv_policy_prepare(p, &ly->c)))
        return kv_error_context(rc, "%s, layer %d, step %d", p->label, l, i - n);
    kv_keep_t keep = {c->S, T, mk};
    if ((rc = p->desc->admit(p, &ly->c, &c->b, &c->cst[l], i, &keep)))
        return kv_error_context(rc, "%s, layer %d, step %d", p->label, l, i - n);
    if (p->flags & KV_POL_PER_QUERY)
        return rcache_build(c, l, mk, i + 1, n); /* context selection + the whole continuation */
    for (int s = 0; s < c->S; s++)               /* a decode-time cache holds the query's own token */
        if (!mk[(size_t)s * T + i])
            return kv_error(KV_EINTERNAL, "%s: layer %d, step %d: the cache does not hold the query's token", p->label,
                            l, i - n);
    return rcache_build(c, l, mk, i + 1, -1);
}

static int decode_observe(kv_closed_cfg_t *c, int l, int i)
{
    kv_closed_t *e = c->e;
    kv_policy_t *p = c->pl[l];
    if (!p->desc->observe)
        return KV_OK;
    const int T = e->T;
    uint8_t *mk = c->mask + (size_t)l * c->S * T;
    for (int h = 0; h < e->H; h++) {
        const int s = p->gran == KV_GRAN_KV ? h / e->G : h;
        host_probs(e, l, h, i, mk + (size_t)s * T, e->attn + (size_t)h * T);
    }
    kv_keep_t keep = {c->S, T, mk};
    int rc = p->desc->observe(p, &e->ly[l].c, &c->b, &c->cst[l], i, &keep, e->attn);
    return rc ? kv_error_context(rc, "%s, layer %d, step %d", p->label, l, i - e->n) : KV_OK;
}

/* Entries the queries of this block read, for the memory and size columns. */
static void account(kv_closed_cfg_t *c, int l, int p0, int nb)
{
    kv_closed_t *e = c->e;
    const rcache_t *r = &c->rc;
    for (int t = 0; t < nb; t++) {
        const int pos = p0 + t, qi = pos - e->n;
        for (int s = 0; s < r->S; s++) {
            const int32_t *P = r->hpos + ((size_t)l * r->S + s) * r->cap;
            const int len = r->hlen[(size_t)l * r->S + s];
            int ctx = 0, all = 0;
            for (int x = 0; x < len && P[x] <= pos; x++) {
                all++;
                ctx += P[x] < e->n;
            }
            c->sum_ctx += ctx;
            c->sum_all += all;
            c->n_reads += 1;
            if (qi >= 0 && qi <= e->N)
                c->per_query[qi] += c->no_evict ? pos + 1 : all; /* Quest stores everything it may read */
        }
    }
}

static int eval_attn(void *ctx, int l, const kv_attn_args_t *a)
{
    kv_closed_t *e = ctx;
    kv_closed_cfg_t *c = e->cur;
    const int nb = a->n_q, p0 = a->q_pos0;
    rcache_t *r = &c->rc;
    int rc = take_rows(e, l, a);
    if (rc)
        return rc;
    if (c->decode) {
        if (nb != 1)
            return kv_error(KV_EINTERNAL, "closed loop: decode-time policies run one token at a time");
        if ((rc = decode_admit(c, l, p0)))
            return rc;
    } else { /* append the block to every storage head */
        int lo = r->cap, hi = 0;
        for (int s = 0; s < r->S; s++) {
            const int g = kv_of(c, s);
            int32_t *len = &r->hlen[(size_t)l * r->S + s];
            lo = KV_MIN(lo, *len);
            for (int t = 0; t < nb; t++) {
                if (*len == r->cap)
                    return kv_error(KV_EINTERNAL, "closed loop: the compressed cache of layer %d is full (%d)", l,
                                    r->cap);
                const size_t slot = ((size_t)l * r->S + s) * r->cap + *len;
                const size_t src = (size_t)t * e->Hkv * e->d + (size_t)g * e->d;
                memcpy(r->hk + slot * e->d, e->sk + src, sizeof(float) * (size_t)e->d);
                memcpy(r->hv + slot * e->d, e->sv + src, sizeof(float) * (size_t)e->d);
                r->hpos[slot] = p0 + t;
                (*len)++;
            }
            hi = KV_MAX(hi, *len);
        }
        if ((rc = rcache_push(e, r, l, lo, hi)))
            return rc;
    }
    account(c, l, p0, nb);
    const size_t lay = (size_t)l * r->S * r->cap;
    kv_attn_ragged_args_t ra = {
        .out = a->out,
        .lse = a->lse,
        .q = a->q,
        .k = r->dk + lay * e->d,
        .v = r->dv + lay * e->d,
        .pos = r->dpos + lay,
        .len = r->dlen + (size_t)l * r->S,
        .cap = r->cap,
        .n_store = r->S,
        .n_q = nb,
        .q_pos0 = p0,
        .n_heads = a->n_heads,
        .head_dim = a->head_dim,
        .scale = a->scale,
    };
    if ((rc = e->be->ops->attn_ragged(e->be, &ra)))
        return rc;
    return c->decode ? decode_observe(c, l, p0) : KV_OK;
}

/* ---------------------------------------------------------------- runs */

/* Feed toks[0..nt) at positions n + t0 ... through configuration c (its cache as the previous feed
 * left it): one block (block = 1) or token by token; logits (nt, V) of every fed token. With
 * greedy = 1 (token by token), toks has room for nt + 1 tokens and toks[k + 1] = the argmax after
 * toks[k] (toks[0] given), ending early after a stop token; *fed (may be NULL) gets the tokens fed,
 * which is also the number of tokens generated. */
static int feed(kv_closed_cfg_t *c, int32_t *toks, int nt, int t0, int block, int greedy, float *logits, int *fed)
{
    kv_closed_t *e = c->e;
    const int V = e->V;
    int rc = KV_OK, k = 0;
    if (c->decode && block)
        return kv_error(KV_EINTERNAL, "closed loop: decode-time policies run one token at a time");
    if (nt > 0) {
        e->cur = c;
        kv_fwd_set_attention(e->f, eval_attn, e);
        if (block) {
            rc = kv_fwd_run(e->f, toks, nt, e->n + t0, logits, 1, NULL, NULL);
            k = rc == KV_OK ? nt : 0;
        } else {
            while (k < nt) {
                float *lg = logits + (size_t)k * V;
                if ((rc = kv_fwd_run(e->f, &toks[k], 1, e->n + t0 + k, lg, 0, NULL, NULL)))
                    break;
                k++;
                if (greedy && is_stop(e, toks[k] = kv_argmax(lg, V)))
                    break;
            }
        }
        kv_fwd_set_attention(e->f, NULL, NULL);
        e->cur = NULL;
    }
    if (fed)
        *fed = k;
    return rc;
}

/* The full cache's logits on the reference in the mode c runs in (computed on first need). */
static int ref_logits(kv_closed_t *e, int step_mode, const float **out)
{
    float **dst = step_mode ? &e->ref_step : &e->ref_blk;
    if (!*dst) {
        float *lg = kv_malloc(sizeof(float) * (size_t)e->n_ref * e->V, "reference logits");
        if (!lg)
            return KV_ENOMEM;
        int rc = cfg_begin(e->full_cfg);
        if (rc == KV_OK)
            rc = feed(e->full_cfg, e->ref, e->n_ref, 0, !step_mode, 0, lg, NULL);
        if (rc) {
            kv_free(lg);
            return kv_error_context(rc, "the full cache's reference");
        }
        *dst = lg;
    }
    *out = *dst;
    return KV_OK;
}

/* ---------------------------------------------------------------- prefill */

static int prefill_hook(void *ctx, const kv_fwd_layer_t *L)
{
    kv_closed_t *e = ctx;
    const kv_attn_args_t a = {
        .q = L->q, .k = L->k_cache, .v = L->v_cache, .kv_stride = L->kv_stride, .n_q = L->n_q, .q_pos0 = L->q_pos0};
    return take_rows(e, L->layer, &a);
}

void kv_closed_free(kv_closed_t *e)
{
    if (!e)
        return;
    kv_closed_cfg_free(e->full_cfg);
    kv_policy_free(e->full);
    if (e->ly)
        for (int l = 0; l < e->L; l++) {
            kv_layer_stats_free(e->ly[l].st);
            kv_free(e->ly[l].q);
            kv_free(e->ly[l].k);
            kv_free(e->ly[l].v);
            kv_free(e->ly[l].p_eval);
        }
    kv_free(e->ly);
    kv_free(e->meta.tokens);
    kv_free(e->meta.positions);
    kv_free(e->meta.segments);
    kv_free(e->logits0);
    kv_free(e->ref);
    kv_free(e->ref_blk);
    kv_free(e->ref_step);
    kv_free(e->sq);
    kv_free(e->sk);
    kv_free(e->sv);
    kv_free(e->attn);
    kv_free(e->row);
    kv_free(e->wo);
    kv_free(e);
}

int kv_closed_create(kv_fwd_t *f, const int32_t *prompt, int n, const kv_closed_opts_t *opt, kv_closed_t **out)
{
    *out = NULL;
    kv_closed_opts_t o;
    if (opt)
        o = *opt;
    else
        kv_closed_opts_init(&o);
    const kv_model_t *m = kv_fwd_model(f);
    const kv_model_config_t *mc = &m->cfg;
    const int N = o.ref ? o.n_ref : o.steps;
    if (n < 1 || N < 1)
        return kv_error(KV_EINVAL, "closed loop: %d prompt tokens and %d reference tokens (at least 1 each)", n, N);
    if ((long)n + N > kv_fwd_max_tokens(f))
        return kv_error(KV_ERANGE,
                        "the prompt (%d tokens) plus %d reference tokens makes %ld, beyond the forward pass's %d "
                        "tokens (the model's context is %d)",
                        n, N, (long)n + N, kv_fwd_max_tokens(f), mc->seq_len);
    kv_closed_t *e = kv_calloc(1, sizeof *e, "closed-loop evaluation");
    if (!e)
        return KV_ENOMEM;
    int rc = KV_OK;
    e->f = f;
    e->be = kv_fwd_backend(f);
    e->m = m;
    e->L = mc->n_layers;
    e->H = mc->n_heads;
    e->Hkv = mc->n_kv_heads;
    e->G = e->H / e->Hkv;
    e->d = mc->head_dim;
    e->V = mc->vocab_size;
    e->n = n;
    e->N = N;
    e->T = n + N;
    e->quiet = o.quiet;
    e->greedy_steps = o.greedy_steps;
    e->n_stop = KV_MIN(o.n_stop, KV_CLOSED_MAX_STOP);
    memcpy(e->stop, o.stop, sizeof(int32_t) * (size_t)e->n_stop);
    if (e->be->ops->attn_ragged == NULL) {
        kv_free(e);
        return kv_error(KV_ENOTIMPL, "backend %s has no 'attn_ragged' op (needed by closed-loop evaluation)",
                        e->be->name);
    }
    const int T = e->T, L = e->L, d = e->d;
    /* the layer contexts' meta: the prompt, then the reference once it is known */
    kv_trace_meta_t *mt = &e->meta;
    mt->n_layers = L;
    mt->n_heads = e->H;
    mt->n_kv_heads = e->Hkv;
    mt->head_dim = d;
    mt->n_tokens = T;
    mt->n_prompt = n;
    mt->has_wo = 1;
    mt->model_dim = mc->dim;
    mt->hidden_dim = mc->hidden_dim;
    mt->vocab_size = e->V;
    mt->seq_len = mc->seq_len;
    mt->rope_theta = mc->rope_theta;
    mt->norm_eps = mc->norm_eps;
    mt->dtype = KV_DTYPE_F32;
    snprintf(mt->source, sizeof mt->source, "memory");
    snprintf(mt->model, sizeof mt->model, "%s", m->path);
    mt->tokens = kv_malloc(sizeof(int32_t) * (size_t)T, "tokens");
    mt->positions = kv_malloc(sizeof(int32_t) * (size_t)T, "positions");
    if (o.segments && o.n_segments > 0) {
        mt->segments = kv_malloc(sizeof(int32_t) * (size_t)o.n_segments, "segments");
        if (mt->segments) {
            memcpy(mt->segments, o.segments, sizeof(int32_t) * (size_t)o.n_segments);
            mt->n_segments = o.n_segments;
        }
    }
    e->stage_rows = KV_MAX(n, N + 1);
    e->sq = kv_malloc(sizeof(float) * (size_t)e->stage_rows * mc->q_dim, "staging");
    e->sk = kv_malloc(sizeof(float) * (size_t)e->stage_rows * mc->kv_dim, "staging");
    e->sv = kv_malloc(sizeof(float) * (size_t)e->stage_rows * mc->kv_dim, "staging");
    e->attn = kv_malloc(sizeof(float) * (size_t)e->H * T, "attention row");
    e->row = kv_malloc(sizeof(double) * (size_t)T, "attention row");
    e->logits0 = kv_malloc(sizeof(float) * (size_t)e->V, "logits");
    e->ref = kv_calloc((size_t)N + 1, sizeof(int32_t), "reference");
    e->ly = kv_calloc((size_t)L, sizeof *e->ly, "layers");
    if (!mt->tokens || !mt->positions || (o.n_segments > 0 && !mt->segments) || !e->sq || !e->sk || !e->sv ||
        !e->attn || !e->row || !e->logits0 || !e->ref || !e->ly) {
        rc = KV_ENOMEM;
        goto fail;
    }
    for (int t = 0; t < T; t++) {
        mt->tokens[t] = t < n ? prompt[t] : -1;
        mt->positions[t] = t;
    }
    for (int l = 0; l < L && rc == KV_OK; l++) {
        layer_t *ly = &e->ly[l];
        ly->q = kv_calloc((size_t)e->H * T * d, sizeof(float), "queries");
        ly->k = kv_calloc((size_t)e->Hkv * T * d, sizeof(float), "keys");
        ly->v = kv_calloc((size_t)e->Hkv * T * d, sizeof(float), "values");
        if (!ly->q || !ly->k || !ly->v) {
            rc = KV_ENOMEM;
            break;
        }
        rc = kv_layer_stats_create(e->be, KV_STATS_RECOMPUTE, &ly->st);
    }
    if (rc)
        goto fail;
    /* the prefill, with the backend's own attention; the hook keeps Q, K and V */
    double t0 = kv_now();
    if ((rc = kv_fwd_run(f, prompt, n, 0, e->logits0, 0, prefill_hook, e)))
        goto fail;
    if (!o.quiet)
        kv_info("eval: prefilled %d tokens in %.1f s", n, kv_now() - t0);
    /* W_O in fp32 for the policies and metrics that read it: the model's own array, or (weights kept as
     * stored: traces/capture/kv_model.h) every layer's matrix converted once */
    const size_t wo_n = (size_t)mc->dim * mc->q_dim;
    const float *wo_all = m->wo;
    if (!wo_all) {
        if (!(e->wo = kv_malloc(sizeof(float) * wo_n * (size_t)L, "W_O"))) {
            rc = KV_ENOMEM;
            goto fail;
        }
        for (int l = 0; l < L; l++) {
            const kv_weight_t w = kv_model_weight(m, l, KV_MW_O);
            kv_weight_rows(&w, 0, w.rows, e->wo + (size_t)l * wo_n);
        }
        wo_all = e->wo;
    }
    for (int l = 0; l < L; l++) {
        layer_t *ly = &e->ly[l];
        kv_layer_ctx_t *c = &ly->c;
        c->meta = mt;
        c->layer = l;
        c->n_layers = L;
        c->H = e->H;
        c->Hkv = e->Hkv;
        c->G = e->G;
        c->d = d;
        c->T = T;
        c->n_ctx = n;
        c->n_eval = N;
        c->q = ly->q;
        c->q0 = 0;
        c->q_hs = (size_t)T * d;
        c->k = ly->k;
        c->v = ly->v;
        c->wo = wo_all + (size_t)l * wo_n; /* (dim, q_dim): the trace's (model_dim, H*d) */
        c->be = e->be;
        c->seed = o.seed;
        kv_layer_stats_begin(ly->st, c, NULL);
    }
    /* the full cache: a ragged cache of every token in order */
    kv_budget_t all = {KV_BUDGET_TOKENS, n, "", n, 0};
    snprintf(all.text, sizeof all.text, "%d", n);
    if ((rc = kv_policy_create("full", &e->full)) || (rc = kv_closed_select(e, e->full, &all, 1, &e->full_cfg)))
        goto fail;
    if (o.ref) {
        memcpy(e->ref, o.ref, sizeof(int32_t) * (size_t)N);
        e->n_ref = N;
    } else { /* greedy, token by token: also the step-mode reference */
        float *lg = kv_malloc(sizeof(float) * (size_t)N * e->V, "reference logits");
        if (!lg) {
            rc = KV_ENOMEM;
            goto fail;
        }
        e->ref[0] = kv_argmax(e->logits0, e->V);
        int fed = 0;
        t0 = kv_now();
        rc = cfg_begin(e->full_cfg);
        if (rc == KV_OK && !is_stop(e, e->ref[0]))
            rc = feed(e->full_cfg, e->ref, N, 0, 0, 1, lg, &fed);
        e->n_ref = fed < N ? fed + 1 : N; /* a stop token ends it */
        if (rc == KV_OK && fed < N)       /* the distribution after the stop token, too */
            rc = feed(e->full_cfg, e->ref + fed, 1, fed, 0, 0, lg + (size_t)fed * e->V, NULL);
        if (rc) {
            kv_free(lg);
            goto fail;
        }
        e->ref_step = lg;
        if (!o.quiet)
            kv_info("eval: the full cache's greedy reference, %d tokens in %.1f s", e->n_ref, kv_now() - t0);
    }
    for (int t = 0; t < e->n_ref; t++)
        mt->tokens[n + t] = e->ref[t];
    *out = e;
    return KV_OK;
fail:
    kv_closed_free(e);
    return rc;
}

int kv_closed_n_ctx(const kv_closed_t *e)
{
    return e->n;
}
const int32_t *kv_closed_ref(const kv_closed_t *e, int *n)
{
    *n = e->n_ref;
    return e->ref;
}
const kv_trace_meta_t *kv_closed_meta(const kv_closed_t *e)
{
    return &e->meta;
}
const float *kv_closed_logits0(const kv_closed_t *e)
{
    return e->logits0;
}

/* ---------------------------------------------------------------- measurements */

void kv_closed_result_free(kv_closed_result_t *r)
{
    if (!r)
        return;
    kv_free(r->kl);
    kv_free(r->agree);
    kv_free(r->nll);
    kv_free(r->nll_ref);
    memset(r, 0, sizeof *r);
}

static void summarise(const kv_closed_cfg_t *c, kv_closed_result_t *r)
{
    const kv_closed_t *e = c->e;
    r->n_store = c->S;
    r->kept = c->n_reads ? c->sum_ctx / c->n_reads : NAN;
    r->cache = c->n_reads ? c->sum_all / c->n_reads : NAN;
    double peak = 0;
    for (int t = 0; t <= e->N; t++)
        peak = fmax(peak, c->per_query[t]);
    r->mem = peak * e->d * 2.0 * sizeof(float);
}

int kv_closed_measure(kv_closed_t *e, kv_closed_cfg_t *c, kv_closed_result_t *r)
{
    memset(r, 0, sizeof *r);
    const int N = e->n_ref, V = e->V, step_mode = c->decode;
    const float *ref = NULL;
    int rc = ref_logits(e, step_mode, &ref);
    if (rc)
        return rc;
    float *lg = kv_malloc(sizeof(float) * (size_t)N * V, "logits");
    double *la = kv_malloc(sizeof(double) * (size_t)V * 2, "log-probabilities");
    r->kl = kv_calloc((size_t)N, sizeof(double), "KL");
    r->agree = kv_calloc((size_t)N, 1, "agreement");
    r->nll = kv_calloc((size_t)N, sizeof(double), "NLL");
    r->nll_ref = kv_calloc((size_t)N, sizeof(double), "NLL");
    if (!lg || !la || !r->kl || !r->agree || !r->nll || !r->nll_ref) {
        rc = KV_ENOMEM;
        goto done;
    }
    if ((rc = cfg_begin(c)) || (rc = feed(c, e->ref, N, 0, !step_mode, 0, lg, NULL)))
        goto done;
    r->n_steps = N;
    summarise(c, r);
    double *lf = la, *lc = la + V;
    log_softmax(e->logits0, V, lf);
    r->nll[0] = r->nll_ref[0] = -lf[e->ref[0]];
    for (int t = 1; t <= N; t++) {
        const float *a = ref + (size_t)(t - 1) * V, *b = lg + (size_t)(t - 1) * V;
        log_softmax(a, V, lf);
        r->nonfinite += log_softmax(b, V, lc);
        double kl = 0;
        for (int v = 0; v < V; v++)
            if (lf[v] > -INFINITY)
                kl += exp(lf[v]) * (lf[v] - lc[v]);
        r->kl[t - 1] = kl;
        r->agree[t - 1] = kv_argmax(a, V) == kv_argmax(b, V);
        if (!r->agree[t - 1] && !r->first_div)
            r->first_div = t;
        if (t < N) {
            r->nll[t] = -lc[e->ref[t]];
            r->nll_ref[t] = -lf[e->ref[t]];
        }
    }
    if (r->nonfinite)
        for (int t = 0; t < N; t++)
            r->kl[t] = r->nll[t] = NAN;
done:
    kv_free(lg);
    kv_free(la);
    if (rc)
        kv_closed_result_free(r);
    return rc;
}

int kv_closed_greedy(kv_closed_t *e, kv_closed_cfg_t *c, int max_tokens, int32_t *out, int *n_out)
{
    *n_out = 0;
    const int V = e->V;
    if (max_tokens < 1)
        return KV_OK;
    if (max_tokens > e->N)
        return kv_error(KV_ERANGE, "closed loop: %d greedy tokens asked, the evaluation holds %d", max_tokens, e->N);
    float *lg = kv_malloc(sizeof(float) * (size_t)max_tokens * V, "logits");
    if (!lg)
        return KV_ENOMEM;
    int rc = cfg_begin(c), k = 1, fed = 0; /* out[0, k): this configuration's greedy output so far */
    out[0] = kv_argmax(e->logits0, V);
    if (rc || is_stop(e, out[0]) || max_tokens == 1)
        goto done;
    if (!c->decode && !e->greedy_steps && e->n_ref > 1) {
        /* verify the full cache's output in one block: out[t + 1] is the argmax after R[0..t] as long
         * as out[0..t] = R[0..t] */
        const int nv = KV_MIN(e->n_ref, max_tokens) - 1;
        if ((rc = feed(c, e->ref, nv, 0, 1, 0, lg, NULL)))
            goto done;
        for (int j = 0; j < nv; j++) {
            out[j + 1] = kv_argmax(lg + (size_t)j * V, V);
            k = j + 2;
            if (is_stop(e, out[j + 1]) || k == max_tokens)
                goto done;
            if (out[j + 1] != e->ref[j + 1])
                break;
        }
        /* out[k - 1] goes next, at position n + k - 1: drop the reference's entries from there on */
        rcache_t *r = &c->rc;
        for (int l = 0; l < e->L && rc == KV_OK; l++) {
            for (int s = 0; s < r->S; s++) {
                int32_t *len = &r->hlen[(size_t)l * r->S + s];
                const int32_t *P = r->hpos + ((size_t)l * r->S + s) * r->cap;
                while (*len > 0 && P[*len - 1] >= e->n + k - 1)
                    (*len)--;
            }
            rc = rcache_push(e, r, l, 0, 0);
        }
        if (rc == KV_OK)
            rc = feed(c, out + k - 1, max_tokens - k, k - 1, 0, 1, lg, &fed);
    } else {
        rc = feed(c, out, max_tokens - 1, 0, 0, 1, lg, &fed);
    }
    k += fed;
done:
    kv_free(lg);
    if (rc == KV_OK)
        *n_out = k;
    return rc;
}

/* ---------------------------------------------------------------- for tests */

int kv_closed_cfg_entries(const kv_closed_cfg_t *c, int layer, int store)
{
    return c->rc.hlen ? c->rc.hlen[(size_t)layer * c->rc.S + store] : 0;
}
int kv_closed_cfg_capacity(const kv_closed_cfg_t *c)
{
    return c->rc.cap;
}
int kv_closed_cfg_n_store(const kv_closed_cfg_t *c)
{
    return c->S;
}
const uint8_t *kv_closed_cfg_kept(const kv_closed_cfg_t *c, int layer)
{
    return c->decode ? NULL : c->mask + (size_t)layer * c->S * c->e->T;
}
float *kv_closed_layer_kv(kv_closed_t *e, int layer, char which)
{
    return which == 'k' ? e->ly[layer].k : e->ly[layer].v;
}
