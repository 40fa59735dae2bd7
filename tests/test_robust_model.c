/*
 * test_robust_model.c: hostile inputs to the checkpoint and tokenizer loaders, and the cases the
 * fuzzers (tests/fuzz/) found, each rebuilt here from a valid file written by the test.
 *
 *  - Q8_0 (version 2) in both arrangements llama2.c has written: each tensor followed by its own
 *    scales (export.py today, runq.c) and all scales after all int8 values (export.py as first
 *    published). The test rearranges the bytes of one export into the other itself, so both must
 *    load to bit-identical weights, equal to what the fixture's quantiser dequantises to;
 *  - scales that no export can produce (NaN, infinite, negative) are named as corruption;
 *  - headers of large models (vocab 128256 x dim 8192, 80 layers) in a small file: the message
 *    states the exact size the header implies, computed here independently in 64-bit arithmetic
 *    (an overflow in the loader's size arithmetic would print another number);
 *  - tokenizers: a model checkpoint or a directory passed as tokenizer, random byte strings
 *    (invalid UTF-8, NUL bytes) round-trip through byte fallback, a vocabulary without byte
 *    fallback and with empty pieces encodes to ids inside the vocabulary.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_rng.h"
#include "tests/capture_fixtures.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_tokenizer.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* tiny GQA shape (as test_capture.c) */
#define RD 32
#define RH 64
#define RL 2
#define RNH 4
#define RKV 2
#define RV (259 + FX_EXTRA)
#define RS 64
#define RG 16

static const char *tmp_file(const char *name, const void *buf, size_t len, char *path, size_t plen)
{
    kv_test_tmp(name, path, plen);
    ck_assert_int_eq(fx_write(path, buf, len), 0);
    return path;
}

/* Element counts of the quantised tensors in file order: emb, wq[L], wk[L], wv[L], wo[L], w1[L],
 * w2[L], w3[L], [wcls]. Returns the count. */
static int q80_tensors(int shared, size_t *n)
{
    const size_t D = RD, H = RH, KV = RD / RNH * RKV, V = RV;
    const size_t per[8] = {V * D, D * D, KV * D, KV * D, D * D, H * D, D * H, H * D};
    int k = 0;
    n[k++] = per[0];
    for (int part = 1; part < 8; part++)
        for (int l = 0; l < RL; l++)
            n[k++] = per[part];
    if (!shared)
        n[k++] = V * D;
    return k;
}

/* The grouped export (all int8, then all scales) rearranged into the interleaved one (each tensor's
 * int8 values followed by its scales), as llama2.c's export.py writes today and runq.c reads. */
static unsigned char *to_interleaved(const unsigned char *g, size_t len, int shared)
{
    size_t n[7 * RL + 2];
    const int nt = q80_tensors(shared, n);
    const size_t start = 256 + 4 * (2 * (size_t)RL * RD + RD);
    size_t total = 0;
    for (int k = 0; k < nt; k++)
        total += n[k];
    unsigned char *out = malloc(len);
    memcpy(out, g, start);
    size_t q = start, s = start + total, o = start;
    for (int k = 0; k < nt; k++) {
        memcpy(out + o, g + q, n[k]);
        o += n[k], q += n[k];
        memcpy(out + o, g + s, 4 * (n[k] / RG));
        o += 4 * (n[k] / RG), s += 4 * (n[k] / RG);
    }
    ck_assert_uint_eq(o, len);
    return out;
}

static void same_weights(const kv_model_t *a, const kv_model_t *b, const fx_model_t *deq)
{
    const size_t L = RL, D = RD, H = RH, KV = RD / RNH * RKV, V = RV;
    struct {
        const float *x, *y, *want;
        size_t n;
        const char *name;
    } t[] = {
        {a->token_embedding, b->token_embedding, deq->emb, V * D, "token_embedding"},
        {a->wq, b->wq, deq->wq, L * D * D, "wq"},
        {a->wk, b->wk, deq->wk, L * KV * D, "wk"},
        {a->wv, b->wv, deq->wv, L * KV * D, "wv"},
        {a->wo, b->wo, deq->wo, L * D * D, "wo"},
        {a->w1, b->w1, deq->w1, L * H * D, "w1"},
        {a->w2, b->w2, deq->w2, L * D * H, "w2"},
        {a->w3, b->w3, deq->w3, L * H * D, "w3"},
        {a->wcls, b->wcls, deq->wcls, V * D, "wcls"},
        {a->rms_att, b->rms_att, deq->rms_att, L * D, "rms_att"},
        {a->rms_final, b->rms_final, deq->rms_final, D, "rms_final"},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(t); i++) {
        ck_assert_msg(!memcmp(t[i].x, t[i].y, t[i].n * sizeof(float)), "%s differs between the arrangements",
                      t[i].name);
        ck_assert_msg(!memcmp(t[i].x, t[i].want, t[i].n * sizeof(float)), "%s differs from the dequantised values",
                      t[i].name);
    }
}

