/*
 * closed_run.c: the two closed-loop commands as library calls (sim/closed.h): kv_eval_run (kvsim
 * eval: one prompt, policies x budgets, the reference teacher-forced through each) and the prompt
 * handling they share with capture (the same tokenization, so that `kvsim capture` and `kvsim eval`
 * on one prompt see the same tokens and replay's open-loop numbers line up with eval's).
 * kv_niah_run (kvsim niah) is in sim/niah.c.
 */
#include "sim/closed.h"
#include "sim/closed_internal.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void kv_eval_opts_init(kv_eval_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->steps = 32;
    o->backend = "auto";
    o->segments = "auto";
    o->step_rows = 1;
}

void kv_closed_session_free(kv_closed_session_t *s)
{
    if (!s)
        return;
    kv_fwd_free(s->f);
    kv_backend_close(s->be);
    kv_tokenizer_free(s->tok);
    kv_model_free(s->m);
    memset(s, 0, sizeof *s);
}

int kv_closed_session_open(const char *model, const char *tokenizer, int need_tok, const char *backend, int threads,
                           kv_closed_session_t *s)
{
    memset(s, 0, sizeof *s);
    char deftok[1100];
    const char *tp = tokenizer ? tokenizer : kv_model_default_tokenizer(model, deftok, sizeof deftok);
    int rc = kv_model_load(model, &s->m);
    if (rc == KV_OK && tp)
        rc = kv_tokenizer_load(tp, s->m->cfg.vocab_size, &s->tok);
    else if (rc == KV_OK && need_tok)
        rc = kv_error(KV_EINVAL, "%s: no tokenizer (give -z TOKENIZER)", model);
    if (rc == KV_OK)
        rc = kv_backend_open(backend ? backend : "auto", threads, &s->be);
    if (rc == KV_OK) {
        snprintf(s->tok_path, sizeof s->tok_path, "%s", tp ? tp : "(none: token ids given)");
        rc = kv_model_sha256(s->m, s->model_sha);
    }
    if (rc)
        kv_closed_session_free(s);
    return rc;
}

int kv_closed_prompt(const kv_closed_session_t *s, const char *text, const int32_t *ids, int n_ids, int chat,
                     const char *system, const char *segments, int32_t **tokens, int *n, int32_t **segs, int *n_segs)
{
    *tokens = *segs = NULL;
    *n = *n_segs = 0;
    if (ids) {
        int rc = kv_ids_check(ids, n_ids, s->m->cfg.vocab_size, s->tok, "--ids");
        if (rc)
            return rc;
        if (!(*tokens = kv_malloc(sizeof(int32_t) * (size_t)n_ids, "prompt tokens")))
            return KV_ENOMEM;
        memcpy(*tokens, ids, sizeof(int32_t) * (size_t)n_ids);
        *n = n_ids;
        return KV_OK;
    }
    if (!s->tok)
        return kv_error(KV_EINVAL, "a text prompt needs a tokenizer");
    if (!chat) /* as capture: documents separated by <|endoftext|> lines become segments */
        return kv_capture_tokenize(s->tok, text, segments, tokens, n, segs, n_segs);
    char *wrapped = NULL;
    int rc = kv_tokenizer_chat(s->tok, system, text, &wrapped);
    if (rc == KV_OK)
        rc = kv_capture_tokenize(s->tok, wrapped, segments && strcmp(segments, "auto") ? segments : "none", tokens, n,
                                 segs, n_segs);
    kv_free(wrapped);
    return rc;
}

/* ---------------------------------------------------------------- kvsim eval */

static const char *const EVAL_COLS[] = {
    "policy", "budget", "budget_tokens", "step", "kept",     "cache_mean", "mem_bytes", "kl_mean",
    "kl_max", "agree",  "first_div",     "nll",  "nll_full", "dnll",       "nonfinite", "n_steps",
};

const char *const *kv_eval_columns(int *n)
{
    *n = (int)KV_ARRAY_LEN(EVAL_COLS);
    return EVAL_COLS;
}

