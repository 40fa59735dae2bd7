/*
 * kv_f16.h: IEEE 754 half precision conversion (round to nearest even), used for trace storage.
 * Values beyond the f16 range (|x| > 65504) become +-inf and are counted so capture can record how
 * many there were.
 */
#ifndef KV_F16_H
#define KV_F16_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_F16_MAX 65504.0f

uint16_t kv_f32_to_f16(float f);
float kv_f16_to_f32(uint16_t h);
/* Convert n values; returns the number of finite inputs that overflowed to infinity. */
size_t kv_f32_to_f16_n(const float *src, uint16_t *dst, size_t n);
void kv_f16_to_f32_n(const uint16_t *src, float *dst, size_t n);

#ifdef __cplusplus
}
#endif
#endif
