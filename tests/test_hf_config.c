/*
 * test_hf_config.c: how the Hugging Face loader reads config.json, and the forward pass's RoPE
 * variants, q/k/v biases and explicit head_dim (C only: no Python, no real model).
 *
 * The test writes its own checkpoints: random weights in kvsim's layout (q/k rows interleaved),
 * written to model.safetensors under transformers' tensor names with q_proj/k_proj rows (and their
 * biases) put in Hugging Face's rotate_half order per head, and config.json texts built here.
 * Checked:
 *  - config.json in transformers 5's style (rope_parameters, no top-level rope_theta: the file that
 *    kvsim used to misread as theta 10000) and in transformers 4's style (rope_theta + rope_scaling,
 *    with "type" or "rope_type") give the same trace, every stored tensor bit for bit; and a
 *    different theta gives a different one;
 *  - an unknown key is reported by a warning naming it, once, and the load goes on; a config.json of
 *    known keys warns about nothing;
 *  - every key whose value would change the computation in a way kvsim does not implement is refused
 *    with a message naming it, and the neutral values are accepted;
 *  - the config.json files of published Llama 3.1/3.2, SmolLM2, TinyLlama, Qwen2.5, Mistral and
 *    Mistral-Nemo checkpoints are read without a warning;
 *  - llama3 frequencies equal values worked out independently (40-digit decimals, below), and the
 *    per-pair factor RoPE (GGUF's rope_freqs) rotates by theta^(-2i/d) / factor_i;
 *  - the forward pass with q/k/v biases, head_dim != dim / n_heads and llama3 RoPE equals a plain
 *    double-precision reference written here, and the biases are un-permuted like the weights;
 *  - README.md's Models section lists every key of the loader's table under the treatment the table
 *    gives it.
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "tests/capture_fixtures.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_model_internal.h"
#include "traces/kv_trace.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- a small model and its files */

typedef struct {
    int dim, hidden, layers, heads, kv_heads, head_dim, vocab, seq_len;
    int bias, tied;
    /* kvsim's layout: row-major W[out][in], q/k rows interleaved per head */
    float *emb, *rms_att, *wq, *wk, *wv, *wo, *rms_ffn, *w1, *w2, *w3, *rms_final, *wcls, *bq, *bk, *bv;
    float *buf;
} hm_t;

static void hm_init(hm_t *m, int dim, int hidden, int layers, int heads, int kv_heads, int head_dim, int bias, int tied,
                    unsigned long long seed)
{
    memset(m, 0, sizeof *m);
    m->dim = dim, m->hidden = hidden, m->layers = layers, m->heads = heads, m->kv_heads = kv_heads;
    m->head_dim = head_dim, m->vocab = 259 + FX_EXTRA, m->seq_len = 128, m->bias = bias, m->tied = tied;
    const size_t D = dim, H = hidden, L = layers, Q = (size_t)heads * head_dim, KV = (size_t)kv_heads * head_dim;
    const size_t V = (size_t)m->vocab; /* the fixture tokenizer's */
    size_t n[15] = {V * D,     L * D,     L * Q * D, L * KV * D, L * KV * D, L * D * Q, L * D, L * H * D,
                    L * D * H, L * H * D, D,         V * D,      L * Q,      L * KV,    L * KV};
    size_t total = 0;
    for (int i = 0; i < 15; i++)
        total += n[i];
    m->buf = malloc(total * sizeof(float));
    unsigned long long s = seed;
    for (size_t i = 0; i < total; i++) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        m->buf[i] = (float)((double)(s >> 40) / (double)(1ULL << 24) - 0.5) * 0.8f;
    }
    float **dst[15] = {&m->emb, &m->rms_att, &m->wq,        &m->wk,   &m->wv, &m->wo, &m->rms_ffn, &m->w1,
                       &m->w2,  &m->w3,      &m->rms_final, &m->wcls, &m->bq, &m->bk, &m->bv};
    float *p = m->buf;
    for (int i = 0; i < 15; i++) {
        *dst[i] = p;
        p += n[i];
    }
    for (size_t i = 0; i < L * D; i++) /* norm weights near 1 */
        m->rms_att[i] += 1.0f, m->rms_ffn[i] += 1.0f;
    for (size_t i = 0; i < D; i++)
        m->rms_final[i] += 1.0f;
}

/* Hugging Face row r of a head of d rows holds kvsim's row 2 (r mod d/2) + r div (d/2) (the
 * conversion script's reordering, written from its definition; test_hf_model.c checks it against
 * rotate_half). */
static size_t hf_src(size_t r, size_t d)
{
    size_t h = r / d, k = r % d;
    return h * d + 2 * (k % (d / 2)) + k / (d / 2);
}

typedef struct {
    char name[96];
    size_t rows, cols; /* cols 0: a vector */
    const float *x;
    size_t perm; /* head_dim of the RoPE row permutation, 0: none */
} wt_t;

static void put_bytes(FILE *f, const void *p, size_t n)
{
    ck_assert_int_eq(fwrite(p, 1, n, f), n);
}

