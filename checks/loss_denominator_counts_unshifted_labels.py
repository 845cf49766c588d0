from llmdiff.check import ALL_FAMILIES, Check
from llmdiff.checks.loss_normalised_per_micro_batch import RELATIVE, whole_batch_loss

# The step's gradient is the whole batch's times the same ratio when its relative L2 distance to
# the whole batch's gradient is |1 - ratio| to within this fraction (float32 sums: ~1e-6).
SCALE_MATCH = 0.05


class LossDenominatorCountsUnshiftedLabels(Check):
    """## What it finds
    Gradient accumulation whose token count, `num_items_in_batch`, counts the labels before the
    shift: every label that is not -100, the first of each sequence too, which no position
    predicts. The summed loss of the micro-batches is the whole batch's times N / (N + S), with
    N the target tokens and S the sequences: a little too small, and more so for short sequences.

    ## Why it matters
    The loss and every gradient are scaled down by S / (N + S) (0.9% for two sequences of 42 and
    192 tokens; 10% for batches of 10-token sequences), so the effective learning rate depends on
    how long the sequences are and how they were batched, and the logged loss is not the model's
    loss. Forward outputs are unchanged: only `--grad` runs see it.

    ## How it is confirmed
    Static, from transformers' own `Trainer` step in a `compare --grad` run (`details["trainer"]`:
    one optimizer step, `gradient_accumulation_steps` = the prompts, each prompt one micro-batch)
    and from the implementation's own per-prompt mean losses: the step's loss is the whole
    batch's mean token loss times N / (N + S) (within 1e-4), and no per-micro-batch form
    (LD602's). Confirmed when the step's gradient is the whole batch's gradient scaled the same
    way: its relative L2 distance from it (the norms' scales) is |1 - N / (N + S)| within 5%.

    ## Fix
    Count the shifted labels: `num_items_in_batch = (labels[..., 1:] != -100).sum()` over the
    whole accumulated batch (or shift the labels before counting), as the loss the model
    computes drops the first label of each sequence.

    ## References
    huggingface/transformers `Trainer.get_batch_samples` (4.46.2 to 5.9.0: `batch["labels"].ne(-100)`
    counted before the shift; 5.10.1 counts `labels[..., 1:]` where the model's loss shifts,
    `Trainer._loss_shifts_labels`), found and bisected by `llmdiff bisect --grad` (bench/RESULTS.md);
    PR 34191 (the per-micro-batch normalisation before it, LD602).
    """

    code = "LD609"
    name = "loss-denominator-counts-unshifted-labels"
    families = ALL_FAMILIES

    def run(self, ctx):
        details = ctx.details or {}
        means, lengths = details.get("own_loss"), (ctx.tokens or {}).get("lengths")
        trainer = details.get("trainer") or {}
        parts = trainer.get("micro_batches")
        if not (means and lengths and parts) or not len(means) == len(lengths) == len(parts):
            return
        whole, total = whole_batch_loss(means, lengths)
        summed = sum(parts)
        ratio = total / (total + len(lengths))   # one unshifted label more per sequence
        if abs(summed - whole) <= RELATIVE * abs(whole) or abs(summed - whole * ratio) > RELATIVE * abs(whole):
            return
        rel = (trainer.get("norm_gradient_rel_l2") or {}).get("the whole batch's")
        confirmed = rel is not None and abs(rel - (1 - ratio)) <= SCALE_MATCH * (1 - ratio)
        evidence = {"micro_batches": len(parts), "target_tokens": [n - 1 for n in lengths],
                    "num_items_in_batch": total, "counted_unshifted": total + len(lengths),
                    "accumulated": summed, "whole_batch": whole, "ratio": summed / whole if whole else None,
                    "expected_ratio": ratio, "gradient_rel_l2_to_whole_batch": rel,
                    "trainer": {k: trainer.get(k) for k in ("transformers", "micro_batches", "logged_loss")}}
        said = (f"; its gradient is the whole batch's scaled the same way (rel L2 {rel:.3g}, 1 - ratio {1 - ratio:.3g})"
                if confirmed else "")
        yield self.finding(
            ctx, "loss:trainer",
            f"transformers' Trainer step loss {summed:.6g} is the whole batch's {whole:.6g} times {summed / whole:.6f}"
            f" = {total}/{total + len(lengths)}: its token count includes each sequence's first label" + said,
            evidence, confirmed=confirmed)
