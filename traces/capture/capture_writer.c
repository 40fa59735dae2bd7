/*
 * capture_writer.c: the capture's slab writer thread (capture_internal.h).
 *
 * One job slot, guarded by a mutex and a condition variable: the capture thread fills the slot when it
 * is free (acquire waits for the writer to finish the previous job), marks it full (submit); the
 * writer thread takes a full slot, writes it, marks it free. A failure of the writer is kept with its
 * message (messages are per thread) and returned by the next acquire or by finish; later jobs are
 * then skipped. The head-major staging buffer belongs to the writer.
 */
#include "traces/capture/capture_internal.h"

#include "sim/common/kv_common.h"

#include <pthread.h>
#include <stdio.h>
#include <string.h>

struct kv_slab_writer {
    kv_trace_writer_t *w;
    kv_slab_shape_t shape;
    kv_tensor_t col_tensor[KV_SLAB_MAX_COLS];
    kv_slab_job_t job;
    float *hm; /* (n_rows, n_heads * head_dim) head-major staging */
    /* the slot */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th;
    int started, full, quit;
    int layer, t0, n;
    /* outcome */
    int rc;
    char msg[512];
    kv_slab_stats_t st;
};

void kv_to_head_major(const float *src, float *dst, int n, int heads, int d)
{
    for (int t = 0; t < n; t++)
        for (int h = 0; h < heads; h++)
            memcpy(dst + ((size_t)h * n + t) * d, src + ((size_t)t * heads + h) * d, sizeof(float) * (size_t)d);
}

/* Write the job in the slot (any thread, never two at once). */
static int write_job(kv_slab_writer_t *sw)
{
    const kv_slab_shape_t *s = &sw->shape;
    const int d = s->head_dim, n = sw->n;
    int rc = KV_OK;
    for (int k = 0; k < s->n_cols && rc == KV_OK; k++)
        rc = kv_trace_write(sw->w, sw->layer, sw->col_tensor[k], sw->job.col[k]);
    const struct {
        kv_tensor_t which;
        const float *src;
        int heads;
    } t[3] = {{KV_T_Q, sw->job.q, s->n_heads}, {KV_T_K, sw->job.k, s->n_kv_heads}, {KV_T_V, sw->job.v, s->n_kv_heads}};
    for (int i = 0; i < 3 && rc == KV_OK; i++) {
        kv_to_head_major(t[i].src, sw->hm, n, t[i].heads, d);
        rc = kv_trace_write_rows(sw->w, sw->layer, t[i].which, sw->t0, n, sw->hm);
    }
    return rc;
}

/* Run the full slot's job and record its outcome (the mutex is not held). */
static void run_job(kv_slab_writer_t *sw)
{
    const double t0 = kv_now();
    int rc = sw->rc ? KV_OK : write_job(sw); /* after a failure, later jobs are dropped */
    const double el = kv_now() - t0;
    pthread_mutex_lock(&sw->mu);
    sw->st.busy_s += el;
    if (rc && !sw->rc) {
        sw->rc = rc;
        snprintf(sw->msg, sizeof sw->msg, "%s", kv_last_error());
    }
    sw->full = 0;
    pthread_cond_broadcast(&sw->cv);
    pthread_mutex_unlock(&sw->mu);
}

static void *writer_main(void *arg)
{
    kv_slab_writer_t *sw = arg;
    kv_trace_thread_init(); /* HDF5's own error printing off in this thread too */
    for (;;) {
        pthread_mutex_lock(&sw->mu);
        while (!sw->full && !sw->quit)
            pthread_cond_wait(&sw->cv, &sw->mu);
        const int go = sw->full;
        pthread_mutex_unlock(&sw->mu);
        if (!go)
            return NULL;
        run_job(sw);
    }
}

static int failure(kv_slab_writer_t *sw)
{
    return sw->rc ? kv_error(sw->rc, "writing the trace: %s", sw->msg) : KV_OK;
}

