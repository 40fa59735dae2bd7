/*
 * model.c: the model family's core: the format dispatch table, the configuration check shared by
 * every loader, the checkpoint hash, the weights' two representations (descriptors of stored matrices,
 * fp32 arrays; kv_model_weight serves both, kv_model_to_f32 turns the first into the second), describe
 * and free (kv_model.h).
 *
 * Formats are probed in table order and the first that claims the path loads it; the last row
 * (llama2.c, whose files have no magic in version 0) claims everything, so a file of an unknown
 * kind gets the llama2.c loader's size and header checks, which name what is wrong.
 */
#include "traces/capture/kv_model.h"

#include "sim/common/kv_common.h"
#include "traces/capture/kv_model_internal.h"

#include <errno.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* Upper bounds well beyond any Llama model; larger values mean a corrupt header. */
#define MAX_DIM 65536
#define MAX_HIDDEN (1 << 20)
#define MAX_LAYERS 1024
#define MAX_VOCAB (1 << 24)
#define MAX_SEQ (1 << 24)

static const kv_model_format_t *const formats[] = {
    &kv_model_format_gguf,
    &kv_model_format_hf,
    &kv_model_format_llama2c,
};

static const kv_model_format_t *format_of(const char *path)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(formats); i++)
        if (formats[i]->probe(path))
            return formats[i];
    return formats[KV_ARRAY_LEN(formats) - 1];
}

const char *kv_model_format_of(const char *path)
{
    return format_of(path)->name;
}

int kv_model_load(const char *path, kv_model_t **out)
{
    *out = NULL;
    const kv_model_format_t *f = format_of(path);
    int rc = f->load(path, out);
    if (rc == KV_OK && !(*out)->format)
        (*out)->format = f->name;
    return rc;
}

int kv_model_load_f32(const char *path, kv_model_t **out)
{
    int rc = kv_model_load(path, out);
    if (rc == KV_OK && (rc = kv_model_to_f32(*out))) {
        kv_model_free(*out);
        *out = NULL;
    }
    return rc;
}

int kv_model_add_map(kv_model_t *m, void *map, size_t len)
{
    void **maps = kv_realloc(m->maps, sizeof *maps * (size_t)(m->n_maps + 1), "mapping list");
    if (maps)
        m->maps = maps;
    size_t *lens = maps ? kv_realloc(m->map_len, sizeof *lens * (size_t)(m->n_maps + 1), "mapping list") : NULL;
    if (lens)
        m->map_len = lens;
    if (!maps || !lens) {
        munmap(map, len);
        return KV_ENOMEM;
    }
    m->maps[m->n_maps] = map;
    m->map_len[m->n_maps++] = len;
    return KV_OK;
}

/* ---- the weights' two representations ---- */

/* Rows and columns of matrix `which` (KV_MW_*). */
static void mw_shape(const kv_model_config_t *c, int which, int *rows, int *cols)
{
    static const int out_in[KV_MW_N][2] = {{0, 1}, {2, 1}, {2, 1}, {1, 0}, {3, 1}, {1, 3}, {3, 1}};
    const int dims[4] = {c->q_dim, c->dim, c->kv_dim, c->hidden_dim};
    *rows = dims[out_in[which][0]];
    *cols = dims[out_in[which][1]];
}

/* The stacked fp32 array of matrix `which` (all layers). */
static const float *mw_f32(const kv_model_t *m, int which)
{
    const float *const p[KV_MW_N] = {m->wq, m->wk, m->wv, m->wo, m->w1, m->w2, m->w3};
    return p[which];
}

kv_weight_t kv_model_weight(const kv_model_t *m, int layer, int which)
{
    if (m->layers)
        return m->layers[layer].w[which];
    int rows, cols;
    mw_shape(&m->cfg, which, &rows, &cols);
    return kv_weight_f32(mw_f32(m, which) + (size_t)layer * rows * cols, rows, cols);
}

kv_weight_t kv_model_embedding(const kv_model_t *m)
{
    if (m->layers)
        return m->emb_w;
    return kv_weight_f32(m->token_embedding, m->cfg.vocab_size, m->cfg.dim);
}

kv_weight_t kv_model_classifier(const kv_model_t *m)
{
    if (m->layers)
        return m->cls_w;
    return kv_weight_f32(m->wcls, m->cfg.vocab_size, m->cfg.dim);
}