START_TEST(q80_both_arrangements_load_alike)
{
    for (int shared = 0; shared < 2; shared++) {
        fx_model_t x, deq;
        fx_model_init(&x, RD, RH, RL, RNH, RKV, RV, RS, shared, 101 + shared);
        size_t n;
        unsigned char *grouped = fx_model_v2(&x, RG, &n, &deq);
        unsigned char *inter = to_interleaved(grouped, n, shared);
        ck_assert_msg(memcmp(grouped, inter, n) != 0,
                      "the two arrangements must differ for this test to mean anything");
        char pg[256], pi[256];
        tmp_file("q80-grouped.bin", grouped, n, pg, sizeof pg);
        tmp_file("q80-interleaved.bin", inter, n, pi, sizeof pi);
        kv_model_t *a = NULL, *b = NULL;
        ck_assert_msg(kv_model_load_f32(pg, &a) == KV_OK, "%s", kv_last_error());
        ck_assert_msg(kv_model_load_f32(pi, &b) == KV_OK, "%s", kv_last_error());
        same_weights(a, b, &deq);
        kv_model_free(a);
        kv_model_free(b);
        free(grouped);
        free(inter);
        fx_model_free(&x);
        fx_model_free(&deq);
    }
}
END_TEST

START_TEST(q80_impossible_scales_are_corruption)
{
    fx_model_t x;
    fx_model_init(&x, RD, RH, RL, RNH, RKV, RV, RS, 1, 7);
    size_t n, nt[7 * RL + 2];
    unsigned char *grouped = fx_model_v2(&x, RG, &n, NULL);
    unsigned char *inter = to_interleaved(grouped, n, 1);
    q80_tensors(1, nt);
    const size_t start = 256 + 4 * (2 * (size_t)RL * RD + RD);
    /* a scale of wq of layer 0 in each arrangement: grouped after every int8; interleaved after wq[0]'s */
    size_t total = 0;
    for (int k = 0; k < 7 * RL + 1; k++)
        total += nt[k];
    const size_t off_grouped = start + total + 4 * (nt[0] / RG) + 4 * 3;
    const size_t off_inter = start + nt[0] + 4 * (nt[0] / RG) + nt[1] + 4 * 3;
    const float bad[3] = {NAN, INFINITY, -0.5f};
    for (int layout = 0; layout < 2; layout++)
        for (int b = 0; b < 3; b++) {
            unsigned char *img = malloc(n);
            memcpy(img, layout ? inter : grouped, n);
            memcpy(img + (layout ? off_inter : off_grouped), &bad[b], 4);
            char path[256], name[64];
            snprintf(name, sizeof name, "q80-bad-scale-%d-%d.bin", layout, b);
            tmp_file(name, img, n, path, sizeof path);
            kv_model_t *m = (kv_model_t *)0x1;
            ck_assert_msg(kv_model_load(path, &m) != KV_OK, "loaded a model with scale %g", (double)bad[b]);
            ck_assert_ptr_null(m);
            ck_assert_msg(strstr(kv_last_error(), path) && strstr(kv_last_error(), "corrupt Q8_0"),
                          "layout %d scale %g: %s", layout, (double)bad[b], kv_last_error());
            free(img);
        }
    free(grouped);
    free(inter);
    fx_model_free(&x);
}
END_TEST

