/*
 * report.c: `kvsim analyze` as a library call (kv_analyze_run): statistics, every figure, and a
 * report in two forms:
 *   report.md    Markdown that links the figure files beside it;
 *   report.html  one self-contained page: inline CSS, every figure embedded as a base64 data URI
 *                (PNG, or SVG when figures are SVG; a PNG rendering stands in for PDF figures), so
 *                the file can be mailed or opened anywhere without the folder.
 * Both show the same tables: trace provenance, results files (and whether they belong to the
 * trace), policies (short name and full label), per policy and budget (recall mean / p10 / min,
 * output error, bound, violations, memory), and per layer funnel statistics.
 */
#include "analyze/kv_analyze.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/kv_policy.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

void kv_analyze_opts_init(kv_analyze_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->out_dir = "out/analyze";
    o->format = "png";
    o->map.n_layers = 6;
    kv_funnel_opts_init(&o->funnel);
}

/* ---------------------------------------------------------------- base64 */

char *kv_base64(const unsigned char *d, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t olen = 4 * ((n + 2) / 3);
    char *o = kv_malloc(olen + 1, "base64");
    if (!o)
        return NULL;
    size_t j = 0;
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = (unsigned)d[i] << 16 | (i + 1 < n ? (unsigned)d[i + 1] << 8 : 0) | (i + 2 < n ? d[i + 2] : 0);
        o[j++] = tab[v >> 18 & 63];
        o[j++] = tab[v >> 12 & 63];
        o[j++] = i + 1 < n ? tab[v >> 6 & 63] : '=';
        o[j++] = i + 2 < n ? tab[v & 63] : '=';
    }
    o[j] = 0;
    return o;
}

/* ---------------------------------------------------------------- small helpers */

static int mkdir_p(const char *path)
{
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(buf, 0755) != 0 && errno != EEXIST)
                return kv_error(KV_EIO, "%s: cannot create folder: %s", buf, strerror(errno));
            *p = '/';
        }
    if (mkdir(buf, 0755) != 0 && errno != EEXIST)
        return kv_error(KV_EIO, "%s: cannot create folder: %s", buf, strerror(errno));
    struct stat st;
    if (stat(buf, &st) != 0 || !S_ISDIR(st.st_mode))
        return kv_error(KV_EIO, "%s: not a folder", buf);
    return KV_OK;
}

typedef struct {
    unsigned char *d;
    size_t n, cap;
    int failed;
} membuf_t;

static cairo_status_t membuf_write(void *closure, const unsigned char *data, unsigned int len)
{
    membuf_t *m = closure;
    if (m->n + len > m->cap) {
        size_t cap = m->cap ? m->cap : 1 << 16;
        while (m->n + len > cap)
            cap *= 2;
        unsigned char *d = kv_realloc(m->d, cap, "png buffer");
        if (!d) {
            m->failed = 1;
            return CAIRO_STATUS_NO_MEMORY;
        }
        m->d = d;
        m->cap = cap;
    }
    memcpy(m->d + m->n, data, len);
    m->n += len;
    return CAIRO_STATUS_SUCCESS;
}

/* PNG bytes of a figure rendered in memory. */
static int fig_png(kv_fig_t *fig, unsigned char **data, size_t *n)
{
    cairo_surface_t *s = NULL;
    int rc = kv_fig_render_image(fig, &s);
    if (rc)
        return rc;
    membuf_t m = {0};
    cairo_status_t st = cairo_surface_write_to_png_stream(s, membuf_write, &m);
    cairo_surface_destroy(s);
    if (st != CAIRO_STATUS_SUCCESS || m.failed) {
        kv_free(m.d);
        return kv_error(KV_EIO, "PNG encoding failed: %s", cairo_status_to_string(st));
    }
    *data = m.d;
    *n = m.n;
    return KV_OK;
}

/* A growing string. */
typedef struct {
    char *s;
    size_t n, cap;
    int failed;
} sbuf_t;

static void sb_add(sbuf_t *b, const char *s, size_t len)
{
    if (b->failed)
        return;
    if (b->n + len + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1 << 14;
        while (b->n + len + 1 > cap)
            cap *= 2;
        char *ns = kv_realloc(b->s, cap, "report text");
        if (!ns) {
            b->failed = 1;
            return;
        }
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->n, s, len);
    b->n += len;
    b->s[b->n] = 0;
}

static void sb_puts(sbuf_t *b, const char *s)
{
    sb_add(b, s, strlen(s));
}

__attribute__((format(printf, 2, 3))) static void sb_printf(sbuf_t *b, const char *fmt, ...)
{
    char tmp[4096];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof tmp) {
        sb_add(b, tmp, (size_t)n);
        return;
    }
    char *big = kv_malloc((size_t)n + 1, "report line");
    if (!big) {
        b->failed = 1;
        return;
    }
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    sb_add(b, big, (size_t)n);
    kv_free(big);
}

/* Text for HTML (escape &<>") or a Markdown table cell (escape |, newlines to spaces). */
static void sb_html(sbuf_t *b, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '&': sb_puts(b, "&amp;"); break;
        case '<': sb_puts(b, "&lt;"); break;
        case '>': sb_puts(b, "&gt;"); break;
        case '"': sb_puts(b, "&quot;"); break;
        default: sb_add(b, s, 1);
        }
    }
}

static void sb_md(sbuf_t *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '|')
            sb_puts(b, "\\|");
        else if (*s == '\n' || *s == '\r' || *s == '\t')
            sb_puts(b, " ");
        else if (*s == '*' || *s == '_' || *s == '`' || *s == '<' || *s == '>' || *s == '[' || *s == ']') {
            sb_puts(b, "\\");
            sb_add(b, s, 1);
        } else
            sb_add(b, s, 1);
    }
}

/* Where analyze's files go: one set committed at the end (sim/common/kv_output.h), so a failure
 * leaves no new figure and no report; none of them may be an input. */
typedef struct {
    kv_out_set_t *set;
    const char *const *inputs; /* the trace and the results files */
    int n_inputs;
} outs_t;

static int open_member(outs_t *w, const char *path, int flags, FILE **f)
{
    kv_out_t *o;
    int rc = kv_out_check(path, w->inputs, w->n_inputs);
    if (rc == KV_OK)
        rc = kv_out_set_open(w->set, path, flags, &o);
    if (rc == KV_OK && !(*f = kv_out_stream(o)))
        rc = KV_ENOMEM;
    return rc;
}

/* A report file: an index member of the set (removed first, renamed last). */
static int write_text(outs_t *w, const char *path, const sbuf_t *b)
{
    if (b->failed)
        return KV_ENOMEM;
    FILE *f;
    int rc = open_member(w, path, KV_OUT_INDEX, &f);
    if (rc == KV_OK && b->n)
        fwrite(b->s, 1, b->n, f); /* a failed write is reported when the set is committed */
    return rc;
}

/* Number formats for tables: "-" for NaN. */
static const char *fmt_num(char *buf, size_t len, double v, const char *fmt)
{
    if (isnan(v))
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, fmt, v);
    return buf;
}

static const char *fmt_sig(char *buf, size_t len, double v)
{
    if (isnan(v))
        return snprintf(buf, len, "-"), buf;
    if (v == 0)
        return snprintf(buf, len, "0"), buf;
    if (fabs(v) >= 1e-3 && fabs(v) < 1e5)
        snprintf(buf, len, "%.4g", v);
    else
        snprintf(buf, len, "%.3e", v);
    return buf;
}

/* ---------------------------------------------------------------- the report model */

typedef struct {
    char file[64];
    char title[128];
    char caption[768];
    unsigned char *embed; /* bytes to embed in HTML */
    size_t embed_n;
    const char *mime;
} figure_t;

/* A generic table: header + rows of cells, written to both outputs. */
typedef struct {
    int ncol;
    const char *head[16];
    int right[16];
    char ***cells; /* [row][col] owned strings */
    int nrow, cap;
} table_t;

static int tab_row(table_t *t, ...)
{
    if (t->nrow == t->cap) {
        int cap = t->cap ? 2 * t->cap : 32;
        char ***c = kv_realloc(t->cells, sizeof(char **) * (size_t)cap, "table");
        if (!c)
            return KV_ENOMEM;
        t->cells = c;
        t->cap = cap;
    }
    char **row = kv_calloc((size_t)t->ncol, sizeof(char *), "table row");
    if (!row)
        return KV_ENOMEM;
    va_list ap;
    va_start(ap, t);
    for (int i = 0; i < t->ncol; i++) {
        const char *s = va_arg(ap, const char *);
        row[i] = kv_strdup(s ? s : "");
    }
    va_end(ap);
    t->cells[t->nrow++] = row;
    return KV_OK;
}

