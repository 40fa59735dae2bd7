/*
 * eval.c: documents, teacher-forced NLL and text generation on top of the forward pass.
 *
 * NLL runs each window in blocks of NLL_BLOCK tokens (chunked prefill: block b sees the cache of
 * blocks before it), so the host logits buffer is NLL_BLOCK x vocab whatever the window length.
 * Log-softmax is computed in double.
 */
#include "traces/capture/kv_eval.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <string.h>

#define NLL_BLOCK 128

static int is_nl(char c)
{
    return c == '\n' || c == '\r';
}

static int blank(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && !is_nl(s[i]))
            return 0;
    return 1;
}

int kv_split_docs(const char *text, size_t len, kv_doc_t **docs, int *n_docs)
{
    *docs = NULL;
    *n_docs = 0;
    const size_t sl = strlen(KV_DOC_SEPARATOR);
    int cap = 8, n = 0;
    kv_doc_t *d = kv_malloc(sizeof *d * (size_t)cap, "documents");
    if (!d)
        return KV_ENOMEM;
    size_t start = 0;
    for (size_t i = 0; i <= len;) {
        int sep = i + sl <= len && !memcmp(text + i, KV_DOC_SEPARATOR, sl);
        if (!sep && i < len) {
            i++;
            continue;
        }
        size_t a = start, b = i;
        while (a < b && is_nl(text[a]))
            a++;
        while (b > a && is_nl(text[b - 1]))
            b--;
        if (!blank(text + a, b - a)) {
            if (n == cap) {
                kv_doc_t *g = kv_realloc(d, sizeof *d * (size_t)cap * 2, "documents");
                if (!g) {
                    kv_free(d);
                    return KV_ENOMEM;
                }
                d = g;
                cap *= 2;
            }
            d[n].text = text + a;
            d[n].len = b - a;
            n++;
        }
        if (!sep)
            break;
        i += sl;
        start = i;
    }
    *docs = d;
    *n_docs = n;
    return KV_OK;
}

/* -log softmax(row)[target] in double */
static double token_nll(const float *row, int n, int target)
{
    float mx = row[0];
    for (int i = 1; i < n; i++)
        mx = row[i] > mx ? row[i] : mx;
    double s = 0;
    for (int i = 0; i < n; i++)
        s += exp((double)row[i] - mx);
    // cppcheck-suppress invalidFunctionArg ; s >= 1: the largest term is exp(0)
    return (double)mx + log(s) - (double)row[target];
}

/* NLL of one sequence run from position 0: tokens 1..n-1 are predicted. */
static int nll_window(kv_fwd_t *f, const int32_t *tok, int n, float *logits, double *sum)
{
    const int V = kv_fwd_model(f)->cfg.vocab_size;
    for (int b0 = 0; b0 < n - 1; b0 += NLL_BLOCK) {
        int nb = KV_MIN(NLL_BLOCK, n - 1 - b0); /* the last token predicts nothing */
        int rc = kv_fwd_run(f, tok + b0, nb, b0, logits, 1, NULL, NULL);
        if (rc)
            return rc;
        for (int i = 0; i < nb; i++)
            *sum += token_nll(logits + (size_t)i * V, V, tok[b0 + i + 1]);
    }
    return KV_OK;
}

int kv_nll_text(kv_fwd_t *f, const kv_tokenizer_t *tok, const char *text, size_t len, kv_nll_result_t *res,
                kv_nll_doc_cb cb, void *cb_ctx)
{
    memset(res, 0, sizeof *res);
    kv_doc_t *docs = NULL;
    int n_docs = 0, rc;
    int32_t *ids = NULL;
    float *logits = NULL;
    const int W = kv_fwd_max_tokens(f);
    if (W < 2)
        return kv_error(KV_EINVAL, "nll: a context of %d tokens predicts nothing", W);
    if ((rc = kv_split_docs(text, len, &docs, &n_docs)))
        return rc;
    if (n_docs == 0) {
        rc = kv_error(KV_EINVAL, "nll: the text holds no document to score");
        goto done;
    }
    logits = kv_malloc(sizeof(float) * NLL_BLOCK * (size_t)kv_fwd_model(f)->cfg.vocab_size, "logits");
    if (!logits) {
        rc = KV_ENOMEM;
        goto done;
    }
    for (int d = 0; d < n_docs; d++) {
        int n = 0;
        kv_free(ids);
        ids = NULL;
        if ((rc = kv_tokenizer_encode(tok, docs[d].text, docs[d].len, tok->add_bos, 0, &ids, &n)))
            goto done;
        double sum = 0;
        long pred = 0;
        for (int s = 0;;) {
            int e = KV_MIN(s + W, n);
            if (e - s >= 2) {
                if ((rc = nll_window(f, ids + s, e - s, logits, &sum)))
                    goto done;
                pred += e - s - 1;
                res->n_windows++;
            }
            if (e >= n)
                break;
            s = e - 1; /* the next window restarts from the last token seen, so none is skipped */
        }
        res->nll_sum += sum;
        res->n_predicted += pred;
        res->n_tokens += n;
        res->n_docs++;
        if (cb)
            cb(cb_ctx, d, n, sum, pred);
    }
done:
    kv_free(ids);
    kv_free(logits);
    kv_free(docs);
    return rc;
}

