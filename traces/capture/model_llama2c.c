/*
 * model_llama2c.c: llama2.c checkpoints (versions 0, 1 and 2; layouts in kv_model.h).
 *
 * The loader never trusts the header: it bounds every dimension, checks divisibility, computes the
 * exact file size the header implies with overflow-checked 64-bit arithmetic and compares it with
 * the real size before mapping a single weight. Only then are the weight pointers set, so a
 * malformed file can produce an error message but never an out-of-bounds read. Versions 0 and 1 are
 * fp32 arrays in the mapping itself (the model's fp32 pointers); version 2's int8 matrices stay as
 * stored (KV_WT_Q8_GROUPS descriptors), dequantised by the forward pass as it multiplies or by
 * kv_model_load_f32 at load.
 */
#include "traces/capture/kv_model.h"

#include "sim/common/kv_common.h"
#include "traces/capture/kv_model_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define V0_HEADER 28u
#define VX_HEADER 256u

/* Checked a*b and a+b on uint64 (0 on overflow, with *ok cleared). */
static uint64_t cmul(uint64_t a, uint64_t b, int *ok)
{
    uint64_t r;
    if (__builtin_mul_overflow(a, b, &r)) {
        *ok = 0;
        return 0;
    }
    return r;
}
static uint64_t cadd(uint64_t a, uint64_t b, int *ok)
{
    uint64_t r;
    if (__builtin_add_overflow(a, b, &r)) {
        *ok = 0;
        return 0;
    }
    return r;
}

/* Element counts of every tensor of a checkpoint (all layers). */
typedef struct {
    uint64_t emb, norm_l, wq, wkv, wo, w13, w2, norm_f, freq, cls;
    uint64_t quantised; /* emb + wq + 2 wkv + wo + 2 w13 + w2 + cls */
    uint64_t params;
} counts_t;

static int count_tensors(const kv_model_config_t *c, counts_t *n, const char *path)
{
    int ok = 1;
    uint64_t L = (uint64_t)c->n_layers, D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim;
    uint64_t V = (uint64_t)c->vocab_size, KV = (uint64_t)c->kv_dim;
    n->emb = cmul(V, D, &ok);
    n->norm_l = cmul(L, D, &ok);
    n->wq = cmul(L, cmul(D, D, &ok), &ok);
    n->wkv = cmul(L, cmul(KV, D, &ok), &ok);
    n->wo = n->wq;
    n->w13 = cmul(L, cmul(H, D, &ok), &ok);
    n->w2 = n->w13;
    n->norm_f = D;
    n->freq = cmul((uint64_t)c->seq_len, (uint64_t)c->head_dim, &ok); /* cos and sin, head_dim/2 each */
    n->cls = c->shared_classifier ? 0 : n->emb;
    uint64_t q = n->emb;
    q = cadd(q, n->wq, &ok);
    q = cadd(q, cmul(2, n->wkv, &ok), &ok);
    q = cadd(q, n->wo, &ok);
    q = cadd(q, cmul(2, n->w13, &ok), &ok);
    q = cadd(q, n->w2, &ok);
    q = cadd(q, n->cls, &ok);
    n->quantised = q;
    n->params = cadd(q, cadd(cmul(2, n->norm_l, &ok), n->norm_f, &ok), &ok);
    if (!ok)
        return kv_error(KV_EFORMAT, "%s: absurd dimensions: the weight count overflows 64 bits", path);
    return KV_OK;
}

/* Point the weights at consecutive tensors of `p` in llama2.c's version-1 order. */
static void assign_v1_order(kv_model_t *m, const float *p, const counts_t *n)
{
    m->rms_att = p, p += n->norm_l;
    m->rms_ffn = p, p += n->norm_l;
    m->rms_final = p, p += n->norm_f;
    m->token_embedding = p, p += n->emb;
    m->wq = p, p += n->wq;
    m->wk = p, p += n->wkv;
    m->wv = p, p += n->wkv;
    m->wo = p, p += n->wo;
    m->w1 = p, p += n->w13;
    m->w2 = p, p += n->w2;
    m->w3 = p, p += n->w13;
    m->wcls = m->cfg.shared_classifier ? m->token_embedding : p;
}

