/*
 * test_capture.c: checkpoint loaders, tokenizer and forward pass on tiny models written by the test.
 *
 *  - the three checkpoint versions load to exactly the weights the test wrote (Q8_0: to exactly the
 *    values the test's own quantiser dequantises to), with shared and separate classifiers and GQA;
 *  - a table of broken checkpoints and tokenizers is rejected with the file named in the message;
 *  - BPE merges are checked on a hand-made vocabulary whose expected encodings are derived by hand
 *    (best score first, leftmost on ties, byte fallback, dummy prefix), and against a quadratic
 *    reference implementation of the same rules on the real tokenizers;
 *  - the forward pass matches a naive double-precision Llama written here (GQA included), and the
 *    capture of a tiny Q8_0 model stores K/V equal to that reference, head-major.
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_rng.h"
#include "tests/capture_fixtures.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_eval.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"
#include "traces/kv_trace.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

/* tiny GQA shape: head_dim 8, 4 query heads over 2 KV heads */
#define TD 32
#define TH 64
#define TL 2
#define TNH 4
#define TKV 2
#define TV (259 + FX_EXTRA)
#define TS 64

static const char *write_tmp(const char *name, const void *buf, size_t len, char *path, size_t plen)
{
    kv_test_tmp(name, path, plen);
    ck_assert_int_eq(fx_write(path, buf, len), 0);
    return path;
}

static void assert_same(const float *a, const float *b, size_t n, const char *what)
{
    ck_assert_msg(memcmp(a, b, n * sizeof(float)) == 0, "%s differs from what the test wrote", what);
}

static void assert_weights(const kv_model_t *m, const fx_model_t *x)
{
    size_t L = TL, D = TD, H = TH, KV = TD / TNH * TKV, V = TV;
    assert_same(m->token_embedding, x->emb, V * D, "token_embedding");
    assert_same(m->rms_att, x->rms_att, L * D, "rms_att");
    assert_same(m->wq, x->wq, L * D * D, "wq");
    assert_same(m->wk, x->wk, L * KV * D, "wk");
    assert_same(m->wv, x->wv, L * KV * D, "wv");
    assert_same(m->wo, x->wo, L * D * D, "wo");
    assert_same(m->rms_ffn, x->rms_ffn, L * D, "rms_ffn");
    assert_same(m->w1, x->w1, L * H * D, "w1");
    assert_same(m->w2, x->w2, L * D * H, "w2");
    assert_same(m->w3, x->w3, L * H * D, "w3");
    assert_same(m->rms_final, x->rms_final, D, "rms_final");
    assert_same(m->wcls, x->shared ? x->emb : x->wcls, V * D, "wcls");
}

/* Loaded with every weight in fp32 arrays (the tests read them as floats; tests/test_weights.c checks
 * that the stored representation computes the same). */
static kv_model_t *load_ok(const char *path)
{
    kv_model_t *m = NULL;
    ck_assert_msg(kv_model_load_f32(path, &m) == KV_OK, "%s", kv_last_error());
    return m;
}

START_TEST(versions_load_what_was_written)
{
    for (int shared = 0; shared < 2; shared++) {
        fx_model_t x, deq;
        fx_model_init(&x, TD, TH, TL, TNH, TKV, TV, TS, shared, 11 + shared);
        char p0[256], p1[256], p2[256];
        size_t n0, n1, n2;
        unsigned char *b0 = fx_model_v0(&x, &n0), *b1 = fx_model_v1(&x, &n1), *b2 = fx_model_v2(&x, 16, &n2, &deq);
        write_tmp("v0.bin", b0, n0, p0, sizeof p0);
        write_tmp("v1.bin", b1, n1, p1, sizeof p1);
        write_tmp("v2.bin", b2, n2, p2, sizeof p2);
        kv_model_t *m0 = load_ok(p0), *m1 = load_ok(p1), *m2 = load_ok(p2);
        const kv_model_t *ms[3] = {m0, m1, m2};
        for (int v = 0; v < 3; v++) {
            const kv_model_config_t *c = &ms[v]->cfg;
            ck_assert_int_eq(c->version, v);
            ck_assert_int_eq(c->dim, TD);
            ck_assert_int_eq(c->hidden_dim, TH);
            ck_assert_int_eq(c->n_layers, TL);
            ck_assert_int_eq(c->n_heads, TNH);
            ck_assert_int_eq(c->n_kv_heads, TKV);
            ck_assert_int_eq(c->vocab_size, TV);
            ck_assert_int_eq(c->seq_len, TS);
            ck_assert_int_eq(c->head_dim, TD / TNH);
            ck_assert_int_eq(c->kv_dim, TD / TNH * TKV);
            ck_assert_int_eq(c->shared_classifier, shared);
        }
        ck_assert_int_eq(m2->cfg.group_size, 16);
        assert_weights(m0, &x);
        assert_weights(m1, &x);
        assert_weights(m2, &deq);
        kv_model_free(m0);
        kv_model_free(m1);
        kv_model_free(m2);
        free(b0);
        free(b1);
        free(b2);
        fx_model_free(&x);
        fx_model_free(&deq);
    }
}
END_TEST

