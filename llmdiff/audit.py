"""`llmdiff audit PATH`: static checks of a checkpoint directory, streaming, safe.

    from llmdiff.audit import audit
    result = audit("./gemma-7b")            # or audit(path, model="gemma-7b")
    assert result, result.summary()         # truthy when nothing was found

No forward pass, nothing executed, nothing unpickled: pickled weights and remote code are
reported by name and never opened. The engine
1. reads the checkpoint's JSON files (config, generation config, tokenizer files) as JSON;
2. validates every safetensors header (offsets, overlaps, truncation) and the shard index;
3. resolves the model's spec (`--model`, or the one registered spec matching `model_type`
   and the sizes, full-size or tiny), when there is one;
4. streams every tensor once, in file order, in blocks of whole rows read into a few reused
   buffers by a read-ahead thread (so memory stays at a few blocks whatever the checkpoint's
   size, and reading overlaps computing), and computes what the checks need: counts of NaN,
   Inf and non-zero values, the largest magnitude, the first non-finite element, per-row L2
   norms of token tables (embeddings, `lm_head`) and their digests;
5. runs every selected check with `target = "checkpoint"` on the resulting `AuditContext`.
Checks never read weights themselves; one that needs more than the statistics defines
`visit_block` and sees each block during the same pass.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmdiff import __version__, checkpoint_files, safetensors_file
from llmdiff.check import AuditContext, Check, Finding
from llmdiff.errors import UsageError, WeightsError
from llmdiff.hf_format import (check_config, check_token_ids, family_of, rope_by_layer_type, same_rope,
                               size_differences, sliding_layout, spec_rope, spec_sizes, text_config)

BLOCK_BYTES = 64 * 1024 * 1024
READ_AHEAD = 3                       # buffers in flight between the reader thread and the checks
# Token tables: the tensors whose rows are tokens (row norms and digests are computed for them).
TOKEN_TABLE_SUFFIXES = ("embed_tokens.weight", "lm_head.weight")
# Bit patterns of IEEE floats: (unsigned view, mask of everything but the sign, exponent all ones).
_FLOAT_BITS = {
    "BF16": (np.uint16, 0x7FFF, 0x7F80), "F16": (np.uint16, 0x7FFF, 0x7C00),
    "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000), "F64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


@dataclass
class TensorStats:
    """What one streaming pass learns about a tensor."""

    nan: int = 0
    inf: int = 0
    absmax: float = 0.0                  # largest finite magnitude (0.0: the tensor is all zero)
    first_nonfinite: list | None = None  # index of the first NaN/Inf element
    row_norms: np.ndarray | None = None  # token tables: L2 norm of each row (float32)
    digest: str | None = None            # token tables, when there are two: sha1 of the raw bytes

    @property
    def all_zero(self) -> bool:
        return self.absmax == 0.0 and self.nan == 0 and self.inf == 0


@dataclass
class TensorRecord:
    name: str
    file: str                # file name inside the checkpoint directory
    dtype: str               # safetensors code: BF16, F32, ...
    shape: tuple
    start: int               # absolute byte offset of the data in `file`
    nbytes: int
    stats: TensorStats | None = None

    @property
    def is_token_table(self) -> bool:
        return len(self.shape) == 2 and self.name.endswith(TOKEN_TABLE_SUFFIXES)


class AuditResult:
    """A finished audit. Truthy when nothing was found."""

    def __init__(self, report: dict, context: AuditContext | None = None):
        self.report = report
        self.context = context

    @property
    def exit_code(self) -> int:
        return self.report["exit_code"]

    @property
    def findings(self) -> list[dict]:
        return self.report["findings"]

    def __bool__(self) -> bool:
        return self.exit_code == 0

    def summary(self) -> str:
        if not self.findings:
            return f"{self.report['path']}: clean ({len(self.report['checks']['selected'])} checks)"
        return "\n".join(f"{f['code']} {f['name']} at {f['where']}: {f['message']}" for f in self.findings)


# --- files ----------------------------------------------------------------------------------

def _optional_json(path: Path) -> dict | None:
    """A JSON object file of the checkpoint, None when absent. A dangling symlink, FIFO or device
    is not absent: `read_json` refuses it (one line), as it does non-UTF-8, non-JSON or a non-object."""
    return checkpoint_files.read_json(path) if os.path.lexists(path) else None


def _safetensors_records(path: Path, name: str) -> tuple[list[TensorRecord], list[str]]:
    """The tensors of one file, and what is wrong with it beyond what `read_header` rejects."""
    header, start = safetensors_file.read_header(path)   # raises WeightsError on a broken file
    records, problems = [], []
    for tname, info in header.items():   # types and sizes checked by read_header
        lo, hi = info["data_offsets"]
        records.append(TensorRecord(tname, name, info["dtype"], tuple(info["shape"]), start + lo, hi - lo))
    records.sort(key=lambda r: r.start)
    end = start
    for r in records:
        if r.start < end:
            problems.append(f"{name}: tensor {r.name!r} overlaps the tensor before it (starts at byte"
                            f" {r.start}, previous ends at {end})")
        elif r.start > end:
            problems.append(f"{name}: {r.start - end} unaccounted bytes before tensor {r.name!r}")
        end = max(end, r.start + r.nbytes)
    size = path.stat().st_size
    if size > end:
        problems.append(f"{name}: {size - end} bytes after the last tensor (ends at {end}, file has {size})")
    return records, problems


def _index_problems(index: dict, directory: Path, records: dict) -> list[str]:
    name = "model.safetensors.index.json"
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return [f"{name}: no weight_map object"]
    # A shard name that is not a plain file name of the directory (a list, "../x"): never
    # joined to the directory's path; reported, and its tensors count as in no shard.
    bad = [f for f in weight_map.values() if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", "..")]
    problems = [f"{name}: weight_map names {bad[0]!r}, not a file of the directory"] if bad else []
    weight_map = {t: f for t, f in weight_map.items() if f not in bad}
    missing_files = sorted({f for f in weight_map.values() if not (directory / f).exists()})
    if missing_files:
        problems.append(f"{name}: shard {missing_files[0]} is missing"
                        + (f" (and {len(missing_files) - 1} more)" if len(missing_files) > 1 else ""))
    wrong = [t for t, f in weight_map.items() if (directory / f).exists() and t in records
             and records[t].file != f]
    absent = [t for t, f in weight_map.items() if (directory / f).exists() and t not in records]
    unlisted = [t for t in records if t not in weight_map]
    for what, names in (("is listed in another shard than the one holding it", wrong),
                        ("is listed but in no shard", absent), ("is in a shard but not listed", unlisted)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            problems.append(f"{name}: tensor {names[0]!r}{more} {what}")
    return problems


def _discover(directory: Path) -> tuple[dict, dict, dict]:
    """Files by kind, tensor records by name, and file problems by file name. WeightsError
    (exit 2) when there are no weights to audit or a weights file is not a regular file."""
    files = {"safetensors": [], "pickle": [], "code": [], "index": []}
    for p in sorted(directory.iterdir()):
        # Weights and the index by name whatever they are (a FIFO, a symlink loop, a directory
        # named model.safetensors is a broken checkpoint, not an absent file); pickles and code
        # are reported only when they are files.
        if p.suffix == ".safetensors":
            files["safetensors"].append(p.name)
        elif p.name == checkpoint_files.INDEX:
            files["index"].append(p.name)
        elif not p.is_file():
            continue
        elif checkpoint_files.is_pickle(p.name):
            files["pickle"].append(p.name)
        elif checkpoint_files.is_code(p.name):
            files["code"].append(p.name)
    # transformers reads the index, else model.safetensors. With neither there is nothing to
    # audit (exit 2), except a pickle-only checkpoint: `pickle-weights-present` reports that.
    if (not files["index"] and checkpoint_files.SINGLE not in files["safetensors"]
            and not (files["pickle"] and not files["safetensors"])):
        raise checkpoint_files.no_weights(directory, files["safetensors"], files["pickle"])
    for name in files["safetensors"]:   # a FIFO would block, a loop cannot be read: exit 2 at once
        checkpoint_files.open_regular_close(directory / name, "weights file")
    records, file_errors = {}, {}
    files["unreadable"] = []      # safetensors files whose header cannot be read: tensors unknown
    for name in files["safetensors"]:
        try:
            recs, problems = _safetensors_records(directory / name, name)
        except WeightsError as e:
            file_errors.setdefault(name, []).append(str(e).replace(str(directory) + os.sep, ""))
            files["unreadable"].append(name)
            continue
        for r in recs:
            if r.name in records:
                problems.append(f"{name}: tensor {r.name!r} is also in {records[r.name].file}")
            else:
                records[r.name] = r
        if problems:
            file_errors.setdefault(name, []).extend(problems)
    if files["index"]:
        index = checkpoint_files.read_json(directory / files["index"][0], expect=None, what="safetensors index")
        problems = _index_problems(index, directory, records)
        if problems:
            file_errors.setdefault(files["index"][0], []).extend(problems)
    return files, records, file_errors


# --- spec -----------------------------------------------------------------------------------

def size_mismatches(spec, config: dict) -> int:
    """How many of config.json's sizes differ from `spec`'s (vocab_size counted too)."""
    vocab = text_config(config).get("vocab_size")
    return len(size_differences(config, spec)) + (vocab not in (None, spec_sizes(spec)["vocab_size"]))


def resolve_spec(config: dict, model: str | None):
    """The spec to compare the config with. With `model`: its full-size or tiny spec, whichever
    config.json's sizes are closer to. Without: the one registered spec of config's family
    whose sizes (all but vocab_size, which `vocab-size-mismatch` checks) match, full or tiny,
    and of several such (Mistral 7B v0.1 and v0.3) the one config.json's other values fit best;
    None when there is no such spec or no one fits best."""
    from llmdiff.spec import get_spec, model_names

    if model:
        full, tiny = get_spec(model), get_spec(model, tiny=True)
        return tiny if size_mismatches(tiny, config) < size_mismatches(full, config) else full
    family = family_of(config)
    if family is None:
        return None
    matches = [s for n in model_names() for s in (get_spec(n), get_spec(n, tiny=True))
               if s.family == family and not size_differences(config, s)]
    if len(matches) > 1:   # models of one shape (Mistral 7B v0.1 and v0.3): the one config.json describes
        score = {s: other_differences(config, s) for s in matches}
        matches = [s for s in matches if score[s] == min(score.values())]
    return matches[0] if len(matches) == 1 else None


def other_differences(config: dict, spec) -> int:
    """How many of what config.json says beyond the sizes differ from `spec`: vocabulary rows,
    RoPE per layer type, the sliding window."""
    have, want = rope_by_layer_type(config, spec.family), spec_rope(spec)
    return ((text_config(config).get("vocab_size") != spec_sizes(spec)["vocab_size"])
            + sum(not same_rope(have[kind], want[kind]) for kind in set(spec.layer_types))
            + (sliding_layout(config, spec.family).window != spec.sliding_window))


# --- streaming ------------------------------------------------------------------------------

def _row_bytes(rec: TensorRecord) -> tuple[int, int]:
    rows = rec.shape[0] if rec.shape else 1
    return rows, (rec.nbytes // rows if rows else 0)


def _read_blocks(directory: Path, records: list[TensorRecord], block_bytes: int, stop: threading.Event,
                 free: queue.Queue, ready: queue.Queue) -> None:
    """Reader thread: fill free buffers with blocks of whole rows, in file order."""
    try:
        by_file: dict[str, list[TensorRecord]] = {}
        for r in records:
            by_file.setdefault(r.file, []).append(r)
        for name in sorted(by_file):
            with os.fdopen(checkpoint_files.open_regular(directory / name, "weights file"), "rb", buffering=0) as f:
                if hasattr(os, "posix_fadvise"):
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                for rec in sorted(by_file[name], key=lambda r: r.start):
                    rows, row_bytes = _row_bytes(rec)
                    per = max(1, block_bytes // row_bytes) if row_bytes else rows
                    f.seek(rec.start)
                    for r0 in range(0, rows, per):
                        r1 = min(rows, r0 + per)
                        n = (r1 - r0) * row_bytes
                        buf = free.get()
                        if stop.is_set():
                            return
                        if n > buf.nbytes:       # a single row larger than a block
                            buf = np.empty(n, np.uint8)
                        view = memoryview(buf)[:n]
                        got = 0
                        while got < n:
                            k = f.readinto(view[got:])
                            if not k:
                                raise WeightsError(f"{name}: truncated while reading tensor {rec.name!r}")
                            got += k
                        ready.put((rec, r0, r1, buf, n))
        ready.put(None)
    except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
        ready.put(e)


def stream_blocks(directory: Path, records: list[TensorRecord], block_bytes: int = BLOCK_BYTES):
    """Yield (record, r0, r1, block) for every tensor in file order: `block` holds rows r0..r1
    as a read-only numpy array valid until the next item. Memory: READ_AHEAD blocks."""
    stop = threading.Event()
    free: queue.Queue = queue.Queue()
    ready: queue.Queue = queue.Queue()
    for _ in range(READ_AHEAD):
        free.put(np.empty(block_bytes, np.uint8))
    todo = [r for r in records if r.nbytes > 0]
    reader = threading.Thread(target=_read_blocks, args=(directory, todo, block_bytes, stop, free, ready),
                              name="llmdiff-audit-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            rec, r0, r1, buf, n = item
            dtype = safetensors_file._np_dtype(rec.dtype, rec.file, rec.name)
            block = buf[:n].view(dtype).reshape((r1 - r0, *rec.shape[1:]) if rec.shape else ())
            block.flags.writeable = False
            yield rec, r0, r1, block
            if buf.nbytes == block_bytes:
                free.put(buf)
            else:
                free.put(np.empty(block_bytes, np.uint8))
    finally:
        stop.set()
        free.put(np.empty(0, np.uint8))  # wake a reader waiting for a buffer


# Blocks are processed in pieces that fit in the CPU cache, into reused scratch buffers: a
# whole-block temporary would cost more in page faults than the arithmetic (measured: 1.8 GB/s
# whole-block vs 4.7 GB/s in 1 MB pieces for the NaN/Inf/zero scan of bfloat16).
_PIECE_BYTES = 1 << 20


class _Accumulator:
    """Statistics of one tensor, block by block."""

    def __init__(self, rec: TensorRecord, digest: bool = False):
        self.rec, self.stats = rec, TensorStats()
        rows, _ = _row_bytes(rec)
        self.hash = None
        if rec.is_token_table:
            self.stats.row_norms = np.empty(rows, np.float32)
            if digest:
                self.hash = hashlib.sha1()

    def _scan(self, r0: int, block: np.ndarray) -> None:
        """NaN, Inf, largest magnitude, first non-finite index, piece by piece."""
        rec, st = self.rec, self.stats
        utype, mask, exp = _FLOAT_BITS[rec.dtype]
        flat = block.reshape(-1).view(utype)
        step = max(1, _PIECE_BYTES // flat.itemsize)
        scratch = np.empty(min(step, flat.size), utype)
        top_all = 0
        width = int(np.prod(rec.shape[1:], dtype=np.int64)) if len(rec.shape) > 1 else 1
        for i in range(0, flat.size, step):
            piece = flat[i:i + step]
            mag = np.bitwise_and(piece, utype(mask), out=scratch[:piece.size])
            top = mag.max()
            if top >= exp:  # some exponent is all ones: NaN or Inf
                bad = mag >= exp
                nan = int(np.count_nonzero(mag > exp))
                st.nan += nan
                st.inf += int(np.count_nonzero(bad)) - nan
                if st.first_nonfinite is None:
                    at = r0 * width + i + int(np.flatnonzero(bad)[0])
                    st.first_nonfinite = [int(j) for j in np.unravel_index(at, rec.shape)] if rec.shape else []
                finite = mag[~bad]
                top = finite.max() if finite.size else 0
            top_all = max(top_all, int(top))
        if top_all:
            value = np.array([top_all], utype).view(block.dtype).astype(np.float64)[0]
            st.absmax = max(st.absmax, abs(float(value)))

    def _row_norms(self, r0: int, block: np.ndarray) -> None:
        rows = block.reshape(block.shape[0], -1)
        per = max(1, _PIECE_BYTES // max(1, rows.shape[1] * 4))
        for r in range(0, rows.shape[0], per):
            piece = rows[r:r + per]
            if self.rec.dtype == "BF16":  # bfloat16 is the top half of a float32: widen and shift
                wide = piece.view(np.uint16).astype(np.uint32)
                np.left_shift(wide, 16, out=wide)
                f = wide.view(np.float32)
            else:
                f = piece.astype(np.float32)
            self.stats.row_norms[r0 + r:r0 + r + piece.shape[0]] = np.sqrt(np.einsum("ij,ij->i", f, f))

    def add(self, r0: int, block: np.ndarray) -> None:
        st = self.stats
        if block.size == 0:
            return
        if self.rec.dtype in _FLOAT_BITS:
            self._scan(r0, block)
        else:  # integers, bool: finite by construction
            st.absmax = max(st.absmax, float(np.abs(block.astype(np.float64)).max()))
        if st.row_norms is not None:
            self._row_norms(r0, block)
        if self.hash is not None:
            self.hash.update(memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8)))

    def done(self) -> TensorStats:
        if self.hash is not None:
            self.stats.digest = self.hash.hexdigest()
        return self.stats


def stream_stats(ctx: AuditContext, checks: list[Check], block_bytes: int = BLOCK_BYTES,
                 progress=None) -> dict:
    """One pass over every tensor: fill each record's `stats`, call checks' `visit_block`."""
    records = sorted(ctx.tensors.values(), key=lambda r: (r.file, r.start))
    total = sum(r.nbytes for r in records)
    visitors = [c for c in checks if callable(getattr(c, "visit_block", None))]
    accs: dict[str, _Accumulator] = {}
    # Digests only serve to compare the two token tables bitwise: skip them unless both exist.
    digest = sum(r.is_token_table for r in records) > 1
    done_bytes, t0 = 0, time.perf_counter()
    for rec in records:
        if rec.nbytes == 0:
            rec.stats = TensorStats()
    if progress:
        progress(0, total)
    for rec, r0, r1, block in stream_blocks(Path(ctx.path), records, block_bytes):
        acc = accs.get(rec.name) or accs.setdefault(rec.name, _Accumulator(rec, digest))
        acc.add(r0, block)
        for check in visitors:
            check.visit_block(ctx, rec, (r0, r1), block)
        if r1 == (rec.shape[0] if rec.shape else 1):
            rec.stats = accs.pop(rec.name).done()
        done_bytes += block.nbytes
        if progress:
            progress(done_bytes, total)
    seconds = time.perf_counter() - t0
    return {"tensors": len(records), "bytes": total, "seconds": round(seconds, 3),
            "mb_per_s": round(total / 1e6 / seconds, 1) if seconds > 0 else None}


# --- the audit ------------------------------------------------------------------------------

def audit_checks(select=(), ignore=()) -> tuple[list[Check], list]:
    from llmdiff import registry

    found, broken = registry.load_checks()
    found = [c for c in found if c.target == "checkpoint"]
    return registry.select(found, select, ignore), broken


def load_context(path, model: str | None = None) -> AuditContext:
    """Everything but the tensor statistics: JSON files, headers, file problems, spec."""
    directory = Path(path)
    if not directory.exists():
        raise UsageError(f"checkpoint path {directory} does not exist")
    if not directory.is_dir():
        raise UsageError(f"{directory} is not a directory (expected an HF checkpoint directory)")
    if not os.path.lexists(directory / "config.json"):
        raise WeightsError(f"{directory / 'config.json'} is missing; an HF checkpoint directory has a config.json")
    config = checkpoint_files.read_json(directory / "config.json", what="config")
    check_config(config, str(directory / "config.json"))
    generation_config = _optional_json(directory / "generation_config.json")
    if generation_config is not None:
        check_token_ids(generation_config, str(directory / "generation_config.json"))
    files, records, file_errors = _discover(directory)
    if os.path.lexists(directory / "chat_template.jinja"):
        checkpoint_files.open_regular_close(directory / "chat_template.jinja", "chat template")
        files["chat_template"] = ["chat_template.jinja"]
    spec = resolve_spec(config, model)
    family = spec.family if spec else family_of(config)
    return AuditContext(
        path=directory, spec=spec, config=config, generation_config=generation_config,
        tokenizer_config=_optional_json(directory / "tokenizer_config.json"),
        tokenizer=_optional_json(directory / "tokenizer.json"),
        special_tokens_map=_optional_json(directory / "special_tokens_map.json"),
        files=files, file_errors=file_errors, tensors=records, family=family)


def audit(path, model: str | None = None, *, select=(), ignore=(), progress=None,
          block_bytes: int = BLOCK_BYTES) -> AuditResult:
    """Audit the checkpoint directory `path`; see the module docstring.

    model: a registered model name to compare the config with (default: detected).
    select, ignore: checks by code, name or prefix (`LD7`), among the audit checks.
    progress: optional callable(bytes_done, bytes_total) during the streaming pass.
    """
    t0 = time.perf_counter()
    checks, broken = audit_checks(select, ignore)
    ctx = load_context(path, model)
    stream = stream_stats(ctx, checks, block_bytes, progress)
    findings: list[Finding] = []
    for check in checks:
        if ctx.family is not None and ctx.family not in check.families:
            continue
        findings.extend(check.run(ctx))
    findings.sort(key=lambda f: (f.code, f.where))
    dtypes: dict[str, int] = {}
    for r in ctx.tensors.values():
        dtypes[r.dtype] = dtypes.get(r.dtype, 0) + 1
    report = {
        "llmdiff_version": __version__, "command": "audit", "path": str(ctx.path),
        "model": ctx.spec.name if ctx.spec else None,
        "spec": ctx.spec.to_dict() if ctx.spec else None, "family": ctx.family,
        "files": ctx.files, "tensors": {"count": len(ctx.tensors), "dtypes": dtypes},
        "stream": stream, "seconds": round(time.perf_counter() - t0, 3),
        "checks": {"selected": [c.code for c in checks], "broken": [str(b) for b in broken]},
        "findings": [f.to_dict() for f in findings],
        "exit_code": 1 if findings else 0,
    }
    return AuditResult(report, ctx)


__all__ = ["audit", "AuditResult", "TensorRecord", "TensorStats", "load_context", "stream_stats"]
