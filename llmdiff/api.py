"""The Python API: everything the command line does.

    import llmdiff
    result = llmdiff.compare("gemma-7b", impls=["hf"], tiny=True)
    assert result, result.summary()
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmdiff import __version__, diff, inputs, model_source, report as report_mod, safetensors_file, weights as weights_mod
from llmdiff.errors import UsageError
from llmdiff.job import AUTOCAST_DTYPES, TRUTH_DTYPE, Job, Options, RunId, RunRequest, WeightsSource, params_dtype
from llmdiff.report import VERDICTS
from llmdiff.runner import Implementation, RunResult, run_workers
from llmdiff.spec import ModelSpec, capture_points

DTYPES = ("float32", "bfloat16")   # compared by default
RUN_DTYPES = DTYPES + AUTOCAST_DTYPES
ORACLE = "oracle"


class CompareResult:
    """A finished comparison. Truthy when every run is at parity and nothing failed."""

    def __init__(self, report: dict):
        self.report = report

    @property
    def exit_code(self) -> int:
        return self.report["exit_code"]

    def __bool__(self) -> bool:
        return self.exit_code == 0

    def __repr__(self) -> str:
        # What pytest prints for a failing `assert llmdiff.compare(...)`.
        verdict = VERDICTS.get(self.exit_code, "error")
        return f"<llmdiff {self.report['model']}: {verdict}>\n{self.summary()}"

    def summary(self) -> str:
        lines = [f"incomplete: {self.report['incomplete']}"] if self.report.get("incomplete") else []
        lines += [f"{e['stage']}: error: {e['error']}" for e in self.report.get("errors", [])]
        for impl in self.report["implementations"]:
            if not impl["ok"]:
                lines.append(f"{impl['name']}: error: {impl['error']}")
        for run in self.report["runs"]:
            where = f" first divergence at {run['first_divergence']}" if run["first_divergence"] else ""
            lines.append(f"{run['candidate']} vs {run['reference']} [{run['dtype']}]: {run['verdict']}{where}")
        for f in self.report.get("findings", []):
            lines.append(f"{f['code']} {f['name']} {f['implementation']} [{f['dtype']}] at {f['where']}: {f['message']}")
        return "\n".join(lines)


def _load_weights(spec: ModelSpec, weights, seed: int, say=lambda m: None):
    """The canonical set in memory: seeded random weights (`weights` None) or an Orbax/Flax
    checkpoint directory as Google ships them (`deepmind:DIR`). An HF checkpoint directory is
    not read whole (`_plan`, `weights.HFCheckpoint`)."""
    if weights is None:
        return weights_mod.random_weights(spec, seed, say), {"source": "random", "path": None, "seed": seed}
    from llmdiff import deepmind_checkpoint

    path = str(weights)[len("deepmind:"):]
    canon, info = deepmind_checkpoint.read_deepmind_checkpoint(path, spec)
    return canon, {"source": "deepmind", "path": path, "seed": None, **info}


def _is_hf_dir(weights) -> bool:
    """Weights given as an HF checkpoint directory (not random, not `deepmind:DIR`)."""
    return weights is not None and not str(weights).startswith("deepmind:")


def compare(model: str, impls=("hf",), *, dtypes=None, tiny: bool = False, weights=None,
            seed: int = 0, reference: str = ORACLE, workdir=None, attn: str = "eager",
            timeout: float | None = None, select=(), ignore=(), diagnose: bool = True,
            thresholds: diff.Thresholds = diff.DEFAULT_THRESHOLDS, points=None, layers=None,
            device: str = "auto", capture: str = "auto", stream: bool | str = "auto", lengths=None,
            bench: bool = False, generate: bool | None = None, devices: int | None = None,
            tokenizer_parity: bool = True, revision: str | None = None, config: str = "published",
            grad: bool = False, grad_checkpointing: bool = False, quant: str | None = None,
            progress=None) -> CompareResult:
    """Run `model` in each implementation and the oracle, and compare every canonical point.

    model: a registered model (`gemma-7b`), a local HF checkpoint directory, or a hub id
        (`google/gemma-7b`, at `revision`): a checkpoint is compared with its own weights and the
        spec its config.json describes (`llmdiff.model_source`).
    impls: implementation names (`hf`, `oracle`), `NAME@PYTHON`, `LABEL=NAME@PYTHON`, or adapters
        `module:Class`.
    dtypes: the run dtypes (`RUN_DTYPES`); None: float32 and bfloat16 (float32 alone with `quant`).
    weights: None for seeded random weights (or a checkpoint's own), or a local HF checkpoint
        directory.
    config: the config.json of a registered model's random-weight checkpoint: "published" (the
        publisher's files, as users load them) or "corrected" (every field explicit, from the spec).
    workdir: where weights, jobs and captures go (kept, and `recompare` can re-read them);
        None for a temporary directory.
    thresholds: how many times its noise floor a point may be off (`diff.Thresholds`).
    points, layers: capture only points matching these globs (`L*.out`) / in these layers.
    device: "cpu", "cuda" or "auto" (cuda when the worker's framework sees a GPU).
    capture: "full" (every value leaves the device), "sketch" (norms and a random projection
        per position, computed on the device: `llmdiff/sketch.py`) or "auto" (sketch when the
        whole captures would exceed `SKETCH_ABOVE_BYTES` per run).
    stream: run each implementation one decoder block at a time, that block's weights on the
        device only while it runs (models larger than the device); "auto": a run streams when
        its weights would take more than half of the device's memory (GPUs only).
    generate: random weights made by each worker on its own device (None: for full-size
        models), not by this process.
    devices: spread each run over this many devices, whole decoder layers to a device (hf:
        accelerate's device maps). None: one when the weights take at most half of a device,
        else as many as hold them (`Reference.placement`).
    lengths: prompt lengths in tokens for synthetic prompts (models without a tokenizer).
    bench: workers also time a bare forward and a capturing one (`bench/`).
    select, ignore: checks by code, name or prefix (`LD3`); diagnose=False skips the checks.
    tokenizer_parity: compare the checkpoint's tokenizers on hard strings (when it has one).
    grad: training parity: every implementation also computes the causal-LM loss of each prompt
        and its gradients with respect to every point and every weight, compared like the points
        (`llmdiff/grad.py`); one device, no streaming; sketched like the points with
        `capture` sketch (auto: when the whole gradients would pass `SKETCH_ABOVE_BYTES` too).
    grad_checkpointing: with `grad`, HF computes its gradients with transformers' own gradient
        checkpointing on (train mode, dropout as configured): its recompute path is compared.
    quant: "q8_0": llama.cpp (`impls` must be llamacpp alone) runs the checkpoint its converter
        quantised to that type, against the oracle with the same quantisation (its weights rounded
        as the converter rounds them, its matmul inputs as ggml's CPU kernels do: `llmdiff/quant.py`,
        `Precision.matmul_q8_0`); float32 only (the default dtypes become float32).
    A stage that cannot run makes the run an error (exit code 2, listed under "errors");
    Ctrl-C keeps what finished, marked "incomplete" (exit code 130).
    progress: optional callable(str) told what is happening.

    The pipeline: `_plan` (inputs checked, weights and prompts ready, the job written) ->
    `_run_workers` -> `_judge` (the report) -> `_diagnose_stages` -> the exit code (`report.settle`).
    """
    if quant is not None:   # before any work: a bad combination is one usage error
        _check_quant(quant, impls, dtypes, grad)
    if dtypes is None:   # the default: float32 and bfloat16; a quantised run is float32
        dtypes = ["float32"] if quant is not None else list(DTYPES)
    t_start = time.perf_counter()
    temporary = workdir is None
    if not temporary and Path(workdir).exists() and not Path(workdir).is_dir():
        raise UsageError(f"--workdir {workdir} is a file, not a directory")
    work = Path(tempfile.mkdtemp(prefix="llmdiff-") if temporary else workdir)
    say = None
    try:
        work.mkdir(parents=True, exist_ok=True)
        say = _live_log(work / "progress.log", progress, t_start)
        plan = _plan(model, impls, dtypes=dtypes, tiny=tiny, weights=weights, seed=seed, reference=reference,
                     work=work, temporary=temporary, attn=attn, timeout=timeout, select=select, ignore=ignore,
                     diagnose=diagnose, thresholds=thresholds, points=points, layers=layers, device=device,
                     capture=capture, stream=stream, lengths=lengths, bench=bench, generate=generate,
                     devices=devices, tokenizer_parity=tokenizer_parity, revision=revision, config=config,
                     grad=grad, grad_checkpointing=grad_checkpointing, quant=quant, say=say)
        plan_s = round(time.perf_counter() - t_start, 3)
        results: dict[tuple[str, RunId], RunResult] = {}
        report = None
        serving = None
        try:
            serving = _run_workers(plan, results, say)
            plan.checked()   # the checkpoint's check (beside the workers): its error is the run's
            t_diff = time.perf_counter()
            say("comparing every point with its noise floor")
            report = _judge(plan, results)
            report["timings"]["diff_s"] = round(time.perf_counter() - t_diff, 3)
            if plan.check_s is not None:   # the checkpoint's check and fingerprint, beside the workers
                report["timings"]["check_s"] = plan.check_s
            _diagnose_stages(plan, report, results, say, serving)
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM: the runs that finished are judged and kept; the rest is said.
            report = report or _judge(plan, results)
            report["incomplete"] = "interrupted before every stage finished"
        finally:
            if serving is not None:   # an error or interrupt before the diagnosis ended it leaves it up
                serving.close()
        report["timings"]["plan_s"] = plan_s   # inputs checked, weights and prompts made ready
        report["timings"]["total_s"] = round(time.perf_counter() - t_start, 3)
        report_mod.settle(report)
        return CompareResult(report)
    finally:
        if say is not None:
            say.close()   # the live log's file, before its folder goes
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _live_log(path: Path, progress, t_start: float):
    """The run's progress: each event to `progress` (the terminal) and, time-stamped, to the live
    log `path` (`tail -f WORKDIR/progress.log`), the workers' progress lines among them."""
    log = open(path, "a", buffering=1, encoding="utf-8")

    def say(message: str) -> None:
        log.write(f"{time.perf_counter() - t_start:8.1f} s  {message}\n")
        if progress is not None:
            progress(message)

    say.close = log.close
    return say


@dataclass
class Plan:
    """What one compare will do, decided before any worker starts."""

    spec: ModelSpec
    dtypes: list[str]
    chosen: list[Implementation]
    reference: str
    checks: tuple | None             # (selected checks, broken plugins); None: no diagnosis
    thresholds: diff.Thresholds
    selected: list[str]              # the points compared
    job: Job
    work: Path
    temporary: bool
    timeout: float | None
    weights_info: dict
    tokens_info: dict
    prompts: object | None           # tokenizer.Prompts whose parity runs in the background
    attn: str
    checking: object = None          # a checkpoint's check and fingerprint, running beside the workers
                                     # (a Future of (fingerprint, seconds): `checked`)
    check_s: float | None = None

    def checked(self) -> None:
        """The checkpoint's check, waited for: its fingerprint into `weights_info`, or its error."""
        if self.checking is not None:
            self.weights_info["fingerprint"], self.check_s = self.checking.result()

    def requests(self, impl: Implementation) -> list[RunRequest]:
        """Each dtype; and for the oracle the float64 answer each dtype is measured against."""
        ids = [RunId(d) for d in self.dtypes]
        if impl.name == ORACLE:
            ids += [RunId(TRUTH_DTYPE, d) for d in self.dtypes]
        return [RunRequest(i, str(self.work / (f"{_safe(impl.name)}-{i.dtype}" if not i.constants_dtype
                                               else f"oracle-{i.label}")), self.job.options) for i in ids]


def _plan(model, impls, *, dtypes, tiny, weights, seed, reference, work, temporary, attn, timeout, select,
          ignore, diagnose, thresholds, points, layers, device, capture, stream, lengths, bench, generate,
          devices, tokenizer_parity, revision, config, grad=False, grad_checkpointing=False,
          quant=None, say=lambda m: None) -> Plan:
    """Every input checked, the weights and prompts made ready, the job decided."""
    if config not in model_source.CONFIG_MODES:
        raise UsageError(f"unknown config {config!r}; choose {' or '.join(model_source.CONFIG_MODES)}")
    resolved = model_source.resolve(model, tiny=tiny, revision=revision)
    spec = resolved.spec
    if weights is None and resolved.checkpoint is not None:
        weights = resolved.checkpoint
    dtypes = list(dict.fromkeys(dtypes))
    if not dtypes:
        raise UsageError(f"no dtype to compare; choose from {', '.join(DTYPES)}")
    for d in dtypes:
        if d not in RUN_DTYPES:
            raise UsageError(f"unknown dtype {d!r}; choose from {', '.join(RUN_DTYPES)}")
    if attn not in ("eager", "sdpa"):
        raise UsageError(f"unknown attention implementation {attn!r}; choose eager or sdpa")
    if timeout is not None and not timeout > 0:
        raise UsageError(f"timeout {timeout} s: give a positive number of seconds per worker")
    if capture not in ("auto", "full", "sketch"):
        raise UsageError(f"unknown capture mode {capture!r}; choose auto, full or sketch")
    if grad_checkpointing and not grad:
        raise UsageError("--grad-checkpointing acts on the gradients; add --grad")
    if not list(impls):
        raise UsageError("no implementation to compare; give one, e.g. hf")
    chosen = [Implementation.parse(i) for i in dict.fromkeys(impls)]
    labels = [i.name for i in chosen]
    twice = sorted({n for n in labels if labels.count(n) > 1})
    if twice:
        raise UsageError(f"two implementations are labelled {twice[0]!r}; name them: a=hf@PYTHON, b=hf@PYTHON")
    if not any(i.name != ORACLE for i in chosen) and reference == ORACLE:
        raise UsageError("nothing to compare: the oracle is the reference; add an implementation, e.g. hf")
    if not any(i.name == ORACLE for i in chosen):
        chosen.append(Implementation.parse(ORACLE))  # always run: it measures the noise floor
    names = [i.name for i in chosen]
    if reference not in names:
        raise UsageError(f"reference {reference!r} is not among the implementations ({', '.join(names)})")
    checks = _checks(select, ignore) if diagnose else None
    # Full-size random weights are made by each worker on its own device (the same bits in
    # every framework: `weights.generate_*`), never written or held here.
    checking = None
    if generate is None:
        generate = weights is None and not spec.tiny and all(_makes_weights(i) for i in chosen)
    elif generate and (weights is not None or not all(_makes_weights(i) for i in chosen)):
        makers = [i.name for i in chosen if not _makes_weights(i)]
        raise UsageError(f"weights made on the device need random weights and implementations that make them"
                         f" ({', '.join(makers) or 'the weights given'} cannot)")
    if generate:
        weights_info = {"source": "random", "path": None, "seed": seed,
                        "made": "on each worker's device", "fingerprint": weights_mod.generated_fingerprint(spec, seed)}
        hf_dir = weights_mod.write_hf_config(work / "hf-config", spec,
                                             files=model_source.checkpoint_files(resolved, config))
        weights_info["config"] = config
        source = WeightsSource(hf_dir=str(hf_dir), seed=seed)
    elif _is_hf_dir(weights):
        # An HF checkpoint directory: checked and fingerprinted here one tensor at a time; each
        # worker reads its tensors from the directory's own files (no canonical copy).
        checkpoint = weights_mod.HFCheckpoint(weights, spec)
        weights_info = {"source": "hf", "path": str(weights), "seed": None, **weights_mod.checkpoint_notes(weights)}
        # The pass runs beside the workers (`Plan.checked`): a full-size one takes about as long.
        say(f"checking {spec.name}'s weights (finite, fingerprint), one tensor at a time, beside the workers")
        weights_info["fingerprint"] = None   # until the check is done
        checking = _in_background(lambda: _timed(weights_mod.checked_fingerprint, checkpoint.blocks(), weights_info["path"]))
        hf_dir = str(weights)
        source = WeightsSource(hf_dir=hf_dir, from_hf=True)
    else:
        if weights is None and not spec.tiny:
            say(f"making {spec.name}'s random weights on the host (an implementation here cannot make them on its device)")
        canon, weights_info = _load_weights(spec, weights, seed, say)
        weights_mod.refuse_non_finite(canon, weights_info.get("path"))
        weights_info["fingerprint"] = weights_mod.weights_fingerprint(canon)
        canonical_path = work / "canonical.safetensors"
        weights_mod.save_canonical(canonical_path, canon)
        hf_dir = weights_mod.write_hf_checkpoint(work / "hf-checkpoint", spec, canon,
                                                 files=model_source.checkpoint_files(resolved, config))
        weights_info["config"] = config
        source = WeightsSource(canonical=str(canonical_path), hf_dir=str(hf_dir))
        del canon
    weights_info["model"] = resolved.info
    tokens, tokens_info, prompts = _prompts(spec, hf_dir, weights_info, seed, work, lengths, tokenizer_parity,
                                            _tokenizer_python(chosen), [i.name for i in chosen])
    selected = select_points(spec, points, layers)
    if capture == "auto":
        capture = "sketch" if _capture_bytes(spec, selected, tokens, grad) > SKETCH_ABOVE_BYTES else "full"
    options = Options(attn=attn, device=device, stream=stream, devices=devices or 0, bench=bench,
                      grad_checkpointing=grad_checkpointing)
    job = Job(spec=spec.to_dict(), tokens=tokens, weights=source, options=options,
              points=None if selected == capture_points(spec) else selected, capture=capture, grad=grad,
              quant=quant)
    return Plan(spec, dtypes, chosen, reference, checks, thresholds, selected, job, work, temporary, timeout,
                weights_info, tokens_info, prompts, attn, checking)


QUANT_IMPLS = ("llamacpp",)   # implementations that run a quantised checkpoint (`--quant`)


def _check_quant(quant, impls, dtypes, grad) -> None:
    """--quant's combinations, before any work: a known type, llama.cpp alone (the oracle, the
    reference, is quantised to match it), float32, no --grad."""
    from llmdiff.job import QUANT_TYPES

    if quant not in QUANT_TYPES:
        raise UsageError(f"unknown quantisation {quant!r}; choose from {', '.join(QUANT_TYPES)}")
    kinds = [Implementation.parse(i) for i in impls]
    others = [i.name for i in kinds if i.module.rsplit(".", 1)[-1] not in QUANT_IMPLS + (ORACLE,)]
    if not any(i.module.rsplit(".", 1)[-1] in QUANT_IMPLS for i in kinds) or others:
        raise UsageError(f"--quant {quant} runs llama.cpp's quantised checkpoint against a quantised oracle:"
                         f" give --impl llamacpp and no other implementation"
                         + (f" (not {', '.join(others)})" if others else ""))
    if dtypes is not None and list(dict.fromkeys(dtypes)) != ["float32"]:
        raise UsageError(f"--quant {quant} runs in float32 (ggml's quantised matmuls take F32 activations);"
                         f" drop --dtype {' '.join(d for d in dtypes if d != 'float32')}")
    if grad:
        raise UsageError(f"--quant {quant} compares a forward pass; drop --grad")


def _makes_weights(impl: Implementation) -> bool:
    """Whether the adapter says it makes seeded weights on its device (`Reference.makes_weights`).
    An adapter this interpreter cannot import (one for another `@PYTHON`) is taken not to."""
    try:
        return bool(impl.adapter_class().makes_weights)
    except (ImportError, AttributeError):
        return False


def _timed(fn, *args):
    """(fn(*args), its seconds)."""
    t = time.perf_counter()
    return fn(*args), round(time.perf_counter() - t, 3)


def _in_background(fn):
    """`fn()` on a daemon thread of its own (numpy and hashlib release the GIL), as a Future:
    an error or Ctrl-C that ends llmdiff does not wait for it."""
    import threading
    from concurrent.futures import Future

    future = Future()

    def run():
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - the Future carries it to `Plan.checked`
            future.set_exception(e)

    threading.Thread(target=run, name="llmdiff-check", daemon=True).start()
    return future


def _run_workers(plan: Plan, results: dict, say):
    """The workers `_workers` decides on, all at once or one after another; `results` fills as
    they finish. The oracle's worker, when it runs last (or all run at once) and a diagnosis may
    follow, stays up and is returned: the diagnosis' oracle runs are its next batches, its
    weights on the device and its steps compiled."""
    workers, at_once = _workers(plan)
    keep = lambda rs: results.update({(r.impl, r.id): r for r in rs})   # noqa: E731
    progress = lambda m: say(f"  {m}")   # noqa: E731 - a worker's own lines name it
    serve = ORACLE if (plan.checks is not None and plan.reference == ORACLE and not plan.job.grad
                       and (at_once or workers[-1][2] == ORACLE)) else None
    cancel = None
    if plan.checking is not None:   # a checkpoint the check refuses stops the workers at once
        import threading

        cancel = threading.Event()
        plan.checking.add_done_callback(lambda f: f.exception() is not None and cancel.set())
    if at_once:
        say(f"running {', '.join(label for _, _, label in workers)} at once")
    serving = None
    for impl, requests, label in workers:
        if not at_once and cancel is not None and cancel.is_set():
            break   # the checkpoint's check refused it: no more workers start
        say(f"running {label} ({', '.join(str(r.id) for r in requests)})")
        if not at_once:
            serving = run_workers(plan.job, [(impl, requests, label)], plan.work, keep, timeout=plan.timeout,
                                  progress=progress, serve=serve, cancel=cancel)
    if at_once:
        serving = run_workers(plan.job, workers, plan.work, keep, timeout=plan.timeout, progress=progress,
                              serve=serve, cancel=cancel)
    return serving


def _workers(plan: Plan) -> tuple[list, bool]:
    """The worker processes of a compare, as (implementation, requests, label), and whether they
    run at once: their imports, weight making and compiles then overlap (a cold full-size compare
    was the sum of its workers, the oracle's compile of each dtype's steps the most of it).

    At once when what they hold together fits (`_fits`). On a GPU the oracle's 16-bit runs get a
    worker of their own too, when that fits, so its two dtypes compile side by side. Not for
    `bench` (each worker times its own forwards) nor `--devices`/`--stream` (a run spread or
    streamed needs the devices to itself). On `--device cuda` with no GPU memory to read
    (no nvidia-smi), one after another. LLMDIFF_WORKERS_AT_ONCE=0 or 1 decides instead."""
    import os

    whole = [(impl, plan.requests(impl), impl.name) for impl in plan.chosen]
    forced = os.environ.get("LLMDIFF_WORKERS_AT_ONCE") or None
    if forced not in (None, "0", "1"):
        raise UsageError(f"LLMDIFF_WORKERS_AT_ONCE={forced!r}: 0 (one after another) or 1 (at once)")
    options = plan.job.options
    if forced == "0" or (forced is None and (options.bench or options.devices or options.stream is True)):
        return whole, False
    gpus = _gpu_memory() if options.device != "cpu" else []
    if options.device == "cuda" and not gpus and forced is None:
        return whole, False
    tries = [whole]
    if gpus:
        split = []
        for impl, requests, label in whole:
            low = [r for r in requests if impl.name == ORACLE and not r.id.constants_dtype and _sixteen_bit(r.id)]
            rest = [r for r in requests if r not in low]
            split += [(impl, rest, label)] + ([(impl, low, f"{label}-16bit")] if low and rest else [])
        tries.insert(0, split)
    for workers in tries:
        if len(workers) > 1 and (forced == "1" or _fits(plan, workers, gpus)):
            return workers, True
    return whole, False


def _sixteen_bit(run: RunId) -> bool:
    """Whether the run holds its weights in 16 bits (not autocast's, nor a float64 floor run's)."""
    return params_dtype(run.dtype) in ("bfloat16", "float16")


def _fits(plan: Plan, workers: list, gpus: list) -> bool:
    """Whether `workers` can hold their weights at once: each its largest run's weights (16-bit
    runs' in 16 bits, every other in float32: the oracle's float64 runs stream from its float32
    set) and a fifth more (measured peaks: 1.05-1.15x), four times that with `--grad` (gradients
    and the Trainer's optimizer state), within three quarters of the one GPU's free memory (and
    none of them over half of it, where a run would stream), or half the host's available memory."""
    from llmdiff.convert import canonical_shapes

    params = sum(int(np.prod(s)) for s in canonical_shapes(plan.spec).values())
    factor = 4 if plan.job.grad else 1.2
    held = [params * max(2 if _sixteen_bit(r.id) else 4 for r in requests)
            for _, requests, _ in workers]
    if gpus:   # (total, free) bytes of each
        total, free = gpus[0]
        return max(held) <= total / 2 and factor * sum(held) <= 0.75 * free
    # On the host too, even on few cores: this 2-core machine's default suite took 577 s with
    # workers at once and 680 s with them one after another (bench/RESULTS.md, the last section).
    return factor * sum(held) <= 0.5 * _host_available()


def _gpu_memory() -> list[tuple[int, int]]:
    """(total, free) bytes of each NVIDIA GPU `nvidia-smi` lists, those CUDA_VISIBLE_DEVICES
    names (by index) first in its order; [] without one (or the tool)."""
    import os
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.strip().splitlines():
        try:
            total, free = (int(v) << 20 for v in line.split(","))
        except ValueError:
            return []
        rows.append((total, free))
    visible = [int(v) for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip().isdigit()]
    visible = [i for i in visible if i < len(rows)]
    return [rows[i] for i in visible] + [r for i, r in enumerate(rows) if i not in visible]


def _host_available() -> int:
    """The host memory available to new processes, in bytes (Linux's MemAvailable; else 0)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _judge(plan: Plan, results: dict) -> dict:
    """The report of the runs in `results`: every candidate point against the reference."""
    report = _build_report(plan.spec, plan.weights_info, plan.tokens_info, plan.chosen, plan.dtypes,
                           plan.reference, results, plan.attn, plan.thresholds, plan.selected, plan.job.grad)
    report["options"].update(capture=plan.job.capture, stream=plan.job.options.stream)
    if plan.job.quant:   # llama.cpp's quantised checkpoint against the oracle quantised the same way
        report["options"]["quant"] = plan.job.quant
    if plan.job.options.grad_checkpointing:
        report["options"]["grad_checkpointing"] = True
    report["results"] = [{"impl": r.impl, "dtype": r.id.dtype, "constants_dtype": r.id.constants_dtype,
                          "file": Path(r.out).name} for r in results.values()]
    report["workdir"] = None if plan.temporary else str(plan.work)
    for impl in report["implementations"]:  # --grad: a Trainer step asked for and not run is an error
        trainer = impl["details"].get("trainer") or {}
        if trainer.get("error"):
            stage_error(report, "Trainer step", f"{impl['name']}: {trainer['error']}")
    return report


def _diagnose_stages(plan: Plan, report: dict, results: dict, say, serving=None) -> None:
    """Teacher forcing, diagnosis and tokenizer parity, each a stage (`_stage`); `serving`:
    the compare's oracle worker, still up, the lab's."""
    from llmdiff import diagnose

    # The lab's oracle runs (teacher forcing, counterfactuals) are forward runs: the diagnosis
    # explains forward points; a divergence in the gradients alone is reported, not diagnosed.
    lab = diagnose.OracleLab(plan.job.with_(grad=False), plan.work, plan.timeout, progress=say, worker=serving)
    if not plan.job.grad:   # the compare's own clean oracle runs are the lab's: not run again
        for (name, run_id), r in results.items():
            if name == ORACLE and r.ok:
                lab.seed(diagnose.Variant(run_id), r.captures_path)
    try:
        if plan.reference == ORACLE and plan.checks is not None and plan.job.capture == "full":
            say("teacher forcing: the oracle fed each candidate's own value of every point")
            _stage(report, "teacher forcing", "--no-diagnose",
                   lambda: _teacher_force(report, lab, results, plan.thresholds))
        if plan.checks is not None:
            _stage(report, "diagnosis", "--no-diagnose",
                   lambda: _diagnose(report, plan.checks, plan.spec, lab, results, plan.reference, say,
                                     plan.thresholds))
    finally:
        lab.close()   # its worker served every batch of both stages
    if plan.prompts is not None:
        say("tokenizer parity (started in the background)")
        _stage(report, "tokenizer parity", "--no-tokenizer-parity",
               lambda: _tokenizer_parity(report, plan.prompts, plan.checks, plan.spec))


def _stage(report: dict, stage: str, skip: str, run) -> None:
    """Run one stage after the comparison. A stage that cannot run is an error of the run (exit
    2, listed under "errors" with how to skip it), never a quiet note, and loses nothing
    already judged."""
    try:
        error = run()
    except Exception as e:  # noqa: BLE001 - the report keeps everything before it
        error = f"{type(e).__name__}: {e}".splitlines()[0]
    if error:
        stage_error(report, stage, error, skip)


def stage_error(report: dict, stage: str, error: str, skip: str | None = None) -> None:
    report.setdefault("errors", []).append({"stage": stage, "error": error, "skip": skip})


def tokenize(model: str, *, tiny: bool = False, weights=None, text=None, select=(), ignore=(),
             revision: str | None = None, implementations=()) -> dict:
    """Tokenizer and chat-template parity of a checkpoint (`llmdiff tokenize`): a report dict
    with "tokenizer" (per-string ids, chat template), "findings" (LD0xx) and "exit_code"."""
    from llmdiff import tokenizer

    return tokenizer.check_tokenizer(model, tiny=tiny, weights=weights, text=text, select=select, ignore=ignore,
                                     revision=revision, implementations=implementations)


SKETCH_ABOVE_BYTES = 1 << 30


def _capture_bytes(spec, points, tokens, grad: bool = False) -> int:
    """float32 bytes of one run's whole captures; with `grad` also the gradient at each point
    and of every weight, and the Trainer's gradient of every weight (`llmdiff/grad.py`)."""
    D, N, K, H, F = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.mlp_dim
    width = {"q": N * H, "k": K * H, "v": K * H, "mlp_gate": F, "mlp_up": F, "mlp_act": F}
    per_token = sum(spec.text_vocab_size if p == "logits" else width.get(p.split(".")[-1], D) for p in points)
    values = per_token * sum(len(t) for t in tokens)
    if grad:
        from llmdiff.convert import canonical_shapes

        values = 2 * values + 2 * sum(int(np.prod(s)) for s in canonical_shapes(spec).values())
    return 4 * values


def _tokenizer_python(chosen) -> str | None:
    """The interpreter whose transformers tokenizer parity judges: that of the first implementation
    built on transformers (`hf@PYTHON`: that release's tokenizer), else this one."""
    for impl in chosen:
        try:
            if impl.name != ORACLE and getattr(impl.adapter_class(), "package", "") == "transformers":
                return impl.python
        except (ImportError, AttributeError):
            continue
    return None


def _prompts(spec, hf_dir, weights_info, seed, work, lengths=None, parity: bool = True, python=None,
             implementations=()):
    """Token ids: real text through the checkpoint's tokenizer (tiny runs without one get the
    tiny tokenizer, never written into a user's directory), tokenizer parity started in the
    background (under `python`, the compared transformers' interpreter); synthetic ids when there
    is no tokenizer."""
    from llmdiff import tokenizer
    from llmdiff.tiny_tokenizer import has_tiny_tokenizer

    tokenizer_dir, tiny_tokenizer = None, False
    if lengths is not None:  # asked for: synthetic prompts of exactly these lengths
        tokens = inputs.synthetic_prompts(spec, seed, lengths)
        return tokens, {"source": "synthetic", "prompts": len(tokens), "lengths": list(lengths)}, None
    if weights_info["source"] == "hf" and tokenizer.has_tokenizer(hf_dir):
        tokenizer_dir = hf_dir
    elif spec.tiny and has_tiny_tokenizer(spec):  # Gemma's SentencePiece, Llama 3's and Qwen's BPE
        tokenizer_dir = hf_dir if weights_info["source"] != "hf" else Path(work) / "tiny-tokenizer"
        tiny_tokenizer = True
    if tokenizer_dir is not None:
        Path(tokenizer_dir).mkdir(parents=True, exist_ok=True)
        prompts = tokenizer.Prompts(spec, tokenizer_dir, tiny_tokenizer=tiny_tokenizer, python=python,
                                    implementations=implementations)
        made = prompts.tokens(inputs.DEFAULT_LENGTHS)
        if made is not None:
            tokens, info = made
            info = {**info, "prompts": len(tokens), "lengths": [len(t) for t in tokens], "ids": tokens}
            if not parity:
                return tokens, info, None
            prompts.start_parity()
            return tokens, info, prompts
    tokens = inputs.synthetic_prompts(spec, seed)
    return tokens, {"source": "synthetic", "prompts": len(tokens), "lengths": [len(t) for t in tokens]}, None


def _tokenizer_parity(report, prompts, checks_and_broken, spec) -> str | None:
    """The tokenizer section (JSON key "tokenizer") and its LD0xx findings, listed first; the
    error when parity could not run."""
    from llmdiff import tokenizer

    parity = prompts.parity()
    if parity and "error" not in parity:
        # Same seed, same report: the time goes with the other timings; a tokenizer llmdiff wrote
        # into its own work directory has no path worth keeping.
        report["timings"]["tokenizer"] = parity.pop("timings")
        if prompts.tiny_tokenizer:
            parity["path"] = None
    report["tokenizer"] = parity
    if parity and "error" in parity:
        return parity["error"]
    if not parity or checks_and_broken is None:
        return None
    found = [f.to_dict() for f in tokenizer.findings(parity, checks_and_broken[0], spec)]
    report["findings"] = found + report.get("findings", [])
    return None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _load_caps(result) -> dict[str, np.ndarray] | None:
    if result is None or not result.ok:
        return None
    return diff.load_captures(result.captures_path)


def select_points(spec, points=None, layers=None) -> list[str]:
    """Canonical points (forward order) matching any glob in `points` and, for per-layer points,
    whose layer is in `layers`. None selects everything."""
    import fnmatch

    chosen = capture_points(spec)
    if layers is not None:
        layers = set(layers)
        bad = sorted(i for i in layers if not 0 <= i < spec.num_layers)
        if bad:
            raise UsageError(f"layer {bad[0]} does not exist; {spec.name} has layers 0..{spec.num_layers - 1}")
        chosen = [p for p in chosen if not p.startswith("L") or int(p[1:p.index(".")]) in layers]
    if points:
        chosen = [p for p in chosen if any(fnmatch.fnmatchcase(p, g) for g in points)]
        if not chosen:
            raise UsageError(f"no point matches {', '.join(points)}; points look like embed, L0.q, L3.out, logits")
    return chosen


def _build_report(spec, weights_info, tokens_info, chosen, dtypes, reference, results, attn,
                  thresholds=diff.DEFAULT_THRESHOLDS, selected=None, grad=False) -> dict:
    from llmdiff import grad as grad_names

    selected = selected or capture_points(spec)
    # --grad: the loss and the gradients after the forward points, walking back from the loss.
    compared = selected + grad_names.grad_points(spec, selected) if grad else selected
    implementations, timings = [], {}
    for impl in chosen:
        mine = [r for (name, _), r in results.items() if name == impl.name]
        errors = [f"{r.dtype}: {r.error}" for r in mine if not r.ok]
        if len({r.error for r in mine if not r.ok}) == 1 and all(not r.ok for r in mine):
            errors = [mine[0].error]  # the same failure in every run (cannot start): say it once
        versions = next((r.meta.get("versions") for r in mine if r.meta.get("versions")), {})
        implementations.append({
            "name": impl.name, "python": impl.python, "versions": versions or {},
            "ok": not errors, "error": "; ".join(errors) if errors else None,
            "details": next((r.meta.get("details") for r in mine if r.meta.get("details")), {}),
        })
        peaks = {r.id.label: r.meta["peak_device_bytes"] for r in mine if r.meta.get("peak_device_bytes") is not None}
        if peaks:  # the worker's peak device memory after each run (GPU workers)
            implementations[-1]["peak_device_bytes"] = peaks
        for r in mine:
            timings[f"{impl.name}/{r.id.label}"] = r.meta.get("timings", {})

    runs = []
    for d in dtypes:
        ref_caps = _load_caps(results.get((reference, RunId(d))))
        truth_caps = _load_caps(results.get((ORACLE, RunId(TRUTH_DTYPE, d))))
        oracle_caps = ref_caps if reference == ORACLE else _load_caps(results.get((ORACLE, RunId(d))))
        floors = diff.noise_floors(oracle_caps, truth_caps, d) if oracle_caps and truth_caps else {}
        lengths = (tokens_info or {}).get("lengths")
        pos_floors = diff.position_floors(oracle_caps, truth_caps, d, lengths) if floors and lengths else None
        for impl in chosen:
            if impl.name == reference:
                continue
            cand = results.get((impl.name, RunId(d)))
            cand_caps = _load_caps(cand)
            if cand_caps is None or ref_caps is None:
                failed = cand if cand_caps is None else results.get((reference, RunId(d)))
                runs.append({"dtype": d, "reference": reference, "candidate": impl.name, "verdict": "error",
                             "error": failed.error if failed else "no result", "first_divergence": None,
                             "points": [], "logits": None})
                continue
            run = diff.compare_captures(cand_caps, ref_caps, floors, d, compared, thresholds, lengths, pos_floors)
            for row in run["points"]:  # a weight's gradient has no position axis, whatever its shape
                if grad_names.is_weight(row["name"]):
                    row.pop("by_position", None)
                    row.pop("diverges_from", None)
            runs.append({"dtype": d, "reference": reference, "candidate": impl.name, **run})

    return {
        "llmdiff_version": __version__,
        "model": spec.name,
        "spec": spec.to_dict(),
        "weights": weights_info,
        "tokens": tokens_info,
        "options": {"attn": attn, "dtypes": dtypes, "reference": reference, "points": selected,
                    "thresholds": thresholds.to_dict(), **({"grad": True} if grad else {})},
        "implementations": implementations,
        "runs": runs,
        "findings": [],
        "timings": {"workers": timings},
        "exit_code": None,  # `report.settle` decides it once everything is in
        "python": sys.version.split()[0],
    }


def _checks(select, ignore):
    from llmdiff import registry

    checks, broken = registry.load_checks()
    return registry.select(checks, select, ignore), broken


def _teacher_force(report, lab, results, thresholds) -> str | None:
    """For every run: the candidate against the oracle fed the candidate's own block inputs.

    A bug smaller than the dtype's accumulated noise (a bfloat16 norm scale rounded twice)
    still breaks the exactness of the one op it is in; here each point carries only the
    error made since its block's input, so that op stands out."""
    from llmdiff import diagnose

    points = report["options"]["points"]
    wanted = []
    for run in report["runs"]:
        cand = results.get((run["candidate"], RunId(run["dtype"])))
        if run["verdict"] != "error" and cand is not None and cand.ok:
            wanted += [diagnose.Variant(RunId(run["dtype"]), forced_from=cand.captures_path),
                       diagnose.Variant(RunId(TRUTH_DTYPE, run["dtype"]), forced_from=cand.captures_path)]
    if not wanted:
        return None
    lab.run_many(wanted)  # one worker for all of them
    failed = []
    for run in report["runs"]:
        cand = results.get((run["candidate"], RunId(run["dtype"])))
        if run["verdict"] == "error" or cand is None or not cand.ok:
            continue
        d = run["dtype"]
        done = diagnose.teacher_forced(lab, _load_caps(cand), cand.captures_path, d, points, thresholds)
        if done is None:
            run["forced"] = {"error": "the teacher-forced oracle run failed"}
            failed.append(f"{run['candidate']} [{d}]")
            continue
        forced, _ = done
        forced["files"] = {"oracle": Path(lab.path(diagnose.Variant(RunId(d), forced_from=cand.captures_path))).stem,
                           "truth": Path(lab.path(diagnose.Variant(RunId(TRUTH_DTYPE, d),
                                                                   forced_from=cand.captures_path))).stem}
        diff.attach_forced(run, {k: forced[k] for k in ("verdict", "first_divergence", "points", "files")})
    if failed:
        first = next(iter(lab.errors.values()), "no captures")
        return f"the oracle fed {', '.join(failed)} could not run: {first}"
    return None


def _diagnose(report, checks_and_broken, spec, lab, results, reference, say,
              thresholds=diff.DEFAULT_THRESHOLDS) -> str | None:
    """Add findings: static checks per implementation, counterfactuals per divergent run."""
    from llmdiff import diagnose

    checks, broken = checks_and_broken
    errors_before = len(lab.errors)
    findings = []
    for impl in report["implementations"]:
        if impl["name"] != ORACLE:
            findings += diagnose.static_findings(checks, spec, impl["name"], impl.get("details"),
                                                 report["tokens"], report["weights"])
    points = report["options"]["points"]
    divergent = [r for r in map(lambda r: _forward_part(r, points), report["runs"])
                 if r["verdict"] == "divergence" or r.get("local_divergence")]
    # A static finding where a run's divergence starts explains it: no counterfactual search
    # there (on Qwen's tiny model, every knob and pair at the logits, 210 s, before the static
    # LD105 was found to explain them anyway).
    static = {(f.implementation, f.where, f.dtype): f.code for f in findings}
    if divergent and reference == ORACLE:
        for run in divergent:
            first = run.get("first_divergence")
            code = static.get((run["candidate"], first, run["dtype"])) or static.get((run["candidate"], first, None))
            if first and code:
                say(f"{run['candidate']} ({run['dtype']}): {code} explains the divergence at {first}")
                continue
            say(f"diagnosing {run['candidate']} ({run['dtype']})")
            d = run["dtype"]
            cand = results.get((run["candidate"], RunId(d)))
            oracle_caps = _load_caps(results.get((ORACLE, RunId(d))))
            truth_caps = _load_caps(results.get((ORACLE, RunId(TRUTH_DTYPE, d))))
            floors = diff.noise_floors(oracle_caps, truth_caps, d)
            lengths = report["tokens"].get("lengths")
            # Teacher forcing feeds the oracle the candidate's own values: whole captures only.
            forcible = cand.captures_path if report["options"].get("capture", "full") == "full" else None
            case = diagnose.Case(lab, spec, run["candidate"], _load_caps(cand), forcible, floors, points, thresholds,
                                 lengths, diff.position_floors(oracle_caps, truth_caps, d, lengths) if lengths else None)
            findings += diagnose.explain(case, checks, run)
    # --grad runs whose forward is at parity and whose loss or gradients are not: the training
    # path's own checks (`llmdiff/grad_check.py`), by counterfactual on the oracle's --grad run.
    from llmdiff.grad_check import explain_backward

    findings += explain_backward(report, points, checks, spec, lab, results, thresholds)
    # A divergence that a static finding already explains where it starts is not unexplained.
    # (Of that run's dtype: a finding of another dtype at the same point explains nothing here.)
    explained = {(f.implementation, f.where, f.dtype) for f in findings if f.code != diagnose.UNEXPLAINED[0]}
    findings = [f for f in findings if not (f.code == diagnose.UNEXPLAINED[0] and (
        (f.implementation, f.where, f.dtype) in explained or (f.implementation, f.where, None) in explained))]
    report["findings"] = [f.to_dict() for f in findings]
    report["checks"] = {"selected": [c.code for c in checks if c.kind != "audit"], "broken": [str(b) for b in broken],
                        "counterfactual_runs": lab.runs}
    errors = list(lab.errors.values())[errors_before:]
    if errors:  # a counterfactual that could not run: the diagnosis is not whole
        return f"{len(errors)} oracle run(s) of the diagnosis failed: {errors[0]}"
    return None


def _forward_part(run: dict, points: list[str]) -> dict:
    """A run as the diagnosis sees it: its forward points only (a `--grad` run also has the loss
    and gradients, which no counterfactual oracle run computes)."""
    if len(run.get("points", ())) <= len(points):
        return run
    rows = [p for p in run["points"] if p["name"] in set(points)]
    first = next((p["name"] for p in rows if p["verdict"] == "divergence"), None)
    return {**run, "points": rows, "first_divergence": first,
            "verdict": run["verdict"] if run["verdict"] == "error" else ("divergence" if first else "parity")}


def recompare(directory, *, thresholds: diff.Thresholds | None = None, reference: str | None = None) -> CompareResult:
    """Re-compare the captures saved by `compare(..., workdir=DIR/captures)` with other thresholds
    or another reference, without running any model. Findings are those of the original run
    (confirming them needs the models)."""
    from llmdiff import checkpoint_files
    from llmdiff.errors import WeightsError

    directory = Path(directory)
    report_path, captures = directory / "report.json", directory / "captures"
    if not report_path.exists():
        raise UsageError(f"{directory} holds no report.json (write one with compare --out {directory})")
    try:
        old = checkpoint_files.read_json(report_path, what="report")
    except WeightsError as e:
        raise UsageError(f"saved report {e}") from None
    if "results" not in old or not captures.is_dir():
        raise UsageError(f"{directory} holds no saved captures; run compare with --out {directory} --save-captures")
    try:
        return _recompare(old, report_path, captures, thresholds, reference)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"{report_path} is not a report llmdiff compare wrote ({type(e).__name__}: {e})") from None


def _recompare(old, report_path, captures, thresholds, reference) -> CompareResult:
    from llmdiff.errors import WeightsError

    results = {}
    for e in old["results"]:
        name = Path(str(e["file"])).name  # a file of the captures folder, never a path out of it
        meta_path, caps_path = captures / f"{name}.json", captures / f"{name}.safetensors"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"ok": False, "error": "no result saved"}
        ok = bool(meta.get("ok")) and caps_path.exists()
        if ok:
            try:
                safetensors_file.read_header(caps_path)
            except WeightsError as err:  # that run is an error; the others are still compared
                ok, meta = False, {**meta, "ok": False, "error": f"saved captures unreadable: {err}"}
        run_id = RunId(e["dtype"], e["constants_dtype"])
        results[(e["impl"], run_id)] = RunResult(e["impl"], run_id, ok, meta.get("error"),
                                                 str(caps_path) if ok else None, meta, str(captures / name))
    spec = ModelSpec.from_dict(old["spec"])
    chosen = [Implementation(name=i["name"], module="", cls="", python=i["python"]) for i in old["implementations"]]
    reference = reference or old["options"].get("reference", ORACLE)
    if reference not in [i.name for i in chosen]:
        raise UsageError(f"reference {reference!r} is not among the saved implementations "
                         f"({', '.join(i.name for i in chosen)})")
    opts = old["options"]
    thresholds = thresholds or diff.Thresholds(**opts.get("thresholds", {}))
    report = _build_report(spec, old["weights"], old["tokens"], chosen, opts["dtypes"], reference, results,
                           opts.get("attn", "eager"), thresholds, opts.get("points"), opts.get("grad", False))
    for key in ("findings", "checks", "results", "tokenizer", "errors", "incomplete"):  # what no re-diff changes
        if key in old:
            report[key] = old[key]
    report["recompared_from"] = str(report_path)
    report_mod.settle(report)
    return CompareResult(report)
