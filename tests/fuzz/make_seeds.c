/*
 * make_seeds.c: seed corpora for the harnesses of tests/fuzz/, written into DIR/{model,tokenizer,
 * trace,trace_file,hf,gguf}/ (make fuzz runs it). Small valid inputs of every kind the harnesses
 * take: checkpoints of versions 0, 1 and 2 (both Q8_0 arrangements, shared and separate classifier,
 * GQA), the tests' tokenizer and the real tok512.bin when ../shared has it, small traces (f32 and
 * f16), a few change programs for fuzz_trace, and GGUF files (tests/gguf_fixture.h): llama models
 * in F32, F16 and Q8_0, a qwen2 model with biases and head_dim != dim / heads, one file of every
 * metadata type.
 */
#include "sim/common/kv_common.h"
#include "tests/capture_fixtures.h"
#include "tests/gguf_fixture.h"
#include "tests/kv_test.h"
#include "traces/kv_trace.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void put(const char *dir, const char *sub, const char *name, const void *b, size_t n);

/* model seeds: the raw file (byte 0 = 0) and the same in "fit" mode (byte 0 = 1) */
static void put_model(const char *dir, const char *name, const unsigned char *b, size_t n)
{
    unsigned char *x = malloc(n + 1);
    memcpy(x + 1, b, n);
    char nm[96];
    for (int fit = 0; fit < 2; fit++) {
        x[0] = (unsigned char)fit;
        snprintf(nm, sizeof nm, "%s%s", fit ? "fit-" : "", name);
        put(dir, "model", nm, x, n + 1);
    }
    free(x);
}

static void put(const char *dir, const char *sub, const char *name, const void *b, size_t n)
{
    char p[1024];
    snprintf(p, sizeof p, "%s/%s", dir, sub);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/%s/%s", dir, sub, name);
    if (fx_write(p, b, n)) {
        fprintf(stderr, "make_seeds: cannot write %s\n", p);
        exit(1);
    }
}

/* grouped Q8_0 (all int8, then all scales) -> interleaved (each tensor's int8 then its scales) */
static unsigned char *interleave(const unsigned char *g, size_t len, const fx_model_t *m, int gs)
{
    const size_t D = (size_t)m->dim, H = (size_t)m->hidden, KV = D / (size_t)m->heads * (size_t)m->kv_heads;
    const size_t V = (size_t)m->vocab, L = (size_t)m->layers;
    size_t n[64], k = 0, total = 0;
    const size_t per[8] = {V * D, D * D, KV * D, KV * D, D * D, H * D, D * H, H * D};
    n[k++] = per[0];
    for (int part = 1; part < 8; part++)
        for (size_t l = 0; l < L; l++)
            n[k++] = per[part];
    if (!m->shared)
        n[k++] = V * D;
    for (size_t i = 0; i < k; i++)
        total += n[i];
    const size_t start = 256 + 4 * (2 * L * D + D);
    unsigned char *o = malloc(len);
    memcpy(o, g, start);
    size_t q = start, s = start + total, w = start;
    for (size_t i = 0; i < k; i++) {
        memcpy(o + w, g + q, n[i]);
        w += n[i], q += n[i];
        memcpy(o + w, g + s, 4 * (n[i] / (size_t)gs));
        w += 4 * (n[i] / (size_t)gs), s += 4 * (n[i] / (size_t)gs);
    }
    return o;
}