static void assign_v0_order(kv_model_t *m, const float *p, const counts_t *n)
{
    m->token_embedding = p, p += n->emb;
    m->rms_att = p, p += n->norm_l;
    m->wq = p, p += n->wq;
    m->wk = p, p += n->wkv;
    m->wv = p, p += n->wkv;
    m->wo = p, p += n->wo;
    m->rms_ffn = p, p += n->norm_l;
    m->w1 = p, p += n->w13;
    m->w2 = p, p += n->w2;
    m->w3 = p, p += n->w13;
    m->rms_final = p, p += n->norm_f;
    p += n->freq; /* legacy freq_cis_real / freq_cis_imag: unused (RoPE is computed) */
    m->wcls = m->cfg.shared_classifier ? m->token_embedding : p;
}

static int32_t rd_i32(const unsigned char *b, size_t off)
{
    int32_t v;
    memcpy(&v, b + off, 4);
    return v;
}

static const char *cfg_text(const kv_model_config_t *c, char *buf, size_t len)
{
    snprintf(buf, len, "dim %d, hidden_dim %d, n_layers %d, n_heads %d, n_kv_heads %d, vocab_size %d, seq_len %d",
             c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size, c->seq_len);
    return buf;
}

static int size_mismatch(const char *path, uint64_t have, uint64_t need, const kv_model_config_t *c)
{
    char h[256];
    return kv_error(KV_EFORMAT, "%s: file is %llu bytes, its version-%d header (%s%s) needs %llu%s", path,
                    (unsigned long long)have, c->version, cfg_text(c, h, sizeof h),
                    c->shared_classifier ? ", shared classifier" : ", separate classifier", (unsigned long long)need,
                    have < need ? " (truncated?)" : " (trailing data or wrong header)");
}

/* Version 2 (Q8_0). llama2.c has written two arrangements of the quantised tensors, of identical
 * size: export.py as first published put every tensor's int8 values back to back and then all the
 * scales ("grouped"); export.py since then, and runq.c, which reads them, interleave them: each
 * tensor (each layer's matrix separately) is its int8 values followed by its own scales. The file
 * size cannot tell them apart, the scales can: every scale is max|w| / 127, finite and >= 0, while
 * int8 weights read as floats are negative about half the time. The loader takes the interleaved
 * arrangement when all its scales are valid, else the grouped one when all of its are, else the
 * file is corrupt. */
typedef struct {
    uint64_t q, s, n; /* byte offsets of the int8 values and of the scales, element count */
} q80_tensor_t;

/* The quantised tensors in file order (emb, wq, wk, wv, wo, w1, w2, w3 per layer, [wcls]), located
 * for one arrangement. Returns the count written into t (at most 7 n_layers + 2). */
static size_t q80_locate(const kv_model_config_t *c, const counts_t *n, uint64_t start, int interleaved,
                         q80_tensor_t *t)
{
    const uint64_t L = (uint64_t)c->n_layers, gs = (uint64_t)c->group_size;
    const uint64_t per[8] = {n->emb, n->wq / L, n->wkv / L, n->wkv / L, n->wo / L, n->w13 / L, n->w2 / L, n->w13 / L};
    const uint64_t reps[8] = {1, L, L, L, L, L, L, L};
    uint64_t q = start, s = start + n->quantised; /* grouped: scales after every int8 value */
    size_t k = 0;
    for (int part = 0; part < 9; part++) {
        uint64_t each = part < 8 ? per[part] : n->cls, r = part < 8 ? reps[part] : (n->cls ? 1 : 0);
        for (uint64_t i = 0; i < r; i++, k++) {
            t[k].n = each;
            t[k].q = q;
            if (interleaved) {
                t[k].s = q + each;
                q += each + 4 * (each / gs);
            } else {
                t[k].s = s;
                q += each;
                s += 4 * (each / gs);
            }
        }
    }
    return k;
}

