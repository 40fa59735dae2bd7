/*
 * test_analyze.c: the analyze module. Row statistics against hand-computable cases (uniform
 * attention, all mass on one token) and a sort-based reference; funnel statistics of whole traces
 * (uniform attention written out by hand; stored summaries against recomputation); the funneling
 * heat map puts a planted sink in the brightest column; every figure recipe renders to an in-memory
 * surface of the right size with ink, and marks land at their data; short policy names; results
 * sets (merge, missing column); the report names every replayed policy and links only files that
 * exist, and the HTML embeds them.
 */
#include "analyze/kv_analyze.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_rng.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "tests/kv_test.h"
#include "traces/kv_synth.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---------------------------------------------------------------- helpers */

static kv_backend_t *cpu(void)
{
    kv_backend_t *be = NULL;
    /* one thread: tiny tensors, and results do not depend on the thread count */
    ck_assert_int_eq(kv_backend_cpu_open(1, &be), KV_OK);
    return be;
}

typedef struct {
    unsigned char r, g, b, a;
} px_t;

static px_t pixel(cairo_surface_t *s, int x, int y)
{
    cairo_surface_flush(s);
    const unsigned char *d = cairo_image_surface_get_data(s);
    int stride = cairo_image_surface_get_stride(s);
    uint32_t v = *(const uint32_t *)(d + (size_t)y * stride + (size_t)x * 4);
    px_t p = {(unsigned char)(v >> 16), (unsigned char)(v >> 8), (unsigned char)v, (unsigned char)(v >> 24)};
    return p;
}

static double px_lightness(px_t p)
{
    return kv_rgba_lightness((kv_rgba_t){p.r / 255.0, p.g / 255.0, p.b / 255.0, 1});
}

static int near_color(px_t p, kv_rgba_t c, int tol)
{
    return abs(p.r - (int)lround(c.r * 255)) <= tol && abs(p.g - (int)lround(c.g * 255)) <= tol &&
           abs(p.b - (int)lround(c.b * 255)) <= tol;
}

/* Render a figure; check its size and that it is not blank (share of non-white pixels). */
static cairo_surface_t *render_checked(kv_fig_t *fig, int w, int h, const char *what)
{
    cairo_surface_t *s = NULL;
    ck_assert_msg(kv_fig_render_image(fig, &s) == KV_OK, "%s: %s", what, kv_last_error());
    ck_assert_int_eq(cairo_image_surface_get_width(s), w);
    ck_assert_int_eq(cairo_image_surface_get_height(s), h);
    long ink = 0;
    for (int y = 0; y < h; y += 2)
        for (int x = 0; x < w; x += 2) {
            px_t p = pixel(s, x, y);
            ink += p.r < 235 || p.g < 235 || p.b < 235;
        }
    double share = (double)ink / ((w / 2) * (h / 2));
    ck_assert_msg(share > 0.01, "%s: only %.4f of the pixels have ink", what, share);
    return s;
}

/* A figure's size, by rendering it (the API has no getter). */
static void fig_size(kv_fig_t *fig, int *w, int *h)
{
    cairo_surface_t *s = NULL;
    ck_assert_int_eq(kv_fig_render_image(fig, &s), KV_OK);
    *w = cairo_image_surface_get_width(s);
    *h = cairo_image_surface_get_height(s);
    cairo_surface_destroy(s);
}

/* ---------------------------------------------------------------- rows */

START_TEST(row_stats_uniform)
{
    const int ns[] = {1, 2, 3, 7, 10, 20, 64, 100, 999};
    float p[1000], scratch[1000];
    for (size_t k = 0; k < sizeof ns / sizeof ns[0]; k++) {
        const int n = ns[k];
        for (int i = 0; i < n; i++)
            p[i] = 1.0f / n;
        kv_row_stats_t st;
        kv_analyze_row_stats(p, n, n / 2, 0.9, scratch, &st);
        /* float 1/n carries a relative rounding of 6e-8; 1e-6 covers it in double sums */
        kv_assert_close(st.entropy, log((double)n), 1e-6, 1e-6, "entropy of uniform attention = ln n");
        if (n >= 2)
            kv_assert_close(st.norm_entropy, 1.0, 1e-6, 0, "normalised entropy of uniform attention");
        else
            ck_assert(isnan(st.norm_entropy));
        /* exact: ceil(0.9 n) keys, as a count */
        ck_assert_msg(lround(st.frac * n) == (long)ceil(0.9 * n - 1e-9), "n=%d: %g keys, expected %g", n, st.frac * n,
                      ceil(0.9 * n - 1e-9));
        kv_assert_close(st.sink, 1.0 / n, 1e-7, 1e-6, "sink mass of uniform attention");
        kv_assert_close(st.seg, (double)(n - n / 2) / n, 1e-6, 1e-6, "segment mass of uniform attention");
    }
}
END_TEST

START_TEST(row_stats_one_hot)
{
    enum { N = 37 };
    float p[N], scratch[N];
    for (int k = 0; k < N; k += 9) {
        memset(p, 0, sizeof p);
        p[k] = 1;
        kv_row_stats_t st;
        kv_analyze_row_stats(p, N, 10, 0.9, scratch, &st);
        ck_assert(st.entropy == 0);
        ck_assert(st.norm_entropy == 0);
        kv_assert_close(st.frac, 1.0 / N, 0, 1e-12, "one key holds all the mass");
        ck_assert(st.sink == (k == 0 ? 1.0 : 0.0));
        ck_assert(st.seg == (k >= 10 ? 1.0 : 0.0));
    }
    /* no segment: NaN */
    kv_row_stats_t st;
    kv_analyze_row_stats(p, N, -1, 0.9, scratch, &st);
    ck_assert(isnan(st.seg));
}
END_TEST

static int cmp_desc(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x < y) - (x > y);
}

