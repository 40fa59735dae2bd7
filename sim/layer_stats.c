/*
 * layer_stats.c: the per-layer statistics policies share (see layer_stats.h).
 *
 * One kv_layer_stats_t lives for a whole replay; kv_layer_stats_begin points it at a layer and
 * everything is computed lazily, on the first policy's request, then reused by the others:
 *   column statistics   (H, n_ctx) x {sum, sum of squares, max}, all three in one pass (RECOMPUTE:
 *                       backend attn_colstats over the context queries; TRACE: the stored ones,
 *                       merged with the rows [split, n_ctx) when the context ends before the prompt);
 *   observation windows (H, w, n_ctx) per distinct w (backend attn_probs), at most MAX_WINDOWS.
 * Q and K are given to the backend through views made once per layer (a copy on device backends).
 * Q may hold only the rows [q0, T) (lean traces): a request for an earlier row is refused with
 * KV_EUNAVAIL and a message naming the rows.
 */
#include "sim/layer_stats.h"

#include "sim/common/kv_common.h"
#include "sim/ctx_internal.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <string.h>

#define MAX_WINDOWS 8

struct kv_layer_stats {
    kv_backend_t *be;
    kv_layer_stats_source_t src;
    kv_stored_colstats_t stored;    /* the layer's stored statistics (TRACE) */
    const float *hq, *hk;           /* host Q and K of the layer */
    void *dq, *dk;                  /* backend views of them (the host arrays on the CPU) */
    size_t q_floats;                /* floats of the Q view */
    float *colsum, *colsq, *colmax; /* (H, n_ctx) */
    int have_col;
    struct {
        int w;
        float *probs; /* (H, w, n_ctx) */
    } win[MAX_WINDOWS];
    int n_win;
    double t_attn, flop; /* since creation */
};

int kv_layer_stats_create(kv_backend_t *be, kv_layer_stats_source_t src, kv_layer_stats_t **out)
{
    *out = kv_calloc(1, sizeof **out, "layer statistics");
    if (!*out)
        return KV_ENOMEM;
    (*out)->be = be;
    (*out)->src = src;
    return KV_OK;
}

void kv_layer_stats_end(kv_layer_stats_t *s)
{
    if (!s)
        return;
    kv_be_unview(s->be, s->hq, s->dq);
    kv_be_unview(s->be, s->hk, s->dk);
    s->hq = s->hk = NULL;
    s->dq = s->dk = NULL;
    kv_free(s->colsum);
    kv_free(s->colsq);
    kv_free(s->colmax);
    s->colsum = s->colsq = s->colmax = NULL;
    s->have_col = 0;
    for (int i = 0; i < s->n_win; i++)
        kv_free(s->win[i].probs);
    s->n_win = 0;
    memset(&s->stored, 0, sizeof s->stored);
}

void kv_layer_stats_free(kv_layer_stats_t *s)
{
    if (!s)
        return;
    kv_layer_stats_end(s);
    kv_free(s);
}

void kv_layer_stats_begin(kv_layer_stats_t *s, kv_layer_ctx_t *c, const kv_stored_colstats_t *stored)
{
    kv_layer_stats_end(s);
    if (stored)
        s->stored = *stored;
    c->stats = s;
}

void kv_layer_stats_time(const kv_layer_stats_t *s, double *t_attn, double *flop)
{
    if (t_attn)
        *t_attn = s->t_attn;
    if (flop)
        *flop = s->flop;
}

/* Backend views of the layer's Q and K (uploaded once per layer on device backends). */
static int views(kv_layer_stats_t *s, const kv_layer_ctx_t *c)
{
    if (s->dq)
        return KV_OK;
    s->q_floats = (size_t)c->H * (size_t)(c->T - c->q0) * c->d;
    int rc = kv_be_view(s->be, c->q, sizeof(float) * s->q_floats, &s->dq);
    if (rc == KV_OK)
        rc = kv_be_view(s->be, c->k, sizeof(float) * (size_t)c->Hkv * c->T * c->d, &s->dk);
    s->hq = c->q;
    s->hk = c->k;
    return rc;
}

