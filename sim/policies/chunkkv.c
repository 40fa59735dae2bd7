/*
 * chunkkv.c: ChunkKV (Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient
 * Long-Context LLM Inference", arXiv:2502.00299; docs/POLICIES.md §2.7): the eviction unit is a
 * chunk of `chunk` consecutive tokens instead of a token. Per layer, the token scores of an inner
 * scorer (SnapKV by default) are summed over the layer's storage heads (kvpress sums over KV heads),
 * the pre-window context [sinks, n - w) is cut into ceil(m / chunk) chunks from its start (the last
 * one may be partial), each chunk scores the sum (paper Algorithm 1) or the mean (kvpress) of its
 * tokens, and the top floor((B - w) / chunk) chunks plus the inner's protected tokens (window, sinks)
 * are kept: ONE index set shared by every head of the layer. Chunk ties: later chunk first.
 * Layer-wise index reuse (paper Algorithm 2): with reuse=N, layers are grouped in blocks of N; the
 * first layer of a block selects and the N - 1 followers keep exactly the leader's positions (their
 * scores are not even computed). reuse=1 is off. The leader's selection is kept per budget in the
 * engine's per-(policy, budget) state, which persists across layers.
 * Defaults: chunk 10 (paper, "robust across tasks"), score sum (paper), reuse 1 (kvpress has no
 * reuse and the paper leaves N_reuse an ablation knob), inner snapkv with SnapKV's defaults (window
 * 32, kernel 7, max). kvpress ChunkKVPress differs: chunk 20, mean, inner SnapKVPress (window 64,
 * avg k=5), chunks over the whole context with the window's scores padded to max+1, and
 * max(1, int(C (1 - cr))) chunks kept on a ratio.
 * grid=context (kvpress 0.5.5 ChunkKVPress): chunks cut the WHOLE context from token 0, window
 * included; the inner's protected tokens score max + 1 (max over the layer's other scores, as
 * kvpress pads SnapKVPress's window) instead of being kept outright, the token scores are summed
 * over the storage heads, and max(1, int(C (1 - cr))) of the C chunks are kept (the last one may be
 * partial), chosen as torch.topk chooses them (kv_topk_mask_torch: the window's chunks tie); on a
 * token or fraction budget 1 - cr is B / n or f (kv_budget_fraction). A context of less than one
 * chunk falls back to the inner's own top B per head, as kvpress does. Nothing is protected: a chunk
 * that straddles the window can lose to a better context chunk, and the kept count can exceed the
 * budget by less than a chunk (budget_slack). Presets: chunkkv@kvpress (chunk 20, mean, grid=context,
 * inner snapkv@kvpress), chunkkv@paper (the defaults).
 * Budget: B per head, window included; at most floor((B - w)/chunk) * chunk + w tokens are kept, so
 * chunk granularity can leave up to chunk - 1 tokens of the budget unused. B >= n_ctx keeps
 * everything; B <= w keeps the last B tokens; B - w < chunk keeps the window only (kvpress keeps at
 * least one chunk on a ratio budget). Nested: a larger budget keeps a superset.
 */
#include "sim/common/kv_common.h"
#include "sim/policies/window.h"

#include <math.h>
#include <string.h>

typedef struct {
    int chunk, mean, reuse;
    int context;   /* grid=context (kvpress) */
    int n_full;    /* grid=context: complete chunks (n / chunk) */
    float *cscore; /* grid=context: (n_chunks) chunk scores */
    /* per layer, from prepare (read-only in select) */
    int follower;  /* this layer reuses its block leader's positions */
    int n, pf, pl; /* context length and protected tokens [0, pf), [n - pl, n) */
    int n_chunks;  /* over the pre-window region [pf, n - pl) */
    int *corder;   /* (n_chunks) chunks by decreasing score */
    int cap;
} ck_state_t;

/* per (policy, budget): the last leader layer's kept positions */
typedef struct {
    int layer, n;
    uint8_t *mask; /* (n) */
} ck_cstate_t;

