/*
 * test_weights.c: weights in their stored precision (kernels/kv_weight.h, the matmul_w op, the
 * loaders' two representations) and the random-checkpoint writer (traces/capture/kv_model_write.h).
 *
 * What must hold, and why it can be exact: converting a stored weight to fp32 is exact for F32, F16
 * and BF16 and is the same sequence of fp32 operations for every block type whether it happens at
 * load or a tile at a time during the product; matmul_w then makes, for each output tile, the very
 * BLAS call matmul makes on the converted matrix. So logits, Q/K/V and every statistic of a trace
 * are the same bits either way, and at any thread count. The tests check exactly that (memcmp), on
 * random blocks of every type, on tiny models of every format (llama2.c int8, GGUF F16/Q8_0 with
 * Qwen2's row order and biases, Hugging Face F32/F16/BF16 from the writer), on whole captured traces
 * (with and without the writer thread), and on the real SmolLM2 Q4_1 file when it is present.
 */
#include "kernels/kv_backend.h"
#include "kernels/kv_weight.h"
#include "sim/common/kv_common.h"
#include "tests/capture_fixtures.h"
#include "tests/gguf_fixture.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_capture.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_gguf.h"
#include "traces/capture/kv_model.h"
#include "traces/capture/kv_model_write.h"
#include "traces/kv_trace.h"

#include <check.h>
#include <json.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static char g_smol[512];

static uint64_t g_rng = 0x1234567;
static uint32_t rnd(void)
{
    g_rng = g_rng * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(g_rng >> 32);
}

/* n random bytes whose 16-bit halves read as finite halves, bfloat16s and floats (bit 6 of every odd
 * byte clear keeps every exponent field below its maximum), so every block type decodes to finite
 * values: the scales sit at even offsets of blocks of even size. */
static unsigned char *random_blocks(size_t n)
{
    unsigned char *b = malloc(n);
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(rnd() >> 8) & (i % 2 ? 0xBF : 0xFF);
    return b;
}

static float *random_floats(size_t n, float scale)
{
    float *x = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        x[i] = scale * ((float)(rnd() >> 8) / 16777216.0f - 0.5f);
    return x;
}

static const int g_types[] = {KV_WT_F32,  KV_WT_F16,  KV_WT_BF16, KV_WT_Q4_0, KV_WT_Q4_1, KV_WT_Q5_0,
                              KV_WT_Q5_1, KV_WT_Q8_0, KV_WT_Q4_K, KV_WT_Q5_K, KV_WT_Q6_K};

/* A rows x cols weight of `type` over fresh random bytes (and scales for the llama2.c groups). */
static kv_weight_t random_weight(int type, int rows, int cols, int perm, void **bytes, void **scales)
{
    kv_weight_t w;
    memset(&w, 0, sizeof w);
    w.type = type, w.rows = rows, w.cols = cols, w.perm = perm;
    *scales = NULL;
    if (type == KV_WT_Q8_GROUPS) {
        w.group = 24; /* straddles rows of 40 */
        const size_t n = (size_t)rows * cols, ng = (n + 23) / 24;
        *scales = random_floats(ng + 1, 0.05f);
        w.scales = (const unsigned char *)*scales + 1; /* at an odd address: read unaligned */
        *bytes = random_blocks(n);
        w.data = *bytes;
    }
    ck_assert_msg(type == KV_WT_Q8_GROUPS || kv_weight_set_layout(&w, "test") == KV_OK, "%s", kv_last_error());
    if (type == KV_WT_Q8_GROUPS) {
        ck_assert_int_eq(kv_weight_set_layout(&w, "test"), KV_OK);
        return w;
    }
    *bytes = random_blocks(kv_weight_bytes(&w) + 2);
    w.data = (const unsigned char *)*bytes + 2; /* not 4-byte aligned, as in safetensors: fp32 is copied too */
    return w;
}

