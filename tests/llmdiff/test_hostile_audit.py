"""`llmdiff audit` on hostile or broken checkpoints: never a hang, never a traceback, never
"clean" for a broken checkpoint. Each bad input is one `llmdiff: error: ...` line and exit 2, or
a finding where it is a defect of the checkpoint's files."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
from click.testing import CliRunner

from audit_fixtures import write_example_tokenizer_files
from llmdiff import audit, safetensors_file, weights
from llmdiff.cli import main
from llmdiff.errors import WeightsError
from llmdiff.spec import get_spec

ROOT = Path(__file__).parents[2]
EMBED = "model.embed_tokens.weight"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A clean tiny gemma-7b checkpoint: weights, config, tokenizer and generation files."""
    path = tmp_path_factory.mktemp("hostile") / "clean"
    spec = get_spec("gemma-7b", tiny=True)
    weights.write_hf_checkpoint(path, spec, weights.random_weights(spec, seed=1))
    write_example_tokenizer_files(path, spec)
    return path


@pytest.fixture
def ckpt(clean, tmp_path):
    """A fresh copy of the clean checkpoint to break."""
    dst = tmp_path / "ckpt"
    shutil.copytree(clean, dst)
    return dst


def run_cli(path):
    """`llmdiff audit PATH -q` in-process: (exit code, stdout, stderr). A traceback escapes."""
    result = CliRunner().invoke(main, ["audit", str(path), "-q"], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def run_subprocess(path):
    """`llmdiff audit PATH -q` in a child process that must finish within a minute: a hang
    (a FIFO opened for reading waits for a writer forever) fails the test instead of the run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "llmdiff", "audit", str(path), "-q"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(result, *fragments):
    code, out, err = result
    assert "Traceback" not in out + err, err
    assert code == 2, (out, err)
    assert err.startswith("llmdiff: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err


def findings(result) -> str:
    code, out, err = result
    assert "Traceback" not in out + err, err
    assert err == "", err
    return out


def edit_json(path, name, **changes):
    data = json.loads((path / name).read_text())
    data.update(changes)
    (path / name).write_text(json.dumps(data))


def edit_tensors(path, fn):
    f = path / "model.safetensors"
    tensors = {k: np.array(v) for k, v in safetensors_file.load(f).items()}
    fn(tensors)
    safetensors_file.save(f, tensors, {"format": "pt"})


def write_safetensors(path, header: dict, data: bytes = b"\0" * 16):
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def replace_with_fifo(path):
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)


# --- 1. FIFOs: refused at once, never waited on ----------------------------------------------

@pytest.mark.parametrize("name", ["config.json", "generation_config.json", "tokenizer_config.json",
                                  "tokenizer.json", "special_tokens_map.json", "model.safetensors.index.json",
                                  "model.safetensors", "extra.safetensors", "chat_template.jinja"])
def test_fifo_in_checkpoint_exits_2_at_once(ckpt, name):
    replace_with_fifo(ckpt / name)
    assert_one_line_error(run_subprocess(ckpt), f"{name} is a FIFO, not a regular file")


@pytest.mark.parametrize("read", [safetensors_file.read_header, safetensors_file.load])
def test_safetensors_reader_refuses_a_fifo(tmp_path, read):
    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    outcome = []

    def call():
        try:
            read(fifo)
        except WeightsError as e:
            outcome.append(str(e))

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # blocked in open(): release it, then fail
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("reading a FIFO blocked")
    assert outcome and "is a FIFO, not a regular file" in outcome[0]


# --- 2. no weights: an error, not "clean" ----------------------------------------------------

def test_no_weights_at_all_exits_2(ckpt):
    (ckpt / "model.safetensors").unlink()
    assert_one_line_error(run_cli(ckpt), "has no model.safetensors or model.safetensors.index.json")


def test_only_a_stray_safetensors_exits_2(ckpt):
    (ckpt / "model.safetensors").rename(ckpt / "weights.safetensors")  # transformers reads neither
    assert_one_line_error(run_cli(ckpt), "has no model.safetensors", "found weights.safetensors")


# --- 3. weights that cannot be opened ----------------------------------------------------------

def test_weights_symlink_loop_exits_2(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to("model.safetensors")
    assert_one_line_error(run_subprocess(ckpt), "model.safetensors: cannot open weights file")


def test_weights_dangling_symlink_exits_2(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").symlink_to(ckpt / "gone.safetensors")
    assert_one_line_error(run_cli(ckpt), "model.safetensors does not exist")


# --- 4. safetensors headers of the wrong JSON types ---------------------------------------------

def entry(**changes):
    return {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16], **changes}}


BAD_HEADERS = [
    ("string-offsets", entry(data_offsets=["0", "16"]), "data_offsets ['0', '16']"),
    ("float-offsets", entry(data_offsets=[0.0, 16.0]), "data_offsets"),
    ("three-offsets", entry(data_offsets=[0, 16, 16]), "data_offsets"),
    ("offsets-object", entry(data_offsets={"lo": 0}), "data_offsets"),
    ("negative-shape", entry(shape=[-2, -2]), "shape [-2, -2]"),
    ("float-shape", entry(shape=[4.0]), "shape [4.0]"),
    ("bool-shape", entry(dtype="U8", shape=[True], data_offsets=[0, 1]), "shape [True]"),
    ("string-shape", entry(shape="4"), "shape '4'"),
    ("overflowing-shape", entry(shape=[2**62, 4], data_offsets=[0, 0]), "overflows"),
    ("overflow-before-zero", entry(dtype="U8", shape=[2**32, 2**32, 0], data_offsets=[0, 0]), "overflows"),
    ("dtype-list", entry(dtype=["F32"]), "dtype ['F32']"),
    ("entry-not-object", {"a": [0, 16]}, "not a JSON object"),
    ("metadata-list", {"__metadata__": ["x"], **entry()}, "__metadata__"),
    ("metadata-not-strings", {"__metadata__": {"format": 1}, **entry()}, "__metadata__"),
]


@pytest.mark.parametrize("header,fragment", [c[1:] for c in BAD_HEADERS], ids=[c[0] for c in BAD_HEADERS])
def test_reader_refuses_what_the_safetensors_library_refuses(tmp_path, header, fragment):
    f = tmp_path / "x.safetensors"
    write_safetensors(f, header)
    with pytest.raises(Exception):  # the reference: the real library refuses it too
        safetensors.numpy.load_file(str(f))
    with pytest.raises(WeightsError) as e:
        safetensors_file.read_header(f)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_reader_refuses_deeply_nested_header(tmp_path):
    raw = b"[" * 100_000 + b"]" * 100_000
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(WeightsError, match="not JSON"):
        safetensors_file.read_header(f)


def test_load_refuses_overlapping_tensors(tmp_path):
    f = tmp_path / "x.safetensors"
    write_safetensors(f, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})
    with pytest.raises(Exception):
        safetensors.numpy.load_file(str(f))
    with pytest.raises(WeightsError, match="tensor 'b' overlaps tensor 'a'"):
        safetensors_file.load(f)


def test_load_accepts_adjacent_and_empty_tensors(tmp_path):
    f = tmp_path / "x.safetensors"
    write_safetensors(f, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                          "e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [8, 8]},
                          "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}})
    assert {k: v.shape for k, v in safetensors_file.load(f).items()} == {"a": (2,), "e": (0, 3), "b": (2,)}


@pytest.mark.parametrize("header,fragment", [c[1:] for c in BAD_HEADERS[:3]], ids=[c[0] for c in BAD_HEADERS[:3]])
def test_audit_reports_a_bad_header_as_ld712(ckpt, header, fragment):
    write_safetensors(ckpt / "model.safetensors", header)
    code, out, err = result = run_cli(ckpt)
    out = findings(result)
    assert code == 1 and out.startswith("LD712 safetensors-file-corrupt at model.safetensors:"), out
    assert fragment in out and out.count("\n") == 1, out


@pytest.mark.parametrize("shard", [["model.safetensors"], "../model.safetensors", ""])
def test_index_naming_a_non_file_is_ld712(ckpt, shard):
    header, _ = safetensors_file.read_header(ckpt / "model.safetensors")
    weight_map = {name: "model.safetensors" for name in header}
    weight_map[EMBED] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    code, out, err = result = run_cli(ckpt)
    out = findings(result)
    assert code == 1 and "LD712" in out and "weight_map names" in out, out


# --- 5. JSON files and config fields of the wrong type -------------------------------------------

@pytest.mark.parametrize("content,fragment", [
    (b"5", "config.json: expected a JSON object, found int"),
    (b"[]", "config.json: expected a JSON object, found list"),
    (b'{"model_type": "gemma\xff"}', "config.json: not UTF-8 text"),
    (b"{not json", "config.json: not valid JSON"),
], ids=["number", "list", "not-utf8", "not-json"])
def test_config_not_a_json_object_exits_2(ckpt, content, fragment):
    (ckpt / "config.json").write_bytes(content)
    assert_one_line_error(run_cli(ckpt), fragment)


@pytest.mark.parametrize("name", ["generation_config.json", "tokenizer_config.json", "tokenizer.json",
                                  "special_tokens_map.json"])
def test_other_json_file_not_an_object_exits_2(ckpt, name):
    (ckpt / name).write_text("[1, 2]")
    assert_one_line_error(run_cli(ckpt), f"{name}: expected a JSON object, found list")


WRONG_FIELDS = [
    ("model_type", ["gemma"], "model_type must be a string, found an array"),
    ("hidden_size", "64", "hidden_size must be a positive integer, found a string"),
    ("hidden_size", None, "hidden_size must be a positive integer, found null"),
    ("num_attention_heads", 0, "num_attention_heads must be a positive integer, found 0"),
    ("num_key_value_heads", 1.5, "num_key_value_heads must be a positive integer, found 1.5"),
    ("head_dim", True, "head_dim must be a positive integer, found a boolean"),
    ("num_hidden_layers", 10**12, "num_hidden_layers must be at most"),
    ("vocab_size", [512], "vocab_size must be a positive integer, found an array"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a number, found a string"),
    ("rope_theta", {"base": 1}, "rope_theta must be a number, found an object"),
    ("hidden_activation", ["gelu"], "hidden_activation must be a string"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false, found a string"),
    ("pad_token_id", "0", "pad_token_id must be an integer or an array of integers, found a string"),
    ("eos_token_id", [1, "2"], "eos_token_id must be an integer or an array of integers, found an array holding a string"),
    ("layer_types", [["sliding_attention"]], "layer_types must be an array of strings"),
    ("rope_scaling", {"rope_type": "linear", "factor": "8"},
     "rope_scaling must be an object whose factor is a number, found a string"),
    ("rope_scaling", {"rope_type": "linear", "factor": None},
     "rope_scaling must be an object whose factor is a number, found null"),
    ("rope_scaling", [8], "rope_scaling must be an object, found an array"),
    ("sliding_window_pattern", "6", "sliding_window_pattern must be a positive integer"),
    ("final_logit_softcapping", [30.0], "final_logit_softcapping must be a number"),
    ("text_config", [], "text_config must be an object, found an array"),
    ("text_config", {"model_type": ["gemma3_text"]}, "text_config.model_type must be a string"),
]


@pytest.mark.parametrize("field,value,fragment", WRONG_FIELDS,
                         ids=[f"{f}={json.dumps(v)}" for f, v, _ in WRONG_FIELDS])
def test_config_field_of_the_wrong_type_exits_2_naming_it(ckpt, field, value, fragment):
    edit_json(ckpt, "config.json", **{field: value})
    assert_one_line_error(run_cli(ckpt), f"config.json: {fragment}")


@pytest.mark.parametrize("name,change,fragment", [
    ("generation_config.json", {"eos_token_id": "1"}, "generation_config.json: eos_token_id must be an integer"),
    ("tokenizer.json", {"model": ["BPE"]}, "tokenizer.json: model must be an object"),
    ("tokenizer.json", {"added_tokens": 7}, "tokenizer.json: added_tokens must be an array"),
    ("tokenizer.json", {"added_tokens": [{"id": "0", "content": "<pad>"}]}, "tokenizer.json: added_tokens entries"),
    ("tokenizer.json", {"added_tokens": [{"id": 0, "content": ["<pad>"]}]}, "tokenizer.json: added_tokens entries"),
    ("tokenizer_config.json", {"chat_template": 5}, "tokenizer_config.json: chat_template must be a string"),
    ("tokenizer_config.json", {"additional_special_tokens": "<end_of_turn>"},
     "tokenizer_config.json: additional_special_tokens must be an array"),
    ("tokenizer_config.json", {"added_tokens_decoder": {"x": {"content": "<pad>"}}},
     "added_tokens_decoder key 'x' is not a token id"),
], ids=["generation-eos", "tokenizer-model", "added-tokens", "added-id", "added-content", "chat-template",
        "additional-special", "decoder-key"])
def test_tokenizer_and_generation_fields_of_the_wrong_type_exit_2(ckpt, name, change, fragment):
    edit_json(ckpt, name, **change)
    assert_one_line_error(run_cli(ckpt), fragment)


def test_tokenizer_vocab_id_of_the_wrong_type_exits_2(ckpt):
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["model"]["vocab"]["tok10"] = "10"
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    assert_one_line_error(run_cli(ckpt), "tokenizer.json: model.vocab['tok10'] must be an integer id")


# --- 6. the pad row transformers zeroes is not under-trained --------------------------------------

def set_rows(rows, scale):
    def fn(t):
        t[EMBED][rows] *= ml_dtypes.bfloat16(scale)
    return fn


def test_zeroed_pad_row_is_clean(ckpt):
    assert json.loads((ckpt / "config.json").read_text())["pad_token_id"] == 0
    edit_tensors(ckpt, set_rows(0, 0))   # what nn.Embedding(padding_idx=0) leaves
    code, out, err = result = run_cli(ckpt)
    assert findings(result) == "" and code == 0


def test_other_small_rows_are_still_flagged_next_to_a_zeroed_pad_row(ckpt):
    edit_tensors(ckpt, set_rows(0, 0))
    edit_tensors(ckpt, set_rows(slice(200, 205), 1e-3))
    report = audit.audit(ckpt).report
    (finding,) = report["findings"]
    assert finding["code"] == "LD102" and finding["evidence"]["ids"] == [200, 201, 202, 203, 204]


@pytest.mark.parametrize("row,scale,pad", [(5, 0, 0), (0, 1e-3, 0), (0, 0, None)],
                         ids=["zero-row-not-pad", "tiny-pad-row-not-zero", "no-pad-token-id"])
def test_ld102_still_fails_when_the_row_is_not_a_zeroed_pad_row(ckpt, row, scale, pad):
    edit_json(ckpt, "config.json", pad_token_id=pad)
    edit_tensors(ckpt, set_rows(row, scale))
    report = audit.audit(ckpt, select=["LD102"]).report
    assert [f["code"] for f in report["findings"]] == ["LD102"]
    assert report["findings"][0]["evidence"]["ids"] == [row]
