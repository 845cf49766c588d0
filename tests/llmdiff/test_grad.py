"""Training parity (`compare --grad`, issue #23): the causal-LM loss and its gradients at every
canonical point and weight, HF against the oracle within per-point noise floors."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_by_candidate
from llmdiff import grad
from llmdiff.spec import ModelSpec, capture_points, get_spec, shrink


# --- names, order, how prompts are put together (no model) --------------------------------

def test_gradient_points_walk_back_from_the_loss():
    spec = shrink(get_spec("gemma-7b"))
    points = capture_points(spec)
    names = grad.grad_points(spec, points)
    assert names[0] == "loss" and names[1] == "grad:logits" and names[2] == "grad:final_norm"
    assert names[len(points)] == "grad:embed"   # the last point gradient
    weights = [n[len(grad.WEIGHT):] for n in names if n.startswith(grad.WEIGHT)]
    last = spec.num_layers - 1
    assert weights[0] == "final_norm" and weights[-1] == "embed"   # tied: no lm_head
    assert weights.index(f"L{last}.down") < weights.index(f"L{last}.q") < weights.index("L0.down")
    assert all(grad.is_grad(n) for n in names) and not any(grad.is_grad(p) for p in points)


def test_weight_order_puts_an_untied_head_first():
    assert grad.weight_order(["embed", "final_norm", "L0.q", "L0.o", "L1.q", "lm_head"]) == \
        ["lm_head", "final_norm", "L1.q", "L0.o", "L0.q", "embed"]


def test_prompts_combine_points_along_the_sequence_and_weights_by_sum():
    a = {"loss": np.full((1, 1), 2.0, np.float32), "grad:L0.q": np.ones((1, 3, 2)), "grad:w:embed": np.ones((4, 2)),
         "L0.q": np.zeros((1, 3, 2))}
    b = {"loss": np.full((1, 1), 3.0, np.float32), "grad:L0.q": np.ones((1, 5, 2)), "grad:w:embed": np.ones((4, 2))}
    out = grad.combine([a, b])
    assert set(out) == {"loss", "grad:L0.q", "grad:w:embed"}
    assert out["loss"].tolist() == [[2.0, 3.0]]
    assert out["grad:L0.q"].shape == (1, 8, 2) and (out["grad:w:embed"] == 2).all()


# --- the oracle's loss and gradients, in-process --------------------------------------------

def test_oracle_gradients_are_the_loss_derivatives():
    """float64: the logits' gradient is (softmax - onehot) / (T - 1) at each predicting position
    and 0 at the last; a weight's gradient and a point's gradient both predict the loss's change
    along a random direction (finite differences)."""
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from llmdiff import convert, weights
    from llmdiff.references import gemma, gemma_grad

    spec = shrink(get_spec("gemma-7b"))
    canon = {k: jnp.asarray(v, jnp.float64) for k, v in weights.random_weights(spec, 0).items()}
    tokens = jnp.asarray([[2, 17, 5, 99, 3, 42, 7]], jnp.int32)
    p = gemma.Precision()
    loss, caps, g_points, g_weights = gemma_grad.loss_and_grads(canon, tokens, spec, p)
    assert set(g_points) == set(capture_points(spec)) and set(g_weights) == set(convert.canonical_shapes(spec))
    logits = np.asarray(caps["logits"])[0]
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = probs.copy()
    want[np.arange(6), np.asarray(tokens)[0, 1:]] -= 1
    want[:6] /= 6
    want[6] = 0
    np.testing.assert_allclose(np.asarray(g_points["logits"])[0], want, atol=1e-12)
    nll = -np.log(probs[np.arange(6), np.asarray(tokens)[0, 1:]]).mean()
    assert abs(float(loss) - nll) < 1e-12

    rng = np.random.default_rng(0)
    for name in ("L1.q", "L0.attn_norm", "embed"):
        d = jnp.asarray(rng.standard_normal(canon[name].shape))
        eps = 1e-6
        plus = gemma_grad.loss_and_grads({**canon, name: canon[name] + eps * d}, tokens, spec, p)[0]
        minus = gemma_grad.loss_and_grads({**canon, name: canon[name] - eps * d}, tokens, spec, p)[0]
        fd = (float(plus) - float(minus)) / (2 * eps)
        assert abs(fd - float(jnp.sum(g_weights[name] * d))) < 1e-6 * max(1.0, abs(fd)), name


def test_sketched_captures_are_refused_with_grad(llmdiff_cli):
    code, out, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--capture", "sketch")
    assert code == 2 and "--grad compares whole captures" in out + err


# --- HF against the oracle ------------------------------------------------------------------

def _grad_rows(run):
    return [p for p in run["points"] if grad.is_grad(p["name"])]


def _worst(rows):
    return max(rows, key=lambda p: p["floor_ratio"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-7b", "qwen3-0.6b", "llama-3.2-1b", "gemma-2-2b", "phi-3-mini-4k-instruct"])
def test_hf_gradients_are_at_parity(llmdiff_cli, model):
    code, out, _, report = llmdiff_cli("compare", model, "--tiny", "--grad", "--no-diagnose",
                                       "--no-tokenizer-parity", "--dtype", "float32", "--dtype", "bfloat16")
    assert code == 0, out
    assert report["options"]["grad"] is True
    for dtype in ("float32", "bfloat16"):
        run = run_by_candidate(report, "hf", dtype)
        rows = _grad_rows(run)
        assert run["verdict"] == "parity" and run["missing_points"] == []
        spec = ModelSpec.from_dict(report["spec"])
        assert [p["name"] for p in rows] == grad.grad_points(spec, report["options"]["points"])
        assert _worst(rows)["floor_ratio"] < 8
        loss = next(p for p in rows if p["name"] == "loss")
        assert loss["rel_l2"] < (1e-6 if dtype == "float32" else 1e-2)
    # HF's own `labels=` loss: the same number as the one compared (same vocabulary here).
    details = next(i for i in report["implementations"] if i["name"] == "hf")["details"]
    assert len(details["own_loss"]) == report["tokens"]["prompts"]


@pytest.mark.slow
def test_a_backward_that_differs_from_the_forward_is_found_where_it_acts(llmdiff_cli, mutants_on_path):
    """The pre-MLP norm's statistic detached: the forward is HF's bit for bit, every gradient
    from the residual entering that norm back is off; the first divergence walking back from the
    loss is grad:L1.resid_mid (the last layer's), nothing in the forward, the loss or after it."""
    impl = "hf_mutants:NormBackwardDetached"
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--impl", "hf", "--impl", impl,
                                       "--dtype", "float32", "--no-tokenizer-parity")
    assert code == 1, out
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"
    run = run_by_candidate(report, impl, "float32")
    assert run["first_divergence"] == "grad:L1.resid_mid"
    by_name = {p["name"]: p for p in run["points"]}
    assert all(by_name[p]["verdict"] == "parity" for p in report["options"]["points"])   # the forward
    for name in ("loss", "grad:logits", "grad:final_norm", "grad:L1.out", "grad:L1.mlp_gate", "grad:L1.mlp_norm",
                 "grad:w:L1.mlp_norm", "grad:w:L1.down"):
        assert by_name[name]["verdict"] == "parity", name
    assert by_name["grad:L1.resid_mid"]["floor_ratio"] > 1000 and by_name["grad:w:embed"]["verdict"] == "divergence"
    # No counterfactual oracle run computes gradients: the one finding says the backward alone is off.
    (f,) = report["findings"]
    assert (f["code"], f["implementation"], f["where"]) == ("LD000", impl, "grad:L1.resid_mid")
    assert f["evidence"]["backward_only"] is True and "errors" not in report


