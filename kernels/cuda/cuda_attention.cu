/*
 * cuda_attention.cu: the attention-family ops of the CUDA backend, tiled so that no n_q x n_k
 * matrix is ever held in memory (attn_probs writes its n_q x n_k output, which is what it is for).
 *
 * One tile engine serves every op. A block of NT = 256 threads (8 warps) owns BR = 32 "rows" (4 per
 * warp) held in shared memory and walks "column" tiles of BL = 32 (one per lane) through shared
 * memory; lane c of warp w computes the scaled dot products of the warp's 4 rows with column c
 * (float32 fused multiply-adds over head_dim, read as 16-byte vectors; column rows are padded by 4
 * floats so the vector reads are free of bank conflicts). Query-major kernels have queries as rows
 * and keys as columns; key-major kernels the other way round. head_dim is a template parameter D in
 * {32, 64, 128, 256}: smaller head dims are zero-padded up to the next D (zeros change no dot
 * product), larger ones are refused (KV_EINVAL; the CPU backend has no such limit).
 *
 * Kernels (all deterministic: every output element is produced by one thread in a fixed order;
 * the only atomics are integer max on the bits of non-negative floats, which is order-free):
 *   k_fwd<D, WITH_V>  query-major online softmax (FlashAttention's running max m and sum l, per
 *                     lane, rescaled by exp(m_old - m_new)); WITH_V also accumulates P V into
 *                     registers (each lane owns D/32 output columns; p_j is broadcast by shuffle).
 *                     Keys may be split into n_split contiguous ranges (flash-decoding) when the
 *                     grid would otherwise be small (decode, few heads): each split writes its
 *                     (m, l[, O]) and a merge kernel combines them in split order. The split count
 *                     depends on the shape only (SPLIT_TARGET), never on the device, so the bits
 *                     do not change from one GPU model to another.
 *   k_merge_out<D>    merges split attention outputs: O = sum_z e^(m_z - M) O_z / L, lse = M + log L.
 *   k_merge_stats     merges split row statistics into m, 1/l and optionally lse.
 *   k_probs<D>        p_ij = expf(s_ij - m_i) * inv_i (the CPU's softmax_row formula), written for
 *                     every column of every row, 0 where masked.
 *   k_rowent<D>       given lse (attn_stats): entropy -sum p log p, the sink probability p_i0 and the
 *                     mass on the query's segment, per query (per-lane partial sums, then a fixed
 *                     butterfly), and the max-pooled map (a shared-memory copy of the
 *                     block's pooled rows, atomicMax on float bits, flushed once per block).
 *   k_cols<D>         key-major: column sums / sums of squares / maxima of p over all queries
 *                     (attn_colstats with (m, 1/l); attn_stats's accumulated attention with (lse, 1)).
 *                     Each block owns 32 keys and loops over the queries that can see them, so every
 *                     column is reduced by one warp in a fixed order: no float atomics.
 * The scaled score s_ij = dot * scale is rounded to float before anything is subtracted from it
 * (__fmul_rn, PTX mul.rn.f32): a plain `dot * scale - m` becomes PTX mul.f32 + sub.f32 without rounding
 * modifiers, which ptxas may contract into one fused multiply-add, kernel by kernel as it sees fit; then
 * the row maximum found by k_fwd would not give exactly expf(0) = 1 in k_probs, and the device would
 * round differently from the CPU reference and from the host emulator.
 * Passes: attention 1 (+ merge), attn_probs 2 (statistics, then probabilities), attn_colstats 2
 * (statistics, then columns), attn_stats 2 (rows, then columns; 3 more for keys_mass, k_keysmass). The CPU computes the
 * same sums in other orders (BLAS dot products, double softmax sums): tests/gpu_parity.c states the tolerances.
 *
 * What is deliberately simple here (bench/README.md lists what to try first after profiling):
 * float32 CUDA-core arithmetic (no tensor cores), one shared-memory stage (no cp.async / TMA double
 * buffering), K/V re-read per query tile of one head (no sharing across the heads of a GQA group),
 * entropy/pool without key splits.
 */
#include "kernels/cuda/cuda_internal.h"

#include <limits.h>
#include <math.h>
#include <stdint.h>

namespace
{

constexpr int NW = 8;        /* warps per block */
constexpr int RPW = 4;       /* rows per warp */
constexpr int BR = NW * RPW; /* rows per block */
constexpr int BL = 32;       /* columns per tile (one per lane) */
constexpr int NT = NW * 32;  /* threads per block */
constexpr unsigned FULL = 0xffffffffu;
constexpr int SPLIT_TARGET = 256; /* blocks a launch should reach before keys are split */
constexpr int MAX_SPLIT = 64;
constexpr int PROBS_CHUNK = 8;  /* key tiles per attn_probs block */
constexpr int POOL_SMEM = 8192; /* ints of shared memory for a block's pooled rows */

/* Rows of a per-head matrix: element (head, row, x) at p[head * hs + row * rs + x]. */
struct Rows {
    const float *p;
    size_t hs, rs;
    int vec; /* 16-byte loads allowed: d == D and pointer and strides 16-byte aligned */
};

/* One scaled-dot-product problem: query i (position q_pos0 + i) of head h against keys of KV head
 * h / G; causal: query i sees keys [0, min(n_k, q_pos0 + i + 1)), else all n_k. */
struct QK {
    Rows q, k, v;
    int n_q, q_pos0, n_k, causal;
    int H, G, d;
    float scale;
};

__device__ __forceinline__ int visible(const QK &p, int i)
{
    return p.causal ? min(p.n_k, p.q_pos0 + i + 1) : p.n_k;
}

__device__ __forceinline__ float warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

/* Butterfly sum: every lane ends with the same bits (each step adds the same two values). */
__device__ __forceinline__ float warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(FULL, v, o);
    return v;
}

/* s[r * ld + x] = row (r0 + r), column x of head `head` for r < nrows, zero for rows >= nvalid and
 * columns >= d. All NT threads take part. */
