/*
 * test_closed.c: closed-loop evaluation (sim/closed.h, kvsim eval and kvsim niah).
 *   - attn_ragged against a naive double-precision reference: ragged lengths, positions with gaps,
 *     queries before, among and after the entries (some see none), storage per KV head and per
 *     query head; a cache of every token in order gives the same bits for both storage layouts;
 *   - on a tiny random-weight model (always) and on stories260K (when ../shared has it):
 *     a configuration that keeps everything gives KL 0 and agreement 1 exactly and the full cache's
 *     greedy tokens (one-shot and decode-time), the reference equals kvsim generate's greedy output,
 *     a small budget gives KL > 0; the compressed cache holds only the kept tokens (entries per layer
 *     and storage head = kept context + reference, capacity = the largest kept set + the reference
 *     + 1); evicted positions have no effect (their K and V overwritten: the same bits); the greedy
 *     continuation of the block verification equals token-by-token decoding;
 *   - the CLI: eval and niah --help, usage errors, a small eval run (TSV and JSON columns) and a
 *     small niah grid on stories260K.
 */
#include "tests/capture_fixtures.h"
#include "tests/kv_test.h"

#include "kernels/kv_backend.h"
#include "sim/closed.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "sim/kv_policy.h"
#include "sim/result.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"

#include <check.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---------------------------------------------------------------- the op */

/* Naive reference: double sums, entries of the query head's storage head at positions <= its own. */
static void naive_ragged(const kv_attn_ragged_args_t *a, double *out, double *lse)
{
    const int H = a->n_heads, d = a->head_dim, G = H / a->n_store;
    for (int i = 0; i < a->n_q; i++)
        for (int h = 0; h < H; h++) {
            const int s = h / G, len = a->len[s];
            const float *q = a->q + ((size_t)i * H + h) * d;
            double mx = -INFINITY, z = 0, *o = out + ((size_t)i * H + h) * d;
            double sc[512];
            int nv = 0;
            for (int e = 0; e < len && a->pos[(size_t)s * a->cap + e] <= a->q_pos0 + i; e++, nv++) {
                double dot = 0;
                for (int x = 0; x < d; x++)
                    dot += (double)q[x] * a->k[((size_t)s * a->cap + e) * d + x];
                sc[e] = dot * a->scale;
                mx = fmax(mx, sc[e]);
            }
            for (int x = 0; x < d; x++)
                o[x] = 0;
            for (int e = 0; e < nv; e++) {
                const double p = exp(sc[e] - mx);
                z += p;
                for (int x = 0; x < d; x++)
                    o[x] += p * a->v[((size_t)s * a->cap + e) * d + x];
            }
            for (int x = 0; x < d && nv; x++)
                o[x] /= z;
            lse[(size_t)h * a->n_q + i] = nv ? mx + log(z) : -INFINITY;
        }
}

