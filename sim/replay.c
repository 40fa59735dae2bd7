/*
 * replay.c: the replay engine (see replay.h).
 *
 * Per layer:
 *   1. read Q, K, V (and W_O) once (sim/stream.c: in a reader thread with prefetch);
 *   2. p_eval = softmax of every evaluation query over its keys (sim/layer_stats.c, through the
 *      backend), exact head outputs and value norms (metrics.c);
 *   3. every policy prepares once; the statistics several policies share (accumulated attention,
 *      window probabilities) come from sim/layer_stats.c, computed on first request and reused by
 *      every policy of the layer;
 *   4. every (policy, budget) pair builds the caches its evaluation queries read and measures them,
 *      in parallel, each writing only its own slot (handed out longest first by the previous
 *      layer's times: see schedule_order).
 * Rows are produced at the end in a fixed order: per (policy, budget) an overall row, then per
 * layer a layer row followed by its head rows (sim/aggregate.c, in parallel, appended in that order).
 *
 * Trace-driven caveat (true of every offline replay): evaluation queries are the ones recorded
 * with the full cache; after a real eviction the model's later queries would differ slightly.
 */
#include "sim/replay.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/ctx_internal.h"
#include "sim/layer_stats.h"
#include "sim/metrics.h"
#include "sim/replay_internal.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void kv_replay_defaults(kv_replay_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->head_rows = 1;
    o->prefetch = KV_PREFETCH_AUTO;
    o->stats_source = KV_STATS_AUTO;
}

#define KV_MAX_GROUP 256 /* query heads per KV head */

/* ---------------------------------------------------------------- per (policy, budget) state */

typedef struct {
    kv_policy_t *p;
    int pi, bi;
    kv_budget_t b;
    void *cstate;
    kv_samples_t smp; /* what it measured, every layer */
    int probe_e;      /* kv_replay_probe: copy the mask query probe_e reads into probe_mask */
    uint8_t *probe_mask;
    uint8_t *kept_mask; /* (L, S, T) replay --kept: the cache each layer ends with, or NULL */
    int rc;
    double t_layer; /* seconds eval_cfg took on the last layer: the cost estimate for scheduling */
    char msg[1024];
} cfg_t;

static void cfg_free(cfg_t *g)
{
    if (g->cstate && g->p->desc->cstate_free)
        g->p->desc->cstate_free(g->cstate);
    kv_samples_free(&g->smp);
    kv_free(g->kept_mask);
}

static int cfg_alloc(cfg_t *g, int L, int H, int Hkv, int E)
{
    return kv_samples_alloc(&g->smp, L, H, E, g->p->gran == KV_GRAN_KV ? Hkv : H);
}

