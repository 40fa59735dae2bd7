/*
 * funnel.c: funnel statistics of a trace (see kv_analyze.h) and the row statistics behind them.
 *
 * Which queries count. Query i sees keys [0, i]; a query that sees a handful of keys has trivially
 * concentrated attention, so queries with fewer than min_keys visible keys (default 16) are left
 * out: the counted queries are [q_lo, T) with q_lo = min(min_keys, T) - 1, prompt and decode alike.
 *
 * Where each number comes from.
 *   - entropy, normalised entropy: the ENTROPY summary of every counted query (normalised by
 *     ln(i + 1) for query i) when the trace has summaries; else the sampled rows.
 *   - sink mass p_i0: exact for every counted query from LSE, p_i0 = exp(q_i.k_0 / sqrt(d) - lse_i),
 *     when the trace has summaries; else the sampled rows.
 *   - fraction of keys for `mass` (default 0.9) and in-segment mass: the sampled rows, recomputed from
 *     Q and K through the backend op attn_probs. The sample is max_queries (default 64) counted
 *     queries per head in evenly spaced runs of 8 consecutive queries (the same positions for every
 *     head and layer; see sample_positions), or all of them when there are fewer or when the trace
 *     is short (n_heads x T^2 <= 16M: every row of a layer costs less than a second).
 * Every statistic of a head is the mean over its queries. The query's own segment is the trace
 * segment holding its position (decode queries continue the last one); the segment mass is the
 * attention on keys from that segment's start up to the query.
 *
 * Memory: one layer's Q and K (as replay), the summaries of that layer and H x T floats of rows.
 *
 * Traces that store per-query statistics (format version 2: KEYS90, SINK, SEG beside ENTROPY; capture
 * and synth compute them from every attention row they already have) are read instead, when the mass
 * is the stored one (0.9) and summaries are allowed: every counted query, exact, O(H x T) per layer
 * (funnel_from_stats). Lean traces (queries only at the end) can only be read that way.
 */
#include "analyze/kv_analyze.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ---------------------------------------------------------------- one row */

static void swapf(float *a, float *b)
{
    float t = *a;
    *a = *b;
    *b = t;
}

static float median3(float a, float b, float c)
{
    if (a > b) {
        float t = a;
        a = b;
        b = t;
    }
    if (b > c)
        b = c;
    return a > b ? a : b;
}

int kv_analyze_mass_count(const float *p, int n, double mass, float *a)
{
    if (n <= 0)
        return 0;
    double total = 0;
    for (int i = 0; i < n; i++) {
        float v = p[i] > 0 ? p[i] : 0; /* NaN and negatives carry no mass */
        a[i] = v;
        total += v;
    }
    if (!(total > 0))
        return n;
    double need = mass * total * (1 - 1e-6);
    if (need <= 0)
        return 0;
    /* Quickselect from the top: three-way partition of a[lo, hi) around a pivot into > | == | <;
     * take the whole upper part while it is not enough, else recurse into it. */
    int lo = 0, hi = n, count = 0;
    while (hi > lo) {
        float piv = median3(a[lo], a[lo + (hi - lo) / 2], a[hi - 1]);
        int gt = lo, i = lo, lt = hi;
        while (i < lt) {
            if (a[i] > piv)
                swapf(&a[gt++], &a[i++]);
            else if (a[i] < piv)
                swapf(&a[i], &a[--lt]);
            else
                i++;
        }
        double s_gt = 0;
        for (int k = lo; k < gt; k++)
            s_gt += a[k];
        if (s_gt >= need) {
            hi = gt;
            continue;
        }
        count += gt - lo;
        need -= s_gt;
        int neq = lt - gt;
        if ((double)neq * piv >= need) {
            int k = piv > 0 ? (int)ceil(need / piv) : neq;
            if (k < 1)
                k = 1;
            if (k > neq)
                k = neq;
            return count + k;
        }
        count += neq;
        need -= (double)neq * piv;
        lo = lt;
    }
    return count;
}