START_TEST(ragged_matches_naive)
{
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_open("cpu", 0, &be), KV_OK);
    /* n_q, q_pos0, H, stores, d, cap */
    const int shapes[][6] = {{1, 300, 8, 2, 16, 100},
                             {70, 0, 4, 4, 8, 90},
                             {9, 20, 6, 3, 32, 40},
                             {5, 5, 4, 1, 64, 12},
                             {3, 0, 2, 2, 8, 30}};
    kv_rng_t r;
    kv_rng_seed(&r, 7);
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int nq = shapes[c][0], p0 = shapes[c][1], H = shapes[c][2], S = shapes[c][3], d = shapes[c][4],
                  cap = shapes[c][5];
        float *q = malloc(sizeof(float) * nq * H * d), *k = malloc(sizeof(float) * S * cap * d),
              *v = malloc(sizeof(float) * S * cap * d), *out = malloc(sizeof(float) * nq * H * d),
              *lse = malloc(sizeof(float) * H * nq);
        int32_t *pos = malloc(sizeof(int32_t) * S * cap), len[16];
        double *ro = malloc(sizeof(double) * nq * H * d), *rl = malloc(sizeof(double) * H * nq);
        for (int x = 0; x < nq * H * d; x++)
            q[x] = (float)kv_rng_normal(&r);
        for (int x = 0; x < S * cap * d; x++) {
            k[x] = (float)kv_rng_normal(&r);
            v[x] = (float)kv_rng_normal(&r);
        }
        for (int s = 0; s < S; s++) {
            len[s] = s == 0 ? cap : (int)kv_rng_below(&r, (uint64_t)cap + 1);
            int p = (int)kv_rng_below(&r, 3);
            for (int e = 0; e < cap; e++) {
                pos[s * cap + e] = p;
                p += 1 + (int)kv_rng_below(&r, 3);
            }
        }
        kv_attn_ragged_args_t a = {out, lse, q, k, v, pos, len, cap, S, nq, p0, H, d, 1.0f / sqrtf((float)d)};
        ck_assert_msg(be->ops->attn_ragged(be, &a) == KV_OK, "%s", kv_last_error());
        naive_ragged(&a, ro, rl);
        for (int x = 0; x < nq * H * d; x++)
            kv_assert_close(out[x], ro[x], 1e-5, 1e-4, "attn_ragged output");
        for (int x = 0; x < H * nq; x++) {
            if (isinf(rl[x]))
                ck_assert_msg(isinf(lse[x]) && lse[x] < 0, "a query that sees no entry: lse -inf");
            else
                kv_assert_close(lse[x], rl[x], 1e-5, 1e-5, "attn_ragged lse");
        }
        free(q), free(k), free(v), free(out), free(lse), free(pos), free(ro), free(rl);
    }
    /* every token in order: a cache per KV head and the same tokens copied per query head give the
     * same bits (each query head is computed on its own) */
    {
        enum { H = 8, Hkv = 2, d = 16, n = 77, NQ = 5 };
        float *q = malloc(sizeof(float) * NQ * H * d), *k = malloc(sizeof(float) * H * (n + NQ) * d),
              *v = malloc(sizeof(float) * H * (n + NQ) * d), *o1 = malloc(sizeof(float) * NQ * H * d),
              *o2 = malloc(sizeof(float) * NQ * H * d);
        int32_t pos[H * (n + NQ)], len[H];
        for (int x = 0; x < NQ * H * d; x++)
            q[x] = (float)kv_rng_normal(&r);
        for (int g = 0; g < Hkv; g++)
            for (int j = 0; j < n + NQ; j++)
                for (int x = 0; x < d; x++) {
                    k[((size_t)g * (n + NQ) + j) * d + x] = (float)kv_rng_normal(&r);
                    v[((size_t)g * (n + NQ) + j) * d + x] = (float)kv_rng_normal(&r);
                }
        for (int s = 0; s < H; s++) {
            len[s] = n + NQ;
            for (int j = 0; j < n + NQ; j++)
                pos[s * (n + NQ) + j] = j;
        }
        kv_attn_ragged_args_t a = {o1, NULL, q, k, v, pos, len, n + NQ, Hkv, NQ, n, H, d, 0.25f};
        ck_assert_int_eq(be->ops->attn_ragged(be, &a), KV_OK);
        for (int h = H - 1; h >= 0; h--) /* query head h's copy of KV head h / 4, in place from the top */
            for (int j = 0; j < n + NQ; j++) {
                memmove(k + ((size_t)h * (n + NQ) + j) * d, k + ((size_t)(h / 4) * (n + NQ) + j) * d,
                        sizeof(float) * d);
                memmove(v + ((size_t)h * (n + NQ) + j) * d, v + ((size_t)(h / 4) * (n + NQ) + j) * d,
                        sizeof(float) * d);
            }
        a.out = o2;
        a.n_store = H;
        ck_assert_int_eq(be->ops->attn_ragged(be, &a), KV_OK);
        ck_assert_msg(!memcmp(o1, o2, sizeof(float) * NQ * H * d), "storage layouts give different bits");
        free(q), free(k), free(v), free(o1), free(o2);
    }
    kv_backend_close(be);
}
END_TEST

/* ---------------------------------------------------------------- on a model */

typedef struct {
    kv_model_t *m;
    kv_backend_t *be;
    kv_fwd_t *f;
    kv_closed_t *e;
    int32_t *prompt;
    int n;
} fixture_t;

