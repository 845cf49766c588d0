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
    assert names[:5] == ["loss", "loss:batch", "loss:ignore", "loss:accumulated", "loss:trainer"]
    assert names[5] == "grad:logits" and names[6] == "grad:final_norm"
    assert names[len(points) + 4] == "grad:embed"   # the last point gradient
    weights = [n[len(grad.WEIGHT):] for n in names if n.startswith(grad.WEIGHT)]
    # the Trainer's accumulated weight gradients last, in the same order
    assert names[-len(weights):] == [grad.TRAINER_WEIGHT + w for w in weights]
    assert all(grad.is_weight(n) for n in names[-2 * len(weights):]) and not grad.is_weight("grad:embed")
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
    a["loss:batch"] = np.full((1, 1), 2.5, np.float32)   # the whole batch's, with the first prompt
    out = grad.combine([a, b])
    assert set(out) == {"loss", "loss:batch", "grad:L0.q", "grad:w:embed"}
    assert out["loss"].tolist() == [[2.0, 3.0]] and out["loss:batch"].tolist() == [[2.5]]
    assert out["grad:L0.q"].shape == (1, 8, 2) and (out["grad:w:embed"] == 2).all()

    # The Trainer's: its loss given once (HF: with the last prompt), its weight gradients summed
    # over the prompts that give them (HF the whole step once, the oracle each prompt's part)
    b["loss:trainer"] = np.full((1, 1), 2.9, np.float32)
    b["grad:trainer:w:embed"] = np.full((4, 2), 0.5)
    out = grad.combine([a, b])
    assert out["loss:trainer"].tolist() == [[np.float32(2.9)]] and (out["grad:trainer:w:embed"] == 0.5).all()
    a["grad:trainer:w:embed"] = np.full((4, 2), 0.25)
    assert (grad.combine([a, b])["grad:trainer:w:embed"] == 0.75).all()


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


def test_auto_capture_sketches_when_the_gradients_are_too_big():
    """`capture="auto"` counts a --grad run's gradient bytes too: gemma-7b's weight gradients
    alone (and the Trainer's) are 68 GB in float32; gemma-3-270m's forward captures of a short
    prompt are small but its gradients are not; a tiny model's are small either way."""
    from llmdiff.api import SKETCH_ABOVE_BYTES, _capture_bytes, select_points

    def auto(spec, tokens, grad_):
        return _capture_bytes(spec, select_points(spec), tokens, grad_) > SKETCH_ABOVE_BYTES

    big = get_spec("gemma-7b")
    assert _capture_bytes(big, select_points(big), [[1] * 512], True) > 2 * 4 * 8.5e9
    small = get_spec("gemma-3-270m")
    assert not auto(small, [[1] * 8], False) and auto(small, [[1] * 8], True)
    assert not auto(shrink(big), [[1] * 512], True)


def _verdicts(report):
    return {(r["candidate"], r["dtype"]): (r["verdict"], r["first_divergence"],
                                           [p["name"] for p in r["points"] if p["verdict"] == "divergence"])
            for r in report["runs"]}


@pytest.mark.slow   # ~3 min on a shared CPU: two --grad compares of two candidates, diagnosed
def test_sketched_gradients_give_the_whole_captures_verdicts(llmdiff_cli, mutants_on_path, tmp_path):
    """--grad with --capture sketch (every gradient sketched on the device: point gradients per
    position, weight gradients per row) against whole captures: the same verdict, first
    divergence and divergent points for a clean HF and for a backward mutant, and the same
    finding; every sketched rel L2 within the estimate's error of the exact one."""
    impl = "hf_mutants:NormBackwardDetached"
    args = ("compare", "gemma-7b", "--tiny", "--grad", "--impl", "hf", "--impl", impl, "--dtype", "float32",
            "--no-tokenizer-parity")
    code_full, out_full, _, full = llmdiff_cli(*args, "--capture", "full", "--workdir", str(tmp_path / "full"))
    code_sk, out_sk, _, sk = llmdiff_cli(*args, "--capture", "sketch", "--workdir", str(tmp_path / "sketch"))
    assert code_full == code_sk == 1, out_full + out_sk
    assert full["options"]["capture"] == "full" and sk["options"]["capture"] == "sketch"
    assert _verdicts(sk) == _verdicts(full)
    assert _verdicts(sk)[(impl, "float32")][1] == "grad:L1.resid_mid"
    assert _verdicts(sk)[("hf", "float32")][0] == "parity"
    for run in sk["runs"]:
        exact = {p["name"]: p for p in run_by_candidate(full, run["candidate"], run["dtype"])["points"]}
        for p in run["points"]:
            e = exact[p["name"]]
            assert p["rel_l2"] == pytest.approx(e["rel_l2"], rel=0.5, abs=1e-12), p["name"]
            if p["name"].startswith(grad.WEIGHT) and p["name"] != grad.WEIGHT + "final_norm" \
                    and "norm" not in p["name"]:
                assert p.get("estimated") is True, p["name"]   # sketched per row
    assert [(f["code"], f["where"]) for f in sk["findings"]] == [(f["code"], f["where"]) for f in full["findings"]]

    # What HF sketched on its device (weight gradients summed over prompts there) and what the
    # oracle's block-streamed float64 backward sketched are the whole runs' captures sketched
    # on the host, to float64 rounding (the float64 run's values rounded to float32 first: a
    # last-bit tie may round the other way)
    from llmdiff import safetensors_file, worker

    for run, rtol in (("hf-float32", 1e-9), ("oracle-float64-as-float32", 1e-6)):
        whole = safetensors_file.load(tmp_path / "full" / f"{run}.safetensors")
        want = worker._sketch_on_host(whole, "float32" if "as" in run else None)
        got = safetensors_file.load(tmp_path / "sketch" / f"{run}.safetensors")
        assert set(got) == set(want), run
        for k in want:
            if grad.is_grad(k):
                a, b = np.asarray(got[k], np.float64), np.asarray(want[k], np.float64)
                assert np.abs(a - b).max() <= rtol * max(np.abs(b).max(), 1e-300), (run, k)