template <int D>
__device__ __forceinline__ void load_rows(float *s, int ld, const Rows &m, int head, int r0, int nvalid, int d,
                                          int nrows)
{
    const float *base = m.p + (size_t)head * m.hs;
    if (m.vec) {
        constexpr int V = D / 4;
        for (int idx = threadIdx.x; idx < nrows * V; idx += NT) {
            const int r = idx / V, x4 = idx % V, row = r0 + r;
            float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
            if (row < nvalid)
                v = __ldg(reinterpret_cast<const float4 *>(base + (size_t)row * m.rs) + x4);
            *reinterpret_cast<float4 *>(s + r * ld + 4 * x4) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < nrows * D; idx += NT) {
            const int r = idx / D, x = idx % D, row = r0 + r;
            s[r * ld + x] = (row < nvalid && x < d) ? __ldg(base + (size_t)row * m.rs + x) : 0.f;
        }
    }
}

/* s[r] = dot(A row r, b) for the warp's RPW rows A (leading dimension D, same address in every
 * lane: broadcast) and this lane's column b. */
template <int D> __device__ __forceinline__ void dots(float (&s)[RPW], const float *A, const float *b)
{
#pragma unroll
    for (int r = 0; r < RPW; r++)
        s[r] = 0.f;
#pragma unroll 4
    for (int x = 0; x < D; x += 4) {
        const float4 bv = *reinterpret_cast<const float4 *>(b + x);
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            const float4 av = *reinterpret_cast<const float4 *>(A + r * D + x);
            s[r] = fmaf(av.x, bv.x, s[r]);
            s[r] = fmaf(av.y, bv.y, s[r]);
            s[r] = fmaf(av.z, bv.z, s[r]);
            s[r] = fmaf(av.w, bv.w, s[r]);
        }
    }
}