static void fixture_open(fixture_t *x, const char *model, const int32_t *prompt, int n, int steps, int greedy_steps)
{
    memset(x, 0, sizeof *x);
    ck_assert_msg(kv_model_load(model, &x->m) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(kv_backend_open("cpu", 0, &x->be), KV_OK);
    ck_assert_msg(kv_fwd_create(x->m, x->be, n + steps, n > steps + 1 ? n : steps + 1, &x->f) == KV_OK, "%s",
                  kv_last_error());
    kv_closed_opts_t o;
    kv_closed_opts_init(&o);
    o.steps = steps;
    o.quiet = 1;
    o.greedy_steps = greedy_steps;
    ck_assert_msg(kv_closed_create(x->f, prompt, n, &o, &x->e) == KV_OK, "%s", kv_last_error());
    x->prompt = malloc(sizeof(int32_t) * n);
    memcpy(x->prompt, prompt, sizeof(int32_t) * n);
    x->n = n;
}

static void fixture_close(fixture_t *x)
{
    kv_closed_free(x->e);
    kv_fwd_free(x->f);
    kv_backend_close(x->be);
    kv_model_free(x->m);
    free(x->prompt);
}

/* One configuration of `spec` at budget text `bud`, measured. */
static kv_closed_cfg_t *one(fixture_t *x, const char *spec, const char *bud, kv_policy_t **p, kv_closed_result_t *r)
{
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list(bud, &b, &nb), KV_OK);
    ck_assert_msg(kv_policy_create(spec, p) == KV_OK, "%s", kv_last_error());
    kv_closed_cfg_t *c;
    ck_assert_msg(kv_closed_select(x->e, *p, b, 1, &c) == KV_OK, "%s", kv_last_error());
    if (r)
        ck_assert_msg(kv_closed_measure(x->e, c, r) == KV_OK, "%s", kv_last_error());
    kv_free(b);
    return c;
}