/* Rows of a tile, reordered or not, equal the whole tensor's dequantisation (gguf.c's path). */
START_TEST(rows_equal_whole_tensor)
{
    for (size_t ti = 0; ti < KV_ARRAY_LEN(g_types); ti++) {
        const int type = g_types[ti], rows = 12, cols = 512;
        void *bytes, *sc;
        kv_weight_t w = random_weight(type, rows, cols, 0, &bytes, &sc);
        float *whole = malloc(sizeof(float) * rows * cols), *part = malloc(sizeof(float) * rows * cols);
        ck_assert_int_eq(kv_gguf_dequant(type, w.data, (uint64_t)rows * cols, whole), KV_OK);
        kv_weight_rows(&w, 0, 5, part);
        kv_weight_rows(&w, 5, rows - 5, part + 5 * cols);
        ck_assert_msg(!memcmp(whole, part, sizeof(float) * rows * cols), "%s: rows differ from the tensor",
                      kv_weight_type_name(type));
        for (int i = 0; i < rows * cols; i++)
            ck_assert_msg(isfinite(whole[i]), "%s: value %d not finite", kv_weight_type_name(type), i);
        /* rotate_half rows (perm 4): logical row 2i + j of a head is stored row j*2 + i */
        w.perm = 4;
        kv_weight_rows(&w, 0, rows, part);
        for (int r = 0; r < rows; r++) {
            const int h = r / 4, i = r % 4, stored = h * 4 + (i % 2) * 2 + i / 2;
            ck_assert(!memcmp(part + (size_t)r * cols, whole + (size_t)stored * cols, sizeof(float) * cols));
        }
        free(whole), free(part), free(bytes), free(sc);
    }
    /* llama2.c's groups straddle rows: element e has scale e / group */
    void *bytes, *sc;
    kv_weight_t w = random_weight(KV_WT_Q8_GROUPS, 7, 40, 0, &bytes, &sc);
    float *y = malloc(sizeof(float) * 7 * 40);
    kv_weight_rows(&w, 0, 7, y);
    for (int e = 0; e < 7 * 40; e++) {
        float s;
        memcpy(&s, (const unsigned char *)w.scales + 4 * (e / 24), 4);
        ck_assert(y[e] == (float)((const int8_t *)w.data)[e] * s);
    }
    free(y), free(bytes), free(sc);
}
END_TEST

/* matmul_w == matmul on the weights converted to fp32, bit for bit, at 1 and 2 threads, for every
 * type and tile shape (two n-tiles, one and two m-tiles, a single row). */
START_TEST(matmul_w_is_matmul_on_converted_weights)
{
    const int Ms[] = {1, 5, 130}, N = 520, K = 256;
    kv_backend_t *be1, *be2;
    ck_assert_int_eq(kv_backend_open("cpu", 1, &be1), KV_OK);
    ck_assert_int_eq(kv_backend_open("cpu", 2, &be2), KV_OK);
    const int types[] = {KV_WT_F32,  KV_WT_F16,  KV_WT_BF16, KV_WT_Q4_0, KV_WT_Q4_1, KV_WT_Q5_0,
                         KV_WT_Q5_1, KV_WT_Q8_0, KV_WT_Q4_K, KV_WT_Q5_K, KV_WT_Q6_K, KV_WT_Q8_GROUPS};
    for (size_t ti = 0; ti < KV_ARRAY_LEN(types); ti++)
        for (int perm = 0; perm <= 8; perm += 8)
            for (size_t mi = 0; mi < KV_ARRAY_LEN(Ms); mi++) {
                const int M = Ms[mi];
                void *bytes, *sc;
                kv_weight_t w = random_weight(types[ti], N, K, perm, &bytes, &sc);
                float *W = malloc(sizeof(float) * N * K), *x = random_floats((size_t)M * K, 2.0f);
                float *ref = malloc(sizeof(float) * M * N), *y1 = malloc(sizeof(float) * M * N),
                      *y2 = malloc(sizeof(float) * M * N);
                kv_weight_rows(&w, 0, N, W);
                omp_set_num_threads(1);
                ck_assert_int_eq(be1->ops->matmul(be1, ref, x, W, M, N, K), KV_OK);
                ck_assert_int_eq(be1->ops->matmul_w(be1, y1, x, &w, M), KV_OK);
                omp_set_num_threads(2);
                ck_assert_int_eq(be2->ops->matmul_w(be2, y2, x, &w, M), KV_OK);
                ck_assert_msg(!memcmp(ref, y1, sizeof(float) * M * N), "%s perm %d M=%d: matmul_w != matmul",
                              kv_weight_type_name(types[ti]), perm, M);
                ck_assert_msg(!memcmp(y1, y2, sizeof(float) * M * N), "%s perm %d M=%d: 1 vs 2 threads differ",
                              kv_weight_type_name(types[ti]), perm, M);
                free(W), free(x), free(ref), free(y1), free(y2), free(bytes), free(sc);
            }
    kv_backend_close(be1);
    kv_backend_close(be2);
}
END_TEST

