/*
 * results.c: replay results for analysis (see kv_analyze.h).
 *
 * Results files are TSV tables written by `kvsim replay` (sim/result.h); they are read through
 * kv_table_* by column name, so files with extra or reordered columns load unchanged, and a file
 * without a needed column is refused with a message that names the file and the column. Several
 * files (a sweep over budgets, or policies replayed separately) merge into one set: rows are keyed
 * by (policy label, resolved per-head budget, layer, head), the first file to give a key wins and
 * later repeats are counted (the report says how many).
 *
 * Legends need short policy names: kv_analyze_short_label keeps the policy name and only the
 * parameters whose value differs from the registered defaults, recursively for composed policies
 * (adakv(inner=pyramidkv(...)) becomes "adakv(inner=pyramidkv)"). The full label stays in the
 * report's tables.
 */
#include "analyze/kv_analyze.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/kv_policy.h"
#include "sim/result.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- short labels */

typedef struct {
    char name[64];
    int n;
    char *key[32];
    char *val[32];
    char *buf; /* owned copy that key/val point into */
} parsed_t;

static void parsed_free(parsed_t *p)
{
    kv_free(p->buf);
    memset(p, 0, sizeof *p);
}

/* "name(k=v,k=v(...),...)" -> name and top-level k=v pairs. 0 when it does not parse. */
static int parse_label(const char *label, parsed_t *p)
{
    memset(p, 0, sizeof *p);
    const char *open = strchr(label, '(');
    size_t nlen = open ? (size_t)(open - label) : strlen(label);
    if (nlen == 0 || nlen >= sizeof p->name)
        return 0;
    memcpy(p->name, label, nlen);
    p->name[nlen] = 0;
    if (!open)
        return 1;
    size_t len = strlen(open + 1);
    if (len == 0 || open[len] != ')')
        return 0;
    p->buf = kv_malloc(len, "label");
    if (!p->buf)
        return 0;
    memcpy(p->buf, open + 1, len - 1);
    p->buf[len - 1] = 0;
    char *s = p->buf;
    while (*s && p->n < 32) {
        char *start = s;
        int depth = 0;
        while (*s && !(depth == 0 && *s == ',')) {
            depth += *s == '(';
            depth -= *s == ')';
            s++;
        }
        if (*s)
            *s++ = 0;
        char *eq = strchr(start, '=');
        if (!eq) {
            parsed_free(p);
            return 0;
        }
        *eq = 0;
        p->key[p->n] = start;
        p->val[p->n] = eq + 1;
        p->n++;
    }
    return 1;
}

static const char *parsed_get(const parsed_t *p, const char *key)
{
    for (int i = 0; i < p->n; i++)
        if (!strcmp(p->key[i], key))
            return p->val[i];
    return NULL;
}

static void append(char *buf, size_t len, const char *s)
{
    size_t used = strlen(buf);
    if (used < len)
        snprintf(buf + used, len - used, "%s", s);
}

static int short_rec(const char *label, char *buf, size_t len, int depth)
{
    parsed_t p, def;
    buf[0] = 0;
    if (depth > 4 || !parse_label(label, &p)) {
        snprintf(buf, len, "%s", label);
        return KV_OK;
    }
    kv_policy_t *dp = NULL;
    if (!kv_policy_find(p.name) || kv_policy_create(p.name, &dp) != KV_OK || !parse_label(dp->label, &def)) {
        kv_policy_free(dp);
        kv_clear_error();
        parsed_free(&p);
        snprintf(buf, len, "%s", label);
        return KV_OK;
    }
    kv_policy_free(dp);
    snprintf(buf, len, "%s", p.name);
    int first = 1;
    for (int i = 0; i < p.n; i++) {
        const char *dv = parsed_get(&def, p.key[i]);
        if (dv && !strcmp(dv, p.val[i]))
            continue;
        char sub[256];
        if (strchr(p.val[i], '('))
            short_rec(p.val[i], sub, sizeof sub, depth + 1);
        else
            snprintf(sub, sizeof sub, "%s", p.val[i]);
        append(buf, len, first ? "(" : ",");
        append(buf, len, p.key[i]);
        append(buf, len, "=");
        append(buf, len, sub);
        first = 0;
    }
    if (!first)
        append(buf, len, ")");
    parsed_free(&p);
    parsed_free(&def);
    return KV_OK;
}

