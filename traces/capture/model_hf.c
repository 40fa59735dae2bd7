/*
 * model_hf.c: Hugging Face Llama-family checkpoints (config.json + safetensors) into kv_model_t.
 *
 * safetensors (one file): 8 bytes little-endian u64 N, then N bytes of JSON
 *   {"__metadata__": {...}, NAME: {"dtype": "F32"|"F16"|"BF16"|..., "shape": [..],
 *    "data_offsets": [BEGIN, END]}, ...}
 * then the raw little-endian tensor data; BEGIN/END are byte offsets relative to the first byte
 * after the header. A sharded checkpoint lists, in model.safetensors.index.json, {"weight_map":
 * {NAME: FILE}}. Every file is mapped read-only and validated whole (header inside the file, JSON
 * well formed, offsets inside the data and not overlapping, size = product of the shape x dtype
 * size, known dtype) before a single weight is read; weights are then converted to fp32 into one
 * allocation in the layout kv_model.h describes and the files are unmapped.
 *
 * config.json gives the dimensions; anything the forward pass (kv_forward.h) does not compute
 * exactly is refused by name: other architectures, rope_scaling, attention or MLP biases, an
 * activation other than silu, a head_dim other than hidden_size / num_attention_heads. Mistral's
 * sliding_window is honoured by capping seq_len at the window: for contexts no longer than the
 * window, sliding-window attention is plain causal attention.
 *
 * RoPE order. kvsim's rope op (kernels/cpu/cpu_backend.c) rotates the interleaved pairs (2i, 2i+1)
 * of each head with frequency theta^(-2i/d), as the original Llama and llama2.c do. Hugging Face's
 * Llama applies RoPE as rotate_half, on pairs (i, i + d/2) with the same frequency for pair i, and
 * its conversion script reorders the rows of q_proj and k_proj (per head) to match: a head's
 * original row 2i + j (j = 0, 1) becomes Hugging Face row j*d/2 + i. So Hugging Face row r of a
 * head holds original row 2*(r mod d/2) + r div (d/2); the loader writes it there, and the forward
 * pass then produces the same post-RoPE Q and K as the llama2.c checkpoint of the same weights
 * (tests/test_hf_model.c checks both the permutation and the equality).
 */
#include "traces/capture/kv_model.h"

#include "sim/common/kv_common.h"
#include "traces/capture/kv_model_internal.h"
#include "traces/kv_f16.h"

#include <errno.h>
#include <fcntl.h>
#include <json.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_HEADER (100u << 20) /* the safetensors format caps the header at 100 MB */
#define MAX_JSON_FILE (64 << 20)
#define MAX_DIMS 8
#define MAX_SHARDS 4096

enum { DT_F32, DT_F16, DT_BF16 };
static const char *const dt_names[] = {"F32", "F16", "BF16"};
static const unsigned dt_size[] = {4, 2, 2};

typedef struct {
    const char *name; /* points into the file's parsed header (alive until the load ends) */
    int dtype, ndim, file;
    uint64_t shape[MAX_DIMS];
    uint64_t begin, end; /* relative to the data section */
    const unsigned char *data;
} st_tensor_t;

typedef struct {
    char path[1024];
    void *map;
    size_t len;
    json_object *hdr;
} st_file_t;

typedef struct {
    st_file_t *f;
    int nf;
    st_tensor_t *t;
    size_t nt, cap;
    const char *where; /* what to name when a tensor is missing: the single file or the index */
} st_set_t;

/* ---- small helpers ---- */

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && !strcmp(s + a - b, suffix);
}

int kv_model_is_hf_path(const char *path)
{
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return 1;
    return ends_with(path, ".json") || ends_with(path, ".safetensors");
}

/* Folder of a Hugging Face path into buf (the path itself for a directory). */
static void hf_dir(const char *path, char *buf, size_t len)
{
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        snprintf(buf, len, "%s", path);
        return;
    }
    const char *slash = strrchr(path, '/');
    if (!slash)
        snprintf(buf, len, ".");
    else if (slash == path)
        snprintf(buf, len, "/");
    else
        snprintf(buf, len, "%.*s", (int)(slash - path), path);
}