void kv_analyze_row_stats(const float *p, int n, int seg_lo, double mass, float *scratch, kv_row_stats_t *o)
{
    double tot = 0;
    int bad = 0;
    for (int i = 0; i < n; i++) {
        bad |= !isfinite(p[i]);
        if (p[i] > 0)
            tot += p[i];
    }
    if (bad) { /* NaN or inf in the row (from the trace): no statistic, not one that skipped them */
        o->entropy = o->norm_entropy = o->frac = o->sink = o->seg = NAN;
        return;
    }
    double H = 0, seg = 0;
    if (tot > 0)
        for (int i = 0; i < n; i++) {
            if (!(p[i] > 0))
                continue;
            double q = p[i] / tot;
            H -= q * log(q);
            if (seg_lo >= 0 && i >= seg_lo)
                seg += q;
        }
    o->entropy = H;
    o->norm_entropy = n >= 2 ? H / log((double)n) : NAN;
    o->frac = n > 0 ? (double)kv_analyze_mass_count(p, n, mass, scratch) / n : NAN;
    o->sink = n > 0 && tot > 0 && p[0] > 0 ? p[0] / tot : 0;
    o->seg = seg_lo >= 0 ? seg : NAN;
}

/* ---------------------------------------------------------------- a trace */

#define SHORT_PROBS (16.0 * 1024 * 1024)

void kv_funnel_opts_init(kv_funnel_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->max_queries = 64;
    o->min_keys = 16;
    o->mass = 0.9;
    o->use_summaries = 1;
    o->all_if_short = 1;
}

void kv_funnel_free(kv_funnel_t *f)
{
    if (!f)
        return;
    kv_free(f->entropy);
    kv_free(f->norm_entropy);
    kv_free(f->frac);
    kv_free(f->sink);
    kv_free(f->seg);
    kv_free(f);
}

double kv_funnel_layer_mean(const kv_funnel_t *f, const double *field, int layer)
{
    double s = 0;
    int n = 0;
    for (int h = 0; h < f->n_heads; h++) {
        double v = field[(size_t)layer * f->n_heads + h];
        if (!isnan(v)) {
            s += v;
            n++;
        }
    }
    return n ? s / n : NAN;
}

/* Sample positions of S counted queries in [q_lo, T), ascending and distinct. A sparse sample
 * (S at most half the counted queries) is taken as runs of RUN consecutive queries, the runs evenly
 * spaced: one backend call computes a whole run, and a call for a single query costs nearly as
 * much as one for eight (the CPU backend packs every key of the head for each call). A dense
 * sample is simply evenly spaced. */
#define RUN 8
static void sample_positions(int q_lo, int T, int S, int *pos)
{
    const int n = T - q_lo;
    if (S >= 2 && 2 * S <= n && S > RUN) {
        const int runs = (S + RUN - 1) / RUN;
        int k = 0;
        for (int r = 0; r < runs; r++) {
            const int len = KV_MIN(RUN, S - r * RUN);
            const int start = q_lo + (int)lround((double)r * (n - RUN) / (runs - 1));
            for (int i = 0; i < len; i++)
                pos[k++] = start + i;
        }
        return;
    }
    for (int s = 0; s < S; s++)
        pos[s] = S == 1 ? T - 1 : q_lo + (int)lround((double)s * (n - 1) / (S - 1));
}

