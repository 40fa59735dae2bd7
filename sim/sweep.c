/*
 * sweep.c: a sweep over a dataset of prompts (see sweep.h): the manifest and the dataset, the units
 * and their files, resuming, the single-process run, the progress line and the Slurm script. The
 * merge and the bootstrap are in sweep_merge.c, the MPI run in sweep_mpi.c.
 *
 * Files of a sweep, under its output folder OUT:
 *   sweep.json             the settings that decide the results (checked on every run)
 *   samples/ID.tsv         the sample's replay results (the unit is finished when it exists)
 *   samples/ID.funnel.tsv  per-sample statistics of the on_trace hook (analyze's funnel), optional
 *   samples/ID.failed      the error of a failed sample, instead of ID.tsv
 *   samples/ID.lock        held (flock) by the process working on the sample; removed after
 *   traces/ID.h5           the trace, while the sample is replayed or for good with keep_traces
 *   results.tsv aggregate.tsv failed.tsv   the merge
 *   slurm/sweep.sbatch slurm/logs/         --slurm
 * Sample ids come from the dataset (JSONL: the id key, else the line number; folder: the file name
 * without .txt) with every character outside [A-Za-z0-9_-] replaced by '_', so "ID." starts no other
 * sample's file names.
 */
#include "sim/sweep.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "sim/kv_policy.h"
#include "sim/replay.h"
#include "sim/result.h"
#include "sim/sweep_internal.h"
#include "traces/capture/kv_capture.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <glob.h>
#include <json-c/json.h>
#include <limits.h>
#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- small helpers */

static char *dup_or_null(const char *s)
{
    return s ? kv_strdup(s) : NULL;
}

/* path resolved against dir unless absolute, into out. */
static void resolve(const char *dir, const char *path, char *out, size_t len)
{
    if (path[0] == '/' || !dir[0])
        snprintf(out, len, "%s", path);
    else
        snprintf(out, len, "%s/%s", dir, path);
}

/* mkdir -p */
static int make_dirs(const char *path)
{
    char buf[KV_SWEEP_PATH];
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

static int exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Every file of a sweep goes through the output module (sim/common/kv_output.h): a unique
 * temporary file beside it, fsync'ed, renamed, the folder fsync'ed; removed on a failure or a
 * signal. */
int kv_sweep_write_file(const char *path, const char *data, size_t len)
{
    kv_out_t *o;
    int rc = kv_out_open(path, &o);
    if (rc)
        return rc;
    FILE *f = kv_out_stream(o);
    if (!f) {
        kv_out_abort(o);
        return KV_ENOMEM;
    }
    if (len)
        fwrite(data, 1, len, f); /* a failed write is reported by the commit, with its reason */
    return kv_out_commit(o);
}

static void sha256_hex(const char *data, size_t len, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int n = 0;
    EVP_Digest(data, len, md, &n, EVP_sha256(), NULL);
    for (unsigned i = 0; i < 32 && i < n; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    hex[64] = 0;
}

/* ---------------------------------------------------------------- the manifest */

/* One JSON object being read: the manifest's path and the key path for messages. */
typedef struct {
    const char *file;
    const char *prefix; /* "" or "capture." */
} jctx_t;

static int jerr(const jctx_t *c, const char *key, const char *fmt, const char *got)
{
    return kv_error(KV_EINVAL, "%s: %s%s: %s%s%s", c->file, c->prefix, key, fmt, got ? ", got " : "", got ? got : "");
}

static const char *jtext(json_object *v)
{
    return json_object_to_json_string_ext(v, JSON_C_TO_STRING_PLAIN);
}

/* Every key of o is one of keys[]. */
static int check_keys(const jctx_t *c, json_object *o, const char *const *keys, int n)
{
    json_object_object_foreach(o, k, v)
    {
        (void)v;
        int ok = 0;
        for (int i = 0; i < n && !ok; i++)
            ok = !strcmp(k, keys[i]);
        if (!ok) {
            char list[1024];
            size_t u = 0;
            for (int i = 0; i < n; i++)
                u += (size_t)snprintf(list + u, u < sizeof list ? sizeof list - u : 0, "%s%s", i ? ", " : "", keys[i]);
            if (!strcmp(c->prefix, "") && !strcmp(k, "eval"))
                return kv_error(KV_EINVAL,
                                "%s: eval: closed-loop evaluation does not run inside sweeps yet (issue 13 added it "
                                "as kvsim eval: run that on a sample's prompt); remove the key",
                                c->file);
            return kv_error(KV_EINVAL, "%s: %s%s: unknown key (valid keys: %s)", c->file, c->prefix, k, list);
        }
    }
    return KV_OK;
}

static int get_str(const jctx_t *c, json_object *o, const char *key, int required, const char *def, char *out,
                   size_t len)
{
    json_object *v;
    if (!o || !json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null)) {
        if (required)
            return kv_error(KV_EINVAL, "%s: %s%s: required key is missing", c->file, c->prefix, key);
        snprintf(out, len, "%s", def ? def : "");
        return KV_OK;
    }
    if (!json_object_is_type(v, json_type_string))
        return jerr(c, key, "expected a string", jtext(v));
    const char *s = json_object_get_string(v);
    if (strlen(s) >= len)
        return jerr(c, key, "too long", NULL);
    if (required && !s[0])
        return jerr(c, key, "must not be empty", NULL);
    snprintf(out, len, "%s", s);
    return KV_OK;
}

static int get_strdup(const jctx_t *c, json_object *o, const char *key, const char *def, char **out)
{
    json_object *v;
    *out = NULL;
    if (!o || !json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null)) {
        *out = dup_or_null(def);
        return def && !*out ? KV_ENOMEM : KV_OK;
    }
    if (!json_object_is_type(v, json_type_string))
        return jerr(c, key, "expected a string", jtext(v));
    *out = kv_strdup(json_object_get_string(v));
    return *out ? KV_OK : KV_ENOMEM;
}

static int get_int(const jctx_t *c, json_object *o, const char *key, long lo, long hi, long def, long *out)
{
    json_object *v;
    if (!o || !json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null)) {
        *out = def;
        return KV_OK;
    }
    char want[96];
    snprintf(want, sizeof want, "expected an integer in [%ld, %ld]", lo, hi);
    if (!json_object_is_type(v, json_type_int))
        return jerr(c, key, want, jtext(v));
    errno = 0;
    int64_t x = json_object_get_int64(v);
    if (errno || x < lo || x > hi)
        return jerr(c, key, want, jtext(v));
    *out = (long)x;
    return KV_OK;
}

static int get_num(const jctx_t *c, json_object *o, const char *key, double lo, double hi, double def, double *out)
{
    json_object *v;
    if (!o || !json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null)) {
        *out = def;
        return KV_OK;
    }
    char want[96];
    snprintf(want, sizeof want, "expected a number in (%g, %g)", lo, hi);
    if (!json_object_is_type(v, json_type_int) && !json_object_is_type(v, json_type_double))
        return jerr(c, key, want, jtext(v));
    double x = json_object_get_double(v);
    if (!(x > lo && x < hi))
        return jerr(c, key, want, jtext(v));
    *out = x;
    return KV_OK;
}

static int get_bool(const jctx_t *c, json_object *o, const char *key, int def, int *out)
{
    json_object *v;
    if (!o || !json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null)) {
        *out = def;
        return KV_OK;
    }
    if (!json_object_is_type(v, json_type_boolean))
        return jerr(c, key, "expected true or false", jtext(v));
    *out = json_object_get_boolean(v);
    return KV_OK;
}

/* A sub-object (absent: NULL), with its keys checked. */
static int get_obj(const jctx_t *c, json_object *o, const char *key, const char *const *keys, int n, json_object **out)
{
    json_object *v;
    *out = NULL;
    if (!json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null))
        return KV_OK;
    if (!json_object_is_type(v, json_type_object))
        return jerr(c, key, "expected an object", jtext(v));
    char prefix[128];
    snprintf(prefix, sizeof prefix, "%s%s.", c->prefix, key);
    jctx_t sub = {c->file, prefix};
    int rc = check_keys(&sub, v, keys, n);
    if (rc)
        return rc;
    *out = v;
    return KV_OK;
}

