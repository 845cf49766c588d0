"""Tokenizer implementations, each called through its own entry point, the way its users call it:

- `hf`: `AutoTokenizer.from_pretrained(path)` then `tokenizer(text)` (tokenizers-backed);
- `hf-slow`: `AutoTokenizer.from_pretrained(path, use_fast=False)`, when that still returns a
  SentencePiece-backed tokenizer (transformers 5.x returns the fast one: there is no slow Gemma
  tokenizer left, and this implementation is reported as unavailable, with that evidence);
- `sentencepiece`: `SentencePieceProcessor(model_file=tokenizer.model).encode(text)`, the
  reference (Google DeepMind's code calls exactly this);
- `deepmind`: Google DeepMind's `gemma` tokenizer, `encode(text)`, when importable;
- `tiktoken` (Llama 3's `original/tokenizer.model`, as Meta's code reads it) and `bpe-files`
  (Qwen's vocab.json and merges.txt, the slow tokenizer's algorithm): byte-level BPE references.
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
        # Quiet: AutoTokenizer reads config.json too, and transformers says on stderr what it
        # makes of the model's config (5.24: Gemma's `hidden_act: gelu`), which is the model
        # worker's business and llmdiff's checks', not the tokenizer's.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            self.tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False,
                                                     **({"use_fast": False} if slow else {}))
        finally:
            transformers.logging.set_verbosity(verbosity)
        if slow and self.tok.is_fast:
            self.available = False
            self.reason = (f"transformers {transformers.__version__} has no slow (SentencePiece- or Python-backed) tokenizer"
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


class ByteLevelBpeEncoder(Encoder):
    """A byte-level BPE (Llama 3, Qwen) read from the family's own files, the reference for its
    HF tokenizer.json:

    - `tiktoken`: Llama 3's `original/tokenizer.model`, "base64(token bytes) rank" lines, as
      Meta's `tokenizer.py` reads it (`tiktoken.Encoding` with the Llama 3 split pattern, text
      never parsed into special tokens); the same rule here when tiktoken is not installed: each
      pre-token whole if it is a token, else the adjacent pair whose bytes make the
      lowest-ranked token merged first;
    - `bpe-files`: Qwen's vocab.json and merges.txt, the algorithm of the slow `Qwen2Tokenizer`
      transformers 5 no longer ships (NFC, Qwen's split pattern, GPT-2's merges by rank).
    """

    def __init__(self, path: Path, spec: ModelSpec, kind: str):
        super().__init__()
        import json

        import regex

        from llmdiff.tiny_tokenizer import BPE_STYLES, byte_level_alphabet

        self.name, self.kind = kind, kind
        style = BPE_STYLES.get(spec.family) or BPE_STYLES["llama"]
        self.pattern, self.nfc = regex.compile(style.pattern), kind == "bpe-files" and style.nfc
        self.tiktoken = None
        if kind == "tiktoken":
            import base64

            self.ranks = {}
            for n, line in enumerate((path / "original" / "tokenizer.model").read_text().splitlines()):
                if line.strip():
                    token, rank = line.split()
                    self.ranks[base64.b64decode(token)] = int(rank)
            self.version = "llmdiff"
            try:
                import tiktoken

                self.tiktoken = tiktoken.Encoding("llmdiff-reference", pat_str=style.pattern,
                                                  mergeable_ranks=self.ranks, special_tokens={})
                self.version = f"tiktoken {tiktoken.__version__}"
            except Exception:  # noqa: BLE001 - not installed, or ranks it refuses: the rule here
                self.tiktoken = None
        else:
            alphabet = byte_level_alphabet()
            self.byte_char = alphabet
            self.char_byte = {c: b for b, c in alphabet.items()}
            vocab = json.loads((path / "vocab.json").read_text())
            lines = [ln for ln in (path / "merges.txt").read_text().splitlines() if ln and not ln.startswith("#version")]
            self.merge_rank = {tuple(ln.split(" ")): i for i, ln in enumerate(lines)}
            self.ranks = {bytes(self.char_byte[c] for c in t): i for t, i in vocab.items()
                          if all(c in self.char_byte for c in t)}
            self.version = "llmdiff"
        self.by_id = {i: b for b, i in self.ranks.items()}
        self.specials = _added_tokens(path)

    def encode(self, text):
        return self.encode_text(text)  # adds nothing: BOS is the caller's (Meta's `bos=True`)

    def encode_text(self, text):
        if self.tiktoken is not None:
            return list(self.tiktoken.encode(text, allowed_special=set(), disallowed_special=()))
        if self.nfc:
            import unicodedata

            text = unicodedata.normalize("NFC", text)
        out = []
        for piece in self.pattern.findall(text):
            data = piece.encode("utf-8")
            out += self._rank_merge(data) if self.kind == "tiktoken" else self._pair_merge(data)
        return out

    def _rank_merge(self, data: bytes) -> list[int]:
        if data in self.ranks:
            return [self.ranks[data]]
        parts = [data[i:i + 1] for i in range(len(data))]
        while len(parts) > 1:
            best = min(((self.ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)
                        if parts[i] + parts[i + 1] in self.ranks), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[p] for p in parts]

    def _pair_merge(self, data: bytes) -> list[int]:
        word = [self.byte_char[b] for b in data]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            first = min(pairs, key=lambda pair: self.merge_rank.get(pair, float("inf")))
            if first not in self.merge_rank:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == first:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return [self.ranks[bytes(self.char_byte[c] for c in t)] for t in word]

    def decode(self, ids):
        data = b"".join(self.by_id[i] if i in self.by_id else self.specials.get(i, "").encode() for i in ids)
        return data.decode("utf-8", errors="replace")

    def piece(self, i):
        if i in self.by_id:
            return self.by_id[i].decode("utf-8", errors="backslashreplace")
        return self.specials.get(i, str(i))


def _added_tokens(path: Path) -> dict[int, str]:
    """id -> content of tokenizer.json's added tokens (the special tokens a BPE file leaves out)."""
    import json

    f = path / "tokenizer.json"
    try:
        data = json.loads(f.read_text()) if f.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return {int(t["id"]): str(t["content"]) for t in data.get("added_tokens") or []
            if isinstance(t, dict) and isinstance(t.get("id"), int)}