# --- HF against the oracle ------------------------------------------------------------------

def _grad_rows(run):
    return [p for p in run["points"] if grad.is_grad(p["name"])]


def _worst(rows):
    return max(rows, key=lambda p: p["floor_ratio"])


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-7b", "qwen3-0.6b", "llama-3.2-1b", "gemma-2-2b", "phi-3-mini-4k-instruct",
                                   "gemma-3-1b", "qwen2.5-0.5b"])
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


# --- gradient checkpointing: HF's recompute path (--grad-checkpointing) ---------------------

def test_grad_checkpointing_needs_grad(llmdiff_cli):
    code, out, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad-checkpointing")
    assert code == 2 and "--grad-checkpointing acts on the gradients; add --grad" in out + err


@pytest.mark.slow   # two compares of a whole --grad run, float32 and bfloat16
@pytest.mark.parametrize("model", ["gemma-7b", "llama-3.2-1b"])
def test_hf_with_gradient_checkpointing_is_at_parity(llmdiff_cli, model):
    """transformers' own gradient checkpointing (train mode, its default checkpoint function):
    every layer is recomputed in the backward, and the forward, the loss and every gradient stay
    within the noise floors, float32 and bfloat16."""
    code, out, _, report = llmdiff_cli("compare", model, "--tiny", "--grad", "--grad-checkpointing", "--no-diagnose",
                                       "--no-tokenizer-parity", "--dtype", "float32", "--dtype", "bfloat16")
    assert code == 0, out
    assert report["options"]["grad_checkpointing"] is True
    spec = ModelSpec.from_dict(report["spec"])
    for dtype in ("float32", "bfloat16"):
        run = run_by_candidate(report, "hf", dtype)
        rows = _grad_rows(run)
        assert run["verdict"] == "parity" and run["missing_points"] == []
        assert [p["name"] for p in rows] == grad.grad_points(spec, report["options"]["points"])
        assert _worst(rows)["floor_ratio"] < 8
    gc = next(i for i in report["implementations"] if i["name"] == "hf")["details"]["grad_checkpointing"]
    assert gc["enabled"] and gc["function"] == "checkpoint"
    # the recompute did run: each layer once per prompt's backward (the last run's, bfloat16)
    assert gc["recomputed_layers"] == spec.num_layers * report["tokens"]["prompts"]


def _recompute_evidence(cand_off: float, plain_off: float | None):
    """One float32 run's weight gradients: the float64 answer, the oracle off it by float32
    roundings, the candidate off the oracle by `cand_off` (relative) and, unless None, its
    un-checkpointed gradients (`grad:plain:w:`) off by `plain_off`; compared as the run is."""
    from llmdiff import diff
    from llmdiff.grad_check import Evidence

    rng = np.random.default_rng(0)
    names = ["grad:w:final_norm", "grad:w:L0.down", "grad:w:embed"]
    truth = {n: rng.standard_normal((8, 16)) for n in names}
    oracle = {n: t.astype(np.float32).astype(np.float64) for n, t in truth.items()}

    def off(caps, by):
        return {n: (v * (1 + by * rng.standard_normal(v.shape))).astype(np.float32) for n, v in caps.items()}

    cand = off(oracle, cand_off)
    if plain_off is not None:
        cand.update({grad.PLAIN_WEIGHT + n[len(grad.WEIGHT):]: v for n, v in off(oracle, plain_off).items()})
    run = diff.compare_captures(cand, oracle, diff.noise_floors(oracle, truth, "float32"), "float32", names)
    return Evidence("cand", "float32", run, cand, oracle, truth, [[2, 5, 6]], shrink(get_spec("llama-3.1-8b")))