/* A comma list given as a string or as an array of strings (and numbers, for budgets). */
static int get_list(const jctx_t *c, json_object *o, const char *key, int numbers, char **out)
{
    json_object *v;
    *out = NULL;
    if (!json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null))
        return kv_error(KV_EINVAL, "%s: %s%s: required key is missing", c->file, c->prefix, key);
    if (json_object_is_type(v, json_type_string)) {
        if (!json_object_get_string(v)[0])
            return jerr(c, key, "must not be empty", NULL);
        *out = kv_strdup(json_object_get_string(v));
        return *out ? KV_OK : KV_ENOMEM;
    }
    const char *want = numbers ? "expected a string or an array of numbers and strings"
                               : "expected a string or an "
                                 "array of strings";
    if (!json_object_is_type(v, json_type_array) || json_object_array_length(v) == 0)
        return jerr(c, key, want, jtext(v));
    size_t cap = 16, u = 0;
    for (size_t i = 0; i < json_object_array_length(v); i++)
        cap += strlen(jtext(json_object_array_get_idx(v, i))) + 2;
    char *s = kv_malloc(cap, "list");
    if (!s)
        return KV_ENOMEM;
    s[0] = 0;
    for (size_t i = 0; i < json_object_array_length(v); i++) {
        json_object *e = json_object_array_get_idx(v, i);
        const int num = json_object_is_type(e, json_type_int) || json_object_is_type(e, json_type_double);
        if (!json_object_is_type(e, json_type_string) && !(numbers && num)) {
            char k[96];
            snprintf(k, sizeof k, "%s[%zu]", key, i);
            kv_free(s);
            return jerr(c, k, numbers ? "expected a number or a string" : "expected a string", jtext(e));
        }
        u += (size_t)snprintf(s + u, cap - u, "%s%s", i ? "," : "", num ? jtext(e) : json_object_get_string(e));
    }
    *out = s;
    return KV_OK;
}

static int get_str_array(const jctx_t *c, json_object *o, const char *key, char ***out, int *n)
{
    json_object *v;
    *out = NULL;
    *n = 0;
    if (!o || !json_object_object_get_ex(o, key, &v) || json_object_is_type(v, json_type_null))
        return KV_OK;
    if (!json_object_is_type(v, json_type_array))
        return jerr(c, key, "expected an array of strings", jtext(v));
    const int m = (int)json_object_array_length(v);
    char **a = kv_calloc((size_t)(m ? m : 1), sizeof(char *), "strings");
    if (!a)
        return KV_ENOMEM;
    for (int i = 0; i < m; i++) {
        json_object *e = json_object_array_get_idx(v, (size_t)i);
        if (!json_object_is_type(e, json_type_string) || strchr(json_object_get_string(e), '\n')) {
            char k[96];
            snprintf(k, sizeof k, "%s[%d]", key, i);
            for (int j = 0; j < i; j++)
                kv_free(a[j]);
            kv_free(a);
            return jerr(c, k, "expected a string of one line", jtext(e));
        }
        if (!(a[i] = kv_strdup(json_object_get_string(e)))) {
            for (int j = 0; j < i; j++)
                kv_free(a[j]);
            kv_free(a);
            return KV_ENOMEM;
        }
    }
    *out = a;
    *n = m;
    return KV_OK;
}

/* Parse a whole JSON text; errors name the file, line and column. */
static int parse_json(const char *file, const char *text, size_t len, json_object **out)
{
    json_tokener *tk = json_tokener_new();
    if (!tk)
        return KV_ENOMEM;
    json_object *o = json_tokener_parse_ex(tk, text, (int)len);
    enum json_tokener_error e = json_tokener_get_error(tk);
    size_t end = json_tokener_get_parse_end(tk);
    if (o && e == json_tokener_success) {
        while (end < len && strchr(" \t\r\n", text[end]))
            end++;
        if (end < len) {
            json_object_put(o);
            o = NULL;
            e = json_tokener_error_parse_unexpected;
        }
    } else if (!o && e == json_tokener_continue) {
        e = json_tokener_error_parse_eof;
    }
    json_tokener_free(tk);
    if (!o) {
        int line = 1, col = 1;
        for (size_t i = 0; i < end && i < len; i++) {
            if (text[i] == '\n') {
                line++;
                col = 1;
            } else
                col++;
        }
        return kv_error(KV_EFORMAT, "%s:%d:%d: not valid JSON: %s", file, line, col,
                        e == json_tokener_error_parse_unexpected && end < len ? "unexpected text after the value"
                                                                              : json_tokener_error_desc(e));
    }
    *out = o;
    return KV_OK;
}

static const char *const TOP_KEYS[] = {"name",        "comment", "model",     "tokenizer", "dataset", "policies",
                                       "budgets",     "capture", "replay",    "backend",   "threads", "output",
                                       "keep_traces", "analyze", "bootstrap", "slurm"};
static const char *const DATASET_KEYS[] = {"path",   "format",   "context_key", "question_key",
                                           "id_key", "template", "limit"};
static const char *const CAPTURE_KEYS[] = {"decode", "dtype",  "with_wo", "segments",
                                           "chat",   "system", "pool",    "zstd_level"};
static const char *const REPLAY_KEYS[] = {"eval_tail", "seed", "head_rows"};
static const char *const ANALYZE_KEYS[] = {"funnel", "figures", "format"};
static const char *const BOOT_KEYS[] = {"resamples", "seed", "confidence"};
static const char *const SLURM_KEYS[] = {"tasks", "cpus_per_task", "time", "partition", "options", "setup"};

/* The settings that decide a sample's results, as JSON (sweep.json's "settings"). */
static int make_fingerprint(kv_sweep_t *s, char **out)
{
    json_object *o = json_object_new_object();
    json_object *d = json_object_new_object(), *c = json_object_new_object(), *r = json_object_new_object();
    kv_policy_t **pols = NULL;
    int n_pol = 0, rc = KV_OK;
    json_object *labels = json_object_new_array();
    if (!o || !d || !c || !r || !labels) {
        rc = KV_ENOMEM;
        goto done;
    }
    json_object_object_add(o, "model", json_object_new_string(s->model_text));
    json_object_object_add(o, "tokenizer", json_object_new_string(s->tokenizer_text));
    json_object_object_add(d, "path", json_object_new_string(s->dataset_text));
    json_object_object_add(d, "context_key", json_object_new_string(s->context_key));
    json_object_object_add(d, "question_key", json_object_new_string(s->question_key));
    json_object_object_add(d, "id_key", json_object_new_string(s->id_key));
    json_object_object_add(d, "template", s->template_text ? json_object_new_string(s->template_text) : NULL);
    json_object_object_add(o, "dataset", d);
    d = NULL;
    /* canonical labels: "snapkv" and "snapkv(window=32,...)" are the same setting */
    if ((rc = kv_policy_create_list(s->policies, &pols, &n_pol)))
        goto done;
    for (int i = 0; i < n_pol; i++)
        json_object_array_add(labels, json_object_new_string(pols[i]->label));
    json_object_object_add(o, "policies", labels);
    labels = NULL;
    json_object_object_add(o, "budgets", json_object_new_string(s->budgets));
    json_object_object_add(c, "decode", json_object_new_int(s->decode));
    json_object_object_add(c, "dtype", json_object_new_string(s->dtype == KV_DTYPE_F16 ? "f16" : "f32"));
    json_object_object_add(c, "with_wo", json_object_new_boolean(s->with_wo));
    json_object_object_add(c, "segments", json_object_new_string(s->segments));
    json_object_object_add(c, "chat", json_object_new_boolean(s->chat));
    json_object_object_add(c, "system", s->system ? json_object_new_string(s->system) : NULL);
    json_object_object_add(c, "pool", json_object_new_int(s->pool));
    json_object_object_add(c, "zstd_level", json_object_new_int(s->zstd_level));
    json_object_object_add(o, "capture", c);
    c = NULL;
    json_object_object_add(r, "eval_tail", json_object_new_int(s->eval_tail));
    json_object_object_add(r, "seed", json_object_new_int64((int64_t)s->seed));
    json_object_object_add(r, "head_rows", json_object_new_boolean(s->head_rows));
    json_object_object_add(o, "replay", r);
    r = NULL;
    json_object_object_add(o, "backend", json_object_new_string(s->backend));
    json_object_object_add(o, "funnel", json_object_new_boolean(s->funnel));
    *out = kv_strdup(json_object_to_json_string_ext(o, JSON_C_TO_STRING_PLAIN | JSON_C_TO_STRING_NOSLASHESCAPE));
    if (!*out)
        rc = KV_ENOMEM;
done:
    for (int i = 0; i < n_pol; i++)
        kv_policy_free(pols[i]);
    kv_free(pols);
    json_object_put(labels);
    json_object_put(d);
    json_object_put(c);
    json_object_put(r);
    json_object_put(o);
    return rc;
}

