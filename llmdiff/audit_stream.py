"""The audit's one streaming pass over a checkpoint's tensors, and what it learns about each.

Every tensor is read once, in file order, in blocks of whole rows (`BLOCK_BYTES`) that a
read-ahead thread fills into a few reused buffers (`READ_AHEAD`), so memory stays at a few
blocks whatever the checkpoint's size and reading overlaps computing (`stream_blocks`).
`stream_stats` fills each `TensorRecord`'s `TensorStats`: counts of NaN and Inf, the largest
magnitude, the first non-finite element, per-row L2 norms of token tables (embeddings,
`lm_head`) and their digests, and hands each block to the checks that define `visit_block`.
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

from llmdiff import checkpoint_files, safetensors_file
from llmdiff.check import AuditContext, Check
from llmdiff.errors import WeightsError

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
    """One tensor of the checkpoint, where its safetensors header puts it; `stats` once streamed."""

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


__all__ = ["BLOCK_BYTES", "TensorRecord", "TensorStats", "stream_blocks", "stream_stats"]