/* ---------------------------------------------------------------- models */

/* Logits of all n tokens (malloc'd) on a CPU backend of `threads` threads. */
static float *logits_of(const kv_model_t *m, const int32_t *tok, int n, int threads)
{
    kv_backend_t *be;
    ck_assert_int_eq(kv_backend_open("cpu", threads, &be), KV_OK);
    kv_fwd_t *f;
    ck_assert_msg(kv_fwd_create(m, be, n, 7 /* blocks of 7: several prefill blocks */, &f) == KV_OK, "%s",
                  kv_last_error());
    float *lg = malloc(sizeof(float) * (size_t)n * m->cfg.vocab_size);
    ck_assert_msg(kv_fwd_run(f, tok, n, 0, lg, 1, NULL, NULL) == KV_OK, "%s", kv_last_error());
    kv_fwd_free(f);
    kv_backend_close(be);
    return lg;
}

/* The model at `path` as stored and converted at load: the same logits, bit for bit, at 1 and 2
 * threads; the stored one holds its matrices in `want_type` and no fp32 matrices. */
static void same_logits_both_ways(const char *path, int want_type, const char *what)
{
    kv_model_t *ms, *mf;
    ck_assert_msg(kv_model_load(path, &ms) == KV_OK, "%s: %s", what, kv_last_error());
    ck_assert_msg(kv_model_load_f32(path, &mf) == KV_OK, "%s: %s", what, kv_last_error());
    ck_assert_msg(ms->layers && !ms->wq && !mf->layers && mf->wq, "%s: representations", what);
    ck_assert_int_eq(kv_model_weight(ms, 0, KV_MW_GATE).type, want_type);
    ck_assert_int_eq(kv_model_weight(mf, 0, KV_MW_GATE).type, KV_WT_F32);
    ck_assert_uint_eq(ms->n_params, mf->n_params);
    ck_assert(ms->weight_bytes < mf->weight_bytes || want_type == KV_WT_F32);
    int32_t tok[19];
    for (int i = 0; i < 19; i++)
        tok[i] = (int32_t)(1 + (i * 37) % (ms->cfg.vocab_size - 1));
    const size_t n = (size_t)19 * ms->cfg.vocab_size;
    float *a = logits_of(ms, tok, 19, 1), *b = logits_of(mf, tok, 19, 1), *c = logits_of(ms, tok, 19, 2);
    for (size_t i = 0; i < n; i++)
        ck_assert_msg(isfinite(a[i]), "%s: logit %zu is %g", what, i, (double)a[i]);
    ck_assert_msg(!memcmp(a, b, n * sizeof(float)), "%s: stored and fp32-at-load logits differ", what);
    ck_assert_msg(!memcmp(a, c, n * sizeof(float)), "%s: 1 and 2 threads differ", what);
    free(a), free(b), free(c);
    kv_model_free(ms);
    kv_model_free(mf);
}

