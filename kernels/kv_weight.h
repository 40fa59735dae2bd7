/*
 * kv_weight.h: a weight matrix as its checkpoint stores it (fp32, fp16, bf16 or one of ggml's block
 * quantisations), described where it lies (a memory-mapped file, or backend memory), and its
 * conversion to fp32 a few rows at a time.
 *
 * Capture keeps every weight in its stored precision (an 8B model in bf16 is 16 GB mapped, not
 * 32 GB of fp32): the backend's matmul_w op (kv_backend.h) converts tiles of rows into a reused
 * fp32 buffer and multiplies them with fp32 BLAS, so the numbers are those of the same weights
 * converted to fp32 at load, to the bit (every conversion here is exact or, for the quantised
 * types, the very operations ggml's dequantize_row_* performs, in the same order).
 *
 * Types carry ggml's numbers (ggml.h's enum ggml_type), so a GGUF tensor's type is its descriptor's
 * type; KV_WT_Q8_GROUPS is llama2.c's version-2 int8 format (one fp32 scale per group of `group`
 * consecutive values of the whole matrix, the groups free to straddle rows). Block layouts are
 * documented in traces/capture/gguf.c, which reads GGUF files and calls kv_weight_dequant.
 *
 * Row order: `perm` > 0 says the stored rows of each head of `perm` rows are in rotate_half order
 * (Hugging Face's q_proj/k_proj, GGUF qwen2's attn_q/attn_k) while the forward pass wants the
 * interleaved order: logical row 2i + j of a head is stored row j * perm/2 + i (kv_weight_row).
 *
 * Data may sit at any byte offset (safetensors tensors follow a header of any length): every read
 * is an unaligned load. The host must be little-endian, as the file formats are.
 */
#ifndef KV_WEIGHT_H
#define KV_WEIGHT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ggml's type numbers for the stored formats kvsim converts, plus llama2.c's grouped int8. */
enum {
    KV_WT_F32 = 0,
    KV_WT_F16 = 1,
    KV_WT_Q4_0 = 2,
    KV_WT_Q4_1 = 3,
    KV_WT_Q5_0 = 6,
    KV_WT_Q5_1 = 7,
    KV_WT_Q8_0 = 8,
    KV_WT_Q4_K = 12,
    KV_WT_Q5_K = 13,
    KV_WT_Q6_K = 14,
    KV_WT_BF16 = 30,
    KV_WT_Q8_GROUPS = 64, /* llama2.c version 2: int8 values, then (elsewhere) one fp32 scale per group */
};

typedef struct {
    const void *data;   /* stored row-major (rows, cols), host or backend memory; NULL: no weight */
    int type;           /* KV_WT_* */
    int rows, cols;     /* W[out][in]: rows = outputs, cols = inputs */
    size_t row_bytes;   /* bytes of one stored row (cols / block elements x block bytes) */
    int perm;           /* 0, or the head_dim of rotate_half-ordered rows (top of file) */
    const void *scales; /* KV_WT_Q8_GROUPS: the fp32 scales of the matrix (any alignment) */
    int group;          /* KV_WT_Q8_GROUPS: values per scale */
} kv_weight_t;

/* A weight of fp32 rows at `data` (rows x cols, row stride cols). */
kv_weight_t kv_weight_f32(const float *data, int rows, int cols);

/* "BF16", "Q4_1", ... ; NULL for a type kvsim does not convert. */
const char *kv_weight_type_name(int type);
/* Elements and bytes per block (1 and the element size for F32/F16/BF16); KV_EUNAVAIL with a message
 * naming the type for any other (and for KV_WT_Q8_GROUPS, whose row size depends on the matrix). */
int kv_weight_type_block(int type, int *block_elems, int *block_bytes);

/* Fill in row_bytes from type and cols; KV_EFORMAT when cols is not a whole number of blocks (the
 * message names `what`). For KV_WT_Q8_GROUPS, row_bytes = cols. */
int kv_weight_set_layout(kv_weight_t *w, const char *what);

/* The stored row that holds logical row r (r itself unless perm > 0). */
static inline int kv_weight_row(const kv_weight_t *w, int r)
{
    if (w->perm <= 0)
        return r;
    const int d = w->perm, h = r / d, i = r % d;
    return h * d + (i % 2) * (d / 2) + i / 2;
}

/* Bytes of the stored matrix (rows x row_bytes; scales not counted). */
size_t kv_weight_bytes(const kv_weight_t *w);

/* 1 when the matrix is fp32 rows in their logical order at a 4-byte aligned address: BLAS can read it
 * in place (no conversion). */
int kv_weight_is_plain_f32(const kv_weight_t *w);

/* Logical rows [r0, r0 + n) to fp32: dst (n, cols), row stride cols. The data must be host memory.
 * Rows are independent, so callers may convert disjoint ranges on several threads. */
void kv_weight_rows(const kv_weight_t *w, int r0, int n, float *dst);

/* n elements (a whole number of the type's blocks) of a stored ggml tensor to fp32, block by block
 * as ggml's dequantize_row_* defines each layout; KV_EFORMAT naming the type for one kvsim does not
 * convert (KV_WT_Q8_GROUPS included: it needs its scales). Single-threaded. */
int kv_weight_dequant(int type, const void *src, uint64_t n, float *dst);

/* 1 when the CPU converts halves in hardware (F16C and AVX): x86-64 only. */
int kv_have_f16c(void);
/* IEEE half to float, exact (the hardware instruction where the CPU has it). */
float kv_half_to_float(uint16_t h);
void kv_half_to_float_n(const void *src, float *dst, size_t n); /* src: n halves at any alignment */

#ifdef __cplusplus
}
#endif
#endif
