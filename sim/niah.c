/*
 * niah.c: needle in a haystack (kvsim niah): retrieval with the full cache and with every policy x
 * budget, over a grid of context lengths and needle depths, closed loop (sim/closed.h).
 *
 * A prompt of a target length L (tokens, the chat template included) is filler text with one needle
 * sentence holding a key (a 5-digit number, different in every cell, from the seed), placed after
 * the share `depth` of the filler (0: before all of it, 1: after all of it), then the question. The
 * filler is a text file's sentences (--haystack; documents separated by <|endoftext|> lines are
 * joined) taken in order and repeated as needed, or by default the passkey test's own filler
 * (Mohtashami and Jaggi, "Landmark Attention", 2023: "The grass is green. The sky is blue. ..."),
 * which PyramidKV's and many other papers' retrieval tests reuse. With the model's chat template
 * (automatic when the tokenizer has one) the question asks for the number; without it the prompt
 * ends "The pass key is" for the model to complete. Lengths are reached by whole sentences: the
 * prompt is the longest that does not exceed L (n_prompt says how long it is).
 *
 * Per cell the prompt is prefilled once; the full cache answers greedily (up to max_new tokens, or
 * its end-of-turn / EOS token) and every configuration answers with its compressed cache
 * (kv_closed_greedy); an answer is found when it contains the key. The full cache's answer is also
 * the reference each configuration is measured against (KL, agreement: a continuous signal where
 * retrieval is all-or-nothing).
 */
#include "sim/closed.h"
#include "sim/closed_internal.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_rng.h"
#include "traces/capture/kv_eval.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char FILLER[] =
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.";
static const char INTRO[] =
    "There is an important piece of information hidden inside a lot of irrelevant text. Find it "
    "and memorize it. I will quiz you about the important information there.";

void kv_niah_opts_init(kv_niah_opts_t *o)
{
    memset(o, 0, sizeof *o);
    static const int L[] = {256, 512, 1024, 2048};
    static const double D[] = {0, 0.25, 0.5, 0.75, 1};
    o->lengths = L;
    o->n_lengths = 4;
    o->depths = D;
    o->n_depths = 5;
    o->needle = "The pass key is {key}. Remember it. {key} is the pass key.";
    o->question = "What is the pass key? Answer with the number only.";
    o->completion = "The pass key is";
    o->max_new = 16;
    o->chat = -1;
    o->backend = "auto";
}

/* ---------------------------------------------------------------- prompts */

typedef struct {
    char **s; /* sentences, each with its trailing space */
    int *tok; /* tokens of each alone */
    int n;
} sentences_t;

static void sentences_free(sentences_t *x)
{
    for (int i = 0; i < x->n; i++)
        kv_free(x->s[i]);
    kv_free(x->s);
    kv_free(x->tok);
    memset(x, 0, sizeof *x);
}

/* Split text into sentences (ending at ". ", "! ", "? " or a line break), separators removed. */
static int split_sentences(const kv_tokenizer_t *tok, const char *text, sentences_t *out)
{
    memset(out, 0, sizeof *out);
    const size_t len = strlen(text);
    char *buf = kv_malloc(len + 1, "haystack");
    if (!buf)
        return KV_ENOMEM;
    size_t k = 0;
    for (size_t i = 0; i < len; i++) { /* separators become spaces; runs of white space one space */
        if (!strncmp(text + i, KV_DOC_SEPARATOR, strlen(KV_DOC_SEPARATOR))) {
            i += strlen(KV_DOC_SEPARATOR) - 1;
            if (k && buf[k - 1] != ' ')
                buf[k++] = ' ';
            continue;
        }
        char c = text[i] == '\n' || text[i] == '\r' || text[i] == '\t' ? ' ' : text[i];
        if (c == ' ' && (!k || buf[k - 1] == ' '))
            continue;
        buf[k++] = c;
    }
    buf[k] = 0;
    int cap = 0, rc = KV_OK;
    for (size_t a = 0; a < k && rc == KV_OK;) {
        size_t b = a;
        while (b < k && !((buf[b] == '.' || buf[b] == '!' || buf[b] == '?') && (b + 1 == k || buf[b + 1] == ' ')))
            b++;
        b = b < k ? b + 1 : k; /* the punctuation mark included */
        if (out->n == cap) {
            cap = cap ? 2 * cap : 64;
            char **s = kv_realloc(out->s, sizeof(char *) * (size_t)cap, "sentences");
            int *t = kv_realloc(out->tok, sizeof(int) * (size_t)cap, "sentences");
            if (s)
                out->s = s;
            if (t)
                out->tok = t;
            if (!s || !t) {
                rc = KV_ENOMEM;
                break;
            }
        }
        char *sen = kv_malloc(b - a + 2, "sentence");
        if (!sen) {
            rc = KV_ENOMEM;
            break;
        }
        memcpy(sen, buf + a, b - a);
        sen[b - a] = ' ';
        sen[b - a + 1] = 0;
        int32_t *ids = NULL;
        int n = 0;
        rc = kv_tokenizer_encode(tok, sen, b - a + 1, 0, 0, &ids, &n);
        kv_free(ids);
        out->s[out->n] = sen;
        out->tok[out->n++] = n;
        a = b;
        while (a < k && buf[a] == ' ')
            a++;
    }
    kv_free(buf);
    if (rc == KV_OK && out->n == 0)
        rc = kv_error(KV_EINVAL, "the haystack holds no text");
    if (rc)
        sentences_free(out);
    return rc;
}

