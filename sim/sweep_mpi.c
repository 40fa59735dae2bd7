/*
 * sweep_mpi.c: a sweep run by every rank of an MPI job (`mpirun -n N kvsim sweep MANIFEST`), compiled
 * when the Makefile finds mpicc (sweep_mpi_stub.c otherwise, like CUDA's stub).
 *
 * Dynamic assignment: rank 0 holds the list of samples to do and hands them out one at a time, each
 * to the first rank that asks, so a rank that drew long samples simply asks less often. Rank 0 works
 * too: its main thread is the coordinator (the only thread that calls MPI, so MPI_THREAD_FUNNELED is
 * enough; it polls with MPI_Iprobe and sleeps 2 ms between polls, so it takes no core), and a second
 * thread runs samples, taking them from the same list under a mutex. Every rank writes its units'
 * files into the shared output folder itself (sweep.c: atomic files, per-sample locks), so the output
 * folder must be on a file system every rank sees (the usual /home or /scratch of a cluster). Rank 0
 * reports progress (done, failed, running, time left) and, when every rank has stopped, merges; the
 * merge reads the folder only, so it is the same as a single process's.
 *
 * Threads: with "threads": 0 in the manifest, each rank uses the cores it may run on divided by the
 * ranks on its node (MPI_COMM_TYPE_SHARED), so N ranks on one machine do not oversubscribe it.
 */
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/sweep.h"
#include "sim/sweep_internal.h"

#include <mpi.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

enum { TAG_REQ = 11, TAG_ASSIGN = 12 };

typedef struct {
    pthread_mutex_t mu;
    kv_sweep_t *s;
    const kv_sweep_opts_t *o;
    int *todo, n_todo, next;
    int done, failed, running, ran, ran_failed;
    int abort;              /* a unit could not write its files: hand out nothing more */
    int local_finished;     /* rank 0's worker thread has stopped */
    char local_error[2048]; /* its fatal error */
} shared_t;

int kv_sweep_mpi_available(void)
{
    return 1;
}

/* The next sample to do, or -1. */
static int take(shared_t *sh)
{
    pthread_mutex_lock(&sh->mu);
    int i = -1;
    if (!sh->abort && sh->next < sh->n_todo) {
        i = sh->todo[sh->next++];
        sh->running++;
    }
    pthread_mutex_unlock(&sh->mu);
    return i;
}

static void finished(shared_t *sh, int outcome, int fatal)
{
    pthread_mutex_lock(&sh->mu);
    sh->running--;
    sh->done += outcome == KV_UNIT_DONE;
    sh->failed += outcome == KV_UNIT_FAILED;
    sh->ran += outcome == KV_UNIT_DONE || outcome == KV_UNIT_FAILED;
    sh->ran_failed += outcome == KV_UNIT_FAILED;
    if (fatal)
        sh->abort = 1;
    pthread_mutex_unlock(&sh->mu);
}

static void *local_worker(void *arg)
{
    shared_t *sh = arg;
    for (;;) {
        const int i = take(sh);
        if (i < 0)
            break;
        int outcome = KV_UNIT_SKIPPED;
        const int rc = kv_sweep_unit(sh->s, i, sh->o, &outcome);
        if (rc) {
            pthread_mutex_lock(&sh->mu);
            snprintf(sh->local_error, sizeof sh->local_error, "%s", kv_last_error());
            pthread_mutex_unlock(&sh->mu);
        }
        finished(sh, outcome, rc != KV_OK);
    }
    pthread_mutex_lock(&sh->mu);
    sh->local_finished = 1;
    pthread_mutex_unlock(&sh->mu);
    return NULL;
}

/* Cores this process may run on, shared among the ranks of its node. */
static int threads_per_rank(void)
{
    MPI_Comm node;
    int local = 1;
    if (MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) == MPI_SUCCESS) {
        MPI_Comm_size(node, &local);
        MPI_Comm_free(&node);
    }
    cpu_set_t set;
    int cores = (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        cores = CPU_COUNT(&set);
    const int t = cores / (local > 0 ? local : 1);
    return t > 0 ? t : 1;
}

/* Rank 0: the coordinator loop, until every other rank has been told to stop and the local worker
 * has finished. */
