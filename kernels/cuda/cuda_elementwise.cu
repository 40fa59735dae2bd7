/*
 * cuda_elementwise.cu: the memory-bound model ops of the CUDA backend: rmsnorm, rope, swiglu, add.
 *
 * Each op is one pass over its tensors: the fewest bytes are every input read once and every
 * output written once, and that is what these kernels move (bench/gpu.c reports the fraction of
 * the memory bandwidth they reach). Arithmetic follows the CPU reference operation by operation so
 * that parity is tight:
 *   rmsnorm  sum of squares in double (a fixed tree: per-thread strided sums, then a warp and a
 *            block reduction in a fixed order), r = (float)(1 / sqrt(ss / dim + eps)) in double,
 *            y = (x * r) * w in float;
 *   rope     frequency kv_rope_freq (kernels/kv_rope.h, the CPU's own code, compiled for the device)
 *            and angle pos * freq in double, (float)cos and (float)sin, then a*c - b*s and
 *            a*s + b*c with separately rounded products (no fused multiply-add). The CPU build
 *            (gcc -O3 -march=native) does fuse them where it vectorises the loop (vfmaddsub in
 *            cpu_rope: measured), so equal angles give outputs within 1 ulp, not always equal bits;
 *            the CPU is kept as it is because its captures must not change;
 *   swiglu   v / (1 + expf(-v)) * g in float (CUDA's expf is within 2 ulp of the C library's);
 *   add, add_bias   x + y (exact).
 * Pointers are device pointers; rope's positions are in device memory too (backend memory, as the
 * op table says). rope's parameters (kv_rope_t, 1072 bytes with its 256 per-pair factors) are passed
 * to the kernel BY VALUE as a kernel parameter: they land in the kernel's constant parameter bank
 * (4 KiB allowed, 32 KiB since CUDA 12.1 on Volta and later), are captured at launch (the host struct
 * may change or go right after the call) and need no upload, no device allocation and no
 * __constant__ symbol shared between calls. Vector (16-byte) loads are used when pointers are 16-byte
 * aligned, with a scalar tail.
 */
#include "kernels/cuda/cuda_internal.h"

#include <math.h>
#include <stdint.h>

namespace
{

constexpr unsigned FULL = 0xffffffffu;

unsigned blocks_for(size_t n, int threads, int sm_count)
{
    size_t b = (n + threads - 1) / threads;
    size_t cap = (size_t)sm_count * 32;
    return (unsigned)(b < 1 ? 1 : (b > cap ? cap : b));
}

bool aligned16(const void *p)
{
    return ((uintptr_t)p & 15u) == 0;
}

/* ---------------------------------------------------------------- rmsnorm: one block per row */

constexpr int RMS_THREADS = 256;

__global__ void __launch_bounds__(RMS_THREADS)
    k_rmsnorm(float *__restrict__ y, const float *__restrict__ x, const float *__restrict__ w, int dim, float eps)
{
    __shared__ double part[RMS_THREADS / 32];
    __shared__ float r_sh;
    const size_t row = blockIdx.x;
    const float *xr = x + row * dim;
    float *yr = y + row * dim;
    double ss = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        ss += (double)xr[i] * xr[i];
    for (int o = 16; o > 0; o >>= 1)
        ss += __shfl_xor_sync(FULL, ss, o);
    if ((threadIdx.x & 31) == 0)
        part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        double t = 0;
        for (int i = 0; i < (int)(blockDim.x >> 5); i++)
            t += part[i];
        r_sh = (float)(1.0 / sqrt(t / dim + (double)eps));
    }
    __syncthreads();
    const float r = r_sh;
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        yr[i] = __fmul_rn(__fmul_rn(xr[i], r), w[i]);
}

/* ---------------------------------------------------------------- rope: one block per token */

constexpr int ROPE_THREADS = 128;
constexpr int ROPE_MAX_PAIRS = KV_ROPE_MAX_PAIRS; /* head_dim <= 512 */
static_assert(sizeof(kv_rope_t) <= 4000, "kv_rope_t must fit the 4 KiB of kernel parameters");

__global__ void __launch_bounds__(ROPE_THREADS)
    k_rope(float *__restrict__ x, const int32_t *__restrict__ pos, int n_heads, int head_dim, const kv_rope_t rope)
{
    __shared__ float cs[ROPE_MAX_PAIRS], sn[ROPE_MAX_PAIRS];
    const int t = blockIdx.x, half = head_dim / 2;
    const double p = (double)pos[t];
    for (int k = threadIdx.x; k < half; k += blockDim.x) {
        double ang = p * kv_rope_freq(&rope, 2 * k, head_dim);
        cs[k] = (float)cos(ang);
        sn[k] = (float)sin(ang);
    }
    __syncthreads();
    float *xt = x + (size_t)t * n_heads * head_dim;
    const int n = n_heads * half;
    for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
        const int k = idx % half;
        float *q = xt + 2 * (size_t)idx; /* pair k of head idx / half: (h*head_dim + 2k) == 2*idx */
        const float a = q[0], b = q[1], c = cs[k], s = sn[k];
        q[0] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        q[1] = __fadd_rn(__fmul_rn(a, s), __fmul_rn(b, c));
    }
}

