"""`llmdiff tokenize`, and the tokenizer's part in `compare`: prompts from real text, parity in
the background, the LD0xx findings on the parity report.

The parts: `tokenizer_encoders` (each tokenizer implementation, called the way its users call
it), `tokenizer_parity` (hard strings and chat template against the reference, the evidence the
LD0xx checks read), `tiny_tokenizer` (the tokenizer of `--tiny` checkpoints), `tokenizer_render`
(the terminal view).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from llmdiff.errors import UsageError
from llmdiff.spec import ModelSpec
from llmdiff.tiny_tokenizer import (BPE_STYLES, sp_style, train_tiny_sentencepiece, write_family_tokenizer,
                                    write_tiny_tokenizer_files)
from llmdiff.tokenizer_parity import tokenizer_parity

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def has_tokenizer(path) -> bool:
    return path is not None and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


def findings(report: dict, checks, spec: ModelSpec) -> list:
    """The LD0xx findings on a parity report (static checks reading `details["tokenizer"]`)."""
    from llmdiff.check import Context

    ctx = Context(spec, "tokenizer", {"tokenizer": report})
    out = []
    for check in checks:
        if check.kind == "static" and check.code.startswith("LD0") and check.applies(spec):
            out.extend(check.run(ctx))
    return out


def read_text_file(path) -> list[tuple[str, str]]:
    """`--text FILE`: the whole file (line endings kept) and each of its non-empty lines."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--text {path}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--text {path}: not UTF-8 text (byte {e.start})") from None
    out = [(p.name, text)]
    out += [(f"{p.name}:{i + 1}", line) for i, line in enumerate(text.splitlines()) if line.strip()]
    return out


def check_tokenizer(model: str, *, tiny: bool = False, weights=None, text=None, select=(), ignore=(),
                    revision: str | None = None, implementations=()) -> dict:
    """`llmdiff tokenize`: parity of every tokenizer implementation of a checkpoint, its chat
    template against the family's reference format, and the LD0xx findings. Exit code in the
    report: 0 agreement, 1 findings."""
    from llmdiff import __version__, model_source, registry

    resolved = model_source.resolve(model, tiny=tiny, revision=revision)
    spec = resolved.spec
    if weights is None and resolved.checkpoint is not None:
        weights = resolved.checkpoint
    extra = read_text_file(text) if text else []
    checks, broken = registry.load_checks()
    checks = registry.select(checks, select, ignore)
    with tempfile.TemporaryDirectory(prefix="llmdiff-tokenize-") as tmp:
        if weights is not None:
            path = Path(weights)
            if not path.is_dir():
                raise UsageError(f"weights path {path} is not a directory (expected an HF checkpoint dir)")
            if not has_tokenizer(path):
                raise UsageError(f"{path} holds no tokenizer (tokenizer.model or tokenizer.json)")
            from llmdiff import weights as weights_mod

            weights_mod.checked_config(path, spec)  # never a checkpoint that needs its own code
            source = {"source": "hf", "path": str(path)}
        elif tiny:
            path = write_tiny_family_tokenizer(Path(tmp), spec)
            source = {"source": "tiny", "path": None}
        else:
            raise UsageError(f"no tokenizer for {model}: pass --weights DIR (a checkpoint with tokenizer.model or"
                             " tokenizer.json) or --tiny for the built-in tiny tokenizer")
        parity = tokenizer_parity(path, spec, extra, implementations)
    parity["path"] = source["path"]
    found = [f.to_dict() for f in findings(parity, checks, spec)]
    return {"llmdiff_version": __version__, "model": spec.name, "tiny": spec.tiny, "tokenizer_source": source,
            "tokenizer": parity, "findings": found, "checks": {"broken": [str(b) for b in broken]},
            "exit_code": 1 if found else 0}


def write_tiny_family_tokenizer(path: Path, spec: ModelSpec) -> Path:
    """The tiny tokenizer of `spec`'s family into `path`: Gemma's SentencePiece, or the
    byte-level BPE of Llama 3 and Qwen."""
    out = write_family_tokenizer(path, spec)  # Gemma's, Llama 3's and Qwen's, Mistral's and Phi-3's
    as_published(Path(path))
    return out