static int parse_manifest(kv_sweep_t *s, json_object *root, const char *output)
{
    const jctx_t top = {s->manifest, ""};
    json_object *ds, *cap, *rep, *ana, *boot, *sl;
    long v;
    double x = 0;
    int rc;
    char buf[KV_SWEEP_PATH];
    if (!json_object_is_type(root, json_type_object))
        return kv_error(KV_EINVAL, "%s: expected a JSON object at the top", s->manifest);
    if ((rc = check_keys(&top, root, TOP_KEYS, (int)KV_ARRAY_LEN(TOP_KEYS))))
        return rc;
    /* name: default the manifest's file name without .json */
    {
        const char *base = strrchr(s->manifest, '/');
        base = base ? base + 1 : s->manifest;
        char def[128];
        snprintf(def, sizeof def, "%s", base);
        char *dot = strrchr(def, '.');
        if (dot && dot != def)
            *dot = 0;
        if ((rc = get_str(&top, root, "name", 0, def, s->name, sizeof s->name)))
            return rc;
        for (char *p = s->name; *p; p++)
            if (*p == '\n' || *p == '\t')
                *p = ' ';
    }
    if ((rc = get_str(&top, root, "model", 1, NULL, s->model_text, sizeof s->model_text)))
        return rc;
    resolve(s->dir, s->model_text, s->model, sizeof s->model);
    if ((rc = get_str(&top, root, "tokenizer", 0, "", s->tokenizer_text, sizeof s->tokenizer_text)))
        return rc;
    if (s->tokenizer_text[0])
        resolve(s->dir, s->tokenizer_text, s->tokenizer, sizeof s->tokenizer);
    /* dataset: a path, or an object */
    json_object *dv;
    if (!json_object_object_get_ex(root, "dataset", &dv) || json_object_is_type(dv, json_type_null))
        return kv_error(KV_EINVAL, "%s: dataset: required key is missing", s->manifest);
    ds = NULL;
    if (json_object_is_type(dv, json_type_string)) {
        snprintf(s->dataset_text, sizeof s->dataset_text, "%s", json_object_get_string(dv));
    } else {
        if ((rc = get_obj(&top, root, "dataset", DATASET_KEYS, (int)KV_ARRAY_LEN(DATASET_KEYS), &ds)))
            return rc;
        if (!ds)
            return jerr(&top, "dataset", "expected a path or an object", jtext(dv));
        const jctx_t c = {s->manifest, "dataset."};
        if ((rc = get_str(&c, ds, "path", 1, NULL, s->dataset_text, sizeof s->dataset_text)))
            return rc;
    }
    if (!s->dataset_text[0])
        return jerr(&top, "dataset", "must not be empty", NULL);
    resolve(s->dir, s->dataset_text, s->dataset, sizeof s->dataset);
    {
        const jctx_t c = {s->manifest, "dataset."};
        char fmt[16];
        if ((rc = get_str(&c, ds, "format", 0, "auto", fmt, sizeof fmt)))
            return rc;
        struct stat st;
        const int is_dir = stat(s->dataset, &st) == 0 && S_ISDIR(st.st_mode);
        if (!strcmp(fmt, "auto"))
            s->dataset_dir = is_dir;
        else if (!strcmp(fmt, "jsonl"))
            s->dataset_dir = 0;
        else if (!strcmp(fmt, "folder"))
            s->dataset_dir = 1;
        else
            return jerr(&c, "format", "expected \"auto\", \"jsonl\" or \"folder\"", fmt);
        if ((rc = get_strdup(&c, ds, "context_key", "context", &s->context_key)) ||
            (rc = get_strdup(&c, ds, "question_key", "input", &s->question_key)) ||
            (rc = get_strdup(&c, ds, "id_key", "_id", &s->id_key)) ||
            (rc = get_strdup(&c, ds, "template", NULL, &s->template_text)))
            return rc;
        if ((rc = get_int(&c, ds, "limit", 0, INT_MAX, 0, &s->limit)))
            return rc;
    }
    /* policies and budgets: checked here, so that a typo fails before any work */
    if ((rc = get_list(&top, root, "policies", 0, &s->policies)) ||
        (rc = get_list(&top, root, "budgets", 1, &s->budgets)))
        return rc;
    {
        kv_policy_t **pols = NULL;
        int n = 0;
        rc = kv_policy_create_list(s->policies, &pols, &n);
        for (int i = 0; i < n; i++)
            kv_policy_free(pols[i]);
        kv_free(pols);
        if (rc)
            return kv_error_context(KV_EINVAL, "%s: policies", s->manifest);
        kv_budget_t *b = NULL;
        rc = kv_budget_parse_list(s->budgets, &b, &n);
        kv_free(b);
        if (rc)
            return kv_error_context(KV_EINVAL, "%s: budgets", s->manifest);
    }
    /* capture */
    if ((rc = get_obj(&top, root, "capture", CAPTURE_KEYS, (int)KV_ARRAY_LEN(CAPTURE_KEYS), &cap)))
        return rc;
    {
        const jctx_t c = {s->manifest, "capture."};
        char dt[8];
        if ((rc = get_int(&c, cap, "decode", 0, 1 << 20, 64, &v)))
            return rc;
        s->decode = (int)v;
        if ((rc = get_str(&c, cap, "dtype", 0, "f16", dt, sizeof dt)))
            return rc;
        if (strcmp(dt, "f16") && strcmp(dt, "f32"))
            return jerr(&c, "dtype", "expected \"f16\" or \"f32\"", dt);
        s->dtype = !strcmp(dt, "f16") ? KV_DTYPE_F16 : KV_DTYPE_F32;
        if ((rc = get_bool(&c, cap, "with_wo", 0, &s->with_wo)) || (rc = get_bool(&c, cap, "chat", 0, &s->chat)) ||
            (rc = get_str(&c, cap, "segments", 0, "auto", s->segments, sizeof s->segments)) ||
            (rc = get_strdup(&c, cap, "system", NULL, &s->system)))
            return rc;
        if (s->system && !s->chat)
            return jerr(&c, "system", "needs \"chat\": true", NULL);
        if ((rc = get_int(&c, cap, "pool", 1, 1 << 16, 256, &v)))
            return rc;
        s->pool = (int)v;
        if ((rc = get_int(&c, cap, "zstd_level", 1, 22, 3, &v)))
            return rc;
        s->zstd_level = (int)v;
    }
    if ((rc = get_obj(&top, root, "replay", REPLAY_KEYS, (int)KV_ARRAY_LEN(REPLAY_KEYS), &rep)))
        return rc;
    {
        const jctx_t c = {s->manifest, "replay."};
        if ((rc = get_int(&c, rep, "eval_tail", 0, 1 << 30, 0, &v)))
            return rc;
        s->eval_tail = (int)v;
        if ((rc = get_int(&c, rep, "seed", 0, 0x7fffffffL, 0, &v)))
            return rc;
        s->seed = (uint64_t)v;
        if ((rc = get_bool(&c, rep, "head_rows", 0, &s->head_rows)))
            return rc;
    }
    if ((rc = get_str(&top, root, "backend", 0, "auto", s->backend, sizeof s->backend)))
        return rc;
    if (strcmp(s->backend, "auto") && strcmp(s->backend, "cpu") && strcmp(s->backend, "cuda"))
        return jerr(&top, "backend", "expected \"auto\", \"cpu\" or \"cuda\"", s->backend);
    if ((rc = get_int(&top, root, "threads", 0, 1024, 0, &v)))
        return rc;
    s->threads = (int)v;
    if ((rc = get_str(&top, root, "output", 0, "", buf, sizeof buf)))
        return rc;
    if (output)
        snprintf(s->output, sizeof s->output, "%s", output);
    else if (buf[0])
        resolve(s->dir, buf, s->output, sizeof s->output);
    else
        return kv_error(KV_EINVAL, "%s: output: required key is missing (or give -o DIR)", s->manifest);
    if ((rc = get_bool(&top, root, "keep_traces", 0, &s->keep_traces)))
        return rc;
    if ((rc = get_obj(&top, root, "analyze", ANALYZE_KEYS, (int)KV_ARRAY_LEN(ANALYZE_KEYS), &ana)))
        return rc;
    {
        const jctx_t c = {s->manifest, "analyze."};
        if ((rc = get_bool(&c, ana, "funnel", 1, &s->funnel)) || (rc = get_bool(&c, ana, "figures", 1, &s->figures)) ||
            (rc = get_str(&c, ana, "format", 0, "png", s->format, sizeof s->format)))
            return rc;
        if (strcmp(s->format, "png") && strcmp(s->format, "svg") && strcmp(s->format, "pdf"))
            return jerr(&c, "format", "expected \"png\", \"svg\" or \"pdf\"", s->format);
    }
    if ((rc = get_obj(&top, root, "bootstrap", BOOT_KEYS, (int)KV_ARRAY_LEN(BOOT_KEYS), &boot)))
        return rc;
    {
        const jctx_t c = {s->manifest, "bootstrap."};
        if ((rc = get_int(&c, boot, "resamples", 100, 10000000, 1000, &v)))
            return rc;
        s->resamples = (int)v;
        if ((rc = get_int(&c, boot, "seed", 0, 0x7fffffffL, 0, &v)))
            return rc;
        s->boot_seed = (uint64_t)v;
        if ((rc = get_num(&c, boot, "confidence", 0, 1, 0.95, &x)))
            return rc;
        s->confidence = x;
    }
    if ((rc = get_obj(&top, root, "slurm", SLURM_KEYS, (int)KV_ARRAY_LEN(SLURM_KEYS), &sl)))
        return rc;
    {
        const jctx_t c = {s->manifest, "slurm."};
        if ((rc = get_int(&c, sl, "tasks", 1, 1000000, 0, &v)))
            return rc;
        s->slurm_tasks = (int)v;
        if ((rc = get_int(&c, sl, "cpus_per_task", 0, 4096, 0, &v)))
            return rc;
        s->slurm_cpus = (int)v;
        if ((rc = get_str(&c, sl, "time", 0, "", s->slurm_time, sizeof s->slurm_time)) ||
            (rc = get_str(&c, sl, "partition", 0, "", s->slurm_partition, sizeof s->slurm_partition)) ||
            (rc = get_str_array(&c, sl, "options", &s->slurm_options, &s->n_slurm_options)) ||
            (rc = get_str_array(&c, sl, "setup", &s->slurm_setup, &s->n_slurm_setup)))
            return rc;
        if (strchr(s->slurm_time, '\n') || strchr(s->slurm_partition, '\n'))
            return jerr(&c, "time", "must be one line", NULL);
    }
    return KV_OK;
}

