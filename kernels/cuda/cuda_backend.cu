/*
 * cuda_backend.cu: the CUDA backend (compiled whenever nvcc exists): probe, memory ops, matrix
 * products through cuBLAS, the op table, and the extras of kernels/kv_cuda.h.
 *
 * The probe treats any CUDA runtime error (no device, no driver, driver too old for this runtime)
 * as "unavailable" with the runtime's own message, so every kvsim binary runs on a machine without
 * a GPU. The compute ops live in cuda_elementwise.cu and cuda_attention.cu (see cuda_internal.h).
 *
 * Matrix products: y (M, N) = x (M, K) . w (N, K)^T. cuBLAS is column-major, so we ask it for
 * y^T (N, M) = w (N, K) . x^T (K, M) with w transposed (op T on a K x N column-major view of w).
 * Precision per kv_cuda.h: fp32 (cublasSgemm), tf32 (cublasGemmEx with
 * CUBLAS_COMPUTE_32F_FAST_TF32), bf16 / fp16 (inputs converted on the device into scratch, then
 * cublasGemmEx with fp32 compute and fp32 output). The converted weights are not cached: every
 * call converts w again (a later optimisation for capture, where weights never change).
 * matmul_w (weights in their stored precision): fp16/bf16 rows are converted to fp32 on the device a
 * tile at a time and multiplied with fp32 accumulation (below).
 */
#include "kernels/cuda/cuda_internal.h"
#include "kernels/kv_cuda.h"
#include "sim/common/kv_log.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char g_reason[256];
static int g_probed = 0, g_ok = 0;

static void probe(void)
{
    if (g_probed)
        return;
    g_probed = 1;
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        snprintf(g_reason, sizeof g_reason, "%s", cudaGetErrorString(e));
        cudaGetLastError();
        return;
    }
    if (n == 0) {
        snprintf(g_reason, sizeof g_reason, "no CUDA device found");
        return;
    }
    g_ok = 1;
    g_reason[0] = 0;
}

extern "C" const char *kv_cuda_unavailable_reason(void)
{
    probe();
    return g_reason;
}

int kv_cuda_check_launch(const char *what)
{
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
        return kv_error(KV_EIO, "cuda kernel %s: %s", what, cudaGetErrorString(e));
    return KV_OK;
}

void *kv_cuda_scratch(kv_backend_t *be, size_t bytes)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    if (bytes <= c->scratch_bytes)
        return c->scratch;
    /* the old buffer may still be read by queued work: wait for it before freeing. A failed wait is an
     * earlier kernel's fault (sticky): report that, not an allocation failure, and keep the buffer */
    cudaError_t e = cudaStreamSynchronize(c->stream);
    if (e != cudaSuccess) {
        kv_error(KV_EIO, "cuda scratch: an earlier operation failed: %s", cudaGetErrorString(e));
        return NULL;
    }
    if (c->scratch)
        cudaFree(c->scratch);
    c->scratch = NULL;
    c->scratch_bytes = 0;
    size_t want = bytes + bytes / 4; /* some headroom: shapes grow a little from call to call */
    e = cudaMalloc(&c->scratch, want);
    if (e != cudaSuccess) {
        c->scratch = NULL;
        cudaGetLastError();
        kv_error(KV_ENOMEM, "cuda scratch of %zu bytes: %s", want, cudaGetErrorString(e));
        return NULL;
    }
    c->scratch_bytes = want;
    return c->scratch;
}

/* ---------------------------------------------------------------- memory */

static void *cu_alloc(kv_backend_t *be, size_t bytes)
{
    (void)be;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();
        kv_error(KV_ENOMEM, "cudaMalloc(%zu): %s", bytes, cudaGetErrorString(e));
        return NULL;
    }
    return p;
}

static void cu_free(kv_backend_t *be, void *p)
{
    (void)be;
    if (p)
        cudaFree(p);
}

static int cu_upload(kv_backend_t *be, void *dst, const void *src, size_t bytes)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    if (!bytes)
        return KV_OK;
    KV_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c->stream), "upload");
    return KV_OK;
}

static int cu_download(kv_backend_t *be, void *dst, const void *src, size_t bytes)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    if (!bytes)
        return KV_OK;
    KV_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c->stream), "download");
    KV_CUDA_TRY(cudaStreamSynchronize(c->stream), "download sync");
    return KV_OK;
}

static int cu_sync(kv_backend_t *be)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    KV_CUDA_TRY(cudaStreamSynchronize(c->stream), "sync");
    return KV_OK;
}

