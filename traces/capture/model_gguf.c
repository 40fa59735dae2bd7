/*
 * model_gguf.c: llama.cpp's GGUF checkpoints into kv_model_t (the reader is gguf.c, kv_gguf.h).
 *
 * Architectures (general.architecture): "llama" (Llama 1/2/3, Mistral, SmolLM2, TinyLlama, ...) and
 * "qwen2"; anything else is refused by name. The configuration comes from the metadata, as
 * llama.cpp's llama-model.cpp reads it: {arch}.block_count, .context_length, .embedding_length,
 * .feed_forward_length, .attention.head_count, .attention.head_count_kv (default head_count),
 * .attention.layer_norm_rms_epsilon, .rope.freq_base (default 10000), .attention.key_length and
 * .value_length (an explicit head_dim; they must agree), .rope.dimension_count (must be head_dim:
 * partial rotary is refused), .rope.scaling.type (none, or linear with .rope.scaling.factor or the
 * older .rope.scale_linear; yarn, longrope, ... refused by name), .attention.sliding_window (seq_len
 * is capped at the window, where sliding-window attention equals causal attention, as model_hf.c
 * does for Mistral). Refused by name because the forward pass would compute something else:
 * .expert_count > 0 (MoE), per-layer arrays of head counts or feed-forward sizes, an attention
 * scale, logit or residual scales, soft-capping, LayerNorm epsilons, KQV clamping. Llama 3.1/3.2
 * files carry their llama3 RoPE scaling as the tensor rope_freqs.weight (head_dim / 2 divisors of
 * the pair frequencies): it becomes KV_ROPE_FACTORS (kv_rope.h). vocab_size is token_embd's ne[1],
 * which must equal {arch}.vocab_size and the length of tokenizer.ggml.tokens when they are there.
 *
 * Tensors (ne[0] innermost, so a matrix W[out][in] is ne = [in, out] and its bytes are the rows of
 * W, as kv_model.h lays them out): token_embd, output_norm, output (absent: tied embeddings),
 * rope_freqs (optional), and per layer blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
 * ffn_norm, ffn_gate (w1), ffn_up (w3), ffn_down (w2)}.weight, plus blk.N.attn_{q,k,v}.bias (qwen2:
 * required; llama: optional, as llama.cpp allows). Every tensor's shape and type is checked against
 * the configuration before anything is read; a tensor of any other name is refused by name
 * (blk.N.attn_rot_embd, a RoPE table old converters wrote and llama.cpp ignores, is skipped). The
 * matrices stay in the mapped file in their stored type (kernels/kv_weight.h descriptors: the forward
 * pass dequantises tiles as it multiplies, exactly as ggml does); the norms and biases are dequantised
 * into one small fp32 allocation. kv_model_load_f32 dequantises everything at load instead.
 *
 * RoPE order. kvsim's forward pass rotates the interleaved pairs (2i, 2i+1) of each head, which is
 * llama.cpp's rope type NORM. llama.cpp uses NORM for the llama architecture (llama_model_rope_type
 * in llama-model.cpp), and convert_hf_to_gguf.py's LlamaModel.modify_tensors permutes Hugging Face's
 * q_proj/k_proj weights and biases back to that order (LlamaModel.permute: per head, reshape
 * (2, d/2) -> swap -> (d/2, 2)); transformers' GGUF loader undoes it (LlamaTensorProcessor's
 * _reverse_permute_weights). So llama-arch q/k are used as stored. qwen2 uses rope type NEOX
 * (rotate_half: pairs (i, i + d/2)) and its converter (Qwen2Model) writes q/k in Hugging Face's
 * order unpermuted, so the loader reads them per head in the order model_hf.c does: file row r of
 * a head (r = j*d/2 + i) is row 2i + j (the descriptor's perm); the q and k biases are reordered. The
 * post-RoPE Q and K are then what llama.cpp computes, in kvsim's interleaved order
 * (tests/test_gguf.c checks it against NEOX RoPE on the stored rows).
 */
#include "traces/capture/kv_model.h"

#include "sim/common/kv_common.h"
#include "traces/capture/kv_gguf.h"
#include "traces/capture/kv_model_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_GGML_TYPES 64 /* dtype counters (ggml numbers its types below this) */