int kv_sample(const float *logits, int n, float temperature, double u)
{
    if (temperature <= 0)
        return kv_argmax(logits, n);
    float mx = logits[0];
    for (int i = 1; i < n; i++)
        mx = logits[i] > mx ? logits[i] : mx;
    double s = 0;
    for (int i = 0; i < n; i++)
        s += exp(((double)logits[i] - mx) / temperature);
    double target = u * s, c = 0;
    for (int i = 0; i < n; i++) {
        c += exp(((double)logits[i] - mx) / temperature);
        if (c > target)
            return i;
    }
    return n - 1;
}

int kv_generate(kv_fwd_t *f, const kv_tokenizer_t *tok, const char *prompt, int steps, float temperature, uint64_t seed,
                FILE *out, kv_gen_result_t *res)
{
    memset(res, 0, sizeof *res);
    int32_t *p = NULL;
    int np = 0;
    int rc = kv_tokenizer_encode(tok, prompt, strlen(prompt), tok->add_bos, 0, &p, &np);
    if (rc)
        return rc;
    if (np == 0) { /* an empty prompt, and the model adds no BOS: start from BOS when it has one */
        if (tok->bos_id < 0) {
            kv_free(p);
            return kv_error(KV_EINVAL, "generate: the prompt is empty and %s has no BOS token to start from",
                            tok->path);
        }
        p[0] = tok->bos_id; /* an empty encoding still has room for one id */
        np = 1;
    }
    rc = kv_generate_ids(f, tok, p, np, steps, temperature, seed, out, res);
    kv_free(p);
    return rc;
}

int kv_generate_ids(kv_fwd_t *f, const kv_tokenizer_t *tok, const int32_t *p, int np, int steps, float temperature,
                    uint64_t seed, FILE *out, kv_gen_result_t *res)
{
    memset(res, 0, sizeof *res);
    const int V = kv_fwd_model(f)->cfg.vocab_size, W = kv_fwd_max_tokens(f);
    int rc = KV_OK;
    if (np <= 0)
        return kv_error(KV_EINVAL, "generate: no prompt tokens");
    if (!tok)
        out = NULL; /* nothing to decode with */
    if (np > W)
        return kv_error(KV_ERANGE, "generate: the prompt is %d tokens, the context holds %d", np, W);
    if (steps < 0 || steps > W - np)
        steps = W - np;
    float *logits = kv_malloc(sizeof(float) * (size_t)V, "logits");
    int32_t *all = kv_malloc(sizeof(int32_t) * (size_t)(np + steps), "tokens");
    if (!logits || !all) {
        rc = KV_ENOMEM;
        goto fail;
    }
    memcpy(all, p, sizeof(int32_t) * (size_t)np);
    kv_rng_t rng;
    kv_rng_seed(&rng, seed);
    double t0 = kv_now();
    if ((rc = kv_fwd_run(f, all, np, 0, logits, 0, NULL, NULL)))
        goto fail;
    res->prefill_s = kv_now() - t0;
    if (out) {
        for (int i = 0; i < np; i++) {
            if (all[i] == tok->bos_id || all[i] == tok->eos_id)
                continue;
            size_t l;
            const char *s = kv_tokenizer_decode(tok, i ? all[i - 1] : -1, all[i], &l);
            fwrite(s, 1, l, out);
        }
        fflush(out);
    }
    int n = np;
    t0 = kv_now();
    for (int s = 0; s < steps; s++) {
        int next = kv_sample(logits, V, temperature, kv_rng_uniform(&rng));
        if (tok && (next == tok->bos_id || next == tok->eos_id))
            break;
        all[n++] = next;
        if (out) {
            size_t l;
            const char *piece = kv_tokenizer_decode(tok, all[n - 2], next, &l);
            fwrite(piece, 1, l, out);
            fflush(out);
        }
        if (s + 1 < steps && (rc = kv_fwd_run(f, &all[n - 1], 1, n - 1, logits, 0, NULL, NULL)))
            goto fail;
    }
    res->decode_s = kv_now() - t0;
    res->tokens = all;
    res->n_tokens = n;
    res->n_prompt = np;
    kv_free(logits);
    return KV_OK;
fail:
    kv_free(logits);
    kv_free(all);
    return rc;
}

