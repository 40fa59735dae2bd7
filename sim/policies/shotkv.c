/*
 * shotkv.c: ShotKV (Liu et al., "Can LLMs Maintain Fundamental Abilities under KV Cache
 * Compression?" / "Semantic Integrity Matters", arXiv:2502.01941, Sec. 5.1, Eq. 3-9, Algorithm 1).
 * Prefill and decoding are compressed separately. Prefill keeps whole few-shot examples ("shots",
 * the trace's segments) chosen by attention; decoding keeps the top r_d fraction of the generated
 * tokens by the current query's attention. The cache is the union. There is no public code: this
 * follows the paper text; every choice it leaves open is listed below.
 *
 * Prefill, once per layer (fixed afterwards): alpha[t] = sum over ALL query heads of the accumulated
 * causal attention token t received from the prompt queries (kv_ctx_colstats sum: the H2O-style
 * reading of "accumulated attention"; the paper does not say which queries accumulate). Shot score
 * = mean of alpha over the shot's tokens (Eq. 3). Shots are taken in decreasing score order (ties:
 * the later shot) while they fit the prefill share of the budget.
 *   - Per layer, as Eq. 3 / Algorithm 1 write it. The paper's appendix E says the scores are
 *     averaged "across all tokens, heads, and layers", which contradicts its own per-layer equation;
 *     we implement per layer.
 *   - fit=skip (default): a shot that does not fit is skipped and smaller lower-ranked shots may
 *     still fill the share; fit=stop ends the selection at the first shot that does not fit.
 *   - The last segment is the question/instruction: with keep_last=1 (default) it is always kept
 *     and counts against the prefill share (a few-shot prompt without its question is useless);
 *     keep_first=1 does the same for the first segment (a system prompt or task instruction). A
 *     protected segment longer than the share keeps its latest tokens. keep_last=0 makes the last
 *     segment an ordinary candidate. With --eval-tail, "last" is the last segment that starts
 *     inside the context, clipped to it.
 *   - Heads: the sum over heads gives one shot choice per layer, the same for every KV head
 *     (GQA-agnostic); gran=query only stores it G times; `agg` is unused.
 * Decoding (every step): Score(t) = sum over all query heads of the attention of the current query
 * (Eq. 7). Our caches never exceed B for the query that reads them, so eviction happens before
 * appending: at step i the generated tokens kept are token i plus the best of the previously kept
 * generated tokens by query i - 1's attention (the last one observed), up to
 * D(i) = ceil(rd * (i - n_ctx + 1)) generated tokens (ceil: the new token is always read).
 * Evicted generated tokens never return; prefill tokens are never evicted during decoding.
 * Budget split (the paper uses two ratios, r_p of the prompt and r_d of the generation, not a token
 * budget): the decode share is reserved for the whole generation, D_max = ceil(rd * n_eval) with
 * n_eval the trace's evaluation steps (a server knows max_new_tokens), and the prompt gets
 * B_p = max(0, B - D_max); if the prompt fits in B_p it is kept whole. Unused prefill share is not
 * given to decoding (shots are indivisible). Every query thus reads at most B keys.
 * Flag BUDGET_FREE: rd < 1 evicts generated tokens at any budget (the ratio rule of the paper);
 * rd = 1 keeps every generated token and a full budget then loses nothing.
 * Paper settings: LG-GSM8K with K=35 shots, ratios 40/35/30/25 %; the default rd = 0.4 is its
 * mildest setting.
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/policies/accum_internal.h"

#include <math.h>
#include <string.h>

static const kv_param_def_t params[] = {
    {"rd", KV_PARAM_FLOAT, "0.4", 0.001, 1, NULL, "fraction of the generated tokens kept while decoding (r_d)"},
    {"fit", KV_PARAM_ENUM, "skip", 0, -1, "skip|stop",
     "a shot that does not fit the prefill share: skip it and try the next, or stop"},
    {"keep_last", KV_PARAM_BOOL, "1", 0, -1, NULL, "always keep the last segment (the question)"},
    {"keep_first", KV_PARAM_BOOL, "0", 0, -1, NULL, "always keep the first segment (an instruction)"},
};

typedef struct {
    double rd;
    int stop, keep_last, keep_first;
    /* per layer, filled by prepare: */
    int n_shots, cap;
    int *start, *len; /* (n_shots) clipped to the context */
    float *score;     /* (n_shots) mean accumulated attention */
    int *order;       /* (n_shots) by decreasing score, ties: later shot first */
} shot_t;

