/* test_capture_fixtures.c: see capture_fixtures.h (named test_* so the Makefile compiles it into the test runner; it
 * holds no suite). */
#include "tests/capture_fixtures.h"

#include "sim/common/kv_rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static float *randn(size_t n, kv_rng_t *r, float mean, float sd)
{
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        x[i] = mean + sd * (float)kv_rng_normal(r);
    return x;
}

void fx_model_init(fx_model_t *m, int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq_len,
                   int shared, uint64_t seed)
{
    memset(m, 0, sizeof *m);
    m->dim = dim, m->hidden = hidden, m->layers = layers, m->heads = heads, m->kv_heads = kv_heads;
    m->vocab = vocab, m->seq_len = seq_len, m->shared = shared;
    kv_rng_t r;
    kv_rng_seed(&r, seed);
    size_t L = (size_t)layers, D = (size_t)dim, H = (size_t)hidden, KV = (size_t)(dim / heads * kv_heads);
    float sd = 1.0f / sqrtf((float)dim);
    m->emb = randn((size_t)vocab * D, &r, 0, 1);
    m->rms_att = randn(L * D, &r, 1, 0.1f);
    m->wq = randn(L * D * D, &r, 0, sd);
    m->wk = randn(L * KV * D, &r, 0, sd);
    m->wv = randn(L * KV * D, &r, 0, sd);
    m->wo = randn(L * D * D, &r, 0, sd);
    m->rms_ffn = randn(L * D, &r, 1, 0.1f);
    m->w1 = randn(L * H * D, &r, 0, sd);
    m->w2 = randn(L * D * H, &r, 0, 1.0f / sqrtf((float)hidden));
    m->w3 = randn(L * H * D, &r, 0, sd);
    m->rms_final = randn(D, &r, 1, 0.1f);
    m->wcls = randn((size_t)vocab * D, &r, 0, sd);
}

void fx_model_free(fx_model_t *m)
{
    float *p[] = {m->emb,     m->rms_att, m->wq, m->wk, m->wv,        m->wo,
                  m->rms_ffn, m->w1,      m->w2, m->w3, m->rms_final, m->wcls};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
        free(p[i]);
    memset(m, 0, sizeof *m);
}

typedef struct {
    unsigned char *b;
    size_t n, cap;
} buf_t;

static void put(buf_t *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 1024;
        b->b = realloc(b->b, b->cap);
    }
    memcpy(b->b + b->n, src, n);
    b->n += n;
}
static void put_i32(buf_t *b, int32_t v)
{
    put(b, &v, 4);
}
static void put_f(buf_t *b, const float *x, size_t n)
{
    put(b, x, n * sizeof(float));
}
static void pad_to(buf_t *b, size_t n)
{
    while (b->n < n) {
        unsigned char z = 0;
        put(b, &z, 1);
    }
}

void fx_put_i32(unsigned char *buf, size_t off, int32_t v)
{
    memcpy(buf + off, &v, 4);
}

/* sizes of each tensor (all layers) */
static void sizes(const fx_model_t *m, size_t s[12])
{
    size_t L = (size_t)m->layers, D = (size_t)m->dim, H = (size_t)m->hidden;
    size_t KV = (size_t)(m->dim / m->heads * m->kv_heads), V = (size_t)m->vocab;
    /* emb rms_att wq wk wv wo rms_ffn w1 w2 w3 rms_final wcls */
    size_t t[12] = {V * D, L * D,     L * D * D, L * KV * D, L * KV * D, L * D * D,
                    L * D, L * H * D, L * D * H, L * H * D,  D,          V * D};
    memcpy(s, t, sizeof t);
}

static void header7(buf_t *b, const fx_model_t *m, int vocab)
{
    int32_t h[7] = {m->dim, m->hidden, m->layers, m->heads, m->kv_heads, vocab, m->seq_len};
    put(b, h, sizeof h);
}

unsigned char *fx_model_v0(const fx_model_t *m, size_t *len)
{
    buf_t b = {0};
    size_t s[12];
    sizes(m, s);
    header7(&b, m, m->shared ? m->vocab : -m->vocab);
    const float *t[11] = {m->emb,     m->rms_att, m->wq, m->wk, m->wv,       m->wo,
                          m->rms_ffn, m->w1,      m->w2, m->w3, m->rms_final};
    for (int i = 0; i < 11; i++)
        put_f(&b, t[i], s[i]);
    /* freq_cis_real / imag: junk the loader must skip */
    size_t nf = (size_t)m->seq_len * (size_t)(m->dim / m->heads);
    for (size_t i = 0; i < nf; i++) {
        float junk = 1e30f;
        put_f(&b, &junk, 1);
    }
    if (!m->shared)
        put_f(&b, m->wcls, s[11]);
    *len = b.n;
    return b.b;
}