/* Big-model headers in a 4 KiB file: the error states the size the header implies. */
START_TEST(big_model_headers_state_the_exact_size)
{
    const struct {
        int dim, hidden, layers, heads, kv_heads, vocab, seq;
    } shapes[] = {
        {8192, 28672, 80, 64, 8, 128256, 8192},           /* Llama-3-70B */
        {65536, 1 << 20, 1024, 512, 8, 1 << 24, 1 << 24}, /* every dimension at the loader's limit */
        {4096, 14336, 32, 32, 8, -128256, 8192},          /* legacy file with a separate classifier */
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(shapes); i++)
        for (int version = 0; version < 3; version++) {
            if (shapes[i].vocab < 0 && version)
                continue;
            unsigned char buf[4096] = {0};
            const int32_t h7[7] = {shapes[i].dim,      shapes[i].hidden, shapes[i].layers, shapes[i].heads,
                                   shapes[i].kv_heads, shapes[i].vocab,  shapes[i].seq};
            size_t off = 0;
            if (version) {
                fx_put_i32(buf, 0, 0x616b3432);
                fx_put_i32(buf, 4, version);
                off = 8;
                buf[36] = 1; /* shared classifier */
                if (version == 2)
                    fx_put_i32(buf, 37, 64);
            }
            memcpy(buf + off, h7, sizeof h7);
            /* the size in 64-bit arithmetic, written out here apart from the loader */
            const uint64_t D = (uint64_t)h7[0], H = (uint64_t)h7[1], L = (uint64_t)h7[2];
            const uint64_t hd = D / (uint64_t)h7[3], KV = hd * (uint64_t)h7[4];
            const uint64_t V = (uint64_t)(h7[5] < 0 ? -(int64_t)h7[5] : h7[5]), S = (uint64_t)h7[6];
            const uint64_t quant = V * D + L * (2 * D * D + 2 * KV * D + 3 * H * D) + (h7[5] < 0 ? V * D : 0);
            const uint64_t norms = 2 * L * D + D;
            uint64_t need;
            if (version == 0)
                need = 28 + 4 * (quant + norms + S * hd);
            else if (version == 1)
                need = 256 + 4 * (quant + norms);
            else
                need = 256 + 4 * norms + quant + 4 * (quant / 64);
            char path[256], name[64], want[64];
            snprintf(name, sizeof name, "big-%zu-v%d.bin", i, version);
            tmp_file(name, buf, sizeof buf, path, sizeof path);
            kv_model_t *m = (kv_model_t *)0x1;
            ck_assert_int_ne(kv_model_load(path, &m), KV_OK);
            ck_assert_ptr_null(m);
            snprintf(want, sizeof want, "needs %" PRIu64 " (truncated?)", need);
            ck_assert_msg(strstr(kv_last_error(), path) && strstr(kv_last_error(), want),
                          "shape %zu v%d: want '%s': %s", i, version, want, kv_last_error());
        }
}
END_TEST

START_TEST(tokenizer_refuses_a_checkpoint_and_a_directory)
{
    /* a legacy checkpoint's first int32 is dim (a plausible max_token_length); over 1 GiB it is refused
     * before being read. The file is sparse: it takes no disk space. */
    char path[256];
    kv_test_tmp("model-as-tokenizer.bin", path, sizeof path);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    int32_t dim = 288;
    fwrite(&dim, 4, 1, f);
    ck_assert_int_eq(fseek(f, (1L << 30) + 4096, SEEK_SET), 0);
    fputc(0, f);
    fclose(f);
    kv_tokenizer_t *t = (kv_tokenizer_t *)0x1;
    ck_assert_int_ne(kv_tokenizer_load(path, 0, &t), KV_OK);
    ck_assert_ptr_null(t);
    ck_assert_msg(strstr(kv_last_error(), path) && strstr(kv_last_error(), "a model checkpoint?"), "%s",
                  kv_last_error());
    remove(path);
    ck_assert_int_ne(kv_tokenizer_load("build/test-tmp", 0, &t), KV_OK);
    ck_assert_msg(strstr(kv_last_error(), "build/test-tmp") && strstr(kv_last_error(), "not a regular file"), "%s",
                  kv_last_error());
}
END_TEST

/* Random bytes (invalid UTF-8, stray continuation bytes, NUL) encode and decode back exactly when
 * the vocabulary has byte fallback; every id is inside the vocabulary. */
