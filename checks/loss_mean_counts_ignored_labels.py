from llmdiff.check import ALL_FAMILIES
from llmdiff.grad_check import GradCheck


class LossMeanCountsIgnoredLabels(GradCheck):
    """## What it finds
    The causal-LM loss divides the summed token losses by every label position of the batch,
    padding and ignored (-100) labels included, instead of by the target tokens: a
    `cross_entropy(..., reduction="none").mean()` (ignored positions add 0 but are counted), or
    a mean over the padded (B, T) label array.

    ## Why it matters
    The loss and every gradient shrink by the fraction of the batch that is padding or masked
    prompt, which changes from batch to batch: the effective learning rate depends on how the
    batch was padded, and instruction tuning with masked prompts trains on a loss several times
    too small. One unpadded sequence with nothing ignored is unaffected, so single-example tests
    pass.

    ## How it is confirmed
    Dynamic, `--grad` only: the implementation's own loss (`model(ids, attention_mask=mask,
    labels=labels).loss`) of the prompts right-padded into one batch (`loss:batch`) and with
    each prompt's first half labelled -100 (`loss:ignore`) diverges while the forward, the
    per-prompt loss and the gradients are at parity; re-running the oracle's loss with
    `loss_denominator="positions"` (B*T, HF's labels padded by one) or
    `"predicting_positions"` (B*(T-1)) brings it back to the noise floor
    (`llmdiff/grad_check.py`).

    ## Fix
    Sum the per-token losses of the labels that are not `ignore_index` and divide by their
    count (`cross_entropy(..., ignore_index=-100, reduction="mean")`), or by
    `num_items_in_batch` under gradient accumulation.

    ## References
    `transformers.loss.loss_utils.ForCausalLMLoss` / `fixed_cross_entropy`;
    `torch.nn.functional.cross_entropy` (`ignore_index`, `reduction`).
    """

    code = "LD603"
    name = "loss-mean-counts-ignored-labels"
    families = ALL_FAMILIES
    grad_knob = ("loss_denominator", "positions")
    grad_also = ({"loss_denominator": "predicting_positions"},)
