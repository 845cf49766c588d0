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


def loss_cases(canon: dict | None, prompts: list[list[int]], spec: ModelSpec, p: gemma.Precision,
               logits: list | None = None) -> dict:
    """The implementation's own loss function on the whole batch (`llmdiff/grad.py` CASES):
    `loss:batch` (the padded batch, padding ignored), `loss:ignore` (the same with each prompt's
    first half ignored too) and `loss:accumulated` (each prompt one micro-batch given the whole
    batch's target-token count, the micro-batches' losses summed), and `loss:trainer` (the
    Trainer's step over the same micro-batches: the same number). In exact arithmetic
    `loss:accumulated` is `loss:batch`; each is a (1, 1) array. `logits`: each prompt's (T, V)
    logits its loss reads, where they are made already (`streamed_loss_and_grads`)."""
    from llmdiff import grad

    if logits is None:
        logits = [_loss_logits(canon, jnp.asarray([t], jnp.int32), spec, p)[0] for t in prompts]
    _, _, labels = batch_labels(prompts)
    _, _, masked = batch_labels(prompts, ignore_prompt=True)
    n = sum(len(t) - 1 for t in prompts)
    accumulated = sum(own_loss([x], batch_labels([t])[2], p, num_items_in_batch=n) for x, t in zip(logits, prompts))
    # The Trainer's step (`grad.TRAINER`): the same micro-batches, the same reference
    out = {grad.BATCH: own_loss(logits, labels, p), grad.IGNORED: own_loss(logits, masked, p),
           grad.ACCUMULATED: accumulated, grad.TRAINER: accumulated}
    return {k: jnp.reshape(v, (1, 1)) for k, v in out.items()}


# --- the same gradients one decoder block at a time (models whose weights and gradients do not
# fit the device together: gemma-7b in float64 is 68 GB of weights and 68 GB of gradients) ------

def _layer_params(spec: ModelSpec, canon_i: dict) -> dict:
    """A layer's oracle params from its canonical tensors named without the layer ("q", ...)."""
    return convert.unflatten(convert.to_deepmind_layer(spec, 0, {"L0." + k: v for k, v in canon_i.items()},
                                                       stack=jnp.stack))


def _block(x, canon_i, deltas, spec: ModelSpec, p: gemma.Precision, kind: str):
    cap = GradTape(deltas)
    B, T = x.shape[:2]
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    return gemma.block(x, _layer_params(spec, canon_i), positions, spec, p, cap, "", kind), dict(cap)


@functools.partial(jax.jit, static_argnames=("spec", "p", "kind", "reduce"))
def _block_forward(x, canon_i, aux, spec, p, kind, reduce):
    y, caps = _block(x, canon_i, None, spec, p, kind)
    return y, reduce(caps, aux)


@functools.partial(jax.jit, static_argnames=("spec", "p", "kind", "reduce"))
def _block_backward(x, canon_i, g, g_trainer, aux, spec, p, kind, reduce):
    """The block's forward again from its input, then its vjp for the two cotangents of its
    output (the mean loss's, the Trainer's): (input gradient, weight gradients, point gradients
    reduced) for the first, (input gradient, weight gradients) for the second."""
    shapes = jax.eval_shape(lambda: _block(x, canon_i, None, spec, p, kind)[1])
    deltas = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}
    _, vjp = jax.vjp(lambda x_, c_, d_: _block(x_, c_, d_, spec, p, kind)[0], x, canon_i, deltas)
    gx, gw, gd = vjp(g)
    gx_t, gw_t, _ = vjp(g_trainer)
    return gx, gw, reduce(gd, aux), gx_t, gw_t


def _embed(table, tokens, delta, spec, p):
    cap = GradTape(None if delta is None else {"embed": delta})
    return cap("embed", gemma.embed(table, tokens, spec, p))


@functools.partial(jax.jit, static_argnames=("spec", "p", "reduce"))
def _embed_forward(table, tokens, aux, spec, p, reduce):
    x = _embed(table, tokens, None, spec, p)
    return x, reduce({"embed": x}, aux)


