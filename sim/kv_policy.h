/*
 * kv_policy.h: eviction policies as descriptors (one file per policy in sim/policies/, one line per
 * policy in sim/policy_registry.c) and the per-layer context the replay engine gives them.
 *
 * The engine (sim/replay.c) reads one layer of a trace at a time and, for every configured policy,
 * calls `prepare` once (scores for all budgets; statistics several policies share come from
 * sim/layer_stats.h: kv_ctx_colstats, kv_ctx_window_probs), then for every budget builds the cache that an
 * evaluation query would really see and measures it (sim/metrics.c). Most policies are *scorers*
 * (the kvpress split): `prepare` writes one score per (query head, context token) and marks the
 * tokens they protect; the shared selection code (sim/select.c) aggregates scores over a KV group
 * when the cache is stored per KV head, sorts once with a fixed tie-break and keeps a prefix of that
 * order for each budget (so larger budgets keep supersets). Policies with their own allocation
 * (PyramidKV, Ada-KV, ChunkKV, ShotKV, KV-Compress) override `select`; decode-time policies (H2O
 * streaming, TOVA, StreamingLLM's rolling cache, Quest, the oracle) implement `admit`/`observe`.
 *
 * Token ranges of a layer (n = prompt length, T = tokens in the trace):
 *   context   [0, n_ctx)   tokens subject to compression (n_ctx = n, or n - held-out tail)
 *   appended  [n_ctx, T)   tokens that arrive after compression; their queries are the evaluation
 *                          queries (the trace's decode steps, plus an optional held-out prompt tail)
 * Budget semantics (kv_budget_t.tokens = B, per storage head, window included, as in SnapKV and
 * KVCache-Factory):
 *   one-shot policies (KV_POL_ONESHOT) keep at most B context tokens; appended tokens are added to
 *     the cache and never evicted (as SnapKV/PyramidKV/Ada-KV do during decoding);
 *   per-query policies (KV_POL_PER_QUERY: oracle) choose, for each evaluation query, at most B
 *     context tokens; appended tokens are kept;
 *   decode-time policies (KV_POL_DECODE) manage the whole cache: the cache a query reads (its own
 *     token included) never holds more than B tokens (they evict before appending, as
 *     StreamingLLM's evict_for_space does).
 */
#ifndef KV_POLICY_H
#define KV_POLICY_H

#include "kernels/kv_backend.h"
#include "sim/common/kv_params.h"
#include "sim/layer_stats.h"
#include "traces/kv_trace.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- budgets ---- */
typedef enum {
    KV_BUDGET_TOKENS,   /* "128": tokens per storage head, window included */
    KV_BUDGET_FRACTION, /* "0.25" or "25%": fraction of the context (kvpress: 1 - compression ratio) */
    KV_BUDGET_SEQUENCE, /* "seq:65536": tokens for the whole sequence (all layers and KV heads) */
    KV_BUDGET_RATIO,    /* "cr:0.25": kvpress's compression ratio, B = max(1, int(n * (1 - cr))) computed in
                           double as Python does (one token fewer than the fraction 1 - cr gives when the
                           product is whole in exact arithmetic but not in floating point: cr:0.8 on 20
                           tokens keeps 3, the fraction 0.2 keeps 4) */
} kv_budget_kind_t;

typedef struct {
    kv_budget_kind_t kind;
    double value;  /* as given */
    char text[32]; /* as given, canonical ("128", "0.25", "seq:65536") */
    int tokens;    /* resolved per-head budget B for the trace being replayed */
    long total;    /* resolved per-sequence budget: the given total, or tokens * n_layers * n_kv_heads */
} kv_budget_t;

/* Parse a comma list of budgets; *out allocated (kv_free). Errors name the bad item. */
int kv_budget_parse_list(const char *list, kv_budget_t **out, int *n);
/* Resolve B and total for a trace with `n_ctx` context tokens. */
int kv_budget_resolve(kv_budget_t *b, const kv_trace_meta_t *m, int n_ctx);
/* The unrounded per-head budget a reference's float schedule starts from (kvpress's PyramidKVPress
 * and ChunkKVPress): n_ctx * (1 - cr) for "cr:", n_ctx * f for a fraction, B otherwise. */