/* ---- broken checkpoints ---- */

typedef enum { BASE_V0, BASE_V1, BASE_V2 } base_t;

typedef struct {
    const char *name;
    base_t base;
    long truncate_to; /* < 0: keep; else new length (negative offsets from the end via trunc_by) */
    long trunc_by;    /* bytes removed from the end */
    long append;      /* bytes appended */
    int set_off;      /* -1: none; byte offset of an int32 to overwrite */
    int32_t set_val;
    int set_byte_off; /* -1: none; byte offset of a byte to overwrite */
    unsigned char set_byte;
    const char *expect; /* substring of the message */
} broken_t;

static const broken_t broken[] = {
    {"empty", BASE_V0, 0, 0, 0, -1, 0, -1, 0, "shorter than the 28-byte"},
    {"short-header", BASE_V0, 27, 0, 0, -1, 0, -1, 0, "shorter than the 28-byte"},
    {"truncated-1", BASE_V0, -1, 1, 0, -1, 0, -1, 0, "truncated"},
    {"truncated-half", BASE_V0, -1, -2, 0, -1, 0, -1, 0, "truncated"},
    {"trailing", BASE_V0, -1, 0, 4, -1, 0, -1, 0, "trailing data"},
    {"dim-zero", BASE_V0, -1, 0, 0, 0, 0, -1, 0, "dim is 0"},
    {"layers-negative", BASE_V0, -1, 0, 0, 8, -3, -1, 0, "n_layers is -3"},
    {"heads-not-dividing-dim", BASE_V0, -1, 0, 0, 12, 5, -1, 0, "n_heads 5 does not divide dim 32"},
    {"kv-not-dividing-heads", BASE_V0, -1, 0, 0, 16, 3, -1, 0, "n_kv_heads 3 does not divide n_heads 4"},
    {"kv-heads-zero", BASE_V0, -1, 0, 0, 16, 0, -1, 0, "n_kv_heads is 0"},
    {"odd-head-dim", BASE_V0, -1, 0, 0, 0, 36, -1, 0, "odd"},
    {"absurd-dim", BASE_V0, -1, 0, 0, 0, 1 << 30, -1, 0, "absurd"},
    {"absurd-vocab", BASE_V0, -1, 0, 0, 20, INT32_MIN, -1, 0, "vocab_size"},
    {"seq-len-zero", BASE_V0, -1, 0, 0, 24, 0, -1, 0, "seq_len is 0"},
    {"huge-but-bounded", BASE_V0, -1, 0, 0, 4, 1 << 20, -1, 0, "needs"},
    {"v1-bad-version", BASE_V1, -1, 0, 0, 4, 7, -1, 0, "unsupported llama2.c checkpoint version 7"},
    {"v1-short-header", BASE_V1, 100, 0, 0, -1, 0, -1, 0, "256-byte header"},
    {"v1-bad-shared-flag", BASE_V1, -1, 0, 0, -1, 0, 36, 2, "shared_classifier flag"},
    {"v1-negative-vocab", BASE_V1, -1, 0, 0, 28, -TV, -1, 0, "vocab_size is"},
    {"v1-truncated", BASE_V1, -1, 8, 0, -1, 0, -1, 0, "truncated"},
    {"v2-group-zero", BASE_V2, -1, 0, 0, 37, 0, -1, 0, "group size 0"},
    {"v2-group-not-dividing", BASE_V2, -1, 0, 0, 37, 7, -1, 0, "does not divide"},
    {"v2-truncated-scales", BASE_V2, -1, 3, 0, -1, 0, -1, 0, "truncated"},
};