/* model.safetensors (F32) of m in dir, plus `extra_tensor` (a 1-D tensor of 4 floats) when not NULL. */
static void write_weights(const hm_t *m, const char *dir, const char *extra_tensor)
{
    const size_t D = m->dim, H = m->hidden, Q = (size_t)m->heads * m->head_dim, KV = (size_t)m->kv_heads * m->head_dim;
    const size_t hd = m->head_dim;
    wt_t *t = calloc((size_t)m->layers * 12 + 4, sizeof *t);
    int k = 0;
    t[k++] = (wt_t){"model.embed_tokens.weight", (size_t)m->vocab, D, m->emb, 0};
    for (int l = 0; l < m->layers; l++) {
        const wt_t w[12] = {
            {"input_layernorm.weight", D, 0, m->rms_att + l * D, 0},
            {"self_attn.q_proj.weight", Q, D, m->wq + l * Q * D, hd},
            {"self_attn.k_proj.weight", KV, D, m->wk + l * KV * D, hd},
            {"self_attn.v_proj.weight", KV, D, m->wv + l * KV * D, 0},
            {"self_attn.o_proj.weight", D, Q, m->wo + l * D * Q, 0},
            {"post_attention_layernorm.weight", D, 0, m->rms_ffn + l * D, 0},
            {"mlp.gate_proj.weight", H, D, m->w1 + l * H * D, 0},
            {"mlp.down_proj.weight", D, H, m->w2 + l * D * H, 0},
            {"mlp.up_proj.weight", H, D, m->w3 + l * H * D, 0},
            {"self_attn.q_proj.bias", Q, 0, m->bq + l * Q, hd},
            {"self_attn.k_proj.bias", KV, 0, m->bk + l * KV, hd},
            {"self_attn.v_proj.bias", KV, 0, m->bv + l * KV, 0},
        };
        for (int i = 0; i < (m->bias ? 12 : 9); i++) {
            t[k] = w[i];
            snprintf(t[k].name, sizeof t[k].name, "model.layers.%d.%s", l, w[i].name);
            k++;
        }
    }
    t[k++] = (wt_t){"model.norm.weight", D, 0, m->rms_final, 0};
    if (!m->tied)
        t[k++] = (wt_t){"lm_head.weight", (size_t)m->vocab, D, m->wcls, 0};
    if (extra_tensor) {
        t[k] = (wt_t){"", 4, 0, m->rms_final, 0};
        snprintf(t[k++].name, sizeof t[0].name, "%s", extra_tensor);
    }
    size_t cap = 256 + (size_t)k * 200, hl = 0, off = 0;
    char *hdr = malloc(cap);
    hl += (size_t)snprintf(hdr, cap, "{\"__metadata__\": {\"format\": \"pt\"}");
    for (int i = 0; i < k; i++) {
        const size_t n = t[i].rows * (t[i].cols ? t[i].cols : 1);
        if (t[i].cols)
            hl +=
                (size_t)snprintf(hdr + hl, cap - hl,
                                 ", \"%s\": {\"dtype\": \"F32\", \"shape\": [%zu, %zu], \"data_offsets\": [%zu, %zu]}",
                                 t[i].name, t[i].rows, t[i].cols, off, off + 4 * n);
        else
            hl += (size_t)snprintf(hdr + hl, cap - hl,
                                   ", \"%s\": {\"dtype\": \"F32\", \"shape\": [%zu], \"data_offsets\": [%zu, %zu]}",
                                   t[i].name, t[i].rows, off, off + 4 * n);
        off += 4 * n;
    }
    hl += (size_t)snprintf(hdr + hl, cap - hl, "}");
    while (hl % 8)
        hdr[hl++] = ' ';
    char path[700];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    FILE *f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    unsigned char le[8];
    for (int i = 0; i < 8; i++)
        le[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    put_bytes(f, le, 8);
    put_bytes(f, hdr, hl);
    for (int i = 0; i < k; i++) {
        const size_t nc = t[i].cols ? t[i].cols : 1;
        for (size_t r = 0; r < t[i].rows; r++)
            put_bytes(f, t[i].x + (t[i].perm ? hf_src(r, t[i].perm) : r) * nc, 4 * nc);
    }
    fclose(f);
    free(hdr);
    free(t);
}

/* config.json for m: `arch` ("LlamaForCausalLM", ...), then `rope` and `extra` (JSON members, each
 * starting with ", "), inserted verbatim. */
static void write_config(const hm_t *m, const char *dir, const char *arch, const char *rope, const char *extra)
{
    char path[700];
    snprintf(path, sizeof path, "%s/config.json", dir);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f,
            "{\"architectures\": [\"%s\"], \"hidden_size\": %d, \"intermediate_size\": %d, \"num_hidden_layers\": %d, "
            "\"num_attention_heads\": %d, \"num_key_value_heads\": %d, \"head_dim\": %d, \"vocab_size\": %d, "
            "\"max_position_embeddings\": %d, \"rms_norm_eps\": 1e-05, \"hidden_act\": \"silu\", "
            "\"tie_word_embeddings\": %s%s%s}\n",
            arch, m->dim, m->hidden, m->layers, m->heads, m->kv_heads, m->head_dim, m->vocab, m->seq_len,
            m->tied ? "true" : "false", rope ? rope : "", extra ? extra : "");
    fclose(f);
}

/* A fresh checkpoint folder of m (path into dir). */
static void write_ckpt(const hm_t *m, const char *arch, const char *rope, const char *extra, const char *name,
                       char *dir, size_t len)
{
    kv_test_tmp(name, dir, len);
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    write_weights(m, dir, NULL);
    write_config(m, dir, arch, rope, extra);
}

/* kv_model_load of dir with stderr captured: the load's status, stderr's text (caller frees). */
static char *load_stderr(const char *dir, int *rc)
{
    char path[512];
    kv_test_tmp("stderr.txt", path, sizeof path);
    fflush(stderr);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644), saved = dup(2);
    ck_assert(fd >= 0 && saved >= 0);
    dup2(fd, 2);
    close(fd);
    kv_model_t *m = NULL;
    *rc = kv_model_load(dir, &m);
    kv_model_free(m);
    fflush(stderr);
    dup2(saved, 2);
    close(saved);
    FILE *f = fopen(path, "rb");
    char *s = calloc(1, 65536);
    size_t n = fread(s, 1, 65535, f);
    s[n] = 0;
    fclose(f);
    return s;
}

static int count_of(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

static const char *tokenizer_file(void)
{
    static char path[512];
    if (!path[0]) {
        kv_test_tmp("fx-tok.bin", path, sizeof path);
        size_t n;
        unsigned char *b = fx_tokenizer(&n);
        ck_assert_int_eq(fx_write(path, b, n), 0);
        free(b);
    }
    return path;
}

static void capture(const char *model, const char *out)
{
    kv_capture_opts_t o;
    kv_capture_opts_init(&o);
    o.model_path = model;
    o.tokenizer_path = tokenizer_file();
    o.prompt = "abc ab a bc abcabc aa xx ab";
    o.out_path = out;
    o.n_decode = 5;
    o.dtype = KV_DTYPE_F32;
    o.with_wo = 1;
    o.backend = "cpu";
    o.n_threads = 1;
    kv_capture_result_t r;
    kv_log_set_level(KV_LOG_QUIET);
    ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());
}

/* 1 when the two traces hold the same tokens and every stored tensor of every layer bit for bit. */
static int traces_identical(const char *p1, const char *p2, int qk_only)
{
    kv_trace_t *a, *b;
    ck_assert_int_eq(kv_trace_open(p1, &a), KV_OK);
    ck_assert_int_eq(kv_trace_open(p2, &b), KV_OK);
    const kv_trace_meta_t *ma = kv_trace_meta(a), *mb = kv_trace_meta(b);
    int same = ma->n_tokens == mb->n_tokens && ma->n_layers == mb->n_layers && ma->has_wo == mb->has_wo &&
               !memcmp(ma->tokens, mb->tokens, sizeof(int32_t) * (size_t)ma->n_tokens);
    const kv_tensor_t all[] = {KV_T_Q, KV_T_K, KV_T_V, KV_T_LSE, KV_T_ENTROPY, KV_T_ACC, KV_T_POOLED, KV_T_WO};
    const int nw = qk_only ? 2 : (int)KV_ARRAY_LEN(all);
    for (int l = 0; same && l < ma->n_layers; l++)
        for (int w = 0; same && w < nw; w++) {
            size_t ne = kv_tensor_numel(ma, all[w]);
            ck_assert(ne == kv_tensor_numel(mb, all[w]));
            float *x = malloc(ne * 4), *y = malloc(ne * 4);
            ck_assert_int_eq(kv_trace_read(a, l, all[w], x), KV_OK);
            ck_assert_int_eq(kv_trace_read(b, l, all[w], y), KV_OK);
            same = !memcmp(x, y, ne * 4);
            free(x);
            free(y);
        }
    kv_trace_close(a);
    kv_trace_close(b);
    return same;
}

/* ---------------------------------------------------------------- the two config styles */

#define LLAMA3_KEYS                                                                                                    \
    "\"factor\": 8.0, \"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 32"

