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
 * config.json (parse_config) gives the architecture (LlamaForCausalLM, MistralForCausalLM,
 * Qwen2ForCausalLM; anything else is refused by name), the dimensions and the RoPE. Nothing in it is
 * read silently wrong: every top-level key is looked up in one table (cfg_keys, below; README.md's
 * Models section lists the same three sets, and tests/test_hf_config.c checks they agree):
 *   - read and used: architectures, model_type (must match), hidden_size, intermediate_size,
 *     num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, vocab_size,
 *     max_position_embeddings, rms_norm_eps, tie_word_embeddings, rope_theta, rope_scaling,
 *     rope_parameters, original_max_position_embeddings; Mistral: sliding_window; Qwen2:
 *     use_sliding_window, sliding_window, max_window_layers, layer_types;
 *   - ignored, because they do not change a forward pass's logits: provenance, storage dtypes (kvsim
 *     computes in fp32), token ids, use_cache, training settings (initializer_range,
 *     attention_dropout), kernel choices (attn_implementation), output packaging, classification
 *     heads, generation settings, keys these classes never read (is_llama_config, Mistral's
 *     layer_types, ...);
 *   - refused by name unless neutral, because any other value changes the computation in a way the
 *     forward pass does not implement: hidden_act (silu/swish), attention_bias and mlp_bias (false),
 *     pretraining_tp (1), partial_rotary_factor (1), rope_interleaved (false), is_encoder_decoder
 *     (false), pruned_heads (empty), quantization_config and auto_map (null).
 * A key that is not in the table is reported by a warning naming it (kv_warn, once per key per load)
 * and the load goes on; so are keys of a RoPE dict that its type does not read, and tensors of the
 * files that the forward pass does not read. Missing optional keys take transformers 5's defaults for
 * the class (LlamaConfig, MistralConfig, Qwen2Config).
 *
 * RoPE (parse_rope): transformers 5's rope_parameters and transformers 4's rope_theta + rope_scaling
 * ("type" or "rope_type"), read with transformers' precedence and defaults; where two places give
 * different values the file is refused instead of one being picked. Types default, linear and llama3
 * are computed (kernels/kv_rope.h); others (dynamic, yarn, longrope, ...) are refused by name.
 * Sliding windows: Mistral's caps seq_len at the window (for contexts no longer than the window,
 * sliding-window attention is plain causal attention); Qwen2's use_sliding_window is accepted when
 * false (transformers then drops the window) or when the window covers max_position_embeddings.
 * Qwen2's q/k/v biases (self_attn.{q,k,v}_proj.bias) are loaded into bq/bk/bv, the q and k ones with
 * the rows permuted like the weights' (below).
 *
 * RoPE order. kvsim's rope op (kernels/kv_backend.h) rotates the interleaved pairs (2i, 2i+1) of
 * each head with pair i's frequency (theta^(-2i/d) when unscaled), as the original Llama and llama2.c
 * do. Hugging Face's Llama applies RoPE as rotate_half, on pairs (i, i + d/2) with the same frequency
 * for pair i, and
 * its conversion script reorders the rows of q_proj and k_proj (per head) to match: a head's
 * original row 2i + j (j = 0, 1) becomes Hugging Face row j*d/2 + i. So Hugging Face row r of a
 * head holds original row 2*(r mod d/2) + r div (d/2); the loader writes it there, and the forward
 * pass then produces the same post-RoPE Q and K as the llama2.c checkpoint of the same weights
 * (tests/test_hf_model.c checks both the permutation and the equality).
 */
#include "traces/capture/kv_model.h"

#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "traces/capture/kv_model_internal.h"
#include "traces/kv_f16.h"

#include <errno.h>
#include <fcntl.h>
#include <json.h>
#include <math.h>
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
    int used; /* read by the loader */
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
    FILE *f;
    int rc = kv_open_input(path, "file", &f);
    if (rc)
        return rc;
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

static st_tensor_t *st_find(const st_set_t *s, const char *name)
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
    st_tensor_t *t = st_find(s, name);
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
    t->used = 1;
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

/* The architectures kvsim runs: the class named in "architectures", the model_type transformers writes
 * beside it, and kvsim's name (kv_model_config_t.arch). */
enum { A_LLAMA = 1, A_MISTRAL = 2, A_QWEN2 = 4, A_ALL = 7 };

static const struct {
    const char *cls, *model_type;
    unsigned bit;
} archs[] = {
    {"LlamaForCausalLM", "llama", A_LLAMA},
    {"MistralForCausalLM", "mistral", A_MISTRAL},
    {"Qwen2ForCausalLM", "qwen2", A_QWEN2},
};
#define ARCH_LIST "LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM"

/* Why a value of a checked key is refused: NULL when it is accepted (v is never JSON null). */
typedef const char *(*key_check_t)(json_object *v);

