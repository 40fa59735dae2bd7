/*
 * model.c: the model family's core: the format dispatch table, the configuration check shared by
 * every loader, the checkpoint hash, describe and free (kv_model.h).
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
    if (m->map)
        munmap(m->map, m->map_len);
    kv_free_aligned(m->owned);
    kv_free(m->files);
    kv_free(m);
}

const char *kv_model_describe(const kv_model_t *m, char *buf, size_t len)
{
    const kv_model_config_t *c = &m->cfg;
    if (m->hf)
        snprintf(buf, len, "Hugging Face safetensors (%s%s, %d file%s)", m->hf_dtype,
                 strcmp(m->hf_dtype, "F32") ? " converted to fp32" : "", m->n_files - 1, m->n_files == 2 ? "" : "s");
    else if (m->format && !strcmp(m->format, "gguf"))
        snprintf(buf, len, "GGUF (%s, dequantised to fp32)", m->dtypes);
    else if (c->version == 2)
        snprintf(buf, len, "llama2.c v2 (Q8_0, group %d, dequantised to fp32)", c->group_size);
    else
        snprintf(buf, len, "llama2.c v%d (%sfp32)", c->version, c->version == 0 ? "legacy " : "");
    return buf;
}