/* ---------------------------------------------------------------- matmul */

static const char *const mm_names[] = {"fp32", "tf32", "bf16", "fp16"};

static int parse_mm(const char *s, kv_mm_mode_t *out)
{
    for (int i = 0; i < 4; i++)
        if (!strcmp(s, mm_names[i])) {
            *out = (kv_mm_mode_t)i;
            return KV_OK;
        }
    return kv_error(KV_EINVAL, "matmul precision '%s' (valid: fp32, tf32, bf16, fp16)", s);
}

template <typename T> __device__ __forceinline__ T to_half(float v);
template <> __device__ __forceinline__ __nv_bfloat16 to_half<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half to_half<__half>(float v)
{
    return __float2half_rn(v);
}

/* dst (n) = round-to-nearest(src (n)) */
template <typename T> __global__ void k_convert(T *dst, const float *src, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = to_half<T>(src[i]);
}

static unsigned grid_for(size_t n, int threads, int sm_count)
{
    size_t b = (n + threads - 1) / threads;
    size_t cap = (size_t)sm_count * 16;
    return (unsigned)(b < 1 ? 1 : (b > cap ? cap : b));
}

static const char *blas_status(cublasStatus_t s)
{
    switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "allocation failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "architecture mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
    }
}

/* y (M,N) = x (M,K) . w (N,K)^T with a, b of element type `ty` (device pointers). */
static int gemm_ex(cuda_ctx_t *c, float *y, const void *x, const void *w, cudaDataType_t ty,
                   cublasComputeType_t compute, int M, int N, int K)
{
    const float one = 1.0f, zero = 0.0f;
    cublasStatus_t s = cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, ty, K, x, ty, K, &zero, y,
                                    CUDA_R_32F, N, compute, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS)
        return kv_error(KV_EIO, "cublasGemmEx (M=%d N=%d K=%d): %s", M, N, K, blas_status(s));
    return KV_OK;
}

template <typename T>
static int matmul_half(kv_backend_t *be, float *y, const float *x, const float *w, int M, int N, int K,
                       cudaDataType_t ty)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    size_t nx = (size_t)M * K, nw = (size_t)N * K;
    size_t off_w = (nx * sizeof(T) + 255) / 256 * 256;
    char *buf = (char *)kv_cuda_scratch(be, off_w + nw * sizeof(T));
    if (!buf)
        return KV_ENOMEM;
    T *hx = (T *)buf, *hw = (T *)(buf + off_w);
    k_convert<T><<<grid_for(nx, 256, c->sm_count), 256, 0, c->stream>>>(hx, x, nx);
    k_convert<T><<<grid_for(nw, 256, c->sm_count), 256, 0, c->stream>>>(hw, w, nw);
    int rc = kv_cuda_check_launch("convert");
    if (rc)
        return rc;
    return gemm_ex(c, y, hx, hw, ty, CUBLAS_COMPUTE_32F, M, N, K);
}

static int cu_matmul(kv_backend_t *be, float *y, const float *x, const float *w, int M, int N, int K)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    if (M <= 0 || N <= 0 || K <= 0)
        return kv_error(KV_EINVAL, "matmul: bad shape M=%d N=%d K=%d", M, N, K);
    switch (c->mm_mode) {
    case KV_MM_TF32: return gemm_ex(c, y, x, w, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, M, N, K);
    case KV_MM_BF16: return matmul_half<__nv_bfloat16>(be, y, x, w, M, N, K, CUDA_R_16BF);
    case KV_MM_FP16: return matmul_half<__half>(be, y, x, w, M, N, K, CUDA_R_16F);
    case KV_MM_FP32:
    default: {
        const float one = 1.0f, zero = 0.0f;
        cublasStatus_t s = cublasSgemm(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &one, w, K, x, K, &zero, y, N);
        if (s != CUBLAS_STATUS_SUCCESS)
            return kv_error(KV_EIO, "cublasSgemm (M=%d N=%d K=%d): %s", M, N, K, blas_status(s));
        return KV_OK;
    }
    }
}

/* ---------------------------------------------------------------- matmul_w */