/* Evaluate one (policy, budget) on one layer. Runs inside the parallel loop: touches only g. */
static int eval_cfg(cfg_t *g, kv_layer_ctx_t *c, const kv_metrics_layer_t *ml, size_t dtype_bytes)
{
    kv_policy_t *p = g->p;
    const kv_policy_desc_t *d = p->desc;
    const int H = c->H, E = c->n_eval, T = c->T, n = c->n_ctx, G = c->G, S = g->smp.S, l = c->layer;
    const int has_wo = ml->C_wo != NULL;
    kv_keep_t keep = {S, T, kv_calloc((size_t)S * T, 1, "cache mask")};
    float *evec = has_wo ? kv_calloc((size_t)H * E * c->d, sizeof(float), "error vectors") : NULL; /* (H, E, d) */
    float *eq = has_wo ? kv_malloc(sizeof(float) * (size_t)H * c->d, "error vectors") : NULL;      /* (H, d) */
    float *fq = kv_malloc(sizeof(float) * (size_t)H, "recalls");
    float *attn = d->observe ? kv_calloc((size_t)H * T, sizeof(float), "renormalised attention") : NULL;
    double *peak_s = kv_calloc((size_t)S, sizeof(double), "cache peaks");
    kv_metrics_scratch_t ws = {0};
    int rc = KV_OK;
    if (!keep.mask || (has_wo && (!evec || !eq)) || !fq || (d->observe && !attn) || !peak_s) {
        rc = KV_ENOMEM;
        goto done;
    }
    float *rec = g->smp.rec + (size_t)l * H * E, *err = g->smp.err + (size_t)l * H * E,
          *bnd = g->smp.bnd + (size_t)l * H * E;
    const unsigned fl = p->flags;
    if (fl & (KV_POL_DECODE | KV_POL_PER_QUERY)) {
        if (fl & KV_POL_DECODE) {
            rc = d->select ? d->select(p, c, &g->b, &g->cstate, &keep)
                           : kv_select_uniform(p, c, &g->b, &g->cstate, &keep);
            if (rc)
                goto done;
        }
        for (int e = 0; e < E; e++) {
            const int i = n + e;
            if ((rc = d->admit(p, c, &g->b, &g->cstate, i, &keep)))
                goto done;
            if (g->probe_mask && e == g->probe_e)
                memcpy(g->probe_mask, keep.mask, (size_t)S * T);
            if (g->kept_mask && e == E - 1) /* what the last evaluation query reads */
                memcpy(g->kept_mask + (size_t)l * S * T, keep.mask, (size_t)S * T);
            for (int s = 0; s < S; s++) {
                const uint8_t *mk = keep.mask + (size_t)s * T;
                int ctx = 0, tot;
                for (int j = 0; j < n; j++)
                    ctx += mk[j] != 0;
                if (fl & KV_POL_PER_QUERY) {
                    tot = ctx + e + 1;
                } else {
                    tot = ctx;
                    for (int j = n; j <= i; j++)
                        tot += mk[j] != 0;
                }
                if (tot > peak_s[s])
                    peak_s[s] = tot;
                for (int h = (p->gran == KV_GRAN_KV ? s * G : s); h < (p->gran == KV_GRAN_KV ? (s + 1) * G : s + 1);
                     h++) {
                    g->smp.kept[(size_t)l * H + h] += ctx / (double)E;
                    g->smp.cmean[(size_t)l * H + h] += tot / (double)E;
                    if (tot > g->smp.cpeak[(size_t)l * H + h])
                        g->smp.cpeak[(size_t)l * H + h] = tot;
                }
            }
            for (int s = 0; s < S; s++) {
                const int h0 = p->gran == KV_GRAN_KV ? s * G : s, nh = p->gran == KV_GRAN_KV ? G : 1;
                float rr[KV_MAX_GROUP], ee[KV_MAX_GROUP], bb[KV_MAX_GROUP];
                if (nh > KV_MAX_GROUP) {
                    rc = kv_error(KV_ERANGE, "%d query heads per KV head (at most %d)", nh, KV_MAX_GROUP);
                    goto done;
                }
                if ((rc = kv_metrics_query_group(ml, h0, nh, e, keep.mask + (size_t)s * T, (fl & KV_POL_PER_QUERY) != 0,
                                                 rr, ee, bb, has_wo ? eq + (size_t)h0 * c->d : NULL,
                                                 attn ? attn + (size_t)h0 * T : NULL, &ws)))
                    goto done;
                for (int hh = 0; hh < nh; hh++) {
                    size_t o = (size_t)(h0 + hh) * E + e;
                    rec[o] = rr[hh];
                    err[o] = ee[hh];
                    bnd[o] = bb[hh];
                    fq[h0 + hh] = rr[hh];
                }
            }
            if (has_wo)
                kv_metrics_wo(ml, eq, fq, &g->smp.wo_err[(size_t)l * E + e], &g->smp.wo_bnd[(size_t)l * E + e]);
            if (d->observe && (rc = d->observe(p, c, &g->b, &g->cstate, i, &keep, attn)))
                goto done;
        }
    } else {
        rc = d->select ? d->select(p, c, &g->b, &g->cstate, &keep) : kv_select_uniform(p, c, &g->b, &g->cstate, &keep);
        if (rc)
            goto done;
        if (g->probe_mask)
            memcpy(g->probe_mask, keep.mask, (size_t)S * T);
        if (g->kept_mask)
            memcpy(g->kept_mask + (size_t)l * S * T, keep.mask, (size_t)S * T);
        for (int s = 0; s < S; s++) {
            const int h0 = p->gran == KV_GRAN_KV ? s * G : s, nh = p->gran == KV_GRAN_KV ? G : 1;
            const uint8_t *mk = keep.mask + (size_t)s * T;
            int ctx = 0;
            for (int j = 0; j < n; j++)
                ctx += mk[j] != 0;
            peak_s[s] = ctx + E;
            rc = kv_metrics_oneshot(ml, h0, nh, mk, rec + (size_t)h0 * E, err + (size_t)h0 * E, bnd + (size_t)h0 * E,
                                    has_wo ? evec + (size_t)h0 * E * c->d : NULL);
            if (rc)
                goto done;
            for (int h = h0; h < h0 + nh; h++) {
                g->smp.kept[(size_t)l * H + h] = ctx;
                g->smp.cmean[(size_t)l * H + h] = ctx + (E + 1) / 2.0;
                g->smp.cpeak[(size_t)l * H + h] = ctx + E;
            }
        }
        if (has_wo)
            for (int e = 0; e < E; e++) {
                for (int h = 0; h < H; h++) {
                    memcpy(eq + (size_t)h * c->d, evec + ((size_t)h * E + e) * c->d, sizeof(float) * c->d);
                    fq[h] = rec[(size_t)h * E + e];
                }
                kv_metrics_wo(ml, eq, fq, &g->smp.wo_err[(size_t)l * E + e], &g->smp.wo_bnd[(size_t)l * E + e]);
            }
    }
    for (int h = 0; h < H; h++) {
        const float C = ml->C[h / G];
        long v = 0;
        for (int e = 0; e < E; e++) {
            size_t o = (size_t)h * E + e;
            v += kv_bound_violated(err[o], bnd[o], rec[o], C, c->d);
        }
        g->smp.viol[(size_t)l * H + h] = v;
    }
    for (int s = 0; s < S; s++) {
        double tokens = (fl & KV_POL_NO_EVICT) ? T : peak_s[s];
        g->smp.mem[(size_t)l * S + s] = tokens * c->d * 2.0 * (double)dtype_bytes;
    }
    g->smp.meta[l] = d->meta_bytes ? (double)d->meta_bytes(p, c, &g->b, &keep) : 0.0;
done:
    kv_free(keep.mask);
    kv_free(evec);
    kv_free(eq);
    kv_free(fq);
    kv_free(attn);
    kv_free(peak_s);
    kv_metrics_scratch_free(&ws);
    return rc;
}

