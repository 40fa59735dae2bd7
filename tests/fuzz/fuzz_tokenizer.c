/*
 * fuzz_tokenizer.c: libFuzzer harness for the tokenizer.bin loader, BPE encoding and decoding
 * (traces/capture/tokenizer.c).
 *
 * Input: byte 0 = flags (bit 0 BOS, bit 1 EOS, bits 2-7: expected vocabulary size / 4, 0 = any),
 * bytes 1-2 = length n of the text (little-endian, cut to what is there), then n bytes of text, then
 * the tokenizer file (written to a temporary file: the loader reads files). When it loads, the
 * text is encoded (ids must lie in the vocabulary, at most one per byte plus BOS, dummy prefix and
 * EOS), decoded whole and token by token, and every piece is looked up (it must find an id with
 * the same bytes). With BOS, byte fallback, " " a piece of its own, no later piece spelling a byte
 * token ("<0x41>") and no <unk>/BOS/EOS id inside the encoding, decode(encode(text)) must give the
 * text back. Input that starts with "GGUF" loads through the GGUF tokenizer (the format table probes
 * the magic); only what every tokenizer kind promises is checked then (ids in the vocabulary, decode).
 * Not part of `make test`; build and run as described in tests/fuzz/fuzz_model.c (make fuzz).
 */
#include "sim/common/kv_common.h"
#include "traces/capture/kv_tokenizer.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char g_path[256];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    snprintf(g_path, sizeof g_path, "/tmp/kvsim-fuzz-tok-%d.bin", (int)getpid());
    return 0;
}

/* Round trips hold when the dummy-prefix space is a piece of its own (so decoding after BOS drops
 * it) and no piece past the byte tokens spells a byte token ("<0x41>" decodes to "A"). */
static int plain_vocab(const kv_tokenizer_t *t)
{
    if (!t->byte_fallback || kv_tokenizer_lookup(t, " ", 1) < 3)
        return 0;
    for (int i = 259; i < t->vocab_size; i++)
        for (int k = 0; k + 2 < t->lens[i]; k++)
            if (!memcmp(t->pieces[i] + k, "<0x", 3))
                return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3)
        return 0;
    const int bos = data[0] & 1, eos = (data[0] >> 1) & 1, expect = (data[0] >> 2) * 4;
    size_t tl = (size_t)data[1] | (size_t)data[2] << 8;
    if (tl > size - 3)
        tl = size - 3;
    const char *text = (const char *)data + 3;
    FILE *f = fopen(g_path, "wb");
    if (!f)
        abort();
    fwrite(data + 3 + tl, 1, size - 3 - tl, f);
    fclose(f);
    kv_tokenizer_t *t = NULL;
    if (kv_tokenizer_load(g_path, expect, &t) != KV_OK) {
        if (t || !strstr(kv_last_error(), g_path)) {
            fprintf(stderr, "fuzz_tokenizer: failure without the file named: %s\n", kv_last_error());
            abort();
        }
        return 0;
    }
    if (strcmp(t->format, "llama2.c")) { /* a GGUF file (its magic found): the checks every kind passes */
        int32_t *ids = NULL;
        int n = 0;
        char *back = NULL;
        if (t->vocab_size < 1 || (expect && t->vocab_size > expect) ||
            kv_tokenizer_encode(t, text, tl, bos, eos, &ids, &n) != KV_OK)
            abort();
        for (int i = 0; i < n; i++)
            if (ids[i] < 0 || ids[i] >= t->vocab_size)
                abort();
        if (kv_tokenizer_decode_all(t, ids, n, &back, NULL) != KV_OK)
            abort();
        kv_free(back);
        kv_free(ids);
        kv_tokenizer_free(t);
        return 0;
    }
    if (t->vocab_size < 3 || (expect && t->vocab_size != expect))
        abort();
    for (int i = 0; i < t->vocab_size; i++) {
        int id = kv_tokenizer_lookup(t, t->pieces[i], (size_t)t->lens[i]);
        if (id < 0 || id > i || t->lens[id] != t->lens[i] || memcmp(t->pieces[id], t->pieces[i], (size_t)t->lens[i]))
            abort();
    }
    int32_t *ids = NULL;
    int n = 0;
    if (kv_tokenizer_encode(t, text, tl, bos, eos, &ids, &n) != KV_OK)
        abort();
    if (n > (int)tl + bos + eos + 1)
        abort();
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->vocab_size)
            abort();
        size_t l;
        const char *p = kv_tokenizer_decode(t, i ? ids[i - 1] : -1, ids[i], &l);
        if (l && !p)
            abort();
        total += l;
    }
    char *back = NULL;
    size_t blen = 0;
    if (kv_tokenizer_decode_all(t, ids, n, &back, &blen) != KV_OK)
        abort();
    int special = 0; /* <unk>, BOS or EOS inside the text (pieces may spell anything) */
    for (int i = bos; i < n - eos; i++)
        special |= ids[i] < 3;
    if (bos && !special && plain_vocab(t) && (blen != tl || memcmp(back, text, tl))) {
        fprintf(stderr, "fuzz_tokenizer: %zu bytes came back as %zu\n", tl, blen);
        abort();
    }
    (void)total;
    kv_free(back);
    kv_free(ids);
    kv_tokenizer_free(t);
    return 0;
}
