/*
 * fuzz_bpe.c: libFuzzer harness for the byte-level BPE tokenizer (traces/capture/tok_bpe.c), its
 * tokenizer.json reader (tok_hf.c) and the chat wrapping (tok_chat.c).
 *
 * Input: byte 0 selects what the rest is:
 *   0..4   text for the synthetic configuration byte0 (fuzz_bpe_vocab.h)
 *   5      text for SmolLM2's tokenizer (the real GGUF when ../shared has it, else configuration 0)
 *   6      a tokenizer.json (written to a temporary file); when it loads, a few fixed texts are encoded
 *   7      a chat template, rendered for a system and a user message with configuration 0's vocabulary
 * For text: encoding succeeds, every id lies in the vocabulary, there are at most 4 ids per byte of
 * text (NFC can lengthen it) plus one, encoding is deterministic, every token decodes. Configurations
 * 0 and 1 and SmolLM2 change nothing on the way (no normalizer, no stripped or removed text, no
 * prefix space), so there decode(encode(text)) == text must hold for any bytes, UTF-8 or not (SmolLM2
 * lacks 21 byte tokens: only texts made of bytes it has). A failed load must name the file.
 * Not part of `make test`: make fuzz FUZZ_NAMES=bpe.
 */
#include "sim/common/kv_common.h"
#include "tests/fuzz/fuzz_bpe_vocab.h"
#include "tests/kv_test.h"
#include "traces/capture/kv_tokenizer.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static kv_tokenizer_t *g_tok[FZ_BPE_CONFIGS + 1]; /* the configurations, then SmolLM2 */
static char g_json[256];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    char path[256], real[1024];
    for (int c = 0; c < FZ_BPE_CONFIGS; c++) {
        snprintf(path, sizeof path, "/tmp/kvsim-fuzz-bpe-%d-cfg%d.json", (int)getpid(), c);
        FILE *f = fopen(path, "w");
        if (!f)
            abort();
        fz_bpe_json(f, c);
        fclose(f);
        if (kv_tokenizer_load(path, 0, &g_tok[c]) != KV_OK) {
            fprintf(stderr, "fuzz_bpe: configuration %d: %s\n", c, kv_last_error());
            abort();
        }
        unlink(path);
    }
    const char *gguf =
        kv_test_shared("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", real, sizeof real);
    if (!gguf || kv_tokenizer_load(gguf, 0, &g_tok[FZ_BPE_CONFIGS]) != KV_OK)
        fprintf(stderr, "fuzz_bpe: SmolLM2 not found, mode 5 uses configuration 0\n");
    snprintf(g_json, sizeof g_json, "/tmp/kvsim-fuzz-bpe-%d.json", (int)getpid());
    return 0;
}

static void check_text(const kv_tokenizer_t *t, const char *text, size_t len, int round_trip)
{
    int32_t *ids = NULL, *again = NULL;
    int n = 0, m = 0;
    if (kv_tokenizer_encode(t, text, len, 0, 0, &ids, &n) != KV_OK) {
        fprintf(stderr, "fuzz_bpe: encode failed: %s\n", kv_last_error());
        abort();
    }
    if ((size_t)n > 4 * len + 1 || kv_tokenizer_encode(t, text, len, 0, 0, &again, &m) != KV_OK || m != n ||
        memcmp(ids, again, sizeof *ids * (size_t)n))
        abort();
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->vocab_size)
            abort();
        size_t l;
        const char *p = kv_tokenizer_decode(t, i ? ids[i - 1] : -1, ids[i], &l);
        if (l && !p)
            abort();
    }
    char *back = NULL;
    size_t bl = 0;
    if (kv_tokenizer_decode_all(t, ids, n, &back, &bl) != KV_OK)
        abort();
    if (round_trip && (bl != len || memcmp(back, text, len))) {
        fprintf(stderr, "fuzz_bpe: %zu bytes of text came back as %zu (%s)\n", len, bl, t->path);
        abort();
    }
    kv_free(back);
    kv_free(ids);
    kv_free(again);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    const int mode = data[0] % 8;
    const char *rest = (const char *)data + 1;
    const size_t len = size - 1;
    if (mode < FZ_BPE_CONFIGS) {
        check_text(g_tok[mode], rest, len, mode <= 1);
    } else if (mode == 5) {
        const kv_tokenizer_t *t = g_tok[FZ_BPE_CONFIGS] ? g_tok[FZ_BPE_CONFIGS] : g_tok[0];
        int all_bytes = 1;
        for (size_t i = 0; i < len && all_bytes; i++)
            all_bytes = t->bpe->byte_id[(unsigned char)rest[i]] >= 0;
        check_text(t, rest, len, all_bytes);
    } else if (mode == 6) {
        FILE *f = fopen(g_json, "wb");
        if (!f)
            abort();
        fwrite(rest, 1, len, f);
        fclose(f);
        kv_tokenizer_t *t = NULL;
        if (kv_tokenizer_load(g_json, 0, &t) != KV_OK) {
            if (t || !strstr(kv_last_error(), g_json)) {
                fprintf(stderr, "fuzz_bpe: failure without the file named: %s\n", kv_last_error());
                abort();
            }
            return 0;
        }
        static const char *const texts[] = {"Hello, world! 123", "a\xc3\xa9 \xff\x80 <|s|> \n\n  x", ""};
        for (size_t i = 0; i < sizeof texts / sizeof *texts; i++)
            check_text(t, texts[i], strlen(texts[i]), 0);
        char *out = NULL;
        if (kv_tokenizer_chat(t, NULL, "hi", &out) == KV_OK && !out)
            abort();
        kv_free(out);
        kv_tokenizer_free(t);
    } else {
        kv_tokenizer_t *t = g_tok[0];
        char *tmpl = kv_malloc(len + 1, "template");
        memcpy(tmpl, rest, len);
        tmpl[len] = 0;
        char *saved = t->chat_template, *out = NULL;
        t->chat_template = tmpl;
        int rc = kv_tokenizer_chat(t, (data[0] & 8) ? "sys" : NULL, "user text", &out);
        if ((rc == KV_OK) != (out != NULL))
            abort();
        if (out)
            check_text(t, out, strlen(out), 1);
        t->chat_template = saved;
        kv_free(out);
        kv_free(tmpl);
    }
    return 0;
}