static void tab_free(table_t *t)
{
    for (int r = 0; r < t->nrow; r++) {
        for (int c = 0; c < t->ncol; c++)
            kv_free(t->cells[r][c]);
        kv_free(t->cells[r]);
    }
    kv_free(t->cells);
    memset(t, 0, sizeof *t);
}

static void tab_md(sbuf_t *b, const table_t *t)
{
    sb_puts(b, "|");
    for (int c = 0; c < t->ncol; c++) {
        sb_puts(b, " ");
        sb_md(b, t->head[c]);
        sb_puts(b, " |");
    }
    sb_puts(b, "\n|");
    for (int c = 0; c < t->ncol; c++)
        sb_puts(b, t->right[c] ? " ---: |" : " --- |");
    sb_puts(b, "\n");
    for (int r = 0; r < t->nrow; r++) {
        sb_puts(b, "|");
        for (int c = 0; c < t->ncol; c++) {
            sb_puts(b, " ");
            sb_md(b, t->cells[r][c] ? t->cells[r][c] : "");
            sb_puts(b, " |");
        }
        sb_puts(b, "\n");
    }
    sb_puts(b, "\n");
}

static void tab_html(sbuf_t *b, const table_t *t, const char *cls)
{
    sb_printf(b, "<div class=\"tw\"><table class=\"%s\"><thead><tr>", cls ? cls : "");
    for (int c = 0; c < t->ncol; c++) {
        sb_puts(b, t->right[c] ? "<th class=\"r\">" : "<th>");
        sb_html(b, t->head[c]);
        sb_puts(b, "</th>");
    }
    sb_puts(b, "</tr></thead><tbody>\n");
    for (int r = 0; r < t->nrow; r++) {
        sb_puts(b, "<tr>");
        for (int c = 0; c < t->ncol; c++) {
            sb_puts(b, t->right[c] ? "<td class=\"r\">" : "<td>");
            sb_html(b, t->cells[r][c] ? t->cells[r][c] : "");
            sb_puts(b, "</td>");
        }
        sb_puts(b, "</tr>\n");
    }
    sb_puts(b, "</tbody></table></div>\n");
}

/* ---------------------------------------------------------------- tables */

static int trace_table(table_t *t, kv_trace_t *tr, const char *trace_path, const char *sha)
{
    const kv_trace_meta_t *m = kv_trace_meta(tr);
    *t = (table_t){.ncol = 2, .head = {"", ""}};
    t->head[0] = "property";
    t->head[1] = "value";
    char buf[1400];
    int rc = tab_row(t, "trace file", trace_path ? trace_path : kv_trace_path(tr));
    if (sha && sha[0])
        rc |= tab_row(t, "trace sha256", sha);
    snprintf(buf, sizeof buf, "%s%s", m->source[0] ? m->source : "unknown",
             !strcmp(m->source, "synth") ? " (synthetic: planted structure, not a real model)" : "");
    rc |= tab_row(t, "source", buf);
    if (m->model[0]) {
        snprintf(buf, sizeof buf, "%s", m->model);
        rc |= tab_row(t, "model", buf);
    }
    if (m->model_sha256[0])
        rc |= tab_row(t, "model sha256", m->model_sha256);
    if (m->tokenizer[0])
        rc |= tab_row(t, "tokenizer", m->tokenizer);
    snprintf(buf, sizeof buf, "%d layers, %d query heads, %d KV heads, head_dim %d", m->n_layers, m->n_heads,
             m->n_kv_heads, m->head_dim);
    rc |= tab_row(t, "shape", buf);
    if (m->model_dim) {
        snprintf(buf, sizeof buf, "dim %d, hidden %d, vocab %d, context %d, RoPE theta %g", m->model_dim, m->hidden_dim,
                 m->vocab_size, m->seq_len, (double)m->rope_theta);
        rc |= tab_row(t, "model configuration", buf);
    }
    snprintf(buf, sizeof buf, "%d (%d prompt + %d decode)", m->n_tokens, m->n_prompt, m->n_tokens - m->n_prompt);
    rc |= tab_row(t, "tokens", buf);
    if (m->n_segments > 0) {
        int k = snprintf(buf, sizeof buf, "%d, starting at token", m->n_segments);
        for (int s = 0; s < m->n_segments && k < (int)sizeof buf - 16; s++)
            k += snprintf(buf + k, sizeof buf - (size_t)k, "%s %d", s ? "," : "", m->segments[s]);
        rc |= tab_row(t, "segments", buf);
    } else
        rc |= tab_row(t, "segments", "none");
    snprintf(buf, sizeof buf, "%s, zstd level %d%s", m->dtype == KV_DTYPE_F16 ? "f16" : "f32", m->zstd_level,
             m->f16_overflow ? " (some values beyond the f16 range)" : "");
    rc |= tab_row(t, "storage", buf);
    if (m->has_summaries)
        snprintf(buf, sizeof buf, "lse, entropy, accumulated attention, pooled map %dx%d", m->pool, m->pool);
    else
        snprintf(buf, sizeof buf, "none (statistics recomputed from Q and K)");
    rc |= tab_row(t, "summaries", buf);
    rc |= tab_row(t, "W_O", m->has_wo ? "present" : "absent");
    snprintf(buf, sizeof buf, "kvsim %s (git %s), %s", m->tool_version[0] ? m->tool_version : "?",
             m->git_revision[0] ? m->git_revision : "?", m->created[0] ? m->created : "date unknown");
    rc |= tab_row(t, "written by", buf);
    if (m->backend[0])
        rc |= tab_row(t, "backend", m->backend);
    if (m->generator[0])
        rc |= tab_row(t, "generator", m->generator);
    if (m->prompt[0]) {
        snprintf(buf, sizeof buf, "\"%.300s%s\"", m->prompt, strlen(m->prompt) > 300 ? "..." : "");
        rc |= tab_row(t, "prompt (excerpt)", buf);
    }
    return rc ? KV_ENOMEM : KV_OK;
}

static int policy_table(table_t *t, const kv_res_set_t *s)
{
    *t = (table_t){.ncol = 2};
    t->head[0] = "name in the figures";
    t->head[1] = "full label (paste into kvsim replay to re-run)";
    for (int p = 0; p < s->n_pol; p++)
        if (tab_row(t, s->shorts[p], s->labels[p]))
            return KV_ENOMEM;
    return KV_OK;
}

static int results_table(table_t *t, const kv_res_set_t *s)
{
    *t = (table_t){.ncol = 12};
    const char *h[] = {"policy",     "budget",     "B (tokens)", "recall mean",   "recall p10",   "recall min",
                       "error mean", "bound mean", "violations", "kept (tokens)", "memory (KiB)", "memory / full"};
    for (int i = 0; i < 12; i++) {
        t->head[i] = h[i];
        t->right[i] = i >= 2;
    }
    int budgets[256];
    const int nb = kv_res_set_budgets(s, budgets, 256);
    /* the full cache's memory: any policy that evicts nothing stores it (full, quest) */
    const int full = kv_res_set_policy_flagged(s, KV_POL_NO_EVICT);
    for (int p = 0; p < s->n_pol; p++)
        for (int b = 0; b < nb; b++) {
            const kv_res_row_t *r = kv_res_set_find(s, p, budgets[b], -1, -1);
            if (!r)
                continue;
            const kv_res_row_t *f = full >= 0 ? kv_res_set_find(s, full, budgets[b], -1, -1) : NULL;
            /* full keeps every token whatever the budget: its memory at any budget will do when it
             * was not replayed at this one (another results file, another budget list) */
            for (int k = 0; !f && full >= 0 && k < nb; k++)
                f = kv_res_set_find(s, full, budgets[k], -1, -1);
            double mem = r->mem_bytes + (isnan(r->meta_bytes) ? 0 : r->meta_bytes);
            char c[12][48];
            snprintf(c[2], 48, "%d", r->budget_tokens);
            fmt_num(c[3], 48, r->recall_mean, "%.4f");
            fmt_num(c[4], 48, r->recall_p10, "%.4f");
            fmt_num(c[5], 48, r->recall_min, "%.4f");
            fmt_sig(c[6], 48, r->err_mean);
            fmt_sig(c[7], 48, r->bound_mean);
            fmt_num(c[8], 48, r->violations, "%.0f");
            fmt_num(c[9], 48, r->kept, "%.1f");
            fmt_num(c[10], 48, mem / 1024, "%.1f");
            if (f && f->mem_bytes > 0)
                snprintf(c[11], 48, "%.1f %%", 100 * mem / f->mem_bytes);
            else
                snprintf(c[11], 48, "-");
            if (tab_row(t, s->shorts[p], r->budget, c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]))
                return KV_ENOMEM;
        }
    return KV_OK;
}

