/*
 * test_robust_capture.c: prompts and options at their edges, and what a capture records.
 *
 *  - prompt edges: the empty prompt (refused), no decode tokens at all, a prompt of only
 *    <|endoftext|> separators, invalid UTF-8 (stored tokens decode back to the exact bytes), a
 *    prompt longer than the context, --decode so large that prompt + decode overflows an int;
 *  - --segments offsets out of range, unsorted, repeated, malformed; a failed capture leaves no file;
 *  - the forward pass refuses positions beyond its cache and the model's context;
 *  - the summaries, recomputed here in double precision from the stored Q and K (stored as f32, so
 *    they are the forward pass's own values): LSE, entropy, the accumulated attention that must
 *    count the prompt queries only (each column sum over the prompt; their total is n_prompt, not
 *    n_tokens), and the max-pooled map both when T < --pool (pool = T: every cell one probability)
 *    and when T > pool.
 * Tolerances: scores are recomputed in double from f32 Q/K; the forward pass computes them in f32
 * BLAS with a vectorised exp, so probabilities agree to ~1e-6 relative; 1e-5 absolute (1e-4 for
 * sums over up to 40 terms and for log-sum-exp) leaves room without hiding an indexing error,
 * which moves values by whole probabilities (0.01 or more here).
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "tests/capture_fixtures.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"
#include "traces/kv_trace.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CD 32
#define CH 64
#define CL 2
#define CNH 4
#define CKV 2
#define CV (259 + FX_EXTRA)
#define CS 64

typedef struct {
    char model[256], tok[256];
} files_t;

static void write_files(files_t *f)
{
    fx_model_t x;
    fx_model_init(&x, CD, CH, CL, CNH, CKV, CV, CS, 1, 23);
    size_t n;
    unsigned char *b = fx_model_v1(&x, &n);
    kv_test_tmp("robust-cap.bin", f->model, sizeof f->model);
    ck_assert_int_eq(fx_write(f->model, b, n), 0);
    free(b);
    fx_model_free(&x);
    b = fx_tokenizer(&n);
    kv_test_tmp("robust-tok.bin", f->tok, sizeof f->tok);
    ck_assert_int_eq(fx_write(f->tok, b, n), 0);
    free(b);
}

static void opts(kv_capture_opts_t *o, const files_t *f, const char *prompt, const char *out, int n_decode)
{
    kv_capture_opts_init(o);
    o->model_path = f->model;
    o->tokenizer_path = f->tok;
    o->prompt = prompt;
    o->out_path = out;
    o->n_decode = n_decode;
    o->dtype = KV_DTYPE_F32;
    o->backend = "cpu";
    o->n_threads = 1;
    kv_log_set_level(KV_LOG_QUIET);
}

static kv_tokenizer_t *load_tok(const files_t *f)
{
    kv_tokenizer_t *t;
    ck_assert_msg(kv_tokenizer_load(f->tok, CV, &t) == KV_OK, "%s", kv_last_error());
    return t;
}

/* The capture must fail with `expect` in the message and leave no file under `out`. */
static void capture_fails(kv_capture_opts_t *o, const char *expect)
{
    kv_capture_result_t r;
    ck_assert_msg(kv_capture_run(o, &r) != KV_OK, "captured: prompt '%s', segments %s, decode %d", o->prompt,
                  o->segments, o->n_decode);
    ck_assert_msg(strstr(kv_last_error(), expect), "message lacks '%s': %s", expect, kv_last_error());
    ck_assert_msg(access(o->out_path, F_OK) != 0, "a failed capture left %s", o->out_path);
}