START_TEST(broken_checkpoints_are_named)
{
    fx_model_t x;
    fx_model_init(&x, TD, TH, TL, TNH, TKV, TV, TS, 1, 5);
    size_t n[3];
    unsigned char *img[3] = {fx_model_v0(&x, &n[0]), fx_model_v1(&x, &n[1]), fx_model_v2(&x, 16, &n[2], NULL)};
    for (size_t i = 0; i < KV_ARRAY_LEN(broken); i++) {
        const broken_t *b = &broken[i];
        size_t len = n[b->base];
        unsigned char *buf = malloc(len + (size_t)b->append + 8);
        memcpy(buf, img[b->base], len);
        memset(buf + len, 0, (size_t)b->append + 8);
        if (b->set_off >= 0)
            fx_put_i32(buf, (size_t)b->set_off, b->set_val);
        if (b->set_byte_off >= 0)
            buf[b->set_byte_off] = b->set_byte;
        if (b->truncate_to >= 0)
            len = (size_t)b->truncate_to;
        if (b->trunc_by > 0)
            len -= (size_t)b->trunc_by;
        if (b->trunc_by == -2)
            len /= 2;
        len += (size_t)b->append;
        char name[64], path[256];
        snprintf(name, sizeof name, "broken-%s.bin", b->name);
        write_tmp(name, buf, len, path, sizeof path);
        kv_model_t *m = (kv_model_t *)0x1;
        int rc = kv_model_load(path, &m);
        ck_assert_msg(rc != KV_OK, "%s: loaded a broken checkpoint", b->name);
        ck_assert_ptr_null(m);
        ck_assert_msg(strstr(kv_last_error(), path) != NULL, "%s: message does not name the file: %s", b->name,
                      kv_last_error());
        ck_assert_msg(strstr(kv_last_error(), b->expect) != NULL, "%s: message lacks '%s': %s", b->name, b->expect,
                      kv_last_error());
        free(buf);
    }
    /* missing file and a directory */
    kv_model_t *m;
    ck_assert_int_ne(kv_model_load("build/test-tmp/no-such-model.bin", &m), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "no-such-model.bin"));
    ck_assert_int_ne(kv_model_load("build/test-tmp", &m), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "build/test-tmp"));
    for (int i = 0; i < 3; i++)
        free(img[i]);
    fx_model_free(&x);
}
END_TEST

/* ---- tokenizer ---- */

static kv_tokenizer_t *tiny_tokenizer(char *path, size_t plen)
{
    size_t n;
    unsigned char *b = fx_tokenizer(&n);
    write_tmp("tok.bin", b, n, path, plen);
    free(b);
    kv_tokenizer_t *t;
    ck_assert_msg(kv_tokenizer_load(path, 0, &t) == KV_OK, "%s", kv_last_error());
    return t;
}

static void expect_ids(const kv_tokenizer_t *t, const char *text, int bos, const int *want, int nwant)
{
    int32_t *ids;
    int n;
    ck_assert_int_eq(kv_tokenizer_encode(t, text, strlen(text), bos, 0, &ids, &n), KV_OK);
    int ok = n == nwant;
    for (int i = 0; ok && i < n; i++)
        ok = ids[i] == want[i];
    char got[256] = "";
    for (int i = 0; i < n && strlen(got) < 200; i++)
        snprintf(got + strlen(got), sizeof got - strlen(got), " %d", ids[i]);
    ck_assert_msg(ok, "encode('%s'): got [%s ]", text, got);
    kv_free(ids);
}

START_TEST(tokenizer_merges_by_score)
{
    char path[256];
    kv_tokenizer_t *t = tiny_tokenizer(path, sizeof path);
    ck_assert_int_eq(t->vocab_size, TV);
    ck_assert_int_eq(t->byte_fallback, 1);
    /* ids of the extra pieces (fixture order) */
    enum { SP = 259, A, B, C, AB, BC, SP_A, ABC, SP_AB, E_ACUTE, AA, X, XX };
    ck_assert_int_eq(kv_tokenizer_lookup(t, "abc", 3), ABC);
    ck_assert_int_eq(kv_tokenizer_lookup(t, "abcd", 4), -1);
    /* "abc": pairs " a" -5, "ab" -3, "bc" -2: "bc" wins, then "abc" (-1); " abc" is no token */
    expect_ids(t, "abc", 0, (int[]){SP, ABC}, 2);
    /* "ab": "ab" (-3) beats " a" (-5), then " ab" (-4) */
    expect_ids(t, "ab", 1, (int[]){1, SP_AB}, 2);
    /* "xxx": two "xx" pairs tie at -7: the leftmost merges, leaving "xx" "x" */
    expect_ids(t, "xxx", 0, (int[]){SP, XX, X}, 3);
    /* a code point in the vocabulary is one token; one that is not falls back to its bytes + 3 */
    expect_ids(t, "a\xc3\xa9", 0, (int[]){SP_A, E_ACUTE}, 2);
    expect_ids(t, "\xc3\xbc", 0, (int[]){SP, 0xC3 + 3, 0xBC + 3}, 3);
    /* no dummy prefix on empty text; EOS appended on request */
    expect_ids(t, "", 1, (int[]){1}, 1);
    int32_t *ids;
    int n;
    ck_assert_int_eq(kv_tokenizer_encode(t, "c", 1, 1, 1, &ids, &n), KV_OK);
    ck_assert_int_eq(n, 4);
    ck_assert_int_eq(ids[3], 2);
    kv_free(ids);
    /* decoding: the space after BOS goes, byte tokens become bytes */
    size_t l;
    const char *p = kv_tokenizer_decode(t, 1, SP_A, &l);
    ck_assert(l == 1 && p[0] == 'a');
    p = kv_tokenizer_decode(t, A, SP_A, &l);
    ck_assert(l == 2 && !memcmp(p, " a", 2));
    p = kv_tokenizer_decode(t, A, 'Q' + 3, &l);
    ck_assert(l == 1 && p[0] == 'Q');
    p = kv_tokenizer_decode(t, A, 3, &l);
    ck_assert(l == 1 && p[0] == 0);
    kv_tokenizer_free(t);
}
END_TEST

