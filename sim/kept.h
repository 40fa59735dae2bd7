/*
 * kept.h: the kept sets of a replay (`kvsim replay --kept FILE.h5`): for every policy x budget x
 * layer x storage head, the token indices the cache holds, so a user can apply exactly kvsim's choice
 * inside their own model and a test can compare it with a reference implementation's.
 *
 * Which cache: for one-shot policies the context tokens kept at the end of prefill (appended tokens
 * are never evicted, so that is the whole story); for decode-time and per-query policies the cache
 * the LAST evaluation query reads (token indices up to that query; the per-step history is not
 * stored).
 *
 * File (HDF5, written under a temporary name and renamed; plain gzip + shuffle, so h5py reads it
 * without plugins):
 *   /                attributes format = "kvsim-kept", format_version = 1, n_layers, n_tokens, n_ctx,
 *                    trace, trace_sha256, tool
 *   /p<i>_b<j>       one group per policy i and budget j, attributes policy (the canonical label),
 *                    budget (as given), budget_tokens, granularity ("kv": one set per KV head, "query":
 *                    per query head), n_store, cache ("prefill": context after compression, or
 *                    "last_query": what the last evaluation query reads)
 *     counts         int32 (n_layers, n_store): tokens kept per layer and storage head
 *     indices        int32 (sum of counts): the kept token indices, ascending within each (layer,
 *                    head), the heads of layer 0 first, then layer 1, ...
 * Reading in Python: off = np.concatenate([[0], np.cumsum(counts.ravel())]); the set of layer l,
 * head s is indices[off[l * n_store + s] : off[l * n_store + s + 1]].
 */
#ifndef KV_KEPT_H
#define KV_KEPT_H

#include "sim/kv_policy.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char label[512];
    char budget[32];
    int budget_tokens;
    kv_gran_t gran;
    int n_store;
    int last_query; /* 1: the cache the last evaluation query reads; 0: the context after prefill */
    uint8_t *mask;  /* (n_layers, n_store, n_tokens) 1 = kept; NULL until set */
} kv_kept_entry_t;

typedef struct kv_kept {
    int n_pol, n_budgets, n_layers, n_tokens, n_ctx;
    kv_kept_entry_t *e; /* (n_pol * n_budgets), policy-major */
} kv_kept_t;

int kv_kept_create(int n_pol, int n_budgets, int n_layers, int n_tokens, int n_ctx, kv_kept_t **out);
/* Entry (pi, bi) from policy p at (resolved) budget b: takes ownership of mask (n_layers, n_store,
 * n_tokens), which must come from kv_malloc/kv_calloc. */
int kv_kept_set(kv_kept_t *k, int pi, int bi, const kv_policy_t *p, const kv_budget_t *b, int n_store, uint8_t *mask);
const kv_kept_entry_t *kv_kept_get(const kv_kept_t *k, int pi, int bi);
void kv_kept_free(kv_kept_t *k);

/* Write the file described above (trace and trace_sha256 may be NULL). */
int kv_kept_write(const kv_kept_t *k, const char *path, const char *trace, const char *trace_sha256);
/* Read such a file back (every group p<i>_b<j>). */
int kv_kept_read(const char *path, kv_kept_t **out);

#ifdef __cplusplus
}
#endif
#endif
