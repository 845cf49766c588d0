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
import math
import os
from dataclasses import dataclass, field

import numpy as np

from llmdiff import sketch
from llmdiff.sketch import Sketch

FLOOR_FACTOR = 8.0
# The smallest floor, as a fraction of the dtype's unit roundoff: a point the oracle computes
# exactly still lets a correct implementation differ by the last bit in a few elements.
MIN_FLOOR = 0.02
# An autocast run's points are float32 where no matrix product made them (its measured floors
# carry the bfloat16 rounding where one did): float32's smallest floor.
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8,
                 "autocast-bfloat16": 2.0**-24, "autocast-float16": 2.0**-24}
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
    """float64 values rounded to `dtype` (round to nearest even), returned as float64. An
    autocast run's points are float32 or bfloat16, op by op: rounded to float32 (a point in
    bfloat16 keeps its rounding in its floor). To bfloat16 through float32, as torch and XLA
    round a float64 value on the device (a float64 floor run's sketch): ml_dtypes 0.7 rounds
    float64 to bfloat16 directly, which differs in about 1 value in 100000 (a tie of the
    float32 value), ml_dtypes 0.6 as torch."""
    from llmdiff.job import params_dtype

    dtype = params_dtype(dtype)
    if dtype == "bfloat16":
        import ml_dtypes

        return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    return np.asarray(a, np.float64).astype(dtype).astype(np.float64)


_CHUNK_ELEMENTS = 1 << 21  # per thread step: float64 temporaries of a few MB stay in cache


def _by_rows(fn, *arrays) -> list:
    """fn over row blocks of same-shaped arrays (last axis kept), in threads: numpy releases
    the GIL in its loops, so full-size captures (512 x 256k logits) use every core."""
    flat = [np.asarray(a).reshape(-1, a.shape[-1] if a.ndim else 1) for a in arrays]
    rows = flat[0].shape[0]
    step = max(1, _CHUNK_ELEMENTS // max(1, flat[0].shape[1]))
    blocks = [slice(lo, min(rows, lo + step)) for lo in range(0, rows, step)]
    if len(blocks) <= 1:
        return [fn(*(a[b] for a in flat)) for b in blocks]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(len(blocks), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda b: fn(*(a[b] for a in flat)), blocks))


def _pair_sums(c, r):
    c, r = c.astype(np.float64), r.astype(np.float64)
    d = (c - r).ravel()
    a = np.abs(d)
    c, r = c.ravel(), r.ravel()
    return (float(d @ d), float(r @ r), float(c @ c), float(c @ r), float(a.max()) if a.size else 0.0,
            float(a.sum()), bool(np.isfinite(c).all()))


def point_metrics(cand: np.ndarray, ref: np.ndarray) -> dict:
    if isinstance(cand, Sketch) or isinstance(ref, Sketch):
        if not (isinstance(cand, Sketch) and isinstance(ref, Sketch)):
            raise ValueError("cannot compare a sketched capture with a whole one")
        return sketch.metrics(cand, ref)
    size = int(np.size(cand))
    parts = _by_rows(_pair_sums, cand, ref) if size else []
    d2, r2, c2, cr = (sum(p[j] for p in parts) for j in range(4))
    diff_norm, ref_norm, cand_norm = math.sqrt(d2), math.sqrt(r2), math.sqrt(c2)
    finite = all(p[6] for p in parts)
    if ref_norm > 0:
        rel_l2 = diff_norm / ref_norm
    else:
        rel_l2 = 0.0 if diff_norm == 0 else float("inf")
    if ref_norm > 0 and cand_norm > 0:
        cosine = float(cr / (cand_norm * ref_norm))
    else:
        cosine = 1.0 if diff_norm == 0 else 0.0
    return {"max_abs": max((p[4] for p in parts), default=0.0),
            "mean_abs": sum(p[5] for p in parts) / size if size else 0.0,
            "rel_l2": rel_l2, "cosine": cosine, "finite": finite}