typedef struct {
    const char *name;
    long cut;    /* >= 0: truncate to this many bytes; -1 keep */
    int set_off; /* int32 to overwrite (-1 none) */
    int32_t set_val;
    int expect_vocab; /* passed to load */
    long append;
    const char *expect;
} tbroken_t;

/* record 0 starts at 4: score (4..8), len (8..12), "<unk>" (12..17); record 1 at 17 */
static const tbroken_t tbroken[] = {
    {"empty", 0, -1, 0, 0, 0, "too short"},
    {"three-bytes", 3, -1, 0, 0, 0, "too short"},
    {"mid-piece", 15, -1, 0, 0, 0, "truncated"},
    {"mid-length", 10, -1, 0, 0, 0, "truncated"},
    {"negative-length", -1, 8, -4, 0, 0, "length -4"},
    {"too-long-piece", -1, 8, 9, 0, 0, "max_token_length"},
    {"zero-max-length", -1, 0, 0, 0, 0, "max_token_length 0"},
    {"nan-score", -1, 4, 0x7fc00000, 0, 0, "non-finite score"},
    {"record-boundary", 17, -1, 0, TV, 0, "has 1 tokens, the model's vocabulary has"},
    {"extra-bytes", -1, -1, 0, TV, 5, "bytes after"},
    {"wrong-vocab", -1, -1, 0, TV + 1, 0, "has 272 tokens"},
};

START_TEST(broken_tokenizers_are_named)
{
    size_t n;
    unsigned char *img = fx_tokenizer(&n);
    for (size_t i = 0; i < KV_ARRAY_LEN(tbroken); i++) {
        const tbroken_t *b = &tbroken[i];
        unsigned char *buf = calloc(n + 16, 1);
        memcpy(buf, img, n);
        if (b->set_off >= 0)
            fx_put_i32(buf, (size_t)b->set_off, b->set_val);
        size_t len = b->cut >= 0 ? (size_t)b->cut : n + (size_t)b->append;
        char name[64], path[256];
        snprintf(name, sizeof name, "tok-%s.bin", b->name);
        write_tmp(name, buf, len, path, sizeof path);
        kv_tokenizer_t *t = (kv_tokenizer_t *)0x1;
        ck_assert_msg(kv_tokenizer_load(path, b->expect_vocab, &t) != KV_OK, "%s: loaded", b->name);
        ck_assert_ptr_null(t);
        ck_assert_msg(strstr(kv_last_error(), path), "%s: file not named: %s", b->name, kv_last_error());
        ck_assert_msg(strstr(kv_last_error(), b->expect), "%s: message lacks '%s': %s", b->name, b->expect,
                      kv_last_error());
        free(buf);
    }
    free(img);
}
END_TEST

/* The quadratic merge loop, written from the rules (llama2.c / SentencePiece BPE). */
static int naive_encode(const kv_tokenizer_t *t, const char *s, int32_t *out)
{
    int n = 0;
    out[n++] = 1;
    if (*s)
        out[n++] = kv_tokenizer_lookup(t, " ", 1);
    for (size_t i = 0; s[i];) {
        size_t l = 1;
        while (s[i + l] && l < 4 && ((unsigned char)s[i + l] & 0xC0) == 0x80)
            l++;
        int id = kv_tokenizer_lookup(t, s + i, l);
        if (id >= 0)
            out[n++] = id;
        else
            for (size_t k = 0; k < l; k++)
                out[n++] = (unsigned char)s[i + k] + 3;
        i += l;
    }
    char buf[256];
    for (;;) {
        float best = -INFINITY;
        int at = -1, best_id = -1;
        for (int i = 1; i + 1 < n; i++) {
            int la = t->lens[out[i]], lb = t->lens[out[i + 1]];
            if (la + lb >= (int)sizeof buf)
                continue;
            memcpy(buf, t->pieces[out[i]], (size_t)la);
            memcpy(buf + la, t->pieces[out[i + 1]], (size_t)lb);
            int id = kv_tokenizer_lookup(t, buf, (size_t)(la + lb));
            if (id >= 0 && t->scores[id] > best) {
                best = t->scores[id];
                at = i;
                best_id = id;
            }
        }
        if (at < 0)
            break;
        out[at] = best_id;
        memmove(out + at + 1, out + at + 2, sizeof(int32_t) * (size_t)(n - at - 2));
        n--;
    }
    return n;
}