/* The order in which the parallel loop hands out the (policy, budget) pairs of a layer: longest
 * first by what each took on the previous layer (layers have the same shape, so that is a good
 * estimate), ties and the first layer by the order on entry (initially the configuration order).
 * Costs differ by an order of magnitude (per-query caches at large budgets against one-shot masks),
 * and in configuration order a long pair often started last and left the other threads idle.
 * Each pair writes only its own slots, so the order changes no result. */
static void schedule_order(const cfg_t *cfg, int n_cfg, int *order)
{
    for (int x = 1; x < n_cfg; x++) { /* stable insertion sort: a few dozen pairs */
        const int k = order[x];
        int y = x;
        while (y > 0 && cfg[order[y - 1]].t_layer < cfg[k].t_layer) {
            order[y] = order[y - 1];
            y--;
        }
        order[y] = k;
    }
}

/* ---------------------------------------------------------------- kept sets (--kept) */

/* Hand every (policy, budget)'s kept masks over to a kv_kept_t (sim/kept.h). */
static int kept_collect(cfg_t *cfg, int n_cfg, int n_pol, int n_budgets, const kv_trace_meta_t *m, int n_ctx,
                        kv_kept_t **out)
{
    kv_kept_t *k;
    int rc = kv_kept_create(n_pol, n_budgets, m->n_layers, m->n_tokens, n_ctx, &k);
    if (rc)
        return rc;
    for (int x = 0; x < n_cfg && rc == KV_OK; x++) {
        cfg_t *g = &cfg[x];
        rc = kv_kept_set(k, g->pi, g->bi, g->p, &g->b, g->smp.S, g->kept_mask);
        if (rc == KV_OK)
            g->kept_mask = NULL; /* now owned by k */
    }
    if (rc) {
        kv_kept_free(k);
        return rc;
    }
    *out = k;
    return KV_OK;
}

/* ---------------------------------------------------------------- the engine */

static void fill_ctx(kv_layer_ctx_t *c, const kv_trace_meta_t *m, int layer, int n_ctx, int q0, const kv_layer_buf_t *b,
                     kv_backend_t *be, kv_layer_stats_t *ls, uint64_t seed)
{
    memset(c, 0, sizeof *c);
    c->meta = m;
    c->layer = layer;
    c->n_layers = m->n_layers;
    c->H = m->n_heads;
    c->Hkv = m->n_kv_heads;
    c->G = m->n_heads / m->n_kv_heads;
    c->d = m->head_dim;
    c->T = m->n_tokens;
    c->n_ctx = n_ctx;
    c->n_eval = m->n_tokens - n_ctx;
    c->q = b->q;
    c->q0 = q0;
    c->q_hs = (size_t)(m->n_tokens - q0) * m->head_dim;
    c->k = b->k;
    c->v = b->v;
    c->wo = b->wo;
    c->be = be;
    c->seed = seed;
    const kv_stored_colstats_t stored = {b->col[0], b->col[1], b->col[2],     b->col[3],
                                         b->col[4], b->col[5], m->stats_split};
    kv_layer_stats_begin(ls, c, &stored);
}

