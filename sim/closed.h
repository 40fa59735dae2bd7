/*
 * closed.h: closed-loop evaluation of eviction policies: the model decodes with the compressed cache,
 * and what it then produces is compared with the full cache's output (kvsim eval, kvsim niah).
 *
 * Replay (sim/replay.h) is open-loop: every policy is judged on the queries of the full-cache run.
 * Here the forward pass itself runs on the compressed cache, so the queries, keys and values after
 * the compression are the ones the compressed model computes. The same policy code runs, fed the
 * live Q, K and V of the prompt:
 *
 *   1. the prompt is prefilled once (kv_closed_create), with the backend's ordinary attention; a
 *      forward-pass hook keeps every layer's post-RoPE Q, K and V (head-major, as a trace holds
 *      them), from which one layer context per layer is built (sim/kv_policy.h: context = the
 *      prompt, n_ctx = n; the evaluation queries, rows [n, T), are filled in as decoding computes
 *      them, never before: no policy reads the future). The prefill's own last logits (the first
 *      continuation token) come from the full cache in every configuration, as in kvpress, whose
 *      presses compress while the prefill runs;
 *   2. a policy selects once for every budget (kv_closed_select): one-shot policies prepare each
 *      layer on the prompt and keep a context set per (layer, storage head), cross-layer ones
 *      (KV-Compress, CAKE) prescore every layer first, as replay does; decode-time policies (H2O
 *      and StreamingLLM with mode=decode, TOVA, Quest, ShotKV, decoding, threshold) and per-query
 *      ones (the oracle) get one policy instance per layer, select at the end of prefill and then
 *      admit/observe at every decode step of every layer, with the attention the compressed model
 *      really computed; their preparation is re-run before each step (with the statistics of the
 *      prompt cached per layer) so that Quest's page order sees the current query;
 *   3. every configuration builds a real compressed cache from the prefilled K and V: per (layer,
 *      storage head) only the kept tokens, gathered into a ragged cache with their positions
 *      (kernels/kv_backend.h, attn_ragged; memory: the largest kept set plus the continuation), and
 *      the forward pass runs on it (kv_fwd_set_attention replaces the attention op): one-shot
 *      policies append each new token to every storage head; decode-time ones rebuild the layer's
 *      cache from the mask admit returns before each step;
 *   4. the reference continuation R (N tokens: the full cache's greedy output, or a given text) is
 *      teacher-forced through every configuration, and compared with the full cache's distributions
 *      on the same tokens: per step KL(full || compressed) of the next-token distribution, top-1
 *      agreement, the first step whose top-1 differs (with the default reference: exactly where
 *      greedy decoding with the compressed cache leaves the full cache's output), and the NLL of R.
 *
 * Bit-identical full budget: the full cache of the reference is itself a ragged cache holding every
 * token in order (the identity gather) run through the same op in the same way, so a configuration
 * that keeps everything computes the same floats and gives KL 0 and agreement 1 exactly. One-shot
 * configurations feed R as one block (batched, like a prefill), decode-time ones one token at a
 * time; each is compared with the full cache run the same way (the two references differ by float
 * rounding only; kvsim generate's path differs from both by the attention op's rounding).
 *
 * Cost: one prefill per prompt (shared by every configuration), one selection per policy (shared
 * by its budgets), then per configuration a forward pass over the N continuation tokens.
 */
#ifndef KV_CLOSED_H
#define KV_CLOSED_H

#include "sim/kv_policy.h"
#include "traces/capture/kv_forward.h"
#include "traces/kv_trace.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_closed kv_closed_t;         /* one prompt, prefilled once */
typedef struct kv_closed_cfg kv_closed_cfg_t; /* one (policy, budget) on it */

#define KV_CLOSED_MAX_STOP 4