template <typename T> __device__ __forceinline__ float half_to_f32(T v);
template <> __device__ __forceinline__ float half_to_f32<__nv_bfloat16>(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
template <> __device__ __forceinline__ float half_to_f32<__half>(__half v)
{
    return __half2float(v);
}

/* dst (n_rows, cols) = the fp32 values of n_rows stored half-precision rows at src (row stride row_bytes,
 * an even number: every element is 2-byte aligned in device memory). Exact conversions. */
template <typename T>
__global__ void k_rows_to_f32(float *dst, const unsigned char *src, size_t row_bytes, int cols, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / (size_t)cols, col = i % (size_t)cols;
        dst[i] = half_to_f32<T>(*(const T *)(src + r * row_bytes + 2 * col));
    }
}

#define MMW_TILE_BYTES ((size_t)256 << 20) /* fp32 rows converted per cuBLAS call */

/* Weights kept on the device in their stored precision (the forward pass uploads fp32, fp16 and bf16
 * as stored, rows already in their logical order, and converts ggml's block types to fp32 on the host):
 * fp32 goes to cu_matmul; fp16 and bf16 are converted to fp32 on the device a tile of rows at a time into
 * the scratch buffer, then multiplied by cublasSgemm (tf32 when KV_CUDA_MATMUL=tf32), fp32 accumulation;
 * the bf16 and fp16 matmul modes, which would round the activations too, are not applied to them. */
static int cu_matmul_w(kv_backend_t *be, float *y, const float *x, const kv_weight_t *w, int M)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    const int N = w->rows, K = w->cols;
    if (M <= 0 || N <= 0 || K <= 0 || !w->data)
        return kv_error(KV_EINVAL, "matmul_w: bad shape M=%d N=%d K=%d", M, N, K);
    if (w->perm > 0)
        return kv_error(KV_ENOTIMPL, "matmul_w: the CUDA backend takes rows in their logical order (perm %d)",
                        w->perm);
    if (w->type == KV_WT_F32 && w->row_bytes == (size_t)K * sizeof(float))
        return cu_matmul(be, y, x, (const float *)w->data, M, N, K);
    if ((w->type != KV_WT_F16 && w->type != KV_WT_BF16) || w->row_bytes % 2)
        return kv_error(KV_ENOTIMPL, "matmul_w: the CUDA backend multiplies fp32, fp16 and bf16 weights, not %s",
                        kv_weight_type_name(w->type) ? kv_weight_type_name(w->type) : "this type");
    const int tile = (int)KV_MAX((size_t)1, KV_MIN((size_t)N, MMW_TILE_BYTES / ((size_t)K * sizeof(float))));
    float *buf = (float *)kv_cuda_scratch(be, (size_t)tile * K * sizeof(float));
    if (!buf)
        return KV_ENOMEM;
    const cublasComputeType_t compute =
        c->mm_mode == KV_MM_TF32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    for (int r0 = 0; r0 < N; r0 += tile) {
        const int nr = KV_MIN(tile, N - r0);
        const size_t n = (size_t)nr * K;
        const unsigned char *src = (const unsigned char *)w->data + (size_t)r0 * w->row_bytes;
        if (w->type == KV_WT_BF16)
            k_rows_to_f32<__nv_bfloat16>
                <<<grid_for(n, 256, c->sm_count), 256, 0, c->stream>>>(buf, src, w->row_bytes, K, n);
        else
            k_rows_to_f32<__half><<<grid_for(n, 256, c->sm_count), 256, 0, c->stream>>>(buf, src, w->row_bytes, K, n);
        int rc = kv_cuda_check_launch("rows_to_f32");
        if (rc)
            return rc;
        /* y[:, r0:r0+nr] (column-major nr x M, ldc N) = tile (nr, K) . x^T */
        const float one = 1.0f, zero = 0.0f;
        cublasStatus_t st = cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, nr, M, K, &one, buf, CUDA_R_32F, K, x,
                                         CUDA_R_32F, K, &zero, y + r0, CUDA_R_32F, N, compute, CUBLAS_GEMM_DEFAULT);
        if (st != CUBLAS_STATUS_SUCCESS)
            return kv_error(KV_EIO, "cublasGemmEx (matmul_w M=%d N=%d K=%d): %s", M, nr, K, blas_status(st));
    }
    return KV_OK;
}

/* ---------------------------------------------------------------- the table */

/* Filled field by field (not positionally), so a reordered or extended kv_backend_ops_t cannot put
 * an op in another's slot; ops left out stay NULL and kv_backend_missing_op names them. */