/* "{key}" replaced by key. */
static char *with_key(const char *tmpl, const char *key)
{
    size_t n = strlen(tmpl) + 1;
    for (const char *p = strstr(tmpl, "{key}"); p; p = strstr(p + 5, "{key}"))
        n += strlen(key);
    char *out = kv_malloc(n, "needle");
    if (!out)
        return NULL;
    size_t k = 0;
    for (const char *p = tmpl; *p;) {
        if (!strncmp(p, "{key}", 5)) {
            k += (size_t)snprintf(out + k, n - k, "%s", key);
            p += 5;
        } else {
            out[k++] = *p++;
        }
    }
    out[k] = 0;
    return out;
}

/* The user text of one cell: intro, the first m filler sentences (cycled) with the needle after the
 * first `at` of them, the question (chat) or the completion start (plain). */
static char *cell_text(const sentences_t *s, int m, int at, const char *needle, const char *tail)
{
    size_t n = strlen(INTRO) + strlen(needle) + strlen(tail) + 8;
    for (int i = 0; i < m; i++)
        n += strlen(s->s[i % s->n]);
    char *t = kv_malloc(n, "prompt");
    if (!t)
        return NULL;
    size_t k = (size_t)snprintf(t, n, "%s ", INTRO);
    for (int i = 0; i <= m; i++) {
        if (i == at)
            k += (size_t)snprintf(t + k, n - k, "%s ", needle);
        if (i < m)
            k += (size_t)snprintf(t + k, n - k, "%s", s->s[i % s->n]);
    }
    while (k && t[k - 1] == ' ')
        k--;
    snprintf(t + k, n - k, "\n%s", tail);
    return t;
}

typedef struct {
    int length;
    double depth;
    char key[16];
    int32_t *ids;
    int n;
} cell_t;

/* The tokens of a cell with m filler sentences, the needle after the sentence boundary nearest the
 * share `depth` of their tokens: their count, and the ids when ids is not NULL (kv_free). */
static int cell_tokens(const kv_closed_session_t *ss, const sentences_t *s, int m, double depth, const char *needle,
                       const char *tail, int chat, int32_t **ids, int *n)
{
    int at = 0, tot = 0;
    double acc = 0;
    for (int i = 0; i < m; i++)
        tot += s->tok[i % s->n];
    while (at < m && acc + s->tok[at % s->n] / 2.0 < depth * tot)
        acc += s->tok[at++ % s->n];
    char *t = cell_text(s, m, at, needle, tail);
    if (!t)
        return KV_ENOMEM;
    int32_t *x = NULL, *segs = NULL;
    int ns = 0;
    int rc = kv_closed_prompt(ss, t, NULL, 0, chat, NULL, "none", &x, n, &segs, &ns);
    kv_free(t);
    kv_free(segs);
    if (rc == KV_OK && ids)
        *ids = x;
    else
        kv_free(x);
    return rc;
}