/* Index of the first tensor with a scale that is not finite and >= 0 (or -1), its value in *bad. */
static long q80_bad_scale(const unsigned char *b, const q80_tensor_t *t, size_t nt, uint64_t gs, float *bad)
{
    for (size_t k = 0; k < nt; k++)
        for (uint64_t g = 0; g < t[k].n / gs; g++) {
            float s;
            memcpy(&s, b + t[k].s + 4 * g, 4);
            if (!isfinite(s) || s < 0) {
                *bad = s;
                return (long)k;
            }
        }
    return -1;
}

static const char *q80_name(const kv_model_config_t *c, long k, char *buf, size_t len)
{
    static const char *names[8] = {"token_embedding", "wq", "wk", "wv", "wo", "w1", "w2", "w3"};
    if (k == 0)
        snprintf(buf, len, "token_embedding");
    else if (k <= 7L * c->n_layers)
        snprintf(buf, len, "%s of layer %ld", names[1 + (k - 1) / c->n_layers], (k - 1) % c->n_layers);
    else
        snprintf(buf, len, "wcls");
    return buf;
}

/* Descriptors of the int8 matrices as stored (KV_WT_Q8_GROUPS, each with its own scales), the fp32
 * norms pointing into the mapping; kv_model_to_f32 dequantises them as llama2.c's runq.c does. */
static int load_q80(kv_model_t *m, const unsigned char *b, const counts_t *n)
{
    const kv_model_config_t *c = &m->cfg;
    const uint64_t norms = 2 * n->norm_l + n->norm_f, gs = (uint64_t)c->group_size;
    const size_t max_t = 7 * (size_t)c->n_layers + 2;
    int rc = KV_OK;
    q80_tensor_t *t = kv_malloc(max_t * sizeof *t, "Q8_0 tensor table");
    if (!t)
        return kv_error_context(KV_ENOMEM, "%s", m->path);
    size_t nt = q80_locate(c, n, VX_HEADER + norms * 4, 1, t);
    float bad = 0;
    long k = q80_bad_scale(b, t, nt, gs, &bad);
    if (k >= 0) {
        float bad_grouped;
        size_t ng = q80_locate(c, n, VX_HEADER + norms * 4, 0, t);
        if (q80_bad_scale(b, t, ng, gs, &bad_grouped) >= 0) {
            char name[64];
            nt = q80_locate(c, n, VX_HEADER + norms * 4, 1, t);
            rc = kv_error(KV_EFORMAT,
                          "%s: corrupt Q8_0 weights: a scale of %s is %g (scales are max|w|/127, finite and >= 0; "
                          "neither llama2.c arrangement of the scales fits this file)",
                          m->path, q80_name(c, k, name, sizeof name), (double)bad);
            goto done;
        }
        nt = ng;
    }
    m->layers = kv_calloc((size_t)c->n_layers, sizeof *m->layers, "layer weights");
    if (!m->layers) {
        rc = kv_error_context(KV_ENOMEM, "%s", m->path);
        goto done;
    }
    const int L = c->n_layers, D = c->dim, H = c->hidden_dim, KV = c->kv_dim;
    /* file order: token_embedding, then wq, wk, wv, wo, w1, w2, w3 of every layer, [wcls] */
    static const int which[7] = {KV_MW_Q, KV_MW_K, KV_MW_V, KV_MW_O, KV_MW_GATE, KV_MW_DOWN, KV_MW_UP};
    const int shape[7][2] = {{D, D}, {KV, D}, {KV, D}, {D, D}, {H, D}, {D, H}, {H, D}};
    for (size_t i = 0; i < nt; i++) {
        kv_weight_t w;
        memset(&w, 0, sizeof w);
        w.type = KV_WT_Q8_GROUPS;
        w.data = b + t[i].q;
        w.scales = b + t[i].s;
        w.group = c->group_size;
        if (i > 0 && i <= (size_t)7 * L) {
            const int part = (int)((i - 1) / (size_t)L), l = (int)((i - 1) % (size_t)L);
            w.rows = shape[part][0], w.cols = shape[part][1];
            if ((rc = kv_weight_set_layout(&w, m->path)))
                goto done;
            m->layers[l].w[which[part]] = w;
        } else {
            w.rows = c->vocab_size, w.cols = D;
            if ((rc = kv_weight_set_layout(&w, m->path)))
                goto done;
            if (i == 0)
                m->emb_w = w;
            else
                m->cls_w = w;
        }
    }
    if (c->shared_classifier)
        m->cls_w = m->emb_w;
    /* The norms are little-endian fp32 at offset 256 of a page-aligned map: 4-byte aligned. */
    // cppcheck-suppress invalidPointerCast
    const float *p = (const float *)(b + VX_HEADER);
    m->rms_att = p, p += n->norm_l;
    m->rms_ffn = p, p += n->norm_l;
    m->rms_final = p;
    m->weight_bytes = (size_t)(norms * 4 + n->quantised + 4 * (n->quantised / gs));
done:
    kv_free(t);
    return rc;
}

