/*
 * weights.c: stored weights to fp32 (kernels/kv_weight.h): the block formats of ggml and llama2.c,
 * fp16 and bf16, whole tensors or a few rows of a matrix at a time.
 *
 * Dequantisation follows ggml-quants.c's dequantize_row_* block by block, with the same operation
 * order in fp32 (the fp16 scales converted exactly), so results are bit-identical to ggml's reference
 * code and to the gguf Python package's dequantize (tests/test_gguf.c checks both on random blocks and
 * on a real file). This file is compiled with the CPU kernels' flags (-O3 -march=native): loops
 * vectorise, and since C11 mode keeps floating-point contraction off, a product and a sum stay two
 * roundings as in ggml. Block layouts (ggml-common.h), QK = elements per block:
 *   Q4_0 (QK 32, 18 B): fp16 d, 16 bytes of nibbles; y[j] = (lo(q[j]) - 8) d, y[j+16] = (hi(q[j]) - 8) d
 *   Q4_1 (32, 20 B): fp16 d, fp16 m, nibbles; y = q d + m
 *   Q5_0 (32, 22 B): fp16 d, uint32 qh (5th bits: bit j for y[j], bit j+16 for y[j+16]), nibbles;
 *                    y = (q | h << 4) - 16) d
 *   Q5_1 (32, 24 B): fp16 d, fp16 m, uint32 qh, nibbles; y = (q | h << 4) d + m
 *   Q8_0 (32, 34 B): fp16 d, 32 int8; y = q d
 *   Q4_K (256, 144 B): fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) pairs for 8 sub-blocks of 32
 *                    (get_scale_min_k4), 128 bytes of nibbles: each 64 values use 32 bytes, low
 *                    nibbles for the first 32 (sub-block 2i), high for the next (2i+1);
 *                    y = (d sc) q - (dmin m)
 *   Q5_K (256, 176 B): as Q4_K plus qh[32] before the nibbles: bit 2i of qh[l] is the 5th bit of
 *                    value l of sub-block 2i, bit 2i+1 that of sub-block 2i+1
 *   Q6_K (256, 210 B): ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16] (one per 16
 *                    values), fp16 d; each half of 128 values: value l + 32k (k = 0..3) takes
 *                    ql[l (+32 for k odd)] low (k < 2) or high nibble and bits 2k..2k+1 of qh[l];
 *                    y = (d sc) (q - 32)
 *   F32, F16, BF16 (1 value per block): converted exactly (bf16 is the top half of an fp32).
 *   llama2.c's grouped int8 (KV_WT_Q8_GROUPS): y[e] = q[e] x scale[e / group] over the matrix's
 *                    elements e in row-major order (as llama2.c's runq.c dequantises).
 */
#include "kernels/kv_weight.h"

#include "sim/common/kv_common.h"

#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "weights.c reads little-endian tensor data in place: it needs a little-endian host"
#endif

/* ggml computes y = d*q - m as a multiply then a subtract; a fused multiply-add would change the
 * last bit. GCC leaves contraction off in ISO C mode (-std=c11); clang needs telling. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KV_HAVE_F16C_DISPATCH 1
#endif

/* ---------------------------------------------------------------- half precision */

float kv_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, x;
    if (exp == 0) {
        if (mant == 0) {
            x = sign;
        } else {
            int e = -1;
            do {
                e++;
                mant <<= 1;
            } while (!(mant & 0x400u));
            x = sign | ((uint32_t)(112 - e) << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        x = sign | 0x7f800000u | (mant << 13);
    } else {
        x = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

#ifdef KV_HAVE_F16C_DISPATCH
__attribute__((target("f16c,avx"))) static void half_to_float_hw(const unsigned char *src, float *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(const void *)(src + 2 * i))));
    for (; i < n; i++) {
        uint16_t h;
        memcpy(&h, src + 2 * i, 2);
        dst[i] = kv_half_to_float(h);
    }
}
#endif

int kv_have_f16c(void)
{
#ifdef KV_HAVE_F16C_DISPATCH
    static int v = -1;
    if (v < 0) {
        __builtin_cpu_init();
        v = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    }
    return v;
#else
    return 0;
#endif
}

