/*
 * streaming_llm.c: StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention
 * Sinks", arXiv:2309.17453): keep the first `sinks` tokens and the most recent ones.
 *
 * mode=oneshot (kvpress, KVCache-Factory baselines): once after prefill keep sinks + the last
 *   B - sinks context tokens; generated tokens are appended.
 * mode=decode (the original StartRecentKVCache): a rolling cache of B tokens for every query, its
 *   own token included: sinks + the last B - sinks tokens before it (evict_for_space before
 *   appending).
 * Default sinks = 4 (every reference). Positions are the recorded ones: the original re-assigns
 * RoPE positions inside the cache (pos-shift), which a trace of post-RoPE keys cannot reproduce
 * (kvpress and KVCache-Factory do not either).
 * Position-based: identical for every head, so the granularity only changes the memory accounting.
 * Budget below the sinks (undefined in every reference: KVCache-Factory's window B - 4 turns
 * negative, kvpress's topk among equal scores is unspecified): the sinks are the earliest tokens,
 * so mode=oneshot keeps the first B context tokens, and mode=decode the first B - 1 plus the
 * query's own token (a decode query always reads its own key; the rolling cache then holds no
 * recent part at all).
 * Presets: streaming_llm@paper (mode=decode, the original's rolling cache), streaming_llm@kvpress
 * (StreamingLLMPress: oneshot, 4 sinks, per KV head), streaming_llm@kvcache_factory (oneshot, 4 sinks,
 * per query head).
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"

#include <string.h>

static const kv_param_def_t params[] = {
    {"sinks", KV_PARAM_INT, "4", 0, 1 << 20, NULL,
     "initial tokens always kept (attention sinks; a budget below them keeps the first B)"},
    {"mode", KV_PARAM_ENUM, "oneshot", 0, -1, "oneshot|decode", "compress once after prefill, or every step"},
};

static const kv_preset_t presets[] = {
    {"paper", "sinks=4,mode=decode", "mit-han-lab/streaming-llm StartRecentKVCache (without its position shift)"},
    {"kvpress", "sinks=4,mode=oneshot,gran=kv", "NVIDIA kvpress 0.5.5 StreamingLLMPress(n_sink=4)"},
    {"kvcache_factory", "sinks=4,mode=oneshot,gran=query", "KVCache-Factory StreamingLLMKVCluster, per query head"},
};

static int slm_init(kv_policy_t *p)
{
    if (!strcmp(kv_params_str(&p->params, "mode"), "decode"))
        p->flags = (p->flags & ~(KV_POL_ONESHOT | KV_POL_SCORER)) | KV_POL_DECODE;
    return KV_OK;
}

static int slm_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    /* score = position: later tokens first; the sinks are protected (kept first) */
    for (int h = 0; h < c->H; h++)
        for (int j = 0; j < c->n_ctx; j++)
            p->qscores[(size_t)h * c->n_ctx + j] = (float)j;
    p->protect_first = (int)kv_params_int(&p->params, "sinks");
    p->scored = 1;
    return KV_OK;
}

/* One-shot selection (and mode=decode's cache at the end of prefill): the shared prefix of the
 * position order, except that a budget below the sinks keeps the first B tokens (the engine lifts
 * every sink to +inf, and its tie-break, later token first, would keep the LAST B sinks). */
static int slm_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    const int B = b->tokens, sinks = (int)kv_params_int(&p->params, "sinks");
    if (B >= sinks || B >= c->n_ctx)
        return kv_select_uniform(p, c, b, cstate, keep);
    for (int s = 0; s < keep->n_store; s++) {
        uint8_t *mk = keep->mask + (size_t)s * keep->T;
        memset(mk, 0, (size_t)keep->T);
        memset(mk, 1, (size_t)B);
    }
    return KV_OK;
}

static int slm_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                     kv_keep_t *cache)
{
    (void)c, (void)cstate;
    const int B = b->tokens, sinks = (int)kv_params_int(&p->params, "sinks");
    for (int s = 0; s < cache->n_store; s++) {
        uint8_t *mk = cache->mask + (size_t)s * cache->T;
        memset(mk, 0, (size_t)cache->T);
        if (i + 1 <= B) {
            memset(mk, 1, (size_t)i + 1);
            continue;
        }
        /* sinks first, the rest of the budget is recent tokens, token i at least */
        int ns = sinks < B - 1 ? sinks : B - 1;
        memset(mk, 1, (size_t)ns);
        for (int j = i - (B - ns) + 1; j <= i; j++)
            mk[j] = 1;
    }
    return KV_OK;
}

const kv_policy_desc_t kv_policy_streaming_llm = {
    .name = "streaming_llm",
    .doc = "attention sinks + recent window (Xiao et al. 2023)",
    .paper = "arXiv:2309.17453",
    .code =
        "mit-han-lab/streaming-llm streaming_llm/kv_cache.py; NVIDIA/kvpress kvpress/presses/streaming_llm_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER,
    .variants = "mode=decode;sinks=0,mode=decode;sinks=9;sinks=9,mode=decode",
    .init = slm_init,
    .prepare = slm_prepare,
    .select = slm_select,
    .admit = slm_admit,
};
