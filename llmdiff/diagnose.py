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

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmdiff import diff
from llmdiff.check import UNSCOPED_KNOBS, Check, Context, Finding
from llmdiff.job import Job, RunId, RunRequest
from llmdiff.runner import Implementation

UNEXPLAINED = ("LD000", "unexplained-divergence")
MAX_ROUNDS = 6
MAX_TOGETHER = 3  # bugs tried together when fewer do not explain a point
RUNS_PER_WORKER = 200  # oracle runs a lab's worker serves before a fresh one takes over (XLA's
                       # compiled steps pile up in one process: a crash was seen after hundreds)


def excess(run: dict) -> float:
    """How far above the verdict threshold a run is, summed over points (0 at parity)."""
    total = 0.0
    for p in run["points"]:
        if not p.get("finite", True) or "floor_ratio" not in p:
            total += 1e3 if p["verdict"] == "divergence" else 0.0
        elif p["floor_ratio"] > p["threshold"]:
            total += math.log(p["floor_ratio"] / p["threshold"])
    return total


def _point(run: dict, name: str) -> dict:
    return next((p for p in run["points"] if p["name"] == name), {})


@dataclass(frozen=True)
class Variant:
    """One oracle run of the lab: a run id, the precision knobs switched on, and for teacher
    forcing the captures file whose values feed every op."""

    run: RunId
    policy: tuple = ()               # sorted (knob, value) pairs
    forced_from: str | None = None

    @classmethod
    def of(cls, dtype: str, policy: dict | None = None, constants_dtype: str | None = None,
           forced_from: str | None = None) -> "Variant":
        return cls(RunId(dtype, constants_dtype), tuple(sorted((policy or {}).items())), forced_from)

    @property
    def key(self) -> str:
        """A string naming the variant (the lab's `errors` are keyed by it)."""
        return json.dumps([self.run.dtype, self.run.constants_dtype, [list(p) for p in self.policy], self.forced_from])