static void vheader(buf_t *b, const fx_model_t *m, int version)
{
    put_i32(b, 0x616b3432);
    put_i32(b, version);
    header7(b, m, m->vocab);
    unsigned char sh = (unsigned char)m->shared;
    put(b, &sh, 1);
}

unsigned char *fx_model_v1(const fx_model_t *m, size_t *len)
{
    buf_t b = {0};
    size_t s[12];
    sizes(m, s);
    vheader(&b, m, 1);
    pad_to(&b, 256);
    /* rms_att rms_ffn rms_final emb wq wk wv wo w1 w2 w3 [wcls] */
    const float *t[12] = {m->rms_att, m->rms_ffn, m->rms_final, m->emb, m->wq, m->wk,
                          m->wv,      m->wo,      m->w1,        m->w2,  m->w3, m->wcls};
    const size_t n[12] = {s[1], s[6], s[10], s[0], s[2], s[3], s[4], s[5], s[7], s[8], s[9], s[11]};
    for (int i = 0; i < (m->shared ? 11 : 12); i++)
        put_f(&b, t[i], n[i]);
    *len = b.n;
    return b.b;
}

typedef struct {
    char name[64];
    const float *x;
    int rows, cols; /* cols 0: a vector */
} st_tensor_t;

static void st_add(st_tensor_t *t, int *k, const char *name, const float *x, int rows, int cols)
{
    snprintf(t[*k].name, sizeof t[*k].name, "%s", name);
    t[*k].x = x;
    t[*k].rows = rows;
    t[*k].cols = cols;
    (*k)++;
}

unsigned char *fx_model_safetensors(const fx_model_t *m, size_t *len)
{
    const int L = m->layers, D = m->dim, H = m->hidden, KV = m->dim / m->heads * m->kv_heads;
    if (L > 64)
        return NULL;
    st_tensor_t t[3 + 9 * 64];
    int k = 0;
    st_add(t, &k, "model.embed_tokens.weight", m->emb, m->vocab, D);
    st_add(t, &k, "model.norm.weight", m->rms_final, D, 0);
    if (!m->shared)
        st_add(t, &k, "lm_head.weight", m->wcls, m->vocab, D);
    static const char *names[9] = {"input_layernorm",  "self_attn.q_proj", "self_attn.k_proj",
                                   "self_attn.v_proj", "self_attn.o_proj", "post_attention_layernorm",
                                   "mlp.gate_proj",    "mlp.down_proj",    "mlp.up_proj"};
    for (int l = 0; l < L; l++) {
        const size_t dd = (size_t)D * D, kd = (size_t)KV * D, hd = (size_t)H * D;
        const float *x[9] = {m->rms_att + (size_t)l * D, m->wq + l * dd, m->wk + l * kd, m->wv + l * kd, m->wo + l * dd,
                             m->rms_ffn + (size_t)l * D, m->w1 + l * hd, m->w2 + l * hd, m->w3 + l * hd};
        const int rows[9] = {D, D, KV, KV, D, D, H, D, H}, cols[9] = {0, D, D, D, D, 0, D, H, D};
        for (int i = 0; i < 9; i++) {
            char nm[96];
            snprintf(nm, sizeof nm, "model.layers.%d.%s.weight", l, names[i]);
            st_add(t, &k, nm, x[i], rows[i], cols[i]);
        }
    }
    const int nt = k;
    /* header: {"name":{"dtype":"F32","shape":[r(,c)],"data_offsets":[b,e]},...} */
    buf_t h = {0};
    size_t off = 0;
    char item[256];
    put(&h, "{", 1);
    for (int i = 0; i < nt; i++) {
        const size_t n = (size_t)t[i].rows * (size_t)(t[i].cols ? t[i].cols : 1);
        int w = t[i].cols ? snprintf(item, sizeof item,
                                     "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%d,%d],\"data_offsets\":[%zu,%zu]}",
                                     i ? "," : "", t[i].name, t[i].rows, t[i].cols, off, off + 4 * n)
                          : snprintf(item, sizeof item,
                                     "%s\"%s\":{\"dtype\":\"F32\",\"shape\":[%d],\"data_offsets\":[%zu,%zu]}",
                                     i ? "," : "", t[i].name, t[i].rows, off, off + 4 * n);
        put(&h, item, (size_t)w);
        off += 4 * n;
    }
    put(&h, "}", 1);
    while (h.n % 8)
        put(&h, " ", 1);
    buf_t b = {0};
    const uint64_t hl = h.n;
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)(hl >> (8 * i));
    put(&b, le, 8);
    put(&b, h.b, h.n);
    free(h.b);
    for (int i = 0; i < nt; i++)
        put_f(&b, t[i].x, (size_t)t[i].rows * (size_t)(t[i].cols ? t[i].cols : 1));
    *len = b.n;
    return b.b;
}

