"""The `llmdiff` command line: parse options, call `llmdiff.api`, render. Nothing else."""

from __future__ import annotations

import json
import sys

import click

from llmdiff import __version__
from llmdiff.errors import LLMDiffError


def _console(no_color: bool = False):
    from rich.console import Console

    return Console(no_color=no_color, highlight=False, width=None if sys.stdout.isatty() else 120)


def _fail(message: str, debug: bool, json_path=None):
    if json_path:
        from llmdiff.report import write_json

        write_json({"llmdiff_version": __version__, "error": message, "exit_code": 2}, json_path)
    if debug:
        raise
    click.echo(f"llmdiff: error: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmdiff")
def main():
    """Find bugs in LLM implementations: same weights, several implementations, layer by layer."""


@main.command()
def models():
    """List the models llmdiff knows."""
    from llmdiff.spec import get_spec, model_names

    for name in model_names():
        s = get_spec(name)
        click.echo(f"{name:<12} {s.family:<7} vocab {s.vocab_size}  hidden {s.hidden_size}  layers {s.num_layers}"
                   f"  heads {s.num_heads}/{s.num_kv_heads} kv  head_dim {s.head_dim}  mlp {s.mlp_dim}")


@main.command()
@click.argument("model")
@click.option("--tiny", is_flag=True, help="A tiny model with every architectural feature kept.")
@click.option("--impl", "impls", multiple=True, metavar="NAME[@PYTHON]",
              help="Implementation to compare (repeatable): hf, oracle, NAME@/path/to/python, module:Class.")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16"]),
              help="Compute dtype (repeatable); default float32 and bfloat16.")
@click.option("--weights", type=click.Path(), help="A local HF checkpoint directory (safetensors).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random weights and prompts.")
@click.option("--reference", default="oracle", show_default=True, help="Implementation the others are compared with.")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
              help="Attention implementation for hf.")
@click.option("--json", "json_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--workdir", type=click.Path(), help="Keep weights, jobs and captures in this directory.")
@click.option("--timeout", type=float, default=None, help="Seconds each worker may run.")
@click.option("--select", "select", multiple=True, metavar="CODE|NAME|PREFIX", help="Run only these checks.")
@click.option("--ignore", "ignore", multiple=True, metavar="CODE|NAME|PREFIX", help="Skip these checks.")
@click.option("--no-diagnose", is_flag=True, help="Only compare; run no checks.")
@click.option("--all-points", is_flag=True, help="Show every point, not only the summary ones.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the verdict lines.")
@click.option("--no-color", is_flag=True)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def compare(model, tiny, impls, dtypes, weights, seed, reference, attn, json_path, workdir, timeout,
            select, ignore, no_diagnose, all_points, quiet, no_color, debug):
    """Compare MODEL across implementations, point by point, in float32 and bfloat16.

    Exit codes: 0 parity, 1 divergence, 2 usage or runtime error.
    """
    from llmdiff import api
    from llmdiff.report import render, write_json

    console = _console(no_color)
    try:
        result = api.compare(model, impls or ("hf",), dtypes=dtypes or api.DTYPES, tiny=tiny, weights=weights,
                             seed=seed, reference=reference, attn=attn, workdir=workdir, timeout=timeout,
                             select=select, ignore=ignore, diagnose=not no_diagnose, progress=None if quiet else (lambda m: console.print(f"[dim]{m}[/dim]")))
    except LLMDiffError as e:
        _fail(str(e), debug, json_path)
    if json_path:
        write_json(result.report, json_path)
    if quiet:
        click.echo(result.summary())
    else:
        render(result.report, console, all_points=all_points)
    for impl in result.report["implementations"]:
        if not impl["ok"]:
            click.echo(f"llmdiff: error: {impl['name']}: {impl['error']}", err=True)
    sys.exit(result.exit_code)


@main.group()
def checks():
    """The known-bug checks: list them, explain one."""


@checks.command("list")
def checks_list():
    """Code, name, families, kind and status of every check."""
    from llmdiff import registry

    found, broken = registry.load_checks()
    for c in found:
        dtypes = "" if c.dtypes == ("float32", "bfloat16") else f" ({', '.join(c.dtypes)} only)"
        click.echo(f"{c.code}  {c.name:<34} {','.join(c.families):<20} {c.kind:<8} ok{dtypes}")
    for b in broken:
        click.echo(f"llmdiff: warning: {b}", err=True)


@checks.command("explain")
@click.argument("code_or_name")
def checks_explain(code_or_name):
    """Print what a check finds, why it matters, how it is confirmed, the fix, references."""
    from llmdiff import registry
    from llmdiff.check import HEADINGS

    try:
        check = registry.find(registry.load_checks()[0], code_or_name)
    except LLMDiffError as e:
        _fail(str(e), False)
    click.echo(f"{check.code} {check.name}  ({check.kind}; families: {', '.join(check.families)};"
               f" dtypes: {', '.join(check.dtypes)})")
    if check.knob:
        click.echo(f"oracle knob: {check.knob[0]}={check.knob[1]!r}")
    docs = check.docs()
    for heading in HEADINGS:
        click.echo(f"\n{heading}\n{'-' * len(heading)}\n{docs.get(heading, '')}")


@main.command()
@click.option("--model", default="gemma-7b", show_default=True)
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16"]))
@click.option("--json", "json_path", type=click.Path(), help="Write the matrix as JSON here.")
@click.option("--debug", is_flag=True)
def selftest(model, dtypes, json_path, debug):
    """Diagnose oracle mutants with known bugs: every mutant must be named by its own check only.

    Exit 0 when the confusion matrix is diagonal, 1 otherwise.
    """
    from llmdiff import selftest as st
    from llmdiff.report import write_json

    console = _console()
    try:
        result = st.selftest(model, dtypes=dtypes or ("float32", "bfloat16"),
                             progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    except LLMDiffError as e:
        _fail(str(e), debug, json_path)
    if json_path:
        write_json(result, json_path)
    st.render(result, console)
    sys.exit(0 if result["diagonal"] else 1)


if __name__ == "__main__":
    main()