static void check_real_tokenizer(const char *rel, int vocab)
{
    char path[512];
    ck_assert_ptr_nonnull(kv_test_shared(rel, path, sizeof path));
    kv_tokenizer_t *t;
    ck_assert_msg(kv_tokenizer_load(path, vocab, &t) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(t->vocab_size, vocab);
    ck_assert_int_eq(t->byte_fallback, 1);
    /* lookup finds every piece (the lowest id among duplicate pieces) */
    for (int id = 0; id < t->vocab_size; id++) {
        int f = kv_tokenizer_lookup(t, t->pieces[id], (size_t)t->lens[id]);
        ck_assert_msg(f >= 0 && f <= id && t->lens[f] == t->lens[id] &&
                          !memcmp(t->pieces[f], t->pieces[id], (size_t)t->lens[id]),
                      "lookup of piece %d gave %d", id, f);
    }
    /* "a": the dummy prefix " " and "a" merge into the vocabulary's " a" */
    int sp_a = kv_tokenizer_lookup(t, " a", 2);
    ck_assert_int_ge(sp_a, 0);
    expect_ids(t, "a", 1, (int[]){1, sp_a}, 2);
    /* "\n" has no piece of its own in these vocabularies: it is the byte token <0x0A> */
    ck_assert_int_eq(kv_tokenizer_lookup(t, "\n", 1), -1);
    ck_assert_str_eq(t->pieces['\n' + 3], "<0x0A>");
    /* random texts: the heap merge equals the quadratic scan, and decoding gives the text back */
    static const char *alphabet[] = {"a",
                                     "e",
                                     "t",
                                     "o",
                                     "n",
                                     " ",
                                     " ",
                                     "s",
                                     "h",
                                     "r",
                                     "T",
                                     "!",
                                     ",",
                                     "\n",
                                     "\xc3\xa9",
                                     "\xc3\xbc",
                                     "\xe4\xb8\xad",
                                     "\xf0\x9f\x98\x80",
                                     "'",
                                     "x",
                                     "1"};
    kv_rng_t r;
    kv_rng_seed(&r, 99);
    for (int trial = 0; trial < 150; trial++) {
        char s[400] = "";
        int len = 1 + (int)kv_rng_below(&r, 60);
        for (int i = 0; i < len; i++)
            strcat(s, alphabet[kv_rng_below(&r, KV_ARRAY_LEN(alphabet))]);
        int32_t ref[512], *ids;
        int nref = naive_encode(t, s, ref), n;
        ck_assert_int_eq(kv_tokenizer_encode(t, s, strlen(s), 1, 0, &ids, &n), KV_OK);
        ck_assert_msg(n == nref && !memcmp(ids, ref, sizeof(int32_t) * (size_t)n), "'%s': %d tokens vs %d", s, n, nref);
        char *back;
        size_t bl;
        ck_assert_int_eq(kv_tokenizer_decode_all(t, ids, n, &back, &bl), KV_OK);
        ck_assert_msg(bl == strlen(s) && !memcmp(back, s, bl), "round trip of '%s' gave '%s'", s, back);
        kv_free(back);
        kv_free(ids);
    }
    kv_tokenizer_free(t);
}

START_TEST(real_tokenizer_512)
{
    check_real_tokenizer("models/stories260K/tok512.bin", 512);
}
END_TEST
START_TEST(real_tokenizer_32k)
{
    check_real_tokenizer("models/llama2c-tokenizer-32k/tokenizer.bin", 32000);
}
END_TEST

START_TEST(documents_split_at_separators)
{
    const char *text = "\nfirst doc\nline two\n<|endoftext|>\n\n<|endoftext|>\nsecond<|endoftext|>third\n\n";
    kv_doc_t *d;
    int n;
    ck_assert_int_eq(kv_split_docs(text, strlen(text), &d, &n), KV_OK);
    ck_assert_int_eq(n, 3);
    ck_assert(d[0].len == strlen("first doc\nline two") && !memcmp(d[0].text, "first doc\nline two", d[0].len));
    ck_assert(d[1].len == 6 && !memcmp(d[1].text, "second", 6));
    ck_assert(d[2].len == 5 && !memcmp(d[2].text, "third", 5));
    kv_free(d);
}
END_TEST

/* ---- forward pass vs a naive double-precision reference ---- */

typedef struct {
    double *k, *v;  /* (layers, T, kv_dim) post-RoPE keys and values */
    double *logits; /* (T, vocab) */
} ref_out_t;

static void ref_rmsnorm(double *y, const double *x, const float *w, int n)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / n + 1e-5);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * r * w[i];
}

static void ref_matvec(double *y, const float *w, const double *x, int out, int in)
{
    for (int o = 0; o < out; o++) {
        double s = 0;
        for (int i = 0; i < in; i++)
            s += (double)w[(size_t)o * in + i] * x[i];
        y[o] = s;
    }
}

static void ref_rope(double *x, int heads, int hd, int pos)
{
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < hd; i += 2) {
            double ang = pos * pow(10000.0, -(double)i / hd);
            double a = x[h * hd + i], b = x[h * hd + i + 1];
            x[h * hd + i] = a * cos(ang) - b * sin(ang);
            x[h * hd + i + 1] = a * sin(ang) + b * cos(ang);
        }
}

