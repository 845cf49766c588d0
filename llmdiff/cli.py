"""The `llmdiff` command line: parse options, call `llmdiff.api`, render. Nothing else."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import click

from llmdiff import __version__
from llmdiff.errors import LLMDiffError


def _console(no_color: bool = False):
    from rich.console import Console

    return Console(no_color=no_color, highlight=False, width=None if sys.stdout.isatty() else 120)


def _fail(message: str, debug: bool, json_path=None):
    """One line and exit 2. The error goes into `json_path` only where nothing is on disk there
    yet: an error never replaces a saved report."""
    kept = ""
    if json_path:
        from llmdiff.report import write_json

        if os.path.lexists(json_path):
            kept = f" ({json_path} left as it was)"
        else:
            try:
                write_json({"llmdiff_version": __version__, "error": message, "exit_code": 2}, json_path)
            except OSError:
                pass
    if debug:
        raise
    click.echo(f"llmdiff: error: {message}{kept}", err=True)
    sys.exit(2)


def _check_outputs(json_path=None, out=None, workdir=None) -> None:
    """Where results will be written, checked before anything runs (a run's results are never
    lost to an output path that cannot be written)."""
    from pathlib import Path

    def writable_dir(path: Path, what: str):
        if path.exists() and not path.is_dir():
            raise LLMDiffError(f"{what} {path} is a file, not a directory")
        parent = path
        while not parent.exists():  # the first existing folder above it will hold what is made
            parent = parent.parent
        if not parent.is_dir():
            raise LLMDiffError(f"{what} {path}: {parent} is a file, not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise LLMDiffError(f"{what} {path}: {parent} is not writable")

    if json_path:
        if Path(json_path).is_dir():
            raise LLMDiffError(f"--json {json_path} is a directory; give a file name")
        writable_dir(Path(json_path).parent, "--json")
    if out:
        writable_dir(Path(out), "--out")
    if workdir:
        writable_dir(Path(workdir), "--workdir")


_signals = []


@contextlib.contextmanager
def _progress(console, quiet: bool):
    """What a compare is doing, as it happens (the same events go to its live log,
    WORKDIR/progress.log). On a terminal: each event on its own line with the time since the
    start, under a spinner naming the phase it is in; otherwise (a pipe, CI) plain lines."""
    import time

    if quiet:
        yield None
        return
    if not console.is_terminal:
        yield lambda m: console.print(f"[dim]{m}[/dim]")
        return
    t0 = time.perf_counter()
    with console.status("starting", spinner="dots") as status:
        def say(message: str) -> None:
            console.print(f"[dim]{time.perf_counter() - t0:7.1f} s  {message}[/dim]")
            status.update(message.strip())
        yield say


def _on_sigterm(signum, frame):
    """SIGTERM is handled as Ctrl-C is: workers end, temporary files go, finished runs are kept."""
    _signals.append(signum)
    raise KeyboardInterrupt


def _interrupt_code() -> int:
    return 128 + (_signals[-1] if _signals else signal.SIGINT)


def _interrupted_line() -> None:
    click.echo("llmdiff: error: interrupted before any run finished; nothing to report", err=True)
    sys.exit(_interrupt_code())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llmdiff")
def main():
    """Find bugs in LLM implementations: same weights, several implementations, layer by layer."""


def _interruptible() -> None:
    """For a command that says what an interrupt left (compare, selftest, matrix, bisect) and
    exits 128 + the signal: SIGTERM as Ctrl-C (workers end, temporary files go, what finished
    is kept), and Ctrl-C (SIGINT) interrupts even where the shell started llmdiff with SIGINT
    ignored (a background job; CI runners cancel with SIGINT): Python keeps an inherited SIG_IGN
    otherwise. Other commands keep the default: SIGTERM ends them with 143."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)


@main.command()
def models():
    """List the registered models (any checkpoint of their families compares by its path or hub id)."""
    from llmdiff.spec import get_spec, model_names

    width = max(map(len, model_names()))
    for name in model_names():
        s = get_spec(name)
        click.echo(f"{name:<{width}} {s.family:<7} vocab {s.vocab_size}  hidden {s.hidden_size}  layers {s.num_layers}"
                   f"  heads {s.num_heads}/{s.num_kv_heads} kv  head_dim {s.head_dim}  mlp {s.mlp_dim}")


