/*
 * kv_zstd_filter.h: the HDF5 zstd filter (registered id 32015), compatible with hdf5plugin and the
 * HDF Group's registered-filter convention, registered in-process so no HDF5_PLUGIN_PATH is needed.
 *
 * Convention: exactly one cd_value, the compression level (1..22); each chunk is one complete zstd
 * frame that records its content size (readers that size their output from the frame header need
 * it). Buffers come from H5allocate_memory/H5free_memory; any zstd error returns 0 (HDF5's failure
 * value for a filter).
 */
#ifndef KV_ZSTD_FILTER_H
#define KV_ZSTD_FILTER_H

#ifdef __cplusplus
extern "C" {
#endif

#define KV_ZSTD_FILTER_ID 32015
#define KV_ZSTD_DEFAULT_LEVEL 3

/* Register the filter with HDF5 (idempotent, thread-safe enough for start-up use). */
int kv_zstd_filter_register(void);
/* 1 when HDF5 reports the filter available for encoding and decoding. */
int kv_zstd_filter_available(void);

#ifdef __cplusplus
}
#endif
#endif