static const char *hf_default_tokenizer(const char *path, char *buf, size_t len)
{
    char dir[1024];
    hf_dir(path, dir, sizeof dir);
    snprintf(buf, len, "%s/tokenizer.json", dir);
    return access(buf, R_OK) == 0 ? buf : NULL;
}

/* Whole (small) JSON file parsed; errors name the file. */
static int read_json(const char *path, json_object **out)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return kv_error(KV_EIO, "%s: cannot open: %s", path, strerror(errno));
    int rc = KV_OK;
    char *buf = NULL;
    long n = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        n = ftell(f);
    if (n < 0 || fseek(f, 0, SEEK_SET) != 0) {
        rc = kv_error(KV_EIO, "%s: cannot read: %s", path, strerror(errno));
        goto done;
    }
    if (n > MAX_JSON_FILE) {
        rc = kv_error(KV_EFORMAT, "%s: %ld bytes, more than the %d MiB a JSON configuration needs", path, n,
                      MAX_JSON_FILE >> 20);
        goto done;
    }
    buf = kv_malloc((size_t)n + 1, "JSON file");
    if (!buf) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto done;
    }
    if (fread(buf, 1, (size_t)n, f) != (size_t)n) {
        rc = kv_error(KV_EIO, "%s: short read", path);
        goto done;
    }
    buf[n] = 0;
    json_tokener *tok = json_tokener_new();
    if (!tok) {
        rc = KV_ENOMEM;
        goto done;
    }
    json_object *o = json_tokener_parse_ex(tok, buf, (int)n);
    enum json_tokener_error je = json_tokener_get_error(tok);
    if (!o || je != json_tokener_success) {
        rc = kv_error(KV_EFORMAT, "%s: not valid JSON: %s (at byte %zu)", path, json_tokener_error_desc(je),
                      json_tokener_get_parse_end(tok));
        json_object_put(o);
    } else if (!json_object_is_type(o, json_type_object)) {
        rc = kv_error(KV_EFORMAT, "%s: the JSON is not an object", path);
        json_object_put(o);
    } else {
        *out = o;
    }
    json_tokener_free(tok);
done:
    kv_free(buf);
    fclose(f);
    return rc;
}

/* A non-negative integer from a JSON value (ints only, no doubles or strings). */
static int json_u64(json_object *v, uint64_t *out)
{
    if (!v || !json_object_is_type(v, json_type_int))
        return 0;
    errno = 0;
    int64_t x = json_object_get_int64(v);
    if (x < 0 || errno)
        return 0;
    *out = (uint64_t)x;
    return 1;
}

/* ---- safetensors ---- */

static int cmp_begin(const void *a, const void *b)
{
    const st_tensor_t *x = *(const st_tensor_t *const *)a, *y = *(const st_tensor_t *const *)b;
    return (x->begin > y->begin) - (x->begin < y->begin);
}

static const char *shape_text(const uint64_t *shape, int ndim, char *buf, size_t len)
{
    size_t o = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < ndim && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%llu", i ? ", " : "", (unsigned long long)shape[i]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
    return buf;
}