/* Tokens of one cell: the longest prompt of whole filler sentences within `target` tokens. */
static int make_cell(const kv_closed_session_t *ss, const kv_niah_opts_t *o, int chat, const sentences_t *s, cell_t *c)
{
    char *needle = with_key(o->needle, c->key);
    if (!needle)
        return KV_ENOMEM;
    const char *tail = chat ? o->question : o->completion;
    int32_t *ids = NULL;
    int n = 0, base = 0;
    int rc = cell_tokens(ss, s, 0, c->depth, needle, tail, chat, NULL, &base);
    if (rc == KV_OK && base > c->length)
        rc = kv_error(KV_ERANGE, "--lengths %d: the needle and the question alone take %d tokens", c->length, base);
    /* the most sentences that fit, by bisection on the exact token count (monotone in m) */
    int lo = 0, hi = 1, n_hi = 0;
    while (rc == KV_OK && (rc = cell_tokens(ss, s, hi, c->depth, needle, tail, chat, NULL, &n_hi)) == KV_OK &&
           n_hi <= c->length)
        lo = hi, hi *= 2;
    while (rc == KV_OK && hi - lo > 1) {
        const int mid = lo + (hi - lo) / 2;
        int nm;
        if ((rc = cell_tokens(ss, s, mid, c->depth, needle, tail, chat, NULL, &nm)))
            break;
        *(nm <= c->length ? &lo : &hi) = mid;
    }
    if (rc == KV_OK)
        rc = cell_tokens(ss, s, lo, c->depth, needle, tail, chat, &ids, &n);
    kv_free(needle);
    if (rc) {
        kv_free(ids);
        return rc;
    }
    c->ids = ids;
    c->n = n;
    return KV_OK;
}

/* ---------------------------------------------------------------- the run */

static const char *const NIAH_COLS[] = {"policy",   "budget",    "budget_tokens", "length",    "depth",
                                        "n_prompt", "key",       "found",         "answer",    "kl_mean",
                                        "agree",    "first_div", "kept",          "mem_bytes", "nonfinite"};

const char *const *kv_niah_columns(int *n)
{
    *n = (int)KV_ARRAY_LEN(NIAH_COLS);
    return NIAH_COLS;
}

typedef struct {
    double found, kl, agree; /* sums over cells */
    int n;
} acc_t;

static int add_row(kv_otable_t *t, const char *label, const char *budget, int btok, const cell_t *c, int found,
                   const char *answer, const kv_closed_result_t *r)
{
    char v[12][48];
    double kl = 0, ag = 0;
    snprintf(v[10], sizeof v[10], "%ld", r->nonfinite);
    for (int s = 0; s < r->n_steps; s++) {
        kl += r->kl[s];
        ag += r->agree[s];
    }
    snprintf(v[0], sizeof v[0], "%d", btok);
    snprintf(v[1], sizeof v[1], "%d", c->length);
    kv_otable_num(v[2], sizeof v[2], c->depth);
    snprintf(v[3], sizeof v[3], "%d", c->n);
    snprintf(v[4], sizeof v[4], "%d", found);
    kv_otable_num(v[5], sizeof v[5], r->n_steps ? kl / r->n_steps : NAN);
    kv_otable_num(v[6], sizeof v[6], r->n_steps ? ag / r->n_steps : NAN);
    if (r->first_div)
        snprintf(v[7], sizeof v[7], "%d", r->first_div);
    else
        snprintf(v[7], sizeof v[7], "none");
    kv_otable_num(v[8], sizeof v[8], r->kept);
    kv_otable_num(v[9], sizeof v[9], r->mem);
    const char *row[] = {label,  budget, v[0], v[1], v[2], v[3], c->key, v[4],
                         answer, v[5],   v[6], v[7], v[8], v[9], v[10]};
    return kv_otable_add(t, row);
}

static int summary_row(kv_otable_t *t, const char *label, const char *budget, int btok, const acc_t *a)
{
    char v[5][48];
    kv_otable_num(v[0], sizeof v[0], btok < 0 ? NAN : btok);
    kv_otable_num(v[1], sizeof v[1], a->n ? a->found / a->n : NAN);
    kv_otable_num(v[2], sizeof v[2], a->n ? a->kl / a->n : NAN);
    kv_otable_num(v[3], sizeof v[3], a->n ? a->agree / a->n : NAN);
    const char *row[] = {label, budget, v[0], "all", "all", "nan", "", v[1], "", v[2], v[3], "nan", "nan", "nan", "0"};
    return kv_otable_add(t, row);
}

static void acc_add(acc_t *a, int found, const kv_closed_result_t *r)
{
    double kl = 0, ag = 0;
    for (int s = 0; s < r->n_steps; s++) {
        kl += r->kl[s];
        ag += r->agree[s];
    }
    a->found += found;
    a->kl += r->n_steps ? kl / r->n_steps : 0;
    a->agree += r->n_steps ? ag / r->n_steps : 1;
    a->n++;
}

/* The answer's text (tabs and line breaks as spaces) and whether it holds the key. */
static int answer_of(const kv_closed_session_t *s, const int32_t *ids, int n, const char *key, char *buf, size_t len)
{
    char *text = NULL;
    size_t tl = 0;
    buf[0] = 0;
    if (kv_tokenizer_decode_all(s->tok, ids, n, &text, &tl) == KV_OK) {
        snprintf(buf, len, "%s", text);
        for (char *p = buf; *p; p++)
            if (*p == '\t' || *p == '\n' || *p == '\r')
                *p = ' ';
    }
    kv_free(text);
    return strstr(buf, key) != NULL;
}

