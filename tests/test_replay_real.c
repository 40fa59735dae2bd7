/*
 * test_replay_real.c: every registered policy (defaults and declared variants) replayed on a real
 * trace captured from stories260K (two TinyStories documents as segments, 24 decode tokens, W_O
 * recorded), and the oracle checked as the upper bound of every budget-respecting one-shot policy.
 * Registered only when the model and the sample text are found (../shared or $KVSIM_SHARED).
 */
#include "sim/common/kv_common.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_capture.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char g_trace[256];

/* The first story of the sample and the start of the second (the model's context is 512 tokens),
 * separated by <|endoftext|>: two segments. */
static char *two_stories(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return NULL;
    static char buf[8192];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *first = strstr(buf, "<|endoftext|>");
    char *second = first ? strstr(first + 13, "<|endoftext|>") : NULL;
    if (second)
        *second = 0;
    if (first && strlen(first) > 13 + 120) {
        char *cut = first + 13 + 120;
        while (*cut && *cut != ' ')
            cut++;
        *cut = 0;
    }
    return buf;
}

static void capture_once(void)
{
    if (g_trace[0])
        return;
    char model[512], tok[512], text[512];
    kv_test_shared("models/stories260K/stories260K.bin", model, sizeof model);
    kv_test_shared("models/stories260K/tok512.bin", tok, sizeof tok);
    kv_test_shared("data/tinystories_sample.txt", text, sizeof text);
    kv_capture_opts_t o;
    kv_capture_opts_init(&o);
    o.model_path = model;
    o.tokenizer_path = tok;
    o.prompt = two_stories(text);
    ck_assert_ptr_nonnull(o.prompt);
    kv_test_tmp("real.h5", g_trace, sizeof g_trace);
    o.out_path = g_trace;
    o.n_decode = 24;
    o.with_wo = 1;
    o.backend = "cpu";
    kv_capture_result_t res;
    ck_assert_msg(kv_capture_run(&o, &res) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(res.n_segments, 2);
}

static const kv_result_row_t *row(const kv_results_t *r, int pol, int bud, int layer)
{
    for (size_t i = 0; i < r->n; i++)
        if (r->rows[i].policy == pol && r->rows[i].budget == bud && r->rows[i].layer == layer &&
            r->rows[i].head == KV_ALL)
            return &r->rows[i];
    return NULL;
}

START_TEST(every_policy_on_a_real_trace)
{
    capture_once();
    /* every policy with its defaults and every declared variant, oracle first */
    char list[8192] = "oracle";
    size_t used = strlen(list);
    for (int i = 0; i < kv_policy_count(); i++) {
        const kv_policy_desc_t *d = kv_policy_desc_at(i);
        if (strcmp(d->name, "oracle"))
            used += (size_t)snprintf(list + used, sizeof list - used, ",%s", d->name);
        for (const char *v = d->variants; v && *v;) {
            const char *semi = strchr(v, ';');
            int len = semi ? (int)(semi - v) : (int)strlen(v);
            used += (size_t)snprintf(list + used, sizeof list - used, ",%s(%.*s)", d->name, len, v);
            v = semi ? semi + 1 : NULL;
        }
    }
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(g_trace, &t), KV_OK);
    const kv_trace_meta_t *m = kv_trace_meta(t);
    ck_assert(m->has_wo && m->n_segments == 2);
    kv_policy_t **ps;
    int np, nb;
    ck_assert_msg(kv_policy_create_list(list, &ps, &np) == KV_OK, "%s", kv_last_error());
    kv_budget_t *b;
    ck_assert_int_eq(kv_budget_parse_list("16,32,64,0.5", &b, &nb), KV_OK);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_cpu_open(0, &be), KV_OK);
    kv_replay_opts_t o;
    kv_replay_defaults(&o);
    o.quiet = 1;
    o.head_rows = 0;
    kv_results_t *r;
    ck_assert_msg(kv_replay(t, ps, np, b, nb, be, &o, &r) == KV_OK, "%s", kv_last_error());
    for (int p = 0; p < np; p++)
        for (int k = 0; k < nb; k++)
            for (int l = KV_ALL; l < m->n_layers; l++) {
                const kv_result_row_t *w = row(r, p, k, l);
                ck_assert_ptr_nonnull(w);
                ck_assert_msg(w->violations == 0, "%s at %s: bound violated", ps[p]->label, b[k].text);
                ck_assert(w->recall_min >= 0 && w->recall_mean <= 1 + 1e-6 && isfinite(w->err_mean));
                /* the model-space form holds too (the trace has W_O) */
                ck_assert_msg(w->wo_err_mean <= w->wo_bound_mean * (1 + 1e-4) + 1e-6, "%s: W_O bound", ps[p]->label);
                ck_assert(w->mem_bytes > 0);
                /* the oracle keeps, for each query, the B context tokens of largest group-mean
                 * probability: no one-shot policy holding at most B per KV head can beat its
                 * layer-mean recall (1e-6: float sums) */
                const unsigned f = ps[p]->flags;
                if ((f & KV_POL_ONESHOT) && ps[p]->gran == KV_GRAN_KV && ps[p]->agg == KV_AGG_MEAN &&
                    !(f & (KV_POL_BUDGET_LAYER | KV_POL_BUDGET_SEQUENCE | KV_POL_OVER_BUDGET | KV_POL_NO_EVICT)) &&
                    kv_policy_budget_slack(ps[p], m->n_prompt, w->budget_tokens) == 0 && l != KV_ALL) {
                    const kv_result_row_t *oracle = row(r, 0, k, l);
                    ck_assert_msg(oracle->recall_mean >= w->recall_mean - 1e-6,
                                  "%s beats the oracle at %s, layer %d: %.6f > %.6f", ps[p]->label, b[k].text, l,
                                  w->recall_mean, oracle->recall_mean);
                }
            }
    kv_results_free(r);
    for (int p = 0; p < np; p++)
        kv_policy_free(ps[p]);
    kv_free(ps);
    kv_free(b);
    kv_backend_close(be);
    kv_trace_close(t);
}
END_TEST

Suite *suite_replay_real(void)
{
    Suite *s = suite_create("replay_real");
    char a[512], b[512], c[512];
    if (!kv_test_shared("models/stories260K/stories260K.bin", a, sizeof a) ||
        !kv_test_shared("models/stories260K/tok512.bin", b, sizeof b) ||
        !kv_test_shared("data/tinystories_sample.txt", c, sizeof c)) {
        kv_test_skip("replay_real", "stories260K or tinystories_sample.txt not found");
        return s;
    }
    TCase *tc = tcase_create("stories260K");
    tcase_add_test(tc, every_policy_on_a_real_trace);
    suite_add_tcase(s, tc);
    return s;
}