static int funnel_table(table_t *t, const kv_funnel_t *f)
{
    *t = (table_t){.ncol = 6};
    static char fh[64];
    snprintf(fh, sizeof fh, "keys for %.0f %% (fraction)", 100 * f->mass);
    const char *h[] = {"layer", "entropy (nats)", "normalised entropy", fh, "sink mass", "in-segment mass"};
    for (int i = 0; i < 6; i++) {
        t->head[i] = h[i];
        t->right[i] = 1;
    }
    for (int l = 0; l < f->n_layers; l++) {
        const double *fields[5] = {f->entropy, f->norm_entropy, f->frac, f->sink, f->seg};
        char c[6][64];
        snprintf(c[0], 64, "%d", l);
        for (int k = 0; k < 5; k++) {
            double mean = kv_funnel_layer_mean(f, fields[k], l), lo = INFINITY, hi = -INFINITY;
            for (int h2 = 0; h2 < f->n_heads; h2++) {
                double v = fields[k][(size_t)l * f->n_heads + h2];
                if (!isnan(v)) {
                    lo = fmin(lo, v);
                    hi = fmax(hi, v);
                }
            }
            if (isnan(mean))
                snprintf(c[k + 1], 64, "-");
            else
                snprintf(c[k + 1], 64, "%.3g (%.3g..%.3g)", mean, lo, hi); /* sink masses can be ~1e-4 */
        }
        if (tab_row(t, c[0], c[1], c[2], c[3], c[4], c[5]))
            return KV_ENOMEM;
    }
    return KV_OK;
}

static int files_table(table_t *t, const kv_res_set_t *s, const char *sha)
{
    *t = (table_t){.ncol = 4};
    t->head[0] = "results file";
    t->head[1] = "trace checksum";
    t->head[2] = "date";
    t->head[3] = "command";
    for (int i = 0; i < s->n_files; i++) {
        const char *match = !s->file_sha[i][0]             ? "not recorded"
                            : !(sha && sha[0])             ? "not checked"
                            : !strcmp(s->file_sha[i], sha) ? "matches the trace"
                                                           : "DIFFERS: results of another trace";
        if (tab_row(t, s->files[i], match, s->file_date[i], s->file_cmd[i]))
            return KV_ENOMEM;
    }
    return KV_OK;
}

/* ---------------------------------------------------------------- highlights */

static void highlights(sbuf_t *md, sbuf_t *html, const kv_res_set_t *s, const kv_funnel_t *f, const char *sha)
{
    sbuf_t items = {0};
    /* funnel: normalised entropy, concentration and sink mass, the first third of the layers against
     * the rest (means over layers, so one odd layer does not decide), and whether the last layers
     * broaden again after the narrowest one */
    if (f && f->n_layers > 1) {
        const int L = f->n_layers, k = L >= 3 ? L / 3 : 1;
        double e_lo = 0, e_hi = 0, c_lo = 0, c_hi = 0, s_lo = 0, s_hi = 0, e_min = INFINITY;
        int l_min = 0;
        for (int l = 0; l < L; l++) {
            const double e = kv_funnel_layer_mean(f, f->norm_entropy, l), c = kv_funnel_layer_mean(f, f->frac, l),
                         sk = kv_funnel_layer_mean(f, f->sink, l);
            *(l < k ? &e_lo : &e_hi) += e / (l < k ? k : L - k);
            *(l < k ? &c_lo : &c_hi) += c / (l < k ? k : L - k);
            *(l < k ? &s_lo : &s_hi) += sk / (l < k ? k : L - k);
            if (e < e_min)
                e_min = e, l_min = l;
        }
        const double e0 = kv_funnel_layer_mean(f, f->norm_entropy, 0),
                     e_last = kv_funnel_layer_mean(f, f->norm_entropy, L - 1);
        char lo[32], hi[32];
        snprintf(lo, sizeof lo, k == 1 ? "layer 0" : "layers 0-%d", k - 1);
        snprintf(hi, sizeof hi, L - k == 1 ? "layer %d" : "layers %d-%d", k, L - 1);
        sb_printf(&items,
                  "Normalised attention entropy averages %.2f in %s (%.2f in layer 0) and %.2f in %s (lowest %.2f in "
                  "layer %d, %.2f in the last); a query needs %.1f %% of its visible keys for %.0f %% of its attention "
                  "in %s and %.1f %% in %s; the attention on token 0 goes from %.3f to %.3f: %s%s.\n",
                  e_lo, lo, e0, e_hi, hi, e_min, l_min, e_last, 100 * c_lo, 100 * f->mass, lo, 100 * c_hi, hi, s_lo,
                  s_hi,
                  e_hi < e_lo && c_hi < c_lo   ? "attention narrows with depth (the pyramid funneling shape)"
                  : e_hi > e_lo && c_hi > c_lo ? "attention is no narrower in the deeper layers (no pyramid funneling)"
                                               : "entropy and concentration disagree on the trend with depth",
                  e_hi < e_lo && l_min < L - 2 && e_last > e_min + 0.5 * (e_hi - e_min) + 0.02
                      ? ", and broadens again in the last layers"
                      : "");
    }
    for (int i = 0; s && sha && sha[0] && i < s->n_files; i++)
        if (s->file_sha[i][0] && strcmp(s->file_sha[i], sha))
            sb_printf(&items,
                      "WARNING: %s holds results of another trace (its trace_sha256 differs from this trace's); "
                      "its rows are shown anyway.\n",
                      s->files[i]);
    if (s && s->n_pol) {
        int budgets[256];
        int nb = kv_res_set_budgets(s, budgets, 256);
        for (int b = 0; b < nb; b++) {
            int best = -1;
            double br = -1;
            for (int p = 0; p < s->n_pol; p++) {
                if (kv_res_set_policy_flags(s, p) & (KV_POL_NO_EVICT | KV_POL_ORACLE))
                    continue; /* ceilings and no-eviction policies */
                const kv_res_row_t *r = kv_res_set_find(s, p, budgets[b], -1, -1);
                if (r && r->recall_mean > br) {
                    br = r->recall_mean;
                    best = p;
                }
            }
            const int orc = kv_res_set_policy_flagged(s, KV_POL_ORACLE);
            const kv_res_row_t *ro = orc >= 0 ? kv_res_set_find(s, orc, budgets[b], -1, -1) : NULL;
            if (best >= 0) {
                char bname[96];
                kv_res_budget_name(s, budgets[b], bname, sizeof bname);
                sb_printf(&items, "Budget %s: the best evicting policy by mean recall is %s (%.4f)", bname,
                          s->shorts[best], br);
                if (ro)
                    sb_printf(&items, "; the per-query oracle reaches %.4f", ro->recall_mean);
                sb_puts(&items, ".\n");
            }
        }
        /* budgets no larger than a policy's window: a recent-token cache, whatever it scores */
        sbuf_t win = {0};
        for (int p = 0; p < s->n_pol; p++) {
            kv_policy_t *pol = NULL;
            if (kv_policy_create(s->labels[p], &pol) != KV_OK)
                continue; /* a label of another kvsim version: nothing to say */
            const int w = kv_policy_kept_window(pol);
            kv_policy_free(pol);
            int n = 0;
            for (int b = 0; b < nb && w > 0; b++) {
                const kv_res_row_t *r = kv_res_set_find(s, p, budgets[b], -1, -1);
                if (!r || budgets[b] > w || r->kept < budgets[b] - 0.5)
                    continue; /* above the window, or the whole context fits (nothing evicted) */
                if (n++ == 0)
                    sb_printf(&win, "%s%s (window %d) at %s", win.n ? "; " : "", s->shorts[p], w, r->budget);
                else
                    sb_printf(&win, ", %s", r->budget);
            }
        }
        if (win.n)
            sb_printf(&items,
                      "At budgets no larger than the window a policy always keeps, it keeps the last B context tokens "
                      "and its scores select nothing (its numbers there are a recent-token cache's): %s.\n",
                      win.s);
        kv_free(win.s);
        double viol = 0;
        for (size_t r = 0; r < s->n; r++)
            if (s->rows[r].layer < 0 && s->rows[r].head < 0 && s->rows[r].violations > 0)
                viol += s->rows[r].violations;
        if (viol > 0)
            sb_printf(&items,
                      "WARNING: %.0f evaluation queries exceed the Ada-KV bound beyond float tolerance "
                      "(expected 0); see the violations column.\n",
                      viol);
        else
            sb_puts(&items, "No bound violations: every measured output error is at most the Ada-KV bound.\n");
        if (s->n_duplicates)
            sb_printf(&items,
                      "%d rows repeated the policy, per-head budget, layer and head of an earlier row and were "
                      "ignored (the first one is used).\n",
                      s->n_duplicates);
        if (s->n_nan_rows)
            sb_printf(&items,
                      "WARNING: %ld rows with nan or infinite metrics (NaN or inf values in the trace, see the "
                      "nonfinite column) were left out of the figures and tables.\n",
                      s->n_nan_rows);
    }
    if (!items.n) {
        kv_free(items.s);
        return;
    }
    sb_puts(md, "## Highlights\n\n");
    sb_puts(html, "<h2>Highlights</h2>\n<ul>\n");
    char *line = items.s;
    while (line && *line) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        sb_puts(md, "- ");
        sb_md(md, line);
        sb_puts(md, "\n");
        sb_puts(html, strncmp(line, "WARNING", 7) ? "<li>" : "<li class=\"warn\">");
        sb_html(html, line);
        sb_puts(html, "</li>\n");
        line = nl ? nl + 1 : NULL;
    }
    sb_puts(md, "\n");
    sb_puts(html, "</ul>\n");
    kv_free(items.s);
}