static int shot_init(kv_policy_t *p)
{
    shot_t *s = kv_calloc(1, sizeof *s, "shotkv state");
    if (!s)
        return KV_ENOMEM;
    s->rd = kv_params_float(&p->params, "rd");
    s->stop = !strcmp(kv_params_str(&p->params, "fit"), "stop");
    s->keep_last = kv_params_bool(&p->params, "keep_last");
    s->keep_first = kv_params_bool(&p->params, "keep_first");
    p->state = s;
    if (s->rd >= 1)
        p->flags &= ~KV_POL_BUDGET_FREE;
    return KV_OK;
}

static void shot_fini(kv_policy_t *p)
{
    shot_t *s = p->state;
    if (!s)
        return;
    kv_free(s->start);
    kv_free(s->len);
    kv_free(s->score);
    kv_free(s->order);
    kv_free(s);
}

static int shot_prepare(kv_policy_t *p, kv_layer_ctx_t *c)
{
    shot_t *s = p->state;
    const kv_trace_meta_t *m = c->meta;
    const int n = c->n_ctx;
    if (m->n_segments < 1 || !m->segments)
        return kv_error(KV_EINVAL, "shotkv needs segments and the trace has none");
    if (m->n_segments > s->cap) {
        kv_free(s->start);
        kv_free(s->len);
        kv_free(s->score);
        kv_free(s->order);
        s->cap = m->n_segments;
        s->start = kv_malloc(sizeof(int) * (size_t)s->cap, "shots");
        s->len = kv_malloc(sizeof(int) * (size_t)s->cap, "shots");
        s->score = kv_malloc(sizeof(float) * (size_t)s->cap, "shot scores");
        s->order = kv_malloc(sizeof(int) * (size_t)s->cap, "shot order");
        if (!s->start || !s->len || !s->score || !s->order) {
            s->cap = 0;
            return KV_ENOMEM;
        }
    }
    const float *sum;
    int rc = kv_ctx_colstats(c, &sum, NULL, NULL);
    if (rc)
        return rc;
    s->n_shots = 0;
    for (int k = 0; k < m->n_segments; k++) {
        int a = m->segments[k], e = k + 1 < m->n_segments ? m->segments[k + 1] : m->n_prompt;
        if (a < 0 || e > m->n_prompt || e < a)
            return kv_error(KV_EFORMAT, "segment %d spans [%d, %d), outside the prompt of %d tokens", k, a, e,
                            m->n_prompt);
        if (a >= n)
            break; /* held out of the context (--eval-tail) */
        if (e > n)
            e = n;
        if (e == a)
            continue;
        double tot = 0;
        for (int t = a; t < e; t++)
            for (int h = 0; h < c->H; h++)
                tot += sum[(size_t)h * n + t];
        s->start[s->n_shots] = a;
        s->len[s->n_shots] = e - a;
        s->score[s->n_shots] = (float)(tot / (e - a));
        s->n_shots++;
    }
    kv_argsort_desc(s->score, s->n_shots, s->order);
    return KV_OK;
}

/* Keep the latest `room` tokens of shot k (all of it when it fits); returns the number kept. */
static int take(const shot_t *s, int k, int room, uint8_t *mk)
{
    int l = KV_MIN(s->len[k], room), e = s->start[k] + s->len[k];
    if (l > 0)
        memset(mk + e - l, 1, (size_t)l);
    return l > 0 ? l : 0;
}