def _layers(text):
    """'0,1,27' or '0-3,8' -> [0, 1, 27] / [0, 1, 2, 3, 8]; None stays None."""
    if text is None:
        return None
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise LLMDiffError(f"--layers {text!r}: expected numbers and ranges, e.g. '0,1,27' or '0-3'") from None
    return out


def _thresholds(floor_factor, threshold_opts, config):
    from llmdiff import diff

    per_point = dict(config.get("thresholds", {}))
    for item in threshold_opts:
        pattern, sep, value = item.partition("=")
        try:
            per_point = {pattern: float(value), **{k: v for k, v in per_point.items() if k != pattern}}
            if not sep or not pattern or float(value) <= 0:
                raise ValueError
        except ValueError:
            raise LLMDiffError(f"--threshold {item!r}: expected GLOB=FACTOR, e.g. 'L*.q=16'") from None
    factor = floor_factor if floor_factor is not None else config.get("floor_factor", diff.FLOOR_FACTOR)
    if not factor > 0:
        raise LLMDiffError(f"--floor-factor {factor}: give a positive factor, e.g. 8")
    return diff.Thresholds(float(factor), per_point)


def _finish(result, console, *, out, json_path, baseline, baseline_factor, quiet, all_points, config,
            interrupt_code=None):
    """Baseline gate (the baseline `(path, report)` loaded before the run), files, terminal;
    then exit with the report's code."""
    from llmdiff import baseline as baseline_mod
    from llmdiff.report import render, write_json, write_outputs

    if baseline:
        baseline_mod.apply(result.report, baseline[1], baseline[0],
                           baseline_factor or config.get("baseline_factor", baseline_mod.DEFAULT_FACTOR))
    if out:
        write_outputs(result.report, out)
    if json_path:
        write_json(result.report, json_path)
    if quiet:
        click.echo(result.summary())
    else:
        render(result.report, console, all_points=all_points)
    for impl in result.report["implementations"]:
        if not impl["ok"]:
            click.echo(f"llmdiff: error: {impl['name']}: {impl['error']}", err=True)
    for e in result.report.get("errors", []):
        skip = f"; skip it with {e['skip']}" if e.get("skip") else ""
        click.echo(f"llmdiff: error: {e['stage']} could not run: {e['error']}{skip}", err=True)
    if result.report.get("incomplete"):
        click.echo(f"llmdiff: error: {result.report['incomplete']}; what finished is in the report", err=True)
    sys.exit(interrupt_code if result.report.get("incomplete") and interrupt_code else result.exit_code)


def _load_baseline(path, baseline_factor):
    from llmdiff import baseline as baseline_mod

    if baseline_factor is not None and not baseline_factor > 0:
        raise LLMDiffError(f"--baseline-factor {baseline_factor}: give a positive factor, e.g. 2")
    return (path, baseline_mod.load(path)) if path else None


_OUTPUT_OPTIONS = [
    click.option("--json", "json_path", type=click.Path(), help="Write the JSON report here."),
    click.option("--out", type=click.Path(file_okay=False),
                 help="Write report.json, junit.xml, report.md and report.html into this directory."),
    click.option("--floor-factor", type=float, default=None,
                 help="A point diverges above this many times its noise floor (default 8)."),
    click.option("--threshold", "thresholds", multiple=True, metavar="GLOB=FACTOR",
                 help="Per-point factor, e.g. 'L*.q=16' (repeatable; first match wins)."),
    click.option("--baseline", type=click.Path(dir_okay=False),
                 help="A saved report.json: fail only on errors that grew or findings that are new."),
    click.option("--baseline-factor", type=float, default=None, help="Growth that counts as a regression (default 2)."),
    click.option("--all-points", is_flag=True, help="Show every point, not only the summary ones."),
    click.option("-q", "--quiet", is_flag=True, help="Print only the verdict lines."),
    click.option("--no-color", is_flag=True),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
]


