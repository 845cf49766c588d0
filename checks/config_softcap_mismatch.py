import math

from llmdiff.check import ConfigCheck


class ConfigSoftcapMismatch(ConfigCheck):
    """## What it finds
    Attention-logit or final-logit soft-capping (`attn_logit_softcapping`,
    `final_logit_softcapping`) that differs from the model's: missing where Gemma 2 caps
    (50 and 30), present where Gemma 3 has none, or another cap.

    ## Why it matters
    Gemma 2 was trained with `cap * tanh(x / cap)` on attention scores and on the output
    logits. Without it large logits are not squashed: outputs shift, most on confident
    tokens; flash-attention paths that cannot soft-cap silently drop it. Gemma 3 replaced
    soft-capping with q/k norms, so a cap copied from a Gemma 2 config distorts it.

    ## How it is confirmed
    Static: config.json (absent fields take transformers' defaults: 50/30 for Gemma 2, none
    for Gemma 3) against the spec's `attn_softcap` and `final_softcap`.

    ## Fix
    Gemma 2: `attn_logit_softcapping: 50.0`, `final_logit_softcapping: 30.0`; Gemma 3: null.

    ## References
    Gemma 2 report (arXiv:2408.00118, section 2.2, "Logit soft-capping").
    """

    code = "LD709"
    name = "config-softcap-mismatch"
    families = ("gemma2", "gemma3")

    def check(self, ctx, spec):
        for key, want in (("attn_logit_softcapping", spec.attn_softcap),
                          ("final_logit_softcapping", spec.final_softcap)):
            value, present = self.value(ctx, key)
            if value is None or want is None:
                same = value is None and want is None
            else:
                same = math.isclose(float(value), want)
            if not same:
                yield self.differs(ctx, key, value, present, want)