int kv_analyze_short_label(const char *label, char *buf, size_t len)
{
    if (!label || !buf || len == 0)
        return kv_error(KV_EINVAL, "kv_analyze_short_label: no label");
    return short_rec(label, buf, len, 0);
}

/* ---------------------------------------------------------------- the set */

static const char *const required[] = {"policy",     "budget",      "budget_tokens", "layer",      "head",
                                       "kept",       "recall_mean", "recall_p10",    "recall_min", "err_mean",
                                       "bound_mean", "violations",  "mem_bytes"};

const char *const *kv_res_required_columns(int *n)
{
    *n = (int)KV_ARRAY_LEN(required);
    return required;
}

/* open-addressing index of rows by key */
typedef struct {
    size_t cap; /* power of two */
    long *slot; /* row index or -1 */
} row_index_t;

static uint64_t row_hash(int pol, int b, int layer, int head)
{
    uint64_t h = 1469598103934665603ull;
    const int v[4] = {pol, b, layer, head};
    for (int i = 0; i < 4; i++) {
        h ^= (uint64_t)(uint32_t)v[i];
        h *= 1099511628211ull;
        h ^= h >> 29;
    }
    return h;
}

static int same_key(const kv_res_row_t *r, int pol, int b, int layer, int head)
{
    return r->pol == pol && r->budget_tokens == b && r->layer == layer && r->head == head;
}

/* The index lives behind the set (allocated with it). */
typedef struct {
    kv_res_set_t pub;
    row_index_t idx;
} set_impl_t;

int kv_res_set_create(kv_res_set_t **out)
{
    set_impl_t *s = kv_calloc(1, sizeof *s, "results set");
    *out = s ? &s->pub : NULL;
    return s ? KV_OK : KV_ENOMEM;
}

static void free_strs(char **a, int n)
{
    for (int i = 0; i < n; i++)
        kv_free(a[i]);
    kv_free(a);
}

void kv_res_set_free(kv_res_set_t *s)
{
    if (!s)
        return;
    set_impl_t *si = (set_impl_t *)s;
    kv_free(s->rows);
    free_strs(s->labels, s->n_pol);
    free_strs(s->shorts, s->n_pol);
    free_strs(s->files, s->n_files);
    free_strs(s->file_sha, s->n_files);
    free_strs(s->file_cmd, s->n_files);
    free_strs(s->file_date, s->n_files);
    kv_free(si->idx.slot);
    kv_free(si);
}

static long idx_lookup(const kv_res_set_t *s, int pol, int b, int layer, int head)
{
    const set_impl_t *si = (const set_impl_t *)s;
    if (!si->idx.cap)
        return -1;
    size_t mask = si->idx.cap - 1, i = (size_t)row_hash(pol, b, layer, head) & mask;
    for (;; i = (i + 1) & mask) {
        long r = si->idx.slot[i];
        if (r < 0)
            return -1;
        if (same_key(&s->rows[r], pol, b, layer, head))
            return r;
    }
}

static int idx_insert(kv_res_set_t *s, long row)
{
    set_impl_t *si = (set_impl_t *)s;
    if ((size_t)(row + 1) * 2 > si->idx.cap) {
        size_t cap = si->idx.cap ? si->idx.cap * 2 : 1024;
        while ((size_t)(row + 1) * 2 > cap)
            cap *= 2;
        long *slot = kv_malloc(sizeof(long) * cap, "results index");
        if (!slot)
            return KV_ENOMEM;
        for (size_t i = 0; i < cap; i++)
            slot[i] = -1;
        kv_free(si->idx.slot);
        si->idx.slot = slot;
        si->idx.cap = cap;
        for (long r = 0; r < row; r++) { /* rehash the earlier rows */
            const kv_res_row_t *w = &s->rows[r];
            size_t i = (size_t)row_hash(w->pol, w->budget_tokens, w->layer, w->head) & (cap - 1);
            while (slot[i] >= 0)
                i = (i + 1) & (cap - 1);
            slot[i] = r;
        }
    }
    const kv_res_row_t *w = &s->rows[row];
    size_t mask = si->idx.cap - 1, i = (size_t)row_hash(w->pol, w->budget_tokens, w->layer, w->head) & mask;
    while (si->idx.slot[i] >= 0)
        i = (i + 1) & mask;
    si->idx.slot[i] = row;
    return KV_OK;
}

