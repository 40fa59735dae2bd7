/*
 * sweep.h: a benchmark of many prompts (a "sweep"): every sample of a dataset is captured with one
 * model, replayed with the same policies x budgets, and the results are merged into one table and
 * aggregated over the samples (mean and a percentile bootstrap interval per policy x budget).
 *
 * The manifest (JSON, README "Sweeps and clusters") names the model, the dataset (a LongBench-shaped
 * JSONL file: one object per line with a context, an optional question and optional answers; or a
 * folder of .txt files), the policies and budgets, capture and replay options and the output folder.
 * Relative paths in it are relative to the manifest's own folder.
 *
 * The unit of work is one sample. A unit is finished when OUT/samples/ID.tsv exists: that file is
 * written last, to a temporary name, fsync'ed and renamed, so it is either complete or absent; its
 * trace (OUT/traces/ID.h5) and the optional per-sample statistics written before it are complete
 * under their names too. A failed unit leaves OUT/samples/ID.failed with its error instead. Every
 * process that works on a unit holds an flock on OUT/samples/ID.lock, so two runs on one folder
 * never do the same unit at once, and a sweep killed at any moment resumes where it stopped: it skips
 * finished and failed units (--retry-failed redoes the failed ones) and removes what an earlier run
 * left half-written of the unit it starts. OUT/sweep.json records the manifest's settings that
 * decide the results; a run whose manifest differs there is refused, so units of two configurations
 * never mix.
 *
 * The merge reads the finished units in dataset order and writes OUT/results.tsv (the replay
 * columns after a `sample` column), OUT/aggregate.tsv and OUT/failed.tsv. Nothing in them depends on
 * which process did which unit, when, or how many processes there were: one process, MPI ranks
 * (sweep_mpi.c: dynamic assignment, rank 0 merges) and Slurm array tasks (kv_sweep_write_slurm, then
 * a merge) give the same bytes.
 */
#ifndef KV_SWEEP_H
#define KV_SWEEP_H

#include "kernels/kv_backend.h"
#include "traces/kv_trace.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_sweep kv_sweep_t;

/* Called after a sample's trace is captured (or found complete from an earlier run) and before its
 * results are written: prefix is "OUT/samples/ID", for the hook's own per-sample files (written
 * atomically; analyze writes PREFIX.funnel.tsv). A non-zero return fails the sample. */
typedef int (*kv_sweep_trace_fn)(void *ctx, const char *sample_id, kv_trace_t *t, kv_backend_t *be, const char *prefix);

typedef struct {
    int retry_failed;     /* redo the samples recorded as failed (default: skip them) */
    int slice_k, slice_n; /* only samples i with i % slice_n == slice_k (slice_n 0: every sample) */
    int merge;            /* 1 (default): merge when the run has finished every sample of the dataset */
    int partial;          /* merge even when samples are missing (they are listed in failed.tsv) */
    int quiet;            /* no progress on stderr */
    int verbose;          /* the progress lines of capture and replay too (default: the sweep's only) */
    kv_sweep_trace_fn on_trace;
    void *on_trace_ctx;
} kv_sweep_opts_t;

void kv_sweep_opts_init(kv_sweep_opts_t *o);

/* Where a sweep stands (kv_sweep_status, and after kv_sweep_run / kv_sweep_merge). */
typedef struct {
    int n_samples;       /* in the dataset (after "limit") */
    int done;            /* finished units */
    int failed;          /* units recorded as failed */
    int missing;         /* neither */
    int ran, ran_failed; /* units this run did (of them failed) */
    int ranks;           /* processes that worked (MPI ranks; 1 otherwise) */
    int root;            /* 1 in the process that merged (MPI rank 0, or the only process) */
    int merged;          /* 1 when results.tsv and the others were written */
    double seconds;      /* wall time of the run */
} kv_sweep_summary_t;