START_TEST(prompt_edges)
{
    files_t f;
    write_files(&f);
    kv_tokenizer_t *tok = load_tok(&f);
    char out[256];
    kv_capture_opts_t o;
    kv_capture_result_t r;
    /* empty prompt: refused (issue 10, finding 14: it was captured as BOS alone, silently), with and
     * without decode tokens; a prompt of one character is BOS and that token */
    for (int nd = 0; nd <= 3; nd += 3) {
        kv_test_tmp("robust-empty.h5", out, sizeof out);
        opts(&o, &f, "", out, nd);
        capture_fails(&o, "the prompt is empty");
        kv_test_tmp("robust-one.h5", out, sizeof out);
        opts(&o, &f, "a", out, nd);
        ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());
        kv_trace_t *t;
        ck_assert_msg(kv_trace_open(out, &t) == KV_OK, "%s", kv_last_error());
        ck_assert_int_eq(kv_trace_meta(t)->n_prompt, 2);
        ck_assert_int_eq(kv_trace_meta(t)->n_tokens, 2 + nd);
        ck_assert_int_eq(kv_trace_meta(t)->tokens[0], KV_BOS);
        ck_assert_int_eq(kv_trace_meta(t)->pool, 2 + nd);
        kv_trace_close(t);
    }
    /* only separators */
    kv_test_tmp("robust-seps.h5", out, sizeof out);
    opts(&o, &f, "<|endoftext|>\n\n<|endoftext|>\n", out, 2);
    capture_fails(&o, "only <|endoftext|> separators");
    kv_nll_result_t nr;
    kv_model_t *m;
    kv_backend_t *be;
    kv_fwd_t *fw;
    ck_assert_int_eq(kv_model_load(f.model, &m), KV_OK);
    ck_assert_int_eq(kv_backend_open("cpu", 1, &be), KV_OK);
    ck_assert_int_eq(kv_fwd_create(m, be, CS, CS, &fw), KV_OK);
    const char *seps = "<|endoftext|>\n<|endoftext|>";
    ck_assert_int_ne(kv_nll_text(fw, tok, seps, strlen(seps), &nr, NULL, NULL), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "no document"));
    kv_fwd_free(fw);
    kv_backend_close(be);
    kv_model_free(m);
    /* invalid UTF-8: stray continuation bytes, a truncated sequence, 0xff */
    const char *bad = "\x80\xbf a\xc3 b\xff\xfe\xe2\x82 c\xc3";
    kv_test_tmp("robust-utf8.h5", out, sizeof out);
    opts(&o, &f, bad, out, 1);
    ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(out, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *mt = kv_trace_meta(t);
    char *back;
    size_t blen;
    ck_assert_int_eq(kv_tokenizer_decode_all(tok, mt->tokens, mt->n_prompt, &back, &blen), KV_OK);
    ck_assert_msg(blen == strlen(bad) && !memcmp(back, bad, blen), "the stored prompt tokens do not decode to it");
    kv_free(back);
    kv_trace_close(t);
    /* longer than the context: 80 characters of 'q' have no merges, 81 tokens with BOS and prefix */
    char lng[81];
    memset(lng, 'q', 80);
    lng[80] = 0;
    kv_test_tmp("robust-long.h5", out, sizeof out);
    opts(&o, &f, lng, out, 0);
    capture_fails(&o, "beyond the model's context of 64 tokens");
    ck_assert_ptr_nonnull(strstr(kv_last_error(), f.model));
    /* prompt + decode beyond the context, also where the sum overflows an int */
    opts(&o, &f, "abc", out, CS);
    capture_fails(&o, "beyond the model's context");
    opts(&o, &f, "abc", out, INT_MAX);
    capture_fails(&o, "plus 2147483647 decode tokens makes 2147483650");
    opts(&o, &f, "abc", out, -1);
    capture_fails(&o, "--decode");
    kv_tokenizer_free(tok);
}
END_TEST

