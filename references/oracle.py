"""Adapter for llmdiff's own JAX oracle (`references/gemma.py`)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

# XLA may keep a value in float32 where the program rounds it to bfloat16 and converts it
# back ("excess precision"); then the oracle's bfloat16 run would not round where every
# bfloat16 implementation rounds (measured: 26% of L0.attn_norm off by one bf16 ulp).
# Read when the backend starts, so it must be set before the first computation.
if "--xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

from llmdiff.references.base import Reference


class OracleReference(Reference):
    name = "oracle"
    dtypes = ("float32", "bfloat16", "float64")

    def versions(self):
        import jax

        return {"jax": jax.__version__}

    def load(self, dtype, constants_dtype=None):
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        from llmdiff import convert, safetensors_file
        from llmdiff.references import gemma
        from llmdiff.spec import ModelSpec

        self.spec = ModelSpec.from_dict(self.job["spec"])
        knobs = dict(self.options.get("precision", {}))
        if constants_dtype:
            knobs["constants_dtype"] = constants_dtype
        self.precision = gemma.Precision(**knobs)
        canon = safetensors_file.load(self.job["weights"]["canonical"])
        flat = convert.to_deepmind(self.spec, canon)
        self.params = jax.tree_util.tree_map(
            lambda a: jnp.asarray(np.asarray(a), dtype=dtype), convert.unflatten(flat))
        self._forward = gemma.forward_jit

    def run(self, tokens):
        import jax.numpy as jnp

        cap = self._forward(self.params, jnp.asarray([tokens], jnp.int32), self.spec, self.precision)
        return {k: np.asarray(v.astype(jnp.float64 if v.dtype == jnp.float64 else jnp.float32))
                for k, v in cap.items()}

    def describe(self):
        return dataclasses.asdict(self.precision)
