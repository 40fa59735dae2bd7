/*
 * cuda_emu.h: a small host emulator for kvsim's CUDA kernels, so that their logic (indexing, masks,
 * online softmax, split merges, shared-memory tiling, barriers, warp shuffles) runs and is checked
 * on machines without a GPU. It is force-included (g++ -include) when kernels/cuda/cuda_elementwise.cu
 * and kernels/cuda/cuda_attention.cu are compiled as C++ with -DKV_CUDA_EMULATE (see the Makefile's
 * `test-cuda-emu` target); nothing of it reaches the real CUDA build.
 *
 * Model: a launch runs its blocks one after the other; every thread of a block is a fiber (ucontext)
 * on one OS thread, scheduled round-robin. __syncthreads() waits until every thread of the block
 * has arrived; warp shuffles and votes go through a per-warp exchange slot between two warp
 * barriers, so they need all 32 lanes to take part (as __shfl_*_sync with a full mask does).
 * Dynamic shared memory is filled with NaN bytes before each block (reads of unwritten shared
 * memory show up as NaN); static __shared__ variables become function statics (shared by the
 * block's fibers, which is what they are). A barrier that can never complete is reported as a
 * deadlock and aborts.
 *
 * What it does not model: concurrency between blocks and warps (races that depend on timing),
 * memory-model ordering, CUDA's own math library (the host libm runs instead), performance.
 */
#ifndef KV_CUDA_EMU_H
#define KV_CUDA_EMU_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

typedef int cudaError_t;
typedef void *cudaStream_t;
enum { cudaSuccess = 0 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class K> inline cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void *p, int v, size_t n, cudaStream_t) { return memset(p, v, n), cudaSuccess; }
inline cudaError_t cudaGetLastError(void) { return cudaSuccess; }
inline const char *cudaGetErrorString(cudaError_t) { return "emulated CUDA error"; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline int __float_as_int(float f)
{
    int i;
    memcpy(&i, &f, sizeof i);
    return i;
}
template <class T> inline T __ldg(const T *p) { return *p; }
inline int atomicMax(int *p, int v)
{
    int old = *p;
    if (v > old)
        *p = v;
    return old;
}

namespace kvemu {

enum { RUN = 0, WAIT_BLOCK = 1, WAIT_WARP = 2 };

/* Context switch. On x86-64 a few instructions (kvemu_switch in emu_backend.cpp: save the
 * callee-saved registers and the stack pointer, load the other's); elsewhere ucontext, which makes a
 * system call per switch (~50x slower). */
#if defined(__x86_64__)
#define KVEMU_FAST_SWITCH 1
extern "C" void kvemu_switch(void **save_sp, void *load_sp);
#else
#define KVEMU_FAST_SWITCH 0
#endif

struct Fiber {
    ucontext_t ctx;
    void *sp;
    uint3 tid;
    int warp, lane;
    long nbar, nwarp; /* barriers passed (block, warp) */
    int wait, done;
    char *stack;
};

struct State {
    std::vector<Fiber> f;
    int cur = 0;
    ucontext_t sched;
    void *sched_sp = nullptr;
    uint3 block;
    dim3 bdim, gdim;
    std::vector<unsigned char> smem;
    unsigned long long slot[64][32];
    std::function<void()> body;
    long launches = 0, blocks = 0, switches = 0;
};

inline State &st()
{
    static State s;
    return s;
}
inline Fiber *cur() { return &st().f[st().cur]; }
inline void *dyn_smem() { return st().smem.data(); }

inline void to_sched(Fiber *f)
{
#if KVEMU_FAST_SWITCH
    kvemu_switch(&f->sp, st().sched_sp);
#else
    swapcontext(&f->ctx, &st().sched);
#endif
}

inline void yield()
{
    st().switches++;
    to_sched(cur());
}
inline void block_barrier()
{
    Fiber *f = cur();
    f->nbar++;
    f->wait = WAIT_BLOCK;
    yield();
}
inline void warp_barrier()
{
    Fiber *f = cur();
    f->nwarp++;
    f->wait = WAIT_WARP;
    yield();
}

/* Value of `v` in lane `src` of the calling warp (all 32 lanes must call). */
template <class T> inline T exchange(T v, int src)
{
    static_assert(sizeof(T) <= 8, "exchange of at most 8 bytes");
    Fiber *f = cur();
    unsigned long long w = 0;
    memcpy(&w, &v, sizeof(T));
    st().slot[f->warp][f->lane] = w;
    warp_barrier();
    f = cur();
    unsigned long long r = st().slot[f->warp][src & 31];
    warp_barrier();
    T out;
    memcpy(&out, &r, sizeof(T));
    return out;
}

inline bool can_run(const State &s, const Fiber &f)
{
    if (f.done)
        return false;
    if (f.wait == WAIT_BLOCK) {
        for (const Fiber &g : s.f)
            if (!g.done && g.nbar < f.nbar)
                return false;
        return true;
    }
    if (f.wait == WAIT_WARP) {
        const size_t w0 = (size_t)f.warp * 32, w1 = w0 + 32 < s.f.size() ? w0 + 32 : s.f.size();
        for (size_t i = w0; i < w1; i++)
            if (!s.f[i].done && s.f[i].nwarp < f.nwarp)
                return false;
        return true;
    }
    return true;
}

inline void trampoline()
{
    st().body();
    cur()->done = 1;
    to_sched(cur());
    abort(); /* a finished fiber is never resumed */
}

constexpr size_t STACK = 64 * 1024;

inline void run_block(size_t nthreads)
{
    State &s = st();
    if (s.f.size() != nthreads) {
        for (Fiber &g : s.f)
            free(g.stack);
        s.f.assign(nthreads, Fiber());
        for (Fiber &g : s.f)
            g.stack = (char *)malloc(STACK);
    }
    for (size_t t = 0; t < nthreads; t++) {
        Fiber &g = s.f[t];
        g.tid = uint3{(unsigned)(t % s.bdim.x), (unsigned)(t / s.bdim.x % s.bdim.y),
                      (unsigned)(t / ((size_t)s.bdim.x * s.bdim.y))};
        g.warp = (int)(t / 32);
        g.lane = (int)(t % 32);
        g.nbar = g.nwarp = 0;
        g.wait = RUN;
        g.done = 0;
#if KVEMU_FAST_SWITCH
        /* a stack that kvemu_switch "returns" into trampoline from: 6 saved registers, the entry
         * address, and a fake return address, with rsp % 16 == 8 on entry as after a call */
        uintptr_t top = ((uintptr_t)(g.stack + STACK)) & ~(uintptr_t)15;
        void **sp = (void **)top;
        *--sp = nullptr;
        *--sp = (void *)&trampoline;
        for (int r = 0; r < 6; r++)
            *--sp = nullptr;
        g.sp = sp;
#else
        getcontext(&g.ctx);
        g.ctx.uc_stack.ss_sp = g.stack;
        g.ctx.uc_stack.ss_size = STACK;
        g.ctx.uc_link = &s.sched;
        makecontext(&g.ctx, trampoline, 0);
#endif
    }
    size_t left = nthreads;
    while (left) {
        int progressed = 0;
        for (size_t t = 0; t < nthreads; t++) {
            Fiber &g = s.f[t];
            if (!can_run(s, g))
                continue;
            g.wait = RUN;
            s.cur = (int)t;
#if KVEMU_FAST_SWITCH
            kvemu_switch(&s.sched_sp, g.sp);
#else
            swapcontext(&s.sched, &g.ctx);
#endif
            progressed = 1;
            if (g.done)
                left--;
        }
        if (!progressed) {
            fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u): a barrier or warp operation that not every "
                            "thread reaches\n", s.block.x, s.block.y, s.block.z);
            abort();
        }
    }
    s.blocks++;
}