START_TEST(segment_offsets)
{
    files_t f;
    write_files(&f);
    kv_tokenizer_t *tok = load_tok(&f);
    const char *text = "abc abc abc abc"; /* 9 tokens */
    const struct {
        const char *spec;
        const char *expect; /* NULL: accepted */
        int n, s1, s2;
    } cases[] = {
        {"0,3,6", NULL, 3, 3, 6},
        {"3,6", NULL, 3, 3, 6},
        {"0", NULL, 1, 0, 0},
        {"8", NULL, 2, 8, 0},
        {"0,9", "offset 9 outside the prompt's 9 tokens", 0, 0, 0},
        {"-1", "offset -1 outside", 0, 0, 0},
        {"5,3", "must ascend (3 after 5)", 0, 0, 0},
        {"3,3", "must ascend (3 after 3)", 0, 0, 0},
        {"0,0", "must ascend (0 after 0)", 0, 0, 0},
        {"3,", "not auto, none or a comma list", 0, 0, 0},
        {",3", "not auto, none or a comma list", 0, 0, 0},
        {"", "not auto, none or a comma list", 0, 0, 0},
        {"3;5", "not auto, none or a comma list", 0, 0, 0},
        {"99999999999999999999", "not auto, none or a comma list", 0, 0, 0},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(cases); i++) {
        int32_t *ids = NULL, *segs = NULL;
        int n = 0, ns = 0;
        int rc = kv_capture_tokenize(tok, text, cases[i].spec, &ids, &n, &segs, &ns);
        if (cases[i].expect) {
            ck_assert_msg(rc != KV_OK, "'%s' accepted", cases[i].spec);
            ck_assert_msg(strstr(kv_last_error(), cases[i].expect), "'%s': %s", cases[i].spec, kv_last_error());
            ck_assert_ptr_null(ids);
            ck_assert_ptr_null(segs);
            continue;
        }
        ck_assert_msg(rc == KV_OK, "'%s': %s", cases[i].spec, kv_last_error());
        ck_assert_int_eq(n, 9);
        ck_assert_int_eq(ns, cases[i].n);
        ck_assert_int_eq(segs[0], 0);
        if (ns > 1)
            ck_assert_int_eq(segs[1], cases[i].s1);
        if (ns > 2)
            ck_assert_int_eq(segs[2], cases[i].s2);
        kv_free(ids);
        kv_free(segs);
    }
    /* through a capture: refused before anything is written */
    char out[256];
    kv_capture_opts_t o;
    kv_test_tmp("robust-segs.h5", out, sizeof out);
    opts(&o, &f, text, out, 2);
    o.segments = "4,2";
    capture_fails(&o, "must ascend");
    kv_tokenizer_free(tok);
}
END_TEST

START_TEST(forward_refuses_positions_beyond_its_cache)
{
    files_t f;
    write_files(&f);
    kv_model_t *m;
    kv_backend_t *be;
    kv_fwd_t *fw = NULL;
    ck_assert_int_eq(kv_model_load(f.model, &m), KV_OK);
    ck_assert_int_eq(kv_backend_open("cpu", 1, &be), KV_OK);
    ck_assert_int_ne(kv_fwd_create(m, be, CS + 1, 4, &fw), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "context of 64"));
    ck_assert_int_eq(kv_fwd_create(m, be, 8, 4, &fw), KV_OK);
    int32_t tok[9] = {1, 260, 4, 5, 6, 7, 8, 9, 10};
    float *logits = malloc(sizeof(float) * CV);
    ck_assert_int_eq(kv_fwd_run(fw, tok, 8, 0, logits, 0, NULL, NULL), KV_OK);
    ck_assert_int_ne(kv_fwd_run(fw, tok, 1, 8, logits, 0, NULL, NULL), KV_OK);
    ck_assert_int_ne(kv_fwd_run(fw, tok, 9, 0, logits, 0, NULL, NULL), KV_OK);
    ck_assert_int_ne(kv_fwd_run(fw, tok, 2, 7, logits, 0, NULL, NULL), KV_OK);
    ck_assert_int_ne(kv_fwd_run(fw, tok, 1, -1, logits, 0, NULL, NULL), KV_OK);
    ck_assert_int_ne(kv_fwd_run(fw, tok, 0, 0, logits, 0, NULL, NULL), KV_OK);
    ck_assert_int_ne(kv_fwd_run(fw, tok, 1, INT_MAX, logits, 0, NULL, NULL), KV_OK);
    tok[1] = CV; /* outside the vocabulary */
    ck_assert_int_ne(kv_fwd_run(fw, tok, 2, 0, logits, 0, NULL, NULL), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "outside the vocabulary"));
    free(logits);
    kv_fwd_free(fw);
    kv_backend_close(be);
    kv_model_free(m);
}
END_TEST

