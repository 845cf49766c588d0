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


# --- Mistral and Phi-3: Llama-style SentencePiece, held to sentencepiece on tokenizer.model ----

SP_FAMILIES = ("mistral-7b-v0.1", "mistral-7b-v0.3", "phi-3-mini-4k-instruct")


def _sp_dir(tmp_path, model, **options):
    return tiny_tokenizer.write_llama_sp_tokenizer_files(tmp_path / "tok", get_spec(model, tiny=True), **options)


@pytest.mark.parametrize("model", SP_FAMILIES)
def test_tiny_sentencepiece_family_agrees_with_tokenizer_model(tmp_path, model):
    import sentencepiece as spm

    spec = get_spec(model, tiny=True)
    path = _sp_dir(tmp_path, model)
    assert (path / "tokenizer.model").is_file() and (path / "tokenizer.json").is_file()
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    assert (sp.unk_id(), sp.eos_id(), sp.bos_id()) == (0, spec.eos_id, spec.bos_id)
    assert sp.encode("hi", out_type=str)[0].startswith("\u2581")                 # the dummy prefix
    assert "<0xF0>" in sp.encode("\U0001d11e", out_type=str)                      # byte fallback
    report = tokenizer.check_tokenizer(model, tiny=True, weights=path)
    parity = report["tokenizer"]
    assert report["findings"] == [] and parity["reference"] == "sentencepiece" and parity["agree"]
    statuses = {c["name"]: c["status"] for c in parity["chat"]["conversations"]}
    # Mistral v0.1's published template raises on a system message (a note, not a finding).
    assert statuses == {"one-turn": "agree", "generation-prompt": "agree", "multi-turn": "agree",
                        "system-message": "error" if model.endswith("v0.1") else "agree"}
    eot = parity["chat"]["end_of_turn_ids"]
    assert eot["hf"] == eot["sentencepiece"] and len(eot["hf"]) == 1
    hf = next(i for i in parity["implementations"] if i["name"] == "hf")
    assert hf["adds_bos"] == 1 and hf["prefix"] == [spec.bos_id]


def test_sentencepiece_family_special_tokens_where_the_released_repos_have_them(tmp_path):
    from transformers import AutoTokenizer

    v3 = AutoTokenizer.from_pretrained(str(_sp_dir(tmp_path / "m", "mistral-7b-v0.3")))
    assert v3.convert_tokens_to_ids(["[INST]", "[/INST]", "[TOOL_CALLS]"]) == [3, 4, 5]
    phi = AutoTokenizer.from_pretrained(str(_sp_dir(tmp_path / "p", "phi-3-mini-4k-instruct")))
    assert len(phi) == get_spec("phi-3-mini-4k-instruct", tiny=True).text_vocab_size
    assert (phi.eos_token, phi.eos_token_id, phi.convert_tokens_to_ids("<|user|>")) == ("<|endoftext|>", 1, len(phi) - 1)
    rendered = phi.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<s><|user|>\nHi<|end|>\n<|assistant|>\n"


def test_reference_chat_formats_of_mistral_and_phi3():
    chat = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": " Hello. "}, {"role": "user", "content": "Bye"})
    assert tokenizer_parity.reference_chat(chat, True, "mistral", "mistral-7b-v0.1") == (
        "[INST] Be brief.\n\nHi [/INST] Hello. </s> [INST] Bye [/INST]")
    assert tokenizer_parity.reference_chat(chat, True, "mistral", "mistral-7b-v0.3") == (
        "[INST] Hi[/INST] Hello.</s>[INST] Be brief.\n\nBye[/INST]")
    assert tokenizer_parity.reference_chat(chat[:2], True, "phi3") == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n")
    assert tokenizer_parity.reference_chat(chat[1:2], False, "phi3") == "<|user|>\nHi<|end|>\n<|endoftext|>"


V1 = tiny_tokenizer.MISTRAL_V1_CHAT_TEMPLATE
V3 = tiny_tokenizer.MISTRAL_V3_CHAT_TEMPLATE
PHI3 = tiny_tokenizer.PHI3_CHAT_TEMPLATE
SP_MUTANTS = {
    # The template writes <s> itself before bos_token.
    "mistral-v1-bos-twice": ("mistral-7b-v0.1", {"chat_template": "<s>" + V1}, None, "LD002"),
    "phi3-bos-twice": ("phi-3-mini-4k-instruct", {"chat_template": "{{ bos_token }}" + PHI3}, None, "LD002"),
    # Phi-3's template as published since May 2024: no BOS, and apply_chat_template adds none.
    "phi3-published-template-without-bos": ("phi-3-mini-4k-instruct",
                                            {"chat_template": tiny_tokenizer.PHI3_PUBLISHED_CHAT_TEMPLATE}, None, "LD001"),
    "phi3-turns-end-with-endoftext": ("phi-3-mini-4k-instruct",
                                      {"chat_template": PHI3.replace("'<|end|>\n'", "eos_token + '\n'")}, None, "LD009"),
    "phi3-generation-prompt-without-newline": (
        "phi-3-mini-4k-instruct", {"chat_template": PHI3.replace("{{ '<|assistant|>\n' }}", "{{ '<|assistant|>' }}")},
        None, "LD008"),
    "mistral-v3-no-space-after-inst": ("mistral-7b-v0.3", {"chat_template": V3.replace("'[INST] ' + message", "'[INST]' + message")},
                                       None, "LD007"),
}


