import math

from llmdiff.check import ConfigCheck
from llmdiff.hf_format import is_number


class ConfigNormEpsMismatch(ConfigCheck):
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

    def check(self, ctx, spec):
        value, present = self.value(ctx, "rms_norm_eps")
        if not (is_number(value) and math.isclose(value, spec.norm_eps, rel_tol=1e-6)):
            yield self.differs(ctx, "rms_norm_eps", value, present, spec.norm_eps)
