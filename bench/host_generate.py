"""Host generation of full-size random weights (the fallback for adapters that cannot make
them on their device): values per second and float32 GB/s, the threaded uint32 generator
against the int64 form it replaced (the same bits, checked here).

    python bench/host_generate.py [MODEL] [LAYERS]
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from llmdiff import convert, weights
from llmdiff.spec import get_spec


def old_form(spec, name, shape, seed=0):
    """The int64 generator as it was (one thread, `_odd_uniform` over CHUNK steps)."""
    size = int(np.prod(shape))
    key, c = weights._key(seed, name), weights._unit(spec, name)
    out = np.empty(size, np.float32)
    for lo in range(0, size, weights.CHUNK):
        idx = np.arange(lo, min(size, lo + weights.CHUNK), dtype=np.int64)
        out[lo:lo + len(idx)] = weights._odd_uniform(idx, key).astype(np.float32) * c
    return weights.to_bf16_values(out).reshape(shape)


def main(model="gemma-7b", layers=1):
    spec = get_spec(model)
    shapes = convert.canonical_shapes(spec)
    names = [n for n in shapes if n == "embed" or any(n.startswith(f"L{i}.") for i in range(int(layers)))]
    total = sum(int(np.prod(shapes[n])) for n in names)
    t = time.perf_counter()
    new = {n: weights.generate_numpy(spec, n, shapes[n]) for n in names}
    t_new = time.perf_counter() - t
    probe = max((n for n in names if n != "embed"), key=lambda n: np.prod(shapes[n]))
    t = time.perf_counter()
    old = old_form(spec, probe, shapes[probe])
    t_old = time.perf_counter() - t
    assert np.array_equal(old, new[probe]), "the threaded generator changed the bits"
    n_probe = int(np.prod(shapes[probe]))
    print(f"{model}: {len(names)} tensors, {total / 1e9:.2f}e9 values, {os.cpu_count()} cores")
    print(f"new: {total / t_new / 1e6:.0f} M values/s = {4 * total / t_new / 1e9:.2f} GB/s of float32 ({t_new:.1f} s)")
    print(f"old ({probe} alone): {n_probe / t_old / 1e6:.1f} M values/s; same bits: yes")
    whole = sum(int(np.prod(s)) for s in shapes.values())
    print(f"whole model ({whole / 1e9:.2f}e9 values) at the new rate: {whole / (total / t_new):.0f} s")


if __name__ == "__main__":
    main(*sys.argv[1:])
