"""Render a comparison report: the JSON file (the source of truth) and the terminal tables."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from llmdiff.plots import layer_sparkline

VERDICTS = {0: "parity", 1: "divergence", 2: "error", 130: "interrupted"}  # by exit code
INTERRUPTED = 130


def exit_code(report: dict) -> int:
    """The one place a compare report's exit code is decided, from what the report holds.

    130: interrupted (`incomplete`). 2: an implementation or a run failed, or a stage could not
    run (`errors`). With a `baseline`: 1 for regressions only, else 0. Otherwise 1 for a
    divergent run or any finding, else 0."""
    if report.get("incomplete"):
        return INTERRUPTED
    if (any(not i["ok"] for i in report["implementations"]) or report.get("errors")
            or any(r["verdict"] == "error" for r in report["runs"])):
        return 2
    if "baseline" in report:
        return 1 if report["baseline"]["regressions"] else 0
    if any(r["verdict"] == "divergence" for r in report["runs"]) or report.get("findings"):
        return 1
    return 0


def settle(report: dict) -> None:
    report["exit_code"] = exit_code(report)

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


def write_outputs(report: dict, out_dir) -> list[Path]:
    """report.json, junit.xml, report.md and report.html in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(report, out_dir / "report.json")
    (out_dir / "junit.xml").write_text(junit_xml(report))
    (out_dir / "report.md").write_text(markdown(report))
    (out_dir / "report.html").write_text(html(report))
    return [out_dir / n for n in ("report.json", "junit.xml", "report.md", "report.html")]


def _run_title(run: dict) -> str:
    return f"{run['candidate']} vs {run['reference']} [{run['dtype']}]"


