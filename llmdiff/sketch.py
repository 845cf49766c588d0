"""Sketched captures: what a full-size diff needs, computed where the activations are.

A full-size capture does not leave the device whole (gemma-7b at 512 tokens: 6 GB per float32
run, 12 GB per float64 one). Instead each position's vector x (n values) becomes n2 = |x|^2,
exact, and a random projection s = x R (R: n x K, entries +-1/sqrt(K), the same for every
implementation), in float64 on the device. Then for a candidate c and a reference r

    |s_c - s_r|^2 = |(c - r) R|^2,  whose expectation is |c - r|^2

(Johnson-Lindenstrauss): relative L2 distances are estimated with a relative standard error
of about sqrt(2 / (K * positions that differ)), under 1% over a whole prompt, 18% if a single
position differs; the reference norm is exact. Max/mean absolute differences need every
value and are not reported. The projection and norm are computed in float64, which keeps their
own rounding (~1e-16) far below the smallest floor llmdiff judges (~1e-9), except for 16-bit
values (`arithmetic`): those are sketched in float32, whose rounding (at most 7e-7 relative at
256000 values) is under 1% of the smallest floor a bfloat16 or float16 point is judged by
(0.02 x 2^-8, `diff.MIN_FLOOR`), and a float32 product is several times faster than a float64
one on a GPU (bench/RESULTS.md); their products take the 16-bit values as they are (R's +-1/8 is
exact in 16 bits) and accumulate in float32, and their sketches leave the device in float32
(`metrics` compares them in float32, summed pairwise: float64's rel_l2 to 5e-8). The logits are sketched too, and each position's
`TOP` largest logits (values and ids) come along: top-1 and top-k agreement stay exact; the KL
divergence needs both implementations' every logit and is not reported.

Gradients (`compare --grad`, `llmdiff/grad.py`) are sketched the same way: a point's gradient
`grad:POINT` per position like the point itself; a weight's gradient `grad:w:NAME` (and the
Trainer's, the un-checkpointed ones) per row: a canonical tensor of shape (a, b, ...) is an
a x (b * ...) matrix whose rows (the first axis: embedding rows, attention heads, input or
hidden features) are sketched like positions, (a, K + 1). Rows play the role of positions in
`metrics`. 1-D tensors (norm scales, a few thousand values) leave whole: their metrics stay
exact. A weight's gradient is summed over the prompts before it is sketched (a norm of a sum is
no sum of norms), so an adapter sketches it once for the whole batch.

Arrays here are numpy; workers apply `project` with their framework's ops.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

K = 64
SUFFIX = ":sketch"   # key of a sketched point in a captures file: "L3.q:sketch", shape (B, T, K + 1)
TOP = 8              # "logits:top_values" (B, T, TOP) float32 and "logits:top_ids" (B, T, TOP) int
_SEED = 0x5EED


def is_top(name: str) -> bool:
    """Whether a captures file's key is the logits' top-k (`TOP`), not a point."""
    return name.startswith("logits:")


def projection(n: int, k: int = K) -> np.ndarray:
    """R (n, k), float64 entries +-1/sqrt(k) from an integer hash: identical everywhere."""
    from llmdiff.weights import _hash32

    bits = _hash32(_hash32(np.arange(n * k, dtype=np.int64)) ^ _SEED) & 1
    return ((bits * 2 - 1) / math.sqrt(k)).astype(np.float64).reshape(n, k)


def arithmetic(values_dtype: str) -> str:
    """The dtype a vector of `values_dtype` values is sketched in: float32 for 16-bit values,
    float64 otherwise (the module's doc says why)."""
    return "float32" if values_dtype in ("bfloat16", "float16") else "float64"


class Sketch:
    """A sketched point: data (B, T, K + 1), columns [s_1..s_K, |x|^2] per position (a
    sketched weight gradient: (rows, K + 1), per row): float64, or float32 as 16-bit values'
    sketches leave the device, kept so (converting a gemma-7b capture to float64 was 45 ms a
    run on this project's CPU; `metrics_many` compares them as they are)."""

    def __init__(self, data: np.ndarray):
        data = np.asarray(data)
        self.data = data if data.dtype in (np.float32, np.float64) else data.astype(np.float64)

    @property
    def shape(self):
        return self.data.shape

    @property
    def ndim(self):
        return self.data.ndim


def sketches_rows(shape) -> bool:
    """Whether a weight gradient of this shape is sketched per row (else it leaves whole)."""
    return len(shape) >= 2


def project(x: np.ndarray) -> np.ndarray:
    """x (..., n) -> (..., K + 1) float64 [x R, |x|^2]: each vector's sketch (numpy; workers
    with a device do the same with their own ops)."""
    x = np.asarray(x, np.float64)
    return np.concatenate([x @ projection(x.shape[-1]), (x * x).sum(-1, keepdims=True)], axis=-1)


def rows(x: np.ndarray) -> np.ndarray:
    """A weight gradient's sketch: x (a, b, ...) as an a x (b * ...) matrix, (a, K + 1)."""
    return project(np.asarray(x).reshape(x.shape[0], -1))


def load(tensors: dict) -> dict:
    """Captures as read from a file: sketched points wrapped in `Sketch`, under their own name."""
    return {k[: -len(SUFFIX)] if k.endswith(SUFFIX) else k: Sketch(v) if k.endswith(SUFFIX) else v
            for k, v in tensors.items()}


def top_ids(values: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """The k largest per position, ties to the lower id (numpy's argmax rule), whatever order
    the framework's top-k gave them in."""
    order = np.lexsort((ids, -values.astype(np.float64)), axis=-1)
    return np.take_along_axis(ids, order, axis=-1)[..., :k]


def top_metrics(cand: dict, ref: dict, k: int) -> dict:
    """Top-1 agreement and mean top-k overlap from each side's `TOP` largest logits."""
    c = top_ids(cand["logits:top_values"], cand["logits:top_ids"], k).reshape(-1, k)
    r = top_ids(ref["logits:top_values"], ref["logits:top_ids"], k).reshape(-1, k)
    overlap = float(np.mean((c[:, :, None] == r[:, None, :]).any(-1).sum(-1) / k))   # ids are distinct in a row
    return {"kl_mean": None, "top1_agreement": float(np.mean(c[:, 0] == r[:, 0])), "topk_overlap": overlap, "k": k}


def metrics(cand: Sketch, ref: Sketch) -> dict:
    """`diff.point_metrics` from sketches: rel_l2 and cosine estimated, no absolute errors."""
    return metrics_many([(cand, ref)])[0]


def metrics_many(pairs: list) -> list[dict]:
    """`metrics` of (cand, ref) pairs of sketches: a run's points at once. Pairs of one shape
    and dtypes lying one after another in their files (a captures file's tensors are sorted by
    name, and its sketched points all have one shape) are read as one (points, ...) array per
    side, without a copy (`_stacked`), and compared in blocks of points, on every core (numpy
    releases the GIL in its loops): the parent's diff of a gemma-7b run was one pass of about
    50 us a point over 339 points; it is bound by the 90 MB a run pair reads."""
    out: list = [None] * len(pairs)
    groups: dict = {}
    for i, (c, r) in enumerate(pairs):
        groups.setdefault((c.shape, c.data.dtype, r.shape, r.data.dtype), []).append(i)
    for idx in groups.values():
        where = {i: _address(pairs[i][0].data) for i in idx}
        idx.sort(key=where.__getitem__)   # a file's order (by name), not the forward's
        C = _stacked([pairs[i][0].data for i in idx], [where[i] for i in idx])
        R = _stacked([pairs[i][1].data for i in idx])
        if C is not None and R is not None:
            for i, m in zip(idx, _from_sums(*_sums(C, R), C)):
                out[i] = m
            continue
        for i in idx:   # not side by side: each pair on its own
            c = pairs[i][0].data[None]
            out[i] = _from_sums(*_sums(c, pairs[i][1].data[None]), c)[0]
    return out


_THREAD_BYTES = 2 << 20   # bytes of points at least per thread: fewer points are not worth a thread


def _cores() -> int:
    """How many blocks `_sums` splits a run's points into at most (tests make it small)."""
    return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="llmdiff-sketch")


def _sums(C: np.ndarray, R: np.ndarray):
    """Per point (axis 0): |C - R|^2 over the sketch columns, |C|^2 and |R|^2 (norm columns).
    In the sketches' own dtype: two float32 values' difference is exact within a factor 2 of
    each other, else rounded once; the squares are rounded once and summed pairwise (numpy): on
    a compare's float32 sketches (339 points of 512 positions) rel_l2 is float64's to 5e-8
    relative, against the sketch's own 1%. The points are split evenly over the cores, one
    block a thread: numpy releases the GIL in its loops, but each call takes it back, and on the
    H200's 16-core host steps of a few points each (14 numpy calls a thread) took 16.4 ms a
    gemma-7b run where one block a thread (6 calls) takes 5.1-5.6 ms, and 3.0-3.8 ms with the
    norms' column cast first (bench/RESULTS.md)."""
    P = C.shape[0]
    d2, c2, r2 = np.empty(P), np.empty(P), np.empty(P)
    threads = max(1, min(P, _cores(), C.nbytes // _THREAD_BYTES))
    bounds = [P * k // threads for k in range(threads + 1)]

    def block(k):
        lo, hi = bounds[k], bounds[k + 1]
        c, r = C[lo:hi], R[lo:hi]
        # The norms' column as float64 first: a float64 sum of the strided float32 column casts
        # in small buffers, on the H200's host slower than the rest together (the same sums)
        c2[lo:hi], r2[lo:hi] = (x[..., -1].astype(np.float64).reshape(hi - lo, -1).sum(axis=1) for x in (c, r))
        d = np.subtract(c, r)
        d[..., -1] = 0   # the norms' column
        d = d.reshape(hi - lo, -1)
        np.square(d, out=d)
        d2[lo:hi] = d.sum(axis=1)   # numpy's pairwise summation

    with np.errstate(invalid="ignore", over="ignore"):   # non-finite values are reported by the caller
        if threads == 1:
            block(0)
        else:
            list(_pool().map(block, range(threads)))
        for j in np.nonzero(~np.isfinite(d2))[0]:   # a float32 square over 3.4e38: float64's sum, as before
            d = np.subtract(C[j], R[j], dtype=np.float64)
            d[..., -1] = 0
            d2[j] = np.square(d).sum()
    return d2, c2, r2


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _stacked(arrays: list, addresses: list | None = None) -> np.ndarray | None:
    """arrays of one shape and dtype as one read-only (len, ...) array without a copy, where
    they lie one after another in one buffer (a captures file's mapping); else None."""
    first = arrays[0]
    n = first.nbytes
    addresses = np.asarray(addresses or [_address(a) for a in arrays], np.int64)
    # The first and the last in one buffer and the rest at the addresses between, one after
    # another: the whole span is that buffer's, and each array is its row there.
    if n == 0 or _root(first) is not _root(arrays[-1]) or np.any(np.diff(addresses) != n) \
            or not all(a.flags.c_contiguous and a.shape == first.shape and a.dtype == first.dtype for a in arrays):
        return None
    return np.lib.stride_tricks.as_strided(first, (len(arrays), *first.shape), (n, *first.strides),
                                           writeable=False)


def _root(a: np.ndarray):
    """The object that owns a's memory (np.frombuffer over a mapping: the mapping itself)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    root = a.base if a.base is not None else a
    return root.obj if isinstance(root, memoryview) else root


def _from_sums(d2: np.ndarray, c2: np.ndarray, r2: np.ndarray, cand: np.ndarray) -> list[dict]:
    """Each point's metrics from its sums (`_sums`); `cand`: the points' candidate sketches."""
    with np.errstate(invalid="ignore", divide="ignore"):
        ref_norm, cand_norm = np.sqrt(np.maximum(r2, 0.0)), np.sqrt(np.maximum(c2, 0.0))
        rel_l2 = np.where(ref_norm > 0, np.sqrt(d2) / np.where(ref_norm > 0, ref_norm, 1.0),
                          np.where(d2 == 0, 0.0, np.inf))
        # |c|^2 + |r|^2 - |c - r|^2 = 2 c.r, norms exact
        both = (ref_norm > 0) & (cand_norm > 0)
        cos = (c2 + r2 - d2) / np.where(both, 2 * cand_norm * ref_norm, 1.0)
        cos = np.where(np.isnan(cos), 1.0, np.clip(cos, -1.0, 1.0))   # Python's min(1.0, nan), as before
        cosine = np.where(both, cos, np.where(d2 == 0, 1.0, 0.0))
    # A non-finite candidate value makes d2 or c2 non-finite (inf - inf is nan too).
    finite = np.isfinite(d2) & np.isfinite(c2)
    out = []
    for j in range(len(d2)):
        ok = bool(finite[j]) or bool(np.isfinite(cand[j]).all())
        out.append({"max_abs": None, "mean_abs": None, "rel_l2": float(rel_l2[j]) if ok else float("nan"),
                    "cosine": float(cosine[j]), "finite": ok, "estimated": True})
    return out
