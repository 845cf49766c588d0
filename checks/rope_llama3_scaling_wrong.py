from llmdiff.check import Check


class RopeLlama3ScalingWrong(Check):
    """## What it finds
    Llama 3's RoPE frequency scaling (`rope_type: "llama3"`) left out, or applied as plain
    linear scaling: every frequency divided by the factor instead of only the low-frequency band,
    with the smooth blend between the band edges.

    ## Why it matters
    Llama 3.1 and 3.2 were trained with the scaled frequencies: without them attention sees
    positions as further apart than in training once a prompt nears the original 8192-token
    context (and every position is off in the medium band); with every frequency divided, nearby
    tokens blur together. Outputs degrade with length, no error is raised.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` / `k` (where RoPE acts); re-running the
    oracle with `rope_scaling=False` (scaling missing) or `llama3_bands=False` (every frequency
    divided by the factor) brings it back to the noise floor.

    ## Fix
    Keep the config's `rope_scaling` with `rope_type: "llama3"`, `factor`, `low_freq_factor`,
    `high_freq_factor` and `original_max_position_embeddings`, and apply Meta's `apply_scaling`:
    wavelengths under original/high_freq_factor unchanged, over original/low_freq_factor divided
    by the factor, a linear blend in between.

    ## References
    meta-llama/llama-models `models/llama3/reference_impl/model.py` (`apply_scaling`);
    ggml-org/llama.cpp PR 8676 (Llama 3.1 RoPE scaling); huggingface/transformers
    `modeling_rope_utils._compute_llama3_parameters`.
    """

    code = "LD406"
    name = "rope-llama3-scaling-wrong"
    families = ("llama",)
    knob = ("rope_scaling", False)
    also = ({"rope_scaling": True, "llama3_bands": False},)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.rope_llama3 is not None