def as_published(path: Path) -> None:
    """Tiny tokenizer files in the form the released repos have, which every transformers
    release `matrix` compares can read (as they read the published ones):
    - a BPE tokenizer.json's merges as "a b" strings (Gemma's, Llama 3's and Qwen's repos), when
      no piece holds a space: tokenizers >= 0.20 writes pairs (["a", "b"]), which the tokenizers
      of transformers before 4.45 cannot read ("data did not match any variant of untagged enum
      ModelWrapper");
    - tokenizer_config.json's `tokenizer_class` "PreTrainedTokenizerFast" (Meta's Llama 3 repos)
      where transformers 5 writes "TokenizersBackend", a class no 4.x release has;
    - its extra special tokens under `additional_special_tokens` (Qwen's repos), where
      transformers 5 writes a list `extra_special_tokens`, which 4.x reads as a dict (`.keys()`)."""
    tokenizer_json, config = path / "tokenizer.json", path / "tokenizer_config.json"
    if tokenizer_json.is_file():
        data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        merges = (data.get("model") or {}).get("merges")
        if merges and isinstance(merges[0], list) and not any(" " in a or " " in b for a, b in merges):
            data["model"]["merges"] = [f"{a} {b}" for a, b in merges]
            tokenizer_json.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        changed = False
        if data.get("tokenizer_class") == "TokenizersBackend":
            data["tokenizer_class"], changed = "PreTrainedTokenizerFast", True
        if isinstance(data.get("extra_special_tokens"), list) and "additional_special_tokens" not in data:
            data["additional_special_tokens"], changed = data.pop("extra_special_tokens"), True
        if changed:
            config.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


# --- for `compare`: prompts from real text, parity in the background -----------------------

class Prompts:
    """Token ids for `compare`, from real text through the checkpoint's tokenizer, and the parity
    report computed while the numeric workers run."""

    def __init__(self, spec: ModelSpec, hf_dir, *, tiny_tokenizer: bool, python: str | None = None,
                 implementations=()):
        self.spec, self.hf_dir, self.tiny_tokenizer = spec, Path(hf_dir), tiny_tokenizer
        self.implementations = tuple(implementations)  # the compared ones (keras: its own tokenizer joins)
        # The interpreter whose transformers is compared (`hf@PYTHON`, a release of `matrix`):
        # parity runs there, so each release's tokenizer is the one judged. None: this one.
        self.python = None if python in (None, sys.executable) else python
        self._future = None

    def tokens(self, lengths) -> tuple[list[list[int]], dict] | None:
        """Prompts as ids ([BOS] + the reference's text ids, BOS per the spec), or None."""
        from llmdiff import inputs

        model_file = self.hf_dir / "tokenizer.model"
        if self.tiny_tokenizer and (self.spec.family in BPE_STYLES or sp_style(self.spec) is not None):
            if not (self.hf_dir / "tokenizer.json").exists():
                write_family_tokenizer(self.hf_dir, self.spec)
                as_published(self.hf_dir)
        elif self.tiny_tokenizer and not model_file.exists():
            model_file.write_bytes(train_tiny_sentencepiece(self.spec.text_vocab_size))
        if model_file.exists():
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(model_file))
            encode, name = sp.encode, "sentencepiece"
        elif (self.hf_dir / "tokenizer.json").exists():  # Llama 3, Qwen: the HF tokenizer's text path
            from llmdiff.tokenizer_encoders import HFEncoder

            try:
                encode, name = HFEncoder(self.hf_dir).encode_text, "hf"
                if not encode("a"):
                    return None
            except Exception:  # noqa: BLE001 - a tokenizer.json transformers cannot load: synthetic ids
                return None     # (parity, run later, reports why)
        else:
            return None
        prompts = inputs.text_prompts(self.spec, encode, lengths)
        if not self.spec.add_bos:  # Qwen: the text alone, no BOS in front
            prompts = [p[1:] for p in prompts]
        return prompts, {"source": "text", "tokenizer": name, "texts": list(inputs.TEXT_PROMPTS)}

    def start_parity(self):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="llmdiff-tokenizer")
        self._future = pool.submit(self._parity)
        pool.shutdown(wait=False)

    def _parity(self) -> dict:
        try:
            if self.tiny_tokenizer and self.spec.family not in BPE_STYLES and not (self.hf_dir / "tokenizer.json").exists():
                write_tiny_tokenizer_files(self.hf_dir, self.spec, (self.hf_dir / "tokenizer.model").read_bytes())
                as_published(self.hf_dir)
            if self.python:
                return parity_under(self.python, self.hf_dir, self.spec)
            return tokenizer_parity(self.hf_dir, self.spec, implementations=self.implementations)
        except Exception as e:  # noqa: BLE001 - reported in the report, never a lost comparison
            return {"error": f"{type(e).__name__}: {e}"}

    def parity(self) -> dict | None:
        return self._future.result() if self._future else None


def parity_under(python: str, path, spec: ModelSpec, timeout: float = 900) -> dict:
    """`tokenizer_parity` run by another interpreter (its own transformers and tokenizers): the
    spec goes in on stdin, the report comes back as JSON on stdout."""
    import os

    # llmdiff itself from where this one runs (an editable install's finder is not seen there).
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [root, os.environ.get("PYTHONPATH", "")] if p))
    proc = subprocess.run([python, "-m", "llmdiff.tokenizer", str(path)], input=json.dumps(spec.to_dict()),
                          capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(f"tokenizer parity under {python} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return json.loads(proc.stdout)


if __name__ == "__main__":  # parity_under's other end
    _spec = ModelSpec.from_dict(json.loads(sys.stdin.read()))
    json.dump(tokenizer_parity(sys.argv[1], _spec), sys.stdout)
