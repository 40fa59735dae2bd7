"""trace_diff.py: compare two kvsim traces dataset by dataset, byte for byte.

usage: python3 scripts/trace_diff.py A.h5 B.h5

Reads every dataset of both files (h5py, with hdf5plugin for kvsim's zstd filter 32015) and prints
one line per dataset that differs (its shape, how many elements differ and the largest absolute
difference), then "<n> datasets, <k> differ" and the root attributes whose values differ (the
creation date, the git revision and the command line always do). Exit status 0 when every dataset
is identical, 1 otherwise (2 when the files do not hold the same datasets).
"""
import sys

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter)
import numpy as np


def datasets(f):
    names = []
    f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return sorted(names)


def main():
    a, b = h5py.File(sys.argv[1], "r"), h5py.File(sys.argv[2], "r")
    na, nb = datasets(a), datasets(b)
    if na != nb:
        print("the files hold different datasets:", sorted(set(na) ^ set(nb)))
        sys.exit(2)
    differ = 0
    for n in na:
        x, y = a[n][()], b[n][()]
        if x.shape == y.shape and x.tobytes() == y.tobytes():
            continue
        differ += 1
        if x.shape != y.shape:
            print(f"DIFF {n}: shapes {x.shape} and {y.shape}")
        elif x.dtype.kind == "f":
            d = np.abs(x.astype(np.float64) - y.astype(np.float64))
            print(f"DIFF {n} {x.shape}: {int((x != y).sum())} elements differ, max |diff| {np.nanmax(d):.3g}")
        else:
            print(f"DIFF {n} {x.shape}: {int((x != y).sum())} elements differ")
    print(f"{len(na)} datasets, {differ} differ")
    keys = sorted(set(a.attrs) | set(b.attrs))
    print("root attributes that differ:", [k for k in keys if str(a.attrs.get(k)) != str(b.attrs.get(k))])
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
