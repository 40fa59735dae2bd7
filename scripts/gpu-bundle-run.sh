#!/bin/sh
# gpu-bundle-run.sh (installed as build/gpu-bundle/run.sh by `make gpu-bundle`):
#   run.sh [--sanitizer TOOL | --under 'CMD ARGS'] NAME [ARGS...]
# unpacks build/gpu-bundle/NAME.gz (once) into $TMPDIR and runs it; with --sanitizer, under
# `compute-sanitizer --tool TOOL` (memcheck, racecheck, synccheck or initcheck), which then exits 3
# when it reports an error (memcheck also reports device memory leaks at exit); with --under, as the
# last argument of CMD ARGS (split at spaces, e.g. an ncu command line).
# The bundled binaries link everything statically except the C library, the CUDA driver and cuBLAS;
# cuBLAS is found through the rpath /usr/local/cuda/lib64, else by searching the usual places (a
# CUDA toolkit elsewhere, or pip's nvidia-cublas wheel) and adding it to LD_LIBRARY_PATH (this also
# holds under the sanitizer, which runs the program as its child).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: $0 [--sanitizer memcheck|racecheck|synccheck|initcheck | --under 'CMD ARGS']
       {gpu_parity|bench_gpu|kvsim} [args...]"
tool=
under=
if [ "${1:-}" = --sanitizer ] || [ "${1:-}" = --under ]; then
    [ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
    if [ "$1" = --sanitizer ]; then
        case $2 in
        memcheck | racecheck | synccheck | initcheck) tool=$2 ;;
        *) echo "run.sh: --sanitizer $2: use memcheck, racecheck, synccheck or initcheck" >&2; exit 2 ;;
        esac
    else
        under=$2
    fi
    shift 2
fi
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
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
if [ -n "$under" ]; then
    echo "run.sh: $under $name $*" >&2
    exec $under "$dir/$name" "$@" # split at spaces on purpose
fi
[ -n "$tool" ] || exec "$dir/$name" "$@"
# compute-sanitizer ships with the CUDA toolkit: on the PATH, in the toolkit's bin/ (a link) or its
# compute-sanitizer/ folder, or under /opt/nvidia; where the image puts it was not recorded.
cs=$(command -v compute-sanitizer 2>/dev/null || true)
if [ -z "$cs" ]; then
    for c in /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
        if [ -x "$c" ]; then
            cs=$c
            break
        fi
    done
fi
[ -n "$cs" ] || cs=$(find /usr/local /opt -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1 || true)
[ -n "$cs" ] || { echo "run.sh: compute-sanitizer not found (PATH, /usr/local, /opt)" >&2; exit 2; }
echo "run.sh: $cs --tool $tool $name $*" >&2
if [ "$tool" = memcheck ]; then
    exec "$cs" --tool memcheck --leak-check full --error-exitcode 3 --print-limit 20 "$dir/$name" "$@"
fi
exec "$cs" --tool "$tool" --error-exitcode 3 --print-limit 20 "$dir/$name" "$@"