START_TEST(config_styles_give_identical_traces)
{
    /* head_dim 12 with dim 32 and 4 heads: q_dim 48; GQA 4/2; untied classifier; W_O stored */
    hm_t m;
    hm_init(&m, 32, 40, 2, 4, 2, 12, 0, 0, 31);
    const struct {
        const char *name, *rope;
    } v[] = {
        /* 0: the user's file: transformers 5, theta only inside rope_parameters */
        {"v5-default", ", \"rope_parameters\": {\"rope_theta\": 100000, \"rope_type\": \"default\"}"},
        /* 1: transformers 4 */
        {"v4-default", ", \"rope_theta\": 100000.0, \"rope_scaling\": null"},
        /* 2, 3: llama3 scaling both ways (the older "type" key in the second) */
        {"v5-llama3", ", \"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 100000.0, " LLAMA3_KEYS "}"},
        {"v4-llama3", ", \"rope_theta\": 100000, \"rope_scaling\": {\"type\": \"llama3\", " LLAMA3_KEYS "}"},
        /* 4: what kvsim used to compute for file 0 */
        {"theta-1e4", ", \"rope_theta\": 10000.0"},
        /* 5: transformers 5 with a top-level original_max_position_embeddings beside the dict */
        {"v5-llama3-top", ", \"original_max_position_embeddings\": 32, \"rope_parameters\": {\"rope_type\": "
                          "\"llama3\", \"rope_theta\": 100000.0, \"factor\": 8.0, \"low_freq_factor\": 1.0, "
                          "\"high_freq_factor\": 4.0}"},
    };
    char traces[6][512];
    for (size_t i = 0; i < KV_ARRAY_LEN(v); i++) {
        char dir[512];
        write_ckpt(&m, "LlamaForCausalLM", v[i].rope, NULL, v[i].name, dir, sizeof dir);
        kv_test_tmp("styles.h5", traces[i], sizeof traces[i]);
        capture(dir, traces[i]);
    }
    ck_assert_msg(traces_identical(traces[0], traces[1], 0), "rope_parameters vs rope_theta: traces differ");
    ck_assert_msg(traces_identical(traces[2], traces[3], 0), "llama3 in rope_parameters vs rope_scaling: differ");
    ck_assert_msg(traces_identical(traces[2], traces[5], 0), "top-level original_max_position_embeddings: differ");
    ck_assert_msg(!traces_identical(traces[0], traces[4], 1), "theta 100000 and 10000 gave the same Q/K");
    ck_assert_msg(!traces_identical(traces[0], traces[2], 1), "llama3 scaling changed nothing");
    /* the trace says which RoPE it was made with */
    kv_trace_t *t;
    ck_assert_int_eq(kv_trace_open(traces[3], &t), KV_OK);
    ck_assert(kv_trace_meta(t)->rope_theta == 100000.0f);
    ck_assert_msg(strstr(kv_trace_meta(t)->generator, "RoPE llama3 (theta 100000, factor 8"), "%s",
                  kv_trace_meta(t)->generator);
    ck_assert_int_eq(kv_trace_meta(t)->model_dim, 32);
    ck_assert_int_eq(kv_trace_meta(t)->n_heads * kv_trace_meta(t)->head_dim, 48);
    /* W_O is (model_dim, n_heads * head_dim) = (32, 48): layer 1's equals the source's */
    float *wo = malloc(32 * 48 * 4);
    ck_assert_int_eq(kv_trace_read(t, 1, KV_T_WO, wo), KV_OK);
    ck_assert(!memcmp(wo, m.wo + 32 * 48, 32 * 48 * 4));
    free(wo);
    kv_trace_close(t);
    free(m.buf);
}
END_TEST

/* ---------------------------------------------------------------- warnings */