double kv_budget_exact(const kv_budget_t *b, int n_ctx);
/* The kept fraction a reference's ratio rule multiplies by (kvpress's 1 - compression_ratio): 1 - cr
 * for "cr:", f for a fraction, B / n_ctx otherwise. */
double kv_budget_fraction(const kv_budget_t *b, int n_ctx);

/* ---- the layer context ---- */
typedef struct kv_layer_ctx kv_layer_ctx_t;
struct kv_layer_ctx {
    const kv_trace_meta_t *meta;
    int layer, n_layers;
    int H, Hkv, G, d; /* query heads, KV heads, group size, head_dim */
    int T, n_ctx, n_eval;
    const float *q;      /* post-RoPE queries of tokens [q0, T): query i of head h at q + h*q_hs + (i-q0)*d
                            (use kv_ctx_query); q0 = 0 and q_hs = T*d unless the trace is lean */
    int q0;              /* first token whose query is held (0, or a lean trace's first stored query) */
    size_t q_hs;         /* floats between heads of q */
    const float *k;      /* (Hkv, T, d) post-RoPE keys */
    const float *v;      /* (Hkv, T, d) values */
    const float *wo;     /* (model_dim, H*d) or NULL */
    const float *p_eval; /* (H, n_eval, T): softmax of evaluation query n_ctx+e over keys [0, n_ctx+e] */
    kv_backend_t *be;
    uint64_t seed;           /* replay seed (for random policies: derive per layer/head) */
    kv_layer_stats_t *stats; /* the shared statistics of the layer (sim/layer_stats.h); NULL in a kv_ctx_sub context */
    void *host;              /* a kv_ctx_sub context's own statistics (stats NULL), private to sim/ctx_sub.c */
};

/* Query i (a token index) of query head h, (d) floats; NULL when the trace does not hold it (a lean
 * trace keeps only the last prompt queries and the decode queries: i < q0). Evaluation queries
 * (i >= n_ctx) are always held. */
static inline const float *kv_ctx_query(const kv_layer_ctx_t *c, int h, int i)
{
    return i < c->q0 ? NULL : c->q + (size_t)h * c->q_hs + (size_t)(i - c->q0) * c->d;
}

/* Shared statistics (accumulated attention, observation windows): sim/layer_stats.h, included
 * above; policies call kv_ctx_colstats and kv_ctx_window_probs from `prepare`. */

/* A layer context over some of the tokens of one storage head, for policies that re-score their
 * cache while decoding (sim/ctx_sub.c): query heads [h0, h0 + nh) of c (a KV group, or one query
 * head) and their KV head, tokens tok[0..n) (ascending positions of c), all of them context
 * (n_ctx = n, no evaluation queries, no W_O); positions and token ids follow the tokens. The shared
 * statistics above work on it too, computed on the host (plain loops, O(n^2 d) for colstats).
 * Free with kv_ctx_sub_free. */
int kv_ctx_sub(const kv_layer_ctx_t *c, int h0, int nh, const int *tok, int n, kv_layer_ctx_t *out);
void kv_ctx_sub_free(kv_layer_ctx_t *sub);

/* ---- caches ---- */
typedef struct {
    int n_store;   /* storage heads: Hkv (granularity kv) or H (granularity query) */
    int T;         /* mask length */
    uint8_t *mask; /* (n_store, T): 1 = token in the cache */
} kv_keep_t;