START_TEST(random_bytes_round_trip)
{
    size_t n;
    unsigned char *img = fx_tokenizer(&n);
    char path[256];
    tmp_file("rt-tok.bin", img, n, path, sizeof path);
    free(img);
    kv_tokenizer_t *t;
    ck_assert_msg(kv_tokenizer_load(path, 0, &t) == KV_OK, "%s", kv_last_error());
    kv_rng_t r;
    kv_rng_seed(&r, 77);
    static const unsigned char alphabet[] = {'a', 'b', 'c', 'x', ' ', 0x00, 0x80, 0xbf, 0xc3, 0xa9, 0xe2, 0xf0, 0xff};
    for (int trial = 0; trial < 300; trial++) {
        char text[64];
        size_t len = (size_t)(kv_rng_uniform(&r) * sizeof text);
        for (size_t i = 0; i < len; i++)
            text[i] = (char)(kv_rng_uniform(&r) < 0.5 ? alphabet[(int)(kv_rng_uniform(&r) * sizeof alphabet)]
                                                      : (int)(kv_rng_uniform(&r) * 256));
        int32_t *ids;
        int m;
        ck_assert_int_eq(kv_tokenizer_encode(t, text, len, 1, 0, &ids, &m), KV_OK);
        ck_assert_int_le(m, (int)len + 2);
        for (int i = 0; i < m; i++)
            ck_assert(ids[i] >= 0 && ids[i] < t->vocab_size);
        char *back;
        size_t blen;
        ck_assert_int_eq(kv_tokenizer_decode_all(t, ids, m, &back, &blen), KV_OK);
        ck_assert_msg(blen == len && !memcmp(back, text, len), "trial %d: %zu bytes came back as %zu", trial, len,
                      blen);
        kv_free(back);
        kv_free(ids);
    }
    kv_tokenizer_free(t);
}
END_TEST

/* Vocabularies without byte fallback, with empty pieces and (second pass) an empty <unk> piece:
 * unknown text becomes <unk> (id 0) and merges through empty pieces stay inside the vocabulary. */
START_TEST(no_byte_fallback_and_empty_pieces)
{
    for (int empty_unk = 0; empty_unk < 2; empty_unk++) {
        const struct {
            const char *s;
            float score;
        } v[] = {{empty_unk ? "" : "<unk>", 0},
                 {"\n<s>\n", 0},
                 {"\n</s>\n", 0},
                 {"", 5},
                 {"a", 1},
                 {"", -1},
                 {"aa", 2},
                 {" ", 0}};
        unsigned char buf[256];
        fx_put_i32(buf, 0, 6);
        size_t off = 4;
        for (size_t i = 0; i < KV_ARRAY_LEN(v); i++) {
            memcpy(buf + off, &v[i].score, 4);
            fx_put_i32(buf, off + 4, (int32_t)strlen(v[i].s));
            memcpy(buf + off + 8, v[i].s, strlen(v[i].s));
            off += 8 + strlen(v[i].s);
        }
        char path[256];
        tmp_file("tok-empty-pieces.bin", buf, off, path, sizeof path);
        kv_tokenizer_t *t;
        ck_assert_msg(kv_tokenizer_load(path, (int)KV_ARRAY_LEN(v), &t) == KV_OK, "%s", kv_last_error());
        ck_assert_int_eq(t->byte_fallback, 0);
        const char *texts[] = {"aaa", "zz",
                               "a\xff"
                               "a",
                               "", " a a"};
        for (size_t i = 0; i < KV_ARRAY_LEN(texts); i++) {
            int32_t *ids;
            int m;
            ck_assert_int_eq(kv_tokenizer_encode(t, texts[i], strlen(texts[i]), 1, 1, &ids, &m), KV_OK);
            ck_assert_int_ge(m, 2);
            ck_assert_int_eq(ids[0], 1);
            ck_assert_int_eq(ids[m - 1], 2);
            for (int k = 0; k < m; k++)
                ck_assert(ids[k] >= 0 && ids[k] < t->vocab_size);
            char *back;
            ck_assert_int_eq(kv_tokenizer_decode_all(t, ids, m, &back, NULL), KV_OK);
            kv_free(back);
            kv_free(ids);
        }
        if (!empty_unk) {
            /* "zz": no piece, no byte fallback: the dummy-prefix space, then <unk> per code point */
            int32_t *ids;
            int m;
            ck_assert_int_eq(kv_tokenizer_encode(t, "zz", 2, 0, 0, &ids, &m), KV_OK);
            ck_assert_int_eq(m, 3);
            ck_assert_int_eq(ids[0], 7);
            ck_assert_int_eq(ids[1], 0);
            ck_assert_int_eq(ids[2], 0);
            kv_free(ids);
        }
        kv_tokenizer_free(t);
    }
}
END_TEST

Suite *suite_robust_model(void)
{
    Suite *s = suite_create("robust_model");
    TCase *tc = tcase_create("loaders");
    tcase_add_test(tc, q80_both_arrangements_load_alike);
    tcase_add_test(tc, q80_impossible_scales_are_corruption);
    tcase_add_test(tc, big_model_headers_state_the_exact_size);
    tcase_add_test(tc, tokenizer_refuses_a_checkpoint_and_a_directory);
    tcase_add_test(tc, random_bytes_round_trip);
    tcase_add_test(tc, no_byte_fallback_and_empty_pieces);
    suite_add_tcase(s, tc);
    return s;
}
