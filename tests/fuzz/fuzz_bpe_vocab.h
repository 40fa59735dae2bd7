/*
 * fuzz_bpe_vocab.h: small byte-level BPE tokenizer.json files for fuzz_bpe.c and its seeds
 * (make_seeds.c). Every configuration has the 256 byte characters (ids 0..255, byte order), the
 * merges of MERGES (pieces of two characters of the byte alphabet, then longer ones) and two added
 * tokens; they differ in normalizer, pre-tokenizer and added-token options:
 *   0  SmolLM2's steps (Digits individual, ByteLevel with the GPT-2 regex): decode(encode) == text
 *   1  Llama 3's (Split by its regex, ByteLevel without regex), ignore_merges: decode(encode) == text
 *   2  Qwen2's with NFC, added tokens with lstrip/rstrip/single_word/normalized
 *   3  prefix space, Split MergedWithNext on a literal, Digits in runs
 *   4  an inverted Split with Removed, Contiguous on spaces
 */
#ifndef FUZZ_BPE_VOCAB_H
#define FUZZ_BPE_VOCAB_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FZ_BPE_CONFIGS 5

/* left and right of each merge, as byte-level strings ("\xc4\xa0" is the space's character) */
static const char *const FZ_MERGES[][2] = {
    {"\xc4\xa0", "t"},
    {"h", "e"},
    {"\xc4\xa0t", "he"},
    {"i", "n"},
    {"e", "r"},
    {"a", "n"},
    {"\xc4\xa0", "a"},
    {"o", "n"},
    {"\xc4\xa0", "\xc4\xa0"},
    {"1", "2"},
    {"12", "3"},
    {"\xc3\x83", "\xc2\xa9"},
    {"in", "g"},
    {"\xc4\x8a", "\xc4\x8a"},
    {"<", "|"},
    {"|", ">"},
    {"a", "a"},
    {"aa", "aa"},
};

static const char *const FZ_PRE[FZ_BPE_CONFIGS] = {
    "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Digits\", \"individual_digits\": true}, {\"type\": "
    "\"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": true, \"use_regex\": true}]}",
    "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": "
    "\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}{1,3}| "
    "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"}, \"behavior\": "
    "\"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": "
    "true, \"use_regex\": false}]}",
    "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": "
    "\"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\\\r\\\\n\\\\p{L}\\\\p{N}]?\\\\p{L}+|\\\\p{N}| "
    "?[^\\\\s\\\\p{L}\\\\p{N}]+[\\\\r\\\\n]*|\\\\s*[\\\\r\\\\n]+|\\\\s+(?!\\\\S)|\\\\s+\"}, \"behavior\": "
    "\"Isolated\", \"invert\": false}, {\"type\": \"ByteLevel\", \"add_prefix_space\": false, \"trim_offsets\": "
    "true, \"use_regex\": false}]}",
    "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"String\": \"-\"}, "
    "\"behavior\": \"MergedWithNext\", \"invert\": false}, {\"type\": \"Digits\", \"individual_digits\": false}, "
    "{\"type\": \"ByteLevel\", \"add_prefix_space\": true, \"trim_offsets\": true, \"use_regex\": true}]}",
    "{\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": \"Split\", \"pattern\": {\"Regex\": \"\\\\s+\"}, "
    "\"behavior\": \"Contiguous\", \"invert\": false}, {\"type\": \"Split\", \"pattern\": {\"Regex\": "
    "\"[aeiou]\"}, \"behavior\": \"Removed\", \"invert\": true}, {\"type\": \"ByteLevel\", \"add_prefix_space\": "
    "false, \"trim_offsets\": true, \"use_regex\": false}]}",
};

/* UTF-8 of byte b's character in GPT-2's byte alphabet into o (2 bytes); returns its length. */
static int fz_byte_utf8(int b, char *o)
{
    unsigned c = b <= 0x20                ? 256u + (unsigned)b
                 : b >= 0x7f && b <= 0xa0 ? 256u + 33u + (unsigned)(b - 0x7f)
                 : b == 0xad              ? 256u + 67u
                                          : (unsigned)b;
    if (c < 0x80) {
        o[0] = (char)c;
        return 1;
    }
    o[0] = (char)(0xc0 | (c >> 6));
    o[1] = (char)(0x80 | (c & 0x3f));
    return 2;
}

/* the same as JSON string content */
static void fz_put_byte_char(FILE *f, int b)
{
    char s[2];
    int n = fz_byte_utf8(b, s);
    if (n == 1 && (s[0] == '"' || s[0] == '\\'))
        fputc('\\', f);
    fwrite(s, 1, (size_t)n, f);
}

/* The tokenizer.json of configuration `cfg`, written to f. */
static void fz_bpe_json(FILE *f, int cfg)
{
    const int nm = (int)(sizeof FZ_MERGES / sizeof FZ_MERGES[0]);
    const char *added = cfg == 2 ? "{\"id\": %d, \"content\": \"<|s|>\", \"single_word\": false, \"lstrip\": true, "
                                   "\"rstrip\": true, \"normalized\": false, \"special\": true}, {\"id\": %d, "
                                   "\"content\": \"w\xc3\xa9\", \"single_word\": true, \"lstrip\": false, \"rstrip\": "
                                   "false, \"normalized\": true, \"special\": false}"
                                 : "{\"id\": %d, \"content\": \"<|s|>\", \"single_word\": false, \"lstrip\": false, "
                                   "\"rstrip\": false, \"normalized\": false, \"special\": true}, {\"id\": %d, "
                                   "\"content\": \"<|e|>\", \"single_word\": false, \"lstrip\": false, \"rstrip\": "
                                   "false, \"normalized\": false, \"special\": true}";
    fputs("{\"version\": \"1.0\", \"added_tokens\": [", f);
    fprintf(f, added, 256 + nm, 257 + nm);
    fprintf(f,
            "], \"normalizer\": %s, \"pre_tokenizer\": %s, \"post_processor\": null, \"decoder\": {\"type\": "
            "\"ByteLevel\"}, \"model\": {\"type\": \"BPE\", \"ignore_merges\": %s, \"vocab\": {",
            cfg == 2 ? "{\"type\": \"NFC\"}" : "null", FZ_PRE[cfg], cfg == 1 ? "true" : "false");
    for (int b = 0; b < 256; b++) {
        fputs(b ? ", \"" : "\"", f);
        fz_put_byte_char(f, b);
        fprintf(f, "\": %d", b);
    }
    for (int i = 0; i < nm; i++)
        fprintf(f, ", \"%s%s\": %d", FZ_MERGES[i][0], FZ_MERGES[i][1], 256 + i);
    fputs("}, \"merges\": [", f);
    for (int i = 0; i < nm; i++)
        fprintf(f, "%s[\"%s\", \"%s\"]", i ? ", " : "", FZ_MERGES[i][0], FZ_MERGES[i][1]);
    fputs("]}}\n", f);
}

#endif
