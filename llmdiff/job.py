"""The contract between llmdiff and a worker: what one implementation is asked to run.

The parent process writes a `Job` as JSON (`Job.to_json`); the worker reads it back
(`Job.from_json`) and hands it to the adapter (`references/base.py`). Standard library only: a
worker may run under another interpreter (`--impl hf@/other/python`) that has no llmdiff
installed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

TRUTH_DTYPE = "float64"
# Mixed precision as people train and evaluate: float32 weights, matrix products in bfloat16
# (`torch.autocast`, a JAX bf16 compute policy with f32 params), or in float16 (autocast on
# GPUs without bfloat16, `fp16=True` training). A run dtype of its own.
AUTOCAST_DTYPES = ("autocast-bfloat16", "autocast-float16")
# Weight quantisations a run may ask for (`--quant`): the type llama.cpp's converter writes
# (`convert_hf_to_gguf.py --outtype q8_0`); the oracle rounds its weights the same way
# (`llmdiff/quant.py`) and its matmul inputs as ggml's CPU kernels do (`Precision.matmul_q8_0`).
QUANT_TYPES = ("q8_0",)


def autocast_of(dtype: str | None) -> str | None:
    """The low dtype of an autocast run dtype ("bfloat16"), None for a plain dtype."""
    return dtype[len("autocast-"):] if dtype and dtype.startswith("autocast-") else None


def params_dtype(dtype: str) -> str:
    """The dtype the weights are held in: float32 under autocast, else the run dtype."""
    return "float32" if autocast_of(dtype) else dtype


@dataclass(frozen=True)
class RunId:
    """One run of an implementation: its compute dtype and, for the float64 runs that measure a
    noise floor, the dtype whose conventions apply to constants (`float64` "as" `bfloat16`)."""

    dtype: str
    constants_dtype: str | None = None

    @property
    def label(self) -> str:
        """`float32`, or `float64-as-bfloat16`: file names and report keys."""
        return self.dtype if not self.constants_dtype else f"{self.dtype}-as-{self.constants_dtype}"

    def __str__(self) -> str:
        return self.dtype if not self.constants_dtype else f"{self.dtype} as {self.constants_dtype}"


@dataclass(frozen=True)
class Options:
    """How to run. The job's options apply to every run; a run may override some
    (`RunRequest.options`)."""

    attn: str = "eager"              # HF attention implementation: eager or sdpa
    device: str = "auto"             # cpu, cuda, or auto (cuda when the framework sees a GPU)
    stream: bool | str = "auto"      # one decoder block at a time; auto: when weights > half the GPU
    devices: int = 0                 # whole decoder layers spread over this many devices; 0: as needed
    bench: bool = False              # also time a bare and a capturing forward (`bench/`)
    precision: dict = field(default_factory=dict)  # the oracle's precision knobs (counterfactuals)
    forced_from: str | None = None   # the oracle fed this captures file's values (teacher forcing)
    grad_checkpointing: bool = False  # --grad: HF computes gradients with its gradient checkpointing on

    def with_(self, **changes) -> "Options":
        return replace(self, **changes)


@dataclass(frozen=True)
class WeightsSource:
    """Where a worker gets the run's weights: `canonical` (and `hf_dir`, the same weights as an HF
    checkpoint); `hf_dir` alone with `from_hf` (the canonical tensors converted from its weight
    files, no canonical file); or `seed` (and `hf_dir` with the config alone). A worker asks
    `weights.canonical_tensors` for the canonical tensors by name, whichever it is."""

    canonical: str | None = None     # llmdiff's canonical safetensors file (float32)
    hf_dir: str | None = None        # an HF checkpoint of the same weights (config only with `seed`)
    seed: int | None = None          # made on the worker's device from this seed (`weights.generate_*`)
    from_hf: bool = False            # the canonical tensors are `hf_dir`'s, converted tensor by tensor

    @property
    def generated(self) -> bool:
        return self.seed is not None


@dataclass(frozen=True)
class RunRequest:
    """One run asked of a worker: what to run, where to write it (`out`.safetensors and
    `out`.json), with which options (the job's, with this run's overrides)."""

    id: RunId
    out: str
    options: Options = Options()

    @property
    def dtype(self) -> str:
        return self.id.dtype

    @property
    def constants_dtype(self) -> str | None:
        return self.id.constants_dtype

    @classmethod
    def from_dict(cls, d: dict) -> "RunRequest":
        return cls(RunId(**d["id"]), d["out"], Options(**d["options"]))


@dataclass(frozen=True)
class Job:
    """Everything one worker process is asked to do."""

    spec: dict                       # `ModelSpec.to_dict()`
    tokens: list                     # prompts: lists of token ids, batch 1 each
    weights: WeightsSource
    options: Options = Options()
    points: list | None = None       # canonical points to capture; None: every point
    capture: str = "full"            # full, or sketch (`llmdiff/sketch.py`)
    impl: str = ""                   # the implementation's name in the report
    module: str = ""                 # the adapter class is `cls` of this module
    cls: str = ""
    references_dir: str = ""         # where `llmdiff.references` lives (for foreign interpreters)
    runs: tuple = ()                 # RunRequests
    grad: bool = False               # also the loss and its gradients (`llmdiff/grad.py`): `run_grad`
    quant: str | None = None         # weights quantised to this type (QUANT_TYPES) by llama.cpp's converter,
                                     # and the oracle run with the same quantisation; None: float weights

    def __post_init__(self):
        if self.quant is not None and self.quant not in QUANT_TYPES:
            raise ValueError(f"unknown quantisation {self.quant!r}; choose from {', '.join(QUANT_TYPES)}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Job":
        runs = tuple(RunRequest.from_dict(r) for r in d.get("runs", ()))
        return cls(**{**d, "weights": WeightsSource(**d["weights"]), "options": Options(**d.get("options", {})),
                      "runs": runs})

    @classmethod
    def from_json(cls, text: str) -> "Job":
        return cls.from_dict(json.loads(text))

    def with_(self, **changes) -> "Job":
        return replace(self, **changes)