void kv_half_to_float_n(const void *src, float *dst, size_t n)
{
    const unsigned char *s = src;
#ifdef KV_HAVE_F16C_DISPATCH
    if (kv_have_f16c()) {
        half_to_float_hw(s, dst, n);
        return;
    }
#endif
    for (size_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        dst[i] = kv_half_to_float(h);
    }
}

/* ---------------------------------------------------------------- blocks */

static float f16_at(const unsigned char *p)
{
    return kv_half_to_float((uint16_t)(p[0] | p[1] << 8));
}

static uint32_t le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void deq_f32(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    memcpy(y, s, (size_t)nb * 4);
}

static void deq_f16(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    kv_half_to_float_n(s, y, (size_t)nb);
}

static void deq_bf16(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t i = 0; i < nb; i++) {
        uint16_t h;
        memcpy(&h, s + 2 * i, 2);
        const uint32_t u = (uint32_t)h << 16; /* the top half of an fp32 */
        memcpy(&y[i], &u, 4);
    }
}

static void deq_q4_0(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 18, y += 32) {
        const float d = f16_at(s);
        const unsigned char *q = s + 2;
        for (int j = 0; j < 16; j++)
            y[j] = (float)((q[j] & 0x0F) - 8) * d;
        for (int j = 0; j < 16; j++)
            y[j + 16] = (float)((q[j] >> 4) - 8) * d;
    }
}

static void deq_q4_1(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 20, y += 32) {
        const float d = f16_at(s), m = f16_at(s + 2);
        const unsigned char *q = s + 4;
        /* two loops (low nibbles, then high) so that each vectorises; the same operations per element */
        for (int j = 0; j < 16; j++) {
            const float p0 = (float)(q[j] & 0x0F) * d;
            y[j] = p0 + m;
        }
        for (int j = 0; j < 16; j++) {
            const float p1 = (float)(q[j] >> 4) * d;
            y[j + 16] = p1 + m;
        }
    }
}

static void deq_q5_0(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 22, y += 32) {
        const float d = f16_at(s);
        const uint32_t qh = le32(s + 2);
        const unsigned char *q = s + 6;
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) & 1) << 4, h1 = (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = (float)(((q[j] & 0x0F) | h0) - 16) * d;
            y[j + 16] = (float)(((q[j] >> 4) | h1) - 16) * d;
        }
    }
}

static void deq_q5_1(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 24, y += 32) {
        const float d = f16_at(s), m = f16_at(s + 2);
        const uint32_t qh = le32(s + 4);
        const unsigned char *q = s + 8;
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) & 1) << 4, h1 = (int)((qh >> (j + 16)) & 1) << 4;
            const float p0 = (float)((q[j] & 0x0F) | h0) * d, p1 = (float)((q[j] >> 4) | h1) * d;
            y[j] = p0 + m;
            y[j + 16] = p1 + m;
        }
    }
}

static void deq_q8_0(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 34, y += 32) {
        const float d = f16_at(s);
        for (int j = 0; j < 32; j++)
            y[j] = (float)(int8_t)s[2 + j] * d;
    }
}

/* Sub-block j's 6-bit scale and min from the 12 packed bytes of a Q4_K / Q5_K block (ggml's
 * get_scale_min_k4): sub-blocks 0..3 in the low 6 bits of bytes j and j + 4; 4..7 in the nibbles
 * of bytes j + 4 with their top 2 bits in the top bits of bytes j - 4 and j. */
static void scale_min_k4(int j, const unsigned char *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void deq_q4_k(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 144) {
        const float d = f16_at(s), dmin = f16_at(s + 2);
        const unsigned char *sc = s + 4, *q = s + 16;
        for (int j = 0; j < 8; j += 2, q += 32) {
            int s0, m0, s1, m1;
            scale_min_k4(j, sc, &s0, &m0);
            scale_min_k4(j + 1, sc, &s1, &m1);
            const float d0 = d * (float)s0, c0 = dmin * (float)m0, d1 = d * (float)s1, c1 = dmin * (float)m1;
            for (int l = 0; l < 32; l++) {
                const float p = d0 * (float)(q[l] & 0x0F);
                *y++ = p - c0;
            }
            for (int l = 0; l < 32; l++) {
                const float p = d1 * (float)(q[l] >> 4);
                *y++ = p - c1;
            }
        }
    }
}