static const kv_param_def_t params[] = {
    {"chunk", KV_PARAM_INT, "10", 1, 1 << 20, NULL, "tokens per chunk (paper 10, kvpress 20)"},
    {"score", KV_PARAM_ENUM, "sum", 0, -1, "sum|mean", "chunk score from its token scores (paper sum, kvpress mean)"},
    {"reuse", KV_PARAM_INT, "1", 1, 1 << 20, NULL, "layer-wise index reuse: blocks of N layers share the first's set"},
    {"inner", KV_PARAM_STRING, "snapkv", 0, -1, NULL, "token scorer (snapkv, knorm, ...), summed over the heads"},
    {"grid", KV_PARAM_ENUM, "prefix", 0, -1, "prefix|context",
     "chunks over the context before the window (paper) or the whole context from token 0 (kvpress)"},
};

static const kv_preset_t presets[] = {
    {"paper", "chunk=10,score=sum,reuse=1,inner=snapkv,grid=prefix",
     "ChunkKV paper Algorithm 1 (chunk 10, sum) with SnapKV's scores"},
    {"kvpress", "chunk=20,score=mean,reuse=1,inner=snapkv@kvpress,grid=context,gran=kv,agg=mean",
     "NVIDIA kvpress 0.5.5 ChunkKVPress(SnapKVPress(), 20), the code the paper names"},
};

static int ck_init(kv_policy_t *p)
{
    ck_state_t *st = kv_calloc(1, sizeof *st, "chunkkv state");
    if (!st)
        return KV_ENOMEM;
    p->state = st;
    st->chunk = (int)kv_params_int(&p->params, "chunk");
    st->mean = !strcmp(kv_params_str(&p->params, "score"), "mean");
    st->reuse = (int)kv_params_int(&p->params, "reuse");
    st->context = !strcmp(kv_params_str(&p->params, "grid"), "context");
    if (st->context) /* chunks of the whole context, window included: its tokens can go, and the
                        kept count follows the chunk count, not B */
        p->flags &= ~KV_POL_NESTED;
    return kv_policy_inner_create(p, "inner", 0);
}

static void ck_fini(kv_policy_t *p)
{
    ck_state_t *st = p->state;
    if (st) {
        kv_free(st->corder);
        kv_free(st->cscore);
    }
    kv_free(st);
}

static void ck_cstate_free(void *cs)
{
    ck_cstate_t *x = cs;
    if (x)
        kv_free(x->mask);
    kv_free(x);
}

/* grid=context: the chunk scores of kvpress's ChunkKVPress (see the top comment). */
static int ck_prepare_context(kv_policy_t *p, const kv_layer_ctx_t *c)
{
    ck_state_t *st = p->state;
    const kv_policy_t *in = p->inner;
    const int n = c->n_ctx, S = in->n_store, ch = st->chunk;
    const int pf = KV_MIN(in->protect_first, n), pl = KV_MIN(in->protect_last, n - pf);
    st->pf = st->pl = 0;
    p->protect_first = p->protect_last = 0;
    st->n_full = n / ch;
    const int nc = st->n_full + (n % ch > 0);
    if (nc > st->cap || !st->cscore) {
        kv_free(st->cscore);
        st->cscore = kv_malloc(sizeof(float) * (size_t)(nc ? nc : 1), "chunk scores");
        if (!st->cscore)
            return KV_ENOMEM;
        st->cap = nc;
    }
    st->n_chunks = nc;
    /* the padding of the protected tokens: the largest other score of the layer, plus 1 */
    float mx = -INFINITY;
    for (int s = 0; s < S; s++)
        for (int j = pf; j < n - pl; j++) {
            const float v = in->sscores[(size_t)s * n + j];
            mx = v > mx ? v : mx;
        }
    const float pad = isfinite(mx) ? mx + 1.0f : 1.0f;
    for (int k = 0; k < nc; k++) {
        const int a = k * ch, e = KV_MIN(a + ch, n);
        double sum = 0;
        for (int j = a; j < e; j++) {
            float t = 0; /* summed over the heads in float, as torch sums a float32 tensor */
            for (int s = 0; s < S; s++)
                t += (j < pf || j >= n - pl) ? pad : in->sscores[(size_t)s * n + j];
            sum += t;
        }
        st->cscore[k] = (float)(st->mean ? sum / (e - a) : sum);
    }
    return KV_OK;
}