START_TEST(llama2c_int8_stored_equals_f32)
{
    fx_model_t x;
    fx_model_init(&x, 48, 72, 2, 4, 2, 272, 64, 0, 77);
    size_t n;
    unsigned char *b = fx_model_v2(&x, 16, &n, NULL);
    char path[512];
    kv_test_tmp("weights-v2.bin", path, sizeof path);
    ck_assert_int_eq(fx_write(path, b, n), 0);
    same_logits_both_ways(path, KV_WT_Q8_GROUPS, "llama2.c v2");
    free(b);
    fx_model_free(&x);
}
END_TEST

START_TEST(gguf_stored_equals_f32)
{
    /* qwen2: q/k rows in NEOX order (the descriptor's perm) with biases; llama: interleaved */
    const char *archs[2] = {"llama", "qwen2"};
    const int types[2] = {KV_GGML_F16, KV_GGML_Q8_0};
    for (int a = 0; a < 2; a++)
        for (int t = 0; t < 2; t++) {
            const int D = 64, H = 96, L = 2, NH = 4, NKV = 2, V = 300, Q = 64, KVD = 32;
            float *emb = random_floats((size_t)V * D, 1.0f), *wq = random_floats((size_t)L * Q * D, 0.5f);
            float *wk = random_floats((size_t)L * KVD * D, 0.5f), *wv = random_floats((size_t)L * KVD * D, 0.5f);
            float *wo = random_floats((size_t)L * D * Q, 0.5f), *w1 = random_floats((size_t)L * H * D, 0.5f);
            float *w2 = random_floats((size_t)L * D * H, 0.5f), *w3 = random_floats((size_t)L * H * D, 0.5f);
            float *cls = random_floats((size_t)V * D, 0.5f), *ones = malloc(sizeof(float) * (size_t)L * D);
            float *bq = random_floats((size_t)L * Q, 0.5f), *bk = random_floats((size_t)L * KVD, 0.5f),
                  *bv = random_floats((size_t)L * KVD, 0.5f);
            for (int i = 0; i < L * D; i++)
                ones[i] = 1.0f + 0.01f * (float)(i % 7);
            const int qwen = a == 1;
            gf_model_t g = {archs[a], D,  H,  L,    NH, NKV, V,  64,   0,   0,    10000.0f, 1e-5f, emb,      ones, wq,
                            wk,       wv, wo, ones, w1, w2,  w3, ones, cls, NULL, NULL,     NULL,  types[t], qwen, 0};
            if (qwen)
                g.bq = bq, g.bk = bk, g.bv = bv;
            gf_writer_t w;
            gf_init(&w, 3);
            gf_add_model(&w, &g, NULL);
            size_t len;
            unsigned char *f = gf_finish(&w, &len);
            char path[512], what[64];
            kv_test_tmp("weights.gguf", path, sizeof path);
            ck_assert_int_eq(fx_write(path, f, len), 0);
            snprintf(what, sizeof what, "GGUF %s %s", archs[a], kv_weight_type_name(types[t]));
            same_logits_both_ways(path, types[t], what);
            free(f);
            gf_free(&w);
            float *all[] = {emb, wq, wk, wv, wo, w1, w2, w3, cls, ones, bq, bk, bv};
            for (size_t i = 0; i < KV_ARRAY_LEN(all); i++)
                free(all[i]);
        }
}
END_TEST

/* A tiny random checkpoint (the writer's) of dtype `dtype`, sharded when shard_bytes is small. */
static void tiny_checkpoint(const char *name, int dtype, uint64_t shard_bytes, char *dir, size_t len)
{
    kv_model_write_opts_t o;
    ck_assert_int_eq(kv_model_write_preset("tiny", &o), KV_OK);
    o.dtype = dtype;
    o.shard_bytes = shard_bytes;
    o.seed = 5;
    kv_test_tmp(name, dir, len);
    kv_model_write_result_t r;
    ck_assert_msg(kv_model_write_random(&o, dir, &r) == KV_OK, "%s", kv_last_error());
}