int kv_replay_stats_source(const kv_trace_meta_t *m, int eval_tail, int requested, int *source, char *note)
{
    const int n_ctx = m->n_prompt - eval_tail, lean = m->q_start > 0;
    if (note)
        note[0] = 0;
    if (lean && n_ctx < m->q_start)
        return kv_error(KV_EUNAVAIL,
                        "--eval-tail %d needs the queries of prompt tokens %d..%d, and this lean trace stores the "
                        "queries of its last %d prompt tokens only (from token %d; captured with --q-tail %d)",
                        eval_tail, n_ctx, m->n_prompt - 1, m->n_prompt - m->q_start, m->q_start,
                        m->n_prompt - m->q_start);
    /* the stored statistics serve a context that is the whole prompt, or ends after stats_split */
    const int covered = m->has_stats && (n_ctx == m->n_prompt || n_ctx >= m->stats_split);
    if (requested == KV_STATS_RECOMPUTE) {
        if (lean)
            return kv_error(KV_EUNAVAIL,
                            "--stats recompute needs the query of every prompt token, and this lean trace stores "
                            "them from token %d on only (captured with --q-tail %d); use --stats trace",
                            m->q_start, m->n_prompt - m->q_start);
        *source = KV_STATS_RECOMPUTE;
        return KV_OK;
    }
    if (requested == KV_STATS_TRACE) {
        if (!m->has_stats)
            return kv_error(KV_EUNAVAIL,
                            "--stats trace: the trace stores no statistics (format version 1, or synth --summaries "
                            "no); use --stats recompute");
        if (!covered)
            return kv_error(KV_EUNAVAIL,
                            "--stats trace: the trace's statistics cover the prompt queries [0, %d) and [0, %d), and "
                            "--eval-tail %d leaves a context of %d tokens, before %d; use --stats recompute",
                            m->stats_split, m->n_prompt, eval_tail, n_ctx, m->stats_split);
        *source = KV_STATS_TRACE;
        return KV_OK;
    }
    if (requested != KV_STATS_AUTO)
        return kv_error(KV_EINVAL, "unknown statistics source %d", requested);
    if (covered) {
        *source = KV_STATS_TRACE;
        return KV_OK;
    }
    if (lean) /* n_ctx >= q_start = stats_split in the traces kvsim writes: not reached for those */
        return kv_error(KV_EUNAVAIL, "the lean trace's statistics do not cover a context of %d tokens", n_ctx);
    *source = KV_STATS_RECOMPUTE;
    if (note && m->has_stats)
        snprintf(note, 256,
                 "--eval-tail %d goes beyond the %d prompt queries after the trace's statistics split (token %d): "
                 "recomputing the column statistics from Q and K (O(T^2))",
                 eval_tail, m->n_prompt - m->stats_split, m->stats_split);
    return KV_OK;
}

/* What the engine reads of each layer for this source and context. */
static kv_stream_want_t want_for(const kv_trace_meta_t *m, int source, int n_ctx)
{
    kv_stream_want_t w = {.q0 = m->q_start, .wo = m->has_wo};
    if (source == KV_STATS_TRACE) {
        w.col_full = n_ctx == m->n_prompt;
        w.col_head = !w.col_full;
    }
    return w;
}

/* Prepare every policy for the layer (kv_policy_prepare's errors name the policy and the layer). */
static int prepare_all(kv_policy_t **pols, int n_pol, kv_layer_ctx_t *c)
{
    for (int i = 0; i < n_pol; i++) {
        int rc = kv_policy_prepare(pols[i], c);
        if (rc)
            return rc;
    }
    return KV_OK;
}

/* Loud, once per replay: the layers and heads whose Q, K or V hold NaN or inf (their rows report nan
 * and the count), and rows whose metrics came out NaN from finite inputs (scores beyond float). */
static void warn_nonfinite(const char *path, const kv_trace_meta_t *m, const long *nf_q, const long *nf_kv,
                           const kv_results_t *res)
{
    const int H = m->n_heads, Hkv = m->n_kv_heads;
    long total = 0;
    int places = 0;
    char list[512] = "";
    size_t k = 0;
    for (int l = 0; l < m->n_layers; l++) {
        long q = 0, kv = 0;
        for (int h = 0; h < H; h++)
            q += nf_q[(size_t)l * H + h];
        for (int g = 0; g < Hkv; g++)
            kv += nf_kv[(size_t)l * Hkv + g];
        if (!q && !kv)
            continue;
        total += q + kv;
        if (places++ < 6 && k < sizeof list)
            k += (size_t)snprintf(list + k, sizeof list - k, "%slayer %d: %ld in Q, %ld in K/V", places > 1 ? "; " : "",
                                  l, q, kv);
    }
    if (total)
        kv_warn("%s: %ld NaN or infinite values in the trace's Q, K and V (%s%s): every result row that reads them "
                "reports nan metrics and the count in its nonfinite column",
                path, total, list, places > 6 ? "; ..." : "");
    long nan_rows = 0;
    for (size_t i = 0; i < res->n; i++)
        nan_rows += res->rows[i].nonfinite == 0 && isnan(res->rows[i].recall_mean);
    if (nan_rows)
        kv_warn(
            "%s: %ld result rows have nan metrics from finite Q, K and V (attention scores beyond the float range?)",
            path, nan_rows);
}