/* ---- policies ---- */
enum {
    KV_POL_ONESHOT = 1u << 0,   /* compresses the context once, appended tokens always kept */
    KV_POL_PER_QUERY = 1u << 1, /* context selection per evaluation query (admit), appended kept */
    KV_POL_DECODE = 1u << 2,    /* evolving cache: admit/observe every step */
    KV_POL_NESTED = 1u << 3,    /* a larger budget keeps a superset (contract-tested) */
    KV_POL_NEEDS_SEGMENTS = 1u << 4,
    KV_POL_CROSS_LAYER = 1u << 5, /* needs a pre-pass over all layers (prescore/allocate) */
    KV_POL_NO_EVICT = 1u << 6,    /* memory is the full cache (Quest, full) */
    KV_POL_RANDOM = 1u << 7,      /* uses the RNG (deterministic given the seed) */
    /* Budget scope (default: every storage head keeps at most B context tokens): */
    KV_POL_BUDGET_LAYER = 1u << 8,    /* head-adaptive: a layer's storage heads share n_store * B */
    KV_POL_BUDGET_SEQUENCE = 1u << 9, /* cross-layer: the sequence shares the total budget */
    KV_POL_OVER_BUDGET = 1u << 10,    /* documented overshoot of the reference (PyramidKV's floored
                                         steps: (L/2)((max-min) mod (L-1)) extra past tokens per head,
                                         +4.3 % of L*B at L=32, B=128, +11.7 % at B=64); reported */
    KV_POL_BUDGET_FREE = 1u << 11,    /* evicts by a rule besides the budget (a threshold), so even a
                                         budget above the sequence length may lose tokens */
    KV_POL_ORACLE = 1u << 12,         /* reads the future (the evaluation queries): a ceiling that no
                                         real cache reaches, left out of "best policy" summaries */
    KV_POL_NEEDS_WO = 1u << 13,       /* needs the output projection W_O (a --with-wo trace) */
    KV_POL_SCORER = 1u << 14,         /* a one-shot token scorer: prepare fills qscores and the kept set
                                         is (mostly) a prefix of the order, so a wrapper (adakv, chunkkv,
                                         criticalkv, decoding) can allocate over its order instead */
};

typedef enum { KV_GRAN_KV = 0, KV_GRAN_QUERY = 1 } kv_gran_t;
typedef enum { KV_AGG_MEAN = 0, KV_AGG_MAX = 1, KV_AGG_SUM = 2 } kv_agg_t;

typedef struct kv_policy kv_policy_t;
typedef struct kv_policy_desc kv_policy_desc_t;

/* A named parameter set that reproduces a reference implementation: "snapkv@kvpress" is snapkv with
 * the preset's parameters, and parameters given after it override them ("snapkv@kvpress(window=32)").
 * The canonical label of the result prints every parameter (no "@"). */
typedef struct {
    const char *name;   /* the word after '@' */
    const char *params; /* "k=v,..." of the policy (values may be nested specs, presets included) */
    const char *what;   /* the reference and version it reproduces, one line */
} kv_preset_t;

struct kv_policy {
    const kv_policy_desc_t *desc;
    kv_params_t params; /* resolved, includes the common gran/agg keys */
    char label[512];    /* canonical label, accepted back by kv_policy_create */
    unsigned flags;     /* desc->flags, possibly adjusted by init (e.g. mode=decode) */
    kv_gran_t gran;
    kv_agg_t agg;
    void *state; /* policy private, created by init */
    /* Set by `prepare` of scorer policies, per layer (the engine clears `scored` and the protect_*
     * counts before calling prepare, and builds `order` when prepare set scored = 1): */
    int scored;
    float *qscores;    /* (H, n_ctx) higher = keep; allocated by the engine before prepare */
    int protect_first; /* sinks: context tokens [0, protect_first) always kept (inside the budget) */
    int protect_last;  /* window: context tokens [n_ctx - protect_last, n_ctx) always kept */
    /* Built from qscores by the shared selection code (kv_policy_order), per layer: */
    int n_store;
    float *sscores;     /* (n_store, n_ctx) storage-head scores, protected tokens at +inf */
    int *order;         /* (n_store, n_ctx) context tokens by decreasing score, ties: later token first */
    size_t order_cap;   /* entries allocated in sscores and order */
    kv_policy_t *inner; /* composed scorer (adakv(inner=...), chunkkv, ...), owned */
    int tie_torch;      /* set by init: the shared selection keeps the set torch.topk keeps on the CPU
                           (kv_topk_mask_torch over sscores) instead of a prefix of `order`, so ties
                           resolve as in kvpress; not nested (init clears KV_POL_NESTED) */
};