char *fx_model_hf_config(const fx_model_t *m)
{
    char *c = malloc(1024);
    snprintf(c, 1024,
             "{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": %d, \"intermediate_size\": %d, "
             "\"num_hidden_layers\": %d, \"num_attention_heads\": %d, \"num_key_value_heads\": %d, "
             "\"vocab_size\": %d, \"max_position_embeddings\": %d, \"rms_norm_eps\": 1e-05, "
             "\"rope_theta\": 10000.0, \"hidden_act\": \"silu\", \"tie_word_embeddings\": %s}\n",
             m->dim, m->hidden, m->layers, m->heads, m->kv_heads, m->vocab, m->seq_len, m->shared ? "true" : "false");
    return c;
}

static float *copyf(const float *x, size_t n)
{
    float *y = malloc(n * sizeof(float));
    memcpy(y, x, n * sizeof(float));
    return y;
}

unsigned char *fx_model_v2(const fx_model_t *m, int group, size_t *len, fx_model_t *deq)
{
    buf_t b = {0};
    size_t s[12];
    sizes(m, s);
    vheader(&b, m, 2);
    put_i32(&b, group);
    pad_to(&b, 256);
    put_f(&b, m->rms_att, s[1]);
    put_f(&b, m->rms_ffn, s[6]);
    put_f(&b, m->rms_final, s[10]);
    /* quantised: emb wq wk wv wo w1 w2 w3 [wcls] */
    const float *t[9] = {m->emb, m->wq, m->wk, m->wv, m->wo, m->w1, m->w2, m->w3, m->wcls};
    const size_t n[9] = {s[0], s[2], s[3], s[4], s[5], s[7], s[8], s[9], s[11]};
    const int nt = m->shared ? 8 : 9;
    float *deqs[9] = {0};
    buf_t scales = {0};
    for (int k = 0; k < nt; k++) {
        deqs[k] = malloc(n[k] * sizeof(float));
        for (size_t g = 0; g < n[k] / (size_t)group; g++) {
            float mx = 0;
            for (int i = 0; i < group; i++)
                mx = fmaxf(mx, fabsf(t[k][g * group + i]));
            float sc = mx / 127.0f;
            for (int i = 0; i < group; i++) {
                size_t j = g * group + i;
                int8_t q = (int8_t)(sc > 0 ? lrintf(t[k][j] / sc) : 0);
                put(&b, &q, 1);
                deqs[k][j] = (float)q * sc;
            }
            put_f(&scales, &sc, 1);
        }
    }
    put(&b, scales.b, scales.n);
    free(scales.b);
    if (deq) {
        *deq = *m;
        deq->rms_att = copyf(m->rms_att, s[1]);
        deq->rms_ffn = copyf(m->rms_ffn, s[6]);
        deq->rms_final = copyf(m->rms_final, s[10]);
        deq->emb = deqs[0], deq->wq = deqs[1], deq->wk = deqs[2], deq->wv = deqs[3], deq->wo = deqs[4];
        deq->w1 = deqs[5], deq->w2 = deqs[6], deq->w3 = deqs[7];
        deq->wcls = m->shared ? copyf(deqs[0], s[0]) : deqs[8];
    } else {
        for (int k = 0; k < nt; k++)
            free(deqs[k]);
    }
    *len = b.n;
    return b.b;
}

unsigned char *fx_tokenizer(size_t *len)
{
    static const struct {
        const char *s;
        float score;
    } extra[FX_EXTRA] = {
        {" ", -10},  {"a", -10},  {"b", -10},        {"c", -10}, {"ab", -3}, {"bc", -2}, {" a", -5},
        {"abc", -1}, {" ab", -4}, {"\xc3\xa9", -10}, {"aa", -6}, {"x", -10}, {"xx", -7},
    };
    buf_t b = {0};
    put_i32(&b, 8);
    const char *special[3] = {"<unk>", "\n<s>\n", "\n</s>\n"};
    for (int i = 0; i < 3; i++) {
        float z = 0;
        put_f(&b, &z, 1);
        put_i32(&b, (int32_t)strlen(special[i]));
        put(&b, special[i], strlen(special[i]));
    }
    for (int i = 0; i < 256; i++) {
        char p[8];
        snprintf(p, sizeof p, "<0x%02X>", i);
        float z = 0;
        put_f(&b, &z, 1);
        put_i32(&b, 6);
        put(&b, p, 6);
    }
    for (int i = 0; i < FX_EXTRA; i++) {
        put_f(&b, &extra[i].score, 1);
        put_i32(&b, (int32_t)strlen(extra[i].s));
        put(&b, extra[i].s, strlen(extra[i].s));
    }
    *len = b.n;
    return b.b;
}

int fx_write(const char *path, const void *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t w = len ? fwrite(buf, 1, len, f) : 0;
    return (fclose(f) == 0 && w == len) ? 0 : -1;
}