/* The checks every model gets (see the top of the file). */
static void closed_checks(fixture_t *x, const char *small_budget)
{
    int nr;
    const int32_t *R = kv_closed_ref(x->e, &nr);
    const int T = x->n + nr;
    char big[32];
    snprintf(big, sizeof big, "%d", T + 1);
    /* the reference is the forward pass's own greedy output */
    {
        kv_fwd_t *f;
        ck_assert_int_eq(kv_fwd_create(x->m, x->be, T + 1, x->n, &f), KV_OK);
        kv_gen_result_t g;
        ck_assert_msg(kv_generate_ids(f, NULL, x->prompt, x->n, nr, 0, 0, NULL, &g) == KV_OK, "%s", kv_last_error());
        ck_assert_int_eq(g.n_tokens - g.n_prompt, nr);
        for (int t = 0; t < nr; t++)
            ck_assert_msg(g.tokens[x->n + t] == R[t], "reference token %d: %d, kv_generate %d", t, R[t],
                          g.tokens[x->n + t]);
        kv_free(g.tokens);
        kv_fwd_free(f);
    }
    /* keeping everything: KL 0 and agreement 1 exactly, one-shot (block) and decode-time (steps) */
    const char *everything[] = {"full", "snapkv", "streaming_llm(mode=decode)", "h2o(mode=decode)", "tova"};
    for (size_t i = 0; i < sizeof everything / sizeof everything[0]; i++) {
        kv_policy_t *p;
        kv_closed_result_t r;
        kv_closed_cfg_t *c = one(x, everything[i], big, &p, &r);
        for (int s = 0; s < r.n_steps; s++) {
            ck_assert_msg(r.kl[s] == 0.0, "%s at %s: KL %g at step %d", everything[i], big, r.kl[s], s + 1);
            ck_assert_msg(r.agree[s] == 1, "%s: top-1 differs at step %d", everything[i], s + 1);
            ck_assert_msg(r.nll[s] == r.nll_ref[s], "%s: NLL differs at step %d", everything[i], s);
        }
        ck_assert_int_eq(r.first_div, 0);
        int32_t out[256];
        int ng;
        ck_assert_msg(kv_closed_greedy(x->e, c, nr, out, &ng) == KV_OK, "%s", kv_last_error());
        ck_assert_int_eq(ng, nr);
        ck_assert_msg(!memcmp(out, R, sizeof(int32_t) * nr), "%s: the greedy continuation differs", everything[i]);
        kv_closed_result_free(&r);
        kv_closed_cfg_free(c);
        kv_policy_free(p);
    }
    /* a small budget loses something; the cache holds only the kept tokens */
    {
        kv_policy_t *p;
        kv_closed_result_t r;
        kv_closed_cfg_t *c = one(x, "snapkv(window=4)", small_budget, &p, &r);
        double kl = 0;
        for (int s = 0; s < r.n_steps; s++)
            kl += r.kl[s];
        ck_assert_msg(kl > 0, "snapkv at %s: KL %g", small_budget, kl);
        const int B = kv_closed_cfg_budget(c)->tokens, S = kv_closed_cfg_n_store(c);
        const kv_trace_meta_t *m = kv_closed_meta(x->e);
        int hi = 0;
        for (int l = 0; l < m->n_layers; l++)
            for (int s = 0; s < S; s++) {
                const uint8_t *mk = kv_closed_cfg_kept(c, l) + (size_t)s * T;
                int kept = 0;
                for (int j = 0; j < T; j++)
                    kept += mk[j] != 0;
                ck_assert_msg(kept <= B && kept > 0, "layer %d head %d keeps %d of budget %d", l, s, kept, B);
                ck_assert_int_eq(kv_closed_cfg_entries(c, l, s), kept + nr);
                hi = kept > hi ? kept : hi;
            }
        ck_assert_int_eq(kv_closed_cfg_capacity(c), hi + nr + 1);
        ck_assert_msg(hi < x->n, "budget %s keeps the whole prompt", small_budget);
        /* evicted positions have no effect: overwrite their K and V, measure again: the same bits */
        int32_t g1[256], g2[256];
        int n1, n2;
        ck_assert_int_eq(kv_closed_greedy(x->e, c, nr, g1, &n1), KV_OK);
        const size_t lay = (size_t)m->n_kv_heads * T * m->head_dim;
        float *save = malloc(sizeof(float) * lay * 2 * m->n_layers);
        for (int l = 0; l < m->n_layers; l++) {
            float *K = kv_closed_layer_kv(x->e, l, 'k'), *V = kv_closed_layer_kv(x->e, l, 'v');
            memcpy(save + 2 * l * lay, K, sizeof(float) * lay);
            memcpy(save + (2 * l + 1) * lay, V, sizeof(float) * lay);
            for (int s = 0; s < S; s++) /* gran=kv: storage head s is KV head s */
                for (int j = 0; j < x->n; j++)
                    if (!kv_closed_cfg_kept(c, l)[(size_t)s * T + j])
                        for (int q = 0; q < m->head_dim; q++) {
                            K[((size_t)s * T + j) * m->head_dim + q] = 1e4f * (q % 3 - 1);
                            V[((size_t)s * T + j) * m->head_dim + q] = -1e4f;
                        }
        }
        kv_closed_result_t r2;
        ck_assert_int_eq(kv_closed_measure(x->e, c, &r2), KV_OK);
        ck_assert_msg(!memcmp(r.kl, r2.kl, sizeof(double) * r.n_steps), "evicted K/V changed the KL");
        ck_assert_msg(!memcmp(r.nll, r2.nll, sizeof(double) * r.n_steps), "evicted K/V changed the NLL");
        ck_assert_int_eq(kv_closed_greedy(x->e, c, nr, g2, &n2), KV_OK);
        ck_assert_int_eq(n1, n2);
        ck_assert_msg(!memcmp(g1, g2, sizeof(int32_t) * n1), "evicted K/V changed the greedy output");
        for (int l = 0; l < m->n_layers; l++) { /* the prompt's K and V back, for the checks that follow */
            memcpy(kv_closed_layer_kv(x->e, l, 'k'), save + 2 * l * lay, sizeof(float) * lay);
            memcpy(kv_closed_layer_kv(x->e, l, 'v'), save + (2 * l + 1) * lay, sizeof(float) * lay);
        }
        free(save);
        /* the first divergence is where the greedy continuation leaves the reference */
        if (r.first_div) {
            for (int t = 0; t < r.first_div; t++)
                ck_assert_int_eq(g1[t], R[t]);
            ck_assert_int_ne(g1[r.first_div], R[r.first_div]);
        } else {
            ck_assert_msg(!memcmp(g1, R, sizeof(int32_t) * nr), "no divergence but another output");
        }
        kv_closed_result_free(&r);
        kv_closed_result_free(&r2);
        kv_closed_cfg_free(c);
        kv_policy_free(p);
    }
}