/* ---------------------------------------------------------------- the run */

static const char CSS[] =
    "body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Helvetica,Arial,sans-serif;color:#1f1f1f;"
    "max-width:1280px;margin:2em auto;padding:0 1.5em;line-height:1.45}"
    "h1{font-size:1.7em;margin-bottom:.2em}h2{font-size:1.3em;border-bottom:1px solid #ddd;padding-bottom:.2em;"
    "margin-top:2em}h3{font-size:1.08em}"
    ".sub{color:#555}.note{background:#fff4e0;border-left:5px solid #e69f00;padding:.6em 1em;margin:1em 0}"
    "li.warn{color:#b00000;font-weight:bold}"
    "figure{margin:1.5em 0}figure img{max-width:100%;height:auto;border:1px solid #e4e4e4}"
    "figcaption{color:#444;font-size:.95em;margin-top:.4em}"
    ".tw{overflow-x:auto}table{border-collapse:collapse;font-size:.88em;margin:.6em 0}"
    "th,td{border:1px solid #d8d8d8;padding:.25em .55em;vertical-align:top}th{background:#f3f3f3;text-align:left}"
    "td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}tbody tr:nth-child(even){background:#fafafa}"
    "table.labels td:nth-child(2){font-family:monospace;font-size:.92em}"
    "table.prov td:nth-child(2){word-break:break-all}code{font-size:.92em}";

static int add_figure(outs_t *w, figure_t *figs, int *n, kv_fig_t *fig, const char *dir, const char *name,
                      const char *fmt, const char *title, const char *caption)
{
    figure_t *F = &figs[*n];
    memset(F, 0, sizeof *F);
    snprintf(F->file, sizeof F->file, "%s.%s", name, fmt);
    snprintf(F->title, sizeof F->title, "%s", title);
    snprintf(F->caption, sizeof F->caption, "%s", caption);
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, F->file);
    /* drawn into memory: the same bytes go to the file and, for PNG and SVG, into the HTML */
    char *bytes = NULL;
    size_t len = 0;
    FILE *ms = open_memstream(&bytes, &len), *f = NULL;
    if (!ms)
        return kv_error(KV_ENOMEM, "%s: cannot draw into memory", path);
    int rc = kv_fig_write(fig, fmt, ms, path);
    if (fclose(ms) != 0 && rc == KV_OK)
        rc = kv_error(KV_ENOMEM, "%s: cannot draw into memory", path);
    if (rc == KV_OK)
        rc = open_member(w, path, 0, &f);
    if (rc == KV_OK)
        fwrite(bytes, 1, len, f); /* a failed write is reported when the set is committed */
    if (rc == KV_OK && !strcmp(fmt, "pdf")) {
        rc = fig_png(fig, &F->embed, &F->embed_n);
        F->mime = "image/png";
    } else if (rc == KV_OK) {
        F->embed = (unsigned char *)bytes;
        F->embed_n = len;
        bytes = NULL;
        F->mime = !strcmp(fmt, "svg") ? "image/svg+xml" : "image/png";
    }
    free(bytes);
    if (rc)
        return rc;
    kv_debug("analyze: drew %s", path);
    (*n)++;
    return KV_OK;
}

/* ---------------------------------------------------------------- closed loop (kvsim eval, kvsim niah) */

#define MAX_FIGS 32

static int closed_figures(outs_t *w, figure_t *figs, int *n_fig, const kv_closed_set_t *cs, const kv_open_closed_t *oc,
                          int n_replay, const char *dir, const char *fmt, char (*skipped)[512], int *n_skip)
{
    struct {
        int want;
        const char *name, *title, *caption;
    } f[] = {
        {cs->n_ev > 0, "closed_loop_budget", "Closed loop: loss against the budget",
         "kvsim eval: every configuration decodes with its compressed cache and the full cache's reference "
         "continuation is teacher-forced through it. Left: mean KL(full || compressed) of the next-token "
         "distribution over the continuation's steps (a configuration that keeps every token gives exactly 0 and "
         "is not drawn on the log axis). Right: the share of steps whose top-1 token is the full cache's."},
        {cs->n_ev > 0 && n_replay > 0, "open_vs_closed", "Open loop vs closed loop",
         "One point per policy at each budget (up to four budgets), on the same prompt: replay's numbers "
         "(x: measured on the full-cache run's own queries, open loop) against eval's (y: the model decoding on "
         "its compressed cache, closed loop). Top: attention lost (1 - recall) against KL; bottom: replay's "
         "output error against eval's top-1 disagreement. Titles: Spearman's rank correlation, and how many "
         "pairs of policies replay's recall and eval's KL order differently. Configurations that lose nothing "
         "in either loop are left out."},
        {cs->n_ni > 0, "niah_grid", "Needle in a haystack: length x depth",
         "kvsim niah: one panel per configuration, the full cache first; a cell is one prompt of that length "
         "(tokens, template included, the longest of whole filler sentences within it) with the needle at that "
         "depth of the filler (0 %: first, 100 %: last, just before the question); 1 = the greedy answer holds "
         "the key. Panel titles: the share of cells retrieved. The layout of PyramidKV's needle figure."},
        {cs->n_ni > 0, "niah_scores", "Needle in a haystack: score per budget",
         "The share of the length x depth grid each policy retrieves at each budget; dashed: the full cache."},
    };
    int rc = KV_OK;
    for (size_t i = 0; i < KV_ARRAY_LEN(f) && rc == KV_OK; i++) {
        if (!f[i].want)
            continue;
        kv_fig_t *fig = NULL;
        rc = i == 0   ? kv_analyze_fig_eval_budget(cs, &fig)
             : i == 1 ? kv_analyze_fig_open_closed(cs, oc, &fig)
             : i == 2 ? kv_analyze_fig_niah_grid(cs, &fig)
                      : kv_analyze_fig_niah_summary(cs, &fig);
        if (rc == KV_EUNAVAIL) {
            if (*n_skip < 8)
                snprintf(skipped[(*n_skip)++], 512, "%s: not drawn: %s", f[i].name, kv_last_error());
            rc = KV_OK;
            continue;
        }
        if (rc == KV_OK && *n_fig < MAX_FIGS)
            rc = add_figure(w, figs, n_fig, fig, dir, f[i].name, fmt, f[i].title, f[i].caption);
        kv_fig_free(fig);
    }
    return rc;
}