typedef struct {
    int steps;                        /* N: reference tokens when ref is NULL (default 32) */
    const int32_t *ref;               /* the reference continuation (NULL: the full cache's greedy output) */
    int n_ref;                        /* its tokens (N) */
    int32_t stop[KV_CLOSED_MAX_STOP]; /* a greedy reference ends after one of these tokens (kvsim niah: the
                                         tokenizer's end-of-turn and EOS); none for kvsim eval */
    int n_stop;
    const int32_t *segments; /* segment starts of the prompt (ShotKV), or NULL */
    int n_segments;
    uint64_t seed;    /* seed of randomised policies */
    int quiet;        /* no progress on stderr */
    int greedy_steps; /* 1: kv_closed_greedy decodes token by token also for one-shot configurations
                         (tests compare it with the block verification) */
} kv_closed_opts_t;

void kv_closed_opts_init(kv_closed_opts_t *o);

/* Prefill `prompt` (n tokens) on f and make the full cache's reference. f must hold n + N tokens
 * (kv_fwd_max_tokens) and batch at least max(n, N) tokens at once (else blocks are split, which is
 * correct, only slower); it is used for every later call and must outlive e. */
int kv_closed_create(kv_fwd_t *f, const int32_t *prompt, int n, const kv_closed_opts_t *o, kv_closed_t **out);
void kv_closed_free(kv_closed_t *e); /* accepts NULL */
/* Context (prompt) tokens; the reference continuation (its N tokens); the layer contexts' meta
 * (shapes, tokens: prompt then reference, positions, segments). */
int kv_closed_n_ctx(const kv_closed_t *e);
const int32_t *kv_closed_ref(const kv_closed_t *e, int *n);
const kv_trace_meta_t *kv_closed_meta(const kv_closed_t *e);
/* The prefill's next-token logits (vocab_size floats): step 0 of every configuration. */
const float *kv_closed_logits0(const kv_closed_t *e);

/* One configuration per budget (cfgs: n_budgets pointers), budgets resolved on the prompt as replay
 * resolves them. p is prepared here (and must outlive the configurations); a policy that needs
 * segments the prompt does not have is refused by name. */
int kv_closed_select(kv_closed_t *e, kv_policy_t *p, const kv_budget_t *budgets, int n_budgets, kv_closed_cfg_t **cfgs);
void kv_closed_cfg_free(kv_closed_cfg_t *c); /* accepts NULL */
const kv_budget_t *kv_closed_cfg_budget(const kv_closed_cfg_t *c);

typedef struct {
    int n_steps;     /* N: steps 1..N compared */
    int n_store;     /* storage heads per layer */
    double kept;     /* context tokens in the cache a query read, mean over layers, storage heads, steps */
    double cache;    /* entries a query read (context + continuation), same mean */
    double mem;      /* K and V bytes (float32) of the cache at its largest, over layers and storage heads */
    double *kl;      /* (N) KL(full || compressed) in nats of the distribution after step t = 1..N (index t-1) */
    uint8_t *agree;  /* (N) 1 when the top-1 tokens agree */
    double *nll;     /* (N) -log p(R[t]) of the compressed configuration, t = 0..N-1 (t = 0: the prefill) */
    double *nll_ref; /* (N) the same under the full cache */
    int first_div;   /* the first step whose top-1 differs (1..N), 0 when none does */
    long nonfinite;  /* NaN or infinite logits of the configuration (the metrics are then NaN) */
} kv_closed_result_t;

/* Teacher-force the reference through configuration c and compare it with the full cache. */
int kv_closed_measure(kv_closed_t *e, kv_closed_cfg_t *c, kv_closed_result_t *r);
void kv_closed_result_free(kv_closed_result_t *r);

/* Greedy continuation with configuration c, at most max_tokens tokens (stopping after a stop token
 * of the options) into out; *n_out gets the count. out[0] is the prefill's token (the same in every
 * configuration). One-shot configurations verify the reference in one block and decode token by
 * token from the first disagreement on (what greedy decoding gives, computed in fewer passes). */
