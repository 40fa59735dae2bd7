/*
 * trace_flip.c: how kvsim's trace reader meets damaged HDF5 metadata (make bench-trace-flip;
 * traces/FORMAT.md, "Integrity", has the figures). Every byte of a trace that is not stored chunk
 * data (superblock, object headers, B-trees and chunk indexes, heaps: found with H5Dget_chunk_info
 * and H5Dget_offset) is set to 0xFF in turn (0xFE where it already is 0xFF), and a child process
 * opens the copy and reads every tensor of every layer. Each byte is counted as: no effect (the
 * same metadata and values as the original), an error (kvsim refused the file), other values
 * without an error (silent), a crash (the child died by a signal) or a hang (no answer in 40 s).
 *
 *   bench_trace_flip TRACE [STEP]    every STEP-th metadata byte (default 1: all of them)
 */
#include "sim/common/kv_common.h"
#include "traces/kv_trace.h"

#include <hdf5.h>
#include <omp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static unsigned long long fnv(const void *p, size_t n, unsigned long long h)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ c[i]) * 1099511628211ULL;
    return h;
}

/* Open and read everything; 0 with a hash of the meta and the values, 1 on an error. */
static int read_all(const char *path, unsigned long long *hash)
{
    kv_trace_t *t;
    if (kv_trace_open(path, &t) != KV_OK)
        return 1;
    const kv_trace_meta_t *m = kv_trace_meta(t);
    unsigned long long h = 1469598103934665603ULL;
    h = fnv(m, offsetof(kv_trace_meta_t, tokens), h);
    h = fnv(m->tokens, sizeof(int32_t) * (size_t)m->n_tokens, h);
    h = fnv(m->positions, sizeof(int32_t) * (size_t)m->n_tokens, h);
    h = fnv(m->source, offsetof(kv_trace_meta_t, meta_sha256) - offsetof(kv_trace_meta_t, source), h);
    int rc = 0;
    for (int l = 0; l < m->n_layers && !rc; l++)
        for (int w = 0; w < KV_T_COUNT && !rc; w++) {
            if (!kv_trace_has(t, (kv_tensor_t)w))
                continue;
            size_t n = kv_tensor_numel(m, (kv_tensor_t)w);
            float *b = malloc(n * sizeof(float) + 4);
            rc = !b || kv_trace_read(t, l, (kv_tensor_t)w, b) != KV_OK;
            if (!rc)
                h = fnv(b, n * sizeof(float), h);
            free(b);
        }
    kv_trace_close(t);
    *hash = h;
    return rc;
}

/* Mark the bytes of every stored chunk (and contiguous dataset) of the file in data[]. */
static herr_t mark(hid_t obj, const char *name, const H5O_info_t *info, void *ctx)
{
    unsigned char *data = ctx;
    if (info->type != H5O_TYPE_DATASET)
        return 0;
    hid_t d = H5Dopen2(obj, name, H5P_DEFAULT), sp = H5Dget_space(d);
    hsize_t n = 0;
    if (H5Dget_num_chunks(d, sp, &n) >= 0 && n > 0) {
        for (hsize_t i = 0; i < n; i++) {
            hsize_t off[8], size = 0;
            unsigned mask;
            haddr_t addr;
            if (H5Dget_chunk_info(d, sp, i, off, &mask, &addr, &size) >= 0)
                memset(data + addr, 1, (size_t)size);
        }
    } else {
        haddr_t addr = H5Dget_offset(d);
        if (addr != HADDR_UNDEF)
            memset(data + addr, 1, (size_t)H5Dget_storage_size(d));
    }
    H5Eclear2(H5E_DEFAULT);
    H5Sclose(sp);
    H5Dclose(d);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_trace_flip TRACE [STEP]\n");
        return 2;
    }
    const char *src = argv[1];
    const long step = argc > 2 ? atol(argv[2]) : 1;
    FILE *f = fopen(src, "rb");
    if (!f || fseek(f, 0, SEEK_END) != 0) {
        fprintf(stderr, "bench_trace_flip: cannot read %s\n", src);
        return 1;
    }
    const long size = ftell(f);
    unsigned char *orig = malloc((size_t)size), *buf = malloc((size_t)size), *data = calloc((size_t)size, 1);
    rewind(f);
    if (fread(orig, 1, (size_t)size, f) != (size_t)size)
        return 1;
    fclose(f);
    kv_trace_init();
    hid_t h5 = H5Fopen(src, H5F_ACC_RDONLY, H5P_DEFAULT);
    H5Ovisit2(h5, H5_INDEX_NAME, H5_ITER_NATIVE, mark, data, H5O_INFO_BASIC);
    H5Fclose(h5);
    unsigned long long h0 = 0;
    if (read_all(src, &h0)) {
        fprintf(stderr, "bench_trace_flip: %s: %s\n", src, kv_last_error());
        return 1;
    }
    char tmp[64];
    snprintf(tmp, sizeof tmp, "/tmp/kvsim-flip-%d.h5", (int)getpid());
    long n_meta = 0, tried = 0, same = 0, err = 0, silent = 0, crash = 0, hang = 0;
    for (long off = 0; off < size; off++) {
        if (data[off] || n_meta++ % step)
            continue;
        memcpy(buf, orig, (size_t)size);
        buf[off] = buf[off] == 0xFF ? 0xFE : 0xFF;
        FILE *g = fopen(tmp, "wb");
        if (!g || fwrite(buf, 1, (size_t)size, g) != (size_t)size || fclose(g) != 0)
            return 1;
        int p[2];
        if (pipe(p) != 0)
            return 1;
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            close(p[0]);
            omp_set_num_threads(1);
            alarm(40);
            unsigned long long hh = 0;
            char c = read_all(tmp, &hh) ? 'E' : hh == h0 ? 'O' : 'S';
            if (write(p[1], &c, 1) != 1)
                _exit(3);
            _exit(0);
        }
        close(p[1]);
        char c = 0;
        if (read(p[0], &c, 1) != 1)
            c = 0;
        close(p[0]);
        int st;
        waitpid(pid, &st, 0);
        tried++;
        if (WIFSIGNALED(st) && WTERMSIG(st) == SIGALRM)
            hang++, printf("hang at byte %ld\n", off);
        else if (WIFSIGNALED(st) || !c)
            crash++, printf("crash at byte %ld\n", off);
        else if (c == 'S')
            silent++, printf("other values at byte %ld\n", off);
        else if (c == 'E')
            err++;
        else
            same++;
        fflush(stdout);
    }
    unlink(tmp);
    printf("%s: %ld of %ld bytes are metadata; %ld set (every %ld): no effect %ld, error %ld, other values %ld, "
           "crash %ld, hang %ld\n",
           src, n_meta, size, tried, step, same, err, silent, crash, hang);
    free(orig);
    free(buf);
    free(data);
    return crash || hang || silent;
}
