/*
 * fuzz_gguf.c: libFuzzer harness for the GGUF reader (traces/capture/gguf.c) and the GGUF model
 * loader (model_gguf.c).
 *
 * Each input is a whole GGUF file, written to a temporary file (the reader maps files). A file the
 * reader accepts is walked through its API: every key with every getter (each may fail, none may
 * crash), the first and last element of every array, every string and tensor checked to lie
 * inside the mapping (the map is not watched by AddressSanitizer, so a reader that points past the
 * end would otherwise go unnoticed), and every tensor of a supported type up to 2^20 values
 * dequantised into a heap buffer of exactly its size. Then the model loader runs on the same file;
 * a model it accepts must have every weight inside its fp32 allocation and run a forward pass of up
 * to 4 tokens on the CPU backend, which reads every weight (biases and q_dim != dim included). A failure must name the file.
 * Not part of `make test`: `make fuzz FUZZ_NAMES=gguf` (seeds from make_seeds.c: small valid files
 * of both architectures, F32, F16 and Q8_0, and one of every metadata type).
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "tests/fuzz/fuzz_forward.h"
#include "traces/capture/kv_gguf.h"
#include "traces/capture/kv_model.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static kv_backend_t *g_be;
static char g_path[256];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    snprintf(g_path, sizeof g_path, "/tmp/kvsim-fuzz-gguf-%d.gguf", (int)getpid());
    if (kv_backend_cpu_open(1, &g_be) != KV_OK)
        abort();
    return 0;
}

static void inside(const void *p, uint64_t n, const void *base, size_t len, const char *what)
{
    const unsigned char *b = base, *s = p;
    if (s < b || (uint64_t)(s - b) > len || n > len - (uint64_t)(s - b)) {
        fprintf(stderr, "fuzz_gguf: %s [%p + %llu] outside [%p + %zu]\n", what, p, (unsigned long long)n, base, len);
        abort();
    }
}

static void walk(const kv_gguf_t *g)
{
    size_t len;
    const unsigned char *map = kv_gguf_mapping(g, &len);
    for (int i = 0; i < kv_gguf_n_kv(g); i++) {
        const char *k = kv_gguf_key(g, i);
        if (kv_gguf_find(g, k) != i)
            abort(); /* keys are unique: find must give this entry back */
        int64_t v;
        double d;
        int b, et;
        const char *s;
        size_t sl;
        uint64_t n;
        kv_gguf_get_int(g, k, &v);
        kv_gguf_get_float(g, k, &d);
        kv_gguf_get_bool(g, k, &b);
        if (kv_gguf_get_str(g, k, &s, &sl) == KV_OK)
            inside(s, sl, map, len, k);
        if (kv_gguf_get_arr(g, k, &et, &n) == KV_OK && n > 0) {
            const uint64_t idx[3] = {0, n / 2, n - 1};
            for (int j = 0; j < 3; j++) {
                if (kv_gguf_arr_str(g, k, idx[j], &s, &sl) == KV_OK)
                    inside(s, sl, map, len, k);
                kv_gguf_arr_int(g, k, idx[j], &v);
                kv_gguf_arr_float(g, k, idx[j], &d);
            }
            if (kv_gguf_arr_str(g, k, n, &s, &sl) == KV_OK)
                abort(); /* past the end */
        }
    }
    for (int i = 0; i < kv_gguf_n_tensors(g); i++) {
        const kv_gguf_tensor_t *t = kv_gguf_tensor(g, i);
        inside(t->data, t->n_bytes, map, len, t->name);
        if (kv_gguf_find_tensor(g, t->name) != t)
            abort();
        if (!kv_gguf_type_supported(t->type) || t->n_elements > (1u << 20))
            continue;
        float *y = malloc(t->n_elements * sizeof(float) + 1);
        if (!y)
            continue;
        if (kv_gguf_dequant(t->type, t->data, t->n_elements, y) != KV_OK)
            abort(); /* the directory was validated: a supported tensor dequantises */
        free(y);
    }
}

static void check_weights(const kv_model_t *m)
{
    const kv_model_config_t *c = &m->cfg;
    const uint64_t L = (uint64_t)c->n_layers, D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim;
    const uint64_t KV = (uint64_t)c->kv_dim, V = (uint64_t)c->vocab_size, Q = (uint64_t)c->q_dim;
    const size_t bytes = m->n_params * sizeof(float);
    struct {
        const float *p;
        uint64_t n;
        const char *name;
    } t[] = {
        {m->token_embedding, V * D, "token_embedding"},
        {m->rms_att, L * D, "rms_att"},
        {m->wq, L * Q * D, "wq"},
        {m->wk, L * KV * D, "wk"},
        {m->wv, L * KV * D, "wv"},
        {m->wo, L * D * Q, "wo"},
        {m->rms_ffn, L * D, "rms_ffn"},
        {m->w1, L * H * D, "w1"},
        {m->w2, L * D * H, "w2"},
        {m->w3, L * H * D, "w3"},
        {m->rms_final, D, "rms_final"},
        {m->wcls, V * D, "wcls"},
        {m->bq, c->qkv_bias ? L * Q : 0, "bq"},
        {m->bk, c->qkv_bias ? L * KV : 0, "bk"},
        {m->bv, c->qkv_bias ? L * KV : 0, "bv"},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        if (t[i].n)
            inside(t[i].p, 4 * t[i].n, m->owned, bytes, t[i].name);
    if (c->q_dim != c->n_heads * c->head_dim || c->n_heads % c->n_kv_heads || c->head_dim % 2)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FILE *f = fopen(g_path, "wb");
    if (!f)
        abort();
    fwrite(data, 1, size, f);
    fclose(f);
    kv_gguf_t *g = NULL;
    if (kv_gguf_open(g_path, &g) != KV_OK) {
        if (g || !strstr(kv_last_error(), g_path)) {
            fprintf(stderr, "fuzz_gguf: open failed without the file named: %s\n", kv_last_error());
            abort();
        }
        return 0;
    }
    walk(g);
    kv_gguf_close(g);
    kv_model_t *m = NULL;
    if (kv_model_load(g_path, &m) != KV_OK) {
        if (m || !strstr(kv_last_error(), g_path)) {
            fprintf(stderr, "fuzz_gguf: load failed without the file named: %s\n", kv_last_error());
            abort();
        }
        return 0;
    }
    /* as stored (descriptors into the mapping), then dequantised to fp32 as kv_model_load_f32 does */
    fuzz_stored_inside(m);
    fuzz_forward(m, g_be, data, size);
    if (kv_model_to_f32(m) != KV_OK)
        abort(); /* a loaded model converts */
    check_weights(m);
    kv_model_free(m);
    return 0;
}