START_TEST(unknown_keys_warned_once)
{
    hm_t m;
    hm_init(&m, 16, 24, 1, 2, 1, 8, 0, 1, 5);
    char dir[512];
    /* a config.json of known keys only, as transformers 5 writes them: no warning */
    write_ckpt(&m, "LlamaForCausalLM", ", \"rope_parameters\": {\"rope_theta\": 10000.0, \"rope_type\": \"default\"}",
               ", \"model_type\": \"llama\", \"attention_bias\": false, \"attention_dropout\": 0.0, \"bos_token_id\": "
               "1, \"eos_token_id\": [2, 3], \"dtype\": \"bfloat16\", \"initializer_range\": 0.02, \"mlp_bias\": "
               "false, \"pad_token_id\": null, \"pretraining_tp\": 1, \"transformers_version\": \"5.25.0\", "
               "\"use_cache\": true, \"torch_dtype\": \"float32\", \"_name_or_path\": \"x\", \"temperature\": 0.7",
               "known", dir, sizeof dir);
    int rc;
    char *err = load_stderr(dir, &rc);
    ck_assert_msg(rc == KV_OK, "%s", kv_last_error());
    ck_assert_msg(err[0] == 0, "unexpected output: %s", err);
    free(err);
    /* unknown keys: one warning each, naming it; the load goes on */
    write_ckpt(&m, "LlamaForCausalLM",
               ", \"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 500000.0, " LLAMA3_KEYS
               ", \"beta_fast\": 32}",
               ", \"foo_bar\": 1, \"unsloth_version\": \"2024.9\", \"sliding_window\": null", "unknown", dir,
               sizeof dir);
    err = load_stderr(dir, &rc);
    ck_assert_msg(rc == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(count_of(err, "warning: "), 4);
    ck_assert_int_eq(count_of(err, "unknown key \"foo_bar\""), 1);
    ck_assert_int_eq(count_of(err, "unknown key \"unsloth_version\""), 1);
    ck_assert_int_eq(count_of(err, "unknown key \"sliding_window\""), 1); /* not a Llama key */
    ck_assert_int_eq(count_of(err, "\"rope_parameters.beta_fast\" is not read for RoPE type llama3"), 1);
    ck_assert_ptr_nonnull(strstr(err, "config.json"));
    free(err);
    /* Qwen2, rope_parameters by layer type: the dict of a type that several layers share is read once */
    hm_t q;
    hm_init(&q, 16, 24, 2, 2, 1, 8, 1, 1, 8);
    write_ckpt(&q, "Qwen2ForCausalLM",
               ", \"rope_parameters\": {\"sliding_attention\": {\"rope_theta\": 1e6, \"mscale\": 1}}",
               ", \"layer_types\": [\"sliding_attention\", \"sliding_attention\"]", "nested", dir, sizeof dir);
    err = load_stderr(dir, &rc);
    ck_assert_msg(rc == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(count_of(err, "warning: "), 1);
    ck_assert_int_eq(count_of(err, "\"rope_parameters.sliding_attention.mscale\" is not read"), 1);
    free(err);
    free(q.buf);
    /* a tensor the forward pass does not read */
    kv_test_tmp("extra-tensor", dir, sizeof dir);
    ck_assert_int_eq(mkdir(dir, 0755), 0);
    write_weights(&m, dir, "model.layers.0.self_attn.o_proj.bias");
    write_config(&m, dir, "LlamaForCausalLM", NULL, NULL);
    err = load_stderr(dir, &rc);
    ck_assert_msg(rc == KV_OK, "%s", kv_last_error());
    ck_assert_msg(strstr(err, "1 tensor not used by the forward pass, ignored: model.layers.0.self_attn.o_proj.bias"),
                  "%s", err);
    free(err);
    free(m.buf);
}
END_TEST

/* ---------------------------------------------------------------- refusals */

static void expect_refusal(const hm_t *m, const char *arch, const char *rope, const char *extra, const char *what)
{
    char dir[512];
    write_ckpt(m, arch, rope, extra, "refused", dir, sizeof dir);
    kv_model_t *x = (kv_model_t *)1;
    int rc;
    char *err = load_stderr(dir, &rc);
    free(err);
    ck_assert_msg(rc != KV_OK, "%s%s%s loaded; expected a refusal about %s", arch, rope ? rope : "", extra ? extra : "",
                  what);
    ck_assert_int_ne(kv_model_load(dir, &x), KV_OK);
    ck_assert_ptr_null(x);
    const char *e = kv_last_error();
    ck_assert_msg(strstr(e, "config.json") != NULL, "error does not name config.json: %s", e);
    ck_assert_msg(strstr(e, what) != NULL, "error does not say '%s': %s", what, e);
}

static void expect_load(const hm_t *m, const char *arch, const char *rope, const char *extra, kv_model_config_t *c)
{
    char dir[512];
    write_ckpt(m, arch, rope, extra, "accepted", dir, sizeof dir);
    kv_model_t *x;
    ck_assert_msg(kv_model_load(dir, &x) == KV_OK, "%s%s: %s", rope ? rope : "", extra ? extra : "", kv_last_error());
    if (c)
        *c = x->cfg;
    kv_model_free(x);
}

START_TEST(refused_keys_are_named)
{
    hm_t m, q;
    hm_init(&m, 16, 24, 2, 2, 1, 8, 0, 1, 6);
    hm_init(&q, 16, 24, 2, 2, 1, 8, 1, 1, 7); /* with biases: Qwen2 */
    const char *L = "LlamaForCausalLM", *Q2 = "Qwen2ForCausalLM", *MI = "MistralForCausalLM";
    const struct {
        const char *arch, *rope, *extra, *what;
    } no[] = {
        {L, NULL, ", \"attention_bias\": true", "\"attention_bias\" is true"},
        {L, NULL, ", \"mlp_bias\": true", "\"mlp_bias\" is true"},
        {L, NULL, ", \"pretraining_tp\": 2", "\"pretraining_tp\" is 2"},
        {L, NULL, ", \"hidden_act\": \"gelu\"", "\"hidden_act\" is \"gelu\""},
        {Q2, NULL, ", \"hidden_act\": \"relu\"", "\"hidden_act\" is \"relu\""},
        {L, NULL, ", \"rope_interleaved\": true", "\"rope_interleaved\" is true"},
        {L, NULL, ", \"partial_rotary_factor\": 0.5", "\"partial_rotary_factor\" is 0.5"},
        {L, NULL, ", \"quantization_config\": {\"quant_method\": \"gptq\"}", "\"quantization_config\" is"},
        {L, NULL, ", \"auto_map\": {\"AutoModelForCausalLM\": \"x.Y\"}", "\"auto_map\" is"},
        {MI, NULL, ", \"is_encoder_decoder\": true", "\"is_encoder_decoder\" is true"},
        {L, NULL, ", \"pruned_heads\": {\"0\": [1]}", "\"pruned_heads\" is"},
        {L, ", \"rope_parameters\": {\"rope_type\": \"dynamic\", \"rope_theta\": 10000.0, \"factor\": 2.0}", NULL,
         "\"rope_parameters\": RoPE type dynamic is not implemented"},
        {L,
         ", \"rope_parameters\": {\"rope_type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32}",
         NULL, "RoPE type yarn is not implemented"},
        {Q2, ", \"rope_scaling\": {\"type\": \"yarn\", \"factor\": 4.0}", NULL,
         "\"rope_scaling\": RoPE type yarn is not implemented"},
        {L, ", \"rope_scaling\": {\"rope_type\": \"longrope\", \"short_factor\": [1], \"long_factor\": [1]}", NULL,
         "RoPE type longrope"},
        {L, ", \"rope_scaling\": {\"type\": \"dynamic\", \"factor\": 2.0}", NULL, "RoPE type dynamic"},
        {L, ", \"rope_parameters\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"high_freq_factor\": 4.0}", NULL,
         "of rope_type llama3 has no \"low_freq_factor\""},
        {L, ", \"rope_scaling\": {\"type\": \"linear\"}", NULL, "of rope_type linear has no \"factor\""},
        {L, ", \"rope_theta\": 500000.0, \"rope_parameters\": {\"rope_type\": \"default\", \"rope_theta\": 100000.0}",
         NULL, "\"rope_parameters.rope_theta\" is 100000 but the top-level \"rope_theta\" is 500000"},
        {L,
         ", \"rope_scaling\": {\"type\": \"linear\", \"factor\": 2.0}, \"rope_parameters\": {\"rope_type\": "
         "\"default\"}",
         NULL, "\"rope_scaling\" and \"rope_parameters\" disagree"},
        {L, ", \"rope_parameters\": {\"rope_type\": \"linear\", \"factor\": \"2\"}", NULL,
         "\"rope_parameters.factor\" is \"2\", not a number"},
        {L, ", \"rope_parameters\": {\"full_attention\": {\"rope_type\": \"default\", \"rope_theta\": 1e5}}", NULL,
         "\"rope_parameters\" is keyed by layer type"},
        {L, NULL, ", \"model_type\": \"mistral\"", "model_type \"mistral\" does not match architecture"},
        {"GPT2LMHeadModel", NULL, NULL, "architecture GPT2LMHeadModel is not supported"},
        {"Qwen3ForCausalLM", NULL, NULL, "architecture Qwen3ForCausalLM is not supported"},
        {Q2, NULL, ", \"use_sliding_window\": true, \"sliding_window\": 64, \"max_window_layers\": 0",
         "\"use_sliding_window\" is true with a sliding_window of 64 tokens"},
        {Q2, NULL, ", \"layer_types\": [\"full_attention\", \"chunked_attention\"]",
         "\"layer_types\" entry 1 is \"chunked_attention\""},
        {Q2,
         ", \"rope_parameters\": {\"full_attention\": {\"rope_theta\": 1e6}, \"sliding_attention\": {\"rope_theta\": "
         "1e4}}",
         ", \"layer_types\": [\"full_attention\", \"sliding_attention\"]",
         "gives layer types full_attention and sliding_attention different RoPE"},
        {L, NULL, ", \"tie_word_embeddings\": \"yes\"", "\"tie_word_embeddings\" is \"yes\", not true or false"},
        {L, NULL, ", \"rms_norm_eps\": 0", "\"rms_norm_eps\" is 0"},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(no); i++)
        expect_refusal(strcmp(no[i].arch, Q2) ? &m : &q, no[i].arch, no[i].rope, no[i].extra, no[i].what);

    /* the neutral values, and the sliding windows that are exact */
    kv_model_config_t c;
    expect_load(&m, L, NULL,
                ", \"attention_bias\": false, \"mlp_bias\": false, \"pretraining_tp\": 1, \"hidden_act\": \"swish\", "
                "\"rope_interleaved\": false, \"partial_rotary_factor\": 1.0, \"quantization_config\": null, "
                "\"pruned_heads\": {}, \"is_encoder_decoder\": false, \"rope_scaling\": {}",
                &c);
    ck_assert(c.rope.type == KV_ROPE_DEFAULT && c.rope.theta == 10000.0);
    /* Qwen2: the window covers the context (128), or sliding is off */
    expect_load(&q, Q2, NULL, ", \"use_sliding_window\": true, \"sliding_window\": 128, \"max_window_layers\": 0", &c);
    ck_assert_int_eq(c.seq_len, 128);
    ck_assert_int_eq(c.qkv_bias, 1);
    expect_load(&q, Q2, NULL, ", \"use_sliding_window\": false, \"sliding_window\": 16, \"max_window_layers\": 0", &c);
    ck_assert_int_eq(c.seq_len, 128);
    /* Qwen2: rope_parameters by layer type, the same RoPE for both */
    expect_load(&q, Q2,
                ", \"rope_parameters\": {\"full_attention\": {\"rope_theta\": 1e6, \"rope_type\": \"default\"}, "
                "\"sliding_attention\": {\"rope_theta\": 1e6}}",
                ", \"layer_types\": [\"full_attention\", \"sliding_attention\"]", &c);
    ck_assert(c.rope.theta == 1e6);
    /* Mistral: sliding_window caps the context; absent means transformers' default of 4096; null none */
    expect_load(&m, MI, NULL, ", \"sliding_window\": 64", &c);
    ck_assert_int_eq(c.seq_len, 64);
    expect_load(&m, MI, NULL, ", \"sliding_window\": null", &c);
    ck_assert_int_eq(c.seq_len, 128);
    ck_assert_str_eq(c.arch, "mistral");
    hm_t big = m;
    big.seq_len = 8192;
    expect_load(&big, MI, NULL, NULL, &c);
    ck_assert_int_eq(c.seq_len, 4096);
    /* linear scaling; llama3's original_max_position_embeddings defaults to max_position_embeddings */
    expect_load(&m, L, ", \"rope_scaling\": {\"rope_type\": \"linear\", \"factor\": 4}", NULL, &c);
    ck_assert(c.rope.type == KV_ROPE_LINEAR && c.rope.factor == 4.0);
    expect_load(&m, L,
                ", \"rope_parameters\": {\"rope_type\": \"llama3\", \"factor\": 8.0, \"low_freq_factor\": 1.0, "
                "\"high_freq_factor\": 4.0}",
                NULL, &c);
    ck_assert(c.rope.type == KV_ROPE_LLAMA3 && c.rope.original_max_pos == 128.0 && c.rope.theta == 10000.0);
    free(m.buf);
    free(q.buf);
}
END_TEST

/* ---------------------------------------------------------------- real configurations */

/* config.json of published checkpoints (copied from their Hugging Face repositories; transformers 4
 * wrote them): every key is known, so they load without a single warning. Only config.json is
 * written, so the load stops at the missing weights, after the whole configuration was read and
 * checked. */
static const struct {
    const char *name, *json;
} real_configs[] = {
    {"SmolLM2-135M-Instruct",
     "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, \"attention_dropout\": 0.0, "
     "\"bos_token_id\": 1, \"eos_token_id\": 2, \"head_dim\": 64, \"hidden_act\": \"silu\", \"hidden_size\": 576, "
     "\"initializer_range\": 0.041666666666666664, \"intermediate_size\": 1536, \"is_llama_config\": true, "
     "\"max_position_embeddings\": 8192, \"mlp_bias\": false, \"model_type\": \"llama\", \"num_attention_heads\": 9, "
     "\"num_hidden_layers\": 30, \"num_key_value_heads\": 3, \"pad_token_id\": 2, \"pretraining_tp\": 1, "
     "\"rms_norm_eps\": 1e-05, \"rope_interleaved\": false, \"rope_scaling\": null, \"rope_theta\": 100000, "
     "\"tie_word_embeddings\": true, \"torch_dtype\": \"bfloat16\", \"transformers.js_config\": {\"kv_cache_dtype\": "
     "{\"q4f16\": \"float16\", \"fp16\": \"float16\"}}, \"transformers_version\": \"4.42.3\", \"use_cache\": true, "
     "\"vocab_size\": 49152}"},
    {"Llama-3.2-1B",
     "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, \"attention_dropout\": 0.0, "
     "\"bos_token_id\": 128000, \"eos_token_id\": 128001, \"head_dim\": 64, \"hidden_act\": \"silu\", "
     "\"hidden_size\": 2048, \"initializer_range\": 0.02, \"intermediate_size\": 8192, \"max_position_embeddings\": "
     "131072, \"mlp_bias\": false, \"model_type\": \"llama\", \"num_attention_heads\": 32, \"num_hidden_layers\": 16, "
     "\"num_key_value_heads\": 8, \"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, \"rope_scaling\": {\"factor\": 32.0, "
     "\"high_freq_factor\": 4.0, \"low_freq_factor\": 1.0, \"original_max_position_embeddings\": 8192, "
     "\"rope_type\": \"llama3\"}, \"rope_theta\": 500000.0, \"tie_word_embeddings\": true, \"torch_dtype\": "
     "\"bfloat16\", \"transformers_version\": \"4.45.0.dev0\", \"use_cache\": true, \"vocab_size\": 128256}"},
    {"Llama-3.1-8B-Instruct",
     "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, \"attention_dropout\": 0.0, "
     "\"bos_token_id\": 128000, \"eos_token_id\": [128001, 128008, 128009], \"hidden_act\": \"silu\", "
     "\"hidden_size\": 4096, \"initializer_range\": 0.02, \"intermediate_size\": 14336, \"max_position_embeddings\": "
     "131072, \"mlp_bias\": false, \"model_type\": \"llama\", \"num_attention_heads\": 32, \"num_hidden_layers\": 32, "
     "\"num_key_value_heads\": 8, \"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, \"rope_scaling\": {\"factor\": 8.0, "
     "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 8192, "
     "\"rope_type\": \"llama3\"}, \"rope_theta\": 500000.0, \"tie_word_embeddings\": false, \"torch_dtype\": "
     "\"bfloat16\", \"transformers_version\": \"4.42.3\", \"use_cache\": true, \"vocab_size\": 128256}"},
    {"Qwen2.5-0.5B-Instruct",
     "{\"architectures\": [\"Qwen2ForCausalLM\"], \"attention_dropout\": 0.0, \"bos_token_id\": 151643, "
     "\"eos_token_id\": 151645, \"hidden_act\": \"silu\", \"hidden_size\": 896, \"initializer_range\": 0.02, "
     "\"intermediate_size\": 4864, \"max_position_embeddings\": 32768, \"max_window_layers\": 21, \"model_type\": "
     "\"qwen2\", \"num_attention_heads\": 14, \"num_hidden_layers\": 24, \"num_key_value_heads\": 2, "
     "\"rms_norm_eps\": 1e-06, \"rope_theta\": 1000000.0, \"sliding_window\": 32768, \"tie_word_embeddings\": true, "
     "\"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.43.1\", \"use_cache\": true, "
     "\"use_sliding_window\": false, \"vocab_size\": 151936}"},
    {"Mistral-7B-v0.1",
     "{\"architectures\": [\"MistralForCausalLM\"], \"bos_token_id\": 1, \"eos_token_id\": 2, \"hidden_act\": "
     "\"silu\", \"hidden_size\": 4096, \"initializer_range\": 0.02, \"intermediate_size\": 14336, "
     "\"max_position_embeddings\": 32768, \"model_type\": \"mistral\", \"num_attention_heads\": 32, "
     "\"num_hidden_layers\": 32, \"num_key_value_heads\": 8, \"rms_norm_eps\": 1e-05, \"rope_theta\": 10000.0, "
     "\"sliding_window\": 4096, \"tie_word_embeddings\": false, \"torch_dtype\": \"bfloat16\", "
     "\"transformers_version\": \"4.34.0.dev0\", \"use_cache\": true, \"vocab_size\": 32000}"},
    {"Mistral-Nemo-Instruct-2407",
     "{\"architectures\": [\"MistralForCausalLM\"], \"attention_dropout\": 0.0, \"bos_token_id\": 1, "
     "\"eos_token_id\": 2, \"head_dim\": 128, \"hidden_act\": \"silu\", \"hidden_size\": 5120, "
     "\"initializer_range\": 0.02, \"intermediate_size\": 14336, \"max_position_embeddings\": 1024000, "
     "\"model_type\": \"mistral\", \"num_attention_heads\": 32, \"num_hidden_layers\": 40, \"num_key_value_heads\": "
     "8, \"rms_norm_eps\": 1e-05, \"rope_theta\": 1000000.0, \"sliding_window\": null, \"tie_word_embeddings\": "
     "false, \"torch_dtype\": \"bfloat16\", \"transformers_version\": \"4.43.0.dev0\", \"use_cache\": true, "
     "\"vocab_size\": 131072}"},
    {"TinyLlama-1.1B-Chat-v1.0",
     "{\"architectures\": [\"LlamaForCausalLM\"], \"attention_bias\": false, \"bos_token_id\": 1, \"eos_token_id\": 2, "
     "\"hidden_act\": \"silu\", \"hidden_size\": 2048, \"initializer_range\": 0.02, \"intermediate_size\": 5632, "
     "\"max_position_embeddings\": 2048, \"model_type\": \"llama\", \"num_attention_heads\": 32, "
     "\"num_hidden_layers\": 22, \"num_key_value_heads\": 4, \"pretraining_tp\": 1, \"rms_norm_eps\": 1e-05, "
     "\"rope_scaling\": null, \"rope_theta\": 10000.0, \"tie_word_embeddings\": false, \"torch_dtype\": "
     "\"bfloat16\", \"transformers_version\": \"4.35.0\", \"use_cache\": true, \"vocab_size\": 32000}"},
};

START_TEST(real_configs_read_without_warnings)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(real_configs); i++) {
        char dir[512], path[700];
        kv_test_tmp(real_configs[i].name, dir, sizeof dir);
        ck_assert_int_eq(mkdir(dir, 0755), 0);
        snprintf(path, sizeof path, "%s/config.json", dir);
        FILE *f = fopen(path, "w");
        ck_assert_ptr_nonnull(f);
        fputs(real_configs[i].json, f);
        fclose(f);
        int rc;
        char *err = load_stderr(dir, &rc);
        ck_assert_int_ne(rc, KV_OK);
        ck_assert_msg(strstr(kv_last_error(), "model.safetensors") && strstr(kv_last_error(), "cannot open"),
                      "%s: the load stopped before the weights: %s", real_configs[i].name, kv_last_error());
        ck_assert_msg(err[0] == 0, "%s: %s", real_configs[i].name, err);
        free(err);
    }
}
END_TEST