static void coordinate(shared_t *sh, int size, const kv_sweep_summary_t *start)
{
    kv_sweep_progress_t prog;
    kv_sweep_progress_begin(&prog, start, sh->o->quiet);
    int stopped = 0;
    for (;;) {
        int flag = 0;
        MPI_Status st;
        MPI_Iprobe(MPI_ANY_SOURCE, TAG_REQ, MPI_COMM_WORLD, &flag, &st);
        if (flag) {
            int msg[3];
            MPI_Recv(msg, 3, MPI_INT, st.MPI_SOURCE, TAG_REQ, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (msg[0] >= 0)
                finished(sh, msg[1], msg[2]);
            int next = take(sh);
            MPI_Send(&next, 1, MPI_INT, st.MPI_SOURCE, TAG_ASSIGN, MPI_COMM_WORLD);
            stopped += next < 0;
            continue;
        }
        pthread_mutex_lock(&sh->mu);
        const int d = sh->done, f = sh->failed, r = sh->running, ran = sh->ran, lf = sh->local_finished;
        pthread_mutex_unlock(&sh->mu);
        kv_sweep_progress_show(&prog, d, f, r, ran, 0);
        if (stopped == size - 1 && lf)
            break;
        nanosleep(&(struct timespec){0, 2000000}, NULL);
    }
    kv_sweep_progress_show(&prog, sh->done, sh->failed, 0, sh->ran, 1);
}

/* Ranks 1..N-1: ask, do, report, until told to stop. */
static void serve(kv_sweep_t *s, const kv_sweep_opts_t *o)
{
    int msg[3] = {-1, 0, 0};
    for (;;) {
        MPI_Send(msg, 3, MPI_INT, 0, TAG_REQ, MPI_COMM_WORLD);
        int i;
        MPI_Recv(&i, 1, MPI_INT, 0, TAG_ASSIGN, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (i < 0)
            break;
        int outcome = KV_UNIT_SKIPPED;
        const int rc = kv_sweep_unit(s, i, o, &outcome);
        if (rc)
            fprintf(stderr, "kvsim sweep: %s\n", kv_last_error());
        msg[0] = i;
        msg[1] = outcome;
        msg[2] = rc != KV_OK;
    }
}

int kv_sweep_mpi_run(kv_sweep_t *s, const kv_sweep_opts_t *o, kv_sweep_summary_t *sum)
{
    memset(sum, 0, sizeof *sum);
    int inited = 0, provided = 0, rank = 0, size = 1, rc = KV_OK;
    MPI_Initialized(&inited);
    if (!inited && MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
        return kv_error(KV_EUNAVAIL, "MPI_Init_thread failed");
    if (!inited && provided < MPI_THREAD_FUNNELED) {
        MPI_Finalize();
        return kv_error(KV_EUNAVAIL, "this MPI library does not allow threads (MPI_THREAD_FUNNELED)");
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const double t0 = kv_now();
    if (s->threads == 0)
        s->threads = threads_per_rank();
    shared_t sh;
    memset(&sh, 0, sizeof sh);
    pthread_mutex_init(&sh.mu, NULL);
    sh.s = s;
    sh.o = o;
    char err[2048] = "";
    /* rank 0 prepares the folder and the list; the others wait for its verdict */
    int ok = 1;
    kv_sweep_summary_t start;
    memset(&start, 0, sizeof start);
    if (rank == 0) {
        rc = kv_sweep_prepare(s);
        if (rc == KV_OK)
            rc = kv_sweep_todo(s, o, &sh.todo, &sh.n_todo, &start);
        ok = rc == KV_OK;
        if (!ok)
            snprintf(err, sizeof err, "%s", kv_last_error());
    }
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (!ok) {
        if (rank != 0)
            rc = kv_error(KV_EIO, "rank 0 could not start the sweep (see its message)");
        goto finish;
    }
    if (rank == 0) {
        sh.done = start.done;
        sh.failed = start.failed;
        if (!o->quiet)
            kv_info("sweep %s: %d samples: %d finished, %d failed, %d to do, on %d MPI ranks x %d threads -> %s",
                    s->name, start.n_samples, start.done, start.failed, sh.n_todo, size, s->threads, s->output);
        pthread_t th;
        if (pthread_create(&th, NULL, local_worker, &sh) != 0) {
            /* no worker thread: rank 0 only coordinates */
            sh.local_finished = 1;
            coordinate(&sh, size, &start);
        } else {
            coordinate(&sh, size, &start);
            pthread_join(th, NULL);
        }
        sum->n_samples = start.n_samples;
        sum->ran = sh.ran;
        sum->ran_failed = sh.ran_failed;
        if (sh.abort) {
            rc = kv_error(KV_EIO, "%s",
                          sh.local_error[0] ? sh.local_error
                                            : "a rank could not write its results "
                                              "(see its message); the sweep stopped");
            snprintf(err, sizeof err, "%s", kv_last_error());
        }
    } else {
        serve(s, o);
    }
    sum->ranks = size;
    sum->root = rank == 0;
    sum->seconds = kv_now() - t0;
    if (rank == 0 && rc == KV_OK) {
        kv_sweep_summary_t st;
        kv_sweep_status(s, &st);
        sum->done = st.done;
        sum->failed = st.failed;
        sum->missing = st.missing;
        if (o->merge && (st.missing == 0 || o->partial)) {
            rc = kv_sweep_merge(s, o, sum);
            if (rc)
                snprintf(err, sizeof err, "%s", kv_last_error());
        }
    }
    ok = rc == KV_OK;
    MPI_Bcast(&ok, 1, MPI_INT, 0, MPI_COMM_WORLD);
    if (rank != 0 && !ok && rc == KV_OK)
        rc = kv_error(KV_EIO, "rank 0 reported a failure (see its message)");
finish:
    kv_free(sh.todo);
    pthread_mutex_destroy(&sh.mu);
    if (!inited)
        MPI_Finalize();
    if (rank == 0 && rc && err[0])
        kv_error(rc, "%s", err); /* the message, on this thread, for the caller */
    return rc;
}