START_TEST(hf_stored_equals_f32)
{
    const int dtypes[3] = {KV_WT_F32, KV_WT_F16, KV_WT_BF16};
    for (int i = 0; i < 3; i++) {
        char dir[512], what[64];
        tiny_checkpoint("weights-hf", dtypes[i], 1000000000ull, dir, sizeof dir);
        snprintf(what, sizeof what, "Hugging Face %s", kv_weight_type_name(dtypes[i]));
        same_logits_both_ways(dir, dtypes[i], what);
    }
}
END_TEST

/* ---------------------------------------------------------------- the checkpoint writer */

static json_object *read_json_file(const char *path)
{
    size_t n;
    char *text = kv_test_read_file(path, &n);
    json_object *j = json_tokener_parse(text);
    ck_assert_msg(j != NULL, "%s: not JSON", path);
    free(text);
    return j;
}

/* The index names every tensor of the shards once, in the file that holds it; total_size is the sum
 * of their bytes; the shards parse as safetensors; the checkpoint loads, runs (finite logits) and the
 * bytes are a function of the options. */
START_TEST(writer_index_and_shards_are_valid)
{
    char dir[512], path[700];
    tiny_checkpoint("writer", KV_WT_BF16, 60000, dir, sizeof dir);
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    json_object *idx = read_json_file(path), *meta, *wm, *ts;
    ck_assert(json_object_object_get_ex(idx, "weight_map", &wm));
    ck_assert(json_object_object_get_ex(idx, "metadata", &meta) && json_object_object_get_ex(meta, "total_size", &ts));
    const int n_names = json_object_object_length(wm);
    ck_assert_int_eq(n_names, 2 + 9 * 2 + 1); /* embedding, 2 layers of 9, norm, untied lm_head */
    uint64_t total = 0;
    int found = 0, shards = 0;
    json_object_object_foreach(wm, tname, fv)
    {
        const char *file = json_object_get_string(fv);
        ck_assert(strstr(file, "model-") == file && strstr(file, ".safetensors"));
        snprintf(path, sizeof path, "%s/%s", dir, file);
        size_t len;
        unsigned char *b = kv_test_read_file(path, &len);
        uint64_t hl = 0;
        for (int i = 7; i >= 0; i--)
            hl = hl << 8 | b[i];
        ck_assert(hl % 8 == 0 && 8 + hl <= len);
        char *hdr = strndup((const char *)b + 8, (size_t)hl);
        json_object *h = json_tokener_parse(hdr), *e, *offs;
        ck_assert_msg(h != NULL, "%s: header is not JSON", path);
        ck_assert_msg(json_object_object_get_ex(h, tname, &e), "%s is not in %s", tname, file);
        ck_assert(json_object_object_get_ex(e, "data_offsets", &offs));
        const uint64_t b0 = (uint64_t)json_object_get_int64(json_object_array_get_idx(offs, 0));
        const uint64_t b1 = (uint64_t)json_object_get_int64(json_object_array_get_idx(offs, 1));
        ck_assert(b1 > b0 && 8 + hl + b1 <= len);
        total += b1 - b0;
        found++;
        json_object_put(h);
        free(hdr);
        free(b);
        int k = 0;
        sscanf(file, "model-%*d-of-%d.safetensors", &k);
        shards = k;
    }
    ck_assert_int_eq(found, n_names);
    ck_assert_uint_eq(total, (uint64_t)json_object_get_int64(ts));
    ck_assert_int_gt(shards, 1);
    json_object_put(idx);
    /* it loads as sharded bf16 and runs */
    kv_model_t *m;
    ck_assert_msg(kv_model_load(dir, &m) == KV_OK, "%s", kv_last_error());
    ck_assert_int_eq(m->n_files, 2 + shards);
    ck_assert_str_eq(m->hf_dtype, "BF16");
    ck_assert_int_eq(m->cfg.vocab_size, 512);
    kv_model_free(m);
    same_logits_both_ways(dir, KV_WT_BF16, "writer's checkpoint");
    /* the same options give the same bytes; a folder with files is refused without force */
    char dir2[512];
    tiny_checkpoint("writer2", KV_WT_BF16, 60000, dir2, sizeof dir2);
    for (int s = 1; s <= shards; s++) {
        char p1[700], p2[700];
        snprintf(p1, sizeof p1, "%s/model-%05d-of-%05d.safetensors", dir, s, shards);
        snprintf(p2, sizeof p2, "%s/model-%05d-of-%05d.safetensors", dir2, s, shards);
        size_t l1, l2;
        unsigned char *a = kv_test_read_file(p1, &l1), *b = kv_test_read_file(p2, &l2);
        ck_assert_msg(l1 == l2 && !memcmp(a, b, l1), "shard %d differs between two runs", s);
        free(a), free(b);
    }
    kv_model_write_opts_t o;
    ck_assert_int_eq(kv_model_write_preset("tiny", &o), KV_OK);
    ck_assert_int_ne(kv_model_write_random(&o, dir, NULL), KV_OK);
    ck_assert_msg(strstr(kv_last_error(), "not empty") != NULL, "%s", kv_last_error());
    ck_assert_int_ne(kv_model_write_preset("llama9", &o), KV_OK);
    ck_assert_msg(strstr(kv_last_error(), "llama3-8b") != NULL, "%s", kv_last_error());
    /* no temporary file is left behind */
    snprintf(path, sizeof path, "ls -a %s | grep -q tmp", dir);
    ck_assert_int_ne(system(path), 0);
}
END_TEST