/* The quickselect count equals a sort-and-accumulate reference, ties included. */
START_TEST(mass_count_matches_sort)
{
    kv_rng_t r;
    kv_rng_seed(&r, 5);
    float p[2000] = {0}, s[2000], scratch[2000];
    for (int trial = 0; trial < 300; trial++) {
        int n = 1 + (int)(kv_rng_uniform(&r) * 1999);
        int levels = trial % 3 == 0 ? 3 : 0; /* many ties */
        for (int i = 0; i < n; i++)
            p[i] = levels ? (float)(1 + (int)(kv_rng_uniform(&r) * levels)) : (float)exp(4 * kv_rng_normal(&r));
        double mass = trial % 5 == 0 ? 0.5 : 0.9;
        memcpy(s, p, sizeof(float) * n);
        qsort(s, (size_t)n, sizeof(float), cmp_desc);
        double tot = 0;
        for (int i = 0; i < n; i++)
            tot += s[i];
        double need = mass * tot * (1 - 1e-6), acc = 0;
        int ref = n;
        for (int i = 0; i < n; i++) {
            acc += s[i];
            if (acc >= need) {
                ref = i + 1;
                break;
            }
        }
        int got = kv_analyze_mass_count(p, n, mass, scratch);
        /* summation order differs (partition blocks vs sorted prefix): a crossing within a few ulps
         * of the target could move by one key; with these draws it does not */
        ck_assert_msg(got == ref, "trial %d (n=%d): %d keys, sorted reference %d", trial, n, got, ref);
    }
}
END_TEST

/* ---------------------------------------------------------------- funnel statistics of traces */

/* Q = 0: every query attends uniformly to its visible keys. Three segments. */
static kv_trace_t *uniform_trace(int T, int n_prompt, int with_summaries)
{
    kv_trace_meta_t m;
    memset(&m, 0, sizeof m);
    m.n_layers = 2;
    m.n_heads = 2;
    m.n_kv_heads = 1;
    m.head_dim = 4;
    m.n_tokens = T;
    m.n_prompt = n_prompt;
    int32_t seg[3] = {0, n_prompt / 3, 2 * n_prompt / 3};
    m.n_segments = 3;
    m.segments = seg;
    m.dtype = KV_DTYPE_F32;
    m.has_summaries = with_summaries;
    m.pool = with_summaries ? T : 0;
    kv_trace_t *t = NULL;
    ck_assert_int_eq(kv_trace_mem_create(&m, &t), KV_OK);
    kv_rng_t r;
    kv_rng_seed(&r, 3);
    for (int l = 0; l < 2; l++) {
        float *k = kv_trace_mem_tensor(t, l, KV_T_K);
        for (int i = 0; i < T * 4; i++)
            k[i] = (float)kv_rng_normal(&r);
        kv_trace_mem_tensor(t, l, KV_T_Q); /* zeros */
        if (with_summaries) {
            float *lse = kv_trace_mem_tensor(t, l, KV_T_LSE), *ent = kv_trace_mem_tensor(t, l, KV_T_ENTROPY);
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < T; i++)
                    lse[h * T + i] = ent[h * T + i] = (float)log(i + 1.0); /* all scores 0 */
        }
    }
    return t;
}

static void check_uniform_funnel(int with_summaries)
{
    enum { T = 60, NP = 54 };
    kv_trace_t *t = uniform_trace(T, NP, with_summaries);
    kv_backend_t *be = cpu();
    kv_funnel_opts_t o;
    kv_funnel_opts_init(&o);
    o.min_keys = 1;
    o.max_queries = 0; /* every query */
    o.quiet = 1;
    kv_funnel_t *f = NULL;
    ck_assert_int_eq(kv_funnel_compute(t, be, &o, &f), KV_OK);
    ck_assert_int_eq(f->q_lo, 0);
    ck_assert_int_eq(f->n_sampled, T);
    ck_assert_int_eq(f->from_summaries, with_summaries);
    /* hand-computed means over queries i = 0..T-1 of uniform rows of n = i + 1 keys */
    double ent = 0, nent = 0, frac = 0, sink = 0, seg = 0;
    const kv_trace_meta_t *m = kv_trace_meta(t);
    for (int i = 0; i < T; i++) {
        int n = i + 1;
        ent += log(n);
        if (n >= 2)
            nent += 1;
        frac += ceil(0.9 * n - 1e-9) / n;
        sink += 1.0 / n;
        int s0 = m->segments[kv_trace_segment_of(m, i < NP ? i : NP - 1)];
        seg += (double)(i - s0 + 1) / n;
    }
    for (int l = 0; l < 2; l++)
        for (int h = 0; h < 2; h++) {
            const int k = l * 2 + h;
            /* float probabilities and float-stored summaries: 1e-5 relative */
            kv_assert_close(f->entropy[k], ent / T, 1e-5, 1e-5, "mean entropy");
            kv_assert_close(f->norm_entropy[k], nent / (T - 1), 1e-5, 1e-5, "mean normalised entropy");
            kv_assert_close(f->frac[k], frac / T, 1e-9, 1e-9, "mean fraction of keys for 90%");
            kv_assert_close(f->sink[k], sink / T, 1e-6, 1e-5, "mean sink mass");
            kv_assert_close(f->seg[k], seg / T, 1e-6, 1e-5, "mean in-segment mass");
        }
    kv_funnel_free(f);
    kv_trace_close(t);
    kv_backend_close(be);
}

START_TEST(funnel_uniform_recomputed)
{
    check_uniform_funnel(0);
}
END_TEST

START_TEST(funnel_uniform_from_summaries)
{
    check_uniform_funnel(1);
}
END_TEST

/* On a random trace, entropy and sink mass from the stored summaries (computed by the backend's
 * attention + attn_stats) equal their recomputation from every query's row. */
START_TEST(funnel_summaries_agree_with_rows)
{
    enum { L = 2, H = 4, HKV = 2, D = 16, T = 80, NP = 70 };
    kv_trace_t *t = kv_test_trace(L, H, HKV, D, T, NP, 2, 0, 11);
    kv_trace_meta_t *m = kv_trace_mem_meta(t);
    m->has_summaries = 1;
    m->pool = 40;
    kv_backend_t *be = cpu();
    for (int l = 0; l < L; l++)
        ck_assert_int_eq(kv_synth_summarize(be, m, kv_trace_mem_tensor(t, l, KV_T_Q), kv_trace_mem_tensor(t, l, KV_T_K),
                                            kv_trace_mem_tensor(t, l, KV_T_V), kv_trace_mem_tensor(t, l, KV_T_LSE),
                                            kv_trace_mem_tensor(t, l, KV_T_ENTROPY),
                                            kv_trace_mem_tensor(t, l, KV_T_ACC),
                                            kv_trace_mem_tensor(t, l, KV_T_POOLED)),
                         KV_OK);
    kv_funnel_opts_t o;
    kv_funnel_opts_init(&o);
    o.max_queries = 0;
    o.quiet = 1;
    kv_funnel_t *a = NULL, *b = NULL;
    ck_assert_int_eq(kv_funnel_compute(t, be, &o, &a), KV_OK);
    o.use_summaries = 0;
    ck_assert_int_eq(kv_funnel_compute(t, be, &o, &b), KV_OK);
    ck_assert(a->from_summaries && !b->from_summaries);
    for (int k = 0; k < L * H; k++) {
        /* float32 softmax and entropy in two different code paths: 1e-4 */
        kv_assert_close(a->entropy[k], b->entropy[k], 1e-4, 1e-4, "entropy: summaries vs rows");
        kv_assert_close(a->norm_entropy[k], b->norm_entropy[k], 1e-4, 1e-4, "normalised entropy");
        kv_assert_close(a->sink[k], b->sink[k], 1e-5, 1e-4, "sink mass: LSE vs rows");
        ck_assert(a->frac[k] == b->frac[k]); /* same rows in both */
        ck_assert(a->frac[k] > 0 && a->frac[k] <= 1);
    }
    /* sampling: 8 evenly spaced queries per head from query 15 on (min_keys 16) */
    o.max_queries = 8;
    o.all_if_short = 0;
    kv_funnel_t *c = NULL;
    ck_assert_int_eq(kv_funnel_compute(t, be, &o, &c), KV_OK);
    ck_assert_int_eq(c->n_sampled, 8);
    ck_assert_int_eq(c->q_lo, 15);
    kv_funnel_free(a);
    kv_funnel_free(b);
    kv_funnel_free(c);
    kv_trace_close(t);
    kv_backend_close(be);
}
END_TEST