static void deq_q5_k(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 176) {
        const float d = f16_at(s), dmin = f16_at(s + 2);
        const unsigned char *sc = s + 4, *qh = s + 16, *q = s + 48;
        for (int j = 0; j < 8; j += 2, q += 32) {
            int s0, m0, s1, m1;
            scale_min_k4(j, sc, &s0, &m0);
            scale_min_k4(j + 1, sc, &s1, &m1);
            const float d0 = d * (float)s0, c0 = dmin * (float)m0, d1 = d * (float)s1, c1 = dmin * (float)m1;
            const unsigned u0 = 1u << j, u1 = 2u << j;
            for (int l = 0; l < 32; l++) {
                const float p = d0 * (float)((q[l] & 0x0F) + (qh[l] & u0 ? 16 : 0));
                *y++ = p - c0;
            }
            for (int l = 0; l < 32; l++) {
                const float p = d1 * (float)((q[l] >> 4) + (qh[l] & u1 ? 16 : 0));
                *y++ = p - c1;
            }
        }
    }
}

static void deq_q6_k(const unsigned char *restrict s, uint64_t nb, float *restrict y)
{
    for (uint64_t b = 0; b < nb; b++, s += 210) {
        const float d = f16_at(s + 208);
        const unsigned char *ql = s, *qh = s + 128;
        const signed char *sc = (const signed char *)(s + 192);
        for (int half = 0; half < 2; half++, y += 128, ql += 64, qh += 32, sc += 8) {
            /* values l < 16 use scales 0, 2, 4, 6 of the half, l >= 16 scales 1, 3, 5, 7 (ggml's is = l / 16);
             * y = (d sc) q as ggml's d * sc * q, the product d sc hoisted (the same rounding) so the loop vectorises */
            for (int is = 0; is < 2; is++) {
                const float d1 = d * (float)sc[is], d2 = d * (float)sc[is + 2], d3 = d * (float)sc[is + 4],
                            d4 = d * (float)sc[is + 6];
                for (int l = 16 * is; l < 16 * is + 16; l++) {
                    const int q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
                    const int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    y[l] = d1 * (float)q1;
                    y[l + 32] = d2 * (float)q2;
                    y[l + 64] = d3 * (float)q3;
                    y[l + 96] = d4 * (float)q4;
                }
            }
        }
    }
}

typedef void (*deq_fn)(const unsigned char *src, uint64_t n_blocks, float *dst);

typedef struct {
    int type;
    const char *name;
    int block, bytes;
    deq_fn deq;
} wtype_t;

static const wtype_t wtypes[] = {
    {KV_WT_F32, "F32", 1, 4, deq_f32},        {KV_WT_F16, "F16", 1, 2, deq_f16},
    {KV_WT_BF16, "BF16", 1, 2, deq_bf16},     {KV_WT_Q4_0, "Q4_0", 32, 18, deq_q4_0},
    {KV_WT_Q4_1, "Q4_1", 32, 20, deq_q4_1},   {KV_WT_Q5_0, "Q5_0", 32, 22, deq_q5_0},
    {KV_WT_Q5_1, "Q5_1", 32, 24, deq_q5_1},   {KV_WT_Q8_0, "Q8_0", 32, 34, deq_q8_0},
    {KV_WT_Q4_K, "Q4_K", 256, 144, deq_q4_k}, {KV_WT_Q5_K, "Q5_K", 256, 176, deq_q5_k},
    {KV_WT_Q6_K, "Q6_K", 256, 210, deq_q6_k}, {KV_WT_Q8_GROUPS, "Q8_0 (llama2.c groups)", 1, 1, NULL},
};

static const wtype_t *wtype(int type)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(wtypes); i++)
        if (wtypes[i].type == type)
            return &wtypes[i];
    return NULL;
}

const char *kv_weight_type_name(int type)
{
    const wtype_t *t = wtype(type);
    return t ? t->name : NULL;
}

