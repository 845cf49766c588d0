"""The parent's part of `llmdiff compare DIR` alone (`api._plan`: the checkpoint checked, its
weights made ready for the workers, the prompts), on a checkpoint small enough for a small
machine (issue #19; `compare_from_disk.py` is the full-size run, for a GPU machine).

    python bench/plan_from_disk.py [--model gemma-2b] [--layers 2] [--dir /tmp]

1. Writes a MODEL-shaped checkpoint with LAYERS decoder layers as `bench/audit_full.py` does
   (random bfloat16, 5 GB shards, index, config and tokenizer files).
2. Evicts it from the page cache and times `cat SHARDS > /dev/null` (the disk's speed); evicts
   again, then in a fresh process runs `api._plan` as `compare DIR` does, and prints one JSON
   line: wall, peak RSS of that process, the bytes it left in the work directory (the canonical
   copy, where one is written), the fingerprint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def plan(path: str) -> dict:
    from llmdiff import api, diff

    work = Path(tempfile.mkdtemp(prefix="llmdiff-plan-bench-"))
    try:
        t = time.perf_counter()
        p = api._plan(path, ("hf",), dtypes=list(api.DTYPES), tiny=False, weights=None, seed=0,
                      reference=api.ORACLE, work=work, temporary=False, attn="eager", timeout=None, select=(),
                      ignore=(), diagnose=False, thresholds=diff.DEFAULT_THRESHOLDS, points=None, layers=None,
                      device="cpu", capture="auto", stream="auto", lengths=None, bench=False, generate=None,
                      devices=None, tokenizer_parity=False, revision=None, config="published")
        p.checked()   # the check and fingerprint pass (beside the workers in a compare)
        wall = time.perf_counter() - t
        left = sum(f.stat().st_size for f in work.rglob("*") if f.is_file())
        return {"plan_s": round(wall, 2), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "work_dir_mb": round(left / 1e6), "fingerprint": p.weights_info["fingerprint"],
                "weights": {k: v for k, v in dataclasses.asdict(p.job.weights).items() if v is not None}}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma-2b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(plan(args.child)))
        return
    from audit_full import cat_cmd, evict, shard_files, write_checkpoint

    from llmdiff.spec import get_spec

    spec = dataclasses.replace(get_spec(args.model), num_layers=args.layers)
    path = Path(tempfile.mkdtemp(prefix="llmdiff-plan-bench-", dir=args.dir))
    try:
        info = write_checkpoint(path, spec)
        files = shard_files(path)
        evict(files)
        t = time.perf_counter()
        subprocess.run(cat_cmd(files), check=True)
        cat_s = time.perf_counter() - t
        evict(files)
        out = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        row = {"model": args.model, "layers": args.layers, "checkpoint_gb": round(info["bytes"] / 1e9, 2),
               "cold_cat_s": round(cat_s, 2), **json.loads(out.stdout.splitlines()[-1])}
        print(json.dumps(row))
    finally:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    main()
