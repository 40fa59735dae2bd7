/*
 * knorm.c: key-norm eviction (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV
 * Cache Compression", arXiv:2406.11430; kvpress KnormPress): keep the keys with the smallest L2
 * norm. Score = -||k_j||_2, per KV head (identical for the heads of a group); no sinks or window
 * protected (as kvpress). RoPE is a rotation, so post-RoPE keys give the same norms (up to rounding).
 *
 * Ties. Equal norms are common (the same token repeated at layer 0 has the same key before RoPE, and
 * often the same rounded norm after it). tie=later keeps the later token first (the project rule,
 * nested in the budget); tie=torch keeps exactly the set torch.topk keeps on the CPU
 * (kv_topk_mask_torch: libstdc++'s nth_element / partial_sort on (score, index) pairs in index
 * order, which torch does not document but which is deterministic; not nested). On a GPU
 * torch.topk's order among ties is unspecified and no rule reproduces it.
 * skip=N leaves layers 0 .. N-1 uncompressed (KVCache-Factory's L2NormCluster: skip_layers=[0, 1]);
 * kvpress compresses every layer. Inside a wrapper (adakv, chunkkv, ...) only the scores are used:
 * skip and tie=torch do not apply there.
 * Presets: knorm@kvpress (tie=torch, every layer, per KV head), knorm@kvcache_factory (skip=2, per
 * query head as KCF ffac160 stores the cache).
 * Deviation: KCF's L2NormCluster also leaves a context shorter than B untouched, which the budget
 * rule (B >= n keeps everything) already does, and stores the kept tokens in norm order (harmless).
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <string.h>

static const kv_param_def_t params[] = {
    KV_PARAM_TIE,
    {"skip", KV_PARAM_INT, "0", 0, 1 << 20, NULL, "layers below this keep everything (KVCache-Factory: 2)"},
};

static const kv_preset_t presets[] = {
    {"kvpress", "tie=torch,skip=0,gran=kv,agg=mean", "NVIDIA kvpress 0.5.5 KnormPress (torch.topk on the CPU)"},
    {"kvcache_factory", "tie=later,skip=2,gran=query", "KVCache-Factory L2NormCluster (skip_layers=[0, 1])"},
};

static int knorm_init(kv_policy_t *p)
{
    kv_policy_read_tie(p);
    return KV_OK;
}

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

static int knorm_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    if (c->layer < kv_params_int(&p->params, "skip")) {
        for (int s = 0; s < keep->n_store; s++) {
            memset(keep->mask + (size_t)s * keep->T, 0, (size_t)keep->T);
            memset(keep->mask + (size_t)s * keep->T, 1, (size_t)c->n_ctx);
        }
        return KV_OK;
    }
    return kv_select_uniform(p, c, b, cstate, keep);
}

/* skipped layers keep the whole context */
static int knorm_budget_slack(const kv_policy_t *p, int n_ctx, int B)
{
    return kv_params_int(&p->params, "skip") > 0 && n_ctx > B ? n_ctx - B : 0;
}

const kv_policy_desc_t kv_policy_knorm = {
    .name = "knorm",
    .doc = "keep the smallest-L2-norm keys (Devoto et al. 2024)",
    .paper = "arXiv:2406.11430",
    .code = "NVIDIA/kvpress kvpress/presses/knorm_press.py; KVCache-Factory L2NormCluster",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER,
    .variants = "tie=torch;skip=1",
    .init = knorm_init,
    .prepare = knorm_prepare,
    .select = knorm_select,
    .budget_slack = knorm_budget_slack,
};