/* The rows of one configuration: the summary (step "all"), then steps 0..N when asked. */
static int eval_rows(kv_otable_t *t, const char *label, const kv_budget_t *b, const kv_closed_result_t *r,
                     int step_rows)
{
    const int N = r->n_steps;
    char v[16][48];
    const char *cells[16];
    double kl = 0, klmax = 0, agree = 0, nll = 0, nllf = 0;
    for (int s = 0; s < N; s++) {
        kl += r->kl[s];
        klmax = fmax(klmax, r->kl[s]);
        agree += r->agree[s];
        nll += r->nll[s];
        nllf += r->nll_ref[s];
    }
    if (r->nonfinite)
        kl = klmax = agree = nll = NAN;
    snprintf(v[0], sizeof v[0], "%d", b->tokens);
    const double sum[] = {r->kept, r->cache, r->mem, kl / N, klmax, agree / N};
    for (int k = 0; k < 6; k++)
        kv_otable_num(v[1 + k], sizeof v[1], sum[k]);
    if (r->first_div)
        snprintf(v[7], sizeof v[7], "%d", r->first_div);
    else
        snprintf(v[7], sizeof v[7], "none");
    kv_otable_num(v[8], sizeof v[8], nll / N);
    kv_otable_num(v[9], sizeof v[9], nllf / N);
    kv_otable_num(v[10], sizeof v[10], (nll - nllf) / N);
    snprintf(v[11], sizeof v[11], "%ld", r->nonfinite);
    snprintf(v[12], sizeof v[12], "%d", N);
    const char *row[] = {label, b->text, v[0], "all", v[1], v[2],  v[3],  v[4],
                         v[5],  v[6],    v[7], v[8],  v[9], v[10], v[11], v[12]};
    memcpy(cells, row, sizeof row);
    int rc = kv_otable_add(t, cells);
    for (int s = 0; s <= N && step_rows && rc == KV_OK; s++) {
        /* step s: the distribution after s reference tokens (step 0: the prefill's, the same in every
         * configuration); nll: of reference token s (none after the last) */
        char st[16];
        snprintf(st, sizeof st, "%d", s);
        const double k = s ? r->kl[s - 1] : 0.0;
        kv_otable_num(v[4], sizeof v[4], r->nonfinite ? NAN : k);
        snprintf(v[6], sizeof v[6], "%d", s ? r->agree[s - 1] : 1);
        kv_otable_num(v[8], sizeof v[8], s < N ? r->nll[s] : NAN);
        kv_otable_num(v[9], sizeof v[9], s < N ? r->nll_ref[s] : NAN);
        kv_otable_num(v[10], sizeof v[10], s < N ? r->nll[s] - r->nll_ref[s] : NAN);
        const char *srow[] = {label, b->text, v[0], st,   v[1], v[2],  v[3],  v[4],
                              v[4],  v[6],    v[7], v[8], v[9], v[10], v[11], v[12]};
        rc = kv_otable_add(t, srow);
    }
    return rc;
}

/* Provenance shared by eval and niah. */
int kv_closed_prov(kv_otable_t *t, const char *command, const kv_closed_session_t *s, const char *model_path)
{
    char now[32];
    kv_iso_time(now, sizeof now);
    int rc = KV_OK;
    const char *kv[][2] = {
        {"tool", "kvsim " KV_VERSION},       {"git", kv_git_revision()}, {"date", now},
        {"command", command ? command : ""}, {"model", model_path},      {"model_sha256", s->model_sha},
        {"tokenizer", s->tok_path},          {"backend", s->be->device},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(kv) && rc == KV_OK; i++)
        rc = kv_otable_prov(t, kv[i][0], kv[i][1]);
    return rc;
}