def junit_xml(report: dict) -> str:
    """One test case per run and per finding; failures exactly for divergent runs and findings."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name=f"llmdiff {report['model']}")
    failures = errors = 0
    for run in report["runs"]:
        case = ET.SubElement(suite, "testcase", classname=f"llmdiff.compare.{report['model']}", name=_run_title(run))
        if run["verdict"] == "divergence":
            failures += 1
            p = next((p for p in run["points"] if p["name"] == run["first_divergence"]), {})
            ET.SubElement(case, "failure", message=f"first divergence at {run['first_divergence']}",
                          type="divergence").text = (
                f"rel L2 {p.get('rel_l2')} is {p.get('floor_ratio')}x its noise floor {p.get('noise_floor')}")
        elif run["verdict"] == "error":
            errors += 1
            ET.SubElement(case, "error", message=str(run.get("error")), type="error")
    for f in report.get("findings", []):
        case = ET.SubElement(suite, "testcase", classname=f"llmdiff.findings.{report['model']}",
                             name=f"{f['code']} {f['name']} {f['implementation']} [{f['dtype']}] at {f['where']}")
        failures += 1
        ET.SubElement(case, "failure", message=f["message"], type=f["code"]).text = f"fix: {f.get('fix', '')}"
    for r in (report.get("baseline") or {}).get("regressions", []):
        case = ET.SubElement(suite, "testcase", classname=f"llmdiff.baseline.{report['model']}", name=r["message"])
        failures += 1
        ET.SubElement(case, "failure", message=r["message"], type="regression")
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    root = ET.Element("testsuites")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


_VERDICT_MARK = {"parity": "✅ parity", "divergence": "❌ divergence", "error": "⚠️ error"}


def markdown(report: dict) -> str:
    """A short summary for a pull-request comment."""
    code = report["exit_code"]
    lines = [f"### llmdiff: {report['model']}{' (tiny)' if report['spec'].get('tiny') else ''} — "
             f"{VERDICTS.get(code, 'error')}", ""]
    lines += ["| candidate | reference | dtype | verdict | first divergence | logits KL | top-1 |",
              "|---|---|---|---|---|---|---|"]
    for run in report["runs"]:
        lg = run.get("logits") or {}
        kl = f"{lg['kl_mean']:.2e}" if lg.get("kl_mean") is not None else "-"
        top1 = f"{lg['top1_agreement']:.3f}" if lg.get("top1_agreement") is not None else "-"
        lines.append(f"| {run['candidate']} | {run['reference']} | {run['dtype']} | {_VERDICT_MARK[run['verdict']]} "
                     f"| {run['first_divergence'] or '-'} | {kl} | {top1} |")
    findings = report.get("findings", [])
    if findings:
        lines += ["", f"**Findings ({len(findings)})**", ""]
        for f in findings[:10]:
            lines.append(f"- `{f['code']}` **{f['name']}** — {f['implementation']} [{f['dtype']}] at `{f['where']}`"
                         f"{' (confirmed)' if f['confirmed'] else ''}. Fix: {f.get('fix') or '-'}")
        if len(findings) > 10:
            lines.append(f"- … and {len(findings) - 10} more in report.json")
    regressions = (report.get("baseline") or {}).get("regressions")
    if regressions is not None:
        lines += ["", f"**Baseline**: {len(regressions)} regression(s)"]
        lines += [f"- {r['message']}" for r in regressions[:10]]
    broken = [i for i in report["implementations"] if not i["ok"]]
    for i in broken:
        lines.append(f"- ⚠️ {i['name']}: {i['error']}")
    for e in report.get("errors", []):
        lines.append(f"- ⚠️ {e['stage']} could not run: {e['error']}")
    if report.get("incomplete"):
        lines.append(f"- ⚠️ incomplete: {report['incomplete']}")
    lines += ["", f"<sub>llmdiff {report['llmdiff_version']} · weights {report['weights']['source']}"
              f" · exit code {code}</sub>"]
    return "\n".join(lines) + "\n"


def html(report: dict) -> str:
    """One self-contained page: summary, findings, a log-scale plot and the table of every run."""
    import base64
    from html import escape

    from llmdiff.plots import finding_png, heatmap_png, run_plot_png

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>llmdiff {escape(report['model'])}</title>",
             "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}.divergence{background:#fdd}"
             ".first{font-weight:bold}.parity{color:#060}.error{color:#a60}</style></head><body>",
             f"<h1>llmdiff: {escape(report['model'])}</h1>",
             f"<p>weights {escape(report['weights']['source'])}, tokens {escape(str(report['tokens'].get('lengths')))}, "
             f"exit code {report['exit_code']}</p>"]
    findings = report.get("findings", [])
    if findings:
        parts.append("<h2>Findings</h2><ul>")
        for f in findings:
            parts.append(f"<li><b>{escape(f['code'])} {escape(f['name'])}</b> {escape(f['implementation'])} "
                         f"[{escape(str(f['dtype']))}] at <code>{escape(f['where'])}</code>: {escape(f['message'])}"
                         f"<br><i>fix:</i> {escape(f.get('fix') or '')}")
            run = next((r for r in report["runs"] if r["candidate"] == f["implementation"]
                        and r["dtype"] == f["dtype"]), None)
            png = finding_png(run, f) if run is not None and f.get("confirmed") else None
            if png:
                parts.append(f"<br><img alt='evidence of {escape(f['code'])}: before and after'"
                             f" src='data:image/png;base64,{base64.b64encode(png).decode()}'>")
            parts.append("</li>")
        parts.append("</ul>")
    for run in report["runs"]:
        title = _run_title(run)
        parts.append(f"<h2>{escape(title)}: <span class='{run['verdict']}'>{run['verdict']}</span>"
                     f"{' at ' + escape(run['first_divergence']) if run['first_divergence'] else ''}</h2>")
        if run["verdict"] == "error":
            parts.append(f"<p class='error'>{escape(str(run.get('error')))}</p>")
            continue
        png = base64.b64encode(run_plot_png(run, title)).decode()
        parts.append(f"<img alt='per-layer error, {escape(title)}' src='data:image/png;base64,{png}'>")
        heat = heatmap_png(run, title)
        if heat is not None:
            parts.append(f"<img alt='error per layer and position, {escape(title)}'"
                         f" src='data:image/png;base64,{base64.b64encode(heat).decode()}'>")
        parts.append("<table><tr><th>point</th><th>max abs</th><th>rel L2</th><th>cosine</th>"
                     "<th>noise floor</th><th>x floor</th><th>verdict</th></tr>")
        for p in run["points"]:
            cls = ("divergence" if p["verdict"] == "divergence" else "") + (
                " first" if p["name"] == run["first_divergence"] else "")
            parts.append(f"<tr class='{cls}'><td>{escape(p['name'])}</td><td>{_fmt(p.get('max_abs'))}</td>"
                         f"<td>{_fmt(p.get('rel_l2'))}</td><td>{_fmt(p.get('cosine'))}</td>"
                         f"<td>{_fmt(p.get('noise_floor'))}</td><td>{_fmt(p.get('floor_ratio'))}</td>"
                         f"<td>{p['verdict']}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


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
    from llmdiff.tokenizer_render import summary_lines  # tokens first: numbers mean nothing if inputs differ

    for line in summary_lines(report.get("tokenizer")):
        console.print(line)
    ignored = [n for k in ("ignored_safetensors", "ignored_pickles", "ignored_code") for n in report["weights"].get(k, [])]
    if ignored:
        console.print(f"  weights read from {', '.join(report['weights']['files'])};"
                      f" [yellow]not read[/yellow]: {', '.join(ignored)}")
    for impl in report["implementations"]:
        versions = ", ".join(f"{k} {v}" for k, v in impl["versions"].items())
        state = "[green]ok[/green]" if impl["ok"] else f"[red]error[/red]: {impl['error']}"
        console.print(f"  {impl['name']:<10} {versions:<40} {state}")
        trainer = (impl.get("details") or {}).get("trainer") or {}
        if trainer.get("error"):  # --grad: why loss:trainer and grad:trainer:w:* are absent
            console.print(f"  {'':<10} no Trainer step (loss:trainer, grad:trainer:w:*): {trainer['error']}")
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
        spark = layer_sparkline(run)
        if spark:
            console.print(f"  per-layer rel L2: {spark}")
        if run["missing_points"]:
            missing = [n for n in run["missing_points"] if not n.startswith("grad:trainer:w:")]
            if len(missing) < len(run["missing_points"]):  # one entry for the Trainer's weights
                missing.append("grad:trainer:w:*")
            console.print(f"  not captured: {', '.join(missing)}")
        if not all_points:
            console.print("  (embeddings, block outputs, final norm, logits and divergent points shown; --all-points for all)")
        if any(p.get("estimated") for p in run["points"]):
            console.print("  (sketched capture: rel L2 and cosine estimated from a 64-value random projection per"
                          " position, about 1% over a prompt; absolute errors and KL need --capture full)")
        if run.get("local_divergence"):
            console.print(f"  teacher-forced: a local difference starts at {run['local_divergence']} (below the"
                          " accumulated noise, and no known bug's counterfactual confirms it)")
        verdict = run["verdict"]
        color = "green" if verdict == "parity" else "red"
        where = f", first divergence at [bold]{run['first_divergence']}[/bold]" if run["first_divergence"] else ""
        start = next((p.get("diverges_from") for p in run["points"] if p["name"] == run["first_divergence"]), None)
        if start:
            where += f", from position {start} on (the error grows along the sequence)"
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
    for e in report.get("errors", []):
        console.print(f"[red]error[/red]: {e['stage']} could not run: {e['error']}")
    if report.get("incomplete"):
        console.print(f"[red]incomplete[/red]: {report['incomplete']}")
    code = report["exit_code"]
    console.print(f"\nexit code {code} ({VERDICTS.get(code, 'error')})")
