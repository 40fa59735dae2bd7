/*
 * kv_analyze.h: what a trace and its replay results say, as numbers, figures and a report.
 *
 * The analyze module sits on top of the others and is the only one that knows both attention
 * traces and figures: it reads traces (traces/kv_trace.h: Q, K and the capture-time summaries),
 * replay results (sim/result.h: TSV tables read by column name, never by position) and draws with
 * the KV-agnostic plots library (plots/kv_plot.h). Its parts:
 *
 * - Funnel statistics, per layer and query head: attention entropy (nats) and normalised entropy
 *   (entropy / ln(visible keys)), the fraction of visible keys needed to reach 90 % of a query's
 *   attention, the mass on the first token (sink) and the mass inside the query's own segment
 *   (locality). Entropy and sink mass come from the stored summaries (ENTROPY, and LSE:
 *   p_ij = exp(q_i.k_j / sqrt(d) - lse_i)) over every counted query when the trace has them; the
 *   90 % fraction and the segment mass need whole attention rows, recomputed from Q and K through
 *   the backend (attn_probs) for a sample of queries: every query of a short trace, else 64 per
 *   head in evenly spaced runs of 8 consecutive queries. Traces without summaries get every
 *   statistic from the sampled rows.
 * - Attention maps, per layer, for the funneling figure: the pooled maps stored in the trace, or
 *   exact maps recomputed from Q and K for short traces without summaries, or max-pooled maps of
 *   sampled query rows for long ones.
 * - Results sets: one or more results TSV files merged (a sweep), with short policy names for
 *   legends (the parameters that differ from the policy's defaults).
 * - Figure recipes, kv_analyze_fig_*: each builds a kv_fig_t that the caller renders or saves, so
 *   tests draw them into in-memory surfaces.
 * - The report, kv_analyze_run: every figure as a file plus report.md and a self-contained
 *   report.html (figures as base64 data URIs, inline CSS).
 *
 * Errors follow sim/common/kv_common.h (int status, message in kv_last_error(), naming the file).
 */
#ifndef KV_ANALYZE_H
#define KV_ANALYZE_H

#include "kernels/kv_backend.h"
#include "plots/kv_plot.h"
#include "traces/kv_trace.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ================================================================ funnel statistics */

/* Statistics of one attention row p[0..n) over the n keys a query sees (probabilities; they are
 * renormalised by their sum, so a row that sums to 1 within float rounding is read as is). */
typedef struct {
    double entropy;      /* -sum p ln p, nats */
    double norm_entropy; /* entropy / ln n (1 for uniform attention); NaN when n < 2 */
    double frac;         /* keys needed to reach `mass` of the row (largest first) / n */
    double sink;         /* p[0] */
    double seg;          /* mass on keys [seg_lo, n): the query's own segment; NaN when seg_lo < 0 */
} kv_row_stats_t;

/* scratch: n floats (clobbered). */
void kv_analyze_row_stats(const float *p /* (n) */, int n, int seg_lo, double mass, float *scratch,
                          kv_row_stats_t *out);
/* Smallest k such that the k largest entries of p hold at least `mass` of its sum (relative slack
 * 1e-6 for float rounding, so that nine keys of a uniform row of ten reach 0.9). Expected O(n)
 * (quickselect), deterministic. scratch: n floats. Returns 0 for n == 0. */
int kv_analyze_mass_count(const float *p /* (n) */, int n, double mass, float *scratch);

typedef struct {
    int max_queries;   /* sampled queries per head for the row statistics (default 64; 0 = all) */
    int all_if_short;  /* 1 (default): every query when a layer's attention has at most 16M
                          probabilities (n_heads x T^2), whatever max_queries says */
    int min_keys;      /* queries that see fewer keys are not counted (default 16, at most T) */
    double mass;       /* attention mass of the concentration fraction (default 0.9) */
    int use_summaries; /* 1 (default): entropy and sink mass from ENTROPY / LSE when present */
    int quiet;         /* no progress on stderr */
} kv_funnel_opts_t;

