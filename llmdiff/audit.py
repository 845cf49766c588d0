"""`llmdiff audit PATH`: static checks of a checkpoint directory, streaming, safe.

    from llmdiff.audit import audit
    result = audit("./gemma-7b")            # or audit(path, model="gemma-7b")
    assert result, result.summary()         # truthy when nothing was found

No forward pass, nothing executed, nothing unpickled: pickled weights and remote code are
reported by name and never opened. The engine
1. reads the checkpoint's JSON files (config, generation config, tokenizer files) as JSON;
2. validates every safetensors header (offsets, overlaps, truncation) and the shard index
   (`audit_files`);
3. resolves the model's spec (`--model`, or the one registered spec matching `model_type`
   and the sizes, full-size or tiny), when there is one;
4. streams every tensor once, in file order, in blocks of whole rows read into a few reused
   buffers by a read-ahead thread (so memory stays at a few blocks whatever the checkpoint's
   size, and reading overlaps computing), and computes what the checks need: counts of NaN,
   Inf and non-zero values, the largest magnitude, the first non-finite element, per-row L2
   norms of token tables (embeddings, `lm_head`) and their digests (`audit_stream`);
5. runs every selected check with `target = "checkpoint"` on the resulting `AuditContext`.
Checks never read weights themselves; one that needs more than the statistics defines
`visit_block` and sees each block during the same pass. The tokenizer files' vocabulary and
special tokens are read for the checks by `audit_tokens`; the report is shown by `audit_render`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from llmdiff import __version__, checkpoint_files
from llmdiff.audit_files import discover
from llmdiff.audit_stream import BLOCK_BYTES, stream_stats
from llmdiff.check import AuditContext, Check, Finding
from llmdiff.errors import UsageError, WeightsError
from llmdiff.hf_format import (check_config, check_token_ids, family_of, rope_by_layer_type, same_rope,
                               size_differences, sliding_layout, spec_rope, spec_sizes, text_config)


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


# --- the audit ------------------------------------------------------------------------------

def audit_checks(select=(), ignore=()) -> tuple[list[Check], list]:
    """The audit checks (`target = "checkpoint"`) that `select` and `ignore` leave, and the
    entry points that failed to load."""
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
    generation_config = checkpoint_files.optional_json(directory / "generation_config.json")
    if generation_config is not None:
        check_token_ids(generation_config, str(directory / "generation_config.json"))
    files, records, file_errors = discover(directory)
    if os.path.lexists(directory / "chat_template.jinja"):
        checkpoint_files.open_regular_close(directory / "chat_template.jinja", "chat template")
        files["chat_template"] = ["chat_template.jinja"]
    spec = resolve_spec(config, model)
    family = spec.family if spec else family_of(config)
    return AuditContext(
        path=directory, spec=spec, config=config, generation_config=generation_config,
        tokenizer_config=checkpoint_files.optional_json(directory / "tokenizer_config.json"),
        tokenizer=checkpoint_files.optional_json(directory / "tokenizer.json"),
        special_tokens_map=checkpoint_files.optional_json(directory / "special_tokens_map.json"),
        files=files, file_errors=file_errors, tensors=records, family=family)


def audit(path, model: str | None = None, *, select=(), ignore=(), progress=None,
          block_bytes: int = BLOCK_BYTES) -> AuditResult:
    """Audit the checkpoint directory `path`; see the module docstring.

    model: a registered model name to compare the config with (default: detected).
    select, ignore: checks by code, name or prefix (`LD7`), among the audit checks.
    progress: optional callable(bytes_done, bytes_total) during the streaming pass.
    """
    if str(path).lower().endswith(".gguf"):  # llama.cpp's format: its metadata (llmdiff/audit_gguf.py)
        from llmdiff.audit_gguf import audit_gguf

        return audit_gguf(path, model, select=select, ignore=ignore)
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


__all__ = ["audit", "AuditResult", "audit_checks", "load_context"]
