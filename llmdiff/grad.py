"""Training parity (`compare --grad`): the names of the loss and gradient captures, their order,
and how a worker puts one run's prompts together. Standard library and numpy only (the worker
imports it under any interpreter).

Every implementation computes, per prompt, the causal-LM loss (mean next-token cross-entropy
over the text-vocabulary logits; labels are the tokens shifted by one) and its gradients:
- `grad:POINT` with respect to each canonical activation point (same shape as the point);
- `grad:w:NAME` with respect to each canonical weight tensor (canonical layout);
- `loss`, shape (1, prompts);
- the implementation's own loss function on the whole batch (`CASES`, each (1, 1)): `loss:batch`
  (the prompts right-padded into one batch, padding labelled -100 and masked out),
  `loss:ignore` (the same with the first half of each prompt's labels -100 too) and
  `loss:accumulated` (each prompt one micro-batch given the batch's target-token count
  `num_items_in_batch`, the losses summed). The reference for all three is the sum of the
  target tokens' cross-entropies over the number of target tokens (`gemma_grad.own_loss`);
- transformers' own `Trainer`, one optimizer step with `gradient_accumulation_steps` = the number
  of prompts, each prompt one micro-batch (HF only; absent, with the reason in the details,
  where the Trainer cannot run): `loss:trainer` (the loss it reports for the step, the sum of
  `training_step`'s) and `grad:trainer:w:NAME` (each weight's accumulated `.grad` just before
  `optimizer.step()`). The reference: the whole batch's loss (the micro-batches given the
  batch's target-token count, summed) and its gradient, the sum over prompts of each prompt's
  mean-loss gradient times its share of the batch's target tokens.
- with `--grad-checkpointing` (HF only): `grad:plain:w:NAME`, the same weight gradients with
  gradient checkpointing off (the forward's activations kept for the backward, nothing
  recomputed), the implementation's own counterfactual. Not compared: LD608's evidence.
Point gradients are concatenated over prompts along the sequence axis like the points; weight
gradients are summed over prompts (the gradient of the summed per-prompt losses). With
`--capture sketch` (`llmdiff/sketch.py`) every gradient is sketched, point gradients per
position, weight gradients per row once the sum over prompts is made (`NAME:sketch`); the loss
and the loss cases stay whole.

The comparison lists them after the forward points in backward order: the loss, then the point
gradients from the logits back to the embedding, then the weight gradients from the output head
back to the embedding table, so a run's first divergence walks backwards from the loss.
"""

from __future__ import annotations

LOSS = "loss"
POINT = "grad:"
WEIGHT = "grad:w:"
BATCH, IGNORED, ACCUMULATED = "loss:batch", "loss:ignore", "loss:accumulated"
CASES = (BATCH, IGNORED, ACCUMULATED)
TRAINER = "loss:trainer"
TRAINER_WEIGHT = "grad:trainer:w:"
PLAIN_WEIGHT = "grad:plain:w:"   # --grad-checkpointing: the weight gradients with checkpointing off
SCALARS = (*CASES, TRAINER)   # the whole batch's, given once (with the first prompt)


def is_grad(name: str) -> bool:
    """Whether a capture name is a loss or a gradient."""
    return name == LOSS or name.startswith(POINT) or name in SCALARS


def is_weight(name: str) -> bool:
    """Whether a capture name is a weight's gradient (no position axis): `grad:w:NAME`, the
    Trainer's `grad:trainer:w:NAME` or the un-checkpointed `grad:plain:w:NAME`."""
    return name.startswith(WEIGHT) or name.startswith(TRAINER_WEIGHT) or name.startswith(PLAIN_WEIGHT)


def weight_order(names) -> list[str]:
    """Canonical weight names in backward order: output head, final norm, the last layer's
    tensors (in reverse) down to the first's, the embedding table last."""
    names = list(names)

    def layer(n):
        return int(n[1:n.index(".")]) if n.startswith("L") and "." in n else None

    layers = sorted({layer(n) for n in names if layer(n) is not None}, reverse=True)
    out = [n for n in ("lm_head", "final_norm") if n in names]
    for i in layers:
        out += list(reversed([n for n in names if layer(n) == i]))
    out += [n for n in names if n not in out and n != "embed"]
    return out + (["embed"] if "embed" in names else [])


def grad_points(spec, points) -> list[str]:
    """The compared names of a `--grad` run after the forward `points`: the loss, the loss cases,
    the Trainer's loss, the gradient at each of `points` from the last to the first, the
    gradient of every canonical weight, then the Trainer's accumulated gradient of each."""
    from llmdiff.convert import canonical_shapes

    weights = weight_order(canonical_shapes(spec))
    return ([LOSS, *SCALARS] + [POINT + p for p in reversed(list(points))]
            + [WEIGHT + n for n in weights] + [TRAINER_WEIGHT + n for n in weights])


def combine(per_prompt: list[dict]) -> dict:
    """One run's loss and gradient captures from each prompt's (numpy arrays)."""
    import numpy as np

    out = {}
    for name in dict.fromkeys(n for p in per_prompt for n in p):
        if not is_grad(name):
            continue
        if name in SCALARS:  # the whole batch's, given once (with the first prompt, the Trainer's the last)
            out[name] = np.asarray(next(p[name] for p in per_prompt if name in p)).reshape(1, 1)
            continue
        # The Trainer's gradient: the whole step's with the last prompt (HF), or each prompt's
        # share of it with each (the oracle)
        parts = [np.asarray(p[name]) for p in per_prompt if name in p]
        if is_weight(name) and name.endswith(":sketch") and len(parts) > 1:
            # |a + b|^2 is no sum of norms: a sketched weight gradient is the whole batch's, given once
            raise ValueError(f"{name}: a sketched weight gradient is sketched once for the whole batch,"
                             f" not per prompt ({len(parts)} parts)")
        if is_weight(name):
            wide = np.float64 if parts[0].dtype == np.float64 else np.float32
            out[name] = np.sum([a.astype(wide) for a in parts], axis=0)
        elif name == LOSS:
            out[name] = np.concatenate([a.reshape(1, -1) for a in parts], axis=1)
        else:
            out[name] = np.concatenate(parts, axis=1)
    return out


IGNORE = -100   # the label of a position that is no target (padding, a masked prompt)


def batch_labels(prompts: list[list[int]], pad_id: int = 0, ignore_prompt: bool = False):
    """The padded batch of `prompts` as a training loop builds it: ids right-padded with
    `pad_id` to the longest, the attention mask (1 on real tokens) and the labels (the ids,
    IGNORE on padding; with `ignore_prompt` also on the first half of each prompt, the part an
    instruction-tuning loop masks). numpy int64, shape (B, T) each."""
    import numpy as np

    B, T = len(prompts), max(map(len, prompts))
    ids = np.full((B, T), pad_id, np.int64)
    mask = np.zeros((B, T), np.int64)
    labels = np.full((B, T), IGNORE, np.int64)
    for b, t in enumerate(prompts):
        ids[b, :len(t)], mask[b, :len(t)], labels[b, :len(t)] = t, 1, t
        if ignore_prompt:
            labels[b, :half(len(t))] = IGNORE
    return ids, mask, labels


def half(n: int) -> int:
    """How many leading labels of an n-token prompt `ignore_prompt` masks."""
    return max(1, n // 2)
