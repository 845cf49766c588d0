"""Training parity for the oracle: the causal-LM loss and its gradients (issue #23).

The loss of one prompt, written out in full: the logits over the text vocabulary, in at least
float32, predict the next token at every position but the last (labels: the tokens shifted by
one); the mean over those positions of logsumexp(logits) - logits[label].

Gradients with respect to every canonical activation point come from a zero perturbation added
at each point the forward records (`GradTape`): d loss / d delta[name] is the gradient at that
point, whatever else reads it (the residual stream's gradient sums both branches, as a tensor's
`.grad` does in torch). Gradients with respect to the weights are taken of the canonical tensors
themselves (the DeepMind layout is built from them inside the differentiated function), so they
come out under canonical names.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llmdiff import convert
from llmdiff.grad import IGNORE, batch_labels
from llmdiff.references import gemma
from llmdiff.spec import ModelSpec


def causal_lm_loss(logits, tokens):
    """Mean next-token cross-entropy: logits (B, T, V) over the text vocabulary, tokens (B, T)."""
    x = logits[:, :-1].astype(gemma._wide(logits.dtype))                          # (B, T-1, V)
    labels = tokens[:, 1:]
    m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    lse = (m + jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True)))[..., 0]
    picked = jnp.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
    return jnp.mean(lse - picked)


class GradTape(gemma.Tape):
    """A `gemma.Tape` that also adds `deltas[name]` (zeros) to each point it records, so the
    loss can be differentiated with respect to every point; `live` holds what flows on."""

    def __init__(self, deltas: dict | None):
        super().__init__(None)
        self.deltas = deltas
        self.live = {}

    def __call__(self, name: str, value):
        value = super().__call__(name, value)
        if self.deltas is not None and name in self.deltas:
            value = value + self.deltas[name].astype(value.dtype)
        self.live[name] = value
        return value


def params_from_canonical(canon: dict, spec: ModelSpec) -> dict:
    """The oracle's parameter tree (DeepMind's layout plus its own names) from canonical tensors."""
    params = {"embedder": {"input_embedding": canon["embed"]}, "final_norm": {"scale": canon["final_norm"]}}
    if "lm_head" in canon:
        params["lm_head"] = canon["lm_head"]
    for i in range(spec.num_layers):
        params[f"layer_{i}"] = convert.unflatten(convert.to_deepmind_layer(spec, i, canon, stack=jnp.stack))
    return params


def _forward(canon, deltas, tokens, spec: ModelSpec, p: gemma.Precision):
    """`gemma.forward` on a `GradTape`: (loss, the recorded points)."""
    params = params_from_canonical(canon, spec)
    cap = GradTape(deltas)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    x = cap("embed", gemma.embed(params["embedder"]["input_embedding"], tokens, spec, p))
    for i, kind in enumerate(spec.layer_types):
        pi = p.at(i, kind)
        x = gemma.block(x, params[f"layer_{i}"], positions, spec, pi, cap, f"L{i}.", gemma.layer_types(spec, pi)[i])
    gemma.head(x, params["final_norm"]["scale"], gemma.output_table(params, p), spec, p, cap)
    return causal_lm_loss(cap.live["logits"], tokens), dict(cap)


@functools.partial(jax.jit, static_argnames=("spec", "p"))
def loss_and_grads(canon: dict, tokens, spec: ModelSpec, p: gemma.Precision):
    """(loss, forward captures, gradients by point, gradients by canonical weight) of one batch."""
    shapes = jax.eval_shape(lambda c: _forward(c, None, tokens, spec, p)[1], canon)
    deltas = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}
    (loss, caps), (g_weights, g_points) = jax.value_and_grad(_forward, argnums=(0, 1), has_aux=True)(
        canon, deltas, tokens, spec, p)
    return loss, caps, g_points, g_weights


# --- the implementation's own loss function: padding, ignored labels, accumulation ----------

def trainer_part(canon: dict, tokens: list[int], prompts: list[list[int]], spec: ModelSpec, p: gemma.Precision) -> dict:
    """One micro-batch's part of the Trainer's accumulated gradient (`grad.TRAINER_WEIGHT`): the
    gradient, with respect to every canonical weight, of the prompt's own loss (`own_loss`, labels
    the ids) given the whole batch's target-token count (`num_items_in_batch`), as the Trainer's
    `training_step` backpropagates it; summed over prompts, the gradient of the whole batch's
    token-weighted loss. The loss-function knobs act on it as on the `loss:*` cases."""
    n = sum(len(t) - 1 for t in prompts)
    labels = batch_labels([tokens])[2]

    def loss(c):
        return own_loss([_loss_logits(c, jnp.asarray([tokens], jnp.int32), spec, p)[0]], labels, p,
                        num_items_in_batch=n)

    return jax.grad(loss)(canon)


def own_loss(logits: list, labels, p: gemma.Precision, num_items_in_batch: int | None = None):
    """A causal-LM loss function over one batch, written out in full: `logits[b]` (T_b, V) the
    text-vocabulary logits of prompt b (only its real positions: right padding never changes
    them under a causal mask), `labels` (B, T) numpy with IGNORE where no target is.

    Reference (`p.loss_*` at their defaults, HF's `ForCausalLMLoss`, the Trainer since PR
    34191): position t predicts labels[t + 1]; the sum over every (t, target) pair whose label
    is not IGNORE of logsumexp(logits[t]) - logits[t, target], in at least float32, divided by
    the number of such pairs, or by `num_items_in_batch` when given (gradient accumulation: the
    target tokens of every micro-batch). The knobs switch the known bugs on: the label shift
    (`loss_label_shift`), the denominator (`loss_denominator`: padded and ignored positions
    counted in the mean)."""
    import numpy as np

    s = p.loss_label_shift
    total, count = None, 0
    for b, x in enumerate(logits):
        x = x.astype(gemma._wide(x.dtype))
        T = x.shape[0]
        rows = [t for t in range(T) if 0 <= t + s < labels.shape[1] and labels[b, t + s] != IGNORE]
        if not rows:
            continue
        rows_a = np.asarray(rows)
        targets = jnp.asarray(labels[b, rows_a + s])
        picked_x = x[rows_a]                                                         # (n, V)
        m = jax.lax.stop_gradient(jnp.max(picked_x, axis=-1, keepdims=True))
        lse = (m + jnp.log(jnp.sum(jnp.exp(picked_x - m), axis=-1, keepdims=True)))[..., 0]
        picked = jnp.take_along_axis(picked_x, targets[:, None], axis=-1)[:, 0]
        part = jnp.sum(lse - picked)
        total = part if total is None else total + part
        count += len(rows)
    if num_items_in_batch is not None:
        denominator = num_items_in_batch
    elif p.loss_denominator == "positions":
        denominator = labels.size
    elif p.loss_denominator == "predicting_positions":
        denominator = labels.shape[0] * (labels.shape[1] - 1)
    else:
        denominator = count
    return total / denominator


@functools.partial(jax.jit, static_argnames=("spec", "p"))
def _loss_logits(canon: dict, tokens, spec: ModelSpec, p: gemma.Precision):
    """The logits one prompt's loss reads: the model's, or before the final soft-cap when
    `p.loss_softcap` is False (a loss computed on the output head's raw product)."""
    import dataclasses

    if spec.final_softcap and not p.loss_softcap:
        p = dataclasses.replace(p, final_softcap=False)
    return _forward(canon, None, tokens, spec, p)[1]["logits"]


def loss_cases(canon: dict, prompts: list[list[int]], spec: ModelSpec, p: gemma.Precision) -> dict:
    """The implementation's own loss function on the whole batch (`llmdiff/grad.py` CASES):
    `loss:batch` (the padded batch, padding ignored), `loss:ignore` (the same with each prompt's
    first half ignored too) and `loss:accumulated` (each prompt one micro-batch given the whole
    batch's target-token count, the micro-batches' losses summed), and `loss:trainer` (the
    Trainer's step over the same micro-batches: the same number). In exact arithmetic
    `loss:accumulated` is `loss:batch`; each is a (1, 1) array."""
    from llmdiff import grad

    logits = [_loss_logits(canon, jnp.asarray([t], jnp.int32), spec, p)[0] for t in prompts]
    _, _, labels = batch_labels(prompts)
    _, _, masked = batch_labels(prompts, ignore_prompt=True)
    n = sum(len(t) - 1 for t in prompts)
    accumulated = sum(own_loss([x], batch_labels([t])[2], p, num_items_in_batch=n) for x, t in zip(logits, prompts))
    # The Trainer's step (`grad.TRAINER`): the same micro-batches, the same reference
    out = {grad.BATCH: own_loss(logits, labels, p), grad.IGNORED: own_loss(logits, masked, p),
           grad.ACCUMULATED: accumulated, grad.TRAINER: accumulated}
    return {k: jnp.reshape(v, (1, 1)) for k, v in out.items()}