/* The block verification's greedy output equals token-by-token decoding. */
static void greedy_paths(const char *model, const int32_t *prompt, int n, int steps, const char *spec, const char *bud)
{
    int32_t out[2][256];
    int k[2];
    for (int mode = 0; mode < 2; mode++) {
        fixture_t x;
        fixture_open(&x, model, prompt, n, steps, mode);
        kv_policy_t *p;
        kv_closed_cfg_t *c = one(&x, spec, bud, &p, NULL);
        ck_assert_int_eq(kv_closed_greedy(x.e, c, steps, out[mode], &k[mode]), KV_OK);
        kv_closed_cfg_free(c);
        kv_policy_free(p);
        fixture_close(&x);
    }
    ck_assert_int_eq(k[0], k[1]);
    ck_assert_msg(!memcmp(out[0], out[1], sizeof(int32_t) * k[0]), "block verification and steps differ");
}

#define TD 32
#define TH 64
#define TL 2
#define TNH 4
#define TKV 2
#define TV (259 + FX_EXTRA)
#define TS 96

static char g_tiny[256];

static void tiny_model(void)
{
    if (g_tiny[0])
        return;
    fx_model_t m;
    fx_model_init(&m, TD, TH, TL, TNH, TKV, TV, TS, 0, 77);
    size_t n;
    unsigned char *img = fx_model_v1(&m, &n);
    kv_test_tmp("closed_tiny.bin", g_tiny, sizeof g_tiny);
    ck_assert_int_eq(fx_write(g_tiny, img, n), 0);
    free(img);
    fx_model_free(&m);
}

START_TEST(tiny_model_closed_loop)
{
    tiny_model();
    int32_t prompt[48];
    kv_rng_t r;
    kv_rng_seed(&r, 3);
    for (int i = 0; i < 48; i++)
        prompt[i] = 3 + (int32_t)kv_rng_below(&r, TV - 3);
    fixture_t x;
    fixture_open(&x, g_tiny, prompt, 48, 12, 0);
    closed_checks(&x, "8");
    fixture_close(&x);
    greedy_paths(g_tiny, prompt, 48, 12, "snapkv(window=4)", "6");
    greedy_paths(g_tiny, prompt, 48, 12, "streaming_llm", "10");
}
END_TEST

static char g_model[1024], g_tok[1024];

static int32_t *stories_prompt(int *n)
{
    kv_tokenizer_t *tok;
    ck_assert_int_eq(kv_tokenizer_load(g_tok, 512, &tok), KV_OK);
    const char *text = "Once upon a time there was a little girl named Lily. She loved to play with her toys in the "
                       "garden. One day she saw a big red ball under the old tree near the house.";
    int32_t *ids;
    ck_assert_int_eq(kv_tokenizer_encode(tok, text, strlen(text), 1, 0, &ids, n), KV_OK);
    kv_tokenizer_free(tok);
    return ids;
}

START_TEST(stories_closed_loop)
{
    int n;
    int32_t *ids = stories_prompt(&n);
    fixture_t x;
    fixture_open(&x, g_model, ids, n, 24, 0);
    closed_checks(&x, "8");
    /* every registered policy runs closed-loop at a small and a full budget (shotkv: no segments) */
    kv_policy_t **pols;
    int np;
    ck_assert_int_eq(kv_policy_create_list("all", &pols, &np), KV_OK);
    kv_budget_t *b;
    int nb;
    ck_assert_int_eq(kv_budget_parse_list("8,200", &b, &nb), KV_OK);
    for (int i = 0; i < np; i++) {
        kv_closed_cfg_t *c[2];
        int rc = kv_closed_select(x.e, pols[i], b, nb, c);
        if (pols[i]->flags & KV_POL_NEEDS_SEGMENTS) {
            ck_assert_int_ne(rc, KV_OK);
            ck_assert_msg(strstr(kv_last_error(), "segments") != NULL, "%s", kv_last_error());
        } else {
            ck_assert_msg(rc == KV_OK, "%s", kv_last_error());
            for (int k = 0; k < nb; k++) {
                kv_closed_result_t r;
                ck_assert_msg(kv_closed_measure(x.e, c[k], &r) == KV_OK, "%s: %s", pols[i]->label, kv_last_error());
                ck_assert_int_eq(r.nonfinite, 0);
                for (int s = 0; s < r.n_steps; s++)
                    ck_assert_msg(r.kl[s] >= 0 && (k == 0 || r.kl[s] == 0 || (pols[i]->flags & KV_POL_BUDGET_FREE)),
                                  "%s at %s: KL %g at step %d", pols[i]->label, b[k].text, r.kl[s], s + 1);
                kv_closed_result_free(&r);
                kv_closed_cfg_free(c[k]);
            }
        }
        kv_policy_free(pols[i]);
    }
    kv_free(pols);
    kv_free(b);
    fixture_close(&x);
    greedy_paths(g_model, ids, n, 24, "h2o", "10");
    kv_free(ids);
}
END_TEST

