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


def _fill_rate(nbytes: int) -> float:
    """GB/s of a plain fill of fresh memory: what first touching it costs on this host."""
    t = time.perf_counter()
    a = np.empty(nbytes // 4, np.float32)
    a.fill(1)
    return a.nbytes / (time.perf_counter() - t) / 1e9


def main(model="gemma-7b", layers=1):
    spec = get_spec(model)
    shapes = convert.canonical_shapes(spec)
    names = [n for n in shapes if n == "embed" or any(n.startswith(f"L{i}.") for i in range(int(layers)))]
    total = sum(int(np.prod(shapes[n])) for n in names)
    # As `random_weights` makes them: every tensor kept, so each lands in fresh memory
    t = time.perf_counter()
    new = {n: weights.generate_numpy(spec, n, shapes[n]) for n in names}
    t_new = time.perf_counter() - t
    fill = _fill_rate(4 * total)
    probe = max((n for n in names if n != "embed"), key=lambda n: np.prod(shapes[n]))
    n_probe = int(np.prod(shapes[probe]))

    def alone(reps=5):
        """The generator alone: into memory the tensor freed just before (touched already)."""
        best = float("inf")
        for _ in range(reps):
            new.pop(probe)
            t = time.perf_counter()
            new[probe] = weights.generate_numpy(spec, probe, shapes[probe])
            best = min(best, time.perf_counter() - t)
        return best

    best = alone()
    t = time.perf_counter()
    old = old_form(spec, probe, shapes[probe])
    t_old = time.perf_counter() - t
    assert np.array_equal(old, new[probe]), "the threaded generator changed the bits"
    print(f"{model}: {len(names)} tensors, {total / 1e9:.2f}e9 values, {os.cpu_count()} cores")
    print(f"kept, fresh memory: {total / t_new / 1e6:.0f} M values/s = {4 * total / t_new / 1e9:.2f} GB/s of float32 "
          f"({t_new:.1f} s); a plain fill of as much fresh memory: {fill:.2f} GB/s")
    print(f"the generator alone ({probe}, memory touched before, best of 5): {n_probe / best / 1e6:.0f} M values/s "
          f"= {4 * n_probe / best / 1e9:.2f} GB/s")
    print(f"old ({probe} alone): {n_probe / t_old / 1e6:.1f} M values/s; same bits: yes")
    whole = sum(int(np.prod(s)) for s in shapes.values())
    print(f"whole model ({whole / 1e9:.2f}e9 values) at the kept rate: {whole / (total / t_new):.0f} s")
    # The step of each thread, fixed here (`weights._HOST_BLOCK` times the threads, at most
    # `_HOST_STEP_MAX`): the cache against the GIL
    if not hasattr(weights, "_HOST_STEP_MAX"):   # an older llmdiff (a comparison)
        return
    default = weights._HOST_BLOCK, weights._HOST_STEP_MAX
    for log2 in range(15, 22):
        weights._HOST_BLOCK, weights._HOST_STEP_MAX = 1 << log2, 1 << log2
        best = alone()
        assert np.array_equal(old, new[probe])
        print(f"  steps of 2**{log2}: {4 * n_probe / best / 1e9:.2f} GB/s")
    weights._HOST_BLOCK, weights._HOST_STEP_MAX = default


if __name__ == "__main__":
    main(*sys.argv[1:])
