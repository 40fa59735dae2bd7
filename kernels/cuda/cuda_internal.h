/*
 * cuda_internal.h: what the CUDA backend's translation units share (private to kernels/cuda/).
 *
 * The backend is split by kind of work:
 *   cuda_backend.cu      probe, memory ops, cuBLAS matmul (fp32 / tf32 / bf16 / fp16), the op
 *                        table, device facts and event timing (kernels/kv_cuda.h);
 *   cuda_elementwise.cu  rmsnorm, rope, swiglu, add, add_bias (memory-bound, one pass each);
 *   cuda_attention.cu    attention, attn_stats, attn_probs, attn_colstats (tiled, never T x T);
 *   cuda_ragged.cu       attn_ragged (attention over a compressed cache, closed-loop evaluation).
 * Every op runs on the context's one stream, in order, so scratch memory can be reused from op to
 * op without further synchronisation. Each launch is followed by a check of cudaGetLastError();
 * asynchronous faults surface at the next sync or download, with the runtime's message.
 */
#ifndef KV_CUDA_INTERNAL_H
#define KV_CUDA_INTERNAL_H

#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"

#ifdef KV_CUDA_EMULATE
/* Host emulation of the kernels (tests/cuda_emu/): g++ compiles cuda_elementwise.cu and
 * cuda_attention.cu with tests/cuda_emu/cuda_emu.h force-included, so the very kernel code runs on
 * the CPU, one simulated thread per fiber, and the parity runner checks its logic on machines
 * without a GPU. The entry points are renamed so that both builds can live in one program. */
typedef void *cublasHandle_t;
#define kv_cuda_rmsnorm kv_cuda_emu_rmsnorm
#define kv_cuda_rope kv_cuda_emu_rope
#define kv_cuda_swiglu kv_cuda_emu_swiglu
#define kv_cuda_add kv_cuda_emu_add
#define kv_cuda_add_bias kv_cuda_emu_add_bias
#define kv_cuda_attention kv_cuda_emu_attention
#define kv_cuda_attn_stats kv_cuda_emu_attn_stats
#define kv_cuda_attn_probs kv_cuda_emu_attn_probs
#define kv_cuda_attn_colstats kv_cuda_emu_attn_colstats
#define kv_cuda_attn_ragged kv_cuda_emu_attn_ragged
#define kv_cuda_scratch kv_cuda_emu_scratch
#define kv_cuda_check_launch kv_cuda_emu_check_launch
#define KV_LAUNCH(grid, block, smem, stream, ...) kvemu::launch(grid, block, smem, __VA_ARGS__, #__VA_ARGS__)
#define KV_DYN_SMEM(type, name) type *name = reinterpret_cast<type *>(kvemu::dyn_smem())
#else
#include <cublas_v2.h>
#include <cuda_runtime.h>
/* KV_LAUNCH(grid, block, shared bytes, stream, kernel)(args...): a kernel launch (the kernel comes
 * last so that template arguments may hold commas). KV_DYN_SMEM: the dynamic shared memory. */
#define KV_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define KV_DYN_SMEM(type, name) extern __shared__ type name[]
#endif

/* Matrix product precision (KV_CUDA_MATMUL or kv_cuda_set_matmul). */
typedef enum { KV_MM_FP32 = 0, KV_MM_TF32, KV_MM_BF16, KV_MM_FP16 } kv_mm_mode_t;

typedef struct {
    int device;
    int sm_count;
    cublasHandle_t blas;
    cudaStream_t stream;
    kv_mm_mode_t mm_mode;
    void *scratch; /* device scratch, grown on demand (kv_cuda_scratch) */
    size_t scratch_bytes;
} cuda_ctx_t;

static inline cuda_ctx_t *kv_cuda_ctx(kv_backend_t *be)
{
    return (cuda_ctx_t *)be->ctx;
}

/* Device scratch of at least `bytes`, valid until the next call (ops run in stream order, so one
 * op's scratch is never in use by another). NULL + message on failure. */
void *kv_cuda_scratch(kv_backend_t *be, size_t bytes);

/* KV_OK, or KV_EIO naming the kernel when the launch failed. */
int kv_cuda_check_launch(const char *what);

#define KV_CUDA_TRY(call, what)                                                                                        \
    do {                                                                                                               \
        cudaError_t e_ = (call);                                                                                       \
        if (e_ != cudaSuccess)                                                                                         \
            return kv_error(KV_EIO, "cuda %s: %s", what, cudaGetErrorString(e_));                                      \
    } while (0)

/* Op bodies (kv_backend_ops_t signatures). */
int kv_cuda_rmsnorm(kv_backend_t *be, float *y, const float *x, const float *w, int T, int dim, float eps);
int kv_cuda_rope(kv_backend_t *be, float *x, const int32_t *pos, int T, int n_heads, int head_dim,
                 const kv_rope_t *rope);
int kv_cuda_swiglu(kv_backend_t *be, float *h, const float *g, size_t n);
int kv_cuda_add(kv_backend_t *be, float *x, const float *y, size_t n);
int kv_cuda_add_bias(kv_backend_t *be, float *y, const float *b, int rows, int cols);
int kv_cuda_attention(kv_backend_t *be, const kv_attn_args_t *a);
int kv_cuda_attn_stats(kv_backend_t *be, const kv_attn_stats_args_t *a);
int kv_cuda_attn_probs(kv_backend_t *be, const kv_qk_args_t *a, float *probs, float *lse);
int kv_cuda_attn_colstats(kv_backend_t *be, const kv_qk_args_t *a, const kv_colstats_out_t *out);
int kv_cuda_attn_ragged(kv_backend_t *be, const kv_attn_ragged_args_t *a); /* cuda_ragged.cu */

#endif