class OracleLab:
    """Runs the oracle under precision policies, every batch in one serving worker, caching the captures."""

    def __init__(self, job: Job, work: Path, timeout: float | None = None, progress=None, worker=None):
        self.job, self.work, self.timeout = job, Path(work), timeout
        self.progress = progress   # callable(str): each batch and, every 2 s, how far it is
        self.cache: dict[Variant, dict | None] = {}
        self.paths: dict[Variant, str] = {}
        self.errors: dict[str, str] = {}
        self.runs = 0
        self._made = 0   # captures files named so far
        self.seeded: set[str] = set()   # captures files `seed` was given: not the lab's to delete
        self._worker = None   # the serving oracle worker (`_batch`): given (the compare's own), or started
        if worker is not None:
            self._adopt(worker)

    def run_many(self, wanted: list[Variant]) -> list:
        """Captures for each variant, all missing ones in one batch of the lab's worker, which
        stays up between batches (`--serve`: the oracle's weights made once, its compiled steps
        kept) for `RUNS_PER_WORKER` runs. Variants a worker did not reach because it died (a
        crash of XLA's CPU compiler was seen after hundreds of compilations in one process:
        signal 11) get a fresh worker, while each one gets further; a run is blamed for a crash
        only when a worker started for its batch died on it first."""
        todo = list(dict.fromkeys(v for v in wanted if v not in self.cache))
        while todo:
            requests = []
            for v in todo:
                out = self.work / f"oracle-variant-{self._made:04d}"
                self._made += 1
                options = self.job.options.with_(precision=dict(v.policy), forced_from=v.forced_from)
                requests.append(RunRequest(v.run, str(out), options))
            died, why = [], None
            results, fresh = self._batch(requests, self._counter(len(todo)))
            for v, result in zip(todo, results):
                if result.ok:
                    self.runs += 1
                    self.cache[v] = diff.load_captures(result.captures_path)
                    self.paths[v] = result.captures_path
                elif result.meta.get("ok") is None and not died and "timed out" not in (result.error or ""):
                    died.append(v)   # the first one the dead worker did not finish: its own crash?
                    why = result.error
                elif died:
                    died.append(v)
                else:
                    self.runs += 1
                    self.cache[v] = None
                    self.errors[v.key] = result.error
            if died and died[0] is todo[0] and fresh:   # a fresh worker died on the first one: its own crash
                v = died.pop(0)
                self.runs += 1
                self.cache[v] = None
                self.errors[v.key] = f"{why} (on this run, in a fresh worker)"
            todo = died
        return [self.cache[v] for v in wanted]

    def _batch(self, requests: list[RunRequest], progress) -> tuple[list, bool]:
        """`requests` run by the lab's serving worker, started for them if it is not up; the
        results, and whether the worker was started for them (a worker that ran other batches
        first may die of those: its first run here is not to blame)."""
        from llmdiff.runner import Worker

        worker = self._worker
        fresh = not (worker is not None and worker.alive and worker.runs + len(requests) <= RUNS_PER_WORKER)
        if not fresh:
            worker.progress = progress
            worker.send(requests)
        else:
            self.close()
            worker = self._adopt(Worker(Implementation.parse("oracle"), self.job, requests, self.work, progress,
                                        label="oracle-lab", serve=True))
        results = worker.batch(self.timeout)
        if not worker.alive:
            self.close()
        return results, fresh

    def _adopt(self, worker):
        import weakref

        self._worker = worker
        self._closer = weakref.finalize(self, worker.close)   # a lab dropped unclosed ends it too
        return worker

    def close(self) -> None:
        """End the lab's worker (the next batch starts another)."""
        if self._worker is not None:
            self._closer.detach()
            self._worker.close()
            self._worker = None

    def _counter(self, n: int):
        """The worker's progress lines, told as "k/n oracle runs" at most every 2 s."""
        import time

        if self.progress is None:
            return None
        self.progress(f"  {n} oracle run(s) (counterfactuals, teacher forcing)")
        state = {"done": 0, "said": time.perf_counter()}

        def hear(line: str) -> None:
            if ": loaded in " in line:
                state["done"] += 1
                if time.perf_counter() - state["said"] >= 2.0:
                    state["said"] = time.perf_counter()
                    self.progress(f"  {state['done']}/{n} oracle runs done")
        return hear

    def captures(self, dtype: str, policies: list[dict], constants_dtype: str | None = None,
                 forced_from: str | None = None) -> list:
        return self.run_many([Variant.of(dtype, p, constants_dtype, forced_from) for p in policies])

    def path(self, variant: Variant) -> str | None:
        return self.paths.get(variant)

    def seed(self, variant: Variant, captures_path: str) -> None:
        """A run made elsewhere with this lab's job and `variant`'s options (the compare's own
        clean oracle runs), taken as the lab's: a diagnosis starts from them instead of running
        them again."""
        self.cache[variant] = diff.load_captures(captures_path)
        self.paths[variant] = captures_path
        self.seeded.add(captures_path)

    def forget(self) -> None:
        """Drop every cached run and delete the captures file of each the lab ran (memory-mapped
        arrays still held keep their pages until they go): a selftest's runs of one dtype are
        tens of GB at tiny size and none is read by the next dtype's."""
        import os

        for path in set(self.paths.values()) - self.seeded:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.cache.clear()
        self.paths.clear()