int kv_slab_writer_start(kv_trace_writer_t *w, const kv_slab_shape_t *shape, kv_slab_writer_t **out)
{
    *out = NULL;
    if (shape->n_cols < 0 || shape->n_cols > KV_SLAB_MAX_COLS || shape->n_rows <= 0)
        return kv_error(KV_EINVAL, "slab writer: %d statistics, %d rows", shape->n_cols, shape->n_rows);
    kv_slab_writer_t *sw = kv_calloc(1, sizeof *sw, "slab writer");
    if (!sw)
        return KV_ENOMEM;
    sw->w = w;
    sw->shape = *shape;
    for (int k = 0; k < shape->n_cols; k++)
        sw->col_tensor[k] = shape->col_tensor[k];
    sw->shape.col_tensor = sw->col_tensor;
    const size_t rows = (size_t)shape->n_rows, d = (size_t)shape->head_dim;
    const size_t q = rows * (size_t)shape->n_heads * d, kv = rows * (size_t)shape->n_kv_heads * d;
    sw->job.q = kv_malloc(sizeof(float) * q, "query staging");
    sw->job.k = kv_malloc(sizeof(float) * kv, "key staging");
    sw->job.v = kv_malloc(sizeof(float) * kv, "value staging");
    sw->hm = kv_malloc(sizeof(float) * (q > kv ? q : kv), "head-major staging");
    int nomem = !sw->job.q || !sw->job.k || !sw->job.v || !sw->hm;
    for (int k = 0; k < shape->n_cols; k++)
        nomem |= !(sw->job.col[k] = kv_malloc(sizeof(float) * (shape->col_len ? shape->col_len : 1), "statistics"));
    sw->st.bytes = sizeof(float) * (2 * q + 2 * kv + (size_t)shape->n_cols * shape->col_len);
    pthread_mutex_init(&sw->mu, NULL);
    pthread_cond_init(&sw->cv, NULL);
    if (nomem) {
        kv_slab_writer_free(sw);
        return kv_error_context(KV_ENOMEM, "the trace writer's buffers");
    }
    if (shape->threaded && pthread_create(&sw->th, NULL, writer_main, sw) == 0)
        sw->started = 1;
    sw->st.threaded = sw->started;
    *out = sw;
    return KV_OK;
}

int kv_slab_writer_acquire(kv_slab_writer_t *sw, kv_slab_job_t **job)
{
    const double t0 = kv_now();
    pthread_mutex_lock(&sw->mu);
    while (sw->full)
        pthread_cond_wait(&sw->cv, &sw->mu);
    sw->st.wait_s += kv_now() - t0;
    int rc = failure(sw);
    pthread_mutex_unlock(&sw->mu);
    *job = rc ? NULL : &sw->job;
    return rc;
}

int kv_slab_writer_submit(kv_slab_writer_t *sw, int layer, int t0, int n)
{
    if (n > sw->shape.n_rows)
        return kv_error(KV_EINTERNAL, "slab writer: %d rows in a job of %d", n, sw->shape.n_rows);
    pthread_mutex_lock(&sw->mu);
    sw->layer = layer, sw->t0 = t0, sw->n = n;
    sw->full = 1;
    pthread_cond_broadcast(&sw->cv);
    pthread_mutex_unlock(&sw->mu);
    if (sw->started)
        return KV_OK;
    run_job(sw); /* no thread: now, on this one */
    pthread_mutex_lock(&sw->mu);
    int rc = failure(sw);
    pthread_mutex_unlock(&sw->mu);
    return rc;
}

int kv_slab_writer_finish(kv_slab_writer_t *sw)
{
    if (!sw)
        return KV_OK;
    if (sw->started) {
        const double t0 = kv_now();
        pthread_mutex_lock(&sw->mu);
        sw->quit = 1;
        pthread_cond_broadcast(&sw->cv);
        pthread_mutex_unlock(&sw->mu);
        pthread_join(sw->th, NULL); /* the thread drains a full slot before it sees quit */
        sw->started = 0;
        sw->st.wait_s += kv_now() - t0;
    }
    return failure(sw);
}

void kv_slab_writer_stats(const kv_slab_writer_t *sw, kv_slab_stats_t *out)
{
    *out = sw->st;
}

void kv_slab_writer_free(kv_slab_writer_t *sw)
{
    if (!sw)
        return;
    kv_slab_writer_finish(sw);
    pthread_mutex_destroy(&sw->mu);
    pthread_cond_destroy(&sw->cv);
    kv_free(sw->job.q);
    kv_free(sw->job.k);
    kv_free(sw->job.v);
    for (int k = 0; k < KV_SLAB_MAX_COLS; k++)
        kv_free(sw->job.col[k]);
    kv_free(sw->hm);
    kv_free(sw);
}