static int gguf_probe(const char *path)
{
    return kv_model_file_starts_with(path, "GGUF", 4);
}

/* The vocabulary and merges are in the file: the tokenizer is the GGUF file itself. */
static const char *gguf_default_tokenizer(const char *path, char *buf, size_t len)
{
    if (access(path, R_OK) != 0)
        return NULL;
    snprintf(buf, len, "%s", path);
    return buf;
}

/* ---------------------------------------------------------------- configuration */

typedef struct {
    kv_gguf_t *g;
    const char *path;
    char arch[32];
} src_t;

static const char *akey(const src_t *s, const char *suffix, char *buf, size_t len)
{
    snprintf(buf, len, "%s.%s", s->arch, suffix);
    return buf;
}

/* {arch}.suffix as a non-negative int (absent: dflt, or an error when required). */
static int meta_int(const src_t *s, const char *suffix, int required, int dflt, int *out)
{
    char k[160];
    akey(s, suffix, k, sizeof k);
    const int i = kv_gguf_find(s->g, k);
    if (i < 0) {
        if (required)
            return kv_error(KV_EFORMAT, "%s: metadata %s is missing", s->path, k);
        *out = dflt;
        return KV_OK;
    }
    if (kv_gguf_kv_type(s->g, i) == KV_GGUF_ARRAY)
        return kv_error(KV_EFORMAT, "%s: metadata %s is an array: per-layer values are not supported", s->path, k);
    int64_t v;
    int rc = kv_gguf_get_int(s->g, k, &v);
    if (rc)
        return rc;
    if (v < 0 || v > INT32_MAX)
        return kv_error(KV_EFORMAT, "%s: metadata %s is %lld (a non-negative int32 is needed)", s->path, k,
                        (long long)v);
    *out = (int)v;
    return KV_OK;
}

static int meta_float(const src_t *s, const char *suffix, double dflt, double *out)
{
    char k[160];
    int rc = kv_gguf_get_float(s->g, akey(s, suffix, k, sizeof k), out);
    if (rc == KV_EUNAVAIL) {
        *out = dflt;
        return KV_OK;
    }
    return rc;
}

/* Metadata that would change the computation in ways the forward pass does not follow. */
static int refuse_unsupported(const src_t *s)
{
    static const struct {
        const char *suffix, *why;
    } keys[] = {
        {"attention.scale", "a custom attention scale"},
        {"logit_scale", "a logit scale"},
        {"embedding_scale", "an embedding scale"},
        {"residual_scale", "a residual scale"},
        {"attn_logit_softcapping", "attention logit soft-capping"},
        {"final_logit_softcapping", "final logit soft-capping"},
        {"attention.clamp_kqv", "KQV clamping"},
        {"attention.layer_norm_epsilon", "LayerNorm (kvsim computes RMSNorm)"},
    };
    char k[160];
    for (size_t i = 0; i < KV_ARRAY_LEN(keys); i++)
        if (kv_gguf_find(s->g, akey(s, keys[i].suffix, k, sizeof k)) >= 0)
            return kv_error(KV_EFORMAT, "%s: metadata %s is set: %s is not supported by the forward pass", s->path, k,
                            keys[i].why);
    int experts;
    int rc = meta_int(s, "expert_count", 0, 0, &experts);
    if (rc)
        return rc;
    if (experts > 0)
        return kv_error(KV_EFORMAT, "%s: %s.expert_count is %d: mixture-of-experts models are not supported", s->path,
                        s->arch, experts);
    return KV_OK;
}