int kv_weight_type_block(int type, int *block_elems, int *block_bytes)
{
    const wtype_t *t = wtype(type);
    *block_elems = *block_bytes = 0;
    if (!t || !t->deq)
        return kv_error(KV_EUNAVAIL, "weight type %d has no fixed block layout here", type);
    *block_elems = t->block;
    *block_bytes = t->bytes;
    return KV_OK;
}

kv_weight_t kv_weight_f32(const float *data, int rows, int cols)
{
    kv_weight_t w;
    memset(&w, 0, sizeof w);
    w.data = data;
    w.type = KV_WT_F32;
    w.rows = rows;
    w.cols = cols;
    w.row_bytes = (size_t)cols * sizeof(float);
    return w;
}

int kv_weight_set_layout(kv_weight_t *w, const char *what)
{
    if (w->type == KV_WT_Q8_GROUPS) {
        if (w->group <= 0 || !w->scales)
            return kv_error(KV_EINVAL, "%s: grouped int8 weight without its scales", what);
        w->row_bytes = (size_t)w->cols;
        return KV_OK;
    }
    int be, bb;
    if (kv_weight_type_block(w->type, &be, &bb))
        return kv_error(KV_EFORMAT, "%s: weight type %d cannot be converted to fp32 here", what, w->type);
    if (w->cols <= 0 || w->cols % be)
        return kv_error(KV_EFORMAT, "%s: rows of %d values are not a whole number of %s blocks of %d", what, w->cols,
                        kv_weight_type_name(w->type), be);
    w->row_bytes = (size_t)(w->cols / be) * (size_t)bb;
    return KV_OK;
}

size_t kv_weight_bytes(const kv_weight_t *w)
{
    return (size_t)w->rows * w->row_bytes;
}

int kv_weight_is_plain_f32(const kv_weight_t *w)
{
    return w->type == KV_WT_F32 && w->perm <= 0 && ((uintptr_t)w->data & 3) == 0 &&
           w->row_bytes == (size_t)w->cols * sizeof(float);
}

int kv_weight_dequant(int type, const void *src, uint64_t n, float *dst)
{
    const wtype_t *t = wtype(type);
    if (!t || !t->deq)
        return kv_error(KV_EFORMAT, "cannot convert weight type %s to fp32 without more information",
                        t ? t->name : "(unknown)");
    if (n % (uint64_t)t->block)
        return kv_error(KV_EINVAL, "dequantising %s: %llu values is not a whole number of blocks of %d", t->name,
                        (unsigned long long)n, t->block);
    t->deq(src, n / (uint64_t)t->block, dst);
    return KV_OK;
}

/* Row `sr` (stored order) of a llama2.c grouped int8 matrix. */
static void q8_groups_row(const kv_weight_t *w, int sr, float *y)
{
    const int8_t *q = (const int8_t *)w->data + (size_t)sr * (size_t)w->cols;
    const unsigned char *scales = w->scales;
    const uint64_t e0 = (uint64_t)sr * (uint64_t)w->cols, gs = (uint64_t)w->group;
    uint64_t k = 0;
    while (k < (uint64_t)w->cols) {
        const uint64_t g = (e0 + k) / gs, end = KV_MIN((uint64_t)w->cols, (g + 1) * gs - e0);
        float s;
        memcpy(&s, scales + 4 * g, 4); /* the scales may sit at any byte offset */
        for (; k < end; k++)
            y[k] = (float)q[k] * s;
    }
}

void kv_weight_rows(const kv_weight_t *w, int r0, int n, float *dst)
{
    const wtype_t *t = w->type == KV_WT_Q8_GROUPS ? NULL : wtype(w->type);
    const size_t cols = (size_t)w->cols;
    const uint64_t nb = t ? cols / (size_t)t->block : 0;
    for (int i = 0; i < n; i++) {
        const int sr = kv_weight_row(w, r0 + i);
        float *y = dst + (size_t)i * cols;
        if (!t)
            q8_groups_row(w, sr, y);
        else
            t->deq((const unsigned char *)w->data + (size_t)sr * w->row_bytes, nb, y);
    }
}