/* ---------------------------------------------------------------- the dataset */

typedef struct {
    char **ids, **prompts;
    int n, cap;
} samples_t;

static int samples_push(samples_t *S, char *id, char *prompt)
{
    if (S->n == S->cap) {
        int cap = S->cap ? 2 * S->cap : 64;
        char **a = kv_realloc(S->ids, sizeof(char *) * (size_t)cap, "sample ids");
        if (!a)
            return KV_ENOMEM;
        S->ids = a;
        char **b = kv_realloc(S->prompts, sizeof(char *) * (size_t)cap, "prompts");
        if (!b)
            return KV_ENOMEM;
        S->prompts = b;
        S->cap = cap;
    }
    S->ids[S->n] = id;
    S->prompts[S->n] = prompt;
    S->n++;
    return KV_OK;
}

/* [A-Za-z0-9_-] kept, the rest '_'; at most 120 characters. */
static char *clean_id(const char *raw)
{
    size_t n = strlen(raw);
    if (n > 120)
        n = 120;
    char *id = kv_malloc(n + 1, "sample id");
    if (!id)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        const char ch = raw[i];
        id[i] =
            ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') || ch == '-' || ch == '_')
                ? ch
                : '_';
    }
    id[n] = 0;
    return id;
}

/* A record's field as text: strings as they are, arrays of strings joined by line breaks, other
 * values as JSON. NULL when absent. */
static char *field_text(json_object *rec, const char *key)
{
    json_object *v;
    if (!rec || !json_object_object_get_ex(rec, key, &v) || json_object_is_type(v, json_type_null))
        return NULL;
    if (json_object_is_type(v, json_type_string))
        return kv_strdup(json_object_get_string(v));
    if (json_object_is_type(v, json_type_array)) {
        size_t cap = 1;
        for (size_t i = 0; i < json_object_array_length(v); i++)
            cap += strlen(jtext(json_object_array_get_idx(v, i))) + 1;
        char *s = kv_malloc(cap, "field");
        if (!s)
            return NULL;
        size_t u = 0;
        s[0] = 0;
        for (size_t i = 0; i < json_object_array_length(v); i++) {
            json_object *e = json_object_array_get_idx(v, i);
            u += (size_t)snprintf(s + u, cap - u, "%s%s", i ? "\n" : "",
                                  json_object_is_type(e, json_type_string) ? json_object_get_string(e) : jtext(e));
        }
        return s;
    }
    return kv_strdup(jtext(v));
}

/* The prompt of one record: the template with {key} replaced by the record's fields ({context}: the
 * context text, as for a folder's files). Default template: the context, then "\n\nQuestion: Q\nAnswer:"
 * when the record has a non-empty question. where: "file:line" for messages. */
static int fill_template(const kv_sweep_t *s, json_object *rec, const char *context, const char *where, char **out)
{
    *out = NULL;
    if (!s->template_text) {
        char *q = field_text(rec, s->question_key);
        const int has_q = q && q[0];
        size_t len = strlen(context) + (has_q ? strlen(q) + 32 : 0) + 1;
        char *p = kv_malloc(len, "prompt");
        if (p)
            snprintf(p, len, has_q ? "%s\n\nQuestion: %s\nAnswer:" : "%s", context, has_q ? q : "");
        kv_free(q);
        *out = p;
        return p ? KV_OK : KV_ENOMEM;
    }
    size_t cap = strlen(s->template_text) + strlen(context) + 64, u = 0;
    char *p = kv_malloc(cap, "prompt");
    if (!p)
        return KV_ENOMEM;
    for (const char *t = s->template_text; *t;) {
        const char *close = NULL;
        if (*t == '{') {
            close = t + 1;
            while ((*close >= 'a' && *close <= 'z') || (*close >= 'A' && *close <= 'Z') ||
                   (*close >= '0' && *close <= '9') || *close == '_')
                close++;
            if (*close != '}' || close == t + 1)
                close = NULL;
        }
        char *val = NULL;
        size_t add = 1;
        const char *src = t;
        if (close) {
            char key[128];
            snprintf(key, sizeof key, "%.*s", (int)(close - t - 1), t + 1);
            if (!strcmp(key, "context")) {
                val = kv_strdup(context);
            } else {
                val = field_text(rec, key);
                if (!val && !strcmp(key, s->question_key))
                    val = kv_strdup("");
                if (!val) {
                    kv_free(p);
                    return kv_error(KV_EFORMAT, "%s: the template uses {%s}, which this record does not have", where,
                                    key);
                }
            }
            if (!val) {
                kv_free(p);
                return KV_ENOMEM;
            }
            src = val;
            add = strlen(val);
            t = close + 1;
        } else {
            t++;
        }
        if (u + add + 1 > cap) {
            cap = 2 * (u + add + 1);
            char *q = kv_realloc(p, cap, "prompt");
            if (!q) {
                kv_free(val);
                kv_free(p);
                return KV_ENOMEM;
            }
            p = q;
        }
        memcpy(p + u, src, add);
        u += add;
        kv_free(val);
    }
    p[u] = 0;
    *out = p;
    return KV_OK;
}