/* Map, parse and validate one safetensors file; its tensors are appended to s. */
static int st_open(st_set_t *s, const char *path)
{
    st_file_t *f = &s->f[s->nf];
    memset(f, 0, sizeof *f);
    snprintf(f->path, sizeof f->path, "%s", path);
    const int fi = s->nf++;
    int rc = kv_map_file(path, "safetensors file", 8, "8-byte safetensors header length", &f->map, &f->len);
    if (rc)
        return rc;
    const uint64_t size = f->len;
    const unsigned char *b = f->map;
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = hlen << 8 | b[i];
    if (hlen > size - 8) {
        rc = kv_error(KV_EFORMAT,
                      "%s: safetensors header length %llu runs past the end of the file (%llu bytes; truncated or "
                      "not a safetensors file?)",
                      path, (unsigned long long)hlen, (unsigned long long)size);
        goto done;
    }
    if (hlen > MAX_HEADER) {
        rc = kv_error(KV_EFORMAT, "%s: safetensors header length %llu is beyond the format's 100 MB limit", path,
                      (unsigned long long)hlen);
        goto done;
    }
    json_tokener *tok = json_tokener_new();
    if (!tok) {
        rc = KV_ENOMEM;
        goto done;
    }
    f->hdr = json_tokener_parse_ex(tok, (const char *)b + 8, (int)hlen);
    enum json_tokener_error je = json_tokener_get_error(tok);
    json_tokener_free(tok);
    if (!f->hdr || je != json_tokener_success) {
        json_object_put(f->hdr);
        f->hdr = NULL;
        rc = kv_error(KV_EFORMAT, "%s: safetensors header (%llu bytes) is not complete JSON: %s", path,
                      (unsigned long long)hlen, json_tokener_error_desc(je));
        goto done;
    }
    if (!json_object_is_type(f->hdr, json_type_object)) {
        rc = kv_error(KV_EFORMAT, "%s: safetensors header is not a JSON object", path);
        goto done;
    }
    const uint64_t data_len = size - 8 - hlen;
    const unsigned char *data = b + 8 + hlen;
    const size_t first = s->nt;
    json_object_object_foreach(f->hdr, name, v)
    {
        if (!strcmp(name, "__metadata__"))
            continue;
        if (s->nt == s->cap) {
            size_t cap = s->cap ? 2 * s->cap : 256;
            st_tensor_t *t = kv_realloc(s->t, cap * sizeof *t, "tensor table");
            if (!t) {
                rc = KV_ENOMEM;
                goto done;
            }
            s->t = t, s->cap = cap;
        }
        st_tensor_t *t = &s->t[s->nt];
        memset(t, 0, sizeof *t);
        t->name = name;
        t->file = fi;
        json_object *dt, *shape, *offs;
        if (!json_object_is_type(v, json_type_object) || !json_object_object_get_ex(v, "dtype", &dt) ||
            !json_object_object_get_ex(v, "shape", &shape) || !json_object_object_get_ex(v, "data_offsets", &offs) ||
            !json_object_is_type(dt, json_type_string) || !json_object_is_type(shape, json_type_array) ||
            !json_object_is_type(offs, json_type_array)) {
            rc = kv_error(KV_EFORMAT,
                          "%s: tensor %s: header entry needs dtype (string), shape and data_offsets (arrays)", path,
                          name);
            goto done;
        }
        const char *dts = json_object_get_string(dt);
        t->dtype = -1;
        for (int k = 0; k < 3; k++)
            if (!strcmp(dts, dt_names[k]))
                t->dtype = k;
        if (t->dtype < 0) {
            rc = kv_error(KV_EFORMAT, "%s: tensor %s has dtype %s (kvsim reads F32, F16 and BF16)", path, name, dts);
            goto done;
        }
        size_t nd = json_object_array_length(shape);
        if (nd > MAX_DIMS) {
            rc = kv_error(KV_EFORMAT, "%s: tensor %s has %zu dimensions (at most %d are read)", path, name, nd,
                          MAX_DIMS);
            goto done;
        }
        t->ndim = (int)nd;
        uint64_t numel = 1;
        int ok = 1;
        for (size_t k = 0; k < nd; k++) {
            if (!json_u64(json_object_array_get_idx(shape, k), &t->shape[k])) {
                rc =
                    kv_error(KV_EFORMAT, "%s: tensor %s: shape entry %zu is not a non-negative integer", path, name, k);
                goto done;
            }
            ok &= !__builtin_mul_overflow(numel, t->shape[k], &numel);
        }
        if (json_object_array_length(offs) != 2 || !json_u64(json_object_array_get_idx(offs, 0), &t->begin) ||
            !json_u64(json_object_array_get_idx(offs, 1), &t->end)) {
            rc = kv_error(KV_EFORMAT, "%s: tensor %s: data_offsets must be two non-negative integers", path, name);
            goto done;
        }
        if (t->begin > t->end || t->end > data_len) {
            rc = kv_error(KV_EFORMAT,
                          "%s: tensor %s: data_offsets [%llu, %llu] out of range (the data section after the "
                          "header is %llu bytes)",
                          path, name, (unsigned long long)t->begin, (unsigned long long)t->end,
                          (unsigned long long)data_len);
            goto done;
        }
        uint64_t bytes;
        ok &= !__builtin_mul_overflow(numel, (uint64_t)dt_size[t->dtype], &bytes);
        if (!ok || bytes != t->end - t->begin) {
            char sh[160];
            rc = kv_error(KV_EFORMAT, "%s: tensor %s: shape %s of %s needs %llu bytes, data_offsets span %llu", path,
                          name, shape_text(t->shape, t->ndim, sh, sizeof sh), dts, (unsigned long long)bytes,
                          (unsigned long long)(t->end - t->begin));
            goto done;
        }
        t->data = data + t->begin;
        s->nt++;
    }
    /* tensors of one file must not share bytes */
    size_t n = s->nt - first;
    if (n > 1) {
        const st_tensor_t **byoff = kv_malloc(n * sizeof *byoff, "tensor order");
        if (!byoff) {
            rc = KV_ENOMEM;
            goto done;
        }
        for (size_t i = 0; i < n; i++)
            byoff[i] = &s->t[first + i];
        qsort(byoff, n, sizeof *byoff, cmp_begin);
        for (size_t i = 1; i < n && rc == KV_OK; i++)
            if (byoff[i]->begin < byoff[i - 1]->end && byoff[i]->begin < byoff[i]->end)
                rc = kv_error(KV_EFORMAT, "%s: tensors %s and %s overlap (data_offsets %llu..%llu and %llu..%llu)",
                              path, byoff[i - 1]->name, byoff[i]->name, (unsigned long long)byoff[i - 1]->begin,
                              (unsigned long long)byoff[i - 1]->end, (unsigned long long)byoff[i]->begin,
                              (unsigned long long)byoff[i]->end);
        kv_free(byoff);
    }
done:
    return rc;
}