int kv_replay(kv_trace_t *t, kv_policy_t **pols, int n_pol, const kv_budget_t *budgets, int n_budgets, kv_backend_t *be,
              const kv_replay_opts_t *opts, kv_results_t **out)
{
    *out = NULL;
    kv_replay_opts_t o;
    if (opts)
        o = *opts;
    else
        kv_replay_defaults(&o);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const char *path = kv_trace_path(t);
    const int L = m->n_layers, H = m->n_heads, T = m->n_tokens;
    if (o.eval_tail < 0 || o.eval_tail >= m->n_prompt)
        return kv_error(KV_ERANGE, "--eval-tail %d must leave at least one context token (prompt has %d)", o.eval_tail,
                        m->n_prompt);
    const int n_ctx = m->n_prompt - o.eval_tail, E = T - n_ctx;
    if (E <= 0)
        return kv_error(KV_EINVAL,
                        "%s: the trace has no decode queries to evaluate (capture with --decode N, or replay "
                        "with --eval-tail N to hold out the end of the prompt)",
                        path);
    const char *missing = kv_backend_missing_op(be);
    if (missing && (!be->ops->attn_probs || !be->ops->attn_colstats))
        return kv_error(KV_EUNAVAIL, "backend %s lacks the '%s' op needed by replay", be->name, missing);
    int source;
    char note[256];
    int rc0 = kv_replay_stats_source(m, o.eval_tail, o.stats_source, &source, note);
    if (rc0)
        return kv_error_context(rc0, "%s", path);
    if (note[0] && !o.quiet)
        kv_info("replay: %s", note);
    if (o.stats)
        memset(o.stats, 0, sizeof *o.stats);
    if (o.stats)
        o.stats->stats_source = source;
    for (int i = 0; i < n_pol; i++) {
        if ((pols[i]->flags & KV_POL_NEEDS_SEGMENTS) && m->n_segments < 1)
            return kv_error(KV_EINVAL,
                            "%s: policy %s needs segments and the trace has none (capture a prompt with "
                            "<|endoftext|> separators or --segments)",
                            path, pols[i]->label);
        if ((pols[i]->flags & KV_POL_NEEDS_WO) && !m->has_wo)
            return kv_error(KV_EINVAL, "%s: policy %s needs W_O and the trace has none (capture with --with-wo)", path,
                            pols[i]->label);
    }
    const size_t dtype_bytes = m->dtype == KV_DTYPE_F16 ? 2 : 4;
    int n_cfg = n_pol * n_budgets, rc = KV_OK;
    cfg_t *cfg = kv_calloc((size_t)n_cfg, sizeof *cfg, "replay configurations");
    kv_budget_t *bud = kv_malloc(sizeof *bud * (size_t)n_budgets, "budgets");
    kv_results_t *res = NULL;
    kv_stream_t stream = {0};
    kv_layer_buf_t *lb = NULL;
    kv_layer_stats_t *ls = NULL;
    kv_metrics_layer_t ml = {0};
    float *p_eval = NULL;
    int *order = NULL;
    long *nf_q = NULL, *nf_kv = NULL;
    kv_result_row_t *rows = NULL;
    double t_start = kv_now(), t_mark;
    if (o.kept)
        *o.kept = NULL;
    if (!cfg || !bud || kv_results_create(&res) != KV_OK) {
        rc = KV_ENOMEM;
        goto done;
    }
    if ((rc = kv_layer_stats_create(be, (kv_layer_stats_source_t)source, &ls)))
        goto done;
    for (int b = 0; b < n_budgets; b++) {
        bud[b] = budgets[b];
        if ((rc = kv_budget_resolve(&bud[b], m, n_ctx)))
            goto done;
        if (bud[b].tokens >= n_ctx && !o.quiet)
            kv_info("budget %s keeps the whole context (%d tokens): no compression at this budget", bud[b].text, n_ctx);
        if ((rc = kv_results_add_budget(res, bud[b].text)))
            goto done;
    }
    for (int i = 0; i < n_pol; i++)
        if ((rc = kv_results_add_label(res, pols[i]->label)))
            goto done;
    for (int i = 0; i < n_pol; i++)
        for (int b = 0; b < n_budgets; b++) {
            cfg_t *g = &cfg[i * n_budgets + b];
            g->p = pols[i];
            g->pi = i;
            g->bi = b;
            g->b = bud[b];
            if ((rc = cfg_alloc(g, L, H, m->n_kv_heads, E)))
                goto done;
            if (o.kept && !(g->kept_mask = kv_calloc((size_t)L * g->smp.S * T, 1, "kept sets"))) {
                rc = KV_ENOMEM;
                goto done;
            }
        }
    p_eval = kv_malloc(sizeof(float) * (size_t)H * E * T, "evaluation attention");
    order = kv_malloc(sizeof(int) * (size_t)n_cfg, "schedule");
    nf_q = kv_calloc((size_t)L * H, sizeof(long), "non-finite counts");
    nf_kv = kv_calloc((size_t)L * m->n_kv_heads, sizeof(long), "non-finite counts");
    if (!p_eval || !order || !nf_q || !nf_kv) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int k = 0; k < n_cfg; k++) {
        order[k] = k;
        cfg[k].smp.nf_q = nf_q;
        cfg[k].smp.nf_kv = nf_kv;
    }
    int cross = 0;
    for (int i = 0; i < n_pol; i++)
        cross |= (pols[i]->flags & KV_POL_CROSS_LAYER) != 0;
    const int prefetch = o.prefetch == KV_PREFETCH_AUTO ? !be->host_memory : o.prefetch != 0;
    if (o.stats)
        o.stats->prefetched = prefetch;
    /* the layers in the order they are used: the pre-pass, then the replay */
    const kv_stream_want_t want = want_for(m, source, n_ctx);
    if ((rc = kv_stream_open(&stream, t, &want, L * (cross ? 2 : 1), prefetch)))
        goto done;
    int seq = 0;
    kv_progress_t prog;
    kv_progress_begin(&prog, "replay", (long)L * (cross ? 2 : 1));
    long step = 0;
    kv_layer_ctx_t c;
    char detail[128];
    if (cross) {
        for (int l = 0; l < L && rc == KV_OK; l++, seq++) {
            if ((rc = kv_stream_get(&stream, seq, &lb)))
                break;
            fill_ctx(&c, m, l, n_ctx, want.q0, lb, be, ls, o.seed);
            for (int i = 0; i < n_pol && rc == KV_OK; i++)
                if ((pols[i]->flags & KV_POL_CROSS_LAYER) && pols[i]->desc->prescore &&
                    (rc = pols[i]->desc->prescore(pols[i], &c)))
                    kv_error_context(rc, "%s", pols[i]->label);
            kv_layer_stats_end(ls); /* nothing of the layer is used after this point */
            kv_stream_done(&stream, seq);
            snprintf(detail, sizeof detail, "pre-pass layer %d", l);
            if (!o.quiet)
                kv_progress_update(&prog, ++step, detail);
        }
        for (int i = 0; i < n_pol && rc == KV_OK; i++)
            if ((pols[i]->flags & KV_POL_CROSS_LAYER) && pols[i]->desc->allocate)
                rc = pols[i]->desc->allocate(pols[i], m, n_ctx, bud, n_budgets);
    }
    for (int l = 0; l < L && rc == KV_OK; l++, seq++) {
        if ((rc = kv_stream_get(&stream, seq, &lb)))
            break;
        fill_ctx(&c, m, l, n_ctx, want.q0, lb, be, ls, o.seed);
        kv_metrics_nonfinite(&c, nf_q + (size_t)l * H, nf_kv + (size_t)l * m->n_kv_heads);
        if ((rc = kv_layer_stats_eval_probs(&c, p_eval)))
            break;
        c.p_eval = p_eval;
        kv_metrics_layer_free(&ml);
        if ((rc = kv_metrics_layer_init(&ml, &c)))
            break;
        t_mark = kv_now();
        double attn0;
        kv_layer_stats_time(ls, &attn0, NULL);
        if ((rc = prepare_all(pols, n_pol, &c)))
            break;
        if (o.stats) { /* shared statistics computed on a policy's request count as attention time */
            double attn1;
            kv_layer_stats_time(ls, &attn1, NULL);
            o.stats->t_policies += (kv_now() - t_mark) - (attn1 - attn0);
        }
        t_mark = kv_now();
        int old = kv_blas_set_threads(1);
        schedule_order(cfg, n_cfg, order);
#pragma omp parallel for schedule(dynamic, 1)
        for (int x = 0; x < n_cfg; x++) {
            cfg_t *g = &cfg[order[x]];
            if (g->rc)
                continue;
            double t0 = kv_now();
            g->rc = eval_cfg(g, &c, &ml, dtype_bytes);
            g->t_layer = kv_now() - t0;
            if (g->rc)
                snprintf(g->msg, sizeof g->msg, "%s at budget %s, layer %d: %s", g->p->label, g->b.text, l,
                         kv_last_error());
        }
        kv_blas_set_threads(old);
        if (o.stats)
            o.stats->t_eval += kv_now() - t_mark;
        for (int k = 0; k < n_cfg; k++)
            if (cfg[k].rc) {
                rc = kv_error(cfg[k].rc, "%s", cfg[k].msg);
                break;
            }
        kv_stream_done(&stream, seq);
        snprintf(detail, sizeof detail, "layer %d, %d polic%s x %d budget%s", l, n_pol, n_pol == 1 ? "y" : "ies",
                 n_budgets, n_budgets == 1 ? "" : "s");
        if (!o.quiet)
            kv_progress_update(&prog, ++step, detail);
    }
    if (rc)
        goto done;
    if (!o.quiet)
        kv_progress_end(&prog, NULL);
    const size_t per_cfg = kv_rows_per_cfg(L, H, o.head_rows);
    rows = kv_malloc(sizeof *rows * per_cfg * (size_t)n_cfg, "result rows");
    if (!rows) {
        rc = KV_ENOMEM;
        goto done;
    }
