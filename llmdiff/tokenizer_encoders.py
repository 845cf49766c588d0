"""Tokenizer implementations, each called through its own entry point, the way its users call it:

- `hf`: `AutoTokenizer.from_pretrained(path)` then `tokenizer(text)` (tokenizers-backed);
- `hf-slow`: `AutoTokenizer.from_pretrained(path, use_fast=False)`, when that still returns a
  SentencePiece-backed tokenizer (transformers 5.x returns the fast one: there is no slow Gemma
  tokenizer left, and this implementation is reported as unavailable, with that evidence);
- `sentencepiece`: `SentencePieceProcessor(model_file=tokenizer.model).encode(text)`, the
  reference (Google DeepMind's code calls exactly this);
- `deepmind`: Google DeepMind's `gemma` tokenizer, `encode(text)`, when importable.
"""

from __future__ import annotations

from pathlib import Path

from llmdiff.errors import UsageError
from llmdiff.spec import ModelSpec


class Encoder:
    """One tokenizer implementation, called the way its users call it."""

    name = ""

    def __init__(self):
        self.available, self.reason, self.version = True, None, None

    def encode(self, text: str) -> list[int]:  # the default path: what a user gets
        raise NotImplementedError

    def encode_text(self, text: str) -> list[int]:  # text only, nothing added
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def piece(self, i: int) -> str:
        return str(i)

    def describe(self, spec: ModelSpec) -> dict:
        probe = "a" if self.available else None
        out = {"name": self.name, "available": self.available, "reason": self.reason, "version": self.version}
        if probe:
            full, text = self.encode(probe), self.encode_text(probe)
            start = _find(full, text)
            prefix, suffix = (full[:start], full[start + len(text):]) if start >= 0 else (full, [])
            out.update({"probe": probe, "probe_ids": full, "prefix": prefix, "suffix": suffix,
                        "adds_bos": prefix.count(spec.bos_id), "adds_eos": suffix.count(spec.eos_id)})
        return out


def _find(seq: list, sub: list) -> int:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


class SentencePieceEncoder(Encoder):
    name = "sentencepiece"

    def __init__(self, model_file: Path):
        super().__init__()
        import sentencepiece as spm

        self.version = spm.__version__
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))

    def encode(self, text):
        return self.sp.encode(text)  # adds nothing by default (add_bos=False)

    encode_text = encode

    def decode(self, ids):
        return self.sp.decode(list(ids))

    def piece(self, i):
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else str(i)

    def control_ids(self) -> set[int]:
        return {i for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)}


class HFEncoder(Encoder):
    def __init__(self, path: Path, slow: bool = False):
        super().__init__()
        self.name = "hf-slow" if slow else "hf"
        import transformers
        from transformers import AutoTokenizer

        self.version = transformers.__version__
        # Never the checkpoint's own code: transformers would otherwise ask on stdin (or run it).
        self.tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False,
                                                 **({"use_fast": False} if slow else {}))
        if slow and self.tok.is_fast:
            self.available = False
            self.reason = (f"transformers {transformers.__version__} has no SentencePiece-backed (slow) tokenizer"
                           f" for this checkpoint: AutoTokenizer(use_fast=False) returned"
                           f" {type(self.tok).__name__}, a fast one")

    def encode(self, text):
        return list(self.tok(text)["input_ids"])

    def encode_text(self, text):
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids):
        return self.tok.decode(list(ids))

    def piece(self, i):
        p = self.tok.convert_ids_to_tokens(int(i))
        return str(p)

    def special_role_ids(self) -> dict[str, int]:
        """The ids of the tokenizer's named special tokens (bos, eos, pad, unk, mask)."""
        out = {}
        for role in ("bos", "eos", "pad", "unk", "mask"):
            i = getattr(self.tok, f"{role}_token_id", None)
            if i is not None:
                out[role] = int(i)
        return out


class DeepMindEncoder(Encoder):
    name = "deepmind"

    def __init__(self, model_file: Path, family: str):
        super().__init__()
        import importlib.util

        if importlib.util.find_spec("gemma") is None:
            self.available, self.reason = False, ("Google DeepMind's gemma is not importable here (it lives in its"
                                                  " own virtualenv: python -m llmdiff.references.deepmind_gemma install)")
            return
        try:
            from gemma import gm

            cls = gm.text.Gemma3Tokenizer if family == "gemma3" else gm.text.Gemma2Tokenizer
            self.tok = cls(path=str(model_file))
            self.version = getattr(__import__("gemma"), "__version__", None)
        except Exception as e:  # noqa: BLE001 - an optional implementation never stops the others
            self.available, self.reason = False, f"cannot load DeepMind's tokenizer: {type(e).__name__}: {e}"

    def encode(self, text):
        return [int(i) for i in self.tok.encode(text)]

    encode_text = encode

    def decode(self, ids):
        return self.tok.decode(list(ids))


def load_encoders(path, spec: ModelSpec) -> list[Encoder]:
    """Every implementation that exists for the checkpoint at `path`, reference first."""
    path = Path(path)
    out: list[Encoder] = []
    model_file = path / "tokenizer.model"
    if model_file.is_file():
        out.append(SentencePieceEncoder(model_file))
    hf_files = [f for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model") if (path / f).is_file()]
    if hf_files:
        out.append(HFEncoder(path))
        out.append(HFEncoder(path, slow=True))
    if model_file.is_file():
        out.append(DeepMindEncoder(model_file, spec.family))
    if not out:
        raise UsageError(f"{path} holds no tokenizer (tokenizer.model or tokenizer.json)")
    return out
