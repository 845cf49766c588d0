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
    text = corpus.read_bytes()
    options = _training_options(vocab_size, control_turn_markers)
    return _trained(text, options, "tiny")


def _trained(text: bytes, options: dict, prefix: str) -> bytes:
    """A SentencePiece model trained on `text` with `options`, cached by their hash (and
    sentencepiece's version) in the temp directory: the same bytes every time."""
    import sentencepiece as spm

    key = hashlib.sha256(text + json.dumps(options, sort_keys=True).encode()
                         + spm.__version__.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "llmdiff-tokenizers" / f"{prefix}-{key}.model"
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

    return spec.family in GEMMA_FAMILIES or spec.family in BPE_STYLES or sp_style(spec) is not None


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


# --- Mistral and Phi-3: Llama's SentencePiece BPE ----------------------------------------------
# Mistral 7B and Phi-3 mini ship Llama 2's kind of tokenizer.model (BPE, byte fallback, digits
# split, a dummy `▁` prefix, whitespace kept, no normalisation, <unk> <s> </s> its first pieces)
# and a tokenizer.json in the layout transformers' `LlamaConverter` wrote for them (legacy: a
# `Prepend("▁")` + `Replace(" ", "▁")` normalizer, no pre-tokenizer, BOS from the post-processor),
# which encodes every stretch of text between special tokens as SentencePiece does. The tiny ones:
# trained here on the same corpus, the tiny specs' ids (unk 0, eos 1, bos 2), and the family's
# special tokens: Mistral v0.3's control pieces in tokenizer.model ([INST] at 3...; the released
# model has 768 of them, [control_N] past the named ones), Phi-3's chat tokens added on top of
# tokenizer.model in tokenizer.json only (as its added_tokens.json). Phi-3's EOS, <|endoftext|>,
# is the tiny tokenizer.model's EOS piece (id 1, the tiny spec's eos): the released model's is an
# added token (32000), and its unused `</s>` (2) a special token HF parses in text.

# mistralai/Mistral-7B-Instruct-v0.1's template as first published: raises on a system message,
# `[INST] ` + content + ` [/INST]`, the answer followed by EOS and a space.
MISTRAL_V1_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# mistralai/Mistral-7B-Instruct-v0.3's template without its tool-call branches: [INST] and [/INST]
# control tokens, the system message put in front of the last user message, answers trimmed after
# one space.
MISTRAL_V3_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('After the optional system message, conversation roles must alternate"
    " user/assistant/user/assistant/...') -}}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.last and system_message is defined -%}"
    "{{- '[INST] ' + system_message + '\n\n' + message['content'] + '[/INST]' -}}"
    "{%- else -%}{{- '[INST] ' + message['content'] + '[/INST]' -}}{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + message['content'] | trim + eos_token -}}"
    "{%- else -%}{{- raise_exception('Only user and assistant roles are supported, with the exception of an"
    " initial optional system message!') -}}{%- endif -%}"
    "{%- endfor -%}"
)
# microsoft/Phi-3-mini-4k-instruct's template since May 2024 (Phi-3.5 mini's has the same turns),
# with `{{ bos_token }}` in front as the April 2024 release wrote it: the later one writes no BOS,
# and `apply_chat_template(tokenize=True)` (which adds no special tokens) then gives chats
# without <s> -- LD001 on the published file (a test shows it).
PHI3_PUBLISHED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
PHI3_CHAT_TEMPLATE = "{{ bos_token }}" + PHI3_PUBLISHED_CHAT_TEMPLATE

MISTRAL_V3_CONTROL = ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                      "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[control_8]", "[control_9]")
# Phi-3's added_tokens.json, ids 32001-32010 in the released model (32000 is <|endoftext|>).
PHI3_ADDED = ("<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>")


@dataclasses.dataclass(frozen=True)
class SpStyle:
    """A family's Llama-style SentencePiece conventions."""

    name: str
    control: tuple[str, ...]    # CONTROL pieces of tokenizer.model, after <unk> </s> <s>
    added: tuple[str, ...]      # special tokens tokenizer.json adds after tokenizer.model's pieces
    eos: str                    # tokenizer.model's EOS piece (id 1)
    pad: str | None
    chat_template: str