#pragma omp parallel for schedule(dynamic, 1)
    for (int k = 0; k < n_cfg; k++)
        cfg[k].rc = kv_emit_rows(&cfg[k].smp, cfg[k].p, cfg[k].pi, cfg[k].bi, cfg[k].b.tokens,
                                 m->n_heads / m->n_kv_heads, m->has_wo, o.head_rows, rows + (size_t)k * per_cfg);
    for (int k = 0; k < n_cfg && rc == KV_OK; k++) {
        if (cfg[k].rc) {
            rc = kv_error(cfg[k].rc, "aggregating the samples of %s at budget %s: out of memory", cfg[k].p->label,
                          cfg[k].b.text);
            break;
        }
        for (size_t x = 0; x < per_cfg && rc == KV_OK; x++)
            rc = kv_results_append(res, &rows[(size_t)k * per_cfg + x]);
        long v = 0;
        for (size_t x = 0; x < (size_t)L * H; x++)
            v += cfg[k].smp.viol[x];
        if (v)
            kv_warn("BOUND VIOLATED: %s at budget %s: %ld queries have an output error above the Ada-KV bound "
                    "(beyond float tolerance); this is a bug, please report it",
                    cfg[k].p->label, cfg[k].b.text, v);
    }
    if (rc == KV_OK && o.kept)
        rc = kept_collect(cfg, n_cfg, n_pol, n_budgets, m, n_ctx, o.kept);
    if (rc == KV_OK) {
        warn_nonfinite(path, m, nf_q, nf_kv, res);
        *out = res;
        res = NULL;
    }
