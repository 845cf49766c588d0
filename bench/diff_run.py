"""One run's diff in the parent, as a gemma-7b compare does it, on any host (issue #19: capture +
diff <= 1.5x a bare forward): where its milliseconds go.

    python bench/diff_run.py [--out DIR] [--reps 20]

A stand-in whose captures have gemma-7b's size: gemma-7b's 28 layers at width 16 (a sketched
point is 512 positions x 65 values whatever the width, so its 339 points are gemma-7b's 90 MB a
run pair), written by llmdiff as an HF checkpoint, compared once on the CPU with `--capture
sketch --workdir` for the captures files. Then, on those files, fastest of `--reps`:
  load      `diff.load_captures` of the three files a bfloat16 run's diff reads;
  floors    `diff.noise_floors` (once per dtype, whatever the number of candidates);
  compare   `diff.compare_captures` of hf against the oracle (the run's points, verdict, logits);
  metrics   its `diff.points_metrics` alone (`sketch.metrics_many`);
  sums      `sketch._sums` alone over the run's stacked points;
and a cProfile of `compare` (DIR/diff_run_profile.txt). Writes DIR/diff_run.json.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _best(call, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t)
    return round(best * 1e3, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from llmdiff import diff, sketch, weights
    from llmdiff.spec import get_spec

    spec = dataclasses.replace(get_spec("gemma-7b"), vocab_size=512, hidden_size=16, head_dim=2, mlp_dim=32,
                               num_heads=16, num_kv_heads=16)
    work = Path(tempfile.mkdtemp(prefix="llmdiff-bench-"))
    try:
        ckpt = weights.write_hf_checkpoint(work / "ckpt", spec, weights.random_weights(spec), dtype="float32")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "llmdiff", "compare", str(ckpt), "--tokens", "512", "--capture", "sketch",
                        "--device", "cpu", "--dtype", "bfloat16", "--workdir", str(work / "w"),
                        "--json", str(work / "r.json"), "-q"], check=True)
        compare_s = time.perf_counter() - t
        report = json.loads((work / "r.json").read_text())
        points = report["options"]["points"]
        files = {k: work / "w" / f"{k}-bfloat16.safetensors" for k in ("hf", "oracle")}
        files["truth"] = work / "w" / "oracle-float64-as-bfloat16.safetensors"
        caps = {k: diff.load_captures(f) for k, f in files.items()}
        floors = diff.noise_floors(caps["oracle"], caps["truth"], "bfloat16")
        same = [n for n in points if isinstance(caps["hf"].get(n), sketch.Sketch)]
        pairs = [(caps["hf"][n], caps["oracle"][n]) for n in same]
        C = sketch._stacked([p[0].data for p in sorted(pairs, key=lambda p: sketch._address(p[0].data))])
        R = sketch._stacked([p[1].data for p in sorted(pairs, key=lambda p: sketch._address(p[0].data))])

        def compare():
            return diff.compare_captures(caps["hf"], caps["oracle"], floors, "bfloat16", points, lengths=[512])

        result = {
            "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "points": len(points), "sketched": len(same), "run_pair_mb": round(2 * sum(p[0].data.nbytes for p in pairs) / 1e6, 1),
            "stacked": C is not None and R is not None, "stand_in_compare_s": round(compare_s, 2),
            "best_ms": {
                "load": _best(lambda: {k: diff.load_captures(f) for k, f in files.items()}, args.reps),
                "floors": _best(lambda: diff.noise_floors(caps["oracle"], caps["truth"], "bfloat16"), args.reps),
                "compare": _best(compare, args.reps),
                "metrics": _best(lambda: diff.points_metrics(pairs), args.reps),
                "sums": _best(lambda: sketch._sums(C, R), args.reps) if C is not None and R is not None else None,
            },
            "verdict": compare()["verdict"],
        }
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(args.reps):
            compare()
        profile.disable()
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
        (out / "diff_run_profile.txt").write_text(text.getvalue())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (out / "diff_run.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