int kv_res_set_policy(kv_res_set_t *s, const char *label)
{
    for (int i = 0; i < s->n_pol; i++)
        if (!strcmp(s->labels[i], label))
            return i;
    char **l = kv_realloc(s->labels, sizeof(char *) * (size_t)(s->n_pol + 1), "policy labels");
    if (!l)
        return -1;
    s->labels = l;
    char **sh = kv_realloc(s->shorts, sizeof(char *) * (size_t)(s->n_pol + 1), "policy names");
    if (!sh)
        return -1;
    s->shorts = sh;
    l[s->n_pol] = kv_strdup(label);
    sh[s->n_pol] = kv_strdup(label);
    if (!l[s->n_pol] || !sh[s->n_pol]) {
        kv_free(l[s->n_pol]);
        kv_free(sh[s->n_pol]);
        return -1;
    }
    return s->n_pol++;
}

int kv_res_set_add(kv_res_set_t *s, const kv_res_row_t *row)
{
    if (row->pol < 0 || row->pol >= s->n_pol)
        return kv_error(KV_EINVAL, "results: policy index %d outside [0, %d)", row->pol, s->n_pol);
    if (idx_lookup(s, row->pol, row->budget_tokens, row->layer, row->head) >= 0) {
        s->n_duplicates++;
        return KV_OK;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 1024;
        kv_res_row_t *r = kv_realloc(s->rows, sizeof *r * cap, "results rows");
        if (!r)
            return KV_ENOMEM;
        s->rows = r;
        s->cap = cap;
    }
    s->rows[s->n] = *row;
    int rc = idx_insert(s, (long)s->n);
    if (rc)
        return rc;
    s->n++;
    return KV_OK;
}

const kv_res_row_t *kv_res_set_find(const kv_res_set_t *s, int pol, int budget_tokens, int layer, int head)
{
    long r = idx_lookup(s, pol, budget_tokens, layer, head);
    return r >= 0 ? &s->rows[r] : NULL;
}

static int push_file_str(char ***arr, int n, const char *v)
{
    char **a = kv_realloc(*arr, sizeof(char *) * (size_t)(n + 1), "results files");
    if (!a)
        return KV_ENOMEM;
    *arr = a;
    a[n] = kv_strdup(v ? v : "");
    return a[n] ? KV_OK : KV_ENOMEM;
}

/* "all" -> -1, a non-negative integer -> itself; else -2. */
static int parse_index(const char *s)
{
    if (!s)
        return -2;
    if (!strcmp(s, "all"))
        return -1;
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < 0 || v > 1 << 24)
        return -2;
    return (int)v;
}

/* Cell (r, c) as a number: decimal (no hex, no overflow to infinity), or "nan"/"inf"/"-inf" as replay
 * writes them; in [lo, hi] when finite, an integer when `integer`. An error names the file, the data
 * row, the column and the text. */
