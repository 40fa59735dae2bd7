/*
 * knorm.c: key-norm eviction (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV
 * Cache Compression", arXiv:2406.11430; kvpress KnormPress): keep the keys with the smallest L2
 * norm. Score = -||k_j||_2, per KV head (identical for the heads of a group); no sinks or window
 * protected (as kvpress). RoPE is a rotation, so post-RoPE keys give the same norms.
 * Deviation: KVCache-Factory's L2NormCluster also skips layers 0 and 1; kvpress does not; we follow
 * kvpress.
 */
#include "sim/kv_policy.h"

#include <math.h>

static int knorm_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const int n = c->n_ctx, d = c->d;
    for (int h = 0; h < c->H; h++) {
        const float *K = c->k + (size_t)(h / c->G) * c->T * d;
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int x = 0; x < d; x++)
                s += (double)K[(size_t)j * d + x] * K[(size_t)j * d + x];
            p->qscores[(size_t)h * n + j] = (float)-sqrt(s);
        }
    }
    p->scored = 1;
    return 0;
}

const kv_policy_desc_t kv_policy_knorm = {
    .name = "knorm",
    .doc = "keep the smallest-L2-norm keys (Devoto et al. 2024)",
    .paper = "arXiv:2406.11430",
    .flags = KV_POL_ONESHOT | KV_POL_NESTED,
    .prepare = knorm_prepare,
};
