/* result.c: see result.h. */
#include "sim/result.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const columns[] = {
    "policy",      "budget",        "budget_tokens", "layer",       "head",          "kv_head",
    "kept",        "cache_mean",    "cache_peak",    "recall_mean", "recall_p10",    "recall_min",
    "err_mean",    "err_p90",       "err_max",       "bound_mean",  "bound_gap_min", "violations",
    "wo_err_mean", "wo_bound_mean", "mem_bytes",     "meta_bytes",  "n_queries",     "nonfinite",
};

const char *const *kv_results_columns(int *n)
{
    *n = (int)KV_ARRAY_LEN(columns);
    return columns;
}

int kv_results_create(kv_results_t **out)
{
    *out = kv_calloc(1, sizeof **out, "results");
    return *out ? KV_OK : KV_ENOMEM;
}

static void free_strs(char **s, int n)
{
    for (int i = 0; i < n; i++)
        kv_free(s[i]);
    kv_free(s);
}

void kv_results_free(kv_results_t *r)
{
    if (!r)
        return;
    kv_free(r->rows);
    free_strs(r->labels, r->n_labels);
    free_strs(r->budgets, r->n_budgets);
    free_strs(r->prov_keys, r->n_prov);
    free_strs(r->prov_vals, r->n_prov);
    kv_free(r);
}

static int push_str(char ***arr, int *n, const char *s)
{
    char **a = kv_realloc(*arr, sizeof(char *) * (size_t)(*n + 1), "string table");
    if (!a)
        return KV_ENOMEM;
    *arr = a;
    a[*n] = kv_strdup(s ? s : "");
    if (!a[*n])
        return KV_ENOMEM;
    (*n)++;
    return KV_OK;
}

int kv_results_add_label(kv_results_t *r, const char *label)
{
    return push_str(&r->labels, &r->n_labels, label);
}
int kv_results_add_budget(kv_results_t *r, const char *text)
{
    return push_str(&r->budgets, &r->n_budgets, text);
}

int kv_results_add_prov(kv_results_t *r, const char *key, const char *val)
{
    int n = r->n_prov, rc = push_str(&r->prov_keys, &n, key);
    if (rc)
        return rc;
    return push_str(&r->prov_vals, &r->n_prov, val);
}

int kv_results_append(kv_results_t *r, const kv_result_row_t *row)
{
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 256;
        kv_result_row_t *rows = kv_realloc(r->rows, sizeof *rows * cap, "result rows");
        if (!rows)
            return KV_ENOMEM;
        r->rows = rows;
        r->cap = cap;
    }
    r->rows[r->n++] = *row;
    return KV_OK;
}

/* %.9g keeps every float's value; integers print exactly; NaN prints "nan". */
static void put_num(FILE *f, double x)
{
    if (isnan(x))
        fputs("nan", f);
    else if (x == floor(x) && fabs(x) < 1e15)
        fprintf(f, "%.0f", x);
    else
        fprintf(f, "%.9g", x);
}

static void put_idx(FILE *f, int v)
{
    if (v == KV_ALL)
        fputs("all", f);
    else
        fprintf(f, "%d", v);
}

static void put_tsv(const kv_results_t *r, FILE *f)
{
    fprintf(f, "# kvsim replay results\n");
    for (int i = 0; i < r->n_prov; i++)
        fprintf(f, "# %s: %s\n", r->prov_keys[i], r->prov_vals[i]);
    for (size_t c = 0; c < KV_ARRAY_LEN(columns); c++)
        fprintf(f, "%s%s", c ? "\t" : "", columns[c]);
    fputc('\n', f);
    for (size_t i = 0; i < r->n; i++) {
        const kv_result_row_t *w = &r->rows[i];
        fprintf(f, "%s\t%s\t%d\t", r->labels[w->policy], r->budgets[w->budget], w->budget_tokens);
        put_idx(f, w->layer);
        fputc('\t', f);
        put_idx(f, w->head);
        fputc('\t', f);
        put_idx(f, w->kv_head);
        const double v[] = {
            w->kept,          w->cache_mean,         w->cache_peak,       w->recall_mean,   w->recall_p10,
            w->recall_min,    w->err_mean,           w->err_p90,          w->err_max,       w->bound_mean,
            w->bound_gap_min, (double)w->violations, w->wo_err_mean,      w->wo_bound_mean, w->mem_bytes,
            w->meta_bytes,    (double)w->n_queries,  (double)w->nonfinite};
        for (size_t k = 0; k < KV_ARRAY_LEN(v); k++) {
            fputc('\t', f);
            put_num(f, v[k]);
        }
        fputc('\n', f);
    }
}

