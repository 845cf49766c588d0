"""Weight quantisation as llama.cpp's converter writes it (`--quant q8_0`), for the oracle.

`convert_hf_to_gguf.py --outtype q8_0` (llama-cpp-python 0.3.36's vendored llama.cpp,
conversion/base.py `prepare_tensors`) writes every tensor of two or more dimensions whose name
ends in `.weight` and is not a norm as Q8_0, through `gguf.quants.quantize` (gguf-py/gguf/quants.py
`Q8_0.quantize_blocks`, bit-exact with ggml's `quantize_row_q8_0_ref`): blocks of 32 along the
tensor's last axis (an HF Linear's input features, the embedding's hidden axis), scale
d = max|x| / 127 stored as float16, values roundf(x / d) (half away from zero) as int8, all in
float32. A tensor whose last axis is not a multiple of 32 falls back to F16. Norms, biases and
other 1-D tensors stay F32. In llmdiff's canonical layout (`convert.canonical_shapes`) the HF
last axis is `REDUCTION_AXES`' axes (the matmul's reduction axes). Numpy only.
"""

from __future__ import annotations

import re

import numpy as np

from llmdiff.job import QUANT_TYPES

QK8_0 = 32

# canonical name (without `L{i}.`) -> the axes that are the HF tensor's last (input) axis
REDUCTION_AXES = {"embed": (1,), "lm_head": (1,), "q": (1,), "k": (1,), "v": (1,), "o": (0, 1),
                  "gate": (0,), "up": (0,), "down": (0,)}


def q8_0_round_trip_rows(a: np.ndarray) -> np.ndarray:
    """Rows of `a` (last axis, a multiple of 32) quantised to Q8_0 and dequantised, float32, as
    gguf.quants.quantize/dequantize do."""
    x = np.ascontiguousarray(a, np.float32)
    b = x.reshape(-1, QK8_0)
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    v = b * inv
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))        # roundf: half away from zero
    return (q.astype(np.int8).astype(np.float32) * d.astype(np.float16).astype(np.float32)).reshape(x.shape)


def round_trip(name: str, a: np.ndarray, quant: str) -> np.ndarray:
    """Canonical tensor `name` as a llama.cpp `quant` GGUF holds it, back in float32: unchanged
    when the converter keeps it F32 (norms, biases, 1-D)."""
    if quant not in QUANT_TYPES:
        raise ValueError(f"unknown quantisation {quant!r}; choose from {', '.join(QUANT_TYPES)}")
    axes = REDUCTION_AXES.get(re.sub(r"^L\d+\.", "", name))
    if axes is None:
        return a
    rest = [i for i in range(a.ndim) if i not in axes]
    moved = np.transpose(a, rest + list(axes))
    flat = moved.reshape(*moved.shape[:len(rest)], -1)
    if flat.shape[-1] % QK8_0:
        out = flat.astype(np.float16).astype(np.float32)            # the converter's F16 fallback
    else:
        out = q8_0_round_trip_rows(flat)
    return np.transpose(out.reshape(moved.shape), np.argsort(rest + list(axes))).astype(np.float32)