/* Every statistic from the stored per-query statistics: means over the counted queries [q_lo, T). */
static int funnel_from_stats(kv_trace_t *t, const kv_funnel_opts_t *o, int q_lo, kv_funnel_t *f)
{
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const int L = m->n_layers, H = m->n_heads, T = m->n_tokens, n_count = T - q_lo;
    const kv_tensor_t which[4] = {KV_T_ENTROPY, KV_T_KEYS90, KV_T_SINK, KV_T_SEG};
    float *buf = kv_malloc(sizeof(float) * 4 * (size_t)H * T, "funnel statistics");
    if (!buf)
        return KV_ENOMEM;
    int rc = KV_OK;
    kv_progress_t pr;
    if (!o->quiet)
        kv_progress_begin(&pr, "funnel statistics", L);
    for (int l = 0; l < L && rc == KV_OK; l++) {
        for (int w = 0; w < 4 && rc == KV_OK; w++)
            rc = kv_trace_read(t, l, which[w], buf + (size_t)w * H * T);
        if (rc)
            break;
        for (int h = 0; h < H; h++) {
            const float *ent = buf + (size_t)h * T, *k90 = buf + ((size_t)H + h) * T;
            const float *snk = buf + ((size_t)2 * H + h) * T, *seg = buf + ((size_t)3 * H + h) * T;
            double se = 0, sn = 0, sf = 0, ss = 0, sg = 0;
            int nn = 0;
            for (int i = q_lo; i < T; i++) {
                se += ent[i];
                if (i >= 1) {
                    sn += ent[i] / log((double)i + 1);
                    nn++;
                }
                sf += k90[i] / (double)(i + 1);
                ss += snk[i];
                sg += seg[i];
            }
            const size_t x = (size_t)l * H + h;
            f->entropy[x] = se / n_count;
            f->norm_entropy[x] = nn ? sn / nn : NAN;
            f->frac[x] = sf / n_count;
            f->sink[x] = ss / n_count;
            f->seg[x] = m->n_segments > 0 ? sg / n_count : NAN;
        }
        if (!o->quiet) {
            char det[64];
            snprintf(det, sizeof det, "layer %d", l);
            kv_progress_update(&pr, l + 1, det);
        }
    }
    if (rc == KV_OK && !o->quiet)
        kv_progress_end(&pr, "every counted query, from the trace's stored statistics");
    kv_free(buf);
    return rc;
}

