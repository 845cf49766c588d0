"""Render a comparison report: the JSON file (the source of truth) and the terminal tables."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

_SUMMARY_POINT = re.compile(r"^(embed|L\d+\.out|final_norm|logits)$")


def _strict(x):
    """JSON has no NaN or infinity: write them as null (the point's `finite` says why)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def write_json(report: dict, path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_strict(report), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return str(x)
    if x == 0:
        return "0"
    return f"{x:.2e}"


def render(report: dict, console, *, all_points: bool = False) -> None:
    from rich.table import Table

    console.print(f"[bold]llmdiff {report['llmdiff_version']}[/bold]  model [bold]{report['model']}[/bold]"
                  f"{' (tiny)' if report['spec'].get('tiny') else ''}  weights {report['weights']['source']}"
                  f"  tokens {report['tokens']['lengths']}")
    for impl in report["implementations"]:
        versions = ", ".join(f"{k} {v}" for k, v in impl["versions"].items())
        state = "[green]ok[/green]" if impl["ok"] else f"[red]error[/red]: {impl['error']}"
        console.print(f"  {impl['name']:<10} {versions:<40} {state}")
    for run in report["runs"]:
        title = f"{run['candidate']} vs {run['reference']}  ({run['dtype']})"
        if run["verdict"] == "error":
            console.print(f"\n[bold]{title}[/bold]: [red]error[/red]: {run.get('error')}")
            continue
        table = Table(title=title, title_justify="left", show_lines=False)
        for col in ("point", "max abs", "mean abs", "rel L2", "cosine", "noise floor", "x floor", "verdict"):
            table.add_column(col, justify="left" if col in ("point", "verdict") else "right")
        for p in run["points"]:
            divergent = p["verdict"] == "divergence"
            if not (all_points or divergent or _SUMMARY_POINT.match(p["name"])
                    or p["name"] == run["first_divergence"]):
                continue
            first = p["name"] == run["first_divergence"]
            style = "bold red" if first else "red" if divergent else None
            cosine = p.get("cosine")
            table.add_row(p["name"], _fmt(p.get("max_abs")), _fmt(p.get("mean_abs")), _fmt(p.get("rel_l2")),
                          f"{cosine:.6f}" if cosine is not None else "-", _fmt(p.get("noise_floor")),
                          f"{p['floor_ratio']:.1f}" if "floor_ratio" in p else "-",
                          ("FIRST " if first else "") + p["verdict"], style=style)
        console.print()
        console.print(table)
        logits = run.get("logits")
        if logits:
            console.print(f"  logits: KL {_fmt(logits['kl_mean'])}  top-1 agreement {logits['top1_agreement']:.3f}"
                          f"  top-{logits['k']} overlap {logits['topk_overlap']:.3f}")
        if run["missing_points"]:
            console.print(f"  not captured: {', '.join(run['missing_points'])}")
        if not all_points:
            console.print("  (embeddings, block outputs, final norm, logits and divergent points shown; --all-points for all)")
        verdict = run["verdict"]
        color = "green" if verdict == "parity" else "red"
        where = f", first divergence at [bold]{run['first_divergence']}[/bold]" if run["first_divergence"] else ""
        console.print(f"  verdict: [{color}]{verdict}[/{color}]{where}")
    findings = report.get("findings") or []
    if findings:
        console.print(f"\n[bold]findings ({len(findings)})[/bold]")
        for f in findings:
            mark = "[green]confirmed[/green]" if f["confirmed"] else "[yellow]unconfirmed[/yellow]"
            console.print(f"  [bold]{f['code']}[/bold] {f['name']}  {f['implementation']}"
                          f"{' (' + f['dtype'] + ')' if f['dtype'] else ''} at {f['where']}  {mark}")
            console.print(f"      {f['message']}")
            if f.get("fix"):
                console.print(f"      fix: {f['fix']}")
    for b in (report.get("checks") or {}).get("broken", []):
        console.print(f"[yellow]warning[/yellow]: {b}")
    code = report["exit_code"]
    console.print(f"\nexit code {code} ({ {0: 'parity', 1: 'divergence', 2: 'error'}[code] })")