START_TEST(pick_layers)
{
    int l[64];
    ck_assert_int_eq(kv_analyze_pick_layers(32, 6, l), 6);
    const int want[6] = {0, 6, 12, 19, 25, 31};
    for (int i = 0; i < 6; i++)
        ck_assert_int_eq(l[i], want[i]);
    ck_assert_int_eq(kv_analyze_pick_layers(5, 6, l), 5);
    for (int i = 0; i < 5; i++)
        ck_assert_int_eq(l[i], i);
    ck_assert_int_eq(kv_analyze_pick_layers(7, 2, l), 2);
    ck_assert(l[0] == 0 && l[1] == 6);
}
END_TEST

/* ---------------------------------------------------------------- funneling heat map */

/* A synthetic trace with one planted sink (token 0) and no heavy hitters. */
static kv_trace_t *sink_trace(int summaries)
{
    kv_synth_params_t p;
    kv_synth_defaults(&p);
    p.n_layers = 2;
    p.n_heads = 2;
    p.n_kv_heads = 1;
    p.n_tokens = 128;
    p.n_decode = 8;
    p.n_sinks = 1;
    p.sink_mass = 0.5;
    p.heavy_frac = 0;
    p.summaries = summaries ? KV_SYNTH_SUMMARIES_YES : KV_SYNTH_SUMMARIES_NO;
    p.pool = 64;
    p.n_threads = 2;
    kv_trace_t *t = NULL;
    ck_assert_msg(kv_synth_memory(&p, &t) == KV_OK, "%s", kv_last_error());
    return t;
}

static void check_sink_column(kv_map_src_t src, int summaries)
{
    kv_trace_t *t = sink_trace(summaries);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    uint8_t roles[128];
    ck_assert_int_eq(kv_synth_trace_roles(m, roles, NULL), KV_OK);
    int sink = -1;
    for (int j = 0; j < m->n_tokens && sink < 0; j++)
        if (roles[j] & KV_SYNTH_SINK)
            sink = j;
    ck_assert_int_eq(sink, 0);
    kv_backend_t *be = cpu();
    kv_funneling_opts_t o = {.n_layers = 2, .src = src};
    kv_fig_t *fig = NULL;
    ck_assert_msg(kv_analyze_fig_funneling(t, be, &o, -1, &fig) == KV_OK, "%s", kv_last_error());
    int w, h;
    fig_size(fig, &w, &h);
    ck_assert_int_eq(w, 1600);
    cairo_surface_t *s = render_checked(fig, w, h, "funneling");
    const int T = m->n_tokens;
    for (int panel = 0; panel < 2; panel++) {
        kv_axes_t *ax = kv_fig_axes(fig, 0, panel);
        /* mean lightness of each key column over the queries of the second half (magma: lighter =
         * more attention); the brightest must be the sink's */
        int best = -1;
        double best_l = -1;
        for (int j = 0; j < T / 2; j++) {
            double sum = 0;
            int n = 0;
            for (int i = T / 2; i < T; i++) {
                double x, y;
                ck_assert_int_eq(kv_axes_data_to_px(ax, j, i, &x, &y), KV_OK);
                px_t p = pixel(s, (int)x, (int)y);
                /* below the diagonal every cell holds attention: never the blank background */
                ck_assert_msg(!(p.r == 255 && p.g == 255 && p.b == 255), "blank cell at key %d, query %d", j, i);
                sum += px_lightness(p);
                n++;
            }
            if (sum / n > best_l) {
                best_l = sum / n;
                best = j;
            }
        }
        /* pooled cells span T / pool tokens: the sink's cell is token 0's */
        const int cell = m->pool > 0 && src != KV_MAP_EXACT ? (T + m->pool - 1) / m->pool : 1;
        ck_assert_msg(best / cell == sink / cell, "panel %d (%s): brightest column %d, sink %d", panel,
                      kv_map_src_name(src), best, sink);
        /* and clearly so: lighter than the middle column by a margin (L* units) */
        double mid = 0;
        for (int i = T / 2; i < T; i++) {
            double x, y;
            kv_axes_data_to_px(ax, T / 4, i, &x, &y);
            mid += px_lightness(pixel(s, (int)x, (int)y));
        }
        mid /= T - T / 2;
        ck_assert_msg(best_l > mid + 10, "sink column L* %.1f vs middle column %.1f", best_l, mid);
    }
    cairo_surface_destroy(s);
    kv_fig_free(fig);
    /* one figure per head of layer 1 */
    ck_assert_int_eq(kv_analyze_fig_funneling(t, be, &o, 1, &fig), KV_OK);
    fig_size(fig, &w, &h);
    cairo_surface_destroy(render_checked(fig, w, h, "funneling per head"));
    kv_fig_free(fig);
    kv_trace_close(t);
    kv_backend_close(be);
}

START_TEST(funneling_sink_brightest_pooled)
{
    check_sink_column(KV_MAP_POOLED, 1);
}
END_TEST
START_TEST(funneling_sink_brightest_exact)
{
    check_sink_column(KV_MAP_EXACT, 0);
}
END_TEST
START_TEST(funneling_sink_brightest_sampled)
{
    check_sink_column(KV_MAP_SAMPLED, 0);
}
END_TEST

