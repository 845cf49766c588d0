from llmdiff.check import Check


class NormScaleInComputeDtype(Check):
    """## What it finds
    RMSNorm rounds the normalised activations to the compute dtype and multiplies by (1 + w) in
    that dtype, instead of doing the whole `x * rsqrt(mean(x^2) + eps) * (1 + w)` in float32 and
    rounding once.

    ## Why it matters
    In bfloat16, 1 + w loses the low bits of w (w near 0 has far more precision than 1 + w), and
    the extra rounding adds error at every norm of every layer. Invisible in float32.

    ## How it is confirmed
    Dynamic, bfloat16 only: the first norm (`L0.attn_norm`) stops being exact; re-running the
    oracle with `norm_scale="compute"` makes it exact again.

    ## Fix
    Compute in float32 and cast at the end: `out = norm(x.float()) * (1.0 + w.float());
    return out.type_as(x)`.

    ## References
    huggingface/transformers PR #29402 ("Llama does x.to(float16) * w whilst Gemma is
    (x * w).to(float16)"); Keras-NLP's Gemma RMSNorm.
    """

    code = "LD201"
    name = "norm-scale-in-compute-dtype"
    knob = ("norm_scale", "compute")
    dtypes = ("bfloat16",)
