/*
 * kv_rope.h: the rotary position embedding's frequencies, one definition for every backend.
 *
 * RoPE rotates each pair of a head's vector by the angle pos * f_i, where pair i (dimensions 2i and
 * 2i + 1 in kvsim's interleaved order) has the base frequency f_i = theta^(-2i / head_dim). Scaled
 * variants change f_i per pair:
 *   - linear ("linear", position interpolation): f_i / factor;
 *   - llama3 (Llama 3.1 / 3.2 configs, transformers' _compute_llama3_parameters): with
 *     wavelength w_i = 2 pi / f_i, low_wl = original_max_pos / low_freq_factor and
 *     high_wl = original_max_pos / high_freq_factor:
 *        w_i < high_wl            -> f_i                  (high frequencies untouched)
 *        w_i > low_wl             -> f_i / factor          (low frequencies interpolated)
 *        otherwise, with s = (original_max_pos / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor):
 *                                 -> (1 - s) f_i / factor + s f_i
 *   - factors (GGUF files of Llama 3.1 / 3.2: llama.cpp stores the llama3 scaling as a tensor
 *     rope_freqs.weight of head_dim / 2 divisors): f_i / factors[i].
 * Frequencies and angles are computed in double and the cos/sin rounded to float, on the CPU and
 * on the GPU alike (so the backends agree to the last bit on the angle). The struct is plain data,
 * passed by value or through a host pointer; it holds no backend memory.
 */
#ifndef KV_ROPE_H
#define KV_ROPE_H

#include <math.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__CUDACC__)
#define KV_ROPE_FN __host__ __device__ static inline
#else
#define KV_ROPE_FN static inline
#endif

typedef enum { KV_ROPE_DEFAULT = 0, KV_ROPE_LINEAR = 1, KV_ROPE_LLAMA3 = 2, KV_ROPE_FACTORS = 3 } kv_rope_type_t;

#define KV_ROPE_MAX_PAIRS 256 /* head_dim <= 512 */

typedef struct {
    double theta;                     /* base (rope_theta), > 0 */
    int type;                         /* kv_rope_type_t */
    double factor;                    /* linear, llama3: > 0 (1 when unused) */
    double low_freq_factor;           /* llama3 */
    double high_freq_factor;          /* llama3, > low_freq_factor */
    double original_max_pos;          /* llama3: original_max_position_embeddings */
    float factors[KV_ROPE_MAX_PAIRS]; /* factors: divisor of pair i's frequency, > 0 */
} kv_rope_t;

/* Plain RoPE with base theta. */
KV_ROPE_FN kv_rope_t kv_rope_plain(double theta)
{
    kv_rope_t r;
    for (int i = 0; i < KV_ROPE_MAX_PAIRS; i++)
        r.factors[i] = 1.0f;
    r.theta = theta;
    r.type = KV_ROPE_DEFAULT;
    r.factor = 1.0;
    r.low_freq_factor = r.high_freq_factor = r.original_max_pos = 0.0;
    return r;
}

/* Frequency (radians per position) of the pair that starts at dimension i (even) of a head. */
KV_ROPE_FN double kv_rope_freq(const kv_rope_t *r, int i, int head_dim)
{
    double f = pow(r->theta, -(double)i / head_dim);
    if (r->type == KV_ROPE_FACTORS) {
        f /= (double)r->factors[i / 2];
    } else if (r->type == KV_ROPE_LINEAR) {
        f /= r->factor;
    } else if (r->type == KV_ROPE_LLAMA3) {
        const double two_pi = 6.283185307179586476925286766559;
        double wl = two_pi / f;
        double low_wl = r->original_max_pos / r->low_freq_factor;
        double high_wl = r->original_max_pos / r->high_freq_factor;
        if (wl > low_wl) {
            f /= r->factor;
        } else if (!(wl < high_wl)) {
            double s = (r->original_max_pos / wl - r->low_freq_factor) / (r->high_freq_factor - r->low_freq_factor);
            f = (1.0 - s) * f / r->factor + s * f;
        }
    }
    return f;
}

/* "llama3 (theta 500000, factor 8, low_freq_factor 1, high_freq_factor 4, original_max_position_embeddings
 * 8192)" and the like into buf (host code: messages and provenance). */
static inline const char *kv_rope_describe(const kv_rope_t *r, char *buf, size_t len)
{
    if (r->type == KV_ROPE_LINEAR)
        snprintf(buf, len, "linear (theta %.9g, factor %.9g)", r->theta, r->factor);
    else if (r->type == KV_ROPE_LLAMA3)
        snprintf(buf, len,
                 "llama3 (theta %.9g, factor %.9g, low_freq_factor %.9g, high_freq_factor %.9g, "
                 "original_max_position_embeddings %.9g)",
                 r->theta, r->factor, r->low_freq_factor, r->high_freq_factor, r->original_max_pos);
    else if (r->type == KV_ROPE_FACTORS)
        snprintf(buf, len, "per-pair factors (theta %.9g)", r->theta);
    else
        snprintf(buf, len, "default (theta %.9g)", r->theta);
    return buf;
}

#ifdef __cplusplus
}
#endif
#endif