static void json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            fprintf(f, "\\%c", ch);
        else if (ch < 0x20)
            fprintf(f, "\\u%04x", ch);
        else
            fputc(ch, f);
    }
    fputc('"', f);
}

static void json_num(FILE *f, double x)
{
    if (!isfinite(x))
        fputs("null", f);
    else
        put_num(f, x);
}

static void put_json(const kv_results_t *r, FILE *f)
{
    fputs("{\n  \"provenance\": {", f);
    for (int i = 0; i < r->n_prov; i++) {
        fputs(i ? ", " : "", f);
        json_str(f, r->prov_keys[i]);
        fputs(": ", f);
        json_str(f, r->prov_vals[i]);
    }
    fputs("},\n  \"rows\": [\n", f);
    for (size_t i = 0; i < r->n; i++) {
        const kv_result_row_t *w = &r->rows[i];
        fputs("    {\"policy\": ", f);
        json_str(f, r->labels[w->policy]);
        fputs(", \"budget\": ", f);
        json_str(f, r->budgets[w->budget]);
        fprintf(f, ", \"budget_tokens\": %d", w->budget_tokens);
        const struct {
            const char *k;
            int v;
        } idx[] = {{"layer", w->layer}, {"head", w->head}, {"kv_head", w->kv_head}};
        for (size_t k = 0; k < KV_ARRAY_LEN(idx); k++) {
            fprintf(f, ", \"%s\": ", idx[k].k);
            if (idx[k].v == KV_ALL)
                fputs("\"all\"", f);
            else
                fprintf(f, "%d", idx[k].v);
        }
        const struct {
            const char *k;
            double v;
        } nums[] = {{"kept", w->kept},
                    {"cache_mean", w->cache_mean},
                    {"cache_peak", w->cache_peak},
                    {"recall_mean", w->recall_mean},
                    {"recall_p10", w->recall_p10},
                    {"recall_min", w->recall_min},
                    {"err_mean", w->err_mean},
                    {"err_p90", w->err_p90},
                    {"err_max", w->err_max},
                    {"bound_mean", w->bound_mean},
                    {"bound_gap_min", w->bound_gap_min},
                    {"violations", (double)w->violations},
                    {"wo_err_mean", w->wo_err_mean},
                    {"wo_bound_mean", w->wo_bound_mean},
                    {"mem_bytes", w->mem_bytes},
                    {"meta_bytes", w->meta_bytes},
                    {"n_queries", (double)w->n_queries},
                    {"nonfinite", (double)w->nonfinite}};
        for (size_t k = 0; k < KV_ARRAY_LEN(nums); k++) {
            fprintf(f, ", \"%s\": ", nums[k].k);
            json_num(f, nums[k].v);
        }
        fprintf(f, "}%s\n", i + 1 < r->n ? "," : "");
    }
    fputs("  ]\n}\n", f);
}

/* One file, or standard output, through the output module. */
static void tsv_of(const void *r, FILE *f)
{
    put_tsv(r, f);
}

static void json_of(const void *r, FILE *f)
{
    put_json(r, f);
}

int kv_results_write_tsv(const kv_results_t *r, const char *path)
{
    return kv_out_write_one(path, r, tsv_of);
}

int kv_results_write_json(const kv_results_t *r, const char *path)
{
    return kv_out_write_one(path, r, json_of);
}

int kv_results_write(const kv_results_t *r, const char *tsv, const char *json)
{
    return kv_out_write_pair(tsv, json, r, tsv_of, json_of);
}

/* ---- TSV reader ---- */

