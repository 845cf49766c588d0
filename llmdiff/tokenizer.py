"""Tokenizer and chat-template parity, before any numerics.

The same strings go through every tokenizer implementation a user actually calls, each through
its own entry point:

- `hf`: `AutoTokenizer.from_pretrained(path)` then `tokenizer(text)` (tokenizers-backed);
- `hf-slow`: `AutoTokenizer.from_pretrained(path, use_fast=False)`, when that still returns a
  SentencePiece-backed tokenizer (transformers 5.x returns the fast one: there is no slow Gemma
  tokenizer left, and this implementation is reported as unavailable, with that evidence);
- `sentencepiece`: `SentencePieceProcessor(model_file=tokenizer.model).encode(text)`, the
  reference (Google DeepMind's code calls exactly this);
- `deepmind`: Google DeepMind's `gemma` tokenizer, `encode(text)`, when importable.

Ids are compared with what each adds by default (BOS, EOS) taken off, and those additions are
recorded on their own. Then the checkpoint's HF `chat_template` is rendered through
transformers' own `apply_chat_template` for a few conversations and compared, as a string and
as ids, with the family's reference format. Checks `LD001`-`LD049` (`checks/`) turn the
evidence gathered here into findings.

The tiny checkpoints of `--tiny` get a real tokenizer: a SentencePiece model trained here on
`llmdiff/data/tiny_tokenizer_corpus.txt` with Gemma's conventions, and the HF files built from
it by transformers' own converter (`write_tokenizer_files`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import unicodedata
from pathlib import Path

from llmdiff.errors import UsageError
from llmdiff.spec import ModelSpec

DATA = Path(__file__).parent / "data"
TRAINING_CORPUS = DATA / "tiny_tokenizer_corpus.txt"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")
REFERENCE = "sentencepiece"

# Hard strings: each a known way for two tokenizers of the same model to part company.
CORPUS: tuple[tuple[str, str], ...] = (
    ("plain", "The quick brown fox jumps over the lazy dog."),
    ("leading-space", " Hello world"),
    ("leading-spaces", "   three leading spaces"),
    ("repeated-spaces", "a  b   c    d"),
    ("trailing-spaces", "trailing spaces   "),
    ("tabs", "col1\tcol2\t\tcol4"),
    ("newlines", "line one\nline two\n\nline four\n"),
    ("crlf", "windows\r\nline endings\r\n"),
    ("only-whitespace", " \t\n "),
    ("nfkc-fullwidth", "ＡＢＣ １２３"),
    ("nfkc-ligature", "ﬁnal ﬂow"),
    ("nfc-vs-nfd", "caf\u00e9 vs cafe\u0301"),
    ("angstrom-sign", "\u212b is not \u00c5"),
    ("non-breaking-space", "a\u00a0b\u2009c"),
    ("zero-width", "zero\u200bwidth\u200djoiner"),
    ("cjk", "東京は日本の首都です。今天天气很好。"),
    ("korean", "한국어 문장"),
    ("emoji", "Emoji 😀🎉👍 and a flag 🇫🇷 and a family 👨‍👩‍👧"),
    ("byte-fallback", "rare: \u0d9e \U0001d11e \u2603"),
    ("digits", "0123456789"),
    ("long-number", "3.14159265358979323846 and 1,234,567,890"),
    ("code", "def f(x):\n    return x ** 2  # square\n"),
    ("json", '{"key": [1, 2, 3], "nested": {"a": null}}'),
    ("long-word", "pneumonoultramicroscopicsilicovolcanoconiosis" * 3),
    ("turn-markers-in-text", "Say <start_of_turn> and <end_of_turn> literally."),
    ("bos-in-text", "a user wrote <bos> here"),
    ("eos-in-text", "and </s> or <eos> there"),
    ("empty", ""),
)

# Conversations rendered through the chat template (Gemma folds a system message into the first
# user turn: its content, a blank line, then the user's).
CONVERSATIONS: tuple[tuple[str, tuple[dict, ...], bool], ...] = (
    ("one-turn", ({"role": "user", "content": "What is the capital of France?"},), False),
    ("generation-prompt", ({"role": "user", "content": "Write a haiku about the sea."},), True),
    ("multi-turn", (
        {"role": "user", "content": "How many legs does a spider have?"},
        {"role": "assistant", "content": "Eight."},
        {"role": "user", "content": "And an ant?"},
    ), True),
    ("system-message", (
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Which colour is the sky?"},
    ), True),
)

# The Gemma chat template as the instruction-tuned checkpoints ship it (the Gemma 3 form, which
# folds a system message into the first user turn); written into tiny checkpoints.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def reference_chat(messages, add_generation_prompt: bool, family: str = "gemma") -> str:
    """The family's reference chat format, BOS not included (it is an id, not text).

    Gemma: `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…<end_of_turn>\\n`,
    the generation prompt `<start_of_turn>model\\n`; a system message is folded into the first
    user turn (google-deepmind/gemma `gm/text/_template.py`, the Gemma 3 model card).
    """
    if not family.startswith("gemma"):
        raise UsageError(f"no reference chat format for family {family!r}")
    messages = list(messages)
    prefix = ""
    if messages and messages[0]["role"] == "system":
        prefix = messages[0]["content"] + "\n\n"
        messages = messages[1:]
    out = []
    for i, m in enumerate(messages):
        role = "model" if m["role"] == "assistant" else m["role"]
        out.append(f"{START_OF_TURN}{role}\n{prefix if i == 0 else ''}{m['content'].strip()}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)


# --- the tiny tokenizer --------------------------------------------------------------------

def _training_options(vocab_size: int, control_turn_markers: bool) -> dict:
    """Gemma's SentencePiece conventions: BPE, pad 0 / eos 1 / bos 2 / unk 3, digits split, byte
    fallback, whitespace kept as is (no dummy prefix, no collapsing), no normalisation."""
    markers = ["<mask>", START_OF_TURN, END_OF_TURN]
    return dict(
        vocab_size=vocab_size, model_type="bpe", character_coverage=1.0,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        # In Gemma's tokenizer.model the turn markers are user-defined: matched in text like words.
        **({"control_symbols": markers} if control_turn_markers else {"user_defined_symbols": markers}),
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, add_dummy_prefix=False, normalization_rule_name="identity",
        max_sentencepiece_length=16, hard_vocab_limit=False,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2,
    )


def train_tiny_sentencepiece(vocab_size: int, *, control_turn_markers: bool = False,
                             corpus: Path = TRAINING_CORPUS) -> bytes:
    """A SentencePiece model with Gemma's conventions, trained on the shipped corpus.

    Deterministic (one thread, no sampling); cached in the temp dir keyed by the corpus and the
    options, so only the first call of a machine trains (about 10 ms anyway).
    """
    import sentencepiece as spm

    text = corpus.read_bytes()
    options = _training_options(vocab_size, control_turn_markers)
    key = hashlib.sha256(text + json.dumps(options, sort_keys=True).encode()
                         + spm.__version__.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "llmdiff-tokenizers" / f"tiny-{key}.model"
    if cache.exists():
        return cache.read_bytes()
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.decode("utf-8").splitlines()),
                                   model_writer=model, **options)
    _write_cache(cache, model.getvalue())
    return model.getvalue()


def _write_cache(path: Path, data: bytes) -> None:
    """Into the temp-dir cache, atomically: concurrent runs never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_tokenizer_files(path, spec: ModelSpec, *, sp_model: bytes | None = None, config: dict | None = None,
                          chat_template: str | None = GEMMA_CHAT_TEMPLATE, tokenizer_json: Path | None = None) -> Path:
    """Add a Gemma tokenizer to an HF checkpoint directory, as Google ships it.

    tokenizer.model (SentencePiece), tokenizer_config.json (with the chat template),
    special_tokens_map.json, and tokenizer.json from transformers' own converter
    (`GemmaConverter`, run by `AutoTokenizer` on a directory without tokenizer.json).
    `config` overrides tokenizer_config.json keys (tests' mutants); `tokenizer_json`, a file
    the converter already wrote for this tokenizer.model, skips the conversion.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if sp_model is None:
        sp_model = train_tiny_sentencepiece(spec.text_vocab_size)
    (path / "tokenizer.model").write_bytes(sp_model)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (path / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    tok_config = {"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                  **special, "padding_side": "left", "model_max_length": spec.max_positions}
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (path / "tokenizer.json").unlink(missing_ok=True)
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_bytes(Path(tokenizer_json).read_bytes())
    else:
        from transformers import AutoTokenizer

        converted = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # converts tokenizer.model
        converted.backend_tokenizer.save(str(path / "tokenizer.json"))
    if chat_template is not None:
        tok_config["chat_template"] = chat_template
    tok_config.update(config or {})
    (path / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return path


def write_tiny_tokenizer_files(path, spec: ModelSpec, sp_model: bytes) -> Path:
    """`write_tokenizer_files` for a tiny tokenizer.model, its tokenizer.json from the temp-dir
    cache (transformers' conversion, the slow part, runs once per model and transformers release)."""
    cached = _cached_tokenizer_json(sp_model)
    if cached.exists():
        return write_tokenizer_files(path, spec, sp_model=sp_model, tokenizer_json=cached)
    path = write_tokenizer_files(path, spec, sp_model=sp_model)
    _write_cache(cached, (path / "tokenizer.json").read_bytes())
    return path


def _cached_tokenizer_json(sp_model: bytes) -> Path:
    import transformers

    key = hashlib.sha256(sp_model + transformers.__version__.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "llmdiff-tokenizers" / f"tiny-{key}.tokenizer.json"


def write_tiny_checkpoint(path, spec: ModelSpec, canon: dict, **tokenizer_options) -> Path:
    """`weights.write_hf_checkpoint` plus the tiny tokenizer: a checkpoint that reads real text."""
    from llmdiff import weights

    path = weights.write_hf_checkpoint(path, spec, canon)
    write_tokenizer_files(path, spec, **tokenizer_options)
    return path


def has_tokenizer(path) -> bool:
    return path is not None and any((Path(path) / f).is_file() for f in TOKENIZER_FILES)


# --- implementations -----------------------------------------------------------------------

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


# --- comparison ----------------------------------------------------------------------------

def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _strip_added(ids: list[int], desc: dict) -> list[int]:
    """The ids of the text itself: what the implementation adds by default taken off."""
    p, s = desc.get("prefix") or [], desc.get("suffix") or []
    if p and ids[:len(p)] == p:
        ids = ids[len(p):]
    if s and ids[len(ids) - len(s):] == s:
        ids = ids[:len(ids) - len(s)]
    return ids


def classify(text: str, ids: list[int], ref_ids: list[int], decoded: str, ref_decoded: str, name: str,
             control_ids: set, role_ids: dict, split_special_tokens: bool) -> str:
    """What kind of difference two id sequences of the same text show.

    `control-token`: the implementation made a control token (bos, eos, pad...) out of text the
    reference encodes as text; `by-design` when that token is one of an HF tokenizer's named special
    tokens and `split_special_tokens` is off (transformers' documented default: written in text,
    `<bos>` is BOS, so that rendered chat templates work). `normalization`: one side no longer
    round-trips the text, or the text is one NFKC or whitespace handling changes and the decoded
    strings differ. `ids`: anything else (another segmentation of the same text).
    """
    extra = [i for i in set(ids) if i in control_ids and ids.count(i) > ref_ids.count(i)]
    if extra:
        parsed_by_hf = name.startswith("hf") and not split_special_tokens
        return "by-design" if parsed_by_hf and set(extra) <= set(role_ids.values()) else "control-token"
    if (decoded == text) != (ref_decoded == text) or (is_normalization_sensitive(text) and decoded != ref_decoded):
        return "normalization"
    return "ids"


def compare_strings(encoders: list[Encoder], descriptions: dict, strings, spec: ModelSpec,
                    control_ids=frozenset(), role_ids=None, split_special_tokens=False) -> list[dict]:
    ref = encoders[0]
    others = [e for e in encoders[1:] if e.available]
    results = []
    for name, text in strings:
        ref_ids = ref.encode_text(text)
        entry = {"name": name, "text": text, "ids": {ref.name: ref_ids},
                 "decoded": {ref.name: ref.decode(ref_ids)}, "status": "agree", "differences": []}
        for enc in others:
            ids = _strip_added(enc.encode(text), descriptions[enc.name])
            entry["ids"][enc.name] = ids
            entry["decoded"][enc.name] = enc.decode(ids)
            at = _first_difference(ids, ref_ids)
            if at is None:
                continue
            kind = classify(text, ids, ref_ids, entry["decoded"][enc.name], entry["decoded"][ref.name], enc.name,
                            set(control_ids), role_ids or {}, split_special_tokens)
            if kind != "by-design" or entry["status"] == "agree":
                entry["status"] = "by-design" if kind == "by-design" else "differ"
            lo = max(0, at - 3)
            entry["differences"].append({
                "implementation": enc.name, "reference": ref.name, "kind": kind, "index": at,
                "ids": ids[lo:at + 4], "reference_ids": ref_ids[lo:at + 4], "context_start": lo,
                "pieces": [enc.piece(i) for i in ids[lo:at + 4]],
                "reference_pieces": [ref.piece(i) for i in ref_ids[lo:at + 4]],
                "round_trip": entry["decoded"][enc.name] == text,
                "reference_round_trip": entry["decoded"][ref.name] == text,
            })
        results.append(entry)
    return results


def compare_chat(hf: HFEncoder | None, ref: Encoder | None, spec: ModelSpec) -> dict:
    """Render the checkpoint's chat template for each conversation; compare with the reference."""
    if hf is None or not getattr(hf.tok, "chat_template", None):
        return {"present": False, "conversations": []}
    out = []
    for name, messages, gen in CONVERSATIONS:
        want = reference_chat(messages, gen, spec.family)
        entry = {"name": name, "add_generation_prompt": gen, "reference": want}
        try:
            rendered = hf.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)
            ids = list(hf.tok.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=gen,
                                                  return_dict=True)["input_ids"])
        except Exception as e:  # noqa: BLE001 - a template that raises is evidence, not a crash
            entry.update({"status": "error", "error": f"{type(e).__name__}: {e}"})
            out.append(entry)
            continue
        want_ids = [spec.bos_id] + (ref.encode_text(want) if ref is not None else hf.encode_text(want))
        leading_bos = 0
        while leading_bos < len(ids) and ids[leading_bos] == spec.bos_id:
            leading_bos += 1
        text = rendered
        bos_text = hf.tok.bos_token or "<bos>"
        while text.startswith(bos_text):
            text = text[len(bos_text):]
        at = next((i for i, (x, y) in enumerate(zip(text, want)) if x != y),
                  None if len(text) == len(want) else min(len(text), len(want)))
        entry.update({
            "rendered": rendered, "ids": ids, "reference_ids": want_ids, "leading_bos": leading_bos,
            "status": "agree" if at is None and ids == want_ids else "differ",
            "string_difference": None if at is None else {
                "index": at, "rendered": text[max(0, at - 20):at + 20], "reference": want[max(0, at - 20):at + 20]},
            "ids_difference": _first_difference(ids, want_ids),
        })
        out.append(entry)
    return {"present": True, "conversations": out,
            "end_of_turn_ids": {"hf": hf.encode_text(END_OF_TURN),
                                **({ref.name: ref.encode_text(END_OF_TURN)} if ref is not None else {})}}


