/*
 * gguf_fixture.h: GGUF files written by the tests themselves (tests/test_gguf.c, the fuzz seeds).
 *
 * A small writer of the format as ggml's docs/gguf.md describes it (little-endian, version 2 or 3,
 * metadata entries, tensor infos, padding to the alignment, tensor data), written from the
 * specification and sharing no code with the reader (traces/capture/gguf.c), so a misreading of
 * the format cannot hide behind a symmetric writer bug; tests/test_gguf.c also reads files written
 * by the gguf Python package. The writer records where it put each field, so tests can corrupt a
 * file at a known byte. gf_add_model writes a Llama-family model under llama.cpp's tensor names,
 * in F32, F16 or Q8_0 (quantised here, from the Q8_0 definition: d = max|x| / 127 rounded to fp16,
 * q = round(x / d)), q/k rows in the interleaved RoPE order (llama) or in Hugging Face's NEOX order
 * (qwen2, as llama.cpp's converter leaves them).
 *
 * Header-only (static inline) so the tests and tests/fuzz/make_seeds.c can both use it.
 */
#ifndef KV_GGUF_FIXTURE_H
#define KV_GGUF_FIXTURE_H

#include "traces/capture/kv_gguf.h"
#include "traces/kv_f16.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    unsigned char *b;
    size_t len, cap;
} gf_buf_t;

typedef struct {
    char name[96];
    uint32_t type;
    int n_dims;
    uint64_t ne[4];
    unsigned char *data; /* copied */
    size_t n_bytes;
    uint64_t offset; /* in the data section (set by gf_finish) */
    /* byte positions in the finished file */
    size_t at_name, at_ndims, at_ne, at_type, at_offset, at_data;
} gf_tensor_t;

typedef struct {
    uint32_t version;
    uint32_t alignment; /* 32 unless gf_align set it */
    gf_buf_t kv;        /* serialised metadata entries */
    int n_kv;
    gf_tensor_t *t;
    int n_t, cap_t;
    /* byte positions in the finished file */
    size_t at_version, at_n_tensors, at_n_kv, at_kv, at_infos, at_data;
} gf_writer_t;

static inline void gf_put(gf_buf_t *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n)
            cap *= 2;
        b->b = (unsigned char *)realloc(b->b, cap);
        b->cap = cap;
    }
    if (n)
        memcpy(b->b + b->len, p, n);
    b->len += n;
}

static inline void gf_le(gf_buf_t *b, uint64_t v, int n)
{
    unsigned char x[8];
    for (int i = 0; i < n; i++)
        x[i] = (unsigned char)(v >> (8 * i));
    gf_put(b, x, (size_t)n);
}

static inline void gf_str(gf_buf_t *b, const char *s)
{
    gf_le(b, strlen(s), 8);
    gf_put(b, s, strlen(s));
}

static inline void gf_init(gf_writer_t *w, uint32_t version)
{
    memset(w, 0, sizeof *w);
    w->version = version;
    w->alignment = 32;
}

static inline void gf_free(gf_writer_t *w)
{
    for (int i = 0; i < w->n_t; i++)
        free(w->t[i].data);
    free(w->t);
    free(w->kv.b);
    memset(w, 0, sizeof *w);
}

/* A scalar entry: value type vt (KV_GGUF_*), its n little-endian bytes from v. */
static inline void gf_kv_scalar(gf_writer_t *w, const char *key, int vt, uint64_t v, int n)
{
    gf_str(&w->kv, key);
    gf_le(&w->kv, (uint64_t)vt, 4);
    gf_le(&w->kv, v, n);
    w->n_kv++;
}

static inline void gf_kv_u32(gf_writer_t *w, const char *key, uint32_t v)
{
    gf_kv_scalar(w, key, KV_GGUF_UINT32, v, 4);
}

static inline void gf_kv_f32(gf_writer_t *w, const char *key, float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    gf_kv_scalar(w, key, KV_GGUF_FLOAT32, u, 4);
}

static inline void gf_kv_str(gf_writer_t *w, const char *key, const char *s)
{
    gf_str(&w->kv, key);
    gf_le(&w->kv, KV_GGUF_STRING, 4);
    gf_str(&w->kv, s);
    w->n_kv++;
}

static inline void gf_kv_arr_str(gf_writer_t *w, const char *key, const char *const *s, uint64_t n)
{
    gf_str(&w->kv, key);
    gf_le(&w->kv, KV_GGUF_ARRAY, 4);
    gf_le(&w->kv, KV_GGUF_STRING, 4);
    gf_le(&w->kv, n, 8);
    for (uint64_t i = 0; i < n; i++)
        gf_str(&w->kv, s[i]);
    w->n_kv++;
}