static const char *must_be_false(json_object *v)
{
    return json_object_is_type(v, json_type_boolean) && !json_object_get_boolean(v) ? NULL : "only false is accepted";
}
static const char *must_be_silu(json_object *v)
{
    const char *s = json_object_is_type(v, json_type_string) ? json_object_get_string(v) : "";
    /* transformers maps both names to torch.nn.SiLU */
    return !strcmp(s, "silu") || !strcmp(s, "swish") ? NULL : "the forward pass computes silu (\"silu\", \"swish\")";
}
static const char *at_most_one(json_object *v)
{
    return json_object_is_type(v, json_type_int) && json_object_get_int64(v) <= 1 ? NULL : "only 1 is accepted";
}
static const char *must_be_one(json_object *v)
{
    return (json_object_is_type(v, json_type_int) || json_object_is_type(v, json_type_double)) &&
                   json_object_get_double(v) == 1.0
               ? NULL
               : "kvsim rotates the whole head (only 1 is accepted)";
}
static const char *must_be_empty(json_object *v)
{
    return json_object_is_type(v, json_type_object) && json_object_object_length(v) == 0 ? NULL : "only {} is accepted";
}
static const char *never(json_object *v)
{
    (void)v;
    return "only null is accepted";
}

/* How each config.json key is treated. Every key of the file is looked up here (for the file's
 * architecture): USED keys are read by parse_config and change what is computed; IGNORED keys do not
 * change the logits or the trace (generation settings, token ids, training-only settings, provenance);
 * CHECKED keys would change the computation in ways kvsim does not implement, so only their neutral
 * value is accepted and any other is refused by name (`note` says what is not implemented). A key
 * that is not here is reported by a warning naming it and otherwise ignored. README.md (Models) lists
 * the same three sets. */
typedef enum { KEY_USED = KV_HF_KEY_USED, KEY_IGNORED = KV_HF_KEY_IGNORED, KEY_CHECKED = KV_HF_KEY_CHECKED } key_kind_t;

typedef struct {
    const char *key;
    unsigned archs; /* A_* bits the entry is for */
    key_kind_t kind;
    key_check_t check; /* KEY_CHECKED */
    const char *note;
} cfg_key_t;

