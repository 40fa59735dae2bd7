/*
 * kv_gguf.h: reading llama.cpp's GGUF files (versions 2 and 3): metadata, tensor directory and the
 * dequantisation of ggml's tensor types. Used by the GGUF model loader (model_gguf.c) and the GGUF
 * tokenizer (tokenizer family).
 *
 * File layout (little-endian): magic "GGUF", uint32 version, uint64 tensor count, uint64 metadata
 * count; metadata entries (string key, uint32 value type, value); tensor infos (string name, uint32
 * n_dims, uint64 ne[n_dims], uint32 ggml type, uint64 offset); padding to the alignment
 * (general.alignment, default 32); tensor data, each tensor at data start + offset. A string is a
 * uint64 length and that many bytes (no NUL). ne[0] is the innermost (contiguous) dimension: a
 * weight matrix W[out][in] has ne[0] = in, ne[1] = out.
 *
 * The file is untrusted: every count, length, offset and alignment is bounds-checked against the
 * mapped file before use, and a malformed file is an error naming the file and the problem. The
 * file stays mapped read-only while the handle is open; strings and tensor data point into it.
 */
#ifndef KV_GGUF_H
#define KV_GGUF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Metadata value types, as numbered in the format. */
enum {
    KV_GGUF_UINT8 = 0,
    KV_GGUF_INT8 = 1,
    KV_GGUF_UINT16 = 2,
    KV_GGUF_INT16 = 3,
    KV_GGUF_UINT32 = 4,
    KV_GGUF_INT32 = 5,
    KV_GGUF_FLOAT32 = 6,
    KV_GGUF_BOOL = 7,
    KV_GGUF_STRING = 8,
    KV_GGUF_ARRAY = 9,
    KV_GGUF_UINT64 = 10,
    KV_GGUF_INT64 = 11,
    KV_GGUF_FLOAT64 = 12,
};

/* ggml tensor types (ggml.h numbering) that kvsim dequantises; others are refused by name. */
enum {
    KV_GGML_F32 = 0,
    KV_GGML_F16 = 1,
    KV_GGML_Q4_0 = 2,
    KV_GGML_Q4_1 = 3,
    KV_GGML_Q5_0 = 6,
    KV_GGML_Q5_1 = 7,
    KV_GGML_Q8_0 = 8,
    KV_GGML_Q4_K = 12,
    KV_GGML_Q5_K = 13,
    KV_GGML_Q6_K = 14,
    KV_GGML_BF16 = 30,
};

typedef struct kv_gguf kv_gguf_t;

typedef struct {
    const char *name;          /* NUL-terminated (owned by the handle) */
    int type;                  /* ggml type */
    int n_dims;                /* 1..4 */
    uint64_t ne[4];            /* ne[0] innermost; unused dimensions are 1 */
    uint64_t n_elements;       /* product of ne */
    uint64_t n_bytes;          /* stored size */
    const unsigned char *data; /* inside the mapping, n_bytes long */
} kv_gguf_tensor_t;

/* Map and parse `path`; the whole directory is validated (types known or named, sizes and offsets
 * inside the file, tensors not overlapping, names unique). Tensors of a type kvsim cannot
 * dequantise are listed (type name from kv_gguf_type_name, or "type N") and only refused when
 * dequantised. */
int kv_gguf_open(const char *path, kv_gguf_t **out);
void kv_gguf_close(kv_gguf_t *g); /* accepts NULL */
const char *kv_gguf_path(const kv_gguf_t *g);
int kv_gguf_version(const kv_gguf_t *g);
/* The mapped file (read-only, *len bytes): every string and tensor the getters return lies inside
 * it (the fuzz harness checks that). */
const unsigned char *kv_gguf_mapping(const kv_gguf_t *g, size_t *len);
/* Hand the mapping to the caller, who munmaps it (after kv_gguf_close, which then leaves it): the
 * model loader keeps the tensor data mapped while the model lives. */
void kv_gguf_give_mapping(kv_gguf_t *g, void **map, size_t *len);

/* ---- metadata ----
 * Getters return KV_OK, KV_EUNAVAIL when the key is absent (no message recorded, so callers can
 * apply a default), or KV_EFORMAT with a message naming the file, the key, and the type found when
 * the value has another type. Integer getters accept every integer type (and range-check into
 * int64); float getters accept FLOAT32, FLOAT64 and integers. */
int kv_gguf_n_kv(const kv_gguf_t *g);
const char *kv_gguf_key(const kv_gguf_t *g, int i);    /* NUL-terminated */
int kv_gguf_kv_type(const kv_gguf_t *g, int i);        /* KV_GGUF_* */
int kv_gguf_find(const kv_gguf_t *g, const char *key); /* index or -1 */
int kv_gguf_get_int(const kv_gguf_t *g, const char *key, int64_t *out);
int kv_gguf_get_float(const kv_gguf_t *g, const char *key, double *out);
int kv_gguf_get_bool(const kv_gguf_t *g, const char *key, int *out);
/* String value: *s points into the file, *len bytes, not NUL-terminated. */
int kv_gguf_get_str(const kv_gguf_t *g, const char *key, const char **s, size_t *len);
/* Array value: its element type and count. Nested arrays are refused at open. */
int kv_gguf_get_arr(const kv_gguf_t *g, const char *key, int *elem_type, uint64_t *n);
/* Element i of an array (O(1); i < n is checked): strings point into the file. */
int kv_gguf_arr_str(const kv_gguf_t *g, const char *key, uint64_t i, const char **s, size_t *len);
int kv_gguf_arr_int(const kv_gguf_t *g, const char *key, uint64_t i, int64_t *out);
int kv_gguf_arr_float(const kv_gguf_t *g, const char *key, uint64_t i, double *out);

/* ---- tensors ---- */
int kv_gguf_n_tensors(const kv_gguf_t *g);
const kv_gguf_tensor_t *kv_gguf_tensor(const kv_gguf_t *g, int i);
const kv_gguf_tensor_t *kv_gguf_find_tensor(const kv_gguf_t *g, const char *name); /* NULL when absent */

/* "Q4_K", "F16", ... for every type ggml defines (NULL for an unknown number); whether kvsim can
 * dequantise it; elements per block and bytes per block: known for every type whose layout ggml
 * defines, dequantised by kvsim or not (the directory of a file holding Q2_K tensors is validated
 * with them); 0 and KV_EUNAVAIL for unknown numbers and layouts ggml removed (Q4_0_4_4, ...). */
const char *kv_gguf_type_name(int type);
int kv_gguf_type_supported(int type);
int kv_gguf_type_block(int type, int *block_elems, int *block_bytes);

/* Dequantise n elements (a multiple of the type's block) of `src` to fp32, exactly as ggml's
 * dequantize_row_* defines each block layout. KV_EFORMAT naming the type when it is not supported. */
int kv_gguf_dequant(int type, const void *src, uint64_t n, float *dst);

#ifdef __cplusplus
}
#endif
#endif
