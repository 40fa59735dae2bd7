/*
 * replay.h: run policies x budgets against a trace, layer by layer (block-major replay).
 *
 * Each layer is read and decompressed once; the attention of every evaluation query over all its
 * keys is computed once (through the backend), every policy prepares its scores once, and every
 * (policy, budget) pair is evaluated on it in parallel with results in its own slot, so the output
 * is identical whatever the thread count. Policies that allocate across layers (KV-Compress) get a
 * pre-pass over the layers first.
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
    kv_kept_t **kept;         /* optional: receives every (policy, budget)'s kept sets (sim/kept.h;
                                 (layers x storage heads x tokens) bytes each); NULL: not collected */
} kv_replay_opts_t;

/* Prefetch by default when the backend computes off the host CPU (a GPU): the cores are idle while
 * it computes, and the reader's decompression overlaps it. Not with the CPU backend, whose compute
 * threads already occupy every core the reader would use: on a quiet 2-core machine prefetch made
 * a replay 2-5 % slower (bench/results/trace-read-cpu.txt). */
#define KV_PREFETCH_AUTO (-1)

void kv_replay_defaults(kv_replay_opts_t *o);

/* Budgets are copied and resolved against the trace. On failure nothing is returned. */
int kv_replay(kv_trace_t *t, kv_policy_t **pols, int n_pol, const kv_budget_t *budgets, int n_budgets, kv_backend_t *be,
              const kv_replay_opts_t *o, kv_results_t **out);

/* The cache one (policy, budget) builds on one layer, for tests and tools: for one-shot policies the
 * context mask after selection; for decode-time and per-query policies the mask that evaluation
 * query `eval_index` (0 = the first) reads, after replaying the steps before it. mask: (n_store, T)
 * allocated by the caller with n_store = H or Hkv by the policy's granularity. */
int kv_replay_probe(kv_trace_t *t, int layer, kv_policy_t *p, const kv_budget_t *b, int eval_index,
                    const kv_replay_opts_t *o, kv_backend_t *be, uint8_t *mask);

#ifdef __cplusplus
}
#endif
#endif