/* ---------------------------------------------------------------- RoPE frequencies */

/* Llama 3.1 8B (theta 500000, head_dim 128, factor 8, low_freq_factor 1, high_freq_factor 4,
 * original_max_position_embeddings 8192), transformers' _compute_llama3_parameters worked out with
 * 40-digit decimals (Python's decimal module, pi to 40 digits): f = 500000^(-2i/128) for pair i,
 * wavelength w = 2 pi / f; w < 8192/4 = 2048 keeps f, w > 8192/1 divides it by 8, between them
 * s = (8192 / w - 1) / (4 - 1) and f' = (1 - s) f / 8 + s f. */
static const struct {
    int pair;
    double f; /* the llama3 frequency */
} llama31[] = {
    {0, 1.0},                     /* w = 6.28: untouched */
    {1, 8.14617233856544704e-1},  /* w = 7.71 */
    {20, 1.65604400809944455e-2}, /* w = 379.4 */
    {28, 3.21144599475259102e-3}, /* w = 1956.5: the last untouched pair */
    {29, 2.16657076350335861e-3}, /* w = 2401.7, s = 0.803621 (f = 2.61609925292503527e-3) */
    {30, 1.37189356776113816e-3}, /* w = 2948.3, s = 0.592849 (f = 2.13111953691196535e-3) */
    {32, 5.24846160992954670e-4}, /* w = 4442.9, s = 0.281283 (f = 500000^-1/2 = 1.41421356237309505e-3) */
    {34, 1.78507812767996419e-4}, /* w = 6695.1, s = 0.074527 */
    {35, 9.55621235396468302e-5}, /* w = 8218.7: the first divided pair (f = 7.64496988317174642e-4) */
    {40, 3.42810219595259148e-5}, /* w = 22910.6 */
    {63, 3.06892598891451109e-7}, /* w = 2559195.5 */
};

