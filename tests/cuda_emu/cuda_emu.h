/*
 * cuda_emu.h: a small host emulator for kvsim's CUDA kernels, so that their logic (indexing, masks,
 * online softmax, split merges, shared-memory tiling, barriers, warp shuffles) runs and is checked
 * on machines without a GPU. It is force-included (g++ -include) when kernels/cuda/cuda_elementwise.cu
 * and kernels/cuda/cuda_attention.cu are compiled as C++ with -DKV_CUDA_EMULATE (see the Makefile's
 * `test-cuda-emu` target); nothing of it reaches the real CUDA build.
 *
 * Model: a launch runs its blocks one after the other; every thread of a block is a fiber (ucontext)
 * on one OS thread. A fiber runs without interruption from one synchronisation point to the next
 * (__syncthreads, a warp shuffle or vote): between two of them a thread's code is atomic, so races
 * are only visible through the ORDER in which fibers are run, which $KVEMU_SCHED chooses:
 *   rr    (default) round robin in thread order: all warps advance about together, one warp
 *         operation at a time, which hides most missing __syncthreads;
 *   lo    always the lowest-numbered runnable thread: warp 0 runs to the next __syncthreads before
 *         warp 1 starts, and lane 0 before lane 1 between warp operations (the most skewed order);
 *   hi    the highest-numbered first (warp 7 first, lane 31 first);
 *   rand  round robin over a fresh random permutation on every pass ($KVEMU_SEED, default 1).
 * A kernel that is right must give the same bits under every schedule; `make test-cuda-emu` runs
 * the kernel cases under lo and hi as well as rr (tests/cuda_emu/README.md says what that proves).
 * __syncthreads() completes when every thread of the block has arrived; warp shuffles and votes go
 * through a per-warp exchange slot between two warp barriers, so they need all 32 lanes to take part
 * (as __shfl_*_sync with a full mask does). A barrier or warp operation reached while another thread
 * of the block (warp) has already returned is reported and aborts (undefined behaviour in CUDA), as
 * is a barrier that can never complete (deadlock).
 * Dynamic shared memory is filled with NaN bytes before each block (reads of unwritten shared
 * memory show up as NaN) and followed by 256 guard bytes that must be unchanged after the block
 * (writes past the end abort). Static __shared__ variables become function statics (shared by the
 * block's fibers, which is what they are). Launches are checked against sm_90's limits: at most
 * 1024 threads per block, grid.y and grid.z <= 65535, dynamic shared memory above 48 KiB only after
 * cudaFuncSetAttribute(MaxDynamicSharedMemorySize) raised that kernel's limit, and never above
 * 227 KiB.
 *
 * What it does not model: real concurrency between blocks and warps (an order the hardware takes
 * but no schedule above does), the memory model (fences, visibility of global writes between
 * blocks, the non-coherent __ldg path), CUDA's own math library (the host libm runs instead;
 * the host compiler contracts no a*b+c into fused multiply-adds where nvcc does), registers,
 * occupancy and performance.
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
#include <map>
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
inline unsigned atomicAdd(unsigned *p, unsigned v)
{
    unsigned old = *p;
    *p = old + v;
    return old;
}
inline unsigned long long atomicAdd(unsigned long long *p, unsigned long long v)
{
    unsigned long long old = *p;
    *p = old + v;
    return old;
}
inline float __int_as_float(int i)
{
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

namespace kvemu {

enum { RUN = 0, WAIT_BLOCK = 1, WAIT_WARP = 2 };
enum { SCHED_RR = 0, SCHED_LO, SCHED_HI, SCHED_RAND };

/* sm_90's launch limits (CUDA programming guide, compute capability 9.0). */
constexpr size_t MAX_THREADS = 1024, SMEM_DEFAULT = 48 * 1024, SMEM_OPTIN_MAX = 227 * 1024, SMEM_GUARD = 256;

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
    size_t smem_bytes = 0;
    unsigned long long slot[MAX_THREADS / 32][32];
    std::function<void()> body;
    long launches = 0, blocks = 0, switches = 0;
    /* barrier bookkeeping of the running block: threads waiting at __syncthreads, lanes waiting at a
     * warp operation and lanes returned per warp; the scheduler's hints (no runnable fiber below lo /
     * above hi, except after a release, which moves them) */
    size_t n_done = 0, n_at_bar = 0;
    int w_at[MAX_THREADS / 32], w_done[MAX_THREADS / 32];
    size_t hint_lo = 0, hint_hi = 0;
    int policy = -1;
    unsigned long long rng = 1;
    std::vector<size_t> order;
    std::map<const void *, size_t> smem_optin; /* cudaFuncSetAttribute(MaxDynamicSharedMemorySize) */
    const char *kernel_name = "";
};

