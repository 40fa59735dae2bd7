/*
 * ctx_sub.c: layer contexts over a subset of tokens (kv_ctx_sub in sim/kv_policy.h), for policies
 * that re-score a cache while decoding (sim/policies/decoding.c runs any scorer on the tokens a
 * cache holds, as kvpress's DecodingPress does every compression_interval steps).
 *
 * The sub-context gathers the query rows of one storage head's query heads and its keys and values
 * at the given tokens, so that a scorer sees exactly the cache: softmaxes run over the cached keys
 * only, causal in the cached order. It has no engine; kv_ctx_window_probs and kv_ctx_colstats
 * (sim/layer_stats.c) hand such a context to the host versions here, which compute in double and keep
 * their results until kv_ctx_sub_free. Sub-contexts are independent, so several may be scored at
 * once on different threads.
 */
#include "sim/ctx_internal.h"

#include "sim/common/kv_common.h"

#include <math.h>
#include <string.h>

#define MAX_WINDOWS 8

typedef struct {
    kv_trace_meta_t meta; /* shapes of the sub-context; tokens/positions point to ours */
    int32_t *tokens, *positions;
    float *q, *k, *v;               /* (nh, n, d), (1, n, d), (1, n, d) */
    float *colsum, *colsq, *colmax; /* (nh, n) */
    int have_col;
    struct {
        int w;
        float *probs; /* (nh, w, n) */
    } win[MAX_WINDOWS];
    int n_win;
} ctx_host_t;

static void host_free(ctx_host_t *x)
{
    if (!x)
        return;
    kv_free(x->tokens), kv_free(x->positions);
    kv_free(x->q), kv_free(x->k), kv_free(x->v);
    kv_free(x->colsum), kv_free(x->colsq), kv_free(x->colmax);
    for (int i = 0; i < x->n_win; i++)
        kv_free(x->win[i].probs);
    kv_free(x);
}

int kv_ctx_sub(const kv_layer_ctx_t *c, int h0, int nh, const int *tok, int n, kv_layer_ctx_t *out)
{
    memset(out, 0, sizeof *out);
    if (n < 1 || nh < 1 || h0 < 0 || h0 + nh > c->H || (nh > 1 && h0 / c->G != (h0 + nh - 1) / c->G))
        return kv_error(KV_EINVAL, "sub-context: heads [%d, %d) of %d (group %d), %d tokens", h0, h0 + nh, c->H, c->G,
                        n);
    const int d = c->d, g = h0 / c->G;
    /* a lean trace holds the queries of tokens [c->q0, T) only: the sub-context holds those of its
     * tokens, which must then be a suffix of them (tokens in increasing order) */
    int m = 0;
    while (m < n && !kv_ctx_query(c, h0, tok[m]))
        m++;
    for (int t = m; t < n; t++)
        if (!kv_ctx_query(c, h0, tok[t]))
            return kv_error(KV_EUNAVAIL, "sub-context: the query of token %d is not stored (lean trace)", tok[t]);
    ctx_host_t *x = kv_calloc(1, sizeof *x, "sub-context");
    if (!x)
        return KV_ENOMEM;
    x->tokens = kv_malloc(sizeof(int32_t) * (size_t)n, "sub-context tokens");
    x->positions = kv_malloc(sizeof(int32_t) * (size_t)n, "sub-context positions");
    x->q = kv_malloc(sizeof(float) * (size_t)nh * (n - m > 0 ? n - m : 1) * d, "sub-context queries");
    x->k = kv_malloc(sizeof(float) * (size_t)n * d, "sub-context keys");
    x->v = kv_malloc(sizeof(float) * (size_t)n * d, "sub-context values");
    if (!x->tokens || !x->positions || !x->q || !x->k || !x->v) {
        host_free(x);
        return KV_ENOMEM;
    }
    for (int t = 0; t < n; t++) {
        const int j = tok[t];
        x->tokens[t] = c->meta->tokens ? c->meta->tokens[j] : -1;
        x->positions[t] = c->meta->positions ? c->meta->positions[j] : j;
        memcpy(x->k + (size_t)t * d, c->k + ((size_t)g * c->T + j) * d, sizeof(float) * (size_t)d);
        memcpy(x->v + (size_t)t * d, c->v + ((size_t)g * c->T + j) * d, sizeof(float) * (size_t)d);
        for (int h = 0; h < nh && t >= m; h++)
            memcpy(x->q + ((size_t)h * (n - m) + (t - m)) * d, kv_ctx_query(c, h0 + h, j), sizeof(float) * (size_t)d);
    }
    x->meta = *c->meta; /* scalars and provenance; the arrays below are ours, the rest unused */
    x->meta.n_heads = nh;
    x->meta.n_kv_heads = 1;
    x->meta.n_tokens = x->meta.n_prompt = n;
    x->meta.tokens = x->tokens;
    x->meta.positions = x->positions;
    x->meta.n_segments = 0;
    x->meta.segments = NULL;
    x->meta.has_wo = 0;
    out->meta = &x->meta;
    out->layer = c->layer;
    out->n_layers = c->n_layers;
    out->H = nh;
    out->Hkv = 1;
    out->G = nh;
    out->d = d;
    out->T = out->n_ctx = n;
    out->n_eval = 0;
    out->q = x->q;
    out->q0 = m;
    out->q_hs = (size_t)(n - m) * d;
    out->k = x->k;
    out->v = x->v;
    out->be = c->be;
    out->seed = c->seed;
    out->host = x;
    return KV_OK;
}

