"""What an implementation adapter provides. numpy and the standard library only.

An adapter runs inside a worker process (`llmdiff/worker.py`), one instance per worker, given
the worker's `Job` (`llmdiff/job.py`). For each run the worker calls `load(request)` then
`run(tokens)` once per prompt. A subclass implements:

- `versions()`: the versions of what it runs on (shown in the report).
- `load(request)`: build the model from the job's weights (`self.job.weights`) at
  `request.dtype` ("float32", "bfloat16"; "float64" and "autocast-bfloat16", float32 weights
  with bfloat16 matrix products, where `dtypes` has them), the way a user of
  that implementation would. `self.options` is the run's options when it is called.
- `run(tokens)`: run one prompt (a list of ids, batch 1) and return every canonical point it
  can capture (`llmdiff.spec.capture_points`) as numpy arrays of layout (batch, seq, ...), in
  any float dtype. Points the run did not ask for (`wants`) may be left out.

Optional capabilities, each with a default here:
- `describe()`: what the implementation resolved (a dict in the report; static checks read it).
- `run_bare(tokens)`, with `has_bare_forward = True`: the forward with no capture, for `bench/`.
- `run_grad(tokens)`: `run`'s points plus the causal-LM loss and its gradients with respect to
  every point and every canonical weight (`compare --grad`; names in `llmdiff/grad.py`); and
  `finish_grad()` after the last prompt, for what is given once (sketched weight gradients).
- `peak_device_bytes()`: the peak device memory of the last run (GPU workers), or None.
- `makes_weights = True`: it can make seeded random weights on its own device
  (`llmdiff.weights.generate_*`, used for full-size models).
- `package`: the distribution whose release names a run under another interpreter
  (`hf@/venv/bin/python` is labelled `hf[transformers 4.38.1]` in the reports).
- `MissingExtra`: raise it from `__init__` or `load` when the implementation's framework is not
  installed; its message (how to install it) is the whole error the user sees.

Third-party adapters register under the entry-point group `llmdiff.references`, or are
named on the command line as `module:Class`. docs/design.md has the whole contract.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np


class MissingExtra(ImportError):
    """The implementation's framework is not installed under the worker's interpreter."""


def install_main(venv: str, description: str, install, options=()) -> None:
    """`python -m llmdiff.references.MODULE install [--venvs DIR] [-q] [OPTIONS]`, the command
    line of every extra with a virtualenv of its own: `install(venvs_root, quiet, **options)`
    builds it and returns its interpreter. `options`: (flag, help) pairs; a flag with `=`
    (`--wheels=DIR`) takes a value, one without is a switch."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog=f"python -m {sys.modules['__main__'].__spec__.name}",
                                     description=description)
    parser.add_argument("command", choices=["install"])
    parser.add_argument("--venvs", help="where llmdiff keeps implementation venvs (default: $LLMDIFF_VENVS"
                                        " or ~/.cache/llmdiff/venvs)")
    for flag, text in options:
        name, _, value = flag.partition("=")
        parser.add_argument(name, help=text, **({"metavar": value} if value else {"action": "store_true"}))
    parser.add_argument("-q", "--quiet", action="store_true")
    a = vars(parser.parse_args())
    a.pop("command")
    print(f"{venv}: {install(a.pop('venvs'), a.pop('quiet'), **a)}")


