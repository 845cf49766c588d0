"""One implementation's worker process: load weights, run the tokens, write the captures.

    python /path/to/llmdiff/worker.py JOB.json [--serve]   (or: python -m llmdiff.worker JOB.json)

The parent writes JOB.json; for each requested run the worker writes RUN.safetensors (the
canonical points, prompts concatenated along the sequence axis) and RUN.json (versions,
timings, error). A run that fails writes its error and the worker goes on to the next; a
worker that dies leaves no RUN.json, and the parent reports that. With --serve it then reads
more runs from standard input, a JSON list a line, saying "batch done" after each.

Run by file path, the worker needs neither llmdiff installed nor anything beyond its own
framework, numpy and safetensors: it maps `llmdiff` and `llmdiff.references` onto this source
tree without executing `llmdiff/__init__.py`. That is what lets `--impl hf@/other/python`
compare a second transformers install.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
import traceback
import types


def _map_source_tree(references_dir: str) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    if "llmdiff" not in sys.modules:
        pkg = types.ModuleType("llmdiff")
        pkg.__path__ = [here]
        sys.modules["llmdiff"] = pkg
    if "llmdiff.references" not in sys.modules:
        refs = types.ModuleType("llmdiff.references")
        refs.__path__ = [references_dir]
        sys.modules["llmdiff.references"] = refs
        sys.modules["llmdiff"].references = refs


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _start_error(impl: str, exc: BaseException) -> str:
    from llmdiff.references.base import MissingExtra

    # An adapter whose framework is absent says how to install it; that is the whole error.
    if isinstance(exc, MissingExtra):
        return str(exc)
    return f"cannot start implementation {impl!r}: {_one_line(exc)}"


def _write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


BATCH_DONE = "batch done"   # said after each batch a serving worker was sent (`runner.Worker.send`)


def _say(message: str) -> None:
    """A progress line for the parent (`runner.PROGRESS`), on stderr."""
    print(f"llmdiff-worker: {message}", file=sys.stderr, flush=True)


def _sketch_on_host(caps: dict, round_to) -> dict:
    """Sketch what an adapter returned whole (one that cannot sketch on its device), so that
    every implementation of a run is compared the same way (`llmdiff/sketch.py`). Applied to a
    run's captures once the prompts are put together (weight gradients summed first); the loss
    and the loss cases stay whole, and so do 1-D weight gradients."""
    import numpy as np

    from llmdiff import diff, grad, sketch

    out = {}
    for name, a in caps.items():
        if name.endswith(sketch.SUFFIX) or sketch.is_top(name) or name == grad.LOSS or name in grad.SCALARS:
            out[name] = a  # sketched already, or whole by design
            continue
        x = np.asarray(a)
        if grad.is_weight(name):
            if not sketch.sketches_rows(x.shape):
                out[name] = a
                continue
            x = x.reshape(x.shape[0], -1)
        else:
            x = x.reshape(*x.shape[:2], -1)
        if round_to:
            x = diff.round_to(x, round_to)
        x = x.astype(np.float64)
        if name == "logits":
            ids = np.argpartition(-x, sketch.TOP - 1, axis=-1)[..., :sketch.TOP]  # ordered later
            out["logits:top_values"] = np.take_along_axis(x, ids, -1).astype(np.float32)
            out["logits:top_ids"] = ids
        out[name + sketch.SUFFIX] = sketch.project(x)
    return out


def _rss_mb() -> tuple[int | None, int | None]:
    """(resident now, peak so far) of this process in MB, for the run's timings: which worker
    held how much host memory, where a device machine's report is all there is. None where the
    platform does not say."""
    now = peak = None
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> (20 if sys.platform == "darwin" else 10)
    except (ImportError, OSError):
        pass
    return now, peak


def _bench(adapter, prompts, timings, reps: int = 3) -> None:
    """For `bench/`: a warm-up (compilation, kernels), then the bare forward (no capture) and
    the capturing one, each the fastest of `reps` timed runs; the run that follows is warm too."""
    def fastest(run):
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for tokens in prompts:
                run(tokens)
            best = min(best, time.perf_counter() - t)
        return round(best, 4)

    for tokens in prompts:
        adapter.run(tokens)
    if adapter.has_bare_forward:
        for tokens in prompts:
            adapter.run_bare(tokens)
        timings["bare_forward_s"] = fastest(adapter.run_bare)
    timings["capture_forward_s"] = fastest(adapter.run)


def main(job_path: str, serve: bool = False) -> int:
    with open(job_path) as f:
        raw = json.load(f)
    if __package__ in (None, ""):
        _map_source_tree(raw["references_dir"])
    # Quiet frameworks that print on import (TensorFlow, XLA) and keep JAX off the whole GPU.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    from llmdiff.job import Job, RunRequest

    job = Job.from_dict(raw)
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(job.module)
        adapter = getattr(module, job.cls)(job)
        versions = adapter.versions()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, never lost
        for run in job.runs:
            _write_json(run.out + ".json", {
                "ok": False, "error": _start_error(job.impl, exc),
                "traceback": traceback.format_exc(), "python": sys.executable})
        return 1
    import_s = time.perf_counter() - t0

    status = 0
    for run in job.runs:
        status |= _run(adapter, job, run, versions, import_s)
    if serve:
        # More batches of runs, a JSON list of them a line, until standard input closes: the
        # oracle lab's counterfactuals in one process, its weights and compiled steps kept.
        _say(BATCH_DONE)
        for line in sys.stdin:
            if not line.strip():
                break
            for r in json.loads(line):
                status |= _run(adapter, job, RunRequest.from_dict(r), versions, import_s)
            _say(BATCH_DONE)
    return status


def _run(adapter, job, run, versions, import_s: float) -> int:
    """One requested run: RUN.safetensors and RUN.json written (an error in RUN.json); 1 when it failed."""
    import numpy as np

    from llmdiff import safetensors_file
    from llmdiff.grad import combine, is_grad
    from llmdiff.references.base import MissingExtra

    status = 0
    meta = {"ok": False, "error": None, "python": sys.executable, "versions": versions,
            "dtype": run.dtype, "timings": {"import_s": round(import_s, 3)}}
    try:
        if run.dtype not in adapter.dtypes:
            raise ValueError(f"{job.impl} does not run {run.dtype} (it runs {', '.join(adapter.dtypes)})")
        adapter.begin(run)  # its options, and the run's knobs (the oracle's counterfactuals)
        adapter.phases = {}  # `Reference.phase`: this run's
        _say(f"{job.impl} {run.id}: loading")
        t = time.perf_counter()
        adapter.load(run)
        meta["timings"]["load_s"] = round(time.perf_counter() - t, 3)
        meta["timings"]["rss_after_load_mb"], meta["timings"]["peak_rss_after_load_mb"] = _rss_mb()
        if run.options.bench:
            _bench(adapter, job.tokens, meta["timings"])
        t = time.perf_counter()
        per_prompt = [adapter.run_grad(tokens) if job.grad else adapter.run(tokens) for tokens in job.tokens]
        # What the adapter gives once for the whole batch (sketched weight gradients)
        whole_batch = adapter.finish_grad() if job.grad else {}
        meta["timings"]["run_s"] = round(time.perf_counter() - t, 3)
        meta["timings"]["peak_rss_mb"] = _rss_mb()[1]   # the worker's, over this run and those before it
        _say(f"{job.impl} {run.id}: loaded in {meta['timings']['load_s']:.1f} s,"
             f" ran {len(job.tokens)} prompt(s) in {meta['timings']['run_s']:.2f} s")
        names = sorted(n for n in per_prompt[0] if not is_grad(n) and adapter.wants(n.split(":")[0]))
        captures = {n: np.concatenate([p[n] for p in per_prompt], axis=1) for n in names}
        if job.grad:  # the loss and gradients: weight gradients summed over prompts
            captures.update(combine(per_prompt + [whole_batch]))
        if job.capture == "sketch":  # what the adapter gave whole (every value went through the host)
            captures = _sketch_on_host(captures, adapter.round_to)
        peak = adapter.peak_device_bytes()
        if peak is not None:  # one number, or {device: bytes} for a run over several devices
            meta["peak_device_bytes"] = {k: int(v) for k, v in peak.items()} if isinstance(peak, dict) else int(peak)
        t = time.perf_counter()
        safetensors_file.save(run.out + ".safetensors", captures)
        meta["timings"]["save_s"] = round(time.perf_counter() - t, 3)
        if getattr(adapter, "phases", None):
            meta["timings"]["phases"] = adapter.phases
        meta.update(ok=True, points=sorted({n.split(":")[0] for n in names}), details=adapter.describe(),
                    capture=job.capture)
    except BaseException as exc:  # noqa: BLE001
        # A missing framework says how to install it: that message is the whole error.
        meta.update(error=str(exc) if isinstance(exc, MissingExtra) else _one_line(exc),
                    traceback=traceback.format_exc())
        status = 1
    _write_json(run.out + ".json", meta)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], serve="--serve" in sys.argv[2:]))
