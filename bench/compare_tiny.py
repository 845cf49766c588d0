"""Wall time of the README's main job, `llmdiff compare gemma-7b --tiny`, imports included.

    python bench/compare_tiny.py [--repeat 3]

Prints one line per run and the per-worker timings (import, load, run) from the JSON report.
Target (issue "compare, end to end"): <= 60 s on a 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default="gemma-7b")
    args = ap.parse_args()
    walls = []
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            report_path = os.path.join(tmp, "r.json")
            t = time.perf_counter()
            proc = subprocess.run(["llmdiff", "compare", args.model, "--tiny", "-q", "--json", report_path],
                                  capture_output=True, text=True)
            wall = time.perf_counter() - t
            if proc.returncode != 0:
                sys.exit(f"compare exited {proc.returncode}: {proc.stderr or proc.stdout}")
            report = json.load(open(report_path))
        walls.append(wall)
        workers = report["timings"]["workers"]
        detail = "  ".join(f"{k}: import {v.get('import_s')} load {v.get('load_s')} run {v.get('run_s')}"
                           for k, v in workers.items())
        print(f"run {i + 1}: wall {wall:.1f} s   {detail}")
    versions = {k: v for impl in report["implementations"] for k, v in impl["versions"].items()}
    print(f"median wall {statistics.median(walls):.1f} s (min {min(walls):.1f}, max {max(walls):.1f})  {versions}")


if __name__ == "__main__":
    main()
