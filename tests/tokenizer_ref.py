"""tokenizer_ref.py: Hugging Face reference ids for kvsim's byte-level BPE, for tests/test_tokenizer_bpe.c.

usage: python3 tokenizer_ref.py MODEL.gguf OUTDIR [TEXTFILE ...]

Reads the tokenizer of a GGUF file (tokenizer.ggml.*) with its own small GGUF parser (independent of
kvsim's reader), and writes tokenizer.json files built from that vocabulary and its merges:

  smollm   SmolLM2's own configuration (HuggingFaceTB/SmolLM2-135M-Instruct): no normalizer,
           Sequence[Digits(individual_digits), ByteLevel(add_prefix_space=false, use_regex)], the 17
           special tokens as added tokens (special, not normalized), ByteLevel decoder
  llama3   the same vocabulary with Llama 3's pre-tokenizer (Split by its regex, ByteLevel without
           regex), ignore_merges, a TemplateProcessing post-processor putting <|endoftext|> first
  qwen2    Qwen2's: NFC normalizer, Split by its regex, ByteLevel without regex
  flags    smollm plus an NFC normalizer and added tokens with lstrip/rstrip/single_word/normalized
  chat30/, chat31/, chat32/  smollm beside a tokenizer_config.json with a Llama 3.0, 3.1 or 3.2-style
           chat template (bos_token <|endoftext|>), for the chat wrapping

then OUTDIR/cases.txt, one line per (variant, text): "variant<TAB>hex(text)<TAB>ids", the ids from
tokenizers' Tokenizer.encode(text, add_special_tokens=False) (the llama3 variant also with
add_special_tokens=True, as variant "llama3+bos"), texts from a built-in list and each TEXTFILE (every
line, and the whole file); and OUTDIR/chat.txt, "dir<TAB>hex(system or '-')<TAB>hex(user)<TAB>hex(text)"
with the text transformers' apply_chat_template(add_generation_prompt=True, tokenize=False) renders
(jinja2 directly, the way transformers sets it up, when transformers is missing; no chat.txt without
either).
"""
import datetime
import json
import os
import struct
import sys

from tokenizers import Tokenizer

RE_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
             r"\s*[\r\n]+|\s+(?!\S)|\s+")
RE_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
            r"\s*[\r\n]+|\s+(?!\S)|\s+")

TEXTS = [
    "Hello, world! How are you doing today?",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'd go. You're right.",
    "Numbers: 3.14159, 1,000,000 and 2024-12-04; call 555-0199 or 12345678901234567890.",
    "  leading spaces, multiple   internal    spaces,\ttabs\tand trailing   ",
    "newlines\n\nparagraph two\r\nwindows line\n\n\n   indented\n",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade \u00c5ngstr\u00f6m \u2014 \u201cquotes\u201d \u2018single\u2019 \u2026 Stra\u00dfe",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5\u3002\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8"
    "\u3001\u30ab\u30bf\u30ab\u30ca\u3002\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
    "Emoji: \U0001F600\U0001F44D\U0001F3FD\U0001F1FA\U0001F1F8 \u2764\ufe0f and \U0001F9D1\u200d\U0001F4BB family "
    "\U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "def foo(x):\n    return x ** 2  # comment\n\n\tif x != None:\n        print(f\"{x!r}\")",
    "\u0420\u043e\u0441\u0441\u0438\u044f \u0438 \u0423\u043a\u0440\u0430\u0457\u043d\u0430, \u0395\u03bb\u03bb\u03b7"
    "\u03bd\u03b9\u03ba\u03ac, \u05e2\u05d1\u05e8\u05d9\u05ea, \u0627\u0644\u0639\u0631\u0628\u064a\u0629, \u0939\u093f"
    "\u0928\u094d\u0926\u0940",
    "e\u0301 combining vs \u00e9 precomposed; A\u030a; Zu\u0308rich; \u1e9b\u0323 \u212b \u2126",
    "<|endoftext|>Once upon a time<|endoftext|>",
    "special-ish: <|im_start|> <|im_end|><|im_start|><empty_output> <|im_start  <|notatoken|> <<|im_end|>>",
    "URL https://example.com/path?q=1&r=2#frag and e-mail me@example.org",
    "\uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 \uff21\uff22\uff23\uff11\uff12\uff13 and \u00b2\u00b3 "
    "\u00bd \u216b \u2460 numbers",
    "",
    " ",
    "\n",
    "'s 'S 'll 'LL 'Ve \u2019s 'd'D 're'RE 'm 'M 't'T '\u017f 'K",
    " " * 50 + "x" + "\n" * 20 + "y" + " \n \n " + "\t \t",
    "a" * 300 + " " + "ab" * 150,
    "NBSP\u00a0here, thin\u2009space, ideographic\u3000space, NEL\u0085line, ZW\u200bspace, LS\u2028PS\u2029",
    "controls \x01\x02\x1b[31mred\x1b[0m\x7f and a\x04b\x06c",
    "abc123def456 ABC\u0661\u0662\u0663 \u0966\u0967 x\u00b2",
    "  <|im_start|>  user \n<|im_end|>\n\n",
    "I said: \"Hello!!!\" ... (really?) [yes] {no} <tag> @user #hash $100 50% a&b a|b ~x ^y `code`",
    "tr\u00e8s \u00e7a \u0153uvre 123abc 4th 1st 2nd 3rd 10,5 \u20ac 5\u00a0\u20ac",
]

