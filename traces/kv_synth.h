/*
 * kv_synth.h: synthetic attention traces with planted, controllable structure.
 *
 * A synthetic trace has the shape and format of a captured one (traces/kv_trace.h) but its Q and K
 * are constructed so that the attention softmax(q_i . k_j / sqrt(d)) shows, by design and with
 * known strength:
 *   - attention sinks: the first `sinks` tokens take `sink_mass` of every query's attention;
 *   - recent-window locality: scores decay with the distance i - j (rotary dimension pairs);
 *   - heavy hitters: a fraction `heavy_frac` of the prompt tokens that every query favours;
 *   - segment locality: queries favour keys of their own segment (meta.segments);
 *   - funnelling with depth: all of the above sharpen from the first layer to the last, so
 *     attention is broad (high entropy) in low layers and concentrated in high layers;
 *   - GQA: query heads of a group share K and V; every query head has its own queries.
 * The model and its formulas are documented at the top of traces/synth.c and in `kvsim synth --help`.
 *
 * Generation is O(T * head_dim) per head and layer (no T x T work) and streams one layer at a
 * time. Attention summaries (LSE, entropy, accumulated attention, pooled map) and the statistics
 * replay and analyze read (traces/FORMAT.md, "Statistics") are O(T^2) and are computed through the
 * backend op table only when asked (or, with `auto`, for small traces), one layer at a time: synth
 * never holds more than one layer's tensors (and one layer's token-major copies for the backend).
 * Output is a deterministic function of the parameters (seed included), whatever the thread count.
 *
 * Parameters have a schema (kv_params.h): every generation parameter has a key, a default and a
 * range, the CLI exposes each key as an option (--sink-mass for sink_mass), and the canonical label
 * "synth(layers=...,heads=...,...)" is stored in meta.generator so kv_synth_parse() gives back the
 * parameters that produced a trace file (and with them kv_synth_roles(), the planted tokens).
 */
#ifndef KV_SYNTH_H
#define KV_SYNTH_H

#include "traces/kv_trace.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { KV_SYNTH_SUMMARIES_AUTO = 0, KV_SYNTH_SUMMARIES_YES, KV_SYNTH_SUMMARIES_NO } kv_synth_summaries_t;

/* Summaries are computed under `auto` when n_tokens is at most KV_SYNTH_AUTO_SUMMARY_TOKENS and
 * layers x heads x tokens^2 at most KV_SYNTH_AUTO_SUMMARY_WORK (Llama-3-8B shape up to 2209
 * tokens: about two minutes on two cores). */
#define KV_SYNTH_AUTO_SUMMARY_TOKENS 4096
#define KV_SYNTH_AUTO_SUMMARY_WORK 5e9

typedef struct {
    /* ---- generation parameters (the schema keys, in brackets) ---- */
    int n_layers;             /* [layers] */
    int n_heads;              /* [heads] query heads */
    int n_kv_heads;           /* [kv_heads] KV heads; n_heads must be a multiple */
    int head_dim;             /* [head_dim] even */
    int n_tokens;             /* [tokens] total T = prompt + decode; positions 0..T-1 */
    int n_decode;             /* [decode] decode tokens at the end (queries for them too) */
    long seed;                /* [seed] */
    int n_sinks;              /* [sinks] sink tokens at positions 0..sinks-1 */
    double sink_mass;         /* [sink_mass] share of each query's attention on the sinks, [0, 1) */
    double heavy_frac;        /* [heavy_frac] fraction of prompt tokens planted as heavy hitters */
    double heavy_boost;       /* [heavy_boost] logit bonus of a heavy hitter at sharpness 1 */
    double recent_boost;      /* [recent_boost] logit amplitude of the recency kernel at sharpness 1 */
    int recent_window;        /* [recent_window] longest rotary wavelength / 2 pi, in tokens */
    int rope_pairs;           /* [rope_pairs] rotary dimension pairs that carry the recency kernel */
    int n_segments;           /* [segments] 0 or 1: none; else the prompt is split in that many segments */
    double segment_jitter;    /* [seg_jitter] segment lengths vary by +-jitter around the mean */
    double segment_boost;     /* [seg_boost] logit bonus for keys of the query's segment at sharpness 1 */
    int segment_dims;         /* [seg_dims] one-hot segment code dims (segments share a code modulo this) */
    double sharp_first;       /* [sharp_first] sharpness (multiplier of all bonuses) of layer 0 */
    double sharp_last;        /* [sharp_last] sharpness of the last layer (linear in between) */
    double noise;             /* [noise] standard deviation of the content (noise) logit term */
    double head_jitter;       /* [head_jitter] per-head bonus multipliers drawn in [1-j, 1+j] */
    double planted_key_scale; /* [key_scale] noise scale of sink and heavy keys (low key norm) */
    double channel_spread;    /* [chan_spread] log-std of per-channel scales of the noise dims */

    /* ---- output options (not part of the label: they do not change Q, K, V) ---- */
    kv_synth_summaries_t summaries;
    int pool;         /* pooled map side, 0 = KV_TRACE_DEFAULT_POOL (clipped to T) */
    char backend[16]; /* backend for the summaries: "cpu" (default), "cuda" or "auto" */
    int n_threads;    /* generation and CPU backend threads, <= 0: all cores */
    int q_tail;       /* >= 0: a lean trace, queries stored only for the last q_tail prompt tokens and the
                         decode tokens (summaries and statistics are then always written); -1 (the
                         default): every query */
} kv_synth_params_t;