START_TEST(llama3_frequencies_known_values)
{
    kv_rope_t r = kv_rope_plain(500000.0);
    r.type = KV_ROPE_LLAMA3, r.factor = 8, r.low_freq_factor = 1, r.high_freq_factor = 4, r.original_max_pos = 8192;
    for (size_t k = 0; k < KV_ARRAY_LEN(llama31); k++) {
        double f = kv_rope_freq(&r, 2 * llama31[k].pair, 128);
        ck_assert_msg(fabs(f - llama31[k].f) <= 1e-13 * llama31[k].f, "pair %d: %.17g, expected %.17g", llama31[k].pair,
                      f, llama31[k].f);
    }
    /* the rope op rotates by those frequencies: one head of 128 at position 1000 */
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_open("cpu", 1, &be), KV_OK);
    float x[128], y[128];
    for (int i = 0; i < 128; i++)
        x[i] = y[i] = (float)sin(0.7 * i + 0.1);
    int32_t pos = 1000;
    ck_assert_int_eq(be->ops->rope(be, y, &pos, 1, 1, 128, &r), KV_OK);
    for (size_t k = 0; k < KV_ARRAY_LEN(llama31); k++) {
        const int i = llama31[k].pair;
        const double ang = 1000.0 * llama31[k].f, c = cos(ang), s = sin(ang);
        kv_assert_close(y[2 * i], x[2 * i] * c - x[2 * i + 1] * s, 1e-6, 1e-6, "rotated a");
        kv_assert_close(y[2 * i + 1], x[2 * i] * s + x[2 * i + 1] * c, 1e-6, 1e-6, "rotated b");
    }
    /* linear: every frequency divided by the factor */
    kv_rope_t lin = kv_rope_plain(10000.0);
    lin.type = KV_ROPE_LINEAR, lin.factor = 4;
    ck_assert(fabs(kv_rope_freq(&lin, 10, 64) - pow(10000.0, -10.0 / 64) / 4) < 1e-17);
    kv_backend_close(be);
}
END_TEST

/* KV_ROPE_FACTORS (llama.cpp's rope_freqs tensor in GGUF files): pair i's frequency is
 * theta^(-2i/d) / factors[i]. With the divisors of Llama 3.1's llama3 scaling (f / f' of the table
 * above, rounded to float as the GGUF tensor stores them) it rotates as llama3 does, to float
 * precision of the divisors. */