static void closed_highlights(sbuf_t *md, sbuf_t *html, const kv_closed_set_t *cs, const kv_open_closed_t *oc)
{
    sbuf_t it = {0};
    for (int b = 0; b < oc->n_budgets; b++) {
        const kv_oc_budget_t *B = &oc->b[b];
        sb_printf(&it,
                  "Open vs closed loop at B = %d: over %d configurations, Spearman's rank correlation of replay's "
                  "attention loss with eval's KL is %.2f (output error with KL %.2f; with top-1 disagreement %.2f "
                  "and %.2f); %d of %d policy pairs are ordered differently by replay's recall and eval's KL.\n",
                  B->budget_tokens, B->n, B->rho_loss_kl, B->rho_err_kl, B->rho_loss_dis, B->rho_err_dis, B->discordant,
                  B->pairs);
    }
    double full = NAN;
    for (size_t i = 0; i < cs->n_ni; i++)
        if (cs->ni[i].full && cs->ni[i].length < 0)
            full = cs->ni[i].found;
    if (!isnan(full)) {
        sb_printf(&it, "Needle in a haystack: the full cache retrieves the key in %.0f %% of the cells", 100 * full);
        double best = -1;
        int bp = -1, bt = 0;
        for (size_t i = 0; i < cs->n_ni; i++)
            if (!cs->ni[i].full && cs->ni[i].length < 0 && cs->ni[i].found > best)
                best = cs->ni[i].found, bp = cs->ni[i].pol, bt = cs->ni[i].budget_tokens;
        if (bp >= 0)
            sb_printf(&it, "; the best compressed configuration is %s at B = %d (%.0f %%)", cs->shorts[bp], bt,
                      100 * best);
        sb_puts(&it, ".\n");
    }
    if (!it.n)
        return;
    sb_puts(md, "## Closed loop\n\n");
    sb_puts(html, "<h2>Closed loop</h2>\n<ul>\n");
    for (char *line = it.s; line && *line;) {
        char *nl = strchr(line, '\n');
        if (nl)
            *nl = 0;
        sb_puts(md, "- ");
        sb_md(md, line);
        sb_puts(md, "\n");
        sb_puts(html, "<li>");
        sb_html(html, line);
        sb_puts(html, "</li>\n");
        line = nl ? nl + 1 : NULL;
    }
    sb_puts(md, "\n");
    sb_puts(html, "</ul>\n");
    kv_free(it.s);
}

static void put_section(sbuf_t *md, sbuf_t *html, const char *h, const char *text, const table_t *t, const char *cls)
{
    sb_printf(md, "## %s\n\n", h);
    sb_md(md, text);
    sb_puts(md, "\n\n");
    tab_md(md, t);
    sb_puts(html, "<h2>");
    sb_html(html, h);
    sb_puts(html, "</h2>\n<p>");
    sb_html(html, text);
    sb_puts(html, "</p>\n");
    tab_html(html, t, cls);
}

static int closed_tables(sbuf_t *md, sbuf_t *html, const kv_closed_set_t *cs, const kv_open_closed_t *oc, table_t *te,
                         table_t *tn, table_t *to)
{
    char c[12][96];
    int rc = KV_OK;
    if (cs->n_ev) {
        *te = (table_t){.ncol = 10};
        const char *h[] = {"policy", "budget",    "B (tokens)", "kept (tokens)",  "KL mean",
                           "KL max", "agreement", "first div.", "NLL - full NLL", "memory (KiB)"};
        for (int i = 0; i < 10; i++)
            te->head[i] = h[i], te->right[i] = i >= 2;
        for (size_t i = 0; i < cs->n_ev && rc == KV_OK; i++) {
            const kv_eval_row_t *e = &cs->ev[i];
            snprintf(c[0], 96, "%d", e->budget_tokens);
            fmt_num(c[1], 96, e->kept, "%.1f");
            fmt_sig(c[2], 96, e->kl);
            fmt_sig(c[3], 96, e->kl_max);
            fmt_num(c[4], 96, e->agree, "%.3f");
            if (isnan(e->first_div))
                snprintf(c[5], 96, "none");
            else
                snprintf(c[5], 96, "%.0f", e->first_div);
            fmt_sig(c[6], 96, e->dnll);
            fmt_num(c[7], 96, e->mem / 1024, "%.1f");
            rc = tab_row(te, cs->shorts[e->pol], e->budget, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]);
        }
        if (rc)
            return rc;
        put_section(md, html, "Closed-loop evaluation (kvsim eval)",
                    "Summary rows: the reference continuation teacher-forced through each compressed cache. KL: "
                    "KL(full || compressed) of the next-token distribution in nats, mean and maximum over the steps "
                    "after the first token (the first comes from the prefill, with the full cache, in every "
                    "configuration); agreement: share of those steps whose top-1 token is the full cache's; first "
                    "div.: the first step whose top-1 differs (with the greedy reference: where greedy decoding "
                    "leaves the full cache's output); NLL - full NLL: the reference's mean NLL per token under the "
                    "compressed cache minus under the full cache; kept: prompt tokens in the cache a step reads, mean "
                    "over layers and storage heads; memory: float32 K and V of the cache at its largest.",
                    te, "res");
    }
    if (cs->n_ni) {
        *tn = (table_t){.ncol = 6};
        const char *h[] = {"policy", "budget", "B (tokens)", "retrieved", "by prompt length", "KL on the answer"};
        for (int i = 0; i < 6; i++)
            tn->head[i] = h[i], tn->right[i] = i >= 2 && i != 4;
        for (size_t i = 0; i < cs->n_ni && rc == KV_OK; i++) {
            const kv_niah_row_t *r = &cs->ni[i];
            if (r->length >= 0)
                continue;
            char by[512] = "";
            size_t k = 0;
            for (int len = 0, prev = -1;; prev = len) { /* ascending lengths */
                len = 1 << 30;
                for (size_t j = 0; j < cs->n_ni; j++)
                    if (cs->ni[j].length > prev && cs->ni[j].length < len)
                        len = cs->ni[j].length;
                if (len == 1 << 30)
                    break;
                double sum = 0;
                int n = 0;
                for (size_t j = 0; j < cs->n_ni; j++)
                    if (cs->ni[j].length == len && cs->ni[j].pol == r->pol && !strcmp(cs->ni[j].budget, r->budget))
                        sum += cs->ni[j].found, n++;
                if (n && k + 32 < sizeof by)
                    k += (size_t)snprintf(by + k, sizeof by - k, "%s%d: %.0f%%", k ? ", " : "", len, 100 * sum / n);
            }
            if (r->full)
                snprintf(c[0], 96, "-");
            else
                snprintf(c[0], 96, "%d", r->budget_tokens);
            snprintf(c[1], 96, "%.0f %%", 100 * r->found);
            fmt_sig(c[2], 96, r->kl);
            rc = tab_row(tn, r->full ? "full cache" : cs->shorts[r->pol], r->full ? "-" : r->budget, c[0], c[1], by,
                         c[2]);
        }
        if (rc)
            return rc;
        put_section(md, html, "Needle in a haystack (kvsim niah)",
                    "Share of the length x depth cells whose greedy answer holds the key, overall and per prompt "
                    "length; KL on the answer: the mean KL(full || compressed) over the steps of the full cache's "
                    "answer teacher-forced through the compressed cache (a continuous signal where retrieval is all "
                    "or nothing).",
                    tn, "res");
    }
    if (oc->n_budgets) {
        *to = (table_t){.ncol = 8};
        const char *h[] = {"B (tokens)",
                           "configurations",
                           "rho(recall loss, KL)",
                           "rho(error, KL)",
                           "rho(recall loss, 1-agr.)",
                           "rho(error, 1-agr.)",
                           "discordant pairs",
                           "largest rank changes (replay -> eval)"};
        for (int i = 0; i < 8; i++)
            to->head[i] = h[i], to->right[i] = i < 7;
        for (int b = 0; b < oc->n_budgets && rc == KV_OK; b++) {
            const kv_oc_budget_t *B = &oc->b[b];
            snprintf(c[0], 96, "%d", B->budget_tokens);
            snprintf(c[1], 96, "%d", B->n);
            fmt_num(c[2], 96, B->rho_loss_kl, "%.2f");
            fmt_num(c[3], 96, B->rho_err_kl, "%.2f");
            fmt_num(c[4], 96, B->rho_loss_dis, "%.2f");
            fmt_num(c[5], 96, B->rho_err_dis, "%.2f");
            snprintf(c[6], 96, "%d of %d", B->discordant, B->pairs);
            char moves[700] = "";
            size_t k = 0;
            int used[256] = {0};
            for (int m = 0; m < 4; m++) { /* the four largest moves, at least 2 ranks */
                int best = -1;
                double bd = 1.5;
                for (int j = 0; j < B->n && j < 256; j++) {
                    const double d = fabs(B->cfg[j].rank_open - B->cfg[j].rank_closed);
                    if (!used[j] && d > bd)
                        bd = d, best = j;
                }
                if (best < 0)
                    break;
                used[best] = 1;
                k += (size_t)snprintf(moves + k, sizeof moves - k, "%s%s %.0f -> %.0f", k ? "; " : "",
                                      cs->shorts[B->cfg[best].pol], B->cfg[best].rank_open, B->cfg[best].rank_closed);
                if (k >= sizeof moves)
                    break;
            }
            rc = tab_row(to, c[0], c[1], c[2], c[3], c[4], c[5], c[6], moves[0] ? moves : "none");
        }
        if (rc)
            return rc;
        put_section(md, html, "Open loop vs closed loop",
                    "Per budget, the configurations that both replay (on a trace of this prompt) and eval measured: "
                    "Spearman's rank correlation between replay's numbers (attention lost 1 - recall, output error) "
                    "and eval's (KL, top-1 disagreement); 1 = the same ranking. Discordant pairs: pairs of policies "
                    "that replay's recall and eval's KL order differently. Rank changes: a policy's rank by replay's "
                    "recall loss and by eval's KL (1 = loses least).",
                    to, "res");
    }
    return KV_OK;
}