/* Read and check a manifest and its dataset. output: overrides the manifest's "output" (NULL: the
 * manifest's, relative to its folder). Errors name the file and the key ("m.json: capture.decode:
 * expected an integer in [0, 1048576], got \"x\""), or the dataset file and line. Nothing is
 * written. */
int kv_sweep_load(const char *manifest, const char *output, kv_sweep_t **out);
void kv_sweep_free(kv_sweep_t *s);

int kv_sweep_n_samples(const kv_sweep_t *s);
const char *kv_sweep_sample_id(const kv_sweep_t *s, int i);
/* The prompt of sample i, as captured (the template filled in). */
const char *kv_sweep_sample_prompt(const kv_sweep_t *s, int i);
const char *kv_sweep_output(const kv_sweep_t *s);
const char *kv_sweep_name(const kv_sweep_t *s);
/* The manifest's "analyze" settings: per-sample funnel statistics, figures over the dataset and
 * their format; bootstrap resamples, seed and confidence. */
void kv_sweep_analyze_settings(const kv_sweep_t *s, int *funnel, int *figures, const char **format);
void kv_sweep_bootstrap_settings(const kv_sweep_t *s, int *resamples, uint64_t *seed, double *confidence);

/* Create the output folders and record (or check) OUT/sweep.json. */
int kv_sweep_prepare(kv_sweep_t *s);

/* Run the sweep in this process, or, when started by mpirun (and built with MPI), with every rank:
 * samples are handed out one at a time as ranks become free, rank 0 merges. Then merge (opts->merge)
 * when no sample is missing. A sample that fails is recorded and the run goes on; the return value
 * is KV_OK unless the sweep itself could not run (a folder that cannot be written, a merge error). */
int kv_sweep_run(kv_sweep_t *s, const kv_sweep_opts_t *o, kv_sweep_summary_t *sum);

/* Counts of finished, failed and missing samples, from the output folder. */
int kv_sweep_status(kv_sweep_t *s, kv_sweep_summary_t *sum);
/* The ids of the finished samples in dataset order (pointers into s; kv_free the array). */
int kv_sweep_done_ids(kv_sweep_t *s, const char ***ids, int *n);

/* Merge the finished samples: OUT/results.tsv, OUT/aggregate.tsv, OUT/failed.tsv. Missing samples
 * are an error naming them unless o->partial. */
int kv_sweep_merge(kv_sweep_t *s, const kv_sweep_opts_t *o, kv_sweep_summary_t *sum);

/* Write OUT/slurm/sweep.sbatch: a job array of `tasks` tasks (0: the manifest's slurm.tasks), task
 * k running `kvsim sweep --slice k/tasks MANIFEST` with the absolute paths of the kvsim binary and the
 * manifest; path gets the script's name. Then `kvsim sweep --merge MANIFEST` merges the slices. */
int kv_sweep_write_slurm(kv_sweep_t *s, const char *kvsim_exe, int tasks, char *path, size_t len);

/* Launched by an MPI launcher (mpirun, mpiexec, srun with PMI/PMIx): 1 and *size the number of
 * processes, else 0. Looks at the launchers' environment variables only. */
int kv_sweep_mpi_launched(int *size);
/* 1 when this kvsim was built with MPI. */
int kv_sweep_mpi_available(void);

/* Mean of the finite values of x and its percentile bootstrap interval at `confidence` (0.95: the
 * 2.5 % and 97.5 % quantiles, interpolated linearly between order statistics as numpy's default, of
 * `resamples` means of n draws with replacement from the seeded generator kv_rng_seed(seed)). NaN
 * values are left out; none left gives NaN; one value gives lo = hi = it. Deterministic. */
int kv_bootstrap_mean(const double *x, int n, int resamples, uint64_t seed, double confidence, double *mean, double *lo,
                      double *hi);

/* Atomic small-file write for the sweep's files and its hooks: a temporary name beside path, fsync,
 * rename, fsync of the folder. */
int kv_sweep_write_file(const char *path, const char *data, size_t len);

#ifdef __cplusplus
}
#endif
#endif
