/*
 * result.h: replay results. One row per (policy label, budget, layer, query head), plus a row per
 * (policy, budget, layer) with head "all" and one per (policy, budget) with layer "all". Written as
 * TSV with named columns after a "#" provenance preamble (tool version, git revision, trace and its
 * checksum, backend, date, command), or as JSON. Readers (analyze) find columns by name through
 * kv_table_*, never by position.
 */
#ifndef KV_RESULT_H
#define KV_RESULT_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KV_ALL (-1) /* layer or head "all" in a row */

typedef struct {
    int policy, budget;       /* indices into the label and budget tables */
    int layer, head, kv_head; /* KV_ALL for aggregate rows */
    int budget_tokens;        /* resolved per-head budget B */
    double kept;              /* mean context tokens in the cache a query reads */
    double cache_mean;        /* mean keys a query reads (context + appended) */
    double cache_peak;        /* largest cache any query of the row read */
    double recall_mean, recall_p10, recall_min;
    double err_mean, err_p90, err_max;
    double bound_mean;
    double bound_gap_min;              /* min over queries of bound - err (>= 0 unless violated) */
    long violations;                   /* queries whose error exceeds the bound beyond float tolerance */
    double wo_err_mean, wo_bound_mean; /* model-space (W_O) forms, NAN without W_O or on head rows */
    double mem_bytes;                  /* stored K and V bytes at the trace dtype (head rows: the head's share) */
    double meta_bytes;                 /* policy metadata bytes */
    long n_queries;
    long nonfinite; /* NaN and infinite values in the Q, K and V the row's evaluations read (its layers, its
                       query heads and their KV heads); when > 0 every metric of the row is NAN */
} kv_result_row_t;

typedef struct {
    kv_result_row_t *rows;
    size_t n, cap;
    char **labels; /* (n_labels) policy labels */
    int n_labels;
    char **budgets; /* (n_budgets) budget texts */
    int n_budgets;
    char **prov_keys, **prov_vals; /* provenance preamble */
    int n_prov;
} kv_results_t;

int kv_results_create(kv_results_t **out);
void kv_results_free(kv_results_t *r);
int kv_results_add_label(kv_results_t *r, const char *label);
int kv_results_add_budget(kv_results_t *r, const char *text);
int kv_results_add_prov(kv_results_t *r, const char *key, const char *val);
int kv_results_append(kv_results_t *r, const kv_result_row_t *row);
/* Write TSV ("-" = stdout) or JSON through the output module (sim/common/kv_output.h): a failure
 * leaves no partial results file, and a write error on standard output is reported. */
int kv_results_write_tsv(const kv_results_t *r, const char *path);
int kv_results_write_json(const kv_results_t *r, const char *path);
/* Both at once (json may be NULL): committed together, so a failure leaves neither new file. */
int kv_results_write(const kv_results_t *r, const char *tsv, const char *json);
/* The TSV column names, in order. */
const char *const *kv_results_columns(int *n);

/* ---- generic TSV tables (read by column name) ---- */
typedef struct {
    int n_cols;
    char **cols;
    size_t n_rows;
    char ***cells; /* [row][col] */
    int n_prov;
    char **prov_keys, **prov_vals; /* "# key: value" preamble lines */
} kv_table_t;

int kv_table_read(const char *path, kv_table_t **out);
void kv_table_free(kv_table_t *t);
/* Column index by name, -1 when absent. */
int kv_table_col(const kv_table_t *t, const char *name);
const char *kv_table_get(const kv_table_t *t, size_t row, int col);
/* Numeric cell (NAN for "nan", "", "all" or non-numbers). */
double kv_table_num(const kv_table_t *t, size_t row, int col);
const char *kv_table_prov(const kv_table_t *t, const char *key);

#ifdef __cplusplus
}
#endif
#endif