@dataclass(frozen=True)
class Case:
    """One candidate's run to explain: its captures, and what its comparison was judged with."""

    lab: OracleLab
    spec: object                     # ModelSpec
    candidate: str
    cand_caps: dict
    cand_path: str | None            # its captures file, for teacher forcing (None: sketched)
    floors: dict
    points: list
    thresholds: diff.Thresholds = diff.DEFAULT_THRESHOLDS
    lengths: list | None = None      # the prompts' lengths: errors per position
    pos_floors: dict | None = None   # the free-running floors per position (`diff.position_floors`)
    # The knobs ((name, value), ...) that amplify the oracle's own rounding noise (`Check.own_floor`):
    # an oracle with one of them on is judged against its own floor (`judge`). `explain` fills it.
    amplifiers: tuple = ()

    def compare(self, caps: dict, floors: dict, dtype: str, forced: bool, pos_floors: dict | None = None) -> dict:
        """The candidate against oracle captures `caps`, judged with `floors` (and free-running,
        per position with `pos_floors`, by default the clean ones)."""
        return diff.compare_captures(self.cand_caps, caps, floors, dtype, self.points, self.thresholds,
                                     self.lengths, None if forced else (pos_floors if pos_floors is not None
                                                                        else self.pos_floors))

    def amplifies(self, policy: dict) -> bool:
        """Whether `policy` switches on a knob that amplifies the oracle's own rounding noise (on
        the whole model or scoped: `knob@local`)."""
        return any(k.partition("@")[0] == name and v == value
                   for k, v in policy.items() for name, value in self.amplifiers)

    def judge(self, policy: dict, caps: dict, floors: dict, dtype: str, forced_from: str | None) -> dict:
        """The candidate against the oracle run with `policy` (`caps`), judged against the noise
        floor of that oracle: `floors` (the clean oracle's), or where `policy` switches on a knob
        that amplifies rounding noise (a table read at a float16-rounded input turns float32's
        last-bit noise into float16 steps), at every point the larger of `floors` and the floor
        of the oracle with `policy` on, `dtype` against float64 (the hypothesis' own floor: the
        amplified noise propagates, so every later point gets it too). Without that float64 run
        (it failed) the clean floors stand: a hypothesis is never judged more leniently unmeasured."""
        forced = forced_from is not None
        if not self.amplifies(policy):
            return self.compare(caps, floors, dtype, forced)
        truth, = self.lab.captures("float64", [policy], constants_dtype=dtype, forced_from=forced_from)
        if truth is None:
            return self.compare(caps, floors, dtype, forced)
        own = diff.noise_floors(caps, truth, dtype)
        floors = {k: max(floors.get(k, 0.0), own.get(k, 0.0)) for k in {*floors, *own}}
        pos_floors = None
        if not forced and self.pos_floors and self.lengths:
            own_pos = diff.position_floors(caps, truth, dtype, self.lengths)
            pos_floors = {k: np.maximum(v, own_pos[k]) if k in own_pos and len(own_pos[k]) == len(v) else v
                          for k, v in self.pos_floors.items()}
        return self.compare(caps, floors, dtype, forced, pos_floors)


def teacher_forced(lab: OracleLab, cand_caps: dict, cand_path: str, dtype: str, points: list[str],
                   thresholds: diff.Thresholds = diff.DEFAULT_THRESHOLDS) -> tuple[dict, dict] | None:
    """The candidate against the oracle fed the candidate's own value of every point, and the
    floors of that comparison: each point's error since the last forced input (its local error)."""
    forced, truth = lab.run_many([Variant.of(dtype, forced_from=cand_path),
                                  Variant.of("float64", constants_dtype=dtype, forced_from=cand_path)])
    if forced is None or truth is None:
        return None
    floors = diff.noise_floors(forced, truth, dtype)
    return diff.compare_captures(cand_caps, forced, floors, dtype, points, thresholds), floors


def explain(case: Case, checks: list[Check], run: dict) -> list[Finding]:
    """The findings that explain one run of a candidate against the clean oracle.

    First the free-running comparison (`run["points"]`, `floors`) is explained greedily. Then,
    with the knobs found so far switched on, the teacher-forced comparison: a bug whose effect
    is below the accumulated noise (bfloat16 rounding differences) still shows in the one op it
    is in. Whatever neither explains is an unexplained divergence, where it starts.
    """
    dtype, candidate = run["dtype"], case.candidate
    remaining = [c for c in checks if c.knob and c.applies(case.spec, dtype)]
    case = dataclasses.replace(case, amplifiers=tuple(c.knob for c in remaining if c.own_floor))
    findings: list[Finding] = []
    policy: dict = {}
    free = _as_run(run["points"], dtype)
    current = free
    nonfinite = next((p for p in run["points"] if p.get("finite") is False), None)
    if nonfinite is not None:
        # NaN or Inf where the oracle is finite: no precision knob explains that; say where the
        # candidate first produced them (the weights were checked finite before any run).
        return [Finding(
            *UNEXPLAINED, candidate, dtype, nonfinite["name"],
            f"{candidate} produced NaN/Inf first at {nonfinite['name']}, where the oracle is finite",
            {"point": nonfinite["name"], "non_finite": True, "divergent_points": _count(free)},
            False, "Find the op that overflows or divides by zero at this point in the candidate"
                   " (a float16/bfloat16 overflow, a mask of -inf over a whole row, a log or sqrt of 0).")]
    if free["verdict"] == "divergence":
        policy, current = _greedy(case, remaining, free, case.floors, None, policy, findings)
    if current["verdict"] != "divergence" and case.cand_path:
        done = teacher_forced(case.lab, case.cand_caps, case.cand_path, dtype, case.points, case.thresholds)
        if done is not None:
            _, forced_floors = done
            caps, = case.lab.captures(dtype, [policy], forced_from=case.cand_path)
            if caps is not None:
                forced = dict(case.judge(policy, caps, forced_floors, dtype, case.cand_path), dtype=dtype)
                if forced["verdict"] == "divergence":
                    policy, current = _greedy(case, remaining, forced, forced_floors, case.cand_path, policy,
                                              findings)
    # A divergence seen only teacher-forced is below the accumulated noise: it is a finding when
    # a known bug confirms it, and otherwise stays a note on the run, not an unexplained failure.
    if current["verdict"] == "divergence" and (free["verdict"] == "divergence"):
        first = current["first_divergence"]
        p = _point(current, first)
        explained = f" after explaining {', '.join(f.code for f in findings)}" if findings else ""
        findings.append(Finding(
            *UNEXPLAINED, candidate, dtype, first,
            f"unexplained divergence starting at {first}{explained}: no known bug's counterfactual brings it"
            f" back to the noise floor ({_size(p)})",
            {"point": first, "rel_l2": p.get("rel_l2"), "floor_ratio": p.get("floor_ratio"),
             "policy_tried": policy, "divergent_points": _count(current),
             "teacher_forced": current is not free and current.get("teacher_forced", False)},
            False, "Read the code that computes this point in the candidate against references/gemma.py."))
    return findings