static kv_backend_ops_t cuda_ops_table(void)
{
    kv_backend_ops_t o;
    memset(&o, 0, sizeof o);
    o.alloc = cu_alloc;
    o.free = cu_free;
    o.upload = cu_upload;
    o.download = cu_download;
    o.sync = cu_sync;
    o.matmul = cu_matmul;
    o.matmul_w = cu_matmul_w;
    o.rmsnorm = kv_cuda_rmsnorm;
    o.rope = kv_cuda_rope;
    o.swiglu = kv_cuda_swiglu;
    o.add = kv_cuda_add;
    o.add_bias = kv_cuda_add_bias;
    o.attention = kv_cuda_attention;
    o.attn_stats = kv_cuda_attn_stats;
    o.attn_probs = kv_cuda_attn_probs;
    o.attn_colstats = kv_cuda_attn_colstats;
    o.attn_ragged = kv_cuda_attn_ragged;
    return o;
}
static const kv_backend_ops_t cuda_ops = cuda_ops_table();

extern "C" int kv_backend_cuda_open(kv_backend_t **out)
{
    *out = NULL;
    probe();
    if (!g_ok)
        return kv_error(KV_EUNAVAIL, "%s", g_reason);
    kv_mm_mode_t mode = KV_MM_FP32;
    const char *env = getenv("KV_CUDA_MATMUL");
    if (env && *env && parse_mm(env, &mode) != KV_OK)
        return kv_error(KV_EINVAL, "KV_CUDA_MATMUL=%s: valid values are fp32, tf32, bf16, fp16", env);
    kv_backend_t *be = (kv_backend_t *)kv_calloc(1, sizeof *be, "backend");
    cuda_ctx_t *c = (cuda_ctx_t *)kv_calloc(1, sizeof *c, "cuda context");
    if (!be || !c) {
        kv_free(be);
        kv_free(c);
        return KV_ENOMEM;
    }
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, 0);
    if (e == cudaSuccess)
        e = cudaSetDevice(0);
    if (e == cudaSuccess)
        e = cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking);
    cublasStatus_t bs = CUBLAS_STATUS_NOT_INITIALIZED;
    if (e == cudaSuccess && (bs = cublasCreate(&c->blas)) == CUBLAS_STATUS_SUCCESS &&
        (bs = cublasSetStream(c->blas, c->stream)) != CUBLAS_STATUS_SUCCESS)
        cublasDestroy(c->blas);
    if (e != cudaSuccess || bs != CUBLAS_STATUS_SUCCESS) {
        /* the stream (and handle) made so far are released: a failed open leaks nothing */
        snprintf(g_reason, sizeof g_reason, "device setup failed: %s%s",
                 e != cudaSuccess ? cudaGetErrorString(e) : "cuBLAS handle: ", e != cudaSuccess ? "" : blas_status(bs));
        if (c->stream)
            cudaStreamDestroy(c->stream);
        cudaGetLastError();
        g_ok = 0;
        kv_free(be);
        kv_free(c);
        return kv_error(KV_EUNAVAIL, "%s", g_reason);
    }
    c->device = 0;
    c->sm_count = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    c->mm_mode = mode;
    be->name = "cuda";
    be->ops = &cuda_ops;
    be->n_threads = 1;
    be->ctx = c;
    be->host_memory = 0;
    snprintf(be->device, sizeof be->device, "%s (sm_%d%d, %.0f GiB%s%s)", prop.name, prop.major, prop.minor,
             prop.totalGlobalMem / 1073741824.0, mode != KV_MM_FP32 ? ", matmul " : "",
             mode != KV_MM_FP32 ? mm_names[mode] : "");
    if (mode != KV_MM_FP32)
        kv_info("cuda: matrix products in %s (KV_CUDA_MATMUL)", mm_names[mode]);
    *out = be;
    return KV_OK;
}

extern "C" void kv_backend_cuda_destroy(kv_backend_t *be)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    if (!c)
        return;
    cudaStreamSynchronize(c->stream);
    if (c->scratch)
        cudaFree(c->scratch);
    cublasDestroy(c->blas);
    cudaStreamDestroy(c->stream);
    kv_free(c);
    be->ctx = NULL;
}

/* ---------------------------------------------------------------- kv_cuda.h extras */

static int need_cuda(const kv_backend_t *be, const char *what)
{
    if (!be || !be->name || strcmp(be->name, "cuda") || !be->ctx)
        return kv_error(KV_EUNAVAIL, "%s needs the CUDA backend (got %s)", what, be && be->name ? be->name : "none");
    return KV_OK;
}