/* ---------------------------------------------------------------- traces */

/* Every tensor of every layer of two traces holds the same bits. */
static void same_traces(const char *p1, const char *p2, const char *what)
{
    kv_trace_t *a, *b;
    ck_assert_msg(kv_trace_open(p1, &a) == KV_OK, "%s", kv_last_error());
    ck_assert_msg(kv_trace_open(p2, &b) == KV_OK, "%s", kv_last_error());
    const kv_trace_meta_t *m = kv_trace_meta(a);
    ck_assert_int_eq(m->n_tokens, kv_trace_meta(b)->n_tokens);
    ck_assert(!memcmp(m->tokens, kv_trace_meta(b)->tokens, sizeof(int32_t) * (size_t)m->n_tokens));
    int compared = 0;
    for (int t = 0; t < KV_T_COUNT; t++) {
        if (!kv_trace_has(a, (kv_tensor_t)t))
            continue;
        ck_assert(kv_trace_has(b, (kv_tensor_t)t));
        const size_t n = kv_tensor_numel(m, (kv_tensor_t)t);
        float *x = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n);
        for (int l = 0; l < m->n_layers; l++) {
            ck_assert_int_eq(kv_trace_read(a, l, (kv_tensor_t)t, x), KV_OK);
            ck_assert_int_eq(kv_trace_read(b, l, (kv_tensor_t)t, y), KV_OK);
            ck_assert_msg(!memcmp(x, y, sizeof(float) * n), "%s: %s of layer %d differs", what,
                          kv_tensor_name((kv_tensor_t)t), l);
            compared++;
        }
        free(x), free(y);
    }
    ck_assert_int_ge(compared, 6 * m->n_layers);
    kv_trace_close(a);
    kv_trace_close(b);
}

/* A capture of `model` on `ids` into `out` with the weights stored or at fp32, the writer thread on or
 * off, on `threads` threads; its result. */
