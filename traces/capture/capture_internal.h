/*
 * capture_internal.h: the capture's slab writer (capture_writer.c), private to traces/capture/.
 *
 * Writing a layer's prompt slab (Q, K, V made head-major, converted to f16, shuffled and compressed
 * by zstd, written by HDF5) takes as long as a good part of the layer's forward pass. The slab
 * writer does it on a thread of its own while the forward pass computes the next layer: the capture
 * hook fills the one job buffer (acquire: it waits, if need be, until the writer has finished the
 * previous layer), hands it over (submit) and goes on. So memory holds one layer of trace buffers
 * in flight whatever the number of layers, and HDF5 is only ever called by one thread at a time: the
 * writer between the first submit and finish, the capture's own thread before and after.
 */
#ifndef KV_CAPTURE_INTERNAL_H
#define KV_CAPTURE_INTERNAL_H

#include "traces/kv_trace.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_SLAB_MAX_COLS 8

typedef struct kv_slab_writer kv_slab_writer_t;

/* The buffers of one layer's job (host memory, owned by the writer). */
typedef struct {
    float *q;                     /* (n_rows, n_heads * head_dim) token-major queries */
    float *k, *v;                 /* (n_rows, n_kv_heads * head_dim) token-major keys and values */
    float *col[KV_SLAB_MAX_COLS]; /* (col_len) per-key statistics, written whole with kv_trace_write */
} kv_slab_job_t;

typedef struct {
    int n_rows, n_heads, n_kv_heads, head_dim;
    size_t col_len;                /* floats of each per-key statistic */
    int n_cols;                    /* at most KV_SLAB_MAX_COLS */
    const kv_tensor_t *col_tensor; /* (n_cols) the trace tensor of each */
    int threaded;                  /* 0: submit writes at once on the caller's thread */
} kv_slab_shape_t;

typedef struct {
    double busy_s; /* time spent writing jobs */
    double wait_s; /* time acquire and finish waited for the writer */
    size_t bytes;  /* host memory of the job and staging buffers */
    int threaded;  /* a thread did the writing */
} kv_slab_stats_t;

/* Allocate the buffers and start the thread (when it cannot start, jobs are written at submit). */
int kv_slab_writer_start(kv_trace_writer_t *w, const kv_slab_shape_t *shape, kv_slab_writer_t **out);
/* The job buffers for the next layer, once the previous job is written; its failure is returned. */
int kv_slab_writer_acquire(kv_slab_writer_t *sw, kv_slab_job_t **job);
/* Write the acquired job: rows [t0, t0 + n) of layer `layer` (n <= n_rows) and the statistics. */
int kv_slab_writer_submit(kv_slab_writer_t *sw, int layer, int t0, int n);
/* Wait for the last job and stop the thread; its status. HDF5 is the caller's again afterwards. */
int kv_slab_writer_finish(kv_slab_writer_t *sw);
void kv_slab_writer_stats(const kv_slab_writer_t *sw, kv_slab_stats_t *out);
/* Finish (ignoring its status) and free; accepts NULL. */
void kv_slab_writer_free(kv_slab_writer_t *sw);

/* (n, heads, d) -> (heads, n, d) */
void kv_to_head_major(const float *src, float *dst, int n, int heads, int d);

#ifdef __cplusplus
}
#endif
#endif