static int load_jsonl(kv_sweep_t *s, samples_t *S)
{
    char *text = NULL;
    size_t len = 0;
    int rc = kv_read_file(s->dataset, (size_t)16 << 30, &text, &len);
    if (rc)
        return kv_error_context(rc, "%s: dataset", s->manifest);
    long line = 0;
    for (char *p = text; rc == KV_OK && p < text + len;) {
        char *nl = memchr(p, '\n', (size_t)(text + len - p));
        char *end = nl ? nl : text + len;
        line++;
        char where[KV_SWEEP_PATH + 32];
        snprintf(where, sizeof where, "%s:%ld", s->dataset, line);
        size_t n = (size_t)(end - p);
        while (n && (p[n - 1] == '\r' || p[n - 1] == ' ' || p[n - 1] == '\t'))
            n--;
        const char *b = p;
        while (b < p + n && (*b == ' ' || *b == '\t'))
            b++;
        if (b < p + n) {
            json_object *rec = NULL;
            if ((rc = parse_json(where, b, (size_t)(p + n - b), &rec))) {
                /* "file:line:1:col" reads oddly: say file:line and the reason */
                break;
            }
            char *ctx = NULL, *raw = NULL, *id = NULL, *prompt = NULL;
            if (!json_object_is_type(rec, json_type_object)) {
                rc = kv_error(KV_EFORMAT, "%s: expected a JSON object (one sample per line)", where);
            } else if (!(ctx = field_text(rec, s->context_key))) {
                rc = kv_error(KV_EFORMAT, "%s: the record has no \"%s\" (dataset.context_key)", where, s->context_key);
            } else {
                json_object *iv;
                if (json_object_object_get_ex(rec, s->id_key, &iv) && !json_object_is_type(iv, json_type_null))
                    raw = json_object_is_type(iv, json_type_string) ? kv_strdup(json_object_get_string(iv))
                                                                    : kv_strdup(jtext(iv));
                else {
                    raw = kv_malloc(32, "id");
                    if (raw)
                        snprintf(raw, 32, "%06ld", line);
                }
                if (!raw || !(id = clean_id(raw)))
                    rc = KV_ENOMEM;
                else if (!id[0])
                    rc = kv_error(KV_EFORMAT, "%s: the record's \"%s\" is empty", where, s->id_key);
                else
                    rc = fill_template(s, rec, ctx, where, &prompt);
                if (rc == KV_OK && (rc = samples_push(S, id, prompt)) == KV_OK)
                    id = prompt = NULL;
            }
            kv_free(ctx);
            kv_free(raw);
            kv_free(id);
            kv_free(prompt);
            json_object_put(rec);
            if (s->limit && S->n >= s->limit)
                break;
        }
        p = end + 1;
    }
    kv_free(text);
    if (rc == KV_OK && S->n == 0)
        rc = kv_error(KV_EFORMAT, "%s: the dataset has no samples", s->dataset);
    return rc;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int load_folder(kv_sweep_t *s, samples_t *S)
{
    DIR *d = opendir(s->dataset);
    if (!d)
        return kv_error(KV_EIO, "%s: dataset: %s: cannot open the folder: %s", s->manifest, s->dataset,
                        strerror(errno));
    char **names = NULL;
    int n = 0, cap = 0, rc = KV_OK;
    struct dirent *e;
    while ((e = readdir(d))) {
        size_t l = strlen(e->d_name);
        if (e->d_name[0] == '.' || l < 5 || strcmp(e->d_name + l - 4, ".txt"))
            continue;
        if (n == cap) {
            cap = cap ? 2 * cap : 64;
            char **a = kv_realloc(names, sizeof(char *) * (size_t)cap, "file names");
            if (!a) {
                rc = KV_ENOMEM;
                break;
            }
            names = a;
        }
        if (!(names[n] = kv_strdup(e->d_name))) {
            rc = KV_ENOMEM;
            break;
        }
        n++;
    }
    closedir(d);
    if (rc == KV_OK && names)
        qsort(names, (size_t)n, sizeof(char *), cmp_str);
    for (int i = 0; i < n && rc == KV_OK && !(s->limit && S->n >= s->limit); i++) {
        char path[KV_SWEEP_PATH * 2], stem[256];
        snprintf(path, sizeof path, "%s/%s", s->dataset, names[i]);
        snprintf(stem, sizeof stem, "%.*s", (int)(strlen(names[i]) - 4), names[i]);
        char *text = NULL, *id = NULL, *prompt = NULL;
        if ((rc = kv_read_file(path, (size_t)1 << 30, &text, NULL)))
            break;
        if (!(id = clean_id(stem)))
            rc = KV_ENOMEM;
        if (rc == KV_OK)
            rc = fill_template(s, NULL, text, path, &prompt);
        if (rc == KV_OK && (rc = samples_push(S, id, prompt)) == KV_OK)
            id = prompt = NULL;
        kv_free(text);
        kv_free(id);
        kv_free(prompt);
    }
    for (int i = 0; i < n; i++)
        kv_free(names[i]);
    kv_free(names);
    if (rc == KV_OK && S->n == 0)
        rc = kv_error(KV_EFORMAT, "%s: the folder has no .txt files", s->dataset);
    return rc;
}

/* Two samples with one id (after cleaning) would share their files. */
static int check_unique_ids(const kv_sweep_t *s)
{
    int *order = kv_malloc(sizeof(int) * (size_t)s->n, "ids");
    if (!order)
        return KV_ENOMEM;
    char **sorted = kv_malloc(sizeof(char *) * (size_t)s->n, "ids");
    if (!sorted) {
        kv_free(order);
        return KV_ENOMEM;
    }
    memcpy(sorted, s->ids, sizeof(char *) * (size_t)s->n);
    qsort(sorted, (size_t)s->n, sizeof(char *), cmp_str);
    int rc = KV_OK;
    for (int i = 1; i < s->n && rc == KV_OK; i++)
        if (!strcmp(sorted[i], sorted[i - 1])) {
            int a = -1, b = -1;
            for (int k = 0; k < s->n; k++)
                if (!strcmp(s->ids[k], sorted[i])) {
                    if (a < 0)
                        a = k;
                    else if (b < 0)
                        b = k;
                }
            rc = kv_error(KV_EFORMAT,
                          "%s: samples %d and %d have the same id '%s' (ids keep [A-Za-z0-9_-] and replace the "
                          "rest by '_'; dataset.id_key names the field)",
                          s->dataset, a + 1, b + 1, sorted[i]);
        }
    kv_free(order);
    kv_free(sorted);
    return rc;
}

int kv_sweep_load(const char *manifest, const char *output, kv_sweep_t **out)
{
    *out = NULL;
    kv_sweep_t *s = kv_calloc(1, sizeof *s, "sweep");
    char *text = NULL;
    json_object *root = NULL;
    samples_t S = {0};
    int rc = s ? KV_OK : KV_ENOMEM;
    if (rc)
        return rc;
    if ((rc = kv_read_file(manifest, (size_t)1 << 24, &text, NULL)))
        goto done;
    if (!realpath(manifest, s->manifest)) {
        rc = kv_error(KV_EIO, "%s: %s", manifest, strerror(errno));
        goto done;
    }
    snprintf(s->dir, sizeof s->dir, "%s", s->manifest);
    *strrchr(s->dir, '/') = 0;
    if ((rc = parse_json(manifest, text, strlen(text), &root)))
        goto done;
    /* messages name the manifest as the user typed it */
    char typed[KV_SWEEP_PATH];
    snprintf(typed, sizeof typed, "%s", s->manifest);
    snprintf(s->manifest, sizeof s->manifest, "%s", manifest);
    rc = parse_manifest(s, root, output);
    snprintf(s->manifest, sizeof s->manifest, "%s", typed);
    if (rc)
        goto done;
    if ((rc = s->dataset_dir ? load_folder(s, &S) : load_jsonl(s, &S)))
        goto done;
    s->n = S.n;
    s->ids = S.ids;
    s->prompts = S.prompts;
    S.ids = S.prompts = NULL;
    S.n = 0;
    if ((rc = check_unique_ids(s)) || (rc = make_fingerprint(s, &s->fingerprint)))
        goto done;
    *out = s;
    s = NULL;
done:
    for (int i = 0; i < S.n; i++) {
        kv_free(S.ids[i]);
        kv_free(S.prompts[i]);
    }
    kv_free(S.ids);
    kv_free(S.prompts);
    json_object_put(root);
    kv_free(text);
    kv_sweep_free(s);
    return rc;
}

static void free_strv(char **v, int n)
{
    for (int i = 0; i < n; i++)
        kv_free(v[i]);
    kv_free(v);
}

void kv_sweep_free(kv_sweep_t *s)
{
    if (!s)
        return;
    kv_free(s->context_key);
    kv_free(s->question_key);
    kv_free(s->id_key);
    kv_free(s->template_text);
    kv_free(s->policies);
    kv_free(s->budgets);
    kv_free(s->system);
    kv_free(s->fingerprint);
    free_strv(s->slurm_options, s->n_slurm_options);
    free_strv(s->slurm_setup, s->n_slurm_setup);
    free_strv(s->ids, s->n);
    free_strv(s->prompts, s->n);
    kv_backend_close(s->be);
    kv_free(s);
}

int kv_sweep_n_samples(const kv_sweep_t *s)
{
    return s->n;
}
const char *kv_sweep_sample_id(const kv_sweep_t *s, int i)
{
    return i >= 0 && i < s->n ? s->ids[i] : NULL;
}
const char *kv_sweep_sample_prompt(const kv_sweep_t *s, int i)
{
    return i >= 0 && i < s->n ? s->prompts[i] : NULL;
}
const char *kv_sweep_output(const kv_sweep_t *s)
{
    return s->output;
}
const char *kv_sweep_name(const kv_sweep_t *s)
{
    return s->name;
}
void kv_sweep_analyze_settings(const kv_sweep_t *s, int *funnel, int *figures, const char **format)
{
    *funnel = s->funnel;
    *figures = s->figures;
    *format = s->format;
}
void kv_sweep_bootstrap_settings(const kv_sweep_t *s, int *resamples, uint64_t *seed, double *confidence)
{
    *resamples = s->resamples;
    *seed = s->boot_seed;
    *confidence = s->confidence;
}

void kv_sweep_opts_init(kv_sweep_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->merge = 1;
}

/* ---------------------------------------------------------------- the output folder */

static void sub_path(const kv_sweep_t *s, const char *sub, const char *id, const char *suffix, char *out, size_t len)
{
    if (id)
        snprintf(out, len, "%s/%s/%s%s", s->output, sub, id, suffix);
    else
        snprintf(out, len, "%s/%s", s->output, sub);
}

/* The first key path where two settings objects differ ("capture.decode"), and both values. */
static int first_difference(json_object *a, json_object *b, char *path, size_t len, const char **va, const char **vb)
{
    if (json_object_equal(a, b))
        return 0;
    if (json_object_is_type(a, json_type_object) && json_object_is_type(b, json_type_object)) {
        const size_t u = strlen(path);
        json_object_object_foreach(a, k, v)
        {
            json_object *w = NULL;
            json_object_object_get_ex(b, k, &w);
            if (!json_object_equal(v, w)) {
                snprintf(path + u, len - u, "%s%s", u ? "." : "", k);
                if (w && first_difference(v, w, path, len, va, vb))
                    return 1;
                *va = jtext(v);
                *vb = w ? jtext(w) : "(absent)";
                return 1;
            }
        }
        json_object_object_foreach(b, k2, v2)
        {
            json_object *w = NULL;
            if (!json_object_object_get_ex(a, k2, &w)) {
                snprintf(path + u, len - u, "%s%s", u ? "." : "", k2);
                *va = "(absent)";
                *vb = jtext(v2);
                return 1;
            }
        }
    }
    *va = jtext(a);
    *vb = jtext(b);
    return 1;
}

int kv_sweep_prepare(kv_sweep_t *s)
{
    char p[KV_SWEEP_PATH + 64];
    int rc;
    sub_path(s, "samples", NULL, "", p, sizeof p);
    if ((rc = make_dirs(p)))
        return rc;
    sub_path(s, "traces", NULL, "", p, sizeof p);
    if ((rc = make_dirs(p)))
        return rc;
    if (access(s->output, W_OK) != 0)
        return kv_error(KV_EIO, "%s: the output folder is not writable: %s", s->output, strerror(errno));
    /* sweep.json: the settings of the first run; every later run must have the same */
    snprintf(p, sizeof p, "%s/sweep.json", s->output);
    char *mine = NULL;
    {
        json_object *set = NULL, *doc = json_object_new_object();
        if (!doc || parse_json("(settings)", s->fingerprint, strlen(s->fingerprint), &set)) {
            json_object_put(doc);
            return KV_ENOMEM;
        }
        json_object_object_add(doc, "kvsim", json_object_new_string(KV_VERSION));
        json_object_object_add(doc, "settings", set);
        const char *txt = json_object_to_json_string_ext(doc, JSON_C_TO_STRING_PRETTY | JSON_C_TO_STRING_SPACED |
                                                                  JSON_C_TO_STRING_NOSLASHESCAPE);
        const size_t ml = strlen(txt) + 2;
        if ((mine = kv_malloc(ml, "sweep.json")))
            snprintf(mine, ml, "%s\n", txt);
        json_object_put(doc);
        if (!mine)
            return KV_ENOMEM;
    }
    if (!exists(p)) {
        rc = kv_sweep_write_file(p, mine, strlen(mine));
        kv_free(mine);
        return rc;
    }
    char *theirs = NULL;
    json_object *a = NULL, *b = NULL;
    rc = kv_read_file(p, (size_t)1 << 24, &theirs, NULL);
    if (rc == KV_OK)
        rc = parse_json(p, theirs, strlen(theirs), &b);
    if (rc == KV_OK)
        rc = parse_json("(settings)", mine, strlen(mine), &a);
    if (rc == KV_OK) {
        json_object *sa = NULL, *sb = NULL;
        json_object_object_get_ex(a, "settings", &sa);
        json_object_object_get_ex(b, "settings", &sb);
        char path[256] = "";
        const char *va = "", *vb = "";
        if (!sb)
            rc = kv_error(KV_EFORMAT, "%s: no \"settings\" (not a kvsim sweep folder?)", p);
        else if (first_difference(sa, sb, path, sizeof path, &va, &vb))
            rc = kv_error(KV_EINVAL,
                          "%s: this output folder holds a sweep with other settings: %s is %s in %s but %s there; "
                          "give another output folder (or remove %s to start over)",
                          p, path, va, s->manifest, vb, s->output);
    }
    json_object_put(a);
    json_object_put(b);
    kv_free(theirs);
    kv_free(mine);
    return rc;
}

/* ---------------------------------------------------------------- status and the units */

enum { ST_MISSING = 0, ST_DONE = 1, ST_FAILED = 2 };

static int sample_state(const kv_sweep_t *s, int i)
{
    char p[KV_SWEEP_PATH + 256];
    sub_path(s, "samples", s->ids[i], ".tsv", p, sizeof p);
    if (exists(p))
        return ST_DONE;
    sub_path(s, "samples", s->ids[i], ".failed", p, sizeof p);
    return exists(p) ? ST_FAILED : ST_MISSING;
}

int kv_sweep_status(kv_sweep_t *s, kv_sweep_summary_t *sum)
{
    memset(sum, 0, sizeof *sum);
    sum->n_samples = s->n;
    sum->ranks = 1;
    for (int i = 0; i < s->n; i++) {
        int st = sample_state(s, i);
        sum->done += st == ST_DONE;
        sum->failed += st == ST_FAILED;
        sum->missing += st == ST_MISSING;
    }
    return KV_OK;
}

int kv_sweep_done_ids(kv_sweep_t *s, const char ***ids, int *n)
{
    *n = 0;
    *ids = kv_malloc(sizeof(char *) * (size_t)s->n, "sample ids");
    if (!*ids)
        return KV_ENOMEM;
    for (int i = 0; i < s->n; i++)
        if (sample_state(s, i) == ST_DONE)
            (*ids)[(*n)++] = s->ids[i];
    return KV_OK;
}

/* A finished sample whose process was killed between its results and its clean-up: its trace (unless
 * kept) and its lock file go (the lock only when nobody holds it). */
static void tidy_finished(const kv_sweep_t *s, int i)
{
    char p[KV_SWEEP_PATH + 256];
    if (!s->keep_traces) {
        sub_path(s, "traces", s->ids[i], ".h5", p, sizeof p);
        unlink(p);
    }
    sub_path(s, "samples", s->ids[i], ".lock", p, sizeof p);
    int fd = open(p, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
        if (flock(fd, LOCK_EX | LOCK_NB) == 0)
            unlink(p);
        close(fd);
    }
}

/* Temporary files of finished samples (a kill left them, and the sample was finished later by another
 * run, or the kill came after its results): one pass over each folder. Unfinished samples' ones are
 * removed when the sample is started (remove_stale, under its lock). */
static void tidy_stale_of_finished(const kv_sweep_t *s)
{
    const char *subs[] = {"samples", "traces"};
    for (size_t k = 0; k < KV_ARRAY_LEN(subs); k++) {
        char dir[KV_SWEEP_PATH + 64];
        sub_path(s, subs[k], NULL, "", dir, sizeof dir);
        DIR *d = opendir(dir);
        struct dirent *e;
        while (d && (e = readdir(d))) {
            const char *n = e->d_name, *dot = strchr(n, '.');
            const size_t l = strlen(n);
            if (!dot || dot == n || (!strstr(n, "tmp-") && !(l > 10 && !strcmp(n + l - 10, ".kvsim-tmp"))))
                continue;
            char done[KV_SWEEP_PATH + 512], path[KV_SWEEP_PATH + 512];
            snprintf(done, sizeof done, "%s/samples/%.*s.tsv", s->output, (int)(dot - n), n);
            snprintf(path, sizeof path, "%s/%s", dir, n);
            if (exists(done))
                unlink(path);
        }
        if (d)
            closedir(d);
    }
}

int kv_sweep_todo(kv_sweep_t *s, const kv_sweep_opts_t *o, int **todo, int *n_todo, kv_sweep_summary_t *sum)
{
    memset(sum, 0, sizeof *sum);
    sum->ranks = 1;
    *n_todo = 0;
    *todo = kv_malloc(sizeof(int) * (size_t)s->n, "units");
    if (!*todo)
        return KV_ENOMEM;
    for (int i = 0; i < s->n; i++) {
        if (o->slice_n > 0 && i % o->slice_n != o->slice_k)
            continue;
        sum->n_samples++;
        const int st = sample_state(s, i);
        if (st == ST_DONE)
            tidy_finished(s, i);
        sum->done += st == ST_DONE;
        sum->failed += st == ST_FAILED && !o->retry_failed;
        if (st == ST_MISSING || (st == ST_FAILED && o->retry_failed))
            (*todo)[(*n_todo)++] = i;
    }
    sum->missing = *n_todo;
    tidy_stale_of_finished(s);
    return KV_OK;
}

/* Remove what an earlier, killed run left half-written of sample id in folder `sub`: temporary
 * files "ID.<anything>tmp-<pid>" (this module and result.c, the trace writer) and
 * "ID.<anything>.kvsim-tmp" (the output module). Called with the sample's lock held. */
static void remove_stale(const kv_sweep_t *s, const char *sub, const char *id)
{
    const char *pats[] = {".*tmp-*", ".*.kvsim-tmp"};
    for (size_t k = 0; k < KV_ARRAY_LEN(pats); k++) {
        char pat[KV_SWEEP_PATH + 256];
        sub_path(s, sub, id, pats[k], pat, sizeof pat);
        glob_t g;
        if (glob(pat, GLOB_NOSORT, NULL, &g) == 0)
            for (size_t i = 0; i < g.gl_pathc; i++) {
                kv_debug("sweep: removing %s (left by an interrupted run)", g.gl_pathv[i]);
                unlink(g.gl_pathv[i]);
            }
        globfree(&g);
    }
}

/* 1 when `list` names policy `name` explicitly ("name" or "name(...)" as a top-level item). */
static int names_policy(const char *list, const char *name)
{
    const size_t n = strlen(name);
    int depth = 0;
    for (const char *item = list, *c = list;; c++) {
        if (*c == '(')
            depth++;
        else if (*c == ')')
            depth--;
        if (*c == 0 || (*c == ',' && depth == 0)) {
            while (*item == ' ')
                item++;
            if (!strncmp(item, name, n) && (item[n] == '(' || item[n] == ',' || item[n] == ' ' || item[n] == 0))
                return 1;
            if (*c == 0)
                return 0;
            item = c + 1;
        }
    }
}

/* The sample's replay: results with their provenance in *out. */
static int replay_sample(kv_sweep_t *s, int i, kv_trace_t *t, const char *trace_path, kv_results_t **out)
{
    kv_policy_t **pols = NULL;
    kv_budget_t *bud = NULL;
    int n_pol = 0, n_bud = 0, rc;
    *out = NULL;
    if ((rc = kv_policy_create_list(s->policies, &pols, &n_pol)) ||
        (rc = kv_budget_parse_list(s->budgets, &bud, &n_bud)))
        goto done;
    const kv_trace_meta_t *m = kv_trace_meta(t);
    /* "all" on a sample without segments (or W_O): the policies that need them are left out, as kvsim
     * replay does */
    if ((m->n_segments < 1 || !m->has_wo) && names_policy(s->policies, "all")) {
        int k = 0;
        for (int p = 0; p < n_pol; p++) {
            const int unrunnable = ((pols[p]->flags & KV_POL_NEEDS_SEGMENTS) && m->n_segments < 1) ||
                                   ((pols[p]->flags & KV_POL_NEEDS_WO) && !m->has_wo);
            if (unrunnable && !names_policy(s->policies, pols[p]->desc->name)) {
                kv_policy_free(pols[p]);
                continue;
            }
            pols[k++] = pols[p];
        }
        n_pol = k;
    }
    kv_replay_opts_t ro;
    kv_replay_defaults(&ro);
    ro.eval_tail = s->eval_tail;
    ro.seed = s->seed;
    ro.head_rows = s->head_rows;
    ro.quiet = kv_log_get_level() < KV_LOG_INFO;
    if ((rc = kv_replay(t, pols, n_pol, bud, n_bud, s->be, &ro, out)))
        goto done;
    char sha[65] = "", now[32], ctx[96], seed[32], tail[32], psha[65];
    if ((rc = kv_sha256_file(trace_path, sha)))
        goto done;
    kv_iso_time(now, sizeof now);
    snprintf(ctx, sizeof ctx, "%d context tokens, %d evaluation queries", m->n_prompt - s->eval_tail,
             m->n_tokens - (m->n_prompt - s->eval_tail));
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)s->seed);
    snprintf(tail, sizeof tail, "%d", s->eval_tail);
    sha256_hex(s->prompts[i], strlen(s->prompts[i]), psha);
    kv_results_t *r = *out;
    if ((rc = kv_results_add_prov(r, "tool", "kvsim " KV_VERSION)) ||
        (rc = kv_results_add_prov(r, "git", kv_git_revision())) || (rc = kv_results_add_prov(r, "date", now)) ||
        (rc = kv_results_add_prov(r, "sweep", s->name)) || (rc = kv_results_add_prov(r, "manifest", s->manifest)) ||
        (rc = kv_results_add_prov(r, "sample", s->ids[i])) || (rc = kv_results_add_prov(r, "prompt_sha256", psha)) ||
        (rc = kv_results_add_prov(r, "trace", trace_path)) || (rc = kv_results_add_prov(r, "trace_sha256", sha)) ||
        (rc = kv_results_add_prov(r, "trace_model", m->model)) ||
        (rc = kv_results_add_prov(r, "trace_dtype", m->dtype == KV_DTYPE_F16 ? "f16" : "f32")) ||
        (rc = kv_results_add_prov(r, "evaluation", ctx)) || (rc = kv_results_add_prov(r, "eval_tail", tail)) ||
        (rc = kv_results_add_prov(r, "seed", seed)) || (rc = kv_results_add_prov(r, "backend", s->be->device)))
        goto done;
