"""What sketching 16-bit values in float32 instead of float64 costs in accuracy (`sketch.arithmetic`).

    python bench/sketch_float32.py

For bfloat16 vectors of gemma-7b's widths (hidden 3072, MLP 24576, vocabulary 256000), 256
positions each, on the CPU: the sketched relative L2 between identical values sketched by two
float32 products (torch's and JAX's: a false distance that float64 puts at ~1e-16), and that of
a real distance at the smallest floor a bfloat16 point is judged by (`diff.MIN_FLOOR` x 2^-8),
float32 against float64.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    import jax
    import jax.numpy as jnp
    import torch

    from llmdiff import diff, sketch

    jax.config.update("jax_enable_x64", True)
    smallest = diff.MIN_FLOOR * diff.UNIT_ROUNDOFF["bfloat16"]
    rng = np.random.default_rng(0)
    print(f"| values a vector | identical values, torch f32 vs JAX f32 sketch | share of the smallest bfloat16 floor "
          f"({smallest:.2g}) | a {smallest:.2g} distance, f64 sketch | the same, f32 sketches | off by |")
    print("|---|---|---|---|---|---|")
    for n in (3072, 24576, 256000):
        R = sketch.projection(n)
        x = torch.from_numpy(rng.standard_normal((256, n)).astype(np.float32) * 3).to(torch.bfloat16)
        d = torch.from_numpy(rng.standard_normal((256, n)))
        y = (x.double() + d * (x.double().norm() / d.norm()) * smallest).float()

        def f64(v):
            v = v.double()
            return torch.cat([v @ torch.from_numpy(R), (v * v).sum(-1, keepdim=True)], -1).numpy()

        def f32_torch(v):
            v = v.float()
            return torch.cat([v @ torch.from_numpy(R).float(), (v * v).sum(-1, keepdim=True)], -1).double().numpy()

        def f32_jax(v):
            v = jnp.asarray(v.float().numpy())
            return np.asarray(jnp.concatenate([v @ jnp.asarray(R, jnp.float32), jnp.sum(v * v, -1, keepdims=True)], -1),
                              np.float64)

        def rel(a, b):
            return diff.point_metrics(sketch.Sketch(a[None]), sketch.Sketch(b[None]))["rel_l2"]

        same = rel(f32_torch(x), f32_jax(x))
        exact, single = rel(f64(y), f64(x)), rel(f32_torch(y), f32_jax(x))
        print(f"| {n} | {same:.2e} | {same / smallest:.2%} | {exact:.5e} | {single:.5e} | {abs(single / exact - 1):.3%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
