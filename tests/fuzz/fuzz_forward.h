/*
 * fuzz_forward.h: the check the checkpoint harnesses (fuzz_model.c, fuzz_hf.c) apply to a model the
 * loader accepted: a forward pass of up to 4 tokens (BOS, then ids taken from the input) on the CPU
 * backend must succeed, and it reads every weight; and fuzz_stored_inside: every weight the model keeps
 * as stored (kernels/kv_weight.h descriptors) lies inside one of its mappings (AddressSanitizer does
 * not watch mapped files, so a descriptor past the end would otherwise go unnoticed).
 */
#ifndef KV_FUZZ_FORWARD_H
#define KV_FUZZ_FORWARD_H

#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* [p, p + bytes) inside one of m's mappings, or abort naming `what`. */
static inline void fuzz_in_maps(const kv_model_t *m, const void *p, uint64_t bytes, const char *what)
{
    const char *s = (const char *)p;
    for (int i = 0; i < m->n_maps; i++) {
        const char *b = (const char *)m->maps[i];
        if (s >= b && (uint64_t)(s - b) <= m->map_len[i] && bytes <= m->map_len[i] - (uint64_t)(s - b))
            return;
    }
    fprintf(stderr, "fuzz: %s [%p + %llu bytes] is in no mapping of the model\n", what, p, (unsigned long long)bytes);
    abort();
}

static inline void fuzz_weight_inside(const kv_model_t *m, const kv_weight_t *w, int rows, int cols, const char *what)
{
    if (w->rows != rows || w->cols != cols) {
        fprintf(stderr, "fuzz: %s is %d x %d, the configuration says %d x %d\n", what, w->rows, w->cols, rows, cols);
        abort();
    }
    fuzz_in_maps(m, w->data, (uint64_t)w->rows * w->row_bytes, what);
    if (w->type == KV_WT_Q8_GROUPS)
        fuzz_in_maps(m, w->scales, 4 * (((uint64_t)rows * (uint64_t)cols + (uint64_t)w->group - 1) / (uint64_t)w->group),
                     what);
}

/* Every stored descriptor of m (when it keeps its weights as stored) inside its mappings, shapes as
 * configured. */
static inline void fuzz_stored_inside(const kv_model_t *m)
{
    if (!m->layers)
        return;
    const kv_model_config_t *c = &m->cfg;
    fuzz_weight_inside(m, &m->emb_w, c->vocab_size, c->dim, "token embedding");
    fuzz_weight_inside(m, &m->cls_w, c->vocab_size, c->dim, "classifier");
    static const char *const names[KV_MW_N] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
    const int shape[KV_MW_N][2] = {{c->q_dim, c->dim},      {c->kv_dim, c->dim},     {c->kv_dim, c->dim},
                                   {c->dim, c->q_dim},      {c->hidden_dim, c->dim}, {c->dim, c->hidden_dim},
                                   {c->hidden_dim, c->dim}};
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < KV_MW_N; k++)
            fuzz_weight_inside(m, &m->layers[l].w[k], shape[k][0], shape[k][1], names[k]);
}

static inline void fuzz_forward(const kv_model_t *m, kv_backend_t *be, const uint8_t *data, size_t size)
{
    const int T = m->cfg.seq_len < 4 ? m->cfg.seq_len : 4;
    kv_fwd_t *fw = NULL;
    if (kv_fwd_create(m, be, T, T, &fw) != KV_OK)
        return;
    int32_t tok[4];
    for (int i = 0; i < T; i++)
        tok[i] = (int32_t)((i == 0 ? KV_BOS : (size ? data[i % size] : 0)) % m->cfg.vocab_size);
    float *logits = kv_malloc(sizeof(float) * (size_t)m->cfg.vocab_size * (size_t)T, "logits");
    if (logits && kv_fwd_run(fw, tok, T, 0, logits, 1, NULL, NULL) != KV_OK)
        abort(); /* a loaded model must run */
    kv_free(logits);
    kv_fwd_free(fw);
}

#endif