void kv_funnel_opts_init(kv_funnel_opts_t *o);

typedef struct {
    int n_layers, n_heads, n_tokens;
    double mass;
    int q_lo;           /* counted queries are [q_lo, n_tokens) */
    int n_sampled;      /* sampled queries per head (rows recomputed from Q and K) */
    int from_summaries; /* 1: entropy and sink mass over every counted query, from ENTROPY / LSE */
    int from_stats;     /* 1: every statistic over every counted query from the trace's stored per-query
                           statistics (KEYS90, SINK, SEG, ENTROPY): O(H x T) per layer, no Q or K read */
    int has_segments;
    /* (n_layers, n_heads): means over the counted queries */
    double *entropy, *norm_entropy, *frac, *sink, *seg; /* seg: NaN without segments */
} kv_funnel_t;

/* Compute the statistics of every layer and head. From the stored per-query statistics when the
 * trace has them (format version 2; mass 0.9, use_summaries): O(n_heads x T) per layer, every counted
 * query, nothing recomputed. Otherwise one layer at a time from Q, K and the summaries, sampled rows
 * recomputed through the backend's attn_probs (refused on lean traces, which lack the queries). */
int kv_funnel_compute(kv_trace_t *t, kv_backend_t *be, const kv_funnel_opts_t *o, kv_funnel_t **out);
void kv_funnel_free(kv_funnel_t *f);
/* Mean over heads of a (n_layers, n_heads) field at one layer (NaN entries skipped). */
double kv_funnel_layer_mean(const kv_funnel_t *f, const double *field, int layer);

/* ================================================================ attention maps */

typedef enum {
    KV_MAP_AUTO = 0, /* pooled when the trace has summaries; else exact up to KV_MAP_EXACT_MAX tokens, else sampled */
    KV_MAP_POOLED,   /* the trace's pooled maps (needs summaries) */
    KV_MAP_EXACT,    /* full causal attention recomputed from Q and K, one cell per token */
    KV_MAP_SAMPLED   /* one query per row cell (its last token), keys max-pooled into column cells */
} kv_map_src_t;

#define KV_MAP_EXACT_MAX 1024
#define KV_MAP_SAMPLED_ROWS 128 /* one backend call per row: the cost of the sampled maps */
#define KV_MAP_SAMPLED_COLS 256

typedef struct {
    kv_map_src_t src; /* resolved source */
    int rows, cols;   /* row cell r covers query positions [r T / rows, (r+1) T / rows), column cell c
                         key positions [c T / cols, (c+1) T / cols) (integer division, as FORMAT.md) */
    int n_tokens;     /* T */
    int n_heads;
    float *maps; /* (n_heads, rows, cols) probabilities; NaN where every key of the column cell comes
                    after every query of the row cell (above the causal diagonal) */
} kv_attn_map_t;

/* The map of one layer; free with kv_attn_map_free. */
int kv_attn_map_layer(kv_trace_t *t, kv_backend_t *be, int layer, kv_map_src_t src, kv_attn_map_t *out);
void kv_attn_map_free(kv_attn_map_t *m);
/* Mean over heads into dst (rows, cols). */
void kv_attn_map_mean(const kv_attn_map_t *m, float *dst);
const char *kv_map_src_name(kv_map_src_t s);

/* Layers for the funneling figure: all when n_layers <= want, else first, last and evenly spaced
 * between (want of them). Writes up to `want` indices to layers and returns their number. */
int kv_analyze_pick_layers(int n_layers, int want, int *layers);

/* ================================================================ results */

/* One row of a results table, the columns analyze uses (NaN for an optional column a file lacks). */
typedef struct {
    int pol;           /* index into the set's labels */
    int file;          /* which results file */
    char budget[32];   /* budget text as given ("128", "0.25", "seq:65536") */
    int budget_tokens; /* resolved per-head budget */
    int layer, head;   /* -1 for "all" */
    double kept, cache_mean;
    double recall_mean, recall_p10, recall_min;
    double err_mean, err_p90, err_max, bound_mean;
    double violations;
    double mem_bytes, meta_bytes, n_queries;
    double nonfinite; /* NaN and inf values the row's evaluations read (0 when the file has no such column) */
} kv_res_row_t;

