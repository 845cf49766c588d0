"""Tokenizers of Llama 3 and Qwen (#17): tiny byte-level BPEs trained here with the family's
pre-tokenizer and special tokens, saved through transformers' own classes, held to the family's
own files (Llama 3's tiktoken `original/tokenizer.model`, Qwen's vocab.json and merges.txt); each
mutated tokenizer, chat template or generation config named by its check alone."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from llmdiff import tiny_tokenizer, tokenizer, tokenizer_parity, weights
from llmdiff.cli import main
from llmdiff.spec import get_spec
from llmdiff.tokenizer_encoders import ByteLevelBpeEncoder

FAMILIES = {"llama-3.1-8b": "tiktoken", "qwen2.5-0.5b": "bpe-files", "qwen3-0.6b": "bpe-files"}


def _tok_dir(tmp_path, model, **options):
    spec = get_spec(model, tiny=True)
    return tiny_tokenizer.write_bpe_tokenizer_files(tmp_path / "tok", spec,
                                                    tokenizer_json=tiny_tokenizer.train_tiny_bpe(spec), **options)


def _edit_json(path, name, edit):
    f = path / name
    data = json.loads(f.read_text())
    edit(data)
    f.write_text(json.dumps(data))


def test_tiny_bpe_is_deterministic_and_has_the_family_ids(tmp_path, monkeypatch):
    spec = get_spec("llama-3.1-8b", tiny=True)
    monkeypatch.setattr(tiny_tokenizer.tempfile, "gettempdir", lambda: str(tmp_path / "a"))
    a = tiny_tokenizer.train_tiny_bpe(spec)
    monkeypatch.setattr(tiny_tokenizer.tempfile, "gettempdir", lambda: str(tmp_path / "b"))
    assert tiny_tokenizer.train_tiny_bpe(spec) == a
    vocab = json.loads(a)["model"]["vocab"]
    assert len(vocab) == spec.text_vocab_size
    assert (vocab["<|end_of_text|>"], vocab["<|begin_of_text|>"]) == (spec.eos_id, spec.bos_id)
    qwen = json.loads(tiny_tokenizer.train_tiny_bpe(get_spec("qwen3-0.6b", tiny=True)))["model"]["vocab"]
    assert (qwen["<|endoftext|>"], qwen["<|im_end|>"]) == (0, 1)


@pytest.mark.parametrize("model", sorted(FAMILIES))
def test_tokenize_tiny_family_agrees_with_its_own_files(tmp_path, model):
    code, out, err = (lambda r: (r.exit_code, r.stdout, r.stderr))(CliRunner().invoke(
        main, ["tokenize", model, "--tiny", "--json", str(tmp_path / "t.json")], catch_exceptions=False))
    assert code == 0, out + err
    parity = json.loads((tmp_path / "t.json").read_text())["tokenizer"]
    assert parity["reference"] == FAMILIES[model] and parity["agree"]
    assert all(s["status"] == "agree" for s in parity["strings"])
    assert [c["status"] for c in parity["chat"]["conversations"]] == ["agree"] * 4
    hf = next(i for i in parity["implementations"] if i["name"] == "hf")
    assert hf["adds_bos"] == (1 if model.startswith("llama") else 0)
    # Llama 3's template writes <|begin_of_text|>: a server that tokenizes the rendered text with
    # add_special_tokens on gets two (vLLM issue 27486). A note, not a finding: the checkpoint is right.
    assert any("27486" in n for n in parity["notes"]) == model.startswith("llama")


def test_the_references_are_their_own_code(tmp_path):
    """The tiktoken file and vocab.json/merges.txt are read without transformers: a tokenizer.json
    whose merges are gone changes HF's ids, not the reference's."""
    spec = get_spec("qwen3-0.6b", tiny=True)
    path = _tok_dir(tmp_path, "qwen3-0.6b")
    ref = ByteLevelBpeEncoder(path, spec, "bpe-files")
    text = "The quick brown fox, 3.14159 and caf\u00e9."
    ids = ref.encode_text(text)
    assert ref.decode(ids) == text and len(ids) < len(text.encode())
    llama = _tok_dir(tmp_path / "l", "llama-3.1-8b")
    first = (llama / "original" / "tokenizer.model").read_text().splitlines()[0].split()
    assert len(first) == 2 and int(first[1]) == len(tiny_tokenizer.BPE_STYLES["llama"].specials)
    ref = ByteLevelBpeEncoder(llama, get_spec("llama-3.1-8b", tiny=True), "tiktoken")
    assert ref.decode(ref.encode_text(text)) == text


def test_a_tiktoken_file_as_tokenizer_model_is_one_line(tmp_path):
    path = _tok_dir(tmp_path, "llama-3.1-8b")
    (path / "tokenizer.model").write_bytes((path / "original" / "tokenizer.model").read_bytes())
    result = CliRunner().invoke(main, ["tokenize", "llama-3.1-8b", "--tiny", "--weights", str(path)])
    assert result.exit_code == 2 and "tiktoken file" in result.output


def _digits_one_by_one(path):  # Llama 3 with Qwen's digit rule: "2024" is 4 tokens, not 2
    def edit(data):
        data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = tiny_tokenizer.QWEN2_PATTERN
    _edit_json(path, "tokenizer.json", edit)


def _nfc_dropped(path):
    """tokenizer.json without NFC, loaded by the generic class (transformers 5's Qwen2Tokenizer
    builds its own NFC whatever tokenizer.json says)."""
    _edit_json(path, "tokenizer.json", lambda data: data.update(normalizer=None))
    _edit_json(path, "tokenizer_config.json", lambda data: data.update(tokenizer_class="PreTrainedTokenizerFast"))


def _bos_twice(path):
    def edit(data):
        single = data["post_processor"]["processors"][1]["single"]
        single.insert(0, dict(single[0]))
    _edit_json(path, "tokenizer.json", edit)


LLAMA3 = tiny_tokenizer.LLAMA3_CHAT_TEMPLATE
CHATML = tiny_tokenizer.CHATML_CHAT_TEMPLATE
MUTANTS = {
    # The template writes <|begin_of_text|> itself, then bos_token again.
    "llama-begin-of-text-twice": ("llama-3.1-8b", {"chat_template": "<|begin_of_text|>" + LLAMA3}, None, "LD002"),
    "llama-tokenizer-adds-bos-twice": ("llama-3.1-8b", {}, _bos_twice, "LD002"),
    "llama-digits-one-by-one": ("llama-3.1-8b", {}, _digits_one_by_one, "LD006"),
    "llama-generation-prompt-without-blank-line": (
        "llama-3.1-8b", {"chat_template": LLAMA3.replace("assistant<|end_header_id|>\n\n", "assistant<|end_header_id|>\n")},
        None, "LD008"),
    "llama-turns-end-with-end-of-text": ("llama-3.1-8b", {"chat_template": LLAMA3.replace("'<|eot_id|>'", "eos_token")},
                                         None, "LD009"),
    "qwen-nfc-dropped": ("qwen2.5-0.5b", {}, _nfc_dropped, "LD005"),
    "qwen-turns-end-with-endoftext": (
        "qwen3-0.6b", {"chat_template": CHATML.replace("<|im_end|>' + '\n'", "<|endoftext|>' + '\n'")}, None, "LD009"),
    "qwen-system-message-dropped": (
        "qwen3-0.6b", {"chat_template": CHATML.replace("{%- for message in messages -%}",
                                                       "{%- for message in messages if message['role'] != 'system' -%}")},
        None, "LD007"),
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_family_tokenizer_mutant_is_named_by_its_own_check(tmp_path, mutant):
    model, options, edit, code = MUTANTS[mutant]
    path = _tok_dir(tmp_path, model, **options)
    if edit:
        edit(path)
    report = tokenizer.check_tokenizer(model, tiny=True, weights=path)
    assert report["exit_code"] == 1
    assert {f["code"] for f in report["findings"]} == {code}, (mutant, report["findings"])
    finding = report["findings"][0]
    assert finding["evidence"] and finding["fix"]


def test_reference_chat_formats():
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "})
    assert tokenizer_parity.reference_chat(messages, True, "llama") == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer_parity.reference_chat(messages, False, "qwen3") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n Hi <|im_end|>\n")


# --- audit: generation_config.json's EOS ids against the chat template's end of turn ----------

def _checkpoint(path, model, eos):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    spec = get_spec(model, tiny=True)
    config = transformers.AutoConfig.for_model(**weights.hf_config(spec))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.write_bpe_tokenizer_files(path, spec, tokenizer_json=tiny_tokenizer.train_tiny_bpe(spec))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": spec.bos_id, "eos_token_id": eos}))
    return path


@pytest.mark.parametrize("model,eos,missing", [
    ("llama-3.1-8b", [1, 5], None),
    ("llama-3.1-8b", 1, "<|eot_id|>"),   # Meta-Llama-3-8B-Instruct as first published
    ("qwen3-0.6b", [1], None),
    ("qwen3-0.6b", [0], "<|im_end|>"),
])
def test_end_of_turn_missing_from_eos_for_llama_and_qwen(tmp_path, model, eos, missing):
    path = _checkpoint(tmp_path / "ckpt", model, eos)
    report_path = tmp_path / "audit.json"
    result = CliRunner().invoke(main, ["audit", str(path), "-q", "--json", str(report_path)], catch_exceptions=False)
    report = json.loads(report_path.read_text())
    if missing is None:
        assert result.exit_code == 0 and report["findings"] == [], result.output
    else:
        f = next(f for f in report["findings"] if f["code"] == "LD051")
        assert f["evidence"]["token"] == missing and result.exit_code == 1, result.output
        # Llama's alone; the tiny Qwen's only other EOS id is its pad (LD050), not the spec's (LD053).
        others = {g["code"] for g in report["findings"]} - {"LD051"}
        assert others == (set() if model.startswith("llama") else {"LD050", "LD053"}), report["findings"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["llama-3.1-8b", "qwen3-0.6b"])
def test_tiny_compare_prompts_are_text_through_the_family_tokenizer(llmdiff_cli, model):
    code, out, err, report = llmdiff_cli("compare", model, "--tiny", "--dtype", "float32", "--no-diagnose")
    assert code == 0, out + err
    tokens, spec = report["tokens"], get_spec(model, tiny=True)
    assert (tokens["source"], tokens["tokenizer"]) == ("text", "hf")
    assert all((p[0] == spec.bos_id) == spec.add_bos for p in tokens["ids"])
    assert report["tokenizer"]["agree"] and report["tokenizer"]["reference"] == FAMILIES[model]
    assert report["findings"] == []
