"""keras-hub's Gemma on Keras' JAX backend as a compared implementation (`--impl keras`).

The runs need the keras extra (its own virtualenv, keras-hub without TensorFlow: `python -m
llmdiff.references.keras_gemma install`) and are skipped without it; the missing-extra message,
the constructor arguments and the RoPE layout are tested always (numpy only).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import run_by_candidate
from llmdiff.references.keras_gemma import INSTALL, backbone_config, halves, lock_file, lock_parts
from llmdiff.runner import venv_python
from llmdiff.spec import capture_points, get_spec

needs_keras = pytest.mark.skipif(
    venv_python("keras") is None,
    reason=f"the keras extra is not installed (no {os.path.join('$LLMDIFF_VENVS', 'keras')}): {INSTALL}")


def _has_tensorflow_text() -> bool:
    python = venv_python("keras")
    return python is not None and any(Path(python).parents[1].glob("lib/python*/site-packages/tensorflow_text"))


needs_keras_tf = pytest.mark.skipif(
    not _has_tensorflow_text(),
    reason="the keras extra has no tensorflow-text: python -m llmdiff.references.keras_gemma install --tensorflow-text")


def _points(run):
    return {p["name"]: p for p in run["points"]}


# --- always ------------------------------------------------------------------------------------

def test_missing_extra_is_one_line(monkeypatch):
    import sys

    from llmdiff.job import Job, WeightsSource
    from llmdiff.references.base import MissingExtra
    from llmdiff.references.keras_gemma import KerasReference

    monkeypatch.setenv("KERAS_BACKEND", "jax")            # restored after the test: the adapter sets it
    monkeypatch.setitem(sys.modules, "keras", None)       # `import keras` raises ImportError
    monkeypatch.setitem(sys.modules, "keras_hub", None)
    job = Job(spec=get_spec("gemma-7b", tiny=True).to_dict(), tokens=[[2, 5]], weights=WeightsSource(seed=0))
    with pytest.raises(MissingExtra) as e:
        KerasReference(job)
    assert str(e.value) == f"implementation 'keras' needs the keras extra: {INSTALL}"


def test_missing_extra_and_others_still_run(llmdiff_cli, tmp_path, monkeypatch):
    """No keras virtualenv and no importable keras_hub: one line with the install command, exit 2,
    and hf still runs."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "keras_hub.py").write_text("raise ModuleNotFoundError(\"No module named 'keras_hub'\", name='keras_hub')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LLMDIFF_VENVS", str(tmp_path / "no-venvs"))
    code, _, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf", "--impl", "keras",
                                       "--dtype", "float32", "--no-diagnose", "--no-tokenizer-parity")
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines == [f"llmdiff: error: keras: implementation 'keras' needs the keras extra: {INSTALL}"]
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"
    assert run_by_candidate(report, "keras", "float32")["verdict"] == "error"


def test_backbone_config_as_keras_hubs_converter_derives_it():
    g1, g2, g27, g3 = (backbone_config(get_spec(m, tiny=True)) for m in ("gemma-7b", "gemma-2-2b", "gemma-2-27b", "gemma-3-27b"))
    spec = get_spec("gemma-7b", tiny=True)
    assert g1["intermediate_dim"] == 2 * spec.mlp_dim                   # Gemma 1/2: gate width is half of it
    assert g1["query_head_dim_normalize"] and not g1["use_sliding_window_attention"]
    assert g2["query_head_dim_normalize"] and g2["use_sliding_window_attention"]
    assert g2["final_logit_soft_cap"] == 30.0 and g2["attention_logit_soft_cap"] == 50.0
    assert g2["vocabulary_size"] == get_spec("gemma-2-2b", tiny=True).hf_vocab_size
    assert g27["query_head_dim_normalize"] is False                     # query_pre_attn_scalar = D / N
    s3 = get_spec("gemma-3-27b", tiny=True)
    assert g3["intermediate_dim"] == s3.mlp_dim and g3["global_rope_scaling_factor"] == s3.rope_scale == 8.0
    assert g3["query_head_dim_normalize"] is False and g3["vision_encoder"] is None


