/*
 * snapkv.c: SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation",
 * arXiv:2404.14469). Once, at the end of prefill, the last `window` context queries score every
 * earlier key (attention summed over the window, pooled along keys); each storage head keeps its
 * top B - window tokens plus the window itself. Generated tokens are appended, never evicted.
 * The score is docs/POLICIES.md §1 (sim/policies/window.c); selection is the shared prefix of the
 * sorted scores (sim/select.c), so a larger budget keeps a superset.
 *
 * Defaults follow the SnapKV paper's LongBench configs (experiments/LongBench/config/
 * ablation_c*_w32_k7_maxpool.json): window 32, kernel 7, max pooling, sum over the window queries.
 * Other references: KVCache-Factory's run_longbench.py uses window 8 (and its code default is avg
 * pooling k=5); kvpress SnapKVPress uses window 64, avg pooling k=5, mean over the window and mean
 * over the group after pooling; FFY0/AdaKV uses mean. Sum and mean rank identically (constant
 * factor w), also across heads.
 * Budget: B tokens per storage head INCLUDING the window (SnapKV's max_capacity_prompt): keep
 * top(B - w) + window. B >= n_ctx keeps everything (the reference skips compression when n < B and
 * keeps everything at n = B too).
 * Granularity: gran=query is the reference layout (per query head, G x memory, SnapKV issue #22);
 * gran=kv combines the group with `agg` after pooling (kvpress) or, with gqa=before_pool, before
 * pooling (KVCache-Factory HEAD, AdaKV gqa_support).
 * Presets: snapkv@paper (the LongBench configs above, per query head as the reference stores them),
 * snapkv@kvcache_factory (KCF ffac160 run_longbench.py: window 8, max pooling k 7, sum, per query
 * head), snapkv@kvpress (kvpress 0.5.5 SnapKVPress: window 64, avg pooling k 5, mean over the window
 * and over the group after pooling; on "cr:" budgets it keeps exactly kvpress's sets, checked by
 * tests/test_kvpress_parity.c), snapkv@adakv (FFY0/AdaKV: window 32, max k 7, mean, group mean
 * before pooling).
 * Deviations: window clamped to the context when the context is shorter (kvpress asserts n > w);
 * B < window keeps the last B tokens (the references require B > w); fp32 scores where the
 * references round to the model dtype before pooling; deterministic ties (later token first).
 */
#include "sim/common/kv_common.h"
#include "sim/policies/window.h"

static const kv_param_def_t params[] = {KV_OBSWIN_PARAMS("32")};

static const kv_preset_t presets[] = {
    {"paper", "window=32,kernel=7,pool=max,qagg=sum,gran=query",
     "FasterDecoding/SnapKV LongBench configs (ablation_c*_w32_k7_maxpool.json), per query head"},
    {"kvcache_factory", "window=8,kernel=7,pool=max,qagg=sum,gran=query",
     "KVCache-Factory ffac160 run_longbench.py, per query head"},
    {"kvpress", "window=64,kernel=5,pool=avg,qagg=mean,gqa=after_pool,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 SnapKVPress"},
    {"adakv", "window=32,kernel=7,pool=max,qagg=mean,gqa=before_pool,gran=kv,agg=mean",
     "FFY0/AdaKV SnapKVCluster with gqa_support (group mean before pooling)"},
};

static int snapkv_init(kv_policy_t *p)
{
    kv_obswin_t *o = kv_calloc(1, sizeof *o, "snapkv state");
    if (!o)
        return KV_ENOMEM;
    p->state = o;
    return kv_obswin_read(&p->params, o, "snapkv");
}

static void snapkv_fini(kv_policy_t *p)
{
    kv_free(p->state);
}

static int snapkv_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    return kv_obswin_score(p, c, p->state);
}

static int snapkv_kept_window(const kv_policy_t *p)
{
    return ((const kv_obswin_t *)p->state)->window;
}

const kv_policy_desc_t kv_policy_snapkv = {
    .name = "snapkv",
    .doc = "observation-window attention (last W queries), pooled; top B-W + window per head (Li et al. 2024)",
    .paper = "arXiv:2404.14469",
    .code = "FasterDecoding/SnapKV snapkv/monkeypatch/snapkv_utils.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED | KV_POL_SCORER,
    .variants = "window=8;window=8,pool=avg;window=8,pool=avg,kernel=5,qagg=mean;window=8,pool=none;"
                "window=8,gqa=before_pool,agg=max;window=16,kernel=3,agg=sum",
    .init = snapkv_init,
    .fini = snapkv_fini,
    .prepare = snapkv_prepare,
    .kept_window = snapkv_kept_window,
};
