/*
 * metrics.h: what a cache costs an evaluation query (Ada-KV, arXiv 2407.11550, Theorem 3.1).
 *
 * For query head h and evaluation query i with full-softmax attention p over keys [0, i] and the
 * set S of keys in its cache:
 *   recall F = sum_{j in S} p_j                   (attention mass the cache still holds)
 *   output o = sum_j p_j v_j,  o_hat = sum_{j in S} p_j v_j / F   (renormalised over the cache)
 *   error  E = ||o - o_hat||_1
 *   bound  E <= 2 (1 - F) C,  C = max_j ||v_j||_1 over the KV head's tokens
 * and, when the trace has W_O, the same in model space for the whole layer:
 *   E_wo = ||sum_h W_O^h (o_h - o_hat_h)||_1 <= sum_h 2 (1 - F_h) C_h,  C_h = max_j ||W_O^h v_j||_1.
 * Sums run over whichever of the kept and evicted sets is smaller (o - o_hat can be formed from
 * either), with probabilities summed in double.
 */
#ifndef KV_METRICS_H
#define KV_METRICS_H

#include "sim/kv_policy.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Float tolerance of the bound check. E and the bound are computed in float from sums of up to T
 * terms of size <= C; forming o_hat divides by F. A violation is reported when
 *   E > bound * (1 + KV_BOUND_RTOL) + KV_BOUND_ATOL * d * C / F,
 * i.e. beyond a few float ulps per output component (rtol 1e-4 covers float32 rounding of the
 * reductions; atol 1e-6 per component and per unit of C, amplified by 1/F). */
#define KV_BOUND_RTOL 1e-4
#define KV_BOUND_ATOL 1e-6

typedef struct {
    const kv_layer_ctx_t *c;
    float *o_full; /* (H, n_eval, d) exact head outputs */
    float *o_app;  /* (H, n_eval, d) part of o from appended keys [n_ctx, i] */
    double *p_app; /* (H, n_eval) attention mass on appended keys */
    float *vnorm;  /* (Hkv, T) ||v_j||_1 */
    float *C;      /* (Hkv) max_j ||v_j||_1 */
    float *C_wo;   /* (H) max_j ||W_O^h v_j||_1, NULL without W_O */
    int model_dim;
} kv_metrics_layer_t;

int kv_metrics_layer_init(kv_metrics_layer_t *m, const kv_layer_ctx_t *c);
void kv_metrics_layer_free(kv_metrics_layer_t *m);

int kv_bound_violated(double err, double bound, double F, double C, int d);

/* NaN and infinite values of the layer's inputs: in Q per query head into q_head (H), in K and V
 * per KV head into kv_head (Hkv). A row that reads any of them cannot be measured (replay reports
 * it as nan with the count). */
void kv_metrics_nonfinite(const kv_layer_ctx_t *c, long *q_head, long *kv_head);

/* One-shot cache: storage mask over the context [0, n_ctx) shared by query heads h0..h0+nh-1 and
 * by every evaluation query (appended keys always kept). Outputs per head, (nh, n_eval); evec
 * (nh, n_eval, d) receives o - o_hat when non-NULL. */
int kv_metrics_oneshot(const kv_metrics_layer_t *m, int h0, int nh, const uint8_t *mask, float *recall, float *err,
                       float *bound, float *evec);

/* One query: head h, evaluation query e (key index i = n_ctx + e), cache mask over [0, T) of which
 * only [0, i] is read; with `append` set, appended keys [n_ctx, i] count as cached whatever the mask.
 * attn (T) receives p renormalised over the cache (0 elsewhere) when non-NULL; evec (d) o - o_hat. */
void kv_metrics_query(const kv_metrics_layer_t *m, int h, int e, const uint8_t *mask, int append, float *recall,
                      float *err, float *bound, float *evec, float *attn);

/* Scratch memory of kv_metrics_query_group, reused from call to call by one thread (replay makes
 * one call per evaluation query and storage head: E x S per (policy, budget) and layer, too many
 * to allocate for each). Zero-initialise; kv_metrics_scratch_free releases it. */
typedef struct {
    void *buf;
    size_t cap;
} kv_metrics_scratch_t;

void kv_metrics_scratch_free(kv_metrics_scratch_t *ws);

/* The same for query heads h0..h0+nh-1, which share the cache mask (one KV group): the cached (or
 * evicted) values are gathered once. Outputs per head: recall/err/bound (nh), evec (nh, d),
 * attn (nh, T). ws: scratch reused across calls, or NULL to allocate for this call.
 * KV_ENOMEM on allocation failure. */
int kv_metrics_query_group(const kv_metrics_layer_t *m, int h0, int nh, int e, const uint8_t *mask, int append,
                           float *recall, float *err, float *bound, float *evec, float *attn, kv_metrics_scratch_t *ws);

/* Model-space error and bound of one evaluation query from the per-head error vectors
 * evec (H, d) and recalls F (H). */
void kv_metrics_wo(const kv_metrics_layer_t *m, const float *evec, const float *recall, float *err, float *bound);

#ifdef __cplusplus
}
#endif
#endif
