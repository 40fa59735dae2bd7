#!/bin/sh
# install-deps.sh: make sure the Debian packages kvsim builds against are present.
# Installs what is missing when it may (root with apt-get); otherwise prints the exact command to
# run and fails. Called by the Makefile before the first build, and by .ci/run.
set -u
PKGS="pkg-config libhdf5-dev libzstd-dev libcairo2-dev check libsubunit-dev libopenblas-dev libssl-dev libjson-c-dev libpcre2-dev libicu-dev"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
# Optional: OpenMPI, for `mpirun -n N kvsim sweep` (without it kvsim builds and sweeps in one process,
# or as Slurm array tasks). Installed with the rest when we may install; otherwise only mentioned.
OPTIONAL="libopenmpi-dev openmpi-bin"
opt_missing=""
for p in $OPTIONAL; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || opt_missing="$opt_missing $p"
done
if [ -n "$opt_missing" ] && [ -n "${KVSIM_NO_MPI:-}" ]; then
    opt_missing=""
fi
if [ -z "$missing" ] && [ -n "$opt_missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "kvsim: installing optional Debian packages (MPI sweeps):$opt_missing" >&2
        export DEBIAN_FRONTEND=noninteractive
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends $opt_missing; } >&2 ||
            echo "kvsim: optional packages not installed; kvsim builds without MPI" >&2
    else
        echo "kvsim: optional: sudo apt-get install -y$opt_missing (MPI sweeps; KVSIM_NO_MPI=1 silences this)" >&2
    fi
    exit 0
fi
[ -z "$missing" ] && exit 0
missing="$missing$opt_missing"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "kvsim: installing missing Debian packages:$missing" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 && apt-get install -y -qq --no-install-recommends $missing >&2 && exit 0
    echo "kvsim: apt-get failed; install by hand: apt-get install -y$missing" >&2
    exit 1
fi
echo "kvsim: missing Debian packages:$missing" >&2
echo "kvsim: run:  sudo apt-get install -y$missing" >&2
exit 1