done:
    for (int p = 0; p < n_pol; p++)
        kv_policy_free(pols[p]);
    kv_free(pols);
    kv_free(bud);
    if (rc) {
        kv_results_free(*out);
        *out = NULL;
    }
    return rc;
}

/* The sample's work; stage names where it failed. */
static int unit_work(kv_sweep_t *s, int i, const kv_sweep_opts_t *o, const char **stage)
{
    char trace[KV_SWEEP_PATH + 256], res_path[KV_SWEEP_PATH + 256], prefix[KV_SWEEP_PATH + 256];
    sub_path(s, "traces", s->ids[i], ".h5", trace, sizeof trace);
    sub_path(s, "samples", s->ids[i], ".tsv", res_path, sizeof res_path);
    sub_path(s, "samples", s->ids[i], "", prefix, sizeof prefix);
    kv_trace_t *t = NULL;
    kv_results_t *res = NULL;
    int rc = KV_OK;
    /* a trace an interrupted run finished is complete (written under a temporary name, renamed) */
    *stage = "trace";
    if (exists(trace) && kv_trace_open(trace, &t) != KV_OK) {
        kv_debug("sweep: %s: recapturing (%s)", trace, kv_last_error());
        unlink(trace);
    }
    if (!t) {
        *stage = "capture";
        kv_capture_opts_t co;
        kv_capture_opts_init(&co);
        co.model_path = s->model;
        co.tokenizer_path = s->tokenizer[0] ? s->tokenizer : NULL;
        co.prompt = s->prompts[i];
        co.chat = s->chat;
        co.system = s->system;
        co.out_path = trace;
        co.n_decode = s->decode;
        co.dtype = s->dtype;
        co.with_wo = s->with_wo;
        co.segments = s->segments;
        co.pool = s->pool;
        co.zstd_level = s->zstd_level;
        co.backend = s->backend;
        co.n_threads = s->threads;
        kv_capture_result_t cr;
        if ((rc = kv_capture_run(&co, &cr)))
            goto done;
        *stage = "trace";
        if ((rc = kv_trace_open(trace, &t)))
            goto done;
    }
    *stage = "backend";
    if (!s->be && (rc = kv_backend_open(s->backend, s->threads, &s->be)))
        goto done;
    if (o->on_trace) {
        *stage = "statistics";
        if ((rc = o->on_trace(o->on_trace_ctx, s->ids[i], t, s->be, prefix)))
            goto done;
    }
    *stage = "replay";
    if ((rc = replay_sample(s, i, t, trace, &res)))
        goto done;
    /* the results: the unit's last file, complete or absent */
    *stage = "write";
    if ((rc = kv_results_write_tsv(res, res_path))) /* through the output module: whole or absent */
        goto done;
done:
    kv_results_free(res);
    kv_trace_close(t);
    if (!s->keep_traces)
        unlink(trace);
    return rc;
}