START_TEST(funneling_pooled_needs_summaries)
{
    kv_trace_t *t = sink_trace(0);
    kv_backend_t *be = cpu();
    kv_attn_map_t map;
    ck_assert_int_eq(kv_attn_map_layer(t, be, 0, KV_MAP_POOLED, &map), KV_EINVAL);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "pooled"));
    /* exact maps: rows sum to 1 on and below the diagonal, NaN above */
    ck_assert_int_eq(kv_attn_map_layer(t, be, 1, KV_MAP_EXACT, &map), KV_OK);
    ck_assert(map.rows == 128 && map.cols == 128);
    for (int i = 0; i < 128; i += 17) {
        double s = 0;
        for (int j = 0; j <= i; j++)
            s += map.maps[(size_t)i * 128 + j];
        kv_assert_close(s, 1.0, 1e-5, 0, "exact map row sum");
        if (i < 127)
            ck_assert(isnan(map.maps[(size_t)i * 128 + i + 1]));
    }
    kv_attn_map_free(&map);
    kv_trace_close(t);
    kv_backend_close(be);
}
END_TEST

/* ---------------------------------------------------------------- results and figures */

static const char *POLICIES = "full,random,streaming_llm,h2o,snapkv,pyramidkv,adakv,snapkv(window=8)";

/* Replay `policies` on a small trace and write the TSV (with the trace's checksum when given). */
static void make_results_of(kv_trace_t *t, const char *policies, const char *budgets, const char *sha, const char *path)
{
    kv_policy_t **ps = NULL;
    int np = 0, nb = 0;
    kv_budget_t *b = NULL;
    ck_assert_int_eq(kv_policy_create_list(policies, &ps, &np), KV_OK);
    ck_assert_int_eq(kv_budget_parse_list(budgets, &b, &nb), KV_OK);
    kv_backend_t *be = cpu();
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    kv_results_t *r = NULL;
    ck_assert_msg(kv_replay(t, ps, np, b, nb, be, &o, &r) == KV_OK, "%s", kv_last_error());
    if (sha)
        ck_assert_int_eq(kv_results_add_prov(r, "trace_sha256", sha), KV_OK);
    ck_assert_int_eq(kv_results_write_tsv(r, path), KV_OK);
    kv_results_free(r);
    for (int i = 0; i < np; i++)
        kv_policy_free(ps[i]);
    kv_free(ps);
    kv_free(b);
    kv_backend_close(be);
}

static void make_results(kv_trace_t *t, const char *budgets, const char *sha, const char *path)
{
    make_results_of(t, POLICIES, budgets, sha, path);
}

