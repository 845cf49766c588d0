"""Tokenizer and chat-template parity, before any numerics: the evidence checks read.

The same strings go through every tokenizer implementation a user actually calls
(`tokenizer_encoders`). Ids are compared with what each adds by default (BOS, EOS) taken off, and
those additions are recorded on their own. Then the checkpoint's HF `chat_template` is rendered
through transformers' own `apply_chat_template` for a few conversations and compared, as a string
and as ids, with the family's reference format. Checks `LD001`-`LD049` (`checks/`) turn the
evidence gathered here into findings, with the helpers at the end of this module.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

from llmdiff.errors import UsageError
from llmdiff.spec import ModelSpec
from llmdiff.tokenizer_encoders import Encoder, HFEncoder, SentencePieceEncoder, load_encoders

START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
REFERENCE = "sentencepiece"
# The family's own tokenizer, where its files hold one: the reference the HF tokenizer is held to.
REFERENCES = (REFERENCE, "tiktoken", "bpe-files")

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


# Each family's chat format: (end-of-turn token, generation prompt, start of a turn).
CHAT_FORMATS = {"gemma": (END_OF_TURN, f"{START_OF_TURN}model\n", START_OF_TURN),
                "llama": ("<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|start_header_id|>"),
                "chatml": ("<|im_end|>", "<|im_start|>assistant\n", "<|im_start|>"),
                # Mistral: an answer ends with EOS; no generation prompt, a user turn ends with [/INST].
                "mistral-v1": ("</s>", " [/INST]", "[INST]"),
                "mistral-v3": ("</s>", "[/INST]", "[INST]"),
                "phi3": ("<|end|>", "<|assistant|>\n", "<|user|>")}
# The special tokens each SentencePiece family's format writes, ids and not text: the reference
# ids of a chat put their ids between the SentencePiece ids of the text around them.
CHAT_SPECIAL_TOKENS = {"mistral-v1": ("<s>", "</s>"),
                       "mistral-v3": ("<s>", "</s>", "[INST]", "[/INST]"),
                       "phi3": ("<s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>")}


def chat_format(family: str, name: str = "") -> str | None:
    """The name of `family`'s reference chat format (`name`, the model's, tells Mistral's two
    apart), None when llmdiff has none."""
    if family.startswith("gemma"):
        return "gemma"
    if family == "mistral":
        return "mistral-v3" if name.endswith("v0.3") else "mistral-v1"
    return {"llama": "llama", "qwen2": "chatml", "qwen3": "chatml", "phi3": "phi3"}.get(family)


def reference_chat(messages, add_generation_prompt: bool, family: str = "gemma", name: str = "") -> str:
    """The family's reference chat format, BOS not included (it is an id, not text).

    Gemma: `<start_of_turn>user\\n…<end_of_turn>\\n<start_of_turn>model\\n…<end_of_turn>\\n`,
    the generation prompt `<start_of_turn>model\\n`; a system message is folded into the first
    user turn (google-deepmind/gemma `gm/text/_template.py`, the Gemma 3 model card).
    Llama 3: `<|start_header_id|>role<|end_header_id|>\\n\\n…<|eot_id|>` per message, the system
    message its own turn, content trimmed (meta-llama/llama-models `chat_format.py`). Qwen
    (ChatML): `<|im_start|>role\\n…<|im_end|>\\n` per message (Qwen3's template; no BOS).
    Mistral, as the instruct models' published templates write it (mistralai/cookbook
    `chat_templates.md`): v0.1 `[INST] user [/INST]answer</s> [INST] …` (a system message folded
    into the first user turn, as mistral-common does); v0.3 `[INST] user[/INST] answer</s>[INST] …`
    with [INST] and [/INST] control tokens, the system message in front of the last user turn,
    answers trimmed. Neither has a generation prompt: a user turn ends with [/INST]. Phi-3:
    `<|role|>\\n…<|end|>\\n` per message, then `<|assistant|>\\n` or, without the generation
    prompt, `<|endoftext|>` (microsoft/Phi-3-mini-4k-instruct's template).
    """
    form = chat_format(family, name)
    if form is None:
        raise UsageError(f"no reference chat format for family {family!r}")
    if form in ("mistral-v1", "mistral-v3"):
        return _mistral_chat(list(messages), form)
    if form == "phi3":
        turns = [f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages]
        return "".join(turns) + ("<|assistant|>\n" if add_generation_prompt else "<|endoftext|>")
    if form != "gemma":
        eot, gen, _ = CHAT_FORMATS[form]
        if form == "llama":
            turns = [f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}{eot}" for m in messages]
        else:
            turns = [f"<|im_start|>{m['role']}\n{m['content']}{eot}\n" for m in messages]
        return "".join(turns) + (gen if add_generation_prompt else "")
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


def _mistral_chat(messages: list[dict], form: str) -> str:
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else None
    messages = messages[1:] if system is not None else messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    # v0.1 (mistral-common's V1): the system message goes in front of the first user message; v0.3, the last.
    with_system = (users[0] if form == "mistral-v1" else users[-1]) if users and system is not None else None
    out = []
    for i, m in enumerate(messages):
        content = f"{system}\n\n{m['content']}" if i == with_system else m["content"]
        if m["role"] == "user":
            out.append(f"[INST] {content} [/INST]" if form == "mistral-v1" else f"[INST] {content}[/INST]")
        else:
            out.append(f"{content}</s> " if form == "mistral-v1" else f" {content.strip()}</s>")
    return "".join(out)


def encode_chat_reference(ref: Encoder, text: str, specials: dict[str, int]) -> list[int]:
    """The reference ids of a rendered chat: each special token its id, each stretch of text
    between them encoded by the reference on its own (SentencePiece's dummy `▁` included, as
    mistral-common encodes each message; a stretch of nothing but text gives `encode_text`)."""
    if not specials:
        return ref.encode_text(text)
    import re

    out: list[int] = []
    for part in re.split("(" + "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True)) + ")", text):
        if part in specials:
            out.append(specials[part])
        elif part:
            out += ref.encode_text(part)
    return out


def chat_special_ids(form: str, hf: HFEncoder, ref: Encoder | None) -> dict[str, int]:
    """{token: id} of the format's special tokens: tokenizer.model's pieces where it has them
    (Mistral v0.3's [INST]), else the HF tokenizer's added tokens (Phi-3's <|user|>...)."""
    out = {}
    for t in CHAT_SPECIAL_TOKENS.get(form, ()):
        i = ref.sp.piece_to_id(t) if isinstance(ref, SentencePieceEncoder) else None
        if i is None or i == ref.sp.unk_id() or ref.sp.id_to_piece(i) != t:
            i = hf.tok.convert_tokens_to_ids(t)
            if i is None or i == hf.tok.unk_token_id:
                continue
        out[t] = int(i)
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
    form = chat_format(spec.family, spec.name)
    if form is None:
        return {"present": True, "format": None, "conversations": []}
    eot, gen_prompt, start = CHAT_FORMATS[form]
    specials = chat_special_ids(form, hf, ref)
    out = []
    for name, messages, gen in CONVERSATIONS:
        want = reference_chat(messages, gen, spec.family, spec.name)
        entry = {"name": name, "add_generation_prompt": gen, "reference": want, "end_of_turn": eot,
                 "generation_prompt": gen_prompt, "start_of_turn": start}
        try:
            rendered = hf.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=gen)
            ids = list(hf.tok.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=gen,
                                                  return_dict=True)["input_ids"])
        except Exception as e:  # noqa: BLE001 - a template that raises is evidence, not a crash
            entry.update({"status": "error", "error": f"{type(e).__name__}: {e}"})
            out.append(entry)
            continue
        want_ids = [spec.bos_id] * spec.add_bos + encode_chat_reference(ref if ref is not None else hf, want, specials)
        leading_bos = 0
        while leading_bos < len(ids) and ids[leading_bos] == spec.bos_id:
            leading_bos += 1
        text = rendered
        bos_text = hf.tok.bos_token or "<bos>"
        while spec.add_bos and text.startswith(bos_text):
            text = text[len(bos_text):]
        at = next((i for i, (x, y) in enumerate(zip(text, want)) if x != y),
                  None if len(text) == len(want) else min(len(text), len(want)))
        entry.update({
            "rendered": rendered, "ids": ids, "reference_ids": want_ids, "leading_bos": leading_bos,
            "reference_leading_bos": int(spec.add_bos),
            # What servers that render the template and then call `tokenizer(text)` get.
            "retokenized_leading_bos": _leading(hf.encode(rendered), spec.bos_id),
            "status": "agree" if at is None and ids == want_ids else "differ",
            "string_difference": None if at is None else {
                "index": at, "rendered": text[max(0, at - 20):at + 20], "reference": want[max(0, at - 20):at + 20]},
            "ids_difference": _first_difference(ids, want_ids),
        })
        out.append(entry)
    return {"present": True, "format": form, "end_of_turn": eot, "conversations": out,
            "end_of_turn_ids": {"hf": hf.encode_text(eot),
                                **({ref.name: encode_chat_reference(ref, eot, specials)} if ref is not None else {})}}


def _leading(ids: list[int], token: int) -> int:
    n = 0
    while n < len(ids) and ids[n] == token:
        n += 1
    return n


def tokenizer_parity(path, spec: ModelSpec, extra_strings=(), implementations=()) -> dict:
    """Evidence for the LD0xx checks: implementations, per-string ids, chat template."""
    import time

    t0 = time.perf_counter()
    encoders = load_encoders(path, spec, implementations)
    descriptions = {e.name: e.describe(spec) for e in encoders}
    strings = list(CORPUS) + list(extra_strings)
    ref = encoders[0]
    if ref.name not in REFERENCES:  # no file of the family's own: the HF tokenizer's text path is the reference
        ref = next(e for e in encoders if e.available)
    ordered = [ref] + [e for e in encoders if e is not ref]
    hf = next((e for e in encoders if e.name == "hf"), None)
    role_ids = hf.special_role_ids() if hf else {}
    control_ids = (sorted(ref.control_ids() | _added_beyond(hf, ref)) if isinstance(ref, SentencePieceEncoder)
                   else sorted({i for i in (spec.bos_id, spec.eos_id, spec.pad_id) if i is not None}))
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


def _added_beyond(hf: HFEncoder | None, ref: SentencePieceEncoder) -> set[int]:
    """The HF tokenizer's special tokens past tokenizer.model's pieces (Phi-3's <|user|>, <|end|>...,
    which only tokenizer.json has): control tokens the reference can only write as text."""
    if hf is None:
        return set()
    size = ref.sp.get_piece_size()
    return {int(i) for i, t in getattr(hf.tok, "added_tokens_decoder", {}).items() if i >= size and t.special}


def _tokenizer_config(path) -> dict:
    """The keys of tokenizer_config.json that decide BOS/EOS (not every transformers release
    reads them: 5.x keeps tokenizer.json's post-processor, 4.x rebuilds it from these)."""
    f = Path(path) / "tokenizer_config.json"
    try:
        config = json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: config[k] for k in ("add_bos_token", "add_eos_token", "bos_token", "eos_token") if k in config}


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
    twice = [c for c in report["chat"].get("conversations", [])
             if (c.get("retokenized_leading_bos") or 0) >= 2 and (c.get("leading_bos") or 0) < 2]
    if twice:
        out.append(f"the rendered template already starts with BOS: tokenizing the rendered text with"
                   f" add_special_tokens left on gives {twice[0]['retokenized_leading_bos']} BOS ids"
                   " (vLLM issue 27486, llama-cpp-python 1501); apply_chat_template(tokenize=True) gives one")
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
        eot, gen = c.get("end_of_turn", END_OF_TURN), c.get("generation_prompt", GENERATION_PROMPT)
        start = c.get("start_of_turn", START_OF_TURN)
        # As many turns, ended otherwise (a turn left out is the template's business).
        if rendered.count(eot) != want.count(eot) and rendered.count(start) == want.count(start):
            return "end-of-turn"
        if c["add_generation_prompt"] and sd["index"] >= len(want) - len(gen):
            return "generation-prompt"
        return "template"
    nb = c.get("leading_bos") or 0
    return "template" if c["ids"][nb:] != c["reference_ids"][c.get("reference_leading_bos", 1):] else None


def chat_differences(report: dict, kind: str) -> list[dict]:
    return [c for c in (report.get("chat") or {}).get("conversations", []) if chat_difference_kind(c) == kind]


def describe_chat(c: dict) -> str:
    if c.get("status") == "error":
        return f"{c['name']}: the template raises {c['error']}"
    sd = c.get("string_difference")
    if sd:
        return f"{c['name']}: renders {sd['rendered']!r} where the reference has {sd['reference']!r}"
    return f"{c['name']}: ids {c['ids'][:12]} vs reference {c['reference_ids'][:12]}"