int kv_analyze_run(kv_trace_t *t, const char *trace_path, const char *const *results, int n_results, kv_backend_t *be,
                   const kv_analyze_opts_t *opt, kv_analyze_out_t *out)
{
    kv_analyze_opts_t o;
    if (opt)
        o = *opt;
    else
        kv_analyze_opts_init(&o);
    if (!o.out_dir)
        o.out_dir = "out/analyze";
    if (!o.format || !o.format[0])
        o.format = "png";
    if (strcasecmp(o.format, "png") && strcasecmp(o.format, "svg") && strcasecmp(o.format, "pdf"))
        return kv_error(KV_EINVAL, "unknown figure format '%s' (png, svg or pdf)", o.format);
    char fmt[4];
    for (int i = 0; i < 3; i++)
        fmt[i] = (char)(o.format[i] | 0x20);
    fmt[3] = 0;
    o.funnel.quiet |= o.quiet;
    if (out)
        memset(out, 0, sizeof *out);

    const kv_trace_meta_t *m = t ? kv_trace_meta(t) : NULL;
    char sha[65] = "";
    kv_res_set_t *rs = NULL;
    kv_closed_set_t *cs = NULL;
    kv_open_closed_t oc = {0};
    kv_funnel_t *fs = NULL;
    figure_t *figs = kv_calloc(MAX_FIGS, sizeof(figure_t), "figures");
    int n_replay = 0;
    char skipped[8][512];
    int n_fig = 0, n_skip = 0, rc;
    sbuf_t md = {0}, html = {0};
    table_t tt = {0}, tf = {0}, tp = {0}, tr = {0}, tl = {0}, te = {0}, tn = {0}, to = {0};
    const char **inputs = NULL;
    outs_t w = {NULL, NULL, 0};
    char pmd[1100], phtml[1100];
    if (!figs)
        return KV_ENOMEM;
    if ((rc = mkdir_p(o.out_dir)))
        goto done;
    /* the inputs: no output may be one of them (checked for the reports now, for each figure when
     * it is drawn); the folder must take new files */
    inputs = kv_calloc((size_t)n_results + 1, sizeof *inputs, "input list");
    w.inputs = inputs;
    w.n_inputs = n_results + 1;
    snprintf(pmd, sizeof pmd, "%s/report.md", o.out_dir);
    snprintf(phtml, sizeof phtml, "%s/report.html", o.out_dir);
    if (!inputs) {
        rc = KV_ENOMEM;
        goto done;
    }
    inputs[0] = trace_path;
    for (int i = 0; i < n_results; i++)
        inputs[i + 1] = results[i];
    if ((rc = kv_out_check(pmd, inputs, n_results + 1)) || (rc = kv_out_check(phtml, inputs, n_results + 1)) ||
        (rc = kv_out_set_create(&w.set)))
        goto done;
    if (t && trace_path && strcmp(trace_path, "(memory)") && (rc = kv_sha256_file(trace_path, sha)))
        goto done;
    if ((rc = kv_res_set_create(&rs)) || (rc = kv_closed_set_create(&cs)))
        goto done;
    if (m) {
        rs->max_layers = m->n_layers; /* rows beyond the trace's shape are refused */
        rs->max_heads = m->n_heads;
    }
    for (int i = 0; i < n_results; i++) { /* replay results, or kvsim eval / niah ones */
        if (!o.quiet)
            kv_info("analyze: reading %s", results[i]);
        kv_res_kind_t kind;
        if ((rc = kv_res_kind(results[i], &kind)))
            goto done;
        if (kind == KV_RES_REPLAY)
            rc = kv_res_set_load(rs, results[i], sha), n_replay++;
        else
            rc = kv_closed_set_load(cs, results[i]);
        if (rc)
            goto done;
    }
    if (!t && n_replay) {
        rc = kv_error(KV_EINVAL, "replay results need their trace (kvsim analyze TRACE.h5 RESULTS.tsv ...)");
        goto done;
    }
    if ((rc = kv_res_set_finish(rs)))
        goto done;

    if (t && (rc = kv_funnel_compute(t, be, &o.funnel, &fs)))
        goto done;
    if (n_replay && cs->n_ev && (rc = kv_open_closed_compute(rs, cs, &oc)))
        goto done;
    /* statistics that came out NaN (NaN or inf in the trace): said, not averaged away in silence */
    char nan_where[256] = "";
    long nan_heads = 0;
    for (int l = 0; fs && l < fs->n_layers; l++)
        for (int h = 0; h < fs->n_heads; h++) {
            const size_t i = (size_t)l * fs->n_heads + h;
            if (!isnan(fs->entropy[i]) && !isnan(fs->frac[i]) && !isnan(fs->sink[i]))
                continue;
            if (nan_heads++ < 6) {
                const size_t k = strlen(nan_where);
                snprintf(nan_where + k, sizeof nan_where - k, "%slayer %d head %d", nan_heads > 1 ? ", " : "", l, h);
            }
        }
    if (nan_heads)
        kv_warn("%s: the funnel statistics of %ld head%s are nan (%s%s): the trace holds NaN or inf there (kvsim "
                "info --verify names them); layer means and figures leave them out",
                trace_path ? trace_path : "(trace)", nan_heads, nan_heads == 1 ? "" : "s", nan_where,
                nan_heads > 6 ? ", ..." : "");

    /* ---- figures */
    kv_progress_t pr;
    const int n_steps =
        (t ? 2 : 0) + (n_replay ? 5 : 0) + (cs->n_ev ? 1 + (n_replay != 0) : 0) + (cs->n_ni ? 2 : 0) + 1;
    if (!o.quiet)
        kv_progress_begin(&pr, "figures", n_steps);
    int step = 0;
    kv_fig_t *fig = NULL;
    char cap[768];
#define STEP(what)                                                                                                     \
    do {                                                                                                               \
        if (!o.quiet)                                                                                                  \
            kv_progress_update(&pr, ++step, what);                                                                     \
    } while (0)

    if (t) { /* the trace's own figures */
        if ((rc = kv_analyze_fig_funneling(t, be, &o.map, -1, &fig)))
            goto done;
        {
            kv_map_src_t src = o.map.src;
            if (src == KV_MAP_AUTO) { /* name the source in the caption */
                if (kv_trace_has(t, KV_T_POOLED) && m->pool > 0)
                    src = KV_MAP_POOLED;
                else if (m->n_tokens <= KV_MAP_EXACT_MAX)
                    src = KV_MAP_EXACT;
                else
                    src = KV_MAP_SAMPLED;
            }
            snprintf(
                cap, sizeof cap,
                "Attention of each query (row) over the keys (columns), averaged over the %d heads of each shown "
                "layer, on a log colour scale; blank cells lie above the causal diagonal. Source: %s. Dashed "
                "blue lines mark segment starts, the solid green line the end of the prompt (decode queries below it). "
                "PyramidKV observed that attention is broad in low layers and funnels into a few columns (sinks, "
                "recent tokens, heavy hitters) in high layers, and sizes layer budgets accordingly; compare the "
                "panels, and the entropy curves below, to see how far this trace follows that shape.",
                m->n_heads, kv_map_src_name(src));
        }
        rc = add_figure(&w, figs, &n_fig, fig, o.out_dir, "funneling", fmt, "Pyramid information funneling", cap);
        kv_fig_free(fig);
        fig = NULL;
        if (rc)
            goto done;
        if (o.per_head) {
            int layers[64];
            int nl = o.map.layers && o.map.n_explicit ? KV_MIN(o.map.n_explicit, 64)
                                                      : kv_analyze_pick_layers(m->n_layers, o.map.n_layers, layers);
            for (int i = 0; i < nl && n_fig < 16; i++) {
                int l = o.map.layers && o.map.n_explicit ? o.map.layers[i] : layers[i];
                if ((rc = kv_analyze_fig_funneling(t, be, &o.map, l, &fig)))
                    goto done;
                char name[32], title[64];
                snprintf(name, sizeof name, "funneling_heads_L%d", l);
                snprintf(title, sizeof title, "Attention of every head, layer %d", l);
                snprintf(cap, sizeof cap, "The %d heads of layer %d, each on the shared log colour scale.", m->n_heads,
                         l);
                rc = add_figure(&w, figs, &n_fig, fig, o.out_dir, name, fmt, title, cap);
                kv_fig_free(fig);
                fig = NULL;
                if (rc)
                    goto done;
            }
        }
        STEP("funneling");

        if ((rc = kv_analyze_fig_funnel_curves(fs, &fig)))
            goto done;
        snprintf(
            cap, sizeof cap,
            "Per layer and head, means over the counted queries (those that see at least %d keys: positions %d..%d). "
            "Entropy%s; the fraction of keys for %.0f %% of the attention and the in-segment mass from %s%d "
            "queries per head%s. Entropy in nats; normalised entropy divides it by ln of "
            "the keys the query sees (1 = uniform); sink mass is the attention on token 0; in-segment mass the "
            "attention on keys of the query's own segment. Faint lines: single heads; bold: mean over heads.",
            fs->q_lo + 1, fs->q_lo, fs->n_tokens - 1,
            fs->from_stats ? ", sink mass"
            : fs->from_summaries
                ? " and sink mass over every counted query from the trace's stored entropy and lse summaries"
                : " and sink mass from the sampled queries (the trace has no summaries)",
            100 * fs->mass,
            fs->from_stats                             ? "the statistics the trace stores for "
            : fs->n_sampled == fs->n_tokens - fs->q_lo ? "all "
                                                       : "a sample (evenly spaced runs) of ",
            fs->n_sampled,
            fs->from_stats ? " (computed by capture or synth from every attention row)" : ", recomputed from Q and K");
        rc = add_figure(&w, figs, &n_fig, fig, o.out_dir, "funnel_curves", fmt, "Funnel statistics per layer", cap);
        kv_fig_free(fig);
        fig = NULL;
        if (rc)
            goto done;
        if ((rc = kv_analyze_fig_head_concentration(fs, &fig)))
            goto done;
        {
            double lo = INFINITY, hi = 0;
            for (int i = 0; i < fs->n_layers * fs->n_heads; i++) {
                lo = fmin(lo, fs->frac[i]);
                hi = fmax(hi, fs->frac[i]);
            }
            snprintf(cap, sizeof cap,
                     "For each head, the mean fraction of its visible keys needed to collect %.0f %% of a query's "
                     "attention (lower = more concentrated), sorted within each layer (left) and over all %d heads "
                     "(right). Here the most concentrated head needs %.1f %% of its keys and the broadest %.1f %% (a "
                     "factor of %.0f): the spread that head-adaptive budgets (Ada-KV) redistribute.",
                     100 * fs->mass, fs->n_layers * fs->n_heads, 100 * lo, 100 * hi, lo > 0 ? hi / lo : INFINITY);
        }
        rc = add_figure(&w, figs, &n_fig, fig, o.out_dir, "head_concentration", fmt, "Head concentration", cap);
        kv_fig_free(fig);
        fig = NULL;
        if (rc)
            goto done;
        STEP("funnel statistics");
    }

    if (n_replay && rs->n > 0) {
        struct {
            int (*make)(const kv_res_set_t *, kv_fig_t **);
            const char *name, *title, *caption;
        } rf[] = {
            {NULL, "tradeoff_budget", "Recall, error and bound vs budget",
             "Overall rows (all layers and heads): mean attention recall F (probability mass on kept keys), mean "
             "L1 error of the head output against full attention, and the Ada-KV bound 2C(1-F), against the "
             "per-head budget. Error and bound use a log axis when they span decades; zero values (no eviction) "
             "are not drawn there."},
            {NULL, "tradeoff_memory", "Recall, error and bound vs memory",
             "The same metrics against the bytes the cache really stores, summed over layers and KV heads: K and V "
             "at the trace dtype for the cache at its largest (kept context plus the generated tokens), plus "
             "policy metadata such as Quest's page bounds, so policies that keep more per head or store per "
             "query head pay for it. Quest keeps the whole cache, so its points share one memory value."},
            {kv_analyze_fig_bound, "bound_vs_error", "Bound vs measured error", NULL},
            {kv_analyze_fig_allocation, "budget_allocation", "Budget allocation",
             "Context tokens kept per layer (mean over heads) by the uniform SnapKV, the pyramid-shaped PyramidKV and "
             "the head-adaptive Ada-KV at each budget (dashed: the uniform budget), and below, Ada-KV's tokens per "
             "query head. Up to four budgets at which these policies were replayed are shown."},
            {kv_analyze_fig_recall_heatmap, "recall_heatmap", "Recall per policy and layer",
             "Mean attention recall of every policy in every layer, one panel per budget (up to six, evenly picked "
             "when there are more); a blank row: the policy was not replayed at that budget."},
        };
        for (size_t i = 0; i < KV_ARRAY_LEN(rf); i++) {
            if (i == 0)
                rc = kv_analyze_fig_tradeoff(rs, 0, &fig);
            else if (i == 1)
                rc = kv_analyze_fig_tradeoff(rs, 1, &fig);
            else
                rc = rf[i].make(rs, &fig);
            if (rc == KV_EUNAVAIL) {
                if (n_skip < 8)
                    snprintf(skipped[n_skip++], sizeof skipped[0], "%s: not drawn: %s", rf[i].name, kv_last_error());
                if (!o.quiet)
                    kv_info("analyze: %s not drawn: %s", rf[i].name, kv_last_error());
                rc = KV_OK;
                continue;
            }
            if (rc)
                goto done;
            const char *caption = rf[i].caption;
            if (!caption) { /* bound_vs_error: say whether any row violates the bound */
                long nv = 0, nz = 0;
                for (size_t r = 0; r < rs->n; r++)
                    if (rs->rows[r].layer >= 0 && rs->rows[r].head < 0) {
                        nv += rs->rows[r].violations > 0;
                        nz += !(rs->rows[r].bound_mean > 0) || !(rs->rows[r].err_mean > 0);
                    }
                snprintf(cap, sizeof cap,
                         "One point per policy, budget and layer: the Ada-KV bound against the measured L1 output "
                         "error (means over heads and evaluation queries). The bound holds for points below the "
                         "dashed y = x line. %s%s",
                         nv ? "Large red crosses mark the layer rows with bound violations (see the violations "
                              "column)."
                            : "No row has a bound violation.",
                         nz ? " Rows with a zero error or bound (no eviction, as for full) cannot be placed on log "
                              "axes and are left out."
                            : "");
                caption = cap;
            }
            rc = add_figure(&w, figs, &n_fig, fig, o.out_dir, rf[i].name, fmt, rf[i].title, caption);
            kv_fig_free(fig);
            fig = NULL;
            if (rc)
                goto done;
            STEP(rf[i].name);
        }
    }
    if ((rc = closed_figures(&w, figs, &n_fig, cs, &oc, n_replay, o.out_dir, fmt, skipped, &n_skip)))
        goto done;
    if (!o.quiet && (cs->n_ev || cs->n_ni))
        kv_progress_update(&pr, n_steps - 1, "closed loop");
#undef STEP

    /* ---- report */
    const char *title = o.title ? o.title : "kvsim analysis";
    char now[32];
    kv_iso_time(now, sizeof now);
    sb_printf(&md, "# %s\n\n", title);
    sb_printf(&md, "Written by kvsim %s (git %s) on %s.\n\n", KV_VERSION, kv_git_revision(), now);
    sb_puts(&html, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>");
    sb_html(&html, title);
    sb_printf(&html, "</title>\n<style>%s</style></head><body>\n<h1>", CSS);
    sb_html(&html, title);
    sb_printf(&html, "</h1>\n<p class=\"sub\">Written by kvsim %s (git %s) on %s.</p>\n", KV_VERSION, kv_git_revision(),
              now);
    if (o.note) {
        sb_puts(&md, "> **Note:** ");
        sb_md(&md, o.note);
        sb_puts(&md, "\n\n");
        sb_puts(&html, "<div class=\"note\"><b>Note:</b> ");
        sb_html(&html, o.note);
        sb_puts(&html, "</div>\n");
    }
    if (o.demo_info) {
        sb_md(&md, o.demo_info);
        sb_puts(&md, "\n\n");
        sb_puts(&html, "<p>");
        sb_html(&html, o.demo_info);
        sb_puts(&html, "</p>\n");
    }
    if (nan_heads) {
        char line[512];
        snprintf(line, sizeof line,
                 "The funnel statistics of %ld head%s are nan (%s%s): the trace holds NaN or infinite values there "
                 "(kvsim info --verify names them); layer means and figures leave them out.",
                 nan_heads, nan_heads == 1 ? "" : "s", nan_where, nan_heads > 6 ? ", ..." : "");
        sb_puts(&md, "> **WARNING:** ");
        sb_md(&md, line);
        sb_puts(&md, "\n\n");
        sb_puts(&html, "<div class=\"note\"><b>WARNING:</b> ");
        sb_html(&html, line);
        sb_puts(&html, "</div>\n");
    }
    highlights(&md, &html, n_replay ? rs : NULL, fs, sha);
    closed_highlights(&md, &html, cs, &oc);
    for (int i = 0; i < n_skip; i++) {
        sb_printf(&md, "- %s\n", skipped[i]);
        sb_puts(&html, "<p class=\"sub\">");
        sb_html(&html, skipped[i]);
        sb_puts(&html, "</p>\n");
    }
    if (n_skip)
        sb_puts(&md, "\n");

    /* figures */
    sb_puts(&md, "## Figures\n\n");
    sb_puts(&html, "<h2>Figures</h2>\n");
    for (int i = 0; i < n_fig; i++) {
        figure_t *F = &figs[i];
        sb_printf(&md, "### %s\n\n![%s](%s)\n\n", F->title, F->title, F->file);
        sb_md(&md, F->caption);
        sb_printf(&md, " (file: `%s`)\n\n", F->file);
        char *b64 = kv_base64(F->embed, F->embed_n);
        if (!b64) {
            rc = KV_ENOMEM;
            goto done;
        }
        sb_printf(&html, "<figure id=\"%s\"><h3>", F->file);
        sb_html(&html, F->title);
        sb_printf(&html, "</h3><img alt=\"%s\" src=\"data:%s;base64,", F->title, F->mime);
        sb_puts(&html, b64);
        kv_free(b64);
        sb_puts(&html, "\"><figcaption>");
        sb_html(&html, F->caption);
        sb_printf(&html, " <span class=\"sub\">(file: <code>%s</code>)</span></figcaption></figure>\n", F->file);
    }

    /* tables */
    if (n_replay) {
        if ((rc = results_table(&tr, rs)) || (rc = policy_table(&tp, rs)) || (rc = files_table(&tf, rs, sha)))
            goto done;
        const char *h1 = "Results per policy and budget";
        const char *t1 =
            "Overall rows of the results (all layers and heads). Budget: as given to kvsim replay (tokens per head, "
            "a fraction of the context, or seq: a total); B (tokens): the per-head token budget it resolves to, "
            "observation window included. Recall: the full-attention probability mass on the keys the cache "
            "holds (1 = nothing lost), mean, 10th percentile and minimum over every layer, query head and "
            "evaluation query. Error mean: L1 norm of the difference between the head output with the cache "
            "and with full attention, in the units of the values, mean over the same set. Bound mean: the Ada-KV "
            "bound 2C(1-F), C the largest L1 norm of a value vector, same units. Violations: evaluations whose "
            "error exceeds the bound beyond float tolerance (expected 0). Kept (tokens): context (prompt) tokens "
            "in the cache a query reads, mean over layers, heads and evaluation queries (decode-time policies "
            "count generated tokens against the budget, so this can fall below B; Quest reads a page selection "
            "of the full cache). Memory (KiB, 1 KiB = 1024 bytes): K and V at the trace's dtype for the cache at "
            "its largest (kept context plus the generated tokens), summed over layers and KV heads, plus policy "
            "metadata. Memory / full: the same relative to the full cache. Full keeps every token whatever the "
            "budget; it is the ceiling the others are measured against.";
        sb_printf(&md, "## %s\n\n%s\n\n", h1, t1);
        tab_md(&md, &tr);
        sb_printf(&html, "<h2>%s</h2>\n<p>%s</p>\n", h1, t1);
        tab_html(&html, &tr, "res");
        sb_puts(&md, "## Policies\n\n");
        tab_md(&md, &tp);
        sb_puts(&html, "<h2>Policies</h2>\n");
        tab_html(&html, &tp, "labels");
    }
    if ((rc = closed_tables(&md, &html, cs, &oc, &te, &tn, &to)))
        goto done;
    if (fs && (rc = funnel_table(&tl, fs)))
        goto done;
    if (fs) {
        char t2[1100];
        snprintf(t2, sizeof t2,
                 "Mean over the heads of each layer (minimum..maximum over heads in brackets); queries that see "
                 "at least %d keys; %s; the fraction of keys and the segment mass from %s%d queries per head. "
                 "Entropy: of the query's attention distribution, in nats; normalised: divided by ln of the keys it "
                 "sees (1 = uniform); keys for the mass: the smallest fraction of its visible keys that holds that "
                 "much attention; sink mass: attention on token 0; in-segment mass: attention on keys of the "
                 "query's own segment (- when the trace has no segments).",
                 fs->q_lo + 1,
                 fs->from_stats       ? "every statistic from the per-query statistics the trace stores"
                 : fs->from_summaries ? "entropy and sink mass from the stored summaries over all of them"
                                      : "every statistic from the rows recomputed from Q and K",
                 fs->from_stats                             ? "the stored statistics of all "
                 : fs->n_sampled == fs->n_tokens - fs->q_lo ? "all "
                                                            : "a sample of ",
                 fs->n_sampled);
        sb_printf(&md, "## Funnel statistics per layer\n\n%s\n\n", t2);
        tab_md(&md, &tl);
        sb_printf(&html, "<h2>Funnel statistics per layer</h2>\n<p>%s</p>\n", t2);
        tab_html(&html, &tl, "fun");
    }
    if (t) {
        if ((rc = trace_table(&tt, t, trace_path, sha)))
            goto done;
        sb_puts(&md, "## Trace\n\n");
        tab_md(&md, &tt);
        sb_puts(&html, "<h2>Trace</h2>\n");
        tab_html(&html, &tt, "prov");
    }
    for (int i = 0; i < cs->n_files; i++) {
        sb_printf(&md, "Closed-loop results file `%s`%s%s%s\n\n", cs->files[i], cs->file_cmd[i][0] ? ", made by `" : "",
                  cs->file_cmd[i], cs->file_cmd[i][0] ? "`" : "");
        sb_puts(&html, "<p class=\"sub\">Closed-loop results file <code>");
        sb_html(&html, cs->files[i]);
        sb_puts(&html, "</code>");
        if (cs->file_cmd[i][0]) {
            sb_puts(&html, ", made by <code>");
            sb_html(&html, cs->file_cmd[i]);
            sb_puts(&html, "</code>");
        }
        sb_puts(&html, "</p>\n");
    }
    if (n_replay) {
        sb_puts(&md, "## Results files\n\n");
        tab_md(&md, &tf);
        sb_puts(&html, "<h2>Results files</h2>\n");
        tab_html(&html, &tf, "prov");
    }
    sb_puts(&html, "</body></html>\n");

    if ((rc = write_text(&w, pmd, &md)) || (rc = write_text(&w, phtml, &html)))
        goto done;
    /* every file at once: figures first, then report.md, report.html */
    rc = kv_out_set_commit(w.set);
    w.set = NULL;
    if (rc)
        goto done;
    if (!o.quiet) {
        char det[96];
        snprintf(det, sizeof det, "%d figures, report.md, report.html", n_fig);
        kv_progress_end(&pr, det);
    }
    if (out) {
        out->n_figures = n_fig;
        for (int i = 0; i < n_fig; i++)
            snprintf(out->figures[i], sizeof out->figures[i], "%s", figs[i].file);
        snprintf(out->report_md, sizeof out->report_md, "%s", pmd);
        snprintf(out->report_html, sizeof out->report_html, "%s", phtml);
    }
    rc = KV_OK;
done:
    if (rc != KV_OK) { /* a message that names none of the inputs (a figure's limits, ...) gets them */
        int named = trace_path && strstr(kv_last_error(), trace_path);
        for (int i = 0; i < n_results && !named; i++)
            named = strstr(kv_last_error(), results[i]) != NULL;
        named |= strstr(kv_last_error(), o.out_dir) != NULL;
        if (!named)
            kv_error_context(rc, "%s%s%s", trace_path ? trace_path : "(trace)", n_results ? " with " : "",
                             n_results ? results[0] : "");
    }
    kv_out_set_abort(w.set);
    kv_free(inputs);
    for (int i = 0; i < MAX_FIGS; i++)
        kv_free(figs[i].embed);
    kv_free(figs);
    kv_free(md.s);
    kv_free(html.s);
    tab_free(&tt);
    tab_free(&tf);
    tab_free(&tp);
    tab_free(&tr);
    tab_free(&tl);
    tab_free(&te);
    tab_free(&tn);
    tab_free(&to);
    kv_res_set_free(rs);
    kv_closed_set_free(cs);
    kv_open_closed_free(&oc);
    kv_funnel_free(fs);
    return rc;
}