def _size(p: dict) -> str:
    """How far a point is off, in words, for a message."""
    if p.get("rel_l2") is None or p.get("floor_ratio") is None:
        return p.get("note") or "no error measured"
    return f"rel L2 {p['rel_l2']:.3g}, {p['floor_ratio']:.3g} times the floor"


def _as_run(points_rows: list[dict], dtype: str) -> dict:
    first = next((p["name"] for p in points_rows if p["verdict"] == "divergence"), None)
    return {"dtype": dtype, "points": points_rows, "first_divergence": first,
            "verdict": "divergence" if first else "parity"}


def _greedy(case: Case, remaining, run, floors, forced_from, policy, findings):
    """Keep the knob that best explains where `run` diverges first; repeat. Returns the policy
    and the comparison under it; appends confirmed findings and removes their checks."""
    dtype = run["dtype"]
    current = run
    for _ in range(MAX_ROUNDS):
        if current["verdict"] != "divergence" or not remaining:
            break
        first = current["first_divergence"]
        # One bug at a time; where no single knob brings the first divergent point back (bugs
        # acting at the same point, e.g. RoPE's layout, dtype and frequency scaling), two or
        # three together, of the checks whose knob alone changes the oracle's value there (the
        # bugs that act at that point; the others need not be tried: this keeps the runs few).
        scope = _scope_of(case.spec, first)
        # Each check's whole-model forms; then, on a model with two kinds of layer, the forms
        # scoped to `first`'s kind of only the checks whose whole form moved the oracle's value
        # there (a scoped knob changes `first` only where its whole form does): half the runs.
        scored, moved, closer = _trials(case, current, first, floors, forced_from,
                                        [((c,), {**policy, **v}) for c in remaining for v in c.variants()], policy)
        if scope is not None:
            more, _, nearer = _trials(case, current, first, floors, forced_from,
                                      [((c,), {**policy, **v}) for c in remaining if c in moved
                                       for v in _variants(c, scope)[len(c.variants()):]], policy)
            scored, closer = scored + more, closer | nearer
        best = _best(scored)
        acting = [c for c in remaining if c in moved]
        for size in range(2, min(MAX_TOGETHER, len(acting)) + 1):
            if best is not None:
                break
            # Bugs acting together, each on the whole model or on `first`'s kind of layer (every
            # mix: a soft-cap gone everywhere with a mask broken on local layers only), at least
            # one of which alone brings the oracle nearer the candidate at `first` (RoPE's layout
            # does, with its dtype bug left: a combination none of whose bugs moves towards the
            # candidate is not tried; an unknown bug's every combination was, at hundreds of runs).
            best, _ = _best_trial(case, current, first, floors, forced_from, [
                (combo, {**policy, **{k: v for variant in variants for k, v in variant.items()}})
                for combo in itertools.combinations(acting, size) if closer.intersection(combo)
                for variants in itertools.product(*(_variants(c, scope) for c in combo))
                if len({k for v in variants for k in v}) == sum(len(v) for v in variants)], policy)
        if best is None:
            break
        found, trial, best_policy = best
        knob = {k: v for k, v in best_policy.items() if policy.get(k, object()) != v}
        before, after = _point(current, first), _point(trial, first)
        evidence = {
            "point": first, "knob": knob,
            "before": {"rel_l2": before.get("rel_l2"), "floor_ratio": before.get("floor_ratio")},
            "after": {"rel_l2": after.get("rel_l2"), "floor_ratio": after.get("floor_ratio")},
            "noise_floor": before.get("noise_floor"),
            "divergent_points": {"before": _count(current), "after": _count(trial)},
            "teacher_forced": forced_from is not None,
        }
        after_by_name = {p["name"]: p for p in trial["points"]}
        evidence["curve"] = {   # every point, before and after: the report draws them (plots.finding_png)
            "points": [p["name"] for p in current["points"]],
            "before": [_short(p.get("rel_l2")) for p in current["points"]],
            "after": [_short(after_by_name.get(p["name"], {}).get("rel_l2")) for p in current["points"]],
            "floor": [_short(p.get("noise_floor")) for p in current["points"]]}
        own_note = ""
        if case.amplifies(knob) and after.get("noise_floor") and before.get("noise_floor"):
            # Judged against the hypothesis' own floor (`Case.judge`): say how much larger it is.
            evidence["hypothesis_floor"] = after["noise_floor"]
            own_note = (f"; the knob amplifies rounding noise, so the floor there is that of the oracle with it on,"
                        f" {dtype} against float64: {after['noise_floor'] / before['noise_floor']:.3g}x the clean one")
        if before.get("diverges_from"):   # nothing at the first positions: a bug that grows along the sequence
            evidence["from_position"] = before["diverges_from"]
        ctx = Context(case.spec, case.candidate, {}, dtype, run)
        forced_note = " (teacher-forced: each op fed the candidate's own inputs)" if forced_from else ""
        for check in found:
            together = [c.code for c in found if c is not check]
            also = f" together with {', '.join(together)}" if together else ""
            mine = {k for v in check.variants() for k in v}
            scope = _scope_text({k: v for k, v in knob.items() if k.partition("@")[0] in mine})
            where = f" from position {evidence['from_position']} on" if "from_position" in evidence else ""
            where += f", {where_text(scope)}" if scope else ""
            message = (f"{check.summary()} At {first}{where}{forced_note}: rel L2 {before.get('rel_l2'):.3g} "
                       f"({before.get('floor_ratio'):.3g}x the noise floor) falls to {after.get('rel_l2'):.3g} "
                       f"({after.get('floor_ratio'):.3g}x) with the oracle's "
                       f"{', '.join(f'{k}={v!r}' for k, v in knob.items())}{also}{own_note}.")
            findings.append(check.finding(ctx, first, message, {**evidence, **({"together_with": together}
                                                                                if together else {}),
                                                               **({"scope": scope} if scope else {})},
                                          confirmed=True))
            remaining.remove(check)
        policy = best_policy
        current = dict(trial, dtype=dtype, teacher_forced=forced_from is not None)
    return policy, current


