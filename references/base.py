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
        self._wanted = None if selected is None else frozenset(selected)

    def wants(self, point: str) -> bool:
        """Whether the run asked for `point` (`--points`, `--layers`): skip the copy when not."""
        return self._wanted is None or point in self._wanted

    def versions(self) -> dict[str, str]:
        return {}

    def load(self, dtype: str, constants_dtype: str | None = None) -> None:
        raise NotImplementedError

    def run(self, tokens: list[int]) -> dict[str, np.ndarray]:
        raise NotImplementedError