FLAG_TEXTS = [
    "a <mask> b", "x<mask>  y", "<mask><mask>", " <mask>\t\n<mask> end", "Zu\u0308rich and Z\u00fcrich",
    "the cat sat, concat, cat. cats cat_ cat1 \u00a9cat cat\u0301", "<|im_start|><mask>cat<|im_end|>",
]


def read_gguf_tokenizer(path):
    """The tokenizer.* metadata of a GGUF file (versions 2 and 3), parsed with struct only."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
    with open(path, "rb") as f:
        def read(fmt):
            n = struct.calcsize(fmt)
            return struct.unpack(fmt, f.read(n))[0]

        def string():
            return f.read(read("<Q")).decode("utf-8")

        def value(t):
            if t == 8:
                return string()
            if t == 9:
                et, n = read("<I"), read("<Q")
                return [value(et) for _ in range(n)]
            return read(scalar[t])

        if f.read(4) != b"GGUF":
            sys.exit(f"{path}: not a GGUF file")
        read("<I")
        read("<Q")
        n_kv = read("<Q")
        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(read("<I"))
    return meta


def added(i, content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False):
    return {"id": i, "content": content, "single_word": single_word, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": normalized, "special": special}


def bytelevel(prefix=False, regex=True):
    return {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": regex}


def split(regex):
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def tokenizer_json(meta, pre, norm=None, post=None, extra=(), ignore_merges=False):
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = [added(i, t) for i, t in enumerate(tokens) if types[i] == 3]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": specials + list(extra),
        "normalizer": norm, "pre_tokenizer": pre,
        "post_processor": post or bytelevel(True, True),
        "decoder": bytelevel(True, True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": ignore_merges, "vocab": vocab,
                  "merges": [m.split(" ", 1) for m in meta["tokenizer.ggml.merges"]]},
    }


LLAMA30 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
           "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
           "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
           "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
           "{% endif %}")
# The no-tools path of Llama 3.1's and 3.2's templates (their system header, date and message loop).
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- DATE %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
DATE31 = 'set date_string = "26 Jul 2024"'
DATE32 = ('if strftime_now is defined %}\n        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
          '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif')

CHATS = [(None, "Hello!"), ("You are a pirate.", "Tell me a story about 3 cats."),
         ("  spaced system \n", "  spaced\tuser \n\n"), (None, "<|im_start|>x\u00e9\U0001F600\n")]


def render(template, msgs, bos, eos):
    """transformers' apply_chat_template, else jinja2 set up as transformers sets it up, else None."""
    try:
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(render.tj)),
                                      chat_template=template, bos_token=bos, eos_token=eos)
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    except ImportError:
        pass
    try:
        import jinja2.sandbox
        from jinja2.ext import loopcontrols
    except ImportError:
        return None
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template).render(messages=msgs, add_generation_prompt=True, bos_token=bos, eos_token=eos)


