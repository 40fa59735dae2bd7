/*
 * keydiff.c: KeyDiff (Park et al., "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context
 * LLM Inference in Resource-Constrained Environments", arXiv:2504.15364), as kvpress 0.5.5 runs it
 * (kvpress/presses/keydiff_press.py, KeyDiffPress): keep the keys LEAST similar to the layer's
 * average key direction. Per KV head, over the context keys k_j (post-RoPE, as kvpress's cache holds
 * them):
 *     anchor = mean_j k_j / ||k_j||,     score_j = -cos(k_j, anchor)
 * (F.normalize and F.cosine_similarity; a zero key scores 0). No attention is needed, nothing is
 * protected; the heads of a group share the score.
 * tie=torch keeps the set torch.topk keeps (kvpress); the default keeps the later token on ties.
 * Preset: keydiff@kvpress.
 * Deviation: the paper evicts block by block while the prompt streams in (kvpress reproduces that
 * with BlockPress(KeyDiffPress(), block_size)); this is the one-shot KeyDiffPress over the whole
 * context. Scores are computed in double and rounded to float once.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <math.h>
#include <string.h>

static const kv_param_def_t params[] = {KV_PARAM_TIE};

static const kv_preset_t presets[] = {
    {"kvpress", "tie=torch,gran=kv,agg=mean", "NVIDIA kvpress 0.5.5 KeyDiffPress"},
};

static int keydiff_init(kv_policy_t *p)
{
    kv_policy_read_tie(p);
    return KV_OK;
}

static int keydiff_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    const int n = c->n_ctx, d = c->d;
    double *anchor = kv_calloc((size_t)d, sizeof(double), "keydiff anchor");
    float *sc = kv_malloc(sizeof(float) * (size_t)(n ? n : 1), "keydiff scores");
    if (!anchor || !sc) {
        kv_free(anchor), kv_free(sc);
        return KV_ENOMEM;
    }
    for (int g = 0; g < c->Hkv; g++) {
        const float *K = c->k + (size_t)g * c->T * d; /* (T, d) */
        memset(anchor, 0, sizeof(double) * (size_t)d);
        for (int j = 0; j < n; j++) {
            double nn = 0;
            for (int x = 0; x < d; x++)
                nn += (double)K[(size_t)j * d + x] * K[(size_t)j * d + x];
            nn = fmax(sqrt(nn), 1e-12); /* F.normalize's eps */
            for (int x = 0; x < d; x++)
                anchor[x] += K[(size_t)j * d + x] / nn;
        }
        double an = 0;
        for (int x = 0; x < d; x++) {
            anchor[x] /= n;
            an += anchor[x] * anchor[x];
        }
        an = sqrt(an);
        for (int j = 0; j < n; j++) {
            double dot = 0, kn = 0;
            for (int x = 0; x < d; x++) {
                dot += K[(size_t)j * d + x] * anchor[x];
                kn += (double)K[(size_t)j * d + x] * K[(size_t)j * d + x];
            }
            const double den = fmax(sqrt(kn), 1e-8) * fmax(an, 1e-8); /* F.cosine_similarity's eps */
            sc[j] = (float)(-dot / den);
        }
        for (int h = g * c->G; h < (g + 1) * c->G; h++)
            memcpy(p->qscores + (size_t)h * n, sc, sizeof(float) * (size_t)n);
    }
    kv_free(anchor), kv_free(sc);
    p->scored = 1;
    return KV_OK;
}

const kv_policy_desc_t kv_policy_keydiff = {
    .name = "keydiff",
    .doc = "keep the keys least similar (cosine) to the mean key direction of their head (Park et al. 2025)",
    .paper = "arXiv:2504.15364",
    .code = "NVIDIA/kvpress kvpress/presses/keydiff_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER,
    .variants = "tie=torch",
    .init = keydiff_init,
    .prepare = keydiff_prepare,
};
