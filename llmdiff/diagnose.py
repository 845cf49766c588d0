"""Name the known bug behind a divergence, with evidence, by counterfactual on the oracle.

For a candidate that diverges from the oracle at some dtype, every dynamic check that applies
names a knob of the oracle's precision policy that switches its bug on. The oracle is re-run
with each knob; a knob explains the divergence when, against the re-run oracle, the candidate's
first divergent point falls back under the noise floor and the divergence as a whole shrinks.
Several bugs at once are explained greedily: keep the best knob, re-run every remaining knob on
top of it, repeat until nothing diverges or no knob helps. What is left is reported as an
unexplained divergence, starting where it starts.

Counterfactual runs depend only on (dtype, policy), not on the candidate, so they are cached
and shared by every candidate (and by the selftest's mutants).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from llmdiff import diff, safetensors_file
from llmdiff.check import Check, Context, Finding
from llmdiff.runner import Implementation, RunRequest, run_worker

UNEXPLAINED = ("LD000", "unexplained-divergence")
MAX_ROUNDS = 6


def excess(run: dict) -> float:
    """How far above the verdict threshold a run is, summed over points (0 at parity)."""
    total = 0.0
    for p in run["points"]:
        if not p.get("finite", True) or "floor_ratio" not in p:
            total += 1e3 if p["verdict"] == "divergence" else 0.0
        elif p["floor_ratio"] > diff.FLOOR_FACTOR:
            total += math.log(p["floor_ratio"] / diff.FLOOR_FACTOR)
    return total


def _point(run: dict, name: str) -> dict:
    return next((p for p in run["points"] if p["name"] == name), {})


def _policy_key(dtype: str, policy: dict, constants_dtype: str | None) -> str:
    return json.dumps([dtype, constants_dtype, sorted(policy.items())])


class OracleLab:
    """Runs the oracle under precision policies, one worker per batch, caching the captures."""

    def __init__(self, job: dict, work: Path, timeout: float | None = None):
        self.job, self.work, self.timeout = job, Path(work), timeout
        self.cache: dict[str, dict | None] = {}
        self.errors: dict[str, str] = {}
        self.runs = 0

    def captures(self, dtype: str, policies: list[dict], constants_dtype: str | None = None) -> list:
        keys = [_policy_key(dtype, p, constants_dtype) for p in policies]
        todo = {}
        for key, policy in zip(keys, policies):
            if key not in self.cache and key not in todo:
                todo[key] = policy
        if todo:
            requests = []
            for key, policy in todo.items():
                out = self.work / f"counterfactual-{len(self.cache) + len(requests):04d}"
                requests.append(RunRequest(dtype, str(out), constants_dtype, {"precision": policy}))
            for key, result in zip(todo, run_worker(Implementation.parse("oracle"), self.job, requests,
                                                     self.work, timeout=self.timeout)):
                self.runs += 1
                if result.ok:
                    self.cache[key] = {k: np.asarray(v) for k, v in safetensors_file.load(result.captures_path).items()}
                else:
                    self.cache[key] = None
                    self.errors[key] = result.error
        return [self.cache[k] for k in keys]


def diagnose_run(lab: OracleLab, checks: list[Check], spec, candidate: str, cand_caps: dict,
                 run: dict, floors: dict, points: list[str]) -> list[Finding]:
    """Greedy counterfactual explanation of one divergent run (candidate vs the clean oracle)."""
    dtype = run["dtype"]
    remaining = [c for c in checks if c.knob and c.applies(spec, dtype)]
    policy: dict = {}
    current = run
    findings = []
    for _ in range(MAX_ROUNDS):
        if current["verdict"] != "divergence" or not remaining:
            break
        first = current["first_divergence"]
        tries = [(check, {**policy, **variant}) for check in remaining for variant in check.variants()]
        scored = []
        for (check, trial_policy), caps in zip(tries, lab.captures(dtype, [t[1] for t in tries])):
            if caps is None:
                continue
            trial = diff.compare_captures(cand_caps, caps, floors, dtype, points)
            if _point(trial, first).get("verdict") == "parity" and excess(trial) < excess(current):
                scored.append((excess(trial), check.code, check, trial, trial_policy))
        if not scored:
            break
        _, _, best, trial, best_policy = min(scored, key=lambda s: s[:2])
        knob = {k: v for k, v in best_policy.items() if policy.get(k, object()) != v}
        before, after = _point(current, first), _point(trial, first)
        evidence = {
            "point": first, "knob": knob,
            "before": {"rel_l2": before.get("rel_l2"), "floor_ratio": before.get("floor_ratio")},
            "after": {"rel_l2": after.get("rel_l2"), "floor_ratio": after.get("floor_ratio")},
            "noise_floor": before.get("noise_floor"),
            "divergent_points": {"before": _count(current), "after": _count(trial)},
        }
        ctx = Context(spec, candidate, {}, dtype, run)
        message = (f"{best.summary()} At {first}: rel L2 {before.get('rel_l2'):.3g} "
                   f"({before.get('floor_ratio'):.3g}x the noise floor) falls to {after.get('rel_l2'):.3g} "
                   f"({after.get('floor_ratio'):.3g}x) with the oracle's "
                   f"{', '.join(f'{k}={v!r}' for k, v in knob.items())}.")
        findings.append(best.finding(ctx, first, message, evidence, confirmed=True))
        policy = best_policy
        remaining.remove(best)
        current = trial
    if current["verdict"] == "divergence":
        first = current["first_divergence"]
        p = _point(current, first)
        explained = f" after explaining {', '.join(f.code for f in findings)}" if findings else ""
        findings.append(Finding(
            *UNEXPLAINED, candidate, dtype, first,
            f"unexplained divergence starting at {first}{explained}: no known bug's counterfactual brings it"
            f" back to the noise floor (rel L2 {p.get('rel_l2', float('nan')):.3g},"
            f" {p.get('floor_ratio', float('nan')):.3g}x the floor)",
            {"point": first, "rel_l2": p.get("rel_l2"), "floor_ratio": p.get("floor_ratio"),
             "policy_tried": policy, "divergent_points": _count(current)},
            False, "Read the code that computes this point in the candidate against references/gemma.py."))
    return findings


def _count(run: dict) -> int:
    return sum(p["verdict"] == "divergence" for p in run["points"])


def static_findings(checks: list[Check], spec, implementation: str, details: dict, tokens, weights) -> list[Finding]:
    out = []
    ctx = Context(spec, implementation, details or {}, None, None, tokens, weights)
    for check in checks:
        if check.kind == "static" and check.applies(spec):
            out.extend(check.run(ctx))
    return out
