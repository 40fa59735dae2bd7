/*
 * kv_cuda.h: CUDA-only extras beside the op table, for the parity runner, the benchmarks and
 * tools: device facts, event timing on the backend's stream, the matrix-product precision and
 * the two hardware ceilings (a device-to-device copy and a dense cuBLAS product).
 *
 * Every function takes a backend opened with kv_backend_cuda_open and answers KV_EUNAVAIL (with a
 * message) for any other backend and in builds without nvcc (kernels/cuda_stub.c), so callers
 * compile everywhere and test `be->name` or the status.
 *
 * Matrix products: the precision is read from the environment variable KV_CUDA_MATMUL when the
 * backend opens and can be changed later with kv_cuda_set_matmul:
 *   fp32  cublasSgemm, float32 inputs and accumulation (the default; matches the CPU within fp32
 *         rounding);
 *   tf32  the tensor cores on float32 inputs rounded to TF32 (10-bit mantissa), fp32 accumulation;
 *   bf16  inputs converted to bfloat16 on the device each call, fp32 accumulation, fp32 output;
 *   fp16  inputs converted to float16 (values beyond +-65504 become inf), fp32 accumulation.
 * The reduced modes trade exactness for tensor-core speed; parity tolerances per mode are in
 * tests/gpu_parity.c.
 */
#ifndef KV_CUDA_H
#define KV_CUDA_H

#include "kernels/kv_backend.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    char name[256]; /* "NVIDIA H100 80GB HBM3" */
    int cc_major, cc_minor;
    int sm_count;
    double mem_bytes; /* global memory */
    double l2_bytes;
    double mem_clock_khz; /* peak memory clock (0 if the runtime does not say) */
    int bus_width_bits;
    double sm_clock_khz;                 /* peak SM clock (0 if unknown) */
    int runtime_version, driver_version; /* 13000 = 13.0 */
} kv_cuda_info_t;

int kv_cuda_info(kv_backend_t *be, kv_cuda_info_t *out);

/* "fp32", "tf32", "bf16" or "fp16" (KV_EINVAL lists them otherwise). */
int kv_cuda_set_matmul(kv_backend_t *be, const char *mode);
/* The current mode's name ("fp32" for non-CUDA backends). */
const char *kv_cuda_get_matmul(const kv_backend_t *be);

/* Time `fn(be, arg)` with CUDA events on the backend's stream: `warmup` untimed calls, then `reps`
 * calls, each between two events; times_ms[reps] receives each call's milliseconds (NAN for calls not
 * timed because an earlier one failed). Work that fn queues on other streams is not timed. Returns
 * fn's first error, if any. */
int kv_cuda_time(kv_backend_t *be, int (*fn)(kv_backend_t *be, void *arg), void *arg, int warmup, int reps,
                 double *times_ms);

/* Measured ceilings (METHOD.md: measure them, do not trust datasheets): the median bandwidth of a
 * device-to-device copy of `bytes` (bytes read + written per second), and the median rate of an
 * n x n x n cuBLAS product in `mode` ("fp32", "tf32", "bf16", "fp16"; FLOP/s, 2 n^3 per product) on
 * random data. */
int kv_cuda_copy_ceiling(kv_backend_t *be, size_t bytes, double *bytes_per_s);
int kv_cuda_gemm_ceiling(kv_backend_t *be, int n, const char *mode, double *flop_per_s);

#ifdef __cplusplus
}
#endif
#endif