static kv_res_set_t *load_set(const char *path)
{
    kv_res_set_t *s = NULL;
    ck_assert_int_eq(kv_res_set_create(&s), KV_OK);
    ck_assert_msg(kv_res_set_load(s, path, NULL) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(kv_res_set_finish(s), KV_OK);
    return s;
}

START_TEST(figures_render_and_marks)
{
    kv_trace_t *t = kv_test_trace(3, 4, 2, 16, 112, 96, 3, 0, 21);
    char path[256];
    kv_test_tmp("fig.tsv", path, sizeof path);
    make_results(t, "16,32,64", NULL, path);
    kv_res_set_t *s = load_set(path);
    ck_assert_int_eq(s->n_pol, 8);
    ck_assert_int_eq(kv_res_set_n_layers(s), 3);
    kv_fig_t *fig = NULL;
    int w, h;
    /* recall / error / bound vs budget: policy `full` (index 0) has recall 1 at every budget, and its
     * marker is drawn in its colour there */
    ck_assert_int_eq(kv_analyze_fig_tradeoff(s, 0, &fig), KV_OK);
    fig_size(fig, &w, &h);
    cairo_surface_t *img = render_checked(fig, w, h, "tradeoff (budget)");
    {
        kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
        const int full = kv_res_set_policy_named(s, "full");
        ck_assert_int_ge(full, 0);
        const kv_res_row_t *r = kv_res_set_find(s, full, 16, -1, -1);
        ck_assert_ptr_nonnull(r);
        ck_assert(r->recall_mean == 1);
        double x, y;
        ck_assert_int_eq(kv_axes_data_to_px(ax, 16, 1.0, &x, &y), KV_OK);
        ck_assert_msg(near_color(pixel(img, (int)lround(x), (int)lround(y)), kv_palette(full % 7), 40),
                      "no marker of `full` at (16, 1)");
    }
    cairo_surface_destroy(img);
    kv_fig_free(fig);
    ck_assert_int_eq(kv_analyze_fig_tradeoff(s, 1, &fig), KV_OK);
    fig_size(fig, &w, &h);
    cairo_surface_destroy(render_checked(fig, w, h, "tradeoff (memory)"));
    kv_fig_free(fig);
    /* bound vs error: every point lies on or below y = x (no violations) */
    ck_assert_int_eq(kv_analyze_fig_bound(s, &fig), KV_OK);
    fig_size(fig, &w, &h);
    cairo_surface_destroy(render_checked(fig, w, h, "bound vs error"));
    kv_fig_free(fig);
    for (size_t r = 0; r < s->n; r++)
        ck_assert_msg(s->rows[r].err_mean <= s->rows[r].bound_mean * (1 + 1e-5) + 1e-7, "row %zu above the bound", r);
    /* allocation: Ada-KV strips present */
    ck_assert_int_eq(kv_analyze_fig_allocation(s, &fig), KV_OK);
    fig_size(fig, &w, &h);
    cairo_surface_destroy(render_checked(fig, w, h, "allocation"));
    kv_fig_free(fig);
    /* recall heat map: the `full` row (row 0) of the first panel has the top colour of the map */
    ck_assert_int_eq(kv_analyze_fig_recall_heatmap(s, &fig), KV_OK);
    fig_size(fig, &w, &h);
    img = render_checked(fig, w, h, "recall heat map");
    {
        kv_axes_t *ax = kv_fig_axes(fig, 0, 0);
        double x, y;
        /* off the cell centre, away from the printed value */
        ck_assert_int_eq(kv_axes_data_to_px(ax, 1 - 0.4, 0 - 0.35, &x, &y), KV_OK);
        ck_assert_msg(near_color(pixel(img, (int)lround(x), (int)lround(y)), kv_cmap_eval(KV_CMAP_VIRIDIS, 1), 3),
                      "the cell of `full` is not at the top of the colour map");
    }
    cairo_surface_destroy(img);
    kv_fig_free(fig);
    /* funnel figures */
    kv_backend_t *be = cpu();
    kv_funnel_opts_t fo;
    kv_funnel_opts_init(&fo);
    fo.quiet = 1;
    kv_funnel_t *f = NULL;
    ck_assert_int_eq(kv_funnel_compute(t, be, &fo, &f), KV_OK);
    ck_assert_int_eq(kv_analyze_fig_funnel_curves(f, &fig), KV_OK);
    cairo_surface_destroy(render_checked(fig, 1600, 1000, "funnel curves"));
    kv_fig_free(fig);
    ck_assert_int_eq(kv_analyze_fig_head_concentration(f, &fig), KV_OK);
    cairo_surface_destroy(render_checked(fig, 1600, 800, "head concentration"));
    kv_fig_free(fig);
    kv_funnel_free(f);
    kv_backend_close(be);
    kv_res_set_free(s);
    kv_trace_close(t);
}
END_TEST

START_TEST(short_labels)
{
    char buf[512];
    kv_policy_t *p = NULL;
    ck_assert_int_eq(kv_policy_create("snapkv", &p), KV_OK);
    kv_analyze_short_label(p->label, buf, sizeof buf);
    ck_assert_str_eq(buf, "snapkv");
    kv_policy_free(p);
    ck_assert_int_eq(kv_policy_create("snapkv(window=16)", &p), KV_OK);
    kv_analyze_short_label(p->label, buf, sizeof buf);
    ck_assert_str_eq(buf, "snapkv(window=16)");
    kv_policy_free(p);
    ck_assert_int_eq(kv_policy_create("adakv(inner=pyramidkv)", &p), KV_OK);
    kv_analyze_short_label(p->label, buf, sizeof buf);
    ck_assert_str_eq(buf, "adakv(inner=pyramidkv)");
    kv_policy_free(p);
    kv_analyze_short_label("nosuchpolicy(a=1)", buf, sizeof buf);
    ck_assert_str_eq(buf, "nosuchpolicy(a=1)");
}
END_TEST

START_TEST(base64_vectors)
{
    /* RFC 4648 section 10 */
    const char *in[] = {"", "f", "fo", "foo", "foob", "fooba", "foobar"};
    const char *out[] = {"", "Zg==", "Zm8=", "Zm9v", "Zm9vYg==", "Zm9vYmE=", "Zm9vYmFy"};
    for (int i = 0; i < 7; i++) {
        char *b = kv_base64((const unsigned char *)in[i], strlen(in[i]));
        ck_assert_str_eq(b, out[i]);
        kv_free(b);
    }
}
END_TEST

START_TEST(results_merge_and_missing_column)
{
    kv_trace_t *t = kv_test_trace(2, 2, 1, 8, 60, 50, 0, 0, 4);
    char a[256], bad[256];
    kv_test_tmp("a.tsv", a, sizeof a);
    make_results(t, "16,32", "0123abcd", a);
    kv_res_set_t *s = NULL;
    ck_assert_int_eq(kv_res_set_create(&s), KV_OK);
    ck_assert_int_eq(kv_res_set_load(s, a, "0123abcd"), KV_OK);
    const size_t n = s->n;
    ck_assert_int_gt((long)n, 0);
    /* the same file again (another trace checksum: a warning, rows used): every row repeats */
    kv_log_set_level(KV_LOG_QUIET);
    ck_assert_int_eq(kv_res_set_load(s, a, "ffff"), KV_OK);
    kv_log_set_level(KV_LOG_INFO);
    ck_assert_int_eq((long)s->n, (long)n);
    ck_assert_int_eq((long)s->n_duplicates, (long)n);
    ck_assert_int_eq(s->n_files, 2);
    int budgets[8];
    ck_assert_int_eq(kv_res_set_budgets(s, budgets, 8), 2);
    ck_assert(budgets[0] == 16 && budgets[1] == 32);
    kv_res_set_free(s);
    /* a table without recall_mean */
    kv_test_tmp("bad.tsv", bad, sizeof bad);
    FILE *f = fopen(bad, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "# trace_sha256: 00\npolicy\tbudget\tbudget_tokens\tlayer\thead\tkept\trecall_p10\trecall_min\t"
               "err_mean\tbound_mean\tviolations\tmem_bytes\nfull\t16\t16\tall\tall\t1\t1\t1\t0\t0\t0\t10\n");
    fclose(f);
    ck_assert_int_eq(kv_res_set_create(&s), KV_OK);
    ck_assert_int_eq(kv_res_set_load(s, bad, NULL), KV_EFORMAT);
    ck_assert_msg(strstr(kv_last_error(), "recall_mean") && strstr(kv_last_error(), bad), "message: %s",
                  kv_last_error());
    kv_res_set_free(s);
    /* and through the whole analysis */
    kv_backend_t *be = cpu();
    kv_analyze_opts_t o;
    kv_analyze_opts_init(&o);
    char dir[256];
    o.out_dir = kv_test_tmp("bad-report", dir, sizeof dir);
    o.quiet = 1;
    const char *files[1] = {bad};
    ck_assert_int_eq(kv_analyze_run(t, NULL, files, 1, be, &o, NULL), KV_EFORMAT);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "missing column 'recall_mean'"));
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- the report */

