#!/bin/sh
# closed-loop.sh: the closed-loop study of README.md ("Closed-loop evaluation") on one model:
#   a prompt captured and replayed (open loop) and evaluated closed loop (kvsim eval) with the same
#   policies and budgets, the needle-in-a-haystack grid (kvsim niah), and one report with the
#   open-vs-closed, closed-loop and NIAH figures.
#
# usage: scripts/closed-loop.sh smollm2|stories260K [OUT]     (make closed-loop, make closed-loop-stories)
#   KVSIM (default build/kvsim), KVSIM_SHARED (default ../shared: models/ and data/), NIAH=0 skips the grid
#   (an OUT/niah.tsv already there is still reported).
# The prompt is made here from data/tinystories_sample.txt (nothing of the data is in the repository):
# SmolLM2-135M-Instruct gets its five stories and a question about the third in its chat template;
# stories260K (a 512-token context) the first 830 characters of the text.
# Times on the 2-core development machine: stories260K about 1 minute, SmolLM2 about 30 minutes
# (most of it the NIAH grid's 20 prefills of up to 2048 tokens).
set -eu
KVSIM=${KVSIM:-build/kvsim}
SHARED=${KVSIM_SHARED:-../shared}
NIAH=${NIAH:-1}
which=${1:-}
out=${2:-out/closed/$which}
data=$SHARED/data/tinystories_sample.txt
[ -r "$data" ] || { echo "closed-loop.sh: $data not found (set KVSIM_SHARED)" >&2; exit 1; }
mkdir -p "$out"

# the stories as paragraphs, separators dropped
stories() { sed -e 's/\r$//' -e '/^<|endoftext|>$/d' -e '/^[[:space:]]*$/d' "$data"; }

case $which in
smollm2)
    model=$SHARED/models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf
    set -- --chat
    budgets=64,128,256
    { stories; printf '\nQuestion: In the third story, what did the tiger turn into? Answer in one sentence.'; } \
        >"$out/prompt.txt"
    niah_pol='streaming_llm,h2o,snapkv,pyramidkv,adakv'
    niah_bud=64,128
    niah_grid="--lengths 256,512,1024,2048 --depths 0,0.25,0.5,0.75,1"
    title="Closed loop vs open loop: SmolLM2-135M-Instruct"
    ;;
stories260K)
    model=$SHARED/models/stories260K/stories260K.bin
    set -- -z "$SHARED/models/stories260K/tok512.bin"
    budgets=16,32,64
    stories | tr '\n' ' ' | cut -c1-830 | sed 's/\.[^.]*$/./' >"$out/prompt.txt"
    niah_pol='streaming_llm,snapkv(window=8)'
    niah_bud=16,32
    niah_grid="--lengths 200,300,480 --depths 0,0.5,1 --max-new 8"
    title="Closed loop vs open loop: stories260K"
    ;;
*)
    echo "usage: scripts/closed-loop.sh smollm2|stories260K [OUT]" >&2
    exit 2
    ;;
esac
[ -r "$model" ] || { echo "closed-loop.sh: $model not found (set KVSIM_SHARED)" >&2; exit 1; }
steps=32

# open loop: the trace's decode tokens are the full cache's greedy output, eval's default reference
$KVSIM capture "$model" "$@" -i @"$out/prompt.txt" --decode $steps --with-wo -o "$out/trace.h5"
$KVSIM replay "$out/trace.h5" all $budgets --no-head-rows -o "$out/replay.tsv"
# closed loop: the same prompt tokens, policies and budgets
$KVSIM eval "$model" "$@" @"$out/prompt.txt" all $budgets -n $steps -o "$out/eval.tsv" --json "$out/eval.json"
results="$out/replay.tsv $out/eval.tsv"
if [ "$NIAH" != 0 ]; then
    # the -z/--chat options of the prompt are kept for the tokenizer; niah picks the chat template itself
    if [ "$which" = stories260K ]; then tz="$1 $2"; else tz=""; fi
    # shellcheck disable=SC2086
    $KVSIM niah "$model" $tz "$niah_pol" $niah_bud $niah_grid -o "$out/niah.tsv" --json "$out/niah.json"
    results="$results $out/niah.tsv"
elif [ -r "$out/niah.tsv" ]; then # NIAH=0: an earlier grid in the folder is reported again
    results="$results $out/niah.tsv"
fi
# shellcheck disable=SC2086
$KVSIM analyze "$out/trace.h5" $results -o "$out/report" --title "$title"
