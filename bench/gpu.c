/*
 * bench/gpu.c: the GPU benchmark (`make bench-gpu`, bench/README.md).
 *
 * 1. The device and its ceilings: datasheet peaks looked up by name (printed with the figure used)
 *    and the two ceilings measured here (METHOD.md): a device-to-device copy (bytes read + written
 *    per second) and dense n^3 cuBLAS products in fp32 and bf16.
 * 2. Every backend op on Llama-3.1-8B shapes (model dim 4096, 32 query heads, 8 KV heads, head_dim
 *    128, FFN 14336, RoPE theta 500000 with the llama3 scaling: factor 8, low/high frequency factors
 *    1 and 4, original context 8192; add_bias on a Qwen2-style q projection) at --op-tokens tokens: the CUDA median of
 * --reps timed calls (CUDA events on the backend's stream, after --warmup (2) untimed calls) and one CPU call (wall
 * clock), the speed-up, and
 *      - for memory-bound ops (rmsnorm, rope, swiglu, add, add_bias, decode attention, decode matmul) the
 *        bandwidth: the fewest bytes the op must move (each input read once, each output written
 *        once) over the time, as a fraction of the datasheet HBM bandwidth and of the measured copy;
 *      - for the attention family the arithmetic rate: QK^T and PV count 2 flops per multiply-add,
 *        4 n_q n_k d per head for attention; causal masking halves the pairs (n_q (n_q + 1) / 2 for a
 *        prefill from position 0), and only visible pairs are counted. attn_stats and attn_colstats
 *        make two QK^T passes (rows, then columns): 4 n_q n_k d per head as well; attn_probs two
 *        passes over its n_q x n_k. The rate is shown as a fraction of the fp32 non-tensor peak (the
 *        units these kernels use today) and of the dense bf16 tensor peak (the target).
 * 3. End-to-end replay on synthetic Llama-3-8B-shape traces held in memory (--layers layers, each of
 *    the --tokens prompt lengths plus --decode decode queries): every registered policy x 4 budgets on
 *    the CPU backend and on the CUDA backend in the same run, wall time of each and the speed-up, and
 *    the largest difference of mean recall between the two (a sanity check; gpu_parity is the test).
 *
 * Without a usable CUDA device it prints `CUDA unavailable: <why>` and exits 0 having measured
 * nothing; --cpu-only runs the CPU side alone (to try the program on a machine without a GPU).
 * --out FILE also writes every figure as TSV (for bench/results/).
 */
#include "kernels/kv_backend.h"
#include "kernels/kv_cuda.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/common/kv_rng.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "traces/kv_trace.h"

#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Llama-3.1-8B */
enum { DIM = 4096, NH = 32, NKV = 8, HD = 128, FFN = 14336 };

/* Its RoPE: theta 500000, llama3 scaling (config.json's rope_scaling / rope_parameters) */
static kv_rope_t llama31_rope(void)
{
    kv_rope_t r = kv_rope_plain(500000.0);
    r.type = KV_ROPE_LLAMA3;
    r.factor = 8.0;
    r.low_freq_factor = 1.0;
    r.high_freq_factor = 4.0;
    r.original_max_pos = 8192.0;
    return r;
}

typedef struct {
    const char *tokens; /* replay prompt lengths */
    int layers, decode, op_tokens, reps, warmup;
    int no_cpu, cpu_only, ops, replay;
    const char *policies, *budgets, *out;
} opts_t;

/* Datasheet figures (dense, no sparsity), looked up by device name. */
typedef struct {
    const char *match, *label;
    double bf16_tflops, fp32_tflops, hbm_tbs;
} peak_t;

static const peak_t PEAKS[] = {
    {"H100 NVL", "H100 NVL", 835.0, 60.0, 3.9},     {"H100 PCIe", "H100 PCIe", 756.0, 51.2, 2.0},
    {"H100", "H100 SXM (HBM3)", 989.4, 66.9, 3.35}, {"H200", "H200 SXM", 989.4, 66.9, 4.8},
    {"H800", "H800 SXM", 989.4, 66.9, 3.35},        {"A100", "A100 SXM 80GB", 312.0, 19.5, 2.04},
    {"L40S", "L40S", 362.0, 91.6, 0.864},
};

typedef struct {
    double bf16, fp32, hbm; /* FLOP/s, FLOP/s, B/s; 0 = unknown */
    char label[96];
    double copy, gemm_fp32, gemm_bf16; /* measured */
} ceil_t;

static FILE *g_tsv;

