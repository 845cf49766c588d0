from llmdiff.check import ALL_FAMILIES
from llmdiff.grad_check import GradCheck


class LossLabelsNotShifted(GradCheck):
    """## What it finds
    The causal-LM loss scores the logits at position t against the label at t: the shift by
    one (logits of t predict token t + 1) is missing, typically a loss written for labels the
    data pipeline was meant to shift, or a custom head that drops `ForCausalLMLoss`.

    ## Why it matters
    The model is trained to copy its input token instead of predicting the next one: the loss
    falls fast (copying is easy) and generation degrades. The forward is untouched, so every
    inference test passes.

    ## How it is confirmed
    Dynamic, `--grad` only: the implementation's own loss (`loss:batch`, `loss:ignore`,
    `loss:accumulated`) diverges while the forward, the per-prompt loss and its gradients are
    at parity; re-running the oracle's loss with `loss_label_shift=0` brings it back to the
    noise floor (`llmdiff/grad_check.py`).

    ## Fix
    Shift once: `logits[:, :-1]` against `labels[:, 1:]` (HF pads the labels by one -100 and
    shifts them inside `ForCausalLMLoss`; pass unshifted labels to it).

    ## References
    `transformers.loss.loss_utils.ForCausalLMLoss` (`shift_labels`); the `labels` argument of
    `*ForCausalLM.forward` ("the labels are shifted inside the model").
    """

    code = "LD604"
    name = "loss-labels-not-shifted"
    families = ALL_FAMILIES
    grad_knob = ("loss_label_shift", 0)