struct kv_policy_desc {
    const char *name;
    const char *doc;   /* one line: what it does and the paper */
    const char *paper; /* arXiv id or URL */
    const char *code;  /* the reference implementation (repository and file), "-" for none */
    const kv_param_def_t *params;
    int n_params; /* KV_ARRAY_LEN(params) */
    const kv_preset_t *presets;
    int n_presets; /* KV_ARRAY_LEN(presets) */
    unsigned flags;
    /* Parameter sets besides the defaults that the contract suite must also check, separated by
     * ';' (e.g. "mode=decode;pool=avg,agg=max"); NULL for none. */
    const char *variants;
    /* After parameters are resolved: validate combinations, read them into p->state, adjust flags. */
    int (*init)(kv_policy_t *p);
    void (*fini)(kv_policy_t *p);
    /* Once per layer, before any budget: fill p->qscores / protect_* (scorers) or private state.
     * NULL for policies that need nothing. */
    int (*prepare)(kv_policy_t *p, kv_layer_ctx_t *c);
    /* One-shot selection for one budget: set keep->mask over [0, n_ctx). NULL = the shared prefix
     * selection over p->order. May run concurrently for several budgets: read-only on p; per-budget
     * state persists across layers in *cstate (freed by cstate_free). */
    int (*select)(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep);
    /* Per-query and decode-time policies, for evaluation query i = n_ctx .. T-1 in order: set
     * cache->mask to what query i reads (DECODE: over [0, i], token i included, at most B entries;
     * PER_QUERY: over [0, n_ctx)). For DECODE policies `select` (or the prefix default) runs
     * first and gives the cache at the end of prefill. */
    int (*admit)(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i, kv_keep_t *cache);
    /* After query i was evaluated: attn (H, T) holds its attention renormalised over the cache of
     * each query head (0 outside). For accumulators (H2O, TOVA, threshold). NULL if unused. */
    int (*observe)(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                   const kv_keep_t *cache, const float *attn);
    void (*cstate_free)(void *cstate);
    /* Policy metadata bytes for one layer at this budget (Quest's page min/max, Ada-KV head lengths). */
    size_t (*meta_bytes)(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, const kv_keep_t *keep);
    /* Cross-layer policies: prescore every layer (a pre-pass), then allocate per (layer, storage
     * head) token counts for every budget before the main pass. */
    int (*prescore)(kv_policy_t *p, kv_layer_ctx_t *c);
    int (*allocate)(kv_policy_t *p, const kv_trace_meta_t *m, int n_ctx, const kv_budget_t *budgets, int n_budgets);
    /* Context tokens at the end of the prompt that p always keeps (see kv_policy_kept_window); NULL: 0. */
    int (*kept_window)(const kv_policy_t *p);
    /* Tokens per storage head by which p's cache may exceed a budget of B tokens on a context of
     * n_ctx, by the reference's own schedule (a decode-time re-compression lets the cache grow by its
     * interval between compressions; SimLayerKV keeps every token of its non-lazy layers). NULL: 0. */
    int (*budget_slack)(const kv_policy_t *p, int n_ctx, int B);
};

/* The "tie" parameter of scorers that offer kvpress's tie order (schema entry), and reading it into
 * p->tie_torch (clearing KV_POL_NESTED when set). */
#define KV_PARAM_TIE                                                                                                   \
    {                                                                                                                  \
        "tie", KV_PARAM_ENUM, "later", 0, -1, "later|torch",                                                           \
            "equal scores: the later token first (nested), or the set torch.topk keeps on the CPU (kvpress)"           \
    }