static void tsv(const char *section, const char *name, const char *shape, const char *metric, double value)
{
    if (g_tsv)
        fprintf(g_tsv, "%s\t%s\t%s\t%s\t%.6g\n", section, name, shape, metric, value);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef int (*op_fn)(kv_backend_t *be, void *arg);

/* Median milliseconds of fn on a CUDA backend (events, after `warmup` untimed calls), or one
 * wall-clock call elsewhere. */
static double time_ms(kv_backend_t *be, op_fn fn, void *arg, int warmup, int reps, int *rc)
{
    if (!strcmp(be->name, "cuda")) {
        double t[256];
        if (reps > 256)
            reps = 256;
        *rc = kv_cuda_time(be, fn, arg, warmup, reps, t);
        qsort(t, (size_t)reps, sizeof(double), cmp_double);
        return t[reps / 2];
    }
    be->ops->sync(be);
    double t0 = kv_now();
    *rc = fn(be, arg);
    be->ops->sync(be);
    return (kv_now() - t0) * 1e3;
}

static void fill_random(float *x, size_t n, uint64_t seed, double scale)
{
#pragma omp parallel
    {
        kv_rng_t r;
        kv_rng_seed_task(&r, seed, (uint64_t)omp_get_thread_num(), 3, 0);
#pragma omp for schedule(static)
        for (size_t i = 0; i < n; i++)
            x[i] = (float)(scale * (2.0 * kv_rng_uniform(&r) - 1.0));
    }
}

/* A backend buffer holding n random floats (the same values on every backend for a given seed). */
static float *be_random(kv_backend_t *be, size_t n, uint64_t seed, double scale)
{
    float *h = kv_malloc(sizeof(float) * n, "benchmark input");
    float *d = kv_be_alloc(be, sizeof(float) * n);
    if (!h || !d) {
        fprintf(stderr, "bench_gpu: cannot allocate %zu floats on %s: %s\n", n, be->name, kv_last_error());
        exit(2);
    }
    fill_random(h, n, seed, scale);
    if (be->ops->upload(be, d, h, sizeof(float) * n)) {
        fprintf(stderr, "bench_gpu: upload: %s\n", kv_last_error());
        exit(2);
    }
    be->ops->sync(be);
    kv_free(h);
    return d;
}

/* ---------------------------------------------------------------- op closures */

typedef struct {
    float *a, *b, *c, *d, *e, *f, *g;
    int32_t *pos;
    int M, N, K, T;
    size_t n;
    kv_attn_args_t att;
    kv_attn_stats_args_t st;
    kv_qk_args_t qk;
    float *probs, *lse;
    kv_colstats_out_t cs;
    const char *mm_mode;
} arg_t;

static int f_rmsnorm(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->rmsnorm(be, a->b, a->a, a->c, a->T, DIM, 1e-5f);
}
static int f_rope(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    const kv_rope_t r = llama31_rope();
    return be->ops->rope(be, a->a, a->pos, a->T, NH, HD, &r);
}
static int f_add_bias(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->add_bias(be, a->a, a->b, a->T, NH * HD);
}
static int f_swiglu(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->swiglu(be, a->a, a->b, a->n);
}
static int f_add(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->add(be, a->a, a->b, a->n);
}
static int f_matmul(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->matmul(be, a->c, a->a, a->b, a->M, a->N, a->K);
}
static int f_attention(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->attention(be, &a->att);
}
static int f_stats(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->attn_stats(be, &a->st);
}
static int f_probs(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->attn_probs(be, &a->qk, a->probs, a->lse);
}
static int f_colstats(kv_backend_t *be, void *p)
{
    arg_t *a = p;
    return be->ops->attn_colstats(be, &a->qk, &a->cs);
}

/* What an op is measured against. */
typedef enum { M_BYTES, M_FLOPS_ATT, M_FLOPS_MM } metric_t;

typedef struct {
    const char *name;
    char shape[96];
    op_fn fn;
    metric_t metric;
    double work;         /* bytes or flops */
    const char *mm_mode; /* matmul precision, NULL otherwise */
} op_case_t;

/* Set up the arguments of case `k` on backend be (device buffers), or return 0 when k is past the
 * last case. Buffers are freed by the caller through the arg's pointers. */
static int setup_case(int k, kv_backend_t *be, int T, op_case_t *oc, arg_t *a)
{
    memset(a, 0, sizeof *a);
    memset(oc, 0, sizeof *oc);
    const float scale = 1.0f / sqrtf((float)HD);
    switch (k) {
    case 0:
        oc->name = "rmsnorm";
        snprintf(oc->shape, sizeof oc->shape, "T=%d dim=%d", T, DIM);
        oc->fn = f_rmsnorm;
        oc->metric = M_BYTES;
        oc->work = (2.0 * T * DIM + DIM) * 4;
        a->T = T;
        a->a = be_random(be, (size_t)T * DIM, 1, 3.0);
        a->b = be_random(be, (size_t)T * DIM, 2, 1.0);
        a->c = be_random(be, DIM, 3, 1.0);
        return 1;
    case 1: {
        oc->name = "rope";
        snprintf(oc->shape, sizeof oc->shape, "T=%d H=%d d=%d llama3", T, NH, HD);
        oc->fn = f_rope;
        oc->metric = M_BYTES;
        oc->work = 2.0 * T * NH * HD * 4 + T * 4.0;
        a->T = T;
        a->a = be_random(be, (size_t)T * NH * HD, 4, 1.0);
        int32_t *pos = kv_malloc(sizeof(int32_t) * (size_t)T, "positions");
        for (int t = 0; t < T; t++)
            pos[t] = t;
        a->pos = kv_be_alloc(be, sizeof(int32_t) * (size_t)T);
        if (!pos || !a->pos || be->ops->upload(be, a->pos, pos, sizeof(int32_t) * (size_t)T))
            exit(2);
        be->ops->sync(be);
        kv_free(pos);
        return 1;
    }
    case 2:
        oc->name = "swiglu";
        a->n = (size_t)T * FFN;
        snprintf(oc->shape, sizeof oc->shape, "n=%d x %d", T, FFN);
        oc->fn = f_swiglu;
        oc->metric = M_BYTES;
        oc->work = 3.0 * a->n * 4;
        a->a = be_random(be, a->n, 5, 2.0);
        a->b = be_random(be, a->n, 6, 1.0);
        return 1;
    case 3:
        oc->name = "add";
        a->n = (size_t)T * DIM;
        snprintf(oc->shape, sizeof oc->shape, "n=%d x %d", T, DIM);
        oc->fn = f_add;
        oc->metric = M_BYTES;
        oc->work = 3.0 * a->n * 4;
        a->a = be_random(be, a->n, 7, 1.0);
        a->b = be_random(be, a->n, 8, 1e-3);
        return 1;
    case 4:
    case 5:
    case 6:
    case 7: {
        static const char *modes[] = {"fp32", "tf32", "bf16", "fp16"};
        oc->name = "matmul";
        oc->mm_mode = modes[k - 4];
        a->M = T;
        a->N = DIM;
        a->K = DIM;
        snprintf(oc->shape, sizeof oc->shape, "M=%d N=%d K=%d %s", T, DIM, DIM, oc->mm_mode);
        oc->fn = f_matmul;
        oc->metric = M_FLOPS_MM;
        oc->work = 2.0 * T * DIM * DIM;
        a->a = be_random(be, (size_t)T * DIM, 9, 1.0);
        a->b = be_random(be, (size_t)DIM * DIM, 10, 1.0 / 64);
        a->c = be_random(be, (size_t)T * DIM, 11, 0.0);
        return 1;
    }
    case 8:
        oc->name = "matmul";
        oc->mm_mode = "fp32";
        a->M = 1;
        a->N = FFN;
        a->K = DIM;
        snprintf(oc->shape, sizeof oc->shape, "M=1 N=%d K=%d fp32 (decode)", FFN, DIM);
        oc->fn = f_matmul;
        oc->metric = M_BYTES;
        oc->work = ((double)FFN * DIM + DIM + FFN) * 4;
        a->a = be_random(be, DIM, 12, 1.0);
        a->b = be_random(be, (size_t)FFN * DIM, 13, 1.0 / 64);
        a->c = be_random(be, FFN, 14, 0.0);
        return 1;
    case 9:
    case 10: {
        const int decode = k == 10, nq = decode ? 1 : T, p0 = decode ? T - 1 : 0, nk = p0 + nq;
        oc->name = "attention";
        snprintf(oc->shape, sizeof oc->shape, "%s n_q=%d q_pos0=%d H=%d Hkv=%d d=%d", decode ? "decode" : "prefill", nq,
                 p0, NH, NKV, HD);
        oc->fn = f_attention;
        if (decode) {
            oc->metric = M_BYTES;
            oc->work = (2.0 * nk * NKV * HD + 2.0 * NH * HD + NH) * 4;
        } else {
            oc->metric = M_FLOPS_ATT;
            oc->work = 4.0 * HD * NH * ((double)nq * (nq + 1) / 2);
        }
        a->a = be_random(be, (size_t)nq * NH * HD, 15, 1.0);
        a->b = be_random(be, (size_t)nk * NKV * HD, 16, 1.0);
        a->c = be_random(be, (size_t)nk * NKV * HD, 17, 1.0);
        a->d = be_random(be, (size_t)nq * NH * HD, 18, 0.0);
        a->e = be_random(be, (size_t)NH * nq, 19, 0.0);
        kv_attn_args_t at = {a->d, a->e, a->a, a->b, a->c, (size_t)NKV * HD, nq, p0, NH, NKV, HD, scale};
        a->att = at;
        return 1;
    }
    case 11: {
        oc->name = "attn_stats";
        const int pool = 256;
        snprintf(oc->shape, sizeof oc->shape, "n_q=%d H=%d Hkv=%d d=%d entropy+acc+pool%d", T, NH, NKV, HD, pool);
        oc->fn = f_stats;
        oc->metric = M_FLOPS_ATT;
        oc->work = 4.0 * HD * NH * ((double)T * (T + 1) / 2);
        a->a = be_random(be, (size_t)T * NH * HD, 20, 1.0);
        a->b = be_random(be, (size_t)T * NKV * HD, 21, 1.0);
        a->c = be_random(be, (size_t)NH * T, 22, 0.0); /* lse: any values give the same work */
        a->d = be_random(be, (size_t)NH * T, 23, 0.0);
        a->e = be_random(be, (size_t)NH * T, 24, 0.0);
        a->f = be_random(be, (size_t)NH * pool * pool, 25, 0.0);
        kv_attn_stats_args_t s = {.q = a->a,
                                  .k = a->b,
                                  .lse = a->c,
                                  .kv_stride = (size_t)NKV * HD,
                                  .n_q = T,
                                  .q_pos0 = 0,
                                  .n_heads = NH,
                                  .n_kv_heads = NKV,
                                  .head_dim = HD,
                                  .scale = scale,
                                  .entropy = a->d,
                                  .acc = a->e,
                                  .acc_stride = (size_t)T,
                                  .pooled = a->f,
                                  .pool = pool,
                                  .pool_T = T};
        a->st = s;
        return 1;
    }
    case 12:
    case 13: {
        const int colstats = k == 13, nq = colstats ? T : (T < 64 ? T : 64), p0 = T - nq;
        oc->name = colstats ? "attn_colstats" : "attn_probs";
        snprintf(oc->shape, sizeof oc->shape, "n_q=%d q_pos0=%d n_k=%d H=%d Hkv=%d d=%d causal", nq, p0, T, NH, NKV,
                 HD);
        oc->fn = colstats ? f_colstats : f_probs;
        oc->metric = M_FLOPS_ATT;
        double pairs = (double)nq * p0 + (double)nq * (nq + 1) / 2;
        oc->work = 4.0 * HD * NH * pairs;
        a->a = be_random(be, (size_t)NH * T * HD, 26, 1.0); /* Q (H, T, d) head-major */
        a->b = be_random(be, (size_t)NKV * T * HD, 27, 1.0);
        kv_qk_args_t q = {
            a->a + (size_t)p0 * HD, (size_t)T * HD, a->b, (size_t)T * HD, NH, NKV, HD, nq, p0, T, 1, scale};
        a->qk = q;
        if (colstats) {
            a->c = be_random(be, (size_t)NH * T, 28, 0.0);
            a->d = be_random(be, (size_t)NH * T, 29, 0.0);
            a->e = be_random(be, (size_t)NH * T, 30, 0.0);
            kv_colstats_out_t o = {a->c, a->d, a->e};
            a->cs = o;
        } else {
            a->probs = a->c = be_random(be, (size_t)NH * nq * T, 31, 0.0);
            a->lse = a->d = be_random(be, (size_t)NH * nq, 32, 0.0);
        }
        return 1;
    }
    case 14:
        oc->name = "add_bias";
        snprintf(oc->shape, sizeof oc->shape, "rows=%d cols=%d", T, NH * HD);
        oc->fn = f_add_bias;
        oc->metric = M_BYTES;
        oc->work = (2.0 * T * NH * HD + NH * HD) * 4;
        a->T = T;
        a->a = be_random(be, (size_t)T * NH * HD, 33, 1.0);
        a->b = be_random(be, (size_t)NH * HD, 34, 1.0);
        return 1;
    default: return 0;
    }
}

static void free_case(kv_backend_t *be, arg_t *a)
{
    float *b[] = {a->a, a->b, a->c, a->d, a->e, a->f, a->g};
    for (size_t i = 0; i < KV_ARRAY_LEN(b); i++)
        kv_be_free(be, b[i]);
    kv_be_free(be, a->pos);
}

static void run_ops(kv_backend_t *cpu, kv_backend_t *gpu, const opts_t *o, const ceil_t *cl)
{
    printf("\nper op, Llama-3.1-8B shapes at %d tokens (CUDA: median of %d after %d warm-up calls; CPU: one call%s)\n",
           o->op_tokens, o->reps, o->warmup, o->no_cpu ? ", skipped" : "");
    printf("  %-14s %-52s %10s %10s %8s  %s\n", "op", "shape", "cuda ms", "cpu ms", "speed-up", "rate");
    for (int k = 0;; k++) {
        op_case_t oc = {0};
        arg_t ag, ac;
        double tg = NAN, tc = NAN;
        int rc = KV_OK;
        if (gpu) {
            if (!setup_case(k, gpu, o->op_tokens, &oc, &ag))
                break;
            if (oc.mm_mode)
                kv_cuda_set_matmul(gpu, oc.mm_mode);
            tg = time_ms(gpu, oc.fn, &ag, o->warmup, o->reps, &rc);
            if (oc.mm_mode)
                kv_cuda_set_matmul(gpu, "fp32");
            if (rc) {
                printf("  %-14s %-52s failed on CUDA: %s\n", oc.name, oc.shape, kv_last_error());
                tg = NAN;
            }
            free_case(gpu, &ag);
        }
        int cpu_case = !o->no_cpu && (!gpu || !oc.mm_mode || !strcmp(oc.mm_mode, "fp32"));
        if (cpu_case) {
            if (!setup_case(k, cpu, o->op_tokens, &oc, &ac))
                break;
            if (oc.mm_mode && strcmp(oc.mm_mode, "fp32")) {
                free_case(cpu, &ac);
                continue; /* reduced precision is a CUDA mode */
            }
            tc = time_ms(cpu, oc.fn, &ac, 0, 1, &rc);
            if (rc) {
                printf("  %-14s %-52s failed on the CPU: %s\n", oc.name, oc.shape, kv_last_error());
                tc = NAN;
            }
            free_case(cpu, &ac);
        } else if (!gpu) {
            if (!setup_case(k, cpu, 1, &oc, &ac)) /* only to learn whether the list has ended */
                break;
            free_case(cpu, &ac);
            continue;
        }
        const double t = gpu ? tg : tc;
        char rate[200] = "";
        if (oc.metric == M_BYTES) {
            const double bw = oc.work / (t * 1e-3);
            int n = snprintf(rate, sizeof rate, "%7.1f GB/s", bw / 1e9);
            if (gpu && cl->hbm > 0)
                n += snprintf(rate + n, sizeof rate - n, "  %5.1f%% of %.2f TB/s datasheet", 100 * bw / cl->hbm,
                              cl->hbm / 1e12);
            if (gpu && cl->copy > 0)
                snprintf(rate + n, sizeof rate - n, ", %5.1f%% of measured copy", 100 * bw / cl->copy);
            tsv("op", oc.name, oc.shape, "GB/s", bw / 1e9);
        } else {
            const double fl = oc.work / (t * 1e-3);
            int n = snprintf(rate, sizeof rate, "%7.2f TFLOP/s", fl / 1e12);
            if (gpu && oc.metric == M_FLOPS_ATT && cl->fp32 > 0)
                n +=
                    snprintf(rate + n, sizeof rate - n, "  %5.1f%% of fp32 %.1f", 100 * fl / cl->fp32, cl->fp32 / 1e12);
            if (gpu && cl->bf16 > 0)
                snprintf(rate + n, sizeof rate - n, "  %5.1f%% of bf16 dense %.0f", 100 * fl / cl->bf16,
                         cl->bf16 / 1e12);
            tsv("op", oc.name, oc.shape, "TFLOP/s", fl / 1e12);
        }
        char speed[32] = "";
        if (gpu && !isnan(tc) && !isnan(tg))
            snprintf(speed, sizeof speed, "%7.1fx", tc / tg);
        printf("  %-14s %-52s %10.3f %10.3f %8s  %s\n", oc.name, oc.shape, tg, tc, speed, rate);
        tsv("op", oc.name, oc.shape, "cuda_ms", tg);
        tsv("op", oc.name, oc.shape, "cpu_ms", tc);
    }
}

/* ---------------------------------------------------------------- end-to-end replay */

static kv_trace_t *synth_llama(int L, int n_prompt, int n_decode, uint64_t seed)
{
    kv_trace_meta_t m;
    memset(&m, 0, sizeof m);
    m.n_layers = L;
    m.n_heads = NH;
    m.n_kv_heads = NKV;
    m.head_dim = HD;
    m.n_tokens = n_prompt + n_decode;
    m.n_prompt = n_prompt;
    m.has_wo = 1;
    m.model_dim = DIM;
    m.dtype = KV_DTYPE_F32;
    int32_t seg[8];
    m.n_segments = 8;
    for (int s = 0; s < 8; s++)
        seg[s] = s * (n_prompt / 8);
    m.segments = seg;
    kv_trace_t *t = NULL;
    if (kv_trace_mem_create(&m, &t) != KV_OK)
        return NULL;
    const int T = m.n_tokens;
    for (int l = 0; l < L; l++) {
        float *q = kv_trace_mem_tensor(t, l, KV_T_Q), *k = kv_trace_mem_tensor(t, l, KV_T_K);
        float *v = kv_trace_mem_tensor(t, l, KV_T_V), *wo = kv_trace_mem_tensor(t, l, KV_T_WO);
        if (!q || !k || !v || !wo) {
            kv_trace_close(t);
            return NULL;
        }
        float dir[HD];
        kv_rng_t r0;
        kv_rng_seed_task(&r0, seed, (uint64_t)l, 0, 0);
        for (int x = 0; x < HD; x++)
            dir[x] = (float)kv_rng_normal(&r0);
            /* every (head, kind) row block draws from its own generator: the same trace whatever the
             * thread count */
#pragma omp parallel for schedule(dynamic, 1)
        for (int h = 0; h < NH + 2 * NKV + 1; h++) {
            kv_rng_t r;
            kv_rng_seed_task(&r, seed, (uint64_t)l, 1 + (uint64_t)h, 0);
            if (h < NH) {
                float *qh = q + (size_t)h * T * HD;
                for (size_t i = 0; i < (size_t)T; i++)
                    for (int x = 0; x < HD; x++)
                        qh[i * HD + x] = (float)(kv_rng_normal(&r) + 0.5 * dir[x]);
            } else if (h < NH + NKV) {
                float *kh = k + (size_t)(h - NH) * T * HD;
                for (size_t j = 0; j < (size_t)T; j++) {
                    double sc = 0.5 + kv_rng_uniform(&r);
                    int heavy = j == 0 || kv_rng_uniform(&r) < 0.02;
                    for (int x = 0; x < HD; x++)
                        kh[j * HD + x] = (float)(sc * kv_rng_normal(&r) + (heavy ? 0.8 * dir[x] : 0));
                }
            } else if (h < NH + 2 * NKV) {
                float *vh = v + (size_t)(h - NH - NKV) * T * HD;
                for (size_t j = 0; j < (size_t)T * HD; j++)
                    vh[j] = (float)kv_rng_normal(&r);
            } else {
                size_t n = kv_tensor_numel(&m, KV_T_WO);
                for (size_t i = 0; i < n; i++)
                    wo[i] = (float)(kv_rng_normal(&r) / 64.0);
            }
        }
    }
    return t;
}

static void run_replay(kv_backend_t *cpu, kv_backend_t *gpu, const opts_t *o)
{
    kv_policy_t **pols = NULL;
    int n_pol = 0, nb = 0;
    kv_budget_t *bud = NULL;
    if (kv_policy_create_list(o->policies, &pols, &n_pol) || kv_budget_parse_list(o->budgets, &bud, &nb)) {
        printf("replay: %s\n", kv_last_error());
        return;
    }
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    printf("\nend-to-end replay: synthetic Llama-3-8B-shape trace (H=%d Hkv=%d d=%d, %d layer%s, %d decode "
           "queries), %d policies x %d budgets (%s)\n",
           NH, NKV, HD, o->layers, o->layers == 1 ? "" : "s", o->decode, n_pol, nb, o->budgets);
    printf("  %-8s %10s %10s %9s %12s %s\n", "tokens", "cpu s", "cuda s", "speed-up", "max|drecall|",
           "(trace built in)");
    for (const char *s = o->tokens; s && *s;) {
        int T = atoi(s);
        const char *e = strchr(s, ',');
        s = e ? e + 1 : NULL;
        if (T < 16)
            continue;
        double t0 = kv_now();
        kv_trace_t *t = synth_llama(o->layers, T, o->decode, 2024);
        double tb = kv_now() - t0;
        if (!t) {
            printf("  %-8d cannot build the trace: %s\n", T, kv_last_error());
            continue;
        }
        kv_replay_opts_t ro;
        kv_replay_defaults(&ro);
        ro.quiet = 1;
        ro.seed = 1;
        ro.head_rows = 0;
        kv_results_t *rc = NULL, *rg = NULL;
        double tc = NAN, tg = NAN;
        /* fresh policies for every trace: a policy's selection buffers are sized by the first trace
         * it sees (sim/select.c reallocates them only when the storage head count changes) */
        if (kv_policy_create_list(o->policies, &pols, &n_pol)) {
            printf("  %-8d %s\n", T, kv_last_error());
            kv_trace_close(t);
            continue;
        }
        if (!o->no_cpu) {
            t0 = kv_now();
            if (kv_replay(t, pols, n_pol, bud, nb, cpu, &ro, &rc) == KV_OK)
                tc = kv_now() - t0;
            else
                printf("  %-8d CPU replay failed: %s\n", T, kv_last_error());
        }
        if (gpu) {
            t0 = kv_now();
            if (kv_replay(t, pols, n_pol, bud, nb, gpu, &ro, &rg) == KV_OK)
                tg = kv_now() - t0;
            else
                printf("  %-8d CUDA replay failed: %s\n", T, kv_last_error());
        }
        double dmax = NAN;
        if (rc && rg && rc->n == rg->n) {
            dmax = 0;
            for (size_t i = 0; i < rc->n; i++)
                dmax = fmax(dmax, fabs(rc->rows[i].recall_mean - rg->rows[i].recall_mean));
        }
        char sp[32] = "";
        if (!isnan(tc) && !isnan(tg))
            snprintf(sp, sizeof sp, "%8.1fx", tc / tg);
        printf("  %-8d %10.2f %10.2f %9s %12.2e (%.1f s)\n", T, tc, tg, sp, dmax, tb);
        char shape[64];
        snprintf(shape, sizeof shape, "T=%d L=%d decode=%d", T, o->layers, o->decode);
        tsv("replay", "all", shape, "cpu_s", tc);
        tsv("replay", "all", shape, "cuda_s", tg);
        kv_results_free(rc);
        kv_results_free(rg);
        kv_trace_close(t);
        for (int i = 0; i < n_pol; i++)
            kv_policy_free(pols[i]);
        kv_free(pols);
        pols = NULL;
    }
    kv_free(bud);
}

/* ---------------------------------------------------------------- main */

static void ceilings(kv_backend_t *gpu, ceil_t *cl)
{
    memset(cl, 0, sizeof *cl);
    kv_cuda_info_t in;
    if (kv_cuda_info(gpu, &in) != KV_OK)
        return;
    printf("device: %s, compute %d.%d, %d SMs, %.1f GiB, L2 %.0f MiB, CUDA runtime %d, driver %d\n", in.name,
           in.cc_major, in.cc_minor, in.sm_count, in.mem_bytes / 1073741824.0, in.l2_bytes / 1048576.0,
           in.runtime_version, in.driver_version);
    for (size_t i = 0; i < KV_ARRAY_LEN(PEAKS); i++)
        if (strstr(in.name, PEAKS[i].match)) {
            cl->bf16 = PEAKS[i].bf16_tflops * 1e12;
            cl->fp32 = PEAKS[i].fp32_tflops * 1e12;
            cl->hbm = PEAKS[i].hbm_tbs * 1e12;
            snprintf(cl->label, sizeof cl->label, "%s datasheet", PEAKS[i].label);
            break;
        }
    if (!cl->hbm && in.mem_clock_khz > 0 && in.bus_width_bits > 0) {
        cl->hbm = 2.0 * in.mem_clock_khz * 1e3 * in.bus_width_bits / 8;
        snprintf(cl->label, sizeof cl->label, "unknown device: bandwidth from clock x bus width, no FLOP peaks");
    }
    printf("peaks used (%s): bf16 dense %.1f TFLOP/s, fp32 non-tensor %.1f TFLOP/s, HBM %.2f TB/s\n",
           cl->label[0] ? cl->label : "unknown device", cl->bf16 / 1e12, cl->fp32 / 1e12, cl->hbm / 1e12);
    if (kv_cuda_copy_ceiling(gpu, (size_t)1 << 30, &cl->copy) == KV_OK)
        printf("measured: device-to-device copy of 1 GiB: %.2f TB/s (read + write)\n", cl->copy / 1e12);
    if (kv_cuda_gemm_ceiling(gpu, 8192, "fp32", &cl->gemm_fp32) == KV_OK)
        printf("measured: cuBLAS 8192^3 fp32: %.1f TFLOP/s\n", cl->gemm_fp32 / 1e12);
    if (kv_cuda_gemm_ceiling(gpu, 8192, "bf16", &cl->gemm_bf16) == KV_OK)
        printf("measured: cuBLAS 8192^3 bf16 (fp32 accumulation): %.1f TFLOP/s\n", cl->gemm_bf16 / 1e12);
    tsv("device", in.name, "", "copy_TB/s", cl->copy / 1e12);
    tsv("device", in.name, "", "gemm_fp32_TFLOP/s", cl->gemm_fp32 / 1e12);
    tsv("device", in.name, "", "gemm_bf16_TFLOP/s", cl->gemm_bf16 / 1e12);
}

static void usage(void)
{
    printf("usage: bench_gpu [--tokens 8192,32768] [--layers 2] [--decode 64] [--op-tokens 8192] [--reps 10]\n"
           "                 [--warmup 2] [--policies all] [--budgets 256,512,1024,2048] [--ops-only | --replay-only]\n"
           "                 [--no-cpu] [--cpu-only] [--out FILE.tsv]\n"
           "--warmup 0 --reps 1 calls each CUDA op exactly once (one launch per kernel for a profiler).\n");
}

int main(int argc, char **argv)
{
    opts_t o = {"8192,32768", 2, 64, 8192, 10, 2, 0, 0, 1, 1, "all", "256,512,1024,2048", NULL};
    setvbuf(stdout, NULL, _IOLBF, 0); /* line by line even into a pipe or file: a crash keeps what ran */
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--tokens") && v)
            o.tokens = argv[++i];
        else if (!strcmp(a, "--layers") && v)
            o.layers = atoi(argv[++i]);
        else if (!strcmp(a, "--decode") && v)
            o.decode = atoi(argv[++i]);
        else if (!strcmp(a, "--op-tokens") && v)
            o.op_tokens = atoi(argv[++i]);
        else if (!strcmp(a, "--reps") && v)
            o.reps = atoi(argv[++i]);
        else if (!strcmp(a, "--warmup") && v)
            o.warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--policies") && v)
            o.policies = argv[++i];
        else if (!strcmp(a, "--budgets") && v)
            o.budgets = argv[++i];
        else if (!strcmp(a, "--out") && v)
            o.out = argv[++i];
        else if (!strcmp(a, "--ops-only"))
            o.replay = 0;
        else if (!strcmp(a, "--replay-only"))
            o.ops = 0;
        else if (!strcmp(a, "--no-cpu"))
            o.no_cpu = 1;
        else if (!strcmp(a, "--cpu-only"))
            o.cpu_only = 1;
        else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        } else {
            usage();
            return 2;
        }
    }
    if (o.layers < 1 || o.decode < 1 || o.op_tokens < 64 || o.reps < 1 || o.warmup < 0) {
        fprintf(stderr, "bench_gpu: --layers, --decode >= 1, --op-tokens >= 64, --reps >= 1, --warmup >= 0\n");
        return 2;
    }
    kv_log_set_level(KV_LOG_QUIET);
    kv_trace_init();
    kv_backend_t *gpu = NULL, *cpu = NULL;
    if (!o.cpu_only) {
        const char *why = kv_cuda_unavailable_reason();
        if (why[0]) {
            printf("CUDA unavailable: %s\n", why);
            printf("bench_gpu: nothing was measured (no GPU here; --cpu-only runs the CPU side alone)\n");
            return 0;
        }
        if (kv_backend_cuda_open(&gpu) != KV_OK) {
            printf("CUDA unavailable: %s\n", kv_last_error());
            return 0;
        }
    } else
        o.no_cpu = 0;
    if (kv_backend_cpu_open(0, &cpu) != KV_OK) {
        fprintf(stderr, "bench_gpu: %s\n", kv_last_error());
        return 2;
    }
    kv_out_t *tsv = NULL; /* the output module: the TSV appears whole when the run ends, or not at all */
    if (o.out && (kv_out_open(o.out, &tsv) != KV_OK || !(g_tsv = kv_out_stream(tsv)))) {
        fprintf(stderr, "bench_gpu: %s\n", kv_last_error());
        kv_out_abort(tsv);
        return 2;
    }
    if (g_tsv)
        fprintf(g_tsv, "# bench_gpu git %s\nsection\tname\tshape\tmetric\tvalue\n", kv_git_revision());
    printf("bench_gpu (git %s): CPU backend [%s]\n", kv_git_revision(), cpu->device);
    ceil_t cl;
    memset(&cl, 0, sizeof cl);
    if (gpu) {
        printf("CUDA backend [%s]\n", gpu->device);
        ceilings(gpu, &cl);
    }
    if (o.ops)
        run_ops(cpu, gpu, &o, &cl);
    if (o.replay)
        run_replay(cpu, gpu, &o);
    int rc = 0;
    if (tsv && kv_out_commit(tsv) != KV_OK) {
        fprintf(stderr, "bench_gpu: %s\n", kv_last_error());
        rc = 1;
    }
    kv_backend_close(gpu);
    kv_backend_close(cpu);
    return rc;
}
