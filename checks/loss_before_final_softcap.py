from llmdiff.grad_check import GradCheck


class LossBeforeFinalSoftcap(GradCheck):
    """## What it finds
    The training loss is computed from the output head's raw product, before the final logit
    soft-cap (`cap * tanh(logits / cap)`, 30 on Gemma 2) that the returned logits carry.

    ## Why it matters
    Training then optimises a model without the cap while inference runs with it: large logits
    are pushed beyond what the capped model can express, and the trained model's calibration
    differs from what the loss measured. The forward's logits are right, so inference tests pass.

    ## How it is confirmed
    Dynamic, `--grad` only: the implementation's own loss (`loss:batch`, `loss:ignore`,
    `loss:accumulated`) diverges while the forward (capped logits), the per-prompt loss and its
    gradients are at parity; re-running the oracle's loss on its logits before the soft-cap
    (`loss_softcap=False`) brings it back to the noise floor (`llmdiff/grad_check.py`).

    ## Fix
    Apply `final_logit_softcapping` before handing the logits to the loss function, on the
    same tensor the model returns.

    ## References
    `transformers` `Gemma2ForCausalLM.forward` (softcap, then `self.loss_function`);
    google-deepmind/gemma `gm/nn/_transformer.py` (`final_logit_softcap`).
    """

    code = "LD606"
    name = "loss-before-final-softcap"
    families = ("gemma2",)
    grad_knob = ("loss_softcap", False)

    def applies(self, spec, dtype=None):
        return super().applies(spec, dtype) and bool(spec.final_softcap)