class Reference:
    name = "reference"
    dtypes = ("float32", "bfloat16")
    has_bare_forward = False
    makes_weights = False
    package = ""

    def __init__(self, job):
        from llmdiff.spec import ModelSpec

        self.job = job                                   # llmdiff.job.Job
        self.spec = ModelSpec.from_dict(job.spec)
        self.options = job.options                       # the current run's, once `load` is called
        self.request = None                              # the current RunRequest
        self._wanted = None if job.points is None else frozenset(job.points)

    def begin(self, request) -> None:
        """Called by the worker before `load`: the run this adapter is about to do."""
        self.request, self.options = request, request.options

    @property
    def round_to(self) -> str | None:
        """float64 runs that measure a noise floor at another dtype: sketched values are rounded
        to it first (`diff.noise_floors` rounds whole captures itself)."""
        from llmdiff.job import params_dtype

        r = self.request
        return params_dtype(r.constants_dtype) if r is not None and r.dtype == "float64" and r.constants_dtype else None

    @property
    def sketching(self) -> bool:
        """Whether points leave the device sketched (`llmdiff/sketch.py`), not whole."""
        return self.job.capture == "sketch"

    def projection(self, n: int) -> np.ndarray:
        """The sketch's projection for vectors of n values (numpy, cached)."""
        from llmdiff import sketch

        cache = self.__dict__.setdefault("_projections", {})
        if n not in cache:
            cache[n] = sketch.projection(n)
        return cache[n]

    def weight_bytes(self, dtype: str) -> int:
        """The bytes of the model's weights at `dtype`."""
        from llmdiff.convert import canonical_shapes

        count = sum(int(np.prod(s)) for s in canonical_shapes(self.spec).values())
        from llmdiff.job import params_dtype

        dtype = params_dtype(dtype)
        return count * np.dtype(dtype if dtype != "bfloat16" else "float16").itemsize

    def placement(self, dtype: str, device_bytes: list[int]) -> tuple[int, bool]:
        """How a run is laid out: (devices, streamed). `device_bytes`: the memory of each visible
        device (0 where it is not known: the host's).

        `--devices N` asks for N; automatic (0): one device when the weights take at most half of
        it, else the fewest devices whose memory together holds them with a quarter to spare (all
        of them when none do). `--stream` asked for, or ("auto") when the weights would take more
        than half of the one device chosen, or three quarters of several: then one block at a
        time with only its weights on the device."""
        weights = self.weight_bytes(dtype)
        count = self.options.devices
        if count > len(device_bytes):
            raise RuntimeError(f"--devices {count}: {len(device_bytes)} device(s) visible here")
        known = bool(device_bytes) and all(device_bytes)
        if count == 0:
            count = 1
            if known and weights > device_bytes[0] / 2:
                count = next((k for k in range(2, len(device_bytes) + 1) if weights <= 0.75 * sum(device_bytes[:k])),
                             len(device_bytes))
        stream = self.options.stream
        if stream == "auto":
            stream = known and weights > sum(device_bytes[:count]) * (0.5 if count == 1 else 0.75)
        return count, bool(stream)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Time a phase of a run (its seconds summed over calls) and the device's peak memory so
        far at its end: the worker puts `phases` in the run's timings (`bench/`)."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            row = self.__dict__.setdefault("phases", {}).setdefault(name, {"s": 0.0, "calls": 0})
            row["s"] = round(row["s"] + time.perf_counter() - t, 3)
            row["calls"] += 1
            peak = self.peak_device_bytes()
            if isinstance(peak, (int, float)):
                row["peak_so_far_gb"] = round(peak / 1e9, 2)

    def sync(self) -> None:
        """Wait for the device's queued work (timing a phase); GPU adapters override it."""

    def wants(self, point: str) -> bool:
        """Whether the run asked for `point` (`--points`, `--layers`): skip the copy when not."""
        return self._wanted is None or point in self._wanted

    def versions(self) -> dict[str, str]:
        return {}

    def load(self, request) -> None:
        raise NotImplementedError

    def run(self, tokens: list[int]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def run_grad(self, tokens: list[int]) -> dict[str, np.ndarray]:
        """`run`'s points plus the causal-LM loss and its gradients (`llmdiff/grad.py`)."""
        raise NotImplementedError(f"{self.name} does not compute gradients (--grad)")

    def finish_grad(self) -> dict[str, np.ndarray]:
        """After `run_grad` of the last prompt: what is given once for the whole batch (a
        sketched weight gradient `grad:w:NAME:sketch`, sketched after the sum over prompts:
        `llmdiff/sketch.py`). Default: nothing (weight gradients come with each prompt and the
        worker sums them, then sketches them when the job's capture is sketch)."""
        return {}

    def run_bare(self, tokens: list[int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no bare forward (has_bare_forward is False)")

    def peak_device_bytes(self) -> int | dict | None:
        return None

    def describe(self) -> dict:
        return {}
