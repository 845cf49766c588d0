"""`llmdiff audit` on a full-size gemma-7b-shaped checkpoint: wall time, peak RSS, throughput.

    python bench/audit_full.py [--dir /tmp] [--keep] [--no-append] [--tiny]

1. Writes a gemma-7b-shaped HF checkpoint (random bfloat16 weights, ~17 GB, sharded at 5 GB
   like `save_pretrained`, with its index, config, tokenizer and generation files). The
   writer streams: each tensor is written in slices of a 64 MB pool of random bfloat16
   values (N(0, 0.02); norm scales drawn on their own), so it holds ~0.3 GB whatever the size.
2. Evicts the files from the page cache (`posix_fadvise(DONTNEED)` after `fsync`; writing
   to /proc/sys/vm/drop_caches is tried first and needs root) and checks with `fincore`
   how much stayed resident.
3. Cold: `cat SHARDS > /dev/null`, evict, `llmdiff audit DIR -q`. Warm: the same again
   without evicting (second of two runs). Each command runs under `/usr/bin/time`, whose
   `%M` is the command's own peak RSS.
4. Appends the numbers to bench/RESULTS.md and deletes the checkpoint.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARD_BYTES = 5 * 1000**3          # save_pretrained's default max_shard_size="5GB"
POOL_VALUES = 32 * 1024 * 1024     # 64 MB of bfloat16


def hf_tensor_order(spec) -> list[tuple[str, tuple[int, ...]]]:
    from llmdiff import convert

    shapes = convert.hf_shapes(spec)
    def key(name):  # embeddings, then layer by layer in numeric order, then the final norm
        parts = name.split(".")
        return (0 if "embed" in name else 2 if name == "model.norm.weight" else 1,
                int(parts[2]) if parts[1] == "layers" else 0, name)
    return [(n, tuple(shapes[n])) for n in sorted(shapes, key=key)]


def write_checkpoint(path: Path, spec) -> dict:
    import ml_dtypes

    from llmdiff import weights

    sys.path.insert(0, str(ROOT / "tests" / "llmdiff"))   # the tests' tokenizer files for synthetic checkpoints
    from audit_fixtures import write_example_tokenizer_files

    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(min(POOL_VALUES, spec.vocab_size * spec.hidden_size), dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    pool_bytes = memoryview(pool.view(np.uint8))
    tensors = hf_tensor_order(spec)
    shards, current, size = [], [], 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * 2
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape, nbytes))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape, nbytes in shard:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, nbytes in shard:
                if len(shape) == 1:  # norm scales: their own values, (1 + w) around 1
                    f.write((rng.standard_normal(shape, dtype=np.float32) * 0.25).astype(ml_dtypes.bfloat16).tobytes())
                    continue
                left = nbytes
                while left:  # slices of the pool at random (even) offsets
                    n = min(left, len(pool_bytes) // 2)
                    start = int(rng.integers(0, (len(pool_bytes) - n) // 2)) * 2
                    f.write(pool_bytes[start:start + n])
                    left -= n
            f.flush()
            os.fsync(f.fileno())
        total += offset
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(weights.hf_config(spec), indent=2))
    write_example_tokenizer_files(path, spec)
    return {"shards": len(shards), "bytes": total, "tensors": len(tensors)}


def shard_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def evict(files, everything: bool = True) -> str:
    """`files` out of the page cache; with `everything`, the whole page cache too (the Python
    packages the command imports as well) where the kernel lets us."""
    how = "posix_fadvise(DONTNEED)"
    if everything:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            how = "drop_caches (write accepted) + posix_fadvise(DONTNEED)"
        except OSError:
            pass
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return how


def resident_fraction(files) -> float | None:
    if not shutil.which("fincore"):
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        return None
    res = size = 0
    for line in out.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def timed(cmd: list[str], **kw) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB of the command, exit code), from GNU time.

    Not `os.wait4` on our own child: Linux carries a process's peak RSS across exec, and a
    child spawned from this (large) process would report at least this process's peak.
    `/usr/bin/time` is small, so its child's `%M` is the command's own peak."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as out:
        t = time.perf_counter()
        code = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", out.name, *cmd], **kw).returncode
        wall = time.perf_counter() - t
        _, max_kb = out.read().split()[-2:]
    return wall, int(max_kb) / 1024, code


def audit_cmd(path: Path, report: Path) -> list[str]:
    return [sys.executable, "-m", "llmdiff", "audit", str(path), "-q", "--json", str(report)]


def cat_cmd(files) -> list[str]:
    return ["sh", "-c", 'cat "$@" > /dev/null', "cat", *map(str, files)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="Smoke-test the bench on a tiny model (no append).")
    args = ap.parse_args()
    import resource

    from llmdiff.spec import get_spec

    spec = get_spec("gemma-7b", tiny=args.tiny)
    args.no_append |= args.tiny
    free = shutil.disk_usage(args.dir).free
    if free < (0 if args.tiny else 25 * 1000**3):
        sys.exit(f"bench: {args.dir} has {free / 1e9:.0f} GB free; need 25 GB")
    path = Path(tempfile.mkdtemp(prefix="llmdiff-audit-bench-", dir=args.dir))
    rows = []
    try:
        t = time.perf_counter()
        info = write_checkpoint(path, spec)
        write_s = time.perf_counter() - t
        writer_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        files = shard_files(path)
        gb = info["bytes"] / 1e9
        print(f"wrote {gb:.2f} GB in {info['shards']} shards, {info['tensors']} tensors, in {write_s:.1f} s "
              f"({gb / write_s:.2f} GB/s); writer peak RSS {writer_rss:.0f} MB", flush=True)
        report = path.parent / (path.name + "-report.json")
        for phase in ("cold", "warm"):
            for what, cmd in (("cat", cat_cmd(files)), ("audit", audit_cmd(path, report))):
                if phase == "cold":
                    how = evict(files)
                else:
                    how = "none (second run)"
                    timed(cmd, stdout=subprocess.DEVNULL)
                resident = resident_fraction(files)
                wall, rss, code = timed(cmd, stdout=subprocess.DEVNULL)
                extra = ""
                if what == "audit":
                    rep = json.loads(report.read_text())
                    extra = f"exit {code}, {len(rep['findings'])} findings"
                    if code not in (0, 1):
                        sys.exit(f"bench: audit failed with exit {code}")
                row = {"phase": phase, "what": what, "evicted_by": how,
                       "resident_before": resident, "wall_s": wall, "gb_per_s": gb / wall, "peak_rss_mb": rss,
                       "note": extra}
                rows.append(row)
                res = "?" if resident is None else f"{resident:.0%}"
                print(f"{phase:<5} {what:<6} {wall:6.1f} s  {gb / wall:5.2f} GB/s  peak RSS {rss:7.0f} MB  "
                      f"(resident before: {res}; evicted by {how}) {extra}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(path, ignore_errors=True)
            for p in path.parent.glob(path.name + "-report.json"):
                p.unlink()
    if not args.no_append:
        append_results(info, write_s, writer_rss, rows)


def append_results(info, write_s, writer_rss, rows) -> None:
    import ml_dtypes  # noqa: F401 - its version below

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "", "## `llmdiff audit` on a full-size gemma-7b-shaped checkpoint (issue: llmdiff audit)", "",
        "- Command: `python bench/audit_full.py` (writes the checkpoint to a temp dir, audits it, deletes it).",
        f"- Machine: {platform.machine()}, {os.cpu_count()} cores (shared), {mem:.0f} GB RAM, local disk;"
        f" Python {platform.python_version()}, numpy {np.__version__}."
        f" Date: {datetime.date.today().isoformat()}.",
        f"- Checkpoint: {info['bytes'] / 1e9:.2f} GB of bfloat16 in {info['shards']} safetensors shards,"
        f" {info['tensors']} tensors; written in {write_s:.1f} s by a streaming writer whose peak RSS was"
        f" {writer_rss:.0f} MB.",
        "- Cold = evicted from the page cache first (drop_caches needs root here, so"
        " `posix_fadvise(DONTNEED)` per file; `fincore` says how much stayed resident). Warm = the"
        " second of two back-to-back runs. Peak RSS: `/usr/bin/time`'s `%M` of the command.",
        "",
        "| phase | command | resident before | wall | throughput | peak RSS | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        res = "?" if r["resident_before"] is None else f"{r['resident_before']:.0%}"
        cmd = "`cat shards > /dev/null`" if r["what"] == "cat" else "`llmdiff audit DIR -q`"
        lines.append(f"| {r['phase']} | {cmd} | {res} | {r['wall_s']:.1f} s | {r['gb_per_s']:.2f} GB/s |"
                     f" {r['peak_rss_mb']:.0f} MB | {r['note']} |")
    by = {(r["phase"], r["what"]): r for r in rows}
    ratios = [f"{p}: audit at {by[(p, 'cat')]['wall_s'] / by[(p, 'audit')]['wall_s']:.2f}x cat's speed"
              for p in ("cold", "warm")]
    lines += ["", "Audit vs `cat` of the same files: " + "; ".join(ratios) + ".", ""]
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write("\n".join(lines))
    print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
