/* cuda_stub.c: built instead of kernels/cuda/ when nvcc is absent; CUDA is then always unavailable,
 * and the extras of kv_cuda.h answer KV_EUNAVAIL. */
#include "kernels/kv_backend.h"
#include "kernels/kv_cuda.h"
#include "sim/common/kv_common.h"

#define NO_NVCC "this kvsim was built without nvcc"

int kv_backend_cuda_open(kv_backend_t **out)
{
    *out = NULL;
    return kv_error(KV_EUNAVAIL, "%s", kv_cuda_unavailable_reason());
}

const char *kv_cuda_unavailable_reason(void)
{
    return NO_NVCC;
}

void kv_backend_cuda_destroy(kv_backend_t *be)
{
    (void)be;
}

int kv_cuda_info(kv_backend_t *be, kv_cuda_info_t *out)
{
    (void)be;
    (void)out;
    return kv_error(KV_EUNAVAIL, NO_NVCC);
}

int kv_cuda_set_matmul(kv_backend_t *be, const char *mode)
{
    (void)be;
    (void)mode;
    return kv_error(KV_EUNAVAIL, NO_NVCC);
}

const char *kv_cuda_get_matmul(const kv_backend_t *be)
{
    (void)be;
    return "fp32";
}

int kv_cuda_time(kv_backend_t *be, int (*fn)(kv_backend_t *be, void *arg), void *arg, int warmup, int reps,
                 double *times_ms)
{
    (void)be;
    (void)fn;
    (void)arg;
    (void)warmup;
    (void)reps;
    (void)times_ms;
    return kv_error(KV_EUNAVAIL, NO_NVCC);
}

int kv_cuda_copy_ceiling(kv_backend_t *be, size_t bytes, double *bytes_per_s)
{
    (void)be;
    (void)bytes;
    (void)bytes_per_s;
    return kv_error(KV_EUNAVAIL, NO_NVCC);
}

int kv_cuda_gemm_ceiling(kv_backend_t *be, int n, const char *mode, double *flop_per_s)
{
    (void)be;
    (void)n;
    (void)mode;
    (void)flop_per_s;
    return kv_error(KV_EUNAVAIL, NO_NVCC);
}