@pytest.mark.parametrize("change, words", [
    (dict(attention_types=("global", "local")), "layers are local at [0]"),
    (dict(rope_base=500000.0), "hard-codes the RoPE bases"),
    (dict(query_pre_attn_scalar=40), "query_pre_attn_scalar is 40"),
    (dict(norm_eps=1e-5), "eps 1e-6"),
])
def test_backbone_config_refuses_what_keras_hub_cannot_express(change, words):
    spec = dataclasses.replace(get_spec("gemma-2-2b", tiny=True), **change)
    with pytest.raises(ValueError) as e:
        backbone_config(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_halves_undoes_keras_hubs_rope_interleave():
    """CachedGemmaAttention._apply_rope: reshape(stack(split(x, 2, -1), -1), shape(x))."""
    x = np.random.default_rng(0).standard_normal((1, 3, 2, 8))
    interleaved = np.stack(np.split(x, 2, axis=-1), axis=-1).reshape(x.shape)
    assert not np.array_equal(interleaved, x)
    assert np.array_equal(halves(interleaved), x)


# --- keras-hub itself ---------------------------------------------------------------------------

def _compare(tmp_path, model, dtypes, diagnose=False):
    import llmdiff

    return llmdiff.compare(model, ["keras"], tiny=True, dtypes=list(dtypes), diagnose=diagnose,
                           workdir=str(tmp_path / "work")).report


def _at_parity(report, model, dtype):
    run = run_by_candidate(report, "keras", dtype)
    assert run["verdict"] == "parity", run["first_divergence"]
    assert run["missing_points"] == []
    assert [p["name"] for p in run["points"]] == capture_points(get_spec(model, tiny=True))
    assert _points(run)["embed"]["max_abs"] == 0.0                       # the rounded sqrt(D) normaliser
    return run


@needs_keras
def test_gemma_float32_at_parity(tmp_path):
    report = _compare(tmp_path, "gemma-7b", ["float32"])
    impl = next(i for i in report["implementations"] if i["name"] == "keras")
    assert impl["ok"] and impl["versions"]["keras-hub"] == "0.32.0"
    # its own tokenizer joins the tokenizer parity of a compare that runs keras
    tok = {i["name"]: i for i in report["tokenizer"]["implementations"]}
    assert tok["keras"]["available"] and report["tokenizer"]["agree"]
    assert impl["python"] == venv_python("keras")                        # its own virtualenv, found by name
    run = _at_parity(report, "gemma-7b", "float32")
    assert _points(run)["logits"]["rel_l2"] <= 2e-6 and run["logits"]["top1_agreement"] == 1.0


@needs_keras
def test_a_checkpoint_directory_is_read_from_its_own_files(tmp_path):
    """`compare DIR`: keras gets its tensors converted from the checkpoint's files (no canonical copy)."""
    import llmdiff
    from llmdiff import weights

    spec = get_spec("gemma-7b", tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "ckpt", spec, weights.random_weights(spec, seed=3))
    report = llmdiff.compare("gemma-7b", ["keras"], tiny=True, weights=str(path), dtypes=["float32"],
                             diagnose=False, workdir=str(tmp_path / "work")).report
    assert report["weights"]["source"] == "hf" and not (tmp_path / "work" / "canonical.safetensors").exists()
    assert _points(_at_parity(report, "gemma-7b", "float32"))["logits"]["rel_l2"] <= 2e-6


@needs_keras
@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-7b", "gemma-2-2b", "gemma-3-1b"])
def test_float32_and_bfloat16_at_parity(tmp_path, model):
    report = _compare(tmp_path, model, ["float32", "bfloat16"])
    assert _points(_at_parity(report, model, "float32"))["logits"]["rel_l2"] <= 2e-6
    # bfloat16 flips close calls of a random tiny model's logits: measured 0.983-0.991
    assert _at_parity(report, model, "bfloat16")["logits"]["top1_agreement"] >= 0.95


@needs_keras
@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-2-27b", "gemma-3-27b"])
def test_query_scale_ignored_by_the_decoder_blocks(tmp_path, model):
    """keras-hub 0.32.0's GemmaDecoderBlock and Gemma3DecoderBlock build their attention with
    query_head_dim_normalize=True whatever they were given: a 27B (query_pre_attn_scalar = D/N,
    not head_dim) scales queries by head_dim ** -0.5. LD504 names it where it starts."""
    report = _compare(tmp_path, model, ["float32"], diagnose=True)
    run = run_by_candidate(report, "keras", "float32")
    assert run["first_divergence"] == "L0.attn_out"
    assert all(_points(run)[f"L0.{p}"]["verdict"] == "parity" for p in ("attn_norm", "q", "k", "v"))
    finding = next(f for f in report["findings"] if f["implementation"] == "keras")
    assert (finding["code"], finding["where"]) == ("LD504", "L0.attn_out")
    assert finding["evidence"]["knob"] == {"query_scale": "head_dim"}
    assert finding["evidence"]["after"]["floor_ratio"] < 2
    # and in keras-hub itself: the backbone was told False, its attention layers run True
    probe = ("import keras_hub\n"
             "b = keras_hub.models.GemmaBackbone(vocabulary_size=8, num_layers=1, num_query_heads=8, num_key_value_heads=4,"
             " hidden_dim=288, intermediate_dim=16, head_dim=32, query_head_dim_normalize=False)\n"
             "print(b.query_head_dim_normalize, b.get_layer('decoder_block_0').attention.query_head_dim_normalize)\n")
    out = subprocess.run([venv_python("keras"), "-c", probe], capture_output=True, text=True, check=True,
                         env=dict(os.environ, KERAS_BACKEND="jax"))
    assert out.stdout.split() == ["False", "True"]


# --- its own tokenizer: keras-hub's GemmaTokenizer / Gemma3Tokenizer in tokenizer parity --------

def test_lock_keeps_tensorflow_text_apart():
    """The base install has no TensorFlow; --tensorflow-text adds the set pip resolved for it."""
    base, tf_part = lock_parts(lock_file())
    names = lambda pins: {p.split("==")[0].lower() for p in pins}  # noqa: E731
    assert all("==" in p for p in base + tf_part)
    assert "sentencepiece" in names(base) and "keras-hub" in names(base)
    assert not names(base) & {"tensorflow", "tensorflow-text", "protobuf", "grpcio"}
    assert {"tensorflow", "tensorflow-text", "h5py"} <= names(tf_part)


def test_keras_tokenizer_without_the_extra_is_unavailable_not_an_error(tmp_path, monkeypatch):
    import importlib.util

    from llmdiff import tokenizer

    if importlib.util.find_spec("keras_hub") is not None:
        pytest.skip("keras-hub is importable in this interpreter")
    monkeypatch.setenv("LLMDIFF_VENVS", str(tmp_path / "no-venvs"))
    report = tokenizer.check_tokenizer("gemma-7b", tiny=True, implementations=["keras"])
    impls = {i["name"]: i for i in report["tokenizer"]["implementations"]}
    assert impls["keras"]["available"] is False and INSTALL in impls["keras"]["reason"]
    assert report["tokenizer"]["agree"] and report["findings"] == []
    # not named: not there at all (parity of a compare without --impl keras never starts it)
    plain = tokenizer.check_tokenizer("gemma-7b", tiny=True)
    assert "keras" not in {i["name"] for i in plain["tokenizer"]["implementations"]}


def _keras_parity(model):
    from llmdiff import tokenizer

    report = tokenizer.check_tokenizer(model, tiny=True, implementations=["keras"])
    parity = report["tokenizer"]
    return report, parity, {i["name"]: i for i in parity["implementations"]}


def _judged_like_the_others(report, parity, impls, name, spec):
    impl = impls[name]
    assert impl["available"], impl["reason"]
    # causal_lm.generate(text)'s preprocessing puts BOS in front and nothing after; tokenizer(text) adds nothing
    assert impl["adds_bos"] == 1 and impl["adds_eos"] == 0 and impl["probe_ids"][0] == spec.bos_id
    for s in parity["strings"]:
        assert s["ids"][name] == s["ids"]["sentencepiece"], (s["name"], s["differences"])
        assert s["decoded"][name] == s["decoded"]["sentencepiece"], s["name"]
    assert not [f for f in report["findings"] if f.get("implementation") == name]


@needs_keras
@pytest.mark.parametrize("model", ["gemma-7b", pytest.param("gemma-2-2b", marks=pytest.mark.slow),
                                   pytest.param("gemma-3-1b", marks=pytest.mark.slow)])
def test_keras_tokenizer_in_tokenizer_parity(model):
    """keras-hub's own tokenizer (GemmaTokenizer; Gemma3Tokenizer for Gemma 3) built from the
    same tokenizer.model, called in the keras virtualenv, judged by the same parity checks."""
    report, parity, impls = _keras_parity(model)
    spec = get_spec(model, tiny=True)
    assert parity["agree"] and report["exit_code"] == 0
    if model == "gemma-3-1b" and not _has_tensorflow_text():
        # keras-hub 0.32's Gemma3CausalLMPreprocessor, which puts BOS in front for
        # causal_lm.generate, refuses to be built without tensorflow: said, not guessed around
        assert impls["keras"]["available"] is False
        assert "Gemma3CausalLMPreprocessor" in impls["keras"]["reason"] and "--tensorflow-text" in impls["keras"]["reason"]
        return
    _judged_like_the_others(report, parity, impls, "keras", spec)
    assert impls["keras"]["version"].startswith("keras-hub 0.32.0, sentencepiece ")
    if not _has_tensorflow_text():
        assert impls["keras-tf"]["available"] is False and "--tensorflow-text" in impls["keras-tf"]["reason"]


@needs_keras_tf
@pytest.mark.slow
@pytest.mark.parametrize("model", ["gemma-7b", "gemma-3-1b"])
def test_keras_tf_data_tokenizer_in_tokenizer_parity(model):
    """keras-hub's tf.data path: tensorflow-text's SentencepieceTokenizer on the same file."""
    report, parity, impls = _keras_parity(model)
    _judged_like_the_others(report, parity, impls, "keras-tf", get_spec(model, tiny=True))
    assert "tensorflow-text 2.21" in impls["keras-tf"]["version"]