/* ---------------------------------------------------------------- swiglu, add: grid-stride */

__device__ __forceinline__ float silu_mul(float v, float g)
{
    return __fmul_rn(__fdiv_rn(v, 1.0f + expf(-v)), g);
}

__global__ void k_swiglu4(float4 *__restrict__ h, const float4 *__restrict__ g, size_t n4)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
        float4 a = h[i], b = g[i];
        a.x = silu_mul(a.x, b.x);
        a.y = silu_mul(a.y, b.y);
        a.z = silu_mul(a.z, b.z);
        a.w = silu_mul(a.w, b.w);
        h[i] = a;
    }
}

__global__ void k_swiglu1(float *__restrict__ h, const float *__restrict__ g, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        h[i] = silu_mul(h[i], g[i]);
}

__global__ void k_add4(float4 *__restrict__ x, const float4 *__restrict__ y, size_t n4)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += (size_t)gridDim.x * blockDim.x) {
        float4 a = x[i], b = y[i];
        a.x += b.x;
        a.y += b.y;
        a.z += b.z;
        a.w += b.w;
        x[i] = a;
    }
}

__global__ void k_add1(float *__restrict__ x, const float *__restrict__ y, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

/* y (rows, cols) += b (cols): grid-stride over the elements; the bias row is small and read through
 * the cache */
__global__ void k_add_bias(float *__restrict__ y, const float *__restrict__ b, size_t n, int cols)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += __ldg(b + i % (size_t)cols);
}

} // namespace

int kv_cuda_rmsnorm(kv_backend_t *be, float *y, const float *x, const float *w, int T, int dim, float eps)
{
    if (T < 0 || dim <= 0)
        return kv_error(KV_EINVAL, "rmsnorm: bad shape T=%d dim=%d", T, dim);
    if (T == 0)
        return KV_OK;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    int threads = dim >= RMS_THREADS ? RMS_THREADS : ((dim + 31) / 32) * 32;
    KV_LAUNCH(T, threads, 0, c->stream, k_rmsnorm)(y, x, w, dim, eps);
    return kv_cuda_check_launch("rmsnorm");
}

int kv_cuda_rope(kv_backend_t *be, float *x, const int32_t *pos, int T, int n_heads, int head_dim,
                 const kv_rope_t *rope)
{
    if (!rope)
        return kv_error(KV_EINVAL, "rope: no RoPE parameters");
    if (head_dim % 2)
        return kv_error(KV_EINVAL, "rope: head_dim %d is odd", head_dim);
    if (T < 0 || n_heads <= 0 || head_dim <= 0 || head_dim / 2 > ROPE_MAX_PAIRS)
        return kv_error(KV_EINVAL, "rope: bad shape T=%d n_heads=%d head_dim=%d (head_dim at most %d)", T, n_heads,
                        head_dim, 2 * ROPE_MAX_PAIRS);
    if (T == 0)
        return KV_OK;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    KV_LAUNCH(T, ROPE_THREADS, 0, c->stream, k_rope)(x, pos, n_heads, head_dim, *rope);
    return kv_cuda_check_launch("rope");
}

int kv_cuda_swiglu(kv_backend_t *be, float *h, const float *g, size_t n)
{
    if (n == 0)
        return KV_OK;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    size_t n4 = aligned16(h) && aligned16(g) ? n / 4 : 0;
    if (n4)
        KV_LAUNCH(blocks_for(n4, 256, c->sm_count), 256, 0, c->stream, k_swiglu4)((float4 *)h, (const float4 *)g, n4);
    if (n > 4 * n4)
        KV_LAUNCH(blocks_for(n - 4 * n4, 256, c->sm_count), 256, 0, c->stream, k_swiglu1)
        (h + 4 * n4, g + 4 * n4, n - 4 * n4);
    return kv_cuda_check_launch("swiglu");
}

int kv_cuda_add(kv_backend_t *be, float *x, const float *y, size_t n)
{
    if (n == 0)
        return KV_OK;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    size_t n4 = aligned16(x) && aligned16(y) ? n / 4 : 0;
    if (n4)
        KV_LAUNCH(blocks_for(n4, 256, c->sm_count), 256, 0, c->stream, k_add4)((float4 *)x, (const float4 *)y, n4);
    if (n > 4 * n4)
        KV_LAUNCH(blocks_for(n - 4 * n4, 256, c->sm_count), 256, 0, c->stream, k_add1)
        (x + 4 * n4, y + 4 * n4, n - 4 * n4);
    return kv_cuda_check_launch("add");
}

int kv_cuda_add_bias(kv_backend_t *be, float *y, const float *b, int rows, int cols)
{
    if (rows < 0 || cols <= 0)
        return kv_error(KV_EINVAL, "add_bias: bad shape rows=%d cols=%d", rows, cols);
    const size_t n = (size_t)rows * (size_t)cols;
    if (n == 0)
        return KV_OK;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    KV_LAUNCH(blocks_for(n, 256, c->sm_count), 256, 0, c->stream, k_add_bias)(y, b, n, cols);
    return kv_cuda_check_launch("add_bias");
}