done:
    /* first: the reader may still be filling a buffer */
    kv_stream_close(&stream, o.stats ? &o.stats->t_read : NULL, o.stats ? &o.stats->t_read_wait : NULL,
                    o.stats ? &o.stats->layers_read : NULL);
    if (o.stats) {
        if (ls)
            kv_layer_stats_time(ls, &o.stats->t_attn, &o.stats->attn_flop);
        o.stats->t_total = kv_now() - t_start;
    }
    if (cfg)
        for (int k = 0; k < n_cfg; k++)
            cfg_free(&cfg[k]);
    kv_free(cfg);
    kv_free(bud);
    kv_results_free(res);
    kv_free(p_eval);
    kv_free(order);
    kv_free(nf_q);
    kv_free(nf_kv);
    kv_free(rows);
    kv_metrics_layer_free(&ml);
    kv_layer_stats_free(ls);
    return rc;
}

/* The probe of one layer (masks: its mask) or, with all = 1, of layers 0..layer (masks: (layer + 1)
 * masks one after the other). */
static int probe(kv_trace_t *t, int layer, int all, kv_policy_t *p, const kv_budget_t *b, int eval_index,
                 const kv_replay_opts_t *opts, kv_backend_t *be, uint8_t *mask)
{
    kv_replay_opts_t o;
    if (opts)
        o = *opts;
    else
        kv_replay_defaults(&o);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const int n_ctx = m->n_prompt - o.eval_tail, E = m->n_tokens - n_ctx, L = m->n_layers;
    if (layer < 0 || layer >= L || E <= 0 || eval_index < 0 || eval_index >= E)
        return kv_error(KV_ERANGE, "probe: layer %d / evaluation query %d out of range", layer, eval_index);
    if (p->flags & KV_POL_CROSS_LAYER)
        return kv_error(KV_EINVAL, "probe: cross-layer policies need a full replay");
    int source;
    int rc0 = kv_replay_stats_source(m, o.eval_tail, o.stats_source, &source, NULL);
    if (rc0)
        return rc0;
    cfg_t g = {0};
    g.p = p;
    g.b = *b;
    int rc = kv_budget_resolve(&g.b, m, n_ctx);
    kv_stream_t stream = {0};
    kv_layer_buf_t *lb = NULL;
    float *p_eval = NULL;
    kv_layer_stats_t *ls = NULL;
    kv_metrics_layer_t ml = {0};
    kv_layer_ctx_t c;
    if (rc || (rc = cfg_alloc(&g, L, m->n_heads, m->n_kv_heads, E)) ||
        (rc = kv_layer_stats_create(be, (kv_layer_stats_source_t)source, &ls)))
        goto done;
    p_eval = kv_malloc(sizeof(float) * (size_t)m->n_heads * E * m->n_tokens, "evaluation attention");
    if (!p_eval) {
        rc = KV_ENOMEM;
        goto done;
    }
    /* layers before `layer` run too: policies may carry state across layers (ChunkKV reuse) */
    const kv_stream_want_t want = want_for(m, source, n_ctx);
    if ((rc = kv_stream_open(&stream, t, &want, layer + 1, 0)))
        goto done;
    for (int l = 0; l <= layer && rc == KV_OK; l++) {
        if ((rc = kv_stream_get(&stream, l, &lb)))
            break;
        fill_ctx(&c, m, l, n_ctx, want.q0, lb, be, ls, o.seed);
        if ((rc = kv_layer_stats_eval_probs(&c, p_eval)))
            break;
        c.p_eval = p_eval;
        kv_metrics_layer_free(&ml);
        if ((rc = kv_metrics_layer_init(&ml, &c)) || (rc = kv_policy_prepare(p, &c)))
            break;
        const size_t mask_bytes = (size_t)(p->gran == KV_GRAN_KV ? m->n_kv_heads : m->n_heads) * m->n_tokens;
        g.probe_e = eval_index;
        g.probe_mask = all ? mask + (size_t)l * mask_bytes : l == layer ? mask : NULL;
        rc = eval_cfg(&g, &c, &ml, 2);
    }
done:
    kv_stream_close(&stream, NULL, NULL, NULL);
    cfg_free(&g);
    kv_free(p_eval);
    kv_metrics_layer_free(&ml);
    kv_layer_stats_free(ls);
    return rc;
}