def points_metrics(pairs: list) -> list[dict]:
    """`point_metrics` of (cand, ref) pairs: a run's sketched points at once (`sketch.metrics_many`)."""
    out = [None] * len(pairs)
    sketched = [i for i, (c, r) in enumerate(pairs) if isinstance(c, Sketch) and isinstance(r, Sketch)]
    for i, m in zip(sketched, sketch.metrics_many([pairs[i] for i in sketched])):
        out[i] = m
    for i, (c, r) in enumerate(pairs):
        if out[i] is None:
            out[i] = point_metrics(c, r)
    return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _logits_sums(c, r, k):
    c, r = c.astype(np.float64), r.astype(np.float64)
    lr, lc = _log_softmax(r), _log_softmax(c)
    kl = float((np.exp(lr) * (lr - lc)).sum())
    top1 = int(np.sum(c.argmax(-1) == r.argmax(-1)))
    # The k largest of each row, unordered (a full sort of a 256k vocabulary per position is slow).
    tc = np.argpartition(-c, k - 1, axis=-1)[:, :k]
    tr = np.argpartition(-r, k - 1, axis=-1)[:, :k]
    overlap = sum(len(set(a) & set(b)) / k for a, b in zip(tc, tr))
    return kl, top1, overlap


def logits_metrics(cand: np.ndarray, ref: np.ndarray, k: int = TOPK) -> dict:
    """KL(ref || cand) per position (mean), top-1 agreement, mean top-k overlap."""
    rows = int(np.prod(ref.shape[:-1]))
    k = min(k, ref.shape[-1])
    finite = all(_by_rows(lambda c, r: bool(np.isfinite(c).all() and np.isfinite(r).all()), cand, ref))
    if not finite:
        return {"kl_mean": float("nan"), "top1_agreement": 0.0, "topk_overlap": 0.0, "k": k}
    parts = _by_rows(lambda c, r: _logits_sums(c, r, k), cand, ref)
    return {"kl_mean": sum(p[0] for p in parts) / rows, "top1_agreement": sum(p[1] for p in parts) / rows,
            "topk_overlap": float(sum(p[2] for p in parts) / rows), "k": k}


def noise_floors(ref_caps: dict, truth_caps: dict, dtype: str) -> dict[str, float]:
    """Per point: relative L2 of the oracle at `dtype` from the float64 oracle rounded to it."""
    # (The logits' top-k are no point: rounding them imported ml_dtypes, 0.9 s.)
    names = [n for n in truth_caps if n in ref_caps and not sketch.is_top(n)]
    # A sketched float64 capture was rounded to the dtype before it was sketched; a whole one is
    # rounded here, one point at a time (a full-size float64 run is GBs).
    sketched = [n for n in names if isinstance(truth_caps[n], Sketch)]
    floors = {n: m["rel_l2"] for n, m in zip(sketched, points_metrics([(ref_caps[n], truth_caps[n]) for n in sketched]))}
    for n in names:
        if n not in floors:
            floors[n] = point_metrics(ref_caps[n], round_to(truth_caps[n], dtype))["rel_l2"]
    return {n: floors[n] for n in names}


def _position_sums(c: np.ndarray, r: np.ndarray, lengths) -> tuple[np.ndarray, np.ndarray]:
    """(sum of squared differences, sum of squared reference values) per position index within
    its prompt, over the prompts (concatenated along axis 1, `lengths` long each)."""
    B, T = r.shape[:2]
    d2 = np.square(np.asarray(c, np.float64) - np.asarray(r, np.float64)).reshape(B, T, -1).sum(axis=(0, 2))
    r2 = np.square(np.asarray(r, np.float64)).reshape(B, T, -1).sum(axis=(0, 2))
    out_d, out_r = np.zeros(max(lengths)), np.zeros(max(lengths))
    start = 0
    for n in lengths:
        out_d[:n] += d2[start:start + n]
        out_r[:n] += r2[start:start + n]
        start += n
    return out_d, out_r


def position_rel_l2(cand, ref, lengths) -> np.ndarray | None:
    """Relative L2 of `cand` from `ref` at each position index (0 .. longest prompt - 1), over
    the prompts; None for sketched captures or captures that are not (batch, positions, ...)
    of the prompts' total length."""
    if isinstance(cand, Sketch) or isinstance(ref, Sketch) or not lengths or np.ndim(ref) < 2 \
            or ref.shape[1] != sum(lengths) or cand.shape != ref.shape:
        return None
    d2, r2 = _position_sums(cand, ref, lengths)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(r2 > 0, np.sqrt(d2) / np.sqrt(np.where(r2 > 0, r2, 1)), np.where(d2 > 0, np.inf, 0.0))


