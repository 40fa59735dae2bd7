/*
 * sweep_internal.h: what sweep.c shares with sweep_mpi.c (and its stub): the parsed manifest, the
 * list of units to do, one unit, and the progress line.
 */
#ifndef KV_SWEEP_INTERNAL_H
#define KV_SWEEP_INTERNAL_H

#include "sim/sweep.h"
#include "traces/kv_trace.h"

#include <stdint.h>

#define KV_SWEEP_PATH 4096

struct kv_sweep {
    char manifest[KV_SWEEP_PATH]; /* absolute */
    char dir[KV_SWEEP_PATH];      /* the manifest's folder: relative paths start here */
    char name[128];
    char model[KV_SWEEP_PATH], tokenizer[KV_SWEEP_PATH]; /* resolved; tokenizer "" = the model's own */
    char model_text[KV_SWEEP_PATH], tokenizer_text[KV_SWEEP_PATH], dataset_text[KV_SWEEP_PATH]; /* as written */
    char dataset[KV_SWEEP_PATH];
    int dataset_dir;                                           /* 1: a folder of .txt files */
    char *context_key, *question_key, *id_key, *template_text; /* template NULL: the default */
    long limit;
    char *policies, *budgets; /* comma lists as kvsim replay takes them */
    /* capture */
    int decode, with_wo, chat, pool, zstd_level;
    kv_dtype_t dtype;
    char segments[256];
    char *system;
    /* replay */
    int eval_tail, head_rows;
    uint64_t seed;
    char backend[32];
    int threads;
    char output[KV_SWEEP_PATH];
    int keep_traces;
    int funnel, figures;
    char format[8];
    int resamples;
    uint64_t boot_seed;
    double confidence;
    int slurm_tasks, slurm_cpus;
    char slurm_time[64], slurm_partition[128];
    char **slurm_options, **slurm_setup;
    int n_slurm_options, n_slurm_setup;
    char *fingerprint; /* JSON text of the settings that decide the results */
    /* the samples, in dataset order */
    int n;
    char **ids, **prompts;
    /* per process */
    kv_backend_t *be;
    int warned_nolock;
};

/* What one unit came to. */
enum { KV_UNIT_DONE = 0, KV_UNIT_FAILED = 1, KV_UNIT_SKIPPED = 2, KV_UNIT_BUSY = 3 };

/* The samples this process should run (in dataset order, within o's slice; finished ones and, unless
 * o->retry_failed, failed ones left out) into *todo (kv_free); sum gets the folder's counts. */
int kv_sweep_todo(kv_sweep_t *s, const kv_sweep_opts_t *o, int **todo, int *n_todo, kv_sweep_summary_t *sum);
/* Do sample i: capture, the on_trace hook, replay, OUT/samples/ID.tsv; a failure is recorded in
 * OUT/samples/ID.failed and reported as KV_UNIT_FAILED (the return value is then still KV_OK).
 * A non-KV_OK return means the sweep cannot go on (the output folder cannot be written). */
int kv_sweep_unit(kv_sweep_t *s, int i, const kv_sweep_opts_t *o, int *outcome);

/* The progress line: "sweep: 12/20 done, 1 failed, 2 running, 5 to go; 42 s, about 18 s left". */
typedef struct {
    double t0, last;
    int total, done0, failed0, tty, quiet, shown;
} kv_sweep_progress_t;
void kv_sweep_progress_begin(kv_sweep_progress_t *p, const kv_sweep_summary_t *start, int quiet);
/* done, failed: totals in the folder now; ran: units finished by this run (for the rate). final: the
 * last line (always printed unless quiet). */
void kv_sweep_progress_show(kv_sweep_progress_t *p, int done, int failed, int running, int ran, int final);

/* The MPI run (sweep_mpi.c), or KV_EUNAVAIL from the stub. */
int kv_sweep_mpi_run(kv_sweep_t *s, const kv_sweep_opts_t *o, kv_sweep_summary_t *sum);

#endif
