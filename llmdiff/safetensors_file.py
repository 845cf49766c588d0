"""Read and write .safetensors files with numpy, validating as we go.

Why not `safetensors.numpy`: it cannot hold bfloat16 (the dtype real checkpoints are in)
and its errors do not say which file or tensor is broken. The format is small: an 8-byte
little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
raw bytes. Tensors are memory-mapped, so reading one tensor of a 17 GB file costs the size
of that tensor. Nothing here ever unpickles.
"""

from __future__ import annotations

import json
import math
import os
import struct

import numpy as np

from llmdiff.checkpoint_files import open_regular
from llmdiff.errors import WeightsError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


def _np_dtype(code: str, path, name):
    kind = _DTYPES.get(code)
    if kind is None:
        raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
    if kind == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(kind)


def _code(dtype: np.dtype) -> str:
    if dtype.name == "bfloat16":
        return "BF16"
    for code, kind in _DTYPES.items():
        if kind != "bfloat16" and np.dtype(kind) == dtype:
            return code
    raise WeightsError(f"cannot store dtype {dtype} in safetensors")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)   # JSON true is not a size


def _entry(path, name, info) -> tuple[np.dtype, list[int], int, int]:
    """dtype, shape and offsets of one header entry, of the JSON types the safetensors library
    requires (it refuses "16" for 16, negative or fractional sizes, and sizes that overflow)."""
    if not isinstance(info, dict):
        raise WeightsError(f"{path}: corrupt header entry for tensor {name!r} (not a JSON object)")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str):
        raise WeightsError(f"{path}: tensor {name!r} has dtype {code!r}; expected a string such as 'BF16'")
    dtype = _np_dtype(code, path, name)
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise WeightsError(f"{path}: tensor {name!r} has shape {shape!r}; expected a list of"
                           " non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise WeightsError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; expected two"
                           " non-negative integers")
    count = 1
    for d in shape:  # as the safetensors library: every partial product must fit
        count *= d
        if count * dtype.itemsize >= 2**63:
            raise WeightsError(f"{path}: tensor {name!r} has shape {shape}: its size overflows")
    return dtype, shape, offsets[0], offsets[1]


def read_header(path) -> tuple[dict, int]:
    """The validated header {name: {dtype, shape, data_offsets}} and where the data starts."""
    path = os.fspath(path)
    fd = open_regular(path, "safetensors file")   # a FIFO or device is refused, never waited on
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(_MAX_HEADER, size - 8):
                raise WeightsError(f"{path}: corrupt safetensors header (claims {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WeightsError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ is not an object of strings)")
    start = 8 + n
    for name, info in header.items():
        dtype, shape, lo, hi = _entry(path, name, info)
        if hi - lo != dtype.itemsize * math.prod(shape):
            raise WeightsError(f"{path}: tensor {name!r} offsets {lo}..{hi} do not match shape {shape}")
        if start + hi > size:
            raise WeightsError(
                f"{path}: truncated: tensor {name!r} ends at byte {start + hi} but the file has {size};"
                " re-download or re-save the checkpoint")
    return header, start


def _refuse_overlaps(path, header: dict) -> None:
    """Two tensors sharing bytes: `read_header` lets it pass (the audit reports it with the
    file's other layout problems); loading would alias the two arrays."""
    end, previous = 0, None
    for lo, hi, name in sorted((*info["data_offsets"], name) for name, info in header.items()):
        if hi == lo:
            continue
        if lo < end:
            raise WeightsError(f"{path}: tensor {name!r} overlaps tensor {previous!r} (bytes {lo}..{end});"
                               " re-download or re-save the file")
        end, previous = hi, name


def mapped(path):
    """(header, data start, mapping): the validated header (`read_header`, no two tensors
    sharing bytes) and a read-only mapping of the whole file, for `view`. Mapping costs no
    memory; the pages of a tensor are read when its values are."""
    import mmap

    header, start = read_header(path)
    _refuse_overlaps(path, header)
    with os.fdopen(open_regular(path, "safetensors file"), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        end = start + max((info["data_offsets"][1] for info in header.values()), default=0)
        if size < end:   # changed since the header was read
            raise WeightsError(f"{path}: truncated: its tensors end at byte {end} but the file has {size}")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    return header, start, mapped


def view(path, header: dict, start: int, mapping, name: str) -> np.ndarray:
    """Tensor `name` of a `mapped` file: a read-only numpy view of the mapping."""
    if name not in header:
        raise WeightsError(f"{path}: no tensor {name!r}")
    info = header[name]
    dtype = _np_dtype(info["dtype"], path, name)
    lo, hi = info["data_offsets"]
    shape = tuple(info["shape"])
    if hi == lo:
        return np.zeros(shape, dtype)
    return np.frombuffer(mapping, dtype, (hi - lo) // dtype.itemsize, start + lo).reshape(shape)


def load(path, names=None) -> dict[str, np.ndarray]:
    """Tensors of `path` (all, or `names`) as read-only memory-mapped numpy arrays (views of one
    mapping of the file: a `np.memmap` per tensor costs 20x more, and captures have hundreds)."""
    header, start, mapping = mapped(path)
    return {name: view(path, header, start, mapping, name) for name in (header if names is None else names)}


def save(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (sorted by name, so the same tensors give the same bytes)."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        header[name] = {"dtype": _code(a.dtype), "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
    os.replace(tmp, path)
