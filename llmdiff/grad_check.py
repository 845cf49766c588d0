"""Known bugs of the training path (`compare --grad`), named by counterfactual on the oracle's
loss and gradients.

A `GradCheck` names a knob of the oracle's precision policy (`grad_knob`) that acts only on what
`references/gemma_grad.py` computes for `--grad`: the implementation's own loss function (the
`loss:*` cases of `llmdiff/grad.py`) or the backward. The forward diagnosis never tries it (its
`knob` is None: a forward run with it is the clean one). When a `--grad` run's forward is at
parity and its loss or gradients are not, `explain_backward` re-runs the oracle's `--grad` run
with each such knob; a knob explains the divergence when, against the re-run oracle, the
candidate's first divergent loss or gradient falls back under its noise floor (the floors of the
run itself: the clean oracle against its float64 run) and the divergence as a whole shrinks.
Several at once are explained greedily, as `llmdiff.diagnose` does for the forward. What is left
is one unexplained finding where it starts (`evidence.backward_only`).

A `GradEvidenceCheck` is decided from the run's own numbers instead (no oracle re-run): a
gradient that is NaN or infinite where the oracle's is finite cannot be brought under any floor
by a knob, so what it says is judged from the captures (`judge`), before the counterfactuals.
"""

from __future__ import annotations

from pathlib import Path

from llmdiff.check import Check, Finding


class GradCheck(Check):
    """A check of the training path confirmed by counterfactual on the oracle's `--grad` run."""

    # (knob, value) on `references.gemma.Precision` read only by `references/gemma_grad.py`.
    grad_knob: tuple[str, object] | None = None
    # Other forms of the same bug: extra knob settings tried with `grad_knob`.
    grad_also: tuple[dict, ...] = ()

    @property
    def kind(self) -> str:
        return "dynamic"

    def grad_variants(self) -> list[dict]:
        base = {self.grad_knob[0]: self.grad_knob[1]}
        return [base] + [{**base, **extra} for extra in self.grad_also]


class GradEvidenceCheck(Check):
    """A check of the training path decided from the `--grad` run's captures (`judge`): the
    candidate's and the oracle's (the run's dtype and its float64 answer), the prompts' token ids
    and the spec. The forward diagnosis and the selftest never try it (no knob)."""

    @property
    def kind(self) -> str:
        return "dynamic"

    def judge(self, ev: "Evidence") -> list[Finding]:
        raise NotImplementedError


class Evidence:
    """What a `GradEvidenceCheck` looks at for one run: `run` (its compared rows, loss and
    gradients only), the captures (numpy, by name) of the candidate, of the oracle at the run's
    dtype and of its float64 answer, the prompts' ids (`tokens`, one list per prompt: point
    captures put them one after another along axis 1) and the spec."""

    def __init__(self, candidate, dtype, run, cand_caps, oracle_caps, truth_caps, tokens, spec):
        self.implementation, self.dtype, self.run = candidate, dtype, run
        self.cand, self.oracle, self.truth = cand_caps, oracle_caps, truth_caps
        self.tokens, self.spec = tokens, spec

    def positions(self) -> list[tuple[int, int, int]]:
        """(prompt, position in it, token id) of each position of a point capture, in order."""
        return [(b, t, int(i)) for b, ids in enumerate(self.tokens) for t, i in enumerate(ids)]


def grad_part(run: dict, names: list[str]) -> dict:
    """A compared run restricted to `names` (the loss and gradients), with its own verdict."""
    keep = set(names)
    rows = [p for p in run["points"] if p["name"] in keep]
    first = next((p["name"] for p in rows if p["verdict"] == "divergence"), None)
    return {**run, "points": rows, "first_divergence": first, "verdict": "divergence" if first else "parity"}


def _row(run: dict, name: str) -> dict:
    return next((p for p in run["points"] if p["name"] == name), {})


def _size(p: dict) -> str:
    if "floor_ratio" not in p:
        return p.get("note", "not finite")
    return f"rel L2 {p['rel_l2']:.3g}, {p['floor_ratio']:.3g} times the floor"


