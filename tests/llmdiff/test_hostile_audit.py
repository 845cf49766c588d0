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
    audit.write_example_tokenizer_files(path, spec)
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