static kv_capture_result_t capture(const char *model, const int32_t *ids, int n, int n_decode, int f32, int no_thread,
                                   int threads, const char *name, char *out, size_t len)
{
    kv_capture_opts_t o;
    kv_capture_opts_init(&o);
    o.model_path = model;
    o.ids = ids;
    o.n_ids = n;
    o.n_decode = n_decode;
    o.backend = "cpu";
    o.n_threads = threads;
    o.weights_f32 = f32;
    o.no_writer_thread = no_thread;
    o.with_wo = 1;
    o.out_path = kv_test_tmp(name, out, len);
    kv_capture_result_t r;
    ck_assert_msg(kv_capture_run(&o, &r) == KV_OK, "%s", kv_last_error());
    return r;
}

START_TEST(capture_same_bytes_stored_f32_threaded)
{
    char dir[512], p1[512], p2[512], p3[512];
    tiny_checkpoint("trace-ckpt", KV_WT_BF16, 1000000000ull, dir, sizeof dir);
    int32_t ids[40];
    for (int i = 0; i < 40; i++)
        ids[i] = (int32_t)(3 + (i * 91) % 500);
    kv_capture_result_t r = capture(dir, ids, 40, 6, 0, 0, 2, "stored.h5", p1, sizeof p1);
    ck_assert_int_eq(r.writer_threaded, 1);
    ck_assert(r.mem_weights > 0 && r.mem_cache > 0 && r.mem_trace > 0 && r.mem_activations > 0);
    ck_assert(r.peak_rss > 0 && r.prefill_compute_s > 0);
    char text[512];
    ck_assert(strstr(kv_capture_memory_text(&r, text, sizeof text), "KV cache") != NULL);
    capture(dir, ids, 40, 6, 1, 1, 1, "f32.h5", p2, sizeof p2);
    capture(dir, ids, 40, 6, 0, 1, 1, "inline.h5", p3, sizeof p3);
    same_traces(p1, p2, "stored (2 threads, writer thread) vs fp32 at load (1 thread, inline)");
    same_traces(p1, p3, "writer thread vs inline");
}
END_TEST

/* The real SmolLM2 file (Q4_1 matrices, a Q8_0 embedding): the trace of the stored weights is the trace
 * of the weights dequantised at load, byte for byte. */
START_TEST(smollm2_trace_same_bytes)
{
    char p1[512], p2[512];
    int32_t ids[96];
    for (int i = 0; i < 96; i++)
        ids[i] = (int32_t)(20 + (i * 7919) % 48000);
    kv_capture_result_t r = capture(g_smol, ids, 96, 4, 0, 0, 2, "smol-stored.h5", p1, sizeof p1);
    capture(g_smol, ids, 96, 4, 1, 0, 2, "smol-f32.h5", p2, sizeof p2);
    same_traces(p1, p2, "SmolLM2 Q4_1 stored vs dequantised at load");
    /* the mapped file is all the weight memory: 92 MiB as stored, where fp32 would be 513 MiB */
    ck_assert_uint_lt(r.mem_weights, 100u << 20);
}
END_TEST

Suite *suite_weights(void)
{
    Suite *s = suite_create("weights");
    TCase *tc = tcase_create("weights");
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, rows_equal_whole_tensor);
    tcase_add_test(tc, matmul_w_is_matmul_on_converted_weights);
    tcase_add_test(tc, llama2c_int8_stored_equals_f32);
    tcase_add_test(tc, gguf_stored_equals_f32);
    tcase_add_test(tc, hf_stored_equals_f32);
    tcase_add_test(tc, writer_index_and_shards_are_valid);
    tcase_add_test(tc, capture_same_bytes_stored_f32_threaded);
    if (kv_test_shared("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", g_smol, sizeof g_smol))
        tcase_add_test(tc, smollm2_trace_same_bytes);
    else
        kv_test_skip("weights/smollm2_trace_same_bytes", "models/SmolLM2-135M-Instruct not found");
    suite_add_tcase(s, tc);
    return s;
}
