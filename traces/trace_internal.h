/* trace_internal.h: the reader vtable shared by the HDF5 and in-memory trace backends. */
#ifndef KV_TRACE_INTERNAL_H
#define KV_TRACE_INTERNAL_H

#include "traces/kv_trace.h"

typedef struct {
    int (*read_rows)(kv_trace_t *t, int layer, kv_tensor_t which, int t0, int nt, float *dst);
    int (*read)(kv_trace_t *t, int layer, kv_tensor_t which, float *dst);
    int (*has)(const kv_trace_t *t, kv_tensor_t which);
    int (*storage)(kv_trace_t *t, uint64_t *raw, uint64_t *stored);
    void (*close)(kv_trace_t *t);
} kv_trace_vt_t;

struct kv_trace {
    const kv_trace_vt_t *vt;
    kv_trace_meta_t meta;
    char path[4096];
    void *impl;
};

int kv_trace_hdf5_open(const char *path, kv_trace_t **out);

#endif
