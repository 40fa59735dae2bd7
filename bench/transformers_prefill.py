"""transformers_prefill.py: transformers' forward pass over a prompt, timed on request, for
bench/capture.c (make bench-capture), which interleaves these runs with kvsim's own on the same
machine so that both see the same load.

usage: python3 transformers_prefill.py MODEL.gguf IDS.txt THREADS

Loads MODEL (a GGUF file, dequantised by transformers' gguf integration) in float32 on the CPU with
attn_implementation="sdpa", reads the prompt's token ids (whitespace-separated) from IDS.txt, sets
torch to THREADS threads, runs the forward once to warm up, prints "ready <torch version>
<transformers version> <n tokens>", then for every line "run" on stdin runs
model(ids, logits_to_keep=1) (the full forward pass over the prompt, the logits of the last token
only, as kvsim's capture prefill computes them) under torch.inference_mode() and prints its wall
time in seconds; "quit" or end of input ends it. Exit status 3 with a message on stderr when torch
or transformers cannot be imported.
"""
import os
import sys
import time


def main():
    model_path, ids_path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except Exception as e:  # noqa: BLE001 (any import failure means: not available here)
        print(f"transformers_prefill.py: torch/transformers not importable: {e}", file=sys.stderr)
        sys.exit(3)
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    folder, name = os.path.split(os.path.abspath(model_path))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="sdpa")
    model.eval()
    with open(ids_path) as f:
        ids = torch.tensor([[int(x) for x in f.read().split()]])
    with torch.inference_mode():
        model(ids, logits_to_keep=1)
    print(f"ready transformers {transformers.__version__} (torch {torch.__version__})", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(ids, logits_to_keep=1)
            el = time.perf_counter() - t0
        print(f"{el:.6f}", flush=True)


if __name__ == "__main__":
    main()
