from llmdiff.check import ALL_FAMILIES, Check


class RopeAnglesInComputeDtype(Check):
    """## What it finds
    RoPE angles (position / timescale, and their sin and cos) are computed in the low-precision
    compute dtype instead of float32.

    ## Why it matters
    bfloat16 keeps 8 significant bits: position 95 times a frequency is off by up to ~0.2
    radians, so queries and keys are rotated to the wrong positions, worst at long contexts.
    `model.to(torch.bfloat16)` casts the `inv_freq` buffer, where `from_pretrained(dtype=...)`
    keeps it in float32.

    ## How it is confirmed
    Dynamic, bfloat16 only: the first divergent point is `L0.q` / `L0.k` (v still agrees);
    re-running the oracle with `rope_dtype="compute"` (or `"table_compute"`, with HF's
    `inv_freq` form) brings them back to the noise floor.

    ## Fix
    Keep `inv_freq` and the angle computation in float32 (`position_ids.float() @
    inv_freq.float()`), cast cos and sin at the end; load with `from_pretrained(dtype=...)`
    rather than `.to(dtype)` afterwards.

    ## References
    huggingface/transformers 4.38.2 release notes (RoPE in float32 for Gemma);
    google-deepmind/gemma `gm/math/_positional_embeddings.py`.
    """

    code = "LD401"
    name = "rope-angles-in-compute-dtype"
    families = ALL_FAMILIES
    knob = ("rope_dtype", "compute")
    dtypes = ("bfloat16",)

    def variants(self):
        # Angles wholly in bfloat16 (divided, or multiplied by `inv_freq` as HF writes it); or a
        # bfloat16 `inv_freq` (HF after `.to(bfloat16)`) multiplied in float32; or a bfloat16
        # timescale divided in float32.
        return [{"rope_dtype": "compute"},
                {"rope_dtype": "compute", "rope_form": "mul_reciprocal"},
                {"rope_dtype": "table_compute", "rope_form": "mul_reciprocal"},
                {"rope_dtype": "table_compute"}]