static const cfg_key_t cfg_keys[] = {
    /* read and used */
    {"architectures", A_ALL, KEY_USED, NULL, "selects the forward pass (one entry)"},
    {"model_type", A_ALL, KEY_USED, NULL, "must match the architecture (llama, mistral, qwen2)"},
    {"hidden_size", A_ALL, KEY_USED, NULL, "dim"},
    {"intermediate_size", A_ALL, KEY_USED, NULL, "hidden_dim"},
    {"num_hidden_layers", A_ALL, KEY_USED, NULL, "n_layers"},
    {"num_attention_heads", A_ALL, KEY_USED, NULL, "n_heads"},
    {"num_key_value_heads", A_ALL, KEY_USED, NULL, "n_kv_heads"},
    {"head_dim", A_ALL, KEY_USED, NULL, "head_dim (default hidden_size / num_attention_heads)"},
    {"vocab_size", A_ALL, KEY_USED, NULL, "vocab_size"},
    {"max_position_embeddings", A_ALL, KEY_USED, NULL, "seq_len (the context kvsim accepts)"},
    {"rms_norm_eps", A_ALL, KEY_USED, NULL, "RMSNorm epsilon"},
    {"tie_word_embeddings", A_ALL, KEY_USED, NULL, "classifier shared with the embedding"},
    {"hidden_act", A_ALL, KEY_CHECKED, must_be_silu, "activation"},
    {"rope_theta", A_ALL, KEY_USED, NULL, "RoPE base (transformers 4)"},
    {"rope_scaling", A_ALL, KEY_USED, NULL, "RoPE scaling (transformers 4)"},
    {"rope_parameters", A_ALL, KEY_USED, NULL, "RoPE base and scaling (transformers 5)"},
    {"original_max_position_embeddings", A_ALL, KEY_USED, NULL, "llama3 RoPE scaling (overrides the dict's)"},
    {"partial_rotary_factor", A_ALL, KEY_CHECKED, must_be_one, "partial RoPE"},
    {"sliding_window", A_MISTRAL | A_QWEN2, KEY_USED, NULL, "sliding-window attention"},
    {"use_sliding_window", A_QWEN2, KEY_USED, NULL, "sliding-window attention"},
    {"max_window_layers", A_QWEN2, KEY_USED, NULL, "layers that slide (when use_sliding_window)"},
    {"layer_types", A_QWEN2, KEY_USED, NULL, "layers that slide (when use_sliding_window)"},
    /* ignored: no effect on the logits of a forward pass */
    {"layer_types", A_MISTRAL, KEY_IGNORED, NULL, "not read by transformers' MistralForCausalLM"},
    {"_name_or_path", A_ALL, KEY_IGNORED, NULL, "provenance"},
    {"_model_name_or_path", A_ALL, KEY_IGNORED, NULL, "provenance (transformers' GGUF conversion writes it)"},
    {"_commit_hash", A_ALL, KEY_IGNORED, NULL, "provenance"},
    {"transformers_version", A_ALL, KEY_IGNORED, NULL, "provenance"},
    {"torch_dtype", A_ALL, KEY_IGNORED, NULL, "kvsim computes in fp32 whatever the stored dtype"},
    {"dtype", A_ALL, KEY_IGNORED, NULL, "kvsim computes in fp32 whatever the stored dtype"},
    {"use_bfloat16", A_ALL, KEY_IGNORED, NULL, "kvsim computes in fp32 whatever the stored dtype"},
    {"bos_token_id", A_ALL, KEY_IGNORED, NULL, "token ids: the tokenizer's business"},
    {"eos_token_id", A_ALL, KEY_IGNORED, NULL, "token ids: the tokenizer's business"},
    {"pad_token_id", A_ALL, KEY_IGNORED, NULL, "token ids: the tokenizer's business"},
    {"sep_token_id", A_ALL, KEY_IGNORED, NULL, "token ids: the tokenizer's business"},
    {"unk_token_id", A_ALL, KEY_IGNORED, NULL, "token ids: the tokenizer's business"},
    {"decoder_start_token_id", A_ALL, KEY_IGNORED, NULL, "token ids: the tokenizer's business"},
    {"tokenizer_class", A_ALL, KEY_IGNORED, NULL, "the tokenizer's business"},
    {"use_cache", A_ALL, KEY_IGNORED, NULL, "a KV cache gives the same logits"},
    {"initializer_range", A_ALL, KEY_IGNORED, NULL, "training: weight initialisation"},
    {"attention_dropout", A_ALL, KEY_IGNORED, NULL, "training: no dropout at inference"},
    {"is_llama_config", A_LLAMA, KEY_IGNORED, NULL, "nanotron's marker (SmolLM2)"},
    {"transformers.js_config", A_ALL, KEY_IGNORED, NULL, "transformers.js settings"},
    {"attn_implementation", A_ALL, KEY_IGNORED, NULL, "kernel choice, same attention"},
    {"_attn_implementation", A_ALL, KEY_IGNORED, NULL, "kernel choice, same attention"},
    {"_attn_implementation_autoset", A_ALL, KEY_IGNORED, NULL, "kernel choice, same attention"},
    {"return_dict", A_ALL, KEY_IGNORED, NULL, "output packaging"},
    {"output_hidden_states", A_ALL, KEY_IGNORED, NULL, "output packaging"},
    {"output_attentions", A_ALL, KEY_IGNORED, NULL, "output packaging"},
    {"torchscript", A_ALL, KEY_IGNORED, NULL, "export setting"},
    {"tf_legacy_loss", A_ALL, KEY_IGNORED, NULL, "training loss"},
    {"chunk_size_feed_forward", A_ALL, KEY_IGNORED, NULL, "not read by these architectures"},
    {"is_decoder", A_ALL, KEY_IGNORED, NULL, "not read by these architectures"},
    {"add_cross_attention", A_ALL, KEY_IGNORED, NULL, "not read by these architectures"},
    {"cross_attention_hidden_size", A_ALL, KEY_IGNORED, NULL, "not read by these architectures"},
    {"tie_encoder_decoder", A_ALL, KEY_IGNORED, NULL, "not read by these architectures"},
    {"id2label", A_ALL, KEY_IGNORED, NULL, "classification heads"},
    {"label2id", A_ALL, KEY_IGNORED, NULL, "classification heads"},
    {"num_labels", A_ALL, KEY_IGNORED, NULL, "classification heads"},
    {"problem_type", A_ALL, KEY_IGNORED, NULL, "classification heads"},
    {"finetuning_task", A_ALL, KEY_IGNORED, NULL, "classification heads"},
    {"task_specific_params", A_ALL, KEY_IGNORED, NULL, "generation settings"},
    {"prefix", A_ALL, KEY_IGNORED, NULL, "generation settings"},
    /* generation settings (transformers' GenerationConfig): decoding, not the forward pass */
    {"max_length", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"min_length", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"do_sample", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"early_stopping", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"num_beams", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"num_beam_groups", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"diversity_penalty", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"temperature", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"top_k", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"top_p", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"typical_p", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"epsilon_cutoff", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"eta_cutoff", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"repetition_penalty", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"encoder_repetition_penalty", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"length_penalty", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"no_repeat_ngram_size", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"encoder_no_repeat_ngram_size", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"bad_words_ids", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"num_return_sequences", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"output_scores", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"return_dict_in_generate", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"forced_bos_token_id", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"forced_eos_token_id", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"remove_invalid_values", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"exponential_decay_length_penalty", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"suppress_tokens", A_ALL, KEY_IGNORED, NULL, "generation"},
    {"begin_suppress_tokens", A_ALL, KEY_IGNORED, NULL, "generation"},
    /* accepted only with the value that leaves the forward pass as computed; refused otherwise */
    {"attention_bias", A_LLAMA, KEY_CHECKED, must_be_false, "biases on q/k/v/o_proj of LlamaForCausalLM"},
    {"mlp_bias", A_LLAMA, KEY_CHECKED, must_be_false, "biases on the MLP projections"},
    {"pretraining_tp", A_LLAMA, KEY_CHECKED, at_most_one, "tensor-parallel slicing of the projections"},
    {"rope_interleaved", A_LLAMA, KEY_CHECKED, must_be_false, "q/k rows stored in interleaved RoPE order"},
    {"is_encoder_decoder", A_ALL, KEY_CHECKED, must_be_false, "encoder-decoder models"},
    {"pruned_heads", A_ALL, KEY_CHECKED, must_be_empty, "pruned attention heads"},
    {"quantization_config", A_ALL, KEY_CHECKED, never, "quantised weights (bitsandbytes, GPTQ, AWQ, FP8, ...)"},
    {"auto_map", A_ALL, KEY_CHECKED, never, "custom modelling code (trust_remote_code)"},
};

static const cfg_key_t *cfg_key(const char *key, unsigned arch)
{
    for (size_t i = 0; i < KV_ARRAY_LEN(cfg_keys); i++)
        if ((cfg_keys[i].archs & arch) && !strcmp(cfg_keys[i].key, key))
            return &cfg_keys[i];
    return NULL;
}

