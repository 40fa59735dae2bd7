/*
 * kv_cuda_emu.h: the emulated CUDA backend (tests/cuda_emu/): the CUDA backend's own kernel code
 * (kernels/cuda/cuda_elementwise.cu, cuda_attention.cu) run on the CPU by a fiber emulator, behind
 * the ordinary op table, with its memory in host buffers that are not the host arrays themselves
 * (host_memory = 0, so replay and capture take the same upload/download paths as on a GPU). Matrix
 * products go to the CPU backend (cuBLAS is not emulated). Only the parity runner built by
 * `make test-cuda-emu` links it.
 */
#ifndef KV_CUDA_EMU_API_H
#define KV_CUDA_EMU_API_H

#include "kernels/kv_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

int kv_backend_cuda_emu_open(kv_backend_t **out);
void kv_backend_cuda_emu_close(kv_backend_t *be);
/* Launches, blocks and fiber switches emulated so far. */
void kv_cuda_emu_counts(long *launches, long *blocks, long *switches);

#ifdef __cplusplus
}
#endif
#endif