# --- LD602: accumulated micro-batches against the whole batch's loss ------------------------

def _ld602(details, lengths):
    from llmdiff.check import Context
    from llmdiff.checks.loss_normalised_per_micro_batch import LossNormalisedPerMicroBatch

    spec = shrink(get_spec("gemma-7b"))
    return list(LossNormalisedPerMicroBatch().run(Context(spec, "hf", details, tokens={"lengths": lengths})))


def test_micro_batches_normalised_by_the_whole_batch_are_no_finding():
    means, lengths = [2.0, 4.0], [5, 13]          # 4 and 12 target tokens: the whole batch 3.5
    parts = [2.0 * 4 / 16, 4.0 * 12 / 16]
    assert _ld602({"own_loss": means, "own_loss_accumulated": {"micro_batches": parts}}, lengths) == []
    assert _ld602({"own_loss": means}, lengths) == []     # no evidence, nothing said


def test_micro_batches_that_keep_their_own_means_are_named():
    means, lengths = [2.0, 4.0], [5, 13]
    (f,) = _ld602({"own_loss": means, "own_loss_accumulated": {"micro_batches": means}}, lengths)
    assert (f.code, f.where) == ("LD602", "loss")
    ev = f.evidence
    assert ev["whole_batch"] == 3.5 and ev["accumulated"] == 6.0
    assert ev["matches"] == "the sum of the micro-batches' means" and ev["target_tokens"] == [4, 12]


@pytest.mark.slow
def test_a_loss_that_drops_num_items_in_batch_is_ld602(llmdiff_cli, mutants_on_path):
    """Forward and per-prompt gradients at parity; the accumulated loss is the sum of the
    micro-batches' means (k times too large for equal lengths, mis-weighted otherwise)."""
    impl = "hf_mutants:LossKwargsDropped"
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--impl", impl,
                                       "--dtype", "float32", "--no-tokenizer-parity")
    assert code == 1, out
    assert run_by_candidate(report, impl, "float32")["verdict"] == "parity"
    (f,) = report["findings"]
    assert f["code"] == "LD602" and f["evidence"]["matches"] == "the sum of the micro-batches' means"
