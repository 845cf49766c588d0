"""`llmdiff audit MODEL.gguf`: a GGUF file's metadata, as llama.cpp reads it, against the spec.

Read with the `gguf` package's `GGUFReader` (metadata and tensor infos; no tensor data is
read, nothing is executed). The spec is `--model`'s (full-size or tiny, by the sizes) or the
one registered spec of the file's family whose sizes match. What is compared is what llama.cpp
will *run*, so where a key is absent llama.cpp's own default stands in (src/llama-model.cpp,
src/llama-hparams.h and src/models/*.cpp of the vendored llama.cpp 0.3.36 sources):

| what | GGUF key (ARCH = general.architecture) | absent: llama.cpp uses | finding |
|---|---|---|---|
| sizes | ARCH.embedding_length, block_count, feed_forward_length, attention.head_count(_kv), attention.key_length, token_embd rows | key_length: D / N | LD711 config-size-mismatch |
| RMSNorm eps | ARCH.attention.layer_norm_rms_epsilon | (required) | LD706 config-norm-eps-mismatch |
| RoPE, global layers | ARCH.rope.freq_base, rope.scaling.type/.factor, `rope_freqs.weight` (Llama 3 factors) | 10000, no scaling | LD707 config-rope-mismatch |
| RoPE, local layers | Gemma 2: the global values; Gemma 3: ARCH.rope.freq_base_swa, never scaled | 10000 | LD707 |
| which layers are local | ARCH.attention.sliding_window_pattern (bools or a period) | Gemma 2: every 2nd from 0, Gemma 3: 5 of 6; Llama/Mistral: none (no SWA in the graph) | LD708 config-sliding-window-mismatch |
| the window | ARCH.attention.sliding_window | Gemma 2: 4096; Gemma 3: no SWA at all | LD708 |
| soft-caps | ARCH.attn_logit_softcapping (Gemma 2), ARCH.final_logit_softcapping | Gemma 3: no attention soft-cap in the graph | LD709 config-softcap-mismatch |
| query scale | Gemma: 1/sqrt(head_dim), or 1/sqrt(D/N) when block_count is 46 (Gemma 2 27B) or 62 (Gemma 3 27B); others: ARCH.attention.scale | 1/sqrt(head_dim) | LD710 config-query-scale-mismatch |
| special ids | tokenizer.ggml.bos_token_id, eos_token_id, padding_token_id | | LD053 special-token-id-mismatch |
| BOS behaviour | tokenizer.ggml.add_bos_token | llama.cpp's vocab default | LD053 |

Findings carry the codes and names of the config.json checks that find the same defect in an
HF checkpoint, so `--select`/`--ignore` apply to them as they do there.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from llmdiff import __version__
from llmdiff.check import Finding
from llmdiff.errors import UsageError, WeightsError

# general.architecture -> the spec families it can hold (llama.cpp converts Mistral as llama).
_FAMILIES = {"gemma": ("gemma",), "gemma2": ("gemma2",), "gemma3": ("gemma3",), "llama": ("llama", "mistral"),
             "qwen2": ("qwen2",), "qwen3": ("qwen3",), "phi3": ("phi3",)}
_NAMES = {"LD053": "special-token-id-mismatch", "LD706": "config-norm-eps-mismatch", "LD707": "config-rope-mismatch",
          "LD708": "config-sliding-window-mismatch", "LD709": "config-softcap-mismatch",
          "LD710": "config-query-scale-mismatch", "LD711": "config-size-mismatch"}
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}        # load_swa_pattern(ml, N) in src/models/gemma2.cpp, gemma3.cpp
_27B_LAYERS = {"gemma2": 46, "gemma3": 62}      # f_attention_scale = 1/sqrt(n_embd/n_head) for these


class GGUFMetadata:
    """The metadata of one GGUF file: `get(key)` a scalar, string or list; tensor shapes."""

    def __init__(self, path: Path):
        try:
            from gguf import GGUFReader
        except ImportError:  # pragma: no cover - declared in pyproject
            raise UsageError("auditing a GGUF file needs the gguf package: pip install gguf") from None
        try:
            reader = GGUFReader(str(path), "r")
        except (ValueError, OSError, IndexError) as e:
            raise WeightsError(f"{path}: not a readable GGUF file ({e})") from None
        self.values = {}
        for name, field in reader.fields.items():
            try:
                self.values[name] = field.contents()
            except Exception:  # a field the reader cannot decode: leave it out
                continue
        # GGUF lists dims fastest first: (D, V) for token_embd is V rows of D.
        self.shapes = {t.name: tuple(int(n) for n in reversed(list(t.shape))) for t in reader.tensors}
        self.tensors = {t.name: t for t in reader.tensors}
        self.arch = self.values.get("general.architecture")

    def get(self, key: str, default=None):
        return self.values.get(key, default)

    def a(self, key: str, default=None):
        """An architecture key: `ARCH.key`."""
        return self.values.get(f"{self.arch}.{key}", default)


def _spec_sizes(spec) -> dict:
    return {"embedding_length": spec.hidden_size, "block_count": spec.num_layers,
            "feed_forward_length": spec.mlp_dim, "attention.head_count": spec.num_heads,
            "attention.head_count_kv": spec.num_kv_heads, "attention.key_length": spec.head_dim,
            "vocab": spec.hf_vocab_size or spec.vocab_size}


def _sizes(meta: GGUFMetadata) -> dict:
    d, n = meta.a("embedding_length"), meta.a("attention.head_count")
    rows = meta.shapes.get("token_embd.weight", (None,))[0]
    return {"embedding_length": d, "block_count": meta.a("block_count"),
            "feed_forward_length": meta.a("feed_forward_length"), "attention.head_count": n,
            "attention.head_count_kv": meta.a("attention.head_count_kv", n),
            "attention.key_length": meta.a("attention.key_length", d // n if d and n else None), "vocab": rows}


def resolve_spec(meta: GGUFMetadata, model: str | None):
    """`model`'s spec (full-size or tiny, whichever the sizes fit), else the one registered
    spec of the file's family whose sizes all match; None when there is none or several."""
    from llmdiff.spec import get_spec, model_names

    have = _sizes(meta)

    def misses(spec):
        return sum(have[k] != v for k, v in _spec_sizes(spec).items())

    if model:
        full, tiny = get_spec(model), get_spec(model, tiny=True)
        return tiny if misses(tiny) < misses(full) else full
    families = _FAMILIES.get(meta.arch, ())
    matches = [s for n in model_names() for s in (get_spec(n), get_spec(n, tiny=True))
               if s.family in families and misses(s) == 0]
    if len(matches) > 1:
        score = {s: len(list(_differences(meta, s))) for s in matches}
        matches = [s for s in matches if score[s] == min(score.values())]
    return matches[0] if len(matches) == 1 else None


