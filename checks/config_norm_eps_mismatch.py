from llmdiff.check import Check


class ConfigNormEpsMismatch(Check):
    """## What it finds
    config.json's `rms_norm_eps` (or transformers' default when absent) differs from the
    model's RMSNorm epsilon.

    ## Why it matters
    Epsilon sits inside `rsqrt(mean(x^2) + eps)`: a 1e-5 where the model was trained with 1e-6
    changes every norm a little, most where activations are small (q/k norms of Gemma 3). No
    error, slightly worse outputs; converters copying Llama's 1e-5 do this.

    ## How it is confirmed
    Static: config.json against the spec's `norm_eps` (relative tolerance 1e-6).

    ## Fix
    Set `rms_norm_eps` to the spec's value (1e-6 for every Gemma).

    ## References
    google-deepmind/gemma `gm/nn/_layers.py` (`RMSNorm`, epsilon 1e-6); HF Gemma configs.
    """

    code = "LD706"
    name = "config-norm-eps-mismatch"
    target = "checkpoint"

    def run(self, ctx):
        import math

        from llmdiff.audit import config_value, shown

        if ctx.spec is None:
            return
        value, present = config_value(ctx, "rms_norm_eps")
        if not isinstance(value, (int, float)) or not math.isclose(value, ctx.spec.norm_eps, rel_tol=1e-6):
            yield self.finding(ctx, "config.json:rms_norm_eps", f"rms_norm_eps is {shown(value, present)}"
                               f" but {ctx.spec.name} uses {ctx.spec.norm_eps!r}",
                               {"config": value, "spec": ctx.spec.norm_eps, "present": present})
