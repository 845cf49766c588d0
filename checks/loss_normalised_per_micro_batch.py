from llmdiff.check import ALL_FAMILIES, Check

# The micro-batches' summed losses and the whole batch's mean token loss are the same float32
# cross-entropies added in another order: 1e-4 of the loss is far above that, far below a bug.
RELATIVE = 1e-4
# The Trainer's step gradient is confirmed to be a per-micro-batch form when it is this much
# closer to it than to the whole batch's gradient (both built from the same per-prompt gradients).
GRADIENT_MATCH = 0.1


def whole_batch_loss(means, lengths) -> tuple[float, int]:
    """The whole batch's mean token loss from each prompt's own mean (a prompt of n tokens has
    n - 1 targets), and the number of target tokens."""
    targets = [n - 1 for n in lengths]
    total = sum(targets)
    return sum(n * m for n, m in zip(targets, means)) / total, total


class LossNormalisedPerMicroBatch(Check):
    """## What it finds
    Gradient accumulation that does not give the loss of the whole batch: the implementation's
    losses of k micro-batches, each computed with the batch's number of target tokens
    (`num_items_in_batch`), do not sum to the mean token loss over all of them. Each micro-batch
    is then normalised by its own token count (a mean per micro-batch, then a sum or a mean of
    those), so a short sequence weighs as much as a long one and the gradient's scale depends on
    how the batch was cut.

    ## Why it matters
    Training with accumulation should equal training on the whole batch at once. Per-micro-batch
    normalisation changes every update where sequence lengths differ (padding-free or packed
    batches always), and a loss that ignores `num_items_in_batch` is k times too large (the
    Trainer no longer divides by the accumulation steps when the model says it takes loss
    arguments). Forward outputs are unchanged: only `--grad` runs see it.

    ## How it is confirmed
    Static, from the implementation's own numbers in a `compare --grad` run: each prompt is one
    micro-batch; its loss alone (`model(ids, labels=ids).loss`, a mean) and its loss with the
    whole batch's target-token count (`num_items_in_batch`) are in `details`. The token-weighted
    mean of the former is the whole batch's loss; the sum of the latter must equal it. The
    evidence gives both, the mean and the sum of the per-micro-batch means, and which one the
    accumulated loss is; an accumulated loss that is neither is no finding of this check (its
    per-prompt means are off: the `loss:accumulated` point against the oracle shows it). The
    same test reads transformers' own `Trainer` step (`details["trainer"]`: one optimizer step
    with `gradient_accumulation_steps` = the prompts, the loss of each micro-batch as
    `training_step` returns it), named at `loss:trainer`: a Trainer that passes no
    `num_items_in_batch` and divides each micro-batch's mean by the accumulation steps
    (transformers before 4.46) gives the mean of the micro-batches' means.

    ## Fix
    Sum each micro-batch's per-token losses and divide by the target tokens of the whole batch
    (`num_items_in_batch`, transformers 4.46 and later: the model's forward must hand its
    `**kwargs` to `self.loss_function`); never average per-micro-batch means.

    ## References
    Hugging Face's blog post "Fixing Gradient Accumulation" (October 2024);
    `transformers.loss.loss_utils.fixed_cross_entropy`; `Trainer.training_step`
    (`model_accepts_loss_kwargs`).
    """

    code = "LD602"
    name = "loss-normalised-per-micro-batch"
    families = ALL_FAMILIES

    def run(self, ctx):
        details = ctx.details or {}
        means, lengths = details.get("own_loss"), (ctx.tokens or {}).get("lengths")
        if not (means and lengths) or len(means) != len(lengths):
            return
        accumulated = details.get("own_loss_accumulated") or {}
        trainer = details.get("trainer") or {}
        sources = (("loss:accumulated", accumulated.get("micro_batches"), "accumulated micro-batches"),
                   ("loss:trainer", trainer.get("micro_batches"),
                    f"transformers' Trainer (gradient_accumulation_steps={trainer.get('gradient_accumulation_steps')})"
                    " micro-batches"))
        for where, parts, what in sources:
            # One micro-batch is the whole batch: every normalisation gives the same number.
            if parts and len(parts) == len(lengths) > 1:
                yield from self._judge(ctx, where, what, means, parts, lengths,
                                       trainer if where == "loss:trainer" else None)

    def _judge(self, ctx, where, what, means, parts, lengths, trainer):
        targets = [n - 1 for n in lengths]
        whole, total = whole_batch_loss(means, lengths)
        summed = sum(parts)
        forms = {"the sum of the micro-batches' means": sum(means),
                 "the mean of the micro-batches' means": sum(means) / len(means)}
        # The Trainer's gradient: the norms' scales, against HF's per-prompt gradients put
        # together each way. Where the prompts' mean losses are alike (random weights: every
        # prompt near log(vocab)) the losses cannot tell the forms apart, the gradients can.
        rel = (trainer or {}).get("norm_gradient_rel_l2") or {}
        right = rel.get("the whole batch's")
        by_gradient = None
        if right is not None:
            near = {f: rel[f] for f in forms if rel.get(f) is not None}
            best = min(near, key=near.get) if near else None
            if best is not None and right > 0 and near[best] <= GRADIENT_MATCH * right:
                by_gradient = best
        if by_gradient is None and abs(summed - whole) <= RELATIVE * abs(whole):
            return
        closest = by_gradient or min(forms, key=lambda k: abs(forms[k] - summed))
        if abs(forms[closest] - summed) > RELATIVE * abs(summed):
            # Neither per-micro-batch normalisation: the per-prompt means themselves are off (a
            # loss that counts ignored labels or misplaces them): not this bug, the `loss:*`
            # points and their own checks say what it is.
            return
        evidence = {"micro_batches": len(parts), "target_tokens": targets, "num_items_in_batch": total,
                    "accumulated": summed, "whole_batch": whole, "sum_of_means": sum(means),
                    "mean_of_means": sum(means) / len(means), "matches": closest,
                    "ratio": summed / whole if whole else None}
        said = ""
        if trainer:  # what the Trainer itself said of the step
            evidence["trainer"] = {k: trainer.get(k) for k in
                                   ("transformers", "micro_batches", "logged_loss", "model_accepts_loss_kwargs",
                                    "norm_gradient_rel_l2")}
        if by_gradient:  # the step's gradient is the matched form's, far from the whole batch's
            said = (f"; its gradient too (norm scales: rel L2 {rel[closest]:.2g} to {closest} form, {right:.2g} to"
                    f" the whole batch's)")
        yield self.finding(
            ctx, where,
            f"{len(parts)} {what} give a loss of {summed:.6g}, the whole batch's is {whole:.6g}: it is {closest}"
            + said, evidence, confirmed=by_gradient is not None)