int kv_closed_greedy(kv_closed_t *e, kv_closed_cfg_t *c, int max_tokens, int32_t *out, int *n_out);

/* ---- the commands (sim/closed_run.c, sim/niah.c) */
struct kv_otable;

typedef struct {
    const char *model_path, *tokenizer_path; /* tokenizer NULL: the checkpoint's own */
    const char *prompt;                      /* text (NULL with ids) */
    const int32_t *ids;                      /* or token ids, used as given */
    int n_ids;
    int chat;             /* wrap the text in the model's chat template */
    const char *system;   /* with chat: the system message (NULL: the template's default) */
    const char *segments; /* "auto" (documents separated by <|endoftext|> lines), "none" or "i,j,k" */
    kv_policy_t **pols;   /* the policies (not owned) */
    int n_pol;
    const kv_budget_t *budgets;
    int n_budgets;
    int steps;             /* N without a reference text (default 32) */
    const char *reference; /* the reference continuation as text (NULL: the full cache's greedy output) */
    const char *backend;   /* "cpu", "cuda", "auto" */
    int n_threads;
    uint64_t seed;
    int quiet;
    int step_rows;       /* 1 (default): one row per step besides the summary row of each configuration */
    const char *command; /* the command line, for the provenance */
} kv_eval_opts_t;

void kv_eval_opts_init(kv_eval_opts_t *o);
/* kvsim eval: every policy x budget on one prompt; *out (kv_otable_free) gets the rows (columns:
 * kv_eval_columns) with the provenance preamble. */
int kv_eval_run(const kv_eval_opts_t *o, struct kv_otable **out);
const char *const *kv_eval_columns(int *n);

typedef struct {
    const char *model_path, *tokenizer_path; /* tokenizer NULL: the checkpoint's own */
    const char *haystack_path;               /* filler text (NULL: the passkey test's own filler) */
    const int *lengths;                      /* prompt lengths in tokens, the chat template included */
    int n_lengths;
    const double *depths; /* needle depths in [0, 1] (0: before the filler, 1: after it) */
    int n_depths;
    const char *needle;     /* the needle sentence, "{key}" standing for the key */
    const char *question;   /* asked after the haystack with the chat template */
    const char *completion; /* without it: the text the model completes with the key */
    kv_policy_t **pols;     /* not owned */
    int n_pol;
    const kv_budget_t *budgets;
    int n_budgets;
    int max_new; /* answer tokens (default 16) */
    int chat;    /* 1, 0, or -1 (default): when the tokenizer has a chat template */
    uint64_t seed;
    const char *backend;
    int n_threads;
    int quiet;
    const char *command;
} kv_niah_opts_t;

void kv_niah_opts_init(kv_niah_opts_t *o);
/* kvsim niah: one row per (cell, configuration), the full cache's first (budget "none"), then one
 * summary row per configuration (length and depth "all": found = the share of cells retrieved). */
int kv_niah_run(const kv_niah_opts_t *o, struct kv_otable **out);
const char *const *kv_niah_columns(int *n);

/* ---- for tests */
/* The cache c's last run ended with: entries held by (layer, storage head), and its capacity per
 * storage head (the buffer size is n_store x cap entries per layer). */
int kv_closed_cfg_entries(const kv_closed_cfg_t *c, int layer, int store);
int kv_closed_cfg_capacity(const kv_closed_cfg_t *c);
int kv_closed_cfg_n_store(const kv_closed_cfg_t *c);
/* One-shot configurations: the context tokens kept, (n_store, T) bytes of layer l (NULL for
 * decode-time ones). */
const uint8_t *kv_closed_cfg_kept(const kv_closed_cfg_t *c, int layer);
/* The host K or V (which 'k' or 'v') of layer l, (n_kv_heads, T, head_dim): the rows caches are
 * built from (a test may overwrite evicted rows to show they are never read). */
float *kv_closed_layer_kv(kv_closed_t *e, int layer, char which);

#ifdef __cplusplus
}
#endif
#endif
