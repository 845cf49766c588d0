from llmdiff.check import ALL_FAMILIES
from llmdiff.grad_check import GradCheck


class LossLabelsShiftedTwice(GradCheck):
    """## What it finds
    The causal-LM loss scores the logits at position t against the token at t + 2: the labels
    were shifted by the data pipeline (or a collator) and shifted again inside the model's loss.

    ## Why it matters
    The model is trained to predict the token after next: the loss stays high, training looks
    merely slow, and the forward (inference) is untouched, so no inference test sees it.

    ## How it is confirmed
    Dynamic, `--grad` only: the implementation's own loss (`loss:batch`, `loss:ignore`,
    `loss:accumulated`) diverges while the forward, the per-prompt loss and its gradients are
    at parity; re-running the oracle's loss with `loss_label_shift=2` brings it back to the
    noise floor (`llmdiff/grad_check.py`).

    ## Fix
    Shift once: hand the model unshifted labels (`labels=input_ids`, -100 where ignored), or
    pass already shifted ones as `shift_labels` so the loss does not shift them again.

    ## References
    `transformers.loss.loss_utils.ForCausalLMLoss` (`shift_labels`);
    `DataCollatorForLanguageModeling` (labels are the input ids, unshifted).
    """

    code = "LD605"
    name = "loss-labels-shifted-twice"
    families = ALL_FAMILIES
    grad_knob = ("loss_label_shift", 2)
