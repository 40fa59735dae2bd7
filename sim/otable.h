/*
 * otable.h: a results table with named columns written as TSV (a '#' provenance preamble, one
 * header line, one line per row) and as JSON ({"provenance": {...}, "rows": [{column: value}]}),
 * for the commands whose rows are not replay's (kvsim eval, kvsim niah). Cells are kept as text;
 * JSON writes a cell as a number when it reads as one ("nan" and "inf" as null), else as a string.
 * Readers find columns by name (sim/result.h, kv_table_read), never by position. Files go through the
 * output module (sim/common/kv_output.h): a failure leaves no partial file, and the TSV and the JSON
 * are committed together.
 */
#ifndef KV_OTABLE_H
#define KV_OTABLE_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kv_otable kv_otable_t;

/* title: the first preamble line ("kvsim eval results"); cols copied. */
int kv_otable_create(const char *title, const char *const *cols, int n_cols, kv_otable_t **out);
void kv_otable_free(kv_otable_t *t); /* accepts NULL */
int kv_otable_prov(kv_otable_t *t, const char *key, const char *val);
/* Append a row of n_cols cells (copied; NULL is written as "nan"). */
int kv_otable_add(kv_otable_t *t, const char *const *cells);
size_t kv_otable_rows(const kv_otable_t *t);
/* A number as the results files write it: integers exactly, others with %.9g, NaN as "nan". */
const char *kv_otable_num(char *buf, size_t len, double x);
/* TSV to tsv ("-": standard output) and, when json is not NULL, JSON to json (both committed
 * together). Tabs and line breaks inside cells are written as spaces. */
int kv_otable_write(const kv_otable_t *t, const char *tsv, const char *json);

#ifdef __cplusplus
}
#endif
#endif
