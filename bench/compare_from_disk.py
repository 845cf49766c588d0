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
process of it (llmdiff waits for its workers), as `/usr/bin/time`'s %M reports it. That counts a
file's pages mapped into the process (safetensors' mmap) as well as memory of its own, so each
process of the command's tree is also sampled every 0.1 s (`/proc/PID/status`): its peak
`RssAnon` (its own memory: what holding the model on the host would show) and peak `RssFile`
(mapped file pages: the page cache, given back under pressure), by its command line.
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


def _tree(root: int) -> list[int]:
    """root and its descendants, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _sample(pid: int, peaks: dict) -> None:
    """Each process's peak RssAnon / RssFile in MB into `peaks`, keyed by its command line."""
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{p}/cmdline", "rb") as f:
                name = " ".join(a.decode(errors="replace") for a in f.read().split(b"\0")[:4] if a)[-120:]
        except OSError:
            continue
        mine = peaks.setdefault(f"{p} {name}", {"anon_mb": 0, "file_mb": 0})
        for key, field in (("anon_mb", "RssAnon"), ("file_mb", "RssFile")):
            if field in status:
                mine[key] = max(mine[key], int(status[field].split()[0]) >> 10)


def run(cmd: list[str], env=None) -> tuple[float, float, int, str, dict]:
    """(wall s, peak RSS MB of the largest process so far, exit code, last output lines, each
    process's peak RssAnon / RssFile sampled every 0.1 s)."""
    t = time.perf_counter()
    peaks: dict = {}
    with tempfile.TemporaryFile("w+") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        while p.poll() is None:
            if sys.platform.startswith("linux"):
                _sample(p.pid, peaks)
            time.sleep(0.1)
        wall = time.perf_counter() - t
        log.seek(0)
        tail = log.read()[-3000:]
    peaks = {k: v for k, v in peaks.items() if v["anon_mb"] + v["file_mb"] >= 100}   # not cat, not shells
    return wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, p.returncode, tail, peaks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", default="512")
    ap.add_argument("--out", default=".")
    ap.add_argument("--tiny", action="store_true", help="a tiny checkpoint: smoke-tests the bench")
    ap.add_argument("--warm", action="store_true", help="also the compare again without evicting")
    ap.add_argument("--no-plan", action="store_true", help="without the parent's pass alone (measured before)")
    ap.add_argument("--evict", choices=["all", "shards"], default="all",
                    help="before a cold phase: the whole page cache (the imports' files too), or the shards only")
    ap.add_argument("--also-env", action="append", default=[], metavar="K=V",
                    help="a cold compare again with this environment variable set (repeatable: one compare each)")
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
        phases = [("cold", "cat", cat_cmd(files))] + ([] if args.no_plan else [("cold", "plan", plan)]) \
            + [("cold", "compare", compare)]
        phases += [("cold", f"compare {kv}", compare) for kv in args.also_env]
        if args.warm:
            phases.append(("warm", "compare", compare))
        for phase, what, cmd in phases:
            how = evict(files, args.evict == "all") if phase == "cold" else "none"
            resident = resident_fraction(files)
            env = dict(os.environ)
            if what.startswith("compare "):
                key, _, value = what.split(" ", 1)[1].partition("=")
                env[key] = value
            report.unlink(missing_ok=True)
            wall, rss, code, tail, peaks = run(cmd, env)
            row = {"phase": phase, "what": what, "evicted_by": how, "resident_before": resident, "wall_s": wall,
                   "gb_per_s": gb / wall, "peak_rss_mb": rss, "exit": code, "rss_by_process": peaks}
            if what == "plan" and code == 0:   # the parent's own numbers (RUSAGE_CHILDREN is a running max)
                row.update(json.loads(tail.strip().splitlines()[-1]))
            if what.startswith("compare") and report.exists():
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