def _ld608(ev):
    from llmdiff.checks.checkpoint_recompute_differs import CheckpointRecomputeDiffers

    return CheckpointRecomputeDiffers().judge(ev)


def test_gradients_that_recover_without_checkpointing_are_ld608():
    ev = _recompute_evidence(1e-3, 0.0)
    assert ev.run["verdict"] == "divergence"
    (f,) = _ld608(ev)
    assert (f.code, f.where, f.confirmed) == ("LD608", ev.run["first_divergence"], True)
    e = f.evidence
    assert e["divergent_weights"] == 3 and e["checkpointed_worst"]["floor_ratio"] > 100
    assert e["plain_worst"]["floor_ratio"] <= ev.run["threshold"]["floor_factor"]
    assert all(5e-4 < v < 2e-3 for v in e["recompute_rel_l2"].values())


def test_gradients_off_without_checkpointing_too_are_not_ld608():
    assert _ld608(_recompute_evidence(1e-3, 1e-3)) == []     # the bug is not the recompute
    assert _ld608(_recompute_evidence(1e-3, None)) == []     # no un-checkpointed gradients
    assert _ld608(_recompute_evidence(0.0, 0.0)) == []       # nothing diverges


@pytest.mark.slow   # ~40 s on a shared CPU, each: one --grad compare of three HF runs, diagnosed
@pytest.mark.parametrize("capture", ["full", "sketch"])
def test_a_checkpoint_recompute_that_differs_is_ld608_alone(llmdiff_cli, mutants_on_path, capture):
    """Gradient checkpointing whose recompute differs from the forward, in precision (bfloat16
    autocast in a float32 run) or dropout state (attention dropout on in the recompute only):
    the forward and the loss are HF's, the gradients of the checkpointed layers are off; the
    same adapter's gradients with checkpointing off are at parity, so LD608 names it, confirmed,
    and nothing else does. A clean checkpointed HF: parity, no finding. Sketched too (the
    gradients without checkpointing summed over prompts on the device, then sketched)."""
    mutants = ("hf_mutants:CheckpointRecomputeUnderAutocast", "hf_mutants:CheckpointRecomputeWithDropout")
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--grad-checkpointing",
                                       "--impl", "hf", *[a for m in mutants for a in ("--impl", m)],
                                       "--dtype", "float32", "--no-tokenizer-parity", "--capture", capture)
    assert code == 1, out
    assert report["options"]["capture"] == capture
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"
    assert not [f for f in report["findings"] if f["implementation"] == "hf"]
    points = report["options"]["points"]
    for impl in mutants:
        run = run_by_candidate(report, impl, "float32")
        by_name = {p["name"]: p for p in run["points"]}
        assert all(by_name[p]["verdict"] == "parity" for p in points), impl              # the forward
        assert all(by_name[n]["verdict"] == "parity" for n in ("loss", *grad.SCALARS)), impl
        first = run["first_divergence"]
        assert first.startswith("grad:L1.") and by_name[first]["floor_ratio"] > 100, (impl, first)
        (f,) = [f for f in report["findings"] if f["implementation"] == impl]
        assert (f["code"], f["where"], f["confirmed"]) == ("LD608", first, True), f
        assert f["evidence"]["plain_worst"]["floor_ratio"] < by_name[first]["threshold"]
        assert f["evidence"]["checkpointed_worst"]["floor_ratio"] > 100
    assert "errors" not in report


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
    assert (f.code, f.where) == ("LD602", "loss:accumulated")
    ev = f.evidence
    assert ev["whole_batch"] == 3.5 and ev["accumulated"] == 6.0
    assert ev["matches"] == "the sum of the micro-batches' means" and ev["target_tokens"] == [4, 12]