def _close(a, b, rel=1e-6) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and math.isclose(a, b, rel_tol=rel, abs_tol=0)


def llama3_factors(spec) -> np.ndarray:
    """The per-frequency divisors of Llama 3's RoPE scaling (as transformers computes them)."""
    factor, low, high, old = spec.rope_llama3
    freqs = 1.0 / spec.rope_base ** (np.arange(0, spec.head_dim, 2, dtype=np.float64) / spec.head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old / low, 1.0 / factor, (1 - smooth) / factor + smooth)
    scaled = np.where(wavelen < old / high, 1.0, scaled)
    return 1.0 / scaled


def layer_kinds(meta: GGUFMetadata, family: str, n_layers: int) -> tuple[str, ...]:
    """Which layers llama.cpp runs with the sliding window (src/llama-hparams.cpp set_swa_pattern)."""
    if family not in _SWA_PERIOD or (family == "gemma3" and not meta.a("attention.sliding_window")):
        return ("global",) * n_layers
    pattern = meta.a("attention.sliding_window_pattern", _SWA_PERIOD[family])
    if isinstance(pattern, list):
        return tuple("local" if p else "global" for p in pattern)
    p = int(pattern)
    return tuple("local" if p == 0 or i % p < p - 1 else "global" for i in range(n_layers))