int kv_niah_run(const kv_niah_opts_t *o, struct kv_otable **out)
{
    *out = NULL;
    kv_closed_session_t s;
    int rc = kv_closed_session_open(o->model_path, o->tokenizer_path, 1, o->backend, o->n_threads, &s);
    if (rc)
        return rc;
    const int n_cells = o->n_lengths * o->n_depths;
    sentences_t sen = {0};
    cell_t *cells = kv_calloc((size_t)(n_cells ? n_cells : 1), sizeof *cells, "cells");
    char *hay = NULL;
    kv_otable_t *t = NULL;
    kv_closed_t *e = NULL;
    acc_t *acc = kv_calloc((size_t)(o->n_pol * o->n_budgets + 1), sizeof *acc, "scores");
    kv_closed_cfg_t **cfgs = kv_calloc((size_t)(o->n_budgets ? o->n_budgets : 1), sizeof *cfgs, "configurations");
    int32_t *ans = kv_malloc(sizeof(int32_t) * (size_t)(o->max_new + 1), "answer");
    int *btok = kv_calloc((size_t)(o->n_budgets ? o->n_budgets : 1), sizeof(int), "budgets");
    kv_policy_t *full = NULL;
    const int chat = o->chat >= 0 ? o->chat : s.tok->chat_template != NULL;
    if (!cells || !acc || !cfgs || !ans || !btok) {
        rc = KV_ENOMEM;
        goto done;
    }
    if (o->haystack_path) {
        size_t n;
        if ((rc = kv_read_file(o->haystack_path, (size_t)1 << 28, &hay, &n)))
            goto done;
    }
    if ((rc = split_sentences(s.tok, hay ? hay : FILLER, &sen)))
        goto done;
    /* every cell's prompt first: the forward pass is sized for the longest */
    kv_rng_t rng;
    kv_rng_seed(&rng, o->seed ^ 0x6e696168ULL);
    int n_max = 0;
    for (int li = 0, k = 0; li < o->n_lengths; li++)
        for (int di = 0; di < o->n_depths; di++, k++) {
            cell_t *c = &cells[k];
            c->length = o->lengths[li];
            c->depth = o->depths[di];
            snprintf(c->key, sizeof c->key, "%05d", (int)(10000 + kv_rng_below(&rng, 90000)));
            if ((rc = make_cell(&s, o, chat, &sen, c)))
                goto done;
            n_max = KV_MAX(n_max, c->n);
        }
    if ((long)n_max + o->max_new > s.m->cfg.seq_len) {
        rc = kv_error(KV_ERANGE, "a prompt of %d tokens plus %d answer tokens is beyond the model's context of %d",
                      n_max, o->max_new, s.m->cfg.seq_len);
        goto done;
    }
    if ((rc = kv_fwd_create(s.m, s.be, n_max + o->max_new, KV_MAX(n_max, o->max_new + 1), &s.f)))
        goto done;
    if ((rc = kv_otable_create("kvsim niah results", NIAH_COLS, (int)KV_ARRAY_LEN(NIAH_COLS), &t)) ||
        (rc = kv_closed_prov(t, o->command, &s, o->model_path)))
        goto done;
    {
        char buf[512];
        snprintf(buf, sizeof buf, "%s", o->haystack_path ? o->haystack_path : "(the passkey test's filler)");
        if ((rc = kv_otable_prov(t, "haystack", buf)) || (rc = kv_otable_prov(t, "needle", o->needle)) ||
            (rc = kv_otable_prov(t, "question", chat ? o->question : o->completion)) ||
            (rc = kv_otable_prov(t, "chat", chat ? "yes" : "no")))
            goto done;
        snprintf(buf, sizeof buf, "%d", o->max_new);
        if ((rc = kv_otable_prov(t, "max_new", buf)))
            goto done;
        snprintf(buf, sizeof buf, "%llu", (unsigned long long)o->seed);
        if ((rc = kv_otable_prov(t, "seed", buf)) || (rc = kv_otable_prov(t, "kind", "niah")))
            goto done;
    }
    if ((rc = kv_policy_create("full", &full)))
        goto done;
    kv_closed_opts_t co;
    kv_closed_opts_init(&co);
    co.steps = o->max_new;
    co.quiet = 1;
    co.seed = o->seed;
    const char *stops[] = {"<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>"};
    if (s.tok->eos_id >= 0)
        co.stop[co.n_stop++] = s.tok->eos_id;
    for (size_t i = 0; i < KV_ARRAY_LEN(stops) && co.n_stop < KV_CLOSED_MAX_STOP; i++) {
        int id = kv_tokenizer_lookup(s.tok, stops[i], strlen(stops[i]));
        if (id >= 0 && id != s.tok->eos_id)
            co.stop[co.n_stop++] = id;
    }
    kv_progress_t pr;
    if (!o->quiet)
        kv_progress_begin(&pr, "niah", n_cells);
    char answer[1024];
    for (int k = 0; k < n_cells && rc == KV_OK; k++) {
        cell_t *c = &cells[k];
        if ((rc = kv_closed_create(s.f, c->ids, c->n, &co, &e)))
            break;
        int nr;
        const int32_t *R = kv_closed_ref(e, &nr);
        const int found = answer_of(&s, R, nr, c->key, answer, sizeof answer);
        const kv_trace_meta_t *mt = kv_closed_meta(e);
        uint8_t one = 1;
        double zero = 0;
        kv_closed_result_t r0 = {.n_steps = 1, .kl = &zero, .agree = &one, .kept = c->n, .cache = c->n};
        r0.mem = (double)(c->n + nr) * mt->n_layers * mt->n_kv_heads * mt->head_dim * 2.0 * sizeof(float);
        if ((rc = add_row(t, full->label, "none", c->n, c, found, answer, &r0)))
            break;
        acc[o->n_pol * o->n_budgets].found += found;
        acc[o->n_pol * o->n_budgets].agree += 1;
        acc[o->n_pol * o->n_budgets].n++;
        for (int i = 0; i < o->n_pol && rc == KV_OK; i++) {
            if ((rc = kv_closed_select(e, o->pols[i], o->budgets, o->n_budgets, cfgs)))
                break;
            for (int b = 0; b < o->n_budgets && rc == KV_OK; b++) {
                int na;
                kv_closed_result_t r;
                if ((rc = kv_closed_greedy(e, cfgs[b], o->max_new, ans, &na)) ||
                    (rc = kv_closed_measure(e, cfgs[b], &r))) {
                    kv_error_context(rc, "%s at budget %s, length %d, depth %g", o->pols[i]->label, o->budgets[b].text,
                                     c->length, c->depth);
                    break;
                }
                const int f = answer_of(&s, ans, na, c->key, answer, sizeof answer);
                btok[b] = kv_closed_cfg_budget(cfgs[b])->tokens;
                rc = add_row(t, o->pols[i]->label, o->budgets[b].text, btok[b], c, f, answer, &r);
                acc_add(&acc[i * o->n_budgets + b], f, &r);
                kv_closed_result_free(&r);
            }
            for (int b = 0; b < o->n_budgets; b++) {
                kv_closed_cfg_free(cfgs[b]);
                cfgs[b] = NULL;
            }
        }
        kv_closed_free(e);
        e = NULL;
        if (!o->quiet) {
            char det[96];
            snprintf(det, sizeof det, "length %d, depth %g: full cache %s", c->length, c->depth,
                     found ? "found it" : "missed");
            kv_progress_update(&pr, k + 1, det);
        }
    }
    if (rc)
        goto done;
    /* summary rows: the full cache, then every policy x budget (budget_tokens: the last cell's) */
    if ((rc = summary_row(t, full->label, "none", -1, &acc[o->n_pol * o->n_budgets])))
        goto done;
    for (int i = 0; i < o->n_pol && rc == KV_OK; i++)
        for (int b = 0; b < o->n_budgets && rc == KV_OK; b++)
            rc = summary_row(t, o->pols[i]->label, o->budgets[b].text, btok[b], &acc[i * o->n_budgets + b]);
    if (rc)
        goto done;
    if (!o->quiet)
        kv_progress_end(&pr, NULL);
    *out = t;
    t = NULL;
done:
    if (cfgs)
        for (int b = 0; b < o->n_budgets; b++)
            kv_closed_cfg_free(cfgs[b]);
    kv_free(cfgs);
    kv_closed_free(e);
    kv_policy_free(full);
    kv_otable_free(t);
    if (cells)
        for (int k = 0; k < n_cells; k++)
            kv_free(cells[k].ids);
    kv_free(cells);
    kv_free(acc);
    kv_free(ans);
    kv_free(btok);
    kv_free(hay);
    sentences_free(&sen);
    kv_closed_session_free(&s);
    return rc;
}
