"""`llmdiff audit PATH`: static checks of a checkpoint directory, streaming, safe.

    from llmdiff.audit import audit
    result = audit("./gemma-7b")            # or audit(path, model="gemma-7b")
    assert result, result.summary()         # truthy when nothing was found

No forward pass, nothing executed, nothing unpickled: pickled weights and remote code are
reported by name and never opened. The engine
1. reads the checkpoint's JSON files (config, generation config, tokenizer files) as JSON;
2. validates every safetensors header (offsets, overlaps, truncation) and the shard index;
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

from llmdiff import __version__, checkpoint_files, safetensors_file
from llmdiff.audit_stream import BLOCK_BYTES, TensorRecord, stream_stats
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


# --- files ----------------------------------------------------------------------------------

def _optional_json(path: Path) -> dict | None:
    """A JSON object file of the checkpoint, None when absent. A dangling symlink, FIFO or device
    is not absent: `read_json` refuses it (one line), as it does non-UTF-8, non-JSON or a non-object."""
    return checkpoint_files.read_json(path) if os.path.lexists(path) else None


def _safetensors_records(path: Path, name: str) -> tuple[list[TensorRecord], list[str]]:
    """The tensors of one file, and what is wrong with it beyond what `read_header` rejects."""
    header, start = safetensors_file.read_header(path)   # raises WeightsError on a broken file
    records, problems = [], []
    for tname, info in header.items():   # types and sizes checked by read_header
        lo, hi = info["data_offsets"]
        records.append(TensorRecord(tname, name, info["dtype"], tuple(info["shape"]), start + lo, hi - lo))
    records.sort(key=lambda r: r.start)
    end = start
    for r in records:
        if r.start < end:
            problems.append(f"{name}: tensor {r.name!r} overlaps the tensor before it (starts at byte"
                            f" {r.start}, previous ends at {end})")
        elif r.start > end:
            problems.append(f"{name}: {r.start - end} unaccounted bytes before tensor {r.name!r}")
        end = max(end, r.start + r.nbytes)
    size = path.stat().st_size
    if size > end:
        problems.append(f"{name}: {size - end} bytes after the last tensor (ends at {end}, file has {size})")
    return records, problems


def _index_problems(index: dict, directory: Path, records: dict) -> list[str]:
    name = "model.safetensors.index.json"
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        return [f"{name}: no weight_map object"]
    # A shard name that is not a plain file name of the directory (a list, "../x"): never
    # joined to the directory's path; reported, and its tensors count as in no shard.
    bad = [f for f in weight_map.values() if not isinstance(f, str) or "/" in f or "\\" in f or f in ("", ".", "..")]
    problems = [f"{name}: weight_map names {bad[0]!r}, not a file of the directory"] if bad else []
    weight_map = {t: f for t, f in weight_map.items() if f not in bad}
    missing_files = sorted({f for f in weight_map.values() if not (directory / f).exists()})
    if missing_files:
        problems.append(f"{name}: shard {missing_files[0]} is missing"
                        + (f" (and {len(missing_files) - 1} more)" if len(missing_files) > 1 else ""))
    wrong = [t for t, f in weight_map.items() if (directory / f).exists() and t in records
             and records[t].file != f]
    absent = [t for t, f in weight_map.items() if (directory / f).exists() and t not in records]
    unlisted = [t for t in records if t not in weight_map]
    for what, names in (("is listed in another shard than the one holding it", wrong),
                        ("is listed but in no shard", absent), ("is in a shard but not listed", unlisted)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            problems.append(f"{name}: tensor {names[0]!r}{more} {what}")
    return problems


def _discover(directory: Path) -> tuple[dict, dict, dict]:
    """Files by kind, tensor records by name, and file problems by file name. WeightsError
    (exit 2) when there are no weights to audit or a weights file is not a regular file."""
    files = {"safetensors": [], "pickle": [], "code": [], "index": []}
    for p in sorted(directory.iterdir()):
        # Weights and the index by name whatever they are (a FIFO, a symlink loop, a directory
        # named model.safetensors is a broken checkpoint, not an absent file); pickles and code
        # are reported only when they are files.
        if p.suffix == ".safetensors":
            files["safetensors"].append(p.name)
        elif p.name == checkpoint_files.INDEX:
            files["index"].append(p.name)
        elif not p.is_file():
            continue
        elif checkpoint_files.is_pickle(p.name):
            files["pickle"].append(p.name)
        elif checkpoint_files.is_code(p.name):
            files["code"].append(p.name)
    # transformers reads the index, else model.safetensors. With neither there is nothing to
    # audit (exit 2), except a pickle-only checkpoint: `pickle-weights-present` reports that.
    if (not files["index"] and checkpoint_files.SINGLE not in files["safetensors"]
            and not (files["pickle"] and not files["safetensors"])):
        raise checkpoint_files.no_weights(directory, files["safetensors"], files["pickle"])
    for name in files["safetensors"]:   # a FIFO would block, a loop cannot be read: exit 2 at once
        checkpoint_files.open_regular_close(directory / name, "weights file")
    records, file_errors = {}, {}
    files["unreadable"] = []      # safetensors files whose header cannot be read: tensors unknown
    for name in files["safetensors"]:
        try:
            recs, problems = _safetensors_records(directory / name, name)
        except WeightsError as e:
            file_errors.setdefault(name, []).append(str(e).replace(str(directory) + os.sep, ""))
            files["unreadable"].append(name)
            continue
        for r in recs:
            if r.name in records:
                problems.append(f"{name}: tensor {r.name!r} is also in {records[r.name].file}")
            else:
                records[r.name] = r
        if problems:
            file_errors.setdefault(name, []).extend(problems)
    if files["index"]:
        index = checkpoint_files.read_json(directory / files["index"][0], expect=None, what="safetensors index")
        problems = _index_problems(index, directory, records)
        if problems:
            file_errors.setdefault(files["index"][0], []).extend(problems)
    return files, records, file_errors


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
    generation_config = _optional_json(directory / "generation_config.json")
    if generation_config is not None:
        check_token_ids(generation_config, str(directory / "generation_config.json"))
    files, records, file_errors = _discover(directory)
    if os.path.lexists(directory / "chat_template.jinja"):
        checkpoint_files.open_regular_close(directory / "chat_template.jinja", "chat template")
        files["chat_template"] = ["chat_template.jinja"]
    spec = resolve_spec(config, model)
    family = spec.family if spec else family_of(config)
    return AuditContext(
        path=directory, spec=spec, config=config, generation_config=generation_config,
        tokenizer_config=_optional_json(directory / "tokenizer_config.json"),
        tokenizer=_optional_json(directory / "tokenizer.json"),
        special_tokens_map=_optional_json(directory / "special_tokens_map.json"),
        files=files, file_errors=file_errors, tensors=records, family=family)


def audit(path, model: str | None = None, *, select=(), ignore=(), progress=None,
          block_bytes: int = BLOCK_BYTES) -> AuditResult:
    """Audit the checkpoint directory `path`; see the module docstring.

    model: a registered model name to compare the config with (default: detected).
    select, ignore: checks by code, name or prefix (`LD7`), among the audit checks.
    progress: optional callable(bytes_done, bytes_total) during the streaming pass.
    """
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
