from llmdiff.check import ALL_FAMILIES, Check


class NormEpsWrong(Check):
    """## What it finds
    RMSNorm computed with another epsilon than the config's `rms_norm_eps`: a port that
    hard-codes 1e-5 (Llama's) for a model trained with 1e-6 (Qwen2.5 small models, Qwen3,
    Gemma), or the reverse.

    ## Why it matters
    Epsilon is added to the mean square before the square root: for activations of small norm
    (late layers, some heads of q/k norms) the output scale changes. Small in one layer, it
    compounds over a deep model.

    ## How it is confirmed
    Dynamic: the first divergent point is a norm (`L0.attn_norm` in float32); re-running the
    oracle with `norm_eps` set to the port's value (1e-5 or 1e-6) brings it back to the noise floor.

    ## Fix
    Read `rms_norm_eps` from the config for every norm (q/k norms too) instead of a constant.

    ## References
    huggingface/transformers `LlamaRMSNorm(eps=config.rms_norm_eps)`;
    Qwen/Qwen2.5-0.5B config.json (`rms_norm_eps: 1e-06`).
    """

    code = "LD208"
    name = "norm-eps-wrong"
    families = ALL_FAMILIES
    knob = ("norm_eps", 1e-5)
    also = ({"norm_eps": 1e-6},)
    dtypes = ("float32",)  # a relative change of about eps: below bfloat16's rounding
