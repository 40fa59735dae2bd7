/*
 * model_write.c: random-weight Hugging Face Llama checkpoints (kv_model_write.h).
 *
 * Plan: the tensors in transformers' order (embed_tokens; per layer input_layernorm, q/k/v/o_proj,
 * post_attention_layernorm, gate/up/down_proj; norm; lm_head unless tied), assigned to shards in
 * order, a new shard starting when the next tensor would take the current one past shard_bytes.
 * Each shard: u64 header length, the JSON header (padded with spaces to a multiple of 8 bytes, as
 * the safetensors package pads it), then the tensors' bytes back to back, generated in chunks of
 * CHUNK elements on all threads. Values come from splitmix64 of (seed, tensor index, group of four
 * elements): four 16-bit uniforms per hash, so the bytes depend on the options alone. Every file goes
 * through the output module as one set (sim/common/kv_output.h): nothing appears under its final name
 * before all of it is written and synced.
 */
#include "traces/capture/kv_model_write.h"

#include "kernels/kv_weight.h"
#include "sim/common/kv_common.h"
#include "sim/common/kv_log.h"
#include "sim/common/kv_output.h"
#include "traces/kv_f16.h"

#include <dirent.h>
#include <errno.h>
#include <json.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define CHUNK ((size_t)1 << 22) /* elements generated per step */
#define MAX_SHARDS 9999

static const struct {
    const char *name;
    int dim, hidden, layers, heads, kv_heads, vocab, seq_len, tied;
    double theta, eps;
    int bos, eos;
} presets[] = {
    {"llama3-8b", 4096, 14336, 32, 32, 8, 128256, 8192, 0, 500000.0, 1e-5, 128000, 128001},
    {"llama3.2-1b", 2048, 8192, 16, 32, 8, 128256, 8192, 1, 500000.0, 1e-5, 128000, 128001},
    {"smollm2-135m", 576, 1536, 30, 9, 3, 49152, 8192, 1, 100000.0, 1e-5, 1, 2},
    {"tiny", 64, 160, 2, 4, 2, 512, 256, 0, 10000.0, 1e-5, 1, 2},
};

const char *kv_model_write_presets(void)
{
    return "llama3-8b, llama3.2-1b, smollm2-135m, tiny";
}

int kv_model_write_preset(const char *name, kv_model_write_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->dtype = KV_WT_BF16;
    o->shard_bytes = 5000000000ull;
    o->std = 0.02;
    o->rope_theta = 10000.0;
    o->norm_eps = 1e-5;
    o->bos_id = o->eos_id = -1;
    if (!name)
        return KV_OK;
    for (size_t i = 0; i < KV_ARRAY_LEN(presets); i++)
        if (!strcmp(presets[i].name, name)) {
            o->dim = presets[i].dim, o->hidden_dim = presets[i].hidden, o->n_layers = presets[i].layers;
            o->n_heads = presets[i].heads, o->n_kv_heads = presets[i].kv_heads, o->vocab_size = presets[i].vocab;
            o->seq_len = presets[i].seq_len, o->tied = presets[i].tied, o->rope_theta = presets[i].theta;
            o->norm_eps = presets[i].eps, o->bos_id = presets[i].bos, o->eos_id = presets[i].eos;
            return KV_OK;
        }
    return kv_error(KV_EINVAL, "unknown preset '%s' (presets: %s)", name, kv_model_write_presets());
}

/* ---- the plan ---- */

typedef struct {
    char name[96];
    uint64_t rows, cols; /* cols 0: a vector of rows elements */
    int ones;            /* a norm weight: every element 1 */
    uint64_t n, bytes;
    int shard;
    uint64_t begin; /* offset in its shard's data section */
} rm_tensor_t;

