"""The tokenizer of `--tiny` checkpoints: a real one, a SentencePiece model trained here on
`llmdiff/data/tiny_tokenizer_corpus.txt` with Gemma's conventions, and the HF files built from
it by transformers' own converter (`write_tokenizer_files`).
"""

from __future__ import annotations

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
