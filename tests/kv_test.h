/*
 * kv_test.h: helpers shared by the Check suites.
 *
 * Real model data is found, in order, through $KVSIM_SHARED, ../shared (beside the checkout) and
 * ./models; a suite that needs it and finds none says so on stderr and does not register the test
 * (Check has no "skipped").
 */
#ifndef KV_TEST_H
#define KV_TEST_H

#include <check.h>
#include <stddef.h>

/* Path of a file under the shared data folder (e.g. "models/stories260K/stories260K.bin") into buf,
 * or NULL when it is nowhere to be found. */
const char *kv_test_shared(const char *rel, char *buf, size_t len);
/* A fresh path under build/test-tmp/ for a test file named `name` (unique per process). */
const char *kv_test_tmp(const char *name, char *buf, size_t len);
/* Temporary files of the output module (sim/common/kv_output.h) for target `path` left in its
 * folder: names that start with path's base name and end in ".kvsim-tmp". */
int kv_test_temps_of(const char *path);
/* The whole of a file another program wrote (malloc'd, NUL-terminated, *len bytes); fails the test,
 * naming the file, when it cannot be read. */
void *kv_test_read_file(const char *path, size_t *len);
/* Note on stderr that a test was not registered, and why. */
void kv_test_skip(const char *test, const char *why);

struct kv_trace;
/* In-memory trace with seeded Gaussian Q, K, V (keys with varied norms, a few "heavy" keys that
 * every query likes, so selections differ by policy), positions 0..T-1, `n_segments` equal segments
 * over the prompt (0 = none) and a random W_O when with_wo. */
struct kv_trace *kv_test_trace(int L, int H, int Hkv, int d, int T, int n_prompt, int n_segments, int with_wo,
                               unsigned long long seed);

/* Copy any trace into an HDF5 file (f32, with whatever tensors it has). */
int kv_test_write_trace(struct kv_trace *t, const char *path);

/* A stand-in for kvsim's zstd filter (same id, same bytes) that counts how often HDF5 runs it in
 * each direction, so a test can prove which path (kvsim's direct chunk I/O or HDF5's pipeline)
 * moved the data: on = 1 registers it, on = 0 puts kvsim's filter back; both reset the counters. */
extern long kv_test_filter_encodes, kv_test_filter_decodes;
void kv_test_count_filter(int on);

/* Assert |a - b| <= atol + rtol*|b| with a message naming the quantity. */
#define kv_assert_close(a, b, atol, rtol, what)                                                                        \
    do {                                                                                                               \
        double a_ = (a), b_ = (b);                                                                                     \
        ck_assert_msg(fabs(a_ - b_) <= (atol) + (rtol)*fabs(b_), "%s: %.9g vs %.9g (atol %g, rtol %g)", (what), a_,    \
                      b_, (double)(atol), (double)(rtol));                                                             \
    } while (0)

#endif