def tokenizer_parity(path, spec: ModelSpec, extra_strings=()) -> dict:
    """Evidence for the LD0xx checks: implementations, per-string ids, chat template."""
    import time

    t0 = time.perf_counter()
    encoders = load_encoders(path, spec)
    descriptions = {e.name: e.describe(spec) for e in encoders}
    strings = list(CORPUS) + list(extra_strings)
    ref = encoders[0]
    if ref.name != REFERENCE:  # no tokenizer.model: the HF tokenizer's text path is the reference
        ref = next(e for e in encoders if e.available)
    ordered = [ref] + [e for e in encoders if e is not ref]
    hf = next((e for e in encoders if e.name == "hf"), None)
    role_ids = hf.special_role_ids() if hf else {}
    control_ids = (sorted(ref.control_ids()) if isinstance(ref, SentencePieceEncoder)
                   else sorted({spec.bos_id, spec.eos_id, spec.pad_id}))
    split = bool(getattr(hf.tok, "split_special_tokens", False)) if hf else False
    report = {
        "path": str(path), "reference": ref.name,
        "implementations": [descriptions[e.name] for e in ordered],
        "spec_ids": {"bos": spec.bos_id, "eos": spec.eos_id, "pad": spec.pad_id},
        "control_ids": control_ids, "special_role_ids": role_ids, "split_special_tokens": split,
        "config": _tokenizer_config(path),
        "strings": compare_strings(ordered, descriptions, strings, spec, control_ids, role_ids, split),
        "chat": compare_chat(hf, ref if isinstance(ref, SentencePieceEncoder) else None, spec),
    }
    report["agree"] = all(s["status"] != "differ" for s in report["strings"])
    report["notes"] = notes(report)
    report["timings"] = {"total_s": round(time.perf_counter() - t0, 3)}
    return report