static int llama2c_load(const char *path, kv_model_t **out)
{
    *out = NULL;
    int rc = KV_OK;
    kv_model_t *m = kv_calloc(1, sizeof *m, "model");
    if (!m)
        return KV_ENOMEM;
    snprintf(m->path, sizeof m->path, "%s", path);
    void *map;
    size_t map_len;
    if ((rc = kv_map_file(path, "model", V0_HEADER, "28-byte llama2.c header", &map, &map_len)) ||
        (rc = kv_model_add_map(m, map, map_len)))
        goto fail;
    const uint64_t size = map_len;
    const unsigned char *b = map;
    kv_model_config_t *c = &m->cfg;
    uint32_t magic;
    memcpy(&magic, b, 4);
    size_t hdr = 0; /* offset of the 7 int32 */
    if (magic == KV_LLAMA2C_MAGIC) {
        if (size < VX_HEADER) {
            rc = kv_error(KV_EFORMAT,
                          "%s: file is %llu bytes, shorter than the 256-byte header of a versioned "
                          "llama2.c checkpoint",
                          path, (unsigned long long)size);
            goto fail;
        }
        c->version = rd_i32(b, 4);
        if (c->version != 1 && c->version != 2) {
            rc = kv_error(KV_EFORMAT,
                          "%s: unsupported llama2.c checkpoint version %d (kvsim reads versions 0, 1 "
                          "and 2)",
                          path, c->version);
            goto fail;
        }
        hdr = 8;
    }
    c->dim = rd_i32(b, hdr + 0);
    c->hidden_dim = rd_i32(b, hdr + 4);
    c->n_layers = rd_i32(b, hdr + 8);
    c->n_heads = rd_i32(b, hdr + 12);
    c->n_kv_heads = rd_i32(b, hdr + 16);
    c->vocab_size = rd_i32(b, hdr + 20);
    c->seq_len = rd_i32(b, hdr + 24);
    c->rope_theta = 10000.0f;
    c->norm_eps = 1e-5f;
    if (c->version == 0) {
        c->shared_classifier = c->vocab_size > 0;
        if (c->vocab_size < 0 && c->vocab_size != INT32_MIN)
            c->vocab_size = -c->vocab_size;
    } else {
        if (b[36] > 1) {
            rc = kv_error(KV_EFORMAT, "%s: shared_classifier flag is %u (expected 0 or 1)", path, b[36]);
            goto fail;
        }
        c->shared_classifier = b[36];
        if (c->version == 2) {
            memcpy(&c->group_size, b + 37, 4);
            if (c->group_size <= 0 || c->group_size > (1 << 20)) {
                rc = kv_error(KV_EFORMAT, "%s: impossible Q8_0 group size %d", path, c->group_size);
                goto fail;
            }
        }
    }
    if ((rc = kv_model_config_check(c, path)))
        goto fail;
    counts_t n;
    if ((rc = count_tensors(c, &n, path)))
        goto fail;
    m->n_params = (size_t)n.params;
    int ok = 1;
    uint64_t need;
    if (c->version == 0) {
        uint64_t floats = cadd(n.params, n.freq, &ok); /* every tensor + the freq_cis tables */
        need = cadd(V0_HEADER, cmul(floats, 4, &ok), &ok);
    } else if (c->version == 1) {
        need = cadd(VX_HEADER, cmul(n.params, 4, &ok), &ok);
    } else {
        const uint64_t gs = (uint64_t)c->group_size;
        struct {
            const char *name;
            uint64_t rows, cols;
        } mats[] = {
            {"token_embedding", (uint64_t)c->vocab_size, (uint64_t)c->dim},
            {"wq/wo", (uint64_t)c->dim, (uint64_t)c->dim},
            {"wk/wv", (uint64_t)c->kv_dim, (uint64_t)c->dim},
            {"w1/w2/w3", (uint64_t)c->hidden_dim, (uint64_t)c->dim},
        };
        for (size_t i = 0; i < KV_ARRAY_LEN(mats); i++)
            if ((mats[i].rows * mats[i].cols) % gs) {
                rc = kv_error(KV_EFORMAT, "%s: Q8_0 group size %d does not divide the %s matrix (%llu x %llu)", path,
                              c->group_size, mats[i].name, (unsigned long long)mats[i].rows,
                              (unsigned long long)mats[i].cols);
                goto fail;
            }
        uint64_t norms = 2 * n.norm_l + n.norm_f;
        need = cadd(VX_HEADER, cmul(norms, 4, &ok), &ok);
        need = cadd(need, n.quantised, &ok);
        need = cadd(need, cmul(n.quantised / gs, 4, &ok), &ok);
    }
    if (!ok) {
        rc = kv_error(KV_EFORMAT, "%s: absurd dimensions: the file size implied by the header overflows", path);
        goto fail;
    }
    if (need != size) {
        rc = size_mismatch(path, size, need, c);
        goto fail;
    }
    /* The weights are little-endian fp32 at offsets 28 and 256 of a page-aligned map: 4-byte aligned. */
    if (c->version == 0) {
        // cppcheck-suppress invalidPointerCast
        assign_v0_order(m, (const float *)(b + V0_HEADER), &n);
    } else if (c->version == 1) {
        // cppcheck-suppress invalidPointerCast
        assign_v1_order(m, (const float *)(b + VX_HEADER), &n);
    } else if ((rc = load_q80(m, b, &n))) {
        goto fail;
    }
    if (c->version != 2)
        m->weight_bytes = (size_t)n.params * 4;
    {
        const int L = c->n_layers, cls = !c->shared_classifier;
        const char *const names[2] = {"Q8_0", "F32"};
        const int counts[2] = {c->version == 2 ? 1 + 7 * L + cls : 0, c->version == 2 ? 2 * L + 1 : 2 + 9 * L + cls};
        kv_model_set_dtypes(m, names, counts, 2);
    }
    *out = m;
    return KV_OK;
fail:
    kv_model_free(m);
    return rc;
}

static int llama2c_probe(const char *path)
{
    (void)path;
    return 1; /* the last row of the table: version-0 files have no magic */
}

const kv_model_format_t kv_model_format_llama2c = {"llama2.c", llama2c_probe, llama2c_load, NULL};
