#!/usr/bin/env python3
"""kvpress_parity.py: the reference side of tests/test_kvpress_parity.c.

  kvpress_parity.py model STORIES.bin OUTDIR
      writes the stories260K llama2.c checkpoint as a Hugging Face Llama checkpoint (config.json +
      model.safetensors, q_proj/k_proj rows permuted the way Hugging Face's conversion does), the
      folder kvsim captures its trace from;
  kvpress_parity.py run HFDIR IDS N_PROMPT OUT.json
      loads HFDIR with transformers, runs every press of PRESSES below at its three settings on the
      first N_PROMPT ids of IDS (the trace's token ids; the decode ids are fed one by one for the
      decoding press) and writes, per press, setting, layer and KV head, the token indices the cache
      keeps and the scores the press ranked them by (when its selection is a top-k of one score).

Kept indices are read off the cache itself: a compressed cache holds copies of rows of the full
cache, so each row is found among the keys of a run without compression (exact float equality;
RoPE makes every position's key distinct); presses that only mask (AdaKV, CriticalAdaKV) leave the
pruned (head, position) pairs in module.masked_key_indices. Scores are recorded by wrapping the
press's score method (the ranking its top-k ran on). Nothing here decides pass or fail: the C test
compares these sets with kvsim's.
"""
import json
import os
import struct
import sys