def _tokenizer_config(path) -> dict:
    """The keys of tokenizer_config.json that decide BOS/EOS (not every transformers release
    reads them: 5.x keeps tokenizer.json's post-processor, 4.x rebuilds it from these)."""
    f = Path(path) / "tokenizer_config.json"
    try:
        config = json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: config[k] for k in ("add_bos_token", "add_eos_token", "bos_token", "eos_token") if k in config}


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


def is_normalization_sensitive(text: str) -> bool:
    """Text that NFKC or whitespace handling would change."""
    return (unicodedata.normalize("NFKC", text) != text or "  " in text or "\t" in text or "\r" in text
            or text != text.strip() or "\n" in text)


def notes(report: dict) -> list[str]:
    """What differs by design, not by bug: said once, not counted against parity."""
    out = []
    by_design = [s for s in report["strings"] if s["status"] == "by-design"]
    if by_design:
        d = next(d for d in by_design[0]["differences"] if d["kind"] == "by-design")
        out.append(f"{d['implementation']} turns special tokens written in text into their ids"
                   f" ({', '.join(s['name'] for s in by_design)}: e.g. {d['pieces']} vs {d['reference']}"
                   f" {d['reference_pieces']}): transformers' default (split_special_tokens=False);"
                   " pass split_special_tokens=True, or apply_chat_template(sanitize_control_tokens=True),"
                   " for untrusted text")
    for c in report["chat"].get("conversations", []):
        if c.get("status") == "error" and c["name"] == "system-message":
            out.append(f"the chat template refuses a system message ({c['error']}); Gemma's reference"
                       " format folds it into the first user turn")
    return out


