"""Where HF's sketched capture spends its time (issue #19: bfloat16 capture 1.5x a bare forward
at gemma-7b / 512 tokens), measured by taking it apart on a GPU, in one process so that every
part is timed on the same machine at the same time (calls to the device vary by 30% in the
bare forward alone).

    python bench/hf_capture_parts.py --out DIR [--model gemma-7b] [--tokens 512] [--dtype bfloat16]
    python bench/hf_capture_parts.py --out DIR --narrow --device cpu --tokens 8 --reps 40   # a host-bound proxy

The HF adapter as its worker runs it (random weights made on the device, one prompt); each part
is the fastest of `--reps` runs, interleaved round by round, after a warm-up:
  bare       `run_bare`: the forward, no capture (what the capture is measured against);
  taps       `run` with only the logits asked for: the wrapped forwards, the RoPE wrapper and
             the callbacks, each returning at once, plus the logits' sketch;
  no_sketch  `run` with every point taken and kept, but its group's product and norm replaced
             by zeros of the sketch's shape (no sketch kernels);
  run        `run` itself: the sketched capture, moved to the host.
It writes DIR/hf-capture-parts-DTYPE.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="gemma-7b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (a smoke test on the CPU)")
    ap.add_argument("--narrow", action="store_true",
                    help="MODEL's layers at tiny widths, on the CPU: every part all host, a stand-in for the"
                         " H200's host-bound bfloat16 capture")
    args = ap.parse_args()

    import torch

    from gpu_compare import _hf_job
    from llmdiff import sketch
    from llmdiff.job import RunId, RunRequest
    from llmdiff.references import hf

    job, ids, work = _hf_job(args.model, args.tokens, "sketch", args.device, args.tiny, args.narrow)
    adapter = hf.HFReference(job)
    request = RunRequest(RunId(args.dtype), str(work / args.dtype), job.options)
    adapter.begin(request)
    t = time.perf_counter()
    adapter.load(request)
    load_s = time.perf_counter() - t
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    project = hf.HFReference._project

    def zeros(self, x, wide=True):
        return x.new_zeros(x.shape[0], sketch.K + 1, dtype=torch.float32)

    def with_points(points, fn=None):
        def part():
            adapter._wanted = points
            if fn is not None:
                hf.HFReference._project = fn
            try:
                adapter.run(ids)
            finally:
                adapter._wanted, hf.HFReference._project = None, project
            sync()
        return part

    parts = {"bare": lambda: adapter.run_bare(ids), "taps": with_points(frozenset({"logits"})),
             "no_sketch": with_points(None, zeros), "run": with_points(None)}
    best = {name: float("inf") for name in parts}
    for name, part in parts.items():   # warm-up
        part()
    for _ in range(args.reps):
        for name, part in parts.items():
            t = time.perf_counter()
            part()
            best[name] = min(best[name], time.perf_counter() - t)
    bare = best["bare"]
    rows = {name: {"s": round(s, 4), "x_bare": round(s / bare, 2)} for name, s in best.items()}
    out = {"model": args.model, "tokens": args.tokens, "dtype": args.dtype, "load_s": round(load_s, 1),
           "reps": args.reps, "torch": torch.__version__,
           "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"hf-capture-parts-{args.dtype}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
