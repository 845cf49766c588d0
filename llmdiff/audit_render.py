"""How `llmdiff audit` shows its report: a table of the findings and a verdict line on the
terminal (`render`), or markdown (`markdown`, the `--out` directory's audit.md)."""

from __future__ import annotations


def render(report: dict, console) -> None:
    """The findings as a table, then one verdict line."""
    from rich.table import Table

    if report["findings"]:
        table = Table(title=f"llmdiff audit {report['path']}", show_lines=False)
        for col in ("code", "name", "where", "message"):
            table.add_column(col, overflow="fold")
        for f in report["findings"]:
            table.add_row(f["code"], f["name"], f["where"], f["message"])
        console.print(table)
    s = report["stream"]
    rate = f", {s['mb_per_s']} MB/s" if s.get("mb_per_s") else ""
    model = report["model"] or "no known spec"
    if report["spec"] and report["spec"].get("tiny"):
        model += ", tiny"
    verdict = f"{len(report['findings'])} finding(s)" if report["findings"] else "clean"
    console.print(f"{report['path']} ({model}): {verdict}; {s['tensors']} tensors, "
                  f"{s['bytes'] / 1e9:.2f} GB read in {s['seconds']:.1f} s{rate}")


def markdown(report: dict) -> str:
    lines = [f"# llmdiff audit: {report['path']}", "",
             f"Model: {report['model'] or 'no known spec'}. Findings: {len(report['findings'])}.", ""]
    if report["findings"]:
        lines += ["| code | name | where | message |", "|---|---|---|---|"]
        lines += [f"| {f['code']} | {f['name']} | `{f['where']}` | {f['message'].replace('|', '/')} |"
                  for f in report["findings"]]
    return "\n".join(lines) + "\n"


__all__ = ["markdown", "render"]