static void share_row0(kv_keep_t *k)
{
    for (int s = 1; s < k->n_store; s++)
        memcpy(k->mask + (size_t)s * k->T, k->mask, (size_t)k->T);
}

static int shot_select(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, kv_keep_t *keep)
{
    const shot_t *s = p->state;
    kv_acc_state_t *st;
    int rc = kv_acc_state_get(cstate, c->H, c->T, &st);
    if (rc)
        return rc;
    memset(st->vec, 0, sizeof(float) * (size_t)c->T);
    const int n = c->n_ctx, dmax = (int)ceil(s->rd * c->n_eval - 1e-9), bp = KV_MAX(0, b->tokens - dmax);
    uint8_t *mk = keep->mask;
    memset(mk, 0, (size_t)c->T);
    if (n <= bp) {
        memset(mk, 1, (size_t)n);
    } else if (s->n_shots > 0) {
        const int last = s->n_shots - 1;
        int used = 0;
        if (s->keep_last)
            used += take(s, last, bp - used, mk);
        if (s->keep_first && !(s->keep_last && last == 0))
            used += take(s, 0, bp - used, mk);
        for (int r = 0; r < s->n_shots; r++) {
            const int k = s->order[r];
            if ((s->keep_last && k == last) || (s->keep_first && k == 0))
                continue;
            if (used + s->len[k] <= bp)
                used += take(s, k, s->len[k], mk);
            else if (s->stop)
                break;
        }
    }
    share_row0(keep);
    return KV_OK;
}

static int shot_admit(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                      kv_keep_t *cache)
{
    const shot_t *s = p->state;
    kv_acc_state_t *st = *cstate;
    if (!st)
        return kv_error(KV_EINTERNAL, "shotkv: admit before select");
    const int n = c->n_ctx;
    uint8_t *mk = cache->mask;
    int prefill = 0;
    for (int j = 0; j < n; j++)
        prefill += mk[j] != 0;
    int cap = (int)ceil(s->rd * (i - n + 1) - 1e-9);
    cap = KV_MIN(cap, b->tokens - prefill);
    if (cap < 1)
        cap = 1;
    int ng = kv_acc_cached(mk + n, i - n, st->pos);
    for (int k = 0; k < ng; k++) {
        st->pos[k] += n;
        st->key[k] = st->vec[st->pos[k]];
    }
    kv_acc_keep_best(st, st->pos, st->key, ng, cap - 1, mk);
    mk[i] = 1;
    share_row0(cache);
    return KV_OK;
}

static int shot_observe(kv_policy_t *p, const kv_layer_ctx_t *c, const kv_budget_t *b, void **cstate, int i,
                        const kv_keep_t *cache, const float *attn)
{
    (void)p, (void)b, (void)cache;
    kv_acc_state_t *st = *cstate;
    for (int j = c->n_ctx; j <= i; j++) {
        double a = 0;
        for (int h = 0; h < c->H; h++)
            a += attn[(size_t)h * c->T + j];
        st->vec[j] = (float)a;
    }
    return KV_OK;
}

const kv_policy_desc_t kv_policy_shotkv = {
    .name = "shotkv",
    .doc = "whole few-shot segments by mean accumulated attention at prefill + top r_d of generated tokens "
           "each step (Liu et al. 2025; paper-only spec)",
    .paper = "arXiv:2502.01941",
    .params = params,
    .code = "- (the paper has no code)",
    .n_params = (int)KV_ARRAY_LEN(params),
    .flags = KV_POL_DECODE | KV_POL_NEEDS_SEGMENTS | KV_POL_BUDGET_FREE,
    .variants = "rd=1;fit=stop,keep_last=0,keep_first=1",
    .init = shot_init,
    .fini = shot_fini,
    .prepare = shot_prepare,
    .select = shot_select,
    .admit = shot_admit,
    .observe = shot_observe,
    .cstate_free = kv_acc_state_free,
};