/* Summaries recomputed from the stored Q and K. */
static void check_summaries(const char *path, int want_pool)
{
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(path, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(t);
    const int H = m->n_heads, G = m->n_heads / m->n_kv_heads, d = m->head_dim, T = m->n_tokens, np = m->n_prompt;
    const int P = m->pool;
    ck_assert_int_eq(P, want_pool);
    ck_assert_int_gt(T, np); /* decode queries exist: the ACC check below tells them apart */
    float *q = malloc(sizeof(float) * kv_tensor_numel(m, KV_T_Q)),
          *k = malloc(sizeof(float) * kv_tensor_numel(m, KV_T_K));
    float *lse = malloc(sizeof(float) * H * T), *ent = malloc(sizeof(float) * H * T),
          *acc = malloc(sizeof(float) * H * T);
    float *pooled = malloc(sizeof(float) * (size_t)H * P * P);
    double *p = malloc(sizeof(double) * T), *pool_ref = malloc(sizeof(double) * (size_t)P * P);
    const double scale = 1.0 / sqrt((double)d);
    for (int l = 0; l < m->n_layers; l++) {
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_Q, q), KV_OK);
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_K, k), KV_OK);
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_LSE, lse), KV_OK);
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_ENTROPY, ent), KV_OK);
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_ACC, acc), KV_OK);
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_POOLED, pooled), KV_OK);
        for (int h = 0; h < H; h++) {
            double *acc_ref = calloc((size_t)T, sizeof(double)), total = 0;
            for (int c = 0; c < P * P; c++)
                pool_ref[c] = 0;
            for (int i = 0; i < T; i++) {
                const float *qi = q + ((size_t)h * T + i) * d;
                double mx = -INFINITY, s = 0, e = 0;
                for (int j = 0; j <= i; j++) {
                    const float *kj = k + ((size_t)(h / G) * T + j) * d;
                    double dot = 0;
                    for (int x = 0; x < d; x++)
                        dot += (double)qi[x] * kj[x];
                    p[j] = dot * scale;
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j <= i; j++)
                    s += exp(p[j] - mx);
                /* s >= exp(0) = 1: the loop above always visits the maximum (j <= i, i >= 0) */
                const double L = mx + log(s); // cppcheck-suppress invalidFunctionArg
                kv_assert_close(lse[(size_t)h * T + i], L, 1e-4, 1e-5, "lse");
                for (int j = 0; j <= i; j++) {
                    p[j] = exp(p[j] - L);
                    e -= p[j] > 0 ? p[j] * log(p[j]) : 0;
                    if (i < np)
                        acc_ref[j] += p[j];
                    const int r = (int)((long)i * P / T), c = (int)((long)j * P / T);
                    pool_ref[r * P + c] = fmax(pool_ref[r * P + c], p[j]);
                }
                kv_assert_close(ent[(size_t)h * T + i], e, 1e-4, 1e-4, "entropy");
            }
            for (int j = 0; j < T; j++) {
                kv_assert_close(acc[(size_t)h * T + j], acc_ref[j], 1e-4, 1e-5, "accumulated attention");
                total += acc[(size_t)h * T + j];
            }
            /* every prompt query spreads probability 1: the total is the prompt length */
            kv_assert_close(total, np, 1e-3, 0, "accumulated attention total");
            for (int c = 0; c < P * P; c++)
                kv_assert_close(pooled[(size_t)h * P * P + c], pool_ref[c], 1e-5, 1e-5, "pooled map");
            free(acc_ref);
        }
    }
    free(q);
    free(k);
    free(lse);
    free(ent);
    free(acc);
    free(pooled);
    free(p);
    free(pool_ref);
    kv_trace_close(t);
}

START_TEST(summaries_match_the_stored_queries_and_keys)
{
    files_t f;
    write_files(&f);
    char out[256];
    kv_capture_opts_t o;
    kv_capture_result_t r;
    /* T < pool: the map is T x T, one probability per cell */
    kv_test_tmp("robust-sum-a.h5", out, sizeof out);
    opts(&o, &f, "abc ab xx c", out, 9);
    ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());
    check_summaries(out, r.n_tokens);
    ck_assert_int_lt(r.n_tokens, KV_TRACE_DEFAULT_POOL);
    /* T > pool, T not a multiple of it */
    kv_test_tmp("robust-sum-b.h5", out, sizeof out);
    opts(&o, &f, "abc ab xx c ba cab bbb acca", out, 11);
    o.pool = 7;
    ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());
    ck_assert_int_ne(r.n_tokens % 7, 0);
    check_summaries(out, 7);
}
END_TEST

Suite *suite_robust_capture(void)
{
    Suite *s = suite_create("robust_capture");
    TCase *tc = tcase_create("capture");
    tcase_add_test(tc, prompt_edges);
    tcase_add_test(tc, segment_offsets);
    tcase_add_test(tc, forward_refuses_positions_beyond_its_cache);
    tcase_add_test(tc, summaries_match_the_stored_queries_and_keys);
    suite_add_tcase(s, tc);
    return s;
}