void kv_policy_read_tie(kv_policy_t *p);

/* Registry (sim/policy_registry.c). */
int kv_policy_count(void);
const kv_policy_desc_t *kv_policy_desc_at(int i);
const kv_policy_desc_t *kv_policy_find(const char *name);
/* Comma list of every registered name (for messages). */
const char *kv_policy_names(void);

/* Parameters every policy accepts, appended to its own schema. */
extern const kv_param_def_t kv_policy_common_params[];
extern const int kv_policy_n_common_params;

/* Create a configured policy from "name(k=v,...)" or "name@preset(k=v,...)"; unknown names and
 * presets list the valid ones. */
int kv_policy_create(const char *spec, kv_policy_t **out);
/* Parse a spec with its preset expanded: the policy's descriptor and the raw parameters (the
 * preset's, overridden by the ones given); *given (optional) gets the ones given explicitly. */
int kv_policy_spec_expand(const char *spec, const kv_policy_desc_t **desc, kv_params_t *raw, kv_params_t *given);
void kv_policy_free(kv_policy_t *p);
/* Context tokens at the end of the prompt that p always keeps, from its parameters (0: none): the
 * observation window of the SnapKV family and of one-shot H2O, KV-Compress's protected tokens, and
 * for wrappers (Ada-KV, ChunkKV, ...) their inner scorer's; desc->kept_window says. At a budget B
 * no larger than this, p keeps the last B context tokens and its scores select nothing. */
int kv_policy_kept_window(const kv_policy_t *p);
/* desc->budget_slack, or 0. */
int kv_policy_budget_slack(const kv_policy_t *p, int n_ctx, int B);
/* Expand a policy list ("all" = every registered policy with defaults). *out: kv_free'd array of
 * created policies (free each with kv_policy_free). */
int kv_policy_create_list(const char *list, kv_policy_t ***out, int *n);

/* Run a policy's per-layer preparation: (re)allocate qscores, clear scored/protect_*, call
 * desc->prepare and build the selection order when the policy scored. The engine calls it for every
 * policy; composite policies call it on their inner policy. */
int kv_policy_prepare(kv_policy_t *p, kv_layer_ctx_t *c);

/* Storage head a query head reads. */
static inline int kv_policy_store_of(const kv_policy_t *p, int h, int G)
{
    return p->gran == KV_GRAN_KV ? h / G : h;
}

/* Shared selection (sim/select.c). */
/* From p->qscores and protect_*: aggregate to storage heads (p->agg over each group for
 * granularity kv), put protected tokens at +inf, argsort. Called by the engine after prepare when
 * qscores were set. */
int kv_policy_order(kv_policy_t *p, const kv_layer_ctx_t *c);
/* Keep the first m tokens of storage head s's order (m clamped to [0, n_ctx]). */
void kv_keep_prefix(const kv_policy_t *p, const kv_layer_ctx_t *c, int s, int m, kv_keep_t *keep);
/* Default one-shot selection: prefix of length B for every storage head (p->tie_torch: torch.topk's
 * set of B). */
int kv_select_uniform(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep);
/* Sort idx[0..n) by key descending, ties by larger index first (the project-wide tie-break; NaN
 * last). Radix sort on 64-bit (score, index) keys: O(n). */
void kv_argsort_desc(const float *key, int n, int *idx);
/* mask[0..n) = 1 for the k entries that kv_argsort_desc would put first (same tie-break), O(n). */
void kv_topk_mask(const float *key, int n, int k, uint8_t *mask);
/* mask[0..n) = 1 for the k entries torch.topk(key, k) returns on the CPU, ties resolved exactly as
 * its std::nth_element / std::partial_sort leave them (sim/topk_torch.c). Not nested in k. */
void kv_topk_mask_torch(const float *key, int n, int k, uint8_t *mask);

#ifdef __cplusplus
}
#endif
#endif
