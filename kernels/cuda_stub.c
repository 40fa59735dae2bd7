/* cuda_stub.c: built instead of kernels/cuda/ when nvcc is absent; CUDA is then always unavailable. */
#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"

int kv_backend_cuda_open(kv_backend_t **out)
{
    *out = NULL;
    return kv_error(KV_EUNAVAIL, "%s", kv_cuda_unavailable_reason());
}

const char *kv_cuda_unavailable_reason(void) { return "this kvsim was built without nvcc"; }

void kv_backend_cuda_destroy(kv_backend_t *be) { (void)be; }