static int plan(const kv_model_write_opts_t *o, int esize, rm_tensor_t **out, int *n_out)
{
    const uint64_t D = (uint64_t)o->dim, H = (uint64_t)o->hidden_dim, hd = (uint64_t)o->head_dim;
    const uint64_t Q = (uint64_t)o->n_heads * hd, KV = (uint64_t)o->n_kv_heads * hd, V = (uint64_t)o->vocab_size;
    const int n = 2 + 9 * o->n_layers + (o->tied ? 0 : 1);
    rm_tensor_t *t = kv_calloc((size_t)n, sizeof *t, "tensor plan");
    if (!t)
        return KV_ENOMEM;
    int k = 0;
#define ADD(nm, r, c, one)                                                                                             \
    do {                                                                                                               \
        snprintf(t[k].name, sizeof t[k].name, "%s", nm);                                                               \
        t[k].rows = (r), t[k].cols = (c), t[k].ones = (one);                                                           \
        k++;                                                                                                           \
    } while (0)
    ADD("model.embed_tokens.weight", V, D, 0);
    for (int l = 0; l < o->n_layers; l++) {
        const struct {
            const char *suffix;
            uint64_t rows, cols;
            int ones;
        } lt[9] = {
            {"input_layernorm.weight", D, 0, 1},   {"self_attn.q_proj.weight", Q, D, 0},
            {"self_attn.k_proj.weight", KV, D, 0}, {"self_attn.v_proj.weight", KV, D, 0},
            {"self_attn.o_proj.weight", D, Q, 0},  {"post_attention_layernorm.weight", D, 0, 1},
            {"mlp.gate_proj.weight", H, D, 0},     {"mlp.up_proj.weight", H, D, 0},
            {"mlp.down_proj.weight", D, H, 0},
        };
        for (int i = 0; i < 9; i++) {
            char nm[96];
            snprintf(nm, sizeof nm, "model.layers.%d.%s", l, lt[i].suffix);
            ADD(nm, lt[i].rows, lt[i].cols, lt[i].ones);
        }
    }
    ADD("model.norm.weight", D, 0, 1);
    if (!o->tied)
        ADD("lm_head.weight", V, D, 0);
#undef ADD
    int shard = 0;
    uint64_t used = 0;
    for (int i = 0; i < n; i++) {
        t[i].n = t[i].rows * (t[i].cols ? t[i].cols : 1);
        t[i].bytes = t[i].n * (uint64_t)esize;
        if (used > 0 && used + t[i].bytes > o->shard_bytes)
            shard++, used = 0;
        t[i].shard = shard;
        t[i].begin = used;
        used += t[i].bytes;
    }
    if (shard + 1 > MAX_SHARDS) {
        kv_free(t);
        return kv_error(KV_EINVAL, "%d shards of at most %llu bytes: more than %d (raise --shard-size)", shard + 1,
                        (unsigned long long)o->shard_bytes, MAX_SHARDS);
    }
    *out = t;
    *n_out = n;
    return KV_OK;
}

/* ---- values ---- */

static uint64_t splitmix(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint16_t to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even (the values are finite) */
    return (uint16_t)(u >> 16);
}

/* Elements [e0, e0 + n) of tensor `ti` into out (esize bytes each), e0 a multiple of 4. */
static void fill(const kv_model_write_opts_t *o, const rm_tensor_t *t, uint64_t ti, uint64_t e0, size_t n,
                 unsigned char *out)
{
    const int esize = o->dtype == KV_WT_F32 ? 4 : 2;
    const float a = (float)(o->std * sqrt(3.0));
    const uint64_t key = splitmix(o->seed ^ splitmix(ti + 1));
    const int64_t groups = (int64_t)((n + 3) / 4);
#pragma omp parallel for schedule(static) if (n > 65536)
    for (int64_t g = 0; g < groups; g++) {
        const uint64_t h = splitmix(key ^ ((e0 / 4 + (uint64_t)g) * 0xD1B54A32D192ED03ull));
        for (int j = 0; j < 4 && (size_t)g * 4 + (size_t)j < n; j++) {
            const float u = ((float)((h >> (16 * j)) & 0xFFFFu) + 0.5f) * (1.0f / 32768.0f) - 1.0f;
            const float v = t->ones ? 1.0f : a * u;
            unsigned char *p = out + ((size_t)g * 4 + (size_t)j) * (size_t)esize;
            if (esize == 4) {
                memcpy(p, &v, 4);
            } else {
                const uint16_t x = o->dtype == KV_WT_BF16 ? to_bf16(v) : kv_f32_to_f16(v);
                memcpy(p, &x, 2);
            }
        }
    }
}

/* ---- files ---- */

/* A member of the set holding `text`. */
static int write_text(kv_out_set_t *set, const char *path, const char *text)
{
    kv_out_t *o;
    int rc = kv_out_set_open(set, path, KV_OUT_INDEX, &o); /* config.json and the index: renamed last */
    if (rc)
        return rc;
    fputs(text, kv_out_stream(o)); /* write errors are reported at commit */
    return KV_OK;
}

