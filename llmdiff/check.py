"""What a known-bug check is. Checks live in `checks/`, one per file, and register through the
entry-point group `llmdiff.checks`, the same way a third-party package adds its own:

    [project.entry-points."llmdiff.checks"]
    LD301 = "llmdiff.checks.gelu_exact_vs_tanh:GeluExactVsTanh"

A check's docstring is its documentation (`llmdiff checks explain CODE`), with the headings
of `HEADINGS`. Two kinds:

- static: `run(ctx)` looks at evidence that needs no forward pass (an implementation's resolved
  config, its weights, the tokens) and yields findings;
- dynamic: the check names a `knob` of the oracle's precision policy that switches its bug on.
  When a candidate diverges, llmdiff re-runs the oracle with the knob on; if the divergence
  collapses to the noise floor where it started, the bug is confirmed (`llmdiff.diagnose`).

A check looks at an implementation during `compare` (`target = "implementation"`, the default)
or at a checkpoint on disk during `audit` (`target = "checkpoint"`, kind "audit"). An audit
check's `run(ctx)` gets an `AuditContext`: the checkpoint's JSON files, its tensor headers, and
statistics of every tensor, which `llmdiff.audit_stream` computes in one streaming pass shared by all
checks (no check reads the weights itself). A check that needs more than those statistics may
define `visit_block(ctx, tensor, rows, block)`: it is called during that same pass with each
block of whole rows, already in memory.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Iterator

from llmdiff.spec import FAMILIES, GEMMA_FAMILIES

HEADINGS = ("What it finds", "Why it matters", "How it is confirmed", "Fix", "References")
CODE_RE = re.compile(r"^LD\d{3}$")
NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)+$")
# Names read after "allow" (`allow gelu-exact-vs-tanh`): they name the bad pattern, not advice.
BAD_NAME_PREFIXES = ("use-", "avoid-", "no-", "check-", "fix-", "allow-")
ALL_FAMILIES = FAMILIES


# Knobs of the oracle's precision policy that act on the whole model, never on one kind of
# layer (`knob@local`): the constants' dtype, the embedding normaliser, the final softcap, the
# layer pattern itself.
UNSCOPED_KNOBS = ("constants_dtype", "embed_scale", "final_softcap", "layer_pattern_shift", "scoped", "autocast",
                  "lm_head")


@dataclass
class Finding:
    code: str
    name: str
    implementation: str
    dtype: str | None
    where: str                 # a canonical point, or a file / config key
    message: str               # one line
    evidence: dict = field(default_factory=dict)
    confirmed: bool = False    # True when a counterfactual re-run confirmed it
    fix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """What a check may look at for one implementation (and one dtype, for dynamic evidence)."""

    spec: object                           # llmdiff.spec.ModelSpec
    implementation: str
    details: dict                          # the implementation's self-description (resolved config...)
    dtype: str | None = None
    run: dict | None = None                # the diff of this implementation vs the reference
    tokens: list | None = None
    weights: dict | None = None            # the report's weights section


@dataclass
class AuditContext:
    """What an audit check may look at: one checkpoint directory, never executed or unpickled.

    `tensors` maps each tensor name to a `llmdiff.audit_stream.TensorRecord` (file, dtype, shape and,
    once the streaming pass is done, `stats`: non-finite and zero counts, row norms of token
    tables, digests). JSON files that are absent are None.
    """

    path: object                           # pathlib.Path of the checkpoint directory
    spec: object | None                    # llmdiff.spec.ModelSpec, when the family is known
    config: dict
    generation_config: dict | None = None
    tokenizer_config: dict | None = None
    tokenizer: dict | None = None          # tokenizer.json
    special_tokens_map: dict | None = None
    files: dict = field(default_factory=dict)       # kind -> [file names] (safetensors, pickle, code...)
    file_errors: dict = field(default_factory=dict)  # file name -> why it cannot be read
    tensors: dict = field(default_factory=dict)     # name -> llmdiff.audit_stream.TensorRecord
    family: str | None = None              # from the spec, else from config.json's model_type
    notes: dict = field(default_factory=dict)       # per-check scratch space, keyed by code
    implementation: str = "checkpoint"
    dtype: str | None = None


class Check:
    code = ""
    name = ""
    # The families whose bug it is. Gemma's by default (the checks written before the others
    # existed); a check that holds for every family says ALL_FAMILIES.
    families: tuple[str, ...] = GEMMA_FAMILIES
    # "implementation": looks at an implementation during `compare` (a `Context`);
    # "checkpoint": looks at a checkpoint during `audit` (an `AuditContext`).
    target: str = "implementation"
    # (knob, value) on `references.gemma.Precision` that switches the bug on; None: static.
    knob: tuple[str, object] | None = None
    # Other forms the same bug takes in real code, as extra knob settings tried with `knob`
    # (e.g. a bfloat16 `inv_freq` multiplied, as HF does, rather than a timescale divided).
    also: tuple[dict, ...] = ()
    # The dtypes in which the bug acts (a bfloat16-only bug is invisible in float32).
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    # True where the knob amplifies the oracle's own rounding noise (a table read at a rounded
    # input: one last bit of the input flips the entry, a float32 difference becomes a float16
    # step): an oracle with it on is judged against its own floor, at every point the larger of
    # the clean floor and that oracle's at the run dtype against float64 (`diagnose.Case.judge`).
    own_floor: bool = False
    # Whether the bug can act under autocast (where it acts in float32 or the low dtype). False
    # for an inference kernel's float16 rounding of a float32 value (LD302, LD511): under
    # autocast that value comes out of a matrix product in the low dtype already.
    acts_under_autocast: bool = True

    @property
    def kind(self) -> str:
        if self.target == "checkpoint":
            return "audit"
        return "dynamic" if self.knob else "static"

    def variants(self) -> list[dict]:
        """The policies that switch this bug on: the knob, then each `also` on top of it."""
        if not self.knob:
            return []
        base = {self.knob[0]: self.knob[1]}
        return [base] + [{**base, **extra} for extra in self.also]

    def applies(self, spec, dtype: str | None = None) -> bool:
        """Whether the bug can exist in `spec`'s family and act at `dtype`. An autocast run mixes
        float32 and the low dtype: a check acting in either applies there too."""
        from llmdiff.job import autocast_of

        if dtype is not None and autocast_of(dtype) and not self.acts_under_autocast:
            return False
        if dtype is not None and autocast_of(dtype) and dtype not in self.dtypes:
            # float16 is a run's low dtype only under autocast: a bug of the low compute dtype
            # (listed as bfloat16, the pure low run dtype) acts there as in bfloat16.
            low = (autocast_of(dtype), "bfloat16") if autocast_of(dtype) == "float16" else (autocast_of(dtype),)
            dtype = next((d for d in ("float32", *low) if d in self.dtypes), dtype)
        return spec.family in self.families and (dtype is None or dtype in self.dtypes)

    def run(self, ctx: Context) -> Iterator[Finding]:
        """Static evidence (an `AuditContext` for checkpoint checks, after the streaming pass).
        Dynamic checks are confirmed by `llmdiff.diagnose` and yield nothing here."""
        return iter(())

    @classmethod
    def docs(cls) -> dict[str, str]:
        """The docstring split by its `## Heading` sections."""
        sections, current = {}, None
        for line in (cls.__doc__ or "").splitlines():
            m = re.match(r"\s*##\s+(.*\S)\s*$", line)
            if m:
                current = m.group(1)
                sections[current] = []
            elif current:
                sections[current].append(line.strip())
        return {k: "\n".join(v).strip() for k, v in sections.items()}

    @classmethod
    def summary(cls) -> str:
        return " ".join(cls.docs().get("What it finds", "").split())

    @classmethod
    def fix(cls) -> str:
        return " ".join(cls.docs().get("Fix", "").split())

    def finding(self, ctx: Context, where: str, message: str, evidence: dict | None = None,
                confirmed: bool = False) -> Finding:
        return Finding(self.code, self.name, ctx.implementation, ctx.dtype, where, message,
                       evidence or {}, confirmed, self.fix())


class AuditCheck(Check):
    """A check of a checkpoint on disk (`llmdiff audit`): for every family unless it says."""

    target = "checkpoint"
    families = ALL_FAMILIES


class ConfigCheck(AuditCheck):
    """An audit check of config.json against the model's spec. It runs when the spec is known
    (or, with `needs_spec = False`, the family) and its family is among `families`; a subclass
    yields its findings from `check(ctx, spec)` with `value` (what transformers reads: the
    field, else its default) and `differs` (the finding for a field that is not the spec's)."""

    needs_spec = True

    def run(self, ctx: AuditContext) -> Iterator[Finding]:
        family = ctx.spec.family if ctx.spec is not None else ctx.family
        if family not in self.families or (self.needs_spec and ctx.spec is None):
            return iter(())
        return self.check(ctx, ctx.spec)

    def check(self, ctx: AuditContext, spec) -> Iterator[Finding]:
        return iter(())

    @staticmethod
    def value(ctx: AuditContext, key: str):
        """(value transformers will use, whether config.json sets it)."""
        from llmdiff.hf_format import config_value

        return config_value(ctx.config, ctx.family, key)

    def differs(self, ctx: AuditContext, key: str, value, present: bool, want, *, uses: str | None = None,
                note: str = "", **evidence) -> Finding:
        """The finding "KEY is VALUE[NOTE] but MODEL uses WANT"; `uses` words the model's side."""
        from llmdiff.hf_format import shown

        return self.finding(ctx, f"config.json:{key}",
                            f"{key} is {shown(value, present)}{note} but {ctx.spec.name} {uses or f'uses {want!r}'}",
                            {"config": value, "spec": want, "present": present, **evidence})


def problems_with(check: type, knobs: dict | None = None) -> list[str]:
    """Why a check class breaks the contract (empty when it is fine).

    `knobs`: the oracle's knob names, to validate a dynamic check's knob (the caller passes
    them so that listing checks never imports JAX).
    """
    out = []
    if not (isinstance(check, type) and issubclass(check, Check)):
        return [f"{check!r} is not a subclass of llmdiff.check.Check"]
    if not CODE_RE.match(check.code or ""):
        out.append(f"code {check.code!r} is not LD followed by three digits")
    if not NAME_RE.match(check.name or "") or check.name.startswith(BAD_NAME_PREFIXES):
        out.append(f"name {check.name!r} must be lower-case words joined by '-', naming the bad pattern")
    docs = check.docs()
    for heading in HEADINGS:
        if not docs.get(heading):
            out.append(f"docstring lacks a '## {heading}' section with text")
    if not check.families or any(f not in ALL_FAMILIES for f in check.families):
        out.append(f"families {check.families!r} must be among {ALL_FAMILIES}")
    if check.target not in ("implementation", "checkpoint"):
        out.append(f"target {check.target!r} must be 'implementation' or 'checkpoint'")
    elif check.target == "checkpoint" and check.knob:
        out.append("a checkpoint check cannot have a knob (audit runs no forward pass)")
    if knobs is not None:
        for variant in check.variants(check):
            for knob in variant:
                if knob not in knobs:
                    out.append(f"knob {knob!r} is not a field of the oracle's Precision policy")
    return out
