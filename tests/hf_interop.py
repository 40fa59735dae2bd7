"""hf_interop.py: tiny random-weight models built and run by transformers, for tests/test_hf_interop.c.

usage: python3 hf_interop.py OUTDIR

Builds three models with transformers (5.x) and saves each with save_pretrained (config.json in
transformers 5's style, F32 model.safetensors) into OUTDIR/<name>/:
  llama    LlamaForCausalLM, explicit head_dim 24 (q_dim 96 != hidden 64), GQA 4/2, untied lm_head,
           RoPE theta 100000 with llama3 scaling (factor 8, low 1, high 4, original context 128: with
           12 pairs per head, pairs 0-1 are untouched, 2-3 interpolated, 4-11 divided by 8)
  qwen2    Qwen2ForCausalLM, q/k/v biases, tied embeddings, GQA 4/2, theta 1e6
  mistral  MistralForCausalLM, explicit head_dim 32 (q_dim 128 != hidden 64, Mistral-Nemo style),
           GQA 4/1, theta 1e6, sliding_window 128 below max_position_embeddings 256
Every parameter is redrawn from a seeded generator (transformers initialises biases to 0 and norms
to 1, which would hide a bias or norm misread): weights N(0, 0.25^2), biases N(0, 0.5^2), norm
weights 1 + N(0, 0.1^2), so the logits are of order 1 to 10 and every term matters.

For each model, with the fixed ids of IDS (T = 40 tokens, position 0..39, float32, eager CPU):
  ids.i32     the ids
  logits.f32  (T, vocab) logits of model(ids) in float32
  q1.f32      (T, n_heads, head_dim) post-RoPE queries of layer 1, transformers' rotate_half order
  k1.f32      (T, n_kv_heads, head_dim) post-RoPE keys of layer 1
Q and K are taken by a forward hook on layer 1's attention module that applies the module's own
q_proj/k_proj and its own apply_rotary_pos_emb to the hidden states and position embeddings the
model passes it (what the module itself computes first).

Also OUTDIR/llama_v4/: the same llama weights with a transformers-4-style config.json (top-level
rope_theta, rope_scaling with "type", torch_dtype); transformers is asked to load it and must give
the same logits bit for bit (checked here: the two styles mean the same to transformers).
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

T = 40
VOCAB = 300


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * x)
            elif name.endswith(".bias"):
                p.copy_(0.5 * x)
            else:
                p.copy_(0.25 * x)


def run(model, ids):
    attn = model.model.layers[1].self_attn
    mod = sys.modules[type(attn).__module__]
    got = {}

    def hook(m, args, kwargs, out):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        shape = (*h.shape[:-1], -1, m.head_dim)
        q = m.q_proj(h).view(shape).transpose(1, 2)
        k = m.k_proj(h).view(shape).transpose(1, 2)
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
        got["q"] = q[0].transpose(0, 1).contiguous()  # (T, heads, head_dim)
        got["k"] = k[0].transpose(0, 1).contiguous()

    hd = attn.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    hd.remove()
    return logits, got["q"], got["k"]


def save(model, out, name, ids):
    d = os.path.join(out, name)
    model.save_pretrained(d)
    logits, q, k = run(model, ids)
    np.asarray(ids, dtype="<i4").tofile(os.path.join(d, "ids.i32"))
    logits.numpy().astype("<f4").tofile(os.path.join(d, "logits.f32"))
    q.numpy().astype("<f4").tofile(os.path.join(d, "q1.f32"))
    k.numpy().astype("<f4").tofile(os.path.join(d, "k1.f32"))
    return logits


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(7)
    ids = [1] + [int(x) for x in rng.integers(3, VOCAB, T - 1)]
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  rms_norm_eps=1e-5, attn_implementation="eager")

    llama3 = {"rope_type": "llama3", "rope_theta": 100000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 128}
    cfg = LlamaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=512,
                      rope_parameters=dict(llama3), tie_word_embeddings=False, **common)
    m = LlamaForCausalLM(cfg).eval()
    randomize(m, 11)
    ref = save(m, out, "llama", ids)

    # the same weights, transformers 4's config.json: top-level rope_theta, rope_scaling with "type"
    v4 = os.path.join(out, "llama_v4")
    os.makedirs(v4, exist_ok=True)
    shutil.copy(os.path.join(out, "llama", "model.safetensors"), v4)
    with open(os.path.join(out, "llama", "config.json")) as f:
        c = json.load(f)
    del c["rope_parameters"]
    c["rope_theta"] = llama3["rope_theta"]
    c["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 128}
    c["torch_dtype"] = c.pop("dtype")
    c["transformers_version"] = "4.43.0"
    with open(os.path.join(v4, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    m4 = LlamaForCausalLM.from_pretrained(v4, attn_implementation="eager").eval()
    with torch.no_grad():
        l4 = m4(input_ids=torch.tensor([ids])).logits[0]
    if not torch.equal(l4, ref):
        sys.exit("transformers gives different logits for the transformers-4-style config")

    cfg = Qwen2Config(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
                      **common)
    m = Qwen2ForCausalLM(cfg).eval()
    randomize(m, 12)
    save(m, out, "qwen2", ids)

    cfg = MistralConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                        sliding_window=128, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                        tie_word_embeddings=False, **common)
    m = MistralForCausalLM(cfg).eval()
    randomize(m, 13)
    save(m, out, "mistral", ids)
    with open(os.path.join(out, "versions.txt"), "w") as f:
        f.write("transformers %s torch %s\n" % (transformers.__version__, torch.__version__))


if __name__ == "__main__":
    main()