inline State &st()
{
    static State s;
    return s;
}
inline Fiber *cur() { return &st().f[st().cur]; }
inline void *dyn_smem() { return st().smem.data(); }

[[noreturn]] inline void fail(const char *what, const Fiber *f)
{
    const State &s = st();
    fprintf(stderr, "cuda_emu: %s (block (%u,%u,%u), thread %d = warp %d lane %d)\n", what, s.block.x, s.block.y,
            s.block.z, f ? (int)(f - s.f.data()) : -1, f ? f->warp : -1, f ? f->lane : -1);
    abort();
}

inline int schedule_policy()
{
    State &s = st();
    if (s.policy < 0) {
        const char *e = getenv("KVEMU_SCHED"), *seed = getenv("KVEMU_SEED");
        s.policy = !e || !*e || !strcmp(e, "rr") ? SCHED_RR
                   : !strcmp(e, "lo")           ? SCHED_LO
                   : !strcmp(e, "hi")           ? SCHED_HI
                   : !strcmp(e, "rand")         ? SCHED_RAND
                                                : -2;
        if (s.policy == -2) {
            fprintf(stderr, "cuda_emu: KVEMU_SCHED=%s: valid schedules are rr, lo, hi, rand\n", e);
            exit(2);
        }
        s.rng = seed && *seed ? strtoull(seed, NULL, 10) * 0x9E3779B97F4A7C15ull + 1 : 1;
    }
    return s.policy;
}

inline const char *schedule_name()
{
    static const char *const names[] = {"rr", "lo", "hi", "rand"};
    return names[schedule_policy()];
}

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

inline size_t warp_lanes(int w)
{
    const size_t n = st().f.size(), w0 = (size_t)w * 32;
    return n - w0 < 32 ? n - w0 : 32;
}

/* Every waiter becomes runnable; the hints move so that the scheduler sees them. */
inline void release_block()
{
    State &s = st();
    for (Fiber &g : s.f)
        if (g.wait == WAIT_BLOCK)
            g.wait = RUN;
    s.n_at_bar = 0;
    s.hint_lo = 0;
    s.hint_hi = s.f.size() - 1;
}
inline void release_warp(int w)
{
    State &s = st();
    const size_t w0 = (size_t)w * 32, n = warp_lanes(w);
    for (size_t i = w0; i < w0 + n; i++)
        if (s.f[i].wait == WAIT_WARP)
            s.f[i].wait = RUN;
    s.w_at[w] = 0;
    s.hint_lo = s.hint_lo < w0 ? s.hint_lo : w0;
    s.hint_hi = s.hint_hi > w0 + n - 1 ? s.hint_hi : w0 + n - 1;
}

