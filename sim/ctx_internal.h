/*
 * ctx_internal.h: the host statistics of kv_ctx_sub contexts (sim/ctx_sub.c), which the shared
 * statistics' kv_ctx_window_probs and kv_ctx_colstats (sim/layer_stats.c) hand a context without
 * layer statistics to. Private to
 * sim/.
 */
#ifndef KV_CTX_INTERNAL_H
#define KV_CTX_INTERNAL_H

#include "sim/kv_policy.h"

int kv_ctx_host_window_probs(kv_layer_ctx_t *c, int w, const float **probs);
int kv_ctx_host_colstats(kv_layer_ctx_t *c, const float **sum, const float **sumsq, const float **max);

#endif