/* Queries [q_first, q_first + nq) against keys [0, nk), causal; the rows must be held. */
static int qk_args(const kv_layer_ctx_t *c, int q_first, int nq, int nk, const char *what, kv_qk_args_t *a)
{
    const kv_layer_stats_t *s = c->stats;
    if (q_first < c->q0)
        return kv_error(KV_EUNAVAIL,
                        "%s needs the queries of tokens [%d, %d), and this lean trace stores queries only from token "
                        "%d on (captured with --q-tail %d)",
                        what, q_first, q_first + nq, c->q0, c->meta ? c->meta->n_prompt - c->q0 : c->n_ctx - c->q0);
    memset(a, 0, sizeof *a);
    a->q = (const float *)s->dq + (size_t)(q_first - c->q0) * c->d;
    a->q_head_stride = c->q_hs;
    a->k = (const float *)s->dk;
    a->k_head_stride = (size_t)c->T * c->d;
    a->n_heads = c->H;
    a->n_kv_heads = c->Hkv;
    a->head_dim = c->d;
    a->n_q = nq;
    a->q_pos0 = q_first;
    a->n_k = nk;
    a->causal = 1;
    a->scale = 1.0f / sqrtf((float)c->d);
    return KV_OK;
}

/* Multiply-adds x 2 of the causal Q.K^T products of queries [q_first, q_first + nq) over keys [0, nk). */
static double causal_flop(const kv_layer_ctx_t *c, int q_first, int nq, int nk)
{
    double keys = 0;
    for (int i = q_first; i < q_first + nq; i++)
        keys += i + 1 < nk ? i + 1 : nk;
    return (double)c->H * keys * c->d * 2.0;
}

/* Column statistics of the context queries [q_first, n_ctx) over keys [0, n_ctx) into sum, sq, mx
 * (H, n_ctx), through the backend. */
static int backend_colstats(kv_layer_ctx_t *c, int q_first, float *sum, float *sq, float *mx)
{
    kv_layer_stats_t *s = c->stats;
    const int n = c->n_ctx;
    const size_t bytes = sizeof(float) * (size_t)c->H * n;
    kv_qk_args_t a;
    int rc = views(s, c);
    if (rc == KV_OK)
        rc = qk_args(c, q_first, n - q_first, n, "the attention statistics of the context queries", &a);
    if (rc)
        return rc;
    kv_colstats_out_t o = {0};
    if ((rc = kv_be_out(s->be, sum, bytes, (void **)&o.sum)) || (rc = kv_be_out(s->be, sq, bytes, (void **)&o.sumsq)) ||
        (rc = kv_be_out(s->be, mx, bytes, (void **)&o.max)))
        return rc;
    double t0 = kv_now();
    rc = s->be->ops->attn_colstats(s->be, &a, &o);
    s->t_attn += kv_now() - t0;
    s->flop += causal_flop(c, q_first, n - q_first, n);
    int rc2 = kv_be_fetch(s->be, sum, o.sum, bytes);
    int rc3 = kv_be_fetch(s->be, sq, o.sumsq, bytes);
    int rc4 = kv_be_fetch(s->be, mx, o.max, bytes);
    if (rc || (rc = rc2) || (rc = rc3) || (rc = rc4))
        return rc;
    return KV_OK;
}

/* The stored statistics (TRACE): columns [0, n_ctx) of the (H, T) arrays, plus the rows
 * [split, n_ctx) when the context ends before the prompt. */
static int stored_colstats(kv_layer_ctx_t *c)
{
    kv_layer_stats_t *s = c->stats;
    const kv_stored_colstats_t *st = &s->stored;
    const int n = c->n_ctx, H = c->H, T = c->T;
    const int full = c->meta && n == c->meta->n_prompt;
    const float *src[3] = {full ? st->sum : st->sum_head, full ? st->sumsq : st->sumsq_head,
                           full ? st->max : st->max_head};
    if (!src[0] || !src[1] || !src[2])
        return kv_error(KV_EINTERNAL, "layer %d: the trace's column statistics were not read", c->layer);
    if (!full && n < st->split)
        return kv_error(KV_EUNAVAIL,
                        "the trace's statistics cover the prompt queries [0, %d) and [0, %d); a context of %d tokens "
                        "needs [0, %d) (replay --stats recompute computes them from Q and K)",
                        st->split, c->meta ? c->meta->n_prompt : n, n, n);
    float *dst[3] = {s->colsum, s->colsq, s->colmax};
    for (int k = 0; k < 3; k++)
        for (int h = 0; h < H; h++)
            memcpy(dst[k] + (size_t)h * n, src[k] + (size_t)h * T, sizeof(float) * (size_t)n);
    if (full || n == st->split)
        return KV_OK;
    /* rows [split, n_ctx): computed from Q, merged (the head statistics are 0 for keys >= split) */
    const size_t hn = (size_t)H * n;
    float *tmp = kv_malloc(sizeof(float) * 3 * hn, "tail column statistics");
    if (!tmp)
        return KV_ENOMEM;
    int rc = backend_colstats(c, st->split, tmp, tmp + hn, tmp + 2 * hn);
    if (rc == KV_OK)
        for (size_t x = 0; x < hn; x++) {
            s->colsum[x] += tmp[x];
            s->colsq[x] += tmp[hn + x];
            s->colmax[x] = tmp[2 * hn + x] > s->colmax[x] ? tmp[2 * hn + x] : s->colmax[x];
        }
    kv_free(tmp);
    return rc;
}

