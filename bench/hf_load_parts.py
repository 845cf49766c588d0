"""Where the HF worker's first load goes (issue #19: a warm `compare gemma-7b` is the HF
worker's wall: imports, then a float32 load of 9-10 s against 1.5 s for the bfloat16 one that
follows it). In one fresh process, as the worker does it, each part timed after the one before:

    python bench/hf_load_parts.py --out DIR [--model gemma-7b] [--device cuda]

  import_torch, import_transformers   the imports the worker makes before its first load
  cuda_init                            the first CUDA call (context, allocator)
  load_float32                         `HFReference.load` as the worker's first load (profiled)
  generate_float32                     the seeded generator alone, every tensor, float32
  load_bfloat16                        the second load, as in a compare

It writes DIR/hf-load-parts.json and the first load's profile, top 40 by cumulative time, to
DIR/hf-load-profile.txt.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
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
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="the tiny model (a smoke test on the CPU)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = {}

    def timed(name, fn):
        t = time.perf_counter()
        value = fn()
        parts[name] = round(time.perf_counter() - t, 3)
        return value

    torch = timed("import_torch", lambda: __import__("torch"))
    timed("import_transformers", lambda: __import__("transformers"))
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        timed("cuda_init", lambda: (torch.zeros(1, device="cuda") + 1, sync()))

    from gpu_compare import _hf_job
    from llmdiff import convert, weights
    from llmdiff.job import RunId, RunRequest
    from llmdiff.references import hf
    from llmdiff.spec import get_spec

    job, ids, work = _hf_job(args.model, 8, "sketch", args.device, args.tiny)
    adapter = hf.HFReference(job)

    def load(dtype):
        request = RunRequest(RunId(dtype), str(work / dtype), job.options)
        adapter.begin(request)
        adapter.load(request)
        sync()

    profile = cProfile.Profile()
    profile.enable()
    timed("load_float32", lambda: load("float32"))
    profile.disable()
    adapter.model = None

    spec = get_spec(args.model, tiny=args.tiny)

    def generate():
        for name, shape in convert.canonical_shapes(spec).items():
            weights.generate_torch(spec, name, shape, 0, args.device, torch.float32)
        sync()

    timed("generate_float32", generate)
    timed("load_bfloat16", lambda: load("bfloat16"))
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(40)
    (out / "hf-load-profile.txt").write_text(text.getvalue())
    result = {"model": args.model, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "transformers": sys.modules["transformers"].__version__, "parts_s": parts}
    (out / "hf-load-parts.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
