"""Google DeepMind's gemma as a compared implementation (`--impl deepmind`).

The parity tests need the deepmind extra (its own virtualenv: `python -m
llmdiff.references.deepmind_gemma install`) and are skipped without it; the missing-extra
message is tested always.
"""

from __future__ import annotations

import os

import pytest

from conftest import run_by_candidate
from llmdiff.references.deepmind_gemma import INSTALL
from llmdiff.runner import venv_python
from llmdiff.spec import capture_points, get_spec, model_names

needs_deepmind = pytest.mark.skipif(
    venv_python("deepmind") is None,
    reason=f"the deepmind extra is not installed (no {os.path.join('$LLMDIFF_VENVS', 'deepmind')}): {INSTALL}")


def _point(run, name):
    return next(p for p in run["points"] if p["name"] == name)


@needs_deepmind
# Gemma 1 in both dtypes; Gemma 2 and 3 in float32 only, with the slow cases, to keep the suite short.
@pytest.mark.parametrize("model, dtypes", [("gemma-7b", ("float32", "bfloat16")),
                                           pytest.param("gemma-2-2b", ("float32",), marks=pytest.mark.slow),
                                           pytest.param("gemma-3-1b", ("float32",), marks=pytest.mark.slow)])
def test_deepmind_at_parity_with_oracle_and_hf(llmdiff_cli, model, dtypes):
    if model not in model_names():
        pytest.skip(f"{model} has no spec yet")
    dtype_args = [a for d in dtypes for a in ("--dtype", d)]
    code, out, err, report = llmdiff_cli("compare", model, "--tiny", "--impl", "hf", "--impl", "deepmind",
                                         "--impl", "oracle", "--no-diagnose", *dtype_args)
    assert code == 0, out + err
    impl = next(i for i in report["implementations"] if i["name"] == "deepmind")
    assert impl["ok"] and impl["versions"]["gemma"] == "3.3.0"
    assert impl["python"] == venv_python("deepmind")  # its own virtualenv, found without @PYTHON
    assert "L{i}.attn_probs" in impl["details"]["not_captured"]
    spec = get_spec(model, tiny=True)
    for dtype in dtypes:
        run = run_by_candidate(report, "deepmind", dtype)
        assert run["verdict"] == "parity", run["first_divergence"]
        assert run["missing_points"] == []
        assert [p["name"] for p in run["points"]] == capture_points(spec)
        # bfloat16 flips close calls of a random tiny model's logits (std ~1): measured 0.94 on 234 positions
        assert run["logits"]["top1_agreement"] >= (0.99 if dtype == "float32" else 0.9)
    assert _point(run_by_candidate(report, "deepmind", "float32"), "logits")["rel_l2"] <= 1e-5
    assert _point(run_by_candidate(report, "deepmind", "float32"), "embed")["max_abs"] == 0.0


@needs_deepmind
def test_a_checkpoint_directory_is_read_from_its_own_files(llmdiff_cli, tmp_path):
    """`compare DIR`: deepmind gets its tensors converted from the checkpoint's files (no canonical copy)."""
    from llmdiff import weights

    spec = get_spec("gemma-7b", tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "ckpt", spec, weights.random_weights(spec, seed=3))
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", str(path), "--impl", "deepmind",
                                         "--no-diagnose", "--dtype", "float32", "--workdir", str(tmp_path / "work"))
    assert code == 0, out + err
    assert report["weights"]["source"] == "hf" and not (tmp_path / "work" / "canonical.safetensors").exists()
    run = run_by_candidate(report, "deepmind", "float32")
    assert run["verdict"] == "parity" and _point(run, "embed")["max_abs"] == 0.0
    assert _point(run, "logits")["rel_l2"] <= 1e-5


def test_missing_extra_is_one_line_and_others_still_run(llmdiff_cli, tmp_path, monkeypatch):
    """No deepmind virtualenv and no importable gemma: one line with the install command, exit 2."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    # Whatever is installed, `import gemma` fails in the worker as it does without the extra.
    (shadow / "gemma.py").write_text("raise ModuleNotFoundError(\"No module named 'gemma'\", name='gemma')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("LLMDIFF_VENVS", str(tmp_path / "no-venvs"))
    code, _, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", "hf", "--impl", "deepmind",
                                       "--dtype", "float32", "--no-diagnose")
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines == [f"llmdiff: error: deepmind: implementation 'deepmind' needs the deepmind extra: {INSTALL}"]
    assert run_by_candidate(report, "hf", "float32")["verdict"] == "parity"  # the others still ran
    assert run_by_candidate(report, "deepmind", "float32")["verdict"] == "error"


@needs_deepmind
@pytest.mark.slow   # two compares, 42 s on this project's 2 cores
def test_weights_made_on_its_device_give_the_host_weights_captures(tmp_path):
    """Full-size random weights are made by each worker (`makes_weights`): DeepMind's in JAX with
    its 64-bit types off. Forced on a tiny model, its captures are the host-made weights' bit for
    bit, in both dtypes."""
    import numpy as np

    import llmdiff
    from llmdiff import safetensors_file

    captures = {}
    for generate in (True, False):
        work = tmp_path / f"generate-{generate}"
        result = llmdiff.compare("gemma-7b", ["deepmind"], tiny=True, generate=generate, diagnose=False,
                                 workdir=work, tokenizer_parity=False)
        assert result, result.summary()
        assert (result.report["weights"].get("made") == "on each worker's device") is generate
        captures[generate] = {d: safetensors_file.load(work / f"deepmind-{d}.safetensors") for d in ("float32", "bfloat16")}
    for dtype, made in captures[True].items():
        host = captures[False][dtype]
        assert sorted(made) == sorted(host) and "logits" in made
        for name in host:
            assert np.array_equal(made[name], host[name]), (dtype, name)