/* Token by token, every layer, plain loops: the Llama of kv_forward.h's comment. */
static void ref_forward(const kv_model_t *m, const int32_t *tok, int T, ref_out_t *o)
{
    const kv_model_config_t *c = &m->cfg;
    const int D = c->dim, H = c->hidden_dim, KV = c->kv_dim, hd = c->head_dim, NH = c->n_heads;
    const int G = c->n_heads / c->n_kv_heads;
    o->k = calloc((size_t)c->n_layers * T * KV, sizeof(double));
    o->v = calloc((size_t)c->n_layers * T * KV, sizeof(double));
    o->logits = calloc((size_t)T * c->vocab_size, sizeof(double));
    double *x = malloc(sizeof(double) * D), *xn = malloc(sizeof(double) * D), *q = malloc(sizeof(double) * D);
    double *att = malloc(sizeof(double) * D), *tmp = malloc(sizeof(double) * D);
    double *h1 = malloc(sizeof(double) * H), *h3 = malloc(sizeof(double) * H), *p = malloc(sizeof(double) * T);
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < D; i++)
            x[i] = m->token_embedding[(size_t)tok[t] * D + i];
        for (int l = 0; l < c->n_layers; l++) {
            double *K = o->k + (size_t)l * T * KV, *V = o->v + (size_t)l * T * KV;
            ref_rmsnorm(xn, x, m->rms_att + (size_t)l * D, D);
            ref_matvec(q, m->wq + (size_t)l * D * D, xn, D, D);
            ref_matvec(K + (size_t)t * KV, m->wk + (size_t)l * KV * D, xn, KV, D);
            ref_matvec(V + (size_t)t * KV, m->wv + (size_t)l * KV * D, xn, KV, D);
            ref_rope(q, NH, hd, t);
            ref_rope(K + (size_t)t * KV, c->n_kv_heads, hd, t);
            for (int h = 0; h < NH; h++) {
                const int g = h / G;
                double mx = -INFINITY, sum = 0;
                for (int j = 0; j <= t; j++) {
                    double s = 0;
                    for (int i = 0; i < hd; i++)
                        s += q[h * hd + i] * K[(size_t)j * KV + g * hd + i];
                    p[j] = s / sqrt((double)hd);
                    mx = fmax(mx, p[j]);
                }
                for (int j = 0; j <= t; j++)
                    sum += (p[j] = exp(p[j] - mx));
                for (int i = 0; i < hd; i++) {
                    double a = 0;
                    for (int j = 0; j <= t; j++)
                        a += p[j] / sum * V[(size_t)j * KV + g * hd + i];
                    att[h * hd + i] = a;
                }
            }
            ref_matvec(tmp, m->wo + (size_t)l * D * D, att, D, D);
            for (int i = 0; i < D; i++)
                x[i] += tmp[i];
            ref_rmsnorm(xn, x, m->rms_ffn + (size_t)l * D, D);
            ref_matvec(h1, m->w1 + (size_t)l * H * D, xn, H, D);
            ref_matvec(h3, m->w3 + (size_t)l * H * D, xn, H, D);
            for (int i = 0; i < H; i++)
                h1[i] = h1[i] / (1 + exp(-h1[i])) * h3[i];
            ref_matvec(tmp, m->w2 + (size_t)l * D * H, h1, D, H);
            for (int i = 0; i < D; i++)
                x[i] += tmp[i];
        }
        ref_rmsnorm(xn, x, m->rms_final, D);
        ref_matvec(o->logits + (size_t)t * c->vocab_size, m->wcls, xn, c->vocab_size, D);
    }
    free(x), free(xn), free(q), free(att), free(tmp), free(h1), free(h3), free(p);
}

static void ref_free(ref_out_t *o)
{
    free(o->k), free(o->v), free(o->logits);
}

static void tiny_tokens(int32_t *tok, int T, uint64_t seed)
{
    kv_rng_t r;
    kv_rng_seed(&r, seed);
    tok[0] = 1;
    for (int t = 1; t < T; t++)
        tok[t] = (int32_t)kv_rng_below(&r, TV);
}

