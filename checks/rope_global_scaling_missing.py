from llmdiff.check import Check


class RopeGlobalScalingMissing(Check):
    """## What it finds
    Gemma 3's global layers rotate queries and keys without the linear RoPE scaling factor
    (positions / 8 on 4B, 12B and 27B), as if `rope_scaling` were absent from the config.

    ## Why it matters
    Global layers then see positions 8x further apart than in training: long-context quality
    collapses while short prompts look fine.

    ## How it is confirmed
    Dynamic: the first divergent point is the first global layer's `q` / `k` (local layers agree);
    re-running the oracle with `rope_scaling=False` brings them back to the noise floor.

    ## Fix
    Keep `rope_scaling={"rope_type": "linear", "factor": 8.0}` for the global (full-attention)
    layers and none for the local ones (`rope_local_base_freq` 10000).

    ## References
    google-deepmind/gemma `gm/nn/_gemma.py` (`global_scale_factor`);
    huggingface/transformers `Gemma3TextConfig.rope_scaling`.
    """

    code = "LD404"
    name = "rope-global-scaling-missing"
    families = ("gemma3",)
    knob = ("rope_scaling", False)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.rope_scale != 1.0