/* The error of a failed unit, on one line. */
static int record_failure(const kv_sweep_t *s, int i, const char *stage, const char *msg)
{
    char path[KV_SWEEP_PATH + 256];
    sub_path(s, "samples", s->ids[i], ".failed", path, sizeof path);
    char line[4096];
    int n = snprintf(line, sizeof line, "%s: %s\n", stage, msg[0] ? msg : "failed");
    if (n >= (int)sizeof line)
        n = (int)sizeof line - 1, line[n - 1] = '\n';
    for (int k = 0; k < n - 1; k++)
        if (line[k] == '\n' || line[k] == '\t' || line[k] == '\r')
            line[k] = ' ';
    return kv_sweep_write_file(path, line, (size_t)n);
}

int kv_sweep_unit(kv_sweep_t *s, int i, const kv_sweep_opts_t *o, int *outcome)
{
    char lock[KV_SWEEP_PATH + 256], p[KV_SWEEP_PATH + 256];
    *outcome = KV_UNIT_SKIPPED;
    sub_path(s, "samples", s->ids[i], ".lock", lock, sizeof lock);
    int fd = open(lock, O_CREAT | O_RDWR | O_CLOEXEC, 0644);
    if (fd < 0)
        return kv_error(KV_EIO, "%s: cannot create: %s", lock, strerror(errno));
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EWOULDBLOCK) {
            close(fd);
            *outcome = KV_UNIT_BUSY;
            return KV_OK;
        }
        /* a file system without locks: go on, unprotected against a second run on this folder */
        if (!s->warned_nolock)
            kv_warn("%s: no file locks on this file system (%s): do not run two sweeps on one folder at once", lock,
                    strerror(errno));
        s->warned_nolock = 1;
    }
    int rc = KV_OK;
    const int st = sample_state(s, i);
    if (st == ST_DONE || (st == ST_FAILED && !o->retry_failed))
        goto done; /* finished by another process meanwhile */
    remove_stale(s, "samples", s->ids[i]);
    remove_stale(s, "traces", s->ids[i]);
    sub_path(s, "samples", s->ids[i], ".failed", p, sizeof p);
    unlink(p);
    const char *stage = "";
    kv_clear_error();
    const int saved = kv_log_get_level();
    if (!o->verbose)
        kv_log_set_level(KV_LOG_QUIET);
    int wrc = unit_work(s, i, o, &stage);
    kv_log_set_level(saved);
    if (wrc == KV_OK) {
        *outcome = KV_UNIT_DONE;
    } else {
        char msg[3000];
        snprintf(msg, sizeof msg, "%s", kv_last_error());
        kv_warn("sweep: sample %s failed (%s): %s", s->ids[i], stage, msg);
        sub_path(s, "samples", s->ids[i], ".funnel.tsv", p, sizeof p);
        unlink(p);
        *outcome = KV_UNIT_FAILED;
        if ((rc = record_failure(s, i, stage, msg)))
            goto done;
    }
done:
    unlink(lock);
    close(fd);
    return rc;
}

/* ---------------------------------------------------------------- progress */

static void fmt_dur(double s, char *buf, size_t len)
{
    if (s < 90)
        snprintf(buf, len, "%.0f s", s);
    else if (s < 5400)
        snprintf(buf, len, "%.0f min", s / 60);
    else
        snprintf(buf, len, "%.1f h", s / 3600);
}

