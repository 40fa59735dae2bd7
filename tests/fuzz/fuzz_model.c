/*
 * fuzz_model.c: libFuzzer harness for the llama2.c checkpoint loader (traces/capture/model.c).
 *
 * Each input is written to a temporary file and loaded (the loader maps files, so a file it must
 * be). A checkpoint it accepts is checked and run:
 *   - every weight tensor lies inside the mapped file (version 0, 1) or the dequantised buffer
 *     (version 2), with counts recomputed here from the configuration (the map is not watched by
 *     AddressSanitizer, so a loader that points past the end would otherwise go unnoticed);
 *   - a forward pass of up to 4 tokens on the CPU backend, which reads every weight.
 * Not part of `make test`. Build and run (seeds from tests/fuzz/make_seeds.c):
 *   make fuzz FUZZ_TIME=300          # all harnesses, 300 s each, corpora in build-fuzz/corpus/
 * or by hand:
 *   make BUILD=build-fuzz CC=clang NVCC= CFLAGS="-O1 -g -fsanitize=fuzzer-no-link,address" build-fuzz/libkvsim.a
 *   clang -O1 -g -fsanitize=fuzzer,address -fopenmp -I. tests/fuzz/fuzz_model.c build-fuzz/libkvsim.a \
 *       $(pkg-config --libs hdf5 libzstd cairo openblas libcrypto) -lm -o build-fuzz/fuzz_model
 *   build-fuzz/fuzz_model -max_len=65536 -max_total_time=300 CORPUS_DIR SEED_DIR
 */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "traces/capture/kv_forward.h"
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
    snprintf(g_path, sizeof g_path, "/tmp/kvsim-fuzz-model-%d.bin", (int)getpid());
    if (kv_backend_cpu_open(1, &g_be) != KV_OK)
        abort();
    return 0;
}

static void inside(const float *p, uint64_t n, const void *base, size_t bytes, const char *what)
{
    const char *b = base, *s = (const char *)p;
    if (s < b || (uint64_t)(s - b) + 4 * n > bytes) {
        fprintf(stderr, "fuzz_model: %s [%p + %llu floats] outside [%p + %zu bytes]\n", what, (const void *)p,
                (unsigned long long)n, base, bytes);
        abort();
    }
}

static void check_bounds(const kv_model_t *m)
{
    const kv_model_config_t *c = &m->cfg;
    const uint64_t L = (uint64_t)c->n_layers, D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim;
    const uint64_t KV = (uint64_t)c->kv_dim, V = (uint64_t)c->vocab_size;
    const void *base = m->owned ? (const void *)m->owned : m->map;
    const size_t bytes = m->owned ? (size_t)(m->n_params * 4) : m->map_len;
    struct {
        const float *p;
        uint64_t n;
        const char *name;
    } t[] = {
        {m->token_embedding, V * D, "token_embedding"}, {m->rms_att, L * D, "rms_att"}, {m->wq, L * D * D, "wq"},
        {m->wk, L * KV * D, "wk"}, {m->wv, L * KV * D, "wv"}, {m->wo, L * D * D, "wo"}, {m->rms_ffn, L * D, "rms_ffn"},
        {m->w1, L * H * D, "w1"}, {m->w2, L * D * H, "w2"}, {m->w3, L * H * D, "w3"}, {m->rms_final, D, "rms_final"},
        {m->wcls, V * D, "wcls"},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        inside(t[i].p, t[i].n, base, bytes, t[i].name);
    if (c->head_dim * c->n_heads != c->dim || c->n_heads % c->n_kv_heads || c->head_dim % 2)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    FILE *f = fopen(g_path, "wb");
    if (!f)
        abort();
    fwrite(data, 1, size, f);
    fclose(f);
    kv_model_t *m = NULL;
    if (kv_model_load(g_path, &m) != KV_OK) {
        if (m || !strstr(kv_last_error(), g_path)) {
            fprintf(stderr, "fuzz_model: failure without the file named: %s\n", kv_last_error());
            abort();
        }
        return 0;
    }
    check_bounds(m);
    const int T = m->cfg.seq_len < 4 ? m->cfg.seq_len : 4;
    kv_fwd_t *fw = NULL;
    if (kv_fwd_create(m, g_be, T, T, &fw) == KV_OK) {
        int32_t tok[4];
        for (int i = 0; i < T; i++)
            tok[i] = (int32_t)((i == 0 ? KV_BOS : data[i % size]) % m->cfg.vocab_size);
        float *logits = kv_malloc(sizeof(float) * (size_t)m->cfg.vocab_size * (size_t)T, "logits");
        if (logits && kv_fwd_run(fw, tok, T, 0, logits, 1, NULL, NULL) != KV_OK)
            abort(); /* a loaded model must run */
        kv_free(logits);
        kv_fwd_free(fw);
    }
    kv_model_free(m);
    return 0;
}
