"""`--weights deepmind:PATH`: Orbax/Flax checkpoints as Google ships them, read without gm.ckpts."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from llmdiff import convert, safetensors_file, weights
from llmdiff.deepmind_checkpoint import deepmind_params, read_deepmind_checkpoint
from llmdiff.errors import WeightsError
from llmdiff.runner import venv_python
from llmdiff.spec import get_spec

SEED = 3


def _nested(flat):
    return convert.unflatten(flat)


def _flat_release_layout(flat):
    """The layout of Google's released checkpoints: 'transformer/<module>' -> {param: array}."""
    out = {}
    for key, value in flat.items():
        module, _, param = key.rpartition("/")
        if module.endswith("/mlp"):  # released checkpoints keep the MLP weights under .../w
            module, param = key, "w"
        out.setdefault(f"transformer/{module}", {})[param] = value
    return out


def _stacked(flat, pattern):
    out = {}
    for key, value in flat.items():
        if key.startswith("layer_"):
            layer, rest = key.split("/", 1)
            i = int(layer.removeprefix("layer_"))
            out.setdefault(f"stacked_layers/attention_type_{i % pattern}/{rest}", {})[i // pattern] = value
        else:
            out[key] = value
    return {"transformer": _nested({k: np.stack([v[s] for s in sorted(v)]) if isinstance(v, dict) else v
                                    for k, v in out.items()})}


@pytest.fixture
def spec_and_weights():
    spec = get_spec("gemma-7b", tiny=True)
    canon = weights.random_weights(spec, SEED)
    return spec, canon, convert.to_deepmind(spec, canon)


@pytest.mark.parametrize("layout", ["nested", "flat", "stacked", "kauldron"])
def test_every_published_layout_maps_to_deepmind_names(spec_and_weights, layout):
    spec, _, flat = spec_and_weights
    tree = {"nested": lambda: _nested(flat), "flat": lambda: _flat_release_layout(flat),
            "stacked": lambda: _stacked(flat, 2), "kauldron": lambda: {"params": _nested(flat), "step": 7}}[layout]()
    got, skipped = deepmind_params(tree)
    assert sorted(got) == sorted(flat) and skipped == []
    for k in flat:
        assert np.array_equal(got[k], flat[k]), k


def test_multimodal_params_are_skipped(spec_and_weights):
    _, _, flat = spec_and_weights
    tree = _nested(flat)
    tree["vision_encoder"] = {"siglip": {"w": np.zeros(3)}}
    tree["embedder"]["mm_input_projection"] = {"w": np.zeros((2, 2))}
    got, skipped = deepmind_params(tree)
    assert sorted(got) == sorted(flat)
    assert skipped == ["embedder/mm_input_projection/w", "vision_encoder/siglip/w"]


def write_orbax(path: Path, tree) -> Path:
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(path.absolute(), tree)
    checkpointer.wait_until_finished()
    return path


@pytest.fixture
def orbax_checkpoint(tmp_path, spec_and_weights):
    """A bfloat16 checkpoint in the released layout, written with Orbax itself."""
    _, _, flat = spec_and_weights
    tree = _flat_release_layout({k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in flat.items()})
    return write_orbax(tmp_path / "gemma-7b-tiny-orbax", tree)


def test_orbax_checkpoint_reads_back_bit_exact(orbax_checkpoint, spec_and_weights):
    spec, canon, _ = spec_and_weights
    got, info = read_deepmind_checkpoint(orbax_checkpoint, spec)
    assert sorted(got) == sorted(canon) and info == {"skipped": []}
    for k in canon:
        assert got[k].dtype == np.float32 and np.array_equal(got[k], canon[k]), k


def _logits(workdir: Path, impl: str, dtype: str) -> np.ndarray:
    return np.asarray(safetensors_file.load(workdir / f"{impl}-{dtype}.safetensors")["logits"])


@pytest.mark.slow   # 35 s: DeepMind's worker, the oracle and hf on one orbax checkpoint
def test_orbax_checkpoint_round_trips_into_every_implementation(llmdiff_cli, orbax_checkpoint, tmp_path):
    """Same numbers whether the weights come from the Orbax checkpoint or the canonical set."""
    impls = ["hf", "oracle"] + (["deepmind"] if venv_python("deepmind") else [])
    impl_args = [a for i in impls for a in ("--impl", i)]
    # bfloat16, the dtype of released checkpoints and the one where every rounding shows.
    common = ["compare", "gemma-7b", "--tiny", "--seed", str(SEED), "--no-diagnose", "--dtype", "bfloat16", *impl_args]
    code, out, err, canonical = llmdiff_cli(*common, "--workdir", str(tmp_path / "canonical"))
    assert code == 0, out + err
    code, out, err, from_orbax = llmdiff_cli(*common, "--weights", f"deepmind:{orbax_checkpoint}",
                                             "--workdir", str(tmp_path / "orbax"))
    assert code == 0, out + err
    assert from_orbax["weights"]["source"] == "deepmind"
    assert from_orbax["weights"]["fingerprint"] == canonical["weights"]["fingerprint"]
    for impl in impls:
        for dtype in ("bfloat16",):
            a, b = _logits(tmp_path / "canonical", impl, dtype), _logits(tmp_path / "orbax", impl, dtype)
            assert np.array_equal(a, b), f"{impl} {dtype}: logits differ by {np.abs(a - b).max()}"


def test_not_an_orbax_checkpoint_is_one_line(llmdiff_cli, tmp_path):
    (tmp_path / "empty").mkdir()
    code, _, err, _ = llmdiff_cli("compare", "gemma-7b", "--tiny", "--weights", f"deepmind:{tmp_path / 'empty'}")
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmdiff: error: ") and "is not an Orbax checkpoint" in lines[0], err


def test_checkpoint_of_another_size_says_so(orbax_checkpoint):
    with pytest.raises(WeightsError, match="2 layers, vocab 512 and hidden 96, but gemma-7b has 28"):
        read_deepmind_checkpoint(orbax_checkpoint, get_spec("gemma-7b"))
