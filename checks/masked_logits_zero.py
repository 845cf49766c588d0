from llmdiff.check import ALL_FAMILIES, Check


class MaskedLogitsZero(Check):
    """## What it finds
    Masked attention logits are set to 0 instead of minus infinity (or the dtype's lowest value)
    before the softmax.

    ## Why it matters
    A port that multiplies the attention scores by a 0/1 mask, or fills masked positions with 0,
    gives every masked key the weight exp(0 - max) instead of none: future tokens (causal mask)
    and keys outside the window (sliding layers) leak into each position, a little where the
    logits are large and a lot where they are near 0. Nothing crashes; perplexity drifts.

    ## How it is confirmed
    Dynamic: the first divergent point is an `attn_out`; re-running the oracle with
    `mask_fill="zero"` (on every layer, or on the layers of one kind only, where a port builds
    one kind of mask its own way) brings it back to the noise floor.

    ## Fix
    Add the mask as 0 / -inf (`torch.finfo(dtype).min`) to the logits, or use
    `logits.masked_fill(~mask, torch.finfo(dtype).min)`; never `logits * mask`.

    ## References
    huggingface/transformers `masking_utils` (`_preprocess_mask_arguments`, eager masks are
    `torch.finfo(dtype).min` where masked); google-deepmind/gemma `gm/nn/_modules.py`
    (`K_MASK = -2.3819763e38`).
    """

    code = "LD509"
    name = "masked-logits-zero"
    families = ALL_FAMILIES
    knob = ("mask_fill", "zero")