static const char *dtype_name(int dtype)
{
    return dtype == KV_WT_F32 ? "F32" : dtype == KV_WT_F16 ? "F16" : "BF16";
}

static void shard_name(int i, int n, char *buf, size_t len)
{
    if (n == 1)
        snprintf(buf, len, "model.safetensors");
    else
        snprintf(buf, len, "model-%05d-of-%05d.safetensors", i + 1, n);
}

/* Shard `s` as a member of the set: header then data, generated chunk by chunk. */
static int write_shard(kv_out_set_t *set, const kv_model_write_opts_t *o, const char *dir, const rm_tensor_t *t, int nt,
                       int s, int n_shards, kv_progress_t *prog, uint64_t *done, uint64_t total)
{
    char name[64], path[1200];
    shard_name(s, n_shards, name, sizeof name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    /* the header */
    size_t cap = 256 + 160 * (size_t)nt, len = 0;
    char *hdr = kv_malloc(cap, "safetensors header");
    unsigned char *buf = kv_malloc(CHUNK * 4, "weight chunk");
    int rc = KV_OK;
    if (!hdr || !buf) {
        rc = KV_ENOMEM;
        goto done;
    }
    len += (size_t)snprintf(hdr + len, cap - len, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < nt; i++) {
        if (t[i].shard != s)
            continue;
        if (t[i].cols)
            len += (size_t)snprintf(
                hdr + len, cap - len, ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%llu,%llu],\"data_offsets\":[%llu,%llu]}",
                t[i].name, dtype_name(o->dtype), (unsigned long long)t[i].rows, (unsigned long long)t[i].cols,
                (unsigned long long)t[i].begin, (unsigned long long)(t[i].begin + t[i].bytes));
        else
            len += (size_t)snprintf(hdr + len, cap - len,
                                    ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%llu],\"data_offsets\":[%llu,%llu]}",
                                    t[i].name, dtype_name(o->dtype), (unsigned long long)t[i].rows,
                                    (unsigned long long)t[i].begin, (unsigned long long)(t[i].begin + t[i].bytes));
    }
    len += (size_t)snprintf(hdr + len, cap - len, "}");
    while (len % 8)
        hdr[len++] = ' ';
    kv_out_t *out;
    if ((rc = kv_out_set_open(set, path, 0, &out)))
        goto done;
    FILE *f = kv_out_stream(out);
    unsigned char n8[8];
    for (int i = 0; i < 8; i++)
        n8[i] = (unsigned char)((uint64_t)len >> (8 * i));
    int bad = fwrite(n8, 1, 8, f) != 8 || fwrite(hdr, 1, len, f) != len;
    const int esize = o->dtype == KV_WT_F32 ? 4 : 2;
    for (int i = 0; i < nt && !bad; i++) {
        if (t[i].shard != s)
            continue;
        for (uint64_t e = 0; e < t[i].n && !bad; e += CHUNK) {
            const size_t n = (size_t)KV_MIN((uint64_t)CHUNK, t[i].n - e);
            fill(o, &t[i], (uint64_t)i, e, n, buf);
            bad |= fwrite(buf, (size_t)esize, n, f) != n;
            *done += (uint64_t)n * (uint64_t)esize;
            char detail[96];
            snprintf(detail, sizeof detail, "%s, %.1f of %.1f GB", name, (double)*done / 1e9, (double)total / 1e9);
            kv_progress_update(prog, (long)(*done >> 20), detail);
        }
    }
    if (bad) /* the set's commit would report it too: stop writing 16 GB into a full disk now */
        rc = kv_error(KV_EIO, "%s: write failed: %s", path, strerror(errno));
done:
    kv_free(hdr);
    kv_free(buf);
    return rc;
}

