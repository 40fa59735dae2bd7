/*
 * fuzz_model.c: libFuzzer harness for the llama2.c checkpoint loader (traces/capture/model.c).
 *
 * Each input is written to a temporary file and loaded (the loader maps files, so a file it must
 * be); with bit 0 of the first byte set, the file is cut or padded to the size its header implies
 * (random bytes almost never have a consistent size). A checkpoint it accepts is checked and run:
 *   - every weight tensor lies inside the mapped file, as stored (version 2's int8 and scales) and
 *     after the conversion to fp32 (versions 0 and 1: the mapping itself; version 2: the dequantised
 *     buffer), with counts recomputed here from the configuration (the map is not watched by
 *     AddressSanitizer, so a loader that points past the end would otherwise go unnoticed);
 *   - a forward pass of up to 4 tokens on the CPU backend, which reads every weight, both ways.
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
#include "tests/fuzz/fuzz_forward.h"
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
    const void *base = m->owned ? (const void *)m->owned : m->maps[0];
    const size_t bytes = m->owned ? (size_t)(m->n_params * 4) : m->map_len[0];
    struct {
        const float *p;
        uint64_t n;
        const char *name;
    } t[] = {
        {m->token_embedding, V * D, "token_embedding"},
        {m->rms_att, L * D, "rms_att"},
        {m->wq, L * D * D, "wq"},
        {m->wk, L * KV * D, "wk"},
        {m->wv, L * KV * D, "wv"},
        {m->wo, L * D * D, "wo"},
        {m->rms_ffn, L * D, "rms_ffn"},
        {m->w1, L * H * D, "w1"},
        {m->w2, L * D * H, "w2"},
        {m->w3, L * H * D, "w3"},
        {m->rms_final, D, "rms_final"},
        {m->wcls, V * D, "wcls"},
    };
    for (size_t i = 0; i < sizeof t / sizeof t[0]; i++)
        inside(t[i].p, t[i].n, base, bytes, t[i].name);
    if (c->head_dim * c->n_heads != c->dim || c->n_heads % c->n_kv_heads || c->head_dim % 2)
        abort();
}

static int32_t rd32(const uint8_t *b)
{
    int32_t v;
    memcpy(&v, b, 4);
    return v;
}

/* The file size a header implies (0 when the header is too odd to say or the size is over 1 MiB),
 * computed here apart from the loader: fp32 floats of every tensor (+ legacy freq_cis, + separate
 * classifier), or for Q8_0 the norms in fp32 then int8 values and one fp32 scale per group. */
static uint64_t implied_size(const uint8_t *b, size_t n)
{
    if (n < 41)
        return 0;
    const int versioned = rd32(b) == (int32_t)KV_LLAMA2C_MAGIC, version = versioned ? rd32(b + 4) : 0;
    const uint8_t *h = b + (versioned ? 8 : 0);
    int64_t D = rd32(h), H = rd32(h + 4), L = rd32(h + 8), NH = rd32(h + 12), NKV = rd32(h + 16);
    int64_t V = rd32(h + 20), S = rd32(h + 24);
    const int sep = versioned ? b[36] == 0 : V < 0;
    if (V < 0)
        V = -V;
    if (D <= 0 || H <= 0 || L <= 0 || NH <= 0 || NKV <= 0 || V <= 0 || S <= 0 || D > 4096 || H > 4096 || L > 64 ||
        V > 65536 || S > 65536 || D % NH)
        return 0;
    const int64_t hd = D / NH, KV = NKV * hd;
    const int64_t quant = V * D * (1 + sep) + L * (2 * D * D + 2 * KV * D + 3 * H * D), norms = 2 * L * D + D;
    if (version == 2) {
        int32_t gs;
        memcpy(&gs, b + 37, 4);
        if (gs <= 0 || quant % gs)
            return 0;
        uint64_t need = 256 + 4 * (uint64_t)norms + (uint64_t)quant + 4 * (uint64_t)(quant / gs);
        return need <= (1u << 20) ? need : 0;
    }
    uint64_t need = (versioned ? 256 : 28) + 4 * (uint64_t)(quant + norms + (versioned ? 0 : S * hd));
    return need <= (1u << 20) ? need : 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    /* byte 0, bit 0: "fit" the rest to the size its header implies (cut, or padded by repeating it),
     * so that the fuzzer explores dimensions and weights, not only file sizes */
    const int fit = data[0] & 1;
    data++, size--;
    uint64_t want = fit ? implied_size(data, size) : 0;
    FILE *f = fopen(g_path, "wb");
    if (!f)
        abort();
    if (want && size) {
        for (uint64_t w = 0; w < want;) {
            size_t k = (size_t)(want - w < size ? want - w : size);
            fwrite(data, 1, k, f);
            w += k;
        }
    } else {
        fwrite(data, 1, size, f);
    }
    fclose(f);
    kv_model_t *m = NULL;
    if (kv_model_load(g_path, &m) != KV_OK) {
        if (m || !strstr(kv_last_error(), g_path)) {
            fprintf(stderr, "fuzz_model: failure without the file named: %s\n", kv_last_error());
            abort();
        }
        return 0;
    }
    /* as stored (version 2's int8 stays in the mapping), then converted to fp32 as kv_model_load_f32 does */
    fuzz_stored_inside(m);
    fuzz_forward(m, g_be, data, size);
    if (kv_model_to_f32(m) != KV_OK)
        abort(); /* a loaded model converts */
    check_bounds(m);
    fuzz_forward(m, g_be, data, size);
    kv_model_free(m);
    return 0;
}