static int cell_num(const kv_table_t *t, size_t r, int c, const char *path, double lo, double hi, int integer,
                    double *out)
{
    const char *s = kv_table_get(t, r, c);
    const char *col = c >= 0 && c < t->n_cols ? t->cols[c] : "?";
    if (!s)
        return kv_error(KV_EFORMAT, "%s: data row %zu: no '%s' cell", path, r + 1, col);
    if (!strcmp(s, "nan") || !strcmp(s, "inf") || !strcmp(s, "-inf")) {
        *out = s[0] == 'n' ? NAN : s[0] == '-' ? -INFINITY : INFINITY;
        return KV_OK;
    }
    char *end;
    errno = 0;
    const double v = strtod(s, &end);
    const int plain = strspn(s, "0123456789+-.eE") == strlen(s); /* no hex, no spaces, no words */
    if (!*s || end == s || *end || !plain)
        return kv_error(KV_EFORMAT, "%s: data row %zu, column '%s': '%s' is not a number", path, r + 1, col, s);
    if (!isfinite(v) || (errno == ERANGE && v != 0))
        return kv_error(KV_EFORMAT, "%s: data row %zu, column '%s': '%s' is out of the range of numbers", path, r + 1,
                        col, s);
    if (v < lo || v > hi || (integer && v != floor(v)))
        return kv_error(KV_EFORMAT, "%s: data row %zu, column '%s': %s is outside [%g, %g]%s", path, r + 1, col, s, lo,
                        hi, integer ? " or not an integer" : "");
    *out = v;
    return KV_OK;
}

