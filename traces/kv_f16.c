/* kv_f16.c: see kv_f16.h. Bit manipulation; the hardware F16C path is used when the CPU has it. Half to
 * float is kernels/kv_weight.h's (the stored weights' conversion). */
#include "traces/kv_f16.h"

#include "kernels/kv_weight.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KV_HAVE_F16C_DISPATCH 1
#endif

uint16_t kv_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (absx > 0x7f800000u ? 0x200u : 0));
    if (absx >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00u);
    if (absx < 0x38800000u) { /* subnormal half (or zero) */
        if (absx < 0x33000000u)
            return (uint16_t)sign;
        uint32_t mant = (absx & 0x007fffffu) | 0x00800000u;
        int shift = 113 - (int)(absx >> 23) + 13; /* 126 - exp + 14 - 1 ... */
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t h = ((absx - 0x38000000u) >> 13);
    uint32_t rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1)))
        h++;
    return (uint16_t)(sign | h);
}

float kv_f16_to_f32(uint16_t h)
{
    return kv_half_to_float(h); /* kernels/kv_weight.h: the weights' conversion, the same function */
}

#ifdef KV_HAVE_F16C_DISPATCH
__attribute__((target("f16c,avx"))) static void to_f16_hw(const float *src, uint16_t *dst, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        dst[i] = kv_f32_to_f16(src[i]);
}
#endif

size_t kv_f32_to_f16_n(const float *src, uint16_t *dst, size_t n)
{
    size_t over = 0;
    for (size_t i = 0; i < n; i++)
        over += (src[i] > KV_F16_MAX + 16.0f || src[i] < -KV_F16_MAX - 16.0f) && isfinite(src[i]);
#ifdef KV_HAVE_F16C_DISPATCH
    if (kv_have_f16c()) {
        to_f16_hw(src, dst, n);
        return over;
    }
#endif
    for (size_t i = 0; i < n; i++)
        dst[i] = kv_f32_to_f16(src[i]);
    return over;
}

void kv_f16_to_f32_n(const uint16_t *src, float *dst, size_t n)
{
    kv_half_to_float_n(src, dst, n);
}
