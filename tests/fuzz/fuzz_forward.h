/*
 * fuzz_forward.h: the check the checkpoint harnesses (fuzz_model.c, fuzz_hf.c) apply to a model the
 * loader accepted: a forward pass of up to 4 tokens (BOS, then ids taken from the input) on the CPU
 * backend must succeed, and it reads every weight.
 */
#ifndef KV_FUZZ_FORWARD_H
#define KV_FUZZ_FORWARD_H

#include "kernels/kv_backend.h"
#include "sim/common/kv_common.h"
#include "traces/capture/kv_forward.h"
#include "traces/capture/kv_model.h"

#include <stdint.h>
#include <stdlib.h>

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