def explain_backward(report: dict, points: list[str], checks, spec, lab, results: dict,
                     thresholds=None) -> list[Finding]:
    """Findings for every `--grad` run whose forward is at parity and whose loss or gradients
    are not: the `GradCheck`s whose knob brings it back to the noise floor (confirmed), then one
    unexplained finding at the first divergence still left. `lab`: the forward diagnosis'
    `OracleLab` (its job, work directory and timeout; a `--grad` lab is made beside it)."""
    from llmdiff import diagnose, diff
    from llmdiff import grad as names
    from llmdiff.api import ORACLE, TRUTH_DTYPE, _forward_part, _load_caps
    from llmdiff.job import RunId

    thresholds = thresholds or diff.DEFAULT_THRESHOLDS
    compared = names.grad_points(spec, points)
    grad_lab = None
    out: list[Finding] = []
    for run in report["runs"]:
        if run["verdict"] != "divergence" or _forward_part(run, points)["verdict"] != "parity":
            continue
        d, candidate = run["dtype"], run["candidate"]
        current = grad_part(run, compared)
        start = current["first_divergence"]
        found: list[Finding] = []
        policy: dict = {}
        remaining = [c for c in checks if isinstance(c, GradCheck) and c.grad_knob and c.applies(spec, d)]
        cand_caps = _load_caps(results.get((candidate, RunId(d))))
        oracle_caps = _load_caps(results.get((ORACLE, RunId(d))))
        truth_caps = _load_caps(results.get((ORACLE, RunId(TRUTH_DTYPE, d))))
        if cand_caps and oracle_caps and truth_caps:
            ev = Evidence(candidate, d, current, cand_caps, oracle_caps, truth_caps, lab.job.tokens, spec)
            for c in checks:
                if isinstance(c, GradEvidenceCheck) and c.applies(spec, d):
                    found += c.judge(ev)
        # No knob brings a NaN or infinite gradient under a floor: no counterfactual is tried
        # when the first divergence is not finite.
        finite = _row(current, start).get("finite", True) if start else True
        if remaining and cand_caps and oracle_caps and truth_caps and current["verdict"] == "divergence" and finite:
            if grad_lab is None:
                work = Path(lab.work) / "grad-counterfactuals"
                work.mkdir(parents=True, exist_ok=True)
                lab.close()   # the forward lab's worker would hold its weights beside this one's
                grad_lab = diagnose.OracleLab(lab.job.with_(grad=True), work, lab.timeout)
            floors = diff.noise_floors(oracle_caps, truth_caps, d)
            while remaining and current["verdict"] == "divergence":
                tried = [(c, {**policy, **v}) for c in remaining for v in c.grad_variants()]
                best = None
                for (c, pol), caps in zip(tried, grad_lab.captures(d, [p for _, p in tried])):
                    if caps is None:
                        continue
                    r = grad_part(dict(diff.compare_captures(cand_caps, caps, floors, d, compared, thresholds),
                                       dtype=d), compared)
                    first = current["first_divergence"]
                    gain = diagnose.excess(current) - diagnose.excess(r)
                    if _row(r, first).get("verdict") == "parity" and gain > 0 and (best is None or gain > best[0]):
                        best = (gain, c, pol, r)
                if best is None:
                    break
                _, c, pol, r = best
                where = current["first_divergence"]
                before, after = _row(current, where), _row(r, where)
                found.append(c.finding(
                    _Ctx(candidate, d), where,
                    f"{c.name}: re-running the oracle's loss and gradients with"
                    f" {', '.join(f'{k}={v!r}' for k, v in pol.items() if k not in policy)} brings {where} from"
                    f" {before.get('floor_ratio', float('nan')):.3g} to {after.get('floor_ratio', float('nan')):.3g}"
                    f" times its floor",
                    {"point": where, "policy": pol, "floor_ratio_before": before.get("floor_ratio"),
                     "floor_ratio_after": after.get("floor_ratio"), "rel_l2_before": before.get("rel_l2"),
                     "rel_l2_after": after.get("rel_l2"), "divergent_points_before": _count(current),
                     "divergent_points_after": _count(r), "backward_only": True},
                    confirmed=True))
                policy, current = pol, r
                remaining.remove(c)
        out += found
        if current["verdict"] != "divergence" or any(f.where == current["first_divergence"] for f in found):
            continue
        first = current["first_divergence"]
        p = _row(current, first)
        explained = f" after explaining {', '.join(f.code for f in found)}" if found else ""
        out.append(Finding(
            *diagnose.UNEXPLAINED, candidate, d, first,
            f"the backward diverges first at {first} ({_size(p)}) while every forward point is at parity"
            + explained,
            {"point": first, "rel_l2": p.get("rel_l2"), "floor_ratio": p.get("floor_ratio"), "backward_only": True,
             "divergent_points": _count(current), "first_before_counterfactuals": start,
             **({"policy_tried": policy} if policy else {})},
            False, "Read the backward of the op that makes this point in the candidate (a custom autograd"
                   " function, a .detach() or no_grad inside the forward, an in-place op, a fused kernel's"
                   " backward), or, at a loss:* point, its loss function (labels, shift, ignore_index,"
                   " denominator)."))
    if grad_lab is not None:
        grad_lab.close()
        lab.runs += grad_lab.runs
        lab.errors.update(grad_lab.errors)
    return out


def _count(run: dict) -> int:
    return sum(p["verdict"] == "divergence" for p in run["points"])


class _Ctx:
    """What `Check.finding` reads of a context."""

    def __init__(self, implementation: str, dtype: str):
        self.implementation, self.dtype = implementation, dtype