/* grid=context selection into m0 (n) for budget b. */
static void ck_select_context(const kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, kv_keep_t *keep,
                              uint8_t *m0)
{
    const ck_state_t *st = p->state;
    const int n = c->n_ctx, ch = st->chunk, nc = st->n_chunks;
    if (b->tokens >= n) {
        memset(m0, 1, (size_t)n);
        return;
    }
    if (st->n_full == 0) { /* less than one chunk: the inner press's own selection (head 0 here) */
        kv_keep_prefix(p->inner, c, 0, b->tokens, keep);
        return;
    }
    int k = (int)(nc * kv_budget_fraction(b, n)); /* Python: int(C * (1 - compression_ratio)) */
    k = KV_MAX(1, KV_MIN(k, nc));
    uint8_t *cm = kv_calloc((size_t)nc, 1, "chunk mask");
    if (!cm) { /* keep the first chunks' worth of the order instead of failing */
        kv_keep_prefix(p->inner, c, 0, b->tokens, keep);
        return;
    }
    kv_topk_mask_torch(st->cscore, nc, k, cm);
    for (int x = 0; x < nc; x++)
        if (cm[x])
            memset(m0 + (size_t)x * ch, 1, (size_t)(KV_MIN((x + 1) * ch, n) - x * ch));
    kv_free(cm);
}

static int ck_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    ck_state_t *st = p->state;
    kv_policy_t *in = p->inner;
    const int n = c->n_ctx;
    st->n = n;
    st->follower = st->reuse > 1 && c->layer % st->reuse != 0;
    if (st->follower) { /* the leader's selection is reused: nothing to score */
        p->protect_first = st->pf;
        p->protect_last = st->pl;
        return KV_OK;
    }
    int rc = kv_policy_prepare(in, c);
    if (rc)
        return rc;
    if (!in->scored || !in->order)
        return kv_error(KV_EINVAL, "chunkkv: inner policy %s gave no token scores", in->label);
    if (st->context)
        return ck_prepare_context(p, c);
    st->pf = KV_MIN(in->protect_first, n);
    st->pl = KV_MIN(in->protect_last, n - st->pf);
    p->protect_first = st->pf;
    p->protect_last = st->pl;
    const int j0 = st->pf, m = n - st->pl - st->pf, S = in->n_store;
    const int nc = (m + st->chunk - 1) / st->chunk;
    if (nc > st->cap || !st->corder) {
        kv_free(st->corder);
        st->corder = kv_malloc(sizeof(int) * (size_t)(nc ? nc : 1), "chunk order");
        if (!st->corder)
            return KV_ENOMEM;
        st->cap = nc;
    }
    float *cs = kv_malloc(sizeof(float) * (size_t)(nc ? nc : 1), "chunk scores");
    if (!cs)
        return KV_ENOMEM;
    for (int k = 0; k < nc; k++) {
        const int a = j0 + k * st->chunk, e = KV_MIN(a + st->chunk, j0 + m);
        double sum = 0;
        for (int j = a; j < e; j++)
            for (int s = 0; s < S; s++)
                sum += in->sscores[(size_t)s * n + j];
        cs[k] = (float)(st->mean ? sum / (e - a) : sum);
    }
    kv_argsort_desc(cs, nc, st->corder);
    kv_free(cs);
    st->n_chunks = nc;
    return KV_OK;
}

