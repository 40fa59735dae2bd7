/*
 * layer_stats.h: the statistics of one layer that several policies share, computed (or read from
 * the trace) once per layer and handed to every policy that asks.
 *
 * Two halves:
 *   - for policies: kv_ctx_colstats and kv_ctx_window_probs, called from a policy's `prepare` (or a
 *     cross-layer policy's `prescore`) with the layer context the engine passes in. They are the
 *     only way a policy gets attention statistics; a policy never calls into the replay engine.
 *   - for the engine (sim/replay.c): a kv_layer_stats_t per replay, pointed at each layer's data
 *     before the policies prepare, and the evaluation queries' probabilities.
 *
 * Where the numbers come from (kv_layer_stats_source_t):
 *   KV_STATS_RECOMPUTE  exact from the layer's stored Q and K through the backend (attn_colstats,
 *                       attn_probs): the column statistics over the context queries cost O(n_ctx^2 d)
 *                       per head, everything else O((window + evaluation queries) x T x d);
 *   KV_STATS_TRACE      column statistics from the ones capture or synth stored in the trace
 *                       (traces/FORMAT.md, "Statistics"): O(H x T) to copy, plus, when the context
 *                       ends before the prompt does (replay --eval-tail), the rows of the prompt
 *                       queries [stats_split, n_ctx) computed from Q and merged in (sums add, maxima
 *                       take the larger), so the result is what RECOMPUTE gives up to the rounding
 *                       of the capture's own arithmetic (its order of summation, f16 storage).
 * Observation windows and evaluation probabilities are computed from Q in both modes: they need
 * only the last rows of Q, which lean traces (capture --q-tail N) keep.
 */
#ifndef KV_LAYER_STATS_H
#define KV_LAYER_STATS_H

#include "kernels/kv_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_layer_ctx kv_layer_ctx_t; /* sim/kv_policy.h */
typedef struct kv_layer_stats kv_layer_stats_t;

/* ================================================================ for policies
 * Call only from `prepare` / `prescore` (not thread-safe). Results are computed on first use and
 * shared by every policy of the layer; the pointers stay valid until the engine moves to the next
 * layer. Errors: KV_ENOMEM, backend failures, and KV_EUNAVAIL when the rows they need are not in
 * the trace (a lean trace that stores only the last prompt queries), with a message that says
 * which rows. */

/* Column statistics of the causal attention of the context queries [0, n_ctx) over the context
 * keys, each (H, n_ctx): sum_i p_ij (H2O's accumulated attention), sum_i p_ij^2 (KV-Compress's
 * metric over all queries) and max_i p_ij (the threshold policy). Any output may be NULL. */
int kv_ctx_colstats(kv_layer_ctx_t *c, const float **sum, const float **sumsq, const float **max);

/* Probabilities of the last w context queries over the context keys (causal), (H, w, n_ctx): row r is
 * query n_ctx - w + r. Window columns are included (policies drop them after the softmax). */
int kv_ctx_window_probs(kv_layer_ctx_t *c, int w, const float **probs);

/* ================================================================ for the engine */

typedef enum {
    KV_STATS_RECOMPUTE = 0, /* from Q and K (any trace that stores every query) */
    KV_STATS_TRACE = 1,     /* from the statistics stored in the trace */
} kv_layer_stats_source_t;

/* The column statistics a trace stores for one layer (host memory, each (H, T); rows are keys), as
 * read by the engine's layer stream. `full` covers the prompt queries [0, n_prompt), `head` the
 * queries [0, split); sums are sum_i p_ij, squares sum_i p_ij^2, maxima max_i p_ij. */
typedef struct {
    const float *sum, *sumsq, *max;                /* over [0, n_prompt); NULL when not read */
    const float *sum_head, *sumsq_head, *max_head; /* over [0, split); NULL when not read */
    int split;
} kv_stored_colstats_t;

int kv_layer_stats_create(kv_backend_t *be, kv_layer_stats_source_t src, kv_layer_stats_t **out);
void kv_layer_stats_free(kv_layer_stats_t *s); /* accepts NULL */

/* Point the statistics at a new layer (forgetting the last one's): c describes it (its q, k, q0, ...)
 * and gets c->stats = s; stored: the layer's stored column statistics (KV_STATS_TRACE; NULL for
 * RECOMPUTE). Nothing is computed until asked. */
void kv_layer_stats_begin(kv_layer_stats_t *s, kv_layer_ctx_t *c, const kv_stored_colstats_t *stored);
/* Forget the layer (frees what was computed and the backend's views of Q and K). */
void kv_layer_stats_end(kv_layer_stats_t *s);

/* p_eval (H, n_eval, T): every evaluation query's softmax over its keys, through the backend. */
int kv_layer_stats_eval_probs(kv_layer_ctx_t *c, float *p_eval);

/* Seconds spent in the backend's attention ops and their multiply-adds x 2 (Q.K^T products only),
 * since the statistics were created. */
void kv_layer_stats_time(const kv_layer_stats_t *s, double *t_attn, double *flop);

#ifdef __cplusplus
}
#endif
#endif
