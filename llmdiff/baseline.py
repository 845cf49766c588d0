"""Regression gating against a saved report: a port known to be imperfect fails CI only when a
point's error grows beyond a stated factor or a finding appears that the baseline did not have."""

from __future__ import annotations

from pathlib import Path

from llmdiff.errors import UsageError

DEFAULT_FACTOR = 2.0


def load(path) -> dict:
    """A saved compare report, checked to be one (read before any model runs: a bad baseline
    must not cost a whole comparison)."""
    from llmdiff import checkpoint_files
    from llmdiff.errors import WeightsError

    path = Path(path)
    if not path.exists():
        raise UsageError(f"baseline {path} does not exist")
    try:
        report = checkpoint_files.read_json(path, what="baseline report")
    except WeightsError as e:
        raise UsageError(f"baseline {e}") from None
    runs, findings = report.get("runs"), report.get("findings", [])
    if not isinstance(runs, list) or not isinstance(findings, list):
        raise UsageError(f"baseline {path} is not an llmdiff compare report (no list of 'runs')")
    for run in runs:
        if not (isinstance(run, dict) and isinstance(run.get("candidate"), str) and isinstance(run.get("dtype"), str)
                and isinstance(run.get("points", []), list)
                and all(isinstance(p, dict) and isinstance(p.get("name"), str)
                        and isinstance(p.get("rel_l2", 0.0), (int, float, type(None))) for p in run.get("points", []))):
            raise UsageError(f"baseline {path}: a run is not of a compare report's shape"
                             " (candidate, dtype, points with name and rel_l2)")
    if not all(isinstance(f, dict) and all(k in f for k in ("code", "implementation", "dtype", "where"))
               for f in findings):
        raise UsageError(f"baseline {path}: a finding lacks code, implementation, dtype or where")
    return report


def _finding_key(f: dict) -> tuple:
    return f["code"], f["implementation"], f["dtype"], f["where"]


def regressions(report: dict, baseline: dict, factor: float = DEFAULT_FACTOR) -> list[dict]:
    """Points whose relative L2 grew more than `factor`x (and past their own threshold), new findings."""
    old_runs = {(r["candidate"], r["dtype"]): r for r in baseline["runs"]}
    out = []
    for run in report["runs"]:
        old = old_runs.get((run["candidate"], run["dtype"]))
        if old is None:
            continue
        old_points = {p["name"]: p for p in old.get("points", [])}
        for p in run.get("points", []):
            before = old_points.get(p["name"])
            if before is None or p["verdict"] != "divergence":
                continue  # within the noise floor is never a regression
            was = before.get("rel_l2") or 0.0
            now = p.get("rel_l2")
            if now is None or now > factor * was:
                out.append({"kind": "point", "candidate": run["candidate"], "dtype": run["dtype"],
                            "point": p["name"], "baseline_rel_l2": was, "rel_l2": now,
                            "message": f"{run['candidate']} [{run['dtype']}] {p['name']}: rel L2 {was:.3g} -> "
                                       f"{now if now is None else format(now, '.3g')} (more than {factor}x)"})
    known = {_finding_key(f) for f in baseline.get("findings", [])}
    for f in report.get("findings", []):
        if _finding_key(f) not in known:
            out.append({"kind": "finding", "code": f["code"], "candidate": f["implementation"],
                        "dtype": f["dtype"], "point": f["where"],
                        "message": f"new finding {f['code']} {f['name']} {f['implementation']} [{f['dtype']}] at {f['where']}"})
    return out


def apply(report: dict, baseline: dict, baseline_path, factor: float = DEFAULT_FACTOR) -> None:
    """Gate `report` on the baseline (`load`ed): exit code 1 only for regressions; an error
    or an interrupted run keeps its code."""
    from llmdiff.report import settle

    found = regressions(report, baseline, factor)
    report["baseline"] = {"path": str(baseline_path), "factor": factor, "regressions": found}
    settle(report)
