/*
 * accum_internal.h: helpers shared by the accumulated-attention and decode-time policies
 * (h2o, tova, threshold, shotkv; sim/policies/accum_util.c). Private to sim/policies/.
 *
 * Decode-time policies keep, per (policy, budget), a per-query-head accumulator over every token of
 * the layer (accumulated attention for H2O, last-query attention for TOVA, maximum attention for the
 * threshold rule) and evict from the cache of each storage head the tokens whose group score is
 * lowest. The ranking rule is the project's (sim/select.c): higher score kept, ties keep the later
 * token.
 */
#ifndef KV_ACCUM_INTERNAL_H
#define KV_ACCUM_INTERNAL_H

#include "sim/kv_policy.h"

#include <stdint.h>

typedef struct {
    int H, T;
    float *acc; /* (H, T) per-query-head statistic, policy-defined */
    float *vec; /* (T) per-token statistic shared by every head (TOVA, ShotKV) */
    float *key; /* (T) scratch: scores of candidates */
    int *pos;   /* (T) scratch: candidate positions, ascending */
    int *idx;   /* (T) scratch: ranking */
} kv_acc_state_t;

/* The state in *cstate, allocated (zeroed) on first use for (H, T). */
int kv_acc_state_get(void **cstate, int H, int T, kv_acc_state_t **out);
/* desc->cstate_free of the policies using kv_acc_state_t. */
void kv_acc_state_free(void *cstate);

/* Positions j < upto with mk[j] set, ascending, into pos; returns their number. */
int kv_acc_cached(const uint8_t *mk, int upto, int *pos);

/* Among the n candidates pos[0..n) (ascending positions) with scores key[0..n), keep the m highest
 * (ties: the later token) and clear mk for the others. Uses st->idx. */
void kv_acc_keep_best(kv_acc_state_t *st, const int *pos, const float *key, int n, int m, uint8_t *mk);

/* Score of token j for storage head s from per-query-head values v (H rows of `stride`): the value
 * of query head s (granularity query) or p->agg over the G heads of KV group s. */
/* Metadata of accumulators: one fp32 score per cached token and query head. */
size_t kv_acc_score_bytes(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_keep_t *keep);

float kv_acc_group(const kv_policy_t *p, const float *v, size_t stride, int G, int s, int j);

#endif