def _short(x):
    """A metric for the report, 3 significant digits (None stays None)."""
    return None if x is None or not math.isfinite(x) else float(f"{x:.3g}")


SCOPE_TEXT = {"local": "on sliding-window (local) layers only", "global": "on global layers only"}


def where_text(scope: str) -> str:
    """A scope in words: "on sliding-window (local) layers only", "on layer 3 only"."""
    return SCOPE_TEXT.get(scope) or f"on layer {scope[1:]} only"


def _scope_of(spec, point: str) -> str | None:
    """The layer kind to try a knob on alone: that of the layer `point` is in, when the model
    has layers of two kinds (Gemma 2/3's local and global layers); None otherwise. The first
    divergent point is in the first layer where a bug acts, so a bug acting on one kind of
    layer only shows there first."""
    kinds = set(spec.layer_types)
    if len(kinds) < 2 or not point.startswith("L") or "." not in point:
        return None
    return spec.layer_types[int(point[1:point.index(".")])]


def _variants(check: Check, scope: str | None) -> list[dict]:
    """The check's policies, then each on layers of kind `scope` only (where its knobs act per
    layer); the whole-model form first, so that it wins when both explain as much."""
    out = check.variants()
    if scope is None:
        return out
    return out + [{f"{k}@{scope}": v for k, v in variant.items()} for variant in out
                  if not any(k in UNSCOPED_KNOBS for k in variant)]


