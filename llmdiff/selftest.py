"""`llmdiff selftest`: does every dynamic check name its own bug, and only its own?

For each dtype, candidates are the oracle itself with bugs switched on: each dynamic check's
bug alone, the clean oracle, three bugs at once, and a bug no check knows (the attention output
scaled by 1.01). Each is compared with the clean oracle and diagnosed exactly as `compare`
diagnoses an implementation. The confusion matrix must be diagonal: each mutant named by its
own check and no other, nothing for the clean model, exactly the three for the triple, and
"unexplained" at the right point for the unknown bug.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from llmdiff import diagnose, diff, inputs, registry, weights
from llmdiff.spec import capture_points, get_spec

UNKNOWN_BUG = {"attn_out_scale": 1.01}
UNKNOWN_BUG_POINT = "L0.attn_out"


def _mutants(checks, dtype):
    acting = [c for c in checks if dtype in c.dtypes]
    out = [("clean", {}, [], None)]
    out += [(c.code, c.variants()[0], [c.code], None) for c in acting]
    if len(acting) >= 3:
        three = acting[:3]
        policy = {k: v for c in three for k, v in c.variants()[0].items()}
        out.append(("+".join(c.code for c in three), policy, [c.code for c in three], None))
    out.append(("unknown", UNKNOWN_BUG, [diagnose.UNEXPLAINED[0]], UNKNOWN_BUG_POINT))
    return out


def selftest(model: str = "gemma-7b", dtypes=("float32", "bfloat16"), seed: int = 0, progress=None) -> dict:
    say = progress or (lambda m: None)
    spec = get_spec(model, tiny=True)
    checks = [c for c in registry.load_checks()[0] if c.knob and c.applies(spec)]
    work = Path(tempfile.mkdtemp(prefix="llmdiff-selftest-"))
    try:
        canonical = work / "canonical.safetensors"
        weights.save_canonical(canonical, weights.random_weights(spec, seed))
        job = {"spec": spec.to_dict(), "tokens": inputs.synthetic_prompts(spec, seed),
               "weights": {"canonical": str(canonical)}, "options": {}}
        lab = diagnose.OracleLab(job, work)
        points = capture_points(spec)
        rows = []
        for dtype in dtypes:
            mutants = _mutants(checks, dtype)
            say(f"{dtype}: running {len(mutants)} mutants")
            truth, = lab.captures("float64", [{}], constants_dtype=dtype)
            clean, *_ = lab.captures(dtype, [m[1] for m in mutants])
            floors = diff.noise_floors(clean, truth, dtype)
            for name, policy, expected, expected_point in mutants:
                caps, = lab.captures(dtype, [policy])
                if caps is None:
                    rows.append({"dtype": dtype, "mutant": name, "policy": policy, "expected": sorted(expected),
                                 "found": [], "where": [], "ok": False, "first_divergence": None,
                                 "error": lab.errors.get(diagnose._policy_key(dtype, policy, None))})
                    continue
                run = dict(diff.compare_captures(caps, clean, floors, dtype, points), dtype=dtype)
                found = []
                if run["verdict"] == "divergence":
                    found = diagnose.diagnose_run(lab, checks, spec, name, caps, run, floors, points)
                codes = sorted(f.code for f in found)
                ok = codes == sorted(expected) and (
                    expected_point is None or any(f.where == expected_point for f in found))
                rows.append({"dtype": dtype, "mutant": name, "policy": policy, "expected": sorted(expected),
                             "found": codes, "where": [f.where for f in found], "ok": ok,
                             "first_divergence": run["first_divergence"]})
        return {"model": spec.name, "dtypes": list(dtypes), "checks": [c.code for c in checks], "rows": rows,
                "diagonal": all(r["ok"] for r in rows), "oracle_runs": lab.runs, "errors": lab.errors}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def render(result: dict, console) -> None:
    from rich.table import Table

    codes = result["checks"] + [diagnose.UNEXPLAINED[0]]
    for dtype in result["dtypes"]:
        table = Table(title=f"selftest {result['model']} (tiny), {dtype}: mutant (rows) x finding (columns)",
                      title_justify="left")
        table.add_column("mutant")
        for c in codes:
            table.add_column(c, justify="center")
        table.add_column("ok")
        for r in (r for r in result["rows"] if r["dtype"] == dtype):
            cells = []
            for c in codes:
                hit, want = c in r["found"], c in r["expected"]
                cells.append("[green]X[/green]" if hit and want else "[red]X[/red]" if hit else
                             "[red]-[/red]" if want else "·")
            table.add_row(r["mutant"], *cells, "[green]yes[/green]" if r["ok"] else "[red]no[/red]")
        console.print(table)
    for key, err in result["errors"].items():
        console.print(f"[red]oracle run failed[/red] {key}: {err}")
    verdict = "[green]diagonal[/green]" if result["diagonal"] else "[red]NOT diagonal[/red]"
    console.print(f"{verdict} ({result['oracle_runs']} oracle runs)")