typedef struct {
    kv_res_row_t *rows;
    size_t n, cap;
    int n_pol;
    char **labels; /* (n_pol) canonical labels as in the files */
    char **shorts; /* (n_pol) short names for legends */
    int n_files;
    char **files;              /* (n_files) paths */
    char **file_sha;           /* (n_files) trace_sha256 of the preamble ("" when absent) */
    char **file_cmd;           /* (n_files) command of the preamble ("" when absent) */
    char **file_date;          /* (n_files) date of the preamble */
    int n_duplicates;          /* rows that repeated an earlier row's (policy, budget_tokens, layer, head), of the same
                                  file (two budgets that resolve to the same tokens) or of an earlier file */
    int max_layers, max_heads; /* the trace's shape: rows beyond it are refused (0: not checked) */
    long n_nan_rows;           /* rows left out: nan or infinite metrics, or NaN/inf inputs (nonfinite > 0) */
} kv_res_set_t;

int kv_res_set_create(kv_res_set_t **out);
void kv_res_set_free(kv_res_set_t *s);
/* Read a results TSV by column name and append its rows. A missing required column is an error
 * naming the file, the column and the columns it has; so is a cell that is not a number ("nan" and
 * "inf" as replay writes them excepted), a value outside its column's range (recall in [0, 1],
 * errors, bounds, memory and counts >= 0, integers where replay writes integers) and a layer or head
 * beyond max_layers / max_heads when they are set. Rows with nan or infinite metrics, or whose
 * nonfinite column is > 0, are left out with a warning that names the file and the rows. When
 * trace_sha is given and differs from the file's "# trace_sha256:" line, a warning names both (the
 * rows are still used). */
int kv_res_set_load(kv_res_set_t *s, const char *path, const char *trace_sha);
/* Columns a results file must have. */
const char *const *kv_res_required_columns(int *n);
/* Index of a label, adding it when absent (-1 on allocation failure). */
int kv_res_set_policy(kv_res_set_t *s, const char *label);
/* Append one row (its pol must index the labels). Rows repeating an earlier (policy, budget_tokens,
 * layer, head) are dropped and counted in n_duplicates. */
int kv_res_set_add(kv_res_set_t *s, const kv_res_row_t *row);
/* (Re)compute the short names of every policy (call after loading). */
int kv_res_set_finish(kv_res_set_t *s);
/* Sorted distinct budget_tokens values of the set (up to max) and their number. */
int kv_res_set_budgets(const kv_res_set_t *s, int *budgets, int max);
/* The row of (pol, budget_tokens, layer, head), or NULL. */
const kv_res_row_t *kv_res_set_find(const kv_res_set_t *s, int pol, int budget_tokens, int layer, int head);
/* Number of layers seen in per-layer rows (max layer + 1). */
int kv_res_set_n_layers(const kv_res_set_t *s);
/* Policy index whose name (the label before '(') is `name`, or -1 (the first such). */
int kv_res_set_policy_named(const kv_res_set_t *s, const char *name);
/* Flags (KV_POL_*) of policy i as this kvsim configures its label, 0 when the label does not parse
 * (results of another kvsim version). */
unsigned kv_res_set_policy_flags(const kv_res_set_t *s, int i);
/* The first policy with any of `flags`, or -1. */
int kv_res_set_policy_flagged(const kv_res_set_t *s, unsigned flags);
/* A resolved budget as a reader needs it: "64 tokens per head" when it was given in tokens,
 * "0.1 (43 tokens per head)" or "seq:2048 (102 tokens per head)" when it was given as a fraction or
 * a total (the text of the first row with that budget_tokens). */