def _differences(meta: GGUFMetadata, spec):
    """(code, key, what llama.cpp uses, what the spec says, message)."""
    arch, family = meta.arch, spec.family
    have, want = _sizes(meta), _spec_sizes(spec)
    for k in want:
        if have[k] != want[k]:
            yield "LD711", f"{arch}.{k}" if k != "vocab" else "token_embd.weight", have[k], want[k], ""
    eps = meta.a("attention.layer_norm_rms_epsilon")
    if not _close(eps, spec.norm_eps):
        yield "LD706", f"{arch}.attention.layer_norm_rms_epsilon", eps, spec.norm_eps, ""
    # RoPE on global layers: base, linear scaling, Llama 3's factors
    base = meta.a("rope.freq_base", 10000.0)
    if not _close(base, spec.rope_base):
        yield "LD707", f"{arch}.rope.freq_base", base, spec.rope_base, ""
    kind = meta.a("rope.scaling.type", "linear")
    factor = meta.a("rope.scaling.factor", meta.a("rope.scale_linear", 0.0)) or 1.0
    linear = factor if kind == "linear" else None
    if spec.rope_longrope is None and linear is not None and not _close(linear, spec.rope_scale):
        yield "LD707", f"{arch}.rope.scaling.factor", linear, spec.rope_scale, " (linear, global layers)"
    freqs = meta.tensors.get("rope_freqs.weight")
    if spec.rope_llama3 is not None:
        want_f = llama3_factors(spec)
        if freqs is None:
            yield "LD707", "rope_freqs.weight", None, "llama3 factors", " (absent: llama.cpp runs no llama3 scaling)"
        else:
            got = np.asarray(freqs.data, dtype=np.float64).reshape(-1)
            if got.shape != want_f.shape or not np.allclose(got, want_f, rtol=1e-5):
                yield "LD707", "rope_freqs.weight", got.tolist()[:4], want_f.tolist()[:4], " (llama3 factors differ)"
    elif freqs is not None:
        yield "LD707", "rope_freqs.weight", "present", None, " (frequency divisors the model does not have)"
    # local layers
    kinds = layer_kinds(meta, family, spec.num_layers)
    if kinds != spec.layer_types:
        shown = "".join("L" if k == "local" else "G" for k in kinds)
        wanted = "".join("L" if k == "local" else "G" for k in spec.layer_types)
        yield "LD708", f"{arch}.attention.sliding_window_pattern", shown, wanted, " (L local, G global)"
    if "local" in spec.layer_types and "local" in kinds:
        window = meta.a("attention.sliding_window", 4096 if family == "gemma2" else None)
        if window != spec.sliding_window:
            yield "LD708", f"{arch}.attention.sliding_window", window, spec.sliding_window, ""
        local_base = base if family == "gemma2" else meta.a("rope.freq_base_swa", 10000.0)
        if not _close(local_base, spec.rope_base_local):  # Gemma 2's local layers use the global base
            key = "rope.freq_base" if family == "gemma2" else "rope.freq_base_swa"
            yield "LD707", f"{arch}.{key}", local_base, spec.rope_base_local, " (local layers)"
        local_scale = linear if family == "gemma2" else 1.0
        if local_scale is not None and not _close(local_scale, spec.rope_scale_local):
            yield "LD707", f"{arch}.rope.scaling.factor", local_scale, spec.rope_scale_local, " (local layers)"
    # soft-caps: Gemma 2 has both; Gemma 3's graph has no attention soft-cap
    if family == "gemma2":
        attn = meta.a("attn_logit_softcapping", 50.0)
    else:
        attn = None
    if (attn or None) != (spec.attn_softcap or None) and not (attn and spec.attn_softcap and _close(attn, spec.attn_softcap)):
        yield "LD709", f"{arch}.attn_logit_softcapping", attn, spec.attn_softcap, ""
    final = meta.a("final_logit_softcapping", 30.0 if family == "gemma2" else None)
    if (final or None) != (spec.final_softcap or None) and not (final and spec.final_softcap and _close(final, spec.final_softcap)):
        yield "LD709", f"{arch}.final_logit_softcapping", final, spec.final_softcap, ""
    # query scale, as src/models/<arch>.cpp sets it
    d, n, h = have["embedding_length"], have["attention.head_count"], have["attention.key_length"]
    if family in _27B_LAYERS and have["block_count"] == _27B_LAYERS[family]:
        scale = 1.0 / math.sqrt(d // n)
    elif family.startswith("gemma"):
        scale = 1.0 / math.sqrt(h)
    else:
        scale = meta.a("attention.scale") or 1.0 / math.sqrt(h)
    if not _close(scale, spec.query_scale, rel=1e-5):
        yield "LD710", "query scale", scale, spec.query_scale, " (llama.cpp's rule for this architecture)"
    # special ids and BOS
    for key, want_id in (("bos_token_id", spec.bos_id), ("eos_token_id", spec.eos_id), ("padding_token_id", spec.pad_id)):
        got = meta.get(f"tokenizer.ggml.{key}")
        if got is not None and want_id is not None and got != want_id:
            yield "LD053", f"tokenizer.ggml.{key}", got, want_id, ""
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is not None and bool(add_bos) != spec.add_bos:
        yield "LD053", "tokenizer.ggml.add_bos_token", bool(add_bos), spec.add_bos, " (llama.cpp's tokenizer adds <bos> by it)"


def audit_gguf(path, model: str | None = None, *, select=(), ignore=()):
    """Audit one GGUF file; an `llmdiff.audit.AuditResult` shaped as a checkpoint's."""
    from llmdiff.audit import AuditResult, audit_checks

    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"GGUF file {path} does not exist")
    checks, broken = audit_checks(select, ignore)
    selected = {c.code for c in checks}
    meta = GGUFMetadata(path)
    spec = resolve_spec(meta, model)
    findings = []
    if spec is not None:
        for code, key, got, want, note in _differences(meta, spec):
            if code in selected:
                findings.append(Finding(code, _NAMES[code], "checkpoint", None, f"gguf:{key}",
                                        f"{key} is {got!r}{note} but {spec.name} uses {want!r}",
                                        {"gguf": got, "spec": want}))
    findings.sort(key=lambda f: (f.code, f.where))
    seconds = round(time.perf_counter() - t0, 3)
    report = {
        "llmdiff_version": __version__, "command": "audit", "path": str(path), "format": "gguf",
        "model": spec.name if spec else None, "spec": spec.to_dict() if spec else None,
        "family": spec.family if spec else _FAMILIES.get(meta.arch, (None,))[0],
        "files": {"gguf": [path.name]},
        "tensors": {"count": len(meta.shapes), "dtypes": _dtypes(meta)},
        "gguf": {"architecture": meta.arch, "file_type": meta.get("general.file_type")},
        # metadata only: no tensor data is read
        "stream": {"tensors": len(meta.shapes), "bytes": 0, "seconds": seconds},
        "seconds": seconds,
        "checks": {"selected": sorted(c for c in selected if c in _NAMES), "broken": [str(b) for b in broken]},
        "findings": [f.to_dict() for f in findings],
        "exit_code": 1 if findings else 0,
    }
    return AuditResult(report)


def _dtypes(meta: GGUFMetadata) -> dict:
    out: dict[str, int] = {}
    for t in meta.tensors.values():
        name = getattr(t.tensor_type, "name", str(t.tensor_type))
        out[name] = out.get(name, 0) + 1
    return out


__all__ = ["audit_gguf", "GGUFMetadata", "layer_kinds", "llama3_factors", "resolve_spec"]