def _output_options(f):
    for option in reversed(_OUTPUT_OPTIONS):
        f = option(f)
    return f


_MODEL_HELP = ("MODEL: a registered model (`llmdiff models`), an HF checkpoint directory, or a hub id"
               " (google/gemma-7b) read through the hub's cache.")


def _revision_option(f):
    return click.option("--revision", default=None, help="The hub revision (branch, tag or commit) of a hub id.")(f)


@main.command(epilog=_MODEL_HELP)
@click.argument("model")
@click.option("--tiny", is_flag=True, help="A tiny model with every architectural feature kept.")
@_revision_option
@click.option("--config", "config_mode", type=click.Choice(["published", "corrected"]), default="published",
              show_default=True,
              help="A registered model's config.json: as its publisher put it on the hub, or corrected (every"
                   " field explicit) to test the modelling code alone.")
@click.option("--impl", "impls", multiple=True, metavar="[LABEL=]NAME[@PYTHON]",
              help="Implementation to compare (repeatable): hf, oracle, deepmind (Google DeepMind's gemma; install:"
                   " python -m llmdiff.references.deepmind_gemma install), NAME@/path/to/python, module:Class;"
                   " LABEL= names it in the reports (old=hf@/venv/bin/python).")
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16", "autocast-bfloat16", "autocast-float16"]),
              help="Compute dtype (repeatable); default float32 and bfloat16. autocast-bfloat16: float32 weights"
                   " under torch.autocast (the oracle: matrix products in bfloat16, the rest in float32); autocast-float16 likewise.")
@click.option("--weights", type=click.Path(), metavar="DIR|deepmind:DIR",
              help="A local HF checkpoint directory (safetensors), or deepmind:DIR, an Orbax checkpoint.")
@click.option("--seed", type=int, default=None, help="Seed of random weights and prompts (default 0).")
@click.option("--reference", default=None, help="Implementation the others are compared with (default oracle).")
@click.option("--attn", type=click.Choice(["eager", "sdpa"]), default=None, help="Attention implementation for hf.")
@click.option("--workdir", type=click.Path(), help="Keep weights, jobs and captures in this directory.")
@click.option("--save-captures", is_flag=True, help="Keep every worker's captures in OUT/captures for `llmdiff report`.")
@click.option("--timeout", type=float, default=None, help="Seconds each worker may run.")
@click.option("--select", "select", multiple=True, metavar="CODE|NAME|PREFIX", help="Run only these checks.")
@click.option("--ignore", "ignore", multiple=True, metavar="CODE|NAME|PREFIX", help="Skip these checks.")
@click.option("--no-diagnose", is_flag=True, help="Only compare; run no checks.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where workers run; auto is cuda when the framework sees a GPU.")
@click.option("--points", "points", multiple=True, metavar="GLOB",
              help="Capture only matching points, e.g. 'L*.out' (repeatable).")
@click.option("--layers", default=None, metavar="LIST", help="Capture only these layers, e.g. '0,1,27' or '0-3'.")
@click.option("--capture", type=click.Choice(["auto", "full", "sketch"]), default="auto", show_default=True,
              help="full: every value leaves the device; sketch: per-position norms and a random projection,"
                   " computed on the device (estimated rel L2, no max abs); auto: sketch above 1 GiB per run.")
@click.option("--stream/--no-stream", default=None,
              help="Run one decoder block at a time, only its weights on the device (models larger than it);"
                   " default: when a run's weights would take over half of the GPU.")
@click.option("--devices", type=click.IntRange(min=1), default=None, metavar="N",
              help="Spread each run over N GPUs, whole decoder layers to a GPU (hf through accelerate);"
                   " default: one when the weights take at most half of it, else the fewest that hold them.")
@click.option("--tokens", "lengths", default=None, metavar="N[,N...]",
              help="Lengths of the synthetic prompts (models without a tokenizer), e.g. 512.")
@click.option("--no-tokenizer-parity", is_flag=True,
              help="Do not compare the checkpoint's tokenizers (the prompts still go through one).")