int kv_res_set_load(kv_res_set_t *s, const char *path, const char *trace_sha)
{
    kv_table_t *t = NULL;
    int rc = kv_table_read(path, &t);
    if (rc)
        return rc;
    if (t->n_cols >= 1 && t->cols[0][0] == '{') {
        kv_table_free(t);
        return kv_error(KV_EFORMAT, "%s: JSON results; kvsim analyze reads the TSV form (kvsim replay -o FILE.tsv)",
                        path);
    }
    int col[KV_ARRAY_LEN(required)];
    for (size_t i = 0; i < KV_ARRAY_LEN(required); i++) {
        col[i] = kv_table_col(t, required[i]);
        if (col[i] < 0) {
            char have[1024] = "";
            for (int c = 0; c < t->n_cols; c++) {
                append(have, sizeof have, c ? ", " : "");
                append(have, sizeof have, t->cols[c]);
            }
            rc = kv_error(KV_EFORMAT, "%s: not a kvsim results table: missing column '%s' (it has: %s)", path,
                          required[i], have);
            kv_table_free(t);
            return rc;
        }
    }
    const int c_meta = kv_table_col(t, "meta_bytes"), c_p90 = kv_table_col(t, "err_p90"),
              c_max = kv_table_col(t, "err_max"), c_nq = kv_table_col(t, "n_queries"),
              c_cache = kv_table_col(t, "cache_mean"), c_nf = kv_table_col(t, "nonfinite");
    const char *sha = kv_table_prov(t, "trace_sha256");
    if (trace_sha && trace_sha[0] && sha && sha[0] && strcmp(sha, trace_sha))
        kv_warn("%s: results of another trace: its trace_sha256 is %.16s..., the trace given has %.16s... "
                "(rows are used anyway)",
                path, sha, trace_sha);
    else if (trace_sha && trace_sha[0] && !(sha && sha[0]))
        kv_warn("%s: no '# trace_sha256:' line; cannot check that these results belong to the trace", path);
    const int file = s->n_files;
    if ((rc = push_file_str(&s->files, file, path)) || (rc = push_file_str(&s->file_sha, file, sha)) ||
        (rc = push_file_str(&s->file_cmd, file, kv_table_prov(t, "command"))) ||
        (rc = push_file_str(&s->file_date, file, kv_table_prov(t, "date")))) {
        kv_table_free(t);
        return rc;
    }
    s->n_files++;
    if (t->n_rows == 0)
        kv_warn("%s: the results table has no rows", path);
    const int dup0 = s->n_duplicates;
    long nan_rows = 0;
    char nan_list[256] = "";
    for (size_t r = 0; r < t->n_rows && rc == KV_OK; r++) {
        kv_res_row_t w;
        memset(&w, 0, sizeof w);
        w.file = file;
        const char *label = kv_table_get(t, r, col[0]);
        const char *budget = kv_table_get(t, r, col[1]);
        double bt = 0;
        w.layer = parse_index(kv_table_get(t, r, col[3]));
        w.head = parse_index(kv_table_get(t, r, col[4]));
        if (!label || !label[0] || w.layer < -1 || w.head < -1 ||
            cell_num(t, r, col[2], path, 1, 1e9, 1, &bt) != KV_OK || !isfinite(bt)) {
            rc = kv_error(KV_EFORMAT,
                          "%s: data row %zu: bad policy, budget_tokens, layer or head ('%s', '%s', '%s', '%s')", path,
                          r + 1, label ? label : "", kv_table_get(t, r, col[2]), kv_table_get(t, r, col[3]),
                          kv_table_get(t, r, col[4]));
            break;
        }
        if ((s->max_layers > 0 && w.layer >= s->max_layers) || (s->max_heads > 0 && w.head >= s->max_heads)) {
            rc = kv_error(KV_EFORMAT,
                          "%s: data row %zu: layer %s, head %s, but the trace has %d layers and %d query heads "
                          "(results of another trace, or an edited file)",
                          path, r + 1, kv_table_get(t, r, col[3]), kv_table_get(t, r, col[4]), s->max_layers,
                          s->max_heads);
            break;
        }
        w.pol = kv_res_set_policy(s, label);
        if (w.pol < 0) {
            rc = KV_ENOMEM;
            break;
        }
        snprintf(w.budget, sizeof w.budget, "%s", budget ? budget : "");
        w.budget_tokens = (int)bt;
        /* every number checked: what it is, and its column's range */
        const double big = 1e300;
        struct {
            int col;
            double *dst, lo, hi;
            int integer;
        } nums[] = {
            {col[5], &w.kept, 0, big, 0},
            {col[6], &w.recall_mean, 0, 1 + 1e-6, 0},
            {col[7], &w.recall_p10, 0, 1 + 1e-6, 0},
            {col[8], &w.recall_min, 0, 1 + 1e-6, 0},
            {col[9], &w.err_mean, 0, big, 0},
            {col[10], &w.bound_mean, 0, big, 0},
            {col[11], &w.violations, 0, big, 1},
            {col[12], &w.mem_bytes, 0, big, 0},
            {c_meta, &w.meta_bytes, 0, big, 0},
            {c_p90, &w.err_p90, 0, big, 0},
            {c_max, &w.err_max, 0, big, 0},
            {c_nq, &w.n_queries, 0, big, 1},
            {c_cache, &w.cache_mean, 0, big, 0},
            {c_nf, &w.nonfinite, 0, big, 1},
        };
        for (size_t k = 0; k < KV_ARRAY_LEN(nums) && rc == KV_OK; k++) {
            *nums[k].dst = nums[k].col == c_nf ? 0 : NAN; /* absent optional columns */
            if (nums[k].col >= 0)
                rc = cell_num(t, r, nums[k].col, path, nums[k].lo, nums[k].hi, nums[k].integer, nums[k].dst);
        }
        if (rc)
            break;
        /* rows that measured nothing: named, left out (a NaN would otherwise reach a figure's limits) */
        if (!isfinite(w.recall_mean) || !isfinite(w.recall_p10) || !isfinite(w.recall_min) || !isfinite(w.err_mean) ||
            !isfinite(w.bound_mean) || !isfinite(w.kept) || !isfinite(w.mem_bytes) || !isfinite(w.violations) ||
            !(w.nonfinite == 0)) {
            if (nan_rows++ < 5) {
                char one[64];
                snprintf(one, sizeof one, "%s%zu", nan_rows > 1 ? ", " : "", r + 1);
                append(nan_list, sizeof nan_list, one);
            }
            continue;
        }
        rc = kv_res_set_add(s, &w);
    }
    if (rc == KV_OK && nan_rows) {
        s->n_nan_rows += nan_rows;
        kv_warn("%s: %ld row%s with nan or infinite metrics left out (data row%s %s%s): %s", path, nan_rows,
                nan_rows == 1 ? "" : "s", nan_rows == 1 ? "" : "s", nan_list, nan_rows > 5 ? ", ..." : "",
                c_nf >= 0 ? "the trace holds NaN or inf values where their nonfinite column is > 0 (kvsim info "
                            "--verify names layers and heads)"
                          : "the replay measured nothing there");
    }
    if (rc == KV_OK && s->n_duplicates > dup0)
        kv_warn("%s: %d row%s repeat the policy, per-head budget, layer and head of an earlier row (two budgets "
                "that resolve to the same tokens, or %s); the first is used",
                path, s->n_duplicates - dup0, s->n_duplicates - dup0 == 1 ? "" : "s",
                file ? "rows of an earlier results file" : "an edited file");
    kv_table_free(t);
    return rc;
}