static int write_config(kv_out_set_t *set, const kv_model_write_opts_t *o, const char *dir)
{
    json_object *j = json_object_new_object();
    json_object *arch = json_object_new_array();
    json_object_array_add(arch, json_object_new_string("LlamaForCausalLM"));
    json_object_object_add(j, "architectures", arch);
    json_object_object_add(j, "model_type", json_object_new_string("llama"));
    const struct {
        const char *key;
        int v;
    } ints[] = {
        {"hidden_size", o->dim},
        {"intermediate_size", o->hidden_dim},
        {"num_hidden_layers", o->n_layers},
        {"num_attention_heads", o->n_heads},
        {"num_key_value_heads", o->n_kv_heads},
        {"head_dim", o->head_dim},
        {"vocab_size", o->vocab_size},
        {"max_position_embeddings", o->seq_len},
    };
    for (size_t i = 0; i < KV_ARRAY_LEN(ints); i++)
        json_object_object_add(j, ints[i].key, json_object_new_int(ints[i].v));
    {
        char eps[32];
        snprintf(eps, sizeof eps, "%g", o->norm_eps);
        json_object_object_add(j, "rms_norm_eps", json_object_new_double_s(o->norm_eps, eps));
    }
    json_object_object_add(j, "rope_theta", json_object_new_double(o->rope_theta));
    json_object_object_add(j, "tie_word_embeddings", json_object_new_boolean(o->tied));
    json_object_object_add(j, "hidden_act", json_object_new_string("silu"));
    json_object_object_add(j, "attention_bias", json_object_new_boolean(0));
    json_object_object_add(j, "mlp_bias", json_object_new_boolean(0));
    json_object_object_add(j, "initializer_range", json_object_new_double(o->std));
    json_object_object_add(j, "torch_dtype",
                           json_object_new_string(o->dtype == KV_WT_F32   ? "float32"
                                                  : o->dtype == KV_WT_F16 ? "float16"
                                                                          : "bfloat16"));
    if (o->bos_id >= 0)
        json_object_object_add(j, "bos_token_id", json_object_new_int(o->bos_id));
    if (o->eos_id >= 0)
        json_object_object_add(j, "eos_token_id", json_object_new_int(o->eos_id));
    char path[1200];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = kv_malloc(strlen(json_object_to_json_string_ext(j, JSON_C_TO_STRING_PRETTY)) + 2, "config.json");
    int rc = KV_ENOMEM;
    if (text) {
        sprintf(text, "%s\n", json_object_to_json_string_ext(j, JSON_C_TO_STRING_PRETTY));
        rc = write_text(set, path, text);
    }
    kv_free(text);
    json_object_put(j);
    return rc;
}

static int write_index(kv_out_set_t *set, const char *dir, const rm_tensor_t *t, int nt, int n_shards, uint64_t total)
{
    json_object *j = json_object_new_object(), *meta = json_object_new_object(), *wm = json_object_new_object();
    json_object_object_add(meta, "total_size", json_object_new_int64((int64_t)total));
    json_object_object_add(j, "metadata", meta);
    for (int i = 0; i < nt; i++) {
        char name[64];
        shard_name(t[i].shard, n_shards, name, sizeof name);
        json_object_object_add(wm, t[i].name, json_object_new_string(name));
    }
    json_object_object_add(j, "weight_map", wm);
    char path[1200];
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    const char *s = json_object_to_json_string_ext(j, JSON_C_TO_STRING_PRETTY);
    char *text = kv_malloc(strlen(s) + 2, "index");
    int rc = KV_ENOMEM;
    if (text) {
        sprintf(text, "%s\n", s);
        rc = write_text(set, path, text);
    }
    kv_free(text);
    json_object_put(j);
    return rc;
}

/* The folder: created when absent; when present it must be empty unless force. */
static int prepare_dir(const char *dir, int force)
{
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (mkdir(dir, 0755) != 0)
            return kv_error(KV_EIO, "%s: cannot create the folder: %s", dir, strerror(errno));
        return KV_OK;
    }
    if (!S_ISDIR(st.st_mode))
        return kv_error(KV_EINVAL, "%s: exists and is not a folder", dir);
    DIR *d = opendir(dir);
    if (!d)
        return kv_error(KV_EIO, "%s: cannot read the folder: %s", dir, strerror(errno));
    int used = 0;
    const struct dirent *e;
    while ((e = readdir(d)))
        used |= strcmp(e->d_name, ".") && strcmp(e->d_name, "..");
    closedir(d);
    if (used && !force)
        return kv_error(KV_EINVAL, "%s: the folder is not empty (give --force to write into it anyway)", dir);
    return KV_OK;
}

