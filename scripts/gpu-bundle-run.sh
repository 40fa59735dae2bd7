#!/bin/sh
# gpu-bundle-run.sh (installed as build/gpu-bundle/run.sh by `make gpu-bundle`):
#   run.sh NAME [ARGS...]   unpack build/gpu-bundle/NAME.gz (once) into $TMPDIR and run it.
# The bundled binaries link everything statically except the C library, the CUDA driver and cuBLAS;
# cuBLAS is found through the rpath /usr/local/cuda/lib64, else by searching the usual places (a
# CUDA toolkit elsewhere, or pip's nvidia-cublas wheel) and adding it to LD_LIBRARY_PATH.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ $# -ge 1 ] || { echo "usage: $0 {gpu_parity|bench_gpu|kvsim} [args...]" >&2; exit 2; }
name=$1
shift
[ -f "$here/$name.gz" ] || { echo "run.sh: no $here/$name.gz (run make gpu-bundle)" >&2; exit 2; }
dir=${TMPDIR:-/tmp}/kvsim-gpu-bundle
mkdir -p "$dir"
if [ ! -x "$dir/$name" ] || [ "$here/$name.gz" -nt "$dir/$name" ]; then
    gunzip -c "$here/$name.gz" >"$dir/$name.tmp"
    chmod +x "$dir/$name.tmp"
    mv "$dir/$name.tmp" "$dir/$name"
fi
if ldd "$dir/$name" 2>/dev/null | grep -q 'libcublas.*not found'; then
    lib=$(find /usr/local /usr/lib /opt /root /home -name 'libcublas.so.13' 2>/dev/null | head -n 1 || true)
    if [ -n "$lib" ]; then
        export LD_LIBRARY_PATH="$(dirname "$lib")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "run.sh: cuBLAS from $(dirname "$lib")" >&2
    else
        echo "run.sh: libcublas.so.13 not found on this machine; $name will not start" >&2
    fi
fi
exec "$dir/$name" "$@"