int kv_replay_probe(kv_trace_t *t, int layer, kv_policy_t *p, const kv_budget_t *b, int eval_index,
                    const kv_replay_opts_t *opts, kv_backend_t *be, uint8_t *mask)
{
    return probe(t, layer, 0, p, b, eval_index, opts, be, mask);
}

int kv_replay_probe_all(kv_trace_t *t, kv_policy_t *p, const kv_budget_t *b, int eval_index,
                        const kv_replay_opts_t *opts, kv_backend_t *be, uint8_t *masks)
{
    return probe(t, kv_trace_meta(t)->n_layers - 1, 1, p, b, eval_index, opts, be, masks);
}

int kv_replay_check_policies(kv_trace_t *t, kv_policy_t **pols, int n_pol, kv_backend_t *be,
                             const kv_replay_opts_t *opts, int *ok, char (*why)[1024])
{
    kv_replay_opts_t o;
    if (opts)
        o = *opts;
    else
        kv_replay_defaults(&o);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    for (int i = 0; i < n_pol; i++) {
        ok[i] = 1;
        if (why)
            why[i][0] = 0;
    }
    if (m->q_start == 0)
        return KV_OK; /* every query is there */
    const int n_ctx = m->n_prompt - o.eval_tail;
    int source, rc = kv_replay_stats_source(m, o.eval_tail, o.stats_source, &source, NULL);
    if (rc)
        return rc;
    kv_stream_t stream = {0};
    kv_layer_buf_t *lb = NULL;
    kv_layer_stats_t *ls = NULL;
    float *p_eval =
        kv_malloc(sizeof(float) * (size_t)m->n_heads * (m->n_tokens - n_ctx) * m->n_tokens, "evaluation attention");
    const kv_stream_want_t want = want_for(m, source, n_ctx);
    kv_layer_ctx_t c;
    if (!p_eval) {
        rc = KV_ENOMEM;
        goto done;
    }
    if ((rc = kv_layer_stats_create(be, (kv_layer_stats_source_t)source, &ls)) ||
        (rc = kv_stream_open(&stream, t, &want, 1, 0)) || (rc = kv_stream_get(&stream, 0, &lb)))
        goto done;
    fill_ctx(&c, m, 0, n_ctx, want.q0, lb, be, ls, o.seed);
    if ((rc = kv_layer_stats_eval_probs(&c, p_eval)))
        goto done;
    c.p_eval = p_eval;
    for (int i = 0; i < n_pol && rc == KV_OK; i++) {
        kv_policy_t *p = pols[i];
        /* cross-layer policies read their statistics in the pre-pass (prescore), the others in prepare */
        const int pre = (p->flags & KV_POL_CROSS_LAYER) && p->desc->prescore;
        int prc = pre ? p->desc->prescore(p, &c) : kv_policy_prepare(p, &c);
        if (prc == KV_EUNAVAIL) {
            ok[i] = 0;
            if (why)
                snprintf(why[i], sizeof why[i], "%s", kv_last_error());
        } else if (prc) {
            rc = pre ? kv_error_context(prc, "%s", p->label) : prc;
        }
    }
done:
    kv_stream_close(&stream, NULL, NULL, NULL);
    kv_layer_stats_free(ls);
    kv_free(p_eval);
    return rc;
}
