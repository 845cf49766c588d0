"""The Python API: everything the command line does.

    import llmdiff
    result = llmdiff.compare("gemma-7b", impls=["hf"], tiny=True)
    assert result, result.summary()
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from llmdiff import __version__, diff, inputs, safetensors_file, weights as weights_mod
from llmdiff.errors import UsageError
from llmdiff.runner import Implementation, RunRequest, run_worker
from llmdiff.spec import ModelSpec, capture_points, get_spec

DTYPES = ("float32", "bfloat16")
ORACLE = "oracle"
TRUTH_DTYPE = "float64"


class CompareResult:
    """A finished comparison. Truthy when every run is at parity and nothing failed."""

    def __init__(self, report: dict):
        self.report = report

    @property
    def exit_code(self) -> int:
        return self.report["exit_code"]

    def __bool__(self) -> bool:
        return self.exit_code == 0

    def summary(self) -> str:
        lines = []
        for impl in self.report["implementations"]:
            if not impl["ok"]:
                lines.append(f"{impl['name']}: error: {impl['error']}")
        for run in self.report["runs"]:
            where = f" first divergence at {run['first_divergence']}" if run["first_divergence"] else ""
            lines.append(f"{run['candidate']} vs {run['reference']} [{run['dtype']}]: {run['verdict']}{where}")
        for f in self.report.get("findings", []):
            lines.append(f"{f['code']} {f['name']} {f['implementation']} [{f['dtype']}] at {f['where']}: {f['message']}")
        return "\n".join(lines)


def _load_weights(spec: ModelSpec, weights, seed: int):
    if weights is None:
        return weights_mod.random_weights(spec, seed), {"source": "random", "path": None, "seed": seed}
    return weights_mod.read_hf_checkpoint(weights, spec), {"source": "hf", "path": str(weights), "seed": None}


def compare(model: str, impls=("hf",), *, dtypes=DTYPES, tiny: bool = False, weights=None,
            seed: int = 0, reference: str = ORACLE, workdir=None, attn: str = "eager",
            timeout: float | None = None, select=(), ignore=(), diagnose: bool = True,
            progress=None) -> CompareResult:
    """Run `model` in each implementation and the oracle, and compare every canonical point.

    impls: implementation names (`hf`, `oracle`), `NAME@PYTHON`, or adapters `module:Class`.
    weights: None for seeded random weights, or a local HF checkpoint directory.
    workdir: where weights, jobs and captures go (kept); None for a temporary directory.
    select, ignore: checks by code, name or prefix (`LD3`); diagnose=False skips the checks.
    progress: optional callable(str) told what is happening.
    """
    t_start = time.perf_counter()
    say = progress or (lambda msg: None)
    spec = get_spec(model, tiny=tiny)
    dtypes = list(dict.fromkeys(dtypes))
    for d in dtypes:
        if d not in DTYPES:
            raise UsageError(f"unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
    if attn not in ("eager", "sdpa"):
        raise UsageError(f"unknown attention implementation {attn!r}; choose eager or sdpa")
    chosen = [Implementation.parse(i) for i in dict.fromkeys(impls)]
    if not any(i.name == ORACLE for i in chosen):
        chosen.append(Implementation.parse(ORACLE))  # always run: it measures the noise floor
    names = [i.name for i in chosen]
    if reference not in names:
        raise UsageError(f"reference {reference!r} is not among the implementations ({', '.join(names)})")

    checks = _checks(select, ignore) if diagnose else None
    canon, weights_info = _load_weights(spec, weights, seed)
    weights_info["fingerprint"] = weights_mod.weights_fingerprint(canon)
    temporary = workdir is None
    work = Path(tempfile.mkdtemp(prefix="llmdiff-") if temporary else workdir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        canonical_path = work / "canonical.safetensors"
        weights_mod.save_canonical(canonical_path, canon)
        hf_dir = weights if weights is not None else weights_mod.write_hf_checkpoint(work / "hf-checkpoint", spec, canon)
        tokens = inputs.synthetic_prompts(spec, seed)
        job = {"spec": spec.to_dict(), "tokens": tokens, "options": {"attn": attn},
               "weights": {"canonical": str(canonical_path), "hf_dir": str(hf_dir)}}

        results = {}
        for impl in chosen:
            requests = [RunRequest(d, str(work / f"{_safe(impl.name)}-{d}")) for d in dtypes]
            if impl.name == ORACLE:  # the float64 answer each dtype is measured against
                requests += [RunRequest(TRUTH_DTYPE, str(work / f"oracle-float64-as-{d}"), constants_dtype=d)
                             for d in dtypes]
            say(f"running {impl.name} ({', '.join(r.dtype if not r.constants_dtype else f'float64 as {r.constants_dtype}' for r in requests)})")
            for r in run_worker(impl, job, requests, work, timeout=timeout):
                results[(r.impl, r.dtype, r.constants_dtype)] = r
        report = _build_report(spec, weights_info, tokens, chosen, dtypes, reference, results, attn)
        if checks is not None:
            _diagnose(report, checks, spec, job, work, results, reference, timeout, say)
        report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        report["workdir"] = None if temporary else str(work)
        return CompareResult(report)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _load_caps(result) -> dict[str, np.ndarray] | None:
    if result is None or not result.ok:
        return None
    return {k: np.asarray(v) for k, v in safetensors_file.load(result.captures_path).items()}


def _build_report(spec, weights_info, tokens, chosen, dtypes, reference, results, attn) -> dict:
    implementations, timings = [], {}
    for impl in chosen:
        mine = [r for (name, _, _), r in results.items() if name == impl.name]
        errors = [f"{r.dtype}: {r.error}" for r in mine if not r.ok]
        versions = next((r.meta.get("versions") for r in mine if r.meta.get("versions")), {})
        implementations.append({
            "name": impl.name, "python": impl.python, "versions": versions or {},
            "ok": not errors, "error": "; ".join(errors) if errors else None,
            "details": next((r.meta.get("details") for r in mine if r.meta.get("details")), {}),
        })
        for r in mine:
            label = r.dtype if not r.constants_dtype else f"{r.dtype}-as-{r.constants_dtype}"
            timings[f"{impl.name}/{label}"] = r.meta.get("timings", {})

    runs = []
    for d in dtypes:
        ref_caps = _load_caps(results.get((reference, d, None)))
        truth_caps = _load_caps(results.get((ORACLE, TRUTH_DTYPE, d)))
        oracle_caps = _load_caps(results.get((ORACLE, d, None)))
        floors = diff.noise_floors(oracle_caps, truth_caps, d) if oracle_caps and truth_caps else {}
        for impl in chosen:
            if impl.name == reference:
                continue
            cand = results.get((impl.name, d, None))
            cand_caps = _load_caps(cand)
            if cand_caps is None or ref_caps is None:
                failed = cand if cand_caps is None else results.get((reference, d, None))
                runs.append({"dtype": d, "reference": reference, "candidate": impl.name, "verdict": "error",
                             "error": failed.error if failed else "no result", "first_divergence": None,
                             "points": [], "logits": None})
                continue
            run = diff.compare_captures(cand_caps, ref_caps, floors, d, capture_points(spec))
            runs.append({"dtype": d, "reference": reference, "candidate": impl.name, **run})

    failed = any(not i["ok"] for i in implementations) or any(r["verdict"] == "error" for r in runs)
    diverged = any(r["verdict"] == "divergence" for r in runs)
    return {
        "llmdiff_version": __version__,
        "model": spec.name,
        "spec": spec.to_dict(),
        "weights": weights_info,
        "tokens": {"source": "synthetic", "prompts": len(tokens), "lengths": [len(t) for t in tokens]},
        "options": {"attn": attn, "dtypes": dtypes},
        "implementations": implementations,
        "runs": runs,
        "findings": [],
        "timings": {"workers": timings},
        "exit_code": 2 if failed else 1 if diverged else 0,
        "python": sys.version.split()[0],
    }


def _checks(select, ignore):
    from llmdiff import registry

    checks, broken = registry.load_checks()
    return registry.select(checks, select, ignore), broken


def _diagnose(report, checks_and_broken, spec, job, work, results, reference, timeout, say) -> None:
    """Add findings: static checks per implementation, counterfactuals per divergent run."""
    from llmdiff import diagnose

    checks, broken = checks_and_broken
    findings = []
    for impl in report["implementations"]:
        if impl["name"] != ORACLE:
            findings += diagnose.static_findings(checks, spec, impl["name"], impl.get("details"),
                                                 report["tokens"], report["weights"])
    divergent = [r for r in report["runs"] if r["verdict"] == "divergence"]
    lab = diagnose.OracleLab(job, work, timeout)
    if divergent and reference == ORACLE:
        for run in divergent:
            say(f"diagnosing {run['candidate']} ({run['dtype']})")
            d = run["dtype"]
            floors = diff.noise_floors(_load_caps(results.get((ORACLE, d, None))),
                                       _load_caps(results.get((ORACLE, TRUTH_DTYPE, d))), d)
            cand_caps = _load_caps(results.get((run["candidate"], d, None)))
            findings += diagnose.diagnose_run(lab, checks, spec, run["candidate"], cand_caps, run, floors,
                                              capture_points(spec))
    report["findings"] = [f.to_dict() for f in findings]
    report["checks"] = {"selected": [c.code for c in checks], "broken": [str(b) for b in broken],
                        "counterfactual_runs": lab.runs}
    if findings and report["exit_code"] == 0:
        report["exit_code"] = 1