static void st_close(st_set_t *s)
{
    for (int i = 0; i < s->nf; i++) {
        if (s->f[i].map)
            munmap(s->f[i].map, s->f[i].len);
        json_object_put(s->f[i].hdr);
    }
    kv_free(s->f);
    kv_free(s->t);
    memset(s, 0, sizeof *s);
}

static const st_tensor_t *st_find(const st_set_t *s, const char *name)
{
    for (size_t i = 0; i < s->nt; i++)
        if (!strcmp(s->t[i].name, name))
            return &s->t[i];
    return NULL;
}

static float bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16; /* bf16 is the top half of an fp32 */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Tensor `name` of shape [rows, cols] (cols 0: [rows]) converted to fp32 into dst. When head_dim > 0
 * the rows are reordered from Hugging Face's rotate_half order to llama2.c's interleaved order
 * (top-of-file comment). `dtype_count` counts the tensors read, per dtype. */
static int st_get(const st_set_t *s, const char *name, uint64_t rows, uint64_t cols, int head_dim, float *dst,
                  int *dtype_count)
{
    const st_tensor_t *t = st_find(s, name);
    if (!t)
        return kv_error(KV_EFORMAT, "%s: tensor %s is missing", s->where, name);
    const uint64_t want[2] = {rows, cols};
    const int wnd = cols ? 2 : 1;
    if (t->ndim != wnd || t->shape[0] != rows || (cols && t->shape[1] != cols)) {
        char a[160], b[160];
        return kv_error(KV_EFORMAT, "%s: tensor %s has shape %s, config.json implies %s", s->f[t->file].path, name,
                        shape_text(t->shape, t->ndim, a, sizeof a), shape_text(want, wnd, b, sizeof b));
    }
    dtype_count[t->dtype]++;
    const uint64_t ncol = cols ? cols : 1;
    const uint64_t hd = head_dim > 0 ? (uint64_t)head_dim : 2, half = hd / 2; /* head_dim is even (config check) */
#pragma omp parallel for schedule(static) if (rows * ncol > 65536)
    for (uint64_t r = 0; r < rows; r++) {
        uint64_t to = r;
        if (head_dim > 0) {
            uint64_t h = r / hd, i = r % hd;
            to = h * hd + 2 * (i % half) + i / half;
        }
        const unsigned char *src = t->data + r * ncol * dt_size[t->dtype];
        float *out = dst + to * ncol;
        /* the data may sit at any byte offset: read element by element with memcpy */
        for (uint64_t c = 0; c < ncol; c++) {
            if (t->dtype == DT_F32) {
                memcpy(&out[c], src + 4 * c, 4);
            } else {
                uint16_t h16;
                memcpy(&h16, src + 2 * c, 2);
                out[c] = t->dtype == DT_F16 ? kv_f16_to_f32(h16) : bf16_to_f32(h16);
            }
        }
    }
    return KV_OK;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* Open the weights: the index's shards (file-name order) or the single file. Fills m->files after
 * config.json (already files[0]). */
static int open_weights(kv_model_t *m, const char *dir, const char *given, st_set_t *s)
{
    int rc = KV_OK;
    char index[1100], single[1100];
    json_object *idx = NULL;
    const char **names = NULL;
    size_t nn = 0;
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    snprintf(single, sizeof single, "%s/model.safetensors", dir);
    if (given && ends_with(given, ".safetensors")) {
        snprintf(single, sizeof single, "%s", given);
    } else if ((given && ends_with(given, ".index.json")) || access(index, R_OK) == 0) {
        if (given && ends_with(given, ".index.json"))
            snprintf(index, sizeof index, "%s", given);
        if ((rc = read_json(index, &idx)))
            return rc;
        json_object *wm;
        if (!json_object_object_get_ex(idx, "weight_map", &wm) || !json_object_is_type(wm, json_type_object)) {
            rc = kv_error(KV_EFORMAT, "%s: no \"weight_map\" object", index);
            goto done;
        }
        size_t cap = (size_t)json_object_object_length(wm) + 1;
        names = kv_calloc(cap, sizeof *names, "shard names");
        if (!names) {
            rc = KV_ENOMEM;
            goto done;
        }
        json_object_object_foreach(wm, tname, fv)
        {
            const char *fn = json_object_is_type(fv, json_type_string) ? json_object_get_string(fv) : NULL;
            if (!fn || !fn[0] || strchr(fn, '/')) {
                rc = kv_error(KV_EFORMAT, "%s: weight_map entry %s is not a file name in the folder", index, tname);
                goto done;
            }
            size_t k = 0;
            while (k < nn && strcmp(names[k], fn))
                k++;
            if (k == nn)
                names[nn++] = fn;
        }
        if (nn == 0 || nn > MAX_SHARDS) {
            rc = kv_error(KV_EFORMAT, "%s: weight_map names %zu files", index, nn);
            goto done;
        }
        qsort(names, nn, sizeof *names, cmp_str);
    }
    const size_t nfiles = names ? nn : 1;
    s->f = kv_calloc(nfiles, sizeof *s->f, "safetensors files");
    char(*files)[1024] = kv_realloc(m->files, (nfiles + 2) * sizeof *files, "file list");
    if (files)
        m->files = files; /* the old block is gone once realloc succeeds */
    if (!s->f || !files) {
        rc = KV_ENOMEM;
        goto done;
    }
    if (names) {
        snprintf(m->files[m->n_files++], 1024, "%s", index);
        for (size_t k = 0; k < nn; k++) {
            char p[2200];
            snprintf(p, sizeof p, "%s/%s", dir, names[k]);
            snprintf(m->files[m->n_files++], 1024, "%s", p);
            if ((rc = st_open(s, p)))
                goto done;
        }
        /* every name of the index must be in the file it names, once */
        json_object *wm;
        json_object_object_get_ex(idx, "weight_map", &wm);
        json_object_object_foreach(wm, tname, fv)
        {
            const st_tensor_t *t = st_find(s, tname);
            const char *fn = json_object_get_string(fv);
            if (!t || !ends_with(s->f[t->file].path, fn)) {
                rc = kv_error(KV_EFORMAT, "%s: tensor %s is listed in %s but is not in it", index, tname, fn);
                goto done;
            }
        }
        for (size_t i = 0; i < s->nt; i++)
            for (size_t j = i + 1; j < s->nt; j++)
                if (!strcmp(s->t[i].name, s->t[j].name)) {
                    rc = kv_error(KV_EFORMAT, "%s: tensor %s is in both %s and %s", index, s->t[i].name,
                                  s->f[s->t[i].file].path, s->f[s->t[j].file].path);
                    goto done;
                }
    } else {
        snprintf(m->files[m->n_files++], 1024, "%s", single);
        if ((rc = st_open(s, single)))
            goto done;
    }
done:
    kv_free(names);
    json_object_put(idx);
    return rc;
}

/* ---- config.json ---- */

static int cfg_int(json_object *cfg, const char *path, const char *key, int required, int dflt, int *out)
{
    json_object *v;
    if (!json_object_object_get_ex(cfg, key, &v) || json_object_is_type(v, json_type_null)) {
        if (required)
            return kv_error(KV_EFORMAT, "%s: \"%s\" is missing", path, key);
        *out = dflt;
        return KV_OK;
    }
    uint64_t u;
    if (!json_u64(v, &u) || u > INT32_MAX)
        return kv_error(KV_EFORMAT, "%s: \"%s\" is %s, not a non-negative integer", path, key,
                        json_object_to_json_string(v));
    *out = (int)u;
    return KV_OK;
}

static int cfg_num(json_object *cfg, const char *path, const char *key, double dflt, double *out)
{
    json_object *v;
    if (!json_object_object_get_ex(cfg, key, &v) || json_object_is_type(v, json_type_null)) {
        *out = dflt;
        return KV_OK;
    }
    if (!json_object_is_type(v, json_type_double) && !json_object_is_type(v, json_type_int))
        return kv_error(KV_EFORMAT, "%s: \"%s\" is %s, not a number", path, key, json_object_to_json_string(v));
    *out = json_object_get_double(v);
    return KV_OK;
}

static int cfg_bool(json_object *cfg, const char *key, int dflt)
{
    json_object *v;
    if (!json_object_object_get_ex(cfg, key, &v) || json_object_is_type(v, json_type_null))
        return dflt;
    return json_object_get_boolean(v);
}

static int parse_config(const char *path, json_object *j, kv_model_config_t *c)
{
    int rc;
    json_object *v;
    const char *arch = NULL;
    if (json_object_object_get_ex(j, "architectures", &v) && json_object_is_type(v, json_type_array) &&
        json_object_array_length(v) > 0)
        arch = json_object_get_string(json_object_array_get_idx(v, 0));
    if (!arch)
        return kv_error(KV_EFORMAT, "%s: no \"architectures\" (kvsim runs LlamaForCausalLM and MistralForCausalLM)",
                        path);
    if (strcmp(arch, "LlamaForCausalLM") && strcmp(arch, "MistralForCausalLM"))
        return kv_error(KV_EFORMAT,
                        "%s: architecture %s is not supported (kvsim runs LlamaForCausalLM and MistralForCausalLM)",
                        path, arch);
    if (json_object_object_get_ex(j, "hidden_act", &v) && strcmp(json_object_get_string(v), "silu"))
        return kv_error(KV_EFORMAT, "%s: hidden_act %s is not supported (the forward pass computes silu)", path,
                        json_object_get_string(v));
    if (json_object_object_get_ex(j, "rope_scaling", &v) && !json_object_is_type(v, json_type_null)) {
        json_object *ty = NULL;
        if (!json_object_object_get_ex(v, "rope_type", &ty))
            json_object_object_get_ex(v, "type", &ty);
        return kv_error(KV_EFORMAT,
                        "%s: rope_scaling of type %s is not supported (the forward pass computes plain RoPE with "
                        "rope_theta; only \"rope_scaling\": null is accepted)",
                        path, ty ? json_object_get_string(ty) : "(unnamed)");
    }
    if (cfg_bool(j, "attention_bias", 0))
        return kv_error(KV_EFORMAT, "%s: attention_bias is true: attention biases are not supported", path);
    if (cfg_bool(j, "mlp_bias", 0))
        return kv_error(KV_EFORMAT, "%s: mlp_bias is true: MLP biases are not supported", path);
    int head_dim = 0, window = 0;
    if ((rc = cfg_int(j, path, "hidden_size", 1, 0, &c->dim)) ||
        (rc = cfg_int(j, path, "intermediate_size", 1, 0, &c->hidden_dim)) ||
        (rc = cfg_int(j, path, "num_hidden_layers", 1, 0, &c->n_layers)) ||
        (rc = cfg_int(j, path, "num_attention_heads", 1, 0, &c->n_heads)) ||
        (rc = cfg_int(j, path, "num_key_value_heads", 0, c->n_heads, &c->n_kv_heads)) ||
        (rc = cfg_int(j, path, "vocab_size", 1, 0, &c->vocab_size)) ||
        (rc = cfg_int(j, path, "max_position_embeddings", 1, 0, &c->seq_len)) ||
        (rc = cfg_int(j, path, "head_dim", 0, 0, &head_dim)) ||
        (rc = cfg_int(j, path, "sliding_window", 0, 0, &window)))
        return rc;
    double theta, eps;
    if ((rc = cfg_num(j, path, "rope_theta", 10000.0, &theta)) || (rc = cfg_num(j, path, "rms_norm_eps", 1e-6, &eps)))
        return rc;
    if (!(theta > 0) || !(eps > 0))
        return kv_error(KV_EFORMAT, "%s: rope_theta %g and rms_norm_eps %g must be positive", path, theta, eps);
    c->rope_theta = (float)theta;
    c->norm_eps = (float)eps;
    c->shared_classifier = cfg_bool(j, "tie_word_embeddings", 0); /* LlamaConfig's default is false */
    c->version = -1;
    if ((rc = kv_model_config_check(c, path)))
        return rc;
    if (head_dim && head_dim != c->head_dim)
        return kv_error(KV_EFORMAT,
                        "%s: head_dim %d differs from hidden_size / num_attention_heads = %d (not supported by the "
                        "forward pass)",
                        path, head_dim, c->head_dim);
    if (window > 0 && window < c->seq_len)
        c->seq_len = window; /* exact: within the window, sliding-window attention is causal attention */
    return KV_OK;
}

/* ---- the loader ---- */

static int hf_load(const char *path, kv_model_t **out)
{
    *out = NULL;
    int rc;
    st_set_t s;
    memset(&s, 0, sizeof s);
    json_object *cfgj = NULL;
    kv_model_t *m = kv_calloc(1, sizeof *m, "model");
    if (!m)
        return KV_ENOMEM;
    snprintf(m->path, sizeof m->path, "%s", path);
    m->hf = 1;
    char dir[1024], cfg_path[1100];
    hf_dir(path, dir, sizeof dir);
    struct stat st;
    int is_dir = stat(path, &st) == 0 && S_ISDIR(st.st_mode);
    if (!is_dir && access(path, R_OK) != 0) {
        rc = kv_error(KV_EIO, "%s: cannot open model: %s", path, strerror(errno));
        goto fail;
    }
    if (!is_dir && ends_with(path, ".json") && !ends_with(path, ".index.json"))
        snprintf(cfg_path, sizeof cfg_path, "%s", path);
    else
        snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    m->files = kv_calloc(1, sizeof *m->files, "file list");
    if (!m->files) {
        rc = KV_ENOMEM;
        goto fail;
    }
    snprintf(m->files[m->n_files++], 1024, "%s", cfg_path);
    if ((rc = read_json(cfg_path, &cfgj)))
        goto fail;
    kv_model_config_t *c = &m->cfg;
    if ((rc = parse_config(cfg_path, cfgj, c)))
        goto fail;
    if ((rc = open_weights(m, dir, is_dir ? NULL : path, &s)))
        goto fail;
    s.where = m->files[1]; /* what lists the tensors, for "missing" errors: the index, else the single file */

    /* one fp32 allocation in the layout of kv_model.h */
    const uint64_t L = (uint64_t)c->n_layers, D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim;
    const uint64_t V = (uint64_t)c->vocab_size, KV = (uint64_t)c->kv_dim;
    const uint64_t sizes[12] = {V * D, L * D,     L * D * D, L * KV * D, L * KV * D, L * D * D,
                                L * D, L * H * D, L * D * H, L * H * D,  D,          c->shared_classifier ? 0 : V * D};
    uint64_t total = 0;
    for (int i = 0; i < 12; i++)
        total += sizes[i]; /* bounded by kv_model_config_check: no overflow for accepted dimensions */
    m->owned = kv_malloc_aligned((size_t)total * sizeof(float), "model weights");
    if (!m->owned) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto fail;
    }
    m->n_params = (size_t)total;
    float *p[12];
    p[0] = m->owned;
    for (int i = 1; i < 12; i++)
        p[i] = p[i - 1] + sizes[i - 1];
    m->token_embedding = p[0], m->rms_att = p[1], m->wq = p[2], m->wk = p[3], m->wv = p[4], m->wo = p[5];
    m->rms_ffn = p[6], m->w1 = p[7], m->w2 = p[8], m->w3 = p[9], m->rms_final = p[10];
    m->wcls = c->shared_classifier ? p[0] : p[11];
    int seen[3] = {0, 0, 0};
    const int hd = c->head_dim;
    if ((rc = st_get(&s, "model.embed_tokens.weight", V, D, 0, p[0], seen)))
        goto fail;
    for (int l = 0; l < c->n_layers; l++) {
        char n[128];
        struct {
            const char *name;
            uint64_t rows, cols;
            int perm;
            float *dst;
        } w[9] = {
            {"input_layernorm", D, 0, 0, p[1] + l * D},         {"self_attn.q_proj", D, D, hd, p[2] + l * D * D},
            {"self_attn.k_proj", KV, D, hd, p[3] + l * KV * D}, {"self_attn.v_proj", KV, D, 0, p[4] + l * KV * D},
            {"self_attn.o_proj", D, D, 0, p[5] + l * D * D},    {"post_attention_layernorm", D, 0, 0, p[6] + l * D},
            {"mlp.gate_proj", H, D, 0, p[7] + l * H * D},       {"mlp.down_proj", D, H, 0, p[8] + l * D * H},
            {"mlp.up_proj", H, D, 0, p[9] + l * H * D},
        };
        for (int i = 0; i < 9; i++) {
            snprintf(n, sizeof n, "model.layers.%d.%s.weight", l, w[i].name);
            if ((rc = st_get(&s, n, w[i].rows, w[i].cols, w[i].perm, w[i].dst, seen)))
                goto fail;
        }
    }
    if ((rc = st_get(&s, "model.norm.weight", D, 0, 0, p[10], seen)))
        goto fail;
    if (!c->shared_classifier && (rc = st_get(&s, "lm_head.weight", V, D, 0, p[11], seen)))
        goto fail;
    const int kinds = (seen[DT_F32] > 0) + (seen[DT_F16] > 0) + (seen[DT_BF16] > 0);
    snprintf(m->hf_dtype, sizeof m->hf_dtype, "%s",
             kinds > 1          ? "mixed"
             : seen[DT_F16]     ? "F16"
             : seen[DT_BF16]    ? "BF16"
                                : "F32");
    kv_model_set_dtypes(m, dt_names, seen, 3);
    st_close(&s);
    json_object_put(cfgj);
    *out = m;
    return KV_OK;
fail:
    st_close(&s);
    json_object_put(cfgj);
    kv_model_free(m);
    return rc;
}

const kv_model_format_t kv_model_format_hf = {"safetensors", kv_model_is_hf_path, hf_load, hf_default_tokenizer};