extern "C" int kv_cuda_info(kv_backend_t *be, kv_cuda_info_t *o)
{
    int rc = need_cuda(be, "kv_cuda_info");
    if (rc)
        return rc;
    memset(o, 0, sizeof *o);
    cuda_ctx_t *c = kv_cuda_ctx(be);
    cudaDeviceProp p;
    KV_CUDA_TRY(cudaGetDeviceProperties(&p, c->device), "device properties");
    snprintf(o->name, sizeof o->name, "%s", p.name);
    o->cc_major = p.major;
    o->cc_minor = p.minor;
    o->sm_count = p.multiProcessorCount;
    o->mem_bytes = (double)p.totalGlobalMem;
    o->l2_bytes = (double)p.l2CacheSize;
    o->bus_width_bits = p.memoryBusWidth;
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMemoryClockRate, c->device) == cudaSuccess)
        o->mem_clock_khz = v;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrClockRate, c->device) == cudaSuccess)
        o->sm_clock_khz = v;
    cudaGetLastError();
    cudaRuntimeGetVersion(&o->runtime_version);
    cudaDriverGetVersion(&o->driver_version);
    return KV_OK;
}

extern "C" int kv_cuda_set_matmul(kv_backend_t *be, const char *mode)
{
    int rc = need_cuda(be, "kv_cuda_set_matmul");
    if (rc)
        return rc;
    kv_mm_mode_t m = KV_MM_FP32;
    if ((rc = parse_mm(mode, &m)))
        return rc;
    kv_cuda_ctx(be)->mm_mode = m;
    return KV_OK;
}

extern "C" const char *kv_cuda_get_matmul(const kv_backend_t *be)
{
    if (!be || !be->name || strcmp(be->name, "cuda") || !be->ctx)
        return "fp32";
    return mm_names[((const cuda_ctx_t *)be->ctx)->mm_mode];
}