/* ---------------------------------------------------------------- the CLI */

static char g_out[1 << 16], g_err[1 << 16];

static void slurp(const char *path, char *buf, size_t len)
{
    buf[0] = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return;
    size_t n = fread(buf, 1, len - 1, f);
    buf[n] = 0;
    fclose(f);
}

static int kvsim(const char *args)
{
    char out[256], err[256], cmd[8192];
    kv_test_tmp("closed_stdout", out, sizeof out);
    kv_test_tmp("closed_stderr", err, sizeof err);
    snprintf(cmd, sizeof cmd, "%s %s >%s 2>%s", getenv("KVSIM_BIN"), args, out, err);
    int st = system(cmd);
    slurp(out, g_out, sizeof g_out);
    slurp(err, g_err, sizeof g_err);
    unlink(out);
    unlink(err);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 255;
}

START_TEST(cli_help_and_usage)
{
    const char *cmds[] = {"eval", "niah"};
    for (int i = 0; i < 2; i++) {
        char a[64];
        snprintf(a, sizeof a, "%s --help", cmds[i]);
        ck_assert_int_eq(kvsim(a), 0);
        ck_assert_msg(!strncmp(g_out, "usage: kvsim ", 13) && strstr(g_out, "options:") && strstr(g_out, "example:"),
                      "%s --help: %s", cmds[i], g_out);
        snprintf(a, sizeof a, "%s --bogus", cmds[i]);
        ck_assert_int_eq(kvsim(a), 2);
        ck_assert_msg(strstr(g_err, "unknown option '--bogus'") && strstr(g_err, "--help"), "%s", g_err);
    }
    ck_assert_int_eq(kvsim("eval model.bin"), 2);
    ck_assert_msg(strstr(g_err, "expected MODEL PROMPT POLICIES BUDGETS"), "%s", g_err);
    ck_assert_int_eq(kvsim("eval m.bin text 'nosuch' 64"), 2);
    ck_assert_msg(strstr(g_err, "POLICIES") && strstr(g_err, "nosuch"), "%s", g_err);
    ck_assert_int_eq(kvsim("eval m.bin text snapkv 64,x"), 2);
    ck_assert_msg(strstr(g_err, "BUDGETS"), "%s", g_err);
    ck_assert_int_eq(kvsim("eval m.bin text snapkv 64 --system hi"), 2);
    ck_assert_msg(strstr(g_err, "--system needs --chat"), "%s", g_err);
    ck_assert_int_eq(kvsim("eval m.bin text snapkv 64 --steps 0"), 2);
    ck_assert_int_eq(kvsim("eval /nonexistent/m.bin text snapkv 64 -q"), 1);
    ck_assert_msg(strstr(g_err, "kvsim eval: ") && strstr(g_err, "/nonexistent/m.bin"), "%s", g_err);
    ck_assert_int_eq(kvsim("niah m.bin --depths 1.5"), 2);
    ck_assert_msg(strstr(g_err, "--depths"), "%s", g_err);
    ck_assert_int_eq(kvsim("niah m.bin --lengths 0"), 2);
    ck_assert_msg(strstr(g_err, "--lengths"), "%s", g_err);
}
END_TEST

