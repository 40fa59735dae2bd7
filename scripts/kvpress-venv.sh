#!/usr/bin/env bash
# kvpress-venv.sh [DIR]: a Python environment for the kvpress parity test (tests/test_kvpress_parity.c),
# default build/kvpress-venv. kvpress (0.5.5) pins transformers < 5.3, below the transformers the
# other interop tests run with, so it goes into its own virtual environment: one that sees the
# system's packages (torch, numpy, safetensors: nothing large is downloaded twice) but whose own
# site-packages, first on its path, hold kvpress and the versions it pins (transformers 5.2,
# tokenizers 0.22, huggingface_hub 1.x, datasets, ...). transformers is installed with its "kernels"
# extra so that the hub-kernels package it imports is the version it was written for: a newer
# system-wide one (0.19) makes transformers 5.2 fail at import. The system's packages are untouched.
set -euo pipefail
dir=${1:-build/kvpress-venv}
python3 -m venv --system-site-packages "$dir"
"$dir/bin/python3" -m pip install --quiet --disable-pip-version-check "kvpress==0.5.5" "transformers[kernels]>=4.56,<5.3"
"$dir/bin/python3" -c 'import torch, transformers, kvpress; print("kvpress-venv: kvpress", __import__("importlib.metadata").metadata.version("kvpress"), "transformers", transformers.__version__, "torch", torch.__version__)'
