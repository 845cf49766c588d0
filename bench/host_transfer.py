"""How fast captures leave the GPU: one gemma-7b sketched capture's worth of float64 (336 points x
512 positions x 65 values, 89 MB) to the host, through pageable and through page-locked memory,
in torch and in JAX (the fastest of 5 each). `python bench/host_transfer.py` on a GPU machine."""

import time

import numpy as np
import torch

SHAPE = (336, 512, 65)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run


def fastest(fn, make, reps=5):
    """fn(make()) timed, the fastest of reps; each rep gets fresh arrays (JAX keeps the host copy
    of an array it has once fetched)."""
    fn(make())
    best = float("inf")
    for _ in range(reps):
        x = make()
        t = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - t)
    return best


def main():
    def tensor():
        return torch.ones(SHAPE, dtype=torch.float64, device=DEVICE)

    rows = {
        "torch .cpu() (pageable)": fastest(lambda x: x.cpu().numpy(), tensor),
        "torch into pinned": fastest(
            lambda x: torch.empty(SHAPE, dtype=x.dtype, pin_memory=DEVICE == "cuda").copy_(x).numpy(), tensor),
    }
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)

    def pinned(x):
        return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))

    def array():
        return jnp.ones(SHAPE, jnp.float64).block_until_ready()

    def arrays():
        return [a.block_until_ready() for a in jnp.ones(SHAPE, jnp.float64)]

    rows["jax device_get (pageable)"] = fastest(lambda x: np.asarray(jax.device_get(x)), array)
    rows["jax via pinned_host"] = fastest(lambda x: np.asarray(jax.device_get(pinned(x))), array)
    rows[f"jax {SHAPE[0]} arrays, pageable"] = fastest(lambda xs: jax.device_get(xs), arrays)
    rows[f"jax {SHAPE[0]} arrays, pinned_host"] = fastest(lambda xs: jax.device_get([pinned(x) for x in xs]), arrays)
    mb = np.prod(SHAPE) * 8 / 1e6
    for name, s in rows.items():
        print(f"{name:32s} {s * 1e3:8.1f} ms  {mb / 1e3 / s:6.1f} GB/s")


if __name__ == "__main__":
    main()
