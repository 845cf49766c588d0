"""What `compare` and `llmdiff tokenize` print about tokenizer parity (text with rich markup)."""

from __future__ import annotations

from llmdiff.tokenizer_parity import chat_difference_kind, describe_chat, describe_difference


def summary_lines(report: dict | None) -> list[str]:
    """What the top of a compare report says about the tokenizers (plain text with rich markup)."""
    if not report:
        return []
    if "error" in report:
        return [f"[red]tokenizer parity could not run[/red]: {report['error']}"]
    impls = [i["name"] for i in report["implementations"] if i["available"]]
    absent = [i["name"] for i in report["implementations"] if not i["available"]]
    differ = [s for s in report["strings"] if s["status"] == "differ"]
    chat = report.get("chat") or {}
    chat_bad = [c for c in chat.get("conversations", []) if chat_difference_kind(c)]
    lines = []
    head = (f"tokenizers {', '.join(impls)} on {len(report['strings'])} strings: "
            + ("[green]agree[/green]" if not differ else f"[red]{len(differ)} differ[/red]"))
    if chat.get("present"):
        head += ("; chat template " + ("[green]matches the reference format[/green]" if not chat_bad
                                       else f"[red]{len(chat_bad)} conversation(s) differ[/red]"))
    else:
        head += "; no chat template"
    lines.append(head)
    for s in differ[:5]:
        for d in s["differences"]:
            if d["kind"] != "by-design":
                lines.append(f"  [red]{d['kind']}[/red] {describe_difference(s, d)}")
    for c in chat_bad[:3]:
        lines.append(f"  [red]{chat_difference_kind(c)}[/red] {describe_chat(c)}")
    bos = {i["name"]: i.get("adds_bos") for i in report["implementations"] if i["available"]}
    lines.append("  adds BOS by default: " + ", ".join(f"{k} {'yes' if v == 1 else 'no' if not v else v}"
                                                      for k, v in bos.items()))
    if absent:
        lines.append("  [dim]not run: " + "; ".join(
            f"{i['name']} ({i['reason']})" for i in report["implementations"] if not i["available"]) + "[/dim]")
    for n in report.get("notes", []):
        lines.append(f"  [dim]note: {n}[/dim]")
    return lines


def render(report: dict, console) -> None:
    """The terminal view of `llmdiff tokenize`."""
    parity = report["tokenizer"]
    console.print(f"[bold]llmdiff {report['llmdiff_version']}[/bold]  tokenizer of [bold]{report['model']}[/bold]"
                  f"{' (tiny)' if report['tiny'] else ''}  reference {parity['reference']}")
    for i in parity["implementations"]:
        if i["available"]:
            console.print(f"  {i['name']:<14} {i['version'] or '':<10} default {i['probe']!r} -> {i['probe_ids']}"
                          f"  (adds BOS: {'yes' if i['adds_bos'] else 'no'}, EOS: {'yes' if i['adds_eos'] else 'no'})")
    for line in summary_lines(parity):
        console.print(line)
    for f in report["findings"]:
        console.print(f"  [bold]{f['code']}[/bold] {f['name']}  {f['implementation']} at {f['where']}")
        console.print(f"      {f['message']}")
        if f.get("fix"):
            console.print(f"      fix: {f['fix']}")
    code = report["exit_code"]
    console.print(f"\nexit code {code} ({'agreement' if code == 0 else 'findings'})")
