from llmdiff.check import Check


class LongropeFactorsWrongLength(Check):
    """## What it finds
    LongRoPE (Phi-3 128k, Phi-3.5 mini) picking its per-frequency factors by the wrong length:
    the long factors on a sequence no longer than the original context (4096 tokens), or the
    short factors past it. The model's own code picks by the sequence being run: the long list
    when it is longer than `original_max_position_embeddings`, else the short one.

    ## Why it matters
    The short factors are what the model saw for prompts within the original context, the long
    ones what it was extended with. A port that picks by the context it was configured for
    (a server started with a 16k or 128k context uses the long factors for every request), or
    that reads one list only, rotates every query and key by other angles than in training: no
    error, quality lost on every prompt of the wrong side of 4096 tokens.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `q` / `k` (where RoPE acts), on the prompts
    of one side of the original context only; re-running the oracle with
    `longrope_factors="long"` (long factors whatever the length) or `"short"` brings it back to
    the noise floor.

    ## Fix
    Choose per sequence, as Phi-3's `Phi3LongRoPEScaledRotaryEmbedding` and transformers'
    `longrope_frequency_update`: `long_factor` when the sequence (the largest position + 1) is
    longer than `original_max_position_embeddings`, else `short_factor`; not by the configured
    or maximum context.

    ## References
    microsoft/Phi-3-mini-128k-instruct `modeling_phi3.py` (`Phi3LongRoPEScaledRotaryEmbedding`);
    huggingface/transformers `modeling_rope_utils` (`_compute_longrope_parameters`,
    `dynamic_rope_update`); LongRoPE (arXiv:2402.13753); ggml-org/llama.cpp `rope_long`/`rope_short`
    chosen by `n_ctx_per_seq > n_ctx_orig_yarn`.
    """

    code = "LD407"
    name = "longrope-factors-wrong-length"
    families = ("phi3",)
    knob = ("longrope_factors", "long")
    also = ({"longrope_factors": "short"},)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and spec.rope_longrope is not None
