import json

import ml_dtypes
import numpy as np
import pytest

from llmdiff import convert, weights
from llmdiff.spec import get_spec


def test_deterministic_per_tensor_name():
    small = get_spec("gemma-7b", tiny=True)
    a, b = weights.random_weights(small, seed=0), weights.random_weights(small, seed=0)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = weights.random_weights(small, seed=1)
    assert not np.array_equal(a["L0.q"], c["L0.q"])


def test_values_are_bfloat16_numbers_with_realistic_scale():
    spec = get_spec("gemma-2b", tiny=True)
    w = weights.random_weights(spec)
    for name, a in w.items():
        assert np.array_equal(a, a.astype(ml_dtypes.bfloat16).astype(np.float32)), name
        if name.endswith("norm"):
            assert np.abs(a).max() > 0.1, name  # (1 + w) is not just 1
    assert 0.5 < np.std(w["embed"] * np.sqrt(spec.hidden_size)) < 2


def test_model_does_not_just_echo_its_input_token():
    """Random tied-embedding models tend to predict their input token; ours must not."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from llmdiff import inputs
    from llmdiff.references import gemma

    spec = get_spec("gemma-7b", tiny=True)
    params = jax.tree_util.tree_map(jnp.asarray, convert.unflatten(convert.to_deepmind(spec, weights.random_weights(spec))))
    tokens = np.array([inputs.synthetic_prompts(spec)[1]])
    logits = np.asarray(gemma.forward(params, jnp.asarray(tokens), spec, gemma.Precision())["logits"])
    echo = np.mean(logits.argmax(-1) == tokens)
    assert echo < 0.2, f"{echo:.0%} of positions predict their own input token"


def test_hf_config_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    spec = get_spec("gemma-2b", tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "c", spec, weights.random_weights(spec))
    config = transformers.AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_key_value_heads, config.head_dim) == (384, 1, 48)
    assert config.hidden_act == "gelu_pytorch_tanh"
    assert json.loads((path / "config.json").read_text())["hidden_activation"] == "gelu_pytorch_tanh"
    back = weights.read_hf_checkpoint(path, spec)
    assert weights.weights_fingerprint(back) == weights.weights_fingerprint(weights.random_weights(spec))