@pytest.mark.slow
def test_a_loss_that_drops_num_items_in_batch_is_ld602(llmdiff_cli, mutants_on_path):
    """Forward and per-prompt gradients at parity; the accumulated loss is the sum of the
    micro-batches' means (k times too large for equal lengths, mis-weighted otherwise): the
    run diverges at loss:accumulated alone, which LD602 explains (no LD000 left there)."""
    impl = "hf_mutants:LossKwargsDropped"
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--impl", impl,
                                       "--dtype", "float32", "--no-tokenizer-parity")
    assert code == 1, out
    run = run_by_candidate(report, impl, "float32")
    assert run["first_divergence"] == "loss:accumulated"
    bad = [p["name"] for p in run["points"] if p["verdict"] == "divergence"]
    # The Trainer's step through the same forward: its loss and gradients are the sums' too
    assert bad[:2] == ["loss:accumulated", "loss:trainer"] and all(n.startswith(grad.TRAINER_WEIGHT) for n in bad[2:])
    assert {(f["code"], f["where"]) for f in report["findings"]} == {("LD602", "loss:accumulated"),
                                                                    ("LD602", "loss:trainer")}
    for f in report["findings"]:
        assert f["evidence"]["matches"] == "the sum of the micro-batches' means"
    assert next(f for f in report["findings"] if f["where"] == "loss:trainer")["confirmed"]


def _trainer(micro_batches, rel=None):
    return {"gradient_accumulation_steps": len(micro_batches), "micro_batches": micro_batches,
            "loss": sum(micro_batches), "norm_gradient_rel_l2": rel}


def test_a_trainer_step_normalised_per_micro_batch_is_named_at_loss_trainer():
    """transformers' Trainer before 4.46: each micro-batch's mean over the accumulation steps
    (the mean of the means); confirmed when the step's gradient is that form's too."""
    means, lengths = [2.0, 4.0], [5, 13]                     # whole batch 3.5, mean of means 3.0
    right = {"own_loss": means, "own_loss_accumulated": {"micro_batches": [0.5, 3.0]}}
    assert _ld602({**right, "trainer": _trainer([0.5, 3.0])}, lengths) == []
    rel = {"the whole batch's": 0.4, "the sum of the micro-batches' means": 0.6,
           "the mean of the micro-batches' means": 1e-7}
    (f,) = _ld602({**right, "trainer": _trainer([1.0, 2.0], rel)}, lengths)
    assert (f.code, f.where, f.confirmed) == ("LD602", "loss:trainer", True)
    assert f.evidence["matches"] == "the mean of the micro-batches' means" and f.evidence["accumulated"] == 3.0
    (f,) = _ld602({**right, "trainer": _trainer([1.0, 2.0])}, lengths)   # no gradient evidence: named only
    assert f.where == "loss:trainer" and not f.confirmed
    far = {**rel, "the mean of the micro-batches' means": 0.3}           # a gradient of neither: not confirmed
    assert not _ld602({**right, "trainer": _trainer([1.0, 2.0], far)}, lengths)[0].confirmed
    assert _ld602({**right, "trainer": {"error": "no Trainer"}}, lengths) == []


def test_one_micro_batch_is_never_ld602():
    """One prompt (a full-size run's one 512-token prompt): the whole batch is the one
    micro-batch, every form the same number and gradient; nothing to name (an H200 run of
    gemma-7b named LD602 from rel L2 0 to every form)."""
    rel = {"the whole batch's": 0.0, "the sum of the micro-batches' means": 0.0,
           "the mean of the micro-batches' means": 0.0}
    assert _ld602({"own_loss": [12.8948], "trainer": _trainer([12.8948], rel)}, [512]) == []
    assert _ld602({"own_loss": [12.8948], "own_loss_accumulated": {"micro_batches": [12.8948]}}, [512]) == []


def test_a_trainer_step_of_prompts_with_alike_losses_is_named_by_its_gradient():
    """Random weights give every prompt a loss near log(vocab): the mean of the means is then
    the whole batch's to 1e-5 (transformers 4.45.2 on tiny Llama 3.2: 6.28031 against 6.28042),
    under what the losses can tell; the step's gradient is still the mean of the micro-batches'
    means (rel L2 2.7e-8) and 0.73 from the whole batch's: LD602, confirmed."""
    means, lengths = [6.28013277053833, 6.280488014221191], [38, 192]
    rel = {"the whole batch's": 0.7300422189312004, "the sum of the micro-batches' means": 0.5000000013276255,
           "the mean of the micro-batches' means": 2.681452951226417e-08}
    (f,) = _ld602({"own_loss": means, "trainer": _trainer([3.140066385269165, 3.1402440071105957], rel)}, lengths)
    assert (f.code, f.where, f.confirmed) == ("LD602", "loss:trainer", True)
    assert f.evidence["matches"] == "the mean of the micro-batches' means"
    assert abs(f.evidence["ratio"] - 1) < 1e-4        # the losses alone could not have said it