void kv_res_budget_name(const kv_res_set_t *s, int budget_tokens, char *buf, size_t len);

/* Short legend name of a canonical label: the policy name plus the parameters that differ from
 * its registered defaults ("snapkv(window=16)", "adakv(inner=pyramidkv)"); unknown policies keep
 * their label. */
int kv_analyze_short_label(const char *label, char *buf, size_t len);

/* ================================================================ figures */

typedef struct {
    int n_layers;      /* layers shown (default 6) */
    const int *layers; /* explicit list (NULL: kv_analyze_pick_layers) */
    int n_explicit;
    kv_map_src_t src;  /* default KV_MAP_AUTO */
    int width, height; /* pixels (0: 1600 x 1000) */
} kv_funneling_opts_t;

/* 1. Pyramid information funneling: grid of per-layer attention maps averaged over heads (or of
 * one layer's heads when head_layer >= 0), shared log colour bar, segment starts and the
 * prompt/decode boundary drawn. */
int kv_analyze_fig_funneling(kv_trace_t *t, kv_backend_t *be, const kv_funneling_opts_t *o, int head_layer,
                             kv_fig_t **out);
/* 2. Funnel curves per layer: entropy, normalised entropy, fraction of keys for the mass, sink mass,
 * in-segment mass (faint line per head, bold mean). */
int kv_analyze_fig_funnel_curves(const kv_funnel_t *f, kv_fig_t **out);
/* 3. Head concentration (Ada-KV): per head the fraction of keys needed for the mass, sorted, per layer
 * and over all heads. */
int kv_analyze_fig_head_concentration(const kv_funnel_t *f, kv_fig_t **out);
/* 4. Recall, output error and bound per policy against the budget (by_memory = 0) or against the
 * cache memory in bytes (by_memory = 1), from the overall rows. */
int kv_analyze_fig_tradeoff(const kv_res_set_t *s, int by_memory, kv_fig_t **out);
/* 5. Ada-KV bound against the measured L1 error, per-layer rows, log-log with y = x. */
int kv_analyze_fig_bound(const kv_res_set_t *s, kv_fig_t **out);
/* 6. Budget allocation: context tokens kept per layer (pyramid vs uniform) and per head (head-adaptive). */
int kv_analyze_fig_allocation(const kv_res_set_t *s, kv_fig_t **out);
/* 7. Policy x layer recall heat map, one panel per budget. */
int kv_analyze_fig_recall_heatmap(const kv_res_set_t *s, kv_fig_t **out);

/* ================================================================ closed loop (analyze/closed.c) */

/* Which command wrote a results file, by its columns: replay, eval or niah. */
typedef enum { KV_RES_REPLAY = 0, KV_RES_EVAL, KV_RES_NIAH } kv_res_kind_t;
int kv_res_kind(const char *path, kv_res_kind_t *kind);

/* A summary row of kvsim eval (step "all"). */
typedef struct {
    int pol; /* index into the set's labels */
    char budget[32];
    int budget_tokens;
    double kl, kl_max, agree, first_div; /* first_div NaN: none */
    double nll, dnll, kept, mem;
} kv_eval_row_t;

/* A row of kvsim niah: a cell, or a summary (length -1, depth NaN). */
typedef struct {
    int pol;
    int full; /* the full cache's row (budget "none") */
    char budget[32];
    int budget_tokens; /* -1 for the full cache */
    int length;
    double depth, n_prompt, found, kl, agree;
} kv_niah_row_t;

typedef struct {
    int n_pol;
    char **labels, **shorts;
    kv_eval_row_t *ev;
    size_t n_ev, cap_ev;
    kv_niah_row_t *ni;
    size_t n_ni, cap_ni;
    int n_files;
    char **files, **file_cmd;
} kv_closed_set_t;

int kv_closed_set_create(kv_closed_set_t **out);
void kv_closed_set_free(kv_closed_set_t *s);
/* Append an eval or niah results file (a replay file is refused, naming it). */
int kv_closed_set_load(kv_closed_set_t *s, const char *path);