START_TEST(forward_matches_reference)
{
    fx_model_t x;
    fx_model_init(&x, TD, TH, TL, TNH, TKV, TV, TS, 0, 21);
    size_t n;
    unsigned char *img = fx_model_v1(&x, &n);
    char path[256];
    write_tmp("fwd.bin", img, n, path, sizeof path);
    kv_model_t *m = load_ok(path);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_open("cpu", 0, &be), KV_OK);
    enum { T = 40 };
    int32_t tok[T];
    tiny_tokens(tok, T, 3);
    kv_fwd_t *f;
    ck_assert_msg(kv_fwd_create(m, be, T, 16 /* blocks of 16: chunked prefill */, &f) == KV_OK, "%s", kv_last_error());
    float *lg = malloc(sizeof(float) * T * TV);
    ck_assert_msg(kv_fwd_run(f, tok, T, 0, lg, 1, NULL, NULL) == KV_OK, "%s", kv_last_error());
    ref_out_t ref;
    ref_forward(m, tok, T, &ref);
    /* float32 vs double on a 2-layer model whose activations are O(1): differences are ~1e-6; 1e-4
     * (abs + rel) is far below any indexing or GQA-mapping error, which gives O(0.1) or more. */
    for (int i = 0; i < T * TV; i++)
        kv_assert_close(lg[i], ref.logits[i], 1e-4, 1e-4, "logit");
    for (int l = 0; l < TL; l++) {
        const float *kc = kv_fwd_k_cache(f, l), *vc = kv_fwd_v_cache(f, l);
        for (int i = 0; i < T * m->cfg.kv_dim; i++) {
            kv_assert_close(kc[i], ref.k[(size_t)l * T * m->cfg.kv_dim + i], 1e-5, 1e-4, "K cache");
            kv_assert_close(vc[i], ref.v[(size_t)l * T * m->cfg.kv_dim + i], 1e-5, 1e-4, "V cache");
        }
    }
    /* errors: a token outside the vocabulary, a block beyond the cache */
    int32_t bad = TV;
    ck_assert_int_ne(kv_fwd_run(f, &bad, 1, 0, NULL, 0, NULL, NULL), KV_OK);
    ck_assert_int_ne(kv_fwd_run(f, tok, 2, T - 1, NULL, 0, NULL, NULL), KV_OK);
    ref_free(&ref);
    free(lg);
    kv_fwd_free(f);
    kv_backend_close(be);
    kv_model_free(m);
    free(img);
    fx_model_free(&x);
}
END_TEST

/* v2 (dequantised at load) runs exactly like a v0 file holding the dequantised weights. */
START_TEST(q80_runs_like_its_dequantised_fp32)
{
    fx_model_t x, deq;
    fx_model_init(&x, TD, TH, TL, TNH, TKV, TV, TS, 1, 31);
    size_t n2, n0;
    unsigned char *b2 = fx_model_v2(&x, 32, &n2, &deq), *b0 = fx_model_v0(&deq, &n0);
    char p2[256], p0[256];
    write_tmp("q.bin", b2, n2, p2, sizeof p2);
    write_tmp("dq.bin", b0, n0, p0, sizeof p0);
    kv_model_t *m2 = load_ok(p2), *m0 = load_ok(p0);
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_open("cpu", 0, &be), KV_OK);
    enum { T = 24 };
    int32_t tok[T];
    tiny_tokens(tok, T, 4);
    float *a = malloc(sizeof(float) * T * TV), *b = malloc(sizeof(float) * T * TV);
    kv_fwd_t *f;
    ck_assert_int_eq(kv_fwd_create(m2, be, T, T, &f), KV_OK);
    ck_assert_int_eq(kv_fwd_run(f, tok, T, 0, a, 1, NULL, NULL), KV_OK);
    kv_fwd_free(f);
    ck_assert_int_eq(kv_fwd_create(m0, be, T, T, &f), KV_OK);
    ck_assert_int_eq(kv_fwd_run(f, tok, T, 0, b, 1, NULL, NULL), KV_OK);
    kv_fwd_free(f);
    ck_assert_msg(!memcmp(a, b, sizeof(float) * T * TV), "Q8_0 logits differ from those of its fp32 twin");
    free(a), free(b), free(b0), free(b2);
    kv_model_free(m0), kv_model_free(m2);
    kv_backend_close(be);
    fx_model_free(&x), fx_model_free(&deq);
}
END_TEST