def differences_of_kind(report: dict, kind: str) -> dict[str, list[tuple[dict, dict]]]:
    """{implementation: [(string entry, difference), ...]} for the differences of one kind."""
    out: dict[str, list] = {}
    for s in report["strings"]:
        for d in s["differences"]:
            if d["kind"] == kind:
                out.setdefault(d["implementation"], []).append((s, d))
    return out


def describe_difference(s: dict, d: dict) -> str:
    return (f"{s['name']!r} at token {d['index']}: {d['implementation']} {d['ids']} {d['pieces']}"
            f" vs {d['reference']} {d['reference_ids']} {d['reference_pieces']}")


GENERATION_PROMPT = f"{START_OF_TURN}model\n"


def chat_difference_kind(c: dict) -> str | None:
    """What is wrong with one rendered conversation, if anything (BOS is LD001/LD002's business).

    `end-of-turn`: turns end with something other than `<end_of_turn>`; `generation-prompt`:
    the first difference lies in the generation prompt `<start_of_turn>model\\n`; `template`:
    any other difference in the string or its ids, or a template that raises on an ordinary
    conversation (raising on a system message is a note: Gemma 1 and 2 templates do).
    """
    if c.get("status") == "error":
        return None if c["name"] == "system-message" else "template"
    if c.get("status") != "differ":
        return None
    sd = c.get("string_difference")
    if sd is not None:
        want, rendered = c["reference"], c["rendered"]
        if rendered.count(END_OF_TURN) != want.count(END_OF_TURN):
            return "end-of-turn"
        if c["add_generation_prompt"] and sd["index"] >= len(want) - len(GENERATION_PROMPT):
            return "generation-prompt"
        return "template"
    nb = c.get("leading_bos") or 0
    return "template" if c["ids"][nb:] != c["reference_ids"][1:] else None