int kv_res_set_finish(kv_res_set_t *s)
{
    for (int i = 0; i < s->n_pol; i++) {
        char buf[512];
        kv_analyze_short_label(s->labels[i], buf, sizeof buf);
        char *d = kv_strdup(buf);
        if (!d)
            return KV_ENOMEM;
        kv_free(s->shorts[i]);
        s->shorts[i] = d;
    }
    /* two labels with the same short name (a difference hidden in a nested default): full labels */
    for (int i = 0; i < s->n_pol; i++) {
        int clash = 0;
        for (int j = 0; j < s->n_pol; j++)
            clash |= j != i && !strcmp(s->shorts[i], s->shorts[j]) && strcmp(s->labels[i], s->labels[j]);
        if (clash) {
            for (int j = s->n_pol - 1; j >= 0; j--)
                if (j != i && !strcmp(s->shorts[i], s->shorts[j])) {
                    char *d = kv_strdup(s->labels[j]);
                    if (!d)
                        return KV_ENOMEM;
                    kv_free(s->shorts[j]);
                    s->shorts[j] = d;
                }
            char *d = kv_strdup(s->labels[i]);
            if (!d)
                return KV_ENOMEM;
            kv_free(s->shorts[i]);
            s->shorts[i] = d;
        }
    }
    return KV_OK;
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

int kv_res_set_budgets(const kv_res_set_t *s, int *budgets, int max)
{
    int n = 0;
    for (size_t r = 0; r < s->n; r++) {
        int b = s->rows[r].budget_tokens, seen = 0;
        for (int i = 0; i < n && !seen; i++)
            seen = budgets[i] == b;
        if (!seen && n < max)
            budgets[n++] = b;
    }
    qsort(budgets, (size_t)n, sizeof(int), cmp_int);
    return n;
}

int kv_res_set_n_layers(const kv_res_set_t *s)
{
    int n = 0;
    for (size_t r = 0; r < s->n; r++)
        if (s->rows[r].layer + 1 > n)
            n = s->rows[r].layer + 1;
    return n;
}

int kv_res_set_policy_named(const kv_res_set_t *s, const char *name)
{
    size_t n = strlen(name);
    for (int i = 0; i < s->n_pol; i++)
        if (!strncmp(s->labels[i], name, n) && (s->labels[i][n] == '(' || s->labels[i][n] == 0))
            return i;
    return -1;
}

unsigned kv_res_set_policy_flags(const kv_res_set_t *s, int i)
{
    kv_policy_t *p = NULL;
    if (i < 0 || i >= s->n_pol || kv_policy_create(s->labels[i], &p) != KV_OK)
        return 0;
    const unsigned f = p->flags;
    kv_policy_free(p);
    return f;
}

int kv_res_set_policy_flagged(const kv_res_set_t *s, unsigned flags)
{
    for (int i = 0; i < s->n_pol; i++)
        if (kv_res_set_policy_flags(s, i) & flags)
            return i;
    return -1;
}

void kv_res_budget_name(const kv_res_set_t *s, int budget_tokens, char *buf, size_t len)
{
    char tok[16];
    snprintf(tok, sizeof tok, "%d", budget_tokens);
    for (size_t r = 0; r < s->n; r++)
        if (s->rows[r].budget_tokens == budget_tokens) {
            if (s->rows[r].budget[0] && strcmp(s->rows[r].budget, tok)) {
                snprintf(buf, len, "%s (%d tokens per head)", s->rows[r].budget, budget_tokens);
                return;
            }
            break;
        }
    snprintf(buf, len, "%d tokens per head", budget_tokens);
}
