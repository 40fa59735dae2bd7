/*
 * kv_analyze_sweep.h: analysis over the samples of a sweep (sim/sweep.h).
 *
 * Per sample, while its trace exists (sweeps delete traces after replay unless keep_traces), the
 * funnel statistics of every layer, as means over the query heads (kv_funnel_compute with its
 * defaults), are written to OUT/samples/ID.funnel.tsv by kv_analyze_sweep_funnel, the sweep's
 * on_trace hook. After the merge, kv_analyze_sweep draws over the dataset:
 *   OUT/funnel.tsv              per layer: n_samples, then each statistic's mean over the samples
 *                               and its bootstrap interval (STAT, STAT_lo, STAT_hi)
 *   OUT/figures/comparison.FMT  recall, output error and the Ada-KV bound against the budget per
 *                               policy: the mean over samples (line) and its interval (band), from
 *                               aggregate.tsv
 *   OUT/figures/funnel.FMT      the funnel statistics per layer averaged over samples, with bands
 * The intervals use the manifest's bootstrap settings (kv_bootstrap_mean).
 */
#ifndef KV_ANALYZE_SWEEP_H
#define KV_ANALYZE_SWEEP_H

#include "kernels/kv_backend.h"
#include "sim/sweep.h"
#include "traces/kv_trace.h"

#ifdef __cplusplus
extern "C" {
#endif

/* kv_sweep_trace_fn: PREFIX.funnel.tsv of one sample's trace (ctx unused). */
int kv_analyze_sweep_funnel(void *ctx, const char *sample_id, kv_trace_t *t, kv_backend_t *be, const char *prefix);

typedef struct {
    int n_figures;
    char figures[4][64]; /* relative to the output folder */
    int funnel_samples;  /* samples whose funnel statistics went into funnel.tsv */
} kv_analyze_sweep_out_t;

/* funnel.tsv and the figures of a merged sweep; format: "png", "svg" or "pdf". */
int kv_analyze_sweep(kv_sweep_t *s, const char *format, kv_analyze_sweep_out_t *out);

#ifdef __cplusplus
}
#endif
#endif
