"""Compare captures: metrics per point, a noise floor per point, verdicts. numpy only.

The noise floor of a point at a dtype is how far a correct implementation sits from the exact
answer there: the oracle at that dtype against the oracle in float64 (with the same dtype's
conventions, e.g. the embedding normaliser rounded to bfloat16), the float64 values rounded to
the dtype first so that merely representing a number is not counted as error. It is per point,
never one tolerance per dtype: bfloat16-only bugs (embedding-scale rounding) are far below
bfloat16 noise at the logits but break exactness where they act, where the floor is zero.

A candidate point diverges when its relative L2 distance to the reference exceeds
`FLOOR_FACTOR` times the floor (never less than `MIN_FLOOR` of the dtype's unit roundoff).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np

FLOOR_FACTOR = 8.0
# The smallest floor, as a fraction of the dtype's unit roundoff: a point the oracle computes
# exactly still lets a correct implementation differ by the last bit in a few elements.
MIN_FLOOR = 0.02
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
TOPK = 5


@dataclass(frozen=True)
class Thresholds:
    """How many times its noise floor a point may be off before it diverges."""

    floor_factor: float = FLOOR_FACTOR
    per_point: dict = field(default_factory=dict)  # glob ("L*.q", "logits") -> factor; first match wins

    def factor(self, point: str) -> float:
        for pattern, factor in self.per_point.items():
            if fnmatch.fnmatchcase(point, pattern):
                return float(factor)
        return self.floor_factor

    def to_dict(self) -> dict:
        return {"floor_factor": self.floor_factor, "per_point": dict(self.per_point)}


DEFAULT_THRESHOLDS = Thresholds()


def round_to(a: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values rounded to `dtype` (round to nearest even), returned as float64."""
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(a, np.float64).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(a, np.float64).astype(dtype).astype(np.float64)


def point_metrics(cand: np.ndarray, ref: np.ndarray) -> dict:
    c = np.asarray(cand, np.float64).ravel()
    r = np.asarray(ref, np.float64).ravel()
    d = c - r
    ref_norm = float(np.linalg.norm(r))
    cand_norm = float(np.linalg.norm(c))
    diff_norm = float(np.linalg.norm(d))
    if ref_norm > 0:
        rel_l2 = diff_norm / ref_norm
    else:
        rel_l2 = 0.0 if diff_norm == 0 else float("inf")
    if ref_norm > 0 and cand_norm > 0:
        cosine = float(np.dot(c, r) / (cand_norm * ref_norm))
    else:
        cosine = 1.0 if diff_norm == 0 else 0.0
    return {"max_abs": float(np.max(np.abs(d))) if d.size else 0.0,
            "mean_abs": float(np.mean(np.abs(d))) if d.size else 0.0,
            "rel_l2": rel_l2, "cosine": cosine, "finite": bool(np.isfinite(c).all())}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logits_metrics(cand: np.ndarray, ref: np.ndarray, k: int = TOPK) -> dict:
    """KL(ref || cand) per position (mean), top-1 agreement, mean top-k overlap."""
    c = np.asarray(cand, np.float64).reshape(-1, cand.shape[-1])
    r = np.asarray(ref, np.float64).reshape(-1, ref.shape[-1])
    if not (np.isfinite(c).all() and np.isfinite(r).all()):
        return {"kl_mean": float("nan"), "top1_agreement": 0.0, "topk_overlap": 0.0, "k": k}
    lr, lc = _log_softmax(r), _log_softmax(c)
    kl = (np.exp(lr) * (lr - lc)).sum(axis=-1)
    top1 = float(np.mean(c.argmax(-1) == r.argmax(-1)))
    k = min(k, r.shape[-1])
    tc = np.argsort(-c, axis=-1)[:, :k]
    tr = np.argsort(-r, axis=-1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(tc, tr)])
    return {"kl_mean": float(kl.mean()), "top1_agreement": top1, "topk_overlap": float(overlap), "k": k}


def noise_floors(ref_caps: dict, truth_caps: dict, dtype: str) -> dict[str, float]:
    """Per point: relative L2 of the oracle at `dtype` from the float64 oracle rounded to it."""
    floors = {}
    for name, truth in truth_caps.items():
        if name in ref_caps:
            floors[name] = point_metrics(ref_caps[name], round_to(truth, dtype))["rel_l2"]
    return floors


def compare_captures(cand_caps: dict, ref_caps: dict, floors: dict, dtype: str,
                     points: list[str], thresholds: Thresholds = DEFAULT_THRESHOLDS) -> dict:
    """The run's points (in forward order), first divergence, verdict and logits metrics."""
    min_floor = MIN_FLOOR * UNIT_ROUNDOFF[dtype]
    rows, missing = [], []
    for name in points:
        if name not in cand_caps or name not in ref_caps:
            missing.append(name)
            continue
        cand, ref = cand_caps[name], ref_caps[name]
        if cand.shape != ref.shape:
            rows.append({"name": name, "verdict": "divergence",
                         "note": f"shape {tuple(cand.shape)} vs reference {tuple(ref.shape)}"})
            continue
        m = point_metrics(cand, ref)
        floor = max(floors.get(name, 0.0), min_floor)
        ratio = m["rel_l2"] / floor
        factor = thresholds.factor(name)
        diverges = (not m["finite"]) or ratio > factor
        rows.append({"name": name, **m, "noise_floor": floor, "floor_ratio": ratio, "threshold": factor,
                     "verdict": "divergence" if diverges else "parity"})
    first = next((r["name"] for r in rows if r["verdict"] == "divergence"), None)
    run = {"dtype": dtype, "verdict": "divergence" if first else "parity",
           "first_divergence": first, "points": rows, "missing_points": missing,
           "threshold": {**thresholds.to_dict(), "min_floor": min_floor}}
    if "logits" in cand_caps and "logits" in ref_caps and cand_caps["logits"].shape == ref_caps["logits"].shape:
        run["logits"] = logits_metrics(cand_caps["logits"], ref_caps["logits"])
    return run


def attach_forced(run: dict, forced: dict) -> None:
    """Attach the teacher-forced comparison to a run. The run's verdict stays the free-running
    one: a local difference below the accumulated noise fails a run only when a known bug's
    counterfactual confirms it (a finding); otherwise it is shown, not judged."""
    run["forced"] = forced
    if run["verdict"] == "parity" and forced.get("verdict") == "divergence":
        run["local_divergence"] = forced["first_divergence"]