static int ck_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    const ck_state_t *st = p->state;
    const int n = c->n_ctx, B = b->tokens, T = keep->T;
    ck_cstate_t *cs = *cstate;
    if (st->reuse > 1 && !cs) {
        cs = kv_calloc(1, sizeof *cs, "chunkkv reuse state");
        if (!cs || !(cs->mask = kv_calloc((size_t)(n ? n : 1), 1, "chunkkv reuse mask"))) {
            ck_cstate_free(cs);
            return KV_ENOMEM;
        }
        cs->layer = -1;
        cs->n = n;
        *cstate = cs;
    }
    uint8_t *m0 = keep->mask; /* storage head 0; copied to the others */
    memset(m0, 0, (size_t)T);
    if (st->follower) {
        const int leader = c->layer - c->layer % st->reuse;
        if (!cs || cs->layer != leader || cs->n != n)
            return kv_error(KV_EINTERNAL, "chunkkv: layer %d reuses layer %d's selection, which did not run", c->layer,
                            leader);
        memcpy(m0, cs->mask, (size_t)n);
    } else if (st->context) {
        ck_select_context(p, c, b, keep, m0);
    } else if (B >= n) {
        memset(m0, 1, (size_t)n);
    } else if (B <= st->pf + st->pl) {
        kv_keep_prefix(p->inner, c, 0, B, keep); /* protected tokens are +inf: the same for every head */
    } else {
        for (int j = 0; j < st->pf; j++)
            m0[j] = 1;
        for (int j = n - st->pl; j < n; j++)
            m0[j] = 1;
        const int k = KV_MIN((B - st->pf - st->pl) / st->chunk, st->n_chunks);
        const int end = n - st->pl;
        for (int r = 0; r < k; r++) {
            const int a = st->pf + st->corder[r] * st->chunk, e = KV_MIN(a + st->chunk, end);
            memset(m0 + a, 1, (size_t)(e - a));
        }
    }
    if (cs && !st->follower) {
        memcpy(cs->mask, m0, (size_t)n);
        cs->layer = c->layer;
    }
    for (int s = 1; s < keep->n_store; s++)
        memcpy(keep->mask + (size_t)s * T, m0, (size_t)T);
    return KV_OK;
}

static int ck_kept_window(const kv_policy_t *p)
{
    return ((const ck_state_t *)p->state)->context ? 0 : kv_policy_kept_window(p->inner);
}

/* grid=context keeps whole chunks: up to one chunk more than the budget (and one chunk at least) */
static int ck_budget_slack(const kv_policy_t *p, int n_ctx, int B)
{
    (void)n_ctx, (void)B;
    const ck_state_t *st = p->state;
    return st->context ? st->chunk : 0;
}

const kv_policy_desc_t kv_policy_chunkkv = {
    .name = "chunkkv",
    .doc = "chunks of consecutive tokens as the eviction unit, one set per layer, optional layer-wise index "
           "reuse (Liu et al. 2025)",
    .paper = "arXiv:2502.00299",
    .code = "NVIDIA/kvpress kvpress/presses/chunkkv_press.py (the code the paper names)",
    .params = params,
    .n_params = (int)KV_ARRAY_LEN(params),
    .presets = presets,
    .n_presets = (int)KV_ARRAY_LEN(presets),
    .flags = KV_POL_ONESHOT | KV_POL_NESTED,
    .variants = "score=mean;chunk=20,score=mean;reuse=2;inner=snapkv(window=8),chunk=4;"
                "inner=snapkv(window=8),chunk=4,reuse=2;inner=snapkv(window=8,pool=avg),chunk=5,score=mean,reuse=3;"
                "inner=knorm,chunk=5;grid=context,chunk=4,score=mean;grid=context,chunk=5,reuse=2;"
                "grid=context,chunk=8,inner=snapkv(window=8,pool=avg,kernel=5,qagg=mean)",
    .init = ck_init,
    .fini = ck_fini,
    .prepare = ck_prepare,
    .select = ck_select,
    .cstate_free = ck_cstate_free,
    .kept_window = ck_kept_window,
    .budget_slack = ck_budget_slack,
};