/* dst (w->rows, w->cols) = the whole matrix in fp32, converted in chunks of rows on all threads. */
static void convert_all(const kv_weight_t *w, float *dst)
{
    enum { CHUNK = 64 };
    const int nch = (w->rows + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(dynamic, 4)
    for (int ch = 0; ch < nch; ch++) {
        const int r0 = ch * CHUNK;
        kv_weight_rows(w, r0, KV_MIN(CHUNK, w->rows - r0), dst + (size_t)r0 * w->cols);
    }
}

uint64_t kv_model_part_sizes(const kv_model_config_t *c, int bias, uint64_t *sizes)
{
    const uint64_t L = (uint64_t)c->n_layers, D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim;
    const uint64_t V = (uint64_t)c->vocab_size, Q = (uint64_t)c->q_dim, KV = (uint64_t)c->kv_dim;
    const uint64_t B = bias ? 1 : 0;
    const uint64_t s[KV_N_PARTS] = {V * D,      L * D,      L * Q * D, L * KV * D,
                                    L * KV * D, L * D * Q,  L * D,     L * H * D,
                                    L * D * H,  L * H * D,  D,         c->shared_classifier ? 0 : V * D,
                                    B * L * Q,  B * L * KV, B * L * KV};
    uint64_t total = 0;
    for (int i = 0; i < KV_N_PARTS; i++)
        total += sizes[i] = s[i];
    return total;
}

int kv_model_to_f32(kv_model_t *m)
{
    if (!m->layers)
        return KV_OK;
    const kv_model_config_t *c = &m->cfg;
    const size_t L = (size_t)c->n_layers, B = m->bq ? 1 : 0;
    /* one allocation in the order of kv_model.h's pointers */
    enum { EMB, RMS_ATT, WQ, WK, WV, WO, RMS_FFN, W1, W2, W3, RMS_FINAL, WCLS, BQ, BK, BV, NPART };
    _Static_assert((int)NPART == (int)KV_N_PARTS && (int)WCLS == (int)KV_PART_WCLS && (int)BV == (int)KV_PART_BV,
                   "kv_model_internal.h's order");
    uint64_t sizes[KV_N_PARTS];
    const size_t total = (size_t)kv_model_part_sizes(c, (int)B, sizes);
    float *own = kv_malloc_aligned(total * sizeof(float), "model weights");
    if (!own)
        return kv_error_context(KV_ENOMEM, "%s: converting the weights to fp32", m->path);
    float *p[NPART];
    p[0] = own;
    for (int i = 1; i < NPART; i++)
        p[i] = p[i - 1] + sizes[i - 1];
    convert_all(&m->emb_w, p[EMB]);
    if (!c->shared_classifier)
        convert_all(&m->cls_w, p[WCLS]);
    static const int part_of[KV_MW_N] = {WQ, WK, WV, WO, W1, W2, W3};
    for (int k = 0; k < KV_MW_N; k++) {
        int rows, cols;
        mw_shape(c, k, &rows, &cols);
        for (size_t l = 0; l < L; l++)
            convert_all(&m->layers[l].w[k], p[part_of[k]] + l * (size_t)rows * cols);
    }
    memcpy(p[RMS_ATT], m->rms_att, sizes[RMS_ATT] * sizeof(float));
    memcpy(p[RMS_FFN], m->rms_ffn, sizes[RMS_FFN] * sizeof(float));
    memcpy(p[RMS_FINAL], m->rms_final, sizes[RMS_FINAL] * sizeof(float));
    if (B) {
        memcpy(p[BQ], m->bq, sizes[BQ] * sizeof(float));
        memcpy(p[BK], m->bk, sizes[BK] * sizeof(float));
        memcpy(p[BV], m->bv, sizes[BV] * sizeof(float));
    }
    m->token_embedding = p[EMB], m->rms_att = p[RMS_ATT], m->wq = p[WQ], m->wk = p[WK], m->wv = p[WV];
    m->wo = p[WO], m->rms_ffn = p[RMS_FFN], m->w1 = p[W1], m->w2 = p[W2], m->w3 = p[W3];
    m->rms_final = p[RMS_FINAL];
    m->wcls = c->shared_classifier ? p[EMB] : p[WCLS];
    if (B)
        m->bq = p[BQ], m->bk = p[BK], m->bv = p[BV];
    kv_free_aligned(m->owned);
    m->owned = own;
    kv_free(m->layers);
    m->layers = NULL;
    memset(&m->emb_w, 0, sizeof m->emb_w);
    memset(&m->cls_w, 0, sizeof m->cls_w);
    for (int i = 0; i < m->n_maps; i++)
        munmap(m->maps[i], m->map_len[i]);
    m->n_maps = 0;
    m->weight_bytes = total * sizeof(float);
    return KV_OK;
}

size_t kv_model_resident_bytes(const kv_model_t *m)
{
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t bytes = 0;
    unsigned char *vec = NULL;
    size_t vcap = 0;
    for (int i = 0; i < m->n_maps; i++) {
        const size_t pages = (m->map_len[i] + page - 1) / page;
        if (pages > vcap) {
            unsigned char *v = kv_realloc(vec, pages, "residency map");
            if (!v)
                break;
            vec = v;
            vcap = pages;
        }
        if (mincore(m->maps[i], m->map_len[i], vec) != 0)
            continue;
        for (size_t k = 0; k < pages; k++)
            bytes += (vec[k] & 1) ? page : 0;
    }
    kv_free(vec);
    return bytes;
}

const char *kv_model_default_tokenizer(const char *path, char *buf, size_t len)
{
    const kv_model_format_t *f = format_of(path);
    return f->default_tokenizer ? f->default_tokenizer(path, buf, len) : NULL;
}

int kv_model_file_starts_with(const char *path, const void *magic, size_t n)
{
    unsigned char buf[16];
    if (n > sizeof buf)
        return 0;
    FILE *f;
    if (kv_open_input(path, "model", &f) != KV_OK) {
        kv_clear_error();
        return 0; /* not a file this format reads: the loader says why */
    }
    int ok = fread(buf, 1, n, f) == n && !memcmp(buf, magic, n);
    fclose(f);
    return ok;
}

int kv_model_config_check(kv_model_config_t *c, const char *path)
{
    struct {
        const char *name;
        int v, max;
    } dims[] = {
        {"dim", c->dim, MAX_DIM},
        {"hidden_dim", c->hidden_dim, MAX_HIDDEN},
        {"n_layers", c->n_layers, MAX_LAYERS},
        {"n_heads", c->n_heads, MAX_DIM},
        {"n_kv_heads", c->n_kv_heads, MAX_DIM},
        {"vocab_size", c->vocab_size, MAX_VOCAB},
        {"seq_len", c->seq_len, MAX_SEQ},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(dims); i++) {
        if (dims[i].v <= 0)
            return kv_error(KV_EFORMAT, "%s: impossible dimensions: %s is %d (must be positive)", path, dims[i].name,
                            dims[i].v);
        if (dims[i].v > dims[i].max)
            return kv_error(KV_EFORMAT, "%s: absurd dimensions: %s is %d (at most %d is accepted)", path, dims[i].name,
                            dims[i].v, dims[i].max);
    }
    if (c->head_dim < 0 || c->head_dim > 4096)
        return kv_error(KV_EFORMAT, "%s: impossible dimensions: head_dim %d", path, c->head_dim);
    if (c->head_dim == 0) {
        if (c->dim % c->n_heads)
            return kv_error(KV_EFORMAT, "%s: impossible dimensions: n_heads %d does not divide dim %d", path,
                            c->n_heads, c->dim);
        c->head_dim = c->dim / c->n_heads;
    }
    if (c->n_heads % c->n_kv_heads)
        return kv_error(KV_EFORMAT, "%s: impossible dimensions: n_kv_heads %d does not divide n_heads %d", path,
                        c->n_kv_heads, c->n_heads);
    if (c->head_dim % 2)
        return kv_error(KV_EFORMAT, "%s: impossible dimensions: head_dim %d (n_heads %d) is odd, RoPE needs pairs",
                        path, c->head_dim, c->n_heads);
    if ((long long)c->n_heads * c->head_dim > 4 * MAX_DIM)
        return kv_error(KV_EFORMAT, "%s: absurd dimensions: n_heads %d x head_dim %d", path, c->n_heads, c->head_dim);
    c->q_dim = c->n_heads * c->head_dim;
    c->kv_dim = c->n_kv_heads * c->head_dim;
    if (c->rope_theta <= 0)
        c->rope_theta = 10000.0f;
    if (c->norm_eps <= 0)
        c->norm_eps = 1e-5f;
    if (c->head_dim > 2 * KV_ROPE_MAX_PAIRS)
        return kv_error(KV_EFORMAT, "%s: head_dim %d is beyond the %d RoPE supports here", path, c->head_dim,
                        2 * KV_ROPE_MAX_PAIRS);
    if (c->rope.theta <= 0) {
        c->rope = kv_rope_plain(c->rope_theta);
    } else if (c->rope.type == KV_ROPE_FACTORS) {
        for (int i = 0; i < c->head_dim / 2; i++)
            if (!(c->rope.factors[i] > 0) || !isfinite(c->rope.factors[i]))
                return kv_error(KV_EFORMAT, "%s: RoPE frequency factor %d is %g (must be positive and finite)", path, i,
                                (double)c->rope.factors[i]);
    } else if (c->rope.type != KV_ROPE_DEFAULT &&
               !(c->rope.factor > 0 &&
                 (c->rope.type != KV_ROPE_LLAMA3 || (c->rope.original_max_pos > 0 && c->rope.low_freq_factor > 0 &&
                                                     c->rope.high_freq_factor > c->rope.low_freq_factor)))) {
        return kv_error(KV_EFORMAT,
                        "%s: impossible RoPE scaling: factor %g, low_freq_factor %g, high_freq_factor %g, "
                        "original_max_position_embeddings %g",
                        path, c->rope.factor, c->rope.low_freq_factor, c->rope.high_freq_factor,
                        c->rope.original_max_pos);
    }
    if (!c->arch[0])
        snprintf(c->arch, sizeof c->arch, "llama");
    return KV_OK;
}

typedef struct {
    const char *name;
    int count;
} dtype_count_t;

static int cmp_count(const void *a, const void *b)
{
    const dtype_count_t *x = a, *y = b;
    return (y->count > x->count) - (y->count < x->count);
}

void kv_model_set_dtypes(kv_model_t *m, const char *const *names, const int *counts, int n)
{
    dtype_count_t d[32] = {{NULL, 0}};
    int k = 0;
    for (int i = 0; i < n && k < 32; i++)
        if (counts[i] > 0)
            d[k++] = (dtype_count_t){names[i], counts[i]};
    qsort(d, (size_t)k, sizeof *d, cmp_count); /* equal counts: any order (qsort is not stable) */
    size_t o = 0;
    m->dtypes[0] = 0;
    for (int i = 0; i < k && o < sizeof m->dtypes; i++)
        o += (size_t)snprintf(m->dtypes + o, sizeof m->dtypes - o, "%s%s x%d", i ? ", " : "", d[i].name, d[i].count);
}

int kv_model_sha256(const kv_model_t *m, char hex[65])
{
    if (m->n_files == 0)
        return kv_sha256_file(m->path, hex);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    int rc = KV_OK;
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    unsigned char *buf = kv_malloc(1 << 20, "hash buffer");
    if (!ctx || !buf || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        rc = kv_error(KV_EINTERNAL, "sha256: cannot initialise digest");
        goto done;
    }
    for (int i = 0; i < m->n_files && rc == KV_OK; i++) {
        FILE *f;
        if ((rc = kv_open_input(m->files[i], "model file", &f)))
            break;
        size_t n;
        while ((n = fread(buf, 1, 1 << 20, f)) > 0)
            EVP_DigestUpdate(ctx, buf, n);
        if (ferror(f))
            rc = kv_error(KV_EIO, "%s: read error: %s", m->files[i], strerror(errno));
        fclose(f);
    }
    if (rc == KV_OK) {
        EVP_DigestFinal_ex(ctx, md, &mdlen);
        for (unsigned i = 0; i < mdlen && i < 32; i++)
            sprintf(hex + 2 * i, "%02x", md[i]);
        hex[64] = 0;
    }
done:
    kv_free(buf);
    EVP_MD_CTX_free(ctx);
    return rc;
}

void kv_model_free(kv_model_t *m)
{
    if (!m)
        return;
    for (int i = 0; i < m->n_maps; i++)
        munmap(m->maps[i], m->map_len[i]);
    kv_free(m->maps);
    kv_free(m->map_len);
    kv_free(m->layers);
    kv_free_aligned(m->owned);
    kv_free(m->files);
    kv_free(m);
}

const char *kv_model_describe(const kv_model_t *m, char *buf, size_t len)
{
    const kv_model_config_t *c = &m->cfg;
    const char *held = m->layers ? "as stored" : "converted to fp32";
    if (m->hf)
        snprintf(buf, len, "Hugging Face safetensors (%s%s%s, %d file%s)", m->hf_dtype,
                 strcmp(m->hf_dtype, "F32") ? " " : "", strcmp(m->hf_dtype, "F32") ? held : "", m->n_files - 1,
                 m->n_files == 2 ? "" : "s");
    else if (m->format && !strcmp(m->format, "gguf"))
        snprintf(buf, len, "GGUF (%s, %s)", m->dtypes, m->layers ? "as stored" : "dequantised to fp32");
    else if (c->version == 2)
        snprintf(buf, len, "llama2.c v2 (Q8_0, group %d, %s)", c->group_size,
                 m->layers ? "as stored" : "dequantised to fp32");
    else
        snprintf(buf, len, "llama2.c v%d (%sfp32)", c->version, c->version == 0 ? "legacy " : "");
    return buf;
}
