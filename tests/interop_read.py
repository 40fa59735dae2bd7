"""interop_read.py: read a kvsim trace with h5py + hdf5plugin only, for tests/test_capture_interop.c.

usage: python3 interop_read.py TRACE.h5 OUTDIR

Checks that every tensor dataset carries the zstd filter (id 32015) and that hdf5plugin provides it,
then writes every layer's tensors as raw little-endian float32 (OUTDIR/<layer>_<name>.f32; f16 data
widened exactly with numpy), the tokens as int32 (OUTDIR/tokens.i32) and a few attributes as
`key=value` lines (OUTDIR/meta.txt). The C side compares them with its own reader, bit for bit.
"""
import os
import sys

import h5py
import hdf5plugin  # noqa: F401  (importing it registers its filters, zstd among them)
import numpy as np

ZSTD = 32015


def main():
    path, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    if not h5py.h5z.filter_avail(ZSTD):
        sys.exit("hdf5plugin did not register the zstd filter")
    with h5py.File(path, "r") as f:
        attrs = f.attrs
        n_layers = int(attrs["n_layers"])
        meta = {
            "format": attrs["format"],
            "n_layers": n_layers,
            "n_tokens": int(attrs["n_tokens"]),
            "n_prompt": int(attrs["n_prompt"]),
            "dtype": attrs["dtype"],
            "model_sha256": attrs["model_sha256"],
        }
        for layer in range(n_layers):
            group = f["layers/%d" % layer]
            for name in sorted(group.keys()):
                d = group[name]
                plist = d.id.get_create_plist()
                ids = [plist.get_filter(i)[0] for i in range(plist.get_nfilters())]
                if ZSTD not in ids:
                    sys.exit("layers/%d/%s has filters %s, no zstd" % (layer, name, ids))
                if layer == 0:
                    meta["%s_dtype" % name] = str(d.dtype)
                    meta["%s_shape" % name] = "x".join(str(s) for s in d.shape)
                d[()].astype("<f4").tofile(os.path.join(out, "%d_%s.f32" % (layer, name)))
        f["tokens"][()].astype("<i4").tofile(os.path.join(out, "tokens.i32"))
    with open(os.path.join(out, "meta.txt"), "w") as m:
        for k, v in meta.items():
            m.write("%s=%s\n" % (k, v.decode() if isinstance(v, bytes) else v))
    print("ok")


if __name__ == "__main__":
    main()
