from llmdiff.check import ALL_FAMILIES, Check


class CausalMaskMissing(Check):
    """## What it finds
    Attention has no causal mask: every position also attends to the positions after it.

    ## Why it matters
    Prefill then leaks the future into every position, so logits of a prompt differ from those
    of incremental decoding; perplexity looks wonderful and generation is broken. It happens
    when a custom mask replaces the causal one instead of being combined with it, or an
    attention kernel is called with `is_causal=False`.

    ## How it is confirmed
    Dynamic: the first divergent point is layer 0's `attn_out`, at every position but the last;
    re-running the oracle with `causal=False` brings it back to the noise floor.

    ## Fix
    Combine padding or sliding masks with the causal mask (logical and), and pass
    `is_causal=True` (or an explicit lower-triangular mask) to the attention kernel.

    ## References
    huggingface/transformers `masking_utils.causal_mask_function`.
    """

    code = "LD505"
    name = "causal-mask-missing"
    families = ALL_FAMILIES
    knob = ("causal", False)