int kv_eval_run(const kv_eval_opts_t *o, kv_otable_t **out)
{
    *out = NULL;
    kv_closed_session_t s;
    int32_t *tokens = NULL, *segs = NULL, *ref = NULL;
    int n = 0, n_segs = 0, n_ref = 0;
    kv_closed_t *e = NULL;
    kv_otable_t *t = NULL;
    kv_closed_cfg_t **cfgs = NULL;
    int rc = kv_closed_session_open(o->model_path, o->tokenizer_path, o->ids == NULL || o->reference != NULL,
                                    o->backend, o->n_threads, &s);
    if (rc)
        return rc;
    if ((rc = kv_closed_prompt(&s, o->prompt, o->ids, o->n_ids, o->chat, o->system, o->segments, &tokens, &n, &segs,
                               &n_segs)))
        goto done;
    if (o->reference) {
        if ((rc = kv_tokenizer_encode(s.tok, o->reference, strlen(o->reference), 0, 0, &ref, &n_ref)))
            goto done;
        if (n_ref < 1) {
            rc = kv_error(KV_EINVAL, "the reference text encodes to no tokens");
            goto done;
        }
    }
    const int N = ref ? n_ref : o->steps;
    if ((long)n + N > s.m->cfg.seq_len) {
        rc = kv_error(KV_ERANGE,
                      "the prompt (%d tokens) plus %d reference tokens makes %ld, beyond the model's context of %d "
                      "tokens (seq_len of %s)",
                      n, N, (long)n + N, s.m->cfg.seq_len, o->model_path);
        goto done;
    }
    if ((rc = kv_fwd_create(s.m, s.be, n + N, KV_MAX(n, N + 1), &s.f)))
        goto done;
    kv_closed_opts_t co;
    kv_closed_opts_init(&co);
    co.steps = o->steps;
    co.ref = ref;
    co.n_ref = n_ref;
    co.segments = segs;
    co.n_segments = n_segs;
    co.seed = o->seed;
    co.quiet = o->quiet;
    if ((rc = kv_closed_create(s.f, tokens, n, &co, &e)))
        goto done;
    int nr;
    const int32_t *R = kv_closed_ref(e, &nr);
    if ((rc = kv_otable_create("kvsim eval results", EVAL_COLS, (int)KV_ARRAY_LEN(EVAL_COLS), &t)) ||
        (rc = kv_closed_prov(t, o->command, &s, o->model_path)))
        goto done;
    {
        char buf[1024], b2[64];
        char *text = NULL;
        size_t tl = 0;
        if (o->prompt)
            snprintf(buf, sizeof buf, "%s", o->prompt);
        else
            snprintf(buf, sizeof buf, "(token ids)");
        snprintf(b2, sizeof b2, "%d", n);
        if ((rc = kv_otable_prov(t, "prompt", buf)) || (rc = kv_otable_prov(t, "prompt_tokens", b2)))
            goto done;
        if (s.tok && kv_tokenizer_decode_all(s.tok, R, nr, &text, &tl) == KV_OK)
            snprintf(buf, sizeof buf, "%s", text);
        else
            snprintf(buf, sizeof buf, "(%d token ids)", nr);
        kv_free(text);
        if ((rc = kv_otable_prov(t, "reference", ref ? "the given text" : "the full cache's greedy output")) ||
            (rc = kv_otable_prov(t, "reference_text", buf)))
            goto done;
        size_t k = 0;
        buf[0] = 0;
        for (int i = 0; i < nr && k + 16 < sizeof buf; i++)
            k += (size_t)snprintf(buf + k, sizeof buf - k, "%s%d", i ? " " : "", R[i]);
        snprintf(b2, sizeof b2, "%d", nr);
        if ((rc = kv_otable_prov(t, "reference_ids", buf)) || (rc = kv_otable_prov(t, "steps", b2)))
            goto done;
        snprintf(b2, sizeof b2, "%llu", (unsigned long long)o->seed);
        if ((rc = kv_otable_prov(t, "seed", b2)))
            goto done;
        snprintf(buf, sizeof buf, "%d context tokens, %d evaluation queries", n, nr);
        if ((rc = kv_otable_prov(t, "evaluation", buf)) || (rc = kv_otable_prov(t, "kind", "eval")))
            goto done;
    }
    kv_progress_t pr;
    const long total = (long)o->n_pol * o->n_budgets;
    if (!o->quiet)
        kv_progress_begin(&pr, "eval", total);
    long done_cfg = 0;
    cfgs = kv_calloc((size_t)(o->n_budgets ? o->n_budgets : 1), sizeof *cfgs, "configurations");
    if (!cfgs) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int i = 0; i < o->n_pol && rc == KV_OK; i++) {
        kv_policy_t *p = o->pols[i];
        if ((rc = kv_closed_select(e, p, o->budgets, o->n_budgets, cfgs)))
            break;
        for (int b = 0; b < o->n_budgets && rc == KV_OK; b++) {
            kv_closed_result_t r;
            if ((rc = kv_closed_measure(e, cfgs[b], &r))) {
                kv_error_context(rc, "%s at budget %s", p->label, o->budgets[b].text);
                break;
            }
            rc = eval_rows(t, p->label, kv_closed_cfg_budget(cfgs[b]), &r, o->step_rows);
            if (r.nonfinite)
                kv_warn("%s at budget %s: %ld non-finite logits; its metrics are nan", p->label, o->budgets[b].text,
                        r.nonfinite);
            kv_closed_result_free(&r);
            if (!o->quiet) {
                char det[96];
                snprintf(det, sizeof det, "%.40s at %s", p->desc->name, o->budgets[b].text);
                kv_progress_update(&pr, ++done_cfg, det);
            }
        }
        for (int b = 0; b < o->n_budgets; b++) {
            kv_closed_cfg_free(cfgs[b]);
            cfgs[b] = NULL;
        }
    }
    if (rc == KV_OK && !o->quiet)
        kv_progress_end(&pr, NULL);
    if (rc == KV_OK) {
        *out = t;
        t = NULL;
    }
done:
    if (cfgs)
        for (int b = 0; b < o->n_budgets; b++)
            kv_closed_cfg_free(cfgs[b]);
    kv_free(cfgs);
    kv_otable_free(t);
    kv_closed_free(e);
    kv_free(tokens);
    kv_free(segs);
    kv_free(ref);
    kv_closed_session_free(&s);
    return rc;
}