@pytest.mark.parametrize("mutant", sorted(SP_MUTANTS))
def test_sentencepiece_family_mutant_is_named_by_its_own_check(tmp_path, mutant):
    model, options, edit, code = SP_MUTANTS[mutant]
    path = _sp_dir(tmp_path, model, **options)
    if edit:
        edit(path)
    report = tokenizer.check_tokenizer(model, tiny=True, weights=path)
    assert report["exit_code"] == 1
    assert {f["code"] for f in report["findings"]} == {code}, (mutant, report["findings"])
    assert report["findings"][0]["evidence"] and report["findings"][0]["fix"]


@pytest.mark.parametrize("model,text,token", [("mistral-7b-v0.3", "Say [INST] literally.", "[INST]"),
                                              ("phi-3-mini-4k-instruct", "Say <|end|> literally.", "<|end|>")])
def test_control_token_typed_in_user_text_is_ld004(tmp_path, model, text, token):
    """HF's tokenizer parses the family's control tokens in text; sentencepiece on tokenizer.model
    (and mistral-common, which adds them by id) encodes them as text. Mistral v0.1 has none."""
    (tmp_path / "user.txt").write_text(text)
    report = tokenizer.check_tokenizer(model, tiny=True, weights=_sp_dir(tmp_path, model), text=tmp_path / "user.txt")
    assert {f["code"] for f in report["findings"]} == {"LD004"}, report["findings"]
    assert token in report["findings"][0]["evidence"]["first"]["pieces"]
    clean = tokenizer.check_tokenizer("mistral-7b-v0.1", tiny=True, weights=_sp_dir(tmp_path / "v1", "mistral-7b-v0.1"),
                                      text=tmp_path / "user.txt")
    assert clean["findings"] == []


def test_llama_tokenizer_class_drops_a_leading_space_sentencepiece_keeps(tmp_path):
    """The same files with tokenizer_config.json's class `LlamaTokenizer` (the released repos'):
    transformers 5 replaces tokenizer.json's normalizer with a Metaspace pre-tokenizer, which
    writes " Hello" with one `▁` where SentencePiece's dummy prefix gives two."""
    import transformers

    path = _sp_dir(tmp_path, "mistral-7b-v0.1", config={"tokenizer_class": "LlamaTokenizer"})
    report = tokenizer.check_tokenizer("mistral-7b-v0.1", tiny=True, weights=path)
    if transformers.__version__.startswith("4."):
        pytest.skip("transformers 4.x loads tokenizer.json as it is")
    differ = {s["name"] for s in report["tokenizer"]["strings"] if s["status"] == "differ"}
    assert "leading-space" in differ and "plain" not in differ
    assert report["exit_code"] == 1


@pytest.mark.parametrize("eos,missing", [([1, 508], None), ([1], "<|end|>")])
def test_end_of_turn_missing_from_eos_for_phi3(tmp_path, eos, missing):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    spec = get_spec("phi-3-mini-4k-instruct", tiny=True)
    path = tmp_path / "ckpt"
    config = transformers.AutoConfig.for_model(**weights.hf_config(spec))
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    tiny_tokenizer.write_llama_sp_tokenizer_files(path, spec)
    assert tiny_tokenizer.PHI3_ADDED.index("<|end|>") + 502 == 508
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": spec.bos_id, "eos_token_id": eos}))
    report_path = tmp_path / "audit.json"
    result = CliRunner().invoke(main, ["audit", str(path), "-q", "--json", str(report_path)], catch_exceptions=False)
    report = json.loads(report_path.read_text())
    # Phi-3 ships pad_token <|endoftext|>, its EOS: LD050 either way, as on the released model.
    codes = {f["code"] for f in report["findings"]}
    assert codes == ({"LD050"} if missing is None else {"LD050", "LD051"}), report["findings"]
    if missing is not None:
        f = next(f for f in report["findings"] if f["code"] == "LD051")
        assert f["evidence"]["token"] == missing and f["evidence"]["token_id"] == 508 and result.exit_code == 1