def position_floors(ref_caps: dict, truth_caps: dict, dtype: str, lengths) -> dict[str, np.ndarray]:
    """`noise_floors` per position index: where an error that grows along the sequence starts."""
    out = {}
    for name, truth in truth_caps.items():
        if name in ref_caps and not isinstance(truth, Sketch) and not sketch.is_top(name):
            rel = position_rel_l2(ref_caps[name], round_to(truth, dtype), lengths)
            if rel is not None:
                out[name] = rel
    return out


def _significant(values, digits: int = 3) -> list:
    return [float(f"{v:.{digits}g}") if math.isfinite(v) else None for v in values]


def load_captures(path) -> dict:
    """A worker's captures file: whole arrays, and sketched points as `Sketch`."""
    from llmdiff import safetensors_file

    return sketch.load(safetensors_file.load(path))


def compare_captures(cand_caps: dict, ref_caps: dict, floors: dict, dtype: str,
                     points: list[str], thresholds: Thresholds = DEFAULT_THRESHOLDS, lengths=None,
                     pos_floors: dict | None = None) -> dict:
    """The run's points (in forward order), first divergence, verdict and logits metrics.

    With the prompts' `lengths` (whole captures): each point's relative L2 per position index
    (`by_position`), and with the per-position floors (`position_floors`), the first position
    from which a divergent point is off by more than its threshold there (`diverges_from`): a
    window, RoPE-scaling or RoPE-precision bug is nothing at the first positions and grows."""
    min_floor = MIN_FLOOR * UNIT_ROUNDOFF[dtype]
    rows, missing = [], []
    same = [n for n in points if n in cand_caps and n in ref_caps and cand_caps[n].shape == ref_caps[n].shape]
    computed = dict(zip(same, points_metrics([(cand_caps[n], ref_caps[n]) for n in same])))
    for name in points:
        if name not in cand_caps or name not in ref_caps:
            missing.append(name)
            continue
        cand, ref = cand_caps[name], ref_caps[name]
        if cand.shape != ref.shape:
            rows.append({"name": name, "verdict": "divergence",
                         "note": f"shape {tuple(cand.shape)} vs reference {tuple(ref.shape)}"})
            continue
        m = computed[name]
        # A point of few elements (a loss, (1, 1)): one of them a float32 last bit off is not a
        # divergence, whatever the oracle's own rounding happened to be.
        few = UNIT_ROUNDOFF["float32"] / math.sqrt(max(math.prod(cand.shape), 1))
        floor = max(floors.get(name, 0.0), min_floor, few)
        ratio = m["rel_l2"] / floor
        factor = thresholds.factor(name)
        diverges = (not m["finite"]) or ratio > factor
        row = {"name": name, **m, "noise_floor": floor, "floor_ratio": ratio, "threshold": factor,
               "verdict": "divergence" if diverges else "parity"}
        by_position = position_rel_l2(cand, ref, lengths)
        if by_position is not None:
            row["by_position"] = _significant(by_position)
            pos_floor = (pos_floors or {}).get(name)
            if diverges and pos_floor is not None and len(pos_floor) == len(by_position):
                over = np.nonzero(by_position > factor * np.maximum(pos_floor, min_floor))[0]
                if over.size:
                    row["diverges_from"] = int(over[0])
        rows.append(row)
    first = next((r["name"] for r in rows if r["verdict"] == "divergence"), None)
    run = {"dtype": dtype, "verdict": "divergence" if first else "parity",
           "first_divergence": first, "points": rows, "missing_points": missing,
           "threshold": {**thresholds.to_dict(), "min_floor": min_floor}}
    if "logits" in cand_caps and "logits" in ref_caps and cand_caps["logits"].shape == ref_caps["logits"].shape:
        if not isinstance(cand_caps["logits"], Sketch):
            run["logits"] = logits_metrics(cand_caps["logits"], ref_caps["logits"])
        elif "logits:top_ids" in cand_caps and "logits:top_ids" in ref_caps:
            run["logits"] = sketch.top_metrics(cand_caps, ref_caps, TOPK)
    return run


def attach_forced(run: dict, forced: dict) -> None:
    """Attach the teacher-forced comparison to a run. The run's verdict stays the free-running
    one: a local difference below the accumulated noise fails a run only when a known bug's
    counterfactual confirms it (a finding); otherwise it is shown, not judged."""
    run["forced"] = forced
    if run["verdict"] == "parity" and forced.get("verdict") == "divergence":
        run["local_divergence"] = forced["first_divergence"]