static char *slurp(const char *path)
{
    FILE *f = fopen(path, "rb");
    ck_assert_msg(f != NULL, "%s missing", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    ck_assert_int_eq((long)fread(b, 1, (size_t)n, f), n);
    b[n] = 0;
    fclose(f);
    return b;
}

START_TEST(report_names_policies_and_links_files)
{
    kv_trace_t *mt = kv_test_trace(3, 4, 2, 16, 100, 84, 2, 0, 8);
    char tpath[256], r1[256], r2[256], dir[256];
    kv_test_tmp("report.h5", tpath, sizeof tpath);
    ck_assert_int_eq(kv_test_write_trace(mt, tpath), KV_OK);
    kv_trace_close(mt);
    kv_trace_t *t = NULL;
    ck_assert_int_eq(kv_trace_open(tpath, &t), KV_OK);
    char sha[65];
    ck_assert_int_eq(kv_sha256_file(tpath, sha), KV_OK);
    /* a sweep in two files */
    kv_test_tmp("r1.tsv", r1, sizeof r1);
    kv_test_tmp("r2.tsv", r2, sizeof r2);
    make_results(t, "16,32", sha, r1);
    make_results(t, "48", sha, r2);
    kv_backend_t *be = cpu();
    kv_analyze_opts_t o;
    kv_analyze_opts_init(&o);
    o.out_dir = kv_test_tmp("report", dir, sizeof dir);
    o.quiet = 1;
    o.note = "a test note";
    const char *files[2] = {r1, r2};
    kv_analyze_out_t out;
    ck_assert_msg(kv_analyze_run(t, tpath, files, 2, be, &o, &out) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(out.n_figures, 8);
    char *md = slurp(out.report_md), *html = slurp(out.report_html);
    /* every replayed policy, by short name and full label */
    kv_policy_t **ps = NULL;
    int np = 0;
    ck_assert_int_eq(kv_policy_create_list(POLICIES, &ps, &np), KV_OK);
    for (int i = 0; i < np; i++) {
        char shortl[512];
        kv_analyze_short_label(ps[i]->label, shortl, sizeof shortl);
        ck_assert_msg(strstr(html, ps[i]->label) != NULL, "HTML lacks %s", ps[i]->label);
        ck_assert_msg(strstr(html, shortl) != NULL, "HTML lacks %s", shortl);
        /* Markdown escapes '_' */
        char esc[1024];
        size_t k = 0;
        for (const char *c = ps[i]->label; *c && k < sizeof esc - 2; c++) {
            if (*c == '_')
                esc[k++] = '\\';
            esc[k++] = *c;
        }
        esc[k] = 0;
        ck_assert_msg(strstr(md, esc) != NULL, "Markdown lacks %s", esc);
        kv_policy_free(ps[i]);
    }
    kv_free(ps);
    /* every budget of the sweep */
    ck_assert_ptr_nonnull(strstr(md, "| 48 |"));
    ck_assert_ptr_nonnull(strstr(md, "| 16 |"));
    /* every linked figure exists; every figure is linked and embedded */
    int links = 0;
    for (const char *p = md; (p = strstr(p, "](")) != NULL; p += 2) {
        const char *e = strchr(p + 2, ')');
        ck_assert_ptr_nonnull(e);
        char name[256], full[600];
        snprintf(name, sizeof name, "%.*s", (int)(e - p - 2), p + 2);
        snprintf(full, sizeof full, "%s/%s", dir, name);
        ck_assert_msg(access(full, R_OK) == 0, "report links %s, which does not exist", full);
        links++;
    }
    ck_assert_int_eq(links, out.n_figures);
    int embedded = 0;
    for (const char *p = html; (p = strstr(p, "src=\"data:image/png;base64,")) != NULL; p++)
        embedded++;
    ck_assert_int_eq(embedded, out.n_figures);
    ck_assert_ptr_null(strstr(html, "src=\"http"));
    ck_assert_ptr_nonnull(strstr(html, "a test note"));
    ck_assert_ptr_nonnull(strstr(md, "matches the trace"));
    ck_assert_ptr_nonnull(strstr(md, sha));
    free(md);
    free(html);
    /* SVG figures are embedded as SVG */
    o.format = "svg";
    o.out_dir = kv_test_tmp("report-svg", dir, sizeof dir);
    ck_assert_int_eq(kv_analyze_run(t, tpath, files, 1, be, &o, &out), KV_OK);
    html = slurp(out.report_html);
    ck_assert_ptr_nonnull(strstr(html, "data:image/svg+xml;base64,"));
    free(html);
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

/* A sweep merged from two results files whose second adds one policy at a fraction budget, and
 * comes from another trace: the highlights name the budget as given and warn about the file, the
 * memory relative to full is filled from full's rows at other budgets, and the allocation figure
 * leaves out the budget none of its policies ran at. */
START_TEST(report_fraction_budget_and_foreign_results)
{
    kv_trace_t *mt = kv_test_trace(3, 4, 2, 16, 100, 84, 2, 0, 8);
    char tpath[256], r1[256], r2[256], dir[256];
    kv_test_tmp("frac.h5", tpath, sizeof tpath);
    ck_assert_int_eq(kv_test_write_trace(mt, tpath), KV_OK);
    kv_trace_close(mt);
    kv_trace_t *t = NULL;
    ck_assert_int_eq(kv_trace_open(tpath, &t), KV_OK);
    char sha[65];
    ck_assert_int_eq(kv_sha256_file(tpath, sha), KV_OK);
    kv_test_tmp("frac1.tsv", r1, sizeof r1);
    kv_test_tmp("frac2.tsv", r2, sizeof r2);
    make_results(t, "16,32", sha, r1);
    make_results_of(t, "h2o(mode=decode)", "0.25", "ffff", r2);
    kv_backend_t *be = cpu();
    kv_analyze_opts_t o;
    kv_analyze_opts_init(&o);
    o.out_dir = kv_test_tmp("frac-report", dir, sizeof dir);
    o.quiet = 1;
    const char *files[2] = {r1, r2};
    kv_analyze_out_t out;
    kv_log_set_level(KV_LOG_QUIET);
    ck_assert_msg(kv_analyze_run(t, tpath, files, 2, be, &o, &out) == KV_OK, "%s", kv_last_error());
    kv_log_set_level(KV_LOG_INFO);
    char *md = slurp(out.report_md);
    /* 0.25 of 84 context tokens is 21 tokens per head */
    ck_assert_msg(strstr(md, "- Budget 0.25 (21 tokens per head): the best evicting policy") != NULL,
                  "highlights do not name the fraction budget as given");
    ck_assert_ptr_nonnull(strstr(md, "- Budget 16 tokens per head:"));
    /* budgets within a policy's window are flagged, once per policy; snapkv(window=8) is not */
    ck_assert_msg(strstr(md, "select nothing (its numbers there are a recent-token cache's): snapkv (window 32) at "
                             "16, 32; adakv (window 32) at 16, 32."),
                  "budgets within the window not flagged");
    ck_assert_ptr_null(strstr(md, "snapkv(window=8) (window"));
    /* the funnel highlight ends with a verdict on the trend with depth */
    ck_assert_msg(strstr(md, "Normalised attention entropy averages ") &&
                      (strstr(md, ": attention narrows with depth") ||
                       strstr(md, ": attention is no narrower in the deeper layers") ||
                       strstr(md, ": entropy and concentration disagree")),
                  "no verdict on funneling in the highlights");
    char warn[512];
    snprintf(warn, sizeof warn, "- WARNING: %s holds results of another trace", r2);
    ck_assert_msg(strstr(md, warn) != NULL, "no warning about %s in the highlights", r2);
    const char *row = strstr(md, "| h2o(mode=decode) | 0.25 | 21 |");
    ck_assert_ptr_nonnull(row);
    const char *eol = strchr(row, '\n');
    ck_assert_ptr_nonnull(eol);
    ck_assert_msg(!(eol - row > 4 && !strncmp(eol - 4, "| - |", 4)) && !strncmp(eol - 3, "% |", 3),
                  "memory / full missing: %.*s", (int)(eol - row), row);
    free(md);
    /* the allocation figure: budgets 16 and 32 only (snapkv, pyramidkv and adakv never ran at 0.25) */
    kv_res_set_t *s = NULL;
    ck_assert_int_eq(kv_res_set_create(&s), KV_OK);
    kv_log_set_level(KV_LOG_QUIET);
    ck_assert_int_eq(kv_res_set_load(s, r1, NULL), KV_OK);
    ck_assert_int_eq(kv_res_set_load(s, r2, NULL), KV_OK);
    kv_log_set_level(KV_LOG_INFO);
    ck_assert_int_eq(kv_res_set_finish(s), KV_OK);
    kv_fig_t *fig = NULL;
    ck_assert_int_eq(kv_analyze_fig_allocation(s, &fig), KV_OK);
    ck_assert_ptr_nonnull(kv_fig_axes(fig, 0, 1));
    ck_assert_ptr_null(kv_fig_axes(fig, 0, 2));
    kv_fig_free(fig);
    /* the recall heat map shows all three budgets */
    ck_assert_int_eq(kv_analyze_fig_recall_heatmap(s, &fig), KV_OK);
    ck_assert_ptr_nonnull(kv_fig_axes(fig, 0, 2));
    kv_fig_free(fig);
    char name[96];
    kv_res_budget_name(s, 21, name, sizeof name);
    ck_assert_str_eq(name, "0.25 (21 tokens per head)");
    kv_res_budget_name(s, 16, name, sizeof name);
    ck_assert_str_eq(name, "16 tokens per head");
    kv_res_set_free(s);
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

/* ---------------------------------------------------------------- the CLI: analyze and demo */

/* Run a shell command, its stdout and stderr into out (truncated); the exit status. */
static int run_cmd(const char *cmd, char *out, size_t len)
{
    char full[4096];
    snprintf(full, sizeof full, "%s 2>&1", cmd);
    FILE *f = popen(full, "r");
    ck_assert_ptr_nonnull(f);
    size_t n = fread(out, 1, len - 1, f);
    out[n] = 0;
    int st = pclose(f);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

START_TEST(cli_analyze_errors)
{
    const char *bin = getenv("KVSIM_BIN");
    char trace[256], bad[256], dir[256], cmd[2048], out[8192];
    kv_test_tmp("cli.h5", trace, sizeof trace);
    kv_test_tmp("cli-bad.tsv", bad, sizeof bad);
    kv_test_tmp("cli-report", dir, sizeof dir);
    kv_trace_t *t = kv_test_trace(2, 2, 1, 8, 48, 40, 0, 0, 6);
    ck_assert_int_eq(kv_test_write_trace(t, trace), KV_OK);
    kv_trace_close(t);
    FILE *f = fopen(bad, "w");
    fprintf(f, "policy\tbudget\nfull\t16\n");
    fclose(f);
    snprintf(cmd, sizeof cmd, "%s analyze %s %s -o %s -q", bin, trace, bad, dir);
    ck_assert_int_eq(run_cmd(cmd, out, sizeof out), 1);
    ck_assert_msg(strstr(out, bad) && strstr(out, "missing column"), "message: %s", out);
    snprintf(cmd, sizeof cmd, "%s analyze %s /no/such.tsv -o %s -q", bin, trace, dir);
    ck_assert_int_eq(run_cmd(cmd, out, sizeof out), 1);
    ck_assert_ptr_nonnull(strstr(out, "/no/such.tsv"));
    snprintf(cmd, sizeof cmd, "%s analyze %s --format gif", bin, trace);
    ck_assert_int_eq(run_cmd(cmd, out, sizeof out), 2);
    snprintf(cmd, sizeof cmd, "%s analyze --help", bin);
    ck_assert_int_eq(run_cmd(cmd, out, sizeof out), 0);
    ck_assert_ptr_nonnull(strstr(out, "funneling"));
    /* the trace alone: the three trace figures and the report; stdout names the report */
    snprintf(cmd, sizeof cmd, "%s analyze %s -o %s -q", bin, trace, dir);
    ck_assert_int_eq(run_cmd(cmd, out, sizeof out), 0);
    ck_assert_ptr_nonnull(strstr(out, "report.html"));
    char path[512];
    const char *files[] = {"funneling.png", "funnel_curves.png", "head_concentration.png", "report.md", "report.html"};
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        ck_assert_msg(access(path, R_OK) == 0, "%s missing", path);
    }
}
END_TEST

/* The demo run where SmolLM2 cannot be had (from an empty folder, downloads off, $KVSIM_MODELS
 * holding only stories260K): it falls back to stories260K, says why on stderr and in the report, and
 * runs on the real model. A few policies to stay quick. */
START_TEST(cli_demo_real_model)
{
    char dir[256], cwd[256], cmd[4096], out[16384], path[512], models[512], abs_models[PATH_MAX];
    kv_test_tmp("demo", dir, sizeof dir);
    kv_test_tmp("demo-cwd", cwd, sizeof cwd);
    ck_assert_int_eq(mkdir(cwd, 0755), 0);
    /* where the tests found the model (../shared or $KVSIM_SHARED): its folder, as an absolute path */
    ck_assert_ptr_nonnull(kv_test_shared("models/stories260K/stories260K.bin", models, sizeof models));
    *strstr(models, "/stories260K.bin") = 0;
    ck_assert_ptr_nonnull(realpath(models, abs_models));
    char abs_dir[PATH_MAX];
    ck_assert_ptr_nonnull(realpath(".", abs_dir));
    snprintf(cmd, sizeof cmd,
             "cd %s && KVSIM_MODELS=%s %s demo -o %s/%s -q --no-download --policies full,snapkv,pyramidkv,adakv,shotkv "
             "--budgets 16,64",
             cwd, abs_models, getenv("KVSIM_BIN"), abs_dir, dir);
    ck_assert_msg(run_cmd(cmd, out, sizeof out) == 0, "demo failed: %s", out);
    ck_assert_ptr_null(strstr(out, "SYNTHETIC"));
    ck_assert_msg(strstr(out, "the demo runs on stories260K because SmolLM2-135M-Instruct is not in"),
                  "no fallback note on stderr: %s", out);
    ck_assert_ptr_nonnull(strstr(out, "report.html"));
    snprintf(path, sizeof path, "%s/report.md", dir);
    char *md = slurp(path);
    ck_assert_ptr_nonnull(strstr(md, "KV-cache eviction on stories260K"));
    ck_assert_ptr_nonnull(strstr(md, "the demo runs on stories260K because"));
    ck_assert_ptr_null(strstr(md, "SYNTHETIC"));
    const char *names[] = {"full", "snapkv", "pyramidkv", "adakv", "shotkv"};
    for (int i = 0; i < 5; i++) {
        char cell[64];
        snprintf(cell, sizeof cell, "| %s |", names[i]);
        ck_assert_msg(strstr(md, cell) != NULL, "report lacks policy %s", names[i]);
    }
    free(md);
    const char *files[] = {"trace.h5",    "results.tsv",         "prompt.txt",
                           "report.html", "tradeoff_budget.png", "budget_allocation.png"};
    for (int i = 0; i < 6; i++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[i]);
        ck_assert_msg(access(path, R_OK) == 0, "%s missing", path);
    }
    /* the built-in story's paragraphs are the segments */
    snprintf(path, sizeof path, "%s/trace.h5", dir);
    kv_trace_t *t = NULL;
    ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
    ck_assert_int_ge(kv_trace_meta(t)->n_segments, 2);
    ck_assert_str_eq(kv_trace_meta(t)->source, "capture");
    kv_trace_close(t);
}
END_TEST

/* The default demo model, SmolLM2-135M-Instruct, from the checkout (../shared): a multi-document
 * prompt of 1,500-3,000 tokens with its documents as segments, and the funnel it is known to have
 * (transformers on the same weights: normalised entropy 0.58 in layers 0-9, 0.36 in 10-29) named in
 * the report. A few policies to stay quick. */
START_TEST(cli_demo_smollm2)
{
    char dir[256], cmd[2048], out[16384], path[512];
    kv_test_tmp("demo-smollm2", dir, sizeof dir);
    snprintf(cmd, sizeof cmd,
             "%s demo -o %s -q --no-download --model smollm2 --policies full,snapkv,adakv --budgets 128",
             getenv("KVSIM_BIN"), dir);
    ck_assert_msg(run_cmd(cmd, out, sizeof out) == 0, "demo failed: %s", out);
    snprintf(path, sizeof path, "%s/report.md", dir);
    char *md = slurp(path);
    ck_assert_ptr_nonnull(strstr(md, "KV-cache eviction on SmolLM2-135M-Instruct"));
    ck_assert_msg(strstr(md, ": attention narrows with depth (the pyramid funneling shape)"),
                  "the report does not find SmolLM2's funnel");
    free(md);
    snprintf(path, sizeof path, "%s/trace.h5", dir);
    kv_trace_t *t = NULL;
    ck_assert_int_eq(kv_trace_open(path, &t), KV_OK);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    ck_assert_int_eq(m->n_layers, 30);
    ck_assert_msg(m->n_prompt >= 1500 && m->n_prompt <= 3000, "prompt of %d tokens", m->n_prompt);
    ck_assert_int_ge(m->n_segments, 8);
    kv_trace_close(t);
}
END_TEST

/* No model anywhere: the synthetic fallback says so on stderr (even with -q) and in the report. */
START_TEST(cli_demo_synthetic_fallback)
{
    char dir[256], cmd[2048], out[16384], path[512];
    kv_test_tmp("demo-synth", dir, sizeof dir);
    snprintf(cmd, sizeof cmd, "%s demo -o %s -q --synthetic --policies full,snapkv,shotkv --budgets 32",
             getenv("KVSIM_BIN"), dir);
    ck_assert_msg(run_cmd(cmd, out, sizeof out) == 0, "demo failed: %s", out);
    ck_assert_msg(strstr(out, "SYNTHETIC") != NULL, "no note on stderr: %s", out);
    snprintf(path, sizeof path, "%s/report.html", dir);
    char *html = slurp(path);
    ck_assert_ptr_nonnull(strstr(html, "SYNTHETIC DATA"));
    ck_assert_ptr_nonnull(strstr(html, "class=\"note\""));
    free(html);
}
END_TEST

Suite *suite_analyze(void)
{
    Suite *s = suite_create("analyze");
    TCase *t = tcase_create("analyze");
    tcase_set_timeout(t, 60);
    tcase_add_test(t, row_stats_uniform);
    tcase_add_test(t, row_stats_one_hot);
    tcase_add_test(t, mass_count_matches_sort);
    tcase_add_test(t, funnel_uniform_recomputed);
    tcase_add_test(t, funnel_uniform_from_summaries);
    tcase_add_test(t, funnel_summaries_agree_with_rows);
    tcase_add_test(t, pick_layers);
    tcase_add_test(t, funneling_sink_brightest_pooled);
    tcase_add_test(t, funneling_sink_brightest_exact);
    tcase_add_test(t, funneling_sink_brightest_sampled);
    tcase_add_test(t, funneling_pooled_needs_summaries);
    tcase_add_test(t, figures_render_and_marks);
    tcase_add_test(t, short_labels);
    tcase_add_test(t, base64_vectors);
    tcase_add_test(t, results_merge_and_missing_column);
    tcase_add_test(t, report_names_policies_and_links_files);
    tcase_add_test(t, report_fraction_budget_and_foreign_results);
    suite_add_tcase(s, t);
    if (getenv("KVSIM_BIN")) {
        TCase *cli = tcase_create("cli");
        tcase_set_timeout(cli, 120);
        tcase_add_test(cli, cli_analyze_errors);
        tcase_add_test(cli, cli_demo_synthetic_fallback);
        char buf[512];
        if (kv_test_shared("models/stories260K/stories260K.bin", buf, sizeof buf))
            tcase_add_test(cli, cli_demo_real_model);
        else
            kv_test_skip("analyze cli_demo_real_model", "models/stories260K not found");
        if (access("../shared/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", R_OK) == 0)
            tcase_add_test(cli, cli_demo_smollm2);
        else
            kv_test_skip("analyze/cli_demo_smollm2",
                         "../shared/models/SmolLM2-135M-Instruct/ not found (the demo looks there from the checkout)");
        suite_add_tcase(s, cli);
    } else {
        kv_test_skip("analyze cli", "KVSIM_BIN not set (run through make test)");
    }
    return s;
}