@pytest.mark.slow   # ~70 s on a shared CPU
def test_the_trainer_step_is_at_parity_and_per_micro_batch_normalisation_is_ld602(llmdiff_cli, mutants_on_path):
    """transformers' Trainer, one step accumulating one micro-batch per prompt: its loss and
    every weight's accumulated gradient at parity (float32 and bfloat16); the Trainer before PR
    34191 (no num_items_in_batch, each micro-batch's mean over the steps) diverges first at
    loss:trainer, then only at its own gradients, and LD602 alone names it, confirmed."""
    impl = "hf_mutants:TrainerLossPerMicroBatch"
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--impl", "hf", "--impl", impl,
                                       "--dtype", "float32", "--dtype", "bfloat16", "--no-tokenizer-parity")
    assert code == 1, out
    details = {i["name"]: i["details"] for i in report["implementations"]}
    assert details["hf"]["trainer"]["gradient_accumulation_steps"] == report["tokens"]["prompts"] > 1
    for dtype in ("float32", "bfloat16"):
        clean = run_by_candidate(report, "hf", dtype)
        trainer = [p for p in clean["points"] if p["name"].startswith(("loss:trainer", grad.TRAINER_WEIGHT))]
        assert clean["verdict"] == "parity" and clean["missing_points"] == []
        assert len(trainer) > 10 and _worst(trainer)["floor_ratio"] < 8
        run = run_by_candidate(report, impl, dtype)
        bad = [p["name"] for p in run["points"] if p["verdict"] == "divergence"]
        assert run["first_divergence"] == "loss:trainer" and bad[0] == "loss:trainer"
        assert all(n.startswith(grad.TRAINER_WEIGHT) for n in bad[1:]) and len(bad) == len(trainer)
    (f,) = report["findings"]
    assert (f["code"], f["implementation"], f["where"], f["confirmed"]) == ("LD602", impl, "loss:trainer", True)
    assert f["evidence"]["matches"] == "the mean of the micro-batches' means" and "errors" not in report


@pytest.mark.slow   # 28 s: a --grad compare with the Trainer's step and diagnosis
def test_a_trainer_that_counts_unshifted_labels_is_ld609_alone(llmdiff_cli, mutants_on_path):
    """The Trainer's token count with each sequence's first label in it (transformers 4.46.2):
    the step's loss and gradient are the whole batch's times N / (N + S); LD609 names it,
    confirmed by the gradient's scale, and LD602 (a per-micro-batch mean) does not."""
    impl = "hf_mutants:TrainerCountsUnshiftedLabels"
    code, out, _, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--impl", impl, "--dtype",
                                       "float32", "--no-tokenizer-parity")
    assert code == 1, out
    run = run_by_candidate(report, impl, "float32")
    assert run["first_divergence"] == "loss:trainer"
    (f,) = report["findings"]
    assert (f["code"], f["where"], f["confirmed"]) == ("LD609", "loss:trainer", True)
    lengths = report["tokens"]["lengths"]
    n = sum(x - 1 for x in lengths)
    assert f["evidence"]["expected_ratio"] == n / (n + len(lengths))
    assert abs(f["evidence"]["ratio"] - n / (n + len(lengths))) < 1e-6


def test_a_trainer_step_that_cannot_run_is_an_error_not_a_quiet_gap(llmdiff_cli, mutants_on_path):
    """--grad asks for transformers' Trainer step: where it cannot run (here it raises) the
    compare says so as an error (exit 2), and every gradient it did compare is kept."""
    impl = "hf_mutants:TrainerCannotRun"
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--grad", "--impl", impl, "--dtype",
                                         "float32", "--no-diagnose", "--no-tokenizer-parity")
    assert code == 2, out + err
    (e,) = report["errors"]
    assert e["stage"] == "Trainer step" and "needs accelerate>=0.26.0" in e["error"] and impl in e["error"]
    run = run_by_candidate(report, impl, "float32")
    assert run["verdict"] == "parity" and "loss:trainer" in run["missing_points"]
    assert any(p["name"].startswith(grad.WEIGHT) for p in run["points"])
    assert "Trainer step could not run" in out + err


def test_micro_batches_of_neither_normalisation_are_not_ld602():
    """Per-prompt means that are themselves off (a loss counting ignored labels): the
    accumulated sum is neither their sum nor their mean, and LD602 says nothing."""
    means, lengths = [2.0, 4.0], [5, 13]
    assert _ld602({"own_loss": means, "own_loss_accumulated": {"micro_batches": [2.2, 3.9]}}, lengths) == []


# --- the own-loss cases: padding, ignore_index, accumulation (LD603-LD606) -------------------