/* An array of n scalars of type vt, each `size` bytes, from the little-endian values v[i]. */
static inline void gf_kv_arr(gf_writer_t *w, const char *key, int vt, const uint64_t *v, uint64_t n, int size)
{
    gf_str(&w->kv, key);
    gf_le(&w->kv, KV_GGUF_ARRAY, 4);
    gf_le(&w->kv, (uint64_t)vt, 4);
    gf_le(&w->kv, n, 8);
    for (uint64_t i = 0; i < n; i++)
        gf_le(&w->kv, v[i], size);
    w->n_kv++;
}

static inline void gf_align(gf_writer_t *w, uint32_t a)
{
    w->alignment = a;
    gf_kv_u32(w, "general.alignment", a);
}

/* A tensor of n_dims dimensions (ne[0] innermost) and raw bytes (copied). */
static inline void gf_tensor(gf_writer_t *w, const char *name, uint32_t type, int n_dims, const uint64_t *ne,
                             const void *data, size_t n_bytes)
{
    if (w->n_t == w->cap_t) {
        w->cap_t = w->cap_t ? 2 * w->cap_t : 64;
        w->t = (gf_tensor_t *)realloc(w->t, (size_t)w->cap_t * sizeof *w->t);
    }
    gf_tensor_t *t = &w->t[w->n_t++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s", name);
    t->type = type;
    t->n_dims = n_dims;
    for (int i = 0; i < 4; i++)
        t->ne[i] = i < n_dims ? ne[i] : 1;
    t->data = (unsigned char *)malloc(n_bytes ? n_bytes : 1);
    if (n_bytes)
        memcpy(t->data, data, n_bytes);
    t->n_bytes = n_bytes;
}

/* x[0..n) as ggml type `type` (F32, F16 or Q8_0; n a multiple of 32 for Q8_0) into a malloc'd
 * buffer of *n_bytes. When deq is not NULL it receives the values the file then holds. */
static inline unsigned char *gf_encode(const float *x, uint64_t n, int type, size_t *n_bytes, float *deq)
{
    unsigned char *b;
    if (type == KV_GGML_F32) {
        b = (unsigned char *)malloc(n * 4 + 1);
        memcpy(b, x, n * 4);
        if (deq)
            memcpy(deq, x, n * 4);
        *n_bytes = n * 4;
    } else if (type == KV_GGML_F16) {
        b = (unsigned char *)malloc(n * 2 + 1);
        for (uint64_t i = 0; i < n; i++) {
            uint16_t h = kv_f32_to_f16(x[i]);
            b[2 * i] = (unsigned char)h, b[2 * i + 1] = (unsigned char)(h >> 8);
            if (deq)
                deq[i] = kv_f16_to_f32(h);
        }
        *n_bytes = n * 2;
    } else { /* Q8_0 */
        const uint64_t nb = n / 32;
        b = (unsigned char *)malloc(nb * 34 + 1);
        for (uint64_t k = 0; k < nb; k++) {
            float amax = 0;
            for (int j = 0; j < 32; j++)
                amax = fmaxf(amax, fabsf(x[32 * k + j]));
            const uint16_t dh = kv_f32_to_f16(amax / 127.0f);
            const float d = kv_f16_to_f32(dh);
            unsigned char *blk = b + 34 * k;
            blk[0] = (unsigned char)dh, blk[1] = (unsigned char)(dh >> 8);
            for (int j = 0; j < 32; j++) {
                float q = d > 0 ? roundf(x[32 * k + j] / d) : 0.0f;
                q = fminf(127.0f, fmaxf(-127.0f, q));
                const int8_t qi = (int8_t)q;
                blk[2 + j] = (unsigned char)qi;
                if (deq)
                    deq[32 * k + j] = (float)qi * d; /* an int8 has no -0 */
            }
        }
        *n_bytes = nb * 34;
    }
    return b;
}

/* A rows x cols fp32 matrix (cols 0: a vector of rows values) as a tensor of ggml type `type`;
 * when perm_d > 0 the rows are written in NEOX order for heads of perm_d rows: file row r of a
 * head holds row 2*(r mod d/2) + r div (d/2) of x (the interleaved order's pair (i, i+1) becomes
 * rows i and i + d/2). deq (optional) receives the values as the file holds them, in x's order. */
static inline void gf_tensor_f(gf_writer_t *w, const char *name, const float *x, uint64_t rows, uint64_t cols, int type,
                               int perm_d, float *deq)
{
    const uint64_t nc = cols ? cols : 1, n = rows * nc;
    float *y = (float *)malloc(n * sizeof(float) + 4);
    for (uint64_t r = 0; r < rows; r++) {
        uint64_t from = r;
        if (perm_d > 1) { /* head_dim is even, at least 2 */
            const uint64_t d = (uint64_t)perm_d, h = r / d, k = r % d;
            from = h * d + 2 * (k % (d / 2)) + k / (d / 2);
        }
        memcpy(y + r * nc, x + from * nc, nc * sizeof(float));
    }
    float *yd = deq ? (float *)malloc(n * sizeof(float) + 4) : NULL;
    size_t nb;
    unsigned char *b = gf_encode(y, n, type, &nb, yd);
    const uint64_t ne[2] = {cols ? cols : rows, cols ? rows : 1};
    gf_tensor(w, name, (uint32_t)type, cols ? 2 : 1, ne, b, nb);
    if (deq) {
        for (uint64_t r = 0; r < rows; r++) { /* back to x's order */
            uint64_t from = r;
            if (perm_d > 1) { /* head_dim is even, at least 2 */
                const uint64_t d = (uint64_t)perm_d, h = r / d, k = r % d;
                from = h * d + 2 * (k % (d / 2)) + k / (d / 2);
            }
            memcpy(deq + from * nc, yd + r * nc, nc * sizeof(float));
        }
        free(yd);
    }
    free(b);
    free(y);
}

/* The file: header, metadata, tensor infos, padding, data (malloc'd, *len bytes). Fills the
 * recorded byte positions. */
static inline unsigned char *gf_finish(gf_writer_t *w, size_t *len)
{
    gf_buf_t f = {NULL, 0, 0};
    gf_put(&f, "GGUF", 4);
    w->at_version = f.len;
    gf_le(&f, w->version, 4);
    w->at_n_tensors = f.len;
    gf_le(&f, (uint64_t)w->n_t, 8);
    w->at_n_kv = f.len;
    gf_le(&f, (uint64_t)w->n_kv, 8);
    w->at_kv = f.len;
    gf_put(&f, w->kv.b, w->kv.len);
    w->at_infos = f.len;
    uint64_t off = 0;
    const uint64_t a = w->alignment;
    for (int i = 0; i < w->n_t; i++) {
        gf_tensor_t *t = &w->t[i];
        t->offset = off;
        off += (t->n_bytes + a - 1) / a * a;
        t->at_name = f.len;
        gf_str(&f, t->name);
        t->at_ndims = f.len;
        gf_le(&f, (uint64_t)t->n_dims, 4);
        t->at_ne = f.len;
        for (int d = 0; d < t->n_dims; d++)
            gf_le(&f, t->ne[d], 8);
        t->at_type = f.len;
        gf_le(&f, t->type, 4);
        t->at_offset = f.len;
        gf_le(&f, t->offset, 8);
    }
    static const unsigned char zero[4096] = {0};
    gf_put(&f, zero, (size_t)((a - f.len % a) % a));
    w->at_data = f.len;
    for (int i = 0; i < w->n_t; i++) {
        gf_tensor_t *t = &w->t[i];
        t->at_data = f.len;
        gf_put(&f, t->data, t->n_bytes);
        gf_put(&f, zero, (size_t)((a - t->n_bytes % a) % a));
    }
    *len = f.len;
    return f.b;
}

/* Patch n little-endian bytes of v at byte `at` of a finished file. */
static inline void gf_patch(unsigned char *file, size_t at, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        file[at + i] = (unsigned char)(v >> (8 * i));
}

/* ---- a Llama-family model ---- */

typedef struct {
    const char *arch; /* "llama" or "qwen2" */
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len;
    int head_dim; /* 0: dim / heads (no key_length written) */
    int tied;     /* no output.weight */
    float rope_theta, eps;
    /* row-major W[out][in], layers back to back, q/k rows in the interleaved RoPE order */
    const float *emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls;
    const float *bq, *bk, *bv; /* (layers, q_dim or kv_dim) or NULL */
    int type;                  /* ggml type of the matrices (F32, F16, Q8_0); vectors are F32 */
    int neox;                  /* 1: q/k rows and biases in NEOX order (qwen2) */
    int with_tokens;           /* 1: tokenizer.ggml.tokens of vocab entries */
} gf_model_t;

/* Metadata and tensors of m (before gf_finish; more entries can be added around it). When deq is
 * not NULL it receives, in the tensors' order of kv_model.h (emb, rms_att, wq, wk, wv, wo, rms_ffn,
 * w1, w2, w3, rms_final, [wcls], [bq, bk, bv]), the values the file holds, in interleaved order. */
static inline void gf_add_model(gf_writer_t *w, const gf_model_t *m, float *deq)
{
    char k[128];
    const char *a = m->arch;
    const int hd = m->head_dim ? m->head_dim : m->dim / m->heads;
    const uint64_t D = (uint64_t)m->dim, H = (uint64_t)m->hidden, V = (uint64_t)m->vocab;
    const uint64_t Q = (uint64_t)m->heads * (uint64_t)hd, KV = (uint64_t)m->kv_heads * (uint64_t)hd;
    gf_kv_str(w, "general.architecture", a);
#define GF_KEY(s) (snprintf(k, sizeof k, "%s.%s", a, s), k)
    gf_kv_u32(w, GF_KEY("block_count"), (uint32_t)m->layers);
    gf_kv_u32(w, GF_KEY("context_length"), (uint32_t)m->seq_len);
    gf_kv_u32(w, GF_KEY("embedding_length"), (uint32_t)m->dim);
    gf_kv_u32(w, GF_KEY("feed_forward_length"), (uint32_t)m->hidden);
    gf_kv_u32(w, GF_KEY("attention.head_count"), (uint32_t)m->heads);
    gf_kv_u32(w, GF_KEY("attention.head_count_kv"), (uint32_t)m->kv_heads);
    gf_kv_f32(w, GF_KEY("rope.freq_base"), m->rope_theta);
    gf_kv_f32(w, GF_KEY("attention.layer_norm_rms_epsilon"), m->eps);
    gf_kv_u32(w, GF_KEY("rope.dimension_count"), (uint32_t)hd);
    if (m->head_dim) {
        gf_kv_u32(w, GF_KEY("attention.key_length"), (uint32_t)hd);
        gf_kv_u32(w, GF_KEY("attention.value_length"), (uint32_t)hd);
    }
#undef GF_KEY
    if (m->with_tokens) {
        char(*tok)[16] = (char(*)[16])malloc(V * 16);
        const char **p = (const char **)malloc(V * sizeof *p);
        for (uint64_t i = 0; i < V; i++) {
            snprintf(tok[i], 16, "t%llu", (unsigned long long)i);
            p[i] = tok[i];
        }
        gf_kv_str(w, "tokenizer.ggml.model", "llama");
        gf_kv_arr_str(w, "tokenizer.ggml.tokens", p, V);
        free(p);
        free(tok);
    }
    float *o = deq;
#define GF_T(name, x, rows, cols, type, perm)                                                                          \
    do {                                                                                                               \
        gf_tensor_f(w, name, x, rows, cols, type, perm, o);                                                            \
        if (o)                                                                                                         \
            o += (rows) * ((cols) ? (cols) : 1);                                                                       \
    } while (0)
    const int pm = m->neox ? hd : 0;
    /* the loader's layout is tensor-major (all layers of wq, then of wk, ...): write the file's
     * per-layer tensors in that order too, so deq follows kv_model.h */
    GF_T("token_embd.weight", m->emb, V, D, m->type, 0);
    const struct {
        const char *suffix;
        const float *x;
        uint64_t rows, cols;
        int matrix, perm;
    } lt[12] = {
        {"attn_norm.weight", m->rms_att, D, 0, 0, 0}, {"attn_q.weight", m->wq, Q, D, 1, pm},
        {"attn_k.weight", m->wk, KV, D, 1, pm},       {"attn_v.weight", m->wv, KV, D, 1, 0},
        {"attn_output.weight", m->wo, D, Q, 1, 0},    {"ffn_norm.weight", m->rms_ffn, D, 0, 0, 0},
        {"ffn_gate.weight", m->w1, H, D, 1, 0},       {"ffn_down.weight", m->w2, D, H, 1, 0},
        {"ffn_up.weight", m->w3, H, D, 1, 0},         {"attn_q.bias", m->bq, Q, 0, 0, pm},
        {"attn_k.bias", m->bk, KV, 0, 0, pm},         {"attn_v.bias", m->bv, KV, 0, 0, 0},
    };
    for (int i = 0; i < 12; i++) {
        if (!lt[i].x)
            continue;
        const uint64_t per = lt[i].rows * (lt[i].cols ? lt[i].cols : 1);
        for (int l = 0; l < m->layers; l++) {
            char name[96];
            snprintf(name, sizeof name, "blk.%d.%s", l, lt[i].suffix);
            GF_T(name, lt[i].x + (uint64_t)l * per, lt[i].rows, lt[i].cols, lt[i].matrix ? m->type : KV_GGML_F32,
                 lt[i].perm);
        }
        if (i == 8) { /* rms_final and wcls come between the weights and the biases in kv_model.h */
            GF_T("output_norm.weight", m->rms_final, D, 0, KV_GGML_F32, 0);
            if (!m->tied)
                GF_T("output.weight", m->wcls, V, D, m->type, 0);
        }
    }
#undef GF_T
}

#endif
