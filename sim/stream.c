/*
 * stream.c: the replay engine's layer stream (see replay_internal.h).
 *
 * A reader failure is kept with its message and handed to the engine at the layer that failed; an
 * engine failure (or the end) stops the reader and joins it before anything is freed. Without
 * prefetch the same calls read each layer on the engine's thread into the first buffer, so the
 * computation, and the results, are the same either way.
 */
#include "sim/replay_internal.h"

#include "sim/common/kv_common.h"

#include <omp.h>
#include <stdio.h>
#include <string.h>

/* The one place replay allocates the host buffers a layer is read into (twice with prefetch). A GPU
 * backend uploads Q and K from them every layer; page-locked (pinned) memory would make those copies
 * faster and asynchronous. kv_backend_ops_t has no host-allocation op yet (its alloc/free are device
 * memory): when one exists (cudaHostAlloc behind it), allocate with it here and free with its
 * counterpart in buf_free. */
static int buf_alloc(kv_layer_buf_t *b, const kv_trace_meta_t *m, const kv_stream_want_t *w)
{
    const size_t nq = (size_t)m->n_heads * (size_t)(m->n_tokens - w->q0) * m->head_dim;
    const size_t nkv = kv_tensor_numel(m, KV_T_K);
    memset(b, 0, sizeof *b);
    b->q = kv_malloc_aligned(nq * sizeof(float), "trace layer buffer");
    b->k = kv_malloc_aligned(nkv * sizeof(float), "trace layer buffer");
    b->v = kv_malloc_aligned(nkv * sizeof(float), "trace layer buffer");
    if (w->wo)
        b->wo = kv_malloc(sizeof(float) * kv_tensor_numel(m, KV_T_WO), "W_O");
    if (!b->q || !b->k || !b->v || (w->wo && !b->wo))
        return KV_ENOMEM;
    for (int c = 0; c < 6; c++)
        if ((c < 3 ? w->col_full : w->col_head) &&
            !(b->col[c] = kv_malloc(sizeof(float) * kv_tensor_numel(m, KV_T_ACC), "stored statistics")))
            return KV_ENOMEM;
    return KV_OK;
}

static void buf_free(kv_layer_buf_t *b)
{
    kv_free_aligned(b->q);
    kv_free_aligned(b->k);
    kv_free_aligned(b->v);
    kv_free(b->wo);
    for (int c = 0; c < 6; c++)
        kv_free(b->col[c]);
    memset(b, 0, sizeof *b);
}

/* Read layer l: queries of tokens [q0, T), K, V and what else is wanted. */
static int read_layer(kv_trace_t *t, const kv_stream_want_t *w, int l, kv_layer_buf_t *b)
{
    const kv_trace_meta_t *m = kv_trace_meta(t);
    int rc = w->q0 == 0 ? kv_trace_read(t, l, KV_T_Q, b->q)
                        : kv_trace_read_rows(t, l, KV_T_Q, w->q0, m->n_tokens - w->q0, b->q);
    if (rc == KV_OK)
        rc = kv_trace_read(t, l, KV_T_K, b->k);
    if (rc == KV_OK)
        rc = kv_trace_read(t, l, KV_T_V, b->v);
    if (rc == KV_OK && w->wo)
        rc = kv_trace_read(t, l, KV_T_WO, b->wo);
    static const kv_tensor_t col[6] = {KV_T_ACC, KV_T_ACC_SQ, KV_T_MAX, KV_T_ACC_HEAD, KV_T_ACC_SQ_HEAD, KV_T_MAX_HEAD};
    for (int c = 0; c < 6 && rc == KV_OK; c++)
        if (b->col[c])
            rc = kv_trace_read(t, l, col[c], b->col[c]);
    return rc;
}

static void *stream_reader(void *arg)
{
    kv_stream_t *s = arg;
    omp_set_num_threads(s->omp_threads); /* a new thread starts from the default */
    for (int i = 0; i < s->n_seq; i++) {
        pthread_mutex_lock(&s->mu);
        while (!s->stop && i - s->consumed >= 2)
            pthread_cond_wait(&s->cv, &s->mu);
        const int stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop)
            break;
        double t0 = kv_now();
        int rc = read_layer(s->t, &s->want, i % s->n_layers, &s->buf[i % 2]);
        pthread_mutex_lock(&s->mu);
        s->t_read += kv_now() - t0;
        s->layers_read++;
        if (rc) {
            s->rc = rc;
            snprintf(s->msg, sizeof s->msg, "%s", kv_last_error());
        } else {
            s->produced = i + 1;
        }
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        if (rc)
            break;
    }
    return NULL;
}

int kv_stream_open(kv_stream_t *s, kv_trace_t *t, const kv_stream_want_t *want, int n_seq, int async)
{
    const kv_trace_meta_t *m = kv_trace_meta(t);
    memset(s, 0, sizeof *s);
    s->t = t;
    s->want = *want;
    s->n_layers = m->n_layers;
    s->n_seq = n_seq;
    s->async = async;
    s->omp_threads = omp_get_max_threads();
    int rc = buf_alloc(&s->buf[0], m, want);
    if (rc == KV_OK && async)
        rc = buf_alloc(&s->buf[1], m, want);
    if (rc || !async)
        return rc;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    int e = pthread_create(&s->th, NULL, stream_reader, s);
    if (e) {
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        return kv_error(KV_EUNAVAIL, "cannot start the layer reader thread: %s", strerror(e));
    }
    s->started = 1;
    return KV_OK;
}

int kv_stream_get(kv_stream_t *s, int i, kv_layer_buf_t **b)
{
    double t0 = kv_now();
    int rc = KV_OK;
    if (!s->async) {
        rc = read_layer(s->t, &s->want, i % s->n_layers, &s->buf[0]);
        s->t_read += kv_now() - t0;
        s->layers_read++;
        *b = &s->buf[0];
    } else {
        pthread_mutex_lock(&s->mu);
        while (s->produced <= i && s->rc == KV_OK)
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->produced <= i)
            rc = kv_error(s->rc, "%s", s->msg);
        pthread_mutex_unlock(&s->mu);
        *b = &s->buf[i % 2];
    }
    s->t_wait += kv_now() - t0;
    return rc;
}

void kv_stream_done(kv_stream_t *s, int i)
{
    if (!s->async)
        return;
    pthread_mutex_lock(&s->mu);
    s->consumed = i + 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

void kv_stream_close(kv_stream_t *s, double *t_read, double *t_wait, long *layers_read)
{
    if (s->started) {
        pthread_mutex_lock(&s->mu);
        s->stop = 1;
        pthread_cond_broadcast(&s->cv);
        pthread_mutex_unlock(&s->mu);
        pthread_join(s->th, NULL);
        pthread_cond_destroy(&s->cv);
        pthread_mutex_destroy(&s->mu);
        s->started = 0;
    }
    if (t_read)
        *t_read += s->t_read;
    if (t_wait)
        *t_wait += s->t_wait;
    if (layers_read)
        *layers_read += s->layers_read;
    buf_free(&s->buf[0]);
    buf_free(&s->buf[1]);
}