int kv_model_hf_key_kind(const char *key, const char *arch_class)
{
    for (size_t a = 0; a < KV_ARRAY_LEN(archs); a++)
        if (!strcmp(archs[a].cls, arch_class)) {
            const cfg_key_t *k = cfg_key(key, archs[a].bit);
            return k ? (int)k->kind : -1;
        }
    return -1;
}

int kv_model_hf_key_at(int i, const char **key, int *kind)
{
    if (i < 0 || (size_t)i >= KV_ARRAY_LEN(cfg_keys))
        return 0;
    *key = cfg_keys[i].key;
    *kind = (int)cfg_keys[i].kind;
    return 1;
}

/* Present and not null. */
static json_object *cfg_get(json_object *cfg, const char *key)
{
    json_object *v;
    if (!cfg || !json_object_object_get_ex(cfg, key, &v) || json_object_is_type(v, json_type_null))
        return NULL;
    return v;
}

static int cfg_int(json_object *cfg, const char *path, const char *key, int required, int dflt, int *out)
{
    json_object *v = cfg_get(cfg, key);
    if (!v) {
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

/* A number (JSON int or double); `where` names it in messages ("rope_theta", "rope_scaling.factor"). */
static int json_number(json_object *v, const char *path, const char *where, double *out)
{
    if (!json_object_is_type(v, json_type_double) && !json_object_is_type(v, json_type_int))
        return kv_error(KV_EFORMAT, "%s: \"%s\" is %s, not a number", path, where, json_object_to_json_string(v));
    *out = json_object_get_double(v);
    if (!isfinite(*out))
        return kv_error(KV_EFORMAT, "%s: \"%s\" is %s, not a finite number", path, where,
                        json_object_to_json_string(v));
    return KV_OK;
}

/* The optional number `key` of object o (NAN when absent or null). */
static int opt_number(json_object *o, const char *path, const char *prefix, const char *key, double *out)
{
    *out = NAN;
    json_object *v = cfg_get(o, key);
    if (!v)
        return KV_OK;
    char where[160];
    snprintf(where, sizeof where, "%s%s%s", prefix, prefix[0] ? "." : "", key);
    return json_number(v, path, where, out);
}

static int cfg_bool(json_object *cfg, const char *path, const char *key, int dflt, int *out)
{
    json_object *v = cfg_get(cfg, key);
    if (!v) {
        *out = dflt;
        return KV_OK;
    }
    if (!json_object_is_type(v, json_type_boolean))
        return kv_error(KV_EFORMAT, "%s: \"%s\" is %s, not true or false", path, key, json_object_to_json_string(v));
    *out = json_object_get_boolean(v);
    return KV_OK;
}

/* ---- RoPE: rope_parameters (transformers 5), rope_theta + rope_scaling (transformers 4) ----
 *
 * transformers 5 reads them this way (configuration_utils / modeling_rope_utils,
 * convert_rope_params_to_dict and standardize_rope_params): the dict is rope_scaling when that is a
 * non-empty object, else rope_parameters; its rope_type (or the older "type") defaults to "default";
 * its rope_theta defaults to the top-level rope_theta, then to 10000; for llama3,
 * original_max_position_embeddings comes from the top level when it is there, else from the dict,
 * else max_position_embeddings. kvsim follows the same rules, except that where two places give
 * different values (rope_scaling and rope_parameters, rope_theta beside the dict's, the two
 * original_max_position_embeddings), it refuses the file, naming both, instead of picking one. */

typedef struct {
    const char *path;
    double top_theta; /* top-level rope_theta, NAN when absent */
    double top_omp;   /* top-level original_max_position_embeddings, NAN when absent */
    int max_pos;      /* max_position_embeddings */
} rope_src_t;

/* The keys a RoPE dict of each implemented type may hold (as transformers' _validate_*_rope_parameters
 * list them); others are reported and ignored, as transformers does. */
static int rope_key_known(const char *key, int type)
{
    static const char *const common[] = {"rope_type", "type", "rope_theta", "partial_rotary_factor"};
    static const char *const scaled[] = {"factor"};
    static const char *const llama3[] = {"low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
    for (size_t i = 0; i < KV_ARRAY_LEN(common); i++)
        if (!strcmp(key, common[i]))
            return 1;
    if (type != KV_ROPE_DEFAULT && !strcmp(key, scaled[0]))
        return 1;
    if (type == KV_ROPE_LLAMA3)
        for (size_t i = 0; i < KV_ARRAY_LEN(llama3); i++)
            if (!strcmp(key, llama3[i]))
                return 1;
    return 0;
}

/* One flat RoPE dict `d` (named `where` in messages) into r. */
static int rope_from_dict(const rope_src_t *src, json_object *d, const char *where, kv_rope_t *r)
{
    const char *path = src->path;
    if (!json_object_is_type(d, json_type_object))
        return kv_error(KV_EFORMAT, "%s: \"%s\" is %s, not an object", path, where, json_object_to_json_string(d));
    json_object *tv = cfg_get(d, "rope_type"), *tv2 = cfg_get(d, "type");
    const char *ty = "default";
    if ((tv && !json_object_is_type(tv, json_type_string)) || (tv2 && !json_object_is_type(tv2, json_type_string)))
        return kv_error(KV_EFORMAT, "%s: \"%s.rope_type\" is not a string", path, where);
    if (tv && tv2 && strcmp(json_object_get_string(tv), json_object_get_string(tv2)))
        return kv_error(KV_EFORMAT, "%s: \"%s\" gives rope_type %s and type %s", path, where,
                        json_object_get_string(tv), json_object_get_string(tv2));
    if (tv || tv2)
        ty = json_object_get_string(tv ? tv : tv2);
    int type;
    if (!strcmp(ty, "default"))
        type = KV_ROPE_DEFAULT;
    else if (!strcmp(ty, "linear"))
        type = KV_ROPE_LINEAR;
    else if (!strcmp(ty, "llama3"))
        type = KV_ROPE_LLAMA3;
    else
        return kv_error(KV_EFORMAT,
                        "%s: \"%s\": RoPE type %s is not implemented (kvsim computes default, linear and llama3 "
                        "RoPE)",
                        path, where, ty);
    double theta, prf, factor = 1, lo = 0, hi = 0, omp = 0;
    int rc;
    if ((rc = opt_number(d, path, where, "rope_theta", &theta)) ||
        (rc = opt_number(d, path, where, "partial_rotary_factor", &prf)))
        return rc;
    if (!isnan(prf) && prf != 1.0)
        return kv_error(KV_EFORMAT, "%s: \"%s.partial_rotary_factor\" is %g: partial RoPE is not implemented", path,
                        where, prf);
    if (!isnan(theta) && !isnan(src->top_theta) && theta != src->top_theta)
        return kv_error(KV_EFORMAT, "%s: \"%s.rope_theta\" is %.9g but the top-level \"rope_theta\" is %.9g", path,
                        where, theta, src->top_theta);
    if (isnan(theta))
        theta = isnan(src->top_theta) ? 10000.0 : src->top_theta;
    if (!(theta > 0))
        return kv_error(KV_EFORMAT, "%s: RoPE theta %g (in \"%s\") must be positive", path, theta, where);
    if (type != KV_ROPE_DEFAULT) {
        const char *need[] = {"factor", "low_freq_factor", "high_freq_factor"};
        double *val[] = {&factor, &lo, &hi};
        for (int i = 0; i < (type == KV_ROPE_LLAMA3 ? 3 : 1); i++) {
            if ((rc = opt_number(d, path, where, need[i], val[i])))
                return rc;
            if (isnan(*val[i]))
                return kv_error(KV_EFORMAT, "%s: \"%s\" of rope_type %s has no \"%s\"", path, where, ty, need[i]);
        }
    }
    if (type == KV_ROPE_LLAMA3) {
        if ((rc = opt_number(d, path, where, "original_max_position_embeddings", &omp)))
            return rc;
        if (!isnan(omp) && !isnan(src->top_omp) && omp != src->top_omp)
            return kv_error(KV_EFORMAT,
                            "%s: \"%s.original_max_position_embeddings\" is %.9g but the top-level one is %.9g", path,
                            where, omp, src->top_omp);
        if (!isnan(src->top_omp))
            omp = src->top_omp;
        if (isnan(omp))
            omp = src->max_pos; /* transformers' default */
    }
    json_object_object_foreach(d, key, val)
    {
        (void)val;
        if (!rope_key_known(key, type))
            kv_warn("%s: \"%s.%s\" is not read for RoPE type %s: ignored (as transformers does)", path, where, key, ty);
    }
    *r = kv_rope_plain(theta);
    r->type = type;
    r->factor = factor;
    r->low_freq_factor = lo;
    r->high_freq_factor = hi;
    r->original_max_pos = omp;
    return KV_OK;
}

static int rope_same(const kv_rope_t *a, const kv_rope_t *b)
{
    return a->type == b->type && a->theta == b->theta && a->factor == b->factor &&
           a->low_freq_factor == b->low_freq_factor && a->high_freq_factor == b->high_freq_factor &&
           a->original_max_pos == b->original_max_pos;
}

/* rope_parameters nested by layer type (transformers 5 writes one dict per entry of layer_types when
 * layers differ): the layers' types in `types` (n); every type used must give the same RoPE. */
static int rope_nested(const rope_src_t *src, json_object *rp, const char *const *types, int n, kv_rope_t *r)
{
    int first = -1; /* the layer whose type was read first */
    *r = kv_rope_plain(10000.0);
    for (int i = 0; i < n; i++) {
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = !strcmp(types[j], types[i]);
        if (seen)
            continue; /* each layer type's dict is read (and warned about) once */
        json_object *d = cfg_get(rp, types[i]);
        char where[96];
        snprintf(where, sizeof where, "rope_parameters.%s", types[i]);
        if (!d)
            return kv_error(KV_EFORMAT, "%s: \"rope_parameters\" has no RoPE for layer type %s (layer %d)", src->path,
                            types[i], i);
        kv_rope_t x;
        int rc = rope_from_dict(src, d, where, &x);
        if (rc)
            return rc;
        if (first >= 0 && !rope_same(&x, r)) {
            char a[240], b[240];
            return kv_error(KV_EFORMAT,
                            "%s: \"rope_parameters\" gives layer types %s and %s different RoPE (%s; %s): kvsim "
                            "applies one RoPE to every layer",
                            src->path, types[first], types[i], kv_rope_describe(r, a, sizeof a),
                            kv_rope_describe(&x, b, sizeof b));
        }
        if (first < 0) {
            *r = x;
            first = i;
        }
    }
    return KV_OK;
}

/* 1 when rope_parameters is keyed by layer type: no RoPE key of its own, only objects (or nulls)
 * under names that end in "_attention". */
static int rope_is_nested(json_object *rp)
{
    if (!json_object_is_type(rp, json_type_object) || json_object_object_length(rp) == 0)
        return 0;
    json_object_object_foreach(rp, key, v)
    {
        size_t n = strlen(key);
        if (n < 10 || strcmp(key + n - 10, "_attention") ||
            !(json_object_is_type(v, json_type_object) || json_object_is_type(v, json_type_null)))
            return 0;
    }
    return 1;
}

static int parse_rope(const char *path, json_object *j, int max_pos, const char *const *types, int n_types,
                      kv_rope_t *r)
{
    rope_src_t src = {path, NAN, NAN, max_pos};
    int rc;
    if ((rc = opt_number(j, path, "", "rope_theta", &src.top_theta)) ||
        (rc = opt_number(j, path, "", "original_max_position_embeddings", &src.top_omp)))
        return rc;
    json_object *rs = cfg_get(j, "rope_scaling"), *rp = cfg_get(j, "rope_parameters");
    if (rs && json_object_is_type(rs, json_type_object) && json_object_object_length(rs) == 0)
        rs = NULL; /* transformers: an empty rope_scaling is no rope_scaling */
    kv_rope_t a = kv_rope_plain(10000.0), b = a;
    if (rp && rope_is_nested(rp)) {
        if (!types)
            return kv_error(KV_EFORMAT,
                            "%s: \"rope_parameters\" is keyed by layer type, which this architecture has not (one "
                            "flat dict expected)",
                            path);
        rc = rope_nested(&src, rp, types, n_types, &a);
    } else if (rp) {
        rc = rope_from_dict(&src, rp, "rope_parameters", &a);
    } else if (!rs) {
        if (!isnan(src.top_theta) && !(src.top_theta > 0))
            return kv_error(KV_EFORMAT, "%s: \"rope_theta\" is %g (must be positive)", path, src.top_theta);
        *r = kv_rope_plain(isnan(src.top_theta) ? 10000.0 : src.top_theta);
        return KV_OK;
    }
    if (rc)
        return rc;
    if (rs && (rc = rope_from_dict(&src, rs, "rope_scaling", &b)))
        return rc;
    if (rs && rp && !rope_same(&a, &b)) {
        char x[240], y[240];
        return kv_error(KV_EFORMAT,
                        "%s: \"rope_scaling\" and \"rope_parameters\" disagree (%s; %s): which one applies is "
                        "ambiguous (transformers 5 takes rope_scaling), remove one",
                        path, kv_rope_describe(&b, x, sizeof x), kv_rope_describe(&a, y, sizeof y));
    }
    *r = rp ? a : b;
    return KV_OK;
}

/* ---- the whole configuration ---- */

/* Per-architecture defaults, transformers 5's (LlamaConfig, MistralConfig, Qwen2Config). */
typedef struct {
    int n_kv_heads; /* -1: num_attention_heads */
    int max_pos;
    int window; /* sliding_window when absent; 0: none */
} arch_defaults_t;

static int parse_config(const char *path, json_object *j, kv_model_config_t *c)
{
    int rc;
    json_object *v;
    /* the architecture */
    const char *cls = NULL;
    if (json_object_object_get_ex(j, "architectures", &v) && json_object_is_type(v, json_type_array) &&
        json_object_array_length(v) == 1 && json_object_is_type(json_object_array_get_idx(v, 0), json_type_string))
        cls = json_object_get_string(json_object_array_get_idx(v, 0));
    if (!cls)
        return kv_error(KV_EFORMAT, "%s: \"architectures\" must name one class (kvsim runs " ARCH_LIST ")", path);
    size_t ai = 0;
    while (ai < KV_ARRAY_LEN(archs) && strcmp(archs[ai].cls, cls))
        ai++;
    if (ai == KV_ARRAY_LEN(archs))
        return kv_error(KV_EFORMAT, "%s: architecture %s is not supported (kvsim runs " ARCH_LIST ")", path, cls);
    const unsigned arch = archs[ai].bit;
    if ((v = cfg_get(j, "model_type")) &&
        (!json_object_is_type(v, json_type_string) || strcmp(json_object_get_string(v), archs[ai].model_type)))
        return kv_error(KV_EFORMAT,
                        "%s: model_type %s does not match architecture %s (transformers would build the model of "
                        "model_type; kvsim expects \"%s\")",
                        path, json_object_to_json_string(v), cls, archs[ai].model_type);
    snprintf(c->arch, sizeof c->arch, "%s", archs[ai].model_type);

    /* every key classified: checked values refused by name, unknown keys reported */
    json_object_object_foreach(j, key, val)
    {
        const cfg_key_t *k = cfg_key(key, arch);
        if (!k) {
            kv_warn("%s: unknown key \"%s\" ignored (kvsim does not know whether it changes %s's computation)", path,
                    key, cls);
            continue;
        }
        const char *why;
        if (k->kind == KEY_CHECKED && !json_object_is_type(val, json_type_null) && (why = k->check(val)))
            return kv_error(KV_EFORMAT, "%s: \"%s\" is %s: %s is not implemented (%s)", path, key,
                            json_object_to_json_string(val), k->note, why);
    }

    const arch_defaults_t dflt = arch == A_MISTRAL ? (arch_defaults_t){8, 131072, 4096}
                                 : arch == A_QWEN2 ? (arch_defaults_t){32, 32768, 4096}
                                                   : (arch_defaults_t){-1, 2048, 0};
    int head_dim = 0;
    if ((rc = cfg_int(j, path, "hidden_size", 1, 0, &c->dim)) ||
        (rc = cfg_int(j, path, "intermediate_size", 1, 0, &c->hidden_dim)) ||
        (rc = cfg_int(j, path, "num_hidden_layers", 1, 0, &c->n_layers)) ||
        (rc = cfg_int(j, path, "num_attention_heads", 1, 0, &c->n_heads)) ||
        (rc = cfg_int(j, path, "num_key_value_heads", 0, dflt.n_kv_heads < 0 ? c->n_heads : dflt.n_kv_heads,
                      &c->n_kv_heads)) ||
        (rc = cfg_int(j, path, "vocab_size", 1, 0, &c->vocab_size)) ||
        (rc = cfg_int(j, path, "max_position_embeddings", 0, dflt.max_pos, &c->seq_len)) ||
        (rc = cfg_int(j, path, "head_dim", 0, 0, &head_dim)) ||
        (rc = cfg_bool(j, path, "tie_word_embeddings", 0, &c->shared_classifier)))
        return rc;
    double eps;
    if ((rc = opt_number(j, path, "", "rms_norm_eps", &eps)))
        return rc;
    if (isnan(eps))
        eps = 1e-6; /* the default of all three configurations */
    if (!(eps > 0))
        return kv_error(KV_EFORMAT, "%s: \"rms_norm_eps\" is %g (must be positive)", path, eps);
    c->norm_eps = (float)eps;
    c->head_dim = head_dim; /* 0: dim / n_heads (kv_model_config_check) */
    c->version = -1;
    c->qkv_bias = arch == A_QWEN2; /* Qwen2Attention: q/k/v_proj with bias=True, o_proj without */

    /* sliding windows and layer types */
    const char **types = NULL;
    int n_types = 0, window = dflt.window;
    if (arch & (A_MISTRAL | A_QWEN2)) {
        json_object *w;
        if (json_object_object_get_ex(j, "sliding_window", &w) && json_object_is_type(w, json_type_null))
            window = 0; /* explicitly none */
        else if ((rc = cfg_int(j, path, "sliding_window", 0, dflt.window, &window)))
            return rc;
    }
    if (arch == A_QWEN2) {
        int use = 0, mwl = 0;
        if ((rc = cfg_bool(j, path, "use_sliding_window", 0, &use)) ||
            (rc = cfg_int(j, path, "max_window_layers", 0, 28, &mwl)))
            return rc;
        if (c->n_layers <= 0 || c->n_layers > 1024)
            return kv_error(KV_EFORMAT, "%s: impossible dimensions: num_hidden_layers is %d", path, c->n_layers);
        types = kv_calloc((size_t)c->n_layers, sizeof *types, "layer types");
        if (!types)
            return KV_ENOMEM;
        n_types = c->n_layers;
        json_object *lt = cfg_get(j, "layer_types");
        if (lt && (!json_object_is_type(lt, json_type_array) || (int)json_object_array_length(lt) != c->n_layers)) {
            rc = kv_error(KV_EFORMAT, "%s: \"layer_types\" must be an array of num_hidden_layers (%d) names", path,
                          c->n_layers);
            goto done;
        }
        int sliding = 0;
        for (int i = 0; i < c->n_layers; i++) {
            json_object *e = lt ? json_object_array_get_idx(lt, (size_t)i) : NULL;
            /* Qwen2Config's own rule when layer_types is absent */
            types[i] = !lt ? (use && window > 0 && i >= mwl ? "sliding_attention" : "full_attention")
                       : json_object_is_type(e, json_type_string) ? json_object_get_string(e)
                                                                  : "";
            if (strcmp(types[i], "full_attention") && strcmp(types[i], "sliding_attention")) {
                rc = kv_error(KV_EFORMAT,
                              "%s: \"layer_types\" entry %d is %s (kvsim runs full_attention and sliding_attention)",
                              path, i, json_object_to_json_string(e));
                goto done;
            }
            sliding |= !strcmp(types[i], "sliding_attention");
        }
        /* transformers drops the window when use_sliding_window is false: every layer is causal */
        if (use && sliding && window > 0 && window < c->seq_len) {
            rc = kv_error(KV_EFORMAT,
                          "%s: \"use_sliding_window\" is true with a sliding_window of %d tokens, below "
                          "max_position_embeddings %d: sliding-window attention is not implemented (accepted when "
                          "use_sliding_window is false or the window covers the context)",
                          path, window, c->seq_len);
            goto done;
        }
        window = 0;
    }
    if ((rc = parse_rope(path, j, c->seq_len, types, n_types, &c->rope)))
        goto done;
    c->rope_theta = (float)c->rope.theta; /* as traces record it */
    if ((rc = kv_model_config_check(c, path)))
        goto done;
    if (window > 0 && window < c->seq_len)
        c->seq_len = window; /* Mistral; exact: within the window, sliding-window attention is causal attention */
done:
    kv_free(types);
    return rc;
}

/* ---- the loader ---- */

/* Tensors of the files that the forward pass did not read, reported in one warning (transformers
 * warns about them too). rotary_emb.inv_freq buffers of older exports are left out: they are
 * recomputed from config.json, by transformers as by kvsim. */
static void warn_unused(const st_set_t *s)
{
    size_t n = 0;
    char names[512] = "";
    for (size_t i = 0; i < s->nt; i++) {
        if (s->t[i].used || ends_with(s->t[i].name, "rotary_emb.inv_freq"))
            continue;
        if (n < 3) {
            size_t o = strlen(names);
            snprintf(names + o, sizeof names - o, "%s%s", n ? ", " : "", s->t[i].name);
        }
        n++;
    }
    if (n)
        kv_warn("%s: %zu tensor%s not used by the forward pass, ignored: %s%s", s->where, n, n == 1 ? "" : "s", names,
                n > 3 ? ", ..." : "");
}

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
    const uint64_t V = (uint64_t)c->vocab_size, KV = (uint64_t)c->kv_dim, Q = (uint64_t)c->q_dim;
    const uint64_t B = c->qkv_bias ? 1 : 0;
    enum { EMB, RMS_ATT, WQ, WK, WV, WO, RMS_FFN, W1, W2, W3, RMS_FINAL, WCLS, BQ, BK, BV, NPART };
    const uint64_t sizes[NPART] = {
        [EMB] = V * D,     [RMS_ATT] = L * D, [WQ] = L * Q * D,  [WK] = L * KV * D,
        [WV] = L * KV * D, [WO] = L * D * Q,  [RMS_FFN] = L * D, [W1] = L * H * D,
        [W2] = L * D * H,  [W3] = L * H * D,  [RMS_FINAL] = D,   [WCLS] = c->shared_classifier ? 0 : V * D,
        [BQ] = B * L * Q,  [BK] = B * L * KV, [BV] = B * L * KV,
    };
    uint64_t total = 0;
    for (int i = 0; i < NPART; i++)
        total += sizes[i]; /* bounded by kv_model_config_check: no overflow for accepted dimensions */
    m->owned = kv_malloc_aligned((size_t)total * sizeof(float), "model weights");
    if (!m->owned) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto fail;
    }
    m->n_params = (size_t)total;
    float *p[NPART];
    p[0] = m->owned;
    for (int i = 1; i < NPART; i++)
        p[i] = p[i - 1] + sizes[i - 1];
    m->token_embedding = p[EMB], m->rms_att = p[RMS_ATT], m->wq = p[WQ], m->wk = p[WK], m->wv = p[WV];
    m->wo = p[WO], m->rms_ffn = p[RMS_FFN], m->w1 = p[W1], m->w2 = p[W2], m->w3 = p[W3];
    m->rms_final = p[RMS_FINAL];
    m->wcls = c->shared_classifier ? p[EMB] : p[WCLS];
    if (c->qkv_bias)
        m->bq = p[BQ], m->bk = p[BK], m->bv = p[BV];
    int seen[3] = {0, 0, 0};
    const int hd = c->head_dim;
    if ((rc = st_get(&s, "model.embed_tokens.weight", V, D, 0, p[EMB], seen)))
        goto fail;
    for (int l = 0; l < c->n_layers; l++) {
        char n[128];
        /* name, rows, cols (0: a vector), RoPE row permutation (head_dim) or 0, destination */
        struct {
            const char *name;
            uint64_t rows, cols;
            int perm;
            float *dst;
        } w[12] = {
            {"input_layernorm.weight", D, 0, 0, p[RMS_ATT] + l * D},
            {"self_attn.q_proj.weight", Q, D, hd, p[WQ] + l * Q * D},
            {"self_attn.k_proj.weight", KV, D, hd, p[WK] + l * KV * D},
            {"self_attn.v_proj.weight", KV, D, 0, p[WV] + l * KV * D},
            {"self_attn.o_proj.weight", D, Q, 0, p[WO] + l * D * Q},
            {"post_attention_layernorm.weight", D, 0, 0, p[RMS_FFN] + l * D},
            {"mlp.gate_proj.weight", H, D, 0, p[W1] + l * H * D},
            {"mlp.down_proj.weight", D, H, 0, p[W2] + l * D * H},
            {"mlp.up_proj.weight", H, D, 0, p[W3] + l * H * D},
            /* Qwen2's biases: q and k rows permuted like the weights' rows */
            {"self_attn.q_proj.bias", Q, 0, hd, c->qkv_bias ? p[BQ] + l * Q : NULL},
            {"self_attn.k_proj.bias", KV, 0, hd, c->qkv_bias ? p[BK] + l * KV : NULL},
            {"self_attn.v_proj.bias", KV, 0, 0, c->qkv_bias ? p[BV] + l * KV : NULL},
        };
        for (int i = 0; i < 12; i++) {
            if (!w[i].dst)
                continue;
            snprintf(n, sizeof n, "model.layers.%d.%s", l, w[i].name);
            if ((rc = st_get(&s, n, w[i].rows, w[i].cols, w[i].perm, w[i].dst, seen)))
                goto fail;
        }
    }
    if ((rc = st_get(&s, "model.norm.weight", D, 0, 0, p[RMS_FINAL], seen)))
        goto fail;
    if (!c->shared_classifier && (rc = st_get(&s, "lm_head.weight", V, D, 0, p[WCLS], seen)))
        goto fail;
    warn_unused(&s);
    const int kinds = (seen[DT_F32] > 0) + (seen[DT_F16] > 0) + (seen[DT_BF16] > 0);
    snprintf(m->hf_dtype, sizeof m->hf_dtype, "%s",
             kinds > 1       ? "mixed"
             : seen[DT_F16]  ? "F16"
             : seen[DT_BF16] ? "BF16"
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
