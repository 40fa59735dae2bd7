"""interop_smollm2.py: transformers' view of a real GGUF model, for tests/test_real_models.c.

usage: python3 interop_smollm2.py MODEL.gguf OUTDIR

transformers loads the GGUF file itself (its gguf integration dequantises every tensor with the
`gguf` package and converts the vocabulary to a Hugging Face tokenizer), in float32 on the CPU,
and this script writes what kvsim must reproduce:

  OUTDIR/tok.txt          one test text per record: "TEXT\t<json string>" then "IDS\t<ids>"
  OUTDIR/chat.txt         apply_chat_template([user: CHAT_USER], add_generation_prompt=True)
  OUTDIR/prompt.i32       the ids of the forward-pass prompt (int32)
  OUTDIR/logits.f32       logits at the positions of LOGIT_POS (len(LOGIT_POS) x vocab, float32)
  OUTDIR/greedy.i32       GREEDY tokens decoded greedily after the prompt with the full cache
  OUTDIR/q_<l>.f32        post-RoPE queries of layer l, (n_heads, T, head_dim)
  OUTDIR/k_<l>.f32        post-RoPE keys of layer l, (n_kv_heads, T, head_dim)
  OUTDIR/hf/              the same weights as a Hugging Face folder (config.json in transformers'
                          own style, float32 model.safetensors, tokenizer files)
  OUTDIR/meta.txt         key=value: vocab, n_heads, n_kv_heads, head_dim, T, layers, greedy, ...

Queries and keys are written in kvsim's interleaved RoPE order: transformers rotates the pairs
(i, i + d/2) of a head (rotate_half) where kvsim rotates (2i, 2i + 1), so kvsim's dimension 2i + j
is transformers' j * d/2 + i.
"""
import json
import os
import sys

import numpy as np
import torch
import transformers.models.llama.modeling_llama as modeling_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
    "  leading spaces,   runs of   spaces, and trailing ones   ",
    "line one\nline two\n\n\nafter three newlines\r\nwindows line\ttab",
    "Punctuation: ... !!! ??? (parens) [brackets] {braces} \"quotes\" 'single' -- dashes; colons: yes.",
    "Numbers: 0 7 42 1234 1234567 3.14159 2024-12-04 1,000,000 v2.0.1",
    "Contractions: it's, you're, we've, I'm, they'll, he'd, DON'T, Can't.",
    "Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00fcber stra\u00dfe \u00f1and\u00fa",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587 \ud55c\uad6d\uc5b4",
    "Emoji: \U0001F600 \U0001F680\U0001F30D \u2764\ufe0f thumbs \U0001F44D\U0001F3FD",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "code: def f(x):\n    return x ** 2  # square\n",
    "MiXeD CaSe WORDS and_snake_case camelCaseWords URLs https://example.com/a?b=c",
    "",
]
CHAT_USER = "Summarise the story of the three little pigs in one sentence."
PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nOnce upon a time, in a small village by the sea, there lived an old fisherman named "
    "Tom. Every morning he sailed out before sunrise, and every evening he came back with a basket of fish "
    "for the village. One day a storm came and Tom did not return. The children of the village lit lanterns "
    "on the beach so that he could find his way home.\nWhat did the children do, and why?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
GREEDY = 32
LAYERS = (0, 20)


def main():
    path, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    folder, name = os.path.split(os.path.abspath(path))
    torch.manual_seed(0)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    with open(os.path.join(out, "tok.txt"), "w", encoding="utf-8") as f:
        for t in TEXTS:
            ids = tok(t, add_special_tokens=True)["input_ids"]
            f.write("TEXT\t" + json.dumps(t) + "\n")
            f.write("IDS\t" + " ".join(str(i) for i in ids) + "\n")
    chat = tok.apply_chat_template([{"role": "user", "content": CHAT_USER}], add_generation_prompt=True,
                                   tokenize=False)
    with open(os.path.join(out, "chat.txt"), "w", encoding="utf-8") as f:
        f.write(chat)

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads

    ids = tok(PROMPT, add_special_tokens=True)["input_ids"]
    T = len(ids)
    np.asarray(ids, dtype=np.int32).tofile(os.path.join(out, "prompt.i32"))

    # post-RoPE Q and K: the eager attention function receives them (K before repeat_kv)
    seen = {}
    orig = modeling_llama.eager_attention_forward

    def spy(module, query, key, value, *a, **kw):
        if module.layer_idx in LAYERS and module.layer_idx not in seen:
            seen[module.layer_idx] = (query[0].detach().clone(), key[0].detach().clone())
        return orig(module, query, key, value, *a, **kw)

    modeling_llama.eager_attention_forward = spy
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    modeling_llama.eager_attention_forward = orig
    pos = [0, T // 2, T - 1]
    logits[pos].float().numpy().astype("<f4").tofile(os.path.join(out, "logits.f32"))
    perm = np.empty(hd, dtype=np.int64)  # kvsim dim 2i + j <- transformers dim j*hd/2 + i
    for i in range(hd // 2):
        for j in range(2):
            perm[2 * i + j] = j * (hd // 2) + i
    for layer in LAYERS:
        q, k = seen[layer]
        q.numpy()[:, :, perm].astype("<f4").tofile(os.path.join(out, f"q_{layer}.f32"))
        k.numpy()[:, :, perm].astype("<f4").tofile(os.path.join(out, f"k_{layer}.f32"))

    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY, do_sample=False, min_new_tokens=GREEDY,
                             eos_token_id=None, pad_token_id=cfg.pad_token_id)
    np.asarray(gen[0, T:].tolist(), dtype=np.int32).tofile(os.path.join(out, "greedy.i32"))

    hf = os.path.join(out, "hf")
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(hf, safe_serialization=True)
    tok.save_pretrained(hf)
    with open(os.path.join(out, "meta.txt"), "w") as f:
        f.write(f"vocab={cfg.vocab_size}\nn_heads={n_heads}\nn_kv_heads={n_kv}\nhead_dim={hd}\nT={T}\n")
        f.write("layers=" + ",".join(str(x) for x in LAYERS) + "\n")
        f.write("positions=" + ",".join(str(x) for x in pos) + "\n")
        f.write(f"greedy={GREEDY}\n")
        f.write("torch=" + torch.__version__ + "\n")
        import transformers
        f.write("transformers=" + transformers.__version__ + "\n")


if __name__ == "__main__":
    main()