def _scope_text(knob: dict) -> str | None:
    """The one scope every knob of a finding acts on, or None (the whole model)."""
    scopes = {k.partition("@")[2] for k in knob}
    return scopes.pop() if len(scopes) == 1 and "" not in scopes else None


def _best_trial(case: Case, current: dict, first: str, floors: dict, forced_from, tries: list, policy: dict):
    """Of `tries` ((checks, policy), ...), the one whose oracle brings `first` back to parity and
    shrinks the divergence most: (checks, comparison, policy), or None; and the checks whose knob
    changes the oracle's own value at `first` (on top of `policy`): the bugs that act there."""
    scored, moved, _ = _trials(case, current, first, floors, forced_from, tries, policy)
    return _best(scored), moved


def _best(scored: list):
    """The best of `_trials`' scored explanations, or None. A form scoped to one kind of layer
    wins over a wider one only where the wider one breaks a point the scoped one keeps: when
    both leave the same points divergent (another bug, not yet named, dominates what comes
    after), the excess between them is noise, and the wider form is the truer one (a norm's eps
    wrong everywhere, not only on local layers, else LD000 later on the global ones)."""
    if not scored:
        return None
    best = min(scored, key=lambda s: s[:2])

    def scoped(s):
        return sum("@" in k for k in s[4])

    def divergent(s):
        return {p["name"] for p in s[3]["points"] if p["verdict"] == "divergence"}

    wider = [s for s in scored if s[0][0] == best[0][0] and scoped(s) < scoped(best)
             and divergent(s) <= divergent(best)]
    _, _, checks, trial, trial_policy = min(wider, key=lambda s: (scoped(s), s[0])) if wider else best
    return checks, trial, trial_policy


def _trials(case: Case, current: dict, first: str, floors: dict, forced_from, tries: list, policy: dict):
    """`tries` run and scored: the explanations among them (ranked by `_best`), the checks whose
    knob moves the oracle's value at `first`, and those whose knob brings it nearer the candidate."""
    dtype = current["dtype"]
    base, = case.lab.captures(dtype, [policy], forced_from=forced_from)
    scored, moved, closer = [], set(), set()
    before = _point(current, first).get("rel_l2")
    runs = case.lab.captures(dtype, [t[1] for t in tries], forced_from=forced_from)
    # The float64 runs of the trials judged against their own floor (`Case.judge`), in one worker.
    case.lab.captures("float64", [p for (_, p), caps in zip(tries, runs) if caps is not None and case.amplifies(p)],
                      constants_dtype=dtype, forced_from=forced_from)
    for (checks, trial_policy), caps in zip(tries, runs):
        if caps is None:
            continue
        if base is None or first not in caps or diff.point_metrics(caps[first], base[first])["rel_l2"] > 0:
            moved.update(checks)
        # Judged against the oracle's floor under the hypothesis (its own, for a knob that
        # amplifies rounding noise, on this trial or found in an earlier round: `Case.judge`).
        trial = case.judge(trial_policy, caps, floors, dtype, forced_from)
        after = _point(trial, first).get("rel_l2")
        if before is not None and after is not None and after < before:
            closer.update(checks)
        # An explanation brings `first` back without breaking a point before it (the candidate
        # agreed with the oracle there): a knob acting on every layer does not explain a bug
        # on one kind of layer only, whose form on that kind does.
        if _point(trial, first).get("verdict") == "parity" and excess(trial) < excess(current) \
                and not _diverges_before(trial, first):
            # Ranked by how close the first divergent point comes (one significant digit of its
            # floor ratio: nearer is a truer form of the bug), then by the excess left everywhere.
            closeness = float(f"{_point(trial, first).get('floor_ratio') or 0.0:.1g}")
            scored.append(((closeness, excess(trial)), [c.code for c in checks], checks, trial, trial_policy))
    return scored, moved, closer


def _diverges_before(run: dict, point: str) -> bool:
    for p in run["points"]:
        if p["name"] == point:
            return False
        if p["verdict"] == "divergence":
            return True
    return False


def _count(run: dict) -> int:
    return sum(p["verdict"] == "divergence" for p in run["points"])


def static_findings(checks: list[Check], spec, implementation: str, details: dict, tokens, weights) -> list[Finding]:
    out = []
    ctx = Context(spec, implementation, details or {}, None, None, tokens, weights)
    for check in checks:
        if check.kind == "static" and check.applies(spec):
            out.extend(check.run(ctx))
    return out