/* Capture of a tiny Q8_0 GQA model: K and V in the trace are the reference's, head-major. */
START_TEST(tiny_capture_is_head_major)
{
    fx_model_t x;
    fx_model_init(&x, TD, TH, TL, TNH, TKV, TV, TS, 0, 41);
    size_t n;
    unsigned char *img = fx_model_v2(&x, 16, &n, NULL);
    char mpath[256], tpath[256], out[256];
    write_tmp("cap.bin", img, n, mpath, sizeof mpath);
    kv_tokenizer_t *tok = tiny_tokenizer(tpath, sizeof tpath);
    kv_test_tmp("tiny.h5", out, sizeof out);
    kv_capture_opts_t o;
    kv_capture_opts_init(&o);
    o.model_path = mpath;
    o.tokenizer_path = tpath;
    o.prompt = "abc xx ab\xc3\xbc abcab";
    o.out_path = out;
    o.n_decode = 6;
    o.dtype = KV_DTYPE_F32;
    o.segments = "3,5";
    o.pool = 7;
    o.backend = "cpu";
    kv_capture_result_t r;
    kv_log_set_level(KV_LOG_QUIET);
    ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());
    kv_trace_t *t;
    ck_assert_msg(kv_trace_open(out, &t) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *mt = kv_trace_meta(t);
    int32_t *ptok;
    int np;
    ck_assert_int_eq(kv_tokenizer_encode(tok, o.prompt, strlen(o.prompt), 1, 0, &ptok, &np), KV_OK);
    ck_assert_int_eq(mt->n_prompt, np);
    ck_assert_int_eq(mt->n_tokens, np + 6);
    ck_assert_int_eq(mt->n_segments, 3);
    ck_assert_int_eq(mt->segments[0], 0);
    ck_assert_int_eq(mt->segments[1], 3);
    ck_assert_int_eq(mt->segments[2], 5);
    ck_assert_int_eq(mt->pool, 7);
    ck_assert_int_eq(mt->n_kv_heads, TKV);
    ck_assert(!memcmp(mt->tokens, ptok, sizeof(int32_t) * (size_t)np));
    kv_model_t *m = load_ok(mpath);
    ref_out_t ref;
    ref_forward(m, mt->tokens, mt->n_tokens, &ref);
    /* decode tokens are the argmax of the reference logits one position earlier */
    for (int i = np; i < mt->n_tokens; i++) {
        int best = 0;
        for (int v = 1; v < TV; v++)
            if (ref.logits[(size_t)(i - 1) * TV + v] > ref.logits[(size_t)(i - 1) * TV + best])
                best = v;
        ck_assert_int_eq(mt->tokens[i], best);
    }
    const int T = mt->n_tokens, hd = m->cfg.head_dim, KV = m->cfg.kv_dim;
    float *k = malloc(sizeof(float) * TKV * T * hd), *v = malloc(sizeof(float) * TKV * T * hd);
    for (int l = 0; l < TL; l++) {
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_K, k), KV_OK);
        ck_assert_int_eq(kv_trace_read(t, l, KV_T_V, v), KV_OK);
        for (int g = 0; g < TKV; g++)
            for (int tt = 0; tt < T; tt++)
                for (int i = 0; i < hd; i++) {
                    size_t tr = ((size_t)g * T + tt) * hd + i, rf = (size_t)l * T * KV + (size_t)tt * KV + g * hd + i;
                    kv_assert_close(k[tr], ref.k[rf], 1e-5, 1e-4, "trace K");
                    kv_assert_close(v[tr], ref.v[rf], 1e-5, 1e-4, "trace V");
                }
    }
    free(k), free(v);
    ref_free(&ref);
    kv_model_free(m);
    kv_free(ptok);
    kv_trace_close(t);
    /* prompt + decode beyond seq_len is refused and nothing is written */
    o.n_decode = TS;
    kv_test_tmp("toolong.h5", out, sizeof out);
    o.out_path = out;
    ck_assert_int_ne(kv_capture_run(&o, &r), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "seq_len"));
    struct stat st;
    ck_assert(stat(out, &st) != 0);
    /* bad --segments */
    o.n_decode = 2;
    o.segments = "4,2";
    ck_assert_int_ne(kv_capture_run(&o, &r), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "ascend"));
    o.segments = "1,999";
    ck_assert_int_ne(kv_capture_run(&o, &r), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "outside"));
    kv_tokenizer_free(tok);
    free(img);
    fx_model_free(&x);
}
END_TEST

Suite *suite_capture(void)
{
    Suite *s = suite_create("capture");
    TCase *tc = tcase_create("loaders");
    tcase_add_test(tc, versions_load_what_was_written);
    tcase_add_test(tc, broken_checkpoints_are_named);
    tcase_add_test(tc, broken_tokenizers_are_named);
    tcase_add_test(tc, tokenizer_merges_by_score);
    tcase_add_test(tc, documents_split_at_separators);
    suite_add_tcase(s, tc);
    TCase *tr = tcase_create("real tokenizers");
    char buf[512];
    if (kv_test_shared("models/stories260K/tok512.bin", buf, sizeof buf))
        tcase_add_test(tr, real_tokenizer_512);
    else
        kv_test_skip("capture/real_tokenizer_512", "models/stories260K/tok512.bin not found");
    if (kv_test_shared("models/llama2c-tokenizer-32k/tokenizer.bin", buf, sizeof buf))
        tcase_add_test(tr, real_tokenizer_32k);
    else
        kv_test_skip("capture/real_tokenizer_32k", "models/llama2c-tokenizer-32k/tokenizer.bin not found");
    suite_add_tcase(s, tr);
    TCase *tf = tcase_create("forward");
    tcase_add_test(tf, forward_matches_reference);
    tcase_add_test(tf, q80_runs_like_its_dequantised_fp32);
    tcase_add_test(tf, tiny_capture_is_head_major);
    suite_add_tcase(s, tf);
    return s;
}
