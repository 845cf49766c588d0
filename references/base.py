"""What an implementation adapter provides. numpy and the standard library only.

An adapter is run inside a worker process (`llmdiff/worker.py`). The base class does the
bookkeeping; a subclass implements `versions`, `load` and `run`:

- `load(dtype)`: build the model from the run's weights at `dtype` ("float32", "bfloat16",
  "float64" where supported), the way a user of that implementation would.
- `run(tokens)`: run one prompt (a list of ids, batch 1) and return every canonical point it
  can capture as numpy arrays of layout (batch, seq, ...), in any float dtype.

Third-party adapters register under the entry-point group `llmdiff.references`, or are
named on the command line as `module:Class`.
"""

from __future__ import annotations

import numpy as np


class Reference:
    name = "reference"
    dtypes = ("float32", "bfloat16")

    def __init__(self, job: dict):
        self.job = job
        self.options = job.get("options", {})
        selected = job.get("points")  # None: every point
        # float64 runs that measure a noise floor at another dtype: sketched values are rounded
        # to it first (set by the worker; `diff.noise_floors` rounds whole captures itself).
        self.round_to: str | None = None
        self._wanted = None if selected is None else frozenset(selected)

    @property
    def sketching(self) -> bool:
        """Whether points leave the device sketched (`llmdiff/sketch.py`), not whole."""
        return self.job.get("capture") == "sketch"

    def projection(self, n: int) -> np.ndarray:
        """The sketch's projection for vectors of n values (numpy, cached)."""
        from llmdiff import sketch

        cache = self.__dict__.setdefault("_projections", {})
        if n not in cache:
            cache[n] = sketch.projection(n)
        return cache[n]

    def streams(self, dtype: str, device_bytes: int | None) -> bool:
        """Whether this run goes one block at a time: asked for, or ("auto") when the weights at
        `dtype` would take more than half of the device (`device_bytes`, None on the host)."""
        stream = self.options.get("stream", "auto")
        if stream != "auto":
            return bool(stream)
        if not device_bytes:
            return False
        from llmdiff.convert import canonical_shapes
        from llmdiff.spec import ModelSpec

        spec = ModelSpec.from_dict(self.job["spec"])
        count = sum(int(np.prod(s)) for s in canonical_shapes(spec).values())
        return count * np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize > device_bytes / 2

    def wants(self, point: str) -> bool:
        """Whether the run asked for `point` (`--points`, `--layers`): skip the copy when not."""
        return self._wanted is None or point in self._wanted

    def versions(self) -> dict[str, str]:
        return {}

    def load(self, dtype: str, constants_dtype: str | None = None) -> None:
        raise NotImplementedError

    def run(self, tokens: list[int]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    # Optional, for `bench/`: run_bare(tokens) runs the forward with no capture at all and
    # returns when the device is done; peak_device_bytes() is the worker's peak device memory.