template <class K> struct Launcher {
    dim3 grid, block;
    size_t smem;
    K kernel;
    template <class... A> void operator()(A... args)
    {
        State &s = st();
        s.launches++;
        s.gdim = grid;
        s.bdim = block;
        const size_t nthreads = (size_t)block.x * block.y * block.z;
        if (nthreads == 0 || nthreads > 2048 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
            fprintf(stderr, "cuda_emu: invalid launch (grid %u,%u,%u block %u,%u,%u)\n", grid.x, grid.y, grid.z,
                    block.x, block.y, block.z);
            abort();
        }
        s.smem.assign(smem + 16, 0xff); /* NaN bytes: reads of unwritten shared memory show */
        s.body = [&]() { kernel(args...); };
        for (unsigned z = 0; z < grid.z; z++)
            for (unsigned y = 0; y < grid.y; y++)
                for (unsigned x = 0; x < grid.x; x++) {
                    s.block = uint3{x, y, z};
                    memset(s.smem.data(), 0xff, s.smem.size());
                    run_block(nthreads);
                }
        s.body = nullptr;
    }
};

template <class K> inline Launcher<K> launch(dim3 grid, dim3 block, size_t smem, K kernel)
{
    return Launcher<K>{grid, block, smem, kernel};
}

} // namespace kvemu

#define threadIdx (kvemu::cur()->tid)
#define blockIdx (kvemu::st().block)
#define blockDim (kvemu::st().bdim)
#define gridDim (kvemu::st().gdim)

inline void __syncthreads(void) { kvemu::block_barrier(); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask) { return kvemu::exchange(v, kvemu::cur()->lane ^ mask); }
template <class T> inline T __shfl_sync(unsigned, T v, int src) { return kvemu::exchange(v, src); }
inline int __any_sync(unsigned, int pred)
{
    int any = 0;
    for (int o = 16; o > 0; o >>= 1)
        pred |= kvemu::exchange(pred ? 1 : 0, kvemu::cur()->lane ^ o);
    any = pred != 0;
    return any;
}

#endif
