from llmdiff.check import Check


class NormWithoutPlusOne(Check):
    """## What it finds
    RMSNorm multiplies by the stored scale w instead of (1 + w).

    ## Why it matters
    Gemma stores its norm scales centred on zero and applies `(1 + w)`; a Llama-style RMSNorm
    (`x * rsqrt(...) * w`) on Gemma weights shrinks every normalised activation towards zero.
    The model still runs and even produces text, badly.

    ## How it is confirmed
    Dynamic: the first divergent point is `L0.attn_norm` (the embedding agrees); re-running the
    oracle with `norm_plus_one=False` brings the candidate back to the noise floor.

    ## Fix
    Use Gemma's RMSNorm: `output * (1.0 + self.weight.float())`, or add 1 to every norm scale
    when converting the checkpoint to a Llama-style RMSNorm (and nowhere else).

    ## References
    google-deepmind/gemma `gm/nn/_layers.py` (`RMSNorm`); huggingface/transformers
    `GemmaRMSNorm`.
    """

    code = "LD202"
    name = "norm-without-plus-one"
    knob = ("norm_plus_one", False)