int kv_model_write_random(const kv_model_write_opts_t *oin, const char *dir, kv_model_write_result_t *res)
{
    kv_model_write_opts_t o = *oin;
    const double t0 = kv_now();
    if (o.dtype != KV_WT_BF16 && o.dtype != KV_WT_F16 && o.dtype != KV_WT_F32)
        return kv_error(KV_EINVAL, "random checkpoint: dtype must be bf16, f16 or f32");
    if (o.dim <= 0 || o.hidden_dim <= 0 || o.n_layers <= 0 || o.n_heads <= 0 || o.n_kv_heads <= 0 ||
        o.vocab_size <= 0 || o.seq_len <= 0 || o.n_heads % o.n_kv_heads || o.dim > 65536 || o.hidden_dim > (1 << 20) ||
        o.n_layers > 1024 || o.vocab_size > (1 << 24) || o.n_heads > 1024)
        return kv_error(KV_EINVAL,
                        "random checkpoint: impossible shape (dim %d, hidden %d, layers %d, heads %d/%d, vocab %d, "
                        "context %d)",
                        o.dim, o.hidden_dim, o.n_layers, o.n_heads, o.n_kv_heads, o.vocab_size, o.seq_len);
    if (o.head_dim == 0 && o.dim % o.n_heads)
        return kv_error(KV_EINVAL, "random checkpoint: %d heads do not divide dim %d (give --head-dim)", o.n_heads,
                        o.dim);
    if (o.head_dim == 0)
        o.head_dim = o.dim / o.n_heads;
    if (o.head_dim <= 0 || o.head_dim % 2 || o.head_dim > 1024)
        return kv_error(KV_EINVAL, "random checkpoint: head_dim %d (must be even, at most 1024)", o.head_dim);
    if (!(o.std > 0) || !(o.rope_theta > 0) || !(o.norm_eps > 0) || o.shard_bytes == 0)
        return kv_error(KV_EINVAL, "random checkpoint: std, rope_theta, norm_eps and the shard size must be positive");
    rm_tensor_t *t = NULL;
    int nt = 0;
    const int esize = o.dtype == KV_WT_F32 ? 4 : 2;
    int rc = plan(&o, esize, &t, &nt);
    if (rc)
        return rc;
    const int n_shards = t[nt - 1].shard + 1;
    uint64_t total = 0, params = 0;
    for (int i = 0; i < nt; i++)
        total += t[i].bytes, params += t[i].n;
    if ((rc = prepare_dir(dir, o.force)))
        goto done;
    struct statvfs vfs;
    if (statvfs(dir, &vfs) == 0 && (uint64_t)vfs.f_bavail * vfs.f_frsize < total + (64u << 20)) {
        rc = kv_error(KV_EIO, "%s: the checkpoint needs %.2f GB, the file system has %.2f GB free", dir,
                      (double)total / 1e9, (double)vfs.f_bavail * vfs.f_frsize / 1e9);
        goto done;
    }
    /* every file is a member of one set: written and synced under temporary names, then renamed
     * together, config.json and the index last (sim/common/kv_output.h) */
    kv_out_set_t *set = NULL;
    if ((rc = kv_out_set_create(&set)))
        goto done;
    kv_progress_t prog;
    kv_progress_begin(&prog, "synth-model", (long)(total >> 20));
    uint64_t written = 0;
    for (int s = 0; s < n_shards && rc == KV_OK; s++)
        rc = write_shard(set, &o, dir, t, nt, s, n_shards, &prog, &written, total);
    if (rc == KV_OK && n_shards > 1)
        rc = write_index(set, dir, t, nt, n_shards, total);
    if (rc == KV_OK)
        rc = write_config(set, &o, dir);
    if (rc == KV_OK)
        rc = kv_out_set_commit(set);
    else
        kv_out_set_abort(set);
    if (rc == KV_OK) {
        char detail[128];
        snprintf(detail, sizeof detail, "%.2f B parameters, %.2f GB in %d file%s", (double)params / 1e9,
                 (double)total / 1e9, n_shards, n_shards == 1 ? "" : "s");
        kv_progress_end(&prog, detail);
    }
    if (res) {
        res->n_params = params;
        res->bytes = total;
        res->n_shards = n_shards;
        res->seconds = kv_now() - t0;
    }
done:
    kv_free(t);
    return rc;
}
