/*
 * decoding.c: decoding-time re-compression with any scorer, as kvpress 0.5.5's DecodingPress
 * (kvpress/presses/decoding_press.py; with prefill=1, PrefillDecodingPress(inner, DecodingPress(inner))):
 * the cache grows during decoding and every `interval` decode steps it is compressed back to B tokens
 * by the inner scorer, which scores the tokens the cache holds at that moment (context and generated
 * alike) as if they were a prompt.
 *
 * Per layer and storage head, n = context length, N = interval, B = the budget (kvpress's target_size):
 *   end of prefill: prefill=1 keeps the inner's top B of the context (a one-shot compression);
 *     prefill=0 keeps the whole context (DecodingPress alone only acts while decoding);
 *   decode query i = n + m (m = decode steps before it): when m > 0 and m is a multiple of N, the
 *     cache held so far ([0, i): kvpress compresses right after the forward pass of step m) is
 *     re-scored: the inner policy runs on a context made of exactly those tokens (kv_ctx_sub: their
 *     recorded queries, keys, values and positions, causal in cache order), and the top B stay
 *     (nothing happens while the cache holds at most B); then token i is appended.
 * So a query reads at most B + N tokens (B + m before the first compression with prefill=0 reads
 * n + m): the budget is the size compressed back to, and budget_slack says by how much the cache
 * may exceed it. kvpress finds a compression ratio whose int(k (1 - ratio)) is exactly the target
 * (_find_target_compression_ratio): the same count B here.
 * The inner is any one-shot token scorer (knorm, keydiff, snapkv, expected_attention, ...); with
 * tie=torch it keeps torch.topk's sets (kvpress). Defaults: inner knorm, interval 512 (kvpress),
 * prefill 1. Preset decoding@kvpress = DecodingPress(KnormPress()) with its defaults (prefill=0).
 * Deviations: kvpress hands the scorer the hidden states of the last decode steps (at most
 * hidden_states_buffer_size, 256) and recomputes their queries with the rotary embedding of the
 * current step; here a scorer that needs queries (snapkv) uses the recorded queries of the cached
 * tokens at their own positions, so attention-based inners differ from kvpress's (key-only scorers
 * such as knorm and keydiff are the same). Trace-driven caveat: after a compression the reference
 * model's later keys change (they attend to a smaller cache), the trace's do not.
 */
#include "sim/common/kv_common.h"
#include "sim/policies/window.h"

#include <string.h>

static const kv_param_def_t params[] = {
    {"inner", KV_PARAM_STRING, "knorm", 0, -1, NULL, "token scorer run on the cache at each compression"},
    {"interval", KV_PARAM_INT, "512", 1, 1 << 24, NULL, "decode steps between compressions (compression_interval)"},
    {"prefill", KV_PARAM_BOOL, "1", 0, -1, NULL,
     "1: compress the context at the end of prefill too (PrefillDecodingPress); 0: only while decoding"},
};

static const kv_preset_t presets[] = {
    {"kvpress", "inner=knorm@kvpress,interval=512,prefill=0,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 DecodingPress(KnormPress(), compression_interval=512)"},
};

typedef struct {
    kv_policy_t *in; /* this budget's own copy of the inner scorer (budgets run concurrently) */
    int *tok;        /* (T) cached positions of one storage head */
    kv_keep_t sub;   /* (1, T) the selection inside a sub-context */
} dec_cstate_t;

static int dec_init(kv_policy_t *p)
{
    p->flags = KV_POL_DECODE;
    return kv_policy_inner_create(p, "inner", 0);
}

static void dec_cstate_free(void *cs)
{
    dec_cstate_t *x = cs;
    if (!x)
        return;
    kv_policy_free(x->in);
    kv_free(x->tok);
    kv_free(x->sub.mask);
    kv_free(x);
}

static int dec_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    return kv_params_bool(&p->params, "prefill") ? kv_policy_prepare(p->inner, c) : KV_OK;
}