/* rope.scaling.type and its factor into c->rope (before the configuration check). */
static int read_rope_scaling(const src_t *s, kv_model_config_t *c, double theta)
{
    char k[160];
    const char *type = "linear"; /* llama.cpp's default when a factor is given without a type */
    char tbuf[64];
    const char *st;
    size_t sl;
    int rc = kv_gguf_get_str(s->g, akey(s, "rope.scaling.type", k, sizeof k), &st, &sl);
    int have_type = rc == KV_OK;
    if (rc && rc != KV_EUNAVAIL)
        return rc;
    if (have_type) {
        snprintf(tbuf, sizeof tbuf, "%.*s", (int)KV_MIN(sl, sizeof tbuf - 1), st);
        type = tbuf;
    }
    double factor = 0, lin = 0;
    if ((rc = meta_float(s, "rope.scaling.factor", 0, &factor)) || (rc = meta_float(s, "rope.scale_linear", 0, &lin)))
        return rc;
    if (factor == 0)
        factor = lin;
    if (strcmp(type, "none") && strcmp(type, "linear"))
        return kv_error(KV_EFORMAT,
                        "%s: %s.rope.scaling.type is %s: only none and linear RoPE scaling are supported "
                        "(rope_freqs.weight covers Llama 3's scaling)",
                        s->path, s->arch, type);
    if (factor != 0 && !(factor > 0 && isfinite(factor)))
        return kv_error(KV_EFORMAT, "%s: RoPE scaling factor %g is impossible", s->path, factor);
    if (!strcmp(type, "none") && factor != 0 && factor != 1)
        return kv_error(KV_EFORMAT, "%s: %s.rope.scaling.type is none but the scaling factor is %g (ambiguous)",
                        s->path, s->arch, factor);
    if (!strcmp(type, "linear") && factor != 0 && factor != 1) {
        c->rope = kv_rope_plain(theta);
        c->rope.type = KV_ROPE_LINEAR;
        c->rope.factor = factor;
    }
    return KV_OK;
}

static int parse_config(const src_t *s, kv_model_config_t *c, uint64_t vocab)
{
    int rc, key_len, val_len, rot, window;
    if ((rc = refuse_unsupported(s)))
        return rc;
    if ((rc = meta_int(s, "block_count", 1, 0, &c->n_layers)) ||
        (rc = meta_int(s, "context_length", 1, 0, &c->seq_len)) ||
        (rc = meta_int(s, "embedding_length", 1, 0, &c->dim)) ||
        (rc = meta_int(s, "feed_forward_length", 1, 0, &c->hidden_dim)) ||
        (rc = meta_int(s, "attention.head_count", 1, 0, &c->n_heads)) ||
        (rc = meta_int(s, "attention.head_count_kv", 0, c->n_heads, &c->n_kv_heads)) ||
        (rc = meta_int(s, "attention.key_length", 0, 0, &key_len)) ||
        (rc = meta_int(s, "attention.value_length", 0, 0, &val_len)) ||
        (rc = meta_int(s, "rope.dimension_count", 0, 0, &rot)) ||
        (rc = meta_int(s, "attention.sliding_window", 0, 0, &window)))
        return rc;
    double eps, theta;
    char k[160];
    rc = kv_gguf_get_float(s->g, akey(s, "attention.layer_norm_rms_epsilon", k, sizeof k), &eps);
    if (rc == KV_EUNAVAIL)
        return kv_error(KV_EFORMAT, "%s: metadata %s is missing", s->path, k);
    if (rc || (rc = meta_float(s, "rope.freq_base", 10000.0, &theta)))
        return rc;
    if (!(eps > 0) || !(theta > 0) || !isfinite(eps) || !isfinite(theta))
        return kv_error(KV_EFORMAT, "%s: RMSNorm epsilon %g and RoPE freq_base %g must be positive", s->path, eps,
                        theta);
    if (vocab > INT32_MAX)
        return kv_error(KV_EFORMAT, "%s: absurd vocabulary: token_embd.weight has %llu rows", s->path,
                        (unsigned long long)vocab);
    c->vocab_size = (int)vocab;
    c->head_dim = key_len;
    c->rope_theta = (float)theta;
    c->norm_eps = (float)eps;
    c->version = -1;
    snprintf(c->arch, sizeof c->arch, "%s", s->arch);
    if ((rc = read_rope_scaling(s, c, theta)) || (rc = kv_model_config_check(c, s->path)))
        return rc;
    if (val_len && val_len != c->head_dim)
        return kv_error(KV_EFORMAT,
                        "%s: %s.attention.value_length %d differs from the key length %d (not supported by the "
                        "forward pass)",
                        s->path, s->arch, val_len, c->head_dim);
    if (rot && rot != c->head_dim)
        return kv_error(KV_EFORMAT,
                        "%s: %s.rope.dimension_count is %d, head_dim is %d: partial rotary embeddings are not "
                        "supported",
                        s->path, s->arch, rot, c->head_dim);
    if (window > 0 && window < c->seq_len)
        c->seq_len = window; /* exact: within the window, sliding-window attention is causal attention */
    int64_t v;
    if ((rc = kv_gguf_get_int(s->g, akey(s, "vocab_size", k, sizeof k), &v)) == KV_OK && v != c->vocab_size)
        return kv_error(KV_EFORMAT, "%s: %s is %lld but token_embd.weight has %d rows", s->path, k, (long long)v,
                        c->vocab_size);
    if (rc && rc != KV_EUNAVAIL)
        return rc;
    int et;
    uint64_t n;
    if ((rc = kv_gguf_get_arr(s->g, "tokenizer.ggml.tokens", &et, &n)) == KV_OK && n != (uint64_t)c->vocab_size)
        return kv_error(KV_EFORMAT, "%s: tokenizer.ggml.tokens has %llu tokens but token_embd.weight has %d rows",
                        s->path, (unsigned long long)n, c->vocab_size);
    return rc == KV_EUNAVAIL ? KV_OK : rc;
}

