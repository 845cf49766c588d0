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


@pytest.mark.parametrize("name", ["gemma-2-27b", "gemma-3-1b", "gemma-3-4b"])
def test_gemma2_gemma3_hf_config_loads_with_every_number(name, tmp_path):
    """HF's defaults differ from most models (window 4096, softcaps, scalar 256, no RoPE scaling):
    what transformers reads back must be the spec, not a default."""
    transformers = pytest.importorskip("transformers")
    spec = get_spec(name, tiny=True)
    path = weights.write_hf_checkpoint(tmp_path / "ckpt", spec, weights.random_weights(spec), "float32")
    config = transformers.AutoConfig.from_pretrained(path)
    assert type(config).__name__ == {"gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig"}[spec.family]
    assert config.sliding_window == spec.sliding_window
    assert config.layer_types == [{"local": "sliding_attention", "global": "full_attention"}[t]
                                  for t in spec.layer_types]
    assert config.query_pre_attn_scalar ** -0.5 == spec.query_scale
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (spec.attn_softcap, spec.final_softcap)
    assert config.vocab_size == (spec.hf_vocab_size or spec.vocab_size)
    assert config.hidden_activation == "gelu_pytorch_tanh"
    rope = getattr(config, "rope_parameters", None)
    if rope is not None and spec.family == "gemma3":  # transformers 5.x: RoPE per layer type
        assert rope["full_attention"]["rope_theta"] == spec.rope_base
        assert rope["sliding_attention"]["rope_theta"] == spec.rope_base_local
        assert rope["sliding_attention"]["rope_type"] == "default"
        if spec.rope_scale != 1:
            assert (rope["full_attention"]["rope_type"], rope["full_attention"]["factor"]) == ("linear", spec.rope_scale)
        else:
            assert rope["full_attention"]["rope_type"] == "default"
    # and the checkpoint reads back to the same canonical weights
    again = weights.read_hf_checkpoint(path, spec)
    assert weights.weights_fingerprint(again) == weights.weights_fingerprint(weights.random_weights(spec))


def test_generator_gives_the_same_bits_in_numpy_torch_and_jax():
    """Workers make full-size weights on their own device with their own framework."""
    torch = pytest.importorskip("torch")
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    spec = get_spec("gemma-2-2b", tiny=True)  # zero padding rows in its embedding
    shapes = convert.canonical_shapes(spec)
    for name in ("embed", "L0.q", "L1.down", "L0.attn_norm", "final_norm"):
        ref = weights.generate_numpy(spec, name, shapes[name])
        assert np.array_equal(ref, weights.generate_torch(spec, name, shapes[name]).numpy()), name
        assert np.array_equal(ref, np.asarray(weights.generate_jax(spec, name, shapes[name]))), name
        assert np.array_equal(ref.astype(np.float64),
                              weights.generate_torch(spec, name, shapes[name], dtype=torch.float64).numpy()), name


def test_generator_across_chunks_and_its_distribution(monkeypatch):
    spec = get_spec("gemma-7b", tiny=True)
    shape = convert.canonical_shapes(spec)["embed"]
    whole = weights.generate_numpy(spec, "embed", shape)
    monkeypatch.setattr(weights, "CHUNK", 1000)  # the same bits whatever the step
    monkeypatch.setattr(weights, "_HOST_BLOCK", 1000)  # the host's threaded blocks too
    assert np.array_equal(whole, weights.generate_numpy(spec, "embed", shape))
    torch = pytest.importorskip("torch")
    assert np.array_equal(whole, weights.generate_torch(spec, "embed", shape).numpy())
    std = weights.tensor_std(spec, "embed")
    assert abs(whole.std() / std - 1) < 0.02 and np.abs(whole).max() <= std * 3 ** 0.5 * 1.01
    assert abs(np.corrcoef(whole.ravel()[:-1], whole.ravel()[1:])[0, 1]) < 0.01  # neighbours independent


def test_generated_fingerprint_depends_on_seed_and_model():
    a = get_spec("gemma-7b")
    assert weights.generated_fingerprint(a, 0) == weights.generated_fingerprint(a, 0)
    assert weights.generated_fingerprint(a, 0) != weights.generated_fingerprint(a, 1)
    assert weights.generated_fingerprint(a, 0) != weights.generated_fingerprint(get_spec("gemma-2b"), 0)
