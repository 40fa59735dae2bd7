/*
 * tok_llama2c.c: the llama2.c tokenizer.bin format (kv_tokenizer.h): int32 max_token_length, then
 * for every token a float32 score, an int32 byte length and the token's bytes. Ids 0, 1, 2 are
 * <unk>, BOS and EOS; BOS is added to every prompt. The last row of the format table: it claims any
 * file, and its size and header checks name what is wrong with a file of another kind.
 */
#include "sim/common/kv_common.h"
#include "traces/capture/kv_tokenizer_internal.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define MAX_PIECE (1 << 16) /* longer pieces mean a corrupt file */
#define MAX_FILE (1 << 30)  /* 16M tokens of 64 bytes; real tokenizers are a few MB */

static int llama2c_probe(const char *path)
{
    (void)path;
    return 1;
}

static int llama2c_load(const char *path, int expect_vocab, kv_tokenizer_t *t)
{
    int rc = KV_OK;
    unsigned char *buf = NULL;
    FILE *f;
    int orc = kv_open_input(path, "tokenizer", &f);
    if (orc)
        return orc;
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = kv_error(KV_EIO, "%s: not a regular file", path);
        goto done;
    }
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        size = ftell(f);
    if (size < 0 || fseek(f, 0, SEEK_SET) != 0) {
        rc = kv_error(KV_EIO, "%s: cannot read tokenizer size: %s", path, strerror(errno));
        goto done;
    }
    if (size < 4) {
        rc = kv_error(KV_EFORMAT, "%s: tokenizer file is %ld bytes, too short for its header", path, size);
        goto done;
    }
    /* The header is checked before the file is read whole: a model checkpoint passed by mistake
     * must not be read into memory first. */
    int32_t maxlen;
    if (fread(&maxlen, 1, 4, f) != 4 || fseek(f, 0, SEEK_SET) != 0) {
        rc = kv_error(KV_EIO, "%s: cannot read the tokenizer header", path);
        goto done;
    }
    if (maxlen <= 0 || maxlen > MAX_PIECE) {
        rc = kv_error(KV_EFORMAT, "%s: max_token_length %d is impossible (corrupt tokenizer?)", path, maxlen);
        goto done;
    }
    if (size > MAX_FILE) {
        rc = kv_error(KV_EFORMAT,
                      "%s: tokenizer file is %ld bytes, more than the %d MiB any tokenizer.bin needs (a model "
                      "checkpoint?)",
                      path, size, MAX_FILE >> 20);
        goto done;
    }
    buf = kv_malloc((size_t)size, "tokenizer file");
    if (!buf) {
        rc = kv_error_context(KV_ENOMEM, "%s", path);
        goto done;
    }
    if (fread(buf, 1, (size_t)size, f) != (size_t)size) {
        rc = kv_error(KV_EIO, "%s: short read of the tokenizer", path);
        goto done;
    }
    /* First pass: count and validate records. */
    size_t off = 4, n = 0, bytes = 0;
    while (off < (size_t)size && (expect_vocab <= 0 || n < (size_t)expect_vocab)) {
        if ((size_t)size - off < 8) {
            rc = kv_error(KV_EFORMAT,
                          "%s: truncated: token %zu's score and length need 8 bytes at offset %zu, only "
                          "%zu remain",
                          path, n, off, (size_t)size - off);
            goto done;
        }
        float score;
        int32_t len;
        memcpy(&score, buf + off, 4);
        memcpy(&len, buf + off + 4, 4);
        if (!isfinite(score)) {
            rc = kv_error(KV_EFORMAT, "%s: token %zu has a non-finite score (corrupt tokenizer?)", path, n);
            goto done;
        }
        if (len < 0 || len > maxlen) {
            rc = kv_error(KV_EFORMAT,
                          "%s: token %zu has length %d outside [0, max_token_length %d] (corrupt "
                          "tokenizer?)",
                          path, n, len, maxlen);
            goto done;
        }
        off += 8;
        if ((size_t)size - off < (size_t)len) {
            rc = kv_error(KV_EFORMAT, "%s: truncated: token %zu needs %d bytes at offset %zu, only %zu remain", path, n,
                          len, off, (size_t)size - off);
            goto done;
        }
        off += (size_t)len;
        bytes += (size_t)len + 1;
        n++;
        if (n > (1u << 24)) {
            rc = kv_error(KV_EFORMAT, "%s: more than 16M tokens (corrupt tokenizer?)", path);
            goto done;
        }
    }
    if (expect_vocab > 0 && n < (size_t)expect_vocab) {
        rc = kv_error(KV_EFORMAT,
                      "%s: tokenizer has %zu tokens, the model's vocabulary has %d (truncated or a "
                      "tokenizer for another model)",
                      path, n, expect_vocab);
        goto done;
    }
    if (off != (size_t)size) {
        rc = kv_error(KV_EFORMAT,
                      "%s: %zu bytes after the %zu tokens the model expects (a tokenizer for another "
                      "model?)",
                      path, (size_t)size - off, n);
        goto done;
    }
    if (n < 3) {
        rc = kv_error(KV_EFORMAT, "%s: only %zu tokens (need at least <unk>, BOS and EOS)", path, n);
        goto done;
    }
    if ((rc = kv_tok_alloc(t, n, bytes)))
        goto done;
    /* Second pass: copy (sizes already validated). */
    off = 4;
    char *p = t->blob;
    for (size_t i = 0; i < n; i++) {
        int32_t len;
        memcpy(&t->scores[i], buf + off, 4);
        memcpy(&len, buf + off + 4, 4);
        off += 8;
        kv_tok_put_piece(t, &p, (int)i, (const char *)buf + off, len);
        off += (size_t)len;
    }
    t->max_token_length = maxlen;
    kv_tokenizer_index(t);
    t->kind = KV_TOK_SPM;
    t->unk_id = 0;
    t->bos_id = 1;
    t->eos_id = 2;
    t->add_bos = 1;
    for (int id = 0; id < 3 && rc == KV_OK; id++)
        rc = kv_tok_add_added(t, id, t->pieces[id], (size_t)t->lens[id], KV_TOK_SPECIAL);
done:
    kv_free(buf);
    fclose(f);
    return rc;
}

const kv_tok_format_t kv_tok_format_llama2c = {"llama2.c", llama2c_probe, llama2c_load};