int kv_nll_ids(kv_fwd_t *f, const int32_t *ids, int n, kv_nll_result_t *res)
{
    memset(res, 0, sizeof *res);
    const int W = kv_fwd_max_tokens(f);
    if (W < 2)
        return kv_error(KV_EINVAL, "nll: a context of %d tokens predicts nothing", W);
    if (n < 2)
        return kv_error(KV_EINVAL, "nll: %d token%s predict nothing", n, n == 1 ? "" : "s");
    float *logits = kv_malloc(sizeof(float) * NLL_BLOCK * (size_t)kv_fwd_model(f)->cfg.vocab_size, "logits");
    if (!logits)
        return KV_ENOMEM;
    int rc = KV_OK;
    double sum = 0;
    long pred = 0;
    for (int s = 0;;) {
        int e = KV_MIN(s + W, n);
        if (e - s >= 2) {
            if ((rc = nll_window(f, ids + s, e - s, logits, &sum)))
                break;
            pred += e - s - 1;
            res->n_windows++;
        }
        if (e >= n)
            break;
        s = e - 1;
    }
    kv_free(logits);
    if (rc)
        return rc;
    res->nll_sum = sum;
    res->n_predicted = pred;
    res->n_tokens = n;
    res->n_docs = 1;
    return KV_OK;
}

int kv_ids_parse(const char *text, size_t len, const char *where, int32_t **ids, int *n)
{
    *ids = NULL;
    *n = 0;
    size_t i = 0, cap = 0;
    int32_t *v = NULL;
    int json = 0, closed = 0;
    while (i < len && strchr(" \t\r\n", text[i]))
        i++;
    if (i < len && text[i] == '[')
        json = 1, i++;
    for (;;) {
        while (i < len && (strchr(" \t\r\n", text[i]) || (!json && text[i] == ',')))
            i++;
        if (i >= len || text[i] == 0)
            break;
        if (json && text[i] == ']') {
            closed = 1;
            i++;
            break;
        }
        if (text[i] < '0' || text[i] > '9') {
            kv_free(v);
            return kv_error(KV_EFORMAT, "%s: byte %zu: expected a token id (a non-negative integer), found '%c'", where,
                            i, text[i] >= 32 && text[i] < 127 ? text[i] : '?');
        }
        long long x = 0;
        while (i < len && text[i] >= '0' && text[i] <= '9') {
            x = x * 10 + (text[i++] - '0');
            if (x > INT32_MAX) {
                kv_free(v);
                return kv_error(KV_EFORMAT, "%s: byte %zu: token id beyond 2^31", where, i);
            }
        }
        if ((size_t)*n == cap) {
            cap = cap ? 2 * cap : 256;
            int32_t *g = kv_realloc(v, cap * sizeof *v, "token ids");
            if (!g) {
                kv_free(v);
                return KV_ENOMEM;
            }
            v = g;
        }
        v[(*n)++] = (int32_t)x;
        if (json) { /* a comma or the closing bracket */
            while (i < len && strchr(" \t\r\n", text[i]))
                i++;
            if (i < len && text[i] == ',')
                i++;
            else if (!(i < len && text[i] == ']')) {
                kv_free(v);
                *n = 0;
                return kv_error(KV_EFORMAT, "%s: byte %zu: expected ',' or ']' in the JSON list", where, i);
            }
        }
    }
    while (i < len && strchr(" \t\r\n", text[i]))
        i++;
    if ((json && !closed) || i < len) {
        kv_free(v);
        *n = 0;
        return kv_error(KV_EFORMAT, "%s: byte %zu: %s", where, i,
                        json && !closed ? "the JSON list is not closed with ']'" : "text after the JSON list");
    }
    if (*n == 0) {
        kv_free(v);
        return kv_error(KV_EFORMAT, "%s: no token ids", where);
    }
    *ids = v;
    return KV_OK;
}

int kv_ids_read(const char *path, int32_t **ids, int *n)
{
    *ids = NULL;
    *n = 0;
    char *b = NULL;
    size_t len = 0;
    int rc = kv_read_file(path, (size_t)1 << 30, &b, &len);
    if (rc == KV_OK)
        rc = kv_ids_parse(b, len, strcmp(path, "-") ? path : "standard input", ids, n);
    kv_free(b);
    return rc;
}

int kv_ids_check(const int32_t *ids, int n, int vocab, const kv_tokenizer_t *tok, const char *where)
{
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= vocab)
            return kv_error(KV_ERANGE, "%s: token %d is id %d, outside the model's vocabulary [0, %d)", where, i,
                            ids[i], vocab);
        if (tok && ids[i] >= tok->vocab_size)
            return kv_error(KV_ERANGE, "%s: token %d is id %d, outside the tokenizer's vocabulary [0, %d) (%s)", where,
                            i, ids[i], tok->vocab_size, tok->path);
    }
    return KV_OK;
}