/* GGUF seeds: small models (well under the 64 KiB -max_len) and a metadata-only file. */
static void put_gguf_seeds(const char *dir)
{
    static float bias[2 * 64];
    for (int i = 0; i < 2 * 64; i++)
        bias[i] = 0.01f * (float)(i % 7) - 0.03f;
    const struct {
        const char *name, *arch;
        int dim, hidden, heads, kv_heads, head_dim, vocab, type, shared, neox, bias;
    } s[] = {
        {"llama-f32-tiny", "llama", 8, 16, 2, 1, 0, 16, KV_GGML_F32, 1, 0, 0},
        {"llama-f16-lmhead", "llama", 8, 16, 2, 1, 0, 16, KV_GGML_F16, 0, 0, 0},
        {"llama-q8_0", "llama", 32, 64, 4, 2, 0, 16, KV_GGML_Q8_0, 1, 0, 0},
        {"qwen2-bias-headdim", "qwen2", 8, 16, 2, 1, 8, 16, KV_GGML_F32, 1, 1, 1},
    };
    for (size_t i = 0; i < sizeof s / sizeof s[0]; i++) {
        fx_model_t x;
        fx_model_init(&x, s[i].dim, s[i].hidden, 1, s[i].heads, s[i].kv_heads, s[i].vocab, 8, s[i].shared, 11 + i);
        const int hd = s[i].head_dim ? s[i].head_dim : s[i].dim / s[i].heads;
        const size_t D = (size_t)s[i].dim, Q = (size_t)(s[i].heads * hd), KV = (size_t)(s[i].kv_heads * hd);
        /* head_dim != dim / heads: wq, wk, wv, wo of the new shapes (any values will do) */
        float *w = calloc(2 * Q * D + 2 * KV * D, sizeof(float));
        for (size_t k = 0; k < 2 * Q * D + 2 * KV * D; k++)
            w[k] = 0.02f * (float)((k * 7919) % 101) - 1.0f;
        gf_model_t g = {s[i].arch,
                        s[i].dim,
                        s[i].hidden,
                        1,
                        s[i].heads,
                        s[i].kv_heads,
                        s[i].vocab,
                        8,
                        s[i].head_dim,
                        s[i].shared,
                        10000.0f,
                        1e-5f,
                        x.emb,
                        x.rms_att,
                        s[i].head_dim ? w : x.wq,
                        s[i].head_dim ? w + Q * D : x.wk,
                        s[i].head_dim ? w + Q * D + KV * D : x.wv,
                        s[i].head_dim ? w + Q * D + 2 * KV * D : x.wo,
                        x.rms_ffn,
                        x.w1,
                        x.w2,
                        x.w3,
                        x.rms_final,
                        x.wcls,
                        s[i].bias ? bias : NULL,
                        s[i].bias ? bias + 64 : NULL,
                        s[i].bias ? bias + 32 : NULL,
                        s[i].type,
                        s[i].neox,
                        1};
        gf_writer_t wr;
        gf_init(&wr, i == 1 ? 2 : 3);
        gf_add_model(&wr, &g, NULL);
        size_t n;
        unsigned char *b = gf_finish(&wr, &n);
        put(dir, "gguf", s[i].name, b, n);
        free(b);
        gf_free(&wr);
        free(w);
        fx_model_free(&x);
    }
    gf_writer_t wr;
    gf_init(&wr, 3);
    gf_align(&wr, 64);
    gf_kv_scalar(&wr, "u8", KV_GGUF_UINT8, 7, 1);
    gf_kv_scalar(&wr, "i16", KV_GGUF_INT16, 0xfff0, 2);
    gf_kv_scalar(&wr, "u64", KV_GGUF_UINT64, ~0ull, 8);
    gf_kv_scalar(&wr, "f64", KV_GGUF_FLOAT64, 0x3ff0000000000000ull, 8);
    gf_kv_scalar(&wr, "bool", KV_GGUF_BOOL, 1, 1);
    gf_kv_f32(&wr, "f32", 0.5f);
    gf_kv_str(&wr, "str", "x");
    const char *strs[3] = {"a", "", "bc"};
    gf_kv_arr_str(&wr, "tokenizer.ggml.tokens", strs, 3);
    const uint64_t iv[3] = {1, 2, 3};
    gf_kv_arr(&wr, "ints", KV_GGUF_INT32, iv, 3, 4);
    const float q[32] = {1, -2, 3};
    size_t nb;
    unsigned char *qb = gf_encode(q, 32, KV_GGML_Q8_0, &nb, NULL);
    const uint64_t ne[2] = {32, 1};
    gf_tensor(&wr, "q8", KV_GGML_Q8_0, 2, ne, qb, nb);
    free(qb);
    size_t n;
    unsigned char *b = gf_finish(&wr, &n);
    put(dir, "gguf", "metadata", b, n);
    free(b);
    gf_free(&wr);
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: make_seeds DIR\n");
        return 2;
    }
    const char *dir = argv[1];
    mkdir(dir, 0755);
    for (int shared = 0; shared < 2; shared++) {
        fx_model_t x;
        fx_model_init(&x, 8, 16, 1 + shared, 2, 1, 32, 8, shared, 3 + shared);
        size_t n;
        char name[64];
        unsigned char *b = fx_model_v0(&x, &n);
        snprintf(name, sizeof name, "v0-%d.bin", shared);
        put_model(dir, name, b, n);
        free(b);
        b = fx_model_v1(&x, &n);
        snprintf(name, sizeof name, "v1-%d.bin", shared);
        put_model(dir, name, b, n);
        free(b);
        b = fx_model_v2(&x, 8, &n, NULL);
        snprintf(name, sizeof name, "v2-grouped-%d.bin", shared);
        put_model(dir, name, b, n);
        unsigned char *il = interleave(b, n, &x, 8);
        snprintf(name, sizeof name, "v2-interleaved-%d.bin", shared);
        put_model(dir, name, il, n);
        free(il);
        free(b);
        fx_model_free(&x);
    }
    /* Hugging Face inputs: byte 0 = 0 and a safetensors file, byte 0 = 1 and a config.json */
    for (int shared = 0; shared < 2; shared++) {
        fx_model_t x;
        fx_model_init(&x, 8, 16, 2, 2, 1, 32, 8, shared, 5 + shared); /* fuzz_hf.c's shape */
        size_t n;
        unsigned char *st = fx_model_safetensors(&x, &n);
        char *cfg = fx_model_hf_config(&x);
        const size_t cn = strlen(cfg);
        unsigned char *b = malloc(1 + (n > cn ? n : cn));
        char name[64];
        b[0] = 0;
        memcpy(b + 1, st, n);
        snprintf(name, sizeof name, "safetensors-%s", shared ? "tied" : "lm-head");
        put(dir, "hf", name, b, 1 + n);
        b[0] = 1;
        memcpy(b + 1, cfg, cn);
        snprintf(name, sizeof name, "config-%s", shared ? "tied" : "lm-head");
        put(dir, "hf", name, b, 1 + cn);
        free(b);
        free(cfg);
        free(st);
        fx_model_free(&x);
    }
    /* tokenizer inputs: flags, text length, text, tokenizer file */
    size_t tn;
    unsigned char *tok = fx_tokenizer(&tn);
    const char *texts[] = {"abc ab xx", "a\xc3\xa9 \xff\x80 bc", ""};
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        size_t tl = strlen(texts[i]);
        unsigned char *b = malloc(3 + tl + tn);
        b[0] = (unsigned char)(i == 0 ? 1 : i == 1 ? 3 : 0);
        b[1] = (unsigned char)tl, b[2] = 0;
        memcpy(b + 3, texts[i], tl);
        memcpy(b + 3 + tl, tok, tn);
        char name[32];
        snprintf(name, sizeof name, "fixture-%zu", i);
        put(dir, "tokenizer", name, b, 3 + tl + tn);
        free(b);
    }
    free(tok);
    char real[512];
    if (kv_test_shared("models/stories260K/tok512.bin", real, sizeof real)) {
        FILE *f = fopen(real, "rb");
        unsigned char *b = malloc(1 << 16);
        const char *text = "Once upon a time, \xe2\x80\x9cthere\xe2\x80\x9d was";
        size_t tl = strlen(text);
        b[0] = 1, b[1] = (unsigned char)tl, b[2] = 0; /* BOS, any vocabulary size */
        memcpy(b + 3, text, tl);
        size_t n = fread(b + 3 + tl, 1, (1 << 16) - 3 - tl, f);
        fclose(f);
        put(dir, "tokenizer", "tok512", b, 3 + tl + n);
        free(b);
    }
    /* traces */
    for (int f16 = 0; f16 < 2; f16++) {
        kv_trace_t *t = kv_test_trace(1, 2, 1, 4, 8, 6, 2, f16, 9);
        kv_trace_meta_t *m = kv_trace_mem_meta(t);
        m->has_summaries = 1;
        m->pool = 4;
        char p[1024];
        snprintf(p, sizeof p, "%s/trace_file", dir);
        mkdir(p, 0755);
        snprintf(p, sizeof p, "%s/trace_file/small-%d.h5", dir, f16);
        if (kv_test_write_trace(t, p) != KV_OK) {
            fprintf(stderr, "make_seeds: %s\n", kv_last_error());
            return 1;
        }
        kv_trace_close(t);
    }
    const unsigned char progs[][8] = {
        {0}, {0, 6, 0, 3, 5}, {1, 31, 0, 1, 9, 0}, {3, 0, 3, 2, 1, 9}, {6, 0, 0, 3, 0, 1, 2}, {4, 0, 14}, {2, 0, 0, 5},
    };
    for (size_t i = 0; i < sizeof progs / sizeof *progs; i++) {
        char name[32];
        snprintf(name, sizeof name, "prog-%zu", i);
        put(dir, "trace", name, progs[i], sizeof progs[i]);
    }
    put_gguf_seeds(dir);
    return 0;
}