void kv_ctx_sub_free(kv_layer_ctx_t *sub)
{
    if (!sub)
        return;
    host_free(sub->host);
    sub->host = NULL;
}

/* Causal softmax of query i over keys [0, i] of head h (scale 1/sqrt(d)) into p (n, zeros past i). */
static void softmax_row(const kv_layer_ctx_t *c, int h, int i, double *p)
{
    const int d = c->d;
    const float *q = kv_ctx_query(c, h, i); /* callers check i >= c->q0 */
    const double scale = 1.0 / sqrt((double)d);
    double mx = -INFINITY;
    for (int j = 0; j <= i; j++) {
        double a = 0;
        for (int x = 0; x < d; x++)
            a += (double)q[x] * c->k[(size_t)j * d + x];
        p[j] = a * scale;
        mx = fmax(mx, p[j]);
    }
    double z = 0;
    for (int j = 0; j <= i; j++)
        z += (p[j] = exp(p[j] - mx));
    for (int j = 0; j <= i; j++)
        p[j] /= z;
    for (int j = i + 1; j < c->n_ctx; j++)
        p[j] = 0;
}

int kv_ctx_host_window_probs(kv_layer_ctx_t *c, int w, const float **probs)
{
    ctx_host_t *x = c->host;
    if (!x)
        return kv_error(KV_EINTERNAL, "layer context without an engine or host statistics");
    const int n = c->n_ctx;
    if (w < 1 || w > n)
        return kv_error(KV_ERANGE, "observation window %d outside [1, %d] (context length)", w, n);
    for (int i = 0; i < x->n_win; i++)
        if (x->win[i].w == w) {
            *probs = x->win[i].probs;
            return KV_OK;
        }
    if (x->n_win == MAX_WINDOWS)
        return kv_error(KV_EINTERNAL, "more than %d observation windows in one sub-context", MAX_WINDOWS);
    if (n - w < c->q0)
        return kv_error(KV_EUNAVAIL, "an observation window of %d needs queries the lean trace does not store", w);
    float *P = kv_malloc(sizeof(float) * (size_t)c->H * w * n, "window attention");
    double *row = kv_malloc(sizeof(double) * (size_t)n, "attention row");
    if (!P || !row) {
        kv_free(P), kv_free(row);
        return KV_ENOMEM;
    }
    for (int h = 0; h < c->H; h++)
        for (int r = 0; r < w; r++) {
            softmax_row(c, h, n - w + r, row);
            for (int j = 0; j < n; j++)
                P[((size_t)h * w + r) * n + j] = (float)row[j];
        }
    kv_free(row);
    x->win[x->n_win].w = w;
    x->win[x->n_win].probs = P;
    x->n_win++;
    *probs = P;
    return KV_OK;
}

int kv_ctx_host_colstats(kv_layer_ctx_t *c, const float **sum, const float **sumsq, const float **max)
{
    ctx_host_t *x = c->host;
    if (!x)
        return kv_error(KV_EINTERNAL, "layer context without an engine or host statistics");
    const int n = c->n_ctx, H = c->H;
    if (!x->have_col && c->q0 > 0)
        return kv_error(KV_EUNAVAIL, "accumulated attention needs every query and the lean trace does not store them");
    if (!x->have_col) {
        x->colsum = kv_calloc((size_t)H * n, sizeof(float), "accumulated attention");
        x->colsq = kv_calloc((size_t)H * n, sizeof(float), "accumulated squared attention");
        x->colmax = kv_calloc((size_t)H * n, sizeof(float), "max attention");
        double *row = kv_malloc(sizeof(double) * (size_t)n, "attention row");
        double *acc = kv_calloc((size_t)n * 2, sizeof(double), "attention sums");
        if (!x->colsum || !x->colsq || !x->colmax || !row || !acc) {
            kv_free(row), kv_free(acc);
            return KV_ENOMEM;
        }
        for (int h = 0; h < H; h++) {
            memset(acc, 0, sizeof(double) * (size_t)n * 2);
            float *mx = x->colmax + (size_t)h * n;
            for (int i = 0; i < n; i++) {
                softmax_row(c, h, i, row);
                for (int j = 0; j <= i; j++) {
                    acc[j] += row[j];
                    acc[n + j] += row[j] * row[j];
                    mx[j] = (float)fmax(mx[j], row[j]);
                }
            }
            for (int j = 0; j < n; j++) {
                x->colsum[(size_t)h * n + j] = (float)acc[j];
                x->colsq[(size_t)h * n + j] = (float)acc[n + j];
            }
        }
        kv_free(row), kv_free(acc);
        x->have_col = 1;
    }
    if (sum)
        *sum = x->colsum;
    if (sumsq)
        *sumsq = x->colsq;
    if (max)
        *max = x->colmax;
    return KV_OK;
}