@click.option("--grad", is_flag=True,
              help="Training parity: also the causal-LM loss and its gradients at every point and weight"
                   " (grad:POINT, grad:w:NAME, loss), compared against their own noise floors.")
@click.option("--grad-checkpointing", is_flag=True,
              help="With --grad: HF computes its gradients with transformers' own gradient checkpointing on"
                   " (train mode), so its recompute of each layer in the backward is what is compared.")
@click.option("--quant", default=None, metavar="TYPE",
              help="q8_0: llama.cpp (--impl llamacpp, alone) runs the checkpoint its converter quantised to Q8_0,"
                   " against the oracle quantised the same way (weights, and matmul inputs as ggml rounds them);"
                   " float32.")
@_output_options
def compare(model, tiny, revision, config_mode, impls, dtypes, weights, seed, reference, attn, workdir, save_captures, timeout,
            select, ignore, no_diagnose, device, points, layers, capture, stream, devices, lengths, no_tokenizer_parity,
            grad, grad_checkpointing, quant, json_path, out, floor_factor, thresholds, baseline, baseline_factor, all_points, quiet, no_color, debug):
    """Compare MODEL across implementations, point by point, in float32 and bfloat16.

    Defaults come from [tool.llmdiff] in pyproject.toml or llmdiff.toml; options override them.
    Exit codes: 0 parity, 1 divergence or findings, 2 usage or runtime error.
    """
    from llmdiff import api
    from llmdiff.config import find_config

    console = _console(no_color)
    _interruptible()
    try:
        config, _ = find_config()
        if save_captures and not out:
            raise LLMDiffError("--save-captures needs --out DIR (captures go to DIR/captures)")
        # Everything a late stage needs is checked before any model runs.
        _check_outputs(json_path, out, workdir)
        thresholds = _thresholds(floor_factor, thresholds, config)
        baseline = _load_baseline(baseline, baseline_factor)
        with _progress(console, quiet) as say:
            result = api.compare(
                model, impls or config.get("implementations", ("hf",)), dtypes=dtypes or config.get("dtypes"),
                tiny=tiny, weights=weights, seed=seed if seed is not None else config.get("seed", 0),
                reference=reference or config.get("reference", api.ORACLE), attn=attn or config.get("attn", "eager"),
                workdir=(f"{out}/captures" if save_captures else workdir),
                timeout=timeout if timeout is not None else config.get("timeout"),
                select=select or config.get("select", ()), ignore=ignore or config.get("ignore", ()),
                diagnose=not no_diagnose, thresholds=thresholds,
                device=device, points=points or None, layers=_layers(layers), capture=capture,
                stream="auto" if stream is None else stream,
                lengths=_lengths(lengths), devices=devices, tokenizer_parity=not no_tokenizer_parity,
                revision=revision, config=config_mode, grad=grad, grad_checkpointing=grad_checkpointing,
                quant=quant, progress=say)
        _finish(result, console, out=out, json_path=json_path, baseline=baseline, baseline_factor=baseline_factor,
                quiet=quiet, all_points=all_points, config=config, interrupt_code=_interrupt_code())
    except LLMDiffError as e:
        _fail(str(e), debug, json_path)
    except KeyboardInterrupt:
        _interrupted_line()


def _lengths(text):
    if text is None:
        return None
    try:
        lengths = tuple(int(p) for p in text.split(","))
    except ValueError:
        raise LLMDiffError(f"--tokens {text!r}: expected lengths, e.g. '512' or '24,192'") from None
    if any(n < 2 for n in lengths):
        raise LLMDiffError(f"--tokens {text!r}: a prompt needs at least 2 tokens (BOS and one more)")
    return lengths


