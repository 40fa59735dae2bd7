/*
 * replay_internal.h: the replay engine's own pieces, shared by sim/replay.c (the engine),
 * sim/stream.c (layer streaming) and sim/aggregate.c (result rows from the samples). Nothing
 * outside sim/ includes this header.
 */
#ifndef KV_REPLAY_INTERNAL_H
#define KV_REPLAY_INTERNAL_H

#include "sim/kv_policy.h"
#include "sim/layer_stats.h"
#include "sim/result.h"
#include "traces/kv_trace.h"

#include <pthread.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ================================================================ layer streaming (stream.c)
 *
 * The engine reads the layers in a fixed sequence (0..L-1, twice with a cross-layer pre-pass). With
 * prefetch, one reader thread walks that sequence ahead of the engine: it reads and decompresses
 * layer i+1 into the second of two layer buffers while the engine computes on layer i, and waits
 * while both buffers are in use. The reader owns every HDF5 call while it runs (libhdf5 here is the
 * serial build: one thread at a time), the engine only takes filled buffers and gives them back. */

/* What a layer read brings in besides K and V. */
typedef struct {
    int q0;       /* first token whose query is read (queries of tokens [q0, T)) */
    int wo;       /* W_O, when the trace has it */
    int col_full; /* the stored per-key statistics over the prompt: ACC, ACC_SQ, MAX */
    int col_head; /* the stored per-key statistics over the prompt queries [0, stats_split) */
} kv_stream_want_t;

typedef struct {
    float *q;      /* (H, T - q0, d) queries of tokens [q0, T) */
    float *k, *v;  /* (Hkv, T, d) */
    float *wo;     /* (model_dim, H*d), when wanted */
    float *col[6]; /* (H, T) each, when wanted: ACC, ACC_SQ, MAX, then ACC_HEAD, ACC_SQ_HEAD, MAX_HEAD */
} kv_layer_buf_t;

typedef struct {
    kv_trace_t *t;
    kv_stream_want_t want;
    int n_layers, n_seq; /* layer i of the sequence is i % n_layers */
    int async;           /* a reader thread (prefetch) */
    int omp_threads;     /* the engine's OpenMP thread count, for the reader's decoding */
    kv_layer_buf_t buf[2];
    pthread_t th;
    int started;
    pthread_mutex_t mu; /* guards what follows */
    pthread_cond_t cv;
    int produced;   /* layers of the sequence read so far */
    int consumed;   /* layers the engine gave back */
    int stop;       /* the engine asks the reader to stop */
    int rc;         /* the reader's failure (at layer `produced` of the sequence) */
    char msg[1024]; /* its message (kv_error's messages are per thread) */
    double t_read;  /* seconds the reader spent reading */
    double t_wait;  /* seconds the engine waited for layers */
    long layers_read;
} kv_stream_t;

/* Open a stream of n_seq layer reads; async: with a reader thread. */
int kv_stream_open(kv_stream_t *s, kv_trace_t *t, const kv_stream_want_t *want, int n_seq, int async);
/* Layer i of the sequence: *b gets its buffer, which stays the engine's until kv_stream_done(s, i). */
int kv_stream_get(kv_stream_t *s, int i, kv_layer_buf_t **b);
void kv_stream_done(kv_stream_t *s, int i);
/* Stop and join the reader (it finishes the layer it is reading), free the buffers; the reading
 * times are added to *t_read, *t_wait and *layers_read when those are not NULL. */
void kv_stream_close(kv_stream_t *s, double *t_read, double *t_wait, long *layers_read);

/* ================================================================ samples and rows (aggregate.c) */

/* Everything measured for one (policy, budget) pair, over all layers. */
typedef struct {
    int L, H, E, S;               /* layers, query heads, evaluation queries, storage heads */
    float *rec, *err, *bnd;       /* (L, H, E) */
    float *wo_err, *wo_bnd;       /* (L, E) */
    double *kept, *cmean, *cpeak; /* (L, H) */
    long *viol;                   /* (L, H) */
    double *mem;                  /* (L, S) bytes per storage head */
    double *meta;                 /* (L) */
    const long *nf_q, *nf_kv;     /* (L, H), (L, H / G): NaN and inf in the layers' Q and in K/V; shared by
                                     every pair, not owned; NULL: none counted */
} kv_samples_t;

int kv_samples_alloc(kv_samples_t *g, int L, int H, int E, int S);
void kv_samples_free(kv_samples_t *g);

/* Rows emitted per (policy, budget): the overall row, then per layer a layer row and its head rows. */
size_t kv_rows_per_cfg(int L, int H, int head_rows);

/* The rows of one (policy, budget) into out[0, kv_rows_per_cfg) in emission order. Pure: the pairs
 * are aggregated in parallel (finding the quantiles takes a while) and appended to the results in
 * configuration order afterwards. p gives the granularity (memory per query head). */
int kv_emit_rows(const kv_samples_t *g, const kv_policy_t *p, int pi, int bi, int budget_tokens, int G, int has_wo,
                 int head_rows, kv_result_row_t *out);

#ifdef __cplusplus
}
#endif
#endif