/* ---------------------------------------------------------------- tensors */

typedef struct {
    char name[64];
    uint64_t ne0, ne1; /* expected shape, ne1 = 0 for a vector */
    int perm;          /* > 0: rows (a vector: elements) in NEOX order, this head_dim */
    int optional;      /* absent is fine (the destination is then zeros) */
    int part;          /* destination: part `part` of the weights (kv_model.h order), */
    uint64_t off;      /* at this offset (floats); (ne1, ne0) row-major */
    const kv_gguf_tensor_t *t;
} want_t;

/* Per-layer tensor suffixes, in plan order. */
static const char *const layer_suffix[] = {
    "attn_norm.weight", "attn_q.weight", "attn_k.weight",   "attn_v.weight", "attn_output.weight", "ffn_norm.weight",
    "ffn_gate.weight",  "ffn_up.weight", "ffn_down.weight", "attn_q.bias",   "attn_k.bias",        "attn_v.bias",
};
#define N_LAYER_WEIGHTS 9

/* 1 when `name` is a tensor the loader reads or knowingly skips (*skip set then). */
static int known_tensor(const char *name, int n_layers, int *skip)
{
    static const char *const global[] = {"token_embd.weight", "output_norm.weight", "output.weight",
                                         "rope_freqs.weight"};
    *skip = 0;
    for (size_t i = 0; i < KV_ARRAY_LEN(global); i++)
        if (!strcmp(name, global[i]))
            return 1;
    int l, off = 0;
    if (sscanf(name, "blk.%d.%n", &l, &off) != 1 || off == 0 || l < 0 || l >= n_layers)
        return 0;
    char canon[32];
    snprintf(canon, sizeof canon, "blk.%d.", l);
    if (strncmp(name, canon, strlen(canon)))
        return 0; /* "blk.01." or "blk.+1.": not a name llama.cpp writes */
    const char *suffix = name + off;
    for (size_t i = 0; i < KV_ARRAY_LEN(layer_suffix); i++)
        if (!strcmp(suffix, layer_suffix[i]))
            return 1;
    if (!strcmp(suffix, "attn_rot_embd")) {
        *skip = 1;
        return 1;
    }
    return 0;
}

static const char *ne_text(const uint64_t *ne, int nd, char *buf, size_t len)
{
    size_t o = (size_t)snprintf(buf, len, "[");
    for (int i = 0; i < nd && o < len; i++)
        o += (size_t)snprintf(buf + o, len - o, "%s%llu", i ? ", " : "", (unsigned long long)ne[i]);
    if (o < len)
        snprintf(buf + o, len - o, "]");
    return buf;
}