int kv_ctx_colstats(kv_layer_ctx_t *c, const float **sum, const float **sumsq, const float **max)
{
    if (!c->stats) /* a kv_ctx_sub context: its own statistics, on the host */
        return kv_ctx_host_colstats(c, sum, sumsq, max);
    kv_layer_stats_t *s = c->stats;
    if (!s->have_col) {
        const size_t n = (size_t)c->H * (size_t)(c->n_ctx ? c->n_ctx : 1);
        s->colsum = kv_malloc(n * sizeof(float), "accumulated attention");
        s->colsq = kv_malloc(n * sizeof(float), "accumulated squared attention");
        s->colmax = kv_malloc(n * sizeof(float), "max attention");
        if (!s->colsum || !s->colsq || !s->colmax)
            return KV_ENOMEM;
        int rc = s->src == KV_STATS_TRACE ? stored_colstats(c) : backend_colstats(c, 0, s->colsum, s->colsq, s->colmax);
        if (rc)
            return rc;
        s->have_col = 1;
    }
    if (sum)
        *sum = s->colsum;
    if (sumsq)
        *sumsq = s->colsq;
    if (max)
        *max = s->colmax;
    return KV_OK;
}

int kv_ctx_window_probs(kv_layer_ctx_t *c, int w, const float **probs)
{
    if (!c->stats) /* a kv_ctx_sub context: its own statistics, on the host */
        return kv_ctx_host_window_probs(c, w, probs);
    kv_layer_stats_t *s = c->stats;
    if (w < 1 || w > c->n_ctx)
        return kv_error(KV_ERANGE, "observation window %d outside [1, %d] (context length)", w, c->n_ctx);
    for (int i = 0; i < s->n_win; i++)
        if (s->win[i].w == w) {
            *probs = s->win[i].probs;
            return KV_OK;
        }
    if (s->n_win == MAX_WINDOWS)
        return kv_error(KV_EINTERNAL, "more than %d observation windows in one layer", MAX_WINDOWS);
    char what[64];
    snprintf(what, sizeof what, "an observation window of %d queries", w);
    kv_qk_args_t a;
    int rc = views(s, c);
    if (rc == KV_OK)
        rc = qk_args(c, c->n_ctx - w, w, c->n_ctx, what, &a);
    if (rc)
        return rc;
    size_t bytes = sizeof(float) * (size_t)c->H * w * c->n_ctx;
    float *p = kv_malloc(bytes, "window attention");
    if (!p)
        return KV_ENOMEM;
    void *dp = NULL;
    rc = kv_be_out(s->be, p, bytes, &dp);
    if (rc == KV_OK) {
        double t0 = kv_now();
        rc = s->be->ops->attn_probs(s->be, &a, dp, NULL);
        s->t_attn += kv_now() - t0;
        s->flop += (double)c->H * w * c->n_ctx * c->d * 2.0;
        int rc2 = kv_be_fetch(s->be, p, dp, bytes);
        rc = rc ? rc : rc2;
    }
    if (rc) {
        kv_free(p);
        return rc;
    }
    s->win[s->n_win].w = w;
    s->win[s->n_win].probs = p;
    s->n_win++;
    *probs = p;
    return KV_OK;
}

int kv_layer_stats_eval_probs(kv_layer_ctx_t *c, float *p_eval)
{
    kv_layer_stats_t *s = c->stats;
    size_t bytes = sizeof(float) * (size_t)c->H * c->n_eval * c->T;
    void *dp = NULL;
    kv_qk_args_t a;
    int rc = views(s, c);
    if (rc == KV_OK)
        rc = qk_args(c, c->n_ctx, c->n_eval, c->T, "the evaluation queries", &a);
    if (rc == KV_OK)
        rc = kv_be_out(s->be, p_eval, bytes, &dp);
    if (rc)
        return rc;
    double t0 = kv_now();
    rc = s->be->ops->attn_probs(s->be, &a, dp, NULL);
    s->t_attn += kv_now() - t0;
    s->flop += (double)c->H * c->n_eval * c->T * c->d * 2.0;
    int rc2 = kv_be_fetch(s->be, p_eval, dp, bytes);
    return rc ? rc : rc2;
}
