from llmdiff.check import Check


class AttnSoftcapMissing(Check):
    """## What it finds
    The attention logits are not soft-capped (`cap * tanh(logits / cap)`, cap 50 on Gemma 2).

    ## Why it matters
    Gemma 2 was trained with capped attention logits. Without the cap, large logits sharpen the
    attention distribution; outputs change at every layer. Attention kernels that cannot express
    the cap (SDPA, older flash-attention) silently skip it.

    ## How it is confirmed
    Dynamic: the first divergent point is a layer's `attn_out` (q, k, v still agree); re-running
    the oracle with `attn_softcap=False` brings the candidate back to the noise floor.

    ## Fix
    Use an attention path that applies the soft-cap before the mask (HF: `attn_implementation=
    "eager"` for Gemma 2), and keep `attn_logit_softcapping=50.0` in the config.

    ## References
    google-deepmind/gemma `gm/nn/_modules.py` (`attn_logits_soft_cap`); the Gemma 2 report
    (arXiv:2408.00118) section 2; huggingface/transformers Gemma 2 eager-attention warning.
    """

    code = "LD501"
    name = "attn-softcap-missing"
    families = ("gemma2",)
    knob = ("attn_softcap", False)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and bool(spec.attn_softcap)