def chat_differences(report: dict, kind: str) -> list[dict]:
    return [c for c in (report.get("chat") or {}).get("conversations", []) if chat_difference_kind(c) == kind]


def describe_chat(c: dict) -> str:
    if c.get("status") == "error":
        return f"{c['name']}: the template raises {c['error']}"
    sd = c.get("string_difference")
    if sd:
        return f"{c['name']}: renders {sd['rendered']!r} where the reference has {sd['reference']!r}"
    return f"{c['name']}: ids {c['ids'][:12]} vs reference {c['reference_ids'][:12]}"


# --- for `compare`: prompts from real text, parity in the background -----------------------

class Prompts:
    """Token ids for `compare`, from real text through the checkpoint's tokenizer, and the parity
    report computed while the numeric workers run."""

    def __init__(self, spec: ModelSpec, hf_dir, *, tiny_tokenizer: bool):
        self.spec, self.hf_dir, self.tiny_tokenizer = spec, Path(hf_dir), tiny_tokenizer
        self._future = None

    def tokens(self, lengths) -> tuple[list[list[int]], dict] | None:
        """Prompts as ids ([BOS] + the reference's text ids, BOS per the spec), or None."""
        from llmdiff import inputs

        model_file = self.hf_dir / "tokenizer.model"
        if self.tiny_tokenizer and not model_file.exists():
            model_file.write_bytes(train_tiny_sentencepiece(self.spec.text_vocab_size))
        if not model_file.exists():
            return None
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_file))
        prompts = inputs.text_prompts(self.spec, sp.encode, lengths)
        return prompts, {"source": "text", "tokenizer": "sentencepiece", "texts": list(inputs.TEXT_PROMPTS)}

    def start_parity(self):
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1, thread_name_prefix="llmdiff-tokenizer")
        self._future = pool.submit(self._parity)
        pool.shutdown(wait=False)

    def _parity(self) -> dict:
        try:
            if self.tiny_tokenizer and not (self.hf_dir / "tokenizer.json").exists():
                write_tiny_tokenizer_files(self.hf_dir, self.spec, (self.hf_dir / "tokenizer.model").read_bytes())
            return tokenizer_parity(self.hf_dir, self.spec)
        except Exception as e:  # noqa: BLE001 - reported in the report, never a lost comparison
            return {"error": f"{type(e).__name__}: {e}"}

    def parity(self) -> dict | None:
        return self._future.result() if self._future else None