/* Open loop vs closed loop, per budget held by both sets: the configurations of both (matched by
 * label and resolved budget; those that lose nothing in either are left out), Spearman's rank
 * correlation of replay's recall loss and output error with eval's KL and disagreement, and the
 * pairs that replay's recall and eval's KL order differently. */
typedef struct {
    int pol, pol_replay;           /* indices into the closed set's and the replay set's labels */
    double loss, err;              /* replay: 1 - recall_mean, err_mean (overall row) */
    double kl, disagree;           /* eval: kl_mean, 1 - agree */
    double rank_open, rank_closed; /* ranks by loss and by KL (1 = least lost) */
} kv_oc_cfg_t;
typedef struct {
    int budget_tokens;
    char budget[32];
    int n;
    kv_oc_cfg_t *cfg;
    double rho_loss_kl, rho_err_kl, rho_loss_dis, rho_err_dis;
    int discordant, pairs;
} kv_oc_budget_t;
typedef struct {
    int n_budgets;
    kv_oc_budget_t *b;
} kv_open_closed_t;
int kv_open_closed_compute(const kv_res_set_t *replay, const kv_closed_set_t *closed, kv_open_closed_t *out);
void kv_open_closed_free(kv_open_closed_t *oc);
/* Spearman's rank correlation (ties at average ranks); NaN for fewer than 3 points or a constant. */
double kv_spearman(const double *x, const double *y, int n);

/* 8. Open vs closed: per budget (up to 4), replay's recall loss against eval's KL and replay's
 * output error against eval's disagreement, one point per policy, Spearman in the titles. */
int kv_analyze_fig_open_closed(const kv_closed_set_t *closed, const kv_open_closed_t *oc, kv_fig_t **out);
/* 9. Closed loop against the budget: KL and top-1 agreement per policy. */
int kv_analyze_fig_eval_budget(const kv_closed_set_t *s, kv_fig_t **out);
/* 10. NIAH: the length x depth grid of every configuration (the full cache first), retrieved or not. */
int kv_analyze_fig_niah_grid(const kv_closed_set_t *s, kv_fig_t **out);
/* 11. NIAH: the share of the grid retrieved per policy against the budget, the full cache's as a line. */
int kv_analyze_fig_niah_summary(const kv_closed_set_t *s, kv_fig_t **out);

/* ================================================================ the analysis and its report */

typedef struct {
    const char *out_dir;     /* created when missing */
    const char *format;      /* "png" (default), "svg" or "pdf" */
    kv_funneling_opts_t map; /* funneling figure */
    int per_head;            /* also one figure of every head per shown layer */
    kv_funnel_opts_t funnel;
    const char *note;      /* extra note shown at the top of the report (e.g. a synthetic fallback) */
    const char *title;     /* report title (default "kvsim analysis") */
    const char *demo_info; /* free text about how the data were made (demo), or NULL */
    int quiet;
} kv_analyze_opts_t;

void kv_analyze_opts_init(kv_analyze_opts_t *o);

/* What a run wrote (paths under out_dir). */
typedef struct {
    int n_figures;
    char figures[32][64]; /* file names relative to out_dir */
    char report_md[1024], report_html[1024];
} kv_analyze_out_t;

/* Analyze a trace (trace_path for its checksum and the report; may be NULL for in-memory traces)
 * with zero or more results files (replay's, and kvsim eval's and niah's, told apart by their
 * columns): write the figures, report.md and report.html into out_dir. t may be NULL when every
 * results file is an eval or niah one (no trace figures then). */
int kv_analyze_run(kv_trace_t *t, const char *trace_path, const char *const *results, int n_results, kv_backend_t *be,
                   const kv_analyze_opts_t *o, kv_analyze_out_t *out);

/* Base64 of n bytes into a new NUL-terminated string (kv_free). */
char *kv_base64(const unsigned char *data, size_t n);

#ifdef __cplusplus
}
#endif
#endif