def write_model(stories, out):
    import numpy as np
    from safetensors.numpy import save_file

    with open(stories, "rb") as f:
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", f.read(28))
        w = np.frombuffer(f.read(), dtype=np.float32)
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // n_heads
    kv_dim = n_kv * hd
    off = 0

    def take(*shape):
        nonlocal off
        n = int(np.prod(shape))
        a = w[off : off + n].reshape(shape)
        off += n
        return a

    emb = take(vocab, dim)
    rms_att = take(n_layers, dim)
    wq = take(n_layers, dim, dim)
    wk = take(n_layers, kv_dim, dim)
    wv = take(n_layers, kv_dim, dim)
    wo = take(n_layers, dim, dim)
    rms_ffn = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    rms_final = take(dim)
    off += seq_len * hd  # the legacy freq_cis_real and freq_cis_imag
    wcls = None if shared else take(vocab, dim)

    def permute(m, heads):  # interleaved RoPE pairs (2i, 2i+1) -> rotate_half pairs (i, i + hd/2)
        return m.reshape(heads, hd // 2, 2, -1).transpose(0, 2, 1, 3).reshape(heads * hd, -1)

    t = {"model.embed_tokens.weight": emb, "model.norm.weight": rms_final}
    for l in range(n_layers):
        p = f"model.layers.{l}."
        t[p + "input_layernorm.weight"] = rms_att[l]
        t[p + "post_attention_layernorm.weight"] = rms_ffn[l]
        t[p + "self_attn.q_proj.weight"] = permute(wq[l], n_heads)
        t[p + "self_attn.k_proj.weight"] = permute(wk[l], n_kv)
        t[p + "self_attn.v_proj.weight"] = wv[l]
        t[p + "self_attn.o_proj.weight"] = wo[l]
        t[p + "mlp.gate_proj.weight"] = w1[l]
        t[p + "mlp.down_proj.weight"] = w2[l]
        t[p + "mlp.up_proj.weight"] = w3[l]
    if wcls is not None:
        t["lm_head.weight"] = wcls
    os.makedirs(out, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in t.items()}, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv, "head_dim": hd, "vocab_size": vocab, "max_position_embeddings": seq_len,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": shared,
        "attention_bias": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


# name -> (settings, constructor); a setting is (budget text for kvsim, constructor argument)
def presses(n):
    import kvpress as K

    cr = [(f"cr:{r}", r) for r in (0.25, 0.5, 0.75)]
    # SimLayerKV: kvsim's budget B is what a lazy layer keeps, n_initial + n_recent - n_last
    slk = [(str(4 + r - 1), r) for r in (n // 4, n // 2, (3 * n) // 4)]
    # DecodingPress: kvsim's budget is the target size
    dec = [(str(t), t) for t in (int(n * 0.75), int(n * 0.5), int(n * 0.25))]
    return {
        "snapkv": (cr, lambda r: K.SnapKVPress(compression_ratio=r)),
        "streaming_llm": (cr, lambda r: K.StreamingLLMPress(compression_ratio=r)),
        "observed_attention": (cr, lambda r: K.ObservedAttentionPress(compression_ratio=r)),
        "tova": (cr, lambda r: K.TOVAPress(compression_ratio=r)),
        "knorm": (cr, lambda r: K.KnormPress(compression_ratio=r)),
        "pyramidkv": (cr, lambda r: K.PyramidKVPress(compression_ratio=r)),
        "chunkkv": (cr, lambda r: K.ChunkKVPress(press=K.SnapKVPress(compression_ratio=r), chunk_length=20)),
        "adakv": (cr, lambda r: K.AdaKVPress(press=K.SnapKVPress(compression_ratio=r))),
        "expected_attention": (cr, lambda r: K.ExpectedAttentionPress(compression_ratio=r)),
        "adakv_expected_attention": (
            cr, lambda r: K.AdaKVPress(press=K.ExpectedAttentionPress(compression_ratio=r, epsilon=1e-2))),
        "keydiff": (cr, lambda r: K.KeyDiffPress(compression_ratio=r)),
        "lagkv": (cr, lambda r: K.LagKVPress(compression_ratio=r)),
        "criticalkv": (cr, lambda r: K.CriticalKVPress(press=K.SnapKVPress(compression_ratio=r))),
        "criticaladakv": (cr, lambda r: K.CriticalAdaKVPress(press=K.SnapKVPress(compression_ratio=r))),
        "simlayerkv": (slk, lambda r: K.SimLayerKVPress(lazy_threshold=0.9, n_recent=r)),
        "decoding": (dec, lambda t: K.DecodingPress(base_press=K.KnormPress(), compression_interval=8, target_size=t)),
    }


def scorer_of(press):
    """The press whose score() ranks the tokens (wrapped to record it), or None. For AdaKV the inner
    press's scores (the allocation runs on them across the heads of a layer); ChunkKV's chunk scores
    and the decoding press's (on the cache of the moment) are not recorded."""
    import kvpress as K

    if isinstance(press, K.AdaKVPress):
        return press.press
    if isinstance(press, (K.CriticalAdaKVPress, K.ChunkKVPress, K.DecodingPress)):
        return None
    if isinstance(press, K.ScorerPress):
        return press
    return None


def run(hfdir, ids_path, n_prompt, out_path):
    import torch
    import transformers
    import kvpress as K
    from transformers import DynamicCache, LlamaForCausalLM

    torch.manual_seed(0)
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with open(ids_path) as f:
        ids = [int(x) for x in f.read().replace(",", " ").split()]
    n = n_prompt
    models = {
        impl: LlamaForCausalLM.from_pretrained(hfdir, dtype=torch.float32, attn_implementation=impl).eval()
        for impl in ("sdpa", "eager")
    }
    prompt = torch.tensor([ids[:n]])

    def forward_all(model, press, all_ids):
        cache = DynamicCache()
        with torch.no_grad():
            if press is None:
                model(input_ids=torch.tensor([all_ids[:n]]), past_key_values=cache)
                for t in all_ids[n:]:
                    model(input_ids=torch.tensor([[t]]), past_key_values=cache)
            else:
                with press(model):
                    model(input_ids=torch.tensor([all_ids[:n]]), past_key_values=cache)
                    for t in all_ids[n:]:
                        model(input_ids=torch.tensor([[t]]), past_key_values=cache)
        return cache

    L = models["sdpa"].config.num_hidden_layers
    ref = {}
    for impl, m in models.items():  # keys of a run without compression: prompt only, and prompt + decode
        ref[impl, False] = forward_all(m, None, ids[:n])
        ref[impl, True] = forward_all(m, None, ids)

    def positions(keys, ref_keys):
        """Cache rows (Hkv, k, d) -> token positions, by exact match with the uncompressed keys;
        rows found nowhere are tokens appended after the last compression (they close the cache)."""
        out = []
        for h in range(keys.shape[0]):
            where = {ref_keys[h, j].numpy().tobytes(): j for j in range(ref_keys.shape[1])}
            rows = [where.get(keys[h, r].numpy().tobytes(), -1) for r in range(keys.shape[0 + 1])]
            tail = len(rows)
            while tail > 0 and rows[tail - 1] < 0:
                tail -= 1
            if any(r < 0 for r in rows[:tail]):
                raise SystemExit("kvpress_parity: a cache row matches no uncompressed key")
            T = ref_keys.shape[1]
            rows[tail:] = list(range(T - (len(rows) - tail), T))
            out.append(sorted(rows))
        return out

    result = {"n_prompt": n, "n_tokens": len(ids), "kvpress": K.__version__ if hasattr(K, "__version__") else "",
              "transformers": transformers.__version__, "torch": torch.__version__, "presses": []}
    try:
        import importlib.metadata as md
        result["kvpress"] = md.version("kvpress")
    except Exception:
        pass
    for name, (settings, make) in presses(n).items():
        impl = "eager" if name == "observed_attention" else "sdpa"
        model = models[impl]
        decode = name == "decoding"
        for budget, arg in settings:
            press = make(arg)
            sc = scorer_of(press)
            recorded = {}
            if sc is not None:
                orig = sc.score

                def wrapped(module, *a, _orig=orig, **kw):
                    s = _orig(module, *a, **kw)
                    recorded[module.layer_idx] = s[0].detach().clone()
                    return s

                sc.score = wrapped
            for layer in model.model.layers:
                if hasattr(layer.self_attn, "masked_key_indices"):
                    del layer.self_attn.masked_key_indices
            cache = forward_all(model, press, ids if decode else ids[:n])
            rk = ref[impl, decode]
            kept, scores = [], []
            for l in range(L):
                keys = cache.layers[l].keys[0]
                attn = model.model.layers[l].self_attn
                masked = getattr(attn, "masked_key_indices", None)
                if masked is not None:  # AdaKV-style: nothing removed, the pruned pairs are listed
                    _, hs, js = masked
                    pruned = [set() for _ in range(keys.shape[0])]
                    for h, j in zip(hs.tolist(), js.tolist()):
                        pruned[h].add(j)
                    kept.append([[j for j in range(keys.shape[1]) if j not in pruned[h]] for h in range(keys.shape[0])])
                else:
                    kept.append(positions(keys, rk.layers[l].keys[0]))
                s = recorded.get(l)
                if decode:  # KnormPress's score of every position (a key's norm does not change)
                    s = -torch.linalg.vector_norm(rk.layers[l].keys[0], dim=-1, dtype=torch.float32)
                scores.append(s.tolist() if s is not None else None)
            result["presses"].append({"name": name, "budget": budget, "kept": kept, "scores": scores})
            print(f"kvpress_parity: {name} {budget}: {sum(len(h) for lay in kept for h in lay)} kept", file=sys.stderr)
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "model":
        write_model(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 6 and sys.argv[1] == "run":
        run(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit(__doc__)