def main():
    gguf, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    meta = read_gguf_tokenizer(gguf)
    n = len(meta["tokenizer.ggml.tokens"])
    vocab_ids = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    smollm_pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                        bytelevel(False, True)]}
    llama3_post = {"type": "Sequence", "processors": [
        bytelevel(True, False),
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<|endoftext|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}]}
    variants = {
        "smollm": tokenizer_json(meta, smollm_pre),
        "llama3": tokenizer_json(meta, {"type": "Sequence", "pretokenizers": [split(RE_LLAMA3), bytelevel(False, False)]},
                                 post=llama3_post, ignore_merges=True),
        "qwen2": tokenizer_json(meta, {"type": "Sequence", "pretokenizers": [split(RE_QWEN2), bytelevel(False, False)]},
                                norm={"type": "NFC"}),
        "flags": tokenizer_json(meta, smollm_pre, norm={"type": "NFC"}, extra=[
            added(n, "<mask>", special=True, lstrip=True, rstrip=True),
            added(n + 1, "Z\u00fcrich", special=False, normalized=True),
            added(vocab_ids.get("cat", n + 2), "cat", special=False, single_word=True)]),
    }
    toks = {}
    for name, tj in variants.items():
        path = os.path.join(out, name + ".tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(tj, f, ensure_ascii=False)
        toks[name] = Tokenizer.from_file(path)
    texts = list(TEXTS)
    for tf in sys.argv[3:]:
        with open(tf, encoding="utf-8") as f:
            whole = f.read()
        texts += [line for line in whole.split("\n") if line] + [whole]
    with open(os.path.join(out, "cases.txt"), "w") as f:
        def case(variant, tok, text, special=False):
            ids = tok.encode(text, add_special_tokens=special).ids
            f.write(f"{variant}\t{text.encode('utf-8').hex()}\t{' '.join(map(str, ids))}\n")
        for text in texts:
            for name in ("smollm", "llama3", "qwen2"):
                case(name, toks[name], text)
            case("llama3+bos", toks["llama3"], text, True)
        for text in FLAG_TEXTS + texts[:12]:
            case("flags", toks["flags"], text)
    render.tj = variants["smollm"]
    templates = {"smollm": meta["tokenizer.chat_template"], "chat30": LLAMA30,
                 "chat31": LLAMA31.replace("DATE", DATE31), "chat32": LLAMA31.replace("DATE", DATE32)}
    lines = []
    for name, tmpl in templates.items():
        if name != "smollm":
            os.makedirs(os.path.join(out, name), exist_ok=True)
            with open(os.path.join(out, name, "tokenizer.json"), "w", encoding="utf-8") as g:
                json.dump(variants["smollm"], g, ensure_ascii=False)
            with open(os.path.join(out, name, "tokenizer_config.json"), "w", encoding="utf-8") as g:
                json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": tmpl}, g)
        bos = "<|endoftext|>" if name != "smollm" else "<|im_start|>"
        for system, user in CHATS:
            msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
                   [{"role": "user", "content": user}]
            text = render(tmpl, msgs, bos, "<|im_end|>")
            if text is None:
                print("tokenizer_ref.py: neither transformers nor jinja2: no chat.txt", file=sys.stderr)
                return
            sh = "-" if system is None else system.encode("utf-8").hex()
            lines.append(f"{name}\t{sh}\t{user.encode('utf-8').hex()}\t{text.encode('utf-8').hex()}\n")
    with open(os.path.join(out, "chat.txt"), "w") as f:
        f.writelines(lines)


if __name__ == "__main__":
    main()