inline void block_barrier()
{
    State &s = st();
    Fiber *f = cur();
    if (s.n_done)
        fail("__syncthreads() reached while other threads of the block have returned", f);
    f->wait = WAIT_BLOCK;
    if (++s.n_at_bar == s.f.size())
        release_block();
    yield();
}
inline void warp_barrier()
{
    State &s = st();
    Fiber *f = cur();
    if (warp_lanes(f->warp) < 32)
        fail("warp operation with a full mask in a warp of fewer than 32 threads", f);
    if (s.w_done[f->warp])
        fail("warp operation with a full mask while lanes of the warp have returned", f);
    f->wait = WAIT_WARP;
    if ((size_t)++s.w_at[f->warp] == warp_lanes(f->warp))
        release_warp(f->warp);
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

inline void trampoline()
{
    st().body();
    State &s = st();
    Fiber *f = cur();
    f->done = 1;
    s.n_done++;
    s.w_done[f->warp]++;
    if (s.n_at_bar)
        fail("a thread returned while others wait at __syncthreads()", f);
    if (s.w_at[f->warp])
        fail("a lane returned while others of its warp wait at a full-mask warp operation", f);
    to_sched(f);
    abort(); /* a finished fiber is never resumed */
}

constexpr size_t STACK = 64 * 1024;

inline void resume(size_t t)
{
    State &s = st();
    Fiber &g = s.f[t];
    s.cur = (int)t;
#if KVEMU_FAST_SWITCH
    kvemu_switch(&s.sched_sp, g.sp);
#else
    swapcontext(&s.sched, &g.ctx);
#endif
}

inline bool runnable(const Fiber &g) { return !g.done && g.wait == RUN; }

[[noreturn]] inline void deadlock()
{
    const State &s = st();
    fprintf(stderr, "cuda_emu: deadlock in block (%u,%u,%u) of %s: a barrier or warp operation that not every "
                    "thread reaches\n", s.block.x, s.block.y, s.block.z, s.kernel_name);
    abort();
}

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
    s.n_done = s.n_at_bar = 0;
    memset(s.w_at, 0, sizeof s.w_at);
    memset(s.w_done, 0, sizeof s.w_done);
    s.hint_lo = 0;
    s.hint_hi = nthreads - 1;
    const int policy = schedule_policy();
    if (policy == SCHED_LO || policy == SCHED_HI) {
        /* greedy: the lowest (highest) runnable fiber, again and again; a fiber only becomes
         * runnable when a barrier releases it, and a release moves the hint over it */
        while (s.n_done < nthreads) {
            size_t t = nthreads;
            if (policy == SCHED_LO) {
                for (size_t i = s.hint_lo; i < nthreads; i++)
                    if (runnable(s.f[i])) {
                        t = i;
                        break;
                    }
            } else {
                for (size_t i = s.hint_hi + 1; i-- > 0;)
                    if (runnable(s.f[i])) {
                        t = i;
                        break;
                    }
            }
            if (t == nthreads)
                deadlock();
            s.hint_lo = s.hint_hi = t;
            resume(t);
        }
    } else {
        s.order.resize(nthreads);
        for (size_t t = 0; t < nthreads; t++)
            s.order[t] = t;
        while (s.n_done < nthreads) {
            if (policy == SCHED_RAND)
                for (size_t t = nthreads - 1; t > 0; t--) { /* Fisher-Yates with xorshift64 */
                    s.rng ^= s.rng << 13;
                    s.rng ^= s.rng >> 7;
                    s.rng ^= s.rng << 17;
                    const size_t u = (size_t)(s.rng % (t + 1)), tmp = s.order[t];
                    s.order[t] = s.order[u];
                    s.order[u] = tmp;
                }
            int progressed = 0;
            for (size_t k = 0; k < nthreads; k++)
                if (runnable(s.f[s.order[k]])) {
                    resume(s.order[k]);
                    progressed = 1;
                }
            if (!progressed)
                deadlock();
        }
    }
    for (size_t i = 0; i < SMEM_GUARD; i++)
        if (s.smem[s.smem_bytes + i] != 0xff) {
            fprintf(stderr, "cuda_emu: %s wrote past the end of its %zu bytes of dynamic shared memory (first "
                            "changed byte at end + %zu, block (%u,%u,%u))\n", s.kernel_name, s.smem_bytes, i,
                    s.block.x, s.block.y, s.block.z);
            abort();
        }
    s.blocks++;
}

[[noreturn]] inline void bad_launch(const char *why, dim3 grid, dim3 block, size_t smem)
{
    fprintf(stderr, "cuda_emu: invalid launch of %s (grid %u,%u,%u block %u,%u,%u, %zu bytes of dynamic shared "
                    "memory): %s\n", st().kernel_name, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem, why);
    abort();
}

template <class K> struct Launcher {
    dim3 grid, block;
    size_t smem;
    K kernel;
    const char *name;
    template <class... A> void operator()(A... args)
    {
        State &s = st();
        s.launches++;
        s.gdim = grid;
        s.bdim = block;
        s.kernel_name = name;
        const size_t nthreads = (size_t)block.x * block.y * block.z;
        if (nthreads == 0 || nthreads > MAX_THREADS || block.x > 1024 || block.y > 1024 || block.z > 64)
            bad_launch("a block has 1 to 1024 threads (x, y <= 1024, z <= 64)", grid, block, smem);
        if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535)
            bad_launch("grid.x in [1, 2^31 - 1], grid.y and grid.z in [1, 65535]", grid, block, smem);
        if (smem > SMEM_OPTIN_MAX)
            bad_launch("more dynamic shared memory than sm_90 gives a block (227 KiB)", grid, block, smem);
        if (smem > SMEM_DEFAULT) {
            auto it = s.smem_optin.find(reinterpret_cast<const void *>(kernel));
            if (it == s.smem_optin.end() || it->second < smem)
                bad_launch("above 48 KiB without cudaFuncSetAttribute(kernel, "
                           "cudaFuncAttributeMaxDynamicSharedMemorySize, >= bytes) first", grid, block, smem);
        }
        s.smem_bytes = smem;
        s.smem.assign(smem + SMEM_GUARD, 0xff); /* NaN bytes: reads of unwritten shared memory show */
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

template <class K> inline Launcher<K> launch(dim3 grid, dim3 block, size_t smem, K kernel, const char *name)
{
    return Launcher<K>{grid, block, smem, kernel, name};
}

} // namespace kvemu

template <class K> inline cudaError_t cudaFuncSetAttribute(K kernel, cudaFuncAttribute, int bytes)
{
    kvemu::st().smem_optin[reinterpret_cast<const void *>(kernel)] = bytes < 0 ? 0 : (size_t)bytes;
    return cudaSuccess;
}

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
