/*
 * window.h: pieces shared by the observation-window policy family (snapkv, pyramidkv, adakv,
 * chunkkv; docs/POLICIES.md §1, §2.3-2.5, §2.7):
 *   - the SnapKV observation-window score (parameters, reading them, scoring a layer);
 *   - the PyramidKV integer layer schedule, as a pure function;
 *   - composition: building a policy's inner scorer from a spec parameter with the outer policy's
 *     granularity and group aggregation.
 * Implemented in window.c (score, composition) and pyramidkv.c (schedule).
 */
#ifndef KV_POLICIES_WINDOW_H
#define KV_POLICIES_WINDOW_H

#include "sim/kv_policy.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ---- SnapKV observation-window score ---- */
typedef enum { KV_POOL_MAX = 0, KV_POOL_AVG = 1, KV_POOL_NONE = 2 } kv_pool_t;

typedef struct {
    int window;     /* observation window w (clamped to the context length per layer) */
    int kernel;     /* pooling kernel (odd), stride 1, padding kernel/2 */
    kv_pool_t pool; /* max (pads with -inf), avg (PyTorch count_include_pad: always / kernel), none */
    int qagg_mean;  /* 1: mean over the window queries (FFY0, kvpress); 0: sum (SnapKV, KCF) */
    int gqa_before; /* granularity kv: 1 = reduce the group (agg) before pooling (KCF HEAD, FFY0
                       gqa_support); 0 = after pooling (kvpress). Ignored at granularity query. */
} kv_obswin_t;

/* The schema entries of the score; WDEF is the default window as a string. */
#define KV_OBSWIN_PARAMS(WDEF)                                                                                         \
    {"window",                                                                                                         \
     KV_PARAM_INT,                                                                                                     \
     WDEF,                                                                                                             \
     1,                                                                                                                \
     1 << 20,                                                                                                          \
     NULL,                                                                                                             \
     "observation window: the last W context queries score the keys; the last W tokens are kept, inside "              \
     "the budget"},                                                                                                    \
        {"kernel", KV_PARAM_INT, "7", 1, 255, NULL, "pooling kernel along keys (odd; stride 1, padding k/2)"},         \
        {"pool",                                                                                                       \
         KV_PARAM_ENUM,                                                                                                \
         "max",                                                                                                        \
         0,                                                                                                            \
         -1,                                                                                                           \
         "max|avg|none",                                                                                               \
         "pooling of the scores along keys (avg divides edges by k: PyTorch count_include_pad)"},                      \
        {"qagg", KV_PARAM_ENUM, "sum", 0, -1, "sum|mean", "combination over the window queries"},                      \
    {                                                                                                                  \
        "gqa", KV_PARAM_ENUM, "after_pool", 0, -1, "after_pool|before_pool",                                           \
            "gran=kv: combine the group (agg) after pooling (kvpress) or before (KVCache-Factory HEAD, AdaKV)"         \
    }

/* Read the score parameters of a resolved set (kernel must be odd). `owner` names the policy. */
int kv_obswin_read(const kv_params_t *params, kv_obswin_t *o, const char *owner);

/* Score one layer (call from prepare): p->qscores (H, n_ctx) get the pooled window score of the
 * pre-window tokens (0 on the window), p->protect_last = min(window, n_ctx), p->scored = 1. With
 * gran=kv and gqa_before the G heads of a group receive the same (group-reduced, pooled) score. */
int kv_obswin_score(kv_policy_t *p, kv_layer_ctx_t *c, const kv_obswin_t *o);

/* 1-D pooling along keys, stride 1, padding k/2 (k odd): out[j] over in[j-k/2 .. j+k/2] within
 * [0, m); avg divides by k whatever the number of real entries (count_include_pad), max ignores the
 * padding, none copies. in != out. */
void kv_pool1d(const float *in, int m, int k, kv_pool_t pool, float *out);

/* ---- PyramidKV layer schedule (KVCache-Factory PyramidKVCluster, docs/POLICIES.md §2.4) ---- */
enum {
    KV_PYRAMID_NONE = 0,    /* n_ctx < B: no compression, caps = n_ctx - w (everything) */
    KV_PYRAMID_UNIFORM = 1, /* B <= n_ctx < 2 (B - w): uniform SnapKV, caps = B - w */
    KV_PYRAMID_PYRAMID = 2, /* n_ctx >= 2 (B - w): caps[l] = max_num - l * steps */
};
/* Past tokens kept per layer, window excluded (the window w is kept on top): caps (n_layers).
 * Integer arithmetic exactly as the reference: base = B - w, min = base / beta,
 * max = 2 base - min, clamped to n_ctx - w (then min = 2 base - max), steps = (max - min) / (L - 1).
 * Returns the regime (KV_PYRAMID_*) or KV_EINVAL for a bad argument. Cases the reference leaves
 * undefined: B <= w gives caps 0 (the policy keeps the last B tokens), L = 1 gives uniform base
 * (the reference divides by zero). */
int kv_pyramid_caps(int n_layers, int B, int w, int beta, int n_ctx, int *caps);

/* Context tokens a storage head of pyramidkv policy `p` keeps at `layer` for budget b, window
 * included (n_ctx when nothing is compressed, B when B <= window; schedule=kvpress: kvpress's
 * per-layer count). p must be a pyramidkv policy. */
int kv_pyramid_layer_tokens(const kv_policy_t *p, int layer, int n_layers, int n_ctx, const kv_budget_t *b);

extern const kv_policy_desc_t kv_policy_pyramidkv;

/* ---- composition ---- */
/* Create outer's inner policy from the string parameter `key` (e.g. "snapkv(window=8)"): the
 * outer's gran and agg are passed on (an inner spec giving another value is an error), the inner
 * must be a one-shot scorer (allow_pyramid: pyramidkv's own allocation is accepted too), and the
 * outer's parameter and label are rewritten with the inner's canonical label so they round-trip.
 * Sets outer->inner. */
int kv_policy_inner_create(kv_policy_t *outer, const char *key, int allow_pyramid);

#ifdef __cplusplus
}
#endif
#endif
