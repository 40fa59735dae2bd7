/* otable.c: see otable.h. */
#include "sim/otable.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_output.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct kv_otable {
    char *title;
    int n_cols;
    char **cols;
    char **cells; /* (rows, n_cols) */
    size_t n_rows, cap;
    char **pk, **pv;
    int n_prov;
};

static void free_strs(char **s, size_t n)
{
    if (!s)
        return;
    for (size_t i = 0; i < n; i++)
        kv_free(s[i]);
    kv_free(s);
}

void kv_otable_free(kv_otable_t *t)
{
    if (!t)
        return;
    kv_free(t->title);
    free_strs(t->cols, (size_t)t->n_cols);
    free_strs(t->cells, t->n_rows * (size_t)t->n_cols);
    free_strs(t->pk, (size_t)t->n_prov);
    free_strs(t->pv, (size_t)t->n_prov);
    kv_free(t);
}

int kv_otable_create(const char *title, const char *const *cols, int n_cols, kv_otable_t **out)
{
    *out = NULL;
    kv_otable_t *t = kv_calloc(1, sizeof *t, "results table");
    if (!t)
        return KV_ENOMEM;
    t->title = kv_strdup(title);
    t->cols = kv_calloc((size_t)n_cols, sizeof(char *), "columns");
    t->n_cols = n_cols;
    int ok = t->title && t->cols;
    for (int c = 0; ok && c < n_cols; c++)
        ok = (t->cols[c] = kv_strdup(cols[c])) != NULL;
    if (!ok) {
        kv_otable_free(t);
        return KV_ENOMEM;
    }
    *out = t;
    return KV_OK;
}

int kv_otable_prov(kv_otable_t *t, const char *key, const char *val)
{
    char **a = kv_realloc(t->pk, sizeof(char *) * (size_t)(t->n_prov + 1), "provenance");
    if (!a)
        return KV_ENOMEM;
    t->pk = a;
    char **b = kv_realloc(t->pv, sizeof(char *) * (size_t)(t->n_prov + 1), "provenance");
    if (!b)
        return KV_ENOMEM;
    t->pv = b;
    t->pk[t->n_prov] = kv_strdup(key);
    t->pv[t->n_prov] = kv_strdup(val ? val : "");
    t->n_prov++;
    return t->pk[t->n_prov - 1] && t->pv[t->n_prov - 1] ? KV_OK : KV_ENOMEM;
}

int kv_otable_add(kv_otable_t *t, const char *const *cells)
{
    if (t->n_rows == t->cap) {
        size_t cap = t->cap ? 2 * t->cap : 64;
        char **c = kv_realloc(t->cells, sizeof(char *) * cap * (size_t)t->n_cols, "table rows");
        if (!c)
            return KV_ENOMEM;
        t->cells = c;
        t->cap = cap;
    }
    char **row = t->cells + t->n_rows * (size_t)t->n_cols;
    for (int c = 0; c < t->n_cols; c++)
        row[c] = NULL;
    t->n_rows++;
    for (int c = 0; c < t->n_cols; c++)
        if (!(row[c] = kv_strdup(cells[c] ? cells[c] : "nan")))
            return KV_ENOMEM;
    return KV_OK;
}

size_t kv_otable_rows(const kv_otable_t *t)
{
    return t->n_rows;
}

const char *kv_otable_num(char *buf, size_t len, double x)
{
    if (isnan(x))
        snprintf(buf, len, "nan");
    else if (isinf(x))
        snprintf(buf, len, "%s", x > 0 ? "inf" : "-inf");
    else if (x == floor(x) && fabs(x) < 1e15)
        snprintf(buf, len, "%.0f", x);
    else
        snprintf(buf, len, "%.9g", x);
    return buf;
}

/* A cell without tabs and line breaks. */
static void put_cell(FILE *f, const char *s)
{
    for (; *s; s++)
        fputc(*s == '\t' || *s == '\n' || *s == '\r' ? ' ' : *s, f);
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

/* 1 when s is a finite decimal number as strtod reads it whole */
static int numeric(const char *s)
{
    if (!*s || !strcmp(s, "nan") || strstr(s, "inf") || strchr(s, 'x') || strchr(s, 'X'))
        return 0;
    char *end;
    errno = 0;
    (void)strtod(s, &end);
    return *end == 0 && errno == 0;
}

static void write_tsv(const kv_otable_t *t, FILE *f)
{
    fprintf(f, "# %s\n", t->title);
    for (int i = 0; i < t->n_prov; i++) {
        fprintf(f, "# %s: ", t->pk[i]);
        put_cell(f, t->pv[i]);
        fputc('\n', f);
    }
    for (int c = 0; c < t->n_cols; c++)
        fprintf(f, "%s%s", c ? "\t" : "", t->cols[c]);
    fputc('\n', f);
    for (size_t r = 0; r < t->n_rows; r++) {
        for (int c = 0; c < t->n_cols; c++) {
            if (c)
                fputc('\t', f);
            put_cell(f, t->cells[r * (size_t)t->n_cols + c]);
        }
        fputc('\n', f);
    }
}

static void write_json(const kv_otable_t *t, FILE *f)
{
    fputs("{\n  \"provenance\": {", f);
    for (int i = 0; i < t->n_prov; i++) {
        fputs(i ? ", " : "", f);
        json_str(f, t->pk[i]);
        fputs(": ", f);
        json_str(f, t->pv[i]);
    }
    fputs("},\n  \"rows\": [\n", f);
    for (size_t r = 0; r < t->n_rows; r++) {
        fputs("    {", f);
        for (int c = 0; c < t->n_cols; c++) {
            const char *v = t->cells[r * (size_t)t->n_cols + c];
            fputs(c ? ", " : "", f);
            json_str(f, t->cols[c]);
            fputs(": ", f);
            if (numeric(v))
                fputs(v, f);
            else if (!strcmp(v, "nan") || !strcmp(v, "inf") || !strcmp(v, "-inf"))
                fputs("null", f);
            else
                json_str(f, v);
        }
        fprintf(f, "}%s\n", r + 1 < t->n_rows ? "," : "");
    }
    fputs("  ]\n}\n", f);
}

/* One file, or standard output, through the output module. */
static void tsv_of(const void *t, FILE *f)
{
    write_tsv(t, f);
}

static void json_of(const void *t, FILE *f)
{
    write_json(t, f);
}

int kv_otable_write(const kv_otable_t *t, const char *tsv, const char *json)
{
    return kv_out_write_pair(tsv, json, t, tsv_of, json_of);
}