extern "C" int kv_cuda_time(kv_backend_t *be, int (*fn)(kv_backend_t *, void *), void *arg, int warmup, int reps,
                            double *times_ms)
{
    int rc = need_cuda(be, "kv_cuda_time");
    if (rc)
        return rc;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    cudaEvent_t e0 = NULL, e1 = NULL;
    KV_CUDA_TRY(cudaEventCreate(&e0), "event create");
    if (cudaEventCreate(&e1) != cudaSuccess) {
        cudaEventDestroy(e0);
        return kv_error(KV_EIO, "cuda event create failed");
    }
    for (int i = 0; i < reps; i++)
        times_ms[i] = NAN; /* what a failed call leaves: never a stale or uninitialised time */
    for (int i = 0; i < warmup && rc == KV_OK; i++)
        rc = fn(be, arg);
    for (int i = 0; i < reps && rc == KV_OK; i++) {
        float ms = 0;
        cudaError_t e = cudaEventRecord(e0, c->stream);
        if (e == cudaSuccess) {
            if ((rc = fn(be, arg)) != KV_OK)
                break;
            e = cudaEventRecord(e1, c->stream);
        }
        if (e == cudaSuccess)
            e = cudaEventSynchronize(e1);
        if (e == cudaSuccess)
            e = cudaEventElapsedTime(&ms, e0, e1);
        if (rc == KV_OK && e != cudaSuccess)
            rc = kv_error(KV_EIO, "cuda timing: %s", cudaGetErrorString(e));
        times_ms[i] = ms;
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
    return rc;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    void *dst;
    const void *src;
    size_t bytes;
} copy_arg_t;

static int copy_fn(kv_backend_t *be, void *arg)
{
    copy_arg_t *a = (copy_arg_t *)arg;
    KV_CUDA_TRY(cudaMemcpyAsync(a->dst, a->src, a->bytes, cudaMemcpyDeviceToDevice, kv_cuda_ctx(be)->stream),
                "device copy");
    return KV_OK;
}

/* Fill with uniform values in [-1, 1) from a counter hash (no cuRAND dependency). */
__global__ void k_fill_hash(float *x, size_t n, unsigned seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned long long z = (unsigned long long)i * 0x9E3779B97F4A7C15ull + seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        x[i] = (float)((z >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
    }
}

extern "C" int kv_cuda_copy_ceiling(kv_backend_t *be, size_t bytes, double *bytes_per_s)
{
    int rc = need_cuda(be, "kv_cuda_copy_ceiling");
    if (rc)
        return rc;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    copy_arg_t a = {NULL, NULL, bytes};
    void *src = cu_alloc(be, bytes), *dst = cu_alloc(be, bytes);
    double t[20];
    if (!src || !dst) {
        rc = KV_ENOMEM;
        goto done;
    }
    k_fill_hash<<<grid_for(bytes / 4, 256, c->sm_count), 256, 0, c->stream>>>((float *)src, bytes / 4, 7u);
    if ((rc = kv_cuda_check_launch("fill")))
        goto done;
    a.dst = dst;
    a.src = src;
    rc = kv_cuda_time(be, copy_fn, &a, 3, 20, t);
    if (rc == KV_OK) {
        qsort(t, 20, sizeof(double), cmp_double);
        *bytes_per_s = 2.0 * (double)bytes / (t[10] * 1e-3);
    }
done:
    cu_free(be, src);
    cu_free(be, dst);
    return rc;
}

typedef struct {
    cuda_ctx_t *c;
    void *a, *b;
    float *y;
    int n;
    kv_mm_mode_t mode;
} gemm_arg_t;

static int gemm_fn(kv_backend_t *be, void *arg)
{
    (void)be;
    gemm_arg_t *g = (gemm_arg_t *)arg;
    switch (g->mode) {
    case KV_MM_TF32: return gemm_ex(g->c, g->y, g->a, g->b, CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32, g->n, g->n, g->n);
    case KV_MM_BF16: return gemm_ex(g->c, g->y, g->a, g->b, CUDA_R_16BF, CUBLAS_COMPUTE_32F, g->n, g->n, g->n);
    case KV_MM_FP16: return gemm_ex(g->c, g->y, g->a, g->b, CUDA_R_16F, CUBLAS_COMPUTE_32F, g->n, g->n, g->n);
    default: return gemm_ex(g->c, g->y, g->a, g->b, CUDA_R_32F, CUBLAS_COMPUTE_32F, g->n, g->n, g->n);
    }
}

extern "C" int kv_cuda_gemm_ceiling(kv_backend_t *be, int n, const char *mode, double *flop_per_s)
{
    int rc = need_cuda(be, "kv_cuda_gemm_ceiling");
    if (rc)
        return rc;
    cuda_ctx_t *c = kv_cuda_ctx(be);
    gemm_arg_t g = {c, NULL, NULL, NULL, n, KV_MM_FP32};
    if ((rc = parse_mm(mode, &g.mode)))
        return rc;
    size_t nn = (size_t)n * n;
    float *fa = (float *)cu_alloc(be, nn * 4), *fb = (float *)cu_alloc(be, nn * 4);
    g.y = (float *)cu_alloc(be, nn * 4);
    void *ha = NULL, *hb = NULL;
    double t[10];
    if (!fa || !fb || !g.y) {
        rc = KV_ENOMEM;
        goto done;
    }
    k_fill_hash<<<grid_for(nn, 256, c->sm_count), 256, 0, c->stream>>>(fa, nn, 1u);
    k_fill_hash<<<grid_for(nn, 256, c->sm_count), 256, 0, c->stream>>>(fb, nn, 2u);
    g.a = fa;
    g.b = fb;
    if (g.mode == KV_MM_BF16 || g.mode == KV_MM_FP16) {
        ha = cu_alloc(be, nn * 2);
        hb = cu_alloc(be, nn * 2);
        if (!ha || !hb) {
            rc = KV_ENOMEM;
            goto done;
        }
        if (g.mode == KV_MM_BF16) {
            k_convert<__nv_bfloat16>
                <<<grid_for(nn, 256, c->sm_count), 256, 0, c->stream>>>((__nv_bfloat16 *)ha, fa, nn);
            k_convert<__nv_bfloat16>
                <<<grid_for(nn, 256, c->sm_count), 256, 0, c->stream>>>((__nv_bfloat16 *)hb, fb, nn);
        } else {
            k_convert<__half><<<grid_for(nn, 256, c->sm_count), 256, 0, c->stream>>>((__half *)ha, fa, nn);
            k_convert<__half><<<grid_for(nn, 256, c->sm_count), 256, 0, c->stream>>>((__half *)hb, fb, nn);
        }
        g.a = ha;
        g.b = hb;
    }
    if ((rc = kv_cuda_check_launch("fill")))
        goto done;
    rc = kv_cuda_time(be, gemm_fn, &g, 3, 10, t);
    if (rc == KV_OK) {
        qsort(t, 10, sizeof(double), cmp_double);
        *flop_per_s = 2.0 * (double)n * n * n / (t[5] * 1e-3);
    }
done:
    cu_free(be, fa);
    cu_free(be, fb);
    cu_free(be, g.y);
    cu_free(be, ha);
    cu_free(be, hb);
    return rc;
}
