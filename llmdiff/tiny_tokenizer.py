"""The tokenizer of `--tiny` checkpoints: a real one, a SentencePiece model trained here on
`llmdiff/data/tiny_tokenizer_corpus.txt` with Gemma's conventions, and the HF files built from
it by transformers' own converter (`write_tokenizer_files`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

from llmdiff.spec import ModelSpec
from llmdiff.tokenizer_parity import END_OF_TURN, START_OF_TURN

DATA = Path(__file__).parent / "data"
TRAINING_CORPUS = DATA / "tiny_tokenizer_corpus.txt"

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


# --- Llama 3 and Qwen: byte-level BPE ---------------------------------------------------------
# The tiny tokenizers of the Llama-like families: a byte-level BPE trained here with the
# `tokenizers` library on the same corpus, with the family's pre-tokenizer (split pattern) and
# special tokens, saved through transformers' own classes (`PreTrainedTokenizerFast` as Meta's
# HF repos ship Llama 3, `Qwen2Tokenizer` built from vocab.json and merges.txt as Qwen ships
# them). Llama 3 also gets Meta's own format, `original/tokenizer.model` (tiktoken: one
# "base64(token bytes) rank" line per token, special tokens left to the code), the reference
# its `tokenizer.py` reads.

# Meta's llama-models `tokenizer.py` and transformers' Llama 3 tokenizer.json.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# transformers' `tokenization_qwen2.PRETOKENIZE_REGEX` (digits one by one); NFC first.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3 Instruct's format (meta-llama/Llama-3.1-8B-Instruct's template without its tools and
# dates): each message its own turn, content trimmed.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)
# ChatML as Qwen3 ships it (no default system message, no BOS).
CHATML_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


@dataclasses.dataclass(frozen=True)
class BpeStyle:
    """A family's byte-level BPE conventions. `specials` take ids 0, 1, 2... in this order: the
    tiny specs' pad 0 / eos 1 / bos 2 are theirs."""

    name: str
    pattern: str
    nfc: bool
    specials: tuple[str, ...]
    bos: str | None          # what the tokenizer adds in front (None: nothing)
    eos: str
    pad: str | None
    chat_template: str


BPE_STYLES = {
    "llama": BpeStyle("llama3", LLAMA3_PATTERN, False,
                      ("<|finetune_right_pad_id|>", "<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>",
                       "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"),
                      "<|begin_of_text|>", "<|end_of_text|>", None, LLAMA3_CHAT_TEMPLATE),
    # Qwen adds no BOS; id 2 (the tiny specs' bos) is a special token no chat uses.
    "qwen2": BpeStyle("qwen2", QWEN2_PATTERN, True,
                      ("<|endoftext|>", "<|im_end|>", "<|object_ref_start|>", "<|im_start|>"),
                      None, "<|im_end|>", "<|endoftext|>", CHATML_CHAT_TEMPLATE),
}
BPE_STYLES["qwen3"] = BPE_STYLES["qwen2"]


def has_tiny_tokenizer(spec: ModelSpec) -> bool:
    from llmdiff.spec import GEMMA_FAMILIES

    return spec.family in GEMMA_FAMILIES or spec.family in BPE_STYLES


def train_tiny_bpe(spec: ModelSpec, *, corpus: Path = TRAINING_CORPUS) -> str:
    """tokenizer.json (a string) of a byte-level BPE in `spec`'s family's style, trained on the
    shipped corpus: deterministic, cached in the temp dir like `train_tiny_sentencepiece`."""
    import tokenizers
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    style = BPE_STYLES[spec.family]
    text = corpus.read_bytes()
    key = hashlib.sha256(text + repr((style, spec.text_vocab_size)).encode()
                         + tokenizers.__version__.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "llmdiff-tokenizers" / f"tiny-bpe-{key}.json"
    if cache.exists():
        return cache.read_text()
    tok = Tokenizer(models.BPE(ignore_merges=style.name == "llama3"))
    if style.nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(style.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.text_vocab_size, special_tokens=list(style.specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.decode("utf-8").splitlines(), trainer)
    out = tok.to_str()
    _write_cache(cache, out.encode())
    return out


def bytes_of_token(token: str) -> bytes:
    """A byte-level BPE token (GPT-2's printable stand-ins for bytes) as the bytes it means."""
    decode = {c: b for b, c in byte_level_alphabet().items()}
    return bytes(decode[c] for c in token)


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's `bytes_to_unicode`: byte -> the printable character that stands for it."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, n = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + n)
            n += 1
    return out


def write_bpe_tokenizer_files(path, spec: ModelSpec, *, tokenizer_json: str | None = None,
                              chat_template: str | None = "family", config: dict | None = None) -> Path:
    """A Llama 3 or Qwen tokenizer in an HF checkpoint directory, written by transformers'
    `save_pretrained` (tokenizer.json, tokenizer_config.json with the chat template), plus the
    family's other published files: Llama 3's `original/tokenizer.model` (tiktoken format), Qwen's
    vocab.json and merges.txt. `config` overrides tokenizer_config.json keys (tests' mutants)."""
    import base64

    from tokenizers import Tokenizer, processors

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    style = BPE_STYLES[spec.family]
    data = json.loads(tokenizer_json or train_tiny_bpe(spec))
    vocab, merges = data["model"]["vocab"], [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    template = style.chat_template if chat_template == "family" else chat_template
    if style.name == "qwen2":
        from transformers import Qwen2Tokenizer

        (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
        (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tok = Qwen2Tokenizer(vocab=dict(vocab), merges=[tuple(m.split(" ")) for m in merges],
                             eos_token=style.eos, pad_token=style.pad,
                             unk_token=None, bos_token=None, errors="replace",
                             extra_special_tokens=[t for t in style.specials if t not in (style.eos, style.pad)])
    else:
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer.from_str(json.dumps(data))
        bos_id = vocab[style.bos]
        backend.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{style.bos}:0 $A:0", pair=f"{style.bos}:0 $A:0 {style.bos}:1 $B:1",
                                          special_tokens=[(style.bos, bos_id)])])
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=style.bos, eos_token=style.eos,
                                      model_input_names=["input_ids", "attention_mask"], clean_up_tokenization_spaces=False)
        # Meta's own file: the ranks of every token but the special ones (its code adds those).
        specials = set(style.specials)
        lines = [f"{base64.b64encode(bytes_of_token(t)).decode()} {i}"
                 for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in specials]
        (path / "original").mkdir(exist_ok=True)
        (path / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok.model_max_length = spec.max_positions
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(path))
    if config:
        f = path / "tokenizer_config.json"
        f.write_text(json.dumps({**json.loads(f.read_text()), **config}, indent=2) + "\n")
    return path
