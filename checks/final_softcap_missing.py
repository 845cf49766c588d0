from llmdiff.check import Check


class FinalSoftcapMissing(Check):
    """## What it finds
    The output logits are not soft-capped (`cap * tanh(logits / cap)`, cap 30 on Gemma 2).

    ## Why it matters
    Without the cap the logits' scale changes: sampling temperature, top-p and log-probabilities
    all shift, although greedy decoding often still agrees, so the bug hides in quick tests.

    ## How it is confirmed
    Dynamic: everything up to `final_norm` agrees and `logits` diverge; re-running the oracle with
    `final_softcap=False` brings them back to the noise floor.

    ## Fix
    Apply `final_logit_softcapping` (30.0) after the output projection, in float32.

    ## References
    google-deepmind/gemma `gm/nn/_transformer.py` (`final_logit_softcap`); the Gemma 2 report.
    """

    code = "LD601"
    name = "final-softcap-missing"
    families = ("gemma2",)
    knob = ("final_softcap", False)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and bool(spec.final_softcap)