def findings(report: dict, checks, spec: ModelSpec) -> list:
    """The LD0xx findings on a parity report (static checks reading `details["tokenizer"]`)."""
    from llmdiff.check import Context

    ctx = Context(spec, "tokenizer", {"tokenizer": report})
    out = []
    for check in checks:
        if check.kind == "static" and check.code.startswith("LD0") and check.applies(spec):
            out.extend(check.run(ctx))
    return out


def summary_lines(report: dict | None) -> list[str]:
    """What the top of a compare report says about the tokenizers (plain text with rich markup)."""
    if not report:
        return []
    if "error" in report:
        return [f"[red]tokenizer parity could not run[/red]: {report['error']}"]
    impls = [i["name"] for i in report["implementations"] if i["available"]]
    absent = [i["name"] for i in report["implementations"] if not i["available"]]
    differ = [s for s in report["strings"] if s["status"] == "differ"]
    chat = report.get("chat") or {}
    chat_bad = [c for c in chat.get("conversations", []) if chat_difference_kind(c)]
    lines = []
    head = (f"tokenizers {', '.join(impls)} on {len(report['strings'])} strings: "
            + ("[green]agree[/green]" if not differ else f"[red]{len(differ)} differ[/red]"))
    if chat.get("present"):
        head += ("; chat template " + ("[green]matches the reference format[/green]" if not chat_bad
                                       else f"[red]{len(chat_bad)} conversation(s) differ[/red]"))
    else:
        head += "; no chat template"
    lines.append(head)
    for s in differ[:5]:
        for d in s["differences"]:
            if d["kind"] != "by-design":
                lines.append(f"  [red]{d['kind']}[/red] {describe_difference(s, d)}")
    for c in chat_bad[:3]:
        lines.append(f"  [red]{chat_difference_kind(c)}[/red] {describe_chat(c)}")
    bos = {i["name"]: i.get("adds_bos") for i in report["implementations"] if i["available"]}
    lines.append("  adds BOS by default: " + ", ".join(f"{k} {'yes' if v == 1 else 'no' if not v else v}"
                                                      for k, v in bos.items()))
    if absent:
        lines.append("  [dim]not run: " + "; ".join(
            f"{i['name']} ({i['reason']})" for i in report["implementations"] if not i["available"]) + "[/dim]")
    for n in report.get("notes", []):
        lines.append(f"  [dim]note: {n}[/dim]")
    return lines