START_TEST(factors_rope)
{
    kv_rope_t r = kv_rope_plain(500000.0), l3 = r;
    r.type = KV_ROPE_FACTORS;
    l3.type = KV_ROPE_LLAMA3, l3.factor = 8, l3.low_freq_factor = 1, l3.high_freq_factor = 4,
    l3.original_max_pos = 8192;
    for (int i = 0; i < 64; i++)
        r.factors[i] = (float)(pow(500000.0, -2.0 * i / 128) / kv_rope_freq(&l3, 2 * i, 128));
    ck_assert(r.factors[0] == 1.0f && r.factors[40] == 8.0f && r.factors[30] > 1.0f && r.factors[30] < 8.0f);
    for (int i = 0; i < 64; i++) {
        const double want = pow(500000.0, -2.0 * i / 128) / (double)r.factors[i];
        ck_assert(kv_rope_freq(&r, 2 * i, 128) == want);
        ck_assert(fabs(want - kv_rope_freq(&l3, 2 * i, 128)) <= 1e-7 * want);
    }
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_open("cpu", 1, &be), KV_OK);
    enum { TT = 3, H = 2, D = 128 };
    float a[TT * H * D], b[TT * H * D];
    for (int i = 0; i < TT * H * D; i++)
        a[i] = b[i] = (float)cos(0.37 * i);
    int32_t pos[TT] = {0, 17, 4000};
    ck_assert_int_eq(be->ops->rope(be, a, pos, TT, H, D, &r), KV_OK);
    ck_assert_int_eq(be->ops->rope(be, b, pos, TT, H, D, &l3), KV_OK);
    for (int i = 0; i < TT * H * D; i++)
        kv_assert_close(a[i], b[i], 2e-6, 0, "factors vs llama3 rotation");
    /* the config check refuses a factor that is not positive and finite */
    kv_model_config_t c;
    memset(&c, 0, sizeof c);
    c.dim = 256, c.hidden_dim = 64, c.n_layers = 1, c.n_heads = 2, c.n_kv_heads = 2, c.vocab_size = 10, c.seq_len = 8;
    c.rope = r;
    c.rope.factors[5] = 0.0f;
    ck_assert_int_ne(kv_model_config_check(&c, "test.gguf"), KV_OK);
    ck_assert_ptr_nonnull(strstr(kv_last_error(), "RoPE frequency factor 5 is 0"));
    c.rope.factors[5] = 1.0f;
    ck_assert_int_eq(kv_model_config_check(&c, "test.gguf"), KV_OK);
    /* and every backend entry refuses an odd or oversized head */
    ck_assert_int_ne(be->ops->rope(be, a, pos, 1, 1, 7, &r), KV_OK);
    ck_assert_int_ne(be->ops->rope(be, a, pos, 1, 1, 2 * KV_ROPE_MAX_PAIRS + 2, &r), KV_OK);
    kv_backend_close(be);
}
END_TEST

/* ---------------------------------------------------------------- forward pass vs a reference */

/* kvsim's rotation of pair (2i, 2i+1) with frequency f, in double */
static void ref_rope(double *x, int heads, int hd, int pos, const double *freq)
{
    for (int h = 0; h < heads; h++)
        for (int i = 0; i < hd; i += 2) {
            double ang = pos * freq[i / 2], a = x[h * hd + i], b = x[h * hd + i + 1];
            x[h * hd + i] = a * cos(ang) - b * sin(ang);
            x[h * hd + i + 1] = a * sin(ang) + b * cos(ang);
        }
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

static void ref_rmsnorm(double *y, const double *x, const float *w, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++)
        ss += x[i] * x[i];
    double r = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++)
        y[i] = x[i] * r * w[i];
}

/* The Qwen2/Llama-3 forward pass of kv_forward.h, token by token, in double, from the source weights
 * (not the loaded ones): logits (T, vocab), K cache (layers, T, kv_dim). */
static void ref_forward(const hm_t *m, const double *freq, const int32_t *tok, int T, double *logits, double *kc)
{
    const int D = m->dim, H = m->hidden, hd = m->head_dim, NH = m->heads, Q = NH * hd, KV = m->kv_heads * hd;
    const int G = m->heads / m->kv_heads;
    double *x = calloc(D, 8), *xn = calloc(D, 8), *q = calloc(Q, 8), *att = calloc(Q, 8), *tmp = calloc(D, 8);
    double *h1 = calloc(H, 8), *h3 = calloc(H, 8), *p = calloc(T, 8);
    double *V = calloc((size_t)m->layers * T * KV, 8);
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < D; i++)
            x[i] = m->emb[(size_t)tok[t] * D + i];
        for (int l = 0; l < m->layers; l++) {
            double *K = kc + (size_t)l * T * KV, *Vl = V + (size_t)l * T * KV;
            ref_rmsnorm(xn, x, m->rms_att + l * D, D, 1e-5);
            ref_matvec(q, m->wq + (size_t)l * Q * D, xn, Q, D);
            ref_matvec(K + (size_t)t * KV, m->wk + (size_t)l * KV * D, xn, KV, D);
            ref_matvec(Vl + (size_t)t * KV, m->wv + (size_t)l * KV * D, xn, KV, D);
            for (int i = 0; m->bias && i < Q; i++)
                q[i] += m->bq[l * Q + i];
            for (int i = 0; m->bias && i < KV; i++) {
                K[(size_t)t * KV + i] += m->bk[l * KV + i];
                Vl[(size_t)t * KV + i] += m->bv[l * KV + i];
            }
            ref_rope(q, NH, hd, t, freq);
            ref_rope(K + (size_t)t * KV, m->kv_heads, hd, t, freq);
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
                        a += p[j] / sum * Vl[(size_t)j * KV + g * hd + i];
                    att[h * hd + i] = a;
                }
            }
            ref_matvec(tmp, m->wo + (size_t)l * D * Q, att, D, Q);
            for (int i = 0; i < D; i++)
                x[i] += tmp[i];
            ref_rmsnorm(xn, x, m->rms_ffn + l * D, D, 1e-5);
            ref_matvec(h1, m->w1 + (size_t)l * H * D, xn, H, D);
            ref_matvec(h3, m->w3 + (size_t)l * H * D, xn, H, D);
            for (int i = 0; i < H; i++)
                h1[i] = h1[i] / (1 + exp(-h1[i])) * h3[i];
            ref_matvec(tmp, m->w2 + (size_t)l * D * H, h1, D, H);
            for (int i = 0; i < D; i++)
                x[i] += tmp[i];
        }
        ref_rmsnorm(xn, x, m->rms_final, D, 1e-5);
        ref_matvec(logits + (size_t)t * m->vocab, m->tied ? m->emb : m->wcls, xn, m->vocab, D);
    }
    free(x), free(xn), free(q), free(att), free(tmp), free(h1), free(h3), free(p), free(V);
}

/* Qwen2 with biases, head_dim 12 (q_dim 48 != dim 32), GQA 4/2, tied, llama3 RoPE (theta 10000,
 * factor 8, low 1, high 4, original 200: of the 6 pairs (wavelengths 2 pi 10000^(i/6) = 6.3, 29,
 * 135, 628, ...), 0-1 are untouched (< 200/4), 2 interpolated, 3-5 divided (> 200/1)). The
 * reference's frequencies are computed here with transformers' formula in long double. */