int kv_funnel_compute(kv_trace_t *t, kv_backend_t *be, const kv_funnel_opts_t *opt, kv_funnel_t **out)
{
    *out = NULL;
    kv_funnel_opts_t o;
    if (opt)
        o = *opt;
    else
        kv_funnel_opts_init(&o);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const int L = m->n_layers, H = m->n_heads, Hkv = m->n_kv_heads, d = m->head_dim, T = m->n_tokens;
    const int G = H / Hkv;
    if (T < 1 || L < 1 || H < 1)
        return kv_error(KV_EINVAL, "%s: empty trace", kv_trace_path(t));
    if (!(o.mass > 0 && o.mass <= 1))
        return kv_error(KV_EINVAL, "funnel statistics: mass %g outside (0, 1]", o.mass);
    if (!be->ops->attn_probs)
        return kv_error(KV_ENOTIMPL, "funnel statistics: backend %s lacks attn_probs", be->name);
    int min_keys = o.min_keys < 1 ? 1 : o.min_keys;
    const int q_lo = KV_MIN(min_keys, T) - 1, n_count = T - q_lo;
    /* short traces (a layer's whole attention within SHORT_PROBS probabilities): every query */
    const int short_trace = o.all_if_short && (double)H * T * T <= SHORT_PROBS;
    const int S = (o.max_queries <= 0 || n_count <= o.max_queries || short_trace) ? n_count : o.max_queries;
    const int sums = o.use_summaries && kv_trace_has(t, KV_T_ENTROPY) && kv_trace_has(t, KV_T_LSE);
    const float scale = 1.0f / sqrtf((float)d);
    const int stored = o.use_summaries && kv_trace_has(t, KV_T_KEYS90) && fabs(o.mass - KV_TRACE_KEYS_MASS) < 1e-9;
    if (!stored && m->q_start > 0)
        return kv_error(KV_EUNAVAIL,
                        "%s: funnel statistics %s need every query, and this lean trace stores the queries from "
                        "token %d on only (its stored statistics give them for mass %g)",
                        kv_trace_path(t), o.use_summaries ? "for another mass" : "recomputed from Q and K", m->q_start,
                        KV_TRACE_KEYS_MASS);

    kv_funnel_t *f = kv_calloc(1, sizeof *f, "funnel statistics");
    float *q = NULL, *k = NULL, *ent = NULL, *lse = NULL, *probs = NULL, *scratch = NULL;
    int *pos = NULL;
    void *dq = NULL, *dk = NULL;
    int rc = KV_ENOMEM;
    if (!f)
        goto fail;
    const size_t LH = (size_t)L * H;
    f->n_layers = L;
    f->n_heads = H;
    f->n_tokens = T;
    f->mass = o.mass;
    f->q_lo = q_lo;
    f->n_sampled = S;
    f->from_summaries = sums;
    f->has_segments = m->n_segments > 0;
    f->entropy = kv_calloc(LH, sizeof(double), "funnel entropy");
    f->norm_entropy = kv_calloc(LH, sizeof(double), "funnel entropy");
    f->frac = kv_calloc(LH, sizeof(double), "funnel fraction");
    f->sink = kv_calloc(LH, sizeof(double), "funnel sink");
    f->seg = kv_calloc(LH, sizeof(double), "funnel segment mass");
    if (stored) {
        if (!f->entropy || !f->norm_entropy || !f->frac || !f->sink || !f->seg)
            goto fail;
        f->n_sampled = n_count;
        f->from_summaries = f->from_stats = 1;
        if ((rc = funnel_from_stats(t, &o, q_lo, f)))
            goto fail;
        *out = f;
        return KV_OK;
    }
    q = kv_malloc(sizeof(float) * (size_t)H * T * d, "funnel Q");
    k = kv_malloc(sizeof(float) * (size_t)Hkv * T * d, "funnel K");
    const size_t cap = KV_MAX((size_t)H * T, (size_t)4 << 20); /* floats of one block of rows */
    probs = kv_malloc(sizeof(float) * cap, "funnel rows");
    scratch = kv_malloc(sizeof(float) * (size_t)H * T, "funnel scratch");
    pos = kv_malloc(sizeof(int) * (size_t)S, "funnel sample");
    if (!f->entropy || !f->norm_entropy || !f->frac || !f->sink || !f->seg || !q || !k || !probs || !scratch || !pos)
        goto fail;
    if (sums) {
        ent = kv_malloc(sizeof(float) * (size_t)H * T, "funnel entropy summary");
        lse = kv_malloc(sizeof(float) * (size_t)H * T, "funnel lse summary");
        if (!ent || !lse)
            goto fail;
    }
    sample_positions(q_lo, T, S, pos);

    kv_progress_t pr;
    if (!o.quiet)
        kv_progress_begin(&pr, "funnel statistics", L);
    for (int l = 0; l < L; l++) {
        if ((rc = kv_trace_read(t, l, KV_T_Q, q)) || (rc = kv_trace_read(t, l, KV_T_K, k)))
            goto fail;
        if (sums && ((rc = kv_trace_read(t, l, KV_T_ENTROPY, ent)) || (rc = kv_trace_read(t, l, KV_T_LSE, lse))))
            goto fail;
        double *E = f->entropy + (size_t)l * H, *NE = f->norm_entropy + (size_t)l * H, *F = f->frac + (size_t)l * H;
        double *SK = f->sink + (size_t)l * H, *SG = f->seg + (size_t)l * H;
        if (sums) {
            for (int h = 0; h < H; h++) {
                const float *k0 = k + (size_t)(h / G) * T * d; /* key 0 of the head's KV head */
                double se = 0, sn = 0, ss = 0;
                int nn = 0;
                for (int i = q_lo; i < T; i++) {
                    double e = ent[(size_t)h * T + i];
                    se += e;
                    if (i >= 1) {
                        sn += e / log((double)i + 1);
                        nn++;
                    }
                    const float *qi = q + ((size_t)h * T + i) * d;
                    double dot = 0;
                    for (int x = 0; x < d; x++)
                        dot += (double)qi[x] * k0[x];
                    double p0 = exp(dot * scale - lse[(size_t)h * T + i]);
                    ss += p0 > 1 ? 1 : p0; /* f16 storage can push the recomputed score a hair past lse */
                }
                E[h] = se / n_count;
                NE[h] = nn ? sn / nn : NAN;
                SK[h] = ss / n_count;
            }
        }
        /* sampled rows */
        if ((rc = kv_be_view(be, q, sizeof(float) * (size_t)H * T * d, &dq)) ||
            (rc = kv_be_view(be, k, sizeof(float) * (size_t)Hkv * T * d, &dk)))
            goto fail;
        double *acc = kv_calloc((size_t)H * 5, sizeof(double), "funnel sums");
        int *acc_n = kv_calloc((size_t)H, sizeof(int), "funnel counts");
        if (!acc || !acc_n) {
            kv_free(acc);
            kv_free(acc_n);
            rc = KV_ENOMEM;
            goto fail;
        }
        /* Rows in blocks of consecutive queries (one attn_probs call each): dense samples (short
         * traces: every query) share a call, sparse ones get a call each. A block computes rows
         * [i0, i1] over keys [0, i1], at most cap floats. */
        for (int s0 = 0; s0 < S && rc == KV_OK;) {
            const int i0 = pos[s0];
            int s1 = s0 + 1;
            while (s1 < S && pos[s1] - pos[s1 - 1] <= 4 &&
                   (size_t)H * (size_t)(pos[s1] - i0 + 1) * (size_t)(pos[s1] + 1) <= cap)
                s1++;
            const int i1 = pos[s1 - 1], nq = i1 - i0 + 1, nk = i1 + 1;
            kv_qk_args_t a = {.q = (const float *)dq + (size_t)i0 * d,
                              .q_head_stride = (size_t)T * d,
                              .k = dk,
                              .k_head_stride = (size_t)T * d,
                              .n_heads = H,
                              .n_kv_heads = Hkv,
                              .head_dim = d,
                              .n_q = nq,
                              .q_pos0 = i0,
                              .n_k = nk,
                              .causal = 1,
                              .scale = scale};
            const size_t bytes = sizeof(float) * (size_t)H * nq * nk;
            void *dp = NULL;
            if ((rc = kv_be_out(be, probs, bytes, &dp)))
                break;
            rc = be->ops->attn_probs(be, &a, dp, NULL);
            int rc2 = kv_be_fetch(be, probs, dp, bytes);
            if (rc || (rc = rc2))
                break;
            for (int s = s0; s < s1; s++) {
                const int i = pos[s], n = i + 1;
                const int seg_lo =
                    m->n_segments > 0 ? m->segments[kv_trace_segment_of(m, KV_MIN(i, m->n_prompt - 1))] : -1;
                /* threads only for long rows: on two cores, many tiny parallel regions between the
                 * backend's BLAS calls spin-wait against each other (measured: 20x slower) */
#pragma omp parallel for schedule(static) if ((size_t)H * n >= ((size_t)1 << 20))
                for (int h = 0; h < H; h++) {
                    kv_row_stats_t st;
                    kv_analyze_row_stats(probs + ((size_t)h * nq + (i - i0)) * nk, n, seg_lo, o.mass,
                                         scratch + (size_t)h * T, &st);
                    double *A = acc + (size_t)h * 5;
                    A[0] += st.entropy; /* a row with NaN (isnan(entropy)) makes every mean NaN */
                    if (!isnan(st.norm_entropy) || isnan(st.entropy)) {
                        A[1] += st.norm_entropy;
                        acc_n[h]++;
                    }
                    A[2] += st.frac;
                    A[3] += st.sink;
                    A[4] += isnan(st.seg) && !isnan(st.entropy) ? 0 : st.seg;
                }
            }
            s0 = s1;
        }
        if (rc == KV_OK)
            for (int h = 0; h < H; h++) {
                const double *A = acc + (size_t)h * 5;
                if (!sums) {
                    E[h] = A[0] / S;
                    NE[h] = acc_n[h] ? A[1] / acc_n[h] : NAN;
                    SK[h] = A[3] / S;
                }
                F[h] = A[2] / S;
                SG[h] = m->n_segments > 0 ? A[4] / S : NAN;
            }
        kv_free(acc);
        kv_free(acc_n);
        kv_be_unview(be, q, dq);
        kv_be_unview(be, k, dk);
        dq = dk = NULL;
        if (rc)
            goto fail;
        if (!o.quiet) {
            char det[64];
            snprintf(det, sizeof det, "layer %d", l);
            kv_progress_update(&pr, l + 1, det);
        }
    }
    if (!o.quiet) {
        char det[128];
        snprintf(det, sizeof det, "%s %d queries per head%s", S == n_count ? "all" : "a sample of", S,
                 sums ? ", entropy and sink mass from the stored summaries" : "");
        kv_progress_end(&pr, det);
    }
    rc = KV_OK;
    *out = f;
    f = NULL;
fail:
    if (dq)
        kv_be_unview(be, q, dq);
    if (dk)
        kv_be_unview(be, k, dk);
    kv_funnel_free(f);
    kv_free(q);
    kv_free(k);
    kv_free(ent);
    kv_free(lse);
    kv_free(probs);
    kv_free(scratch);
    kv_free(pos);
    return rc;
}