void kv_sweep_progress_begin(kv_sweep_progress_t *p, const kv_sweep_summary_t *start, int quiet)
{
    memset(p, 0, sizeof *p);
    p->t0 = kv_now();
    p->last = -1e9;
    p->total = start->n_samples;
    p->done0 = start->done;
    p->failed0 = start->failed;
    p->tty = isatty(STDERR_FILENO);
    p->quiet = quiet;
}

void kv_sweep_progress_show(kv_sweep_progress_t *p, int done, int failed, int running, int ran, int final)
{
    if (p->quiet)
        return;
    const double now = kv_now(), el = now - p->t0;
    if (!final && now - p->last < (p->tty ? 0.1 : 10.0))
        return;
    p->last = now;
    const int left = p->total - done - failed;
    char e[32], eta[64] = "";
    fmt_dur(el, e, sizeof e);
    if (!final && left > 0 && ran > 0) {
        char r[32];
        fmt_dur(el / ran * left, r, sizeof r);
        snprintf(eta, sizeof eta, ", about %s left", r);
    }
    fprintf(stderr, "%skvsim: sweep: %d/%d done, %d failed, %d running, %d to go; %s%s%s", p->tty ? "\r\033[K" : "",
            done, p->total, failed, running, left - running > 0 ? left - running : 0, e, eta,
            (p->tty && !final) ? "" : "\n");
    fflush(stderr);
    p->shown = 1;
}

/* ---------------------------------------------------------------- the run */

int kv_sweep_mpi_launched(int *size)
{
    const char *vars[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS"};
    for (size_t i = 0; i < KV_ARRAY_LEN(vars); i++) {
        const char *v = getenv(vars[i]);
        if (v && atoi(v) >= 1) {
            *size = atoi(v);
            return 1;
        }
    }
    if (getenv("PMIX_RANK") || getenv("PMI_RANK")) {
        *size = 0; /* size unknown here */
        return 1;
    }
    *size = 1;
    return 0;
}

int kv_sweep_run(kv_sweep_t *s, const kv_sweep_opts_t *o, kv_sweep_summary_t *sum)
{
    memset(sum, 0, sizeof *sum);
    int size = 1;
    if (kv_sweep_mpi_launched(&size) && o->slice_n == 0) {
        if (kv_sweep_mpi_available())
            return kv_sweep_mpi_run(s, o, sum);
        if (size != 1)
            return kv_error(KV_EUNAVAIL,
                            "started by an MPI launcher with %d processes, but this kvsim was built without MPI "
                            "(mpicc was not found when it was built): each process would run the whole sweep; "
                            "install libopenmpi-dev and rebuild, or run one process",
                            size);
    }
    const double t0 = kv_now();
    int *todo = NULL, n_todo = 0, rc;
    if ((rc = kv_sweep_prepare(s)) || (rc = kv_sweep_todo(s, o, &todo, &n_todo, sum)))
        goto done;
    sum->ranks = 1;
    sum->root = 1;
    kv_sweep_progress_t prog;
    kv_sweep_progress_begin(&prog, sum, o->quiet);
    if (!o->quiet)
        kv_info("sweep %s: %d samples%s: %d finished, %d failed, %d to do -> %s", s->name, sum->n_samples,
                o->slice_n ? " in this slice" : "", sum->done, sum->failed, n_todo, s->output);
    for (int k = 0; k < n_todo; k++) {
        kv_sweep_progress_show(&prog, sum->done, sum->failed, 1, sum->ran, 0);
        int outcome;
        if ((rc = kv_sweep_unit(s, todo[k], o, &outcome)))
            goto done;
        sum->done += outcome == KV_UNIT_DONE;
        sum->failed += outcome == KV_UNIT_FAILED;
        sum->ran += outcome == KV_UNIT_DONE || outcome == KV_UNIT_FAILED;
        sum->ran_failed += outcome == KV_UNIT_FAILED;
        if (outcome == KV_UNIT_SKIPPED) { /* another process finished it */
            const int st = sample_state(s, todo[k]);
            sum->done += st == ST_DONE;
            sum->failed += st == ST_FAILED;
        }
    }
    sum->missing = sum->n_samples - sum->done - sum->failed;
    kv_sweep_progress_show(&prog, sum->done, sum->failed, 0, sum->ran, 1);
    sum->seconds = kv_now() - t0;
    if (o->merge && o->slice_n == 0) {
        kv_sweep_summary_t st;
        kv_sweep_status(s, &st);
        if (st.missing == 0 || o->partial) {
            if ((rc = kv_sweep_merge(s, o, &st)))
                goto done;
            sum->merged = 1;
        } else {
            kv_warn("sweep: %d samples are still being worked on by another process: not merging (kvsim sweep "
                    "--merge merges when they are finished)",
                    st.missing);
        }
    }
done:
    kv_free(todo);
    return rc;
}

/* ---------------------------------------------------------------- Slurm */

/* Single-quoted for the shell. */
static void shell_quote(const char *s, char *out, size_t len)
{
    size_t k = 0;
    if (k + 1 < len)
        out[k++] = '\'';
    for (; *s && k + 5 < len; s++) {
        if (*s == '\'') {
            memcpy(out + k, "'\\''", 4);
            k += 4;
        } else
            out[k++] = *s;
    }
    if (k + 1 < len)
        out[k++] = '\'';
    out[k < len ? k : len - 1] = 0;
}

int kv_sweep_write_slurm(kv_sweep_t *s, const char *kvsim_exe, int tasks, char *path, size_t len)
{
    if (tasks <= 0)
        tasks = s->slurm_tasks > 0 ? s->slurm_tasks : KV_MIN(s->n, 16);
    if (tasks > s->n)
        tasks = s->n;
    char dir[KV_SWEEP_PATH + 64], logs[KV_SWEEP_PATH + 64], out_abs[KV_SWEEP_PATH];
    int rc = kv_sweep_prepare(s);
    if (rc)
        return rc;
    if (!realpath(s->output, out_abs))
        return kv_error(KV_EIO, "%s: %s", s->output, strerror(errno));
    snprintf(dir, sizeof dir, "%s/slurm", out_abs);
    snprintf(logs, sizeof logs, "%s/logs", dir);
    if ((rc = make_dirs(logs)))
        return rc;
    char qexe[KV_SWEEP_PATH * 2], qman[KV_SWEEP_PATH * 2], qout[KV_SWEEP_PATH * 2], name[160];
    shell_quote(kvsim_exe, qexe, sizeof qexe);
    shell_quote(s->manifest, qman, sizeof qman);
    shell_quote(out_abs, qout, sizeof qout);
    snprintf(name, sizeof name, "kvsim-%s", s->name);
    for (char *c = name; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '-' ||
              *c == '_' || *c == '.'))
            *c = '_';
    size_t cap = 8192 + (size_t)(s->n_slurm_options + s->n_slurm_setup) * 1100, u = 0;
    char *text = kv_malloc(cap, "sbatch script");
    if (!text)
        return KV_ENOMEM;
#define PUT(...) u += (size_t)snprintf(text + u, u < cap ? cap - u : 0, __VA_ARGS__)
    PUT("#!/bin/bash\n");
    PUT("# Written by kvsim sweep --slurm: sweep '%s', %d samples, %d array tasks.\n", s->name, s->n, tasks);
    PUT("# Task k runs samples k, k + %d, k + %d, ... (kvsim sweep --slice k/%d); a task that is killed\n", tasks,
        2 * tasks, tasks);
    PUT("# or times out can be resubmitted (sbatch --array=k ...) and goes on where it stopped. When every\n");
    PUT("# task has finished: kvsim sweep --merge -o %s %s\n", qout, qman);
    PUT("#SBATCH --job-name=%s\n", name);
    PUT("#SBATCH --array=0-%d\n", tasks - 1);
    PUT("#SBATCH --ntasks=1\n");
    PUT("#SBATCH --output=%s/%%A_%%a.out\n", logs);
    if (s->slurm_cpus > 0)
        PUT("#SBATCH --cpus-per-task=%d\n", s->slurm_cpus);
    if (s->slurm_time[0])
        PUT("#SBATCH --time=%s\n", s->slurm_time);
    if (s->slurm_partition[0])
        PUT("#SBATCH --partition=%s\n", s->slurm_partition);
    for (int i = 0; i < s->n_slurm_options; i++)
        PUT("#SBATCH %s\n", s->slurm_options[i]);
    PUT("set -euo pipefail\n");
    for (int i = 0; i < s->n_slurm_setup; i++)
        PUT("%s\n", s->slurm_setup[i]);
    PUT(": \"${SLURM_ARRAY_TASK_ID:?run this script with sbatch (or set SLURM_ARRAY_TASK_ID=k to run task k)}\"\n");
    PUT("exec %s sweep --slice \"$SLURM_ARRAY_TASK_ID/%d\" -o %s %s\n", qexe, tasks, qout, qman);
#undef PUT
    if (u >= cap) {
        kv_free(text);
        return kv_error(KV_ERANGE, "sbatch script too long");
    }
    snprintf(path, len, "%s/sweep.sbatch", dir);
    rc = kv_sweep_write_file(path, text, u);
    kv_free(text);
    if (rc == KV_OK)
        chmod(path, 0755);
    return rc;
}
