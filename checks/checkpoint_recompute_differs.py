from llmdiff.check import ALL_FAMILIES
from llmdiff.grad_check import GradEvidenceCheck


class CheckpointRecomputeDiffers(GradEvidenceCheck):
    """## What it finds
    Gradient checkpointing whose recompute is not the forward it replaces: each checkpointed
    layer's forward runs again in the backward to give it the activations it did not keep, and
    that second run differs from the first. The forward, the loss and every activation are the
    model's own; the backward differentiates another function. The two known ways:
    - another precision: a float32 model's layers recomputed under `torch.autocast(bfloat16)`
      (or a forward under autocast recomputed without it): a checkpoint function that does not
      save the forward's autocast state and restore it around the recompute runs the recompute
      under whatever state surrounds `backward()`;
    - another dropout state: dropout on in the recompute and not in the forward (a model put in
      train mode between the two), or a different random mask (the RNG state not saved and
      restored: `preserve_rng_state=False`, or a generator advanced by other work in between).

    ## Why it matters
    Nothing fails and the loss looks normal: every inference test passes, so does a training
    smoke test, and only the gradients of the checkpointed layers are off (bfloat16 roundings in
    a float32 run: relative errors near 1e-3 where 1e-7 is expected; a wrong dropout mask: a
    gradient of another network). Fine-tuning with checkpointing, the usual setting for memory,
    then trains on gradients the model without checkpointing would not have.

    ## How it is confirmed
    Dynamic, `compare --grad --grad-checkpointing`, from the run's own numbers, by the
    implementation's own counterfactual: with checkpointing, the forward and the loss are at
    parity with the oracle and gradients diverge; the same implementation's weight gradients
    for the same prompts with checkpointing off (`grad:plain:w:NAME`, computed in the same run,
    train mode, nothing recomputed) are all within their noise floors against the oracle's. The
    evidence gives the worst checkpointed and un-checkpointed weight gradients (times their
    floors) and how far the recompute moves each weight's gradient (relative L2, checkpointed vs
    not). An oracle knob (the oracle's layers recomputed under bfloat16 autocast for the
    backward) was tried and measured instead: it cannot bring a float32 run's gradients under
    their float32 floors, since every float32-level difference of the recompute's inputs flips
    whole bfloat16 last bits (torch's CPU bfloat16 GELU alone differs from any JAX formula in
    0.4% of values): docs/design.md.

    ## Fix
    Replay the forward exactly in the recompute: torch's `torch.utils.checkpoint.checkpoint`
    saves the device and CPU autocast state and the RNG state at the forward and restores them
    (keep `preserve_rng_state=True`); a custom checkpoint function must do the same, or use
    `use_reentrant=False`, whose recompute is checked against the forward's tensors' dtypes and
    shapes. Call `backward()` outside the autocast region as torch's AMP recipe says, and do not
    change `model.train()` / `model.eval()` between a step's forward and its backward.

    ## References
    `torch.utils.checkpoint` (`CheckpointFunction`: `had_autocast_in_fwd`, the saved
    `device_autocast_kwargs` / `cpu_autocast_kwargs` and RNG state); transformers
    `GradientCheckpointingLayer`, `PreTrainedModel.gradient_checkpointing_enable`.
    """

    code = "LD608"
    name = "checkpoint-recompute-differs"
    families = ALL_FAMILIES
    dtypes = ("float32", "bfloat16", "autocast-bfloat16", "autocast-float16")

    def judge(self, ev):
        import numpy as np

        from llmdiff import diff
        from llmdiff import grad as names
        from llmdiff.diff import point_metrics
        from llmdiff.sketch import Sketch

        plain = {names.WEIGHT + n[len(names.PLAIN_WEIGHT):]: v for n, v in ev.cand.items()
                 if n.startswith(names.PLAIN_WEIGHT)}
        diverged = [r for r in ev.run["points"] if r["name"].startswith(names.WEIGHT)
                    and r["verdict"] == "divergence" and r["name"] in plain]
        if not plain or not diverged or ev.run.get("first_divergence") is None:
            return []
        t = ev.run.get("threshold", {})
        thresholds = diff.Thresholds(t.get("floor_factor", diff.DEFAULT_THRESHOLDS.floor_factor),
                                     dict(t.get("per_point", {})))
        weights = [r["name"] for r in ev.run["points"] if r["name"] in plain]
        floors = diff.noise_floors(ev.oracle, ev.truth, ev.dtype)
        counter = diff.compare_captures(plain, ev.oracle, floors, ev.dtype, weights, thresholds)
        rows = [r for r in counter["points"] if "floor_ratio" in r]
        if counter["verdict"] != "parity" or len(rows) != len(weights):
            return []   # without checkpointing it diverges too: not the recompute

        def rel(a, b):
            if isinstance(a, Sketch) or isinstance(b, Sketch):  # --capture sketch: estimated
                return point_metrics(a, b)["rel_l2"]
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            n = np.linalg.norm(b)
            return float(np.linalg.norm(a - b) / n) if n > 0 else float(np.linalg.norm(a - b))

        moved = {r["name"]: rel(ev.cand[r["name"]], plain[r["name"]]) for r in diverged if r["name"] in ev.cand}
        worst = max(diverged, key=lambda r: r.get("floor_ratio", float("inf")))
        worst_plain = max(rows, key=lambda r: r["floor_ratio"])
        where = ev.run["first_divergence"]
        return [self.finding(
            ev, where,
            f"with gradient checkpointing the backward diverges from {where} on ({len(diverged)} weight"
            f" gradient(s), worst {worst['name']} {worst.get('floor_ratio', float('nan')):.3g} times its floor);"
            f" the same implementation's weight gradients with checkpointing off are all within their floors"
            f" (worst {worst_plain['name']} {worst_plain['floor_ratio']:.3g} times): its recompute is not its"
            f" forward (relative L2 of the recompute's effect up to {max(moved.values(), default=0.0):.3g})",
            {"point": where, "divergent_weights": len(diverged),
             "checkpointed_worst": {"name": worst["name"], "floor_ratio": worst.get("floor_ratio"),
                                    "rel_l2": worst.get("rel_l2")},
             "plain_worst": {"name": worst_plain["name"], "floor_ratio": worst_plain["floor_ratio"],
                             "rel_l2": worst_plain["rel_l2"]},
             "recompute_rel_l2": dict(sorted(moved.items(), key=lambda kv: -kv[1])[:10]),
             "backward_only": True},
            confirmed=True)]
