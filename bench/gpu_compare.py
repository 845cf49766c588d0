"""GPU benchmark (issue: GPU and scale): a full-size model, random weights, one long prompt.

    python bench/gpu_compare.py --out DIR                      # gemma-7b, 512 tokens, fp32 + bf16
    python bench/gpu_compare.py --out DIR --model gemma-2-27b --dtype bfloat16 --only e2e

One call measures, for hf and the oracle:
  e2e       `python -m llmdiff compare MODEL --tokens N --device cuda` in a fresh process: the
            wall time a user waits, process starts, weight making and JIT included;
  bench     the same comparison through the API with `bench=True`: each worker, after a warm-up
            run, times a bare forward (no hooks, no capture) and a capturing one, and records its
            peak GPU memory; the parent times the diff;
  profile   torch.profiler over the HF worker's sketched capture and a bare forward
            (DIR/profile-hf-DTYPE-{capture,bare}.txt);
  gradbench (`--grad`) the HF worker's `run_grad` (loss, every point's and weight's gradient,
            whole or, past 1 GiB, sketched on the GPU as `compare --grad` takes them) against a
            bare forward + backward of the same loss (`model(ids, labels=ids).loss.backward()`):
            the first run_grad (with the Trainer's step) with its phases, then the fastest of
            two, with peak GPU memory;
  debugger  the peer a porter uses today on the same model and prompt: HF's
            `model_addition_debugger_context`, and plain hooks copying every module output to the
            host (the naive capture).
It writes DIR/results.json and DIR/results.md (the table that goes into bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "jax", "numpy"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = None
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        out["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return out


def e2e(model, tokens, dtypes, out: Path, extra=(), key="e2e") -> dict:
    json_path = out / f"{key}-{model}.json"
    cmd = [sys.executable, "-m", "llmdiff", "compare", model, "--tokens", str(tokens), "--device", "cuda",
           "--impl", "hf", "--json", str(json_path), *sum((["--dtype", d] for d in dtypes), []), *extra]
    log = out / f"{key}-{model}.log"  # written as it goes: a run cut short still says where it was
    t = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    result = {"command": " ".join(cmd[1:]), "wall_s": round(wall, 2), "exit_code": proc.returncode,
              "log_tail": log.read_text()[-2000:]}
    if json_path.exists():
        report = json.loads(json_path.read_text())
        result["runs"] = [{k: r.get(k) for k in ("candidate", "dtype", "verdict", "first_divergence")}
                          | {"logits_rel_l2": next((p["rel_l2"] for p in r["points"] if p["name"] == "logits"), None),
                             "worst_floor_ratio": max((p.get("floor_ratio") or 0) for p in r["points"]) if r["points"] else None}
                          for r in report["runs"]]
        result["findings"] = [f"{f['code']} {f['implementation']} [{f['dtype']}] at {f['where']}" for f in report["findings"]]
        result["timings"] = report["timings"]
        result["capture"] = report["options"].get("capture")
        result["details"] = {i["name"]: i.get("details") for i in report["implementations"]}
    return result


def _diff_per_run(work: Path, report: dict, dtypes, tokens, reps: int = 5) -> dict:
    """The parent's diff of one run, as the compare does it, fastest of `reps` on warm files:
    the candidate's points against the reference's (`compare_captures`), and the dtype's noise
    floors (`noise_floors`: once per dtype, whatever the number of candidates)."""
    from llmdiff import diff

    points = report["options"]["points"]
    out = {}
    for d in dtypes:
        files = {k: work / f"{k}-{d}.safetensors" for k in ("hf", "oracle")}
        files["truth"] = work / f"oracle-float64-as-{d}.safetensors"
        if not all(f.exists() for f in files.values()):
            out[d] = {"error": f"no captures in {work}: {sorted(p.name for p in work.iterdir())}"}
            continue
        best = {"load_s": float("inf"), "floors_s": float("inf"), "compare_s": float("inf")}
        for _ in range(reps):
            t = time.perf_counter()
            caps = {k: diff.load_captures(f) for k, f in files.items()}
            t1 = time.perf_counter()
            floors = diff.noise_floors(caps["oracle"], caps["truth"], d)
            t2 = time.perf_counter()
            diff.compare_captures(caps["hf"], caps["oracle"], floors, d, points, lengths=[tokens])
            t3 = time.perf_counter()
            for key, s in (("load_s", t1 - t), ("floors_s", t2 - t1), ("compare_s", t3 - t2)):
                best[key] = min(best[key], s)
        out[d] = {k: round(v, 4) for k, v in best.items()}
    return out


def bench(model, tokens, dtypes) -> dict:
    import numpy as np

    from llmdiff import api
    from llmdiff.convert import canonical_shapes
    from llmdiff.spec import get_spec

    spec = get_spec(model)
    params = sum(int(np.prod(s)) for s in canonical_shapes(spec).values())
    work = Path(tempfile.mkdtemp(prefix="llmdiff-bench-"))
    try:
        t = time.perf_counter()
        result = api.compare(model, impls=["hf"], dtypes=dtypes, device="cuda", lengths=(tokens,), bench=True,
                             diagnose=False, workdir=work)
        wall = time.perf_counter() - t
        report = result.report
        diff_per_run = _diff_per_run(work, report, dtypes, tokens)
    finally:   # the captures (GBs of a float32 run's sketches and logits) go
        shutil.rmtree(work, ignore_errors=True)
    rows = []
    for key, timings in report["timings"]["workers"].items():
        rows.append({"worker_run": key, **{k: timings.get(k) for k in (
            "load_s", "bare_forward_s", "capture_forward_s", "run_s", "save_s")}})
    meta_peaks = {i["name"]: i.get("peak_device_bytes") for i in report["implementations"]}
    return {"wall_s": round(wall, 2), "exit_code": report["exit_code"], "diff_s": report["timings"].get("diff_s"),
            "diff_per_run": diff_per_run,
            "params": params, "rows": rows, "peaks": meta_peaks,
            "runs": [{**{k: r.get(k) for k in ("candidate", "dtype", "verdict", "first_divergence")},
                      "worst_floor_ratio": max((p.get("floor_ratio") or 0.0 for p in r["points"]), default=None),
                      "logits_rel_l2": next((p.get("rel_l2") for p in r["points"] if p["name"] == "logits"), None)}
                     for r in report["runs"]]}


def _hf_job(model, tokens, capture, device="cuda", tiny=False, narrow=False):
    """The job llmdiff's HF worker gets for MODEL with weights made on the GPU, one prompt.
    narrow: MODEL's layers at tiny widths (a forward that is all host: a CPU's stand-in for a
    GPU whose capture is bound by the host)."""
    import dataclasses

    from llmdiff import inputs, weights
    from llmdiff.job import Job, Options, WeightsSource
    from llmdiff.spec import get_spec

    spec = get_spec(model, tiny=tiny)
    if narrow:
        spec = dataclasses.replace(spec, vocab_size=512, hidden_size=16, head_dim=2, mlp_dim=32)
    work = Path(tempfile.mkdtemp(prefix="llmdiff-bench-"))
    hf_dir = weights.write_hf_config(work / "hf-config", spec)
    ids = inputs.synthetic_prompts(spec, 0, (tokens,))[0]
    job = Job(spec=spec.to_dict(), tokens=[ids], options=Options(device=device, stream=False),
              weights=WeightsSource(hf_dir=str(hf_dir), seed=0), capture=capture)
    return job, ids, work


def gradbench(model, tokens, dtypes) -> dict:
    """`--grad`'s cost in the HF worker: run_grad against a bare forward + backward. The
    captures as `compare --grad` takes them (`capture="auto"`: sketched on the device when the
    whole gradients pass 1 GiB, gemma-7b's are 68 GB). The first run_grad does the once-a-batch
    work too (HF's own loss cases, the Trainer's step): timed apart, with its phases
    (`Reference.phase`); then the fastest of two plain ones."""
    import torch

    from llmdiff.api import SKETCH_ABOVE_BYTES, _capture_bytes, select_points
    from llmdiff.job import RunId, RunRequest
    from llmdiff.references.hf import HFReference
    from llmdiff.spec import get_spec

    device = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: a smoke test of this script
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    spec = get_spec(model)
    capture = "sketch" if _capture_bytes(spec, select_points(spec), [[0] * tokens], True) > SKETCH_ABOVE_BYTES else "full"
    job, ids, work = _hf_job(model, tokens, capture, device)
    job = job.with_(grad=True)
    rows = []
    for dtype in dtypes:
        adapter = HFReference(job)
        request = RunRequest(RunId(dtype), str(work / dtype), job.options)
        adapter.begin(request)
        t = time.perf_counter()
        adapter.load(request)
        load_s = time.perf_counter() - t
        model_ = adapter.model
        x = torch.tensor([ids], device=device)

        for p in model_.parameters():   # as run_grad does: the adapter loads for inference
            p.requires_grad_(True)

        def bare():
            model_.zero_grad(set_to_none=True)
            with torch.enable_grad():
                model_(input_ids=x, labels=x).loss.backward()
            sync()

        def timed(fn, n=3, warm=True):
            if warm:
                fn()
            best = float("inf")
            for _ in range(n):
                t = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t)
            return best

        peak = torch.cuda.max_memory_allocated if device == "cuda" else (lambda: 0)
        reset = torch.cuda.reset_peak_memory_stats if device == "cuda" else (lambda: None)
        reset()
        bare_s = timed(bare)
        bare_peak = peak()
        model_.zero_grad(set_to_none=True)
        reset()
        adapter.phases = {}
        t = time.perf_counter()
        first = adapter.run_grad(ids)
        first_s = time.perf_counter() - t
        first_phases = json.loads(json.dumps(adapter.phases))  # later calls add to it
        first_peak = peak()
        host_mb = sum(a.nbytes for a in first.values()) / 1e6
        del first
        reset()
        grad_s = timed(lambda: adapter.run_grad(ids), n=2, warm=False)
        rows.append({"dtype": dtype, "capture": capture, "load_s": round(load_s, 2),
                     "bare_forward_backward_s": round(bare_s, 4), "run_grad_s": round(grad_s, 4),
                     "ratio": round(grad_s / bare_s, 2), "first_run_grad_s": round(first_s, 2),
                     "first_run_grad_phases": first_phases, "bare_peak_gb": round(bare_peak / 1e9, 2),
                     "first_run_grad_peak_gb": round(first_peak / 1e9, 2), "run_grad_peak_gb": round(peak() / 1e9, 2),
                     "host_mb": round(host_mb, 1), "trainer": (adapter._trainer or {}).get("error") or "ran",
                     "weight_gb": round(sum(p.numel() * p.element_size() for p in model_.parameters()) / 1e9, 2)})
        print(json.dumps(rows[-1]), flush=True)
        adapter.model = model_ = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return {"rows": rows}


def profile(model, tokens, dtypes, out: Path) -> dict:
    """Where llmdiff's HF capture spends its time: torch.profiler over one warm sketched run,
    and over one bare forward; the tables go to DIR/profile-hf-DTYPE-{capture,bare}.txt."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from llmdiff.job import RunId, RunRequest
    from llmdiff.references.hf import HFReference

    job, ids, work = _hf_job(model, tokens, "sketch")
    rows = []
    for dtype in dtypes:
        adapter = HFReference(job)
        request = RunRequest(RunId(dtype), str(work / dtype), job.options)
        adapter.begin(request)
        adapter.load(request)
        for what, run in (("capture", adapter.run), ("bare", adapter.run_bare)):
            run(ids)
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run(ids)
                torch.cuda.synchronize()
            averages = prof.key_averages()
            text = "\n\n".join(averages.table(sort_by=key, row_limit=25)
                                for key in ("self_cuda_time_total", "self_cpu_time_total"))
            (out / f"profile-hf-{dtype}-{what}.txt").write_text(text)
            rows.append({"dtype": dtype, "run": what,
                         "cuda_ms": round(sum(e.self_device_time_total for e in averages) / 1e3, 2),
                         "cpu_ms": round(sum(e.self_cpu_time_total for e in averages) / 1e3, 2),
                         "kernels": sum(1 for e in prof.events() if e.device_type.name == "CUDA")})
        adapter.model = None
        torch.cuda.empty_cache()
    return {"rows": rows}


def debugger(model, tokens, dtypes, out: Path) -> dict:
    """HF's model_addition_debugger_context and naive host-copy hooks, on the model llmdiff's HF
    worker builds (the same made weights), the same synthetic prompt."""
    import torch
    from transformers.model_debugging_utils import model_addition_debugger_context

    from llmdiff.job import RunId, RunRequest
    from llmdiff.references.hf import HFReference

    job, ids, work = _hf_job(model, tokens, "full")
    out_rows = []
    for dtype in dtypes:
        adapter = HFReference(job)
        request = RunRequest(RunId(dtype), str(work / dtype), job.options)
        adapter.begin(request)
        adapter.load(request)
        m = adapter.model
        x = torch.tensor([ids], device="cuda")

        def forward():
            with torch.no_grad():
                m(input_ids=x, use_cache=False)
            torch.cuda.synchronize()

        forward()
        t = time.perf_counter()
        forward()
        bare = time.perf_counter() - t
        row = {"dtype": dtype, "bare_forward_s": round(bare, 4)}
        # naive: every module's output copied to the host
        store, handles = [], []

        def hook(module, args, output):
            o = output[0] if isinstance(output, tuple) else output
            if torch.is_tensor(o):
                store.append(o.detach().float().cpu())
        for mod in m.modules():
            handles.append(mod.register_forward_hook(hook))
        forward()
        store.clear()
        t = time.perf_counter()
        forward()
        row["naive_hooks_s"] = round(time.perf_counter() - t, 4)
        store.clear()
        for h in handles:
            h.remove()
        for use_repr in (True, False):
            path = work / f"debug-{dtype}-{use_repr}"
            path.mkdir()
            t = time.perf_counter()
            with model_addition_debugger_context(m, debug_path=str(path), use_repr=use_repr):
                forward()
            row[f"hf_debugger_{'repr' if use_repr else 'tensors'}_s"] = round(time.perf_counter() - t, 3)
        out_rows.append(row)
        adapter.model = m = None
        torch.cuda.empty_cache()
    return {"rows": out_rows}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma-7b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", dest="dtypes", action="append")
    ap.add_argument("--only", action="append", choices=["e2e", "bench", "debugger", "profile", "gradbench"],
                    help="parts to run, in this order (repeatable; e2e twice measures a cold and a warm start)")
    ap.add_argument("--e2e-arg", dest="e2e_args", action="append", default=[],
                    help="extra argument for the end-to-end compare, e.g. --e2e-arg=--timeout --e2e-arg=400"
                         " (each worker is then killed after 400 s, and the compare still writes its JSON)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dtypes = args.dtypes or ["float32", "bfloat16"]
    parts = args.only or ["e2e", "bench", "debugger"]
    results = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "tokens": args.tokens, "dtypes": dtypes,
               "versions": versions()}
    path = out / f"results-{args.model}.json"
    for n, part in enumerate(parts):
        key = part if part not in results else f"{part}-{n}"
        print(f"--- {key}", flush=True)
        try:
            if part == "e2e":
                results[key] = e2e(args.model, args.tokens, dtypes, out, args.e2e_args, key)
            elif part == "bench":
                results[key] = bench(args.model, args.tokens, dtypes)
            elif part == "profile":
                results[key] = profile(args.model, args.tokens, dtypes, out)
            elif part == "gradbench":
                results[key] = gradbench(args.model, args.tokens, dtypes)
            else:
                results[key] = debugger(args.model, args.tokens, dtypes, out)
        except Exception as e:  # noqa: BLE001 - keep what the other parts measured
            import traceback

            results[key] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        path.write_text(json.dumps(results, indent=1))
        print(json.dumps(results[key], indent=1)[:4000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