START_TEST(forward_biases_head_dim_llama3_match_reference)
{
    hm_t m;
    hm_init(&m, 32, 40, 2, 4, 2, 12, 1, 1, 41);
    char dir[512];
    write_ckpt(&m, "Qwen2ForCausalLM",
               ", \"rope_parameters\": {\"rope_type\": \"llama3\", \"rope_theta\": 10000.0, \"factor\": 8.0, "
               "\"low_freq_factor\": 1.0, \"high_freq_factor\": 4.0, \"original_max_position_embeddings\": 200}",
               NULL, "qwen2-ref", dir, sizeof dir);
    kv_model_t *km;
    ck_assert_msg(kv_model_load_f32(dir, &km) == KV_OK, "%s", kv_last_error());
    const kv_model_config_t *c = &km->cfg;
    ck_assert_int_eq(c->q_dim, 48);
    ck_assert_int_eq(c->dim, 32);
    /* the loader put the rows of q/k weights and biases back into kvsim's order */
    ck_assert(!memcmp(km->wq, m.wq, sizeof(float) * 2 * 48 * 32));
    ck_assert(!memcmp(km->bq, m.bq, sizeof(float) * 2 * 48));
    ck_assert(!memcmp(km->bk, m.bk, sizeof(float) * 2 * 24));
    ck_assert(!memcmp(km->bv, m.bv, sizeof(float) * 2 * 24));
    ck_assert(!memcmp(km->wo, m.wo, sizeof(float) * 2 * 32 * 48));
    /* transformers' llama3 rule, long double */
    double freq[6];
    int bands[3] = {0, 0, 0};
    for (int i = 0; i < 6; i++) {
        long double f = powl(10000.0L, -(long double)(2 * i) / 12), wl = 2 * 3.14159265358979323846264338L / f;
        long double low = 200.0L / 1, high = 200.0L / 4;
        if (wl < high)
            bands[0]++;
        else if (wl > low)
            f /= 8, bands[2]++;
        else {
            long double s = (200.0L / wl - 1) / (4 - 1);
            f = (1 - s) * f / 8 + s * f;
            bands[1]++;
        }
        freq[i] = (double)f;
    }
    ck_assert(bands[0] == 2 && bands[1] == 1 && bands[2] == 3);
    enum { T = 30 };
    const int V = m.vocab;
    int32_t tok[T];
    for (int t = 0; t < T; t++)
        tok[t] = (int32_t)((t * 97 + 13) % V);
    double *ref = calloc((size_t)T * V, 8), *rk = calloc((size_t)2 * T * 24, 8);
    ref_forward(&m, freq, tok, T, ref, rk);
    kv_backend_t *be;
    kv_fwd_t *f;
    ck_assert_int_eq(kv_backend_open("cpu", 0, &be), KV_OK);
    ck_assert_msg(kv_fwd_create(km, be, T, 8, &f) == KV_OK, "%s", kv_last_error());
    float *lg = malloc(sizeof(float) * T * V);
    ck_assert_msg(kv_fwd_run(f, tok, T, 0, lg, 1, NULL, NULL) == KV_OK, "%s", kv_last_error());
    /* float32 against double on O(1) activations: ~1e-6; an unapplied bias, a wrong band or a q_dim
     * stride error moves these by 0.01 or more */
    double worst = 0;
    for (int i = 0; i < T * V; i++) {
        kv_assert_close(lg[i], ref[i], 1e-4, 1e-4, "logit");
        worst = fmax(worst, fabs(lg[i] - ref[i]));
    }
    fprintf(stderr, "kvsim tests: hf_config: Qwen2/llama3/q_dim forward vs double reference: max |logit diff| %.3g\n",
            worst);
    for (int l = 0; l < 2; l++)
        for (int i = 0; i < T * 24; i++)
            kv_assert_close(kv_fwd_k_cache(f, l)[i], rk[(size_t)l * T * 24 + i], 1e-5, 1e-4, "K cache");
    free(lg), free(ref), free(rk);
    kv_fwd_free(f);
    kv_backend_close(be);
    kv_model_free(km);
    free(m.buf);
}
END_TEST

/* ---------------------------------------------------------------- README */

/* The text of README.md's bullet that starts with `start`, up to the next bullet or blank line. */
static char *readme_bullet(const char *readme, const char *start)
{
    const char *p = strstr(readme, start);
    ck_assert_msg(p != NULL, "README.md has no bullet starting with %s", start);
    const char *e = p + 1;
    while (*e && !(e[0] == '\n' && (e[1] == '-' || e[1] == '\n')))
        e++;
    char *s = strndup(p, (size_t)(e - p));
    return s;
}

START_TEST(readme_lists_every_key)
{
    FILE *f = fopen("README.md", "rb");
    ck_assert_ptr_nonnull(f);
    char *readme = calloc(1, 1 << 20);
    fread(readme, 1, (1 << 20) - 1, f);
    fclose(f);
    const char *archs[] = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"};
    const struct {
        const char *start;
        int kind;
    } lists[] = {
        {"- **Read and used**", KV_HF_KEY_USED},
        {"- **Ignored**", KV_HF_KEY_IGNORED},
        {"- **Refused**", KV_HF_KEY_CHECKED},
    };
    int listed = 0;
    for (size_t k = 0; k < KV_ARRAY_LEN(lists); k++) {
        char *b = readme_bullet(readme, lists[k].start);
        /* every `key` in the bullet has that treatment for at least one architecture */
        for (char *p = strchr(b, '`'); p; p = strchr(p + 1, '`')) {
            char *q = strchr(p + 1, '`');
            ck_assert_ptr_nonnull(q);
            char key[96];
            snprintf(key, sizeof key, "%.*s", (int)(q - p - 1), p + 1);
            int ok = 0;
            for (size_t a = 0; a < 3; a++)
                ok |= kv_model_hf_key_kind(key, archs[a]) == lists[k].kind;
            ck_assert_msg(ok, "README lists `%s` under %s, model_hf.c does not", key, lists[k].start);
            listed++;
            p = q;
        }
        free(b);
    }
    /* and the table has nothing the README leaves out */
    const char *key;
    int kind;
    for (int i = 0; kv_model_hf_key_at(i, &key, &kind); i++) {
        char bt[100];
        snprintf(bt, sizeof bt, "`%s`", key);
        ck_assert_msg(strstr(readme, bt) != NULL, "model_hf.c's key %s is not in README.md", key);
    }
    ck_assert(listed > 50);
    free(readme);
}
END_TEST

Suite *suite_hf_config(void)
{
    Suite *s = suite_create("hf_config");
    TCase *tc = tcase_create("config");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, config_styles_give_identical_traces);
    tcase_add_test(tc, unknown_keys_warned_once);
    tcase_add_test(tc, refused_keys_are_named);
    tcase_add_test(tc, real_configs_read_without_warnings);
    tcase_add_test(tc, llama3_frequencies_known_values);
    tcase_add_test(tc, factors_rope);
    tcase_add_test(tc, forward_biases_head_dim_llama3_match_reference);
    tcase_add_test(tc, readme_lists_every_key);
    suite_add_tcase(s, tc);
    return s;
}