/* Roles of tokens (bit flags) returned by kv_synth_roles. */
enum { KV_SYNTH_ORDINARY = 0, KV_SYNTH_SINK = 1, KV_SYNTH_HEAVY = 2 };

/* Defaults: 8 layers, 8 heads, 2 KV heads, head_dim 64, 2048 tokens of which 64 decode, seed 1,
 * 1 sink with mass 0.3, 1% heavy hitters, no segments, summaries auto, CPU backend. */
void kv_synth_defaults(kv_synth_params_t *p);
/* Set one generation parameter by schema key ("sink_mass", "0.3"); range-checked. Unknown keys
 * are an error that lists the valid ones. */
int kv_synth_set(kv_synth_params_t *p, const char *key, const char *val);
/* Apply a label or partial spec "synth(k=v,...)" on top of p (keys not given keep their value). */
int kv_synth_apply(kv_synth_params_t *p, const char *spec);
/* Defaults, then the label: gives back the parameters that produced a trace (meta.generator). */
int kv_synth_parse(const char *label, kv_synth_params_t *p);
/* Canonical label "synth(layers=..,...)" of the generation parameters. */
int kv_synth_label(const kv_synth_params_t *p, char *buf, size_t len);
/* "key = default (type, range) help" lines for --help. */
void kv_synth_describe(char *buf, size_t len);
/* The i-th schema key (NULL past the last): the CLI turns each into an option. */
const char *kv_synth_key(int i);
/* Apply a named shape preset ("llama3-8b", "llama2-7b", "tiny"); KV_EINVAL lists the names. */
int kv_synth_preset(kv_synth_params_t *p, const char *name);

/* Check that the parameters are possible (heads a multiple of kv_heads, head_dim large enough for
 * the planted dimensions, decode < tokens, ...); KV_EINVAL with a message saying what to change. */
int kv_synth_validate(const kv_synth_params_t *p);
/* Whether summaries will be written (resolves `auto`). */
int kv_synth_want_summaries(const kv_synth_params_t *p);
/* layers x heads x tokens^2: the size of the summaries' O(T^2) work. */
double kv_synth_summary_work(const kv_synth_params_t *p);
/* Sharpness of a layer: sharp_first + (sharp_last - sharp_first) * layer / (layers - 1). */
double kv_synth_sharpness(const kv_synth_params_t *p, int layer);

/* Roles of every token: roles (n_tokens) gets KV_SYNTH_SINK / KV_SYNTH_HEAVY flags. Deterministic
 * in (seed, tokens, decode, sinks, heavy_frac); heavy hitters are prompt tokens after the sinks.
 * *n_heavy (may be NULL) gets their number. */
int kv_synth_roles(const kv_synth_params_t *p, uint8_t *roles, int *n_heavy);
/* Roles of the tokens of a synthetic trace, from its metadata (source "synth"; the parameters are
 * parsed from meta.generator): works for HDF5 files written by `kvsim synth` and in-memory traces. */
int kv_synth_trace_roles(const kv_trace_meta_t *m, uint8_t *roles, int *n_heavy);
/* The trace metadata the generator writes (shape, tokens = -1, positions 0..T-1, segments,
 * provenance with the label in generator). The caller frees it with kv_trace_meta_free. */
int kv_synth_meta(const kv_synth_params_t *p, kv_trace_meta_t *m);

/* ---- layer-by-layer generation ---- */
typedef struct kv_synth kv_synth_t;

/* Validate and precompute the tables shared by all layers (O(T * rope_pairs)). */
int kv_synth_create(const kv_synth_params_t *p, kv_synth_t **out);
void kv_synth_free(kv_synth_t *s);
const kv_synth_params_t *kv_synth_params(const kv_synth_t *s);
/* Generate one layer into caller buffers. Bounded memory: O(T) scratch per thread. */
int kv_synth_layer(const kv_synth_t *s, int layer, float *q /* (n_heads, T, head_dim) */,
                   float *k /* (n_kv_heads, T, head_dim) */, float *v /* (n_kv_heads, T, head_dim) */);

/* The statistics of one layer besides the summaries, (n_heads, T) each (traces/kv_trace.h): per key
 * over the prompt queries (acc_sq, max) and over those before m->stats_split (the *_head ones), per
 * query keys90, sink and seg (segments from m). Any may be NULL. */
typedef struct {
    float *acc_sq, *max, *acc_head, *acc_sq_head, *max_head;
    float *keys90, *sink, *seg;
} kv_synth_stats_t;

/* Attention summaries of one head-major layer through a backend (attention + attn_stats):
 * lse, entropy (n_heads, T); acc (n_heads, T) summed over prompt queries; pooled
 * (n_heads, pool, pool) max-pooled causal probabilities; st (may be NULL) the statistics. Any output
 * may be NULL. q is (n_heads, T, head_dim): every query, whatever m->q_start says. */
struct kv_backend;
int kv_synth_summarize(struct kv_backend *be, const kv_trace_meta_t *m, const float *q, const float *k, const float *v,
                       float *lse, float *entropy, float *acc, float *pooled, const kv_synth_stats_t *st);

/* ---- whole traces ---- */
/* Write an HDF5 trace (atomically, via kv_trace_create/commit), one layer at a time, with
 * progress on stderr. opts may be NULL (f16, zstd level 3). */
int kv_synth_write(const kv_synth_params_t *p, const char *path, const kv_write_opts_t *opts);
/* Build an in-memory trace (kv_trace_mem_create); the caller closes it with kv_trace_close. */
int kv_synth_memory(const kv_synth_params_t *p, kv_trace_t **out);

#ifdef __cplusplus
}
#endif
#endif
