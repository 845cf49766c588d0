"""Adapter for llmdiff's own JAX oracle (`references/gemma.py`)."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

# XLA may keep a value in float32 where the program rounds it to bfloat16 and converts it
# back ("excess precision"); then the oracle's bfloat16 run would not round where every
# bfloat16 implementation rounds (measured: 26% of L0.attn_norm off by one bf16 ulp).
# Read when the backend starts, so it must be set before the first computation.
# Likewise LLVM contracts a multiply and an add across two canonical points into one fused
# multiply-add (measured: embed * scale + attn_out at L0.resid_mid, 445 of 2304 values one ulp
# off in float32); optimisation level 0 keeps each op's own rounding. CPU code generation only.
for flag in ("--xla_allow_excess_precision=false", "--xla_backend_optimization_level=0"):
    if flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()

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
        device = self.options.get("device", "auto")
        if device == "cpu" and jax.config.jax_platforms != "cpu":
            jax.config.update("jax_platforms", "cpu")  # before the first computation of this worker
        elif device == "cuda" and jax.default_backend() != "gpu":
            raise RuntimeError("--device cuda: jax sees no GPU here (install jax with CUDA support)")
        self.device = jax.default_backend()
        # On GPUs JAX multiplies float32 matrices in TF32 by default (10 mantissa bits): the
        # float32 oracle would be a TF32 one (measured on an H200: fp32 logits 7.9e-4 from HF
        # instead of ~1e-6 on CPU). The oracle computes what float32 means.
        jax.config.update("jax_default_matmul_precision", "highest")
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
        # Teacher forcing: another implementation's captures feed every op (see gemma.Tape).
        forced_from = self.options.get("forced_from")
        self._forced = None
        if forced_from:
            self._forced = {n: np.asarray(a) for n, a in safetensors_file.load(forced_from).items()}
        self._offset = 0  # where the next prompt starts in the forced captures (prompts are concatenated)

    def run(self, tokens):
        import jax.numpy as jnp

        forced = None
        if self._forced is not None:
            lo, hi = self._offset, self._offset + len(tokens)
            forced = {n: jnp.asarray(a[:, lo:hi]) for n, a in self._forced.items()}
            self._offset = hi
        cap = self._forward(self.params, jnp.asarray([tokens], jnp.int32), self.spec, self.precision, forced)
        return {k: np.asarray(v.astype(jnp.float64 if v.dtype == jnp.float64 else jnp.float32))
                for k, v in cap.items()}

    def describe(self):
        return {**dataclasses.asdict(self.precision), "device": self.device}