def check_tokenizer(model: str, *, tiny: bool = False, weights=None, text=None, select=(), ignore=()) -> dict:
    """`llmdiff tokenize`: parity of every tokenizer implementation of a checkpoint, its chat
    template against the family's reference format, and the LD0xx findings. Exit code in the
    report: 0 agreement, 1 findings."""
    from llmdiff import __version__, registry
    from llmdiff.spec import get_spec

    spec = get_spec(model, tiny=tiny)
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
            path = write_tiny_tokenizer_files(Path(tmp), spec, train_tiny_sentencepiece(spec.text_vocab_size))
            source = {"source": "tiny", "path": None}
        else:
            raise UsageError(f"no tokenizer for {model}: pass --weights DIR (a checkpoint with tokenizer.model or"
                             " tokenizer.json) or --tiny for the built-in tiny tokenizer")
        parity = tokenizer_parity(path, spec, extra)
    parity["path"] = source["path"]
    found = [f.to_dict() for f in findings(parity, checks, spec)]
    return {"llmdiff_version": __version__, "model": spec.name, "tiny": spec.tiny, "tokenizer_source": source,
            "tokenizer": parity, "findings": found, "checks": {"broken": [str(b) for b in broken]},
            "exit_code": 1 if found else 0}


def render(report: dict, console) -> None:
    """The terminal view of `llmdiff tokenize`."""
    parity = report["tokenizer"]
    console.print(f"[bold]llmdiff {report['llmdiff_version']}[/bold]  tokenizer of [bold]{report['model']}[/bold]"
                  f"{' (tiny)' if report['tiny'] else ''}  reference {parity['reference']}")
    for i in parity["implementations"]:
        if i["available"]:
            console.print(f"  {i['name']:<14} {i['version'] or '':<10} default {i['probe']!r} -> {i['probe_ids']}"
                          f"  (adds BOS: {'yes' if i['adds_bos'] else 'no'}, EOS: {'yes' if i['adds_eos'] else 'no'})")
    for line in summary_lines(parity):
        console.print(line)
    for f in report["findings"]:
        console.print(f"  [bold]{f['code']}[/bold] {f['name']}  {f['implementation']} at {f['where']}")
        console.print(f"      {f['message']}")
        if f.get("fix"):
            console.print(f"      fix: {f['fix']}")
    code = report["exit_code"]
    console.print(f"\nexit code {code} ({'agreement' if code == 0 else 'findings'})")
