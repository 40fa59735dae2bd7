/* kv_zstd_filter.c: see kv_zstd_filter.h. Also linked into the optional h5py plugin (zstd_plugin.c).
 * kv_zstd_compress_chunk is the one place that says how a chunk is compressed; the filter and the
 * trace writer's direct chunk writes (trace_hdf5.c) both call it, so both make the same frames. */
#include "traces/kv_zstd_filter.h"

#include "sim/common/kv_common.h"

#include <hdf5.h>
#include <zstd.h>

size_t kv_zstd_compress_chunk(ZSTD_CCtx *cc, int level, void *dst, size_t cap, const void *src, size_t n)
{
    if (level < 1 || level > ZSTD_maxCLevel())
        level = KV_ZSTD_DEFAULT_LEVEL;
    /* compress2 with the default parameters writes the content size into the frame header; the
     * frame also ends with zstd's content checksum (the low 32 bits of XXH64 of the chunk's bytes),
     * which every zstd decoder verifies: a stored chunk that changed is an error, never other
     * values. The parameters are set on every call, so a reused context compresses exactly like a
     * fresh one. */
    if (ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_compressionLevel, level)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_contentSizeFlag, 1)) ||
        ZSTD_isError(ZSTD_CCtx_setParameter(cc, ZSTD_c_checksumFlag, 1)))
        return 0;
    size_t got = ZSTD_compress2(cc, dst, cap, src, n);
    return ZSTD_isError(got) ? 0 : got;
}

static size_t zstd_filter(unsigned int flags, size_t cd_nelmts, const unsigned int cd_values[], size_t nbytes,
                          size_t *buf_size, void **buf)
{
    if (flags & H5Z_FLAG_REVERSE) {
        /* Decompress. The frame header gives the size; frames without one (written by other tools)
         * are decoded by streaming into a growing buffer. */
        unsigned long long size = ZSTD_getFrameContentSize(*buf, nbytes);
        if (size == ZSTD_CONTENTSIZE_ERROR)
            return 0;
        if (size != ZSTD_CONTENTSIZE_UNKNOWN) {
            void *out = H5allocate_memory(size ? size : 1, 0);
            if (!out)
                return 0;
            size_t got = ZSTD_decompress(out, size, *buf, nbytes);
            if (ZSTD_isError(got) || got != size) {
                H5free_memory(out);
                return 0;
            }
            H5free_memory(*buf);
            *buf = out;
            *buf_size = size;
            return got;
        }
        ZSTD_DStream *ds = ZSTD_createDStream();
        size_t cap = nbytes * 4 + 1024, used = 0;
        void *out = H5allocate_memory(cap, 0);
        if (!ds || !out) {
            ZSTD_freeDStream(ds);
            H5free_memory(out);
            return 0;
        }
        ZSTD_inBuffer in = {*buf, nbytes, 0};
        for (;;) {
            ZSTD_outBuffer ob = {(char *)out + used, cap - used, 0};
            size_t r = ZSTD_decompressStream(ds, &ob, &in);
            used += ob.pos;
            if (ZSTD_isError(r)) {
                H5free_memory(out);
                ZSTD_freeDStream(ds);
                return 0;
            }
            if (r == 0 && in.pos == in.size)
                break;
            if (used == cap) {
                void *bigger = H5resize_memory(out, cap * 2);
                if (!bigger) {
                    H5free_memory(out);
                    ZSTD_freeDStream(ds);
                    return 0;
                }
                out = bigger;
                cap *= 2;
            } else if (in.pos == in.size && ob.pos == 0) {
                break; /* truncated frame */
            }
        }
        ZSTD_freeDStream(ds);
        H5free_memory(*buf);
        *buf = out;
        *buf_size = cap;
        return used;
    }
    int level = cd_nelmts >= 1 ? (int)cd_values[0] : KV_ZSTD_DEFAULT_LEVEL;
    size_t cap = ZSTD_compressBound(nbytes);
    void *out = H5allocate_memory(cap, 0);
    ZSTD_CCtx *cc = ZSTD_createCCtx();
    if (!out || !cc) {
        H5free_memory(out);
        ZSTD_freeCCtx(cc);
        return 0;
    }
    size_t got = kv_zstd_compress_chunk(cc, level, out, cap, *buf, nbytes);
    ZSTD_freeCCtx(cc);
    if (got == 0) {
        H5free_memory(out);
        return 0;
    }
    H5free_memory(*buf);
    *buf = out;
    *buf_size = cap;
    return got;
}

const H5Z_class2_t kv_zstd_filter_class = {
    H5Z_CLASS_T_VERS,
    (H5Z_filter_t)KV_ZSTD_FILTER_ID,
    1, /* encoder present */
    1, /* decoder present */
    "zstd",
    NULL,
    NULL,
    (H5Z_func_t)zstd_filter,
};

int kv_zstd_filter_register(void)
{
    if (H5Zfilter_avail(KV_ZSTD_FILTER_ID) > 0)
        return KV_OK;
    if (H5Zregister(&kv_zstd_filter_class) < 0)
        return kv_error(KV_EUNAVAIL, "cannot register the HDF5 zstd filter (id %d)", KV_ZSTD_FILTER_ID);
    return KV_OK;
}

int kv_zstd_filter_available(void)
{
    unsigned int info = 0;
    if (H5Zfilter_avail(KV_ZSTD_FILTER_ID) <= 0)
        return 0;
    if (H5Zget_filter_info(KV_ZSTD_FILTER_ID, &info) < 0)
        return 0;
    return (info & H5Z_FILTER_CONFIG_ENCODE_ENABLED) && (info & H5Z_FILTER_CONFIG_DECODE_ENABLED);
}