@functools.partial(jax.jit, static_argnames=("spec", "p"))
def _embed_backward(table, tokens, g, g_trainer, spec, p):
    """(the table's gradient, the embedding point's gradient) for the mean loss's cotangent, and
    the table's gradient for the Trainer's."""
    delta = jnp.zeros(tokens.shape + (table.shape[1],), table.dtype)
    _, vjp = jax.vjp(lambda t, d: _embed(t, tokens, d, spec, p), table, delta)
    g_table, g_point = vjp(g)
    return g_table, g_point, vjp(g_trainer)[0]


def _head(top: dict, x, deltas, prompt: list[int], n: int, spec: ModelSpec, p: gemma.Precision):
    """(mean loss, the Trainer's micro-batch loss), (the head's points, the logits its own loss
    reads): `_forward`'s head and `trainer_part`'s loss, from the last block's output. `prompt`:
    the ids as a list (the labels are picked in Python)."""
    import dataclasses

    params = {"embedder": {"input_embedding": top["embed"]}, **({"lm_head": top["lm_head"]} if "lm_head" in top else {})}
    cap = GradTape(deltas)
    gemma.head(x, top["final_norm"], gemma.output_table(params, p), spec, p, cap)
    loss = causal_lm_loss(cap.live["logits"], jnp.asarray([prompt], jnp.int32))
    if spec.final_softcap and not p.loss_softcap:
        raw = gemma.Tape(None)
        gemma.head(x, top["final_norm"], gemma.output_table(params, p), spec,
                   dataclasses.replace(p, final_softcap=False), raw)
        logits = raw["logits"]
    else:
        logits = cap["logits"]
    labels = batch_labels([list(prompt)])[2]
    trainer = own_loss([logits[0]], labels, p, num_items_in_batch=n)
    return (loss, trainer), (dict(cap), logits)


@functools.partial(jax.jit, static_argnames=("prompt", "n", "spec", "p", "reduce"))
def _head_backward(top, x, aux, prompt: tuple, n: int, spec, p, reduce):
    """The head's forward from the last block's output and its vjp for the mean loss and for
    the Trainer's: (loss, head points reduced, their gradients reduced, top tensors' gradients,
    the block output's gradient, the same two for the Trainer's loss, the logits its loss reads)."""
    shapes = jax.eval_shape(lambda: _head(top, x, None, prompt, n, spec, p)[1][0])
    deltas = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    (loss, _), vjp, (caps, loss_logits) = jax.vjp(
        lambda t_, x_, d_: _head(t_, x_, d_, prompt, n, spec, p), top, x, deltas, has_aux=True)
    one, zero = jnp.ones((), loss.dtype), jnp.zeros((), loss.dtype)
    g_top, g, g_points = vjp((one, zero))
    g_top_t, g_t, _ = vjp((zero, one))
    # Reduced under their `grad:` names: the logits' gradient is no logits (no top-k of it)
    g_points = {k[len("grad:"):]: v for k, v in reduce({"grad:" + k: v for k, v in g_points.items()}, aux).items()}
    return loss, reduce(caps, aux), g_points, g_top, g, g_top_t, g_t, loss_logits


def add_gradients(sums: dict, grads: dict, prefix: str = "") -> None:
    """Add `grads` into `sums` under `prefix + name`, in float32 (float64 in a float64 run): the
    sum over prompts, in prompt order, that `grad.combine` makes of whole captures on the host."""
    for k, v in grads.items():
        v = v.astype(jnp.float64 if v.dtype == jnp.float64 else jnp.float32)
        sums[prefix + k] = v if prefix + k not in sums else sums[prefix + k] + v