def test_the_batch_is_right_padded_with_ignored_labels():
    ids, mask, labels = grad.batch_labels([[5, 6, 7], [8, 9, 10, 11, 12]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert labels.tolist() == [[5, 6, 7, -100, -100], [8, 9, 10, 11, 12]]
    _, _, masked = grad.batch_labels([[5, 6, 7], [8, 9, 10, 11, 12]], ignore_prompt=True)
    assert masked.tolist() == [[-100, 6, 7, -100, -100], [-100, -100, 10, 11, 12]]


def _hf_loss(logits, labels, num_items=None, shift=1, mean_over_all=False):
    """transformers' `ForCausalLMLoss` on float64 torch tensors, or a known bug's form of it."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    if shift == 1 and not mean_over_all:
        n = None if num_items is None else torch.tensor(num_items)
        return float(ForCausalLMLoss(x, y, x.shape[-1], num_items_in_batch=n))
    shifted = torch.nn.functional.pad(y, (0, shift), value=-100)[..., shift:]
    per = torch.nn.functional.cross_entropy(x.reshape(-1, x.shape[-1]), shifted.reshape(-1), ignore_index=-100,
                                            reduction="none")
    if mean_over_all:
        return float(per.mean())
    return float(per.sum() / (num_items if num_items is not None else (shifted != -100).sum()))


@pytest.mark.slow   # ~13 s on a shared CPU: eager JAX compiles each slice's shape
def test_the_oracle_loss_written_in_full_is_transformers_for_causal_lm_loss():
    """No model: `gemma_grad.own_loss` (float64) of a padded batch, with ignored prompt halves,
    and of micro-batches given `num_items_in_batch`, is transformers' `ForCausalLMLoss` of the
    same logits and labels; each bug's knob is that bug's form of it; the micro-batches sum to
    the whole batch (the reference since the Trainer's gradient accumulation fix)."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    from llmdiff.references import gemma, gemma_grad

    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(3, 50, 7)), list(rng.integers(3, 50, 12)), list(rng.integers(3, 50, 4))]
    T, V = 12, 50
    padded = rng.standard_normal((3, T, V)) * 3                     # the pads' logits: never read
    logits = [jnp.asarray(padded[b, :len(t)]) for b, t in enumerate(prompts)]
    p = gemma.Precision()

    def own(labels, q=p, **kw):
        return float(gemma_grad.own_loss(logits, labels, q, **kw))

    _, _, labels = grad.batch_labels(prompts)
    _, _, masked = grad.batch_labels(prompts, ignore_prompt=True)
    for lab in (labels, masked):
        assert abs(own(lab) - _hf_loss(padded, lab)) < 1e-6 * own(lab)   # HF upcasts to float32 only
        pos = dataclasses.replace(p, loss_denominator="positions")
        assert abs(own(lab, pos) - _hf_loss(padded, lab, mean_over_all=True)) < 1e-12
        for s in (0, 2):
            assert abs(own(lab, dataclasses.replace(p, loss_label_shift=s)) - _hf_loss(padded, lab, shift=s)) < 1e-12
    n = sum(len(t) - 1 for t in prompts)
    parts = [float(gemma_grad.own_loss([x], grad.batch_labels([t])[2], p, num_items_in_batch=n))
             for x, t in zip(logits, prompts)]
    hf_parts = [_hf_loss(padded[b:b + 1, :len(t)], grad.batch_labels([t])[2], num_items=n)
                for b, t in enumerate(prompts)]
    np.testing.assert_allclose(parts, hf_parts, rtol=1e-6)
    assert abs(sum(parts) - own(labels)) < 1e-12                    # accumulation is the whole batch
    assert own(labels, dataclasses.replace(p, loss_denominator="positions")) < 0.8 * own(labels)


def test_every_training_check_names_a_knob_the_oracle_takes():
    from llmdiff import registry
    from llmdiff.grad_check import GradCheck, GradEvidenceCheck
    from llmdiff.references.gemma import Precision

    checks = [c for c in registry.load_checks()[0] if isinstance(c, GradCheck)]
    assert {c.code for c in checks} >= {"LD603", "LD604", "LD605", "LD606"}
    for c in checks:
        assert c.knob is None and c.kind == "dynamic"       # the forward diagnosis never tries it
        for variant in c.grad_variants():
            Precision.from_knobs(variant)                   # a field, a value it takes
            # read only by gemma_grad: the loss function's knobs, the norms' backward
            assert all(k.startswith("loss_") for k in variant)
    evidence = [c for c in registry.load_checks()[0] if isinstance(c, GradEvidenceCheck)]
    assert {c.code for c in evidence} >= {"LD607", "LD608"} and all(c.knob is None for c in evidence)


@pytest.mark.slow
def test_each_loss_bug_is_named_by_its_own_check(llmdiff_cli, mutants_on_path):
    """Gemma 2 (its final soft-cap), float32: every mutant's forward, per-prompt loss and
    gradients are HF's; its own loss diverges at loss:batch, and re-running the oracle's loss
    with its check's knob, and no other, brings it back under the floor."""
    expected = {"hf_mutants:LossMeanOverPadding": "LD603", "hf_mutants:LabelsNotShifted": "LD604",
                "hf_mutants:LabelsShiftedTwice": "LD605", "hf_mutants:LossBeforeFinalSoftcap": "LD606",
                "hf_mutants:LossKwargsDropped": "LD602"}
    args = [a for impl in expected for a in ("--impl", impl)]
    code, out, _, report = llmdiff_cli("compare", "gemma-2-2b", "--tiny", "--grad", "--impl", "hf", *args,
                                       "--dtype", "float32", "--no-tokenizer-parity")
    assert code == 1, out
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"
    points = report["options"]["points"]
    for impl, code_ in expected.items():
        run = run_by_candidate(report, impl, "float32")
        by_name = {p["name"]: p for p in run["points"]}
        assert all(by_name[p]["verdict"] == "parity" for p in points), impl           # the forward
        assert by_name["loss"]["verdict"] == "parity" and by_name["grad:w:embed"]["verdict"] == "parity", impl
        mine = [f for f in report["findings"] if f["implementation"] == impl]
        assert {f["code"] for f in mine} == {code_}, (impl, mine)
        if code_ != "LD602":
            assert run["first_divergence"] == "loss:batch" and by_name["loss:batch"]["floor_ratio"] > 1000, impl
            (f,) = mine
            assert f["confirmed"] and f["where"] == "loss:batch" and f["evidence"]["floor_ratio_after"] < 8
        else:   # the model's accumulated loss, and the Trainer's through the same forward
            assert run["first_divergence"] == "loss:accumulated"
            assert {f["where"] for f in mine} == {"loss:accumulated", "loss:trainer"}
    assert "errors" not in report


# --- LD607: NaN/Inf gradients through untrained (zero or near-zero) embedding rows -----------

def _evidence(cand_nan_at, rows_scale, tokens=((2, 5, 6, 7), (2, 8, 9))):
    """Captures of one run: `embed` (1, T, 4) with the rows of `rows_scale` ({token: factor})
    scaled, the candidate's grad:embed NaN at the positions `cand_nan_at` and grad:w:embed NaN
    at their tokens' rows; the oracle finite everywhere."""
    from llmdiff.grad_check import Evidence

    rng = np.random.default_rng(0)
    flat = [t for p in tokens for t in p]
    embed = rng.standard_normal((1, len(flat), 4))
    for k, t in enumerate(flat):
        embed[0, k] *= rows_scale.get(t, 1.0)
    g = rng.standard_normal((1, len(flat), 4))
    gw = rng.standard_normal((16, 4))
    cand_g, cand_gw = g.copy(), gw.copy()
    for k in cand_nan_at:
        cand_g[0, k] = np.nan
        cand_gw[flat[k]] = np.nan
    oracle = {"embed": embed, "grad:embed": g, "grad:w:embed": gw, "grad:L0.out": g}
    cand = {**oracle, "grad:embed": cand_g, "grad:w:embed": cand_gw}
    run = {"points": [{"name": n} for n in ("loss", "grad:L0.out", "grad:embed", "grad:w:embed")]}
    return Evidence("cand", "float32", run, cand, oracle, oracle, [list(p) for p in tokens],
                    shrink(get_spec("llama-3.1-8b")))


def _ld607(ev):
    from llmdiff.checks.non_finite_gradient_at_untrained_rows import NonFiniteGradientAtUntrainedRows

    return NonFiniteGradientAtUntrainedRows().judge(ev)


def test_nan_gradients_at_zero_rows_are_named_with_the_rows():
    (f,) = _ld607(_evidence([1, 6], {5: 0.0, 9: 1e-22}))   # token 5 (prompt 0 pos 1), token 9 (prompt 1 pos 2)
    assert (f.code, f.where, f.implementation) == ("LD607", "grad:embed", "cand")
    ev = f.evidence
    assert [(r["token"], r["prompt"], r["position"]) for r in ev["rows"]] == [(5, 0, 1), (9, 1, 2)]
    assert ev["rows"][0]["relative_norm"] == 0.0 and 0 < ev["rows"][1]["relative_norm"] < 1e-20
    assert ev["non_finite_points"] == {"grad:embed": [[0, 1], [1, 2]]}
    assert ev["non_finite_embedding_rows"] == [5, 9] and ev["non_finite_weights"] == {"grad:w:embed": 8}


def test_nan_gradients_that_start_at_trained_rows_are_not_ld607():
    assert _ld607(_evidence([1, 5], {5: 0.0})) == []     # token 8's row (position 5) is an ordinary one
    assert _ld607(_evidence([], {5: 0.0})) == []         # zero rows, finite gradients: nothing
    ev = _evidence([1], {5: 0.0})
    ev.oracle = {**ev.oracle, "grad:embed": ev.cand["grad:embed"]}   # the oracle non-finite too
    ev.truth = ev.oracle
    (f,) = _ld607(ev)                                    # only the table's rows are left
    assert f.where == "grad:w:embed" and f.evidence["non_finite_embedding_rows"] == [5]


def _zero_row_checkpoint(tmp_path):
    """Tiny Llama 3.1 8B whose embedding rows of two prompt tokens are untrained: one zero, one
    1e-22 times its random row (`--tokens 16,24` synthetic prompts, seed 0)."""
    from llmdiff import inputs, weights

    spec = get_spec("llama-3.1-8b", tiny=True)
    canon = weights.random_weights(spec, seed=0)
    prompts = inputs.synthetic_prompts(spec, 0, [16, 24])
    zero, tiny = prompts[0][5], prompts[1][9]
    canon["embed"] = canon["embed"].copy()
    canon["embed"][zero] = 0
    canon["embed"][tiny] *= 1e-22
    return weights.write_hf_checkpoint(tmp_path / "zero-rows", spec, canon, dtype="float32"), zero, tiny


@pytest.mark.slow   # ~70 s on a shared CPU, each
@pytest.mark.parametrize("capture", ["full", "sketch"])
def test_a_norm_backward_without_eps_gives_nan_at_untrained_rows_and_is_ld607(llmdiff_cli, mutants_on_path, tmp_path,
                                                                             capture):
    """Untrained rows hit by the prompts: HF's own backward stays finite and at parity (its
    eps is in the backward too); the mutant's (the projection term over mean(x^2), no eps) is
    NaN at those positions of grad:embed and those rows of grad:w:embed, every other gradient at
    parity; LD607 names it with the rows, in both dtypes, and nothing else is said. Sketched
    too: a non-finite value makes its position's (its row's) sketch non-finite."""
    ckpt, zero, tiny = _zero_row_checkpoint(tmp_path)
    impl = "hf_mutants:NormBackwardDividesByRms"
    code, out, _, report = llmdiff_cli("compare", "llama-3.1-8b", "--tiny", "--weights", str(ckpt), "--tokens", "16,24",
                                       "--grad", "--impl", "hf", "--impl", impl, "--dtype", "float32",
                                       "--dtype", "bfloat16", "--no-tokenizer-parity", "--capture", capture)
    assert report["options"]["capture"] == capture
    assert code == 1, out
    for dtype in ("float32", "bfloat16"):
        clean = run_by_candidate(report, "hf", dtype)
        assert clean["verdict"] == "parity" and _worst(_grad_rows(clean))["floor_ratio"] < 8
        run = run_by_candidate(report, impl, dtype)
        bad = [p["name"] for p in run["points"] if p["verdict"] == "divergence"]
        trainer = [p["name"] for p in run["points"] if p["name"].startswith(grad.TRAINER_WEIGHT)]
        # The Trainer's step is NaN in every weight: it takes the gradients' norm even with
        # clipping off (`clip_grad_norm_(params, inf)`), which multiplies each gradient by
        # clamp(inf / NaN, max=1) = NaN, so one NaN row poisons the whole step.
        weights = [p["name"] for p in run["points"] if p["name"].startswith(grad.WEIGHT)]
        assert len(trainer) == len(weights) == 21 and bad == ["grad:embed", "grad:w:embed", *trainer], (dtype, bad)
        assert not any(p["finite"] for p in run["points"] if p["name"] in trainer)
    assert {(f["code"], f["implementation"], f["where"]) for f in report["findings"]} == {("LD607", impl, "grad:embed")}
    assert len(report["findings"]) == 2 and "errors" not in report
    ev = report["findings"][0]["evidence"]
    assert [(r["token"], r["prompt"], r["position"]) for r in ev["rows"]] == [(zero, 0, 5), (tiny, 1, 9)]
    assert ev["non_finite_embedding_rows"] == sorted([zero, tiny])


def test_a_sketched_weight_gradient_is_given_once_for_the_batch():
    """|a + b|^2 is not |a|^2 + |b|^2: per-prompt sketches of a weight gradient cannot be summed."""
    s = np.ones((4, 65))
    assert (grad.combine([{"grad:w:embed:sketch": s}, {}])["grad:w:embed:sketch"] == s).all()
    with pytest.raises(ValueError, match="once for the whole batch"):
        grad.combine([{"grad:w:embed:sketch": s}, {"grad:w:embed:sketch": s}])
