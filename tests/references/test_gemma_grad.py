"""The oracle's gradients one decoder block at a time (`gemma_grad.streamed_loss_and_grads`)
against the whole model's (`loss_and_grads`, `trainer_part`, `loss_cases`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmdiff import convert, weights
from llmdiff.references import gemma, gemma_grad
from llmdiff.references.oracle import _Reduce
from llmdiff.spec import get_spec

jax.config.update("jax_enable_x64", True)
PROMPTS = [[2, 17, 5, 99, 3, 42, 7], [2, 8, 9, 11, 40]]


def _whole(canon, spec, p):
    """Per prompt: loss, points, point gradients; the weight gradients and the Trainer's summed
    over prompts in prompt order (as `grad.combine` sums them); the loss cases."""
    parts, sums, trainer = [], {}, {}
    for t in PROMPTS:
        loss, caps, g_points, g_weights = gemma_grad.loss_and_grads(canon, jnp.asarray([t], jnp.int32), spec, p)
        parts.append((loss, caps, g_points))
        for k, v in g_weights.items():
            sums[k] = v if k not in sums else sums[k] + v
        for k, v in gemma_grad.trainer_part(canon, t, PROMPTS, spec, p).items():
            trainer[k] = v if k not in trainer else trainer[k] + v
    return parts, sums, trainer, gemma_grad.loss_cases(canon, PROMPTS, spec, p)


@pytest.mark.parametrize("model", ["gemma-7b", pytest.param("gemma-2-2b", marks=pytest.mark.slow),
                                   pytest.param("llama-3.2-1b", marks=pytest.mark.slow)])
def test_streamed_float64_gradients_are_the_whole_models(model):
    """float64: every loss, point, point gradient, weight gradient (the Trainer's too) and loss
    case of the block-streamed backward equals the whole model's to float64 rounding (Gemma 2:
    soft-caps and post-norms; Llama: an untied head)."""
    spec = get_spec(model, tiny=True)
    canon = {k: jnp.asarray(v, jnp.float64) for k, v in weights.random_weights(spec, 0).items()}
    p = gemma.Precision()
    parts, sums, trainer, cases = _whole(canon, spec, p)

    def layer(i):
        return {k[len(f"L{i}."):]: canon[k] for k in convert.layer_names(spec, i)}

    top = {k: canon[k] for k in ("embed", "final_norm", "lm_head") if k in canon}
    got_w, got_t, layers_emitted = {}, {}, []

    def emit(g, t):
        layers_emitted.append(sorted({k.split(".")[0] for k in g}))
        got_w.update(g)
        got_t.update(t)

    streamed, logits = gemma_grad.streamed_loss_and_grads(layer, top, PROMPTS, spec, p, _Reduce(False, None), None,
                                                          emit)
    # block by block in reverse, then the top tensors; every canonical tensor once
    assert layers_emitted[0] == [f"L{spec.num_layers - 1}"] and set(got_w) == set(sums) == set(got_t)

    def close(a, b, what):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.abs(b).max()), 1e-300)
        assert a.shape == b.shape and float(np.abs(a - b).max()) <= 1e-12 * scale, what

    for (loss, caps, g_points), part in zip(parts, streamed):
        close(part["loss"], loss, "loss")
        assert set(part["points"]) == set(caps) and set(part["grads"]) == set(g_points)
        for k in caps:
            close(part["points"][k], caps[k], k)
            close(part["grads"][k], g_points[k], "grad:" + k)
    for k in sums:
        close(got_w[k], sums[k], "grad:w:" + k)
        close(got_t[k], trainer[k], "grad:trainer:w:" + k)
    for k, v in gemma_grad.loss_cases(None, PROMPTS, spec, p, logits=logits).items():
        close(v, cases[k], k)