template <int EPL> __device__ __forceinline__ void load_vec(float (&v)[EPL], const float *p)
{
    if constexpr (EPL % 4 == 0) {
#pragma unroll
        for (int k = 0; k < EPL / 4; k++) {
            const float4 t = reinterpret_cast<const float4 *>(p)[k];
            v[4 * k] = t.x;
            v[4 * k + 1] = t.y;
            v[4 * k + 2] = t.z;
            v[4 * k + 3] = t.w;
        }
    } else if constexpr (EPL == 2) {
        const float2 t = *reinterpret_cast<const float2 *>(p);
        v[0] = t.x;
        v[1] = t.y;
    } else {
#pragma unroll
        for (int k = 0; k < EPL; k++)
            v[k] = p[k];
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* k_fwd: online softmax over the keys of one split, optionally with P V. */

struct FwdOut {
    float *out; /* WITH_V, n_split == 1: out[h * o_hs + i * o_rs + x] */
    size_t o_hs, o_rs;
    float *lse;     /* WITH_V, n_split == 1: (H, n_q), may be NULL */
    float *pm, *pl; /* otherwise: (H, n_q, n_split) running max and sum of each split */
    float *po;      /* WITH_V, n_split > 1: (H, n_q, n_split, D) unnormalised outputs */
    int n_split;
};

template <int D, bool WITH_V> __global__ void __launch_bounds__(NT) k_fwd(QK p, FwdOut o)
{
    KV_DYN_SMEM(float4, smem4);
    constexpr int LDK = D + 4, EPL = D / 32;
    float *Qs = reinterpret_cast<float *>(smem4); /* (BR, D) */
    float *Ks = Qs + BR * D;                      /* (BL, LDK) */
    float *Vs = Ks + BL * LDK;                    /* (BL, D), WITH_V */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qt = gridDim.x - 1 - blockIdx.x; /* the longest (last) query tiles start first */
    const int h = blockIdx.y, g = h / p.G, z = blockIdx.z;
    const int i0 = qt * BR, i_last = min(i0 + BR, p.n_q) - 1;
    const int nk = visible(p, i_last); /* keys any row of the block sees */
    const int ntiles = (nk + BL - 1) / BL;
    const int t0 = (int)((long long)ntiles * z / o.n_split), t1 = (int)((long long)ntiles * (z + 1) / o.n_split);

    load_rows<D>(Qs, D, p.q, h, i0, p.n_q, p.d, BR);

    float m[RPW], l[RPW], acc[RPW][EPL];
    int vr[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int i = i0 + warp * RPW + r;
        m[r] = -INFINITY;
        l[r] = 0.f;
        vr[r] = i < p.n_q ? visible(p, i) : 0;
#pragma unroll
        for (int e = 0; e < EPL; e++)
            acc[r][e] = 0.f;
    }
    for (int t = t0; t < t1; t++) {
        const int j0 = t * BL;
        __syncthreads(); /* the previous tile is consumed (and Qs is loaded on the first pass) */
        load_rows<D>(Ks, LDK, p.k, g, j0, nk, p.d, BL);
        if (WITH_V)
            load_rows<D>(Vs, D, p.v, g, j0, nk, p.d, BL);
        __syncthreads();
        float s[RPW];
        dots<D>(s, Qs + warp * RPW * D, Ks + lane * LDK);
        const int j = j0 + lane;
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            const float sv = j < vr[r] ? __fmul_rn(s[r], p.scale) : -INFINITY;
            const float mn = fmaxf(m[r], warp_max(sv));
            const float alpha = m[r] == -INFINITY ? 0.f : expf(m[r] - mn); /* nothing summed yet: 0 */
            const float pr = sv == -INFINITY ? 0.f : expf(sv - mn);
            l[r] = l[r] * alpha + pr;
            m[r] = mn;
            s[r] = pr;
            if (WITH_V) {
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    acc[r][e] *= alpha;
            }
        }
        if (WITH_V) {
#pragma unroll 4
            for (int jj = 0; jj < BL; jj++) {
                float vv[EPL];
                load_vec<EPL>(vv, Vs + jj * D + lane * EPL);
#pragma unroll
                for (int r = 0; r < RPW; r++) {
                    const float pj = __shfl_sync(FULL, s[r], jj);
#pragma unroll
                    for (int e = 0; e < EPL; e++)
                        acc[r][e] = fmaf(pj, vv[e], acc[r][e]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int i = i0 + warp * RPW + r;
        const float lt = warp_sum(l[r]); /* i is the same in every lane: all lanes reach this */
        if (i >= p.n_q)
            continue;
        if (WITH_V && o.n_split == 1) {
            const float inv = 1.0f / lt;
#pragma unroll
            for (int e = 0; e < EPL; e++) {
                const int x = lane * EPL + e;
                if (x < p.d)
                    o.out[(size_t)h * o.o_hs + (size_t)i * o.o_rs + x] = acc[r][e] * inv;
            }
            if (lane == 0 && o.lse)
                o.lse[(size_t)h * p.n_q + i] = m[r] + logf(lt);
        } else {
            const size_t b = ((size_t)h * p.n_q + i) * o.n_split + z;
            if (lane == 0) {
                o.pm[b] = m[r];
                o.pl[b] = lt;
            }
            if (WITH_V) {
#pragma unroll
                for (int e = 0; e < EPL; e++)
                    o.po[b * D + lane * EPL + e] = acc[r][e];
            }
        }
    }
}

/* One warp per (head, query) row: combine the splits of k_fwd<D, true> in split order. */
template <int D>
__global__ void k_merge_out(FwdOut o, int rows, int n_q, int d, float *out, size_t o_hs, size_t o_rs, float *lse)
{
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5), lane = threadIdx.x & 31;
    if (row >= rows)
        return;
    const int h = row / n_q, i = row % n_q, ns = o.n_split;
    const size_t b = (size_t)row * ns;
    float M = -INFINITY;
    for (int z = 0; z < ns; z++)
        M = fmaxf(M, o.pm[b + z]);
    float L = 0.f;
    for (int z = 0; z < ns; z++)
        if (o.pm[b + z] != -INFINITY)
            L += o.pl[b + z] * expf(o.pm[b + z] - M);
    const float inv = 1.0f / L;
    for (int x = lane; x < d; x += 32) {
        float a = 0.f;
        for (int z = 0; z < ns; z++)
            if (o.pm[b + z] != -INFINITY)
                a = fmaf(expf(o.pm[b + z] - M), o.po[(b + z) * D + x], a);
        out[(size_t)h * o_hs + (size_t)i * o_rs + x] = a * inv;
    }
    if (lane == 0 && lse)
        lse[row] = M + logf(L);
}

/* One thread per row: m, 1/l (and lse) from the splits of k_fwd<D, false>. */
__global__ void k_merge_stats(const float *pm, const float *pl, int rows, int ns, float *m_out, float *inv_out,
                              float *lse_out)
{
    const int row = blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows)
        return;
    const size_t b = (size_t)row * ns;
    float M = -INFINITY;
    for (int z = 0; z < ns; z++)
        M = fmaxf(M, pm[b + z]);
    float L = 0.f;
    for (int z = 0; z < ns; z++)
        if (pm[b + z] != -INFINITY)
            L += pl[b + z] * expf(pm[b + z] - M);
    m_out[row] = M;
    inv_out[row] = 1.0f / L;
    if (lse_out)
        lse_out[row] = M + logf(L);
}

/* ------------------------------------------------------------------------------------------------ */
/* k_probs: probs (H, n_q, n_k), every element written. Block: (query tile, head, chunk of keys). */

template <int D>
__global__ void __launch_bounds__(NT)
    k_probs(QK p, const float *__restrict__ rm, const float *__restrict__ rinv, float *__restrict__ probs)
{
    KV_DYN_SMEM(float4, smem4);
    constexpr int LDK = D + 4;
    float *Qs = reinterpret_cast<float *>(smem4);
    float *Ks = Qs + BR * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, g = h / p.G;
    const int i0 = blockIdx.x * BR, i_last = min(i0 + BR, p.n_q) - 1;
    const int nk = visible(p, i_last);
    load_rows<D>(Qs, D, p.q, h, i0, p.n_q, p.d, BR);
    float mi[RPW], inv[RPW];
    int vr[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int i = i0 + warp * RPW + r;
        const bool ok = i < p.n_q;
        mi[r] = ok ? rm[(size_t)h * p.n_q + i] : 0.f;
        inv[r] = ok ? rinv[(size_t)h * p.n_q + i] : 0.f;
        vr[r] = ok ? visible(p, i) : 0;
    }
    for (int t = 0; t < PROBS_CHUNK; t++) {
        const int j0 = (blockIdx.z * PROBS_CHUNK + t) * BL;
        if (j0 >= p.n_k)
            break;
        float s[RPW];
#pragma unroll
        for (int r = 0; r < RPW; r++)
            s[r] = 0.f;
        if (j0 < nk) { /* the same in every thread: the barriers are safe */
            __syncthreads();
            load_rows<D>(Ks, LDK, p.k, g, j0, nk, p.d, BL);
            __syncthreads();
            dots<D>(s, Qs + warp * RPW * D, Ks + lane * LDK);
        }
        const int j = j0 + lane;
        if (j >= p.n_k)
            continue;
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            const int i = i0 + warp * RPW + r;
            if (i < p.n_q)
                probs[((size_t)h * p.n_q + i) * p.n_k + j] =
                    j < vr[r] ? expf(__fmul_rn(s[r], p.scale) - mi[r]) * inv[r] : 0.f;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* k_rowent: per-query entropy and the max-pooled map, given lse. Block: (query tile, head). */

struct Pool {
    float *pooled; /* (H, pool, pool) or NULL */
    int pool, pool_T;
};

__device__ __forceinline__ int cell_of(long long t, const Pool &pl)
{
    return (int)(t * pl.pool / pl.pool_T);
}

/* Per-query outputs of k_rowent, (H, n_q) each, any may be NULL. */
struct RowOut {
    float *entropy; /* -sum p log p */
    float *sink;    /* p_i0 */
    float *seg;     /* sum of p_ij over j >= seg_lo[q_pos0 + i] */
    const int *seg_lo;
};

template <int D> __global__ void __launch_bounds__(NT) k_rowent(QK p, const float *__restrict__ lse, RowOut ro, Pool pl)
{
    KV_DYN_SMEM(float4, smem4);
    constexpr int LDK = D + 4;
    float *Qs = reinterpret_cast<float *>(smem4);
    float *Ks = Qs + BR * D;
    int *spool = reinterpret_cast<int *>(Ks + BL * LDK); /* (nrb, pool) when use_sm */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, g = h / p.G;
    const int i0 = qt * BR, i_last = min(i0 + BR, p.n_q) - 1;
    const int nk = visible(p, i_last);
    int rb_lo = 0, nrb = 0;
    bool use_sm = false;
    if (pl.pooled) {
        rb_lo = cell_of(p.q_pos0 + i0, pl);
        nrb = cell_of(p.q_pos0 + i_last, pl) - rb_lo + 1;
        use_sm = (long long)nrb * pl.pool <= POOL_SMEM;
        if (use_sm)
            for (int x = threadIdx.x; x < nrb * pl.pool; x += NT)
                spool[x] = INT_MIN; /* below the bits of every non-negative float */
    }
    load_rows<D>(Qs, D, p.q, h, i0, p.n_q, p.d, BR);
    float li[RPW], ent[RPW], sg[RPW];
    int vr[RPW], rb[RPW], lo[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int i = i0 + warp * RPW + r;
        const bool ok = i < p.n_q;
        li[r] = ok ? lse[(size_t)h * p.n_q + i] : 0.f;
        vr[r] = ok ? visible(p, i) : 0;
        rb[r] = (ok && pl.pooled) ? cell_of(p.q_pos0 + i, pl) : 0;
        lo[r] = (ok && ro.seg_lo) ? ro.seg_lo[p.q_pos0 + i] : 0;
        ent[r] = sg[r] = 0.f;
    }
    const int ntiles = (nk + BL - 1) / BL;
    for (int t = 0; t < ntiles; t++) {
        const int j0 = t * BL;
        __syncthreads();
        load_rows<D>(Ks, LDK, p.k, g, j0, nk, p.d, BL);
        __syncthreads();
        float s[RPW];
        dots<D>(s, Qs + warp * RPW * D, Ks + lane * LDK);
        const int j = j0 + lane;
        int cb = 0, cb_uniform = -1;
        if (pl.pooled) {
            cb = cell_of(j, pl);
            const int c0 = cell_of(j0, pl), c1 = cell_of(j0 + BL - 1, pl);
            cb_uniform = c0 == c1 ? c0 : -1; /* the whole tile falls into one column of cells */
        }
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            const bool ok = j < vr[r];
            float pr = 0.f;
            if (ok) {
                const float lp = __fmul_rn(s[r], p.scale) - li[r];
                pr = expf(lp);
                if (pr > 0.f)
                    ent[r] -= pr * lp;
                if (j >= lo[r])
                    sg[r] += pr;
                if (j == 0 && ro.sink)
                    ro.sink[(size_t)h * p.n_q + i0 + warp * RPW + r] = pr;
            }
            if (!pl.pooled || !__any_sync(FULL, ok))
                continue;
            const int row_off = use_sm ? (rb[r] - rb_lo) * pl.pool : 0;
            int *grow = reinterpret_cast<int *>(pl.pooled) + ((size_t)h * pl.pool + rb[r]) * pl.pool;
            if (cb_uniform >= 0) {
                const float mx = warp_max(pr); /* masked lanes give 0, below or equal to any p */
                if (lane == 0) {
                    if (use_sm)
                        atomicMax(spool + row_off + cb_uniform, __float_as_int(mx));
                    else
                        atomicMax(grow + cb_uniform, __float_as_int(mx));
                }
            } else if (ok) {
                if (use_sm)
                    atomicMax(spool + row_off + cb, __float_as_int(pr));
                else
                    atomicMax(grow + cb, __float_as_int(pr));
            }
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int i = i0 + warp * RPW + r;
        const float e = warp_sum(ent[r]), m = warp_sum(sg[r]);
        if (lane == 0 && i < p.n_q && ro.entropy)
            ro.entropy[(size_t)h * p.n_q + i] = e;
        if (lane == 0 && i < p.n_q && ro.seg)
            ro.seg[(size_t)h * p.n_q + i] = m;
    }
    if (use_sm) {
        __syncthreads();
        int *gp = reinterpret_cast<int *>(pl.pooled) + ((size_t)h * pl.pool + rb_lo) * pl.pool;
        for (int x = threadIdx.x; x < nrb * pl.pool; x += NT)
            if (spool[x] != INT_MIN)
                atomicMax(gp + x, spool[x]);
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* k_keysmass: per query, the smallest number of keys whose largest probabilities hold `mass` of its
 * attention (attn_stats's keys_mass). Block: (query, head), NT threads over the keys. A radix selection
 * on the bits of p_ij = expf(s_ij - lse_i) (non-negative floats order as their bits): three passes over
 * the keys, each recomputing the scores, file the probabilities of the candidates into 1024 buckets by
 * the next 10 bits (bits 30..20, 19..10, 9..0) with their count and mass; one thread walks the buckets
 * from the top to the one where the mass reaches the target. Masses are fixed point (p x 2^40, exact
 * for p >= 2^-40, below that 0) added with integer atomics, so the result does not depend on the order
 * of the threads. After the third pass the bucket holds equal values v and ceil(remaining / v) of them
 * are needed. The CPU sums in double instead: a count may differ by one where values tie. */
constexpr int KM_B = 1024;
constexpr double KM_FP = 1099511627776.0; /* 2^40 */

template <int D>
__global__ void __launch_bounds__(NT)
    k_keysmass(QK p, const float *__restrict__ lse, float *__restrict__ out, float mass)
{
    __shared__ float qs[D];
    __shared__ unsigned cnt[KM_B];
    __shared__ unsigned long long ms[KM_B];
    __shared__ unsigned long long s_total, s_need, s_above;
    __shared__ unsigned s_count, s_prefix;
    __shared__ int s_done;
    const int i = blockIdx.x, h = blockIdx.y, g = h / p.G;
    const int vis = visible(p, i);
    const float *qrow = p.q.p + (size_t)h * p.q.hs + (size_t)i * p.q.rs;
    const float *kb = p.k.p + (size_t)g * p.k.hs;
    for (int x = threadIdx.x; x < D; x += NT)
        qs[x] = x < p.d ? qrow[x] : 0.f;
    const float li = lse[(size_t)h * p.n_q + i];
    if (threadIdx.x == 0) {
        s_total = 0;
        s_above = 0;
        s_count = 0;
        s_prefix = 0;
        s_done = 0;
    }
    for (int level = 0; level < 3; level++) {
        const int shift = 20 - 10 * level; /* bits [shift + 9, shift] file the candidates */
        for (int b = threadIdx.x; b < KM_B; b += NT) {
            cnt[b] = 0;
            ms[b] = 0;
        }
        __syncthreads();
        if (s_done)
            break;
        const unsigned prefix = s_prefix;
        unsigned long long tot = 0;
        for (int j = threadIdx.x; j < vis; j += NT) {
            const float *kr = kb + (size_t)j * p.k.rs;
            float s = 0.f;
            for (int x = 0; x < p.d; x++)
                s = fmaf(qs[x], __ldg(kr + x), s);
            const float pr = expf(__fmul_rn(s, p.scale) - li);
            unsigned u = (unsigned)__float_as_int(pr) & 0x7fffffffu;
            if (level == 0 && u >> 20 >= (unsigned)KM_B)
                u = ((unsigned)KM_B - 1) << 20; /* p above 2 (impossible, but bounded) */
            const unsigned long long f = (unsigned long long)((double)pr * KM_FP);
            if (level == 0)
                tot += f;
            if (level > 0 && (u >> (shift + 10)) != prefix)
                continue;
            const unsigned b = (u >> shift) & (KM_B - 1);
            atomicAdd(&cnt[b], 1u);
            atomicAdd(&ms[b], f);
        }
        if (level == 0)
            atomicAdd(&s_total, tot);
        __syncthreads();
        if (threadIdx.x == 0) {
            if (level == 0)
                s_need = (unsigned long long)ceil((double)mass * (1.0 - 1e-6) * (double)s_total);
            unsigned long long above = s_above;
            unsigned count = s_count;
            int b = KM_B - 1;
            for (; b >= 0; b--) {
                if (above + ms[b] >= s_need)
                    break;
                above += ms[b];
                count += cnt[b];
            }
            if (s_need == 0) {
                s_count = 0;
                s_done = 1;
            } else if (b < 0) {
                s_count = (unsigned)vis; /* the fixed-point sums left the target out of reach */
                s_done = 1;
            } else if (level == 2) { /* every candidate in bucket b has the same bits: the value v */
                const unsigned bits = (s_prefix << 10) | (unsigned)b;
                const unsigned long long fv = (unsigned long long)((double)__int_as_float((int)bits) * KM_FP);
                const unsigned long long rem = s_need - above;
                unsigned k = fv ? (unsigned)((rem + fv - 1) / fv) : cnt[b];
                k = k < 1u ? 1u : k > cnt[b] ? cnt[b] : k;
                s_count = count + k;
                s_done = 1;
            } else {
                s_above = above;
                s_count = count;
                s_prefix = (s_prefix << 10) | (unsigned)b;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0)
        out[(size_t)h * p.n_q + i] = (float)s_count;
}

/* ------------------------------------------------------------------------------------------------ */
/* k_cols: key-major column statistics. Block: (tile of BR keys, head). p_ij = expf(s_ij - rm_i) *
 * (rinv ? rinv_i : 1). Lane c accumulates the queries ib + c of every query tile; the 32 lane sums
 * of a key are combined by a butterfly at the end. */

struct ColOut {
    float *sum, *sumsq, *max; /* (H, ld); any may be NULL */
    size_t ld;
    int accumulate; /* 1: sum +=, sumsq +=, max = max(max, .) (attn_stats); 0: overwrite every column */
    int r_ld;       /* row statistics rm, rinv: (H, r_ld) */
};

template <int D>
__global__ void __launch_bounds__(NT)
    k_cols(QK p, const float *__restrict__ rm, const float *__restrict__ rinv, ColOut o)
{
    KV_DYN_SMEM(float4, smem4);
    constexpr int LDQ = D + 4;
    float *Ks = reinterpret_cast<float *>(smem4); /* (BR, D): the block's keys, as rows */
    float *Qs = Ks + BR * D;                      /* (BL, LDQ): a tile of queries, as columns */
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, g = h / p.G;
    const int j0 = blockIdx.x * BR;
    load_rows<D>(Ks, D, p.k, g, j0, p.n_k, p.d, BR);
    float cs[RPW], cq[RPW], cm[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++)
        cs[r] = cq[r] = cm[r] = 0.f;
    const int i_start = p.causal ? max(0, j0 - p.q_pos0) : 0; /* first query that sees key j0 */
    for (int ib = i_start; ib < p.n_q; ib += BL) {
        __syncthreads();
        load_rows<D>(Qs, LDQ, p.q, h, ib, p.n_q, p.d, BL);
        __syncthreads();
        float s[RPW];
        dots<D>(s, Ks + warp * RPW * D, Qs + lane * LDQ);
        const int i = ib + lane;
        const bool qi = i < p.n_q;
        const float mi = qi ? rm[(size_t)h * o.r_ld + i] : 0.f;
        const float inv = (qi && rinv) ? rinv[(size_t)h * o.r_ld + i] : 1.f;
        const int vi = qi ? visible(p, i) : 0;
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            const int j = j0 + warp * RPW + r;
            const float pr = j < vi ? expf(__fmul_rn(s[r], p.scale) - mi) * inv : 0.f;
            cs[r] += pr;
            cq[r] += pr * pr;
            cm[r] = fmaxf(cm[r], pr);
        }
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int j = j0 + warp * RPW + r;
        const float S = warp_sum(cs[r]), Q2 = warp_sum(cq[r]), M = warp_max(cm[r]);
        if (lane != 0 || j >= p.n_k)
            continue;
        const size_t at = (size_t)h * o.ld + j;
        if (o.accumulate) {
            if (o.sum)
                o.sum[at] += S;
            if (o.sumsq)
                o.sumsq[at] += Q2;
            if (o.max)
                o.max[at] = fmaxf(o.max[at], M);
        } else {
            if (o.sum)
                o.sum[at] = S;
            if (o.sumsq)
                o.sumsq[at] = Q2;
            if (o.max)
                o.max[at] = M;
        }
    }
}

/* ------------------------------------------------------------------------------------------------ */
/* host side */

int pick_d(int d)
{
    if (d <= 0)
        return 0;
    if (d <= 32)
        return 32;
    if (d <= 64)
        return 64;
    if (d <= 128)
        return 128;
    if (d <= 256)
        return 256;
    return 0;
}

Rows make_rows(const float *p, size_t hs, size_t rs, int d, int D)
{
    Rows r;
    r.p = p;
    r.hs = hs;
    r.rs = rs;
    r.vec = d == D && hs % 4 == 0 && rs % 4 == 0 && ((uintptr_t)p & 15u) == 0;
    return r;
}

template <typename K> int set_smem(K kernel, size_t bytes, const char *what)
{
    if (bytes <= 48 * 1024)
        return KV_OK;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return kv_error(KV_EIO, "cuda %s: %zu bytes of shared memory: %s", what, bytes, cudaGetErrorString(e));
    }
    return KV_OK;
}

int choose_split(long long blocks, int max_tiles)
{
    if (blocks >= SPLIT_TARGET || max_tiles < 2)
        return 1;
    long long s = (SPLIT_TARGET + blocks - 1) / blocks;
    if (s > max_tiles / 2)
        s = max_tiles / 2; /* at least two key tiles per split */
    if (s > MAX_SPLIT)
        s = MAX_SPLIT;
    return s < 1 ? 1 : (int)s;
}

size_t align_floats(size_t n)
{
    return (n + 63) / 64 * 64;
}

int check_heads(const char *op, int H, int Hkv, int d, int n_q, int q_pos0, int n_k)
{
    if (H <= 0 || Hkv <= 0 || H % Hkv || d <= 0 || n_q < 0 || n_k < 0 || q_pos0 < 0)
        return kv_error(KV_EINVAL, "%s: bad shape (heads %d/%d, head_dim %d, n_q %d, n_k %d, q_pos0 %d)", op, H, Hkv, d,
                        n_q, n_k, q_pos0);
    if (!pick_d(d))
        return kv_error(KV_EINVAL, "%s: head_dim %d is above the CUDA backend's limit of 256", op, d);
    if (H > 65535)
        return kv_error(KV_EINVAL, "%s: %d heads is above the CUDA grid limit of 65535", op, H);
    return KV_OK;
}

size_t smem_qk(int D)
{
    return sizeof(float) * ((size_t)BR * D + (size_t)BL * (D + 4));
}

/* Row statistics of p (m and 1/l per (head, query); lse too when asked) into device buffers. */
template <int D>
int row_stats(kv_backend_t *be, const QK &p, float *m, float *inv, float *lse, float *pm, float *pl, int ns)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    const int qtiles = (p.n_q + BR - 1) / BR, rows = p.H * p.n_q;
    FwdOut o = {};
    o.pm = pm;
    o.pl = pl;
    o.n_split = ns;
    const size_t smem = smem_qk(D);
    int rc = set_smem(k_fwd<D, false>, smem, "row statistics");
    if (rc)
        return rc;
    KV_LAUNCH(dim3(qtiles, p.H, ns), NT, smem, c->stream, k_fwd<D, false>)(p, o);
    if ((rc = kv_cuda_check_launch("row statistics")))
        return rc;
    KV_LAUNCH((rows + 255) / 256, 256, 0, c->stream, k_merge_stats)(pm, pl, rows, ns, m, inv, lse);
    return kv_cuda_check_launch("merge statistics");
}

/* Split count and scratch layout for row statistics: m, inv (rows each), pm, pl (rows * ns each). */
struct StatsScratch {
    float *m, *inv, *pm, *pl;
    int ns;
};

int stats_scratch(kv_backend_t *be, const QK &p, StatsScratch *s)
{
    const long long qtiles = (p.n_q + BR - 1) / BR;
    const int nk_max = p.causal ? (p.q_pos0 + p.n_q < p.n_k ? p.q_pos0 + p.n_q : p.n_k) : p.n_k;
    s->ns = choose_split(qtiles * p.H, (nk_max + BL - 1) / BL);
    const size_t rows = (size_t)p.H * p.n_q;
    const size_t a = align_floats(rows), b = align_floats(rows * s->ns);
    float *buf = (float *)kv_cuda_scratch(be, sizeof(float) * (2 * a + 2 * b));
    if (!buf)
        return KV_ENOMEM;
    s->m = buf;
    s->inv = buf + a;
    s->pm = buf + 2 * a;
    s->pl = buf + 2 * a + b;
    return KV_OK;
}

/* ---- attention */

template <int D> int run_attention(kv_backend_t *be, const kv_attn_args_t *a)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    const int H = a->n_heads, d = a->head_dim;
    QK p;
    p.q = make_rows(a->q, (size_t)d, (size_t)H * d, d, D);
    p.k = make_rows(a->k, (size_t)d, a->kv_stride, d, D);
    p.v = make_rows(a->v, (size_t)d, a->kv_stride, d, D);
    p.n_q = a->n_q;
    p.q_pos0 = a->q_pos0;
    p.n_k = a->q_pos0 + a->n_q;
    p.causal = 1;
    p.H = H;
    p.G = H / a->n_kv_heads;
    p.d = d;
    p.scale = a->scale;
    const int qtiles = (p.n_q + BR - 1) / BR;
    const int ns = choose_split((long long)qtiles * H, (p.n_k + BL - 1) / BL);
    FwdOut o = {};
    o.out = a->out;
    o.o_hs = (size_t)d;
    o.o_rs = (size_t)H * d;
    o.lse = a->lse;
    o.n_split = ns;
    const size_t rows = (size_t)H * p.n_q;
    if (ns > 1) {
        const size_t nb = align_floats(rows * ns);
        float *buf = (float *)kv_cuda_scratch(be, sizeof(float) * (2 * nb + rows * ns * D));
        if (!buf)
            return KV_ENOMEM;
        o.pm = buf;
        o.pl = buf + nb;
        o.po = buf + 2 * nb;
    }
    const size_t smem = smem_qk(D) + sizeof(float) * BL * D;
    int rc = set_smem(k_fwd<D, true>, smem, "attention");
    if (rc)
        return rc;
    KV_LAUNCH(dim3(qtiles, H, ns), NT, smem, c->stream, k_fwd<D, true>)(p, o);
    if ((rc = kv_cuda_check_launch("attention")))
        return rc;
    if (ns > 1) {
        KV_LAUNCH((unsigned)((rows + 7) / 8), 256, 0, c->stream, k_merge_out<D>)
        (o, (int)rows, p.n_q, d, a->out, o.o_hs, o.o_rs, a->lse);
        rc = kv_cuda_check_launch("attention merge");
    }
    return rc;
}

/* ---- attn_stats */

template <int D> int run_attn_stats(kv_backend_t *be, const kv_attn_stats_args_t *a)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    const int H = a->n_heads, d = a->head_dim;
    QK p;
    p.q = make_rows(a->q, (size_t)d, (size_t)H * d, d, D);
    p.k = make_rows(a->k, (size_t)d, a->kv_stride, d, D);
    p.v = p.k;
    p.n_q = a->n_q;
    p.q_pos0 = a->q_pos0;
    p.n_k = a->q_pos0 + a->n_q;
    p.causal = 1;
    p.H = H;
    p.G = H / a->n_kv_heads;
    p.d = d;
    p.scale = a->scale;
    int rc = KV_OK;
    if (a->entropy || a->pooled || a->sink || a->seg) {
        Pool pl = {a->pooled, a->pool, a->pool_T};
        RowOut ro = {a->entropy, a->sink, a->seg, a->seg_lo};
        const size_t smem = smem_qk(D) + (a->pooled ? sizeof(int) * POOL_SMEM : 0);
        if ((rc = set_smem(k_rowent<D>, smem, "attn_stats rows")))
            return rc;
        KV_LAUNCH(dim3((p.n_q + BR - 1) / BR, H), NT, smem, c->stream, k_rowent<D>)(p, a->lse, ro, pl);
        if ((rc = kv_cuda_check_launch("attn_stats rows")))
            return rc;
    }
    if (a->keys_mass) {
        KV_LAUNCH(dim3(p.n_q, H), NT, 0, c->stream, k_keysmass<D>)(p, a->lse, a->keys_mass, a->mass);
        if ((rc = kv_cuda_check_launch("attn_stats keys_mass")))
            return rc;
    }
    /* the per-key statistics over all the queries, then over those before head_end (a second launch
     * over the first rows: the columns are reduced in a fixed order either way) */
    const int n_head = a->head_end - a->q_pos0 < 0 ? 0 : min(a->n_q, a->head_end - a->q_pos0);
    for (int part = 0; part < 2 && rc == KV_OK; part++) {
        ColOut o = part ? ColOut{a->acc_head, a->acc_sq_head, a->acc_max_head, a->acc_stride, 1, a->n_q}
                        : ColOut{a->acc, a->acc_sq, a->acc_max, a->acc_stride, 1, a->n_q};
        QK pp = p;
        if (part) {
            pp.n_q = n_head;
            pp.n_k = a->q_pos0 + n_head;
        }
        if ((!o.sum && !o.sumsq && !o.max) || pp.n_q == 0)
            continue;
        const size_t smem = smem_qk(D);
        if ((rc = set_smem(k_cols<D>, smem, "attn_stats columns")))
            return rc;
        KV_LAUNCH(dim3((pp.n_k + BR - 1) / BR, H), NT, smem, c->stream, k_cols<D>)(pp, a->lse, nullptr, o);
        rc = kv_cuda_check_launch("attn_stats columns");
    }
    return rc;
}

/* ---- replay ops (head-major) */

QK replay_qk(const kv_qk_args_t *a, int D)
{
    QK p;
    p.q = make_rows(a->q, a->q_head_stride, (size_t)a->head_dim, a->head_dim, D);
    p.k = make_rows(a->k, a->k_head_stride, (size_t)a->head_dim, a->head_dim, D);
    p.v = p.k;
    p.n_q = a->n_q;
    p.q_pos0 = a->q_pos0;
    p.n_k = a->n_k;
    p.causal = a->causal != 0;
    p.H = a->n_heads;
    p.G = a->n_heads / a->n_kv_heads;
    p.d = a->head_dim;
    p.scale = a->scale;
    return p;
}

template <int D> int run_attn_probs(kv_backend_t *be, const kv_qk_args_t *a, float *probs, float *lse)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    const QK p = replay_qk(a, D);
    StatsScratch s;
    int rc = stats_scratch(be, p, &s);
    if (rc || (rc = row_stats<D>(be, p, s.m, s.inv, lse, s.pm, s.pl, s.ns)))
        return rc;
    const size_t smem = smem_qk(D);
    if ((rc = set_smem(k_probs<D>, smem, "attn_probs")))
        return rc;
    const unsigned chunks = (unsigned)((p.n_k + PROBS_CHUNK * BL - 1) / (PROBS_CHUNK * BL));
    KV_LAUNCH(dim3((p.n_q + BR - 1) / BR, p.H, chunks), NT, smem, c->stream, k_probs<D>)(p, s.m, s.inv, probs);
    return kv_cuda_check_launch("attn_probs");
}

template <int D> int run_attn_colstats(kv_backend_t *be, const kv_qk_args_t *a, const kv_colstats_out_t *out)
{
    cuda_ctx_t *c = kv_cuda_ctx(be);
    const QK p = replay_qk(a, D);
    StatsScratch s;
    int rc = stats_scratch(be, p, &s);
    if (rc || (rc = row_stats<D>(be, p, s.m, s.inv, NULL, s.pm, s.pl, s.ns)))
        return rc;
    ColOut o = {out->sum, out->sumsq, out->max, (size_t)p.n_k, 0, p.n_q};
    const size_t smem = smem_qk(D);
    if ((rc = set_smem(k_cols<D>, smem, "attn_colstats")))
        return rc;
    KV_LAUNCH(dim3((p.n_k + BR - 1) / BR, p.H), NT, smem, c->stream, k_cols<D>)(p, s.m, s.inv, o);
    return kv_cuda_check_launch("attn_colstats");
}

} // namespace

int kv_cuda_attention(kv_backend_t *be, const kv_attn_args_t *a)
{
    int rc = check_heads("attention", a->n_heads, a->n_kv_heads, a->head_dim, a->n_q, a->q_pos0, 0);
    if (rc)
        return rc;
    if (!a->out)
        return kv_error(KV_EINVAL, "attention: the CUDA backend needs an output buffer (lse alone: CPU only)");
    if (a->kv_stride < (size_t)a->n_kv_heads * a->head_dim)
        return kv_error(KV_EINVAL, "attention: kv_stride %zu below n_kv_heads * head_dim = %d", a->kv_stride,
                        a->n_kv_heads * a->head_dim);
    if (a->n_q == 0)
        return KV_OK;
    switch (pick_d(a->head_dim)) {
    case 32: rc = run_attention<32>(be, a); break;
    case 64: rc = run_attention<64>(be, a); break;
    case 128: rc = run_attention<128>(be, a); break;
    default: rc = run_attention<256>(be, a); break;
    }
    if (rc || !a->stats)
        return rc;
    /* statistics requested with the attention (kv_backend.h): the attn_stats op on the same inputs, after
     * it (the CPU shares one pass of scores between the two; here they stay two kernels) */
    if (!a->lse)
        return kv_error(KV_EINVAL, "attention: statistics need the attention's lse");
    kv_attn_stats_args_t st = *a->stats;
    st.q = a->q, st.k = a->k, st.lse = a->lse, st.kv_stride = a->kv_stride;
    st.n_q = a->n_q, st.q_pos0 = a->q_pos0, st.n_heads = a->n_heads, st.n_kv_heads = a->n_kv_heads;
    st.head_dim = a->head_dim, st.scale = a->scale;
    return kv_cuda_attn_stats(be, &st);
}

int kv_cuda_attn_stats(kv_backend_t *be, const kv_attn_stats_args_t *a)
{
    int rc = check_heads("attn_stats", a->n_heads, a->n_kv_heads, a->head_dim, a->n_q, a->q_pos0, 0);
    if (rc)
        return rc;
    const int nk_all = a->q_pos0 + a->n_q;
    if (a->pooled && (a->pool <= 0 || a->pool > a->pool_T || nk_all > a->pool_T))
        return kv_error(KV_EINVAL, "attn_stats: pool %d does not fit %d tokens", a->pool, a->pool_T);
    const int per_key = a->acc || a->acc_sq || a->acc_max || a->acc_head || a->acc_sq_head || a->acc_max_head;
    if (per_key && a->acc_stride < (size_t)nk_all)
        return kv_error(KV_EINVAL, "attn_stats: acc_stride %zu below the %d keys", a->acc_stride, nk_all);
    if (a->keys_mass && !(a->mass > 0 && a->mass <= 1))
        return kv_error(KV_EINVAL, "attn_stats: mass %g outside (0, 1]", (double)a->mass);
    if (a->n_q == 0 || (!a->entropy && !a->pooled && !per_key && !a->sink && !a->seg && !a->keys_mass))
        return KV_OK;
    if (!a->lse)
        return kv_error(KV_EINVAL, "attn_stats: lse is required");
    switch (pick_d(a->head_dim)) {
    case 32: return run_attn_stats<32>(be, a);
    case 64: return run_attn_stats<64>(be, a);
    case 128: return run_attn_stats<128>(be, a);
    default: return run_attn_stats<256>(be, a);
    }
}

int kv_cuda_attn_probs(kv_backend_t *be, const kv_qk_args_t *a, float *probs, float *lse)
{
    int rc = check_heads("attn_probs", a->n_heads, a->n_kv_heads, a->head_dim, a->n_q, a->q_pos0, a->n_k);
    if (rc)
        return rc;
    if (a->n_q == 0 || a->n_k == 0)
        return KV_OK;
    if ((a->n_k + PROBS_CHUNK * BL - 1) / (PROBS_CHUNK * BL) > 65535) /* the chunks of keys are grid.z */
        return kv_error(KV_EINVAL, "attn_probs: %d keys are above the CUDA backend's limit of %d", a->n_k,
                        65535 * PROBS_CHUNK * BL);
    switch (pick_d(a->head_dim)) {
    case 32: return run_attn_probs<32>(be, a, probs, lse);
    case 64: return run_attn_probs<64>(be, a, probs, lse);
    case 128: return run_attn_probs<128>(be, a, probs, lse);
    default: return run_attn_probs<256>(be, a, probs, lse);
    }
}

int kv_cuda_attn_colstats(kv_backend_t *be, const kv_qk_args_t *a, const kv_colstats_out_t *out)
{
    int rc = check_heads("attn_colstats", a->n_heads, a->n_kv_heads, a->head_dim, a->n_q, a->q_pos0, a->n_k);
    if (rc)
        return rc;
    if (a->n_k == 0 || (!out->sum && !out->sumsq && !out->max))
        return KV_OK;
    if (a->n_q == 0) { /* no query sees any key: every column statistic is 0, as on the CPU */
        cuda_ctx_t *c = kv_cuda_ctx(be);
        const size_t bytes = sizeof(float) * (size_t)a->n_heads * a->n_k;
        float *outs[3] = {out->sum, out->sumsq, out->max};
        for (int k = 0; k < 3; k++)
            if (outs[k])
                KV_CUDA_TRY(cudaMemsetAsync(outs[k], 0, bytes, c->stream), "attn_colstats zero");
        return KV_OK;
    }
    switch (pick_d(a->head_dim)) {
    case 32: return run_attn_colstats<32>(be, a, out);
    case 64: return run_attn_colstats<64>(be, a, out);
    case 128: return run_attn_colstats<128>(be, a, out);
    default: return run_attn_colstats<256>(be, a, out);
    }
}
