"""Tokenizer and chat-template parity: the tiny tokenizer agrees everywhere; each mutant is named
by its own LD0xx check."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from llmdiff import tiny_tokenizer, tokenizer, tokenizer_parity, weights
from llmdiff.cli import main
from llmdiff.spec import get_spec

SPEC = get_spec("gemma-7b", tiny=True)
GEN_PROMPT_NO_NEWLINE = tiny_tokenizer.GEMMA_CHAT_TEMPLATE.replace("{{ '<start_of_turn>model\n' }}",
                                                                   "{{ '<start_of_turn>model' }}")
EOS_FOR_END_OF_TURN = tiny_tokenizer.GEMMA_CHAT_TEMPLATE.replace("{{ '<end_of_turn>\n' }}", "{{ eos_token + '\n' }}")


def _cli(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def _codes(report) -> set[str]:
    return {f["code"] for f in report["findings"]}


def test_tiny_sentencepiece_is_deterministic_fast_and_gemma_shaped(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(tiny_tokenizer.TRAINING_CORPUS.read_bytes() + f"\nunique {time.time_ns()}\n".encode())
    t0 = time.perf_counter()
    first = tiny_tokenizer.train_tiny_sentencepiece(SPEC.text_vocab_size, corpus=corpus)
    elapsed = time.perf_counter() - t0  # a fresh corpus: a cache miss, a real training run
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=first)
    assert elapsed < 2.0
    assert sp.get_piece_size() == SPEC.text_vocab_size == 512
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert sp.encode("<start_of_turn>user\n", out_type=str)[0] == "<start_of_turn>"  # user-defined, as in Gemma
    assert sp.encode("<bos>", out_type=str) != ["<bos>"]                              # control: never from text
    assert "<0xF0>" in sp.encode("\U0001d11e", out_type=str)                         # byte fallback
    assert sp.decode(sp.encode("a  b\t\r\nＡ")) == "a  b\t\r\nＡ"                   # no normalisation


def test_training_gives_the_same_bytes_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_tokenizer.tempfile, "gettempdir", lambda: str(tmp_path / "a"))
    a = tiny_tokenizer.train_tiny_sentencepiece(SPEC.text_vocab_size)
    monkeypatch.setattr(tiny_tokenizer.tempfile, "gettempdir", lambda: str(tmp_path / "b"))
    b = tiny_tokenizer.train_tiny_sentencepiece(SPEC.text_vocab_size)
    assert a == b and list((tmp_path / "b").rglob("*.model"))


def test_reference_chat_format_folds_system_into_first_turn():
    messages = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"})
    assert tokenizer_parity.reference_chat(messages, True) == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_tokenize_tiny_agrees_across_implementations(tmp_path):
    code, out, err = _cli("tokenize", "gemma-7b", "--tiny", "--json", str(tmp_path / "t.json"))
    assert code == 0, out + err
    report = json.loads((tmp_path / "t.json").read_text())
    parity = report["tokenizer"]
    impls = {i["name"]: i for i in parity["implementations"]}
    assert impls["sentencepiece"]["available"] and impls["hf"]["available"]
    assert impls["hf"]["adds_bos"] == 1 and impls["sentencepiece"]["adds_bos"] == 0
    assert impls["hf"]["probe_ids"][0] == SPEC.bos_id
    # transformers 5.x: AutoTokenizer(use_fast=False) gives the fast tokenizer; said, not hidden.
    if not impls["hf-slow"]["available"]:
        assert "a fast one" in impls["hf-slow"]["reason"]
    assert parity["agree"] and report["findings"] == []
    names = {s["name"] for s in parity["strings"]}
    assert {"crlf", "nfkc-fullwidth", "cjk", "emoji", "byte-fallback", "long-number", "turn-markers-in-text"} <= names
    for s in parity["strings"]:
        assert s["ids"]["hf"] == s["ids"]["sentencepiece"] or s["status"] == "by-design", s["name"]
        assert s["decoded"]["sentencepiece"] == s["text"], s["name"]
    # `<bos>` typed in text is BOS to transformers (its documented default), text to sentencepiece: a note.
    assert {s["name"] for s in parity["strings"] if s["status"] == "by-design"} == {"bos-in-text", "eos-in-text"}
    assert any("split_special_tokens" in n for n in parity["notes"])
    assert all(c["status"] == "agree" and c["leading_bos"] == 1 for c in parity["chat"]["conversations"])
    assert "agree; chat template matches the reference format" in out


def test_text_file_strings_are_compared(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_bytes("first line\r\n  second\tline 12345\n".encode())
    code, out, _ = _cli("tokenize", "gemma-7b", "--tiny", "--text", str(f), "--json", str(tmp_path / "t.json"))
    assert code == 0, out
    strings = {s["name"]: s for s in json.loads((tmp_path / "t.json").read_text())["tokenizer"]["strings"]}
    assert strings["mine.txt"]["text"] == "first line\r\n  second\tline 12345\n"
    assert strings["mine.txt:2"]["text"] == "  second\tline 12345"


@pytest.mark.parametrize("args, message", [
    (("tokenize", "gemma-7b"), "no tokenizer for gemma-7b: pass --weights DIR"),
    (("tokenize", "gemma-7b", "--tiny", "--text", "/nonexistent/x.txt"), "--text /nonexistent/x.txt: no such file"),
])
def test_bad_tokenize_input_is_one_line(args, message):
    code, _, err = _cli(*args)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmdiff: error: ") and message in lines[0]


# --- mutants: each named by its own check --------------------------------------------------

def _collapse_spaces(path):
    """tokenizer.json whose normaliser collapses runs of spaces (a port that "cleans" text)."""
    f = path / "tokenizer.json"
    data = json.loads(f.read_text())
    data["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}, data["normalizer"]]}
    f.write_text(json.dumps(data))
    # Loaded as written: transformers 5.x's GemmaTokenizer rebuilds Gemma's own normaliser.
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def _eos_in_post_processor(path):
    """tokenizer.json whose post-processor appends EOS (transformers 5.x ignores `add_eos_token`
    in tokenizer_config.json for Gemma, but honours the post-processor when the config is silent)."""
    f = path / "tokenizer.json"
    data = json.loads(f.read_text())
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": "<eos>", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]},
                           "<eos>": {"id": "<eos>", "ids": [1], "tokens": ["<eos>"]}}}
    f.write_text(json.dumps(data))
    config = json.loads((path / "tokenizer_config.json").read_text())
    for key in ("add_bos_token", "add_eos_token"):
        config.pop(key)
    (path / "tokenizer_config.json").write_text(json.dumps(config))


MUTANTS = {
    "no-bos-by-default": ({"config": {"add_bos_token": False}}, None, "LD001"),
    "bos-twice-template-and-tokenizer": ({"chat_template": "{{ bos_token }}" + tiny_tokenizer.GEMMA_CHAT_TEMPLATE},
                                         None, "LD002"),
    "eos-added-by-default": ({}, _eos_in_post_processor, "LD003"),
    "add-eos-token-in-config": ({"config": {"add_eos_token": True}}, None, "LD003"),
    "turn-markers-as-control-symbols": ({"sp_model": "control"}, None, "LD004"),
    "whitespace-collapsed": ({}, _collapse_spaces, "LD005"),
    "generation-prompt-without-newline": ({"chat_template": GEN_PROMPT_NO_NEWLINE}, None, "LD008"),
    "eos-as-end-of-turn": ({"chat_template": EOS_FOR_END_OF_TURN}, None, "LD009"),
}


def _mutant_dir(tmp_path, options, edit):
    options = dict(options)
    if options.get("sp_model") == "control":
        options["sp_model"] = tiny_tokenizer.train_tiny_sentencepiece(SPEC.text_vocab_size, control_turn_markers=True)
    path = tiny_tokenizer.write_tokenizer_files(tmp_path / "tok", SPEC, **options)
    if edit:
        edit(path)
    return path


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_mutant_is_named_by_its_own_check(tmp_path, mutant):
    options, edit, code = MUTANTS[mutant]
    path = _mutant_dir(tmp_path, options, edit)
    report = tokenizer.check_tokenizer("gemma-7b", tiny=True, weights=path)
    assert report["exit_code"] == 1
    codes = _codes(report)
    assert code in codes, (mutant, report["findings"])
    if mutant != "turn-markers-as-control-symbols":  # that one also changes every template's ids
        assert codes == {code}, (mutant, report["findings"])
    finding = next(f for f in report["findings"] if f["code"] == code)
    assert finding["evidence"] and finding["fix"]


def test_no_bos_evidence_is_the_ids(tmp_path):
    path = _mutant_dir(tmp_path, {"config": {"add_bos_token": False}}, None)
    report = tokenizer.check_tokenizer("gemma-7b", tiny=True, weights=path)
    f = next(f for f in report["findings"] if f["code"] == "LD001")
    assert f["implementation"] == "hf" and f["evidence"]["add_bos_token"] is False
    # The installed transformers may still add BOS from tokenizer.json; the ids say which.
    ids = f["evidence"]["ids"]
    assert f["evidence"]["ids_without_bos"] == [i for i in ids if i != SPEC.bos_id]
    assert f["evidence"]["bos_id"] == SPEC.bos_id


def test_no_bos_in_ids_is_named_too(tmp_path):
    """A post-processor without BOS (and a silent config): the ids themselves lack it."""
    path = _mutant_dir(tmp_path, {}, None)
    data = json.loads((path / "tokenizer.json").read_text())
    data["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {}}
    (path / "tokenizer.json").write_text(json.dumps(data))
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["add_bos_token"], config["add_eos_token"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    report = tokenizer.check_tokenizer("gemma-7b", tiny=True, weights=path)
    assert _codes(report) == {"LD001"}
    f = report["findings"][0]
    assert f["evidence"]["ids"] == report["tokenizer"]["implementations"][1]["probe_ids"]
    assert SPEC.bos_id not in f["evidence"]["ids"]


def test_control_token_mutant_points_at_the_marker(tmp_path):
    path = _mutant_dir(tmp_path, {"sp_model": "control"}, None)
    report = tokenizer.check_tokenizer("gemma-7b", tiny=True, weights=path)
    f = next(f for f in report["findings"] if f["code"] == "LD004")
    assert "turn-markers-in-text" in f["evidence"]["strings"]
    assert "<start_of_turn>" in f["evidence"]["first"]["pieces"]


# --- compare: real text prompts, tokenizer parity at the top -------------------------------

def test_compare_tiny_tokenizes_text_and_reports_parity_first(tmp_path):
    code, out, err = _cli("compare", "gemma-7b", "--tiny", "--dtype", "float32", "--json", str(tmp_path / "r.json"))
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["tokens"]["source"] == "text"
    ids = report["tokens"]["ids"]
    assert all(p[0] == SPEC.bos_id and p[1] != SPEC.bos_id for p in ids)
    assert report["tokens"]["lengths"][1] > 32  # longer than the tiny sliding window
    assert report["tokenizer"]["agree"] and report["findings"] == []
    assert out.index("tokenizers sentencepiece, hf") < out.index("hf vs oracle")


def _tiny_checkpoint(path, spec, canon, **tokenizer_options):
    """`weights.write_hf_checkpoint` plus the tiny tokenizer: a checkpoint that reads real text."""
    path = weights.write_hf_checkpoint(path, spec, canon)
    return tiny_tokenizer.write_tokenizer_files(path, spec, **tokenizer_options)


def test_compare_names_missing_bos_of_hf_tokenizer_config(tmp_path):
    """The HF mutant "tokenizer BOS": tokenizer_config.json with add_bos_token false."""
    ckpt = _tiny_checkpoint(tmp_path / "ckpt", SPEC, weights.random_weights(SPEC, seed=1),
                            config={"add_bos_token": False})
    code, out, err = _cli("compare", "gemma-7b", "--tiny", "--weights", str(ckpt), "--dtype", "float32",
                          "--json", str(tmp_path / "r.json"))
    assert code == 1, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    f = report["findings"][0]
    assert (f["code"], f["name"], f["implementation"]) == ("LD001", "missing-bos", "hf")
    assert f["evidence"]["add_bos_token"] is False and f["evidence"]["ids"]
    assert out.index("LD001") > out.index("tokenizers")


@pytest.mark.parametrize("model", ["gemma-7b", "llama-3.1-8b"])
def test_tiny_tokenizer_files_are_in_the_published_form(tmp_path, model):
    """Merges as "a b" strings and a tokenizer class every transformers 4.x has: the form old
    releases read (`matrix`); the tokenizer itself is unchanged."""
    import tokenizers

    spec = get_spec(model, tiny=True)
    tokenizer.write_tiny_family_tokenizer(tmp_path, spec)
    data = json.loads((tmp_path / "tokenizer.json").read_text())
    assert all(isinstance(m, str) and m.count(" ") == 1 for m in data["model"]["merges"])
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config.get("tokenizer_class") != "TokenizersBackend"
    pairs = dict(data, model=dict(data["model"], merges=[m.split(" ") for m in data["model"]["merges"]]))
    a = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    b = tokenizers.Tokenizer.from_str(json.dumps(pairs))
    text = "Hello, world! Ünïcödé   spaces\n12345 <start_of_turn>"
    assert a.encode(text).ids == b.encode(text).ids and len(a.encode(text).ids) > 5


def test_parity_under_another_interpreter_is_the_same_report(tmp_path):
    """`hf@PYTHON` / a `matrix` release: parity runs under that interpreter (here this one, in a
    child process) and gives the report the in-process run gives."""
    import sys

    spec = get_spec("gemma-7b", tiny=True)
    tokenizer.write_tiny_family_tokenizer(tmp_path, spec)
    here = tokenizer_parity.tokenizer_parity(tmp_path, spec)
    there = tokenizer.parity_under(sys.executable, tmp_path, spec)
    for r in (here, there):
        r.pop("timings")
    assert there == json.loads(json.dumps(here)) and there["agree"]
    with pytest.raises(RuntimeError, match="tokenizer parity under .* failed"):
        tokenizer.parity_under(sys.executable, tmp_path / "missing", spec)
