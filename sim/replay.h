/*
 * replay.h: run policies x budgets against a trace, layer by layer (block-major replay).
 *
 * Each layer is read and decompressed once; the attention of every evaluation query over all its
 * keys is computed once (through the backend), every policy prepares its scores once, and every
 * (policy, budget) pair is evaluated on it in parallel with results in its own slot, so the output
 * is identical whatever the thread count. Policies that allocate across layers (KV-Compress) get a
 * pre-pass over the layers first.
 *
 * Cost per layer: O(T x (observation windows + evaluation queries) x head_dim) for the attention
 * the policies and the metrics read, when the column statistics over the prompt queries (H2O's
 * accumulated attention and the like) come from the trace (stats source KV_STATS_TRACE, the default
 * when the trace stores them); recomputing them from Q and K (KV_STATS_RECOMPUTE, traces of format
 * version 1) is O(T^2 x head_dim). See sim/layer_stats.h.
 */
#ifndef KV_REPLAY_H
#define KV_REPLAY_H

#include "kernels/kv_backend.h"
#include "sim/kept.h"
#include "sim/kv_policy.h"
#include "sim/result.h"
#include "traces/kv_trace.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where the time went (filled when kv_replay_opts_t.stats is set). */
typedef struct {
    double t_total;     /* seconds in kv_replay */
    double t_read;      /* reading and decompressing layers (in the reader thread with prefetch) */
    double t_read_wait; /* of which the engine waited for (all of t_read without prefetch) */
    double t_attn;      /* attention statistics through the backend (probabilities, column sums) */
    double attn_flop;   /* multiply-adds x 2 of those statistics' Q.K^T products */
    double t_policies;  /* policy preparation (scoring, sorting) */
    double t_eval;      /* building caches and measuring them, all (policy, budget) pairs */
    long layers_read;   /* layer reads, pre-pass included */
    int prefetched;     /* 1 when a reader thread read the layers ahead */
    int stats_source;   /* the column statistics' source used: KV_STATS_TRACE or KV_STATS_RECOMPUTE */
} kv_replay_stats_t;

typedef struct {
    kv_replay_stats_t *stats; /* optional timing breakdown */
    int eval_tail;            /* prompt tokens held out as evaluation queries (0: the decode queries only) */
    uint64_t seed;            /* seed of randomised policies */
    int head_rows;            /* 1: emit per-head rows too (default) */
    int quiet;                /* no progress output */
    int prefetch;             /* 1: a reader thread reads layer l+1 while layer l is computed (one more
                                 layer of Q/K/V, and W_O, in memory); 0: each layer is read when it is
                                 needed; KV_PREFETCH_AUTO (the default): see below */
    int stats_source;         /* where the column statistics come from: KV_STATS_TRACE, KV_STATS_RECOMPUTE
                                 (sim/layer_stats.h) or KV_STATS_AUTO (the default): from the trace when it
                                 stores them and they cover the context (--eval-tail within the trace's
                                 stats_split), else recomputed (a lean trace cannot: then an error) */
    kv_kept_t **kept;         /* optional: receives every (policy, budget)'s kept sets (sim/kept.h;
                                 (layers x storage heads x tokens) bytes each); NULL: not collected */
} kv_replay_opts_t;

#define KV_STATS_AUTO (-1)

/* The source kv_replay would use for this trace and eval tail (resolves KV_STATS_AUTO), or an error
 * saying why the requested one cannot serve (no stored statistics; a lean trace that lacks the
 * queries; an eval tail beyond what the stored statistics or the stored queries cover). *note (may be
 * NULL; 256 bytes) gets a sentence for the log when AUTO had to fall back to recomputing. */
int kv_replay_stats_source(const kv_trace_meta_t *m, int eval_tail, int requested, int *source, char *note);

/* Prefetch by default when the backend computes off the host CPU (a GPU): the cores are idle while
 * it computes, and the reader's decompression overlaps it. Not with the CPU backend, whose compute
 * threads already occupy every core the reader would use: on a quiet 2-core machine prefetch made
 * a replay 2-5 % slower (bench/results/trace-read-cpu.txt). */
#define KV_PREFETCH_AUTO (-1)

void kv_replay_defaults(kv_replay_opts_t *o);

/* Which policies can run on this trace: a lean trace stores only the last prompt queries, and a
 * policy whose preparation needs earlier ones (an observation window longer than the stored tail)
 * cannot. Runs every policy's preparation on layer 0 (cheap with the trace's statistics); ok[i] = 1
 * when policy i prepared, 0 when it needs queries the trace lacks (why[i], 1024 bytes each, gets the
 * message; may be NULL). Other failures are returned. On traces that store every query all are ok
 * without reading anything. */
int kv_replay_check_policies(kv_trace_t *t, kv_policy_t **pols, int n_pol, kv_backend_t *be, const kv_replay_opts_t *o,
                             int *ok, char (*why)[1024]);

/* Budgets are copied and resolved against the trace. On failure nothing is returned. */
int kv_replay(kv_trace_t *t, kv_policy_t **pols, int n_pol, const kv_budget_t *budgets, int n_budgets, kv_backend_t *be,
              const kv_replay_opts_t *o, kv_results_t **out);

/* The cache one (policy, budget) builds on one layer, for tests and tools: for one-shot policies the
 * context mask after selection; for decode-time and per-query policies the mask that evaluation
 * query `eval_index` (0 = the first) reads, after replaying the steps before it. mask: (n_store, T)
 * allocated by the caller with n_store = H or Hkv by the policy's granularity. */
int kv_replay_probe(kv_trace_t *t, int layer, kv_policy_t *p, const kv_budget_t *b, int eval_index,
                    const kv_replay_opts_t *o, kv_backend_t *be, uint8_t *mask);

/* kv_replay_probe for every layer in one pass: masks (n_layers, n_store, T). */
int kv_replay_probe_all(kv_trace_t *t, kv_policy_t *p, const kv_budget_t *b, int eval_index, const kv_replay_opts_t *o,
                        kv_backend_t *be, uint8_t *masks);

#ifdef __cplusplus
}
#endif
#endif
