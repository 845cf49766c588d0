"""`llmdiff compare DIR` on a full-size gemma-7b-shaped checkpoint read from disk (issue #19:
checkpoints from disk, as users run them): wall time, peak host RSS, and the disk's own speed.

    python bench/compare_from_disk.py [--dir DIR] [--device cuda] [--tokens 512] [--out OUT] [--tiny]

1. Writes the checkpoint as `bench/audit_full.py` does (random bfloat16, ~17 GB in 5 GB shards,
   with its index, config and tokenizer files; the writer holds ~0.3 GB).
2. Cold: evicts the shards from the page cache, `cat SHARDS > /dev/null` (the disk's speed),
   evicts again, the parent's part alone (`plan_from_disk.py --child DIR`: `api._plan`, which
   checks the checkpoint and fingerprints it tensor by tensor; its own wall and peak RSS),
   evicts again, `llmdiff compare DIR --device DEVICE --tokens N --json R` (every implementation
   reads the checkpoint's own files; no canonical copy). Warm: the compare again without evicting.
3. Prints one JSON line per phase (wall, GB/s of the checkpoint, peak RSS of the largest process,
   exit code, the report's per-run timings) and writes them to OUT/compare_from_disk.json.
Peak RSS is `getrusage(RUSAGE_CHILDREN).ru_maxrss` after each command: the largest single
process of it (llmdiff waits for its workers), as `/usr/bin/time`'s %M reports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_full import cat_cmd, evict, resident_fraction, shard_files, write_checkpoint  # noqa: E402


def run(cmd: list[str]) -> tuple[float, float, int, str]:
    """(wall s, peak RSS MB of the largest process so far, exit code, last output lines)."""
    t = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, p.returncode, p.stdout[-3000:]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", default="512")
    ap.add_argument("--out", default=".")
    ap.add_argument("--tiny", action="store_true", help="a tiny checkpoint: smoke-tests the bench")
    ap.add_argument("--warm", action="store_true", help="also the compare again without evicting")
    args = ap.parse_args()
    from llmdiff.spec import get_spec

    spec = get_spec("gemma-7b", tiny=args.tiny)
    path = Path(tempfile.mkdtemp(prefix="llmdiff-compare-bench-", dir=args.dir))
    rows = []
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        t = time.perf_counter()
        info = write_checkpoint(path, spec)
        gb = info["bytes"] / 1e9
        rows.append({"phase": "write", "wall_s": time.perf_counter() - t, "gb": gb, "shards": info["shards"]})
        print(json.dumps(rows[-1]), flush=True)
        files = shard_files(path)
        report = out / "compare_from_disk_report.json"
        compare = [sys.executable, "-m", "llmdiff.cli", "compare", str(path), "--device", args.device,
                   "--tokens", args.tokens, "--json", str(report), "--no-tokenizer-parity"]
        if shutil.which("llmdiff"):
            compare[:3] = [shutil.which("llmdiff")]
        plan = [sys.executable, str(Path(__file__).with_name("plan_from_disk.py")), "--child", str(path)]
        phases = [("cold", "cat", cat_cmd(files)), ("cold", "plan", plan), ("cold", "compare", compare)]
        if args.warm:
            phases.append(("warm", "compare", compare))
        for phase, what, cmd in phases:
            how = evict(files) if phase == "cold" else "none"
            resident = resident_fraction(files)
            wall, rss, code, tail = run(cmd)
            row = {"phase": phase, "what": what, "evicted_by": how, "resident_before": resident, "wall_s": wall,
                   "gb_per_s": gb / wall, "peak_rss_mb": rss, "exit": code}
            if what == "plan" and code == 0:   # the parent's own numbers (RUSAGE_CHILDREN is a running max)
                row.update(json.loads(tail.strip().splitlines()[-1]))
            if what == "compare" and report.exists():
                rep = json.loads(report.read_text())
                row["verdicts"] = {f"{r['candidate']}/{r['dtype']}": r["verdict"] for r in rep.get("runs", [])}
                row["timings"] = rep.get("timings") or [
                    {k: r.get(k) for k in ("impl", "dtype", "seconds", "timings", "load_s", "run_s") if k in r}
                    for r in rep.get("results", [])]
                row["errors"] = rep.get("errors")
            if code not in (0, 1):
                row["tail"] = tail
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            (out / "compare_from_disk.json").write_text(json.dumps(rows, indent=1, default=str))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    (out / "compare_from_disk.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