def streamed_loss_and_grads(layer, top: dict, prompts: list[list[int]], spec: ModelSpec, p: gemma.Precision,
                            reduce, aux, emit, phase=None):
    """`loss_and_grads` and `trainer_part` for every prompt, one decoder block at a time: the
    forward keeps each block's input (all prompts'), the backward runs the blocks in reverse,
    each block's forward again from its input and its vjp, with only its weights on the device.

    layer(i): layer i's canonical tensors named without the layer ("q", ...), made or read when
    asked; top: {"embed", "final_norm", "lm_head" when untied} canonical. reduce(caps, aux): what
    is kept of each point and point gradient (names without the layer), as in
    `gemma.forward_blocks`. emit(grads, trainer): called once per block in reverse (then for the
    top tensors) with its weight gradients summed over the prompts, by canonical name, in float32
    (float64 in a float64 run), summed in prompt order as `grad.combine` sums whole ones, and the
    Trainer's share of each (`trainer_part`'s, summed); the caller sketches or copies them and
    drops them. Returns, per prompt, {loss, points (reduced, canonical names), point gradients
    (reduced, canonical names without `grad:`)} and the logits each prompt's own loss reads
    (`loss_cases`). phase(name): a context timing each part (`Reference.phase`)."""
    import contextlib

    phase = phase or (lambda name: contextlib.nullcontext())
    add = add_gradients
    n = sum(len(t) - 1 for t in prompts)
    ids = [jnp.asarray([t], jnp.int32) for t in prompts]
    out = [{"points": {}, "grads": {}} for _ in prompts]
    inputs = []                                   # inputs[i][b]: block i's input for prompt b
    xs = []
    forward = phase("forward")
    forward.__enter__()
    for b, tok in enumerate(ids):
        x, caps = _embed_forward(top["embed"], tok, aux, spec, p, reduce)
        xs.append(x)
        out[b]["points"].update(caps)
    kinds = []
    for i, kind in enumerate(spec.layer_types):
        pi = p.at(i, kind)
        kinds.append((pi, gemma.layer_types(spec, pi)[i]))
        canon_i = layer(i)
        inputs.append(xs)
        nxt = []
        for b, x in enumerate(xs):
            y, caps = _block_forward(x, canon_i, aux, spec, *kinds[i], reduce)
            nxt.append(y)
            out[b]["points"].update({f"L{i}.{k}": v for k, v in caps.items()})
        xs = nxt
        del canon_i
    jax.block_until_ready(xs)
    forward.__exit__(None, None, None)
    top_sums, top_trainer = {}, {}
    head_phase = phase("head_and_loss")
    head_phase.__enter__()
    gs, gts, logits = [], [], []
    for b, (x, tok) in enumerate(zip(xs, prompts)):
        loss, caps, g_points, g_top, g, g_top_t, g_t, loss_logits = _head_backward(
            top, x, aux, tuple(int(t) for t in tok), n, spec, p, reduce)
        out[b]["loss"] = loss
        out[b]["points"].update(caps)
        out[b]["grads"].update(g_points)
        add(top_sums, g_top)
        add(top_trainer, g_top_t)
        gs.append(g)
        gts.append(g_t)
        logits.append(loss_logits[0])
    jax.block_until_ready((gs, gts))
    head_phase.__exit__(None, None, None)
    backward = phase("backward_and_weight_gradients_out")
    backward.__enter__()
    for i in reversed(range(len(spec.layer_types))):
        canon_i = layer(i)
        sums, trainer = {}, {}
        for b in range(len(prompts)):
            gs[b], gw, g_points, gts[b], gw_t = _block_backward(inputs[i][b], canon_i, gs[b], gts[b], aux, spec,
                                                                *kinds[i], reduce)
            out[b]["grads"].update({f"L{i}.{k}": v for k, v in g_points.items()})
            add(sums, gw, f"L{i}.")
            add(trainer, gw_t, f"L{i}.")
        inputs[i] = None
        del canon_i
        emit(sums, trainer)
    for b, tok in enumerate(ids):
        g_table, g_point, g_table_t = _embed_backward(top["embed"], tok, gs[b], gts[b], spec, p)
        out[b]["grads"].update(reduce({"embed": g_point}, aux))
        add(top_sums, {"embed": g_table})
        add(top_trainer, {"embed": g_table_t})
    emit(top_sums, top_trainer)
    backward.__exit__(None, None, None)
    return out, logits
