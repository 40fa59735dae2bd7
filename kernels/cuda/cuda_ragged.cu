/*
 * cuda_ragged.cu: attn_ragged, attention over a compressed cache whose storage heads each keep their
 * own tokens (kernels/kv_backend.h; closed-loop evaluation, sim/eval.c).
 *
 * One warp per (query, query head): the entries of the head's storage head that the query sees (a
 * binary search of the ascending positions, the same in every lane) are walked in tiles of 32, lane
 * j computing the scaled dot product of entry j of the tile (float32 fused multiply-adds over
 * head_dim, rounded by __fmul_rn before anything is subtracted from it, as cuda_attention.cu does);
 * an online softmax (FlashAttention's running max m and sum l, rescaled by expf(m_old - m_new))
 * accumulates P V in registers, each lane owning the output columns lane, lane + 32, ... Every
 * output element is produced by one lane in a fixed order, so the result is deterministic; it
 * differs from the CPU's (two BLAS products and a double-sum softmax) by float rounding only, and
 * tests/gpu_parity.c holds it to the attention op's tolerance.
 *
 * Deliberately simple: decode-sized work (a few queries per call, each over at most a few
 * thousand entries), no shared-memory tiles, K and V re-read by every query head of a group.
 */
#include "kernels/cuda/cuda_internal.h"

#include <math.h>
#include <stdint.h>

namespace
{

constexpr unsigned FULL = 0xffffffffu;

struct Ragged {
    float *out, *lse;
    const float *q, *k, *v;
    const int32_t *pos, *len;
    int cap, n_q, q_pos0, H, G, d;
    float scale;
};

__device__ __forceinline__ float rg_warp_max(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(FULL, v, o));
    return v;
}

/* Butterfly sum: every lane ends with the same bits. */
__device__ __forceinline__ float rg_warp_sum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(FULL, v, o);
    return v;
}

/* EPL: output columns per lane (head_dim <= 32 * EPL). */
template <int EPL> __global__ void __launch_bounds__(32) k_ragged(Ragged p)
{
    const int i = blockIdx.x, h = blockIdx.y, lane = threadIdx.x, d = p.d, s = h / p.G;
    const int32_t *P = p.pos + (size_t)s * p.cap;
    const int qp = p.q_pos0 + i;
    int lo = 0, hi = p.len[s];
    while (lo < hi) { /* entries at positions <= qp */
        const int mid = lo + (hi - lo) / 2;
        if (P[mid] <= qp)
            lo = mid + 1;
        else
            hi = mid;
    }
    const int nv = lo;
    const float *q = p.q + ((size_t)i * p.H + h) * d;
    const float *K = p.k + (size_t)s * p.cap * d, *V = p.v + (size_t)s * p.cap * d;
    float m = -INFINITY, l = 0.f, acc[EPL];
#pragma unroll
    for (int c = 0; c < EPL; c++)
        acc[c] = 0.f;
    for (int j0 = 0; j0 < nv; j0 += 32) {
        const int j = j0 + lane;
        float sc = -INFINITY;
        if (j < nv) {
            const float *kr = K + (size_t)j * d;
            float dot = 0.f;
            for (int x = 0; x < d; x++)
                dot = fmaf(q[x], kr[x], dot);
            sc = __fmul_rn(dot, p.scale);
        }
        const float mn = fmaxf(m, rg_warp_max(sc)); /* finite: the tile holds at least one entry */
        const float corr = expf(m - mn);            /* 0 on the first tile (m = -inf) */
        const float e = j < nv ? expf(sc - mn) : 0.f;
        l = l * corr + rg_warp_sum(e);
#pragma unroll
        for (int c = 0; c < EPL; c++)
            acc[c] *= corr;
        const int nj = min(32, nv - j0);
        for (int t = 0; t < nj; t++) {
            const float pt = __shfl_sync(FULL, e, t);
            const float *vr = V + (size_t)(j0 + t) * d;
#pragma unroll
            for (int c = 0; c < EPL; c++) {
                const int x = lane + 32 * c;
                if (x < d)
                    acc[c] = fmaf(pt, vr[x], acc[c]);
            }
        }
        m = mn;
    }
    float *o = p.out + ((size_t)i * p.H + h) * d;
#pragma unroll
    for (int c = 0; c < EPL; c++) {
        const int x = lane + 32 * c;
        if (x < d)
            o[x] = nv ? acc[c] / l : 0.f;
    }
    if (p.lse && lane == 0)
        p.lse[(size_t)h * p.n_q + i] = nv ? m + logf(l) : -INFINITY;
}

} // namespace

int kv_cuda_attn_ragged(kv_backend_t *be, const kv_attn_ragged_args_t *a)
{
    const int H = a->n_heads, d = a->head_dim, S = a->n_store;
    if (H <= 0 || d <= 0 || S <= 0 || H % S || a->n_q < 0 || a->cap < 0)
        return kv_error(KV_EINVAL, "attn_ragged: %d heads over %d storage heads, head_dim %d, %d queries, capacity %d",
                        H, S, d, a->n_q, a->cap);
    if (d > 256 || H > 65535)
        return kv_error(KV_EINVAL, "attn_ragged: head_dim %d or %d heads above the CUDA backend's limits (256, 65535)",
                        d, H);
    if (a->n_q == 0)
        return KV_OK;
    Ragged p = {a->out, a->lse, a->q, a->k, a->v, a->pos, a->len, a->cap, a->n_q, a->q_pos0, H, H / S, d, a->scale};
    cuda_ctx_t *c = kv_cuda_ctx(be);
    const dim3 grid((unsigned)a->n_q, (unsigned)H), block(32);
    if (d <= 32)
        KV_LAUNCH(grid, block, 0, c->stream, k_ragged<1>)(p);
    else if (d <= 64)
        KV_LAUNCH(grid, block, 0, c->stream, k_ragged<2>)(p);
    else if (d <= 128)
        KV_LAUNCH(grid, block, 0, c->stream, k_ragged<4>)(p);
    else
        KV_LAUNCH(grid, block, 0, c->stream, k_ragged<8>)(p);
    return kv_cuda_check_launch("attn_ragged");
}