@main.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--reference", default=None, help="Compare against this implementation instead.")
@_output_options
def report(directory, reference, json_path, out, floor_factor, thresholds, baseline, baseline_factor,
           all_points, quiet, no_color, debug):
    """Re-render and re-compare a saved run (compare --out DIR --save-captures) without running any model."""
    from llmdiff import api
    from llmdiff.config import find_config

    console = _console(no_color)
    try:
        config, _ = find_config()
        _check_outputs(json_path, out)
        changed = floor_factor is not None or thresholds
        thresholds = _thresholds(floor_factor, thresholds, config) if changed else None
        baseline = _load_baseline(baseline, baseline_factor)
        result = api.recompare(directory, reference=reference, thresholds=thresholds)
        _finish(result, console, out=out, json_path=json_path, baseline=baseline, baseline_factor=baseline_factor,
                quiet=quiet, all_points=all_points, config=config)
    except LLMDiffError as e:
        _fail(str(e), debug, json_path)


@main.command()
@click.argument("path", type=click.Path())
@_revision_option
@click.option("--model", help="Compare the config with this model's spec (default: detected from config.json).")
@click.option("--select", "select", multiple=True, metavar="CODE|NAME|PREFIX", help="Run only these checks.")
@click.option("--ignore", "ignore", multiple=True, metavar="CODE|NAME|PREFIX", help="Skip these checks.")
@click.option("--json", "json_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--out", "out_dir", type=click.Path(), help="Write audit.json and audit.md into this directory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; print only the findings.")
@click.option("--no-color", is_flag=True)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def audit(path, revision, model, select, ignore, json_path, out_dir, quiet, no_color, debug):
    """Static checks of the checkpoint directory PATH (or a hub id, read through the hub's
    cache), streaming: no forward pass, nothing executed, nothing unpickled.

    Exit codes: 0 clean, 1 findings, 2 usage or runtime error.
    """
    from pathlib import Path

    from llmdiff import audit as audit_mod, model_source
    from llmdiff.audit_render import markdown, render
    from llmdiff.report import write_json

    console = _console(no_color)
    show_bar = not quiet and console.is_terminal
    try:
        _check_outputs(json_path, out_dir)
        path = str(model_source.checkpoint_dir(path, revision))
        if show_bar:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            with Progress(TextColumn("auditing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), console=console, transient=True) as bar:
                task = bar.add_task("read", total=None)
                result = audit_mod.audit(path, model, select=select, ignore=ignore,
                                         progress=lambda done, total: bar.update(task, completed=done, total=total))
        else:
            result = audit_mod.audit(path, model, select=select, ignore=ignore)
    except LLMDiffError as e:
        _fail(str(e), debug, json_path)
    if json_path:
        write_json(result.report, json_path)
    if out_dir:
        write_json(result.report, Path(out_dir) / "audit.json")
        (Path(out_dir) / "audit.md").write_text(markdown(result.report))
    if quiet:
        if result.findings:
            click.echo(result.summary())
    else:
        render(result.report, console)
    for b in result.report["checks"]["broken"]:
        click.echo(f"llmdiff: warning: {b}", err=True)
    sys.exit(result.exit_code)


@main.command(epilog=_MODEL_HELP)
@click.argument("model")
@click.option("--tiny", is_flag=True, help="The built-in tiny tokenizer (trained here, Gemma's conventions).")
@_revision_option
@click.option("--weights", type=click.Path(), help="A local HF checkpoint directory holding a tokenizer.")
@click.option("--text", "text", type=click.Path(), help="A UTF-8 file of your own strings (the file and each line).")
@click.option("--impl", "impls", multiple=True, type=click.Choice(["keras"]),
              help="Also judge keras-hub's tokenizer (from the keras virtualenv; python -m llmdiff.references.keras_gemma install).")
@click.option("--select", "select", multiple=True, metavar="CODE|NAME|PREFIX", help="Run only these checks.")
@click.option("--ignore", "ignore", multiple=True, metavar="CODE|NAME|PREFIX", help="Skip these checks.")
@click.option("--json", "json_path", type=click.Path(), help="Write the JSON report here.")
@click.option("--no-color", is_flag=True)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def tokenize(model, tiny, revision, weights, text, impls, select, ignore, json_path, no_color, debug):
    """Tokenizer and chat-template parity of MODEL, before any numerics.

    Compares HF, sentencepiece (and DeepMind's tokenizer when importable) on a corpus of hard
    strings, checks BOS/EOS and renders the chat template against the family's reference format.
    Exit codes: 0 agreement, 1 findings, 2 usage or runtime error.
    """
    from llmdiff import api
    from llmdiff.report import write_json
    from llmdiff.tokenizer_render import render

    try:
        _check_outputs(json_path)
        result = api.tokenize(model, tiny=tiny, weights=weights, text=text, select=select, ignore=ignore,
                              revision=revision, implementations=impls)
    except LLMDiffError as e:
        _fail(str(e), debug, json_path)
    if json_path:
        write_json(result, json_path)
    render(result, _console(no_color))
    sys.exit(result["exit_code"])


def _release_compare_options(f):
    f = click.option("--tiny", is_flag=True, help="A tiny model with every architectural feature kept.")(f)
    f = click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16", "autocast-bfloat16", "autocast-float16"]),
                     help="Compute dtype (repeatable); default float32 and bfloat16. autocast-bfloat16: float32 weights"
                   " under torch.autocast (the oracle: matrix products in bfloat16, the rest in float32); autocast-float16 likewise.")(f)
    f = click.option("--impl", "impl", default="hf", show_default=True,
                     help="The implementation each release runs (an entry-point name).")(f)
    f = click.option("--no-diagnose", is_flag=True, help="Verdicts only; name no findings.")(f)
    f = click.option("--attn", type=click.Choice(["eager", "sdpa"]), default="eager", show_default=True,
                     help="HF's attention implementation in every release.")(f)
    f = click.option("--grad", is_flag=True,
                     help="Training parity in every release: the loss, its gradients and transformers' Trainer"
                          " step (compare --grad).")(f)
    f = click.option("--json", "json_path", type=click.Path(), help="Write the result as JSON here.")(f)
    return f


def _compare_options(tiny, dtypes, no_diagnose, attn="eager", grad=False):
    from llmdiff import api

    return {"tiny": tiny, "dtypes": dtypes or api.DTYPES, "diagnose": not no_diagnose, "attn": attn, "grad": grad}


@main.command()
@click.argument("model")
@click.option("--versions", required=True, metavar="PKG==V[,...]|RANGE",
              help="The releases, e.g. transformers==4.57.6,transformers==5.0.0, or a range resolved against"
                   " the index, e.g. 'transformers>=4.50,<5.1' (the newest patch of each minor).")
@click.option("--all", "every", is_flag=True, help="With a range: every release in it, not one per minor.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Write matrix.json, matrix.md and matrix.html into this directory.")
@_release_compare_options
def matrix(model, versions, every, tiny, dtypes, impl, no_diagnose, attn, grad, json_path, out_dir):
    """Compare MODEL under several releases of an implementation: a release x dtype table of
    verdicts, first divergence and findings. Each release runs in a virtualenv of its own, kept
    and reused (torch shared). A release that cannot install or run says why in its cell.

    Exit codes: 0 every release at parity, 1 some diverge or have findings, 2 some could not run.
    """
    from pathlib import Path

    from llmdiff import releases
    from llmdiff.report import write_json

    try:
        _check_outputs(json_path, out_dir)
        wanted = releases.resolve(versions, every=every)
        options = _compare_options(tiny, dtypes, no_diagnose, attn, grad)
    except LLMDiffError as e:
        _fail(str(e), False, json_path)
    say = lambda m: click.echo(m, err=True)  # noqa: E731
    cells = []
    _interruptible()
    try:
        for r in wanted:
            cells.append(releases.run_release(model, impl, r, say=say, **options))
    except KeyboardInterrupt:   # the releases that finished are still printed
        for line in releases.matrix_lines(cells) if cells else ():
            click.echo(line)
        click.echo(f"llmdiff: error: interrupted after {len(cells)} of {len(wanted)} releases", err=True)
        sys.exit(_interrupt_code())
    for line in releases.matrix_lines(cells):
        click.echo(line)
    code = 2 if any(c.error for c in cells) else 1 if any(releases.is_bad(c, None) for c in cells) else 0
    result = {"model": model, "impl": impl, "releases": [c.__dict__ for c in cells], "exit_code": code}
    if json_path:
        write_json(result, json_path)
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(result, Path(out_dir) / "matrix.json")
        (Path(out_dir) / "matrix.md").write_text(f"# llmdiff matrix {model} --impl {impl}\n\n"
                                                 + "\n".join(releases.matrix_lines(cells)) + "\n")
        (Path(out_dir) / "matrix.html").write_text(releases.matrix_html(model, impl, cells))
    sys.exit(code)


@main.command()
@click.argument("model")
@click.option("--good", required=True, metavar="PKG==V", help="A release known good (or bad: either order).")
@click.option("--bad", required=True, metavar="PKG==V", help="A release known bad.")
@click.option("--finding", default=None, metavar="CODE", help="Look for this finding, not any divergence.")
@_release_compare_options
def bisect(model, good, bad, finding, tiny, dtypes, impl, no_diagnose, attn, grad, json_path):
    """Find the first release between GOOD and BAD whose verdict (or FINDING) changes; print the two
    adjacent releases and the evidence from both.

    Exit codes: 0 found (or nothing changes), 2 an end could not run or bad input.
    """
    from llmdiff import releases
    from llmdiff.report import write_json

    say = lambda m: click.echo(m, err=True)  # noqa: E731
    _interruptible()
    try:
        _check_outputs(json_path)
        g, b = releases.Release.parse(good), releases.Release.parse(bad)
        if g.package != b.package:
            raise LLMDiffError(f"--good and --bad name two packages ({g.package}, {b.package})")
        options = _compare_options(tiny, dtypes, no_diagnose and not finding, attn, grad)  # a finding needs diagnosis
        order = releases.between(g.package, g.version, b.version)
        result = releases.bisect(
            [f"{g.package}=={v}" for v in order],
            lambda r: releases.run_release(model, impl, releases.Release.parse(r), say=say, **options),
            finding, say)
    except LLMDiffError as e:
        _fail(str(e), False, json_path)
    except KeyboardInterrupt:
        click.echo("llmdiff: error: interrupted before the bisection ended", err=True)
        sys.exit(_interrupt_code())
    click.echo(result["result"])
    for release, cell in result["cells"].items():
        click.echo(f"  {release}: " + ("; ".join(f"{r['dtype']} {r['verdict']}"
                                                 + (f" at {r['first_divergence']}" if r["first_divergence"] else "")
                                                 + (f" ({', '.join(r['findings'])})" if r["findings"] else "")
                                                 for r in cell["runs"]) or f"error: {cell['error']}"))
    if json_path:
        write_json({"model": model, "impl": impl, "finding": finding, **result}, json_path)
    sys.exit(0)


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
@click.option("--dtype", "dtypes", multiple=True, type=click.Choice(["float32", "bfloat16", "autocast-bfloat16", "autocast-float16"]))
@click.option("--mutant", "mutants", multiple=True, metavar="NAME",
              help="Diagnose only these rows (as the matrix names them: LD301, LD202+LD207+LD208, "
                   "LD202@global, unknown, clean); the others are still built, not diagnosed.")
@click.option("--json", "json_path", type=click.Path(), help="Write the matrix as JSON here.")
@click.option("--debug", is_flag=True)
def selftest(model, dtypes, mutants, json_path, debug):
    """Diagnose oracle mutants with known bugs: every mutant must be named by its own check only.

    Exit 0 when the confusion matrix is diagonal, 1 otherwise.
    """
    from llmdiff import selftest as st
    from llmdiff.report import write_json

    console = _console()
    _interruptible()
    try:
        result = st.selftest(model, dtypes=dtypes or ("float32", "bfloat16"), only=mutants,
                             progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    except LLMDiffError as e:
        _fail(str(e), debug, json_path)
    except KeyboardInterrupt:   # (its temporary directory, GBs of oracle runs, is gone by now)
        click.echo("llmdiff: error: selftest interrupted; no matrix", err=True)
        sys.exit(_interrupt_code())
    if json_path:
        write_json(result, json_path)
    st.render(result, console)
    sys.exit(0 if result["diagonal"] else 1)


if __name__ == "__main__":
    main()