START_TEST(cli_eval_stories)
{
    char tsv[256], json[256], a[4096];
    kv_test_tmp("eval.tsv", tsv, sizeof tsv);
    kv_test_tmp("eval.json", json, sizeof json);
    snprintf(a, sizeof a,
             "eval %s -z %s 'Once upon a time there was a little girl named Lily. She loved to play.' "
             "'full,snapkv(window=4),tova' 6,1.0 -n 8 -o %s --json %s -q",
             g_model, g_tok, tsv, json);
    ck_assert_msg(kvsim(a) == 0, "%s", g_err);
    kv_table_t *t;
    ck_assert_msg(kv_table_read(tsv, &t) == KV_OK, "%s", kv_last_error());
    int n;
    const char *const *cols = kv_eval_columns(&n);
    for (int c = 0; c < n; c++)
        ck_assert_msg(kv_table_col(t, cols[c]) >= 0, "column %s missing", cols[c]);
    ck_assert_str_eq(kv_table_prov(t, "kind"), "eval");
    ck_assert_ptr_nonnull(kv_table_prov(t, "model_sha256"));
    /* 3 policies x 2 budgets x (summary + steps 0..8) */
    ck_assert_int_eq((int)t->n_rows, 3 * 2 * 10);
    const int cp = kv_table_col(t, "policy"), cs = kv_table_col(t, "step"), ck = kv_table_col(t, "kl_mean"),
              cb = kv_table_col(t, "budget"), ca = kv_table_col(t, "agree");
    int summaries = 0;
    for (size_t r = 0; r < t->n_rows; r++) {
        if (strcmp(kv_table_get(t, r, cs), "all"))
            continue;
        summaries++;
        const int full = !strncmp(kv_table_get(t, r, cp), "full(", 5) || !strcmp(kv_table_get(t, r, cb), "1");
        if (full && strncmp(kv_table_get(t, r, cp), "tova", 4)) {
            ck_assert_msg(kv_table_num(t, r, ck) == 0, "row %zu: KL %s", r, kv_table_get(t, r, ck));
            ck_assert_msg(kv_table_num(t, r, ca) == 1, "row %zu: agreement %s", r, kv_table_get(t, r, ca));
        }
    }
    ck_assert_int_eq(summaries, 6);
    kv_table_free(t);
    size_t len;
    char *js = kv_test_read_file(json, &len);
    ck_assert_msg(strstr(js, "\"provenance\"") && strstr(js, "\"kl_mean\": 0"), "%.300s", js);
    free(js);
}
END_TEST

START_TEST(cli_niah_stories)
{
    char tsv[256], a[4096], hay[1024];
    kv_test_tmp("niah.tsv", tsv, sizeof tsv);
    ck_assert_ptr_nonnull(kv_test_shared("data/tinystories_sample.txt", hay, sizeof hay));
    snprintf(a, sizeof a,
             "niah %s -z %s 'snapkv(window=8),streaming_llm' 16 --haystack %s --lengths 200,300 --depths 0,0.5,1 "
             "--max-new 8 -o %s -q",
             g_model, g_tok, hay, tsv);
    ck_assert_msg(kvsim(a) == 0, "%s", g_err);
    kv_table_t *t;
    ck_assert_msg(kv_table_read(tsv, &t) == KV_OK, "%s", kv_last_error());
    ck_assert_str_eq(kv_table_prov(t, "kind"), "niah");
    const char *need[] = {"policy", "budget", "length", "depth", "n_prompt", "found", "answer", "kl_mean", "agree"};
    for (size_t c = 0; c < sizeof need / sizeof need[0]; c++)
        ck_assert_msg(kv_table_col(t, need[c]) >= 0, "column %s missing", need[c]);
    /* (full + 2 policies) x 6 cells, plus a summary row per (policy, budget) */
    ck_assert_int_eq((int)t->n_rows, 3 * 6 + 3);
    kv_table_free(t);
}
END_TEST

Suite *suite_closed(void)
{
    Suite *s = suite_create("closed");
    TCase *op = tcase_create("attn_ragged");
    tcase_add_test(op, ragged_matches_naive);
    suite_add_tcase(s, op);
    TCase *tiny = tcase_create("tiny model");
    tcase_add_test(tiny, tiny_model_closed_loop);
    suite_add_tcase(s, tiny);
    const int have = kv_test_shared("models/stories260K/stories260K.bin", g_model, sizeof g_model) &&
                     kv_test_shared("models/stories260K/tok512.bin", g_tok, sizeof g_tok);
    if (have) {
        TCase *st = tcase_create("stories260K");
        tcase_add_test(st, stories_closed_loop);
        suite_add_tcase(s, st);
    } else {
        kv_test_skip("closed: stories260K", "models/stories260K not found");
    }
    if (getenv("KVSIM_BIN")) {
        TCase *cli = tcase_create("cli");
        tcase_add_test(cli, cli_help_and_usage);
        if (have) {
            tcase_add_test(cli, cli_eval_stories);
            tcase_add_test(cli, cli_niah_stories);
        }
        suite_add_tcase(s, cli);
    } else {
        kv_test_skip("closed: cli", "KVSIM_BIN not set (run through make test)");
    }
    return s;
}