void kv_table_free(kv_table_t *t)
{
    if (!t)
        return;
    for (size_t r = 0; r < t->n_rows; r++) {
        for (int c = 0; c < t->n_cols; c++)
            kv_free(t->cells[r][c]);
        kv_free(t->cells[r]);
    }
    kv_free(t->cells);
    free_strs(t->cols, t->n_cols);
    free_strs(t->prov_keys, t->n_prov);
    free_strs(t->prov_vals, t->n_prov);
    kv_free(t);
}

/* Split a line at tabs into n fields (allocated copies). */
static int split_tabs(const char *line, char ***out, int *n)
{
    int k = 1;
    for (const char *s = line; *s; s++)
        k += *s == '\t';
    char **f = kv_calloc((size_t)k, sizeof(char *), "table row");
    if (!f)
        return KV_ENOMEM;
    const char *b = line;
    for (int i = 0; i < k; i++) {
        const char *e = strchr(b, '\t');
        size_t len = e ? (size_t)(e - b) : strlen(b);
        f[i] = kv_malloc(len + 1, "table cell");
        if (!f[i]) {
            free_strs(f, i);
            return KV_ENOMEM;
        }
        memcpy(f[i], b, len);
        f[i][len] = 0;
        b = e ? e + 1 : b + len;
    }
    *out = f;
    *n = k;
    return KV_OK;
}

int kv_table_read(const char *path, kv_table_t **out)
{
    *out = NULL;
    FILE *f = fopen(path, "r");
    if (!f)
        return kv_error(KV_EIO, "%s: cannot open: %s", path, strerror(errno));
    kv_table_t *t = kv_calloc(1, sizeof *t, "table");
    char *line = NULL;
    size_t cap = 0, rows_cap = 0;
    ssize_t len;
    int rc = t ? KV_OK : KV_ENOMEM;
    long lineno = 0;
    while (rc == KV_OK && (len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r'))
            line[--len] = 0;
        if (line[0] == '#') {
            char *colon = strstr(line, ": ");
            if (colon && !t->n_cols) {
                *colon = 0;
                const char *k = line + 1 + (line[1] == ' ');
                int n = t->n_prov;
                if ((rc = push_str(&t->prov_keys, &n, k)) == KV_OK)
                    rc = push_str(&t->prov_vals, &t->n_prov, colon + 2);
            }
            continue;
        }
        if (len == 0)
            continue;
        char **fields;
        int nf;
        if ((rc = split_tabs(line, &fields, &nf)))
            break;
        if (!t->n_cols) {
            t->cols = fields;
            t->n_cols = nf;
            continue;
        }
        if (nf != t->n_cols) {
            free_strs(fields, nf);
            rc = kv_error(KV_EFORMAT, "%s:%ld: %d fields, the header has %d", path, lineno, nf, t->n_cols);
            break;
        }
        if (t->n_rows == rows_cap) {
            rows_cap = rows_cap ? 2 * rows_cap : 256;
            char ***c = kv_realloc(t->cells, sizeof(char **) * rows_cap, "table rows");
            if (!c) {
                free_strs(fields, nf);
                rc = KV_ENOMEM;
                break;
            }
            t->cells = c;
        }
        t->cells[t->n_rows++] = fields;
    }
    free(line);
    fclose(f);
    if (rc == KV_OK && t->n_cols == 0)
        rc = kv_error(KV_EFORMAT, "%s: no header line", path);
    if (rc) {
        kv_table_free(t);
        return rc;
    }
    *out = t;
    return KV_OK;
}

int kv_table_col(const kv_table_t *t, const char *name)
{
    for (int c = 0; c < t->n_cols; c++)
        if (!strcmp(t->cols[c], name))
            return c;
    return -1;
}

const char *kv_table_get(const kv_table_t *t, size_t row, int col)
{
    if (row >= t->n_rows || col < 0 || col >= t->n_cols)
        return NULL;
    return t->cells[row][col];
}

double kv_table_num(const kv_table_t *t, size_t row, int col)
{
    const char *s = kv_table_get(t, row, col);
    if (!s || !*s)
        return NAN;
    char *end;
    double v = strtod(s, &end);
    return (end == s || *end) ? NAN : v;
}

const char *kv_table_prov(const kv_table_t *t, const char *key)
{
    for (int i = 0; i < t->n_prov; i++)
        if (!strcmp(t->prov_keys[i], key))
            return t->prov_vals[i];
    return NULL;
}