SP_STYLES = {
    "mistral-v1": SpStyle("mistral-v1", (), (), "</s>", None, MISTRAL_V1_CHAT_TEMPLATE),
    "mistral-v3": SpStyle("mistral-v3", MISTRAL_V3_CONTROL, (), "</s>", None, MISTRAL_V3_CHAT_TEMPLATE),
    "phi3": SpStyle("phi3", (), PHI3_ADDED, "<|endoftext|>", "<|endoftext|>", PHI3_CHAT_TEMPLATE),
}


def sp_style(spec: ModelSpec) -> SpStyle | None:
    """The Llama-style SentencePiece conventions of `spec`'s family (None: not one of those)."""
    if spec.family == "mistral":
        return SP_STYLES["mistral-v3" if spec.name.endswith("v0.3") else "mistral-v1"]
    return SP_STYLES.get(spec.family)


def train_tiny_llama_sentencepiece(spec: ModelSpec, *, corpus: Path = TRAINING_CORPUS) -> bytes:
    """tokenizer.model of `spec`'s family (Llama's conventions), trained on the shipped corpus:
    deterministic, cached in the temp dir like `train_tiny_sentencepiece`."""
    style = sp_style(spec)
    text = corpus.read_bytes()
    options = dict(
        vocab_size=spec.text_vocab_size - len(style.added), model_type="bpe", character_coverage=1.0,
        unk_id=0, eos_id=1, bos_id=2, pad_id=-1, unk_piece="<unk>", eos_piece=style.eos, bos_piece="<s>",
        **({"control_symbols": list(style.control)} if style.control else {}),
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        add_dummy_prefix=True, normalization_rule_name="identity", max_sentencepiece_length=16, hard_vocab_limit=False,
        num_threads=1, shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2)
    return _trained(text, options, "tiny-llama-sp")


def write_llama_sp_tokenizer_files(path, spec: ModelSpec, *, sp_model: bytes | None = None,
                                   chat_template: str | None = "family", config: dict | None = None) -> Path:
    """A Mistral or Phi-3 tokenizer in an HF checkpoint directory: tokenizer.model, and the
    tokenizer.json of transformers' `LlamaConverter` in the released repos' (legacy) layout, saved
    by transformers' `save_pretrained` with the family's special tokens and chat template.

    transformers 5's `LlamaTokenizer` class rebuilds a `Metaspace` pre-tokenizer whatever
    tokenizer.json says, and that one drops a leading space SentencePiece keeps (" Hello": one `▁`
    less); tokenizer_config.json names the generic class so that tokenizer.json is what runs
    (tests show the difference `LlamaTokenizer` makes). `config` overrides tokenizer_config.json keys.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    style = sp_style(spec)
    sp_model = sp_model if sp_model is not None else train_tiny_llama_sentencepiece(spec)
    (path / "tokenizer.model").write_bytes(sp_model)
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # The merges transformers' converter derives from the pieces' scores (`SpmConverter`).
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_model)
    data = json.loads(SpmConverter.build_tokenizer_from_spm_proto(proto, vocab).to_str())
    backend = Tokenizer(BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                 for m in data["model"]["merges"]],
                            unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", style.eos, "<s>", *style.control, *style.added]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos_id = vocab["<s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token=style.eos, unk_token="<unk>",
                                  pad_token=style.pad, clean_up_tokenization_spaces=False,
                                  model_input_names=["input_ids", "attention_mask"])
    tok.model_max_length = spec.max_positions
    template = style.chat_template if chat_template == "family" else chat_template
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(str(path))
    f = path / "tokenizer_config.json"
    f.write_text(json.dumps({**json.loads(f.read_text()), "add_bos_token": True, "add_eos_token": False,
                             "legacy": True, **(config or {})}, indent=2) + "\n")
    return path


def write_family_tokenizer(path, spec: ModelSpec) -> Path:
    """The tiny tokenizer of `spec`'s family into `path`: Gemma's SentencePiece, the byte-level
    BPE of Llama 3 and Qwen, or the Llama-style SentencePiece of Mistral and Phi-3."""
    if spec.family in BPE_STYLES:
        return write_bpe_tokenizer_files(path, spec, tokenizer_json=train_tiny_bpe(spec))
    if sp_style(spec) is not None:
        return write_llama_sp_tokenizer_files(path, spec)
    return write_tiny_tokenizer_files(path, spec, train_tiny_sentencepiece(spec.text_vocab_size))