/* Presence, shape and type of w against the file (nothing is read). */
static int check_want(const src_t *s, want_t *w)
{
    w->t = kv_gguf_find_tensor(s->g, w->name);
    if (!w->t) {
        if (w->optional)
            return KV_OK;
        return kv_error(KV_EFORMAT, "%s: tensor %s is missing", s->path, w->name);
    }
    const kv_gguf_tensor_t *t = w->t;
    const uint64_t want[2] = {w->ne0, w->ne1};
    const int wnd = w->ne1 ? 2 : 1;
    if (t->ne[0] != w->ne0 || t->ne[1] != (w->ne1 ? w->ne1 : 1) || t->ne[2] != 1 || t->ne[3] != 1) {
        char a[128], b[128];
        return kv_error(KV_EFORMAT, "%s: tensor %s has shape %s, the configuration implies %s (ne[0] first)", s->path,
                        w->name, ne_text(t->ne, t->n_dims, a, sizeof a), ne_text(want, wnd, b, sizeof b));
    }
    if (!kv_gguf_type_supported(t->type)) {
        char tn[32];
        const char *n = kv_gguf_type_name(t->type);
        snprintf(tn, sizeof tn, "%s", n ? n : "an unknown type");
        return kv_error(KV_EFORMAT,
                        "%s: tensor %s is %s, which kvsim cannot dequantise (it reads F32, F16, BF16, Q4_0, Q4_1, "
                        "Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K)",
                        s->path, w->name, tn);
    }
    return KV_OK;
}

/* Row (or element) r of a head_dim-d group in NEOX order -> its interleaved position. */
static uint64_t neox_to_interleaved(uint64_t r, uint64_t d)
{
    const uint64_t h = r / d, i = r % d, half = d / 2;
    return h * d + 2 * (i % half) + i / half;
}

/* Dequantise the vector w->t (a norm or a bias) into its place among the parts p, reordering its
 * elements when w->perm > 0. */
static int load_want(const src_t *s, const want_t *w, float *const *p)
{
    const kv_gguf_tensor_t *t = w->t;
    float *const dst = p[w->part] + w->off;
    int rc = KV_OK;
    if (!t)
        return KV_OK; /* optional and absent: dst stays zero */
    if (w->perm <= 0)
        return kv_gguf_dequant(t->type, t->data, t->n_elements, dst);
    const uint64_t d = (uint64_t)w->perm;
    float *tmp = kv_malloc(w->ne0 * sizeof(float), "bias");
    if (!tmp)
        return kv_error_context(KV_ENOMEM, "%s", s->path);
    if ((rc = kv_gguf_dequant(t->type, t->data, w->ne0, tmp)) == KV_OK)
        for (uint64_t r = 0; r < w->ne0; r++)
            dst[neox_to_interleaved(r, d)] = tmp[r];
    kv_free(tmp);
    return rc;
}

/* RoPE frequency divisors from rope_freqs.weight (head_dim / 2 values) into c->rope. */
static int read_rope_freqs(const src_t *s, kv_model_config_t *c, const kv_gguf_tensor_t *t)
{
    const int n = c->head_dim / 2;
    want_t w = {"rope_freqs.weight", (uint64_t)n, 0, 0, 0, 0, 0, NULL};
    int rc = check_want(s, &w);
    if (rc)
        return rc;
    if (c->rope.type == KV_ROPE_LINEAR)
        return kv_error(KV_EFORMAT,
                        "%s: rope_freqs.weight together with linear RoPE scaling (factor %g) is not supported", s->path,
                        c->rope.factor);
    float f[KV_ROPE_MAX_PAIRS];
    if ((rc = kv_gguf_dequant(t->type, t->data, (uint64_t)n, f)))
        return rc;
    c->rope = kv_rope_plain(c->rope_theta);
    c->rope.type = KV_ROPE_FACTORS;
    for (int i = 0; i < n; i++)
        c->rope.factors[i] = f[i];
    return kv_model_config_check(c, s->path); /* factors positive and finite */
}

