/*
 * emu_backend.cpp: the emulated CUDA backend (see kv_cuda_emu.h and cuda_emu.h). Compiled by g++
 * with -DKV_CUDA_EMULATE and cuda_emu.h force-included, like the kernel files it drives.
 *
 * Device memory is host memory filled with NaN bytes when allocated (CUDA leaves it unwritten), so
 * an op that forgets to write an output element is caught by the parity runner's comparisons.
 */
#include "kernels/cuda/cuda_internal.h"
#include "tests/cuda_emu/kv_cuda_emu.h"

#include <stdlib.h>
#include <string.h>

#if KVEMU_FAST_SWITCH
/* kvemu_switch(save, load): push the callee-saved registers, store the stack pointer in *save,
 * switch to the stack `load`, pop its registers and return into it. */
asm(".text\n"
    ".globl kvemu_switch\n"
    ".type kvemu_switch,@function\n"
    "kvemu_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size kvemu_switch,.-kvemu_switch\n");
#endif

struct emu_ctx_t {
    cuda_ctx_t c;     /* first: kv_cuda_ctx() casts be->ctx to it */
    kv_backend_t *cpu; /* matrix products */
};

void *kv_cuda_scratch(kv_backend_t *be, size_t bytes)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    if (bytes > c->scratch_bytes) {
        kv_free_aligned(c->scratch);
        c->scratch = kv_malloc_aligned(bytes, "emulated scratch");
        c->scratch_bytes = c->scratch ? bytes : 0;
        if (!c->scratch)
            return NULL;
    }
    memset(c->scratch, 0xff, bytes); /* NaN: scratch is never assumed to hold anything */
    return c->scratch;
}

int kv_cuda_check_launch(const char *what)
{
    (void)what;
    return KV_OK;
}

static void *emu_alloc(kv_backend_t *be, size_t bytes)
{
    (void)be;
    void *p = kv_malloc_aligned(bytes ? bytes : 1, "emulated device buffer");
    if (p)
        memset(p, 0xff, bytes);
    return p;
}
static void emu_free(kv_backend_t *be, void *p)
{
    (void)be;
    kv_free_aligned(p);
}
static int emu_copy(kv_backend_t *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    if (bytes)
        memcpy(dst, src, bytes);
    return KV_OK;
}
static int emu_sync(kv_backend_t *be)
{
    (void)be;
    return KV_OK;
}
static int emu_matmul(kv_backend_t *be, float *y, const float *x, const float *w, int M, int N, int K)
{
    kv_backend_t *cpu = ((emu_ctx_t *)be->ctx)->cpu;
    return cpu->ops->matmul(cpu, y, x, w, M, N, K);
}

/* Weights in their stored type: the CPU's conversion and product (emulated device memory is host memory). */
static int emu_matmul_w(kv_backend_t *be, float *y, const float *x, const kv_weight_t *w, int M)
{
    kv_backend_t *cpu = ((emu_ctx_t *)be->ctx)->cpu;
    return cpu->ops->matmul_w(cpu, y, x, w, M);
}

/* Filled field by field, like the CUDA backend's table (cuda_backend.cu). */
static kv_backend_ops_t emu_ops_table(void)
{
    kv_backend_ops_t o;
    memset(&o, 0, sizeof o);
    o.alloc = emu_alloc;
    o.free = emu_free;
    o.upload = emu_copy;
    o.download = emu_copy;
    o.sync = emu_sync;
    o.matmul = emu_matmul;
    o.matmul_w = emu_matmul_w;
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
static const kv_backend_ops_t emu_ops = emu_ops_table();

extern "C" int kv_backend_cuda_emu_open(kv_backend_t **out)
{
    *out = NULL;
    kv_backend_t *be = (kv_backend_t *)kv_calloc(1, sizeof *be, "backend");
    emu_ctx_t *e = (emu_ctx_t *)kv_calloc(1, sizeof *e, "emulator context");
    if (!be || !e || kv_backend_cpu_open(1, &e->cpu) != KV_OK) {
        kv_free(be);
        kv_free(e);
        return KV_ENOMEM;
    }
    e->c.sm_count = 132; /* an H100's, so grid sizes are those a GPU run would use */
    be->name = "cuda-emu";
    be->ops = &emu_ops;
    be->n_threads = 1;
    be->ctx = e;
    be->host_memory = 0;
    snprintf(be->device, sizeof be->device, "CUDA kernels emulated on the CPU (fibers, %s context switch, schedule %s)",
             KVEMU_FAST_SWITCH ? "x86-64" : "ucontext", kvemu::schedule_name());
    *out = be;
    return KV_OK;
}

extern "C" void kv_backend_cuda_emu_close(kv_backend_t *be)
{
    if (!be)
        return;
    emu_ctx_t *e = (emu_ctx_t *)be->ctx;
    if (e) {
        kv_free_aligned(e->c.scratch);
        kv_backend_close(e->cpu);
        kv_free(e);
    }
    kv_free(be);
}

extern "C" void kv_cuda_emu_counts(long *launches, long *blocks, long *switches)
{
    *launches = kvemu::st().launches;
    *blocks = kvemu::st().blocks;
    *switches = kvemu::st().switches;
}