/* The inner's selection of B tokens over context c into keep (one-shot rules of the inner). */
static int inner_select(kv_policy_t *in, const kv_layer_ctx_t *c, const kv_budget_t *b, kv_keep_t *keep)
{
    void *cs = NULL;
    int rc = in->desc->select ? in->desc->select(in, c, b, &cs, keep) : kv_select_uniform(in, c, b, &cs, keep);
    if (cs && in->desc->cstate_free)
        in->desc->cstate_free(cs);
    return rc;
}

static int dec_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    (void)cstate;
    if (kv_params_bool(&p->params, "prefill") && b->tokens < c->n_ctx)
        return inner_select(p->inner, c, b, keep);
    for (int s = 0; s < keep->n_store; s++) {
        memset(keep->mask + (size_t)s * keep->T, 0, (size_t)keep->T);
        memset(keep->mask + (size_t)s * keep->T, 1, (size_t)c->n_ctx);
    }
    return KV_OK;
}

static int dec_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                     kv_keep_t *cache)
{
    const int N = (int)kv_params_int(&p->params, "interval"), m = i - c->n_ctx, B = b->tokens, T = cache->T;
    dec_cstate_t *x = *cstate;
    if (m > 0 && m % N == 0) {
        if (!x) {
            x = kv_calloc(1, sizeof *x, "decoding state");
            if (!x)
                return KV_ENOMEM;
            *cstate = x;
            x->tok = kv_malloc(sizeof(int) * (size_t)T, "decoding cache positions");
            x->sub.n_store = 1;
            x->sub.mask = kv_malloc((size_t)T, "decoding selection");
            if (!x->tok || !x->sub.mask)
                return KV_ENOMEM;
            int rc = kv_policy_create(p->inner->label, &x->in);
            if (rc)
                return rc;
        }
        const int nh = p->gran == KV_GRAN_KV ? c->G : 1;
        for (int s = 0; s < cache->n_store; s++) {
            uint8_t *mk = cache->mask + (size_t)s * T;
            int n = 0;
            for (int j = 0; j < i; j++)
                if (mk[j])
                    x->tok[n++] = j;
            if (n <= B)
                continue;
            kv_layer_ctx_t sub;
            int rc = kv_ctx_sub(c, p->gran == KV_GRAN_KV ? s * c->G : s, nh, x->tok, n, &sub);
            if (rc == KV_OK)
                rc = kv_policy_prepare(x->in, &sub);
            x->sub.T = n;
            if (rc == KV_OK)
                rc = inner_select(x->in, &sub, b, &x->sub);
            kv_ctx_sub_free(&sub);
            if (rc)
                return kv_error_context(rc, "decoding: re-compressing layer %d before query %d", c->layer, i);
            for (int t = 0; t < n; t++)
                mk[x->tok[t]] = x->sub.mask[t];
        }
    }
    for (int s = 0; s < cache->n_store; s++)
        cache->mask[(size_t)s * T + i] = 1;
    return KV_OK;
}

/* the cache grows by up to `interval` tokens between compressions, and from the whole context
 * before the first one when the prefill is not compressed */
static int dec_budget_slack(const kv_policy_t *p, int n_ctx, int B)
{
    const int N = (int)kv_params_int(&p->params, "interval");
    return N + (kv_params_bool(&p->params, "prefill") || n_ctx <= B ? 0 : n_ctx - B);
}

static int dec_kept_window(const kv_policy_t *p)
{
    return kv_params_bool(&p->params, "prefill") ? kv_policy_kept_window(p->inner) : 0;
}

const kv_policy_desc_t kv_policy_decoding = {
    .name = "decoding",
    .doc = "re-compress the whole cache to B tokens every N decode steps with any scorer (kvpress "
           "DecodingPress)",
    .paper = "kvpress DecodingPress (no paper)",
    .code = "NVIDIA/kvpress kvpress/presses/decoding_press.py, prefill_decoding_press.py",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_DECODE,
    .variants = "interval=2;interval=3,prefill=0;interval=2,inner=snapkv(window=4);interval=4,inner=keydiff(tie=torch);"
                "interval=2,inner=h2o(window=2)",
    .init = dec_init,
    .prepare = dec_prepare,
    .select = dec_select,
    .admit = dec_admit,
    .cstate_free = dec_cstate_free,
    .budget_slack = dec_budget_slack,
    .kept_window = dec_kept_window,
};