def _is_tiktoken_file(f: Path) -> bool:
    """Meta's tiktoken format: "base64 rank" lines (a SentencePiece model is a protobuf)."""
    import base64
    import binascii

    try:
        with f.open("rb") as fh:
            first = fh.readline(4096).split()
        return len(first) == 2 and first[1].isdigit() and bool(base64.b64decode(first[0], validate=True))
    except (OSError, binascii.Error, ValueError):
        return False


def load_encoders(path, spec: ModelSpec, implementations=()) -> list[Encoder]:
    """Every implementation that exists for the checkpoint at `path`, reference first; those of
    `implementations` that live in virtualenvs of their own (keras) only when named there."""
    path = Path(path)
    out: list[Encoder] = []
    model_file = path / "tokenizer.model"
    if model_file.is_file() and _is_tiktoken_file(model_file):
        raise UsageError(f"{model_file} is a tiktoken file (Meta's format), not SentencePiece: Meta's HF repos"
                         " keep it as original/tokenizer.model")
    if model_file.is_file():
        out.append(SentencePieceEncoder(model_file))
    elif (path / "original" / "tokenizer.model").is_file() and _is_tiktoken_file(path / "original" / "tokenizer.model"):
        out.append(ByteLevelBpeEncoder(path, spec, "tiktoken"))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        out.append(ByteLevelBpeEncoder(path, spec, "bpe-files"))
    hf_files = [f for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model") if (path / f).is_file()]
    if hf_files:
        out.append(HFEncoder(path))
        out.append(HFEncoder(path, slow=True))
    if model_file.is_file():
        out.append(DeepMindEncoder(model_file, spec.family))
    if model_file.is_file() and "keras" in implementations:  # keras-hub's, run in the keras virtualenv
        from llmdiff.references.keras_gemma import keras_tokenizers

        out += keras_tokenizers(model_file, spec)
    if not out:
        raise UsageError(f"{path} holds no tokenizer (tokenizer.model or tokenizer.json)")
    return out