static int gguf_load(const char *path, kv_model_t **out)
{
    *out = NULL;
    int rc;
    src_t s = {NULL, path, ""};
    want_t *w = NULL;
    kv_model_t *m = kv_calloc(1, sizeof *m, "model");
    if (!m)
        return KV_ENOMEM;
    snprintf(m->path, sizeof m->path, "%s", path);
    m->format = "gguf";
    if ((rc = kv_gguf_open(path, &s.g)))
        goto fail;
    const char *a;
    size_t al;
    rc = kv_gguf_get_str(s.g, "general.architecture", &a, &al);
    if (rc == KV_EUNAVAIL)
        rc = kv_error(KV_EFORMAT, "%s: metadata general.architecture is missing", path);
    if (rc)
        goto fail;
    snprintf(s.arch, sizeof s.arch, "%.*s", (int)KV_MIN(al, sizeof s.arch - 1), a);
    if (al >= sizeof s.arch || (strcmp(s.arch, "llama") && strcmp(s.arch, "qwen2"))) {
        rc = kv_error(KV_EFORMAT, "%s: architecture %.*s is not supported (kvsim runs llama and qwen2)", path,
                      (int)KV_MIN(al, 64), a);
        goto fail;
    }
    const int qwen2 = !strcmp(s.arch, "qwen2");
    const kv_gguf_tensor_t *emb = kv_gguf_find_tensor(s.g, "token_embd.weight");
    if (!emb) {
        rc = kv_error(KV_EFORMAT, "%s: tensor token_embd.weight is missing", path);
        goto fail;
    }
    kv_model_config_t *c = &m->cfg;
    if ((rc = parse_config(&s, c, emb->ne[1])))
        goto fail;
    const kv_gguf_tensor_t *rf = kv_gguf_find_tensor(s.g, "rope_freqs.weight");
    if (rf && (rc = read_rope_freqs(&s, c, rf)))
        goto fail;
    c->shared_classifier = kv_gguf_find_tensor(s.g, "output.weight") == NULL;
    /* every tensor of the file must be one the plan reads (or a known harmless one) */
    int has_bias = 0;
    for (int i = 0; i < kv_gguf_n_tensors(s.g); i++) {
        const char *name = kv_gguf_tensor(s.g, i)->name;
        int skip;
        if (!known_tensor(name, c->n_layers, &skip)) {
            rc = kv_error(KV_EFORMAT, "%s: tensor %s is not part of a %s model as kvsim runs it (refused, not ignored)",
                          path, name, s.arch);
            goto fail;
        }
        has_bias |= strstr(name, ".bias") != NULL;
    }
    c->qkv_bias = qwen2 || has_bias;

    /* sizes of the parts of the fp32 weights, in the order of kv_model.h */
    const uint64_t L = (uint64_t)c->n_layers, D = (uint64_t)c->dim, H = (uint64_t)c->hidden_dim;
    const uint64_t V = (uint64_t)c->vocab_size, Q = (uint64_t)c->q_dim, KV = (uint64_t)c->kv_dim;
    const uint64_t B = c->qkv_bias ? 1 : 0;
    enum { EMB, RMS_ATT, WQ, WK, WV, WO, RMS_FFN, W1, W2, W3, RMS_FINAL, WCLS, BQ, BK, BV, NP };
    _Static_assert((int)NP == (int)KV_N_PARTS && (int)WCLS == (int)KV_PART_WCLS && (int)BV == (int)KV_PART_BV,
                   "kv_model_internal.h's order");
    uint64_t sizes[KV_N_PARTS];
    const uint64_t total = kv_model_part_sizes(c, (int)B, sizes);
    /* the plan: every tensor's name, shape and place, validated before the allocation */
    const int n_want = 3 + (int)L * 12;
    w = kv_calloc((size_t)n_want, sizeof *w, "tensor plan");
    if (!w) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto fail;
    }
    int nw = 0;
    w[nw++] = (want_t){"token_embd.weight", D, V, 0, 0, EMB, 0, NULL};
    w[nw++] = (want_t){"output_norm.weight", D, 0, 0, 0, RMS_FINAL, 0, NULL};
    if (!c->shared_classifier)
        w[nw++] = (want_t){"output.weight", D, V, 0, 0, WCLS, 0, NULL};
    const int perm = qwen2 ? c->head_dim : 0;
    for (uint64_t l = 0; l < L; l++) {
        const want_t lw[12] = {
            {"", D, 0, 0, 0, RMS_ATT, l * D, NULL},      {"", D, Q, perm, 0, WQ, l * Q * D, NULL},
            {"", D, KV, perm, 0, WK, l * KV * D, NULL},  {"", D, KV, 0, 0, WV, l * KV * D, NULL},
            {"", Q, D, 0, 0, WO, l * D * Q, NULL},       {"", D, 0, 0, 0, RMS_FFN, l * D, NULL},
            {"", D, H, 0, 0, W1, l * H * D, NULL},       {"", D, H, 0, 0, W3, l * H * D, NULL},
            {"", H, D, 0, 0, W2, l * D * H, NULL},       {"", Q, 0, perm, !qwen2, BQ, l * Q, NULL},
            {"", KV, 0, perm, !qwen2, BK, l * KV, NULL}, {"", KV, 0, 0, !qwen2, BV, l * KV, NULL},
        };
        for (int i = 0; i < (B ? 12 : N_LAYER_WEIGHTS); i++) {
            w[nw] = lw[i];
            snprintf(w[nw].name, sizeof w[nw].name, "blk.%d.%s", (int)l, layer_suffix[i]);
            nw++;
        }
    }
    int counts[N_GGML_TYPES] = {0};
    for (int i = 0; i < nw; i++) {
        if ((rc = check_want(&s, &w[i])))
            goto fail;
        if (w[i].t)
            counts[w[i].t->type]++; /* supported types are < N_GGML_TYPES */
    }
    if (rf)
        counts[rf->type]++;

    /* the norms and biases: one small fp32 allocation; the matrices: descriptors into the mapping */
    const uint64_t small = sizes[RMS_ATT] + sizes[RMS_FFN] + sizes[RMS_FINAL] + sizes[BQ] + sizes[BK] + sizes[BV];
    m->owned = kv_calloc((size_t)small, sizeof(float), "norms and biases"); /* absent llama biases stay 0 */
    m->layers = kv_calloc((size_t)L, sizeof *m->layers, "layer weights");
    if (!m->owned || !m->layers) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto fail;
    }
    m->n_params = (size_t)total;
    float *p[NP] = {NULL};
    p[RMS_ATT] = m->owned, p[RMS_FFN] = p[RMS_ATT] + sizes[RMS_ATT], p[RMS_FINAL] = p[RMS_FFN] + sizes[RMS_FFN];
    p[BQ] = p[RMS_FINAL] + sizes[RMS_FINAL], p[BK] = p[BQ] + sizes[BQ], p[BV] = p[BK] + sizes[BK];
    m->rms_att = p[RMS_ATT], m->rms_ffn = p[RMS_FFN], m->rms_final = p[RMS_FINAL];
    if (B)
        m->bq = p[BQ], m->bk = p[BK], m->bv = p[BV];
    m->weight_bytes = (size_t)small * sizeof(float);
    for (int i = 0; i < nw; i++) {
        if (!w[i].ne1) { /* a vector */
            if ((rc = load_want(&s, &w[i], p)))
                goto fail;
            continue;
        }
        const kv_gguf_tensor_t *t = w[i].t;
        kv_weight_t d;
        memset(&d, 0, sizeof d);
        d.data = t->data, d.type = t->type, d.rows = (int)w[i].ne1, d.cols = (int)w[i].ne0, d.perm = w[i].perm;
        if ((rc = kv_weight_set_layout(&d, path)))
            goto fail;
        m->weight_bytes += kv_weight_bytes(&d);
        static const int mw_of[NP] = {[WQ] = KV_MW_Q,    [WK] = KV_MW_K,    [WV] = KV_MW_V, [WO] = KV_MW_O,
                                      [W1] = KV_MW_GATE, [W2] = KV_MW_DOWN, [W3] = KV_MW_UP};
        if (w[i].part == EMB)
            m->emb_w = d;
        else if (w[i].part == WCLS)
            m->cls_w = d;
        else
            m->layers[w[i].off / (w[i].ne0 * w[i].ne1)].w[mw_of[w[i].part]] = d; /* off: layer x matrix */
    }
    if (c->shared_classifier)
        m->cls_w = m->emb_w;
    {
        void *map;
        size_t map_len;
        kv_gguf_give_mapping(s.g, &map, &map_len);
        if ((rc = kv_model_add_map(m, map, map_len)))
            goto fail;
    }
    const char *names[N_GGML_TYPES];
    int cnt[N_GGML_TYPES], k = 0;
    for (int t = 0; t < N_GGML_TYPES; t++)
        if (counts[t])
            names[k] = kv_gguf_type_name(t), cnt[k++] = counts[t];
    kv_model_set_dtypes(m, names, cnt, k);
    kv_free(w);
    kv_gguf_close(s.g);
    *out = m;
    return KV_OK;
fail:
    kv_free(w);
    kv_gguf_close(s.g);
    kv_model_free(m);
    return rc;
}

const kv_model_format_t kv_model_format_gguf = {"gguf", gguf_probe, gguf_load, gguf_default_tokenizer};
