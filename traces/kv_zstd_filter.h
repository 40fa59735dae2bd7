/*
 * kv_zstd_filter.h: the HDF5 zstd filter (registered id 32015), compatible with hdf5plugin and the
 * HDF Group's registered-filter convention, registered in-process so no HDF5_PLUGIN_PATH is needed.
 *
 * Convention: exactly one cd_value, the compression level (1..22); each chunk is one complete zstd
 * frame that records its content size (readers that size their output from the frame header need
 * it) and ends with zstd's content checksum (verified by every zstd decoder, hdf5plugin's too). Buffers come from H5allocate_memory/H5free_memory; any zstd error returns 0 (HDF5's failure
 * value for a filter).
 */
#ifndef KV_ZSTD_FILTER_H
#define KV_ZSTD_FILTER_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_ZSTD_FILTER_ID 32015
#define KV_ZSTD_DEFAULT_LEVEL 3

typedef struct ZSTD_CCtx_s ZSTD_CCtx; /* zstd.h's context type (same typedef) */

/* Compress one chunk as the filter does: one zstd frame at `level` (outside 1..max: the default)
 * that records its content size and carries the content checksum. `cc` may be reused from call to call; the frame does not depend on
 * what it compressed before. dst holds cap bytes (ZSTD_compressBound(n) always suffices).
 * Returns the frame's size, 0 on any zstd error. */
size_t kv_zstd_compress_chunk(ZSTD_CCtx *cc, int level, void *dst, size_t cap, const void *src, size_t n);

/* Register the filter with HDF5 (idempotent, thread-safe enough for start-up use). */
int kv_zstd_filter_register(void);
/* 1 when HDF5 reports the filter available for encoding and decoding. */
int kv_zstd_filter_available(void);

#ifdef __cplusplus
}
#endif
#endif
