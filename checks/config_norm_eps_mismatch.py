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
    error, slightly worse outputs; converters copying Llama's 1e-5 do this, and a Llama 3 or
    Mistral config that leaves the field out gets transformers' 1e-6 instead of its 1e-5.

    ## How it is confirmed
    Static: config.json against the spec's `norm_eps` (relative tolerance 1e-6).

    ## Fix
    Set `rms_norm_eps` to the spec's value: 1e-6 for every Gemma, Qwen 3 and Qwen 2.5 up to
    7B; 1e-5 for Llama 3, Mistral 7B and Qwen 2.5 from 14B. Absent, transformers uses 1e-6
    for every one of these families.

    ## References
    google-deepmind/gemma `gm/nn/_layers.py` (`RMSNorm`, epsilon 1e-6); HF Gemma configs;
    meta-llama/Llama-3.1-8B, mistralai/Mistral-7B-v0.1 and Qwen/Qwen2.5-14B config.json
    (`rms_norm_eps: 1e-05`); `LlamaConfig` (default 1e-6).
    """

    code = "LD706"
    name = "config-norm-eps-mismatch"

    def check(self, ctx, spec):
        value, present = self.value(ctx, "rms_norm_eps")
        if not (is_number(value) and math.isclose(value, spec.norm_eps, rel_tol=1e-6)):
            yield self.differs(ctx, "rms_norm_eps", value, present, spec.norm_eps)
